// Workers that receive and execute FUSE requests. See request_pool.h.
#include "request_pool.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>

#include "log.h"

namespace qcow2fs::fusefs {

RequestPool::RequestPool(unsigned threads, unsigned other_workers)
    : threads_(threads),
      // oneTBB caps its workers at the CPU count by default. Requests spend
      // most of their time waiting for the host disk, and each worker keeps
      // one request in flight, so allow as many as were asked for, plus
      // those other arenas need. The limit counts the calling thread: +1.
      parallelism_(oneapi::tbb::global_control::max_allowed_parallelism,
                   threads + other_workers + 1),
      // No slot is reserved for the calling thread: it only waits.
      arena_(static_cast<int>(threads), 0) {}

void RequestPool::Work(fuse_session* session) {
  fuse_buf buf{};  // libfuse allocates buf.mem on the first receive
  while (!fuse_session_exited(session)) {
    const int received = fuse_session_receive_buf(session, &buf);
    if (received == -EINTR || received == -EAGAIN) continue;
    // 0: the session ended (unmounted); negative: the device is gone.
    if (received <= 0) break;
    // The callbacks catch everything; libfuse is C. Nothing throws here.
    fuse_session_process_buf(session, &buf);
  }
  std::free(buf.mem);
}

Status RequestPool::Serve(fuse_session* session, int stop_fd,
                          const std::function<void()>& unmount) {
  // The kernel sends INIT first and nothing else until it is answered.
  // Serving it here keeps libfuse's set-up of the connection (which also
  // sizes the receive buffers) ahead of the workers.
  {
    fuse_buf buf{};
    int received;
    do {
      received = fuse_session_receive_buf(session, &buf);
    } while (received == -EINTR || received == -EAGAIN);
    if (received > 0) fuse_session_process_buf(session, &buf);
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
    arena_.enqueue([this, session, &running, done_fd] {
      Work(session);
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
