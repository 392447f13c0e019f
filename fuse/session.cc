// libfuse session lifetime. See session.h.
#include "session.h"

#include <spawn.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "log.h"
#include "mount_state.h"

extern char** environ;

namespace qcow2fs::fusefs {
namespace {

// fuse_opt splits -o lists at commas; a literal comma (say, in the image
// path used as fsname) must be escaped, and so must the escape character.
std::string EscapeOption(const std::string& option) {
  std::string escaped;
  for (char c : option) {
    if (c == ',' || c == '\\') escaped += '\\';
    escaped += c;
  }
  return escaped;
}

}  // namespace

Result<std::unique_ptr<FuseSession>> FuseSession::Create(
    const std::vector<std::string>& mount_options, const fuse_lowlevel_ops& ops, void* userdata) {
  std::string joined;
  for (const std::string& option : mount_options) {
    if (!joined.empty()) joined += ',';
    joined += EscapeOption(option);
  }
  // fuse_args wants mutable C strings; these live until fuse_session_new
  // has copied what it keeps.
  std::string program = "qcow2fs";
  std::string dash_o = "-o";
  std::vector<char*> argv = {program.data(), dash_o.data(), joined.data(), nullptr};
  fuse_args args = FUSE_ARGS_INIT(3, argv.data());

  LibfuseErrorCapture capture;
  fuse_session* session = fuse_session_new(&args, &ops, sizeof(ops), userdata);
  fuse_opt_free_args(&args);
  if (session == nullptr) {
    return Status(ErrorCode::kInvalidArgument,
                  "cannot set up the FUSE session: " + capture.errors());
  }
  return std::unique_ptr<FuseSession>(new FuseSession(session));
}

FuseSession::~FuseSession() {
  Unmount();
  fuse_session_destroy(session_);
}

Status FuseSession::Mount(const std::string& mountpoint) {
  LibfuseErrorCapture capture;
  if (fuse_session_mount(session_, mountpoint.c_str()) != 0) {
    std::string cause = capture.errors();
    return Status(ErrorCode::kIoError,
                  "cannot mount on " + mountpoint + (cause.empty() ? std::string() : ": " + cause));
  }
  mounted_ = true;
  // mount.fuse3 -o drop_privileges passes /dev/fd/N: no path to unmount.
  if (!mountpoint.starts_with("/dev/fd/")) {
    mountpoint_ = mountpoint;
    if (std::optional<MountEntry> entry = FindMount(mountpoint);
        entry && entry->fstype.starts_with("fuse")) {
      device_ = entry->dev;
    }
  }
  return Status::Ok();
}

void FuseSession::Detach() {
  if (!mounted_) return;
  // Unmount() (and libfuse) must not unmount or close anything after this.
  mounted_ = false;
  if (mountpoint_.empty()) return;
  std::optional<MountEntry> entry = FindMount(mountpoint_);
  // Already gone, or covered by another mount (which must stay).
  if (!entry || !entry->fstype.starts_with("fuse") || (!device_.empty() && entry->dev != device_)) {
    return;
  }
  if (geteuid() == 0) {
    if (umount2(mountpoint_.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW) != 0) {
      Log(LOG_WARNING, "cannot detach %s: %s", mountpoint_.c_str(), std::strerror(errno));
    }
    return;
  }
  // Users unmount through the setuid helper, which needs no descriptor.
  const char* argv[] = {"fusermount3", "-u", "-q", "-z", "--", mountpoint_.c_str(), nullptr};
  pid_t pid;
  if (posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char**>(argv), environ) != 0) {
    Log(LOG_WARNING, "cannot run fusermount3 to detach %s", mountpoint_.c_str());
    return;
  }
  int status;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
}

void FuseSession::Unmount() {
  if (!mounted_) return;
  mounted_ = false;
  fuse_session_unmount(session_);
}

}  // namespace qcow2fs::fusefs
