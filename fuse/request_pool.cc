// Workers that receive and execute FUSE requests. See request_pool.h.
#include "request_pool.h"

#include <linux/fuse.h>
#include <malloc.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <new>

#include "log.h"
#include "qcow2fs/aligned_buffer.h"

namespace qcow2fs::fusefs {

namespace {

constexpr size_t kPage = 4096;
// Where a WRITE request's data begins in what read(/dev/fuse) returns.
constexpr size_t kWriteDataOffset = sizeof(fuse_in_header) + sizeof(fuse_write_in);
static_assert(kWriteDataOffset < kPage);

// A worker's receive buffer, shifted so that WRITE data is page-aligned.
class ReceiveBuffer {
 public:
  explicit ReceiveBuffer(size_t bytes) {
    try {
      storage_ = AlignedBuffer(kPage + bytes);
      buf_.mem = storage_.data() + kPage - kWriteDataOffset;
    } catch (const std::bad_alloc&) {}
  }
  bool ok() const { return !storage_.empty(); }
  fuse_buf* get() { return &buf_; }

 private:
  AlignedBuffer storage_;
  fuse_buf buf_{};
};

// The signal that interrupts a worker's blocking read of /dev/fuse when a
// stop is requested. Its handler does nothing: installed without
// SA_RESTART, it only makes read() return EINTR. It is sent to a worker
// only while that worker is in its receive call (see Work), never while it
// processes a request, so no other system call sees an EINTR from it.
int InterruptSignal() { return SIGRTMIN; }

void IgnoreInterrupt(int) {}

void InstallInterruptHandler() {
  struct sigaction action {};
  action.sa_handler = IgnoreInterrupt;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: read() returns EINTR
  sigaction(InterruptSignal(), &action, nullptr);
}

// How often a stop re-sends the interrupt: a worker that was between its
// check of the stop flag and read() when the signal came blocks again.
constexpr int kInterruptRetryMs = 20;

}  // namespace

RequestPool::RequestPool(unsigned threads, unsigned other_workers, size_t max_write)
    : threads_(threads),
      max_write_(max_write),
      // oneTBB caps its workers at the CPU count by default. Requests spend
      // most of their time waiting for the host disk, and each worker keeps
      // one request in flight, so allow as many as were asked for, plus
      // those other arenas need. The limit counts the calling thread: +1.
      parallelism_(oneapi::tbb::global_control::max_allowed_parallelism,
                   threads + other_workers + 1),
      // No slot is reserved for the calling thread: it only waits.
      arena_(static_cast<int>(threads), 0) {}

void RequestPool::Work(fuse_session* session, size_t buffer_bytes) {
  ReceiveBuffer buffer(buffer_bytes);
  if (!buffer.ok()) {
    Log(LOG_ERR, "no memory for a %zu-byte request buffer: one worker fewer", buffer_bytes);
    return;
  }
  // This thread is in workers_ exactly while it is inside the receive call:
  // InterruptWorkers() signals it only then, under the same mutex.
  const pthread_t self = pthread_self();
  auto set_receiving = [this, self](bool receiving) {
    MutexLock lock(workers_mutex_);
    if (receiving) {
      workers_.push_back(self);
    } else {
      workers_.erase(std::find(workers_.begin(), workers_.end(), self));
    }
  };
  // fuse_session_exited: the kernel ended the session (ENODEV).
  while (!stopping_.load(std::memory_order_acquire) && !fuse_session_exited(session)) {
    set_receiving(true);
    if (stopping_.load(std::memory_order_acquire)) {
      set_receiving(false);
      break;
    }
    const int received = fuse_session_receive_buf(session, buffer.get());
    set_receiving(false);
    if (received == -EINTR || received == -EAGAIN) continue;
    // 0: the session ended (unmounted); negative: the device is gone.
    if (received <= 0) break;
    // A request read is always answered, even when a stop came meanwhile.
    // The callbacks catch everything; libfuse is C. Nothing throws here.
    fuse_session_process_buf(session, buffer.get());
  }
}

void RequestPool::InterruptWorkers() {
  MutexLock lock(workers_mutex_);
  for (pthread_t thread : workers_) pthread_kill(thread, InterruptSignal());
}

Status RequestPool::Serve(fuse_session* session, int stop_fd, const std::function<void()>& detach) {
  InstallInterruptHandler();
  // The kernel sends INIT first and nothing else until it is answered.
  // Serving it here keeps libfuse's set-up of the connection ahead of the
  // workers. libfuse allocates this first buffer itself, at the size it
  // passes to read(); the workers' buffers are at least as large, and at
  // least what the kernel's largest request (a max_write WRITE) needs.
  size_t buffer_bytes = max_write_ + kPage;
  {
    fuse_buf buf{};
    int received;
    do {
      received = fuse_session_receive_buf(session, &buf);
    } while (received == -EINTR || received == -EAGAIN);
    if (received > 0) fuse_session_process_buf(session, &buf);
    if (buf.mem != nullptr) buffer_bytes = std::max(buffer_bytes, malloc_usable_size(buf.mem));
    std::free(buf.mem);
    if (received < 0) return Status::FromErrno(-received, "reading /dev/fuse");
    if (received == 0) return Status();
  }

  // Workers report their end through an eventfd, so this thread can wait
  // for that and for stop_fd at once.
  const int done_fd = eventfd(0, EFD_CLOEXEC);
  if (done_fd < 0) return Status::FromErrno(errno, "eventfd");
  std::atomic<unsigned> running{threads_};
  for (unsigned i = 0; i < threads_; i++) {
    arena_.enqueue([this, session, &running, done_fd, buffer_bytes] {
      Work(session, buffer_bytes);
      // The last worker out wakes the waiting thread.
      if (running.fetch_sub(1) == 1) {
        const uint64_t one = 1;
        (void)!write(done_fd, &one, sizeof one);
      }
    });
  }

  Status result;
  auto stop = [&] {
    if (stopping_.exchange(true)) return;
    // No worker starts another read from here on; detaching makes the
    // kernel end the connection if no file is open, else the interrupts
    // below end the reads. /dev/fuse stays open until the caller destroys
    // the session, after every worker is out: replies always have a place
    // to go.
    detach();
    InterruptWorkers();
  };
  while (true) {
    pollfd fds[2] = {{done_fd, POLLIN, 0},
                     {stop_fd, stopping_.load() ? short{0} : short{POLLIN}, 0}};
    const int ready = poll(fds, 2, stopping_.load() ? kInterruptRetryMs : -1);
    if (ready < 0) {
      if (errno == EINTR) continue;
      result = Status::FromErrno(errno, "poll");
      stop();
      break;
    }
    if (fds[0].revents != 0) break;  // every worker is done
    if (fds[1].revents != 0) stop();
    if (stopping_.load()) InterruptWorkers();
  }
  // Workers hold `running` by reference: wait for all of them.
  while (running.load() != 0) {
    InterruptWorkers();
    uint64_t count;
    pollfd fd{done_fd, POLLIN, 0};
    if (poll(&fd, 1, kInterruptRetryMs) > 0) (void)!read(done_fd, &count, sizeof count);
  }
  close(done_fd);
  return result;
}

}  // namespace qcow2fs::fusefs
