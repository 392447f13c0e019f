// WriteBehind and ReadAhead against an in-memory disk whose reads and
// writes can be held back, so the tests control what is in flight.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "read_ahead.h"
#include "write_behind.h"

namespace qcow2fs::fusefs {
namespace {

using namespace std::chrono_literals;

// A disk in memory. While held, writes block before changing it and reads
// block after copying out of it.
class Disk {
 public:
  explicit Disk(size_t size) : bytes_(size, std::byte{0}) {}

  Status Write(uint64_t offset, std::span<const std::byte> data) {
    WaitWhileHeld();
    std::lock_guard lk(mu_);
    writes_++;
    if (fail_writes_) return Status(ErrorCode::kIoError, "disk full", 28);
    std::memcpy(bytes_.data() + offset, data.data(), data.size());
    return Status();
  }
  // Reads block after copying, so a held read has seen the old bytes.
  Status Read(uint64_t offset, std::span<std::byte> out) {
    {
      std::lock_guard lk(mu_);
      reads_++;
      std::memcpy(out.data(), bytes_.data() + offset, out.size());
    }
    WaitWhileHeld();
    return Status();
  }
  void Hold() {
    std::lock_guard lk(mu_);
    held_ = true;
  }
  void Release() {
    {
      std::lock_guard lk(mu_);
      held_ = false;
    }
    released_.notify_all();
  }
  // Waits until `n` operations are blocked by Hold().
  void WaitForBlocked(int n) {
    std::unique_lock lk(mu_);
    released_.wait(lk, [&] { return blocked_ >= n; });
  }
  void FailWrites(bool fail) {
    std::lock_guard lk(mu_);
    fail_writes_ = fail;
  }
  std::byte at(uint64_t offset) {
    std::lock_guard lk(mu_);
    return bytes_[offset];
  }
  void Set(uint64_t offset, size_t length, std::byte value) {
    std::lock_guard lk(mu_);
    std::memset(bytes_.data() + offset, static_cast<int>(value), length);
  }
  int reads() {
    std::lock_guard lk(mu_);
    return reads_;
  }

 private:
  void WaitWhileHeld() {
    std::unique_lock lk(mu_);
    blocked_++;
    released_.notify_all();
    released_.wait(lk, [&] { return !held_; });
    blocked_--;
  }

  std::mutex mu_;
  std::condition_variable released_;
  std::vector<std::byte> bytes_;
  bool held_ = false;
  bool fail_writes_ = false;
  int blocked_ = 0;
  int writes_ = 0;
  int reads_ = 0;
};

std::vector<std::byte> Filled(size_t n, int value) {
  return std::vector<std::byte>(n, std::byte(value));
}

constexpr size_t kPiece = 64 << 10;

WriteBehind::Apply ApplyTo(Disk& disk) {
  return [&disk](uint64_t offset, std::span<const std::byte> data) {
    return disk.Write(offset, data);
  };
}

TEST(WriteBehind, SubmitReturnsBeforeTheDiskIsWrittenAndDrainWaits) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2);
  disk.Hold();
  std::vector<std::byte> data = Filled(kPiece, 7);
  wb.Submit(0, data);
  data.assign(kPiece, std::byte{0});  // the queue has its own copy
  disk.WaitForBlocked(1);
  EXPECT_EQ(disk.at(0), std::byte{0});
  auto drained = std::async(std::launch::async, [&] { return wb.Drain(); });
  EXPECT_EQ(drained.wait_for(50ms), std::future_status::timeout);
  disk.Release();
  EXPECT_TRUE(drained.get().ok());
  EXPECT_EQ(disk.at(kPiece - 1), std::byte{7});
}

TEST(WriteBehind, OverlappingRequestsWaitAndApplyInOrder) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 8 * kPiece, kPiece, 2);
  disk.Hold();
  wb.Submit(0, Filled(kPiece, 1));
  disk.WaitForBlocked(1);
  // A second write to the same bytes must not pass the first.
  auto second = std::async(std::launch::async, [&] { wb.Submit(kPiece / 2, Filled(kPiece, 2)); });
  EXPECT_EQ(second.wait_for(50ms), std::future_status::timeout);
  // A reader of those bytes waits too; one elsewhere does not.
  auto reader = std::async(std::launch::async, [&] { wb.WaitFor(100, 10); });
  EXPECT_EQ(reader.wait_for(20ms), std::future_status::timeout);
  wb.WaitFor(4 * kPiece, kPiece);
  disk.Release();
  second.get();
  reader.get();
  ASSERT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.at(0), std::byte{1});
  EXPECT_EQ(disk.at(kPiece / 2), std::byte{2});
  EXPECT_EQ(disk.at(kPiece + kPiece / 2 - 1), std::byte{2});
}

TEST(WriteBehind, MemoryIsBoundedSubmitWaitsForRoom) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 2 * kPiece, kPiece, 1);
  disk.Hold();
  wb.Submit(0, Filled(kPiece, 1));
  wb.Submit(kPiece, Filled(kPiece, 2));
  auto third = std::async(std::launch::async, [&] { wb.Submit(2 * kPiece, Filled(kPiece, 3)); });
  EXPECT_EQ(third.wait_for(50ms), std::future_status::timeout);
  disk.Release();
  third.get();
  ASSERT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.at(2 * kPiece), std::byte{3});
}

TEST(WriteBehind, BackgroundErrorsAreReportedOnceByTheNextDrain) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2);
  disk.FailWrites(true);
  wb.Submit(0, Filled(kPiece, 1));
  Status first = wb.Drain();
  EXPECT_FALSE(first.ok());
  EXPECT_EQ(first.ToErrno(), 28);
  disk.FailWrites(false);
  wb.Submit(0, Filled(kPiece, 1));
  EXPECT_TRUE(wb.Drain().ok());
}

TEST(WriteBehind, DestructionAppliesEverythingQueued) {
  Disk disk(1 << 20);
  {
    WriteBehind wb(ApplyTo(disk), 16 * kPiece, kPiece, 2);
    for (int i = 0; i < 16; i++) wb.Submit(i * kPiece, Filled(kPiece, i + 1));
  }
  for (int i = 0; i < 16; i++) EXPECT_EQ(disk.at(i * kPiece + 5), std::byte(i + 1)) << i;
}

ReadAhead::Fetch FetchFrom(Disk& disk) {
  return [&disk](uint64_t offset, std::span<std::byte> out) { return disk.Read(offset, out); };
}

// Reads [offset, offset + length) through `ra` and returns the bytes.
std::vector<std::byte> ReadVia(ReadAhead& ra, uint64_t offset, size_t length, uint64_t disk_size) {
  std::vector<std::byte> scratch(length);
  ReadAhead::Pin pin;
  Result<const std::byte*> got = ra.Read(offset, scratch, disk_size, pin);
  EXPECT_TRUE(got.ok());
  return got.ok() ? std::vector<std::byte>(*got, *got + length) : std::vector<std::byte>{};
}

TEST(ReadAhead, ASequentialStreamIsServedFromFetchedPieces) {
  const size_t size = 64 * kPiece;
  Disk disk(size);
  for (size_t i = 0; i < 64; i++) disk.Set(i * kPiece, kPiece, std::byte(i));
  ReadAhead ra(FetchFrom(disk), kPiece, kPiece, 6);
  for (size_t i = 0; i < 64; i++) {
    std::vector<std::byte> got = ReadVia(ra, i * kPiece, kPiece, size);
    ASSERT_EQ(got.front(), std::byte(i));
    ASSERT_EQ(got.back(), std::byte(i));
  }
  // Each piece is read from the disk once: by the reader (the first two)
  // or ahead of it, never both.
  EXPECT_LE(disk.reads(), 64 + 2);
}

TEST(ReadAhead, AChangeDuringAFetchIsNeverServedStale) {
  const size_t size = 16 * kPiece;
  Disk disk(size);
  disk.Set(0, size, std::byte{1});
  ReadAhead ra(FetchFrom(disk), kPiece, kPiece, 6);
  ReadVia(ra, 0, kPiece, size);
  disk.Hold();
  // The second read continues the stream: pieces 2 and 3 are fetched ahead
  // (held), and the reader's own fetch of piece 1 is held too.
  auto second = std::async(std::launch::async, [&] { return ReadVia(ra, kPiece, kPiece, size); });
  disk.WaitForBlocked(3);
  // Piece 2 changes while its fetch is in flight, then the fetch completes
  // with whatever it saw.
  ra.Invalidate(2 * kPiece, kPiece);
  disk.Set(2 * kPiece, kPiece, std::byte{9});
  ra.Invalidate(2 * kPiece, kPiece);
  disk.Release();
  EXPECT_EQ(second.get().front(), std::byte{1});
  EXPECT_EQ(ReadVia(ra, 2 * kPiece, kPiece, size).front(), std::byte{9});
  // A change after the fetch completed drops the fetched piece as well.
  ReadVia(ra, 3 * kPiece, kPiece, size);
  ra.Invalidate(4 * kPiece, kPiece);
  disk.Set(4 * kPiece, kPiece, std::byte{5});
  ra.Invalidate(4 * kPiece, kPiece);
  EXPECT_EQ(ReadVia(ra, 4 * kPiece, kPiece, size).back(), std::byte{5});
}

TEST(ReadAhead, APinnedPieceIsNotReusedUnderTheReply) {
  const size_t size = 64 * kPiece;
  Disk disk(size);
  for (size_t i = 0; i < 64; i++) disk.Set(i * kPiece, kPiece, std::byte(i));
  ReadAhead ra(FetchFrom(disk), kPiece, kPiece, 3);
  ReadVia(ra, 0, kPiece, size);
  ReadVia(ra, kPiece, kPiece, size);
  std::vector<std::byte> scratch(kPiece);
  ReadAhead::Pin pin;
  Result<const std::byte*> held = ra.Read(2 * kPiece, scratch, size, pin);
  ASSERT_TRUE(held.ok());
  ASSERT_NE(*held, scratch.data()) << "piece 2 should come from read-ahead";
  // Other streams churn through the remaining slots meanwhile.
  for (size_t i = 40; i < 60; i++) ReadVia(ra, i * kPiece, kPiece, size);
  EXPECT_EQ((*held)[0], std::byte{2});
  EXPECT_EQ((*held)[kPiece - 1], std::byte{2});
}

TEST(ReadAhead, SmallReadsAndTheDiskEndAreHandled) {
  const size_t size = 5 * kPiece + 100;  // a piece at the end is short
  Disk disk(size);
  disk.Set(0, size, std::byte{3});
  ReadAhead ra(FetchFrom(disk), kPiece, kPiece, 6);
  EXPECT_EQ(ReadVia(ra, 10, 100, size).size(), 100u);
  for (uint64_t off = 0; off + kPiece <= size; off += kPiece) {
    EXPECT_EQ(ReadVia(ra, off, kPiece, size).back(), std::byte{3});
  }
  EXPECT_EQ(ReadVia(ra, 5 * kPiece, 100, size).back(), std::byte{3});
}

}  // namespace
}  // namespace qcow2fs::fusefs
