// L1 and L2 table entries (spec "Cluster mapping" and "Extended L2
// Entries"), decoded into what a reader needs to know about one cluster.
//
// L1 entry:   bits 9-55 L2 table offset, bit 63 "copied" (refcount == 1).
// L2 entry:   bits 0-61 cluster descriptor, bit 62 compressed, bit 63 copied.
//   standard descriptor:   bit 0 reads-as-zero (v3 without extended L2),
//                          bits 9-55 host cluster offset.
//   compressed descriptor: x = 62 - (cluster_bits - 8);
//                          bits 0..x-1 host byte offset,
//                          bits x..61 additional 512-byte sectors.
// Extended L2 adds a second word: bits 0-31 "subcluster allocated",
// bits 32-63 "subcluster reads as zero", bit n for subcluster n.
#pragma once

#include <cstdint>
#include <span>

namespace qcow2fs {

inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kRefcountTableOffsetMask = 0xfffffffffffffe00ull;
inline constexpr int kSubclustersPerCluster = 32;
inline constexpr uint32_t kSectorSize = 512;

inline uint64_t L1EntryL2Offset(uint64_t l1_entry) { return l1_entry & kL1OffsetMask; }

enum class ClusterType {
  kUnallocated,  // reads from backing (or zeros)
  kZeroPlain,    // reads as zeros, no host cluster
  kZeroAlloc,    // reads as zeros, host cluster preallocated
  kNormal,       // data at the host offset
  kCompressed,   // compressed data at an unaligned host offset
};

// Classifies a standard (first) L2 entry word. With an external data file
// host offset 0 is valid, disambiguated by the copied bit (all such clusters
// have refcount 1). With extended L2 entries the zero flag is not used; the
// subcluster bitmap decides instead.
inline ClusterType ClassifyL2Entry(uint64_t entry, bool extended_l2, bool has_data_file) {
  if (entry & kOflagCompressed) return ClusterType::kCompressed;
  const uint64_t offset = entry & kL2OffsetMask;
  if ((entry & kOflagZero) && !extended_l2) {
    return offset ? ClusterType::kZeroAlloc : ClusterType::kZeroPlain;
  }
  if (offset == 0 && !(has_data_file && (entry & kOflagCopied))) {
    return ClusterType::kUnallocated;
  }
  return ClusterType::kNormal;
}

struct CompressedDescriptor {
  uint64_t host_offset = 0;  // first byte of compressed data
  uint64_t max_bytes = 0;    // bytes from host_offset to the end of its last sector
};

inline CompressedDescriptor DecodeCompressed(uint64_t entry, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t offset = entry & ((1ull << x) - 1);
  const uint64_t extra_sectors = (entry & ((1ull << 62) - 1)) >> x;
  CompressedDescriptor d;
  d.host_offset = offset;
  d.max_bytes = (extra_sectors + 1) * kSectorSize - (offset % kSectorSize);
  return d;
}

// Encodes a compressed cluster whose data occupies [host_offset,
// host_offset + bytes). The sector count is chosen as QEMU does, so the
// descriptor round-trips: additional sectors = last sector - first sector.
inline uint64_t EncodeCompressed(uint64_t host_offset, uint64_t bytes, uint32_t cluster_bits) {
  const uint32_t x = 62 - (cluster_bits - 8);
  const uint64_t extra_sectors =
      (host_offset + bytes - 1) / kSectorSize - host_offset / kSectorSize;
  return kOflagCompressed | (extra_sectors << x) | host_offset;
}

// The entries of one L2 table as its words hold them: one word per entry,
// or with extended L2 two, the descriptor and then the subcluster bitmap.
// A view: the words outlive it, and writes go through to them.
class L2Entries {
 public:
  L2Entries(std::span<uint64_t> words, bool extended_l2)
      : words_(words), extended_l2_(extended_l2) {}

  uint64_t size() const { return extended_l2_ ? words_.size() / 2 : words_.size(); }
  // Entry i's descriptor word (the one ClassifyL2Entry takes).
  uint64_t word(uint64_t i) const { return words_[extended_l2_ ? 2 * i : i]; }
  // Entry i's subcluster bitmap; 0 without extended L2, where a cluster has
  // no subclusters.
  uint64_t bitmap(uint64_t i) const { return extended_l2_ ? words_[2 * i + 1] : 0; }
  void set_word(uint64_t i, uint64_t word) const { words_[extended_l2_ ? 2 * i : i] = word; }
  // Sets both words of entry i; without extended L2 `bitmap` is ignored.
  void Set(uint64_t i, uint64_t word, uint64_t bitmap) const {
    set_word(i, word);
    if (extended_l2_) words_[2 * i + 1] = bitmap;
  }

 private:
  std::span<uint64_t> words_;
  bool extended_l2_;
};

// Bitmap halves of an extended L2 entry with every subcluster allocated,
// or every one reading as zero.
inline constexpr uint64_t kAllSubclustersAllocated = 0xffffffffull;
inline constexpr uint64_t kAllSubclustersZero = kAllSubclustersAllocated << 32;

// The allocation bits (bits 0-31) of the subclusters that guest bytes
// [begin, end) touch, in the cluster starting at `cluster_start`
// (cluster_start <= begin < end <= cluster_start + cluster size).
inline uint64_t TouchedSubclusters(uint64_t cluster_start, uint64_t begin, uint64_t end,
                                   uint32_t subcluster_bits) {
  const uint64_t first = (begin - cluster_start) >> subcluster_bits;
  const uint64_t last = (end - 1 - cluster_start) >> subcluster_bits;
  const uint64_t count = last - first + 1;
  return (count >= uint64_t{kSubclustersPerCluster} ? kAllSubclustersAllocated
                                                    : ((uint64_t{1} << count) - 1))
         << first;
}

// Subcluster state in an extended L2 entry's bitmap word.
enum class SubclusterState { kUnallocated, kAllocated, kZero, kInvalid };

inline SubclusterState SubclusterStateOf(uint64_t bitmap, int index) {
  const bool alloc = (bitmap >> index) & 1;
  const bool zero = (bitmap >> (32 + index)) & 1;
  if (alloc && zero) return SubclusterState::kInvalid;
  if (alloc) return SubclusterState::kAllocated;
  if (zero) return SubclusterState::kZero;
  return SubclusterState::kUnallocated;
}

}  // namespace qcow2fs
