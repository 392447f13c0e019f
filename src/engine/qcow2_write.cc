// Qcow2Image write path: in-place writes to clusters the image owns alone,
// and allocating writes (new clusters, copy-on-write from backing files,
// compressed clusters and clusters shared with snapshots).
//
// An allocating write runs in three steps: under the metadata lock it maps
// the old content, allocates host clusters and marks the guest clusters in
// flight; without the lock it writes the data; under the lock again it
// points the L2 entries at the new clusters. Readers therefore never see an
// L2 entry before its data is written, and a second allocating writer of the
// same cluster waits instead of allocating it twice.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/l2_entry.h"
#include "format/limits.h"
#include "format/hex.h"
#include "base/sync_point.h"

namespace qcow2fs {
namespace {

// Most guest bytes one allocating run covers: bounds the staging buffer of
// an unaligned write and the clusters held in flight at once.
constexpr uint64_t kMaxRunBytes = 16ull << 20;

// Bitmap of the subclusters of a cluster starting at `cluster_start` that
// [begin, end) touches, shifted into the allocation half.
uint64_t TouchedSubclusters(uint64_t cluster_start, uint64_t begin, uint64_t end,
                            uint32_t subcluster_bits) {
  const uint64_t first = (begin - cluster_start) >> subcluster_bits;
  const uint64_t last = (end - 1 - cluster_start) >> subcluster_bits;
  const uint64_t count = last - first + 1;
  return (count >= 32 ? 0xffffffffull : ((1ull << count) - 1)) << first;
}

}  // namespace

Status Qcow2Image::CheckWritable(uint64_t offset, uint64_t length) const {
  if (read_only_) {
    return Status(ErrorCode::kReadOnly, path_ + " is open read-only");
  }
  if (fenced_.load(std::memory_order_acquire)) {
    return Status(ErrorCode::kReadOnly,
                  path_ + " was found corrupt; writes are stopped");
  }
  if (offset > size() || length > size() - offset) {
    return Status(ErrorCode::kOutOfRange,
                  "access of " + std::to_string(length) + " bytes at " +
                      Hex(offset) + " is past the end of the disk");
  }
  return Status();
}

Status Qcow2Image::Write(uint64_t offset, std::span<const std::byte> data) {
  ReaderLock sizing(resize_lock_);
  QCOW2FS_RETURN_IF_ERROR(CheckWritable(offset, data.size()));
  QCOW2FS_RETURN_IF_ERROR(WriteData(offset, data));
  // Overwrites of compressed or shared clusters queue frees.
  return ApplyDeferredFreesIfDue();
}

Status Qcow2Image::WriteData(uint64_t offset, std::span<const std::byte> data) {
  if (compressed_cache_) return WriteCompressMode(offset, data);
  ReaderLock guard(discard_lock_);
  return WriteShared(offset, data);
}

Result<uint64_t> Qcow2Image::AllocateClustersLocked(uint64_t count) {
  auto offset = refcounts_->Allocate(count);
  if (!offset.ok()) {
    // The refcounts call a metadata cluster free: never hand it out.
    if (offset.status().code() == ErrorCode::kCorrupt) return FenceCorruptLocked(offset.status());
    return offset;
  }
  QCOW2FS_RETURN_IF_ERROR(
      CheckOverlapLocked(*offset, count << cluster_bits_, "new cluster"));
  // Bounds checks treat the file as already holding what we allocated.
  const uint64_t end = *offset + (count << cluster_bits_);
  if (end > file_size_.load(std::memory_order_relaxed)) {
    file_size_.store(end, std::memory_order_release);
  }
  return offset;
}

Status Qcow2Image::FindFreeSpaceLocked() {
  // Refcount blocks read per step: a few milliseconds of I/O at most.
  constexpr size_t kBlockReadsPerStep = 16;
  while (true) {
    auto found = refcounts_->AdvanceFreeCursor(kBlockReadsPerStep);
    // No free cluster: only a request that allocates fails, when it does.
    if (!found.ok() && found.status().code() == ErrorCode::kNoSpace) return Status();
    if (!found.ok()) return found.status();
    if (*found) return Status();
    MutexUnlock unlocked(meta_mutex_);
    QCOW2FS_SYNC_POINT("Allocate:SearchPaused", 0);
  }
}

Result<std::shared_ptr<L2Table>> Qcow2Image::L2ForMappingLocked(uint64_t l1_index,
                                                                uint64_t guest) {
  const uint64_t l2_offset = L1EntryL2Offset(l1_[l1_index]);
  const uint64_t file_size = file_size_.load(std::memory_order_acquire);
  if (l2_offset % cluster_size_ != 0 || l2_offset > file_size ||
      file_size - l2_offset < cluster_size_) {
    return Status(ErrorCode::kCorrupt,
                  "L1 entry " + std::to_string(l1_index) + " points to L2 table at " +
                      Hex(l2_offset) + ", which is unaligned or past the end of " +
                      "the file (mapping " + Where(guest) + ")");
  }
  return l2_cache_->Get(meta_mutex_, l2_offset,
                        [this](uint64_t off, L2Table& t) { return LoadL2Table(off, t); });
}

Result<std::shared_ptr<L2Table>> Qcow2Image::L2ForWriteLocked(uint64_t l1_index) {
  const uint64_t l1_entry = l1_[l1_index];
  const uint64_t old_offset = L1EntryL2Offset(l1_entry);
  if (old_offset != 0 && (l1_entry & kOflagCopied)) {
    return L2ForMappingLocked(l1_index, l1_index * (l2_entries_ << cluster_bits_));
  }
  // No table yet, or one shared with a snapshot: make our own copy.
  std::vector<uint64_t> old_entries;
  std::vector<uint32_t> old_suspects;
  if (old_offset != 0) {
    QCOW2FS_ASSIGN_OR_RETURN(
        auto old, L2ForMappingLocked(l1_index, l1_index * (l2_entries_ << cluster_bits_)));
    old_entries = old->entries;
    old_suspects = old->suspect_compressed;
    // Another writer may have copied it while the load dropped the lock.
    if (l1_[l1_index] != l1_entry) return L2ForWriteLocked(l1_index);
  }
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t new_offset, AllocateClustersLocked(1));
  auto table = l2_cache_->InsertNew(new_offset);
  metadata_.Add(new_offset >> cluster_bits_, MetadataMap::kL2Table);
  if (!old_entries.empty()) {
    table->entries = std::move(old_entries);
    table->suspect_compressed = std::move(old_suspects);
    ReleaseClusterLocked(old_offset);
    // The old table stays metadata only while a snapshot still uses it.
    if (!snapshot_l2_tables_.count(old_offset >> cluster_bits_)) {
      metadata_.RemoveKind(old_offset >> cluster_bits_, MetadataMap::kL2Table);
    }
  }
  l1_[l1_index] = new_offset | kOflagCopied;
  l1_dirty_.insert(l1_index);
  return table;
}

Status Qcow2Image::CheckReleasableLocked(const L2Table& table, uint64_t index, uint64_t word,
                                         uint64_t guest) {
  const ClusterType type = ClassifyL2Entry(word, extended_l2_, has_data_file_);
  if (has_data_file_) return Status();  // data file clusters are not counted
  if (type == ClusterType::kNormal || type == ClusterType::kZeroAlloc) {
    // The one host cluster it names: aligned, and not metadata (whose
    // refcount dropping to zero would wipe it).
    const uint64_t host = word & kL2OffsetMask;
    if (host == 0) return Status();
    const uint8_t kinds = host % cluster_size_ == 0 ? metadata_.KindsOf(host >> cluster_bits_) : 0;
    if (host % cluster_size_ == 0 && kinds == 0) return Status();
    return FenceCorruptLocked(Status(
        ErrorCode::kCorrupt,
        "the L2 entry of " + Where(guest) + " names host offset " + Hex(host) +
            (kinds ? ", which holds " + MetadataMap::Describe(kinds) : ", which is unaligned") +
            "; dropping its reference would free metadata"));
  }
  if (type != ClusterType::kCompressed) return Status();
  const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
  const auto& suspects = table.suspect_compressed;
  bool bad = std::binary_search(suspects.begin(), suspects.end(), static_cast<uint32_t>(index));
  for (uint64_t c = d.host_offset >> cluster_bits_;
       !bad && c <= (d.host_offset + d.max_bytes - 1) >> cluster_bits_; c++) {
    bad = metadata_.KindsOf(c) != 0;
  }
  if (!bad) return Status();
  return FenceCorruptLocked(Status(
      ErrorCode::kCorrupt,
      "compressed cluster at " + Where(guest) + " claims " + std::to_string(d.max_bytes) +
          " bytes at host offset " + Hex(d.host_offset) +
          ", outside the clusters compressed data may use; dropping its reference would free "
          "other data"));
}

void Qcow2Image::ReleaseClusterLocked(uint64_t host_offset) {
  DeferFreeLocked(host_offset >> cluster_bits_);
}

void Qcow2Image::ReleaseEntryLocked(uint64_t word) {
  const ClusterType type = ClassifyL2Entry(word, extended_l2_, has_data_file_);
  if (type == ClusterType::kCompressed) {
    // A compressed cluster holds a reference on every host cluster its
    // sectors touch.
    const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
    const uint64_t first = AlignDown(d.host_offset, kSectorSize);
    const uint64_t last = d.host_offset + d.max_bytes - 1;
    for (uint64_t c = first >> cluster_bits_; c <= last >> cluster_bits_; c++) {
      DeferFreeLocked(c);
    }
    return;
  }
  if (has_data_file_) return;  // data file clusters are not counted
  const uint64_t host = word & kL2OffsetMask;
  if (host != 0) ReleaseClusterLocked(host);
}

Status Qcow2Image::WriteShared(uint64_t offset, std::span<const std::byte> data) {
  const uint64_t end = offset + data.size();
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  const uint64_t subcluster_size = uint64_t{1} << subcluster_bits_;
  const bool has_data_file = has_data_file_;
  const std::byte* src = data.data();

  for (uint64_t pos = offset; pos < end;) {
    MutexLock lk(meta_mutex_);
    QCOW2FS_RETURN_IF_ERROR(FindFreeSpaceLocked());
    const uint64_t l1_index = pos / l2_coverage;
    const uint64_t table_end = std::min(end, (l1_index + 1) * l2_coverage);
    QCOW2FS_ASSIGN_OR_RETURN(auto table, L2ForWriteLocked(l1_index));

    auto entry_index = [&](uint64_t guest) {
      return (guest >> cluster_bits_) & (l2_entries_ - 1);
    };
    auto word_of = [&](uint64_t guest) {
      return table->entries[extended_l2_ ? 2 * entry_index(guest) : entry_index(guest)];
    };
    auto bitmap_of = [&](uint64_t guest) {
      return extended_l2_ ? table->entries[2 * entry_index(guest) + 1] : 0;
    };
    // Data can go straight to the cluster the entry names: it is ours alone
    // and every subcluster the write touches is allocated.
    auto in_place = [&](uint64_t guest, uint64_t until) {
      const uint64_t word = word_of(guest);
      if (ClassifyL2Entry(word, extended_l2_, has_data_file) != ClusterType::kNormal ||
          !(word & kOflagCopied) || (word & kL2OffsetMask) % cluster_size_ != 0) {
        return false;
      }
      if (!extended_l2_) return true;
      const uint64_t cs = AlignDown(guest, cluster_size_);
      const uint64_t touched = TouchedSubclusters(cs, guest, until, subcluster_bits_);
      return (bitmap_of(guest) & touched) == touched;
    };
    auto cluster_end = [&](uint64_t guest) {
      return std::min(table_end, AlignDown(guest, cluster_size_) + cluster_size_);
    };

    // 1. A run of in-place clusters: one host write per contiguous piece.
    if (in_place(pos, cluster_end(pos))) {
      const uint64_t host = (word_of(pos) & kL2OffsetMask) + (pos & (cluster_size_ - 1));
      uint64_t run_end = cluster_end(pos);
      while (run_end < table_end && in_place(run_end, cluster_end(run_end)) &&
             (word_of(run_end) & kL2OffsetMask) == host + (run_end - pos)) {
        run_end = cluster_end(run_end);
      }
      // An L2 entry may point at metadata (a corrupt or hostile image).
      QCOW2FS_RETURN_IF_ERROR(CheckGuestWriteLocked(host, run_end - pos, pos));
      lk.Unlock();
      QCOW2FS_SYNC_POINT("Write:InPlaceBeforeData", pos);
      QCOW2FS_RETURN_IF_ERROR(
          data_file_->WriteAt(host, {src + (pos - offset), run_end - pos}));
      pos = run_end;
      continue;
    }

    // 2. An allocating run. Wait out another writer allocating this cluster.
    const uint64_t first_cluster = pos >> cluster_bits_;
    if (inflight_.count(first_cluster)) {
      table.reset();
      inflight_done_.Wait(meta_mutex_);
      continue;
    }
    const uint64_t c0 = AlignDown(pos, cluster_size_);
    const uint64_t first_word = word_of(pos);
    const ClusterType first_type =
        ClassifyL2Entry(first_word, extended_l2_, has_data_file);
    // Extended L2: a cluster we own with some touched subclusters
    // unallocated is filled in place, without a new cluster.
    const bool reuse_host = extended_l2_ && first_type == ClusterType::kNormal &&
                            (first_word & kOflagCopied) &&
                            (first_word & kL2OffsetMask) % cluster_size_ == 0;
    uint64_t run_end = cluster_end(pos);
    if (!reuse_host) {
      while (run_end < table_end && run_end - c0 < kMaxRunBytes &&
             !in_place(run_end, cluster_end(run_end)) &&
             !inflight_.count(run_end >> cluster_bits_) &&
             !(extended_l2_ && (word_of(run_end) & kOflagCopied))) {
        run_end = cluster_end(run_end);
      }
    }
    const uint64_t clusters = (AlignUp(run_end, cluster_size_) - c0) >> cluster_bits_;

    // Which part of the first and last cluster must be written: whole
    // clusters when old content moves to a new cluster; with extended L2
    // and nothing to copy, the touched subclusters only; and nothing beyond
    // the new bytes inside a subcluster that is already allocated in the
    // cluster filled in place. Its old bytes stay where they are: writing
    // them back would race with in-place writers of those bytes, which do
    // not wait for allocations in flight (docs/concurrency.md, "Allocating
    // writes").
    auto needs_full_copy = [&](uint64_t word) {
      const ClusterType t = ClassifyL2Entry(word, extended_l2_, has_data_file);
      return t == ClusterType::kCompressed ||
             (t == ClusterType::kNormal && !(word & kOflagCopied));
    };
    auto unit_of = [&](uint64_t guest) -> uint64_t {
      if (!extended_l2_ || needs_full_copy(word_of(guest))) return cluster_size_;
      const int sc = static_cast<int>((guest & (cluster_size_ - 1)) >> subcluster_bits_);
      if (reuse_host && SubclusterStateOf(bitmap_of(guest), sc) == SubclusterState::kAllocated) {
        return 1;
      }
      return subcluster_size;
    };
    const uint64_t window_start = AlignDown(pos, unit_of(pos));
    const uint64_t last = run_end - 1;
    const uint64_t window_end =
        std::min(AlignDown(last, cluster_size_) + cluster_size_,
                 AlignUp(run_end, unit_of(last)));

    // Old content around the new data, mapped now, read after unlocking.
    Extent head[kSubclustersPerCluster + 1], tail[kSubclustersPerCluster + 1];
    size_t head_count = 0, tail_count = 0;
    if (window_start < pos) {
      QCOW2FS_ASSIGN_OR_RETURN(head_count, MapLocked(window_start, pos, head,
                                                     std::size(head)));
    }
    if (run_end < window_end) {
      QCOW2FS_ASSIGN_OR_RETURN(tail_count, MapLocked(run_end, window_end, tail,
                                                     std::size(tail)));
    }

    // The entries this run replaces must be ours to release: one naming
    // metadata, an unaligned one or a corrupt compressed one is refused
    // before anything is allocated.
    if (!reuse_host) {
      for (uint64_t i = 0; i < clusters; i++) {
        const uint64_t g = c0 + (i << cluster_bits_);
        QCOW2FS_RETURN_IF_ERROR(CheckReleasableLocked(*table, entry_index(g), word_of(g), g));
      }
    }
    uint64_t host_base;
    if (reuse_host) {
      host_base = first_word & kL2OffsetMask;
      QCOW2FS_RETURN_IF_ERROR(CheckGuestWriteLocked(host_base, cluster_size_, c0));
    } else if (has_data_file) {
      host_base = c0;  // the data file mirrors the guest layout
    } else {
      QCOW2FS_ASSIGN_OR_RETURN(host_base, AllocateClustersLocked(clusters));
    }
    std::vector<uint64_t> old_words(clusters), old_bitmaps(clusters);
    for (uint64_t i = 0; i < clusters; i++) {
      old_words[i] = word_of(c0 + (i << cluster_bits_));
      old_bitmaps[i] = bitmap_of(c0 + (i << cluster_bits_));
      inflight_.insert(first_cluster + i);
    }
    lk.Unlock();

    // Write the window [window_start, window_end) at host_base + (g - c0).
    Status io;
    const uint64_t window_bytes = window_end - window_start;
    if (window_start == pos && window_end == run_end) {
      QCOW2FS_SYNC_POINT("Write:AllocatingBeforeData", pos);
      io = data_file_->WriteAt(host_base + (pos - c0), {src + (pos - offset), window_bytes});
    } else {
      std::vector<std::byte> staging(window_bytes);
      for (size_t i = 0; i < head_count && io.ok(); i++) {
        io = ReadExtent(head[i], staging.data() + (head[i].guest_offset - window_start));
      }
      for (size_t i = 0; i < tail_count && io.ok(); i++) {
        io = ReadExtent(tail[i], staging.data() + (tail[i].guest_offset - window_start));
      }
      std::memcpy(staging.data() + (pos - window_start), src + (pos - offset), run_end - pos);
      QCOW2FS_SYNC_POINT("Write:AllocatingBeforeData", pos);
      if (io.ok()) io = data_file_->WriteAt(host_base + (window_start - c0), staging);
    }

    lk.Lock();
    for (uint64_t i = 0; i < clusters; i++) inflight_.erase(first_cluster + i);
    inflight_done_.NotifyAll();
    if (!io.ok()) {
      // The new clusters were never referenced: give them back.
      if (!reuse_host && !has_data_file) {
        for (uint64_t i = 0; i < clusters; i++) {
          ReleaseClusterLocked(host_base + (i << cluster_bits_));
        }
      }
      return io;
    }
    for (uint64_t i = 0; i < clusters; i++) {
      const uint64_t g = c0 + (i << cluster_bits_);
      const uint64_t idx = entry_index(g);
      const uint64_t new_host = host_base + (i << cluster_bits_);
      const uint64_t new_word = new_host | kOflagCopied;
      if (extended_l2_) {
        const uint64_t touched = TouchedSubclusters(
            g, std::max(g, window_start), std::min(g + cluster_size_, window_end),
            subcluster_bits_);
        uint64_t alloc = old_bitmaps[i] & 0xffffffffull;
        const ClusterType t = ClassifyL2Entry(old_words[i], true, has_data_file);
        if (t == ClusterType::kCompressed) alloc = 0xffffffffull;
        if (t == ClusterType::kUnallocated) alloc = 0;
        alloc |= touched;
        const uint64_t zero = (old_bitmaps[i] >> 32) & ~alloc;
        table->entries[2 * idx] = new_word;
        table->entries[2 * idx + 1] = alloc | (zero << 32);
      } else {
        table->entries[idx] = new_word;
      }
      if (!reuse_host && (old_words[i] & ~kOflagCopied) != 0 &&
          (old_words[i] & kL2OffsetMask) != new_host) {
        ReleaseEntryLocked(old_words[i]);
      }
    }
    table->dirty = true;
    if (l2_cache_->over_capacity()) QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    pos = run_end;
  }
  return Status();
}

}  // namespace qcow2fs
