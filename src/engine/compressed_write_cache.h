// CompressedWriteCache: the staging cache that turns small, unaligned,
// out-of-order guest writes into compressed clusters, packed densely into
// host clusters that are written once each.
//
// Life of a guest cluster:
//   filling     writes land in its staging buffer (one cluster of memory and
//               a map of which bytes are valid);
//   compressing once every byte is known (or Flush()/memory pressure forces
//               it, filling the unknown bytes from the image's current
//               content) it is compressed on the calling thread; FUSE
//               requests run on the daemon's TBB pool, so compression is
//               parallel across requests;
//   packed      its compressed bytes sit in the current *segment*: up to
//               8 MiB of memory standing for contiguous host clusters,
//               filled byte by byte as QEMU packs them (a compressed cluster
//               may straddle two host clusters);
//   committed   when the segment is full (or at Flush()) the cache hands it
//               to the image (StoreSegment), which allocates exactly the
//               host clusters it fills, writes it with one host write, and
//               only then points the L2 entries into it. The staging entry
//               goes away at that moment.
// A cluster that does not compress is written as a normal cluster, an
// all-zero one becomes a zero cluster where the image has them.
//
// Threading: every method may be called from any thread. One mutex (mu_)
// guards the staging map and the segment; compression and host I/O run
// outside it, and so does every call into the sink, which takes the image's
// locks. The image calls in with its discard lock held (reads capture staged
// bytes under its shared side, DropStaged runs under its exclusive side),
// never with its metadata mutex held: mu_ comes after the discard lock.
// A writer that finds a cluster past "filling" waits for it to be committed
// (forcing the segment out if needed); a writer that finds the cache full
// first commits the oldest incomplete clusters itself, then waits for
// memory, so it always makes progress.
//
// Ownership: Write() copies the caller's bytes; Overlay() copies staged
// bytes into the caller's buffer; no buffer is retained past a call.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/mutex.h"
#include "base/thread_annotations.h"
#include "qcow2fs/aligned_buffer.h"
#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

// What the cache needs from the image; implemented by Qcow2Image. A
// cluster on its way to the image takes at most two calls: a fill, if some
// of its bytes were never written, then one store (its share of one
// StoreSegment, or a WriteUncompressedCluster or ZeroCluster).
class CompressedClusterSink {
 public:
  virtual ~CompressedClusterSink() = default;
  // The image's current content of one guest cluster, without staging.
  virtual Status ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) = 0;
  // A compressed cluster packed into a segment.
  struct Placed {
    uint64_t guest_offset;
    uint64_t offset;  // of its first byte, from the start of the segment
    uint64_t bytes;
  };
  // Stores a sealed segment, in the order crash safety needs: allocates
  // exactly the host clusters `data` spans (AlignUp(data.size(), cluster
  // size) of them, each holding compressed data; refcount 1 each, the
  // segment's own hold), writes `data` there with one host write, then
  // points the L2 entry of every placed cluster at its bytes (counting a
  // reference on each host cluster they touch) and drops the hold.
  // On failure the caller keeps the clusters staged: a segment that could
  // not be written has its hold dropped and nothing points into it; after
  // a failed commit some entries may point into it already, with the same
  // bytes the cache still stages.
  virtual Status StoreSegment(std::span<const std::byte> data, std::span<const Placed> placed) = 0;
  // Stores a cluster that did not compress.
  virtual Status WriteUncompressedCluster(uint64_t guest_offset,
                                          std::span<const std::byte> data) = 0;
  // Whether the image can make a cluster read as zeros by changing only its
  // L2 entry (a zero flag, or no mapping with nothing beneath). A version 2
  // image over a backing file cannot: it would have to write the zeros, so
  // the cache compresses an all-zero cluster there like any other data.
  virtual bool CanZeroClusters() const = 0;
  // Stores an all-zero cluster as a zero cluster; only called when
  // CanZeroClusters().
  virtual Status ZeroCluster(uint64_t guest_offset) = 0;
};

class CompressedWriteCache {
 public:
  using Executor = std::function<void(std::function<void()>)>;
  // `max_per_host_cluster`: how many compressed clusters one host cluster
  // may hold (each adds one to its refcount: the refcount width's limit,
  // less the segment's own hold). With an executor, completed clusters are
  // compressed and stored there and Write() returns as soon as the data is
  // staged; without, on the writer.
  CompressedWriteCache(CompressedClusterSink& sink, CompressionType type, uint64_t cluster_size,
                       uint64_t max_per_host_cluster, uint64_t disk_size, size_t max_bytes,
                       Executor executor = {});
  ~CompressedWriteCache();

  // Stages `data` at guest `offset` (any size and alignment).
  Status Write(uint64_t offset, std::span<const std::byte> data) EXCLUDES(mu_);
  // Readers take a snapshot of the staged bytes overlapping their range
  // *before* reading the image, and apply it over what they read: a cluster
  // committed in between is then right either way (the image has it, and the
  // snapshot has the same bytes).
  struct Snapshot {
    struct Piece {
      uint64_t offset;
      std::vector<std::byte> bytes;
    };
    std::vector<Piece> pieces;
  };
  Snapshot Capture(uint64_t offset, uint64_t length) const EXCLUDES(mu_);
  static void Apply(const Snapshot& snapshot, uint64_t offset, std::span<std::byte> buf);
  // Guest offset of the first staged cluster overlapping [offset, end).
  std::optional<uint64_t> FirstStaged(uint64_t offset, uint64_t end) const EXCLUDES(mu_);
  // Direct writes in compress mode (a cluster that is a normal cluster of
  // the image is overwritten in place). BeginDirectWrite admits one unless
  // the cluster is staged (then the caller stages instead, on top of the
  // staged bytes, which are newer than the image's). While a direct write
  // is admitted, nothing is staged for its cluster: a staged cluster is
  // filled from the image, and must not read a write half done. Every
  // admitted write ends with EndDirectWrite.
  bool BeginDirectWrite(uint64_t cluster_index) EXCLUDES(mu_);
  void EndDirectWrite(uint64_t cluster_index) EXCLUDES(mu_);
  // Discard and zeroing of whole clusters. SettleRange waits until no
  // cluster in the range is being compressed or committed. DropStaged then
  // forgets the staged bytes of the range, with the image's discard lock
  // held exclusively by the caller, so that no reader sees the staged bytes
  // gone before the clusters read as zeros; it returns false, changing
  // nothing, if a cluster got past filling meanwhile (settle again).
  // Partial clusters need neither: zeros written to them are staged over
  // the staged bytes like any write.
  Status SettleRange(uint64_t offset, uint64_t length) EXCLUDES(mu_);
  bool DropStaged(uint64_t offset, uint64_t length) EXCLUDES(mu_);
  // Commits everything staged. On return all data written before the call
  // is in the image (not yet synced).
  Status Flush() EXCLUDES(mu_);
  // The disk grew or shrank.
  void set_disk_size(uint64_t size) EXCLUDES(mu_);
  size_t staged_bytes() const EXCLUDES(mu_);

 private:
  enum class State { kFilling, kCompressing, kPacked };
  // An Entry belongs to entries_ and is guarded by mu_ like it, except that
  // while it is kCompressing the thread preparing it reads its data without
  // the lock (nobody else changes an entry in that state).
  struct Entry {
    uint64_t guest_offset;
    State state = State::kFilling;
    std::vector<std::byte> data;  // one cluster
    std::vector<uint64_t> valid;  // one bit per byte of data
    uint64_t valid_bytes = 0;
    std::list<uint64_t>::iterator lru;
  };
  // Compressed clusters packed back to back, in memory until sealed; the
  // sink allocates its host clusters then.
  struct Segment {
    AlignedBuffer data;  // empty: no segment open
    uint64_t used = 0;
    std::vector<uint64_t> users;  // compressed clusters touching each host cluster
    std::vector<CompressedClusterSink::Placed> placed;
  };

  // What compression decided for one cluster.
  struct Prepared {
    enum class Action { kCompressed, kUncompressed, kZero } action;
    std::vector<std::byte> compressed;
  };

  bool IsComplete(const Entry& e) const { return e.valid_bytes == cluster_size_; }
  void MarkValid(Entry& e, uint64_t from, uint64_t to);
  bool IsValid(const Entry& e, uint64_t at) const { return (e.valid[at / 64] >> (at % 64)) & 1; }
  // A cluster on its way from filling to the image. `filled` is a private
  // copy when bytes must be filled in from the image (readers may be
  // copying the entry's data meanwhile); empty when the entry is complete.
  struct Job {
    Entry* entry;
    std::vector<std::byte> filled;
  };
  // With the lock: moves a filling entry to kCompressing.
  Job Start(Entry& e) REQUIRES(mu_);
  // Puts an entry whose commit failed back to filling, for a later retry.
  void Requeue(Entry& e) REQUIRES(mu_);
  // After a store: the entry of cluster `index` leaves the cache, or, if
  // the store failed, goes back to filling (a later flush retries it).
  void Settle(uint64_t index, const Status& stored) REQUIRES(mu_);
  // Without the lock: fills unknown bytes from the image, then compresses.
  // Entries in kCompressing are not modified by anyone else.
  Result<Prepared> Prepare(Job& job) EXCLUDES(mu_);
  // The methods below that hold mu_ drop it for a while (for compression,
  // for calls into the sink, or to wait) and hold it again on return.
  // The one way a job goes: Prepare with the lock dropped, then Place, or
  // Requeue if Prepare failed.
  Status CompressAndPlace(Job& job) REQUIRES(mu_);
  // With the lock: stores the prepared cluster (packs it into the segment,
  // or writes it uncompressed/zero with the lock dropped).
  Status Place(Job& job, Prepared prepared) REQUIRES(mu_);
  // Takes a filling entry through Start and CompressAndPlace.
  Status Finish(Entry& e) REQUIRES(mu_);
  // Hands a complete entry to the executor (or finishes it inline).
  Status Complete(Entry& e) REQUIRES(mu_);
  // Runs on the executor: CompressAndPlace one job.
  void RunJob(Job job) EXCLUDES(mu_);
  // The filling entry of cluster `index`, made if there is none. It waits
  // for a commit or a direct write of the cluster, or makes room, first.
  Result<Entry*> FillingEntry(uint64_t index) REQUIRES(mu_);
  // Reserves n bytes in the current segment; false if there is no room.
  bool TryPack(uint64_t n, uint64_t* at) REQUIRES(mu_);
  // Has the sink store the current segment.
  Status SealSegment() REQUIRES(mu_);
  Status MakeRoom() REQUIRES(mu_);
  // Makes progress towards committing an entry past kFilling (sealing the
  // segment it waits in, or waiting for the thread handling it); the caller
  // looks the entry up again afterwards.
  Status WaitForCommit(const Entry& e) REQUIRES(mu_);
  void Erase(uint64_t cluster_index) REQUIRES(mu_);
  // Whether cluster `index` holds bytes of [offset, end).
  bool Overlaps(uint64_t index, uint64_t offset, uint64_t end) const {
    const uint64_t start = index << cluster_bits_;
    return start < end && start + cluster_size_ > offset;
  }

  CompressedClusterSink& sink_;
  const CompressionType type_;
  const uint64_t cluster_size_;
  const uint32_t cluster_bits_;
  const size_t max_entries_;
  const uint64_t max_users_;
  const uint64_t segment_clusters_;

  mutable Mutex mu_;
  CondVar changed_;  // an entry was committed or erased
  uint64_t disk_size_ GUARDED_BY(mu_);
  // By cluster index.
  std::unordered_map<uint64_t, std::unique_ptr<Entry>> entries_ GUARDED_BY(mu_);
  // Direct writes in progress, by cluster index (see BeginDirectWrite).
  std::unordered_map<uint64_t, uint32_t> direct_writers_ GUARDED_BY(mu_);
  std::list<uint64_t> lru_ GUARDED_BY(mu_);  // filling entries, oldest first
  Segment segment_ GUARDED_BY(mu_);
  // A sealed segment's buffer, for the next one.
  AlignedBuffer spare_segment_ GUARDED_BY(mu_);
  bool sealing_ GUARDED_BY(mu_) = false;  // a thread is writing out a segment
  const Executor executor_;
  // Handed to the executor, not yet placed.
  size_t background_jobs_ GUARDED_BY(mu_) = 0;
};

}  // namespace qcow2fs
