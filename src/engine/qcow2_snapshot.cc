// Internal snapshots of a live image: take, drop, view, and revert offline.
//
// Refcounts count references per tree: a data cluster reachable from the
// active L1 table and from one snapshot's L1 table has refcount 2, even
// when both reach it through one shared L2 table. So taking a snapshot adds
// one reference to every cluster the active tree reaches, dropping one
// takes one from every cluster the snapshot's tree reaches, and the
// OFLAG_COPIED bits of the active tables are then set again exactly where
// the refcount is 1 (what the write path trusts to write in place).
//
// Every operation runs with the writers stopped (resize_lock_ exclusive),
// the staging cache drained, and metadata written back before and after, in
// the order that makes each step's end a consistent image:
//   take:   [dirty -> refcounts +1 (and the L1 copy counted) -> sync ->
//           flags cleared in L2/L1 -> sync -> clean] -> new snapshot table
//           -> sync -> header -> sync
//   drop:   new snapshot table -> sync -> header -> sync -> [dirty ->
//           refcounts -1, flags set -> sync -> clean]
// ([dirty ... clean]: the header's dirty bit, each change synced.)
// Before the header points to the new table there is no snapshot and the
// raised refcounts are leaks; after it, the snapshot is complete. Between
// the refcount and the flag steps a crash leaves flags that disagree with
// refcounts (QEMU's own order has the same window): data is safe, since the
// extra references belong to no snapshot, and on a version 3 image the
// header's dirty bit is set for exactly that span, so the next writable
// open (qcow2fs's or QEMU's) repairs the flags before anything trusts them.
#include <time.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <map>
#include <set>

#include "base/sync_point.h"
#include "engine/image_open.h"
#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"
#include "format/refcount_block.h"

namespace qcow2fs {
namespace {

// A snapshot's disk as an Image: reads through a read-only image of the
// same file, and tells the live image when it goes away, so that the
// snapshot is not deleted under it.
class SnapshotView final : public Image {
 public:
  SnapshotView(std::unique_ptr<Image> inner, std::function<void()> on_close)
      : inner_(std::move(inner)), on_close_(std::move(on_close)) {}
  ~SnapshotView() override { on_close_(); }

  uint64_t size() const override { return inner_->size(); }
  bool read_only() const override { return true; }
  ImageInfo info() const override { return inner_->info(); }
  Status Read(uint64_t offset, std::span<std::byte> buf) override {
    return inner_->Read(offset, buf);
  }
  Status Write(uint64_t, std::span<const std::byte>) override { return ReadOnly(); }
  Status WriteZeroes(uint64_t, uint64_t, bool) override { return ReadOnly(); }
  Status Discard(uint64_t, uint64_t) override { return ReadOnly(); }
  Status Flush() override { return Status(); }
  Status Resize(uint64_t) override { return ReadOnly(); }
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t length) override {
    return inner_->GetBlockStatus(offset, length);
  }
  Result<BlockStatus> GetDataStatus(uint64_t offset, uint64_t length) override {
    return inner_->GetDataStatus(offset, length);
  }
  uint64_t AllocatedBytes() const override { return inner_->AllocatedBytes(); }
  Status CreateSnapshot(const std::string&) override { return ReadOnly(); }
  Status DeleteSnapshot(const std::string&) override { return ReadOnly(); }
  Result<std::unique_ptr<Image>> OpenSnapshot(const std::string&) override { return ReadOnly(); }

 private:
  static Status ReadOnly() {
    return Status(ErrorCode::kReadOnly, "a snapshot's disk is read-only");
  }
  std::unique_ptr<Image> inner_;
  std::function<void()> on_close_;
};

// The extra data QEMU writes for a disk-only snapshot (spec "Snapshots"):
// VM state size (64 bit), virtual disk size, instruction count (-1: none).
std::vector<std::byte> DiskOnlyExtraData(uint64_t disk_size) {
  std::vector<std::byte> extra(24);
  StoreBe64(extra.data(), 0);
  StoreBe64(extra.data() + 8, disk_size);
  StoreBe64(extra.data() + 16, UINT64_MAX);
  return extra;
}

}  // namespace

Qcow2Image::ClusterRun Qcow2Image::ReferencedClusters(uint64_t word) const {
  switch (ClassifyL2Entry(word, extended_l2_, has_data_file_)) {
    case ClusterType::kCompressed: {
      const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
      const uint64_t first = AlignDown(d.host_offset, kSectorSize) >> cluster_bits_;
      const uint64_t last = (d.host_offset + d.max_bytes - 1) >> cluster_bits_;
      return {first, last - first + 1};
    }
    case ClusterType::kNormal:
    case ClusterType::kZeroAlloc:
      if (has_data_file_ || (word & kL2OffsetMask) == 0) return {};
      return {(word & kL2OffsetMask) >> cluster_bits_, 1};
    default:
      return {};
  }
}

Result<std::vector<uint64_t>> Qcow2Image::ReadTableLocked(uint64_t offset, uint64_t entries,
                                                          const char* what) {
  const uint64_t bytes = entries * 8;
  const uint64_t file_size = file_size_.load(std::memory_order_acquire);
  if (offset % cluster_size_ != 0 || offset > file_size || file_size - offset < bytes) {
    return FenceCorruptLocked(Status(
        ErrorCode::kCorrupt,
        std::string(what) + " at " + Hex(offset) + " is unaligned or past the end of the file"));
  }
  std::vector<std::byte> raw(bytes);
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(offset, raw).Annotate(std::string("reading ") + what));
  std::vector<uint64_t> out(entries);
  for (uint64_t i = 0; i < entries; i++) out[i] = LoadBe64(raw.data() + 8 * i);
  return out;
}

Status Qcow2Image::ForEachTreeClusterLocked(const std::vector<uint64_t>& l1,
                                            const std::string& whose,
                                            const std::function<Status(uint64_t)>& fn) {
  const uint64_t words = extended_l2_ ? 2 * l2_entries_ : l2_entries_;
  for (uint64_t entry : l1) {
    const uint64_t l2 = L1EntryL2Offset(entry);
    if (l2 == 0) continue;
    // Metadata is written back before any tree walk, so the file holds
    // every table as the caches do.
    QCOW2FS_ASSIGN_OR_RETURN(auto table,
                             ReadTableLocked(l2, words, ("an L2 table of " + whose).c_str()));
    const L2Entries entries(table, extended_l2_);
    for (uint64_t k = 0; k < entries.size(); k++) {
      const ClusterRun run = ReferencedClusters(entries.word(k));
      for (uint64_t c = run.first; c < run.first + run.count; c++) QCOW2FS_RETURN_IF_ERROR(fn(c));
    }
    QCOW2FS_RETURN_IF_ERROR(fn(l2 >> cluster_bits_));
  }
  return Status();
}

Status Qcow2Image::RefcountFullLocked(uint64_t cluster) const {
  return Status(ErrorCode::kNoSpace, "cluster " + Hex(cluster << cluster_bits_) +
                                         " already has the most references refcount_bits=" +
                                         std::to_string(header_.refcount_bits()) + " allows (" +
                                         std::to_string(MaxRefcount(refcount_order_)) + ")");
}

Status Qcow2Image::AddTreeReferencesLocked(const std::vector<uint64_t>& l1, int delta,
                                           const std::string& whose) {
  if (delta < 0) {
    return ForEachTreeClusterLocked(l1, whose, [&](uint64_t c) REQUIRES(meta_mutex_) {
      return ChangeReferenceLocked(c, delta);
    });
  }
  // When a refcount is at its maximum (a low refcount_bits image with many
  // snapshots, or a host cluster the tree reaches more than once, with
  // compressed clusters packed into it, reaching it partway through), the
  // increments made so far, all in memory and none of them freeing
  // anything, are taken back in the same walk order, and the tree is
  // refused as a whole.
  const uint64_t max = MaxRefcount(refcount_order_);
  uint64_t added = 0;
  bool full = false;
  Status status =
      ForEachTreeClusterLocked(l1, whose, [&](uint64_t c) REQUIRES(meta_mutex_) -> Status {
        QCOW2FS_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(c));
        if (rc >= max) {
          full = true;
          return RefcountFullLocked(c);
        }
        QCOW2FS_RETURN_IF_ERROR(ChangeReferenceLocked(c, delta));
        added++;
        return Status();
      });
  if (!full || added == 0) return status;
  uint64_t undone = 0;
  QCOW2FS_RETURN_IF_ERROR(
      ForEachTreeClusterLocked(l1, whose, [&](uint64_t c) REQUIRES(meta_mutex_) -> Status {
        if (undone == added) return Status();
        undone++;
        Status taken_back = refcounts_->Add(c, -1);
        return taken_back.ok() ? taken_back : FenceCorruptLocked(taken_back);
      }));
  return status;
}

Status Qcow2Image::SetDirtyBitLocked(bool dirty) {
  if (version_ < 3) return Status();
  // What was written before reaches the disk first: once set, no later
  // step's write can be there without the bit; once cleared, no earlier
  // step's write can be missing.
  QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  if (dirty) {
    header_.incompatible_features |= kIncompatDirty;
  } else {
    header_.incompatible_features &= ~kIncompatDirty;
  }
  // Written even when header_ says so already: an earlier header write that
  // failed may have left the disk's copy otherwise.
  QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
  return file_->Sync();
}

Status Qcow2Image::ApplyDeferredFreesExclusive() {
  std::vector<uint64_t> frees;
  {
    MutexLock lk(meta_mutex_);
    QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    frees = TakeDeferredFreesLocked();
  }
  return FreeClustersExclusive(std::move(frees));
}

Status Qcow2Image::ChangeReferenceLocked(uint64_t cluster, int delta) {
  if (delta > 0) {
    auto added = refcounts_->Add(cluster, delta);
    return added.ok() ? added : FenceCorruptLocked(added);
  }
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t rc, refcounts_->Get(cluster));
  if (rc == 0) {
    return FenceCorruptLocked(Status(ErrorCode::kCorrupt, "dropping a reference to cluster " +
                                                              Hex(cluster << cluster_bits_) +
                                                              " whose refcount is already 0"));
  }
  if (rc == 1) {
    // The last reference: nothing reaches the cluster any more (the caller
    // holds the discard lock exclusively and the reference is gone from
    // disk), so its space goes back to the host.
    l2_cache_->Erase(cluster << cluster_bits_);
    metadata_.RemoveKind(cluster, MetadataMap::kL2Table);
    metadata_.RemoveKind(cluster, MetadataMap::kSnapshotL1Table);
    QCOW2FS_RETURN_IF_ERROR(file_->PunchHole(cluster << cluster_bits_, cluster_size_));
  }
  return refcounts_->Add(cluster, -1);
}

Status Qcow2Image::SetCopiedFlagsLocked() {
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  for (uint64_t i = 0; i < l1_.size(); i++) {
    const uint64_t l2 = L1EntryL2Offset(l1_[i]);
    if (l2 == 0) continue;
    QCOW2FS_ASSIGN_OR_RETURN(uint64_t table_rc, refcounts_->Get(l2 >> cluster_bits_));
    const uint64_t l1_entry = table_rc == 1 ? (l1_[i] | kOflagCopied) : (l1_[i] & ~kOflagCopied);
    if (l1_entry != l1_[i]) {
      l1_[i] = l1_entry;
      l1_dirty_.insert(i);
    }
    QCOW2FS_ASSIGN_OR_RETURN(auto table, L2ForMappingLocked(i, i * l2_coverage));
    const L2Entries entries(table->entries, extended_l2_);
    bool changed = false;
    for (uint64_t k = 0; k < entries.size(); k++) {
      const uint64_t word = entries.word(k);
      const ClusterType type = ClassifyL2Entry(word, extended_l2_, false);
      if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
      QCOW2FS_ASSIGN_OR_RETURN(uint64_t rc,
                               refcounts_->Get((word & kL2OffsetMask) >> cluster_bits_));
      const uint64_t next = rc == 1 ? (word | kOflagCopied) : (word & ~kOflagCopied);
      if (next != word) {
        entries.set_word(k, next);
        changed = true;
      }
    }
    if (changed) table->dirty = true;
  }
  return Status();
}

Status Qcow2Image::WriteSnapshotTableLocked(std::vector<SnapshotEntry> entries) {
  const std::vector<std::byte> raw = EncodeSnapshotTable(entries);
  uint64_t offset = 0;
  if (!raw.empty()) {
    const uint64_t clusters = (raw.size() + cluster_size_ - 1) >> cluster_bits_;
    QCOW2FS_ASSIGN_OR_RETURN(offset, AllocateClustersLocked(clusters));
    QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(offset, raw.size(), "snapshot table"));
    QCOW2FS_RETURN_IF_ERROR(file_->WriteAt(offset, raw).Annotate("writing the snapshot table"));
    // The table and its refcount on disk before the header names it.
    QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
    QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  }
  QCOW2FS_SYNC_POINT("Snapshot:TableWritten", offset);
  const uint64_t old_offset = header_.snapshots_offset;
  const uint64_t old_bytes = snapshot_table_bytes_;
  header_.nb_snapshots = static_cast<uint32_t>(entries.size());
  header_.snapshots_offset = offset;
  QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
  QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  // The old table is unreachable now: its clusters are freed with the next
  // deferred frees.
  if (old_bytes != 0) {
    for (uint64_t c = old_offset >> cluster_bits_;
         c <= (old_offset + old_bytes - 1) >> cluster_bits_; c++) {
      metadata_.RemoveKind(c, MetadataMap::kSnapshotTable);
      DeferFreeLocked(c);
    }
  }
  if (!raw.empty()) {
    metadata_.AddRange(offset >> cluster_bits_, (raw.size() + cluster_size_ - 1) >> cluster_bits_,
                       MetadataMap::kSnapshotTable);
  }
  snapshots_ = std::move(entries);
  snapshot_table_bytes_ = raw.size();
  return Status();
}

Status Qcow2Image::RebuildSnapshotL2SetLocked() {
  snapshot_l2_tables_.clear();
  for (const auto& s : snapshots_) {
    QCOW2FS_ASSIGN_OR_RETURN(
        auto l1, ReadTableLocked(s.l1_table_offset, s.l1_size, "a snapshot's L1 table"));
    for (uint64_t entry : l1) {
      const uint64_t l2 = L1EntryL2Offset(entry);
      if (l2 != 0) snapshot_l2_tables_.insert(l2 >> cluster_bits_);
    }
  }
  return Status();
}

Status Qcow2Image::CheckSnapshotsPossible() const {
  if (read_only_) return Status(ErrorCode::kReadOnly, path_ + " is open read-only");
  if (fenced_.load()) return Status(ErrorCode::kReadOnly, path_ + " is marked corrupt");
  if (has_data_file_) {
    return Status(ErrorCode::kUnsupported,
                  "images with an external data file cannot hold internal snapshots");
  }
  return Status();
}

const SnapshotEntry* Qcow2Image::FindSnapshotLocked(const std::string& id_or_name) const {
  for (const auto& s : snapshots_) {
    if (s.id == id_or_name) return &s;
  }
  for (const auto& s : snapshots_) {
    if (s.name == id_or_name) return &s;
  }
  return nullptr;
}

Status Qcow2Image::CreateSnapshot(const std::string& name) {
  QCOW2FS_RETURN_IF_ERROR(CheckSnapshotsPossible());
  if (name.empty()) return Status(ErrorCode::kInvalidArgument, "a snapshot needs a name");
  if (refcount_order_ == 0) {
    return Status(ErrorCode::kUnsupported,
                  "refcount_bits=1 images cannot hold a snapshot (no room for a second reference)");
  }
  LockExclusiveNoting(resize_lock_, "Snapshot:WaitingForWriters", 0);
  WriterLock writers(resize_lock_, kAdoptLock);
  if (compressed_cache_) QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Flush());
  MutexLock lk(meta_mutex_);
  if (FindSnapshotLocked(name)) {
    return Status(ErrorCode::kAlreadyExists, "a snapshot named '" + name + "' exists");
  }
  if (snapshots_.size() >= limits::kMaxSnapshots) {
    return Status(ErrorCode::kNoSpace, "the image holds the most snapshots qcow2 allows");
  }
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());

  // 1. A second reference to everything the active tree reaches, and the
  // L1 copy, counted; the flags cleared where clusters are now shared.
  // Until both are on disk the flags disagree with the refcounts: the image
  // is marked dirty for that long.
  QCOW2FS_RETURN_IF_ERROR(SetDirtyBitLocked(true));
  if (Status added = AddTreeReferencesLocked(l1_, +1, "the active disk"); !added.ok()) {
    // Refused with every increment taken back: nothing to repair.
    if (added.code() == ErrorCode::kNoSpace) {
      QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
      QCOW2FS_RETURN_IF_ERROR(SetDirtyBitLocked(false));
    }
    return added;
  }
  std::vector<uint64_t> copy(l1_.size());
  uint64_t copy_offset = 0;
  if (!l1_.empty()) {
    const uint64_t clusters = (l1_.size() * 8 + cluster_size_ - 1) >> cluster_bits_;
    QCOW2FS_ASSIGN_OR_RETURN(copy_offset, AllocateClustersLocked(clusters));
    metadata_.AddRange(copy_offset >> cluster_bits_, clusters, MetadataMap::kSnapshotL1Table);
  }
  QCOW2FS_RETURN_IF_ERROR(SetCopiedFlagsLocked());
  std::vector<std::byte> raw(AlignUp(l1_.size() * 8, kSectorSize));
  for (size_t i = 0; i < l1_.size(); i++) {
    copy[i] = l1_[i] & ~kOflagCopied;
    StoreBe64(raw.data() + 8 * i, copy[i]);
    if (L1EntryL2Offset(copy[i]) != 0) {
      snapshot_l2_tables_.insert(L1EntryL2Offset(copy[i]) >> cluster_bits_);
    }
  }
  if (!raw.empty()) {
    QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(copy_offset, raw.size(), "snapshot L1 table",
                                               MetadataMap::kSnapshotL1Table));
    QCOW2FS_RETURN_IF_ERROR(
        file_->WriteAt(copy_offset, raw).Annotate("writing the snapshot's L1 table"));
  }
  // Refcounts, then the L2 tables and L1 entries with their new flags; the
  // extra references are leaks until the header names the snapshot.
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
  QCOW2FS_RETURN_IF_ERROR(SetDirtyBitLocked(false));
  QCOW2FS_SYNC_POINT("Snapshot:ReferencesCounted", 0);

  // 2. The snapshot table with the new entry; the header switch makes it
  // exist.
  uint64_t next_id = 1;
  for (const auto& s : snapshots_) {
    char* end = nullptr;
    const unsigned long long id = std::strtoull(s.id.c_str(), &end, 10);
    if (!s.id.empty() && end && *end == '\0' && id >= next_id) next_id = id + 1;
  }
  struct timespec now {};
  ::clock_gettime(CLOCK_REALTIME, &now);
  SnapshotEntry entry;
  entry.l1_table_offset = copy_offset;
  entry.l1_size = static_cast<uint32_t>(l1_.size());
  entry.id = std::to_string(next_id);
  entry.name = name;
  entry.date_sec = static_cast<uint32_t>(now.tv_sec);
  entry.date_nsec = static_cast<uint32_t>(now.tv_nsec);
  entry.disk_size = size();
  entry.extra_data = DiskOnlyExtraData(entry.disk_size);
  std::vector<SnapshotEntry> next = snapshots_;
  next.push_back(std::move(entry));
  return WriteSnapshotTableLocked(std::move(next));
}

Status Qcow2Image::DeleteSnapshot(const std::string& id_or_name) {
  QCOW2FS_RETURN_IF_ERROR(CheckSnapshotsPossible());
  LockExclusiveNoting(resize_lock_, "Snapshot:WaitingForWriters", 1);
  WriterLock writers(resize_lock_, kAdoptLock);
  if (compressed_cache_) QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Flush());
  WriterLock guard(discard_lock_);
  // Frees queued by earlier writes first: one of them may be the last
  // active reference to a table the snapshot shares, and must not meet the
  // snapshot's references gone.
  QCOW2FS_RETURN_IF_ERROR(ApplyDeferredFreesExclusive());
  MutexLock lk(meta_mutex_);
  const SnapshotEntry* found = FindSnapshotLocked(id_or_name);
  if (!found)
    return Status(ErrorCode::kNotFound, "no snapshot with ID or name '" + id_or_name + "'");
  const SnapshotEntry gone = *found;
  if (open_views_.count(gone.id)) {
    return Status(ErrorCode::kBusy, "snapshot '" + gone.name + "' is open");
  }
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
  QCOW2FS_ASSIGN_OR_RETURN(
      auto l1, ReadTableLocked(gone.l1_table_offset, gone.l1_size, "the snapshot's L1 table"));
  // 1. The table without it: from here on the snapshot does not exist.
  std::vector<SnapshotEntry> next;
  for (const auto& s : snapshots_) {
    if (s.id != gone.id) next.push_back(s);
  }
  QCOW2FS_RETURN_IF_ERROR(WriteSnapshotTableLocked(std::move(next)));
  QCOW2FS_SYNC_POINT("Snapshot:Unlisted", 0);

  // 2. Its references go; what nothing else uses is freed. Until the flags
  // follow (3.) they disagree with the refcounts: dirty for that long.
  QCOW2FS_RETURN_IF_ERROR(SetDirtyBitLocked(true));
  QCOW2FS_RETURN_IF_ERROR(RebuildSnapshotL2SetLocked());
  QCOW2FS_RETURN_IF_ERROR(AddTreeReferencesLocked(l1, -1, "snapshot '" + gone.name + "'"));
  if (gone.l1_size != 0) {
    const uint64_t first = gone.l1_table_offset >> cluster_bits_;
    const uint64_t last = (gone.l1_table_offset + uint64_t{gone.l1_size} * 8 - 1) >> cluster_bits_;
    for (uint64_t c = first; c <= last; c++) QCOW2FS_RETURN_IF_ERROR(ChangeReferenceLocked(c, -1));
  }
  // 3. Clusters the active disk now holds alone may be written in place.
  QCOW2FS_RETURN_IF_ERROR(SetCopiedFlagsLocked());
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
  return SetDirtyBitLocked(false);
}

Result<std::unique_ptr<Image>> Qcow2Image::OpenSnapshot(const std::string& id_or_name) {
  std::string id;
  {
    MutexLock lk(meta_mutex_);
    const SnapshotEntry* s = FindSnapshotLocked(id_or_name);
    if (!s) return Status(ErrorCode::kNotFound, "no snapshot with ID or name '" + id_or_name + "'");
    id = s->id;
    open_views_[id]++;
  }
  auto forget = [this, id] {
    MutexLock lk(meta_mutex_);
    if (--open_views_[id] == 0) open_views_.erase(id);
  };
  // A second read-only image of the same file (reopened through this
  // process's descriptor, so it is the same inode whatever happened to the
  // path). Its tables never change while the snapshot exists: clusters a
  // snapshot reaches have a refcount above 1, which the live disk copies
  // before it writes, and they are not freed until the snapshot is
  // deleted, which waits for this view to close. No locks: this image
  // holds them.
  auto file = OpenPosixFile("/proc/self/fd/" + std::to_string(file_->fd()), false);
  if (!file.ok()) {
    forget();
    return file.status().Annotate("reopening the image for snapshot '" + id_or_name + "'");
  }
  OpenOptions options;
  options.read_only = true;
  options.lock = false;
  options.snapshot = id;
  options.l2_cache_bytes = size_t{4} << 20;
  auto inner = OpenImageFile(std::move(file).value(), path_, options, HostFileOpener(false));
  if (!inner.ok()) {
    forget();
    return inner.status();
  }
  return std::unique_ptr<Image>(new SnapshotView(std::move(inner).value(), forget));
}

Status Qcow2Image::RevertToSnapshot(const std::string& id_or_name) {
  QCOW2FS_RETURN_IF_ERROR(CheckSnapshotsPossible());
  LockExclusiveNoting(resize_lock_, "Snapshot:WaitingForWriters", 2);
  WriterLock writers(resize_lock_, kAdoptLock);
  if (compressed_cache_) QCOW2FS_RETURN_IF_ERROR(compressed_cache_->Flush());
  WriterLock guard(discard_lock_);
  QCOW2FS_RETURN_IF_ERROR(ApplyDeferredFreesExclusive());
  MutexLock lk(meta_mutex_);
  const SnapshotEntry* found = FindSnapshotLocked(id_or_name);
  if (!found)
    return Status(ErrorCode::kNotFound, "no snapshot with ID or name '" + id_or_name + "'");
  const SnapshotEntry target = *found;
  if (uint64_t{target.l1_size} < header_.l1_entries_for(target.disk_size)) {
    return FenceCorruptLocked(
        Status(ErrorCode::kCorrupt,
               "snapshot '" + target.name + "' has an L1 table too small for its disk"));
  }
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
  QCOW2FS_ASSIGN_OR_RETURN(auto snap_l1, ReadTableLocked(target.l1_table_offset, target.l1_size,
                                                         "the snapshot's L1 table"));
  // 1. The snapshot's tree gains the active disk's reference, and the new
  // active L1 table is written to new clusters.
  QCOW2FS_RETURN_IF_ERROR(AddTreeReferencesLocked(snap_l1, +1, "snapshot '" + target.name + "'"));
  const uint64_t clusters =
      std::max<uint64_t>(1, (uint64_t{target.l1_size} * 8 + cluster_size_ - 1) >> cluster_bits_);
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t new_l1, AllocateClustersLocked(clusters));
  std::vector<std::byte> raw(
      AlignUp(std::max<uint64_t>(8, uint64_t{target.l1_size} * 8), kSectorSize));
  for (size_t i = 0; i < snap_l1.size(); i++)
    StoreBe64(raw.data() + 8 * i, snap_l1[i] & ~kOflagCopied);
  QCOW2FS_RETURN_IF_ERROR(CheckOverlapLocked(new_l1, raw.size(), "new L1 table"));
  QCOW2FS_RETURN_IF_ERROR(file_->WriteAt(new_l1, raw).Annotate("writing the new L1 table"));
  QCOW2FS_RETURN_IF_ERROR(WriteBackLocked());
  QCOW2FS_RETURN_IF_ERROR(file_->Sync());

  // 2. The header switch: the active disk is now the snapshot's.
  const std::vector<uint64_t> old_l1 = l1_;
  const uint64_t old_l1_offset = header_.l1_table_offset;
  const uint64_t old_l1_bytes = uint64_t{header_.l1_size} * 8;
  header_.l1_table_offset = new_l1;
  header_.l1_size = target.l1_size;
  header_.size = target.disk_size;
  QCOW2FS_RETURN_IF_ERROR(WriteHeaderLocked());
  QCOW2FS_RETURN_IF_ERROR(file_->Sync());
  l1_.assign(snap_l1.begin(), snap_l1.end());
  for (auto& e : l1_) e &= ~kOflagCopied;
  size_.store(target.disk_size);
  metadata_.AddRange(new_l1 >> cluster_bits_, clusters, MetadataMap::kL1Table);
  if (old_l1_bytes != 0) {
    for (uint64_t c = old_l1_offset >> cluster_bits_;
         c <= (old_l1_offset + old_l1_bytes - 1) >> cluster_bits_; c++) {
      metadata_.RemoveKind(c, MetadataMap::kL1Table);
      QCOW2FS_RETURN_IF_ERROR(ChangeReferenceLocked(c, -1));
    }
  }
  for (uint64_t entry : l1_) {
    if (L1EntryL2Offset(entry) != 0)
      metadata_.Add(L1EntryL2Offset(entry) >> cluster_bits_, MetadataMap::kL2Table);
  }

  // 3. The old active tree's references go, then the flags follow the
  // refcounts. No dirty bit is needed here: every cluster the new active
  // tree reaches is the snapshot's too, so its refcount stays at 2 or more
  // and the cleared flags agree with it at every step.
  QCOW2FS_RETURN_IF_ERROR(AddTreeReferencesLocked(old_l1, -1, "the previous active disk"));
  QCOW2FS_RETURN_IF_ERROR(SetCopiedFlagsLocked());
  return WriteBackLocked();
}

Status Image::ApplySnapshot(const std::string& path, const std::string& id_or_name) {
  OpenOptions options;
  options.read_only = false;
  QCOW2FS_ASSIGN_OR_RETURN(auto image, Image::Open(path, options));
  auto* qcow2 = dynamic_cast<Qcow2Image*>(image.get());
  if (!qcow2) return Status(ErrorCode::kUnsupported, path + " is not a qcow2 image");
  QCOW2FS_RETURN_IF_ERROR(qcow2->RevertToSnapshot(id_or_name));
  return image->Flush();
}

}  // namespace qcow2fs
