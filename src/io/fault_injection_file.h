// FaultInjectionFile: a File decorator that fails or "loses power" on
// demand, for crash-safety and error-path tests.
//
// It models a disk with a volatile write cache: writes since the last Sync()
// are "in flight" and may or may not survive a crash, in any combination.
// After the armed number of mutating operations (writes, punches,
// truncates) the file crashes: that operation and every later one fails with
// EIO, and nothing more reaches the durable state. DurableImage() then
// returns what a disk could hold after power returns: the synced contents
// plus a seeded random subset of the unsynced writes.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io/file.h"

namespace qcow2fs {

class FaultInjectionFile final : public File {
 public:
  explicit FaultInjectionFile(std::string name, std::string contents);

  // Crash after `ops` more mutating operations (0: on the next one).
  void CrashAfter(uint64_t ops);
  // Fail (with `err`, e.g. ENOSPC) the mutating operation after `ops` more,
  // once, without crashing.
  void FailOnceAfter(uint64_t ops, int err);
  bool crashed() const;
  uint64_t mutating_ops() const;
  // Contents after a crash, keeping each unsynced write with probability
  // 1/2 (chosen by `seed`), applied in order.
  std::string DurableImage(uint64_t seed) const;
  // Contents as the file is now.
  std::string CurrentImage() const;

  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override;
  Status WriteAt(uint64_t offset, std::span<const std::byte> data) override;
  Status Sync() override;
  Status PunchHole(uint64_t offset, uint64_t length) override;
  Status Truncate(uint64_t length) override;
  Status Allocate(uint64_t offset, uint64_t length) override;
  Result<uint64_t> Size() override;
  uint64_t AllocatedBytes() override;
  const std::string& name() const override { return name_; }

 private:
  struct PendingWrite {
    uint64_t offset;
    std::string data;  // empty with truncate_to set: a truncate
    bool is_truncate = false;
  };
  // Counts a mutating operation; returns the error to fail it with, if any.
  Status Admit();
  static void Apply(std::string& image, const PendingWrite& w);

  const std::string name_;
  mutable std::mutex mu_;
  std::string current_;
  std::string durable_;
  std::vector<PendingWrite> unsynced_;
  uint64_t ops_ = 0;
  uint64_t crash_at_ = UINT64_MAX;
  uint64_t fail_at_ = UINT64_MAX;
  int fail_errno_ = 0;
  bool crashed_ = false;
};

}  // namespace qcow2fs
