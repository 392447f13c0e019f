// RawImage: a plain file as an Image, used for raw backing files.
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "engine/image_open.h"

namespace qcow2fs {
namespace {

class RawImage final : public Image {
  static Status NoSnapshots() {
    return Status(ErrorCode::kUnsupported, "raw images have no internal snapshots");
  }

 public:
  RawImage(std::unique_ptr<File> file, uint64_t size, bool read_only)
      : file_(std::move(file)), size_(size), read_only_(read_only) {}

  uint64_t size() const override { return size_; }
  bool read_only() const override { return read_only_; }
  ImageInfo info() const override {
    ImageInfo i;
    i.format = "raw";
    i.path = file_->name();
    i.virtual_size = size_;
    i.read_only = read_only_;
    return i;
  }

  Status Read(uint64_t offset, std::span<std::byte> buf) override {
    if (offset > size_ || buf.size() > size_ - offset) {
      return Status(ErrorCode::kOutOfRange, "read past the end of " + file_->name());
    }
    return file_->ReadAt(offset, buf);
  }
  Status Write(uint64_t offset, std::span<const std::byte> data) override {
    QCOW2FS_RETURN_IF_ERROR(CheckWrite(offset, data.size()));
    return file_->WriteAt(offset, data);
  }
  Status WriteZeroes(uint64_t offset, uint64_t length, bool) override {
    QCOW2FS_RETURN_IF_ERROR(CheckWrite(offset, length));
    return file_->PunchHole(offset, length);
  }
  Status Discard(uint64_t offset, uint64_t length) override {
    return WriteZeroes(offset, length, true);
  }
  Status Flush() override { return read_only_ ? Status() : file_->Sync(); }
  Status Resize(uint64_t) override {
    return Status(ErrorCode::kUnsupported, "raw images cannot be resized here");
  }
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t length) override {
    if (offset >= size_) return Status(ErrorCode::kOutOfRange, "past the end");
    BlockStatus s;
    s.kind = BlockKind::kData;
    s.length = std::min(length, size_ - offset);
    s.host_offset = offset;
    return s;
  }
  Result<BlockStatus> GetDataStatus(uint64_t offset, uint64_t length) override {
    if (offset >= size_) return Status(ErrorCode::kOutOfRange, "past the end");
    const uint64_t end = offset + std::min(length, size_ - offset);
    BlockStatus s;
    s.kind = BlockKind::kData;
    s.length = end - offset;
    // The host file system knows its holes; without a descriptor (or where
    // it cannot tell), everything counts as data, which is always safe.
    const int fd = file_->fd();
    if (fd < 0) return s;
    const off_t data = ::lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0 && errno == ENXIO) {
      s.kind = BlockKind::kZero;  // no data from here to the end of the file
      return s;
    }
    if (data < 0) return s;
    if (static_cast<uint64_t>(data) > offset) {
      s.kind = BlockKind::kZero;
      s.length = std::min<uint64_t>(end, static_cast<uint64_t>(data)) - offset;
      return s;
    }
    const off_t hole = ::lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
    if (hole > static_cast<off_t>(offset)) {
      s.length = std::min<uint64_t>(end, static_cast<uint64_t>(hole)) - offset;
    }
    return s;
  }
  uint64_t AllocatedBytes() const override { return file_->AllocatedBytes(); }
  Status CreateSnapshot(const std::string&) override { return NoSnapshots(); }
  Status DeleteSnapshot(const std::string&) override { return NoSnapshots(); }
  Result<std::unique_ptr<Image>> OpenSnapshot(const std::string&) override { return NoSnapshots(); }

 private:
  Status CheckWrite(uint64_t offset, uint64_t length) const {
    if (read_only_) return Status(ErrorCode::kReadOnly, file_->name() + " is read-only");
    if (offset > size_ || length > size_ - offset) {
      return Status(ErrorCode::kOutOfRange, "write past the end of " + file_->name());
    }
    return Status();
  }

  std::unique_ptr<File> file_;
  const uint64_t size_;
  const bool read_only_;
};

}  // namespace

Result<std::unique_ptr<Image>> OpenRaw(std::unique_ptr<File> file, const OpenOptions& options) {
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t size, file->Size());
  return std::unique_ptr<Image>(new RawImage(std::move(file), size, options.read_only));
}

}  // namespace qcow2fs
