// Unit tests of format/refcount_block.h: every refcount width the spec
// allows (refcount_order 0..6, 1 to 64 bits), its byte layout, its maximum,
// and that setting one entry leaves its neighbours alone.
#include "format/refcount_block.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace qcow2fs {
namespace {

constexpr size_t kBlockBytes = 512;

uint64_t EntriesPerBlock(uint32_t order) { return kBlockBytes * 8 >> order; }

// A value that fits in the width and differs between neighbours.
uint64_t Pattern(uint32_t order, uint64_t index) {
  return (index * 0x9e3779b97f4a7c15ull + 1) & MaxRefcount(order);
}

class RefcountWidth : public ::testing::TestWithParam<uint32_t> {};

TEST_P(RefcountWidth, EveryEntryRoundTrips) {
  const uint32_t order = GetParam();
  std::vector<std::byte> block(kBlockBytes);
  for (uint64_t i = 0; i < EntriesPerBlock(order); i++) {
    SetRefcountEntry(block.data(), order, i, Pattern(order, i));
  }
  for (uint64_t i = 0; i < EntriesPerBlock(order); i++) {
    ASSERT_EQ(GetRefcountEntry(block.data(), order, i), Pattern(order, i)) << "entry " << i;
  }
}

TEST_P(RefcountWidth, SettingOneEntryLeavesTheOthers) {
  const uint32_t order = GetParam();
  for (uint64_t fill : {uint64_t{0}, MaxRefcount(order)}) {
    std::vector<std::byte> block(kBlockBytes);
    for (uint64_t i = 0; i < EntriesPerBlock(order); i++) {
      SetRefcountEntry(block.data(), order, i, fill);
    }
    const uint64_t target = EntriesPerBlock(order) / 2 + 1;
    const uint64_t value = fill == 0 ? 1 : MaxRefcount(order) - 1;
    SetRefcountEntry(block.data(), order, target, value);
    for (uint64_t i = 0; i < EntriesPerBlock(order); i++) {
      ASSERT_EQ(GetRefcountEntry(block.data(), order, i), i == target ? value : fill)
          << "entry " << i << " after setting entry " << target;
    }
  }
}

TEST_P(RefcountWidth, MaximumFillsTheWidth) {
  const uint32_t order = GetParam();
  const uint32_t bits = 1u << order;
  const uint64_t max = MaxRefcount(order);
  EXPECT_EQ(max, bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1);
  std::vector<std::byte> block(kBlockBytes);
  SetRefcountEntry(block.data(), order, 0, max);
  EXPECT_EQ(GetRefcountEntry(block.data(), order, 0), max);
  // Exactly the entry's bits are set, at the start of the block.
  size_t ones = 0;
  for (std::byte b : block)
    ones += static_cast<size_t>(__builtin_popcount(static_cast<unsigned>(b)));
  EXPECT_EQ(ones, bits);
}

INSTANTIATE_TEST_SUITE_P(Orders, RefcountWidth, ::testing::Range(0u, 7u),
                         [](const auto& param_info) {
                           return std::to_string(1u << param_info.param) + "_bits";
                         });

TEST(RefcountLayout, SubByteWidthsPackFromTheLeastSignificantBit) {
  std::vector<std::byte> block(kBlockBytes);
  SetRefcountEntry(block.data(), 0, 0, 1);
  SetRefcountEntry(block.data(), 0, 3, 1);
  EXPECT_EQ(block[0], std::byte{0x09});
  SetRefcountEntry(block.data(), 0, 9, 1);  // second byte, bit 1
  EXPECT_EQ(block[1], std::byte{0x02});

  block.assign(kBlockBytes, std::byte{0});
  SetRefcountEntry(block.data(), 1, 0, 3);
  SetRefcountEntry(block.data(), 1, 1, 1);
  SetRefcountEntry(block.data(), 1, 3, 2);
  EXPECT_EQ(block[0], std::byte{0x87});  // 10 00 01 11

  block.assign(kBlockBytes, std::byte{0});
  SetRefcountEntry(block.data(), 2, 0, 0xa);
  SetRefcountEntry(block.data(), 2, 1, 0x5);
  EXPECT_EQ(block[0], std::byte{0x5a});
}

TEST(RefcountLayout, WholeByteWidthsAreBigEndian) {
  std::vector<std::byte> block(kBlockBytes);
  SetRefcountEntry(block.data(), 3, 1, 0xab);
  EXPECT_EQ(block[1], std::byte{0xab});
  SetRefcountEntry(block.data(), 4, 1, 0x1234);
  EXPECT_EQ(block[2], std::byte{0x12});
  EXPECT_EQ(block[3], std::byte{0x34});
  SetRefcountEntry(block.data(), 5, 1, 0x01020304);
  EXPECT_EQ(block[4], std::byte{0x01});
  EXPECT_EQ(block[7], std::byte{0x04});
  SetRefcountEntry(block.data(), 6, 1, 0x0102030405060708ull);
  EXPECT_EQ(block[8], std::byte{0x01});
  EXPECT_EQ(block[15], std::byte{0x08});
}

}  // namespace
}  // namespace qcow2fs
