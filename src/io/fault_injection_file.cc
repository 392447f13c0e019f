// FaultInjectionFile implementation.
#include "io/fault_injection_file.h"

#include <algorithm>
#include <cstring>
#include <random>

namespace qcow2fs {

FaultInjectionFile::FaultInjectionFile(std::string name, std::string contents)
    : name_(std::move(name)), current_(contents), durable_(std::move(contents)) {}

void FaultInjectionFile::CrashAfter(uint64_t ops) {
  MutexLock lock(mu_);
  crash_at_ = ops_ + ops;
}

void FaultInjectionFile::CrashAtSync(uint64_t syncs) {
  MutexLock lock(mu_);
  crash_at_sync_ = syncs_ + syncs;
}

void FaultInjectionFile::Crash() {
  bool crashed_now = false;
  {
    MutexLock lock(mu_);
    if (!crashed_) crashed_ = crashed_now = true;
  }
  AfterCrash(crashed_now);
}

void FaultInjectionFile::OnCrash(std::function<void()> callback) {
  MutexLock lock(mu_);
  on_crash_ = std::move(callback);
}

void FaultInjectionFile::FailOnceAfter(uint64_t ops, int err) {
  MutexLock lock(mu_);
  fail_at_ = ops_ + ops;
  fail_errno_ = err;
}

bool FaultInjectionFile::crashed() const {
  MutexLock lock(mu_);
  return crashed_;
}

uint64_t FaultInjectionFile::mutating_ops() const {
  MutexLock lock(mu_);
  return ops_;
}

uint64_t FaultInjectionFile::syncs() const {
  MutexLock lock(mu_);
  return syncs_;
}

uint64_t FaultInjectionFile::successful_syncs() const {
  MutexLock lock(mu_);
  return successful_syncs_;
}

uint64_t FaultInjectionFile::unsynced_writes() const {
  MutexLock lock(mu_);
  return unsynced_.size();
}

Status FaultInjectionFile::Admit(bool* crashed_now) {
  if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
  const uint64_t op = ops_++;
  if (op == crash_at_) {
    crashed_ = *crashed_now = true;
    return Status(ErrorCode::kIoError, name_ + ": injected crash", EIO);
  }
  if (op == fail_at_) {
    return Status::FromErrno(fail_errno_, name_ + ": injected failure");
  }
  return Status();
}

void FaultInjectionFile::AfterCrash(bool crashed_now) {
  if (!crashed_now) return;
  std::function<void()> callback;
  {
    MutexLock lock(mu_);
    callback = std::move(on_crash_);
    on_crash_ = nullptr;
  }
  if (callback) callback();
}

void FaultInjectionFile::Record(PendingWrite w) {
  w.op = ops_ - 1;
  w.after_syncs = syncs_;
  Apply(current_, w);
  unsynced_.push_back(std::move(w));
}

void FaultInjectionFile::Apply(std::string& image, const PendingWrite& w) {
  if (w.is_truncate) {
    image.resize(w.offset, '\0');
    return;
  }
  if (w.offset + w.data.size() > image.size()) image.resize(w.offset + w.data.size(), '\0');
  image.replace(w.offset, w.data.size(), w.data);
}

FaultInjectionFile::UnsyncedWrite FaultInjectionFile::ToUnsynced(const PendingWrite& w,
                                                                 uint64_t index) {
  UnsyncedWrite u;
  u.kind = w.is_truncate ? UnsyncedWrite::Kind::kTruncate
           : w.is_punch  ? UnsyncedWrite::Kind::kPunchHole
                         : UnsyncedWrite::Kind::kWrite;
  u.offset = w.offset;
  u.length = w.is_truncate ? 0 : w.data.size();
  u.index = index;
  u.op = w.op;
  u.after_syncs = w.after_syncs;
  u.data = w.data;
  return u;
}

std::vector<FaultInjectionFile::UnsyncedWrite> FaultInjectionFile::UnsyncedWrites() const {
  MutexLock lock(mu_);
  std::vector<UnsyncedWrite> out;
  out.reserve(unsynced_.size());
  for (size_t i = 0; i < unsynced_.size(); i++) {
    out.push_back(ToUnsynced(unsynced_[i], i));
    out.back().data = {};  // would dangle once the lock is dropped
  }
  return out;
}

std::string FaultInjectionFile::DurableImage(uint64_t seed) const {
  std::mt19937_64 rng(seed);
  return DurableImage([&rng](const UnsyncedWrite&) { return (rng() & 1) != 0; });
}

std::string FaultInjectionFile::DurableImage(const KeepPredicate& keep) const {
  MutexLock lock(mu_);
  std::string image = durable_;
  for (size_t i = 0; i < unsynced_.size(); i++) {
    if (keep(ToUnsynced(unsynced_[i], i))) Apply(image, unsynced_[i]);
  }
  return image;
}

std::string FaultInjectionFile::DurableImageKeepAll() const {
  return DurableImage([](const UnsyncedWrite&) { return true; });
}

std::string FaultInjectionFile::DurableImageKeepNone() const {
  return DurableImage([](const UnsyncedWrite&) { return false; });
}

std::string FaultInjectionFile::CurrentImage() const {
  MutexLock lock(mu_);
  return current_;
}

Status FaultInjectionFile::ReadAt(uint64_t offset, std::span<std::byte> buf) {
  MutexLock lock(mu_);
  if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
  std::fill(buf.begin(), buf.end(), std::byte{0});
  if (offset < current_.size() && !buf.empty()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), current_.size() - offset);
    std::memcpy(buf.data(), current_.data() + offset, n);
  }
  return Status();
}

Status FaultInjectionFile::WriteAt(uint64_t offset, std::span<const std::byte> data) {
  bool crashed_now = false;
  Status s;
  {
    MutexLock lock(mu_);
    s = Admit(&crashed_now);
    if (s.ok()) {
      Record(PendingWrite{offset,
                          std::string(reinterpret_cast<const char*>(data.data()), data.size())});
    }
  }
  AfterCrash(crashed_now);
  return s;
}

Status FaultInjectionFile::PunchHole(uint64_t offset, uint64_t length) {
  bool crashed_now = false;
  Status s;
  {
    MutexLock lock(mu_);
    s = Admit(&crashed_now);
    if (s.ok() && offset < current_.size()) {
      length = std::min<uint64_t>(length, current_.size() - offset);
      PendingWrite w{offset, std::string(length, '\0')};
      w.is_punch = true;
      Record(std::move(w));
    }
  }
  AfterCrash(crashed_now);
  return s;
}

Status FaultInjectionFile::Truncate(uint64_t length) {
  bool crashed_now = false;
  Status s;
  {
    MutexLock lock(mu_);
    s = Admit(&crashed_now);
    if (s.ok()) Record(PendingWrite{length, {}, true});
  }
  AfterCrash(crashed_now);
  return s;
}

Status FaultInjectionFile::Allocate(uint64_t offset, uint64_t length) {
  bool crashed_now = false;
  Status s;
  {
    MutexLock lock(mu_);
    s = Admit(&crashed_now);
    if (s.ok() && offset + length > current_.size())
      Record(PendingWrite{offset + length, {}, true});
  }
  AfterCrash(crashed_now);
  return s;
}

Status FaultInjectionFile::Sync() {
  bool crashed_now = false;
  Status s;
  {
    MutexLock lock(mu_);
    if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
    if (syncs_++ == crash_at_sync_) {
      // Power is cut instead of syncing: the unsynced writes stay in doubt.
      crashed_ = crashed_now = true;
      s = Status(ErrorCode::kIoError, name_ + ": injected crash at sync", EIO);
    } else {
      durable_ = current_;
      unsynced_.clear();
      successful_syncs_++;
    }
  }
  AfterCrash(crashed_now);
  return s;
}

Result<uint64_t> FaultInjectionFile::Size() {
  MutexLock lock(mu_);
  return static_cast<uint64_t>(current_.size());
}

uint64_t FaultInjectionFile::AllocatedBytes() {
  MutexLock lock(mu_);
  return current_.size();
}

}  // namespace qcow2fs
