// Image locking: an image-level flock against other qcow2fs processes, and
// QEMU's byte-range permission locks so QEMU and qcow2fs respect each other.
//
// QEMU's scheme (block/file-posix.c): one-byte open-file-description locks,
// always F_RDLCK, on the image's fd. Byte 100+i means "I hold permission i",
// byte 200+i "I do not let others have permission i", where i is 0 consistent
// read, 1 write, 2 write unchanged, 3 resize. Conflicts are probed with
// F_OFD_GETLK/F_WRLCK, never waited for. The locks live as long as the fd.
#pragma once

#include <string>

#include "qcow2fs/status.h"

namespace qcow2fs {

// Locks the open file `fd` (named `path` in messages) for reading, or for
// writing when `writable`. Fails with kLocked, naming the conflicting mode or
// permission, if another process holds a conflicting lock.
Status LockImageFile(int fd, const std::string& path, bool writable);

}  // namespace qcow2fs
