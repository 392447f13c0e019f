// Image locking against other qcow2fs openers (flock) and against QEMU
// (its byte-range permission locks), in both directions.
#include <gtest/gtest.h>

#include <atomic>

#include <chrono>
#include <thread>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

class ImageLockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(RequireProgram("qemu-io"));
    path_ = dir_.Join("locked.qcow2");
    ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(path_) + " 4M"));
  }
  Result<std::unique_ptr<Image>> Open(bool writable) {
    OpenOptions o;
    o.read_only = !writable;
    return Image::Open(path_, o);
  }
  TempDir dir_;
  std::string path_;
};

TEST_F(ImageLockTest, SecondWriterIsRefusedNamingTheHolder) {
  auto first = Open(true);
  ASSERT_TRUE(first.ok()) << Describe(first.status());
  auto second = Open(true);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), ErrorCode::kLocked);
  EXPECT_TRUE(ContainsNoCase(second.status().message(), "open for writing"))
      << second.status().message();
  auto reader = Open(false);
  ASSERT_FALSE(reader.ok());
  EXPECT_EQ(reader.status().code(), ErrorCode::kLocked);
}

TEST_F(ImageLockTest, ReadersShareButExcludeAWriter) {
  auto a = Open(false);
  auto b = Open(false);
  ASSERT_TRUE(a.ok() && b.ok());
  auto writer = Open(true);
  ASSERT_FALSE(writer.ok());
  EXPECT_TRUE(ContainsNoCase(writer.status().message(), "read-only")) << writer.status().message();
}

TEST_F(ImageLockTest, QemuCannotWriteWhileWeHoldTheImage) {
  for (bool writable : {true, false}) {
    auto image = Open(writable);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    CommandResult r = RunCommand("qemu-io -c 'write 0 512' " + ShellQuote(path_));
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_TRUE(ContainsNoCase(r.output, "lock")) << r.output;
    CommandResult ro = RunCommand("qemu-io -r -c 'read 0 512' " + ShellQuote(path_));
    // A reader is compatible with a read-only holder only.
    if (writable) {
      EXPECT_NE(ro.exit_code, 0) << ro.output;
    } else {
      EXPECT_EQ(ro.exit_code, 0) << ro.output;
    }
  }
  // Released on close: QEMU can write again.
  EXPECT_TRUE(QemuIo(path_, {"write 0 512"}));
}

TEST_F(ImageLockTest, WeRefuseAnImageQemuHasOpenForWriting) {
  // qemu-io keeps the image open while its 'sleep' command runs.
  std::atomic<bool> qemu_done{false};
  std::thread qemu([&] {
    RunCommand("qemu-io -c 'write 0 512' -c 'sleep 3000' " + ShellQuote(path_));
    qemu_done = true;
  });
  // Probe until QEMU holds its locks, for as long as it runs: however slow
  // it is to start, it holds them for the three seconds of its sleep.
  bool locked = false;
  while (!locked && !qemu_done) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    auto probe = Open(false);
    locked = !probe.ok();
    if (locked) {
      EXPECT_EQ(probe.status().code(), ErrorCode::kLocked);
      EXPECT_TRUE(ContainsNoCase(probe.status().message(), "\"write\" lock"))
          << probe.status().message();
    }
  }
  EXPECT_TRUE(locked) << "qcow2fs opened an image QEMU had open for writing";
  auto writer = Open(true);
  EXPECT_FALSE(writer.ok());
  qemu.join();
  auto after = Open(true);
  EXPECT_TRUE(after.ok()) << Describe(after.status());
}

}  // namespace
}  // namespace qcow2fs::test
