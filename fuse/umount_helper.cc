// umount.fuse.qcow2fs: the unmount helper umount(8) runs for fuse.qcow2fs
// mounts (libmount looks for /sbin/umount.<type> before unmounting itself).
//
//     umount.fuse.qcow2fs {DIRECTORY} [-flnrv] [-N NAMESPACE] [-t TYPE]
//
// It unmounts, then waits until the daemon serving the mount has applied
// queued writes, flushed and closed the image and exited, so that
// `umount /mnt && qemu-img check vm.qcow2` works. Its exit status is 0 when
// the daemon's final flush worked, the daemon's (1) when it did not (or
// when the daemon died without one), 32 when the unmount itself failed
// (busy, not mounted), as umount(8) exits.
//
// With -l (lazy), it returns after detaching: the file system ends only
// when its last user (an open file, a loop device) goes, which may be
// never. Mounts without a record of their daemon (mounted by a user, or by
// an older mount.qcow2fs) are waited for through the image's lock.
#include <fcntl.h>
#include <poll.h>
#include <sys/file.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>

#include "mount_state.h"

namespace qcow2fs::fusefs {
namespace {

constexpr int kUsage = 1;
constexpr int kFailure = 32;  // umount(8): unmount failed
constexpr const char kName[] = "umount.fuse.qcow2fs";

// How long to wait quietly before saying what is being waited for.
constexpr int kQuietMs = 5000;

int PidfdOpen(pid_t pid) { return static_cast<int>(syscall(SYS_pidfd_open, pid, 0)); }

struct Args {
  std::string target;
  bool lazy = false;
  bool force = false;
  bool verbose = false;
};

int Usage() {
  std::fprintf(stderr, "usage: %s DIRECTORY [-flnrv] [-t TYPE]\n", kName);
  return kUsage;
}

std::optional<Args> Parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; i++) {
    std::string arg = argv[i];
    if (arg == "-t" || arg == "-N") {
      if (++i >= argc) return std::nullopt;
      if (arg == "-N") {
        std::fprintf(stderr, "%s: -N (other mount namespaces) is not supported\n", kName);
        return std::nullopt;
      }
      continue;
    }
    if (arg.size() > 1 && arg[0] == '-') {
      for (char c : arg.substr(1)) {
        switch (c) {
          case 'l':
            args.lazy = true;
            break;
          case 'f':
            args.force = true;
            break;
          case 'v':
            args.verbose = true;
            break;
          case 'n':
          case 'r':
          case 'i':
          case 'd':
            break;  // nothing to do here
          default:
            std::fprintf(stderr, "%s: unknown option -%c\n", kName, c);
            return std::nullopt;
        }
      }
      continue;
    }
    if (!args.target.empty()) return std::nullopt;
    args.target = arg;
  }
  if (args.target.empty()) return std::nullopt;
  // libmount passes the target as the mount table has it; make sure.
  std::error_code error;
  std::filesystem::path absolute = std::filesystem::absolute(args.target, error);
  if (!error) args.target = absolute.lexically_normal().string();
  if (args.target.size() > 1 && args.target.back() == '/') args.target.pop_back();
  return args;
}

// Waits for process `pidfd` to end, saying so if that takes a while.
void WaitForExit(int pidfd, pid_t pid, const std::string& image) {
  pollfd fd{pidfd, POLLIN, 0};
  int timeout = kQuietMs;
  while (true) {
    int ready = poll(&fd, 1, timeout);
    if (ready > 0) return;
    if (ready < 0 && errno != EINTR) return;
    if (ready == 0 && timeout > 0) {
      std::fprintf(stderr, "%s: waiting for mount.qcow2fs (pid %d) to flush and close %s\n", kName,
                   static_cast<int>(pid), image.c_str());
      timeout = -1;
    }
  }
}

// For mounts without a record: the daemon holds a lock on the image until
// it has closed it.
void WaitForImageLock(const std::string& image) {
  int fd = open(image.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return;
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
    while (flock(fd, LOCK_SH) != 0 && errno == EINTR) {}
  }
  close(fd);
}

int Run(const Args& args) {
  std::optional<MountEntry> mount = FindMount(args.target);
  if (!mount) {
    std::fprintf(stderr, "umount: %s: not mounted.\n", args.target.c_str());
    return kFailure;
  }

  // The daemon's record, if it is this mount's: open before unmounting, so
  // that the daemon's final line is read from this very file.
  const std::string record_path = MountRecordPath(args.target);
  int record_fd = open(record_path.c_str(), O_RDONLY | O_CLOEXEC);
  std::optional<MountRecord> record;
  if (record_fd >= 0) {
    record = ReadMountRecord(record_fd);
    if (record && (record->dev != mount->dev || record->mountpoint != args.target)) {
      record.reset();  // left by an earlier mount on the same directory
    }
  }
  int pidfd = -1;
  if (record && !record->exit_status) {
    pidfd = PidfdOpen(record->pid);
    // The pid may have been reused since: the start time tells.
    if (pidfd >= 0 && ProcessStartTime(record->pid) != record->start) {
      close(pidfd);
      pidfd = -1;
    }
  }

  int flags = UMOUNT_NOFOLLOW;
  if (args.lazy) flags |= MNT_DETACH;
  if (args.force) flags |= MNT_FORCE;
  if (umount2(args.target.c_str(), flags) != 0) {
    int err = errno;
    if (err == EBUSY) {
      std::fprintf(stderr, "umount: %s: target is busy.\n", args.target.c_str());
    } else {
      std::fprintf(stderr, "umount: %s: %s\n", args.target.c_str(), std::strerror(err));
    }
    return kFailure;
  }
  if (args.verbose) std::printf("umount: %s unmounted\n", args.target.c_str());
  // umount(8) leaves utab to helpers that fail; the daemon may be dead.
  RemoveUtabEntry(mount->source, args.target);
  if (args.lazy) return 0;

  if (!record) {
    WaitForImageLock(mount->source);
    return 0;
  }
  if (pidfd >= 0) {
    WaitForExit(pidfd, record->pid, record->image);
    close(pidfd);
  }
  std::optional<MountRecord> final_record = ReadMountRecord(record_fd);
  // The daemon removes it when it ends; not if it was killed.
  RemoveMountRecord(record_fd, args.target);
  close(record_fd);
  if (!final_record || !final_record->exit_status) {
    std::fprintf(stderr,
                 "%s: mount.qcow2fs (pid %d) ended without closing %s cleanly; "
                 "check it with qemu-img check\n",
                 kName, static_cast<int>(record->pid), record->image.c_str());
    return 1;
  }
  if (*final_record->exit_status != 0) {
    std::fprintf(stderr,
                 "%s: writing %s back failed at unmount (see the system log); "
                 "data written to the mount may be lost\n",
                 kName, record->image.c_str());
    return *final_record->exit_status;
  }
  return 0;
}

}  // namespace
}  // namespace qcow2fs::fusefs

int main(int argc, char** argv) {
  std::optional<qcow2fs::fusefs::Args> args = qcow2fs::fusefs::Parse(argc, argv);
  if (!args) return qcow2fs::fusefs::Usage();
  return qcow2fs::fusefs::Run(*args);
}
