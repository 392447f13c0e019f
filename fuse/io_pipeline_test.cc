// WriteBehind and ReadAhead against an in-memory disk whose reads and
// writes can be held back, so the tests control what is in flight.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "mutex.h"
#include "read_ahead.h"
#include "sync_point.h"
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
    MutexLock lk(mu_);
    writes_++;
    if (fail_writes_) return Status(ErrorCode::kIoError, "disk full", ENOSPC);
    if (no_space_ > 0) {
      no_space_--;
      return Status::FromErrno(ENOSPC, "pwrite");
    }
    std::memcpy(bytes_.data() + offset, data.data(), data.size());
    return Status();
  }
  // Reads block after copying, so a held read has seen the old bytes.
  Status Read(uint64_t offset, std::span<std::byte> out) {
    {
      MutexLock lk(mu_);
      reads_++;
      std::memcpy(out.data(), bytes_.data() + offset, out.size());
    }
    WaitWhileHeld();
    return Status();
  }
  void Hold() {
    MutexLock lk(mu_);
    held_ = true;
  }
  void Release() {
    {
      MutexLock lk(mu_);
      held_ = false;
    }
    released_.NotifyAll();
  }
  // Waits until `n` operations are blocked by Hold().
  void WaitForBlocked(int n) {
    MutexLock lk(mu_);
    while (blocked_ < n) released_.Wait(mu_);
  }
  // The next `n` writes fail with ENOSPC (as the core reports it).
  void NoSpaceFor(int n) {
    MutexLock lk(mu_);
    no_space_ = n;
  }
  int writes() {
    MutexLock lk(mu_);
    return writes_;
  }
  void FailWrites(bool fail) {
    MutexLock lk(mu_);
    fail_writes_ = fail;
  }
  std::byte at(uint64_t offset) {
    MutexLock lk(mu_);
    return bytes_[offset];
  }
  void Set(uint64_t offset, size_t length, std::byte value) {
    MutexLock lk(mu_);
    std::memset(bytes_.data() + offset, static_cast<int>(value), length);
  }
  int reads() {
    MutexLock lk(mu_);
    return reads_;
  }

 private:
  void WaitWhileHeld() {
    MutexLock lk(mu_);
    blocked_++;
    released_.NotifyAll();
    while (held_) released_.Wait(mu_);
    blocked_--;
  }

  Mutex mu_;
  CondVar released_;  // held_ or blocked_ changed
  std::vector<std::byte> bytes_ GUARDED_BY(mu_);
  bool held_ GUARDED_BY(mu_) = false;
  bool fail_writes_ GUARDED_BY(mu_) = false;
  int no_space_ GUARDED_BY(mu_) = 0;
  int blocked_ GUARDED_BY(mu_) = 0;
  int writes_ GUARDED_BY(mu_) = 0;
  int reads_ GUARDED_BY(mu_) = 0;
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
  ScopedSyncPoints sync_points;
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2);
  disk.Hold();
  std::vector<std::byte> data = Filled(kPiece, 7);
  ASSERT_TRUE(wb.Submit(0, data));
  data.assign(kPiece, std::byte{0});  // the queue has its own copy
  disk.WaitForBlocked(1);
  EXPECT_EQ(disk.at(0), std::byte{0});
  std::byte on_disk_at_return{0};
  auto drained = std::async(std::launch::async, [&] {
    Status s = wb.Drain();
    on_disk_at_return = disk.at(kPiece - 1);
    SyncPoints::Reached("Test:DrainReturned", 0);
    return s;
  });
  // Drain finds the write pending and waits (it passes WriteBehind:DrainWaits
  // only then); when it returns, the write is on the disk.
  EXPECT_EQ(SyncPoints::WaitUntilAnyReached({"WriteBehind:DrainWaits", "Test:DrainReturned"}), 0);
  disk.Release();
  EXPECT_TRUE(drained.get().ok());
  EXPECT_EQ(disk.at(kPiece - 1), std::byte{7});
  EXPECT_EQ(on_disk_at_return, std::byte{7}) << "Drain returned before the write was applied";
}

TEST(WriteBehind, OverlappingRequestsWaitAndApplyInOrder) {
  ScopedSyncPoints sync_points;
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 8 * kPiece, kPiece, 2);
  disk.Hold();
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 1)));
  disk.WaitForBlocked(1);
  // A second write to the same bytes must not pass the first.
  auto second = std::async(std::launch::async, [&] {
    bool queued = wb.Submit(kPiece / 2, Filled(kPiece, 2));
    SyncPoints::Reached("Test:SecondReturned", 0);
    return queued;
  });
  EXPECT_EQ(SyncPoints::WaitUntilAnyReached({"WriteBehind:SubmitWaits", "Test:SecondReturned"}), 0);
  // A reader of those bytes waits too; one elsewhere does not.
  std::byte on_disk_for_reader{0};
  auto reader = std::async(std::launch::async, [&] {
    wb.WaitFor(100, 10);
    on_disk_for_reader = disk.at(100);
    SyncPoints::Reached("Test:ReaderReturned", 0);
  });
  EXPECT_EQ(SyncPoints::WaitUntilAnyReached({"WriteBehind:ReadWaits", "Test:ReaderReturned"}), 0);
  wb.WaitFor(4 * kPiece, kPiece);
  disk.Release();
  EXPECT_TRUE(second.get());
  reader.get();
  EXPECT_EQ(on_disk_for_reader, std::byte{1}) << "the reader went on before the write it waits for";
  ASSERT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.at(0), std::byte{1});
  EXPECT_EQ(disk.at(kPiece / 2), std::byte{2});
  EXPECT_EQ(disk.at(kPiece + kPiece / 2 - 1), std::byte{2});
}

TEST(WriteBehind, MemoryIsBoundedSubmitWaitsForRoom) {
  ScopedSyncPoints sync_points;
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 2 * kPiece, kPiece, 1);
  disk.Hold();
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 1)));
  ASSERT_TRUE(wb.Submit(kPiece, Filled(kPiece, 2)));
  auto third = std::async(std::launch::async, [&] {
    bool queued = wb.Submit(2 * kPiece, Filled(kPiece, 3));
    SyncPoints::Reached("Test:ThirdReturned", 0);
    return queued;
  });
  EXPECT_EQ(SyncPoints::WaitUntilAnyReached({"WriteBehind:SubmitWaits", "Test:ThirdReturned"}), 0);
  disk.Release();
  EXPECT_TRUE(third.get());
  ASSERT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.at(2 * kPiece), std::byte{3});
}

TEST(WriteBehind, BackgroundErrorsAreReportedOnceByTheNextDrain) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2);
  disk.FailWrites(true);
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 1)));
  Status first = wb.Drain();
  EXPECT_FALSE(first.ok());
  EXPECT_EQ(first.ToErrno(), ENOSPC);
  disk.FailWrites(false);
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 1)));
  EXPECT_TRUE(wb.Drain().ok());
}

TEST(WriteBehind, DestructionAppliesEverythingQueued) {
  Disk disk(1 << 20);
  {
    WriteBehind wb(ApplyTo(disk), 16 * kPiece, kPiece, 2);
    for (int i = 0; i < 16; i++) ASSERT_TRUE(wb.Submit(i * kPiece, Filled(kPiece, i + 1)));
  }
  for (int i = 0; i < 16; i++) EXPECT_EQ(disk.at(i * kPiece + 5), std::byte(i + 1)) << i;
}

// A space bank in an unnamed file under /tmp.
std::unique_ptr<SpaceBank> TmpBank(uint64_t cluster, uint64_t chunk) {
  Result<std::unique_ptr<SpaceBank>> bank = SpaceBank::Create("/tmp", cluster, chunk);
  EXPECT_TRUE(bank.ok()) << bank.status().ToString();
  return bank.ok() ? std::move(bank).value() : nullptr;
}

TEST(SpaceBank, ReservesWhatAWriteCanAllocateInSteps) {
  constexpr uint64_t kCluster = 64 << 10;
  std::unique_ptr<SpaceBank> bank = TmpBank(kCluster, 1 << 20);
  ASSERT_NE(bank, nullptr);
  // Spanned clusters plus two for metadata.
  EXPECT_EQ(bank->Need(0, kCluster), 3 * kCluster);
  EXPECT_EQ(bank->Need(1, kCluster), 4 * kCluster);
  EXPECT_EQ(bank->Need(0, 1 << 20), 18 * kCluster);
  EXPECT_EQ(bank->held(), 0u);
  ASSERT_EQ(bank->Reserve(3 * kCluster), 0);
  // A floor of four clusters on top, rounded up to a step.
  EXPECT_EQ(bank->reserved(), 3 * kCluster);
  EXPECT_EQ(bank->held(), 1u << 20);
  ASSERT_EQ(bank->Reserve(8 * kCluster), 0);
  EXPECT_EQ(bank->held(), 1u << 20);  // 15 clusters, within the step: no fallocate
  ASSERT_EQ(bank->Reserve(4 * kCluster), 0);
  EXPECT_EQ(bank->held(), 2u << 20);
  bank->Start(8 * kCluster);  // applied: still held, for a retry
  EXPECT_EQ(bank->reserved(), 15 * kCluster);
  bank->Return(8 * kCluster);
  EXPECT_EQ(bank->held(), 2u << 20);  // kept for the next writes
  EXPECT_TRUE(bank->Trim());          // to what is reserved plus the floor
  EXPECT_EQ(bank->held(), 11 * kCluster);
  bank->Start(4 * kCluster);
  bank->Give(4 * kCluster);  // to the 3 queued plus the floor
  EXPECT_EQ(bank->held(), 7 * kCluster);
  EXPECT_TRUE(bank->Short());  // until the write given to is done
  bank->Return(4 * kCluster, /*given=*/true);
  EXPECT_FALSE(bank->Short());
  bank->Start(3 * kCluster);
  bank->Return(3 * kCluster);
  EXPECT_EQ(bank->reserved(), 0u);
  EXPECT_TRUE(bank->Trim());
  EXPECT_EQ(bank->held(), 4 * kCluster);
  EXPECT_FALSE(bank->Trim());
  EXPECT_TRUE(bank->Release());  // the floor too, for an image flush
  EXPECT_EQ(bank->held(), 0u);
}

TEST(WriteBehind, QueuedWritesHoldSpaceUntilApplied) {
  Disk disk(1 << 20);
  std::unique_ptr<SpaceBank> bank = TmpBank(4096, 1 << 20);
  ASSERT_NE(bank, nullptr);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2, bank.get());
  disk.Hold();
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 1)));
  ASSERT_TRUE(wb.Submit(kPiece, Filled(kPiece, 2)));
  EXPECT_EQ(bank->reserved(), 2 * bank->Need(0, kPiece));
  EXPECT_GE(bank->held(), bank->reserved());
  disk.Release();
  EXPECT_TRUE(wb.Drain().ok());
  EXPECT_EQ(bank->reserved(), 0u);
  EXPECT_EQ(disk.at(kPiece), std::byte{2});
}

TEST(WriteBehind, ANoSpaceFailureIsRetriedOnTheSpaceTheBankHeld) {
  Disk disk(1 << 20);
  std::unique_ptr<SpaceBank> bank = TmpBank(4096, 1 << 20);
  ASSERT_NE(bank, nullptr);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 1, bank.get());
  disk.NoSpaceFor(1);
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 5)));
  EXPECT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.writes(), 2);
  EXPECT_EQ(disk.at(kPiece - 1), std::byte{5});
  EXPECT_EQ(bank->held(), 4 * 4096u);  // given back for the retry, but the floor
}

TEST(WriteBehind, AFailedRetryIsReportedByTheNextDrainOnly) {
  Disk disk(1 << 20);
  std::unique_ptr<SpaceBank> bank = TmpBank(4096, 1 << 20);
  ASSERT_NE(bank, nullptr);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2, bank.get());
  disk.NoSpaceFor(2);  // the write and its retry
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 5)));
  Status first = wb.Drain();  // what FLUSH at close returns
  EXPECT_EQ(first.ToErrno(), ENOSPC);
  EXPECT_EQ(disk.writes(), 2);
  EXPECT_TRUE(wb.Drain().ok());
  EXPECT_EQ(bank->reserved(), 0u);
  // Room again: queued writes work.
  ASSERT_TRUE(wb.Submit(0, Filled(kPiece, 6)));
  EXPECT_TRUE(wb.Drain().ok());
  EXPECT_EQ(disk.at(0), std::byte{6});
}

TEST(WriteBehind, DrainWithNothingQueuedIsCheap) {
  Disk disk(1 << 20);
  WriteBehind wb(ApplyTo(disk), 4 * kPiece, kPiece, 2);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 100000; i++) ASSERT_TRUE(wb.Drain().ok());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);  // ~100 ns each
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
