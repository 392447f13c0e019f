// Logging sink shared by the daemon and libfuse (see log.h for why it is
// process-wide).
#include "log.h"

#include <fcntl.h>
#include <fuse_log.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <vector>

#include "mutex.h"
#include "rate_limiter.h"
#include "thread_annotations.h"

namespace qcow2fs::fusefs {
namespace {

// Where messages go once the daemon has detached from the terminal.
enum class Sink { kTerminal, kFile, kSyslog, kKernel };

// Everything libfuse forces to be global, in one place.
//
// The two mutexes are leaves: never held together, nor across a write to
// the sink, and nothing here calls back into the daemon. So Log() may be
// called with any other lock held.
struct LogState {
  // Atomic, without a lock: the sink switches once (LogToSyslog) and the
  // descriptor it uses is published before it; a message racing the
  // switch goes to either sink, whole.
  std::atomic<Sink> sink{Sink::kTerminal};
  std::atomic<int> file_fd{-1};    // -o log=FILE
  std::atomic<int> kernel_fd{-1};  // /dev/kmsg
  // Written once by InitLog(), before any other thread exists.
  char program[64] = "qcow2fs";
  Mutex capture_mutex;
  bool capturing GUARDED_BY(capture_mutex) = false;
  std::string captured GUARDED_BY(capture_mutex);
  Mutex limiter_mutex;
  RateLimiter limiter GUARDED_BY(limiter_mutex);
};

LogState& State() {
  static LogState state;
  return state;
}

const char* WarningPrefix(int priority) { return priority == LOG_WARNING ? "warning: " : ""; }

// One write() per line, so lines from several threads (and, with O_APPEND,
// several processes) do not interleave.
void WriteLine(int fd, const char* line, size_t length) noexcept {
  while (length > 0) {
    ssize_t n = write(fd, line, length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    line += n;
    length -= static_cast<size_t>(n);
  }
}

void EmitToFile(int fd, int priority, const char* message) noexcept {
  char stamp[32] = "";
  timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  tm local;
  if (localtime_r(&now.tv_sec, &local) != nullptr) {
    std::strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", &local);
  }
  char line[1280];
  int length = std::snprintf(line, sizeof(line), "%s %s[%d]: %s%s\n", stamp, State().program,
                             static_cast<int>(getpid()), WarningPrefix(priority), message);
  if (length < 0) return;
  if (static_cast<size_t>(length) >= sizeof(line)) {
    length = sizeof(line) - 1;
    line[length - 1] = '\n';
  }
  WriteLine(fd, line, static_cast<size_t>(length));
}

void EmitToKernel(int fd, int priority, const char* message) noexcept {
  char line[1280];
  int length = std::snprintf(line, sizeof(line), "<%d>%s[%d]: %s\n", LOG_DAEMON | priority,
                             State().program, static_cast<int>(getpid()), message);
  if (length < 0) return;
  if (static_cast<size_t>(length) >= sizeof(line)) length = sizeof(line) - 1;
  WriteLine(fd, line, static_cast<size_t>(length));
}

// Prints one line, unconditionally.
void Emit(int priority, const char* message) noexcept {
  LogState& state = State();
  int file_fd = state.file_fd.load(std::memory_order_acquire);
  switch (state.sink.load(std::memory_order_acquire)) {
    case Sink::kTerminal:
      // One fprintf per line so lines from several threads do not
      // interleave.
      std::fprintf(stderr, "%s: %s%s\n", state.program, WarningPrefix(priority), message);
      if (file_fd >= 0) EmitToFile(file_fd, priority, message);
      return;
    case Sink::kFile:
      EmitToFile(file_fd, priority, message);
      return;
    case Sink::kKernel:
      EmitToKernel(state.kernel_fd.load(std::memory_order_acquire), priority, message);
      return;
    case Sink::kSyslog:
      syslog(priority, "%s", message);
      return;
  }
}

// Prints what the rate limiter has held back and is now due (or, with
// `all`, everything it holds back).
void EmitSummaries(bool all) noexcept {
  LogState& state = State();
  std::vector<RateLimiter::Summary> summaries;
  try {
    MutexLock lock(state.limiter_mutex);
    auto now = RateLimiter::Clock::now();
    summaries = all ? state.limiter.Drain(now) : state.limiter.Due(now);
  } catch (...) {
    return;  // out of memory: the counts are lost, not the process
  }
  for (const RateLimiter::Summary& summary : summaries) {
    try {
      // The cause starts with the priority digit (see LogMessage).
      int priority = summary.cause.empty() ? LOG_ERR : summary.cause[0] - '0';
      Emit(priority, summary.Text().c_str());
    } catch (...) {}
  }
}

// Prints `message` subject to rate limiting (errors and warnings only).
void LogMessage(int priority, const char* message) noexcept {
  if (priority > LOG_WARNING) {
    EmitSummaries(false);
    Emit(priority, message);
    return;
  }
  bool print = true;
  try {
    LogState& state = State();
    std::string cause = std::to_string(priority) + CauseOf(message);
    MutexLock lock(state.limiter_mutex);
    print = state.limiter.Admit(cause, message, RateLimiter::Clock::now());
  } catch (...) {
    // Out of memory: print it rather than lose it.
  }
  EmitSummaries(false);
  if (print) Emit(priority, message);
}

int SyslogPriority(fuse_log_level level) {
  // clang-format off
  switch (level) {
    case FUSE_LOG_EMERG: return LOG_EMERG;
    case FUSE_LOG_ALERT: return LOG_ALERT;
    case FUSE_LOG_CRIT: return LOG_CRIT;
    case FUSE_LOG_ERR: return LOG_ERR;
    case FUSE_LOG_WARNING: return LOG_WARNING;
    case FUSE_LOG_NOTICE: return LOG_NOTICE;
    case FUSE_LOG_INFO: return LOG_INFO;
    case FUSE_LOG_DEBUG: return LOG_DEBUG;
  }
  // clang-format on
  return LOG_ERR;
}

// printf into a string of whatever length the message needs: a message
// that explains a refusal must never be cut before its reason. Falls back
// to the first 1 KiB if memory runs out.
std::string FormatMessage(const char* format, va_list args) noexcept {
  char small[1024];
  va_list again;
  va_copy(again, args);
  const int n = std::vsnprintf(small, sizeof(small), format, args);
  std::string out;
  try {
    if (n >= 0 && static_cast<size_t>(n) >= sizeof(small)) {
      out.resize(static_cast<size_t>(n) + 1);
      std::vsnprintf(out.data(), out.size(), format, again);
      out.resize(static_cast<size_t>(n));
    } else {
      out = small;
    }
  } catch (...) {
    out.clear();
  }
  va_end(again);
  if (out.empty() && n > 0) {
    try {
      out = small;
    } catch (...) {}
  }
  return out;
}

// libfuse's messages end in '\n' and often start with "fuse: "; both are
// noise once the line carries our program name.
void LibfuseLogHook(fuse_log_level level, const char* format, va_list args) {
  std::string message = FormatMessage(format, args);
  while (!message.empty() && message.back() == '\n') message.pop_back();
  const char* text = message.c_str();
  if (std::strncmp(text, "fuse: ", 6) == 0) text += 6;

  int priority = SyslogPriority(level);
  if (priority <= LOG_ERR) {
    LogState& state = State();
    MutexLock lock(state.capture_mutex);
    if (state.capturing) {
      try {
        if (!state.captured.empty()) state.captured += "; ";
        state.captured += text;
        return;
      } catch (...) {
        // Out of memory: print it after all.
      }
    }
  }
  LogMessage(priority, text);
}

// Whether a syslog daemon accepts messages on /dev/log (as syslog(3) tries:
// datagram first, then stream).
bool SyslogListens() {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, _PATH_LOG, sizeof(address.sun_path) - 1);
  for (int type : {SOCK_DGRAM, SOCK_STREAM}) {
    int fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    bool connected = connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0;
    close(fd);
    if (connected) return true;
  }
  return false;
}

}  // namespace

void InitLog(const std::string& program_name) {
  std::snprintf(State().program, sizeof(State().program), "%s", program_name.c_str());
  fuse_set_log_func(LibfuseLogHook);
  std::atexit([] { FlushLogSummaries(); });
}

Status LogToFile(const std::string& path) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY, 0640);
  if (fd < 0) return Status::FromErrno(errno, "cannot open log file " + path);
  int old = State().file_fd.exchange(fd, std::memory_order_acq_rel);
  if (old >= 0) close(old);
  return Status::Ok();
}

void LogToSyslog() {
  LogState& state = State();
  if (state.file_fd.load(std::memory_order_acquire) >= 0) {
    state.sink.store(Sink::kFile, std::memory_order_release);
    return;
  }
  if (!SyslogListens()) {
    int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC | O_NOCTTY);
    if (fd >= 0) {
      state.kernel_fd.store(fd, std::memory_order_release);
      state.sink.store(Sink::kKernel, std::memory_order_release);
      return;
    }
  }
  // openlog() keeps the ident pointer; State().program lives until exit.
  // LOG_CONS: if the message cannot reach syslog, it goes to /dev/console.
  openlog(state.program, LOG_PID | LOG_CONS, LOG_DAEMON);
  state.sink.store(Sink::kSyslog, std::memory_order_release);
}

void Log(int priority, const char* format, ...) noexcept {
  va_list args;
  va_start(args, format);
  const std::string message = FormatMessage(format, args);
  va_end(args);
  LogMessage(priority, message.c_str());
}

void FlushLogSummaries() noexcept { EmitSummaries(true); }

LibfuseErrorCapture::LibfuseErrorCapture() {
  LogState& state = State();
  MutexLock lock(state.capture_mutex);
  state.capturing = true;
  state.captured.clear();
}

LibfuseErrorCapture::~LibfuseErrorCapture() {
  LogState& state = State();
  MutexLock lock(state.capture_mutex);
  state.capturing = false;
  state.captured.clear();
}

std::string LibfuseErrorCapture::errors() const {
  LogState& state = State();
  MutexLock lock(state.capture_mutex);
  return state.captured;
}

}  // namespace qcow2fs::fusefs
