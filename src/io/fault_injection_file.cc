// FaultInjectionFile implementation.
#include "io/fault_injection_file.h"

#include <algorithm>
#include <cstring>
#include <random>

namespace qcow2fs {

FaultInjectionFile::FaultInjectionFile(std::string name, std::string contents)
    : name_(std::move(name)), current_(contents), durable_(std::move(contents)) {}

void FaultInjectionFile::CrashAfter(uint64_t ops) {
  std::lock_guard lock(mu_);
  crash_at_ = ops_ + ops;
}

void FaultInjectionFile::FailOnceAfter(uint64_t ops, int err) {
  std::lock_guard lock(mu_);
  fail_at_ = ops_ + ops;
  fail_errno_ = err;
}

bool FaultInjectionFile::crashed() const {
  std::lock_guard lock(mu_);
  return crashed_;
}

uint64_t FaultInjectionFile::mutating_ops() const {
  std::lock_guard lock(mu_);
  return ops_;
}

Status FaultInjectionFile::Admit() {
  if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
  const uint64_t op = ops_++;
  if (op == crash_at_) {
    crashed_ = true;
    return Status(ErrorCode::kIoError, name_ + ": injected crash", EIO);
  }
  if (op == fail_at_) {
    return Status::FromErrno(fail_errno_, name_ + ": injected failure");
  }
  return Status();
}

void FaultInjectionFile::Apply(std::string& image, const PendingWrite& w) {
  if (w.is_truncate) {
    image.resize(w.offset, '\0');
    return;
  }
  if (w.offset + w.data.size() > image.size()) image.resize(w.offset + w.data.size(), '\0');
  image.replace(w.offset, w.data.size(), w.data);
}

std::string FaultInjectionFile::DurableImage(uint64_t seed) const {
  std::lock_guard lock(mu_);
  std::string image = durable_;
  std::mt19937_64 rng(seed);
  for (const auto& w : unsynced_) {
    if (rng() & 1) Apply(image, w);
  }
  return image;
}

std::string FaultInjectionFile::CurrentImage() const {
  std::lock_guard lock(mu_);
  return current_;
}

Status FaultInjectionFile::ReadAt(uint64_t offset, std::span<std::byte> buf) {
  std::lock_guard lock(mu_);
  if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
  std::fill(buf.begin(), buf.end(), std::byte{0});
  if (offset < current_.size() && !buf.empty()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), current_.size() - offset);
    std::memcpy(buf.data(), current_.data() + offset, n);
  }
  return Status();
}

Status FaultInjectionFile::WriteAt(uint64_t offset, std::span<const std::byte> data) {
  std::lock_guard lock(mu_);
  QCOW2FS_RETURN_IF_ERROR(Admit());
  PendingWrite w{offset, std::string(reinterpret_cast<const char*>(data.data()), data.size())};
  Apply(current_, w);
  unsynced_.push_back(std::move(w));
  return Status();
}

Status FaultInjectionFile::PunchHole(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  QCOW2FS_RETURN_IF_ERROR(Admit());
  if (offset >= current_.size()) return Status();
  length = std::min<uint64_t>(length, current_.size() - offset);
  PendingWrite w{offset, std::string(length, '\0')};
  Apply(current_, w);
  unsynced_.push_back(std::move(w));
  return Status();
}

Status FaultInjectionFile::Truncate(uint64_t length) {
  std::lock_guard lock(mu_);
  QCOW2FS_RETURN_IF_ERROR(Admit());
  PendingWrite w{length, {}, true};
  Apply(current_, w);
  unsynced_.push_back(std::move(w));
  return Status();
}

Status FaultInjectionFile::Allocate(uint64_t offset, uint64_t length) {
  std::lock_guard lock(mu_);
  QCOW2FS_RETURN_IF_ERROR(Admit());
  if (offset + length > current_.size()) {
    PendingWrite w{offset + length, {}, true};
    Apply(current_, w);
    unsynced_.push_back(std::move(w));
  }
  return Status();
}

Status FaultInjectionFile::Sync() {
  std::lock_guard lock(mu_);
  if (crashed_) return Status(ErrorCode::kIoError, name_ + ": device is gone", EIO);
  durable_ = current_;
  unsynced_.clear();
  return Status();
}

Result<uint64_t> FaultInjectionFile::Size() {
  std::lock_guard lock(mu_);
  return static_cast<uint64_t>(current_.size());
}

uint64_t FaultInjectionFile::AllocatedBytes() {
  std::lock_guard lock(mu_);
  return current_.size();
}

}  // namespace qcow2fs
