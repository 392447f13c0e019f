// Power-of-two alignment helpers for cluster and sector arithmetic.
#pragma once

#include <cstdint>

namespace qcow2fs {

// `a` must be a power of two.
constexpr uint64_t AlignDown(uint64_t v, uint64_t a) { return v & ~(a - 1); }
constexpr uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

}  // namespace qcow2fs
