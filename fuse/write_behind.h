// WriteBehind: large writes complete to the kernel as soon as their data is
// copied and queued; background threads then apply them to the image.
//
// Why: FUSE serves a write in series. The kernel copies the request into the
// daemon, the daemon writes the host file, then replies; the disk idles
// during the copy and the next copy waits for the disk. With one request in
// flight (dd, cp, a file system's writeback through a loop device) that
// costs about a fifth of the disk's speed. Queuing overlaps the two, as the
// kernel's page cache does for a local file, while the host I/O itself can
// stay O_DIRECT.
//
// Semantics, those of a disk's volatile write cache:
//   - A queued write is visible to every later request: the file system
//     waits for queued writes overlapping a read, a write, a hole punch or a
//     block-status query before running it (WaitFor), so requests to the
//     same bytes reach the image in the order the kernel sent them.
//   - Host space is reserved before a write is queued (see SpaceBank): a
//     write the host has no room for is not queued (Submit() returns false)
//     and the caller applies it at once, so ENOSPC reaches that writer, as
//     a local file system reports it at write(2).
//   - Drain() (FLUSH at close, fsync, unmount) returns once everything
//     queued before it is in the image. A write that fails in the
//     background with ENOSPC is retried once after the bank gave back what
//     it held for it; a write that still fails is logged, and its error is
//     returned by the next Drain(): a writer learns of it at close or fsync,
//     as NFS reports write-back errors.
//   - Memory is bounded: Submit() waits while `max_bytes` are queued.
//
// Threading: all methods are thread-safe. Buffers: Submit() copies the
// caller's bytes into a page-aligned buffer of its own (reused, never
// allocated per request), so the caller may reuse its buffer on return.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "mutex.h"
#include "qcow2fs/aligned_buffer.h"
#include "qcow2fs/status.h"
#include "thread_annotations.h"

namespace qcow2fs::fusefs {

// SpaceBank: host file system space held for queued writes, so that a write
// is only acknowledged once the space it may need is known to be there.
//
// The bank is an unnamed file (O_TMPFILE) on the host file system that
// receives the image's new clusters, grown with fallocate(2) to hold what
// the queued writes could need: for each, the clusters it spans plus two
// for metadata (an L2 table, a refcount block). On top, a floor of four
// clusters is kept for the metadata that writes allocated but that only an
// image flush writes (refcount blocks, new L2 tables). A queued write
// allocates from the free space as usual; the bank only keeps that free
// space from being handed to anybody else. When a queued write fails with
// ENOSPC all the same (the host filled up from outside, or a refcount
// table grew), the bank shrinks to what the other queued writes need plus
// the floor, and the write is retried once: what the bank held for it is
// free again. An image flush failing with ENOSPC is retried after the
// floor, too, is given back (Release()). Being a separate, unnamed file, the bank never touches
// the image file (no races with its writes, nothing left past its end) and
// disappears with the daemon, even one killed with SIGKILL.
//
// Growing happens in steps of `chunk` bytes, and the bank shrinks again
// only when it holds two steps more than needed, so a steady writer costs
// one fallocate per `chunk` bytes and a mutex per write. Thread-safe.
class SpaceBank {
 public:
  // Creates the bank in `directory` (the image's), which must be on the
  // same host file system as the data. Fails where O_TMPFILE or fallocate
  // is not supported (NFS, some FUSE hosts), or the directory is not
  // writable.
  static Result<std::unique_ptr<SpaceBank>> Create(const std::string& directory,
                                                   uint64_t cluster_size, uint64_t chunk);
  // Takes ownership of `fd`, an unnamed regular file.
  SpaceBank(int fd, uint64_t cluster_size, uint64_t chunk);
  ~SpaceBank();
  SpaceBank(const SpaceBank&) = delete;
  SpaceBank& operator=(const SpaceBank&) = delete;

  // The most host space a write of `length` bytes at guest `offset` can
  // allocate: the clusters it spans and two for metadata.
  uint64_t Need(uint64_t offset, uint64_t length) const;
  // Reserves `need` more bytes, growing the file if it holds less than all
  // reservations plus the floor. Returns 0, or the errno of a failed
  // fallocate (ENOSPC, EDQUOT): then nothing is reserved.
  int Reserve(uint64_t need);
  // A reserved write is being applied: it allocates from the free space,
  // and Give() frees what the bank holds for it.
  void Start(uint64_t need);
  // A write being applied is done; `given`: its reservation went to Give().
  void Return(uint64_t need, bool given = false);
  // Shrinks the file to what the reservations need plus the floor; returns
  // whether that freed anything. For a write not queued to retry on.
  bool Trim();
  // Frees `need` bytes reserved for writes being applied (the caller gives
  // up all of theirs at once, so that one cannot take what another was
  // given), for them to retry on after finding the host full. Until they
  // are done, Reserve() only grows the bank while the host's free space
  // still covers what was given.
  void Give(uint64_t need);
  // Shrinks the file to what the reservations need, giving back the floor
  // too; returns whether that freed anything. For an image flush to retry
  // on. The next Reserve() restores the floor.
  bool Release();
  // Whether the last Reserve() failed: the host is (nearly) full. Writes
  // applied at once should then wait for the queue, so as not to take the
  // space queued writes are to be given on a retry.
  bool Short() const;
  // Bytes the file holds, and bytes reserved (for tests and logs).
  uint64_t held() const;
  uint64_t reserved() const;

 private:
  // Shrinks the file to `size` (not below); mu_ held.
  bool ShrinkLocked(uint64_t size) REQUIRES(mu_);

  const int fd_;
  const uint64_t cluster_size_;
  const uint64_t chunk_;
  const uint64_t floor_;  // kept beyond the reservations: 4 clusters
  mutable Mutex mu_;
  uint64_t held_ GUARDED_BY(mu_) = 0;       // the file's size: all of it allocated
  uint64_t queued_ GUARDED_BY(mu_) = 0;     // reservations of writes not yet started
  uint64_t in_flight_ GUARDED_BY(mu_) = 0;  // reservations of writes being applied
  uint64_t given_ GUARDED_BY(mu_) = 0;      // given to writes being applied, not done yet
  bool short_ GUARDED_BY(mu_) = false;      // the last Reserve() failed
};

class WriteBehind {
 public:
  // Writes one queued piece to the image.
  using Apply = std::function<Status(uint64_t offset, std::span<const std::byte> data)>;

  // Queues at most `max_bytes` in pieces of at most `max_write` bytes,
  // applied by `threads` background threads (two keep the disk busy while
  // one request is being mapped). With a `bank` (may be null: no
  // reservations, for tests), every queued write holds its space there.
  WriteBehind(Apply apply, size_t max_bytes, size_t max_write, unsigned threads,
              SpaceBank* bank = nullptr);
  // Applies everything queued, then stops the threads.
  ~WriteBehind();
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;

  // Queues a copy of `data` (at most max_write bytes) for `offset`. Waits
  // first for queued writes overlapping it and for room. Returns false,
  // queuing nothing, when the bank cannot reserve host space for it: the
  // caller must apply it itself (after WaitFor) and report the outcome.
  [[nodiscard]] bool Submit(uint64_t offset, std::span<const std::byte> data);
  // Waits until no queued write overlaps [offset, offset + length).
  void WaitFor(uint64_t offset, uint64_t length);
  // Waits until everything queued so far is applied; returns the first
  // background error since the previous Drain(), and forgets it. Cheap
  // when nothing is queued and nothing failed (one mutex).
  Status Drain();

 private:
  struct Pending {
    uint64_t sequence;  // arrival order, for Drain()
    uint64_t offset;
    size_t length;
    uint64_t reserved;  // held for it in the bank
    AlignedBuffer buffer;
    bool ready = false;    // the data is copied in
    bool started = false;  // a thread is applying it
    bool given = false;    // its reservation was freed for a retry (Give)
  };

  bool OverlapsLocked(uint64_t offset, uint64_t length) const REQUIRES(mu_);
  // A background thread's life: apply ready writes until stopped.
  void Run();

  const Apply apply_;
  SpaceBank* const bank_;
  const size_t max_write_;
  const size_t max_buffers_;

  // A Pending in queue_ is guarded by mu_, except its buffer: the
  // submitter copies into it, and then one thread applies it, without the
  // lock (`ready` and `started` say who owns it).
  mutable Mutex mu_;
  CondVar work_;  // a write was queued, or stopping
  CondVar done_;  // a write was applied
  // Queued and being applied, in arrival order.
  std::list<Pending> queue_ GUARDED_BY(mu_);
  uint64_t next_sequence_ GUARDED_BY(mu_) = 0;
  std::vector<AlignedBuffer> spare_ GUARDED_BY(mu_);  // buffers not in use
  size_t buffers_ GUARDED_BY(mu_) = 0;                // buffers allocated so far
  Status error_ GUARDED_BY(mu_);                      // first failure since the last Drain()
  bool stopping_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace qcow2fs::fusefs
