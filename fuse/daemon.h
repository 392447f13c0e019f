// Daemonizing so that the caller learns whether the mount worked.
//
// The usual daemon(3) returns in the child before anything could fail. Here
// the parent stays until the child says the file system is mounted (exit 0)
// or the child exits (its status, after it has printed why on the inherited
// stderr). mount(8) and scripts therefore see errors synchronously.
//
// The fork happens first, before the image is opened or any thread exists:
// the core may start threads and take locks while opening, and neither
// threads nor POSIX record locks survive fork().
#pragma once

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

class Daemon {
 public:
  // Forks. Only the child returns; the parent exits as described above.
  static Result<Daemon> Start();

  Daemon(Daemon&& other) noexcept;
  Daemon& operator=(Daemon&&) = delete;
  ~Daemon();

  // Detaches from the terminal (stdio to /dev/null, logging to syslog,
  // working directory /) and releases the parent with exit status 0.
  void Ready();

 private:
  explicit Daemon(int ready_fd) : ready_fd_(ready_fd) {}

  int ready_fd_;  // write end of the pipe the parent waits on, -1 after Ready
};

}  // namespace qcow2fs::fusefs
