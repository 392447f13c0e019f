// SyncPoints: one registry of named points behind one mutex. Only the test
// build of the core calls Reached(); in other builds the functions exist
// (so tests link) but no point is ever reached.
#include "engine/sync_point.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <mutex>

namespace qcow2fs {
namespace {

struct Point {
  bool armed = false;
  std::function<bool(uint64_t)> match;
  bool stopped = false;   // a thread waits here
  bool released = false;  // ... and may go on
  uint64_t arg = 0;
  uint64_t passes = 0;
};

struct Registry {
  std::mutex mu;
  std::condition_variable changed;
  std::map<std::string, Point, std::less<>> points;
  uint64_t generation = 0;
  // Reached() returns at once until a test first uses the registry, so
  // tests that use no sync point run at full speed.
  std::atomic<bool> active{false};
};

Registry& TheRegistry() {
  static Registry* r = new Registry();  // never destroyed: threads may outlive main
  return *r;
}

template <typename Pred>
bool WaitFor(std::unique_lock<std::mutex>& lk, int limit_seconds, Pred pred) {
  return TheRegistry().changed.wait_for(lk, std::chrono::seconds(limit_seconds), pred);
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
  std::unique_lock lk(r.mu);
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
    r.changed.notify_all();
    r.changed.wait(lk, [&] { return r.generation != gen || p.released; });
    if (r.generation == gen) {
      p.stopped = false;
      p.released = false;
    }
  }
  r.changed.notify_all();
}

void SyncPoints::Arm(const std::string& name, std::function<bool(uint64_t)> match) {
  Registry& r = TheRegistry();
  std::lock_guard lk(r.mu);
  r.active.store(true, std::memory_order_release);
  Point& p = r.points[name];
  p.armed = true;
  p.match = std::move(match);
}

bool SyncPoints::WaitUntilStopped(const std::string& name, uint64_t* arg, int limit_seconds) {
  Registry& r = TheRegistry();
  std::unique_lock lk(r.mu);
  r.active.store(true, std::memory_order_release);
  const bool ok = WaitFor(lk, limit_seconds, [&] {
    auto it = r.points.find(name);
    return it != r.points.end() && it->second.stopped && !it->second.released;
  });
  if (ok && arg) *arg = r.points[name].arg;
  return ok;
}

int SyncPoints::WaitUntilAnyReached(const std::vector<std::string>& names, int limit_seconds) {
  Registry& r = TheRegistry();
  std::unique_lock lk(r.mu);
  r.active.store(true, std::memory_order_release);
  int found = -1;
  WaitFor(lk, limit_seconds, [&] {
    for (size_t i = 0; i < names.size(); i++) {
      auto it = r.points.find(names[i]);
      if (it != r.points.end() && it->second.passes > 0) {
        found = static_cast<int>(i);
        return true;
      }
    }
    return false;
  });
  return found;
}

bool SyncPoints::WaitUntilPassed(const std::string& name, uint64_t count, int limit_seconds) {
  Registry& r = TheRegistry();
  std::unique_lock lk(r.mu);
  r.active.store(true, std::memory_order_release);
  return WaitFor(lk, limit_seconds, [&] {
    auto it = r.points.find(name);
    return it != r.points.end() && it->second.passes >= count;
  });
}

uint64_t SyncPoints::Passes(const std::string& name) {
  Registry& r = TheRegistry();
  std::lock_guard lk(r.mu);
  auto it = r.points.find(name);
  return it == r.points.end() ? 0 : it->second.passes;
}

void SyncPoints::Release(const std::string& name) {
  Registry& r = TheRegistry();
  std::lock_guard lk(r.mu);
  Point& p = r.points[name];
  if (p.stopped) p.released = true;
  r.changed.notify_all();
}

void SyncPoints::Reset(bool active) {
  Registry& r = TheRegistry();
  std::lock_guard lk(r.mu);
  r.generation++;
  r.points.clear();
  r.active.store(active, std::memory_order_release);
  r.changed.notify_all();
}

}  // namespace qcow2fs
