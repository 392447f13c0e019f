// Mutex, SharedMutex, their scoped guards and CondVar: the standard
// library's locks with Clang's thread-safety attributes
// (base/thread_annotations.h), which libstdc++'s own lack. They cost
// nothing over std::mutex and std::shared_mutex (every method is an inline
// forward), and let a Clang build check GUARDED_BY and REQUIRES.
//
// Guards take their lock in the constructor and drop it in the destructor.
// MutexLock can also be dropped and retaken in its scope (Unlock, Lock), as
// a std::unique_lock can. A function that must drop a lock its caller holds
// (to do I/O, or to wait) takes no guard by reference: it is annotated
// REQUIRES(mu) and drops the lock for a stretch with a MutexUnlock, which
// the analysis follows and which takes the lock back even when an exception
// leaves the stretch; the caller's guard is none the wiser and owns a held
// lock again on return.
//
// The method names are the standard ones (lock, unlock, try_lock,
// lock_shared, ...), so the types also meet the Lockable requirements.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <shared_mutex>

#include "thread_annotations.h"  // beside this file, whatever root the includer uses

namespace qcow2fs {

class CondVar;

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

class CAPABILITY("shared_mutex") SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  void lock_shared() ACQUIRE_SHARED() { mu_.lock_shared(); }
  void unlock_shared() RELEASE_SHARED() { mu_.unlock_shared(); }
  bool try_lock_shared() TRY_ACQUIRE_SHARED(true) { return mu_.try_lock_shared(); }

 private:
  std::shared_mutex mu_;
};

// Passed to a guard's constructor: the caller already holds the lock and
// the guard takes over releasing it.
struct AdoptLock {
  explicit AdoptLock() = default;
};
inline constexpr AdoptLock kAdoptLock{};

// Holds a Mutex for its scope; may drop and retake it meanwhile.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  MutexLock(Mutex& mu, AdoptLock) REQUIRES(mu) : mu_(mu) {}
  ~MutexLock() RELEASE() {
    if (held_) mu_.unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

  void Unlock() RELEASE() {
    mu_.unlock();
    held_ = false;
  }
  void Lock() ACQUIRE() {
    mu_.lock();
    held_ = true;
  }

 private:
  Mutex& mu_;
  bool held_ = true;
};

// The reverse of MutexLock: releases a Mutex the caller holds for its
// scope, and takes it back at the end of the scope (on an exception too).
class SCOPED_CAPABILITY MutexUnlock {
 public:
  explicit MutexUnlock(Mutex& mu) RELEASE(mu) : mu_(mu) { mu_.unlock(); }
  // Takes the lock back; Clang spells the end of a scoped release RELEASE.
  ~MutexUnlock() RELEASE() { mu_.lock(); }
  MutexUnlock(const MutexUnlock&) = delete;
  MutexUnlock& operator=(const MutexUnlock&) = delete;

 private:
  Mutex& mu_;
};

// Holds the exclusive side of a SharedMutex for its scope.
class SCOPED_CAPABILITY WriterLock {
 public:
  explicit WriterLock(SharedMutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  WriterLock(SharedMutex& mu, AdoptLock) REQUIRES(mu) : mu_(mu) {}
  ~WriterLock() RELEASE() { mu_.unlock(); }
  WriterLock(const WriterLock&) = delete;
  WriterLock& operator=(const WriterLock&) = delete;

 private:
  SharedMutex& mu_;
};

// Holds the shared side of a SharedMutex for its scope.
class SCOPED_CAPABILITY ReaderLock {
 public:
  explicit ReaderLock(SharedMutex& mu) ACQUIRE_SHARED(mu) : mu_(mu) { mu_.lock_shared(); }
  ReaderLock(SharedMutex& mu, AdoptLock) REQUIRES_SHARED(mu) : mu_(mu) {}
  ~ReaderLock() RELEASE() { mu_.unlock_shared(); }
  ReaderLock(const ReaderLock&) = delete;
  ReaderLock& operator=(const ReaderLock&) = delete;

 private:
  SharedMutex& mu_;
};

// A condition variable over Mutex. Wait() releases `mu` while it sleeps and
// holds it again on return, as std::condition_variable::wait does; there is
// no predicate form, since a lambda's body is a separate function to the
// analysis, which could not see that it runs with the lock held. Callers
// loop: `while (!ready) cv.Wait(mu);`.
class CondVar {
 public:
  void Wait(Mutex& mu) REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.mu_, std::adopt_lock);
    cv_.wait(lk);
    lk.release();  // the caller still holds mu
  }
  // Wait() with a time limit; false when `deadline` passed first.
  template <typename Clock, typename Duration>
  bool WaitUntil(Mutex& mu, const std::chrono::time_point<Clock, Duration>& deadline) REQUIRES(mu) {
    std::unique_lock<std::mutex> lk(mu.mu_, std::adopt_lock);
    const bool woken = cv_.wait_until(lk, deadline) == std::cv_status::no_timeout;
    lk.release();
    return woken;
  }
  void NotifyOne() { cv_.notify_one(); }
  void NotifyAll() { cv_.notify_all(); }

 private:
  std::condition_variable cv_;
};

}  // namespace qcow2fs
