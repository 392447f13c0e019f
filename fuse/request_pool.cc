// Workers that receive and execute FUSE requests. See request_pool.h.
#include "request_pool.h"

#include <linux/fuse.h>
#include <malloc.h>
#include <poll.h>
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
    } catch (const std::bad_alloc&) {
    }
  }
  bool ok() const { return !storage_.empty(); }
  fuse_buf* get() { return &buf_; }

 private:
  AlignedBuffer storage_;
  fuse_buf buf_{};
};

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
  while (!fuse_session_exited(session)) {
    const int received = fuse_session_receive_buf(session, buffer.get());
    if (received == -EINTR || received == -EAGAIN) continue;
    // 0: the session ended (unmounted); negative: the device is gone.
    if (received <= 0) break;
    // The callbacks catch everything; libfuse is C. Nothing throws here.
    fuse_session_process_buf(session, buffer.get());
  }
}

Status RequestPool::Serve(fuse_session* session, int stop_fd,
                          const std::function<void()>& unmount) {
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
  bool unmounted = false;
  while (true) {
    pollfd fds[2] = {{done_fd, POLLIN, 0}, {stop_fd, unmounted ? short{0} : short{POLLIN}, 0}};
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      result = Status::FromErrno(errno, "poll");
      break;
    }
    if (fds[0].revents != 0) break;  // every worker is done
    if (fds[1].revents != 0 && !unmounted) {
      // A stop signal: end the session. Workers blocked in read() get
      // ENODEV once the kernel drops the connection.
      fuse_session_exit(session);
      unmount();
      unmounted = true;
    }
  }
  // Workers hold `running` by reference: wait for all of them.
  while (running.load() != 0) {
    uint64_t count;
    pollfd fd{done_fd, POLLIN, 0};
    if (poll(&fd, 1, 100) > 0) (void)!read(done_fd, &count, sizeof count);
  }
  close(done_fd);
  return result;
}

}  // namespace qcow2fs::fusefs
