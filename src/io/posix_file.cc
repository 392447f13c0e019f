// File over a host file descriptor: pread/pwrite with retry on short
// transfers and EINTR, fdatasync, and fallocate for holes.
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "io/file.h"

namespace qcow2fs {
namespace {

class PosixFile final : public File {
 public:
  PosixFile(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  ~PosixFile() override { ::close(fd_); }

  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override {
    size_t done = 0;
    while (done < buf.size()) {
      ssize_t n = ::pread(fd_, buf.data() + done, buf.size() - done,
                          static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "reading " + name_ + " at " +
                                            std::to_string(offset + done));
      }
      if (n == 0) {  // end of file: the rest reads as zeros
        std::memset(buf.data() + done, 0, buf.size() - done);
        break;
      }
      done += static_cast<size_t>(n);
    }
    return Status();
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done,
                           static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return Status::FromErrno(errno, "writing " + name_ + " at " +
                                            std::to_string(offset + done));
      }
      done += static_cast<size_t>(n);
    }
    return Status();
  }

  Status Sync() override {
    if (::fdatasync(fd_) != 0) return Status::FromErrno(errno, "syncing " + name_);
    return Status();
  }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(offset), static_cast<off_t>(length)) == 0) {
      return Status();
    }
    if (errno != EOPNOTSUPP && errno != ENOSYS) {
      return Status::FromErrno(errno, "punching a hole in " + name_);
    }
    // No hole punching on this file system: zeros keep the semantics.
    std::vector<std::byte> zeros(std::min<uint64_t>(length, 1 << 20));
    for (uint64_t done = 0; done < length;) {
      uint64_t n = std::min<uint64_t>(zeros.size(), length - done);
      QCOW2FS_RETURN_IF_ERROR(WriteAt(offset + done, {zeros.data(), n}));
      done += n;
    }
    return Status();
  }

  Status Truncate(uint64_t length) override {
    if (::ftruncate(fd_, static_cast<off_t>(length)) != 0) {
      return Status::FromErrno(errno, "resizing " + name_);
    }
    return Status();
  }

  Status Allocate(uint64_t offset, uint64_t length) override {
    int err = ::posix_fallocate(fd_, static_cast<off_t>(offset),
                                static_cast<off_t>(length));
    if (err != 0) return Status::FromErrno(err, "allocating space in " + name_);
    return Status();
  }

  Result<uint64_t> Size() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + name_);
    return static_cast<uint64_t>(st.st_size);
  }

  uint64_t AllocatedBytes() override {
    struct stat st;
    if (::fstat(fd_, &st) != 0) return 0;
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }

  const std::string& name() const override { return name_; }
  int fd() const override { return fd_; }

 private:
  const int fd_;
  const std::string name_;
};

}  // namespace

Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path,
                                            bool writable) {
  int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "cannot open " + path);
  struct stat st;
  if (::fstat(fd, &st) != 0 || (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))) {
    ::close(fd);
    return Status(ErrorCode::kInvalidArgument,
                  path + " is not a regular file or block device");
  }
  return std::unique_ptr<File>(new PosixFile(fd, path));
}

}  // namespace qcow2fs
