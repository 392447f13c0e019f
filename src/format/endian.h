// Big-endian loads and stores: every number in qcow2 is big-endian.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qcow2fs {

template <typename T>
inline T LoadBigEndian(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (std::endian::native == std::endian::little) {
    if constexpr (sizeof(T) == 8) v = static_cast<T>(__builtin_bswap64(v));
    if constexpr (sizeof(T) == 4) v = static_cast<T>(__builtin_bswap32(v));
    if constexpr (sizeof(T) == 2) v = static_cast<T>(__builtin_bswap16(v));
  }
  return v;
}

template <typename T>
inline void StoreBigEndian(std::byte* p, T v) {
  if constexpr (std::endian::native == std::endian::little) {
    if constexpr (sizeof(T) == 8) v = static_cast<T>(__builtin_bswap64(v));
    if constexpr (sizeof(T) == 4) v = static_cast<T>(__builtin_bswap32(v));
    if constexpr (sizeof(T) == 2) v = static_cast<T>(__builtin_bswap16(v));
  }
  std::memcpy(p, &v, sizeof v);
}

inline uint64_t LoadBe64(const std::byte* p) { return LoadBigEndian<uint64_t>(p); }
inline uint32_t LoadBe32(const std::byte* p) { return LoadBigEndian<uint32_t>(p); }
inline uint16_t LoadBe16(const std::byte* p) { return LoadBigEndian<uint16_t>(p); }
inline void StoreBe64(std::byte* p, uint64_t v) { StoreBigEndian(p, v); }
inline void StoreBe32(std::byte* p, uint32_t v) { StoreBigEndian(p, v); }
inline void StoreBe16(std::byte* p, uint16_t v) { StoreBigEndian(p, v); }

}  // namespace qcow2fs
