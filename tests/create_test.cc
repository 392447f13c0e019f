// Image::Create: what it makes is what QEMU would, and what it cannot make
// leaves nothing behind for the next attempt to mount.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <string>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

TEST(CreateTest, MakesAnImageQemuAccepts) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string path = dir.Join("new.qcow2");
  CreateOptions options;
  options.size = 5ull << 30;
  ASSERT_TRUE(Image::Create(path, options).ok());
  QemuInfo info;
  ASSERT_TRUE(QemuImageInfo(path, &info));
  EXPECT_EQ(info.virtual_size, 5ull << 30);
  EXPECT_TRUE(QemuImg("check -q " + ShellQuote(path)));
}

// A size whose L1 table would pass 32 MiB (512-byte clusters map 32 KiB
// per L1 entry): refused, and no file is left that a retry with a sane
// size would silently open as a 0-byte disk.
TEST(CreateTest, FailedCreateLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.Join("huge.qcow2");
  CreateOptions options;
  options.size = 1ull << 40;
  options.cluster_size = 512;
  Status s = Image::Create(path, options);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(ContainsNoCase(s.message(), "L1 table")) << s.message();
  EXPECT_FALSE(Exists(path)) << "a failed create left " << path << " behind";

  options.size = 1ull << 30;
  ASSERT_TRUE(Image::Create(path, options).ok());
  auto opened = Image::Open(path, {});
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  EXPECT_EQ((*opened)->size(), 1ull << 30);
}

// A create refused because the file exists leaves that file as it was: the
// clean-up on failure removes only what the create itself made.
TEST(CreateTest, ExistingFileIsNeitherReplacedNorRemoved) {
  TempDir dir;
  const std::string path = dir.Join("there.qcow2");
  ASSERT_TRUE(WriteWholeFile(path, "not an image"));
  CreateOptions options;
  options.size = 1 << 20;
  EXPECT_FALSE(Image::Create(path, options).ok());
  std::string content;
  ASSERT_TRUE(ReadWholeFile(path, &content));
  EXPECT_EQ(content, "not an image");
}

}  // namespace
}  // namespace qcow2fs::test
