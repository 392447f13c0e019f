// Files an image names (backing file, external data file) that a hostile or
// broken image can point anywhere: at a FIFO, at the image itself, at a
// file of its own backing chain. Each is refused with one clear line, and
// the data file is locked like the image.
#include <gtest/gtest.h>

#include <sys/stat.h>

#include <string>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

class HostileFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(RequireProgram("qemu-img"));
    ASSERT_TRUE(RequireProgram("qemu-io"));
  }
  TempDir dir_;
  // QEMU resolves a new image's data file name against the working directory.
  ScopedCwd cwd_{dir_.path()};
  std::string Make(const std::string& name, const std::string& args) {
    const std::string path = dir_.Join(name);
    EXPECT_TRUE(QemuImg("create -q -f qcow2 " + args + " " + ShellQuote(path) + " 1M"));
    return path;
  }
  // Points the image's data file extension at `name`.
  void RenameDataFile(const std::string& image, const std::string& name) {
    Qcow2Header header;
    ASSERT_TRUE(LoadQcow2Header(image, &header));
    header.RemoveExtension(hdr::kExtDataFile);
    Qcow2Header::Extension ext;
    ext.type = hdr::kExtDataFile;
    ext.data = name;
    header.extensions.push_back(std::move(ext));
    ASSERT_TRUE(StoreQcow2Header(image, header));
  }
};

// open() of a FIFO waits for a writer forever: refused instead, at once.
TEST_F(HostileFilesTest, BackingFileThatIsAFifoIsRefused) {
  const std::string fifo = dir_.Join("base.fifo");
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  const std::string top = Make("top.qcow2", "-u -b base.fifo -F raw -o cluster_size=64k");
  auto opened = Image::Open(top, {});
  ASSERT_FALSE(opened.ok());
  EXPECT_TRUE(ContainsNoCase(opened.status().message(), "not a regular file"))
      << opened.status().message();
}

TEST_F(HostileFilesTest, DataFileThatIsAFifoIsRefused) {
  const std::string image = Make("img.qcow2", "-o data_file=data.raw");
  ASSERT_EQ(unlink(dir_.Join("data.raw").c_str()), 0);
  ASSERT_EQ(mkfifo(dir_.Join("data.raw").c_str(), 0600), 0);
  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(image, options);
  ASSERT_FALSE(opened.ok());
  EXPECT_TRUE(ContainsNoCase(opened.status().message(), "not a regular file"))
      << opened.status().message();
}

// A data file naming the image itself: guest writes would overwrite the
// header and tables.
TEST_F(HostileFilesTest, DataFileThatIsTheImageItselfIsRefused) {
  const std::string image = Make("self.qcow2", "-o data_file=data.raw");
  RenameDataFile(image, "self.qcow2");
  std::string before;
  ASSERT_TRUE(ReadWholeFile(image, &before));
  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(image, options);
  ASSERT_FALSE(opened.ok()) << "an image whose data file is itself was opened for writing";
  EXPECT_TRUE(ContainsNoCase(opened.status().message(), "image file itself"))
      << opened.status().message();
  std::string after;
  ASSERT_TRUE(ReadWholeFile(image, &after));
  EXPECT_EQ(before, after);
}

TEST_F(HostileFilesTest, DataFileThatIsTheBackingFileIsRefused) {
  const std::string base = dir_.Join("base.raw");
  ASSERT_TRUE(WriteWholeFile(base, std::string(1 << 20, 'b')));
  const std::string image =
      Make("top.qcow2", "-b base.raw -F raw -o data_file=data.raw");
  RenameDataFile(image, "base.raw");
  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(image, options);
  ASSERT_FALSE(opened.ok()) << "the data file aliases the backing file";
  EXPECT_TRUE(ContainsNoCase(opened.status().message(), "backing chain"))
      << opened.status().message();
}

// While qcow2fs has the image open for writing, QEMU may not write its data
// file behind its back.
TEST_F(HostileFilesTest, DataFileIsLockedWhileOpenForWriting) {
  const std::string image = Make("locked.qcow2", "-o data_file=data.raw");
  OpenOptions options;
  options.read_only = false;
  auto opened = Image::Open(image, options);
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  CommandResult r = RunCommand("qemu-io -f raw -c 'write 0 512' " +
                               ShellQuote(dir_.Join("data.raw")) + " 2>&1");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ContainsNoCase(r.output, "lock")) << r.output;
  std::unique_ptr<Image> image_handle = std::move(opened).value();
  image_handle.reset();
  r = RunCommand("qemu-io -f raw -c 'write 0 512' " + ShellQuote(dir_.Join("data.raw")) + " 2>&1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

}  // namespace
}  // namespace qcow2fs::test
