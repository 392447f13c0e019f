// RawFileFs without a kernel: the daemon's request handlers called directly
// on an image the core creates, for properties that hang on the order of
// events inside the daemon, forced with sync points (write-behind's
// "WriteBehind:Applying" and "WriteBehind:DrainWaits").
#include "raw_file_fs.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstddef>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include "sync_point.h"

namespace qcow2fs::fusefs {
namespace {

// A directory under /tmp, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/qcow2fs-rawfs-test.XXXXXX";
    if (mkdtemp(name)) path_ = name;
  }
  ~TempDir() {
    if (!path_.empty()) std::filesystem::remove_all(path_);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Releases every thread stopped at a sync point when it goes out of scope,
// so that a failed assertion does not leave the write-behind thread (and
// with it the destructors that wait for it) stopped for good.
struct ReleaseStoppedThreads {
  ~ReleaseStoppedThreads() { SyncPoints::Reset(true); }
};

// A snapshot taken with mkdir holds every write acknowledged before the
// mkdir, including one write-behind has queued but not yet applied: mkdir
// drains the queue before it takes the snapshot.
TEST(RawFileFsSnapshots, MkdirWaitsForAcknowledgedQueuedWrites) {
  // (SyncPoints::compiled_in() speaks of the core, which this test links
  // without its points; the daemon's own files here are built with them.)
  ScopedSyncPoints points;
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::string path = dir.path() + "/disk.qcow2";
  CreateOptions create;
  create.size = 64 << 20;
  ASSERT_TRUE(Image::Create(path, create).ok());
  OpenOptions options;
  options.read_only = false;
  auto image = Image::Open(path, options);
  ASSERT_TRUE(image.ok()) << image.status().ToString();
  const int path_fd = open(path.c_str(), O_PATH | O_CLOEXEC);
  ASSERT_GE(path_fd, 0);

  FsConfig config;
  config.file_name = "disk.raw";
  config.read_only = false;
  config.write_behind_bytes = 8 << 20;
  {
    RawFileFs fs(**image, path_fd, config);
    ReleaseStoppedThreads release_before_fs_goes;
    // The queued write stops before the image sees it: acknowledged, not
    // applied.
    SyncPoints::Arm("WriteBehind:Applying");
    const std::vector<std::byte> data(RawFileFs::kMaxWrite, std::byte{0xa5});
    size_t written = 0;
    ASSERT_EQ(fs.Write(RawFileFs::kFileIno, 0, data, written), 0);
    ASSERT_EQ(written, data.size());
    ASSERT_TRUE(SyncPoints::WaitUntilStopped("WriteBehind:Applying"));

    auto mkdir = std::async(std::launch::async, [&fs] {
      Entry entry;
      const int err = fs.Mkdir(SnapshotDir::kDirIno, "snap", entry);
      SyncPoints::Reached("Test:MkdirReturned", 0);
      return err;
    });
    ReleaseStoppedThreads release_before_mkdir_is_waited_for;
    // With the write held, a mkdir that drains the queue can only wait for
    // it; one that does not would return first (with a snapshot lacking
    // the write).
    const int first =
        SyncPoints::WaitUntilAnyReached({"WriteBehind:DrainWaits", "Test:MkdirReturned"});
    EXPECT_EQ(first, 0) << "mkdir returned while an acknowledged write was still queued";
    SyncPoints::Release("WriteBehind:Applying");
    ASSERT_EQ(mkdir.get(), 0);

    auto view = (*image)->OpenSnapshot("snap");
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    std::vector<std::byte> read(data.size());
    ASSERT_TRUE((*view)->Read(0, read).ok());
    EXPECT_TRUE(read == data) << "the snapshot lacks a write acknowledged before the mkdir";
    fs.Shutdown();
  }
  close(path_fd);
}

}  // namespace
}  // namespace qcow2fs::fusefs
