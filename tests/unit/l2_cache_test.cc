// Unit tests of engine/l2_cache: LRU eviction, what is never evicted
// (pinned, dirty, loading tables), failed loads that are not cached, and
// the loading placeholder that makes a second reader wait instead of
// reading the same table again.
#include "engine/l2_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <condition_variable>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace qcow2fs {
namespace {

constexpr size_t kWords = 8;

// A loader that counts calls per offset and fills each table with its
// offset; it can fail, and can hold a load until the test lets it finish.
class FakeDisk {
 public:
  L2Cache::Loader Loader() {
    return [this](uint64_t offset, L2Table& table) -> Status {
      std::unique_lock lk(mu_);
      loads_[offset]++;
      loading_++;
      changed_.notify_all();
      changed_.wait(lk, [&] { return !held_; });
      loading_--;
      if (failures_ > 0) {
        failures_--;
        return Status(ErrorCode::kIoError, "injected read error", EIO);
      }
      for (uint64_t& e : table.entries) e = offset;
      return Status();
    };
  }
  int loads(uint64_t offset) {
    std::lock_guard lk(mu_);
    return loads_[offset];
  }
  void FailNext(int n) {
    std::lock_guard lk(mu_);
    failures_ = n;
  }
  void Hold() {
    std::lock_guard lk(mu_);
    held_ = true;
  }
  void Release() {
    std::lock_guard lk(mu_);
    held_ = false;
    changed_.notify_all();
  }
  // Blocks until `n` loads are under way (held).
  void WaitForLoading(int n) {
    std::unique_lock lk(mu_);
    changed_.wait(lk, [&] { return loading_ >= n; });
  }

 private:
  std::mutex mu_;
  std::condition_variable changed_;
  std::map<uint64_t, int> loads_;
  int failures_ = 0;
  int loading_ = 0;
  bool held_ = false;
};

// Whether `mu` is held, as another thread finds it.
bool TakenFromAnotherThread(Mutex& mu) {
  return std::async(std::launch::async,
                    [&mu] {
                      if (!mu.try_lock()) return true;
                      mu.unlock();
                      return false;
                    })
      .get();
}

class L2CacheTest : public ::testing::Test {
 protected:
  std::shared_ptr<L2Table> Get(L2Cache& cache, uint64_t offset) {
    MutexLock lk(mu_);
    auto r = cache.Get(mu_, offset, disk_.Loader());
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  Mutex mu_;  // stands for the image's metadata mutex
  FakeDisk disk_;
};

TEST_F(L2CacheTest, AMissLoadsOnceAndAHitDoesNotLoad) {
  L2Cache cache(4, kWords);
  auto a = Get(cache, 0x10000);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->offset, 0x10000u);
  ASSERT_EQ(a->entries.size(), kWords);
  EXPECT_EQ(a->entries[3], 0x10000u);
  EXPECT_FALSE(a->dirty);
  EXPECT_FALSE(a->loading);
  auto again = Get(cache, 0x10000);
  EXPECT_EQ(again, a) << "a hit returns the cached table itself";
  EXPECT_EQ(disk_.loads(0x10000), 1);
}

TEST_F(L2CacheTest, TheLeastRecentlyUsedCleanTableIsEvicted) {
  L2Cache cache(2, kWords);
  Get(cache, 1 << 16);
  Get(cache, 2 << 16);
  Get(cache, 1 << 16);  // now table 2 is the least recently used
  Get(cache, 3 << 16);  // over capacity: table 2 goes
  EXPECT_FALSE(cache.over_capacity());
  Get(cache, 1 << 16);
  Get(cache, 3 << 16);
  EXPECT_EQ(disk_.loads(1 << 16), 1);
  EXPECT_EQ(disk_.loads(3 << 16), 1);
  Get(cache, 2 << 16);
  EXPECT_EQ(disk_.loads(2 << 16), 2) << "table 2 should have been evicted";
}

TEST_F(L2CacheTest, CapacityIsAtLeastTwo) {
  L2Cache cache(0, kWords);
  EXPECT_EQ(cache.capacity(), 2u);
  Get(cache, 1 << 16);
  Get(cache, 2 << 16);
  Get(cache, 1 << 16);
  EXPECT_EQ(disk_.loads(1 << 16), 1);
  EXPECT_EQ(disk_.loads(2 << 16), 1);
}

TEST_F(L2CacheTest, PinnedTablesAreNotEvicted) {
  L2Cache cache(2, kWords);
  auto pinned = Get(cache, 1 << 16);  // least recently used, but held
  Get(cache, 2 << 16);
  Get(cache, 3 << 16);
  EXPECT_FALSE(cache.over_capacity());
  EXPECT_EQ(Get(cache, 1 << 16), pinned);
  EXPECT_EQ(disk_.loads(1 << 16), 1);
  EXPECT_EQ(disk_.loads(2 << 16), 1);
  Get(cache, 2 << 16);
  EXPECT_EQ(disk_.loads(2 << 16), 2) << "the unpinned table should have gone instead";
}

TEST_F(L2CacheTest, DirtyTablesStayUntilWrittenBack) {
  L2Cache cache(2, kWords);
  std::shared_ptr<L2Table> fresh;
  {
    MutexLock lk(mu_);
    fresh = cache.InsertNew(1 << 16);
  }
  ASSERT_TRUE(fresh->dirty);
  EXPECT_EQ(fresh->entries, std::vector<uint64_t>(kWords, 0));
  const L2Table* fresh_ptr = fresh.get();
  fresh.reset();  // unpinned, but dirty
  Get(cache, 2 << 16);
  Get(cache, 3 << 16);
  Get(cache, 4 << 16);
  // Only clean tables could go: the dirty one is still there, never loaded.
  EXPECT_EQ(Get(cache, 1 << 16).get(), fresh_ptr);
  EXPECT_EQ(disk_.loads(1 << 16), 0);

  // Written back (clean), it may be evicted like any other.
  std::vector<uint64_t> dirty;
  {
    MutexLock lk(mu_);
    cache.ForEachDirty([&](L2Table& t) {
      dirty.push_back(t.offset);
      t.dirty = false;
    });
    cache.Trim();
  }
  EXPECT_EQ(dirty, std::vector<uint64_t>{1 << 16});
  Get(cache, 5 << 16);
  Get(cache, 6 << 16);
  Get(cache, 1 << 16);
  EXPECT_EQ(disk_.loads(1 << 16), 1);
}

TEST_F(L2CacheTest, ManyDirtyTablesExceedTheCapacity) {
  L2Cache cache(2, kWords);
  MutexLock lk(mu_);
  for (uint64_t i = 1; i <= 4; i++) cache.InsertNew(i << 16);
  EXPECT_TRUE(cache.over_capacity()) << "dirty tables are kept; the image must write back";
  cache.ForEachDirty([](L2Table& t) { t.dirty = false; });
  cache.Trim();
  EXPECT_FALSE(cache.over_capacity());
}

TEST_F(L2CacheTest, ForEachDirtyVisitsInOffsetOrder) {
  L2Cache cache(8, kWords);
  std::vector<uint64_t> seen;
  {
    MutexLock lk(mu_);
    for (uint64_t i : {5, 2, 7, 3}) cache.InsertNew(i << 16);
  }
  Get(cache, 4 << 16);  // clean: not visited
  MutexLock lk(mu_);
  cache.ForEachDirty([&](L2Table& t) { seen.push_back(t.offset >> 16); });
  EXPECT_EQ(seen, (std::vector<uint64_t>{2, 3, 5, 7}));
}

TEST_F(L2CacheTest, InsertNewReplacesACachedTableAndEraseDropsIt) {
  L2Cache cache(4, kWords);
  auto old = Get(cache, 1 << 16);
  std::shared_ptr<L2Table> fresh;
  {
    MutexLock lk(mu_);
    fresh = cache.InsertNew(1 << 16);
  }
  EXPECT_NE(fresh, old);
  EXPECT_EQ(fresh->entries[0], 0u) << "a new table starts all zero";
  EXPECT_EQ(Get(cache, 1 << 16), fresh);
  {
    MutexLock lk(mu_);
    cache.Erase(1 << 16);
    cache.Erase(9 << 16);  // not cached: nothing happens
  }
  auto reloaded = Get(cache, 1 << 16);
  EXPECT_NE(reloaded, fresh);
  EXPECT_EQ(disk_.loads(1 << 16), 2);
}

TEST_F(L2CacheTest, AFailedLoadIsNotCached) {
  L2Cache cache(4, kWords);
  disk_.FailNext(1);
  {
    MutexLock lk(mu_);
    auto r = cache.Get(mu_, 1 << 16, disk_.Loader());
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().ToErrno(), EIO);
    EXPECT_TRUE(TakenFromAnotherThread(mu_)) << "Get returns with the caller's lock held";
  }
  auto t = Get(cache, 1 << 16);
  ASSERT_TRUE(t);
  EXPECT_EQ(t->entries[0], 1u << 16);
  EXPECT_EQ(disk_.loads(1 << 16), 2) << "the error must not stick";
}

// Starts a thread that takes the metadata mutex, says so, and calls Get()
// while still holding it: once the test can take the mutex itself, that
// thread is inside Get() and has let go of it, i.e. it waits on a load.
class Getter {
 public:
  Getter(Mutex& mu, L2Cache& cache, uint64_t offset, L2Cache::Loader loader)
      : thread_([&mu, &cache, offset, loader = std::move(loader), this] {
          MutexLock lk(mu);
          started_ = true;
          auto r = cache.Get(mu, offset, loader);
          status_ = r.status();
          if (r.ok()) {
            table_ = std::move(r).value();
            first_entry_ = table_->entries[0];  // as it was when Get returned
          }
        }) {
    while (!started_) std::this_thread::yield();
  }
  ~Getter() {
    if (thread_.joinable()) thread_.join();
  }
  void Join() { thread_.join(); }
  const Status& status() const { return status_; }
  const std::shared_ptr<L2Table>& table() const { return table_; }
  uint64_t first_entry() const { return first_entry_; }

 private:
  std::atomic<bool> started_{false};
  Status status_;
  std::shared_ptr<L2Table> table_;
  uint64_t first_entry_ = 0;
  std::thread thread_;
};

TEST_F(L2CacheTest, ASecondReaderWaitsForTheLoadInsteadOfLoadingAgain) {
  L2Cache cache(4, kWords);
  disk_.Hold();
  Getter first(mu_, cache, 1 << 16, disk_.Loader());
  disk_.WaitForLoading(1);  // the load runs without the mutex
  Getter second(mu_, cache, 1 << 16, disk_.Loader());
  {
    // The second getter held the mutex from before Get() until it waited
    // (or loaded, which the count below would show).
    MutexLock lk(mu_);
  }
  disk_.Release();
  first.Join();
  second.Join();
  ASSERT_TRUE(first.status().ok());
  ASSERT_TRUE(second.status().ok());
  EXPECT_EQ(disk_.loads(1 << 16), 1);
  EXPECT_EQ(first.table(), second.table());
  EXPECT_EQ(second.first_entry(), 1u << 16) << "the second reader got the table before it was read";
  EXPECT_FALSE(first.table()->loading);
}

TEST_F(L2CacheTest, AWaiterLoadsItselfWhenTheFirstLoadFails) {
  L2Cache cache(4, kWords);
  disk_.Hold();
  disk_.FailNext(1);
  Getter first(mu_, cache, 1 << 16, disk_.Loader());
  disk_.WaitForLoading(1);
  Getter second(mu_, cache, 1 << 16, disk_.Loader());
  { MutexLock lk(mu_); }
  disk_.Release();
  first.Join();
  second.Join();
  EXPECT_FALSE(first.status().ok());
  ASSERT_TRUE(second.status().ok()) << second.status().ToString();
  EXPECT_EQ(second.table()->entries[0], 1u << 16);
  EXPECT_EQ(disk_.loads(1 << 16), 2);
}

TEST_F(L2CacheTest, ATableBeingLoadedIsNotEvicted) {
  L2Cache cache(2, kWords);
  disk_.Hold();
  Getter loading(mu_, cache, 1 << 16, disk_.Loader());
  disk_.WaitForLoading(1);
  // Tables inserted meanwhile push the cache over its capacity; made clean
  // (as if written back), they may go, the one being loaded may not.
  {
    MutexLock lk(mu_);
    for (uint64_t i = 2; i <= 4; i++) {
      auto t = cache.InsertNew(i << 16);
      t->dirty = false;  // as if written back: evictable
    }
    cache.Trim();
  }
  disk_.Release();
  loading.Join();
  ASSERT_TRUE(loading.status().ok());
  EXPECT_EQ(Get(cache, 1 << 16), loading.table()) << "the loaded table was evicted while loading";
  EXPECT_EQ(disk_.loads(1 << 16), 1);
}

}  // namespace
}  // namespace qcow2fs
