// Clang's thread-safety attributes as macros, so that a Clang build with
// -Wthread-safety checks, at compile time, that every guarded member is
// touched only with its lock held and that locks are taken in the
// documented order. Other compilers see empty macros.
//
// The vocabulary (see clang.llvm.org/docs/ThreadSafetyAnalysis.html):
//   GUARDED_BY(mu)         a member read and written only with `mu` held
//                          (shared is enough for reading);
//   PT_GUARDED_BY(mu)      what a (smart) pointer member points to, likewise;
//   REQUIRES(mu...)        the caller holds `mu` exclusively (the function may
//                          release it for a while, but holds it on return);
//   REQUIRES_SHARED(mu...) the caller holds at least the shared side;
//   EXCLUDES(mu...)        the caller must not hold `mu` (the function takes it);
//   ACQUIRE/RELEASE(...)   the function takes/drops the lock (an empty list
//                          means `this`, for the lock types themselves);
//   ACQUIRED_BEFORE/AFTER  the lock order, written on the lock members;
//   NO_THREAD_SAFETY_ANALYSIS  the analysis is off for one function: every
//                          use carries a comment saying why it is safe.
// The lock types that carry these attributes are in base/mutex.h.
#pragma once

#if defined(__clang__)
#define QCOW2FS_THREAD_ATTRIBUTE(x) __attribute__((x))
#else
#define QCOW2FS_THREAD_ATTRIBUTE(x)
#endif

#define CAPABILITY(name) QCOW2FS_THREAD_ATTRIBUTE(capability(name))
#define SCOPED_CAPABILITY QCOW2FS_THREAD_ATTRIBUTE(scoped_lockable)
#define GUARDED_BY(mu) QCOW2FS_THREAD_ATTRIBUTE(guarded_by(mu))
#define PT_GUARDED_BY(mu) QCOW2FS_THREAD_ATTRIBUTE(pt_guarded_by(mu))
#define ACQUIRED_BEFORE(...) QCOW2FS_THREAD_ATTRIBUTE(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) QCOW2FS_THREAD_ATTRIBUTE(acquired_after(__VA_ARGS__))
#define REQUIRES(...) QCOW2FS_THREAD_ATTRIBUTE(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) QCOW2FS_THREAD_ATTRIBUTE(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) QCOW2FS_THREAD_ATTRIBUTE(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) QCOW2FS_THREAD_ATTRIBUTE(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) QCOW2FS_THREAD_ATTRIBUTE(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) QCOW2FS_THREAD_ATTRIBUTE(release_shared_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) QCOW2FS_THREAD_ATTRIBUTE(try_acquire_capability(__VA_ARGS__))
#define TRY_ACQUIRE_SHARED(...) QCOW2FS_THREAD_ATTRIBUTE(try_acquire_shared_capability(__VA_ARGS__))
#define EXCLUDES(...) QCOW2FS_THREAD_ATTRIBUTE(locks_excluded(__VA_ARGS__))
#define ASSERT_CAPABILITY(mu) QCOW2FS_THREAD_ATTRIBUTE(assert_capability(mu))
#define RETURN_CAPABILITY(mu) QCOW2FS_THREAD_ATTRIBUTE(lock_returned(mu))
#define NO_THREAD_SAFETY_ANALYSIS QCOW2FS_THREAD_ATTRIBUTE(no_thread_safety_analysis)
