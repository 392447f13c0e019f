// Guest writes never land on metadata. An image whose tables lie (an L2
// entry pointing into metadata, a table whose cluster is counted free) is
// refused the way QEMU refuses it: the write fails with a corruption error
// naming the structure, the image is marked corrupt and fenced, and the
// metadata stays as it was. Each image is built by qemu-img and then edited
// in place with the tests' byte patchers.
#include <gtest/gtest.h>

#include <string>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kCluster = 64 * 1024;
constexpr uint64_t kOffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kCopied = 1ull << 63;

struct Layout {
  uint64_t l1 = 0;  // L1 table offset
  uint64_t l2 = 0;  // the L2 table of guest cluster 0
  uint64_t refcount_table = 0;
  uint64_t refcount_block = 0;  // the first refcount block
  uint64_t data = 0;            // host cluster of guest cluster 0
};

// A 64 MiB image with 64 KiB clusters and guest cluster 0 written.
::testing::AssertionResult MakeImage(const std::string& path, Layout* layout) {
  auto made = QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 64M");
  if (!made) return made;
  made = QemuIo(path, {"write -P 0x61 0 64k"});
  if (!made) return made;
  std::string file;
  made = ReadWholeFile(path, &file);
  if (!made) return made;
  layout->l1 = GetBE64(file, hdr::kL1TableOffset);
  layout->l2 = GetBE64(file, layout->l1) & kOffsetMask;
  layout->data = GetBE64(file, layout->l2) & kOffsetMask;
  layout->refcount_table = GetBE64(file, hdr::kRefcountTableOffset);
  layout->refcount_block = GetBE64(file, layout->refcount_table);
  return ::testing::AssertionSuccess();
}

// Zeroes the 16-bit refcount of the cluster at host `offset`.
::testing::AssertionResult ZeroRefcount(const std::string& path, const Layout& layout,
                                        uint64_t offset) {
  return PatchFile(path, layout.refcount_block + 2 * (offset / kCluster), std::string(2, '\0'));
}

// The write fails as corruption naming `structure`; the image is fenced
// and marked corrupt on disk; the bytes of [protect, protect + kCluster)
// are unchanged.
void ExpectRefused(const std::string& path, uint64_t guest, uint64_t protect,
                   const std::string& structure) {
  std::string before;
  ASSERT_TRUE(ReadFileRange(path, protect, kCluster, &before));
  auto image = OpenWritable(path);
  ASSERT_TRUE(image);
  const std::string data(4096, 'x');
  Status s = image->Write(guest, AsBytes(data));
  ASSERT_FALSE(s.ok()) << "a guest write was allowed onto " << structure;
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
  EXPECT_TRUE(ContainsNoCase(s.message(), structure)) << s.message();
  EXPECT_FALSE(image->Write(32 << 20, AsBytes(data)).ok()) << "writes are not fenced";
  image.reset();
  std::string after;
  ASSERT_TRUE(ReadFileRange(path, protect, kCluster, &after));
  EXPECT_TRUE(BuffersEqual(before, after, protect, structure));
  std::string info;
  ASSERT_TRUE(QemuImg("info " + ShellQuote(path), &info));
  EXPECT_TRUE(ContainsNoCase(info, "corrupt: true")) << info;
}

class MetadataOverlapTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(RequireProgram("qemu-img"));
    ASSERT_TRUE(RequireProgram("qemu-io"));
    path_ = dir_.Join("hostile.qcow2");
    ASSERT_TRUE(MakeImage(path_, &layout_));
  }
  // Points guest cluster 0's L2 entry at host `target` (owned, COPIED).
  void RedirectCluster0(uint64_t target) {
    ASSERT_TRUE(PatchBE64(path_, layout_.l2, target | kCopied));
  }
  TempDir dir_;
  std::string path_;
  Layout layout_;
};

TEST_F(MetadataOverlapTest, L2EntryIntoTheL1Table) {
  RedirectCluster0(layout_.l1);
  ExpectRefused(path_, 0, layout_.l1, "L1 table");
}

TEST_F(MetadataOverlapTest, L2EntryIntoTheRefcountTable) {
  RedirectCluster0(layout_.refcount_table);
  ExpectRefused(path_, 0, layout_.refcount_table, "refcount table");
}

TEST_F(MetadataOverlapTest, L2EntryIntoARefcountBlock) {
  RedirectCluster0(layout_.refcount_block);
  ExpectRefused(path_, 0, layout_.refcount_block, "refcount block");
}

TEST_F(MetadataOverlapTest, L2EntryIntoItsOwnL2Table) {
  RedirectCluster0(layout_.l2);
  ExpectRefused(path_, 0, layout_.l2, "L2 table");
}

TEST_F(MetadataOverlapTest, L2EntryIntoTheHeader) {
  // Offset 0 with COPIED would be "host offset 0" (the header) in a data
  // file; in the image file QEMU reads it as unallocated, and so do we: the
  // cluster reads as zeros, a write allocates a new cluster and never
  // lands on the header.
  RedirectCluster0(0);
  std::string before;
  ASSERT_TRUE(ReadFileRange(path_, 0, 4096, &before));
  auto image = OpenWritable(path_);
  ASSERT_TRUE(image);
  std::string read(4096, 'r');
  ASSERT_TRUE(image->Read(0, AsWritableBytes(read)).ok());
  EXPECT_TRUE(AllZero(read)) << "the cluster does not read as unallocated";
  const std::string data(4096, 'x');
  EXPECT_TRUE(image->Write(0, AsBytes(data)).ok());
  ASSERT_TRUE(image->Read(0, AsWritableBytes(read)).ok());
  EXPECT_EQ(read, data);
  image.reset();
  std::string after;
  ASSERT_TRUE(ReadFileRange(path_, 0, 4096, &after));
  EXPECT_EQ(before.substr(0, 4), after.substr(0, 4)) << "the header magic was overwritten";
  // (The edit leaked the cluster the entry named before: leaks only.)
  const CommandResult check = RunCommand("qemu-img check " + ShellQuote(path_));
  EXPECT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
  std::string qemu_read;
  ASSERT_TRUE(QemuConvertToRaw(path_, dir_.Join("converted.raw")));
  ASSERT_TRUE(ReadFileRange(dir_.Join("converted.raw"), 0, 4096, &qemu_read));
  EXPECT_EQ(qemu_read, data) << "QEMU does not read what was written";
}

// Discarding or zeroing such an entry leaves a cluster that reads as zeros
// (the write fuzzer found one the discard left behind, then refused).
TEST_F(MetadataOverlapTest, L2EntryIntoTheHeaderDiscardedReadsZeros) {
  RedirectCluster0(0);
  {
    auto image = OpenWritable(path_);
    ASSERT_TRUE(image);
    ASSERT_TRUE(image->Discard(0, 2 * kCluster).ok());
    ASSERT_TRUE(image->WriteZeroes(0, kCluster, /*may_unmap=*/false).ok());
    ASSERT_TRUE(image->Flush().ok());
  }
  OpenOptions options;
  options.read_only = true;
  auto image = Image::Open(path_, options);
  ASSERT_TRUE(image.ok()) << Describe(image.status());
  std::string read(kCluster, 'r');
  ASSERT_TRUE((*image)->Read(0, AsWritableBytes(read)).ok());
  EXPECT_TRUE(AllZero(read));
}

// An L2 table counted free: the allocator would hand it out as a data
// cluster for the next new cluster.
TEST_F(MetadataOverlapTest, L2TableWithRefcountZeroIsNotAllocated) {
  ASSERT_TRUE(ZeroRefcount(path_, layout_, layout_.l2));
  ExpectRefused(path_, 1 * kCluster, layout_.l2, "L2 table");
}

TEST_F(MetadataOverlapTest, RefcountBlockWithRefcountZeroIsNotAllocated) {
  ASSERT_TRUE(ZeroRefcount(path_, layout_, layout_.refcount_block));
  ExpectRefused(path_, 1 * kCluster, layout_.refcount_block, "refcount block");
}

// A consistent image: ordinary writes, new L2 tables and refcount growth
// never trip the check.
TEST_F(MetadataOverlapTest, ConsistentImageWritesFreely) {
  auto image = OpenWritable(path_);
  ASSERT_TRUE(image);
  const std::string data = RandomBytes(256 * 1024, 3);
  for (uint64_t off = 0; off < (64u << 20); off += 3 * (1u << 20)) {
    ASSERT_TRUE(image->Write(off, AsBytes(data)).ok());
  }
  ASSERT_TRUE(image->Discard(0, 8 << 20).ok());
  ASSERT_TRUE(image->Flush().ok());
  ASSERT_TRUE(image->Resize(512u << 20).ok());
  ASSERT_TRUE(image->Write(500u << 20, AsBytes(data)).ok());
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(QemuImg("check -q " + ShellQuote(path_)));
}

// Every refcount table entry naming one block (a hostile image makes a
// table of many entries cost one cluster that way, then marks it full):
// refused for writing with one line, instead of a search that never ends.
TEST_F(MetadataOverlapTest, RefcountTableEntriesSharingABlockAreRefused) {
  std::string file;
  ASSERT_TRUE(ReadWholeFile(path_, &file));
  const uint32_t clusters = GetBE32(file, hdr::kRefcountTableClusters);
  for (uint64_t i = 1; i < clusters * kCluster / 8; i++) {
    PutBE64(file, layout_.refcount_table + 8 * i, layout_.refcount_block);
  }
  ASSERT_TRUE(WriteWholeFile(path_, file));
  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(path_, options);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), ErrorCode::kCorrupt) << Describe(opened.status());
  EXPECT_TRUE(ContainsNoCase(opened.status().message(), "both point to the refcount block"))
      << opened.status().message();
  // Reading is still possible.
  auto read_only = Image::Open(path_, {});
  ASSERT_TRUE(read_only.ok()) << Describe(read_only.status());
}

// A compressed entry whose sectors run past the end of the file: a write
// replacing it would drop its references, which past the end belong to
// whatever gets allocated there next: the write's own new cluster, freed
// at the next flush while its entry points there (the acknowledged write
// then read back zeros). The write is refused and the image marked corrupt.
TEST_F(MetadataOverlapTest, CompressedEntryPastTheEndOfTheFileIsNotReleased) {
  ASSERT_TRUE(QemuIo(path_, {"write -c -P 0x63 128k 64k"}));
  std::string file;
  ASSERT_TRUE(ReadWholeFile(path_, &file));
  const uint64_t entry_at = layout_.l2 + 8 * 2;  // guest cluster 2
  ASSERT_TRUE(GetBE64(file, entry_at) & (1ull << 62)) << "guest cluster 2 is not compressed";
  // 64 KiB clusters: the host offset has 54 bits, the sector count 8.
  const uint64_t bad = (1ull << 62) | (255ull << 54) | ((file.size() - 512) & ~511ull);
  ASSERT_TRUE(PatchBE64(path_, entry_at, bad));

  auto image = OpenWritable(path_);
  ASSERT_TRUE(image);
  const std::string data(4096, 'w');
  Status s = image->Write(128 * 1024, AsBytes(data));
  ASSERT_FALSE(s.ok()) << "a write replaced the corrupt compressed entry";
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
  EXPECT_TRUE(ContainsNoCase(s.message(), "compressed cluster")) << s.message();
  // Data elsewhere is intact and readable.
  std::string first(64 * 1024, '\0');
  ASSERT_TRUE(image->Read(0, AsWritableBytes(first)).ok());
  EXPECT_EQ(first, std::string(64 * 1024, '\x61'));
}

// Found by the write fuzzer: an entry without COPIED that names the L1
// table. A write copies the "shared" cluster away and drops the old
// reference: the L1 table's refcount fell to zero and the flush wiped it.
TEST_F(MetadataOverlapTest, SharedLookingEntryOnTheL1TableIsNotReleased) {
  ASSERT_TRUE(PatchBE64(path_, layout_.l2, layout_.l1));  // COPIED clear
  ExpectRefused(path_, 0, layout_.l1, "L1 table");
}

// Found by the write fuzzer: zeroing a cluster whose entry names an
// unaligned host offset (0x8000) released host cluster 0, and the flush
// wiped the header.
TEST_F(MetadataOverlapTest, ZeroingAnUnalignedEntryDoesNotFreeTheHeader) {
  // COPIED clear: zeroing may not keep the host cluster, so it drops it.
  ASSERT_TRUE(PatchBE64(path_, layout_.l2 + 8, 0x8000));  // guest cluster 1
  auto image = OpenWritable(path_);
  ASSERT_TRUE(image);
  Status s = image->WriteZeroes(kCluster, kCluster, /*may_unmap=*/false);
  EXPECT_FALSE(s.ok()) << "zeroing released an unaligned entry";
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
  (void)image->Flush();
  image.reset();
  std::string head;
  ASSERT_TRUE(ReadFileRange(path_, 0, 4, &head));
  EXPECT_EQ(GetBE32(head, 0), hdr::kQcowMagic) << "the header was wiped";
}

}  // namespace
}  // namespace qcow2fs::test
