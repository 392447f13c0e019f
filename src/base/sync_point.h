// Sync points: named places in the core where a test can stop one thread,
// so that a race found once becomes a test that forces the same
// interleaving every time (the idea of RocksDB's TEST_SYNC_POINT).
//
// The core (and the daemon's write-behind queue) marks a place with
// QCOW2FS_SYNC_POINT("Area:Step", arg), where `arg` identifies the request
// (usually a guest offset) so a test can stop one request and let others
// pass. The points exist only in builds for tests (QCOW2FS_SYNC_POINTS
// defined: the core the tests link, the daemon's pipeline test); in every
// other build the macro expands to nothing and its argument is not
// evaluated.
//
// Test side (all static, thread-safe):
//   SyncPoints::Arm("Write:BeforeData", match)  the next thread to reach the
//       point with an argument `match` accepts stops there;
//   SyncPoints::WaitUntilStopped("Write:BeforeData")  blocks until it has;
//   SyncPoints::Release("Write:BeforeData")  lets it go on.
// A point stops one thread per Arm. Reset() (done by the guard
// ScopedSyncPoints, which a test using sync points holds) releases every stopped thread and forgets
// all state.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "thread_annotations.h"  // beside this file, whatever root the includer uses

#ifdef QCOW2FS_SYNC_POINTS
#define QCOW2FS_SYNC_POINT(name, arg) ::qcow2fs::SyncPoints::Reached(name, arg)
#else
#define QCOW2FS_SYNC_POINT(name, arg) \
  do {                                \
    if (false) (void)(arg);           \
  } while (0)
#endif

namespace qcow2fs {

class SyncPoints {
 public:
  // Called by the core at a marked point.
  static void Reached(std::string_view name, uint64_t arg);

  // Stops the next thread reaching `name` whose argument satisfies `match`
  // (any argument when empty), until Release(name).
  static void Arm(const std::string& name, std::function<bool(uint64_t)> match = {});
  // Blocks until a thread is stopped at `name` and returns its argument.
  // Gives up after `limit_seconds` (a hang guard for broken tests, not a
  // timing assertion) and returns false then.
  static bool WaitUntilStopped(const std::string& name, uint64_t* arg = nullptr,
                               int limit_seconds = 120);
  // Blocks until any of `names` has been reached (passed or stopped at);
  // returns the index of the first such name, or -1 after `limit_seconds`.
  static int WaitUntilAnyReached(const std::vector<std::string>& names, int limit_seconds = 120);
  // Blocks until `name` has been passed (or stopped at) `count` times in
  // total since the last Reset().
  static bool WaitUntilPassed(const std::string& name, uint64_t count, int limit_seconds = 120);
  static uint64_t Passes(const std::string& name);
  // Lets the thread stopped at `name` continue.
  static void Release(const std::string& name);
  // Releases every stopped thread, disarms every point, zeroes counts.
  // Points count passes only while active.
  static void Reset(bool active);
  // True in the build where QCOW2FS_SYNC_POINT is compiled in.
  static bool compiled_in();
};

// Takes `m` exclusively. When that has to wait (someone holds it, or its
// shared side), passes the sync point `name` first, so a test can tell that
// the caller is held up by other requests and not merely slow. The caller
// then hands the lock to a guard: `WriterLock guard(m, kAdoptLock);` (a
// guard returned from here would hide the lock from the analysis).
template <typename M>
void LockExclusiveNoting(M& m, [[maybe_unused]] const char* name, [[maybe_unused]] uint64_t arg)
    ACQUIRE(m) {
  if (!m.try_lock()) {
    QCOW2FS_SYNC_POINT(name, arg);
    m.lock();
  }
}

// The same for the shared side (`ReaderLock guard(m, kAdoptLock);`).
template <typename M>
void LockSharedNoting(M& m, [[maybe_unused]] const char* name, [[maybe_unused]] uint64_t arg)
    ACQUIRE_SHARED(m) {
  if (!m.try_lock_shared()) {
    QCOW2FS_SYNC_POINT(name, arg);
    m.lock_shared();
  }
}

// Resets sync points at the start and end of a test's scope.
class ScopedSyncPoints {
 public:
  ScopedSyncPoints() { SyncPoints::Reset(true); }
  ~ScopedSyncPoints() { SyncPoints::Reset(false); }
  ScopedSyncPoints(const ScopedSyncPoints&) = delete;
  ScopedSyncPoints& operator=(const ScopedSyncPoints&) = delete;
};

}  // namespace qcow2fs
