// Qcow2Image metadata persistence: write-back in crash-safe order, flush,
// deferred frees, header updates, resize, overlap checks and fencing.
//
// The on-disk order that keeps every crash point consistent (at worst
// leaked clusters):
//   refcount blocks -> sync -> refcount table -> sync -> [header] -> sync
//   -> L2 tables -> sync -> L1 entries and header -> sync
//   -> (exclusive discard lock) punch and decrement freed clusters.
// A cluster is counted before anything points to it, a table is complete
// before its parent points to it, and a reference is gone from disk before
// its cluster's refcount drops and the cluster can be reused.
#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "base/sync_point.h"
#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"

namespace qcow2fs {
Status Qcow2Image::PrepareForWriting() {
  if (header_.incompatible_features & kIncompatDirty) {
    return Status(
        ErrorCode::kUnsupported,
        "image is dirty (not closed cleanly while its refcounts were being changed); repair it "
        "with 'qemu-img check -r all' before opening it for writing");
  }
  refcounts_ = std::make_unique<Refcounts>(*file_, header_);
  QCOW2FS_RETURN_IF_ERROR(refcounts_->Load());
  QCOW2FS_RETURN_IF_ERROR(BuildMetadataMap());
  // Autoclear features we do not maintain (persistent bitmaps) must be
  // cleared before the first write, so that their data is known stale.
  const uint64_t autoclear = header_.autoclear_features & kAutoclearKnown;
  if (autoclear != header_.autoclear_features) {
    header_.autoclear_features = autoclear;
    QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
    QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  }
  return Status();
}

Status Qcow2Image::WriteHeaderLocked() {
  QCOW2FS_ASSIGN_OR_RETURN(std::vector<std::byte> buf, EncodeHeader(header_));
  return file_->WriteAt(0, buf).Annotate("writing the header");
}

Status Qcow2Image::CheckOverlapLocked(uint64_t offset, uint64_t length, const char* what,
                                      uint8_t own) {
  if (length == 0) return Status();
  auto overlaps = [&](uint64_t start, uint64_t bytes) {
    return bytes != 0 && offset < start + bytes && start < offset + length;
  };
  // The structures the header names, to the byte; then every metadata
  // cluster the tables name, cached or not.
  uint8_t hit = 0;
  if (overlaps(0, cluster_size_)) hit |= MetadataMap::kHeader;
  if (overlaps(header_.l1_table_offset, uint64_t{header_.l1_size} * 8)) {
    hit |= MetadataMap::kL1Table;
  }
  if (overlaps(refcounts_->table_offset(),
               uint64_t{refcounts_->table_clusters()} * cluster_size_)) {
    hit |= MetadataMap::kRefcountTable;
  }
  if (overlaps(header_.snapshots_offset, snapshot_table_bytes_)) {
    hit |= MetadataMap::kSnapshotTable;
  }
  for (const auto& s : snapshots_) {
    if (overlaps(s.l1_table_offset, uint64_t{s.l1_size} * 8)) hit |= MetadataMap::kSnapshotL1Table;
  }
  for (uint64_t c = offset >> cluster_bits_; c <= (offset + length - 1) >> cluster_bits_; c++) {
    hit |= metadata_.KindsOf(c);
  }
  hit &= static_cast<uint8_t>(~own);
  if (!hit) return Status();
  return FenceCorruptLocked(Status(ErrorCode::kCorrupt, std::string(what) + " at " + Hex(offset) +
                                                            " would overwrite " +
                                                            MetadataMap::Describe(hit) +
                                                            " (the image's tables are "
                                                            "inconsistent)"));
}

Status Qcow2Image::CheckGuestWriteLocked(uint64_t host, uint64_t length, uint64_t guest) {
  if (has_data_file_) return Status();  // guest data lives in another file
  for (uint64_t c = host >> cluster_bits_; c <= (host + length - 1) >> cluster_bits_; c++) {
    if (metadata_.KindsOf(c) == 0) continue;
    return CheckOverlapLocked(host, length,
                              ("guest write to " + Where(guest) + ", host offset").c_str());
  }
  return Status();
}

Status Qcow2Image::BuildMetadataMap() {
  auto clusters_of = [this](uint64_t offset, uint64_t bytes) {
    return std::pair<uint64_t, uint64_t>{
        offset >> cluster_bits_,
        bytes == 0 ? 0 : ((offset + bytes - 1) >> cluster_bits_) - (offset >> cluster_bits_) + 1};
  };
  auto add = [&](uint64_t offset, uint64_t bytes, MetadataMap::Kind kind) REQUIRES(meta_mutex_) {
    auto [first, count] = clusters_of(offset, bytes);
    metadata_.AddRange(first, count, kind);
  };
  auto add_l2_tables = [&](const std::vector<uint64_t>& l1, bool of_snapshot)
                           REQUIRES(meta_mutex_) {
                             for (uint64_t entry : l1) {
                               const uint64_t l2 = L1EntryL2Offset(entry);
                               // An unaligned one cannot be used at all (mapping reports it).
                               if (l2 == 0 || l2 % cluster_size_ != 0) continue;
                               metadata_.Add(l2 >> cluster_bits_, MetadataMap::kL2Table);
                               if (of_snapshot) snapshot_l2_tables_.insert(l2 >> cluster_bits_);
                             }
                           };
  add(0, cluster_size_, MetadataMap::kHeader);
  add(header_.l1_table_offset, uint64_t{header_.l1_size} * 8, MetadataMap::kL1Table);
  add(refcounts_->table_offset(), uint64_t{refcounts_->table_clusters()} * cluster_size_,
      MetadataMap::kRefcountTable);
  for (uint64_t block : refcounts_->block_offsets()) {
    if (block != 0) metadata_.Add(block >> cluster_bits_, MetadataMap::kRefcountBlock);
  }
  add(header_.snapshots_offset, snapshot_table_bytes_, MetadataMap::kSnapshotTable);
  add_l2_tables(l1_, false);
  for (const auto& s : snapshots_) {
    add(s.l1_table_offset, uint64_t{s.l1_size} * 8, MetadataMap::kSnapshotL1Table);
    std::vector<std::byte> raw(uint64_t{s.l1_size} * 8);
    QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(s.l1_table_offset, raw)
                                .Annotate("reading the L1 table of snapshot '" + s.name + "'"));
    std::vector<uint64_t> l1(s.l1_size);
    for (size_t i = 0; i < l1.size(); i++) l1[i] = LoadBe64(raw.data() + 8 * i);
    add_l2_tables(l1, true);
  }
  refcounts_->set_metadata_map(&metadata_);
  return Status();
}

Status Qcow2Image::FenceCorruptLocked(const Status& cause) {
  if (!fenced_.exchange(true)) {
    header_.incompatible_features |= kIncompatCorrupt;
    if (WriteHeaderLocked().ok()) (void)file_->Sync();
  }
  return cause.Annotate(path_ + " is now marked corrupt; no further writes");
}

Status Qcow2Image::WriteBackLocked() {
  // 1-3: refcounts first; a moved refcount table needs the header.
  // (Refcounts::WriteBack syncs the image file after what it writes.)
  bool image_synced = false;
  if (refcounts_->dirty()) {
    image_synced = true;
    QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(
        refcounts_->table_offset(), uint64_t{refcounts_->table_clusters()} << cluster_bits_,
        "refcount table", MetadataMap::kRefcountTable));
    for (uint64_t block : refcounts_->DirtyBlockOffsets()) {
      QCOW2FS_RETURN_IF_ERROR(
          CheckOverlapLocked(block, cluster_size_, "refcount block", MetadataMap::kRefcountBlock));
    }
    QCOW2FS_ASSIGN_OR_RETURN(bool moved, refcounts_->WriteBack());
    if (moved) {
      header_.refcount_table_offset = refcounts_->table_offset();
      header_.refcount_table_clusters = refcounts_->table_clusters();
      QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
      QCOW2FS_RETURN_IF_ERROR(file_->Sync());
      for (uint64_t c : refcounts_->TakeRetiredTableClusters()) {
        metadata_.RemoveKind(c, MetadataMap::kRefcountTable);
        DeferFreeLocked(c);
      }
    }
  }
  // 4: L2 tables. The data their new entries point to goes to disk first:
  // allocating writes finished their data I/O before they changed an entry,
  // but nothing has synced it yet, and an entry may have changed without
  // any refcount changing (a subcluster filled in place, or an allocation
  // an earlier write-back already counted). The external data file is
  // synced here too, not only at the end of a flush.
  bool wrote = false, data_synced = false;
  Status status;
  std::vector<std::byte> raw(cluster_size_);
  l2_cache_->ForEachDirty([&](L2Table& t) REQUIRES(meta_mutex_) {
    if (!status.ok()) return;
    if (!data_synced) {
      if (owned_data_file_) status = owned_data_file_->Sync();
      if (status.ok() && !image_synced) status = file_->Sync();
      if (!status.ok()) return;
      data_synced = true;
    }
    status = CheckOverlapLocked(t.offset, cluster_size_, "L2 table", MetadataMap::kL2Table);
    if (!status.ok()) return;
    for (size_t i = 0; i < t.entries.size(); i++) StoreBe64(raw.data() + 8 * i, t.entries[i]);
    status = file_->WriteAt(t.offset, raw);
    if (status.ok()) {
      t.dirty = false;
      wrote = true;
    }
  });
  QCOW2FS_RETURN_IF_ERROR(status);
  if (wrote) QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  // 5: L1 entries, then the header (size, L1 location).
  if (!l1_dirty_.empty() || header_dirty_) {
    for (uint64_t i : l1_dirty_) {
      std::byte entry[8];
      StoreBe64(entry, l1_[i]);
      QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(header_.l1_table_offset + 8 * i, 8, "L1 entry",
                                                 MetadataMap::kL1Table));
      QCOW2FS_RETURN_IF_ERROR(file_->WriteAt(header_.l1_table_offset + 8 * i, entry));
    }
    l1_dirty_.clear();
    if (header_dirty_) {
      QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
      header_dirty_ = false;
    }
    QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  }
  l2_cache_->Trim();
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  file_size_.store(std::max(file_size, file_size_.load()), std::memory_order_release);
  return Status();
}

void Qcow2Image::DeferFreeLocked(uint64_t cluster) {
  pending_frees_.push_back(cluster);
  if (pending_frees_.size() >= MaxDeferredFrees()) {
    frees_due_.store(true, std::memory_order_relaxed);
  }
}

uint64_t Qcow2Image::MaxDeferredFrees() const {
  return std::max<uint64_t>(64, (uint64_t{16} << 20) >> cluster_bits_);
}

std::vector<uint64_t> Qcow2Image::TakeDeferredFreesLocked() {
  std::vector<uint64_t> frees = std::move(pending_frees_);
  pending_frees_.clear();
  frees_due_.store(false, std::memory_order_relaxed);
  return frees;
}

Status Qcow2Image::ApplyDeferredFreesIfDue() {
  if (!frees_due_.load(std::memory_order_relaxed)) return Status();
  std::vector<uint64_t> frees;
  {
    MutexLock lk(meta_mutex_);
    if (!frees_due_.load(std::memory_order_relaxed)) return Status();  // another thread did
    // The references are gone from disk before any refcount drops.
    QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    frees = TakeDeferredFreesLocked();
  }
  WriterLock guard(discard_lock_);
  return FreeClustersExclusive(std::move(frees));
}

Status Qcow2Image::FreeClustersExclusive(std::vector<uint64_t> clusters) {
  if (clusters.empty()) return Status();
  std::sort(clusters.begin(), clusters.end());
  MutexLock lk(meta_mutex_);
  for (uint64_t c : clusters) {
    QCOW2FS_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
    if (rc == 0) {
      return FenceCorruptLocked(
          Status(ErrorCode::kCorrupt,
                 "freeing cluster " + Hex(c << cluster_bits_) + " whose refcount is already 0"));
    }
    if (rc == 1 && metadata_.KindsOf(c) != 0) {
      // Structures that move away drop their kind first (an old L1 or
      // refcount table, an L2 table copied away): this is a data reference
      // to a metadata cluster going, and freeing would wipe the table.
      return FenceCorruptLocked(Status(
          ErrorCode::kCorrupt, "freeing cluster " + Hex(c << cluster_bits_) + ", which holds " +
                                   MetadataMap::Describe(metadata_.KindsOf(c))));
    }
    if (rc == 1) {
      // Last reference gone: give the space back to the host. Nobody can
      // reach the cluster (its references are gone and the caller holds the
      // discard lock exclusively), and it is not reusable until counted 0.
      l2_cache_->Erase(c << cluster_bits_);
      QCOW2FS_RETURN_IF_ERROR(file_->PunchHole(c << cluster_bits_, cluster_size_));
    }
    QCOW2FS_RETURN_IF_ERROR(refcounts_->Add(c, -1));
  }
  return Status();
}

Status Qcow2Image::Flush() {
  if (read_only_ || fenced_.load()) return Status();
  if (compressed_cache_) QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Flush());
  std::vector<uint64_t> frees;
  {
    MutexLock lk(meta_mutex_);
    QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    // Only frees whose L2/L1 changes just reached disk are safe to apply.
    frees = TakeDeferredFreesLocked();
  }
  QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  if (owned_data_file_) QCOW2FS_RETURN_IF_ERROR(owned_data_file_->Sync());
  if (frees.empty()) return Status();
  WriterLock guard(discard_lock_);
  return FreeClustersExclusive(std::move(frees));
}

Status Qcow2Image::Resize(uint64_t new_size) {
  if (read_only_) return Status(ErrorCode::kReadOnly, path_ + " is open read-only");
  if (fenced_.load()) return Status(ErrorCode::kReadOnly, path_ + " is marked corrupt");
  if (new_size > limits::kMaxVirtualSize) {
    return Status(ErrorCode::kInvalidArgument,
                  "size " + std::to_string(new_size) + " is too large");
  }
  // QEMU sees disks in 512-byte sectors and ignores a partial last one, so
  // sizes are rounded up to whole sectors, as qemu-img resize does.
  new_size = AlignUp(new_size, kSectorSize);
  // No write, zeroing or discard runs while the size changes: each holds
  // the shared side from its bounds check to its end. So a shrink sees
  // every write that was accepted, and no write is accepted against a size
  // that is about to change.
  {
    LockExclusiveNoting(resize_lock_, "Resize:WaitingForRequests", new_size);
    WriterLock resizing(resize_lock_, kAdoptLock);
    QCOW2FS_RETURN_IF_ERROR(ResizeExclusive(new_size));
  }
  QCOW2FS_SYNC_POINT("Resize:SizePublished", new_size);
  return Status();
}

Status Qcow2Image::ResizeExclusive(uint64_t new_size) {
  const uint64_t old_size = size();
  if (new_size == old_size) return Status();
  if (compressed_cache_) QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Flush());
  if (new_size < old_size) {
    // Shrink only when nothing past the new end is mapped.
    auto st = GetBlockStatus(new_size, old_size - new_size);
    if (!st.ok()) return st.status();
    if (st->kind != BlockKind::kUnallocated || st->length < old_size - new_size) {
      return Status(ErrorCode::kInvalidArgument, "cannot shrink to " + std::to_string(new_size) +
                                                     " bytes: data is allocated past the new end");
    }
  }
  if (L1EntriesFor(new_size) * 8 > limits::kMaxL1Bytes) {
    return Status(ErrorCode::kInvalidArgument,
                  "size " + std::to_string(new_size) + " needs an L1 table over 32 MiB");
  }
  // Growing exposes the rest of a partial last cluster, which may hold
  // stale bytes from before a shrink: it reads as zeros before the new size
  // is visible to anyone.
  if (new_size > old_size && (old_size & (cluster_size_ - 1)) != 0) {
    const uint64_t stop = std::min(new_size, AlignUp(old_size, cluster_size_));
    QCOW2FS_RETURN_IF_ERROR(WriteZeroBytes(old_size, stop - old_size));
  }
  {
    WriterLock guard(discard_lock_);
    MutexLock lk(meta_mutex_);
    const uint64_t needed = header_.l1_entries_for(new_size);
    if (needed > l1_.size()) {
      // A bigger L1 table in new clusters, complete on disk before the
      // header points to it.
      QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
      const uint64_t clusters = (needed * 8 + cluster_size_ - 1) >> cluster_bits_;
      QCOW2FS_ASSIGN_OR_RETURN(uint64_t offset, AllocateClustersLocked(clusters));
      QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());  // its refcounts
      // Only the table's own sectors: the rest of its last cluster is never
      // read, and left unwritten it costs no disk space (a new image's
      // 8-byte L1 table would otherwise take a whole cluster).
      std::vector<std::byte> raw(AlignUp(needed * 8, kSectorSize));
      for (size_t i = 0; i < l1_.size(); i++) StoreBe64(raw.data() + 8 * i, l1_[i]);
      QCOW2FS_RETURN_IF_ERROR(file_->WriteAt(offset, raw));
      QCOW2FS_RETURN_IF_ERROR(file_->Sync());
      const uint64_t old_offset = header_.l1_table_offset;
      const uint64_t old_clusters =
          (uint64_t{header_.l1_size} * 8 + cluster_size_ - 1) >> cluster_bits_;
      header_.l1_table_offset = offset;
      header_.l1_size = static_cast<uint32_t>(needed);
      metadata_.AddRange(offset >> cluster_bits_, clusters, MetadataMap::kL1Table);
      l1_.resize(needed, 0);
      if (old_offset != 0) {
        for (uint64_t c = 0; c < old_clusters; c++) {
          metadata_.RemoveKind((old_offset >> cluster_bits_) + c, MetadataMap::kL1Table);
          DeferFreeLocked((old_offset >> cluster_bits_) + c);
        }
      }
    }
    header_.size = new_size;
    QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
    QCOW2FS_RETURN_IF_ERROR(file_->Sync());
    size_.store(new_size, std::memory_order_release);
  }
  if (compressed_cache_) compressed_cache_->set_disk_size(new_size);
  return Status();
}

}  // namespace qcow2fs
