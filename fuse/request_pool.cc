// The receive loop and the worker arena. See request_pool.h.
#include "request_pool.h"

#include <fcntl.h>
#include <poll.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include "log.h"

namespace qcow2fs::fusefs {

RequestPool::RequestPool(unsigned threads, unsigned max_in_flight)
    // oneTBB caps its workers at the CPU count by default. Requests spend
    // most of their time waiting for the host disk, so allow as many as
    // were asked for. The limit counts the calling thread, hence the +1.
    : parallelism_(oneapi::tbb::global_control::max_allowed_parallelism,
                   threads + 1),
      // No slot is reserved for a joining thread: work is only enqueued,
      // never waited on from inside, so all `threads` slots go to workers.
      arena_(static_cast<int>(threads), 0) {
  slots_.reserve(max_in_flight);
  free_slots_.reserve(max_in_flight);
  for (unsigned i = 0; i < max_in_flight; ++i) {
    slots_.push_back(std::make_unique<Slot>());
    free_slots_.push_back(slots_.back().get());
  }
}

RequestPool::~RequestPool() {
  for (const std::unique_ptr<Slot>& slot : slots_) std::free(slot->buf.mem);
}

RequestPool::Slot* RequestPool::AcquireSlot() {
  std::unique_lock<std::mutex> lock(mutex_);
  slot_freed_.wait(lock, [this] { return !free_slots_.empty(); });
  Slot* slot = free_slots_.back();
  free_slots_.pop_back();
  return slot;
}

void RequestPool::ReleaseSlot(Slot* slot) noexcept {
  // Notified under the lock: once the last slot is back, Serve() may return
  // and the pool be destroyed, so a worker must be done with the condition
  // variable before the waiter can see the slot.
  std::lock_guard<std::mutex> lock(mutex_);
  free_slots_.push_back(slot);
  slot_freed_.notify_all();
}

void RequestPool::WaitUntilIdle() {
  std::unique_lock<std::mutex> lock(mutex_);
  slot_freed_.wait(lock,
                   [this] { return free_slots_.size() == slots_.size(); });
}

void RequestPool::Dispatch(fuse_session* session, Slot* slot) {
  try {
    arena_.enqueue([this, session, slot] {
      // The callbacks catch everything; libfuse is C. Nothing throws here.
      fuse_session_process_buf(session, &slot->buf);
      ReleaseSlot(slot);
    });
  } catch (const std::bad_alloc&) {
    // No memory for a task: serve the request on this thread instead of
    // dropping it, which would leave its caller waiting forever.
    fuse_session_process_buf(session, &slot->buf);
    ReleaseSlot(slot);
  }
}

Status RequestPool::Serve(fuse_session* session, int stop_fd) {
  const int fuse_fd = fuse_session_fd(session);
  // Waiting happens in poll(), which also watches stop_fd; the read itself
  // must not block if the request it was woken for has gone (interrupted).
  int flags = fcntl(fuse_fd, F_GETFL);
  if (flags < 0 || fcntl(fuse_fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return Status::FromErrno(errno, "setting /dev/fuse non-blocking");
  }

  // The kernel sends INIT first and nothing else until it is answered.
  // Serving it inline keeps libfuse's set-up of the connection (which also
  // resizes its receive buffer) off the workers.
  bool initialized = false;
  Status result;
  while (!fuse_session_exited(session)) {
    Slot* slot = AcquireSlot();
    pollfd fds[2] = {{fuse_fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    if (poll(fds, 2, -1) < 0) {
      ReleaseSlot(slot);
      if (errno == EINTR) continue;
      result = Status::FromErrno(errno, "poll on /dev/fuse");
      break;
    }
    if (fds[1].revents != 0) {
      ReleaseSlot(slot);
      break;
    }
    // After an unmount the read fails with ENODEV; libfuse then marks the
    // session exited and returns 0.
    int received = fuse_session_receive_buf(session, &slot->buf);
    if (received <= 0) {
      ReleaseSlot(slot);
      if (received == 0 || received == -EAGAIN || received == -EINTR) {
        continue;  // 0: the session has ended, which the loop checks
      }
      result = Status::FromErrno(-received, "reading /dev/fuse");
      break;
    }
    if (!initialized) {
      fuse_session_process_buf(session, &slot->buf);
      ReleaseSlot(slot);
      initialized = true;
      continue;
    }
    Dispatch(session, slot);
  }
  WaitUntilIdle();
  return result;
}

}  // namespace qcow2fs::fusefs
