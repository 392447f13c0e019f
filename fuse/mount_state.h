// What mount.qcow2fs and its unmount helper, umount.fuse.qcow2fs, know about
// mounts: the kernel's mount table, and a small state file per mount.
//
// The state file, /run/qcow2fs/<escaped mount point>, is written by the
// daemon once it is mounted and before the mounting command returns:
//
//     pid=1234
//     start=567890           (the pid's start time, /proc/PID/stat field 22)
//     dev=0:53               (the mount's device, as in mountinfo)
//     image=/srv/vm.qcow2
//     mountpoint=/mnt
//
// and, when the daemon is done (image flushed and closed, lock released),
// it appends
//
//     exit=0
//
// with its exit status, just before exiting. umount.fuse.qcow2fs unmounts,
// waits for the process to end and reports that status. `pid` with `start`
// identify the process even if its pid is reused; `dev` ties the file to
// the mount it describes (the same mount point may be mounted again later).
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

// One line of /proc/self/mountinfo, unescaped.
struct MountEntry {
  std::string dev;     // "major:minor"
  std::string target;  // mount point
  std::string fstype;  // "fuse.qcow2fs"
  std::string source;  // for qcow2fs, the image (fsname=)
};

// The topmost mount on `target` (an absolute, canonical path), if any.
std::optional<MountEntry> FindMount(const std::string& target);

// Whether `path` (a directory) is a mount point: the root of a mount, or a
// dead FUSE mount whose stat() fails with ENOTCONN. Other stat() failures
// are returned as errors.
Result<bool> IsMountPoint(const std::string& path);

// The start time of process `pid` (clock ticks after boot), if it exists.
std::optional<unsigned long long> ProcessStartTime(pid_t pid);

struct MountRecord {
  pid_t pid = 0;
  unsigned long long start = 0;
  std::string dev;
  std::string image;
  std::string mountpoint;
  std::optional<int> exit_status;  // set once the daemon is done
};

// /run/qcow2fs/<mountpoint with '%' and '/' escaped>.
std::string MountRecordPath(const std::string& mountpoint);

// Writes the record of a new mount (atomically: the file appears complete)
// and returns a descriptor on it, for AppendExitStatus(). Removes records
// of daemons that no longer run (killed) on the way.
Result<int> WriteMountRecord(const MountRecord& record);

// Appends "exit=STATUS" to the record open on `fd`.
void AppendExitStatus(int fd, int status);

// Removes the record file open on `fd` (if its path still names it). A
// helper that opened it before reads the status from its own descriptor.
void RemoveMountRecord(int fd, const std::string& mountpoint);

// Parses a record from an open descriptor (read from its start).
std::optional<MountRecord> ReadMountRecord(int fd);

// libmount's table of userspace mount options, /run/mount/utab. umount(8)
// learns a mount's full type ("fuse.qcow2fs", hence the helper
// /sbin/umount.fuse.qcow2fs) only from the kernel's mount table, and reads
// that only for mount points with a utab entry: otherwise statfs() says
// "fuse" and it would look for /sbin/umount.fuse. The entry,
//     SRC=IMAGE TARGET=MOUNTPOINT ROOT=/ OPTS=helper=fuse.qcow2fs
// also names the helper explicitly. Updates take libmount's lock.
Status AddUtabEntry(const std::string& source, const std::string& target);
// Removes the entry for `target`, only if it names `source` (if not empty).
void RemoveUtabEntry(const std::string& source, const std::string& target);

}  // namespace qcow2fs::fusefs
