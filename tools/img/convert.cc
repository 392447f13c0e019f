// qcow2fs-img convert (alias dump): the guest disk of an image, or of one
// of its internal snapshots, written out as a sparse raw file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"
#include "progress.h"
#include "qcow2fs/aligned_buffer.h"

namespace qcow2fs::img {

const char kConvertHelp[] =
    "Usage: qcow2fs-img convert [-p] [-U] [-l SNAPSHOT] IMAGE OUTPUT\n"
    "       qcow2fs-img dump    [-p] [-U] [-l SNAPSHOT] IMAGE OUTPUT\n"
    "Write the guest disk of IMAGE (through its backing chain) to OUTPUT as a\n"
    "raw disk image, as 'qemu-img convert -O raw' does. A regular OUTPUT is\n"
    "created or truncated and stays sparse: ranges that read as zeros, and\n"
    "zero-filled 4 KiB blocks of data, are left as holes. A block device\n"
    "OUTPUT gets every byte written.\n"
    "\n"
    "  -p                 show progress (when standard error is a terminal)\n"
    "  -l SNAPSHOT        read the internal snapshot with this ID or name\n"
    "  -U, --force-share  open an image in use: read-only, no locks\n"
    "  -h, --help         this help\n";

namespace {

constexpr size_t kChunk = 4 << 20;   // bytes read from the image at once
constexpr size_t kZeroBlock = 4096;  // granularity of holes made in data

bool AllZero(const std::byte* p, size_t n) {
  static const std::byte kZeros[kZeroBlock] = {};
  while (n > 0) {
    const size_t k = std::min(n, kZeroBlock);
    if (std::memcmp(p, kZeros, k) != 0) return false;
    p += k;
    n -= k;
  }
  return true;
}

Status WriteAll(int fd, const std::byte* p, size_t n, uint64_t offset) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd, p, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "writing the output at offset " + std::to_string(offset));
    }
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
  return Status();
}

class Converter {
 public:
  Converter(Image& image, int fd, bool sparse, ProgressBar& progress)
      : image_(image), fd_(fd), sparse_(sparse), progress_(progress), buf_(kChunk) {}

  Status Run() {
    const uint64_t size = image_.size();
    for (uint64_t pos = 0; pos < size;) {
      auto st = image_.GetDataStatus(pos, size - pos);
      if (!st.ok()) return st.take_status();
      const uint64_t end = pos + st->length;
      if (st->kind == BlockKind::kData) {
        QCOW2FS_RETURN_IF_ERROR(CopyData(pos, end));
      } else if (!sparse_) {
        QCOW2FS_RETURN_IF_ERROR(WriteZeros(pos, end));
      }
      pos = end;
      progress_.Update(pos, size);
    }
    return Status();
  }

 private:
  Status CopyData(uint64_t pos, uint64_t end) {
    while (pos < end) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - pos));
      QCOW2FS_RETURN_IF_ERROR(image_.Read(pos, {buf_.data(), n}));
      // Pieces that end on 4 KiB guest boundaries; all-zero ones stay holes.
      size_t i = 0;
      while (i < n) {
        const uint64_t guest = pos + i;
        const size_t piece =
            static_cast<size_t>(std::min<uint64_t>(n - i, kZeroBlock - guest % kZeroBlock));
        size_t run = piece;
        const bool zero = sparse_ && AllZero(buf_.data() + i, piece);
        // Extend the piece with following ones of the same kind.
        while (i + run < n) {
          const size_t next = std::min(n - i - run, kZeroBlock);
          if (sparse_ && AllZero(buf_.data() + i + run, next) != zero) break;
          run += next;
        }
        if (!zero) QCOW2FS_RETURN_IF_ERROR(WriteAll(fd_, buf_.data() + i, run, guest));
        i += run;
      }
      pos += n;
      progress_.Update(pos, image_.size());
    }
    return Status();
  }

  Status WriteZeros(uint64_t pos, uint64_t end) {
    std::memset(buf_.data(), 0, kChunk);
    while (pos < end) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, end - pos));
      QCOW2FS_RETURN_IF_ERROR(WriteAll(fd_, buf_.data(), n, pos));
      pos += n;
    }
    return Status();
  }

  Image& image_;
  const int fd_;
  const bool sparse_;
  ProgressBar& progress_;
  AlignedBuffer buf_;
};

}  // namespace

int RunConvert(const Args& args) {
  ParsedArgs parsed =
      ParseArgs(args, {kForceShareOption, OptionSpec{'p', "", false}, OptionSpec{'l', "", true}});
  if (parsed.help) {
    std::fputs(kConvertHelp, stdout);
    return kExitOk;
  }
  ExpectOperands(parsed, {"IMAGE", "OUTPUT"});
  if (parsed.error.empty() && parsed.has("l") && parsed.value("l")->empty()) {
    parsed.error = "-l needs a snapshot ID or name";
  }
  if (!parsed.error.empty()) return UsageError(parsed.error);
  const std::string& path = parsed.operands[0];
  const std::string& out_path = parsed.operands[1];

  ReadOpen how;
  how.force_share = parsed.has("force-share");
  how.snapshot = parsed.value("l");
  auto image = OpenReadOnly(path, how);
  if (!image.ok()) return ReportError(image.status());

  // Never truncate the image (or one of its files) under itself.
  struct stat in_st {
  }, out_st{};
  if (::stat(out_path.c_str(), &out_st) == 0 && ::stat(path.c_str(), &in_st) == 0 &&
      in_st.st_dev == out_st.st_dev && in_st.st_ino == out_st.st_ino) {
    return ReportError(out_path + ": is the image itself");
  }
  const int fd = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return ReportError(out_path + ": " + std::strerror(errno));
  if (::fstat(fd, &out_st) != 0) {
    ReportError(out_path + ": " + std::strerror(errno));
    ::close(fd);
    return kExitFailure;
  }
  const bool regular = S_ISREG(out_st.st_mode);
  Status status;
  if (regular) {
    // Truncating to 0 first drops old content, so unwritten ranges are holes.
    if (::ftruncate(fd, 0) != 0 || ::ftruncate(fd, static_cast<off_t>((*image)->size())) != 0) {
      status = Status::FromErrno(errno, "setting the size of " + out_path);
    }
  } else if (!S_ISBLK(out_st.st_mode)) {
    ::close(fd);
    return ReportError(out_path + ": not a regular file or block device");
  }

  if (status.ok()) {
    ProgressBar progress("converting", parsed.has("p"));
    progress.Update(0, (*image)->size());
    status = Converter(**image, fd, regular, progress).Run();
    if (status.ok() && ::fdatasync(fd) != 0) {
      status = Status::FromErrno(errno, "syncing " + out_path);
    }
    if (status.ok()) progress.Update((*image)->size(), (*image)->size());
    progress.Finish(/*keep=*/status.ok());
  }
  if (::close(fd) != 0 && status.ok()) status = Status::FromErrno(errno, "closing " + out_path);
  if (!status.ok()) return ReportError(status);
  return kExitOk;
}

}  // namespace qcow2fs::img
