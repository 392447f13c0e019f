// Qcow2Image's side of compressed writes: routing writes to the staging
// cache, and the CompressedClusterSink the cache commits through.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/l2_entry.h"
#include "format/refcount_block.h"

namespace qcow2fs {

Status Qcow2Image::SetUpCompressedWrites(const OpenOptions& options) {
  const char* want = *options.compress == CompressionType::kZstd ? "zstd" : "zlib";
  const char* have = compression_ == CompressionType::kZstd ? "zstd" : "zlib";
  if (read_only_) {
    return Status(ErrorCode::kInvalidArgument, "compressed writes need a writable image");
  }
  if (*options.compress != compression_) {
    return Status(ErrorCode::kInvalidArgument,
                  std::string("compress=") + want + " does not match the image's compression type " +
                      have + " (create the image with compression_type=" + want + ")");
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
  compressed_cache_ = std::make_unique<CompressedWriteCache>(
      static_cast<CompressedClusterSink&>(*this), compression_, cluster_size_, size(),
      options.compress_cache_bytes, options.compress_executor);
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
  const uint64_t word = (*table)->entries[extended_l2_ ? 2 * index : index];
  if (ClassifyL2Entry(word, extended_l2_, false) != ClusterType::kNormal ||
      !(word & kOflagCopied)) {
    return false;
  }
  if (!extended_l2_) return true;
  const uint64_t cluster_start = AlignDown(offset, cluster_size_);
  const uint64_t first = (offset - cluster_start) >> subcluster_bits_;
  const uint64_t last = (end - 1 - cluster_start) >> subcluster_bits_;
  const uint64_t count = last - first + 1;
  const uint64_t touched = (count >= 32 ? 0xffffffffull : ((1ull << count) - 1)) << first;
  return ((*table)->entries[2 * index + 1] & touched) == touched;
}

Status Qcow2Image::WriteCompressMode(uint64_t offset, std::span<const std::byte> data) {
  const uint64_t end = offset + data.size();
  for (uint64_t pos = offset; pos < end;) {
    const uint64_t piece_end = std::min(end, AlignDown(pos, cluster_size_) + cluster_size_);
    const std::span<const std::byte> piece = data.subspan(pos - offset, piece_end - pos);
    const uint64_t index = pos >> cluster_bits_;
    // The cache decides first: while it stages bytes of this cluster they
    // are newer than the image's, so later bytes are staged on top of them,
    // never written under them. A direct write, once admitted, keeps the
    // cluster from being staged until it is done, so a staged cluster's
    // fill from the image never reads half of it.
    if (compressed_cache_->BeginDirectWrite(index)) {
      Status s;
      const bool direct = WritableInPlace(pos, piece_end);
      if (direct) {
        // Already a normal cluster of ours: overwrite it where it is.
        ReaderLock guard(discard_lock_);
        s = WriteShared(pos, piece);
      }
      compressed_cache_->EndDirectWrite(index);
      QCOW2FS_RETURN_IF_ERROR(s);
      if (direct) {
        pos = piece_end;
        continue;
      }
    }
    QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Write(pos, piece));
    pos = piece_end;
  }
  return Status();
}

Status Qcow2Image::ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) {
  const uint64_t disk = size();
  const uint64_t n = guest_offset >= disk ? 0 : std::min<uint64_t>(out.size(), disk - guest_offset);
  std::memset(out.data() + n, 0, out.size() - n);
  return n ? ReadImage(guest_offset, out.first(n)) : Status();
}

Result<uint64_t> Qcow2Image::AllocateSegment(uint64_t count) {
  MutexLock lk(meta_mutex_);
  QCOW2FS_RETURN_IF_ERROR(FindFreeSpaceLocked());
  return AllocateClustersLocked(count);
}

Status Qcow2Image::WriteSegment(uint64_t host_offset, std::span<const std::byte> data) {
  return file_->WriteAt(host_offset, data);
}

Status Qcow2Image::CommitSegment(const std::vector<Placed>& placed, uint64_t segment_offset,
                                 uint64_t count) {
  MutexLock lk(meta_mutex_);
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  Status status;
  for (const Placed& p : placed) {
    // An allocating write of the same guest cluster finishes first, so that
    // neither its entry nor the entry it replaced is lost or released twice.
    // (The staging cache admits no direct write to a cluster it stages, so
    // this is a guard, not a wait expected in practice.)
    const uint64_t guest_cluster = p.guest_offset >> cluster_bits_;
    std::shared_ptr<L2Table> pinned;
    while (status.ok() && !pinned) {
      while (inflight_.count(guest_cluster)) inflight_done_.Wait(meta_mutex_);
      auto got = L2ForWriteLocked(p.guest_offset / l2_coverage);
      if (!got.ok()) {
        status = got.status();
      } else if (!inflight_.count(guest_cluster)) {  // the load may drop the lock
        pinned = std::move(got).value();
      }
    }
    if (!status.ok()) break;
    L2Table& table = *pinned;
    const uint64_t entry = (p.guest_offset >> cluster_bits_) & (l2_entries_ - 1);
    status = CheckReleasableLocked(table, entry, table.entries[extended_l2_ ? 2 * entry : entry],
                                   p.guest_offset);
    if (!status.ok()) break;
    // Count the new reference on every host cluster the data touches
    // before any L2 entry points there.
    for (uint64_t c = p.host_offset >> cluster_bits_;
         c <= (p.host_offset + p.bytes - 1) >> cluster_bits_; c++) {
      status = refcounts_->Add(c, 1);
      if (!status.ok()) break;
    }
    if (!status.ok()) break;
    const uint64_t index = (p.guest_offset >> cluster_bits_) & (l2_entries_ - 1);
    uint64_t& word = table.entries[extended_l2_ ? 2 * index : index];
    const uint64_t old = word;
    word = EncodeCompressed(p.host_offset, p.bytes, cluster_bits_);
    if (extended_l2_) table.entries[2 * index + 1] = 0;
    table.dirty = true;
    if ((old & ~kOflagCopied) != 0) ReleaseEntryLocked(old);
  }
  // The segment's own hold goes: clusters nothing points into are freed
  // once the entries are on disk.
  for (uint64_t i = 0; i < count; i++) {
    ReleaseClusterLocked(segment_offset + (i << cluster_bits_));
  }
  if (status.ok() && l2_cache_->over_capacity()) status = WriteBackLocked();
  return status;
}

void Qcow2Image::ReleaseSegment(uint64_t segment_offset, uint64_t count) {
  MutexLock lk(meta_mutex_);
  for (uint64_t i = 0; i < count; i++) {
    ReleaseClusterLocked(segment_offset + (i << cluster_bits_));
  }
}

Status Qcow2Image::WriteUncompressedCluster(uint64_t guest_offset,
                                            std::span<const std::byte> data) {
  const uint64_t disk = size();
  if (guest_offset >= disk) return Status();
  ReaderLock guard(discard_lock_);
  return WriteShared(guest_offset, data.first(std::min<uint64_t>(data.size(), disk - guest_offset)));
}

Status Qcow2Image::ZeroCluster(uint64_t guest_offset) {
  const uint64_t disk = size();
  if (guest_offset >= disk) return Status();
  // The cluster is this entry's own commit: nothing staged to drop.
  return ClearRange(guest_offset, std::min(cluster_size_, disk - guest_offset),
                    /*discard=*/false, /*may_unmap=*/true, /*drop_staged=*/false);
}

uint64_t Qcow2Image::MaxCompressedPerHostCluster() const {
  return MaxRefcount(refcount_order_) - 1;
}

}  // namespace qcow2fs
