// Limits on values read from an image, each with the reason it exists.
//
// A hostile image can claim any number; these bounds are checked before
// anything is allocated or read, so opening costs bounded memory and time.
#pragma once

#include <cstdint>

namespace qcow2fs::limits {

// The format requires at least 512-byte clusters; QEMU (and so every image
// in the wild) stops at 2 MiB.
inline constexpr uint32_t kMinClusterBits = 9;
inline constexpr uint32_t kMaxClusterBits = 21;
// Extended L2 entries need 32 subclusters of at least 512 bytes.
inline constexpr uint32_t kMinClusterBitsExtendedL2 = 14;

// QEMU refuses L1 tables above 32 MiB and refcount tables above 8 MiB; with
// 2 MiB clusters that already maps 2 EB. Larger claims are hostile.
inline constexpr uint64_t kMaxL1Bytes = 32ull << 20;
inline constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;

// Host offsets in L1/L2/refcount entries have 56 usable bits.
inline constexpr uint64_t kMaxHostOffset = (1ull << 56) - 1;

// The spec caps the backing file name at 1023 bytes.
inline constexpr uint32_t kMaxBackingFileNameBytes = 1023;

// QEMU's limits for the snapshot table: 65536 entries, 64 MiB in total, and
// 1 KiB of extra data per entry.
inline constexpr uint32_t kMaxSnapshots = 65536;
inline constexpr uint64_t kMaxSnapshotTableBytes = 64ull << 20;
inline constexpr uint32_t kMaxSnapshotExtraData = 1024;

// How deep a backing chain may be before we assume a loop.
inline constexpr int kMaxBackingChainDepth = 64;

// Virtual sizes are 64-bit but must leave room for offset arithmetic; QEMU
// caps images at INT64_MAX rounded down to a cluster.
inline constexpr uint64_t kMaxVirtualSize = 1ull << 62;

}  // namespace qcow2fs::limits
