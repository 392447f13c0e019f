// Qcow2Image write path: in-place writes to clusters the image owns alone,
// and allocating writes (new clusters, copy-on-write from backing files,
// compressed clusters and clusters shared with snapshots).
//
// A write goes in steps, each a plan, data and, when it allocates, commit:
// under the metadata lock the plan maps the old content, allocates host
// clusters and marks the guest clusters in flight; without the lock the
// data step writes; under the lock again the commit points the L2 entries
// at the new clusters. Readers therefore never see an L2 entry before its
// data is written, and a second allocating writer of the same cluster
// waits instead of allocating it twice.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "base/sync_point.h"
#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

// Most guest bytes one allocating run covers: bounds the staging buffer of
// an unaligned write and the clusters held in flight at once.
constexpr uint64_t kMaxRunBytes = 16ull << 20;

}  // namespace

Status Qcow2Image::CheckWritable(uint64_t offset, uint64_t length) const {
  if (read_only_) {
    return Status(ErrorCode::kReadOnly, path_ + " is open read-only");
  }
  if (fenced_.load(std::memory_order_acquire)) {
    return Status(ErrorCode::kReadOnly, path_ + " was found corrupt; writes are stopped");
  }
  if (offset > size() || length > size() - offset) {
    return Status(ErrorCode::kOutOfRange, "access of " + std::to_string(length) + " bytes at " +
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
  QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(*offset, count << cluster_bits_, "new cluster"));
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

// One step of WriteShared: guest bytes [pos, run_end), all within one L2
// table, written in place or, with the old content around them, to host
// clusters the plan allocated (or, with extended L2, filled in place).
struct Qcow2Image::WriteStep {
  uint64_t pos = 0;
  uint64_t run_end = 0;
  bool in_place = false;
  // In place: where guest byte `pos` lives. Allocating: where guest
  // cluster `c0` goes; the run's other clusters follow it.
  uint64_t host = 0;
  // Pinned from the plan to the end of the step.
  std::shared_ptr<L2Table> table;

  // Allocating steps only.
  uint64_t c0 = 0;  // guest offset of the first cluster
  uint64_t clusters = 0;
  // Extended L2: the one cluster is ours and gets its unallocated
  // subclusters filled in place; nothing new is allocated or released.
  bool reuse_host = false;
  // The bytes the data step writes: the new ones and the old content
  // around them, `head` before pos and `tail` from run_end (mapped by the
  // plan, read by the data step).
  uint64_t window_start = 0;
  uint64_t window_end = 0;
  Extent head[kSubclustersPerCluster + 1];
  Extent tail[kSubclustersPerCluster + 1];
  size_t head_count = 0;
  size_t tail_count = 0;
  // The entries the commit replaces, one per cluster.
  std::vector<uint64_t> old_words;
  std::vector<uint64_t> old_bitmaps;
};

Status Qcow2Image::WriteShared(uint64_t offset, std::span<const std::byte> data) {
  const uint64_t end = offset + data.size();
  for (uint64_t pos = offset; pos < end;) {
    MutexLock lk(meta_mutex_);
    WriteStep step;
    QCOW2FS_RETURN_IF_ERROR(PlanWriteStepLocked(pos, end, step));
    lk.Unlock();
    const Status io = WriteStepData(step, data.subspan(pos - offset, step.run_end - pos));
    pos = step.run_end;
    if (step.in_place) {
      QCOW2FS_RETURN_IF_ERROR(io);
      continue;
    }
    lk.Lock();
    QCOW2FS_RETURN_IF_ERROR(CommitWriteStepLocked(step, io));
  }
  return Status();
}

Status Qcow2Image::PlanWriteStepLocked(uint64_t pos, uint64_t end, WriteStep& step) {
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  const uint64_t subcluster_size = uint64_t{1} << subcluster_bits_;
  const bool has_data_file = has_data_file_;
  const uint64_t l1_index = pos / l2_coverage;
  const uint64_t table_end = std::min(end, (l1_index + 1) * l2_coverage);
  const uint64_t first_cluster = pos >> cluster_bits_;
  auto entry_index = [&](uint64_t guest) { return (guest >> cluster_bits_) & (l2_entries_ - 1); };
  auto cluster_end = [&](uint64_t guest) {
    return std::min(table_end, AlignDown(guest, cluster_size_) + cluster_size_);
  };

  // The free-space search, once per step and only when the step allocates
  // (an L2 table of its own, or data clusters). It may drop the lock, so
  // everything is looked up again after it.
  bool searched = false;
  while (true) {
    const uint64_t l1_entry = l1_[l1_index];
    if (!searched && (L1EntryL2Offset(l1_entry) == 0 || !(l1_entry & kOflagCopied))) {
      QCOW2FS_RETURN_IF_ERROR(FindFreeSpaceLocked());
      searched = true;
    }
    QCOW2FS_ASSIGN_OR_RETURN(std::shared_ptr<L2Table> table, L2ForWriteLocked(l1_index));
    const L2Entries entries(table->entries, extended_l2_);
    auto word_of = [&](uint64_t guest) { return entries.word(entry_index(guest)); };
    auto bitmap_of = [&](uint64_t guest) { return entries.bitmap(entry_index(guest)); };
    // Data can go straight to the cluster the entry names: it is ours alone
    // and every subcluster the write touches is allocated.
    auto in_place = [&](uint64_t guest, uint64_t until) {
      const uint64_t word = word_of(guest);
      if (ClassifyL2Entry(word, extended_l2_, has_data_file) != ClusterType::kNormal ||
          !(word & kOflagCopied) || (word & kL2OffsetMask) % cluster_size_ != 0) {
        return false;
      }
      if (!extended_l2_) return true;
      const uint64_t touched =
          TouchedSubclusters(AlignDown(guest, cluster_size_), guest, until, subcluster_bits_);
      return (bitmap_of(guest) & touched) == touched;
    };

    // A run of in-place clusters: one host write per contiguous piece.
    if (in_place(pos, cluster_end(pos))) {
      const uint64_t host = (word_of(pos) & kL2OffsetMask) + (pos & (cluster_size_ - 1));
      uint64_t run_end = cluster_end(pos);
      while (run_end < table_end && in_place(run_end, cluster_end(run_end)) &&
             (word_of(run_end) & kL2OffsetMask) == host + (run_end - pos)) {
        run_end = cluster_end(run_end);
      }
      // An L2 entry may point at metadata (a corrupt or hostile image).
      QCOW2FS_RETURN_IF_ERROR(CheckGuestWriteLocked(host, run_end - pos, pos));
      step.pos = pos;
      step.run_end = run_end;
      step.in_place = true;
      step.host = host;
      step.table = std::move(table);
      return Status();
    }

    // An allocating run. Wait out another writer allocating this cluster.
    if (inflight_.count(first_cluster)) {
      table.reset();
      inflight_done_.Wait(meta_mutex_);
      searched = false;  // others allocated meanwhile
      continue;
    }
    const uint64_t c0 = AlignDown(pos, cluster_size_);
    const uint64_t first_word = word_of(pos);
    const ClusterType first_type = ClassifyL2Entry(first_word, extended_l2_, has_data_file);
    // Extended L2: a cluster we own with some touched subclusters
    // unallocated is filled in place, without a new cluster.
    const bool reuse_host = extended_l2_ && first_type == ClusterType::kNormal &&
                            (first_word & kOflagCopied) &&
                            (first_word & kL2OffsetMask) % cluster_size_ == 0;
    if (!reuse_host && !has_data_file && !searched) {
      table.reset();
      QCOW2FS_RETURN_IF_ERROR(FindFreeSpaceLocked());
      searched = true;
      continue;
    }
    uint64_t run_end = cluster_end(pos);
    if (!reuse_host) {
      // New clusters come from the free run at the search's cursor (the
      // lock is held since the search): a fragmented image gives shorter
      // runs, never a search for a long one. 0 (no free cluster found)
      // leaves one cluster, whose allocation fails with the reason.
      uint64_t run_bytes = kMaxRunBytes;
      if (!has_data_file) {
        auto free_clusters = refcounts_->FreeRunAtCursor(kMaxRunBytes >> cluster_bits_);
        if (!free_clusters.ok()) {
          // As in AllocateClustersLocked: a metadata cluster with refcount 0.
          if (free_clusters.status().code() == ErrorCode::kCorrupt) {
            return FenceCorruptLocked(free_clusters.status());
          }
          return free_clusters.status();
        }
        run_bytes = std::max<uint64_t>(*free_clusters, 1) << cluster_bits_;
      }
      while (run_end < table_end && run_end - c0 < run_bytes &&
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
      return t == ClusterType::kCompressed || (t == ClusterType::kNormal && !(word & kOflagCopied));
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
        std::min(AlignDown(last, cluster_size_) + cluster_size_, AlignUp(run_end, unit_of(last)));

    // Old content around the new data, mapped now, read after unlocking.
    if (window_start < pos) {
      QCOW2FS_ASSIGN_OR_RETURN(step.head_count,
                               MapLocked(window_start, pos, step.head, std::size(step.head)));
    }
    if (run_end < window_end) {
      QCOW2FS_ASSIGN_OR_RETURN(step.tail_count,
                               MapLocked(run_end, window_end, step.tail, std::size(step.tail)));
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
    step.old_words.resize(clusters);
    step.old_bitmaps.resize(clusters);
    for (uint64_t i = 0; i < clusters; i++) {
      step.old_words[i] = word_of(c0 + (i << cluster_bits_));
      step.old_bitmaps[i] = bitmap_of(c0 + (i << cluster_bits_));
      inflight_.insert(first_cluster + i);
    }
    step.pos = pos;
    step.run_end = run_end;
    step.host = host_base;
    step.table = std::move(table);
    step.c0 = c0;
    step.clusters = clusters;
    step.reuse_host = reuse_host;
    step.window_start = window_start;
    step.window_end = window_end;
    return Status();
  }
}

Status Qcow2Image::WriteStepData(const WriteStep& step, std::span<const std::byte> bytes) {
  if (step.in_place) {
    QCOW2FS_SYNC_POINT("Write:InPlaceBeforeData", step.pos);
    return data_file_->WriteAt(step.host, bytes);
  }
  // The window [window_start, window_end) goes to host + (g - c0).
  if (step.window_start == step.pos && step.window_end == step.run_end) {
    QCOW2FS_SYNC_POINT("Write:AllocatingBeforeData", step.pos);
    return data_file_->WriteAt(step.host + (step.pos - step.c0), bytes);
  }
  std::vector<std::byte> staging(step.window_end - step.window_start);
  Status io;
  for (size_t i = 0; i < step.head_count && io.ok(); i++) {
    io = ReadExtent(step.head[i], staging.data() + (step.head[i].guest_offset - step.window_start));
  }
  for (size_t i = 0; i < step.tail_count && io.ok(); i++) {
    io = ReadExtent(step.tail[i], staging.data() + (step.tail[i].guest_offset - step.window_start));
  }
  std::memcpy(staging.data() + (step.pos - step.window_start), bytes.data(), bytes.size());
  QCOW2FS_SYNC_POINT("Write:AllocatingBeforeData", step.pos);
  if (!io.ok()) return io;
  return data_file_->WriteAt(step.host + (step.window_start - step.c0), staging);
}

Status Qcow2Image::CommitWriteStepLocked(WriteStep& step, const Status& io) {
  const uint64_t first_cluster = step.c0 >> cluster_bits_;
  for (uint64_t i = 0; i < step.clusters; i++) inflight_.erase(first_cluster + i);
  inflight_done_.NotifyAll();
  if (!io.ok()) {
    // The new clusters were never referenced: give them back.
    if (!step.reuse_host && !has_data_file_) {
      for (uint64_t i = 0; i < step.clusters; i++) {
        ReleaseClusterLocked(step.host + (i << cluster_bits_));
      }
    }
    return io;
  }
  const L2Entries entries(step.table->entries, extended_l2_);
  for (uint64_t i = 0; i < step.clusters; i++) {
    const uint64_t g = step.c0 + (i << cluster_bits_);
    const uint64_t new_host = step.host + (i << cluster_bits_);
    const uint64_t old_word = step.old_words[i];
    const uint64_t old_bitmap = step.old_bitmaps[i];
    uint64_t bitmap = 0;
    if (extended_l2_) {
      // Allocated: what was, plus what the window wrote; a compressed
      // cluster's content moved here whole.
      const uint64_t touched =
          TouchedSubclusters(g, std::max(g, step.window_start),
                             std::min(g + cluster_size_, step.window_end), subcluster_bits_);
      uint64_t alloc = old_bitmap & kAllSubclustersAllocated;
      const ClusterType t = ClassifyL2Entry(old_word, true, has_data_file_);
      if (t == ClusterType::kCompressed) alloc = kAllSubclustersAllocated;
      if (t == ClusterType::kUnallocated) alloc = 0;
      alloc |= touched;
      const uint64_t zero = (old_bitmap >> 32) & ~alloc;
      bitmap = alloc | (zero << 32);
    }
    entries.Set((g >> cluster_bits_) & (l2_entries_ - 1), new_host | kOflagCopied, bitmap);
    if (!step.reuse_host && (old_word & ~kOflagCopied) != 0 &&
        (old_word & kL2OffsetMask) != new_host) {
      ReleaseEntryLocked(old_word);
    }
  }
  step.table->dirty = true;
  if (l2_cache_->over_capacity()) return WriteBackLocked();
  return Status();
}

}  // namespace qcow2fs
