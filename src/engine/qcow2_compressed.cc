// Qcow2Image's side of compressed writes: routing writes to the staging
// cache, and the CompressedClusterSink the cache commits through.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/cluster_pieces.h"
#include "format/l2_entry.h"
#include "format/refcount_block.h"

namespace qcow2fs {
namespace {

// How many of the `length` bytes at guest `offset` lie before the end of a
// disk of `disk_size` bytes.
uint64_t BytesBeforeEnd(uint64_t disk_size, uint64_t offset, uint64_t length) {
  return offset >= disk_size ? 0 : std::min(length, disk_size - offset);
}

}  // namespace

Status Qcow2Image::SetUpCompressedWrites(const OpenOptions& options) {
  const char* want = *options.compress == CompressionType::kZstd ? "zstd" : "zlib";
  const char* have = compression_ == CompressionType::kZstd ? "zstd" : "zlib";
  if (read_only_) {
    return Status(ErrorCode::kInvalidArgument, "compressed writes need a writable image");
  }
  if (*options.compress != compression_) {
    return Status(ErrorCode::kInvalidArgument,
                  std::string("compress=") + want +
                      " does not match the image's compression type " + have +
                      " (create the image with compression_type=" + want + ")");
  }
  if (has_data_file_) {
    return Status(ErrorCode::kUnsupported,
                  "images with an external data file cannot hold compressed clusters");
  }
  if (MaxRefcount(refcount_order_) < 3) {
    return Status(ErrorCode::kUnsupported,
                  "compressed writes need refcounts of at least 2 bits (several compressed "
                  "clusters share a host cluster)");
  }
  // Each compressed cluster counts one reference on every host cluster it
  // touches, and a segment holds one more on each until it is committed.
  const uint64_t max_per_host_cluster = MaxRefcount(refcount_order_) - 1;
  compressed_cache_ = std::make_unique<CompressedWriteCache>(
      static_cast<CompressedClusterSink&>(*this), compression_, cluster_size_, max_per_host_cluster,
      size(), options.compress_cache_bytes, options.compress_executor);
  return Status();
}

bool Qcow2Image::WritableInPlace(uint64_t offset, uint64_t end) {
  MutexLock lk(meta_mutex_);
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  const uint64_t l1_index = offset / l2_coverage;
  const uint64_t l1_entry = l1_[l1_index];
  if (!(l1_entry & kOflagCopied) || L1EntryL2Offset(l1_entry) == 0) return false;
  auto table = L2ForMappingLocked(l1_index, offset);
  if (!table.ok()) return false;
  const uint64_t index = (offset >> cluster_bits_) & (l2_entries_ - 1);
  const L2Entries entries((*table)->entries, extended_l2_);
  const uint64_t word = entries.word(index);
  if (ClassifyL2Entry(word, extended_l2_, false) != ClusterType::kNormal ||
      !(word & kOflagCopied)) {
    return false;
  }
  if (!extended_l2_) return true;
  const uint64_t touched =
      TouchedSubclusters(AlignDown(offset, cluster_size_), offset, end, subcluster_bits_);
  return (entries.bitmap(index) & touched) == touched;
}

Status Qcow2Image::WriteCompressMode(uint64_t offset, std::span<const std::byte> data) {
  for (const ClusterPiece& p : ClusterPieces(offset, offset + data.size(), cluster_bits_)) {
    const std::span<const std::byte> piece = data.subspan(p.begin - offset, p.length());
    // The cache decides first: while it stages bytes of this cluster they
    // are newer than the image's, so later bytes are staged on top of them,
    // never written under them. A direct write, once admitted, keeps the
    // cluster from being staged until it is done, so a staged cluster's
    // fill from the image never reads half of it.
    if (compressed_cache_->BeginDirectWrite(p.index)) {
      Status s;
      const bool direct = WritableInPlace(p.begin, p.end);
      if (direct) {
        // Already a normal cluster of ours: overwrite it where it is.
        ReaderLock guard(discard_lock_);
        s = WriteShared(p.begin, piece);
      }
      compressed_cache_->EndDirectWrite(p.index);
      QCOW2FS_RETURN_IF_ERROR(s);
      if (direct) continue;
    }
    QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Write(p.begin, piece));
  }
  return Status();
}

Status Qcow2Image::ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) {
  const uint64_t n = BytesBeforeEnd(size(), guest_offset, out.size());
  std::memset(out.data() + n, 0, out.size() - n);
  return n ? ReadImage(guest_offset, out.first(n)) : Status();
}

Status Qcow2Image::StoreSegment(std::span<const std::byte> data, std::span<const Placed> placed) {
  const uint64_t count = AlignUp(data.size(), cluster_size_) >> cluster_bits_;
  uint64_t segment;
  {
    MutexLock lk(meta_mutex_);
    QCOW2FS_RETURN_IF_ERROR(FindFreeSpaceLocked());
    QCOW2FS_ASSIGN_OR_RETURN(segment, AllocateClustersLocked(count));
  }
  // Written before anything points into it, without the metadata mutex;
  // its refcounts of 1 keep the clusters ours meanwhile.
  Status status = file_->WriteAt(segment, data);
  MutexLock lk(meta_mutex_);
  if (status.ok()) status = CommitSegmentLocked(placed, segment);
  // The segment's own hold goes, committed or not: clusters nothing points
  // into are freed once the entries are on disk.
  for (uint64_t i = 0; i < count; i++) {
    ReleaseClusterLocked(segment + (i << cluster_bits_));
  }
  if (status.ok() && l2_cache_->over_capacity()) status = WriteBackLocked();
  return status;
}

Status Qcow2Image::CommitSegmentLocked(std::span<const Placed> placed, uint64_t segment) {
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  for (const Placed& p : placed) {
    // An allocating write of the same guest cluster finishes first, so that
    // neither its entry nor the entry it replaced is lost or released twice.
    // (The staging cache admits no direct write to a cluster it stages, so
    // this is a guard, not a wait expected in practice.)
    const uint64_t guest_cluster = p.guest_offset >> cluster_bits_;
    std::shared_ptr<L2Table> pinned;
    while (!pinned) {
      while (inflight_.count(guest_cluster)) inflight_done_.Wait(meta_mutex_);
      QCOW2FS_ASSIGN_OR_RETURN(auto got, L2ForWriteLocked(p.guest_offset / l2_coverage));
      if (!inflight_.count(guest_cluster)) pinned = std::move(got);  // the load may drop the lock
    }
    L2Table& table = *pinned;
    const uint64_t index = (p.guest_offset >> cluster_bits_) & (l2_entries_ - 1);
    const L2Entries entries(table.entries, extended_l2_);
    const uint64_t old = entries.word(index);
    QCOW2FS_RETURN_IF_ERROR(CheckReleasableLocked(table, index, old, p.guest_offset));
    // Count the new reference on every host cluster the data touches
    // before any L2 entry points there.
    const uint64_t host_offset = segment + p.offset;
    for (const ClusterPiece& c : ClusterPieces(host_offset, host_offset + p.bytes, cluster_bits_)) {
      QCOW2FS_RETURN_IF_ERROR(refcounts_->Add(c.index, 1));
    }
    entries.Set(index, EncodeCompressed(host_offset, p.bytes, cluster_bits_), 0);
    table.dirty = true;
    if ((old & ~kOflagCopied) != 0) ReleaseEntryLocked(old);
  }
  return Status();
}

Status Qcow2Image::WriteUncompressedCluster(uint64_t guest_offset,
                                            std::span<const std::byte> data) {
  const uint64_t n = BytesBeforeEnd(size(), guest_offset, data.size());
  if (n == 0) return Status();
  ReaderLock guard(discard_lock_);
  return WriteShared(guest_offset, data.first(n));
}

bool Qcow2Image::CanZeroClusters() const {
  // Version 2 has no zero flag, and deallocating would let the backing
  // file show through.
  return version_ >= 3 || !backing_;
}

Status Qcow2Image::ZeroCluster(uint64_t guest_offset) {
  const uint64_t n = BytesBeforeEnd(size(), guest_offset, cluster_size_);
  if (n == 0) return Status();
  // The cluster is this entry's own commit: nothing staged to drop. The
  // cache asks only where CanZeroClusters(), so ClearRange changes entries
  // and never writes zeros back through the cache (which would wait for
  // this very commit).
  return ClearRange(guest_offset, n, /*discard=*/false, /*may_unmap=*/true,
                    /*drop_staged=*/false);
}

}  // namespace qcow2fs
