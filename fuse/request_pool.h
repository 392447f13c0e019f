// Serving a FUSE session: one thread receives requests, a oneTBB arena
// executes them.
//
// Each request is read into a buffer of its own, taken from a fixed set of
// slots, and stays there until the worker that processes it has replied.
// A worker therefore never sees its write data overwritten by the next
// request, and memory is bounded: when every slot is busy the receiver
// stops reading and the kernel queues further requests itself.
#pragma once

#include <fuse_lowlevel.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

class RequestPool {
 public:
  // `threads` workers, at most `max_in_flight` requests being processed or
  // waiting for a worker.
  RequestPool(unsigned threads, unsigned max_in_flight);
  RequestPool(const RequestPool&) = delete;
  RequestPool& operator=(const RequestPool&) = delete;
  ~RequestPool();

  // Receives and dispatches requests until the file system is unmounted
  // (OK) or `stop_fd` becomes readable (OK; the caller drains it). Returns
  // only after every dispatched request has been answered. The session's
  // descriptor is switched to non-blocking mode.
  Status Serve(fuse_session* session, int stop_fd);

 private:
  // One request buffer. `buf.mem` is allocated by libfuse on first use
  // (malloc, at the session's buffer size) and freed by us.
  struct Slot {
    fuse_buf buf{};
  };

  Slot* AcquireSlot();
  void ReleaseSlot(Slot* slot) noexcept;
  void WaitUntilIdle();
  // Runs a received request on a worker, or inline if that fails.
  void Dispatch(fuse_session* session, Slot* slot);

  oneapi::tbb::global_control parallelism_;
  oneapi::tbb::task_arena arena_;
  std::vector<std::unique_ptr<Slot>> slots_;

  std::mutex mutex_;
  std::condition_variable slot_freed_;
  std::vector<Slot*> free_slots_;  // capacity reserved: pushing never allocates
};

}  // namespace qcow2fs::fusefs
