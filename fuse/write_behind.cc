// WriteBehind implementation. See write_behind.h.
#include "write_behind.h"

#include <cstring>

#include "log.h"

namespace qcow2fs::fusefs {

WriteBehind::WriteBehind(Apply apply, size_t max_bytes, size_t max_write, unsigned threads)
    : apply_(std::move(apply)),
      max_write_(max_write),
      max_buffers_(std::max<size_t>(1, max_bytes / max_write)) {
  for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { Run(); });
}

WriteBehind::~WriteBehind() {
  {
    std::unique_lock lk(mu_);
    done_.wait(lk, [this] { return queue_.empty(); });
    stopping_ = true;
  }
  work_.notify_all();
  for (std::thread& t : threads_) t.join();
}

bool WriteBehind::OverlapsLocked(uint64_t offset, uint64_t length) const {
  for (const Pending& p : queue_) {
    if (p.offset < offset + length && offset < p.offset + p.length) return true;
  }
  return false;
}

void WriteBehind::Submit(uint64_t offset, std::span<const std::byte> data) {
  std::unique_lock lk(mu_);
  done_.wait(lk, [&] {
    return !OverlapsLocked(offset, data.size()) &&
           (!spare_.empty() || buffers_ < max_buffers_);
  });
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
  auto it = queue_.insert(queue_.end(),
                          Pending{next_sequence_++, offset, data.size(), std::move(buffer)});
  lk.unlock();
  std::memcpy(it->buffer.data(), data.data(), data.size());
  lk.lock();
  it->ready = true;
  lk.unlock();
  work_.notify_one();
}

void WriteBehind::WaitFor(uint64_t offset, uint64_t length) {
  std::unique_lock lk(mu_);
  done_.wait(lk, [&] { return !OverlapsLocked(offset, length); });
}

Status WriteBehind::Drain() {
  std::unique_lock lk(mu_);
  const uint64_t last = next_sequence_;
  done_.wait(lk, [&] {
    return queue_.empty() || queue_.front().sequence >= last;
  });
  Status error = std::move(error_);
  error_ = Status();
  return error;
}

void WriteBehind::Run() {
  std::unique_lock lk(mu_);
  while (true) {
    auto next = queue_.end();
    work_.wait(lk, [&] {
      for (next = queue_.begin(); next != queue_.end(); ++next) {
        if (next->ready && !next->started) return true;
      }
      return stopping_;
    });
    if (next == queue_.end()) return;  // stopping, nothing left
    next->started = true;
    lk.unlock();
    Status status = apply_(next->offset, {next->buffer.data(), next->length});
    lk.lock();
    if (!status.ok()) {
      Log(LOG_ERR, "queued write of %zu bytes at guest offset %llu failed: %s",
          next->length, static_cast<unsigned long long>(next->offset),
          status.ToString().c_str());
      if (error_.ok()) error_ = status;
    }
    spare_.push_back(std::move(next->buffer));
    queue_.erase(next);
    done_.notify_all();
  }
}

}  // namespace qcow2fs::fusefs
