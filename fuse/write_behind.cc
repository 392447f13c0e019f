// WriteBehind implementation. See write_behind.h.
#include "write_behind.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "log.h"
#include "sync_point.h"

namespace qcow2fs::fusefs {

Result<std::unique_ptr<SpaceBank>> SpaceBank::Create(const std::string& directory,
                                                     uint64_t cluster_size, uint64_t chunk) {
  int fd = open(directory.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return Status::FromErrno(errno, "creating an unnamed file in " + directory);
  // One block, to learn whether fallocate works here at all. ENOSPC is no
  // reason to go without a bank: the space may come back.
  if (fallocate(fd, 0, 0, 4096) != 0 && errno != ENOSPC && errno != EDQUOT) {
    Status status = Status::FromErrno(errno, "fallocate in " + directory);
    close(fd);
    return status;
  }
  if (ftruncate(fd, 0) != 0) {
    Status status = Status::FromErrno(errno, "ftruncate in " + directory);
    close(fd);
    return status;
  }
  return std::make_unique<SpaceBank>(fd, cluster_size, chunk);
}

SpaceBank::SpaceBank(int fd, uint64_t cluster_size, uint64_t chunk)
    : fd_(fd),
      cluster_size_(std::max<uint64_t>(cluster_size, 512)),
      chunk_(std::max<uint64_t>(chunk, 4096)),
      floor_(4 * cluster_size_) {}

SpaceBank::~SpaceBank() { close(fd_); }  // an unnamed file: its blocks go with it

uint64_t SpaceBank::Need(uint64_t offset, uint64_t length) const {
  if (length == 0) return 0;
  const uint64_t first = offset / cluster_size_;
  const uint64_t last = (offset + length - 1) / cluster_size_;
  return (last - first + 1 + 2) * cluster_size_;
}

int SpaceBank::Reserve(uint64_t need) {
  MutexLock lk(mu_);
  const uint64_t wanted = queued_ + in_flight_ + need + floor_;
  if (given_ > 0) {
    // Writes are retrying on space the bank gave up: take none of it.
    struct statvfs vfs;
    const uint64_t grow = held_ < wanted ? wanted - held_ : 0;
    if (fstatvfs(fd_, &vfs) != 0 ||
        uint64_t{vfs.f_bavail} * vfs.f_frsize < given_ + grow + chunk_) {
      short_ = true;
      return ENOSPC;
    }
  }
  if (held_ < wanted) {
    // In steps, so that a steady writer rarely calls fallocate; exactly
    // what is wanted when the step does not fit.
    const uint64_t stepped = (wanted + chunk_ - 1) / chunk_ * chunk_;
    int err = 0;
    for (uint64_t target : {stepped, wanted}) {
      if (fallocate(fd_, 0, static_cast<off_t>(held_), static_cast<off_t>(target - held_)) == 0) {
        held_ = target;
        err = 0;
        break;
      }
      err = errno;
      // A failed fallocate may keep part of what it allocated, past held_.
      (void)!ftruncate(fd_, static_cast<off_t>(held_));
      if (err != ENOSPC && err != EDQUOT) break;
    }
    if (err != 0) {
      short_ = true;
      return err;
    }
  }
  short_ = false;
  queued_ += need;
  return 0;
}

void SpaceBank::Start(uint64_t need) {
  MutexLock lk(mu_);
  need = std::min(need, queued_);
  queued_ -= need;
  in_flight_ += need;
}

void SpaceBank::Return(uint64_t need, bool given) {
  MutexLock lk(mu_);
  uint64_t& from = given ? given_ : in_flight_;
  from -= std::min(need, from);
  // After a burst: give back all but a step above what is still wanted.
  const uint64_t wanted = queued_ + in_flight_ + floor_;
  if (held_ > wanted + 2 * chunk_) ShrinkLocked((wanted + chunk_ + chunk_ - 1) / chunk_ * chunk_);
}

bool SpaceBank::Trim() {
  MutexLock lk(mu_);
  return ShrinkLocked(queued_ + in_flight_ + floor_);
}

void SpaceBank::Give(uint64_t need) {
  MutexLock lk(mu_);
  need = std::min(need, in_flight_);
  in_flight_ -= need;
  given_ += need;
  ShrinkLocked(queued_ + in_flight_ + floor_);
}

bool SpaceBank::Short() const {
  MutexLock lk(mu_);
  return short_ || given_ > 0;
}

bool SpaceBank::Release() {
  MutexLock lk(mu_);
  return ShrinkLocked(queued_ + in_flight_);
}

bool SpaceBank::ShrinkLocked(uint64_t size) {
  if (size >= held_) return false;
  if (ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    Log(LOG_ERR, "shrinking the space reserved for queued writes failed: %s", strerror(errno));
    return false;
  }
  held_ = size;
  return true;
}

uint64_t SpaceBank::held() const {
  MutexLock lk(mu_);
  return held_;
}

uint64_t SpaceBank::reserved() const {
  MutexLock lk(mu_);
  return queued_ + in_flight_;
}

WriteBehind::WriteBehind(Apply apply, size_t max_bytes, size_t max_write, unsigned threads,
                         SpaceBank* bank)
    : apply_(std::move(apply)),
      bank_(bank),
      max_write_(max_write),
      max_buffers_(std::max<size_t>(1, max_bytes / max_write)) {
  for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { Run(); });
}

WriteBehind::~WriteBehind() {
  {
    MutexLock lk(mu_);
    while (!queue_.empty()) done_.Wait(mu_);
    stopping_ = true;
  }
  work_.NotifyAll();
  for (std::thread& t : threads_) t.join();
}

bool WriteBehind::OverlapsLocked(uint64_t offset, uint64_t length) const {
  for (const Pending& p : queue_) {
    if (p.offset < offset + length && offset < p.offset + p.length) return true;
  }
  return false;
}

bool WriteBehind::Submit(uint64_t offset, std::span<const std::byte> data) {
  // Space first, outside mu_ (fallocate may take a while): a write is only
  // acknowledged if the host holds room for it.
  const uint64_t reserved = bank_ ? bank_->Need(offset, data.size()) : 0;
  if (bank_ && bank_->Reserve(reserved) != 0) return false;
  MutexLock lk(mu_);
  auto admitted = [&]() REQUIRES(mu_) {
    return !OverlapsLocked(offset, data.size()) && (!spare_.empty() || buffers_ < max_buffers_);
  };
  if (!admitted()) QCOW2FS_SYNC_POINT("WriteBehind:SubmitWaits", offset);
  while (!admitted()) done_.Wait(mu_);
  AlignedBuffer buffer;
  if (!spare_.empty()) {
    buffer = std::move(spare_.back());
    spare_.pop_back();
  } else {
    // Page-aligned, so the image can write it with O_DIRECT. Throws
    // std::bad_alloc when memory is short: the request fails with ENOMEM.
    buffer = AlignedBuffer(max_write_);
    buffers_++;
  }
  // Listed before the copy, so overlapping requests wait for it from now on.
  auto it = queue_.insert(
      queue_.end(), Pending{next_sequence_++, offset, data.size(), reserved, std::move(buffer)});
  lk.Unlock();
  std::memcpy(it->buffer.data(), data.data(), data.size());
  lk.Lock();
  it->ready = true;
  lk.Unlock();
  work_.NotifyOne();
  return true;
}

void WriteBehind::WaitFor(uint64_t offset, uint64_t length) {
  MutexLock lk(mu_);
  auto clear = [&]() REQUIRES(mu_) { return !OverlapsLocked(offset, length); };
  if (!clear()) QCOW2FS_SYNC_POINT("WriteBehind:ReadWaits", offset);
  while (!clear()) done_.Wait(mu_);
}

Status WriteBehind::Drain() {
  MutexLock lk(mu_);
  const uint64_t last = next_sequence_;
  auto drained = [&]() REQUIRES(mu_) { return queue_.empty() || queue_.front().sequence >= last; };
  if (!drained()) QCOW2FS_SYNC_POINT("WriteBehind:DrainWaits", last);
  while (!drained()) done_.Wait(mu_);
  Status error = std::move(error_);
  error_ = Status();
  return error;
}

void WriteBehind::Run() {
  MutexLock lk(mu_);
  while (true) {
    auto next = queue_.end();
    auto found = [&]() REQUIRES(mu_) {
      for (next = queue_.begin(); next != queue_.end(); ++next) {
        if (next->ready && !next->started) return true;
      }
      return stopping_;
    };
    while (!found()) work_.Wait(mu_);
    if (next == queue_.end()) return;  // stopping, nothing left
    next->started = true;
    lk.Unlock();
    QCOW2FS_SYNC_POINT("WriteBehind:Applying", next->offset);
    const std::span<const std::byte> data(next->buffer.data(), next->length);
    // The write allocates from the free space; from now on, what the bank
    // holds for it is the space a retry gets.
    if (bank_) bank_->Start(next->reserved);
    Status status = apply_(next->offset, data);
    if (bank_) {
      // The host filled up all the same (from outside, or the write needed
      // more than its share): once the bank gives up what it holds for the
      // writes being applied, that is free again. Retried once.
      if (status.ToErrno() == ENOSPC) {
        // Every write being applied gives up its reservation, this one's
        // included: all of them draw on the free space.
        uint64_t given = 0;
        lk.Lock();
        for (Pending& p : queue_) {
          if (p.started && !p.given) {
            p.given = true;
            given += p.reserved;
          }
        }
        lk.Unlock();
        bank_->Give(given);
        Log(LOG_WARNING,
            "queued write at guest offset %llu found the host full; retrying "
            "with the space reserved for it",
            static_cast<unsigned long long>(next->offset));
        status = apply_(next->offset, data);
      }
      lk.Lock();
      const bool given = next->given;
      lk.Unlock();
      bank_->Return(next->reserved, given);
    }
    lk.Lock();
    if (!status.ok()) {
      Log(LOG_ERR,
          "queued write of %zu bytes at guest offset %llu failed "
          "(reported at the next close, fsync and unmount): %s",
          next->length, static_cast<unsigned long long>(next->offset), status.ToString().c_str());
      if (error_.ok()) error_ = status;
    }
    spare_.push_back(std::move(next->buffer));
    queue_.erase(next);
    done_.NotifyAll();
  }
}

}  // namespace qcow2fs::fusefs
