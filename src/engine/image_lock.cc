// flock plus QEMU-compatible OFD permission locks.
#include "engine/image_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace qcow2fs {
namespace {

constexpr off_t kPermLockBase = 100;    // "I hold permission i"
constexpr off_t kSharedLockBase = 200;  // "I do not share permission i"
constexpr int kPermCount = 4;
const char* const kPermNames[kPermCount] = {"consistent read", "write", "write unchanged",
                                            "resize"};
constexpr unsigned kConsistentRead = 1u << 0, kWrite = 1u << 1, kResize = 1u << 3;

// Returns true if another open file description holds a lock on `byte`.
Result<bool> ByteLockedByOther(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) {
    return Status::FromErrno(errno, "probing image lock");
  }
  return fl.l_type != F_UNLCK;
}

Status LockByte(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
    return Status::FromErrno(errno, "taking image lock byte " + std::to_string(byte));
  }
  return Status();
}

Status LockedError(const std::string& path, const std::string& what) {
  return Status(ErrorCode::kLocked, path + ": " + what + ". Is another process using the image?");
}

Status TakeFlock(int fd, const std::string& path, bool writable) {
  if (flock(fd, (writable ? LOCK_EX : LOCK_SH) | LOCK_NB) == 0) return Status();
  if (errno != EWOULDBLOCK) return Status::FromErrno(errno, "flock " + path);
  if (!writable) {
    return LockedError(path, "it is open for writing by another qcow2fs process");
  }
  // Tell readers from a writer: a shared lock still works if only readers
  // hold the image.
  if (flock(fd, LOCK_SH | LOCK_NB) == 0) {
    flock(fd, LOCK_UN);
    return LockedError(path, "it is open read-only by another process");
  }
  return LockedError(path, "it is open for writing by another process");
}

Status TakeQemuLocks(int fd, const std::string& path, bool writable) {
  const unsigned held = kConsistentRead | (writable ? kWrite | kResize : 0);
  const unsigned unshared = kWrite | kResize;
  for (int i = 0; i < kPermCount; i++) {
    // Someone refuses to share a permission we need...
    if (held & (1u << i)) {
      QCOW2FS_ASSIGN_OR_RETURN(bool busy, ByteLockedByOther(fd, kSharedLockBase + i));
      if (busy) {
        return LockedError(path, std::string("Failed to get \"") + kPermNames[i] + "\" lock");
      }
    }
    // ...or holds one we refuse to share.
    if (unshared & (1u << i)) {
      QCOW2FS_ASSIGN_OR_RETURN(bool busy, ByteLockedByOther(fd, kPermLockBase + i));
      if (busy) {
        return LockedError(path,
                           std::string("Failed to get shared \"") + kPermNames[i] + "\" lock");
      }
    }
  }
  for (int i = 0; i < kPermCount; i++) {
    if (held & (1u << i)) QCOW2FS_RETURN_IF_ERROR(LockByte(fd, kPermLockBase + i));
    if (unshared & (1u << i)) {
      QCOW2FS_RETURN_IF_ERROR(LockByte(fd, kSharedLockBase + i));
    }
  }
  return Status();
}

}  // namespace

Status LockImageFile(int fd, const std::string& path, bool writable) {
  QCOW2FS_RETURN_IF_ERROR(TakeFlock(fd, path, writable));
  return TakeQemuLocks(fd, path, writable);
}

}  // namespace qcow2fs
