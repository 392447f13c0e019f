// Qcow2Image read path: guest ranges are mapped to extents (qcow2_map.cc)
// under the metadata lock, then served with one host read per contiguous
// host run, outside that lock.
#include <algorithm>
#include <cstring>

#include "base/sync_point.h"
#include "codec/compression.h"
#include "engine/qcow2_image.h"
#include "format/hex.h"

namespace qcow2fs {
namespace {

// Extents mapped per metadata-lock acquisition. A request with more pieces
// than this is mapped in rounds.
constexpr size_t kExtentBatch = 64;

}  // namespace

Status Qcow2Image::Read(uint64_t offset, std::span<std::byte> buf) {
  if (offset > size() || buf.size() > size() - offset) {
    return Status(ErrorCode::kOutOfRange, "read of " + std::to_string(buf.size()) + " bytes at " +
                                              Hex(offset) + " is past the end of the disk");
  }
  if (!compressed_cache_) return ReadImage(offset, buf);
  // Staged bytes win; captured first so a commit in between cannot be
  // missed. The discard lock is held across both, so a discard or zeroing
  // cannot drop the staged bytes and change the clusters in between.
  LockSharedNoting(discard_lock_, "Read:WaitingForDiscard", offset);
  ReaderLock guard(discard_lock_, kAdoptLock);
  auto staged = compressed_cache_->Capture(offset, buf.size());
  QCOW2FS_RETURN_IF_ERROR(ReadImageShared(offset, buf));
  CompressedWriteCache::Apply(staged, offset, buf);
  return Status();
}

Status Qcow2Image::ReadImage(uint64_t offset, std::span<std::byte> buf) {
  ReaderLock guard(discard_lock_);
  return ReadImageShared(offset, buf);
}

Status Qcow2Image::ReadImageShared(uint64_t offset, std::span<std::byte> buf) {
  Extent extents[kExtentBatch];
  const uint64_t end = offset + buf.size();
  for (uint64_t pos = offset; pos < end;) {
    size_t n;
    {
      MutexLock lk(meta_mutex_);
      QCOW2FS_ASSIGN_OR_RETURN(n, MapLocked(pos, end, extents, kExtentBatch));
    }
    for (size_t i = 0; i < n; i++) {
      QCOW2FS_RETURN_IF_ERROR(
          ReadExtent(extents[i], buf.data() + (extents[i].guest_offset - offset)));
    }
    pos = extents[n - 1].guest_offset + extents[n - 1].length;
  }
  return Status();
}

Status Qcow2Image::ReadExtent(const Extent& e, std::byte* dst) {
  switch (e.kind) {
    case Extent::Kind::kData:
      return data_file_->ReadAt(e.host_offset, {dst, e.length});
    case Extent::Kind::kZero:
      std::memset(dst, 0, e.length);
      return Status();
    case Extent::Kind::kBacking:
      return ReadBacking(e.guest_offset, {dst, e.length});
    case Extent::Kind::kCompressed:
      return ReadCompressed(e, dst);
  }
  return Status();
}

Status Qcow2Image::ReadCompressed(const Extent& e, std::byte* dst) {
  // Per-thread buffers: compressed reads allocate nothing in steady state.
  thread_local std::vector<std::byte> compressed;
  thread_local std::vector<std::byte> cluster;
  compressed.resize(e.compressed_bytes);
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(e.host_offset, compressed));
  const bool whole = e.length == cluster_size_;
  if (!whole) cluster.resize(cluster_size_);
  std::span<std::byte> out =
      whole ? std::span<std::byte>(dst, cluster_size_) : std::span<std::byte>(cluster);
  Status s = DecompressCluster(compression_, compressed, out);
  if (!s.ok()) {
    return s.Annotate("cluster at " + Where(e.cluster_guest_offset) + ", host offset " +
                      Hex(e.host_offset));
  }
  if (!whole) {
    std::memcpy(dst, cluster.data() + (e.guest_offset - e.cluster_guest_offset), e.length);
  }
  return Status();
}

Status Qcow2Image::ReadBacking(uint64_t offset, std::span<std::byte> dst) {
  uint64_t covered = 0;
  if (backing_) {
    const uint64_t backing_size = backing_->size();
    if (offset < backing_size) {
      covered = std::min<uint64_t>(dst.size(), backing_size - offset);
      QCOW2FS_RETURN_IF_ERROR(backing_->Read(offset, dst.first(covered)));
    }
  }
  // No backing file, or past its end: zeros.
  std::memset(dst.data() + covered, 0, dst.size() - covered);
  return Status();
}

Result<BlockStatus> Qcow2Image::GetBlockStatus(uint64_t offset, uint64_t length) {
  if (offset >= size()) {
    return Status(ErrorCode::kOutOfRange, "block status past the end of the disk");
  }
  uint64_t end = offset + std::min(length, size() - offset);
  if (compressed_cache_) {
    // Staged clusters hold data the image does not show yet.
    if (auto staged = compressed_cache_->FirstStaged(offset, end)) {
      if (*staged == offset) {
        BlockStatus s;
        s.kind = BlockKind::kData;
        s.length = std::min(end, (offset & ~(cluster_size_ - 1)) + cluster_size_) - offset;
        return s;
      }
      end = *staged;
    }
  }
  auto kind_of = [](Extent::Kind k) {
    switch (k) {
      case Extent::Kind::kData:
      case Extent::Kind::kCompressed:
        return BlockKind::kData;
      case Extent::Kind::kZero:
        return BlockKind::kZero;
      case Extent::Kind::kBacking:
        return BlockKind::kUnallocated;
    }
    return BlockKind::kUnallocated;
  };
  BlockStatus status;
  Extent extents[kExtentBatch];
  ReaderLock guard(discard_lock_);
  MutexLock lk(meta_mutex_);
  for (uint64_t pos = offset; pos < end;) {
    QCOW2FS_ASSIGN_OR_RETURN(size_t n, MapLocked(pos, end, extents, kExtentBatch));
    for (size_t i = 0; i < n; i++) {
      const Extent& e = extents[i];
      const bool compressed = e.kind == Extent::Kind::kCompressed;
      if (e.guest_offset == offset) {
        status.kind = kind_of(e.kind);
        status.compressed = compressed;
        if (e.kind == Extent::Kind::kData) status.host_offset = e.host_offset;
      } else if (kind_of(e.kind) != status.kind || compressed != status.compressed) {
        return status;
      }
      status.length += e.length;
    }
    pos = extents[n - 1].guest_offset + extents[n - 1].length;
  }
  return status;
}

Result<BlockStatus> Qcow2Image::GetDataStatus(uint64_t offset, uint64_t length) {
  QCOW2FS_ASSIGN_OR_RETURN(BlockStatus own, GetBlockStatus(offset, length));
  if (own.kind != BlockKind::kUnallocated) return own;
  // Reads fall through to the backing file; past its end (or without one)
  // they read zeros.
  const uint64_t backing_size = backing_ ? backing_->size() : 0;
  if (offset >= backing_size) {
    own.kind = BlockKind::kZero;
    return own;
  }
  QCOW2FS_ASSIGN_OR_RETURN(
      BlockStatus below,
      backing_->GetDataStatus(offset, std::min(own.length, backing_size - offset)));
  below.host_offset.reset();  // a host offset in another file means nothing here
  return below;
}

}  // namespace qcow2fs
