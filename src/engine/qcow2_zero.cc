// Qcow2Image zeroing and discard: whole clusters change only their L2
// entries (zero flag, or deallocation); partial clusters are written with
// zeros through the data path.
//
// Both hold the exclusive side of the discard lock while they change
// entries, so no request is between mapping and I/O on a cluster whose
// reference is being dropped (see docs/concurrency.md).
#include <algorithm>
#include <functional>

#include "base/sync_point.h"
#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/l2_entry.h"

namespace qcow2fs {

Status Qcow2Image::WriteZeroBytes(uint64_t offset, uint64_t length) {
  static const std::vector<std::byte> kZeros(1 << 20);
  // Zeros are data like any other, in compress mode too: staged, so a
  // cluster partly zeroed (cp --sparse=always punching the head of a hole)
  // still ends up compressed, or a zero cluster, rather than a normal one.
  for (uint64_t done = 0; done < length;) {
    const uint64_t n = std::min<uint64_t>(kZeros.size(), length - done);
    QCOW2FS_RETURN_IF_ERROR(WriteData(offset + done, {kZeros.data(), n}));
    done += n;
  }
  return Status();
}

Status Qcow2Image::ZeroClustersExclusive(uint64_t first_cluster, uint64_t count, bool discard,
                                         bool may_unmap) {
  const bool has_data_file = has_data_file_;
  const bool v3 = version_ >= 3;
  MutexLock lk(meta_mutex_);
  for (uint64_t c = first_cluster; c < first_cluster + count;) {
    const uint64_t l1_index = c / l2_entries_;
    const uint64_t table_last = std::min(first_cluster + count, (l1_index + 1) * l2_entries_);
    // Nothing to do where no L2 table exists and nothing shows through.
    if (L1EntryL2Offset(l1_[l1_index]) == 0 && (!backing_ || (discard && !v3))) {
      c = table_last;
      continue;
    }
    QCOW2FS_ASSIGN_OR_RETURN(auto table, L2ForWriteLocked(l1_index));
    const L2Entries entries(table->entries, extended_l2_);
    for (; c < table_last; c++) {
      const uint64_t idx = c & (l2_entries_ - 1);
      const uint64_t old = entries.word(idx);
      const ClusterType type = ClassifyL2Entry(old, extended_l2_, has_data_file);
      const bool allocated = type == ClusterType::kNormal || type == ClusterType::kCompressed ||
                             type == ClusterType::kZeroAlloc;
      const uint64_t host = old & kL2OffsetMask;
      // A preallocated cluster we own may keep its host cluster (reads
      // still return zeros) unless the caller lets us unmap it.
      const bool keep_host = v3 && !discard && !may_unmap &&
                             (type == ClusterType::kNormal || type == ClusterType::kZeroAlloc) &&
                             (old & kOflagCopied);
      uint64_t new_word, new_bitmap = 0;
      if (has_data_file) {
        // Data file clusters map 1:1 and are not counted: keep the mapping,
        // mark it zero, and punch the data file so its raw view agrees.
        new_word = extended_l2_ ? (old & ~kOflagZero) : ((host | kOflagCopied) | kOflagZero);
        if (extended_l2_) new_bitmap = kAllSubclustersZero;
        // Punched under meta_mutex_ (and the exclusive discard lock, so no
        // guest I/O waits on it): no flush can write the zero entry back
        // before the raw data file reads as zeros.
        if (host != 0 || (old & kOflagCopied)) {
          QCOW2FS_RETURN_IF_ERROR(data_file_->PunchHole(c << cluster_bits_, cluster_size_));
        }
      } else if (extended_l2_) {
        // QEMU's rule for extended L2: all subclusters read as zeros.
        new_word = keep_host ? old : 0;
        new_bitmap = kAllSubclustersZero;
      } else if (v3) {
        if (discard && !allocated && !backing_) continue;
        new_word = keep_host ? ((host | kOflagCopied) | kOflagZero) : kOflagZero;
      } else {
        // Version 2 has no zero flag: deallocate; the cluster then reads from
        // the backing file, which discard allows and zeroing does not.
        if (!discard && backing_) {
          return Status(ErrorCode::kInvalidArgument,
                        "version 2 image with a backing "
                        "file cannot zero clusters");
        }
        new_word = 0;
      }
      if (!has_data_file && !keep_host && allocated) {
        QCOW2FS_RETURN_IF_ERROR(CheckReleasableLocked(*table, idx, old, c << cluster_bits_));
        ReleaseEntryLocked(old);
      }
      entries.Set(idx, new_word, new_bitmap);
      table->dirty = true;
    }
  }
  if (frees_due_.load(std::memory_order_relaxed)) {
    QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    std::vector<uint64_t> frees = TakeDeferredFreesLocked();
    lk.Unlock();
    // We hold the discard lock exclusively already: free right away.
    return FreeClustersExclusive(std::move(frees));
  }
  if (l2_cache_->over_capacity()) return WriteBackLocked();
  return Status();
}

// Splits [offset, offset+length) into a partial head, whole clusters and a
// partial tail; whole clusters get `whole`, partial pieces get zeros written.
static Status ForClusterSpan(uint64_t offset, uint64_t length, uint64_t cluster_size,
                             const std::function<Status(uint64_t, uint64_t)>& partial,
                             const std::function<Status(uint64_t, uint64_t)>& whole) {
  const uint64_t end = offset + length;
  const uint64_t first_whole = (offset + cluster_size - 1) & ~(cluster_size - 1);
  const uint64_t last_whole = end & ~(cluster_size - 1);
  if (first_whole >= last_whole) return partial(offset, length);
  if (offset < first_whole) QCOW2FS_RETURN_IF_ERROR(partial(offset, first_whole - offset));
  if (last_whole < end) QCOW2FS_RETURN_IF_ERROR(partial(last_whole, end - last_whole));
  return whole(first_whole, last_whole - first_whole);
}

Status Qcow2Image::WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) {
  ReaderLock sizing(resize_lock_);
  QCOW2FS_RETURN_IF_ERROR(CheckWritable(offset, length));
  QCOW2FS_RETURN_IF_ERROR(
      ClearRange(offset, length, /*discard=*/false, may_unmap, /*drop_staged=*/true));
  return ApplyDeferredFreesIfDue();
}

Status Qcow2Image::ClearRange(uint64_t offset, uint64_t length, bool discard, bool may_unmap,
                              bool drop_staged) {
  if (length == 0) return Status();
  // A disk whose size is not cluster aligned still owns its whole last
  // cluster, so a range reaching the end counts that cluster as whole.
  const uint64_t span_end =
      offset + length == size() ? AlignUp(size(), cluster_size_) : offset + length;
  // Version 2 cannot mark a cluster zero over a backing file: zeroing
  // writes zeros there (discard may let the backing data show).
  const bool write_whole = !discard && !CanZeroClusters();
  return ForClusterSpan(
      offset, span_end - offset, cluster_size_,
      [&](uint64_t off, uint64_t len) {
        return WriteZeroBytes(off, std::min(len, size() - std::min(size(), off)));
      },
      [&](uint64_t off, uint64_t len) {
        if (write_whole) return WriteZeroBytes(off, std::min(len, size() - off));
        // Staged bytes of these clusters are forgotten while no reader can
        // be between capturing them and reading the image (compress-mode
        // reads hold the discard lock across both): a reader sees either
        // the staged bytes or the zeros, never the older image content.
        while (true) {
          if (drop_staged && compressed_cache_) {
            QCOW2FS_RETURN_IF_ERROR(compressed_cache_->SettleRange(off, len));
          }
          LockExclusiveNoting(discard_lock_, "Discard:WaitingForRequests", off);
          WriterLock guard(discard_lock_, kAdoptLock);
          if (drop_staged && compressed_cache_ && !compressed_cache_->DropStaged(off, len)) {
            continue;  // a cluster was completed meanwhile: let it commit first
          }
          QCOW2FS_SYNC_POINT("Discard:StagedDropped", off);
          return ZeroClustersExclusive(off >> cluster_bits_, len >> cluster_bits_, discard,
                                       may_unmap);
        }
      });
}

Status Qcow2Image::Discard(uint64_t offset, uint64_t length) {
  ReaderLock sizing(resize_lock_);
  QCOW2FS_RETURN_IF_ERROR(CheckWritable(offset, length));
  QCOW2FS_RETURN_IF_ERROR(ClearRange(offset, length, /*discard=*/true, /*may_unmap=*/true,
                                     /*drop_staged=*/true));
  return ApplyDeferredFreesIfDue();
}

}  // namespace qcow2fs
