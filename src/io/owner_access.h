// Opening the files an image names (backing files, external data files)
// with the rights of the image's owner.
//
// When root mounts an image that belongs to an ordinary user, the names
// inside it are the user's choice: followed with root's rights, an image
// could name /root/secret as its backing file and let anyone who can read
// the mount read it. So the daemon, running as root, opens those files
// with the owner's file-system credentials (fsuid, fsgid and the owner's
// supplementary groups), and the kernel applies the owner's permissions to
// every directory and file on the way. Only the calling thread's
// credentials change (raw syscalls, not glibc's process-wide setgroups),
// and only for the open.
#pragma once

#include <sys/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "io/file.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

struct FileOwner {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups, from the group database
};

// The owner of the open file `fd`, when this process runs as root and the
// file belongs to another user; nullopt when no switch is needed.
std::optional<FileOwner> ForeignOwnerOf(int fd);

// Runs `open` with `owner`'s file-system credentials on this thread, then
// restores the previous ones.
Result<std::unique_ptr<File>> OpenAsOwner(
    const FileOwner& owner, const std::function<Result<std::unique_ptr<File>>()>& open);

}  // namespace qcow2fs
