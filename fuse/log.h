// Logging for the daemon: standard error while a terminal is attached; once
// the daemon has detached, the log file of -o log=FILE if given, else
// syslog, else (no syslog daemon listening on /dev/log) the kernel log.
//
// Errors and warnings are rate-limited by cause (see rate_limiter.h): the
// first message of a cause is printed at once, later ones of the same cause
// within a minute are counted and summarized in one line ("... (repeated N
// times in S s)") when the minute is over, at the next message logged after
// that, or at exit. Informational and debug messages are never held back.
//
// The state behind these functions is process-wide on purpose: libfuse's own
// diagnostics arrive through fuse_set_log_func(), whose hook carries no user
// pointer, and they must reach the same sink as ours.
#pragma once

#include <syslog.h>  // LOG_ERR and friends, for callers of Log()

#include <string>

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

// Names the program in messages ("mount.qcow2fs: ...") and routes libfuse's
// messages through Log(). Call once, first thing in main().
void InitLog(const std::string& program_name);

// Also appends every message to `path` (created 0640 if missing, opened
// O_APPEND | O_CLOEXEC), one line each with a timestamp and the pid. Call
// before daemonizing: the file is opened relative to the current directory
// and stays open. After detaching, it replaces syslog.
Status LogToFile(const std::string& path);

// The terminal is gone: from now on messages go to the log file if
// LogToFile() was called, else to syslog (facility daemon) if a syslog
// daemon listens on /dev/log, else to the kernel log (/dev/kmsg, read with
// dmesg), and if even that cannot be opened, to syslog(3) anyway, which
// falls back to /dev/console.
void LogToSyslog();

// priority is a syslog level (LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG).
// On standard error and in the log file, warnings read "PROGRAM: warning:
// MESSAGE". Never throws, never allocates unboundedly; long messages are
// truncated.
void Log(int priority, const char* format, ...) noexcept __attribute__((format(printf, 2, 3)));

// Prints the summaries of rate-limited messages still held back. Runs at
// exit by itself; callable earlier.
void FlushLogSummaries() noexcept;

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
