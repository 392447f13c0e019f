// Logging sink shared by the daemon and libfuse (see log.h for why it is
// process-wide).
#include "log.h"

#include <fuse_log.h>
#include <syslog.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <mutex>

namespace qcow2fs::fusefs {
namespace {

// Everything libfuse forces to be global, in one place.
struct LogState {
  std::atomic<bool> to_syslog{false};
  char program[64] = "qcow2fs";
  std::mutex capture_mutex;
  bool capturing = false;
  std::string captured;
};

LogState& State() {
  static LogState state;
  return state;
}

void Emit(int priority, const char* message) noexcept {
  LogState& state = State();
  if (state.to_syslog.load(std::memory_order_relaxed)) {
    syslog(priority, "%s", message);
  } else {
    // One fprintf per line so lines from several threads do not interleave.
    std::fprintf(stderr, "%s: %s\n", state.program, message);
  }
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

// libfuse's messages end in '\n' and often start with "fuse: "; both are
// noise once the line carries our program name.
void LibfuseLogHook(fuse_log_level level, const char* format, va_list args) {
  char message[512];
  std::vsnprintf(message, sizeof(message), format, args);
  size_t length = std::strlen(message);
  while (length > 0 && message[length - 1] == '\n') message[--length] = '\0';
  const char* text = message;
  if (std::strncmp(text, "fuse: ", 6) == 0) text += 6;

  int priority = SyslogPriority(level);
  if (priority <= LOG_ERR) {
    LogState& state = State();
    std::lock_guard<std::mutex> lock(state.capture_mutex);
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
  Emit(priority, text);
}

}  // namespace

void InitLog(const std::string& program_name) {
  std::snprintf(State().program, sizeof(State().program), "%s",
                program_name.c_str());
  fuse_set_log_func(LibfuseLogHook);
}

void LogToSyslog() {
  // openlog() keeps the ident pointer; State().program lives until exit.
  openlog(State().program, LOG_PID | LOG_CONS, LOG_DAEMON);
  State().to_syslog.store(true, std::memory_order_relaxed);
}

void Log(int priority, const char* format, ...) noexcept {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  Emit(priority, message);
}

LibfuseErrorCapture::LibfuseErrorCapture() {
  LogState& state = State();
  std::lock_guard<std::mutex> lock(state.capture_mutex);
  state.capturing = true;
  state.captured.clear();
}

LibfuseErrorCapture::~LibfuseErrorCapture() {
  LogState& state = State();
  std::lock_guard<std::mutex> lock(state.capture_mutex);
  state.capturing = false;
  state.captured.clear();
}

std::string LibfuseErrorCapture::errors() const {
  LogState& state = State();
  std::lock_guard<std::mutex> lock(state.capture_mutex);
  return state.captured;
}

}  // namespace qcow2fs::fusefs
