// Ownership of a libfuse low-level session and of its mount.
//
// Wraps fuse_session_new/mount/unmount/destroy so that every exit path,
// including errors half-way through start-up, unmounts and frees in the
// right order.
#pragma once

#include <fuse_lowlevel.h>

#include <memory>
#include <string>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

class FuseSession {
 public:
  // `mount_options` are libfuse -o options (fsname=, ro, allow_other, ...).
  // `userdata` is what fuse_req_userdata() returns in the callbacks.
  static Result<std::unique_ptr<FuseSession>> Create(const std::vector<std::string>& mount_options,
                                                     const fuse_lowlevel_ops& ops, void* userdata);

  FuseSession(const FuseSession&) = delete;
  FuseSession& operator=(const FuseSession&) = delete;
  // Unmounts if still mounted, then destroys the session, which calls the
  // file system's destroy() if the kernel had initialised it.
  ~FuseSession();

  Status Mount(const std::string& mountpoint);
  // Lazily detaches the mount if it is still there and closes /dev/fuse.
  // Requests still queued in the kernel fail with ENOTCONN. Only for when
  // no worker reads /dev/fuse (start-up failures): a worker would reply to
  // a closed descriptor.
  void Unmount();
  // Lazily detaches the mount point, keeping /dev/fuse open: no new opens
  // reach the file system, and once no file is open the kernel ends the
  // connection (reads of /dev/fuse return ENODEV). Detaches only this
  // session's mount, and only if it is still the topmost one there. Safe
  // while workers serve requests. Destroying the session closes /dev/fuse.
  void Detach();

  // The mount's device in /proc/self/mountinfo ("major:minor"), once mounted.
  const std::string& device() const { return device_; }

  fuse_session* get() const { return session_; }

 private:
  explicit FuseSession(fuse_session* session) : session_(session) {}

  fuse_session* session_;
  bool mounted_ = false;
  std::string mountpoint_;
  std::string device_;
};

}  // namespace qcow2fs::fusefs
