// Run-time corruption: when refcounts lie (here: the L1 table's cluster is
// counted as free), the allocator would hand out live metadata. The overlap
// check must catch it before anything is written there, mark the image
// corrupt on disk, stop all further writes, and keep reads working.
#include <gtest/gtest.h>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

TEST(OverlapFenceTest, AllocationOntoTheL1TableMarksTheImageCorrupt) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string path = dir.Join("lying.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 64M"));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x5a 0 64k"}));
  std::string before;
  ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("before.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("before.raw"), &before));

  // Zero the refcount of the L1 table's cluster (16-bit refcounts; the
  // first refcount block covers it).
  std::string file;
  ASSERT_TRUE(ReadWholeFile(path, &file));
  const uint64_t l1 = GetBE64(file, hdr::kL1TableOffset);
  const uint64_t rt = GetBE64(file, hdr::kRefcountTableOffset);
  const uint64_t block = GetBE64(file, rt);
  ASSERT_NE(block, 0u);
  ASSERT_TRUE(PatchFile(path, block + 2 * (l1 >> 16), std::string(2, '\0')));

  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(path, options);
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  std::unique_ptr<Image> image = std::move(opened).value();
  // A write far from existing data needs a new L2 table: the allocator's
  // first free cluster is now the L1 table.
  std::string data(4096, 'x');
  Status s = image->Write(32 << 20, AsBytes(data));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
  EXPECT_TRUE(ContainsNoCase(s.message(), "L1 table")) << s.message();
  // Fenced: no more writes, reads still work.
  s = image->Write(0, AsBytes(data));
  EXPECT_FALSE(s.ok());
  std::string got(64 << 10, '\0');
  ASSERT_TRUE(image->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(before.substr(0, got.size()), got, 0, "read after fencing"));
  image.reset();

  // On disk: the corrupt bit is set, the L1 table is intact, and a fresh
  // open is read-only with a warning.
  std::string info;
  ASSERT_TRUE(QemuImg("info " + ShellQuote(path), &info));
  EXPECT_TRUE(ContainsNoCase(info, "corrupt: true")) << info;
  std::string after_file;
  ASSERT_TRUE(ReadWholeFile(path, &after_file));
  EXPECT_EQ(after_file.substr(l1, 8), file.substr(l1, 8)) << "the L1 table was overwritten";
  auto reopened = Image::Open(path, options);
  ASSERT_TRUE(reopened.ok()) << Describe(reopened.status());
  EXPECT_TRUE((*reopened)->read_only());
  ASSERT_FALSE((*reopened)->info().warnings.empty());
  EXPECT_TRUE(ContainsNoCase((*reopened)->info().warnings[0], "corrupt"));
}

}  // namespace
}  // namespace qcow2fs::test
