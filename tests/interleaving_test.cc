// Races found once, replayed every time: each test stops one request at a
// sync point in the core (base/sync_point.h), runs the competing request
// exactly where the race needs it, then lets the first one finish and
// checks every byte. None of them depends on timing: where a test has to
// know that a request is held up, the core tells it through a sync point
// passed only when the request actually waits.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <thread>

#include "base/sync_point.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kKiB = 1024;

std::string ReadRange(Image& image, uint64_t offset, uint64_t length) {
  std::string out(length, '\0');
  Status s = image.Read(offset, AsWritableBytes(out));
  EXPECT_TRUE(s.ok()) << Describe(s);
  return out;
}

// qemu-img check must find nothing wrong, leaks included.
::testing::AssertionResult CheckClean(const std::string& path) {
  return QemuImg("check -q " + ShellQuote(path));
}

// A 1 MiB image with 64 KiB clusters whose first cluster QEMU wrote (0x4f),
// open for writing; null (with the failure recorded) if it cannot be built.
std::unique_ptr<Image> OpenWithFirstClusterWritten(const std::string& path) {
  if (!QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 1M") ||
      !QemuIo(path, {"write -P 0x4f 0 64k"})) {
    ADD_FAILURE() << "could not build " << path;
    return nullptr;
  }
  return OpenWritable(path);
}

class InterleavingTest : public SyncPointTest {};

// Extended L2, 64 KiB clusters (2 KiB subclusters), subclusters 0-3 of
// cluster 0 allocated. Writer A fills [7K, 16K): subcluster 3 is allocated,
// 4-7 are not, so A takes the allocating path into the cluster it owns.
// Writer B meanwhile writes [6K, 7K) in place. A must not write back stale
// bytes of subcluster 3 over B's.
TEST_F(InterleavingTest, SubclusterFillKeepsConcurrentInPlaceWrite) {
  const std::string path = dir_.Join("ext.qcow2");
  ASSERT_TRUE(
      QemuImg("create -q -f qcow2 -o extended_l2=on,cluster_size=64k " + ShellQuote(path) + " 1M"));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x11 0 8k"}));
  auto image = OpenWritable(path);
  ASSERT_TRUE(image);

  SyncPoints::Arm("Write:AllocatingBeforeData", [](uint64_t pos) { return pos == 7 * kKiB; });
  const std::string a(9 * kKiB, 'A');
  Status a_status;
  std::thread writer_a([&] { a_status = image->Write(7 * kKiB, AsBytes(a)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Write:AllocatingBeforeData"));
  const std::string b(1 * kKiB, 'B');
  Status b_status = image->Write(6 * kKiB, AsBytes(b));
  SyncPoints::Release("Write:AllocatingBeforeData");
  writer_a.join();
  ASSERT_TRUE(a_status.ok()) << Describe(a_status);
  ASSERT_TRUE(b_status.ok()) << Describe(b_status);

  const std::string expected = std::string(6 * kKiB, '\x11') + b + a;
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(*image, 0, 16 * kKiB), 0, "after the race"));
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
  auto reopened = Image::Open(path, {});
  ASSERT_TRUE(reopened.ok());
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(**reopened, 0, 16 * kKiB), 0, "after reopen"));
}

// Compress mode: a cluster that does not compress is committed as a normal
// cluster. Writer W2 arrives while that commit is under way and waits for
// it; W3 writes the same bytes afterwards. W3's bytes are the newest and
// must be what reads return, before and after a flush.
TEST_F(InterleavingTest, CompressModeWriteAfterPlainCommitIsNotShadowed) {
  const std::string path = dir_.Join("compress.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k,compression_type=zstd " +
                      ShellQuote(path) + " 1M"));
  OpenOptions options;
  options.compress = CompressionType::kZstd;
  auto image = OpenWritable(path, options);
  ASSERT_TRUE(image);

  SyncPoints::Arm("CompressCache:BeforePlainCommit");
  const std::string w1 = RandomBytes(64 * kKiB, 1);  // does not compress
  Status s1, s2;
  std::thread t1([&] { s1 = image->Write(0, AsBytes(w1)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("CompressCache:BeforePlainCommit"));
  const std::string w2(512, 'B');
  std::thread t2([&] {
    s2 = image->Write(0, AsBytes(w2));
    SyncPoints::Reached("Test:W2Returned", 0);
  });
  // W2 either waits for the commit, or (where the core serialises it
  // otherwise) is already done.
  ASSERT_GE(SyncPoints::WaitUntilAnyReached({"CompressCache:WaitingForCommit", "Test:W2Returned"}),
            0);
  SyncPoints::Release("CompressCache:BeforePlainCommit");
  t1.join();
  t2.join();
  ASSERT_TRUE(s1.ok()) << Describe(s1);
  ASSERT_TRUE(s2.ok()) << Describe(s2);

  const std::string w3(512, 'C');
  ASSERT_TRUE(image->Write(0, AsBytes(w3)).ok());
  const std::string expected = w3 + w1.substr(512);
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(*image, 0, 64 * kKiB), 0, "before flush"));
  ASSERT_TRUE(image->Flush().ok());
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(*image, 0, 64 * kKiB), 0, "after flush"));
  image.reset();
  EXPECT_TRUE(CheckClean(path));
  auto reopened = Image::Open(path, {});
  ASSERT_TRUE(reopened.ok());
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(**reopened, 0, 64 * kKiB), 0, "after reopen"));
}

// Growing a disk whose last cluster is partial zeroes the rest of that
// cluster. A write made once the new size is visible must survive it.
TEST_F(InterleavingTest, GrowDoesNotZeroAWriteMadeAtTheNewSize) {
  const std::string path = dir_.Join("grow.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 96K"));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x58 64k 32k"}));
  auto image = OpenWritable(path);
  ASSERT_TRUE(image);

  SyncPoints::Arm("Resize:SizePublished");
  Status resized;
  std::thread resizer([&] { resized = image->Resize(128 * kKiB); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Resize:SizePublished"));
  ASSERT_EQ(image->size(), 128 * kKiB);
  const std::string w(4 * kKiB, 'W');
  Status written = image->Write(100 * kKiB, AsBytes(w));
  SyncPoints::Release("Resize:SizePublished");
  resizer.join();
  ASSERT_TRUE(resized.ok()) << Describe(resized);
  ASSERT_TRUE(written.ok()) << Describe(written);

  const std::string expected = std::string(4 * kKiB, '\0') + w + std::string(24 * kKiB, '\0');
  EXPECT_TRUE(BuffersEqual(expected, ReadRange(*image, 96 * kKiB, 32 * kKiB), 96 * kKiB));
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
}

// Shrinking while an allocating write past the new end is in flight: either
// the shrink fails (the data is there) or the write does, never both
// succeed with the data hidden past the end, to reappear on the next grow.
TEST_F(InterleavingTest, ShrinkAndInFlightWriteCannotBothSucceed) {
  const std::string path = dir_.Join("shrink.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 256K"));
  auto image = OpenWritable(path);
  ASSERT_TRUE(image);

  SyncPoints::Arm("Write:AllocatingBeforeData", [](uint64_t pos) { return pos == 200 * kKiB; });
  const std::string w(4 * kKiB, 'W');
  Status written, shrunk;
  std::thread writer([&] { written = image->Write(200 * kKiB, AsBytes(w)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Write:AllocatingBeforeData"));
  std::thread resizer([&] {
    shrunk = image->Resize(128 * kKiB);
    SyncPoints::Reached("Test:ResizeReturned", 0);
  });
  ASSERT_GE(SyncPoints::WaitUntilAnyReached({"Resize:WaitingForRequests", "Test:ResizeReturned"}),
            0);
  SyncPoints::Release("Write:AllocatingBeforeData");
  writer.join();
  resizer.join();

  ASSERT_FALSE(written.ok() && shrunk.ok()) << "the write and the shrink past it both succeeded";
  if (shrunk.ok()) {
    ASSERT_TRUE(image->Resize(256 * kKiB).ok());
    EXPECT_TRUE(AllZero(ReadRange(*image, 128 * kKiB, 128 * kKiB)))
        << "data written past the new end came back after growing";
  } else {
    EXPECT_EQ(image->size(), 256 * kKiB);
    EXPECT_TRUE(BuffersEqual(w, ReadRange(*image, 200 * kKiB, 4 * kKiB), 200 * kKiB));
  }
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
}

// QEMU's "discard during rewrite": a request that found host cluster X
// writes to it while X's guest cluster is discarded, the discard flushed
// (freeing X) and a new write allocated. The new write must never get X
// while the first request still writes there.
TEST_F(InterleavingTest, DiscardDuringRewriteNeverReusesTheCluster) {
  const std::string path = dir_.Join("rewrite.qcow2");
  auto image = OpenWithFirstClusterWritten(path);
  ASSERT_TRUE(image);

  SyncPoints::Arm("Write:InPlaceBeforeData", [](uint64_t pos) { return pos == 0; });
  const std::string w(4 * kKiB, 'W');
  Status rewritten, discarded, flushed, allocated;
  std::thread rewriter([&] { rewritten = image->Write(0, AsBytes(w)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Write:InPlaceBeforeData"));
  const std::string n(64 * kKiB, 'N');
  std::thread discarder([&] {
    discarded = image->Discard(0, 64 * kKiB);
    flushed = image->Flush();
    allocated = image->Write(512 * kKiB, AsBytes(n));
    SyncPoints::Reached("Test:DiscardDone", 0);
  });
  ASSERT_GE(SyncPoints::WaitUntilAnyReached({"Discard:WaitingForRequests", "Test:DiscardDone"}), 0);
  SyncPoints::Release("Write:InPlaceBeforeData");
  rewriter.join();
  discarder.join();
  ASSERT_TRUE(rewritten.ok() && discarded.ok() && flushed.ok() && allocated.ok());

  EXPECT_TRUE(BuffersEqual(n, ReadRange(*image, 512 * kKiB, 64 * kKiB), 512 * kKiB,
                           "the cluster allocated after the discard"));
  // The rewrite and the discard were concurrent: either order is right.
  const std::string first = ReadRange(*image, 0, 64 * kKiB);
  EXPECT_TRUE(AllZero(first.substr(4 * kKiB)));
  EXPECT_TRUE(AllZero(first.substr(0, 4 * kKiB)) || first.substr(0, 4 * kKiB) == w);
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
}

// A snapshot taken while an in-place write is between its decision and its
// data I/O. The snapshot must wait for it (Snapshot:WaitingForWriters) and
// then hold the write; had it not waited, the write would land in a
// cluster the snapshot now shares, changing the snapshot after the fact.
TEST_F(InterleavingTest, SnapshotWaitsForInPlaceWrite) {
  const std::string path = dir_.Join("snap-rewrite.qcow2");
  auto image = OpenWithFirstClusterWritten(path);
  ASSERT_TRUE(image);

  SyncPoints::Arm("Write:InPlaceBeforeData", [](uint64_t pos) { return pos == 0; });
  const std::string w(4 * kKiB, 'W');
  Status written, taken;
  std::thread writer([&] { written = image->Write(0, AsBytes(w)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Write:InPlaceBeforeData"));
  std::thread snapshotter([&] {
    taken = image->CreateSnapshot("during");
    SyncPoints::Reached("Test:SnapshotDone", 0);
  });
  const int first =
      SyncPoints::WaitUntilAnyReached({"Snapshot:WaitingForWriters", "Test:SnapshotDone"});
  EXPECT_EQ(first, 0) << "the snapshot was taken while a write was between mapping and data";
  std::string snap_at_return;
  if (first == 1) {
    // The broken order: see the snapshot change under the late write.
    snapshotter.join();
    auto early = image->OpenSnapshot("during");
    ASSERT_TRUE(early.ok());
    snap_at_return.assign(64 * kKiB, '\0');
    ASSERT_TRUE((*early)->Read(0, AsWritableBytes(snap_at_return)).ok());
  }
  SyncPoints::Release("Write:InPlaceBeforeData");
  writer.join();
  if (first != 1) snapshotter.join();
  ASSERT_TRUE(written.ok()) << Describe(written);
  ASSERT_TRUE(taken.ok()) << Describe(taken);

  // After the snapshot, the live disk diverges; the snapshot must not.
  const std::string later(4 * kKiB, 'L');
  ASSERT_TRUE(image->Write(0, AsBytes(later)).ok());
  auto view = image->OpenSnapshot("during");
  ASSERT_TRUE(view.ok()) << Describe(view.status());
  std::string snap(64 * kKiB, '\0');
  ASSERT_TRUE((*view)->Read(0, AsWritableBytes(snap)).ok());
  if (first == 1) {
    EXPECT_EQ(snap, snap_at_return) << "the snapshot changed after it was taken";
  }
  EXPECT_EQ(snap.substr(0, 4 * kKiB), w) << "the snapshot lost the write it waited for";
  EXPECT_EQ(snap.substr(4 * kKiB), std::string(60 * kKiB, '\x4f'));
  EXPECT_EQ(ReadRange(*image, 0, 4 * kKiB), later);
  view->reset();
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
}

// Compress mode: bytes staged for a cluster are the newest data. A discard
// of the cluster forgets them and marks the cluster zero; a read running
// meanwhile must return the staged bytes or zeros, never the older content
// of the image under them.
TEST_F(InterleavingTest, CompressModeDiscardNeverExposesOlderData) {
  const std::string path = dir_.Join("compress-discard.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k,compression_type=zstd " +
                      ShellQuote(path) + " 1M"));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x4f 0 64k"}));  // the older content
  OpenOptions options;
  options.compress = CompressionType::kZstd;
  auto image = OpenWritable(path, options);
  ASSERT_TRUE(image);
  const std::string staged(4 * kKiB, 'S');
  ASSERT_TRUE(image->Write(0, AsBytes(staged)).ok());  // partial: stays staged

  SyncPoints::Arm("Discard:StagedDropped");
  Status discarded;
  std::thread discarder([&] { discarded = image->Discard(0, 64 * kKiB); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Discard:StagedDropped"));
  std::string seen(4 * kKiB, '\0');
  Status read;
  std::thread reader([&] {
    read = image->Read(0, AsWritableBytes(seen));
    SyncPoints::Reached("Test:ReadReturned", 0);
  });
  ASSERT_GE(SyncPoints::WaitUntilAnyReached({"Read:WaitingForDiscard", "Test:ReadReturned"}), 0);
  SyncPoints::Release("Discard:StagedDropped");
  discarder.join();
  reader.join();
  ASSERT_TRUE(discarded.ok()) << Describe(discarded);
  ASSERT_TRUE(read.ok()) << Describe(read);
  EXPECT_TRUE(seen == staged || AllZero(seen))
      << "a read during the discard returned data older than the staged write";
  EXPECT_TRUE(AllZero(ReadRange(*image, 0, 64 * kKiB)));
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(CheckClean(path));
}

}  // namespace
}  // namespace qcow2fs::test
