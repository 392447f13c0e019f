// Fork, wait for "mounted", detach. See daemon.h.
#include "daemon.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "log.h"

namespace qcow2fs::fusefs {
namespace {

// Exit status for failures to mount, as mount(8) expects of helpers.
constexpr int kMountFailure = 32;

// In the parent: wait for the child's verdict and leave with it.
[[noreturn]] void WaitForChild(pid_t child, int ready_fd) {
  char byte = 0;
  ssize_t n;
  do {
    n = read(ready_fd, &byte, 1);
  } while (n < 0 && errno == EINTR);
  if (n == 1) _exit(0);

  // The pipe closed without the byte: the child failed and has said why.
  int status = 0;
  while (waitpid(child, &status, 0) < 0) {
    if (errno != EINTR) _exit(kMountFailure);
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) != 0) _exit(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    Log(LOG_ERR, "daemon died from signal %d before the mount was ready", WTERMSIG(status));
  }
  _exit(kMountFailure);
}

}  // namespace

Result<Daemon> Daemon::Start() {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::FromErrno(errno, "pipe");
  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    close(fds[0]);
    close(fds[1]);
    return Status::FromErrno(err, "fork");
  }
  if (pid > 0) {
    close(fds[1]);
    WaitForChild(pid, fds[0]);
  }
  close(fds[0]);
  // A session of its own: the terminal's ^C and hangup are no longer ours.
  setsid();
  return Daemon(fds[1]);
}

Daemon::Daemon(Daemon&& other) noexcept : ready_fd_(other.ready_fd_) { other.ready_fd_ = -1; }

Daemon::~Daemon() {
  // Closing without Ready() tells the parent that we failed.
  if (ready_fd_ >= 0) close(ready_fd_);
}

void Daemon::Ready() {
  if (ready_fd_ < 0) return;
  if (chdir("/") != 0) {
    // Keeping the old directory only pins it; not worth failing over.
  }
  int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    dup2(null_fd, STDIN_FILENO);
    dup2(null_fd, STDOUT_FILENO);
    dup2(null_fd, STDERR_FILENO);
    if (null_fd > STDERR_FILENO) close(null_fd);
  }
  LogToSyslog();
  const char byte = 1;
  ssize_t n;
  do {
    n = write(ready_fd_, &byte, 1);
  } while (n < 0 && errno == EINTR);
  close(ready_fd_);
  ready_fd_ = -1;
}

}  // namespace qcow2fs::fusefs
