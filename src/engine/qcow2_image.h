// Qcow2Image: the qcow2 implementation of Image.
//
// Locks, in the order they are taken (ACQUIRED_BEFORE on the members, which
// a Clang build checks):
//   0. resize_lock_ (SharedMutex). Write, WriteZeroes and Discard hold the
//      shared side from their bounds check to their end; Resize and the
//      snapshot operations hold it exclusively, so the size never changes
//      under a request.
//   1. discard_lock_ (SharedMutex). Guest reads and writes hold the shared
//      side from the moment they look up a host offset until their data
//      I/O is done. Whatever drops a data cluster's refcount to zero holds
//      the exclusive side, so no host cluster is freed (and possibly
//      reused) while an in-flight request still uses it.
//   2. meta_mutex_ (Mutex). Guards all metadata in memory: the header, the
//      L1 table, the L2 cache, refcounts and allocation state. It is never
//      held across guest reads or writes; the L2 cache drops it while
//      loading a table. Metadata write-back and hole punches (freed
//      clusters, zeroed clusters of an external data file) run under it,
//      the punches with discard_lock_ held exclusively (docs/concurrency.md).
//   -  the compressed staging cache's own mutex (CompressedWriteCache::mu_)
//      comes after discard_lock_ (reads capture staged bytes under its
//      shared side, discard drops them under its exclusive side) and is
//      never held together with meta_mutex_: the cache drops it before
//      calling back into the image.
// See docs/concurrency.md for the whole design.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <unordered_set>
#include <vector>

#include <sys/types.h>

#include "base/mutex.h"
#include "base/thread_annotations.h"
#include "engine/compressed_write_cache.h"
#include "engine/image_open.h"
#include "engine/l2_cache.h"
#include "engine/metadata_map.h"
#include "engine/refcounts.h"
#include "format/header.h"
#include "format/snapshot_table.h"
#include "io/file.h"
#include "qcow2fs/image.h"

namespace qcow2fs {

// One piece of a guest range and where its bytes come from.
struct Extent {
  enum class Kind : uint8_t { kData, kZero, kBacking, kCompressed };
  Kind kind = Kind::kZero;
  uint64_t guest_offset = 0;
  uint64_t length = 0;
  uint64_t host_offset = 0;           // kData: first byte; kCompressed: descriptor offset
  uint64_t compressed_bytes = 0;      // kCompressed: bytes to read at host_offset
  uint64_t cluster_guest_offset = 0;  // kCompressed: guest offset of its cluster
};

class Qcow2Image final : public Image, private CompressedClusterSink {
 public:
  static Result<std::unique_ptr<Image>> Open(std::unique_ptr<File> file, const std::string& path,
                                             const OpenOptions& options, const FileOpener& opener,
                                             int chain_depth);
  ~Qcow2Image() override;

  uint64_t size() const override { return size_.load(std::memory_order_acquire); }
  bool read_only() const override { return read_only_; }
  ImageInfo info() const override EXCLUDES(meta_mutex_);
  // Adds a line to info().warnings; only before the image is shared with
  // other threads (the opener's note on a repaired dirty image).
  void AddWarning(std::string warning) { warnings_.push_back(std::move(warning)); }

  Status Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;
  Status Resize(uint64_t new_size) override;
  Status CreateSnapshot(const std::string& name) override;
  Status DeleteSnapshot(const std::string& id_or_name) override;
  Result<std::unique_ptr<Image>> OpenSnapshot(const std::string& id_or_name) override;
  // Makes the active disk the snapshot's (Image::ApplySnapshot; offline use).
  Status RevertToSnapshot(const std::string& id_or_name);
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t length) override;
  Result<BlockStatus> GetDataStatus(uint64_t offset, uint64_t length) override;
  uint64_t AllocatedBytes() const override;

 private:
  Qcow2Image() = default;

  // Open steps. They run before any other thread can see the image, with
  // meta_mutex_ held all the same (uncontended) so that the analysis checks
  // what they fill in.
  Status LoadMetadata(const OpenOptions& options, const FileOpener& opener, int chain_depth)
      EXCLUDES(meta_mutex_);
  Status OpenBacking(const OpenOptions& options, const FileOpener& opener, int chain_depth)
      REQUIRES(meta_mutex_);
  Status OpenDataFile(const OpenOptions& options, const FileOpener& opener,
                      const std::vector<std::pair<dev_t, ino_t>>& chain_files)
      REQUIRES(meta_mutex_);
  Status LoadL1(uint64_t offset, uint32_t entries) REQUIRES(meta_mutex_);

  // --- mapping (qcow2_map.cc) ---
  // Reads and validates one L2 table (the L2 cache's loader; it runs with
  // meta_mutex_ released).
  Status LoadL2Table(uint64_t offset, L2Table& table) EXCLUDES(meta_mutex_);
  // The one check of an L2 table offset taken from L1 entry `l1_index`
  // (non-zero): cluster aligned and a whole cluster inside the image file.
  // kCorrupt otherwise, naming `guest`, the offset being mapped. Reads only
  // what needs no lock (the file size only grows).
  Status CheckL2TableOffset(uint64_t l1_index, uint64_t l2_offset, uint64_t guest) const;
  // Maps [offset, end) into at most `max` extents, merging neighbours that
  // can be served by one I/O. Returns how many were produced (at least one
  // unless an error occurs). May drop meta_mutex_ while an L2 table loads.
  Result<size_t> MapLocked(uint64_t offset, uint64_t end, Extent* out, size_t max)
      REQUIRES(meta_mutex_);
  // The active L2 table for L1 index `l1_index`, allocated or copied away
  // from a shared one as needed. This and L2ForMappingLocked may drop
  // meta_mutex_ while an L2 table loads.
  Result<std::shared_ptr<L2Table>> L2ForWriteLocked(uint64_t l1_index) REQUIRES(meta_mutex_);
  // The L2 table L1 entry `l1_index` names (non-zero), checked with
  // CheckL2TableOffset; `guest` is the offset being mapped.
  Result<std::shared_ptr<L2Table>> L2ForMappingLocked(uint64_t l1_index, uint64_t guest)
      REQUIRES(meta_mutex_);

  // --- reading (qcow2_read.cc) ---
  Status ReadExtent(const Extent& e, std::byte* dst);
  Status ReadCompressed(const Extent& e, std::byte* dst);
  Status ReadBacking(uint64_t offset, std::span<std::byte> dst);
  std::string Where(uint64_t guest_offset) const;
  // L1 entries needed to map `virtual_size` bytes (Header::l1_entries_for,
  // from the fields fixed after open).
  uint64_t L1EntriesFor(uint64_t virtual_size) const {
    const uint64_t coverage = l2_entries_ << cluster_bits_;
    return (virtual_size + coverage - 1) / coverage;
  }

  // Reads the image without the compressed staging cache. ReadImageShared
  // is the same with discard_lock_ held shared by the caller.
  Status ReadImage(uint64_t offset, std::span<std::byte> buf) EXCLUDES(discard_lock_);
  Status ReadImageShared(uint64_t offset, std::span<std::byte> buf) REQUIRES_SHARED(discard_lock_)
      EXCLUDES(meta_mutex_);
  // Zeroing and discard: partial clusters get zeros written, whole
  // clusters lose their data (discard) or are marked zero. With
  // `drop_staged`, staged bytes of whole clusters are forgotten at the same
  // instant (compress mode; the cache's own commits pass false).
  Status ClearRange(uint64_t offset, uint64_t length, bool discard, bool may_unmap,
                    bool drop_staged) EXCLUDES(discard_lock_, meta_mutex_);

  // --- compressed writes (qcow2_compressed.cc) ---
  Status SetUpCompressedWrites(const OpenOptions& options) REQUIRES(meta_mutex_);
  // Routes a compress-mode write: clusters we own go in place, the rest to
  // the staging cache.
  Status WriteCompressMode(uint64_t offset, std::span<const std::byte> data);
  bool WritableInPlace(uint64_t offset, uint64_t end) EXCLUDES(meta_mutex_);
  Status ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) override;
  Status StoreSegment(std::span<const std::byte> data, std::span<const Placed> placed) override
      EXCLUDES(meta_mutex_);
  // StoreSegment's last step: points the L2 entries of `placed` into the
  // segment written at host offset `segment`.
  Status CommitSegmentLocked(std::span<const Placed> placed, uint64_t segment)
      REQUIRES(meta_mutex_);
  Status WriteUncompressedCluster(uint64_t guest_offset, std::span<const std::byte> data) override;
  bool CanZeroClusters() const override;
  Status ZeroCluster(uint64_t guest_offset) override;

  // --- writing (qcow2_write.cc, qcow2_zero.cc, qcow2_metadata.cc) ---
  Status PrepareForWriting() REQUIRES(meta_mutex_);
  Status CheckWritable(uint64_t offset, uint64_t length) const;
  // Guest data after CheckWritable: to the staging cache in compress mode,
  // else through WriteShared under discard_lock_ shared.
  Status WriteData(uint64_t offset, std::span<const std::byte> data)
      EXCLUDES(discard_lock_, meta_mutex_);
  // The write path proper; the caller holds discard_lock_ shared. Runs in
  // steps, each within one L2 table: plan, data, and for an allocating
  // step commit (docs/concurrency.md, "Allocating writes").
  Status WriteShared(uint64_t offset, std::span<const std::byte> data)
      REQUIRES_SHARED(discard_lock_) EXCLUDES(meta_mutex_);
  // One step of WriteShared, as planned (defined in qcow2_write.cc).
  struct WriteStep;
  // Plan: decides how guest bytes from `pos` (up to `end`) are written: in
  // place, or to clusters it allocates and marks in flight. Searches free
  // space only when it will allocate. Holds meta_mutex_ on entry and
  // return, but drops it to load an L2 table, to wait for an allocating
  // write of the same cluster and during the free-space search (it plans
  // again after those). The host offsets it returns are valid only while
  // the caller keeps discard_lock_ shared, through the data step.
  Status PlanWriteStepLocked(uint64_t pos, uint64_t end, WriteStep& step) REQUIRES(meta_mutex_)
      REQUIRES_SHARED(discard_lock_);
  // Data: writes the step's bytes (`bytes`: the guest bytes from step.pos
  // to step.run_end), with the old content around them for an allocating
  // step. Guest I/O, so never under meta_mutex_.
  Status WriteStepData(const WriteStep& step, std::span<const std::byte> bytes)
      REQUIRES_SHARED(discard_lock_) EXCLUDES(meta_mutex_);
  // Commit (allocating steps): clears the in-flight marks and wakes
  // waiters; if the data step succeeded (`io`), points the L2 entries at
  // the new clusters and drops the old references, else gives the new
  // clusters back and returns `io`.
  Status CommitWriteStepLocked(WriteStep& step, const Status& io) REQUIRES(meta_mutex_);
  // Writes zeros through the data path (partial clusters).
  Status WriteZeroBytes(uint64_t offset, uint64_t length);
  // Allocates `count` contiguous host clusters for metadata or data.
  Result<uint64_t> AllocateClustersLocked(uint64_t count) REQUIRES(meta_mutex_);
  // Before a step that allocates: moves the free-space search to a free
  // cluster a few refcount blocks at a time, releasing meta_mutex_ (held
  // on entry and on return) between steps so that reads and other
  // writers are not kept waiting while it crosses many full blocks. Fails
  // only when a refcount block cannot be read; finding no free cluster is
  // left to the allocation, so requests that allocate nothing go on.
  Status FindFreeSpaceLocked() REQUIRES(meta_mutex_);
  // Drops the image's reference to whatever the L2 entry pointed to; the
  // refcount is decremented at the next flush, after the new entry is on
  // disk (see docs/concurrency.md).
  // Refuses (fencing the image) to drop the reference of a compressed
  // entry whose sectors lie outside the clusters compressed data may use:
  // past the end of the file when its table was read, or on metadata.
  // Releasing it would free clusters that hold other data. `index` is the
  // entry's index in `table`, `guest` its guest offset (for the message).
  Status CheckReleasableLocked(const L2Table& table, uint64_t index, uint64_t word, uint64_t guest)
      REQUIRES(meta_mutex_);
  void ReleaseEntryLocked(uint64_t word) REQUIRES(meta_mutex_);
  void ReleaseClusterLocked(uint64_t host_offset) REQUIRES(meta_mutex_);
  // Queues host cluster `cluster` (an index) for a deferred free, and
  // marks the queue due once it holds MaxDeferredFrees() clusters.
  void DeferFreeLocked(uint64_t cluster) REQUIRES(meta_mutex_);
  // Clusters queued before the queue is applied without waiting for a
  // flush: 16 MiB worth, at least 64, so space freed by discards and
  // overwrites comes back while a program writes and never fsyncs.
  uint64_t MaxDeferredFrees() const;
  // Writes metadata back and applies the queued frees, when due. Takes the
  // discard lock exclusively: the caller holds neither it nor meta_mutex_.
  Status ApplyDeferredFreesIfDue() EXCLUDES(discard_lock_, meta_mutex_);
  // Empties the queue of deferred frees and returns it.
  std::vector<uint64_t> TakeDeferredFreesLocked() REQUIRES(meta_mutex_);
  // Makes whole clusters [first, first+count) read as zeros (zero flag or
  // deallocation). Caller holds discard_lock_ exclusively.
  Status ZeroClustersExclusive(uint64_t first_cluster, uint64_t count, bool discard, bool may_unmap)
      REQUIRES(discard_lock_) EXCLUDES(meta_mutex_);
  // Snapshots (qcow2_snapshot.cc). Callers hold meta_mutex_ for *Locked;
  // every one runs with resize_lock_ held exclusively (no guest writes).
  struct ClusterRun {
    uint64_t first = 0;
    uint64_t count = 0;
  };
  // The host clusters an L2 entry holds a reference on.
  ClusterRun ReferencedClusters(uint64_t word) const;
  // Reads `entries` big-endian words at `offset` (bounds-checked; fences
  // the image when they lie outside the file).
  Result<std::vector<uint64_t>> ReadTableLocked(uint64_t offset, uint64_t entries, const char* what)
      REQUIRES(meta_mutex_);
  // Calls `fn` for every host cluster the tree of L1 table `l1` reaches
  // (its L2 tables and what they map), once per reference, reading the
  // tables from the file (written back before).
  Status ForEachTreeClusterLocked(const std::vector<uint64_t>& l1, const std::string& whose,
                                  const std::function<Status(uint64_t)>& fn) REQUIRES(meta_mutex_);
  // The kNoSpace refusal for a cluster at the most references the refcount
  // width allows.
  Status RefcountFullLocked(uint64_t cluster) const REQUIRES(meta_mutex_);
  // Adds `delta` (+1 or -1) to the refcount of every cluster the tree
  // reaches, once per reference. +1 is all or nothing: when a refcount
  // would pass its maximum it fails with kNoSpace and every refcount is as
  // before.
  Status AddTreeReferencesLocked(const std::vector<uint64_t>& l1, int delta,
                                 const std::string& whose) REQUIRES(meta_mutex_);
  // Sets or clears the header's dirty bit, written and synced, around the
  // steps of a snapshot operation whose crash would leave OFLAG_COPIED
  // flags that disagree with refcounts: whoever next opens the image for
  // writing (qcow2fs or QEMU) then repairs it first. Set, it goes out after
  // everything written before; cleared, only after everything written
  // before is synced (the caller has written metadata back). Version 2 has
  // no dirty bit: a no-op there.
  Status SetDirtyBitLocked(bool dirty) REQUIRES(meta_mutex_);
  // One reference more or less; the last one going punches the cluster.
  // Dropping needs discard_lock_ held exclusively.
  Status ChangeReferenceLocked(uint64_t cluster, int delta) REQUIRES(meta_mutex_);
  // Sets OFLAG_COPIED in the active L1 and L2 entries exactly where the
  // refcount is 1. May drop meta_mutex_ while loading an L2 table.
  Status SetCopiedFlagsLocked() REQUIRES(meta_mutex_);
  // Writes `entries` as a new snapshot table, then the header pointing to
  // it (the commit point); the old table's clusters are freed later.
  Status WriteSnapshotTableLocked(std::vector<SnapshotEntry> entries) REQUIRES(meta_mutex_);
  // Writes metadata back and applies the queued frees. Caller holds
  // discard_lock_ exclusively, not meta_mutex_.
  Status ApplyDeferredFreesExclusive() REQUIRES(discard_lock_) EXCLUDES(meta_mutex_);
  Status RebuildSnapshotL2SetLocked() REQUIRES(meta_mutex_);
  Status CheckSnapshotsPossible() const;
  const SnapshotEntry* FindSnapshotLocked(const std::string& id_or_name) const
      REQUIRES(meta_mutex_);

  // Resize with resize_lock_ held exclusively.
  Status ResizeExclusive(uint64_t new_size) REQUIRES(resize_lock_)
      EXCLUDES(discard_lock_, meta_mutex_);
  // Writes dirty metadata in crash-safe order and syncs the image file.
  Status WriteBackLocked() REQUIRES(meta_mutex_);
  // Applies deferred refcount decrements whose L2 changes are on disk.
  // Caller holds discard_lock_ exclusively, not meta_mutex_.
  Status FreeClustersExclusive(std::vector<uint64_t> clusters) REQUIRES(discard_lock_)
      EXCLUDES(meta_mutex_);
  Status WriteHeaderLocked() REQUIRES(meta_mutex_);
  // Refuses a write of `length` bytes at host `offset` that would land on
  // metadata other than `own` (the kinds the writer itself is allowed to
  // write there; 0 for guest data and new clusters): fences the image and
  // returns kCorrupt naming the structures.
  Status CheckOverlapLocked(uint64_t offset, uint64_t length, const char* what, uint8_t own = 0)
      REQUIRES(meta_mutex_);
  // The same for guest data about to be written in place at `host` (for
  // guest offset `guest`); free of cost for images with a data file.
  Status CheckGuestWriteLocked(uint64_t host, uint64_t length, uint64_t guest)
      REQUIRES(meta_mutex_);
  // Fills metadata_ from the tables (writable images, at open).
  Status BuildMetadataMap() REQUIRES(meta_mutex_);
  // Marks the image corrupt on disk and stops all writes. The corrupt bit
  // is a header change, written with the rest of the header: under
  // meta_mutex_.
  Status FenceCorruptLocked(const Status& cause) REQUIRES(meta_mutex_);

  // Fixed after open.
  std::string path_;
  std::unique_ptr<File> file_;
  std::unique_ptr<File> owned_data_file_;
  File* data_file_ = nullptr;  // file_ or owned_data_file_
  std::unique_ptr<Image> backing_;
  std::string backing_resolved_;
  std::vector<std::string> warnings_;
  bool read_only_ = true;
  CompressionType compression_ = CompressionType::kZlib;
  uint32_t cluster_bits_ = 16;
  uint64_t cluster_size_ = 65536;
  uint64_t l2_entries_ = 8192;
  uint32_t subcluster_bits_ = 16;  // cluster_bits_ - 5 with extended L2
  bool extended_l2_ = false;
  // Header fields that never change while the image is open, copied out of
  // header_ so that paths without meta_mutex_ can read them.
  uint32_t version_ = 3;
  bool has_data_file_ = false;
  uint32_t refcount_order_ = 4;

  std::atomic<uint64_t> size_{0};  // virtual size; changes only on Resize
  // Length of the image file, for bounds checks of metadata. Only grows
  // while the image is open, so a stale read errs on the safe side.
  std::atomic<uint64_t> file_size_{0};

  // The lock order is written on the locks; see the top of this file.
  SharedMutex resize_lock_ ACQUIRED_BEFORE(discard_lock_);
  mutable SharedMutex discard_lock_ ACQUIRED_BEFORE(meta_mutex_);
  mutable Mutex meta_mutex_;
  // The header as on disk, or as the next write-back will write it:
  // snapshots, resize, a moved refcount table and the corrupt bit change it.
  Header header_ GUARDED_BY(meta_mutex_);
  std::vector<uint64_t> l1_ GUARDED_BY(meta_mutex_);
  // The cache and the refcounts are not thread-safe themselves: every call
  // into them is made with meta_mutex_ held, which PT_GUARDED_BY checks.
  std::unique_ptr<L2Cache> l2_cache_ PT_GUARDED_BY(meta_mutex_);
  std::unique_ptr<Refcounts> refcounts_ PT_GUARDED_BY(meta_mutex_);
  MetadataMap metadata_ GUARDED_BY(meta_mutex_);
  // L2 tables (cluster indexes) some snapshot's L1 table names: they stay
  // metadata when the active L1 copies away from them.
  std::unordered_set<uint64_t> snapshot_l2_tables_ GUARDED_BY(meta_mutex_);
  std::set<uint64_t> l1_dirty_ GUARDED_BY(meta_mutex_);
  bool header_dirty_ GUARDED_BY(meta_mutex_) = false;
  // Host clusters whose refcount drops by one at the next flush, once the
  // L2/L1 changes that removed the reference are on disk.
  std::vector<uint64_t> pending_frees_ GUARDED_BY(meta_mutex_);
  // pending_frees_ has reached MaxDeferredFrees(). Set under meta_mutex_;
  // read without it as a hint (the applier checks again under the lock).
  std::atomic<bool> frees_due_{false};
  // Guest clusters with an allocating write between mapping and L2 update;
  // a second allocating writer waits on inflight_done_ (with meta_mutex_).
  std::unordered_set<uint64_t> inflight_ GUARDED_BY(meta_mutex_);
  CondVar inflight_done_;
  // Set once corruption is found at run time; read without a lock because
  // it only ever goes from false to true and fences writes.
  std::atomic<bool> fenced_{false};
  // The snapshot table as on disk; changed only by snapshot operations.
  std::vector<SnapshotEntry> snapshots_ GUARDED_BY(meta_mutex_);
  uint64_t snapshot_table_bytes_ GUARDED_BY(meta_mutex_) = 0;
  // Snapshot views alive (OpenSnapshot), by snapshot ID: such a snapshot
  // is not deleted.
  std::map<std::string, int> open_views_ GUARDED_BY(meta_mutex_);
  // Present when opened with OpenOptions::compress; thread-safe itself.
  std::unique_ptr<CompressedWriteCache> compressed_cache_;
};

}  // namespace qcow2fs
