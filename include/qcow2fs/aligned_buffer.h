// AlignedBuffer: a fixed-size byte buffer on a page boundary. With
// OpenOptions::direct_io, Image::Read and Image::Write take the O_DIRECT
// route only for buffers aligned like this one; the daemon's request, reply,
// write-behind and read-ahead buffers are AlignedBuffers, and so are the
// core's compressed segments.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <span>
#include <utility>

namespace qcow2fs {

class AlignedBuffer {
 public:
  static constexpr size_t kAlignment = 4096;

  AlignedBuffer() = default;
  // `size` bytes, not initialised (pages are only touched when used).
  // Throws std::bad_alloc when memory is short.
  explicit AlignedBuffer(size_t size)
      : data_(static_cast<std::byte*>(
            std::aligned_alloc(kAlignment, (size + kAlignment - 1) / kAlignment * kAlignment))),
        size_(size) {
    if (!data_ && size != 0) throw std::bad_alloc();
  }

  AlignedBuffer(AlignedBuffer&& other) noexcept
      : data_(std::move(other.data_)), size_(std::exchange(other.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    return *this;
  }

  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  std::span<std::byte> span() { return {data_.get(), size_}; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> data_;
  size_t size_ = 0;
};

}  // namespace qcow2fs
