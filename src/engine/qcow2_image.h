// Qcow2Image: the qcow2 implementation of Image.
//
// Locks, in the order they are taken:
//   0. resize_lock_ (std::shared_mutex). Write, WriteZeroes and Discard
//      hold the shared side from their bounds check to their end; Resize
//      holds it exclusively, so the size never changes under a request.
//   1. discard_lock_ (std::shared_mutex). Guest reads and writes hold the
//      shared side from the moment they look up a host offset until their
//      data I/O is done. Whatever drops a data cluster's refcount to zero
//      holds the exclusive side, so no host cluster is freed (and possibly
//      reused) while an in-flight request still uses it.
//   2. meta_mutex_ (std::mutex). Guards all metadata in memory: the L1
//      table, the L2 cache, refcounts and allocation state. It is never held
//      across data I/O; the L2 cache drops it while loading a table.
// See docs/concurrency.md for the whole design.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <set>
#include <unordered_set>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include <sys/types.h>

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
  uint64_t host_offset = 0;      // kData: first byte; kCompressed: descriptor offset
  uint64_t compressed_bytes = 0;  // kCompressed: bytes to read at host_offset
  uint64_t cluster_guest_offset = 0;  // kCompressed: guest offset of its cluster
};

class Qcow2Image final : public Image, private CompressedClusterSink {
 public:
  static Result<std::unique_ptr<Image>> Open(std::unique_ptr<File> file,
                                             const std::string& path,
                                             const OpenOptions& options,
                                             const FileOpener& opener,
                                             int chain_depth);
  ~Qcow2Image() override;

  uint64_t size() const override { return size_.load(std::memory_order_acquire); }
  bool read_only() const override { return read_only_; }
  ImageInfo info() const override;
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

  Status LoadMetadata(const OpenOptions& options, const FileOpener& opener,
                      int chain_depth);
  Status OpenBacking(const OpenOptions& options, const FileOpener& opener,
                     int chain_depth);
  Status OpenDataFile(const OpenOptions& options, const FileOpener& opener,
                      const std::vector<std::pair<dev_t, ino_t>>& chain_files);
  Status LoadL1(uint64_t offset, uint32_t entries);

  // Reads and validates one L2 table (the L2 cache's loader).
  Status LoadL2Table(uint64_t offset, L2Table& table);
  // Maps [offset, end) into at most `max` extents, merging neighbours that
  // can be served by one I/O. Returns how many were produced (at least one
  // unless an error occurs). Caller holds meta_mutex_ via `lk`.
  Result<size_t> MapLocked(std::unique_lock<std::mutex>& lk, uint64_t offset,
                           uint64_t end, Extent* out, size_t max);
  Status ReadExtent(const Extent& e, std::byte* dst);
  Status ReadCompressed(const Extent& e, std::byte* dst);
  Status ReadBacking(uint64_t offset, std::span<std::byte> dst);
  std::string Where(uint64_t guest_offset) const;

  // Reads the image without the compressed staging cache. ReadImageShared
  // is the same with discard_lock_ held shared by the caller.
  Status ReadImage(uint64_t offset, std::span<std::byte> buf);
  Status ReadImageShared(uint64_t offset, std::span<std::byte> buf);
  // Zeroing and discard: partial clusters get zeros written, whole
  // clusters lose their data (discard) or are marked zero. With
  // `drop_staged`, staged bytes of whole clusters are forgotten at the same
  // instant (compress mode; the cache's own commits pass false).
  Status ClearRange(uint64_t offset, uint64_t length, bool discard, bool may_unmap,
                    bool drop_staged);

  // --- compressed writes (qcow2_compressed.cc) ---
  Status SetUpCompressedWrites(const OpenOptions& options);
  // Routes a compress-mode write: clusters we own go in place, the rest to
  // the staging cache.
  Status WriteCompressMode(uint64_t offset, std::span<const std::byte> data);
  bool WritableInPlace(uint64_t offset, uint64_t end);
  Status ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) override;
  Result<uint64_t> AllocateSegment(uint64_t count) override;
  Status WriteSegment(uint64_t host_offset, std::span<const std::byte> data) override;
  Status CommitSegment(const std::vector<Placed>& placed, uint64_t segment_offset,
                       uint64_t count) override;
  void ReleaseSegment(uint64_t segment_offset, uint64_t count) override;
  Status WriteUncompressedCluster(uint64_t guest_offset,
                                  std::span<const std::byte> data) override;
  Status ZeroCluster(uint64_t guest_offset) override;
  uint64_t MaxCompressedPerHostCluster() const override;

  // --- writing (qcow2_write.cc, qcow2_zero.cc, qcow2_metadata.cc) ---
  Status PrepareForWriting();
  Status CheckWritable(uint64_t offset, uint64_t length) const;
  // Guest data after CheckWritable: to the staging cache in compress mode,
  // else through WriteShared under discard_lock_ shared.
  Status WriteData(uint64_t offset, std::span<const std::byte> data);
  // The write path proper; the caller holds discard_lock_ shared.
  Status WriteShared(uint64_t offset, std::span<const std::byte> data);
  // Writes zeros through the data path (partial clusters).
  Status WriteZeroBytes(uint64_t offset, uint64_t length);
  // The active L2 table for L1 index `l1_index`, allocated or copied away
  // from a shared one as needed.
  Result<std::shared_ptr<L2Table>> L2ForWriteLocked(
      std::unique_lock<std::mutex>& lk, uint64_t l1_index);
  Result<std::shared_ptr<L2Table>> L2ForMappingLocked(
      std::unique_lock<std::mutex>& lk, uint64_t l1_index, uint64_t guest);
  // Allocates `count` contiguous host clusters for metadata or data.
  Result<uint64_t> AllocateClustersLocked(uint64_t count);
  // Before a step that may allocate: moves the free-space search to a free
  // cluster a few refcount blocks at a time, releasing meta_mutex_ (held
  // via `lk` on entry and on return) between steps so that reads and other
  // writers are not kept waiting while it crosses many full blocks. Fails
  // only when a refcount block cannot be read; finding no free cluster is
  // left to the allocation, so requests that allocate nothing go on.
  Status FindFreeSpaceLocked(std::unique_lock<std::mutex>& lk);
  // Drops the image's reference to whatever the L2 entry pointed to; the
  // refcount is decremented at the next flush, after the new entry is on
  // disk (see docs/concurrency.md).
  // Refuses (fencing the image) to drop the reference of a compressed
  // entry whose sectors lie outside the clusters compressed data may use:
  // past the end of the file when its table was read, or on metadata.
  // Releasing it would free clusters that hold other data. `index` is the
  // entry's index in `table`, `guest` its guest offset (for the message).
  Status CheckReleasableLocked(const L2Table& table, uint64_t index, uint64_t word,
                               uint64_t guest);
  void ReleaseEntryLocked(uint64_t word);
  void ReleaseClusterLocked(uint64_t host_offset);
  // Queues host cluster `cluster` (an index) for a deferred free, and
  // marks the queue due once it holds MaxDeferredFrees() clusters.
  void DeferFreeLocked(uint64_t cluster);
  // Clusters queued before the queue is applied without waiting for a
  // flush: 16 MiB worth, at least 64, so space freed by discards and
  // overwrites comes back while a program writes and never fsyncs.
  uint64_t MaxDeferredFrees() const;
  // Writes metadata back and applies the queued frees, when due. Takes the
  // discard lock exclusively: the caller holds neither it nor meta_mutex_.
  Status ApplyDeferredFreesIfDue();
  // Empties the queue of deferred frees and returns it.
  std::vector<uint64_t> TakeDeferredFreesLocked();
  // Makes whole clusters [first, first+count) read as zeros (zero flag or
  // deallocation). Caller holds discard_lock_ exclusively.
  Status ZeroClustersExclusive(uint64_t first_cluster, uint64_t count,
                               bool discard, bool may_unmap);
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
  Result<std::vector<uint64_t>> ReadTableLocked(uint64_t offset, uint64_t entries,
                                                const char* what);
  // Calls `fn` for every host cluster the tree of L1 table `l1` reaches
  // (its L2 tables and what they map), once per reference, reading the
  // tables from the file (written back before).
  Status ForEachTreeClusterLocked(const std::vector<uint64_t>& l1, const std::string& whose,
                                  const std::function<Status(uint64_t)>& fn);
  // Adds `delta` (+1 or -1) to the refcount of every cluster the tree
  // reaches; +1 fails with kNoSpace, changing nothing, when a refcount is
  // at its maximum.
  Status AddTreeReferencesLocked(const std::vector<uint64_t>& l1, int delta,
                                 const std::string& whose);
  // One reference more or less; the last one going punches the cluster.
  // Dropping needs discard_lock_ held exclusively.
  Status ChangeReferenceLocked(uint64_t cluster, int delta);
  // Sets OFLAG_COPIED in the active L1 and L2 entries exactly where the
  // refcount is 1. May drop meta_mutex_ while loading an L2 table.
  Status SetCopiedFlagsLocked(std::unique_lock<std::mutex>& lk);
  // Writes `entries` as a new snapshot table, then the header pointing to
  // it (the commit point); the old table's clusters are freed later.
  Status WriteSnapshotTableLocked(std::vector<SnapshotEntry> entries);
  // Writes metadata back and applies the queued frees. Caller holds
  // discard_lock_ exclusively, not meta_mutex_.
  Status ApplyDeferredFreesExclusive();
  Status RebuildSnapshotL2SetLocked();
  Status CheckSnapshotsPossible() const;
  const SnapshotEntry* FindSnapshotLocked(const std::string& id_or_name) const;

  // Resize with resize_lock_ held exclusively.
  Status ResizeExclusive(uint64_t new_size);
  // Writes dirty metadata in crash-safe order and syncs the image file.
  Status WriteBackLocked();
  // Applies deferred refcount decrements whose L2 changes are on disk.
  Status FreeClustersExclusive(std::vector<uint64_t> clusters);
  Status WriteHeaderLocked();
  // Refuses a write of `length` bytes at host `offset` that would land on
  // metadata other than `own` (the kinds the writer itself is allowed to
  // write there; 0 for guest data and new clusters): fences the image and
  // returns kCorrupt naming the structures.
  Status CheckOverlapLocked(uint64_t offset, uint64_t length, const char* what,
                            uint8_t own = 0);
  // The same for guest data about to be written in place at `host` (for
  // guest offset `guest`); free of cost for images with a data file.
  Status CheckGuestWriteLocked(uint64_t host, uint64_t length, uint64_t guest);
  // Fills metadata_ from the tables (writable images, at open).
  Status BuildMetadataMap();
  // Marks the image corrupt on disk and stops all writes.
  Status FenceCorrupt(const Status& cause);

  // Fixed after open.
  std::string path_;
  Header header_;
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

  std::atomic<uint64_t> size_{0};  // virtual size; changes only on Resize
  // Length of the image file, for bounds checks of metadata. Only grows
  // while the image is open, so a stale read errs on the safe side.
  std::atomic<uint64_t> file_size_{0};

  std::shared_mutex resize_lock_;
  mutable std::shared_mutex discard_lock_;
  mutable std::mutex meta_mutex_;
  std::vector<uint64_t> l1_;  // guarded by meta_mutex_
  std::unique_ptr<L2Cache> l2_cache_;  // guarded by meta_mutex_
  std::unique_ptr<Refcounts> refcounts_;  // guarded by meta_mutex_
  MetadataMap metadata_;                  // guarded by meta_mutex_
  // L2 tables (cluster indexes) some snapshot's L1 table names: they stay
  // metadata when the active L1 copies away from them.
  std::unordered_set<uint64_t> snapshot_l2_tables_;  // guarded by meta_mutex_
  std::set<uint64_t> l1_dirty_;           // guarded by meta_mutex_
  bool header_dirty_ = false;             // guarded by meta_mutex_
  // Host clusters whose refcount drops by one at the next flush, once the
  // L2/L1 changes that removed the reference are on disk.
  std::vector<uint64_t> pending_frees_;   // guarded by meta_mutex_
  // pending_frees_ has reached MaxDeferredFrees(). Set under meta_mutex_;
  // read without it as a hint (the applier checks again under the lock).
  std::atomic<bool> frees_due_{false};
  // Guest clusters with an allocating write between mapping and L2 update;
  // a second allocating writer waits on inflight_done_.
  std::unordered_set<uint64_t> inflight_;  // guarded by meta_mutex_
  std::condition_variable inflight_done_;
  // Set once corruption is found at run time; read without a lock because
  // it only ever goes from false to true and fences writes.
  std::atomic<bool> fenced_{false};
  // The snapshot table as on disk; changed only by snapshot operations.
  std::vector<SnapshotEntry> snapshots_;  // guarded by meta_mutex_
  uint64_t snapshot_table_bytes_ = 0;     // guarded by meta_mutex_
  // Snapshot views alive (OpenSnapshot), by snapshot ID: such a snapshot
  // is not deleted.
  std::map<std::string, int> open_views_;  // guarded by meta_mutex_
  // Present when opened with OpenOptions::compress; thread-safe itself.
  std::unique_ptr<CompressedWriteCache> compressed_cache_;
};

}  // namespace qcow2fs
