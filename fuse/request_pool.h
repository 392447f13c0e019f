// Serving a FUSE session on a oneTBB arena: every worker receives its own
// requests from /dev/fuse and executes them.
//
// Each worker owns one request buffer and reads into it with a blocking
// read; the kernel wakes exactly one waiting reader per request, so no
// request is handed from thread to thread and no buffer is shared: a
// worker never sees its write data overwritten by the next request.
// Memory is bounded by the worker count (one buffer of the session's size,
// about 1 MiB, per worker); when every worker is busy the kernel queues
// further requests itself.
//
// The buffers are placed so that a WRITE request's data starts on a page
// boundary: the core can then hand it to the host with O_DIRECT as it is,
// without a bounce copy.
#pragma once

#include <fuse_lowlevel.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include <cstddef>
#include <functional>

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

class RequestPool {
 public:
  // `threads` request workers; `other_workers` more TBB workers are left
  // for other arenas (compression), which would otherwise find every TBB
  // thread parked in a request worker's blocking read.
  // `max_write` is the largest WRITE payload the session accepts.
  RequestPool(unsigned threads, unsigned other_workers, size_t max_write);
  RequestPool(const RequestPool&) = delete;
  RequestPool& operator=(const RequestPool&) = delete;

  // Serves the session until it is unmounted, or until `stop_fd` becomes
  // readable: then `unmount` is called, which makes the kernel end the
  // workers' reads (the caller drains stop_fd). Returns only after every
  // worker has finished the request it was serving.
  Status Serve(fuse_session* session, int stop_fd, const std::function<void()>& unmount);

 private:
  // One worker's life: receive, process, repeat until the session ends.
  // `buffer_bytes`: how much libfuse may read into a receive buffer.
  void Work(fuse_session* session, size_t buffer_bytes);

  const unsigned threads_;
  const size_t max_write_;
  oneapi::tbb::global_control parallelism_;
  oneapi::tbb::task_arena arena_;
};

}  // namespace qcow2fs::fusefs
