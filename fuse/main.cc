// mount.qcow2fs: mounts a qcow2 image as a FUSE file system holding one file,
// the image's guest disk.
//
// This file is the lifecycle: parse the command line, fork (unless -f), open
// the image, mount, serve until unmounted or signalled, then flush and close
// the image so that its lock is released only when it is consistent.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <oneapi/tbb/task_arena.h>

#include "daemon.h"
#include "log.h"
#include "lowlevel_ops.h"
#include "mount_state.h"
#include "options.h"
#include "qcow2fs/image.h"
#include "raw_file_fs.h"
#include "request_pool.h"
#include "session.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

namespace qcow2fs::fusefs {
namespace {

// Exit statuses as mount(8) expects of helpers.
constexpr int kUsageError = 1;
constexpr int kMountFailure = 32;

// A file descriptor closed on scope exit.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// Termination requests arrive through a signalfd that the receive loop
// polls, rather than through handlers: blocked before any thread exists,
// the signals stay blocked in all of them and nothing runs asynchronously.
Result<int> BlockStopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGHUP);
  if (int err = pthread_sigmask(SIG_BLOCK, &set, nullptr)) {
    return Status::FromErrno(err, "blocking signals");
  }
  // A closed syslog socket must not kill the daemon.
  signal(SIGPIPE, SIG_IGN);
  int fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd < 0) return Status::FromErrno(errno, "signalfd");
  return fd;
}

// When a loop device or a file system sits on the mounted file, the kernel
// may need this daemon to finish writes in order to free memory. Marking it
// an I/O flusher keeps its own allocations from waiting on that writeback,
// which would deadlock. Needs CAP_SYS_RESOURCE; threads created afterwards
// inherit it, so it is set before any exist.
void BecomeIoFlusher(bool debug) {
  if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 && debug) {
    Log(LOG_DEBUG, "PR_SET_IO_FLUSHER not set: %s", std::strerror(errno));
  }
}

Status CheckFuseDevice() {
  int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
  if (fd >= 0) {
    close(fd);
    return Status::Ok();
  }
  int err = errno;
  if (err == ENOENT || err == ENODEV || err == ENXIO) {
    return Status(ErrorCode::kNotFound,
                  "/dev/fuse is missing; is the fuse module loaded "
                  "(modprobe fuse)?");
  }
  // Unprivileged users mount through fusermount3, which opens it itself.
  return Status::Ok();
}

bool IsPassedFuseFd(const std::string& mountpoint) {
  // mount.fuse3 -o drop_privileges mounts itself and hands over /dev/fd/N.
  return mountpoint.starts_with("/dev/fd/");
}

// A directory that is already a mount point (a live one, or a FUSE mount
// whose daemon died) is refused unless `nonempty`: a second mount would
// hide the first, and unmounting would then remove the wrong one.
Status CheckMountpoint(const std::string& mountpoint, bool nonempty) {
  if (IsPassedFuseFd(mountpoint)) return Status::Ok();
  Result<bool> is_mount = IsMountPoint(mountpoint);
  if (!is_mount.ok()) return is_mount.status();
  if (*is_mount && !nonempty) {
    struct stat st;
    const bool dead = stat(mountpoint.c_str(), &st) != 0 && errno == ENOTCONN;
    return Status(ErrorCode::kInvalidArgument,
                  "mount point " + mountpoint + " is busy: " +
                      (dead ? "a FUSE mount whose daemon is gone is there (remove it "
                              "with fusermount3 -uz, or mount over it with -o nonempty)"
                            : "already a mount point (unmount it first, or mount over "
                              "it with -o nonempty)"));
  }
  struct stat st;
  if (stat(mountpoint.c_str(), &st) != 0) {
    return Status::FromErrno(errno, "mount point " + mountpoint);
  }
  if (!S_ISDIR(st.st_mode)) {
    return Status(ErrorCode::kInvalidArgument, "mount point " + mountpoint + " is not a directory");
  }
  return Status::Ok();
}

// The mount point as the mount table names it (symbolic links resolved).
std::string Canonical(const std::string& path) {
  char* real = realpath(path.c_str(), nullptr);
  if (real == nullptr) return path;
  std::string canonical(real);
  free(real);
  return canonical;
}

// Records the mount for umount.fuse.qcow2fs (see mount_state.h). Returns
// the record's descriptor, -1 if there is none (not root: no /run/qcow2fs).
int RecordMount(const std::string& image_path, const std::string& mountpoint,
                const FuseSession& session) {
  if (IsPassedFuseFd(mountpoint) || session.device().empty()) return -1;
  MountRecord record;
  record.pid = getpid();
  record.start = ProcessStartTime(record.pid).value_or(0);
  record.dev = session.device();
  record.image = image_path;
  record.mountpoint = mountpoint;
  Result<int> fd = WriteMountRecord(record);
  if (!fd.ok()) {
    if (geteuid() == 0) {
      Log(LOG_WARNING, "umount will not wait for this daemon: %s", fd.status().message().c_str());
    }
    return -1;
  }
  if (Status s = AddUtabEntry(image_path, mountpoint); !s.ok()) {
    Log(LOG_WARNING, "umount will not wait for this daemon: %s", s.message().c_str());
  }
  return *fd;
}

// After Daemon::Ready() the working directory is /, and libfuse keeps the
// mount point for unmounting: both paths must be absolute.
std::string Absolute(const std::string& path) {
  std::error_code error;
  std::filesystem::path absolute = std::filesystem::absolute(path, error);
  return error ? path : absolute.lexically_normal().string();
}

Status CreateImageIfMissing(const std::string& path, const MountOptions& options) {
  if (!options.create) return Status::Ok();
  struct stat st;
  if (stat(path.c_str(), &st) == 0) return Status::Ok();
  if (errno != ENOENT) return Status::FromErrno(errno, path);
  Status status = Image::Create(path, options.create_options);
  if (!status.ok()) return status.Annotate("cannot create " + path);
  Log(LOG_INFO, "created %s", path.c_str());
  return Status::Ok();
}

std::vector<std::string> KernelMountOptions(const std::string& image_path,
                                            const MountOptions& options, bool read_only) {
  std::vector<std::string> kernel = {
      "fsname=" + image_path,  // the source column of /proc/mounts
      "subtype=qcow2fs",       // the type reads fuse.qcow2fs
      // The kernel checks the file's mode and owner, which mirror the image
      // file's: with allow_other, users get the access the image gives them.
      "default_permissions",
  };
  if (options.allow_other) kernel.emplace_back("allow_other");
  if (read_only) kernel.emplace_back("ro");
  kernel.insert(kernel.end(), options.kernel_flags.begin(), options.kernel_flags.end());
  return kernel;
}

// Reports why the loop stopped, if a signal was the reason.
void LogStopSignal(int signal_fd) {
  signalfd_siginfo info;
  if (read(signal_fd, &info, sizeof(info)) == sizeof(info)) {
    const char* name = sigabbrev_np(static_cast<int>(info.ssi_signo));
    Log(LOG_INFO, "received SIG%s, unmounting", name != nullptr ? name : "?");
  }
}

// Creates the image if asked to, then opens it as the mount will use it.
Result<std::unique_ptr<Image>> OpenImage(const std::string& image_path, const MountOptions& options,
                                         oneapi::tbb::task_arena& compress_arena) {
  struct stat existing;
  const bool existed = options.create && stat(image_path.c_str(), &existing) == 0;
  QCOW2FS_RETURN_IF_ERROR(CreateImageIfMissing(image_path, options));
  OpenOptions open_options;
  open_options.read_only = options.read_only;
  open_options.l2_cache_bytes = options.cache_bytes;
  open_options.lock = options.lock;
  open_options.direct_io = !options.host_cache;
  open_options.snapshot = options.snapshot;
  open_options.compress = options.compress;
  open_options.compress_cache_bytes = options.compress_cache_bytes;
  // Compression of completed clusters runs on its own oneTBB arena, one
  // slot per CPU: a single writer (cp) keeps every CPU compressing, and the
  // request workers are never all tied up in compression.
  open_options.compress_executor = [&compress_arena](std::function<void()> job) {
    compress_arena.enqueue(std::move(job));
  };
  open_options.format = "qcow2";
  Result<std::unique_ptr<Image>> opened = Image::Open(image_path, open_options);
  // An image the user may read but not write (mode, immutable flag,
  // read-only file system) is mounted read-only, as mount(8) does with a
  // write-protected device. If the retry fails too, the first error stands.
  const int open_errno = opened.ok() ? 0 : opened.status().sys_errno();
  bool fell_back = false;
  if (!options.read_only && (open_errno == EACCES || open_errno == EPERM || open_errno == EROFS)) {
    open_options.read_only = true;
    open_options.compress.reset();
    Result<std::unique_ptr<Image>> retry = Image::Open(image_path, open_options);
    if (retry.ok()) {
      Log(LOG_WARNING, "%s is not writable (%s); mounting read-only", image_path.c_str(),
          std::strerror(open_errno));
      opened = std::move(retry);
      fell_back = true;
    }
  }
  if (!opened.ok()) {
    // The core's messages name the file and what is wrong with it.
    return Status(opened.status().code(), opened.status().ToString());
  }
  for (const std::string& warning : opened.value()->info().warnings) {
    Log(LOG_WARNING, "%s: %s", image_path.c_str(), warning.c_str());
  }
  if (existed) {
    std::string warning = ExistingImageWarning(image_path, options, opened.value()->info());
    if (!warning.empty()) Log(LOG_WARNING, "%s", warning.c_str());
  }
  if (opened.value()->read_only() && !options.read_only && !fell_back) {
    Log(LOG_WARNING, "%s: opened read-only, mounting read-only", image_path.c_str());
  }
  return opened;
}

// Closes the image the way that keeps it consistent: after the mount is
// gone (nothing can write behind the flush), flush, then close, which
// releases the lock. Returns whether the final flush worked.
bool CloseImage(std::unique_ptr<Image> image, const std::string& image_path) {
  bool flushed = true;
  if (!image->read_only()) {
    Status status = image->Flush();
    if (!status.ok()) {
      Log(LOG_ERR, "final flush of %s failed: %s", image_path.c_str(), status.ToString().c_str());
      flushed = false;
    }
  }
  // From here on `flock IMAGE true` returns and other programs may open it.
  image.reset();
  return flushed;
}

// Everything after the command line: returns the exit status.
int Run(const CommandLine& line) {
  const MountOptions& options = line.options;
  const std::string image_path = Absolute(line.image);
  std::string mountpoint =
      IsPassedFuseFd(line.mountpoint) ? line.mountpoint : Absolute(line.mountpoint);

  std::optional<Daemon> daemon;
  if (!line.foreground) {
    Result<Daemon> started = Daemon::Start();
    if (!started.ok()) {
      Log(LOG_ERR, "%s", started.status().message().c_str());
      return kMountFailure;
    }
    daemon.emplace(std::move(started).value());
  }

  // From here on this process is the file system. Until Ready(), a failure
  // is one line on the terminal and the waiting parent exits with it.
  auto fail = [](const Status& status) {
    Log(LOG_ERR, "%s", status.message().c_str());
    return kMountFailure;
  };
  Result<int> signal_fd_or = BlockStopSignals();
  if (!signal_fd_or.ok()) return fail(signal_fd_or.status());
  UniqueFd signal_fd(*signal_fd_or);
  BecomeIoFlusher(line.debug);

  if (Status s = CheckFuseDevice(); !s.ok()) return fail(s);
  if (Status s = CheckMountpoint(mountpoint, options.nonempty); !s.ok()) return fail(s);
  if (!IsPassedFuseFd(mountpoint)) mountpoint = Canonical(mountpoint);
  // Declared before the image, which may still hand it work while closing.
  const unsigned compress_workers = std::max(1u, std::thread::hardware_concurrency());
  oneapi::tbb::task_arena compress_arena(static_cast<int>(compress_workers), 0);
  Result<std::unique_ptr<Image>> opened = OpenImage(image_path, options, compress_arena);
  if (!opened.ok()) return fail(opened.status());
  std::unique_ptr<Image> image = std::move(opened).value();
  const bool read_only = image->read_only();

  // O_PATH: see RawFileFs. The core has the image open; this only stats it.
  UniqueFd image_path_fd(open(image_path.c_str(), O_PATH | O_CLOEXEC));
  if (image_path_fd.get() < 0) {
    return fail(Status::FromErrno(errno, image_path));
  }

  // Each worker has one request at a time in flight to the host disk, so
  // the default is well above the CPU count: random reads scale with it
  // (4 -> 16 workers: +30 % IOPS on 2 CPUs). Memory stays bounded: a 1 MiB
  // request buffer and at most a 1 MiB reply per worker.
  const unsigned threads = options.threads != 0
                               ? options.threads
                               : std::max(16u, 4 * std::thread::hardware_concurrency());
  const unsigned max_in_flight = threads;

  FsConfig config;
  config.file_name = options.filename;
  config.read_only = read_only;
  config.discard = options.discard;
  config.debug = line.debug;
  config.max_background = max_in_flight;
  // Compressed writes are staged by the core already.
  config.write_behind_bytes = options.compress ? 0 : options.write_behind_bytes;
  config.commit_interval = std::chrono::seconds(options.commit_seconds);
  config.snapshot_dir = !options.snapshot.has_value();
  RawFileFs fs(*image, image_path_fd.get(), config);

  Result<std::unique_ptr<FuseSession>> created =
      FuseSession::Create(KernelMountOptions(image_path, options, read_only), LowLevelOps(), &fs);
  if (!created.ok()) return fail(created.status());
  std::unique_ptr<FuseSession> session = std::move(created).value();
  if (Status s = session->Mount(mountpoint); !s.ok()) return fail(s);

  RequestPool pool(threads, compress_workers, RawFileFs::kMaxWrite);
  // Before the mounting command returns, so that an umount right after it
  // finds the record and waits for this process.
  UniqueFd record_fd(RecordMount(image_path, mountpoint, *session));
  if (daemon) daemon->Ready();
  Log(LOG_INFO, "mounted %s on %s (%s, %u threads)", image_path.c_str(), mountpoint.c_str(),
      read_only ? "read-only" : "read-write", threads);

  int exit_code = 0;
  // On a signal: stop receiving, detach the mount point with /dev/fuse
  // still open, answer what was read (see RequestPool::Serve). /dev/fuse
  // is closed by session.reset() below, after every worker is done.
  Status served = pool.Serve(session->get(), signal_fd.get(), [&session] { session->Detach(); });
  if (!served.ok()) {
    Log(LOG_ERR, "%s", served.message().c_str());
    exit_code = 1;
  }
  LogStopSignal(signal_fd.get());

  // Destroys the session, which runs RawFileFs::Shutdown (stops the commit
  // thread, applies queued writes, a first flush) and then closes
  // /dev/fuse: requests the workers never read fail in the kernel, and a
  // mount only detached (a file was still open) is dead from here on.
  // Nothing calls into `fs` after this (StopCommits() makes sure of the
  // commit thread, should the kernel never have sent INIT), so the image
  // can go before it.
  session.reset();
  fs.StopCommits();
  // A background commit, or writing queued data at unmount, failed: data
  // acknowledged to a writer may be lost, even if the last flush works.
  if (fs.BackgroundFailed()) exit_code = 1;
  if (!CloseImage(std::move(image), image_path)) exit_code = 1;
  FlushLogSummaries();  // counts of errors held back, before the last line
  Log(LOG_INFO, "unmounted %s", mountpoint.c_str());
  // The last thing before exiting: umount.fuse.qcow2fs reports it.
  if (record_fd.get() >= 0) {
    RemoveUtabEntry(image_path, mountpoint);
    AppendExitStatus(record_fd.get(), exit_code);
    RemoveMountRecord(record_fd.get(), mountpoint);
  }
  return exit_code;
}

int Main(int argc, char** argv) {
  InitLog("mount.qcow2fs");
  std::vector<const char*> args(argv + 1, argv + argc);
  Result<CommandLine> parsed = ParseCommandLine(args);
  if (!parsed.ok()) {
    Log(LOG_ERR, "%s (see --help)", parsed.status().message().c_str());
    return kUsageError;
  }
  if (parsed->help) {
    std::fputs(UsageText().c_str(), stdout);
    return 0;
  }
  if (parsed->version) {
    std::printf("mount.qcow2fs %s (libfuse %d)\n", QCOW2FS_VERSION, fuse_version());
    return 0;
  }
  // Opened here, before daemonizing: relative to the caller's directory,
  // and a bad path fails the mount on the terminal.
  if (!parsed->options.log_file.empty()) {
    if (Status s = LogToFile(parsed->options.log_file); !s.ok()) {
      Log(LOG_ERR, "%s", s.message().c_str());
      return kMountFailure;
    }
  }
  for (const std::string& warning : parsed->options.warnings) {
    Log(LOG_WARNING, "%s", warning.c_str());
  }
  return Run(*parsed);
}

}  // namespace
}  // namespace qcow2fs::fusefs

int main(int argc, char** argv) {
  // The catch-all for the whole program: nothing thrown may end it through
  // std::terminate, and running out of memory is a plain error.
  try {
    return qcow2fs::fusefs::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    qcow2fs::fusefs::Log(LOG_ERR, "out of memory");
  } catch (const std::exception& e) {
    qcow2fs::fusefs::Log(LOG_ERR, "internal error: %s", e.what());
  } catch (...) {
    qcow2fs::fusefs::Log(LOG_ERR, "internal error: unknown exception");
  }
  return qcow2fs::fusefs::kMountFailure;
}
