// ForwardingFile: a File that passes every call to another one, so a test
// decorator overrides only the calls it changes.
#pragma once

#include <memory>
#include <string>

#include "io/file.h"

namespace qcow2fs::test {

class ForwardingFile : public File {
 public:
  explicit ForwardingFile(File& target) : target_(target) {}
  Status ReadAt(uint64_t o, std::span<std::byte> b) override { return target_.ReadAt(o, b); }
  Status WriteAt(uint64_t o, std::span<const std::byte> d) override {
    return target_.WriteAt(o, d);
  }
  Status Sync() override { return target_.Sync(); }
  Status PunchHole(uint64_t o, uint64_t l) override { return target_.PunchHole(o, l); }
  Status Truncate(uint64_t l) override { return target_.Truncate(l); }
  Status Allocate(uint64_t o, uint64_t l) override { return target_.Allocate(o, l); }
  Result<uint64_t> Size() override { return target_.Size(); }
  uint64_t AllocatedBytes() override { return target_.AllocatedBytes(); }
  const std::string& name() const override { return target_.name(); }
  int fd() const override { return target_.fd(); }

 private:
  File& target_;
};

// A File the test keeps a share of, so it can inspect it (a fault-injecting
// file, say) after the image that owns this handle is gone.
class SharedFile final : public ForwardingFile {
 public:
  explicit SharedFile(std::shared_ptr<File> f) : ForwardingFile(*f), f_(std::move(f)) {}

 private:
  std::shared_ptr<File> f_;
};

}  // namespace qcow2fs::test
