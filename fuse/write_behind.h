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
//   - Drain() (fsync, unmount) returns once everything queued before it is
//     in the image. A write that fails in the background is logged, and its
//     error is returned by the next Drain(): as with the page cache, a
//     writer learns of it at fsync.
//   - Memory is bounded: Submit() waits while `max_bytes` are queued.
//
// Threading: all methods are thread-safe. Buffers: Submit() copies the
// caller's bytes into a page-aligned buffer of its own (reused, never
// allocated per request), so the caller may reuse its buffer on return.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "qcow2fs/aligned_buffer.h"
#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

class WriteBehind {
 public:
  // Writes one queued piece to the image.
  using Apply = std::function<Status(uint64_t offset, std::span<const std::byte> data)>;

  // Queues at most `max_bytes` in pieces of at most `max_write` bytes,
  // applied by `threads` background threads (two keep the disk busy while
  // one request is being mapped).
  WriteBehind(Apply apply, size_t max_bytes, size_t max_write, unsigned threads);
  // Applies everything queued, then stops the threads.
  ~WriteBehind();
  WriteBehind(const WriteBehind&) = delete;
  WriteBehind& operator=(const WriteBehind&) = delete;

  // Queues a copy of `data` (at most max_write bytes) for `offset`. Waits
  // first for queued writes overlapping it and for room.
  void Submit(uint64_t offset, std::span<const std::byte> data);
  // Waits until no queued write overlaps [offset, offset + length).
  void WaitFor(uint64_t offset, uint64_t length);
  // Waits until everything queued so far is applied; returns the first
  // background error since the previous Drain(), and forgets it.
  Status Drain();

 private:
  struct Pending {
    uint64_t sequence;  // arrival order, for Drain()
    uint64_t offset;
    size_t length;
    AlignedBuffer buffer;
    bool ready = false;    // the data is copied in
    bool started = false;  // a thread is applying it
  };

  bool OverlapsLocked(uint64_t offset, uint64_t length) const;
  // A background thread's life: apply ready writes until stopped.
  void Run();

  const Apply apply_;
  const size_t max_write_;
  const size_t max_buffers_;

  std::mutex mu_;
  std::condition_variable work_;   // a write was queued, or stopping
  std::condition_variable done_;   // a write was applied
  std::list<Pending> queue_;       // queued and being applied, in arrival order
  uint64_t next_sequence_ = 0;
  std::vector<AlignedBuffer> spare_;  // buffers not in use
  size_t buffers_ = 0;             // buffers allocated so far
  Status error_;                   // first failure since the last Drain()
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace qcow2fs::fusefs
