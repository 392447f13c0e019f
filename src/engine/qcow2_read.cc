// Qcow2Image read path: guest ranges are mapped to extents under the
// metadata lock, then served with one host read per contiguous host run,
// outside that lock.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "codec/compression.h"
#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/l2_entry.h"
#include "format/limits.h"
#include "format/hex.h"
#include "base/sync_point.h"

namespace qcow2fs {
namespace {

// Extents mapped per metadata-lock acquisition. A request with more pieces
// than this is mapped in rounds.
constexpr size_t kExtentBatch = 64;

bool CanMerge(const Extent& a, const Extent& b) {
  if (a.kind != b.kind || a.guest_offset + a.length != b.guest_offset) {
    return false;
  }
  switch (a.kind) {
    case Extent::Kind::kZero:
    case Extent::Kind::kBacking:
      return true;
    case Extent::Kind::kData:
      return a.host_offset + a.length == b.host_offset;
    case Extent::Kind::kCompressed:
      return false;
  }
  return false;
}

}  // namespace

Status Qcow2Image::LoadL2Table(uint64_t offset, L2Table& table) {
  std::vector<std::byte> raw(cluster_size_);
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(offset, raw));
  std::vector<uint64_t>& words = table.entries;
  for (size_t i = 0; i < words.size(); i++) {
    words[i] = LoadBe64(raw.data() + 8 * i);
  }
  // Compressed clusters whose sectors do not lie within the file as it is
  // now: nothing of ours can be there yet, but clusters allocated later
  // will be, and dropping such an entry's references would free them.
  const uint64_t file_size = file_size_.load(std::memory_order_acquire);
  const bool has_data_file = has_data_file_;
  for (uint64_t index = 0; index < l2_entries_; index++) {
    const uint64_t word = words[extended_l2_ ? 2 * index : index];
    if (ClassifyL2Entry(word, extended_l2_, has_data_file) != ClusterType::kCompressed) continue;
    const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
    // The tail of a sector past the end is normal (QEMU does not pad the
    // file); a whole cluster past it is not.
    const uint64_t last_cluster = AlignDown(d.host_offset + d.max_bytes - 1, cluster_size_);
    if (d.host_offset < cluster_size_ || last_cluster >= file_size) {
      table.suspect_compressed.push_back(static_cast<uint32_t>(index));
    }
  }
  return Status();
}

Result<size_t> Qcow2Image::MapLocked(uint64_t offset, uint64_t end, Extent* out,
                                     size_t max) {
  size_t n = 0;
  auto emit = [&](const Extent& e) {
    if (n > 0 && CanMerge(out[n - 1], e)) {
      out[n - 1].length += e.length;
      return true;
    }
    if (n == max) return false;
    out[n++] = e;
    return true;
  };
  auto corrupt = [&](uint64_t guest, const std::string& what) {
    return Status(ErrorCode::kCorrupt, what + " (mapping " + Where(guest) + ")");
  };
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  const bool has_data_file = has_data_file_;
  const L2Cache::Loader loader = [this](uint64_t off, L2Table& t) { return LoadL2Table(off, t); };

  uint64_t pos = offset;
  while (pos < end) {
    const uint64_t l1_index = pos / l2_coverage;
    const uint64_t table_end = std::min(end, (l1_index + 1) * l2_coverage);
    const uint64_t l1_entry = l1_index < l1_.size() ? l1_[l1_index] : 0;
    const uint64_t l2_offset = L1EntryL2Offset(l1_entry);
    // Read per table, under the lock: writers grow it (when they allocate)
    // before any entry points past the old end, and Get() below may drop
    // the lock while others allocate.
    uint64_t file_size = file_size_.load(std::memory_order_acquire);
    if (l2_offset == 0) {
      if (!emit({Extent::Kind::kBacking, pos, table_end - pos})) return n;
      pos = table_end;
      continue;
    }
    if (l2_offset % cluster_size_ != 0 || l2_offset > file_size ||
        file_size - l2_offset < cluster_size_) {
      return corrupt(pos, "L1 entry " + std::to_string(l1_index) +
                              " points to L2 table at " + Hex(l2_offset) +
                              ", which is unaligned or past the end of the file");
    }
    auto table_or = l2_cache_->Get(meta_mutex_, l2_offset, loader);
    if (!table_or.ok()) {
      return table_or.status().Annotate("reading L2 table at " + Hex(l2_offset));
    }
    const std::shared_ptr<L2Table> table = std::move(table_or).value();
    file_size = file_size_.load(std::memory_order_acquire);

    uint64_t index = (pos >> cluster_bits_) & (l2_entries_ - 1);
    for (; pos < table_end; index++) {
      const uint64_t cluster_start = pos & ~(cluster_size_ - 1);
      const uint64_t cluster_end = std::min(table_end, cluster_start + cluster_size_);
      const uint64_t word = table->entries[extended_l2_ ? 2 * index : index];
      const ClusterType type = ClassifyL2Entry(word, extended_l2_, has_data_file);
      const uint64_t host = word & kL2OffsetMask;

      if (type == ClusterType::kCompressed) {
        if (has_data_file) {
          return corrupt(pos, "compressed cluster in an image with an "
                              "external data file");
        }
        if (extended_l2_ && table->entries[2 * index + 1] != 0) {
          return corrupt(pos, "compressed cluster with a subcluster bitmap");
        }
        const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
        if (d.host_offset < cluster_size_ || d.host_offset >= file_size) {
          return corrupt(pos, "compressed cluster at host offset " +
                                  Hex(d.host_offset) +
                                  " lies outside the image file");
        }
        Extent e{Extent::Kind::kCompressed, pos, cluster_end - pos,
                 d.host_offset,
                 std::min(d.max_bytes, file_size - d.host_offset),
                 cluster_start};
        if (!emit(e)) return n;
        pos = cluster_end;
        continue;
      }

      // Where an allocated cluster's data lives; checked only when used.
      auto check_host = [&]() -> Status {
        if (host % cluster_size_ != 0) {
          return corrupt(pos, "L2 entry points to unaligned host offset " +
                                  Hex(host));
        }
        if (host == 0 && !has_data_file) {
          return corrupt(pos, "L2 entry points to the image header");
        }
        if (!has_data_file && host >= file_size) {
          return corrupt(pos, "L2 entry points to host offset " + Hex(host) +
                                  ", past the end of the image file");
        }
        return Status();
      };
      // Offset 0 with the copied flag means "host offset 0", valid only in
      // an external data file.
      if (!has_data_file && (word & ~kOflagZero) == kOflagCopied) {
        return corrupt(pos, "L2 entry claims host offset 0 (the image header)");
      }
      if (type == ClusterType::kZeroAlloc && host % cluster_size_ != 0) {
        return corrupt(pos, "zero cluster preallocated at unaligned host offset " + Hex(host));
      }

      if (!extended_l2_) {
        Extent e{Extent::Kind::kBacking, pos, cluster_end - pos};
        if (type == ClusterType::kZeroPlain || type == ClusterType::kZeroAlloc) {
          e.kind = Extent::Kind::kZero;
        } else if (type == ClusterType::kNormal) {
          QCOW2FS_RETURN_IF_ERROR(check_host());
          e.kind = Extent::Kind::kData;
          e.host_offset = host + (pos - cluster_start);
        }
        if (!emit(e)) return n;
        pos = cluster_end;
        continue;
      }

      // Extended L2: each of the 32 subclusters has its own state.
      const uint64_t bitmap = table->entries[2 * index + 1];
      while (pos < cluster_end) {
        const int sc = static_cast<int>((pos - cluster_start) >> subcluster_bits_);
        const uint64_t sc_end = std::min(
            cluster_end, cluster_start + ((uint64_t{1} + sc) << subcluster_bits_));
        Extent e{Extent::Kind::kBacking, pos, sc_end - pos};
        switch (SubclusterStateOf(bitmap, sc)) {
          case SubclusterState::kInvalid:
            return corrupt(pos, "subcluster " + std::to_string(sc) +
                                    " is both allocated and zero");
          case SubclusterState::kAllocated:
            QCOW2FS_RETURN_IF_ERROR(check_host());
            e.kind = Extent::Kind::kData;
            e.host_offset = host + (pos - cluster_start);
            break;
          case SubclusterState::kZero:
            e.kind = Extent::Kind::kZero;
            break;
          case SubclusterState::kUnallocated:
            break;
        }
        if (!emit(e)) return n;
        pos = sc_end;
      }
    }
  }
  return n;
}

Status Qcow2Image::Read(uint64_t offset, std::span<std::byte> buf) {
  if (offset > size() || buf.size() > size() - offset) {
    return Status(ErrorCode::kOutOfRange,
                  "read of " + std::to_string(buf.size()) + " bytes at " +
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
  std::span<std::byte> out = whole ? std::span<std::byte>(dst, cluster_size_)
                                   : std::span<std::byte>(cluster);
  Status s = DecompressCluster(compression_, compressed, out);
  if (!s.ok()) {
    return s.Annotate("cluster at " + Where(e.cluster_guest_offset) +
                      ", host offset " + Hex(e.host_offset));
  }
  if (!whole) {
    std::memcpy(dst, cluster.data() + (e.guest_offset - e.cluster_guest_offset),
                e.length);
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
