// Unit tests of format/l2_entry.h: L1 entries, standard L2 entries,
// compressed cluster descriptors, extended L2 subcluster bitmaps and the
// word layout of L2 tables, against the bit layouts of the spec.
#include "format/l2_entry.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace qcow2fs {
namespace {

constexpr uint64_t kReservedL1Bits = 0x7f000000000001ffull;  // bits 0-8, 56-62

TEST(L1Entry, OffsetIsBits9To55) {
  const uint64_t offset = 0x00ab'cdef'0123'4000ull;
  EXPECT_EQ(L1EntryL2Offset(offset), offset);
  EXPECT_EQ(L1EntryL2Offset(offset | kOflagCopied), offset);
  EXPECT_EQ(L1EntryL2Offset(offset | kReservedL1Bits), offset);
  EXPECT_EQ(L1EntryL2Offset(kOflagCopied), 0u);
  EXPECT_EQ(L1EntryL2Offset(0x00ff'ffff'ffff'fe00ull), 0x00ff'ffff'ffff'fe00ull);
}

TEST(L2Entry, StandardEntriesClassify) {
  const uint64_t host = 0x50000;
  // Unallocated: all zero, or just the copied flag without an offset.
  EXPECT_EQ(ClassifyL2Entry(0, false, false), ClusterType::kUnallocated);
  EXPECT_EQ(ClassifyL2Entry(kOflagCopied, false, false), ClusterType::kUnallocated);
  // Normal, with or without the copied flag.
  EXPECT_EQ(ClassifyL2Entry(host, false, false), ClusterType::kNormal);
  EXPECT_EQ(ClassifyL2Entry(host | kOflagCopied, false, false), ClusterType::kNormal);
  // Reads-as-zero (bit 0): plain without an offset, preallocated with one.
  EXPECT_EQ(ClassifyL2Entry(kOflagZero, false, false), ClusterType::kZeroPlain);
  EXPECT_EQ(ClassifyL2Entry(host | kOflagZero | kOflagCopied, false, false),
            ClusterType::kZeroAlloc);
  // Compressed wins over everything else.
  EXPECT_EQ(ClassifyL2Entry(kOflagCompressed | kOflagZero, false, false), ClusterType::kCompressed);
  EXPECT_EQ(ClassifyL2Entry(kOflagCompressed, true, true), ClusterType::kCompressed);
}

TEST(L2Entry, ExtendedEntriesIgnoreTheZeroFlag) {
  // With extended L2 entries the bitmap, not bit 0, says what reads as zero.
  EXPECT_EQ(ClassifyL2Entry(kOflagZero, true, false), ClusterType::kUnallocated);
  EXPECT_EQ(ClassifyL2Entry(0x70000 | kOflagZero, true, false), ClusterType::kNormal);
}

TEST(L2Entry, ExternalDataFileOffsetZeroIsValidWhenCopied) {
  // Guest cluster 0 of a raw data file lives at host offset 0.
  EXPECT_EQ(ClassifyL2Entry(kOflagCopied, false, true), ClusterType::kNormal);
  EXPECT_EQ(ClassifyL2Entry(0, false, true), ClusterType::kUnallocated);
  EXPECT_EQ(ClassifyL2Entry(kOflagCopied | kOflagZero, false, true), ClusterType::kZeroPlain);
}

TEST(CompressedDescriptor, KnownLayoutFor64KClusters) {
  // cluster_bits 16: x = 62 - 8 = 54; offset in bits 0-53, extra sectors in
  // bits 54-61.
  const uint64_t offset = 0x50000 + 100;
  const uint64_t entry = EncodeCompressed(offset, 1000, 16);
  // Bytes 100..1099 of the sector at 0x50000: sectors 640, 641 and 642.
  EXPECT_EQ(entry, kOflagCompressed | (uint64_t{2} << 54) | offset);
  EXPECT_EQ(entry & kOflagCopied, 0u) << "compressed clusters are never 'copied'";
  const CompressedDescriptor d = DecodeCompressed(entry, 16);
  EXPECT_EQ(d.host_offset, offset);
  EXPECT_EQ(d.max_bytes, 3 * kSectorSize - 100);
}

TEST(CompressedDescriptor, RoundTripsForEveryClusterSize) {
  for (uint32_t bits = 9; bits <= 21; bits++) {
    SCOPED_TRACE("cluster_bits " + std::to_string(bits));
    const uint32_t x = 62 - (bits - 8);
    const uint64_t cs = uint64_t{1} << bits;
    // Offsets near 0, unaligned, and at the top of the field.
    for (uint64_t offset : {uint64_t{512}, uint64_t{0x12345}, (uint64_t{1} << x) - cs - 1}) {
      // Compressed data is at most one cluster (plus a sector of slack).
      for (uint64_t bytes : {uint64_t{1}, uint64_t{511}, uint64_t{512}, cs / 2 + 3, cs}) {
        const uint64_t entry = EncodeCompressed(offset, bytes, bits);
        ASSERT_EQ(ClassifyL2Entry(entry, false, false), ClusterType::kCompressed);
        ASSERT_EQ(entry & kOflagCopied, 0u);
        const CompressedDescriptor d = DecodeCompressed(entry, bits);
        ASSERT_EQ(d.host_offset, offset) << "bytes " << bytes;
        // The descriptor covers the data, ending at a sector boundary less
        // than a sector past it.
        ASSERT_GE(d.max_bytes, bytes);
        ASSERT_EQ((d.host_offset + d.max_bytes) % kSectorSize, 0u);
        ASSERT_LT(d.host_offset + d.max_bytes, offset + bytes + kSectorSize);
        // Re-encoding the decoded extent gives the same entry (QEMU's rule).
        ASSERT_EQ(EncodeCompressed(d.host_offset, d.max_bytes, bits), entry);
      }
    }
  }
}

TEST(CompressedDescriptor, SectorCountUsesEveryBitOfItsField) {
  // 2 MiB clusters: x = 49, so bits 49-61 count extra sectors (13 bits).
  const uint64_t entry = kOflagCompressed | (((uint64_t{1} << 13) - 1) << 49) | 512;
  const CompressedDescriptor d = DecodeCompressed(entry, 21);
  EXPECT_EQ(d.host_offset, 512u);
  EXPECT_EQ(d.max_bytes, (uint64_t{1} << 13) * kSectorSize);
  // The copied flag is not part of the sector count.
  EXPECT_EQ(DecodeCompressed(entry | kOflagCopied, 21).max_bytes, d.max_bytes);
}

TEST(SubclusterBitmap, EveryStateAtEveryIndex) {
  for (int i = 0; i < kSubclustersPerCluster; i++) {
    SCOPED_TRACE("subcluster " + std::to_string(i));
    const uint64_t alloc = uint64_t{1} << i;
    const uint64_t zero = uint64_t{1} << (32 + i);
    EXPECT_EQ(SubclusterStateOf(0, i), SubclusterState::kUnallocated);
    EXPECT_EQ(SubclusterStateOf(alloc, i), SubclusterState::kAllocated);
    EXPECT_EQ(SubclusterStateOf(zero, i), SubclusterState::kZero);
    EXPECT_EQ(SubclusterStateOf(alloc | zero, i), SubclusterState::kInvalid);
    // Neighbours' bits do not leak into this subcluster.
    const uint64_t others = ~(alloc | zero);
    EXPECT_EQ(SubclusterStateOf(others & 0xffffffffull, i), SubclusterState::kUnallocated);
    EXPECT_EQ(SubclusterStateOf(others & 0xffffffff00000000ull, i), SubclusterState::kUnallocated);
  }
}

TEST(L2Entries, StandardTablesHoldOneWordPerEntry) {
  std::vector<uint64_t> words = {0x10000 | kOflagCopied, 0, kOflagZero, 0x30000};
  const L2Entries entries(words, /*extended_l2=*/false);
  EXPECT_EQ(entries.size(), 4u);
  EXPECT_EQ(entries.word(0), 0x10000 | kOflagCopied);
  EXPECT_EQ(entries.word(2), kOflagZero);
  EXPECT_EQ(entries.word(3), 0x30000u);
  // No subclusters: no bitmap, and setting one changes nothing else.
  EXPECT_EQ(entries.bitmap(0), 0u);
  EXPECT_EQ(entries.bitmap(3), 0u);
  entries.Set(1, 0x20000 | kOflagCopied, kAllSubclustersAllocated);
  entries.set_word(3, 0x40000);
  EXPECT_EQ(words, (std::vector<uint64_t>{0x10000 | kOflagCopied, 0x20000 | kOflagCopied,
                                          kOflagZero, 0x40000}));
}

TEST(L2Entries, ExtendedTablesPairEachEntryWithItsBitmap) {
  // Entry i is words 2i (descriptor) and 2i+1 (bitmap), as on disk.
  std::vector<uint64_t> words = {0x10000 | kOflagCopied, 0x0000000f, 0, kAllSubclustersZero};
  const L2Entries entries(words, /*extended_l2=*/true);
  EXPECT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries.word(0), 0x10000 | kOflagCopied);
  EXPECT_EQ(entries.bitmap(0), 0x0000000fu);
  EXPECT_EQ(entries.word(1), 0u);
  EXPECT_EQ(entries.bitmap(1), kAllSubclustersZero);
  entries.set_word(0, 0x50000);
  entries.Set(1, 0x60000 | kOflagCopied, 0x3);
  EXPECT_EQ(words, (std::vector<uint64_t>{0x50000, 0x0000000f, 0x60000 | kOflagCopied, 0x3}));
}

TEST(SubclusterBitmap, AllAllocatedAndAllZeroAreTheTwoHalves) {
  EXPECT_EQ(kAllSubclustersAllocated | kAllSubclustersZero, ~uint64_t{0});
  EXPECT_EQ(kAllSubclustersAllocated & kAllSubclustersZero, 0u);
  for (int i = 0; i < kSubclustersPerCluster; i++) {
    EXPECT_EQ(SubclusterStateOf(kAllSubclustersAllocated, i), SubclusterState::kAllocated);
    EXPECT_EQ(SubclusterStateOf(kAllSubclustersZero, i), SubclusterState::kZero);
  }
}

TEST(TouchedSubclusters, MarksEverySubclusterARangeTouches) {
  // 64 KiB clusters: 2 KiB subclusters (subcluster_bits 11).
  constexpr uint32_t kBits = 11;
  constexpr uint64_t kCluster = 0x30000;  // a cluster's guest start
  constexpr uint64_t kSub = uint64_t{1} << kBits;
  // One byte, first and last subcluster.
  EXPECT_EQ(TouchedSubclusters(kCluster, kCluster, kCluster + 1, kBits), 0x1u);
  EXPECT_EQ(TouchedSubclusters(kCluster, kCluster + 32 * kSub - 1, kCluster + 32 * kSub, kBits),
            uint64_t{1} << 31);
  // Exactly subclusters 2-4, then the same range one byte wider each side.
  EXPECT_EQ(TouchedSubclusters(kCluster, kCluster + 2 * kSub, kCluster + 5 * kSub, kBits), 0x1cu);
  EXPECT_EQ(TouchedSubclusters(kCluster, kCluster + 2 * kSub - 1, kCluster + 5 * kSub + 1, kBits),
            0x3eu);
  // The whole cluster: the allocation half only, never a zero bit.
  EXPECT_EQ(TouchedSubclusters(kCluster, kCluster, kCluster + 32 * kSub, kBits),
            kAllSubclustersAllocated);
  // Every single-subcluster range maps to its own bit.
  for (uint64_t i = 0; i < 32; i++) {
    EXPECT_EQ(TouchedSubclusters(kCluster, kCluster + i * kSub, kCluster + (i + 1) * kSub, kBits),
              uint64_t{1} << i);
  }
}

}  // namespace
}  // namespace qcow2fs
