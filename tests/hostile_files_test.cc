// Files an image names (backing file, external data file) that a hostile or
// broken image can point anywhere: at a FIFO, at the image itself, at a
// file of its own backing chain. Each is refused with one clear line, and
// the data file is locked like the image.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

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
  const std::string image = Make("top.qcow2", "-b base.raw -F raw -o data_file=data.raw");
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
  CommandResult r =
      RunCommand("qemu-io -f raw -c 'write 0 512' " + ShellQuote(dir_.Join("data.raw")) + " 2>&1");
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_TRUE(ContainsNoCase(r.output, "lock")) << r.output;
  std::unique_ptr<Image> image_handle = std::move(opened).value();
  image_handle.reset();
  r = RunCommand("qemu-io -f raw -c 'write 0 512' " + ShellQuote(dir_.Join("data.raw")) + " 2>&1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
}

// A backing chain that comes back to one of its own files: refused with a
// message that says so, not followed 64 levels deep (a message of kilobytes
// of paths) nor blamed on "another process" holding the lock.
TEST_F(HostileFilesTest, BackingChainLoopsAreRefusedWithTheReason) {
  const std::string a = Make("a.qcow2", "-u -b b.qcow2 -F qcow2");
  const std::string b = Make("b.qcow2", "-u -b a.qcow2 -F qcow2");
  const std::string self = Make("self.qcow2", "-u -b a.qcow2 -F qcow2");
  ASSERT_TRUE(QemuImg("rebase -u -b self.qcow2 -F qcow2 " + ShellQuote(self)));
  for (const std::string& path : {a, self}) {
    for (bool writable : {false, true}) {
      OpenOptions options;
      options.read_only = !writable;
      auto opened = Image::Open(path, options);
      ASSERT_FALSE(opened.ok()) << path;
      const std::string& message = opened.status().message();
      EXPECT_TRUE(ContainsNoCase(message, "backing chain loops")) << message;
      EXPECT_LT(message.size(), 400u) << message;
    }
  }
}

// Root opening an image that belongs to someone else follows the names in
// it with the owner's rights: an image of user nobody cannot name a file
// only root may read as its backing file, and may name one nobody can read.
TEST_F(HostileFilesTest, BackingFileIsOpenedWithTheImageOwnersRights) {
  ASSERT_EQ(geteuid(), 0u) << "this test checks what root does; run the suite as root";
  constexpr uid_t kNobody = 65534;
  ASSERT_EQ(chmod(dir_.path().c_str(), 0755), 0);
  const std::string secret = dir_.Join("secret.raw");
  ASSERT_TRUE(WriteWholeFile(secret, std::string(1 << 20, 's')));
  ASSERT_EQ(chmod(secret.c_str(), 0600), 0);
  const std::string theirs = dir_.Join("theirs.raw");
  ASSERT_TRUE(WriteWholeFile(theirs, std::string(1 << 20, 't')));
  ASSERT_EQ(chmod(theirs.c_str(), 0600), 0);
  ASSERT_EQ(chown(theirs.c_str(), kNobody, kNobody), 0);

  const std::string stealing = Make("stealing.qcow2", "-b secret.raw -F raw");
  const std::string honest = Make("honest.qcow2", "-b theirs.raw -F raw");
  ASSERT_EQ(chown(stealing.c_str(), kNobody, kNobody), 0);
  ASSERT_EQ(chown(honest.c_str(), kNobody, kNobody), 0);

  auto refused = Image::Open(stealing, {});
  ASSERT_FALSE(refused.ok()) << "root followed a user's image to a file only root may read";
  EXPECT_TRUE(ContainsNoCase(refused.status().message(), "rights of the image's owner"))
      << refused.status().message();
  auto allowed = Image::Open(honest, {});
  ASSERT_TRUE(allowed.ok()) << Describe(allowed.status());
  std::string head(16, '\0');
  ASSERT_TRUE((*allowed)->Read(0, AsWritableBytes(head)).ok());
  EXPECT_EQ(head, std::string(16, 't'));
  // Root's own images are not affected.
  ASSERT_EQ(chown(stealing.c_str(), 0, 0), 0);
  EXPECT_TRUE(Image::Open(stealing, {}).ok());
}

}  // namespace
}  // namespace qcow2fs::test
