// The file system a mount shows: a root directory holding one regular file
// whose bytes are the image's guest disk, and the hidden directory
// .snapshots/ with each internal snapshot's disk (snapshot_dir.h).
//
// This is the "what", free of the FUSE wire protocol: every operation is a
// work function that returns 0 or an errno and fills plain outputs. The
// callbacks in lowlevel_ops.cc decode requests, call these and send exactly
// one reply. All methods may run on many threads at once; the Image is
// thread-safe, and the little mutable state here (the commit thread's) is
// atomic or behind its own mutex.
//
// Locks: commit_mu_ is the only one here. It is held for a few loads and
// stores (and a log line), never across a call into the image, the
// write-behind queue or .snapshots/, so it orders with nothing but the
// log's own locks, which are leaves (log.h).
//
// Commits: on a writable mount with a commit interval, a background thread
// does what fsync does (drain the write-behind queue, Image::Flush) at
// least that often, but only when something changed since the last commit
// or fsync, so that programs that never fsync (cp) lose at most an
// interval's worth of writes in a crash. A failed commit is logged, kept,
// and returned by the next fsync and the next FLUSH (close), and makes the
// daemon's exit status non-zero (BackgroundFailed()).
//
// Write-behind and a full host: a large write is queued only once a
// SpaceBank (write_behind.h) holds the host space it may need; otherwise it
// is applied before the reply, so ENOSPC reaches that write(2). A queued
// write that fails all the same (after the bank's retry) is reported like
// a failed commit: by the next FLUSH, which drains the queue first (so cp
// reports an error at close), by the next fsync, and by the exit status.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "fs_types.h"
#include "mutex.h"
#include "qcow2fs/image.h"
#include "read_ahead.h"
#include "snapshot_dir.h"
#include "thread_annotations.h"
#include "write_behind.h"

namespace qcow2fs::fusefs {

struct FsConfig {
  std::string file_name;  // the one entry of the root directory
  bool read_only = true;
  bool discard = true;  // punching holes may free clusters
  bool debug = false;   // log every request
  // Bytes of large writes that may be queued ahead of the image (see
  // write_behind.h); 0 applies every write before replying.
  size_t write_behind_bytes = 0;
  // How often a writable mount commits in the background what fsync would
  // (see above); zero: never, only fsync and unmount do.
  std::chrono::seconds commit_interval{0};
  // Passed to the kernel at INIT: how many background requests (readahead,
  // async direct I/O) it may have outstanding. Matches the request pool's
  // capacity so the kernel queues what the pool could not take anyway.
  unsigned max_background = 16;
  // Whether the root shows .snapshots/. Not when the mount is a snapshot
  // itself (-o snapshot=): its image is that snapshot's read-only view,
  // which has no snapshots of its own to show or take.
  bool snapshot_dir = true;
};

// A read's result: the bytes to send, valid until the ReadBuffer dies and
// the calling thread serves its next read; reply before either. They are
// in a piece read ahead (held by `pin`), or in a page-aligned buffer of
// the calling thread, allocated once per thread, not per request.
struct ReadBuffer {
  const std::byte* data = nullptr;
  size_t size = 0;
  ReadAhead::Pin pin;
};

class RawFileFs {
 public:
  static constexpr fuse_ino_t kRootIno = FUSE_ROOT_ID;
  static constexpr fuse_ino_t kFileIno = FUSE_ROOT_ID + 1;
  // Largest write the kernel may send (and the largest read it asks for).
  static constexpr unsigned kMaxWrite = 1u << 20;
  // Smallest write that is queued rather than applied before the reply:
  // below it the FUSE copy is short, and there is little to overlap.
  static constexpr size_t kMinQueuedWrite = 64 << 10;

  // `image_path_fd` is an O_PATH descriptor of the image file, used for its
  // owner, mode, times and host file system. O_PATH matters: closing a
  // normal descriptor of the image would drop the core's POSIX locks.
  // Starts the commit thread, if the mount has one.
  RawFileFs(Image& image, int image_path_fd, FsConfig config);
  // Stops the commit thread (without a last commit: see Shutdown()).
  ~RawFileFs();
  RawFileFs(const RawFileFs&) = delete;
  RawFileFs& operator=(const RawFileFs&) = delete;

  const FsConfig& config() const { return config_; }
  // Tunes the connection at INIT (max_write, caching capabilities).
  void ConfigureConnection(fuse_conn_info& conn) const noexcept;
  // The kernel sent DESTROY, or the session is being torn down: stops the
  // commit thread, applies queued writes and flushes the image.
  void Shutdown();
  // Stops the commit thread and waits for a commit in progress; idempotent.
  // Must run before the image is closed; Shutdown() and the destructor do.
  // Its callers run one after another, never at once.
  void StopCommits() EXCLUDES(commit_mu_);
  // Whether a background commit, or the writing of queued data or the flush
  // at Shutdown(), failed: the exit status must say so.
  bool BackgroundFailed() const { return background_failed_.load(); }
  // Whether closing a file opened with `flags` must reach Flush(), to learn
  // of a failed queued write or background commit (else FOPEN_NOFLUSH
  // spares the trip): writable opens of a mount with write-behind or
  // commits.
  bool WantsFlush(int flags) const;

  // Attributes come with how long the kernel may cache them (seconds).
  int Lookup(fuse_ino_t parent, std::string_view name, Entry& out);
  int GetAttr(fuse_ino_t ino, struct stat& attr, double& attr_timeout);
  // Applies the parts of a setattr named by `to_set` (FUSE_SET_ATTR_*).
  int SetAttr(fuse_ino_t ino, const struct stat& wanted, int to_set, struct stat& attr,
              double& attr_timeout);
  // `handle` is what Read, Lseek and Release get back for this open.
  int Open(fuse_ino_t ino, int flags, uint64_t& handle);
  void Release(fuse_ino_t ino, uint64_t handle);
  // `cache_listing`: whether the kernel may keep the listing it read.
  int OpenDir(fuse_ino_t ino, bool& cache_listing) const;
  int ReadDir(fuse_ino_t ino, std::vector<DirEntry>& entries);
  int Read(fuse_ino_t ino, uint64_t handle, uint64_t offset, size_t size, ReadBuffer& out);
  int Write(fuse_ino_t ino, uint64_t offset, std::span<const std::byte> data, size_t& written);
  int Fsync(fuse_ino_t ino);
  // FLUSH, sent at close(2): waits for the write-behind queue to drain and
  // returns the first failure of a queued write or a background commit not
  // yet reported to a FLUSH. Does not flush the image (close promises no
  // durability; fsync does).
  int Flush(fuse_ino_t ino);
  int Fallocate(fuse_ino_t ino, int mode, uint64_t offset, uint64_t length);
  int Lseek(fuse_ino_t ino, uint64_t handle, uint64_t offset, int whence, uint64_t& result);
  int StatFs(struct statvfs& out) const;
  // mkdir .snapshots/NAME takes a snapshot: after the write-behind queue is
  // drained and the image flushed, so that every write acknowledged before
  // the mkdir is in it. mkdir anywhere else: EPERM.
  int Mkdir(fuse_ino_t parent, std::string_view name, Entry& out);
  // rmdir .snapshots/NAME drops a snapshot (EBUSY while its file is open).
  int Rmdir(fuse_ino_t parent, std::string_view name);
  // fsync of a directory: on .snapshots, what fsync of the disk does, so
  // that a snapshot just taken or dropped is on disk when it returns.
  int FsyncDir(fuse_ino_t ino);

 private:
  int FileAttr(struct stat& attr) const;
  int RootAttr(struct stat& attr) const;
  // Whether `ino` belongs to .snapshots/ (which then exists).
  bool InSnapshots(fuse_ino_t ino) const { return snapshots_ && SnapshotDir::Owns(ino); }
  int CheckWritable(fuse_ino_t ino) const;
  int Resize(uint64_t new_size);
  // Waits for queued writes overlapping the range (everything: length 0).
  void WaitForQueued(uint64_t offset, uint64_t length) const;
  // Runs `change`, which modifies the image in [offset, offset + length),
  // with read-ahead told before and after (see read_ahead.h).
  Status Changing(uint64_t offset, uint64_t length, const std::function<Status()>& change);
  // What fsync and the commit thread do: drain the write-behind queue, then
  // flush the image; on success, every change counted so far is committed.
  // Returns the first failure, named; sets *queued_failed if it is a
  // queued write's (already kept for fsync and FLUSH by DrainQueue()).
  Status Commit(bool* queued_failed = nullptr);
  // The commit thread's life: commit every interval if anything changed.
  void CommitLoop() EXCLUDES(commit_mu_);
  // Counts one change to the image's content or size. Called after the
  // change is in the image or queued (a commit that sees the count must
  // cover the change), whether it worked or not.
  void Changed() { changes_.fetch_add(1); }
  // Who a kept background failure is reported to: each of them once.
  enum class Reporter { kFsync, kFlush };
  // Keeps `failure` for the next fsync and the next FLUSH, unless each
  // already has one waiting.
  void KeepCommitErrorLocked(const Status& failure) REQUIRES(commit_mu_);
  // Removes and returns (as an errno) the background failure kept for
  // `reporter`; 0 if there is none.
  int TakeCommitError(Reporter reporter) EXCLUDES(commit_mu_);
  // Drains the write-behind queue. A queued write's failure is kept for the
  // next fsync and the next FLUSH, and fails the exit status; returned too.
  Status DrainQueue() EXCLUDES(commit_mu_);
  // Applies a write before replying (after queued writes overlapping it).
  // On ENOSPC, retries once if shrinking the space bank freed something.
  Status ApplyWrite(uint64_t offset, std::span<const std::byte> data);
  // image_.Flush(), retried once on ENOSPC after the space bank gave back
  // everything it holds beyond the queued writes' needs.
  Status FlushImage();

  Image& image_;
  const int image_path_fd_;
  const FsConfig config_;
  const bool has_backing_;
  const uint32_t block_size_;  // st_blksize: the cluster size, at least 4K
  ReadAhead read_ahead_;
  // Host space held for queued writes; null without write-behind.
  const std::unique_ptr<SpaceBank> bank_;
  // Null when writes are applied before the reply (read-only mounts,
  // compressed writes, write-behind=0, images with an external data file,
  // hosts where no space bank can be made).
  const std::unique_ptr<WriteBehind> write_behind_;
  // Null when the root shows no .snapshots/ (FsConfig::snapshot_dir).
  const std::unique_ptr<SnapshotDir> snapshots_;

  // Whether there is a commit thread: writable, with a commit interval.
  const bool commits_;
  // Changes counted by Changed(), and how many of them the last successful
  // commit or fsync covered: equal means there is nothing to commit.
  // Atomic, without a lock: a commit reads changes_ before it drains and
  // flushes, and only ever raises committed_ to what it read, so a change
  // counted meanwhile stays uncommitted until the next commit or fsync.
  std::atomic<uint64_t> changes_{0};
  std::atomic<uint64_t> committed_{0};
  // Only ever set, by the commit thread and by requests that drain the
  // queue; read for the exit status. One flag: an atomic, no lock.
  std::atomic<bool> background_failed_{false};
  Mutex commit_mu_;
  CondVar commit_wake_;  // commit_stopping_ was set
  bool commit_stopping_ GUARDED_BY(commit_mu_) = false;
  // The first failure of a background commit or a queued write, until the
  // next fsync and the next FLUSH have each returned it.
  Status fsync_error_ GUARDED_BY(commit_mu_);
  Status flush_error_ GUARDED_BY(commit_mu_);
  // Started by the constructor, joined by StopCommits(), whose callers run
  // one after another: no lock.
  std::thread committer_;
};

}  // namespace qcow2fs::fusefs
