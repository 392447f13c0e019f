// The semantics of the one-file file system: sizes, permissions, holes and
// what each write-like operation means for the image, and which requests go
// to .snapshots/ (snapshot_dir.h). See raw_file_fs.h.
#include "raw_file_fs.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <new>
#include <utility>

#include "log.h"
#include "qcow2fs/aligned_buffer.h"

namespace qcow2fs::fusefs {
namespace {

// Turns a core error into the errno for the caller, logging the ones that
// point at the image or the host rather than at the request.
int ErrnoFrom(const Status& status, const char* what, uint64_t offset) {
  switch (status.code()) {
    case ErrorCode::kOk:
      return 0;
    case ErrorCode::kIoError:
    case ErrorCode::kCorrupt:
    case ErrorCode::kUnsupported:
      Log(LOG_ERR, "%s at guest offset %" PRIu64 " failed: %s", what, offset,
          status.ToString().c_str());
      break;
    default:
      break;
  }
  return status.ToErrno();
}

// This thread's read buffer: kMaxWrite bytes, page-aligned, made on the
// thread's first read and kept for its life (the request workers live as
// long as the mount), or null when memory is short.
std::byte* ThreadReadBuffer() {
  thread_local AlignedBuffer buffer = [] {
    try {
      return AlignedBuffer(RawFileFs::kMaxWrite);
    } catch (const std::bad_alloc&) {
      return AlignedBuffer();
    }
  }();
  return buffer.empty() ? nullptr : buffer.data();
}

// The space bank for a mount's write-behind queue, or null: then there is
// no write-behind (writes are applied before the reply), said in the log.
std::unique_ptr<SpaceBank> MakeSpaceBank(const Image& image, const FsConfig& config) {
  if (config.read_only || config.write_behind_bytes == 0) return nullptr;
  const ImageInfo& info = image.info();
  if (!info.data_file.empty()) {
    // Guest data goes to the data file, metadata to the image, perhaps on
    // two host file systems; not worth a bank on each.
    Log(LOG_INFO, "write-behind is off for an image with an external data file");
    return nullptr;
  }
  const std::string& path = info.path;
  const size_t slash = path.rfind('/');
  const std::string directory = slash == std::string::npos ? "."
                                : slash == 0               ? "/"
                                                           : path.substr(0, slash);
  // Grown in steps of a quarter of the queue (at least 4 MiB): a handful
  // of fallocate calls per queue's worth of writes.
  const uint64_t chunk = std::max<uint64_t>(4 << 20, config.write_behind_bytes / 4);
  Result<std::unique_ptr<SpaceBank>> bank =
      SpaceBank::Create(directory, std::max<uint32_t>(info.cluster_size, 4096), chunk);
  if (!bank.ok()) {
    Log(LOG_WARNING, "write-behind is off: no host space can be reserved for queued writes (%s)",
        bank.status().ToString().c_str());
    return nullptr;
  }
  return std::move(bank).value();
}

// SEEK_DATA or SEEK_HOLE from `offset` on, through the image's block status.
int SeekDataOrHole(Image& image, uint64_t offset, int whence, uint64_t& result) {
  const uint64_t disk_size = image.size();
  if (offset >= disk_size) return ENXIO;
  uint64_t position = offset;
  while (position < disk_size) {
    Result<BlockStatus> status = image.GetDataStatus(position, disk_size - position);
    if (!status.ok()) return ErrnoFrom(status.status(), "block status", position);
    // Through the backing chain: a hole is where every layer reads zeros,
    // as qemu-img map shows, so that cp --sparse keeps a copy sparse.
    bool hole = status->kind == BlockKind::kZero;
    bool found = whence == SEEK_DATA ? !hole : hole;
    if (found) {
      result = position;
      return 0;
    }
    if (status->length == 0) {
      Log(LOG_ERR, "block status at guest offset %" PRIu64 " returned an empty extent", position);
      return EIO;
    }
    position += std::min(status->length, disk_size - position);
  }
  // No data after offset; the end of the file counts as a hole.
  if (whence == SEEK_DATA) return ENXIO;
  result = disk_size;
  return 0;
}

// The .snapshots directory, unless the mount is a snapshot itself or the
// disk's own file is named like the directory (then it wins, said once).
std::unique_ptr<SnapshotDir> MakeSnapshotDir(Image& image, int image_path_fd,
                                             const FsConfig& config, uint32_t block_size) {
  if (!config.snapshot_dir) return nullptr;
  if (config.file_name == SnapshotDir::kDirName) {
    Log(LOG_WARNING, "the disk is named %s: snapshots are not shown", config.file_name.c_str());
    return nullptr;
  }
  return std::make_unique<SnapshotDir>(image, image_path_fd, config.file_name, config.read_only,
                                       block_size);
}

// Kernel cache lifetimes of the live disk and the root (seconds). The one
// name may be cached forever: it never changes. Attributes briefly, so that
// st_blocks follows the image as it fills up; sizes the kernel cannot know
// about do not exist, since every resize goes through this daemon and is
// answered with fresh attributes.
constexpr double kEntryTimeout = 86400.0;
constexpr double kAttrTimeout = 1.0;

}  // namespace

RawFileFs::RawFileFs(Image& image, int image_path_fd, FsConfig config)
    : image_(image),
      image_path_fd_(image_path_fd),
      config_(std::move(config)),
      has_backing_(!image.info().backing_file.empty()),
      block_size_(std::clamp<uint32_t>(image.info().cluster_size, 4096, 2u << 20)),
      // Streams of reads of 64 KiB or more; ten pieces of 1 MiB follow two
      // streams (each has the piece it reads and the next four).
      read_ahead_(
          [&image](uint64_t offset, std::span<std::byte> out) { return image.Read(offset, out); },
          64 << 10, kMaxWrite, 10),
      bank_(MakeSpaceBank(image, config_)),
      // Two threads: one writes to the disk while the other maps its piece.
      write_behind_(!bank_ ? nullptr
                           : std::make_unique<WriteBehind>(
                                 [this](uint64_t offset, std::span<const std::byte> data) {
                                   return Changing(offset, data.size(),
                                                   [&] { return image_.Write(offset, data); });
                                 },
                                 config_.write_behind_bytes, kMaxWrite, 2, bank_.get())),
      snapshots_(MakeSnapshotDir(image, image_path_fd, config_, block_size_)),
      commits_(!config_.read_only && config_.commit_interval.count() > 0) {
  if (commits_) {
    committer_ = std::thread([this] { CommitLoop(); });
  }
}

RawFileFs::~RawFileFs() { StopCommits(); }

void RawFileFs::StopCommits() {
  {
    MutexLock lk(commit_mu_);
    commit_stopping_ = true;
  }
  commit_wake_.NotifyAll();
  // The callers (Shutdown(), main, the destructor) run one after another,
  // never at once, so the one that finds the thread joinable joins it.
  if (committer_.joinable()) committer_.join();
}

bool RawFileFs::WantsFlush(int flags) const {
  return (commits_ || write_behind_) && (flags & O_ACCMODE) != O_RDONLY;
}

Status RawFileFs::DrainQueue() {
  if (!write_behind_) return Status();
  Status status = write_behind_->Drain();
  if (!status.ok()) {
    status = status.Annotate("writing queued data");
    background_failed_.store(true);
    MutexLock lk(commit_mu_);
    KeepCommitErrorLocked(status);
  }
  return status;
}

Status RawFileFs::FlushImage() {
  Status status = image_.Flush();
  // Metadata that writes allocated is written now, and may find the host
  // full: the bank's floor is there for it.
  if (status.ToErrno() == ENOSPC && bank_ && bank_->Release()) status = image_.Flush();
  return status;
}

Status RawFileFs::ApplyWrite(uint64_t offset, std::span<const std::byte> data) {
  WaitForQueued(offset, data.size());
  auto write = [&] { return image_.Write(offset, data); };
  Status status = Changing(offset, data.size(), write);
  // What the bank holds beyond the queued writes' needs is this writer's.
  if (status.ToErrno() == ENOSPC && bank_ && bank_->Trim()) {
    status = Changing(offset, data.size(), write);
  }
  return status;
}

Status RawFileFs::Commit(bool* queued_failed) {
  // Read first: every change counted by now is in the image or queued, and
  // Drain() and Flush() below cover it.
  const uint64_t changes = changes_.load();
  Status queued = DrainQueue();
  // Flushed even if a queued write failed: everything else is made durable.
  Status flushed = FlushImage();
  if (!queued.ok()) {
    if (queued_failed) *queued_failed = true;
    return queued;
  }
  if (!flushed.ok()) return flushed.Annotate("flushing the image");
  uint64_t committed = committed_.load();
  while (committed < changes && !committed_.compare_exchange_weak(committed, changes)) {}
  return Status::Ok();
}

void RawFileFs::CommitLoop() {
  bool failing = false;  // the last commit failed: log only changes of state
  MutexLock lk(commit_mu_);
  while (true) {
    // A timed wait, not a sleep: StopCommits() ends the wait at once.
    const auto due = std::chrono::steady_clock::now() + config_.commit_interval;
    while (!commit_stopping_ && std::chrono::steady_clock::now() < due) {
      commit_wake_.WaitUntil(commit_mu_, due);
    }
    if (commit_stopping_) return;
    // Idle mounts do no I/O. A failed commit leaves the count behind, so
    // the next interval tries again.
    if (changes_.load() == committed_.load()) continue;
    lk.Unlock();
    const auto started = std::chrono::steady_clock::now();
    bool queued_failed = false;
    Status status = Commit(&queued_failed);
    if (config_.debug) {
      std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - started;
      Log(LOG_DEBUG, "background commit %s in %.1f ms", status.ok() ? "done" : "failed",
          took.count());
    }
    lk.Lock();
    if (status.ok()) {
      if (failing) Log(LOG_INFO, "background commit works again");
      failing = false;
      continue;
    }
    if (!failing) {
      Log(LOG_ERR, "background commit failed (reported at the next fsync and close): %s",
          status.ToString().c_str());
    }
    failing = true;
    background_failed_.store(true);
    // A queued write's failure is kept by DrainQueue() already (and may
    // have been returned since): not twice.
    if (!queued_failed) KeepCommitErrorLocked(status);
  }
}

void RawFileFs::KeepCommitErrorLocked(const Status& failure) {
  if (fsync_error_.ok()) fsync_error_ = failure;
  if (flush_error_.ok()) flush_error_ = failure;
}

int RawFileFs::TakeCommitError(Reporter reporter) {
  MutexLock lk(commit_mu_);
  Status& slot = reporter == Reporter::kFsync ? fsync_error_ : flush_error_;
  Status error = std::move(slot);
  slot = Status();
  return error.ok() ? 0 : error.ToErrno();
}

Status RawFileFs::Changing(uint64_t offset, uint64_t length,
                           const std::function<Status()>& change) {
  read_ahead_.Invalidate(offset, length);
  Status status = change();
  read_ahead_.Invalidate(offset, length);
  return status;
}

void RawFileFs::WaitForQueued(uint64_t offset, uint64_t length) const {
  if (write_behind_) write_behind_->WaitFor(offset, length ? length : UINT64_MAX - offset);
}

void RawFileFs::ConfigureConnection(fuse_conn_info& conn) const noexcept {
  // libfuse 3.14 caps this at its request buffer (1 MiB) and derives the
  // kernel's max_pages from it, so large writes arrive in one request.
  conn.max_write = kMaxWrite;
  // The request pool gives every request a buffer of its own. Spliced
  // requests would instead sit in a pipe owned by the receiving thread.
  conn.want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_MOVE | FUSE_CAP_SPLICE_WRITE);
  // open(O_TRUNC) then arrives as a flag on OPEN, which Open() ignores: the
  // file is a disk, and `cp disk.raw /mnt/vm.raw` must fill it, not shrink
  // it to nothing first. Explicit truncate(2) still resizes via SETATTR.
  if (conn.capable & FUSE_CAP_ATOMIC_O_TRUNC) conn.want |= FUSE_CAP_ATOMIC_O_TRUNC;
  // This daemon is the image's only writer (it holds the lock), so cached
  // pages never go stale behind the kernel's back. The reported mtime is
  // the host file's and changes with every write; auto invalidation would
  // throw the page cache away each time the attributes are refreshed.
  conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  conn.max_background = config_.max_background;
  conn.congestion_threshold = std::max(1u, config_.max_background * 3 / 4);
}

void RawFileFs::Shutdown() {
  // No request runs any more: views left open (files still open at a lazy
  // unmount) close now, before the image does.
  if (snapshots_) snapshots_->CloseAll();
  // First, so that no commit runs during or after the last one.
  StopCommits();
  if (config_.read_only) return;
  // A failure marks the exit status (DrainQueue). Logged again, even if a
  // FLUSH or fsync reported it: the log then says the unmount lost data.
  Status status = DrainQueue();
  if (!status.ok()) {
    Log(LOG_ERR, "writing queued data at unmount failed: %s", status.ToString().c_str());
  }
  if (background_failed_.load()) {
    Log(LOG_ERR,
        "queued data or a background commit failed during this mount: "
        "data acknowledged to writers may be lost");
  }
  status = FlushImage();
  if (!status.ok()) {
    Log(LOG_ERR, "flushing the image at unmount failed: %s", status.ToString().c_str());
    background_failed_.store(true);
  }
}

int RawFileFs::Lookup(fuse_ino_t parent, std::string_view name, Entry& out) {
  if (InSnapshots(parent)) return snapshots_->Lookup(parent, name, out);
  if (parent != kRootIno) return parent == kFileIno ? ENOTDIR : ENOENT;
  if (snapshots_ && name == SnapshotDir::kDirName) return snapshots_->RootEntry(out);
  if (name != config_.file_name) return ENOENT;
  out = Entry{};
  out.ino = kFileIno;
  out.entry_timeout = kEntryTimeout;
  out.attr_timeout = kAttrTimeout;
  return FileAttr(out.attr);
}

int RawFileFs::GetAttr(fuse_ino_t ino, struct stat& attr, double& attr_timeout) {
  if (InSnapshots(ino)) return snapshots_->GetAttr(ino, attr, attr_timeout);
  attr_timeout = kAttrTimeout;
  if (ino == kRootIno) return RootAttr(attr);
  if (ino == kFileIno) return FileAttr(attr);
  return ENOENT;
}

int RawFileFs::FileAttr(struct stat& attr) const {
  struct stat host;
  if (fstat(image_path_fd_, &host) != 0) return errno;
  attr = {};
  attr.st_ino = kFileIno;
  // The guest disk is as accessible as the image file it lives in. Execute
  // bits make no sense on a disk, write bits none on a read-only mount.
  mode_t permissions = host.st_mode & 0666;
  if (config_.read_only) permissions &= ~mode_t{0222};
  attr.st_mode = S_IFREG | permissions;
  attr.st_nlink = 1;
  attr.st_uid = host.st_uid;
  attr.st_gid = host.st_gid;
  attr.st_size = static_cast<off_t>(image_.size());
  attr.st_blksize = static_cast<blksize_t>(block_size_);
  attr.st_blocks = static_cast<blkcnt_t>((image_.AllocatedBytes() + 511) / 512);
  attr.st_atim = host.st_atim;
  attr.st_mtim = host.st_mtim;
  attr.st_ctim = host.st_ctim;
  return 0;
}

int RawFileFs::RootAttr(struct stat& attr) const {
  struct stat host;
  if (fstat(image_path_fd_, &host) != 0) return errno;
  attr = {};
  attr.st_ino = kRootIno;
  // Nobody can create entries here, so the directory is never writable.
  attr.st_mode = S_IFDIR | 0555;
  attr.st_nlink = snapshots_ ? 3 : 2;
  attr.st_uid = host.st_uid;
  attr.st_gid = host.st_gid;
  attr.st_atim = host.st_atim;
  attr.st_mtim = host.st_mtim;
  attr.st_ctim = host.st_ctim;
  return 0;
}

int RawFileFs::CheckWritable(fuse_ino_t ino) const {
  if (InSnapshots(ino)) return SnapshotDir::IsFile(ino) ? EROFS : EISDIR;
  if (ino == kRootIno) return EISDIR;
  if (ino != kFileIno) return ENOENT;
  return config_.read_only ? EROFS : 0;
}

int RawFileFs::SetAttr(fuse_ino_t ino, const struct stat& wanted, int to_set, struct stat& attr,
                       double& attr_timeout) {
  if (InSnapshots(ino)) {
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) return EPERM;
    if (to_set & FUSE_SET_ATTR_SIZE) return CheckWritable(ino);
    // Times: accepted without effect, as on the live disk.
    return snapshots_->GetAttr(ino, attr, attr_timeout);
  }
  attr_timeout = kAttrTimeout;
  if (ino != kFileIno) return ino == kRootIno ? EPERM : ENOENT;
  // Owner and mode mirror the image file; change them there.
  if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
    return EPERM;
  }
  if (to_set & FUSE_SET_ATTR_SIZE) {
    if (int err = CheckWritable(ino)) return err;
    if (wanted.st_size < 0) return EINVAL;
    if (int err = Resize(static_cast<uint64_t>(wanted.st_size))) return err;
  }
  // Time changes (touch, cp -p) are accepted and have no effect: the times
  // shown are the image file's.
  return FileAttr(attr);
}

int RawFileFs::Resize(uint64_t new_size) {
  WaitForQueued(0, 0);
  if (new_size == image_.size()) return 0;
  struct Count {
    RawFileFs* fs;
    ~Count() { fs->Changed(); }
  } count{this};
  // Everything from the old or new end on changes (shrinking, then growing
  // again, brings back zeros); simpler to say everything.
  return ErrnoFrom(Changing(0, UINT64_MAX, [&] { return image_.Resize(new_size); }), "resize",
                   new_size);
}

int RawFileFs::Open(fuse_ino_t ino, int flags, uint64_t& handle) {
  handle = 0;
  if (InSnapshots(ino)) return snapshots_->Open(ino, flags, handle);
  if (ino == kRootIno) return EISDIR;
  if (ino != kFileIno) return ENOENT;
  if ((flags & O_ACCMODE) != O_RDONLY && config_.read_only) return EROFS;
  // O_TRUNC is deliberately ignored (see ConfigureConnection): like a block
  // device, the disk keeps its size when opened for overwriting.
  return 0;
}

void RawFileFs::Release(fuse_ino_t ino, uint64_t handle) {
  if (InSnapshots(ino) && SnapshotDir::IsFile(ino)) snapshots_->Release(handle);
}

int RawFileFs::OpenDir(fuse_ino_t ino, bool& cache_listing) const {
  // The root's listing never changes; .snapshots' does, and is cheap to
  // make again; a snapshot's own directory never changes either.
  cache_listing = ino != SnapshotDir::kDirIno;
  if (InSnapshots(ino)) return snapshots_->OpenDir(ino);
  if (ino == kFileIno) return ENOTDIR;
  return ino == kRootIno ? 0 : ENOENT;
}

int RawFileFs::ReadDir(fuse_ino_t ino, std::vector<DirEntry>& entries) {
  if (InSnapshots(ino)) return snapshots_->ReadDir(ino, entries);
  bool cache_listing;
  if (int err = OpenDir(ino, cache_listing)) return err;
  entries = {
      {".", kRootIno, S_IFDIR, 1},
      {"..", kRootIno, S_IFDIR, 2},
      {config_.file_name, kFileIno, S_IFREG, 3},
  };
  if (snapshots_) {
    entries.push_back({std::string(SnapshotDir::kDirName), SnapshotDir::kDirIno, S_IFDIR, 4});
  }
  return 0;
}

int RawFileFs::Read(fuse_ino_t ino, uint64_t handle, uint64_t offset, size_t size,
                    ReadBuffer& out) {
  out.size = 0;
  if (InSnapshots(ino)) {
    if (!SnapshotDir::IsFile(ino)) return EISDIR;
    // A snapshot never changes: no queue to wait for, and the kernel's
    // page cache and read-ahead serve repeated and sequential reads.
    Image& view = SnapshotDir::ViewOf(handle);
    const uint64_t view_size = view.size();
    if (offset >= view_size || size == 0) return 0;
    const size_t length =
        static_cast<size_t>(std::min<uint64_t>({size, view_size - offset, kMaxWrite}));
    std::byte* buffer = ThreadReadBuffer();
    if (buffer == nullptr) return ENOMEM;
    if (Status status = view.Read(offset, std::span(buffer, length)); !status.ok()) {
      return ErrnoFrom(status, "snapshot read", offset);
    }
    out.data = buffer;
    out.size = length;
    return 0;
  }
  if (ino != kFileIno) return ino == kRootIno ? EISDIR : ENOENT;
  uint64_t disk_size = image_.size();
  if (offset >= disk_size || size == 0) return 0;  // EOF
  // The kernel never asks for more than max_write (it is also the read
  // limit); the clamp keeps a bogus request from sizing our allocation.
  size_t length = static_cast<size_t>(std::min<uint64_t>({size, disk_size - offset, kMaxWrite}));
  std::byte* buffer = ThreadReadBuffer();
  if (buffer == nullptr) return ENOMEM;
  WaitForQueued(offset, length);
  Result<const std::byte*> bytes =
      read_ahead_.Read(offset, std::span(buffer, length), disk_size, out.pin);
  if (!bytes.ok()) return ErrnoFrom(bytes.status(), "read", offset);
  out.data = *bytes;
  out.size = length;
  return 0;
}

int RawFileFs::Write(fuse_ino_t ino, uint64_t offset, std::span<const std::byte> data,
                     size_t& written) {
  written = 0;
  if (int err = CheckWritable(ino)) return err;
  if (data.empty()) return 0;
  // Like a block device: the disk has a size, writes stop at it. A write
  // straddling the end is cut short; one entirely past it finds no space.
  uint64_t disk_size = image_.size();
  if (offset >= disk_size) return ENOSPC;
  size_t length = static_cast<size_t>(std::min<uint64_t>(data.size(), disk_size - offset));
  // Queued only if the host holds room for it; else (the host is full, or
  // nearly) applied now below, so that ENOSPC reaches this writer.
  if (write_behind_ && length >= kMinQueuedWrite &&
      write_behind_->Submit(offset, data.first(length))) {
    Changed();  // queued: the next commit's Drain() applies it
    written = length;
    return 0;
  }
  // The host is (nearly) full: queued writes first, so that this one does
  // not take the space they are to retry on; this writer gets the ENOSPC.
  if (bank_ && bank_->Short()) WaitForQueued(0, 0);
  Status status = ApplyWrite(offset, data.first(length));
  Changed();
  if (!status.ok()) return ErrnoFrom(status, "write", offset);
  written = length;
  return 0;
}

int RawFileFs::Fsync(fuse_ino_t ino) {
  if (InSnapshots(ino)) return 0;  // nothing of a snapshot is ever dirty
  if (ino != kFileIno) return ino == kRootIno ? 0 : ENOENT;
  if (config_.read_only) return 0;
  // A queued write that failed is reported here, as the page cache reports
  // writeback errors at fsync; the image is flushed either way. So is a
  // failed background commit (which may have found the failed write).
  // Runs alongside a background commit if one is under way: both only
  // drain and flush, which may overlap. A queued write's failure found by
  // this Commit() is in fsync_error_ too: returned once.
  Status status = Commit();
  if (int background = TakeCommitError(Reporter::kFsync)) return background;
  if (!status.ok()) return ErrnoFrom(status, "fsync", 0);
  return 0;
}

int RawFileFs::Flush(fuse_ino_t ino) {
  if (ino != kFileIno || config_.read_only) return 0;
  // As NFS does at close: wait for the data queued so far, so that a writer
  // that never fsyncs (cp) learns of a failure. Cheap when nothing is
  // queued. Nothing is flushed: close promises no durability.
  (void)DrainQueue();  // kept in flush_error_, taken below
  return TakeCommitError(Reporter::kFlush);
}

int RawFileFs::Fallocate(fuse_ino_t ino, int mode, uint64_t offset, uint64_t length) {
  if (int err = CheckWritable(ino)) return err;
  constexpr int kSupported = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
  if ((mode & ~kSupported) != 0) return EOPNOTSUPP;
  if (length == 0 || offset + length < offset) return EINVAL;
  uint64_t end = offset + length;
  WaitForQueued(offset, length);
  // Counted when done, on every path below.
  struct Count {
    RawFileFs* fs;
    ~Count() { fs->Changed(); }
  } count{this};
  uint64_t disk_size = image_.size();

  if (mode & FALLOC_FL_PUNCH_HOLE) {  // the kernel insists on KEEP_SIZE here
    if (offset >= disk_size) return 0;
    uint64_t span = std::min(end, disk_size) - offset;
    // Afterwards the range must read as zeros. Discard promises that only
    // when no backing file can show through the freed clusters; otherwise
    // zeroes are written, unmapping what the format allows.
    if (config_.discard && !has_backing_) {
      return ErrnoFrom(Changing(offset, span, [&] { return image_.Discard(offset, span); }),
                       "discard", offset);
    }
    return ErrnoFrom(
        Changing(offset, span, [&] { return image_.WriteZeroes(offset, span, config_.discard); }),
        "write zeroes", offset);
  }

  // Without KEEP_SIZE, allocating past the end grows the file, and so the
  // disk, as for any regular file.
  if (!(mode & FALLOC_FL_KEEP_SIZE) && end > disk_size) {
    if (int err = Resize(end)) return err;
    disk_size = end;
  }
  if (mode & FALLOC_FL_ZERO_RANGE) {
    if (offset >= disk_size) return 0;
    uint64_t span = std::min(end, disk_size) - offset;
    return ErrnoFrom(
        Changing(offset, span,
                 [&] { return image_.WriteZeroes(offset, span, /*may_unmap=*/false); }),
        "write zeroes", offset);
  }
  // Plain allocation: qcow2 allocates clusters when they are written, and
  // there is nothing to reserve ahead of that.
  return 0;
}

int RawFileFs::Lseek(fuse_ino_t ino, uint64_t handle, uint64_t offset, int whence,
                     uint64_t& result) {
  if (whence != SEEK_DATA && whence != SEEK_HOLE) return EINVAL;
  if (InSnapshots(ino)) {
    if (!SnapshotDir::IsFile(ino)) return EISDIR;
    return SeekDataOrHole(SnapshotDir::ViewOf(handle), offset, whence, result);
  }
  if (ino != kFileIno) return ino == kRootIno ? EISDIR : ENOENT;
  const uint64_t disk_size = image_.size();
  if (offset >= disk_size) return ENXIO;
  WaitForQueued(offset, disk_size - offset);
  return SeekDataOrHole(image_, offset, whence, result);
}

int RawFileFs::StatFs(struct statvfs& out) const {
  // The space that matters is the host's, where the image grows.
  if (fstatvfs(image_path_fd_, &out) != 0) return errno;
  return 0;
}

int RawFileFs::Mkdir(fuse_ino_t parent, std::string_view name, Entry& out) {
  if (parent == kFileIno || (InSnapshots(parent) && SnapshotDir::IsFile(parent))) return ENOTDIR;
  // Only snapshots can be made, and only in .snapshots.
  if (!snapshots_ || parent != SnapshotDir::kDirIno) return EPERM;
  if (config_.read_only) return EROFS;
  // Before any work: taking a snapshot flushes the image.
  if (snapshots_->Shows(name)) return EEXIST;
  // Every write acknowledged before this mkdir is in the image or queued;
  // draining the queue and flushing puts it all in the image, and on disk.
  // Writes that arrive meanwhile may or may not make it into the snapshot:
  // they were not acknowledged when mkdir started.
  Status committed = Commit();
  if (!committed.ok()) return ErrnoFrom(committed, "writing out before a snapshot", 0);
  int err = snapshots_->Take(name, out);
  Changed();  // the snapshot table and refcounts: the next commit covers them
  return err;
}

int RawFileFs::Rmdir(fuse_ino_t parent, std::string_view name) {
  if (parent == kRootIno) {
    if (name == config_.file_name) return ENOTDIR;
    return snapshots_ && name == SnapshotDir::kDirName ? EPERM : ENOENT;
  }
  if (!InSnapshots(parent)) return parent == kFileIno ? ENOTDIR : ENOENT;
  if (SnapshotDir::IsFile(parent)) return ENOTDIR;
  // Inside a snapshot's directory: only its file is there.
  if (parent != SnapshotDir::kDirIno) return name == config_.file_name ? ENOTDIR : ENOENT;
  if (config_.read_only) return EROFS;
  int err = snapshots_->Drop(name);
  if (err == 0) Changed();
  return err;
}

int RawFileFs::FsyncDir(fuse_ino_t ino) {
  if (ino != SnapshotDir::kDirIno || !snapshots_ || config_.read_only) return 0;
  Status status = Commit();
  if (int background = TakeCommitError(Reporter::kFsync)) return background;
  if (!status.ok()) return ErrnoFrom(status, "fsync", 0);
  return 0;
}

}  // namespace qcow2fs::fusefs
