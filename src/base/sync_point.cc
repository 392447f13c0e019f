// SyncPoints: one registry of named points behind one mutex. Only code
// built with QCOW2FS_SYNC_POINTS (the tests' core, the daemon's pipeline
// test) calls Reached(); in other builds the functions exist (so tests
// link) but no point is ever reached.
#include "base/sync_point.h"

#include <atomic>
#include <chrono>
#include <map>

#include "base/mutex.h"

namespace qcow2fs {
namespace {

using Clock = std::chrono::steady_clock;

// One named point. Reached only through Registry::points, under its mutex.
struct Point {
  bool armed = false;
  std::function<bool(uint64_t)> match;
  bool stopped = false;   // a thread waits here
  bool released = false;  // ... and may go on
  uint64_t arg = 0;
  uint64_t passes = 0;
};

struct Registry {
  Mutex mu;
  CondVar changed;  // a point was passed, stopped at or released; a Reset()
  std::map<std::string, Point, std::less<>> points GUARDED_BY(mu);
  // Counts Reset()s: a thread stopped at a point goes on when it changes,
  // since its Point is gone.
  uint64_t generation GUARDED_BY(mu) = 0;
  // Reached() returns at once, without mu, until a test first uses the
  // registry, so tests that use no sync point run at full speed. A point
  // reached just as a test arms it may be missed; tests arm before they
  // start the request they stop.
  std::atomic<bool> active{false};
};

Registry& TheRegistry() {
  static Registry* r = new Registry();  // never destroyed: threads may outlive main
  return *r;
}

// The point named `name`, or null if it was never armed nor reached.
const Point* FindLocked(Registry& r, std::string_view name) REQUIRES(r.mu) {
  auto it = r.points.find(name);
  return it == r.points.end() ? nullptr : &it->second;
}

// With the registry locked, waits until `done(registry)` holds (true) or
// `limit_seconds` have passed (false). Marks the registry in use.
template <typename Done>
bool WaitUntil(int limit_seconds, Done done) {
  Registry& r = TheRegistry();
  MutexLock lk(r.mu);
  r.active.store(true, std::memory_order_release);
  const Clock::time_point deadline = Clock::now() + std::chrono::seconds(limit_seconds);
  // Spelled out: in `done(r)`, Clang 14's analysis takes the lambda object
  // for the first argument and looks for the lock in the wrong place.
  while (!done.operator()(r)) {
    if (Clock::now() >= deadline) return false;
    r.changed.WaitUntil(r.mu, deadline);
  }
  return true;
}

}  // namespace

bool SyncPoints::compiled_in() {
#ifdef QCOW2FS_SYNC_POINTS
  return true;
#else
  return false;
#endif
}

void SyncPoints::Reached(std::string_view name, uint64_t arg) {
  Registry& r = TheRegistry();
  if (!r.active.load(std::memory_order_acquire)) return;
  MutexLock lk(r.mu);
  auto it = r.points.find(name);
  if (it == r.points.end()) it = r.points.emplace(std::string(name), Point{}).first;
  Point& p = it->second;
  p.passes++;
  if (p.armed && (!p.match || p.match(arg))) {
    p.armed = false;
    p.stopped = true;
    p.released = false;
    p.arg = arg;
    const uint64_t gen = r.generation;
    r.changed.NotifyAll();
    // After a Reset() `p` is gone: the generation is tested first.
    while (r.generation == gen && !p.released) r.changed.Wait(r.mu);
    if (r.generation == gen) {
      p.stopped = false;
      p.released = false;
    }
  }
  r.changed.NotifyAll();
}

void SyncPoints::Arm(const std::string& name, std::function<bool(uint64_t)> match) {
  Registry& r = TheRegistry();
  MutexLock lk(r.mu);
  r.active.store(true, std::memory_order_release);
  Point& p = r.points[name];
  p.armed = true;
  p.match = std::move(match);
}

bool SyncPoints::WaitUntilStopped(const std::string& name, uint64_t* arg, int limit_seconds) {
  return WaitUntil(limit_seconds, [&](Registry& r) REQUIRES(r.mu) {
    const Point* p = FindLocked(r, name);
    if (!p || !p->stopped || p->released) return false;
    if (arg) *arg = p->arg;
    return true;
  });
}

int SyncPoints::WaitUntilAnyReached(const std::vector<std::string>& names, int limit_seconds) {
  int found = -1;
  WaitUntil(limit_seconds, [&](Registry& r) REQUIRES(r.mu) {
    for (size_t i = 0; i < names.size(); i++) {
      const Point* p = FindLocked(r, names[i]);
      if (p && p->passes > 0) {
        found = static_cast<int>(i);
        return true;
      }
    }
    return false;
  });
  return found;
}

bool SyncPoints::WaitUntilPassed(const std::string& name, uint64_t count, int limit_seconds) {
  return WaitUntil(limit_seconds, [&](Registry& r) REQUIRES(r.mu) {
    const Point* p = FindLocked(r, name);
    return p && p->passes >= count;
  });
}

uint64_t SyncPoints::Passes(const std::string& name) {
  Registry& r = TheRegistry();
  MutexLock lk(r.mu);
  const Point* p = FindLocked(r, name);
  return p ? p->passes : 0;
}

void SyncPoints::Release(const std::string& name) {
  Registry& r = TheRegistry();
  MutexLock lk(r.mu);
  Point& p = r.points[name];
  if (p.stopped) p.released = true;
  r.changed.NotifyAll();
}

void SyncPoints::Reset(bool active) {
  Registry& r = TheRegistry();
  MutexLock lk(r.mu);
  r.generation++;
  r.points.clear();
  r.active.store(active, std::memory_order_release);
  r.changed.NotifyAll();
}

}  // namespace qcow2fs
