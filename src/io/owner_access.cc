// Per-thread file-system credentials around an open. See owner_access.h.
#include "io/owner_access.h"

#include <grp.h>
#include <pwd.h>
#include <sys/fsuid.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace qcow2fs {
namespace {

// glibc's setgroups() changes every thread; the raw syscall only this one,
// which is what a per-open switch needs.
int SetThreadGroups(const std::vector<gid_t>& groups) {
  return static_cast<int>(::syscall(SYS_setgroups, groups.size(), groups.data()));
}

}  // namespace

std::optional<FileOwner> ForeignOwnerOf(int fd) {
  struct stat st;
  if (::geteuid() != 0 || fd < 0 || ::fstat(fd, &st) != 0 || st.st_uid == 0) {
    return std::nullopt;
  }
  FileOwner owner;
  owner.uid = st.st_uid;
  owner.gid = st.st_gid;
  // The owner's groups as a login would have them; a uid unknown to the
  // user database gets its file's group only.
  std::vector<char> buffer(16384);
  struct passwd pw, *found = nullptr;
  if (::getpwuid_r(st.st_uid, &pw, buffer.data(), buffer.size(), &found) == 0 && found) {
    owner.gid = pw.pw_gid;
    int count = 64;
    std::vector<gid_t> groups(static_cast<size_t>(count));
    if (::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &count) < 0) {
      groups.resize(static_cast<size_t>(count));
      ::getgrouplist(pw.pw_name, pw.pw_gid, groups.data(), &count);
    }
    groups.resize(static_cast<size_t>(count));
    owner.groups = std::move(groups);
  } else {
    owner.groups = {st.st_gid};
  }
  return owner;
}

Result<std::unique_ptr<File>> OpenAsOwner(
    const FileOwner& owner, const std::function<Result<std::unique_ptr<File>>()>& open) {
  std::vector<gid_t> saved_groups(static_cast<size_t>(::getgroups(0, nullptr)));
  if (::getgroups(static_cast<int>(saved_groups.size()), saved_groups.data()) < 0) {
    return Status::FromErrno(errno, "reading the supplementary groups");
  }
  const uid_t saved_uid = static_cast<uid_t>(::setfsuid(static_cast<uid_t>(-1)));
  const gid_t saved_gid = static_cast<gid_t>(::setfsgid(static_cast<gid_t>(-1)));
  if (SetThreadGroups(owner.groups) != 0) {
    return Status::FromErrno(errno, "taking the image owner's groups");
  }
  ::setfsgid(owner.gid);
  ::setfsuid(owner.uid);
  Result<std::unique_ptr<File>> file = open();
  ::setfsuid(saved_uid);
  ::setfsgid(saved_gid);
  (void)SetThreadGroups(saved_groups);
  if (!file.ok() && file.status().sys_errno() == EACCES) {
    return Status(file.status().code(),
                  file.status().message() + " (opened with the rights of the image's owner, uid " +
                      std::to_string(owner.uid) + ")",
                  EACCES);
  }
  return file;
}

}  // namespace qcow2fs
