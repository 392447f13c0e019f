// FaultInjectionFile: a File decorator that fails or "loses power" on
// demand, for crash-safety and error-path tests.
//
// It models a disk with a volatile write cache: writes since the last Sync()
// are "in flight" and may or may not survive a crash, in any combination.
// The file crashes
//   - after the armed number of mutating operations (writes, punches,
//     truncates, allocations): CrashAfter(); that operation fails;
//   - at the armed Sync(): CrashAtSync(); that sync fails instead of making
//     anything durable;
//   - when Crash() is called (e.g. because another file on the same
//     "machine" crashed: see OnCrash()).
// From then on every operation fails with EIO and nothing more reaches the
// durable state. DurableImage() then returns what a disk could hold after
// power returns: the synced contents plus a subset of the unsynced writes,
// chosen by a seed (each kept with probability 1/2) or by a predicate.
//
// Counters (mutating_ops(), syncs()) let a test run a workload once without
// a crash and then enumerate every operation or sync point of it.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/mutex.h"
#include "io/file.h"

namespace qcow2fs {

class FaultInjectionFile final : public File {
 public:
  // One write that had not been synced when the file crashed (or has not
  // been synced yet), as DurableImage() offers it to a keep-predicate.
  struct UnsyncedWrite {
    enum class Kind { kWrite, kPunchHole, kTruncate };
    Kind kind = Kind::kWrite;
    // kWrite / kPunchHole: the byte range. kTruncate: offset is the new
    // length, length is 0.
    uint64_t offset = 0;
    uint64_t length = 0;
    // Position among the unsynced writes, 0 = the oldest.
    uint64_t index = 0;
    // The mutating operation (as counted by mutating_ops()) it came from.
    uint64_t op = 0;
    // Sync() calls seen before it (syncs() at the time it was written).
    uint64_t after_syncs = 0;
    // The bytes written (zeros for a punched hole, empty for a truncate).
    std::string_view data;
  };
  using KeepPredicate = std::function<bool(const UnsyncedWrite&)>;

  explicit FaultInjectionFile(std::string name, std::string contents);

  // Crash after `ops` more mutating operations (0: on the next one).
  void CrashAfter(uint64_t ops);
  // Crash at the Sync() after `syncs` more (0: the next one): it fails with
  // EIO and makes nothing durable. Independent of CrashAfter(); whichever
  // comes first crashes the file.
  void CrashAtSync(uint64_t syncs);
  // Crash now (no-op if already crashed).
  void Crash();
  // Called once, without the file's lock held, right after the file
  // crashes (by any of the above), on the thread that made it crash. Lets
  // a test take down the other files of the same machine, e.g.
  // image->OnCrash([data] { data->Crash(); }).
  void OnCrash(std::function<void()> callback);
  // Fail (with `err`, e.g. ENOSPC) the mutating operation after `ops` more,
  // once, without crashing.
  void FailOnceAfter(uint64_t ops, int err);
  bool crashed() const;
  // Mutating operations admitted so far (including the one that crashed).
  uint64_t mutating_ops() const;
  // Sync() calls seen before the crash (including the one that crashed).
  uint64_t syncs() const;
  // Sync() calls that succeeded.
  uint64_t successful_syncs() const;
  // Writes that are not durable yet (after a crash: that never will be
  // unless DurableImage() keeps them).
  uint64_t unsynced_writes() const;
  // The unsynced writes, oldest first (without their data: use the
  // predicate form of DurableImage() to look at the bytes).
  std::vector<UnsyncedWrite> UnsyncedWrites() const;

  // Contents after a crash, keeping each unsynced write with probability
  // 1/2 (chosen by `seed`), applied in order.
  std::string DurableImage(uint64_t seed) const;
  // Contents after a crash, keeping the unsynced writes for which `keep`
  // returns true, applied in order. The write's data view is valid only
  // during the call.
  std::string DurableImage(const KeepPredicate& keep) const;
  // Shorthands: every unsynced write survives / none does.
  std::string DurableImageKeepAll() const;
  std::string DurableImageKeepNone() const;
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
    std::string data;  // empty with is_truncate set: a truncate to `offset`
    bool is_truncate = false;
    bool is_punch = false;
    uint64_t op = 0;
    uint64_t after_syncs = 0;
  };
  // Counts a mutating operation; returns the error to fail it with, if any.
  // Sets *crashed_now when this operation crashed the file.
  Status Admit(bool* crashed_now) REQUIRES(mu_);
  // Records a mutating operation in current_ and the unsynced list.
  void Record(PendingWrite w) REQUIRES(mu_);
  // Runs the crash callback if this call crashed the file (lock not held).
  void AfterCrash(bool crashed_now) EXCLUDES(mu_);
  static void Apply(std::string& image, const PendingWrite& w);
  static UnsyncedWrite ToUnsynced(const PendingWrite& w, uint64_t index);

  const std::string name_;
  mutable Mutex mu_;
  std::string current_ GUARDED_BY(mu_);
  std::string durable_ GUARDED_BY(mu_);
  std::vector<PendingWrite> unsynced_ GUARDED_BY(mu_);
  uint64_t ops_ GUARDED_BY(mu_) = 0;
  uint64_t crash_at_ GUARDED_BY(mu_) = UINT64_MAX;
  uint64_t syncs_ GUARDED_BY(mu_) = 0;
  uint64_t successful_syncs_ GUARDED_BY(mu_) = 0;
  uint64_t crash_at_sync_ GUARDED_BY(mu_) = UINT64_MAX;
  uint64_t fail_at_ GUARDED_BY(mu_) = UINT64_MAX;
  int fail_errno_ GUARDED_BY(mu_) = 0;
  bool crashed_ GUARDED_BY(mu_) = false;
  std::function<void()> on_crash_ GUARDED_BY(mu_);
};

}  // namespace qcow2fs
