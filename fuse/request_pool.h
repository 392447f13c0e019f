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

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <functional>
#include <vector>

#include "mutex.h"
#include "qcow2fs/status.h"
#include "thread_annotations.h"

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
  // readable (the caller drains stop_fd). Returns only after every worker
  // has answered the last request it read and left its receive loop; the
  // caller then destroys the session, which closes /dev/fuse: only then
  // does the kernel fail what is still queued (ENOTCONN/ECONNABORTED).
  //
  // A stop goes like this: the workers are told to receive no more;
  // `detach` lazily unmounts the mount point, with /dev/fuse still open, so
  // that no new opens reach the file system and, if nothing holds a file
  // open, the kernel ends the connection itself (every read() returns
  // ENODEV); workers still blocked in read() because a file is still open
  // (a writer, a loop device) are interrupted with a signal. A request a
  // worker has read is always processed and answered, on an open
  // descriptor: closing /dev/fuse under the workers, or exiting the session
  // (libfuse then drops what read() returned), would leave its caller
  // waiting forever.
  Status Serve(fuse_session* session, int stop_fd, const std::function<void()>& detach);

 private:
  // One worker's life: receive, process, repeat until the session ends or
  // a stop is requested. `buffer_bytes`: how much libfuse may read into a
  // receive buffer.
  void Work(fuse_session* session, size_t buffer_bytes);
  // Interrupts the read() of every worker still in its loop.
  void InterruptWorkers() EXCLUDES(workers_mutex_);

  const unsigned threads_;
  const size_t max_write_;
  oneapi::tbb::global_control parallelism_;
  oneapi::tbb::task_arena arena_;

  // Set once by Serve(); workers test it before each receive, without a
  // lock: one that misses it is interrupted in its read() (InterruptWorkers
  // keeps signalling until every worker is out).
  std::atomic<bool> stopping_{false};
  // A leaf: held only to change workers_ or to signal the threads listed.
  Mutex workers_mutex_;
  // Threads inside their receive call, to interrupt.
  std::vector<pthread_t> workers_ GUARDED_BY(workers_mutex_);
};

}  // namespace qcow2fs::fusefs
