// File held in memory: the image of tests and the fuzzer.
#include <algorithm>
#include <cstring>
#include <vector>

#include "base/mutex.h"
#include "io/file.h"

namespace qcow2fs {
namespace {

class MemoryFile final : public File {
 public:
  MemoryFile(std::string name, std::string contents)
      : name_(std::move(name)),
        data_(reinterpret_cast<const std::byte*>(contents.data()),
              reinterpret_cast<const std::byte*>(contents.data()) + contents.size()) {}

  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override {
    MutexLock lock(mu_);
    std::fill(buf.begin(), buf.end(), std::byte{0});
    if (offset < data_.size() && !buf.empty()) {
      uint64_t n = std::min<uint64_t>(buf.size(), data_.size() - offset);
      std::memcpy(buf.data(), data_.data() + offset, n);
    }
    return Status();
  }

  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override {
    MutexLock lock(mu_);
    if (offset + data.size() > data_.size()) data_.resize(offset + data.size());
    std::memcpy(data_.data() + offset, data.data(), data.size());
    return Status();
  }

  Status Sync() override { return Status(); }

  Status PunchHole(uint64_t offset, uint64_t length) override {
    MutexLock lock(mu_);
    if (offset < data_.size()) {
      uint64_t n = std::min<uint64_t>(length, data_.size() - offset);
      std::memset(data_.data() + offset, 0, n);
    }
    return Status();
  }

  Status Truncate(uint64_t length) override {
    MutexLock lock(mu_);
    data_.resize(length);
    return Status();
  }

  Status Allocate(uint64_t offset, uint64_t length) override {
    MutexLock lock(mu_);
    if (offset + length > data_.size()) data_.resize(offset + length);
    return Status();
  }

  Result<uint64_t> Size() override {
    MutexLock lock(mu_);
    return static_cast<uint64_t>(data_.size());
  }

  uint64_t AllocatedBytes() override {
    MutexLock lock(mu_);
    return data_.size();
  }

  const std::string& name() const override { return name_; }

 private:
  const std::string name_;
  Mutex mu_;
  std::vector<std::byte> data_ GUARDED_BY(mu_);
};

}  // namespace

std::unique_ptr<File> NewMemoryFile(std::string name, std::string contents) {
  return std::make_unique<MemoryFile>(std::move(name), std::move(contents));
}

}  // namespace qcow2fs
