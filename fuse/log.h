// Logging for the daemon: stderr while a terminal is attached, syslog after
// the daemon has detached from it.
//
// The state behind these functions is process-wide on purpose: libfuse's own
// diagnostics arrive through fuse_set_log_func(), whose hook carries no user
// pointer, and they must reach the same sink as ours.
#pragma once

#include <syslog.h>  // LOG_ERR and friends, for callers of Log()

#include <string>

namespace qcow2fs::fusefs {

// Names the program in messages ("mount.qcow2fs: ...") and routes libfuse's
// messages through Log(). Call once, first thing in main().
void InitLog(const std::string& program_name);

// From now on messages go to syslog (facility daemon) instead of stderr.
void LogToSyslog();

// priority is a syslog level (LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG).
// Never throws, never allocates unboundedly; long messages are truncated.
void Log(int priority, const char* format, ...) noexcept
    __attribute__((format(printf, 2, 3)));

// While one of these exists, errors that libfuse reports are collected
// instead of printed, so that a failed libfuse call becomes one line naming
// the cause rather than libfuse's line followed by a vaguer one of ours.
// Meant for start-up, where only one thread talks to libfuse.
class LibfuseErrorCapture {
 public:
  LibfuseErrorCapture();
  ~LibfuseErrorCapture();
  LibfuseErrorCapture(const LibfuseErrorCapture&) = delete;
  LibfuseErrorCapture& operator=(const LibfuseErrorCapture&) = delete;

  // What was collected so far ("" if nothing), joined with "; ".
  std::string errors() const;
};

}  // namespace qcow2fs::fusefs
