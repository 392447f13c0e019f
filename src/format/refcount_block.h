// Refcount block entries (spec "Host cluster management"): a refcount
// block is one cluster of big-endian entries of refcount_bits = 1 << order
// bits. Sub-byte widths pack from the least significant bit of each byte.
#pragma once

#include <cstddef>
#include <cstdint>

#include "format/endian.h"

namespace qcow2fs {

inline uint64_t GetRefcountEntry(const std::byte* block, uint32_t order, uint64_t index) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << order;
      const uint32_t per_byte = 8 / bits;
      const auto byte = static_cast<uint8_t>(block[index / per_byte]);
      return (byte >> ((index % per_byte) * bits)) & ((1u << bits) - 1);
    }
    case 3:
      return static_cast<uint8_t>(block[index]);
    case 4:
      return LoadBe16(block + 2 * index);
    case 5:
      return LoadBe32(block + 4 * index);
    default:
      return LoadBe64(block + 8 * index);
  }
}

// `value` must fit in 1 << order bits.
inline void SetRefcountEntry(std::byte* block, uint32_t order, uint64_t index, uint64_t value) {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const uint32_t bits = 1u << order;
      const uint32_t per_byte = 8 / bits;
      const uint32_t shift = static_cast<uint32_t>((index % per_byte) * bits);
      const uint32_t mask = ((1u << bits) - 1) << shift;
      auto byte = static_cast<uint32_t>(block[index / per_byte]);
      byte = (byte & ~mask) | ((static_cast<uint32_t>(value) << shift) & mask);
      block[index / per_byte] = static_cast<std::byte>(byte);
      return;
    }
    case 3:
      block[index] = static_cast<std::byte>(value);
      return;
    case 4:
      StoreBe16(block + 2 * index, static_cast<uint16_t>(value));
      return;
    case 5:
      StoreBe32(block + 4 * index, static_cast<uint32_t>(value));
      return;
    default:
      StoreBe64(block + 8 * index, value);
      return;
  }
}

inline uint64_t MaxRefcount(uint32_t order) {
  return order == 6 ? ~uint64_t{0} : (uint64_t{1} << (1u << order)) - 1;
}

}  // namespace qcow2fs
