// Unit tests of engine/compressed_write_cache against a fake sink (the
// CompressedClusterSink seam Qcow2Image implements): staging, filling from
// the image, packing into segments, the refcount limit per host cluster,
// and every sink failure, a failed commit included, after which the data
// must still be staged and a retry must store it.
#include "engine/compressed_write_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/sync_point.h"
#include "codec/compression.h"

namespace qcow2fs {
namespace {

using Bytes = std::vector<std::byte>;

// What a never-written guest byte holds in the fake image.
std::byte OldByte(uint64_t guest_offset) {
  return static_cast<std::byte>(0x40 + (guest_offset * 7 + guest_offset / 4096) % 61);
}

// Compresses well and differs per seed.
Bytes Compressible(size_t n, int seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; i++) {
    b[i] = static_cast<std::byte>("qcow2fs staging "[i % 16] + (i / 1024 + seed) % 3);
  }
  return b;
}

// Does not compress.
Bytes Random(size_t n, uint64_t seed) {
  Bytes b(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b[i] = static_cast<std::byte>(x >> 24);
  }
  return b;
}

// An image in memory: a host file, and for each guest cluster what the L2
// entry would say. Each call, and each step of storing a segment
// (allocate, write, commit), can be made to fail.
class FakeSink final : public CompressedClusterSink {
 public:
  FakeSink(CompressionType type, uint64_t cluster_size)
      : type_(type), cs_(cluster_size), next_free_(cluster_size) {}

  struct Counts {
    int fills = 0, stores = 0, allocs = 0, writes = 0, commits = 0, releases = 0, plain = 0,
        zeros = 0;
  };
  // Where a compressed cluster went, in host offsets.
  struct Committed {
    uint64_t guest_offset, host_offset, bytes;
  };

  Status ReadClusterForFill(uint64_t guest_offset, std::span<std::byte> out) override {
    std::lock_guard lk(mu_);
    counts_.fills++;
    fill_order_.push_back(guest_offset);
    if (Take(fail_fill_)) return Status(ErrorCode::kIoError, "injected fill error", EIO);
    Bytes content = ContentLocked(guest_offset);
    std::memcpy(out.data(), content.data(), out.size());
    return Status();
  }
  // The steps Qcow2Image takes, in its order: allocate the clusters `data`
  // spans, write, then point the entries at it; the hold of a segment
  // that could not be written is released.
  Status StoreSegment(std::span<const std::byte> data, std::span<const Placed> placed) override {
    std::lock_guard lk(mu_);
    counts_.stores++;
    segment_sizes_.push_back(data.size());
    const uint64_t count = (data.size() + cs_ - 1) / cs_;
    counts_.allocs++;
    if (Take(fail_alloc_)) return Status::FromErrno(ENOSPC, "injected allocation");
    const uint64_t base = next_free_;
    next_free_ += count * cs_;
    host_.resize(next_free_);
    counts_.writes++;
    if (Take(fail_write_)) {
      counts_.releases++;
      released_.push_back({base, count});
      return Status(ErrorCode::kIoError, "injected write error", EIO);
    }
    std::memcpy(host_.data() + base, data.data(), data.size());
    counts_.commits++;
    const bool fail = Take(fail_commit_);
    // A failing commit may have pointed some entries at the segment already.
    std::vector<Committed> done;
    for (size_t i = 0; i < placed.size() && (!fail || i == 0); i++) {
      const Placed& p = placed[i];
      EXPECT_LE(p.offset + p.bytes, data.size()) << "placed past the segment's data";
      stored_[p.guest_offset] = {Kind::kCompressed, base + p.offset, p.bytes, {}};
      done.push_back({p.guest_offset, base + p.offset, p.bytes});
    }
    if (!fail) committed_.push_back(std::move(done));
    return fail ? Status(ErrorCode::kIoError, "injected commit error", EIO) : Status();
  }
  Status WriteUncompressedCluster(uint64_t guest_offset, std::span<const std::byte> data) override {
    std::lock_guard lk(mu_);
    counts_.plain++;
    stored_[guest_offset] = {Kind::kPlain, 0, 0, Bytes(data.begin(), data.end())};
    return Status();
  }
  bool CanZeroClusters() const override { return can_zero_; }
  Status ZeroCluster(uint64_t guest_offset) override {
    std::lock_guard lk(mu_);
    EXPECT_TRUE(can_zero_) << "ZeroCluster on an image without zero clusters";
    counts_.zeros++;
    stored_[guest_offset] = {Kind::kZero, 0, 0, {}};
    return Status();
  }

  // The guest cluster at `guest_offset` as the image has it now.
  Bytes Content(uint64_t guest_offset) {
    std::lock_guard lk(mu_);
    return ContentLocked(guest_offset);
  }
  bool IsCompressed(uint64_t guest_offset) {
    std::lock_guard lk(mu_);
    auto it = stored_.find(guest_offset);
    return it != stored_.end() && it->second.kind == Kind::kCompressed;
  }
  Counts counts() {
    std::lock_guard lk(mu_);
    return counts_;
  }
  std::vector<std::vector<Committed>> committed() {
    std::lock_guard lk(mu_);
    return committed_;
  }
  std::vector<std::pair<uint64_t, uint64_t>> released() {
    std::lock_guard lk(mu_);
    return released_;
  }
  std::vector<uint64_t> segment_sizes() {
    std::lock_guard lk(mu_);
    return segment_sizes_;
  }
  std::vector<uint64_t> fill_order() {
    std::lock_guard lk(mu_);
    return fill_order_;
  }
  void FailFill(int n) { Set(fail_fill_, n); }
  void FailAlloc(int n) { Set(fail_alloc_, n); }
  void FailWrite(int n) { Set(fail_write_, n); }
  void FailCommit(int n) { Set(fail_commit_, n); }
  // As a version 2 image over a backing file: zeros must be stored as data.
  void DisableZeroClusters() { can_zero_ = false; }

 private:
  enum class Kind { kCompressed, kPlain, kZero };
  struct Stored {
    Kind kind;
    uint64_t host_offset;
    uint64_t bytes;
    Bytes plain;
  };
  static bool Take(int& failures) { return failures > 0 && failures-- > 0; }
  void Set(int& counter, int n) {
    std::lock_guard lk(mu_);
    counter = n;
  }
  Bytes ContentLocked(uint64_t guest_offset) {
    Bytes out(cs_);
    auto it = stored_.find(guest_offset);
    if (it == stored_.end()) {
      for (uint64_t i = 0; i < cs_; i++) out[i] = OldByte(guest_offset + i);
    } else if (it->second.kind == Kind::kPlain) {
      out = it->second.plain;
    } else if (it->second.kind == Kind::kCompressed) {
      const Stored& s = it->second;
      Status st = DecompressCluster(type_, {host_.data() + s.host_offset, s.bytes}, out);
      EXPECT_TRUE(st.ok()) << "guest " << guest_offset << ": " << st.ToString();
    }
    return out;
  }

  const CompressionType type_;
  const uint64_t cs_;
  std::mutex mu_;
  Bytes host_;
  uint64_t next_free_;
  std::map<uint64_t, Stored> stored_;
  std::vector<std::vector<Committed>> committed_;
  std::vector<uint64_t> segment_sizes_;
  std::vector<std::pair<uint64_t, uint64_t>> released_;
  std::vector<uint64_t> fill_order_;
  Counts counts_;
  int fail_fill_ = 0, fail_alloc_ = 0, fail_write_ = 0, fail_commit_ = 0;
  bool can_zero_ = true;  // set before the cache is used
};

constexpr uint64_t kCs = 4096;
constexpr uint64_t kDisk = 1 << 20;
// Compressed clusters per host cluster, unless a test sets a lower limit.
constexpr uint64_t kMaxPerHost = 1000;

// The bytes the image should end up with in one cluster: what it held,
// then each write in order.
class Expected {
 public:
  explicit Expected(uint64_t cluster_size) : cs_(cluster_size) {}
  void Write(uint64_t offset, const Bytes& data) {
    for (size_t i = 0; i < data.size(); i++) At(offset + i) = data[i];
  }
  Bytes Cluster(uint64_t guest_offset) {
    Bytes out(cs_);
    for (uint64_t i = 0; i < cs_; i++) out[i] = At(guest_offset + i);
    return out;
  }

 private:
  std::byte& At(uint64_t offset) {
    auto it = bytes_.find(offset);
    if (it == bytes_.end()) it = bytes_.emplace(offset, OldByte(offset)).first;
    return it->second;
  }
  const uint64_t cs_;
  std::map<uint64_t, std::byte> bytes_;
};

class CompressedWriteCacheTest : public ::testing::TestWithParam<CompressionType> {
 protected:
  CompressionType type() const { return GetParam(); }
  Status Write(CompressedWriteCache& cache, uint64_t offset, const Bytes& data) {
    expected_.Write(offset, data);
    return cache.Write(offset, data);
  }
  // Every cluster in `clusters` holds in the sink what was written.
  void ExpectStored(FakeSink& sink, std::initializer_list<uint64_t> clusters) {
    for (uint64_t c : clusters) {
      EXPECT_EQ(sink.Content(c * kCs), expected_.Cluster(c * kCs)) << "cluster " << c;
    }
  }
  Expected expected_{kCs};
};

TEST_P(CompressedWriteCacheTest, ACompleteClusterIsPackedThenCommittedByFlush) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 2 * kCs, Compressible(kCs, 1)).ok());
  // Compressed and waiting in the segment: nothing allocated yet.
  EXPECT_EQ(sink.counts().allocs, 0);
  EXPECT_EQ(sink.counts().fills, 0) << "a complete cluster needs nothing from the image";
  EXPECT_EQ(cache.staged_bytes(), kCs);
  ASSERT_TRUE(cache.Flush().ok());
  const FakeSink::Counts n = sink.counts();
  EXPECT_EQ(n.stores, 1);
  EXPECT_EQ(n.allocs, 1);
  EXPECT_EQ(n.writes, 1);
  EXPECT_EQ(n.commits, 1);
  EXPECT_EQ(n.releases, 0);
  EXPECT_EQ(cache.staged_bytes(), 0u);
  EXPECT_TRUE(sink.IsCompressed(2 * kCs));
  ExpectStored(sink, {2});
  // Flushing again has nothing to do.
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().allocs, 1);
}

TEST_P(CompressedWriteCacheTest, PiecesOfAClusterAreStagedAndTheRestFilledFromTheImage) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 5 * kCs + 100, Compressible(700, 2)).ok());
  ASSERT_TRUE(Write(cache, 5 * kCs + 3000, Compressible(96, 3)).ok());
  EXPECT_EQ(sink.counts().fills, 0) << "an incomplete cluster stays staged";
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.fill_order(), std::vector<uint64_t>{5 * kCs});
  EXPECT_TRUE(sink.IsCompressed(5 * kCs));
  ExpectStored(sink, {5});
}

TEST_P(CompressedWriteCacheTest, PiecesThatCompleteAClusterNeedNoFill) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  const Bytes data = Compressible(kCs, 4);
  // Out of order and overlapping.
  ASSERT_TRUE(Write(cache, 3 * kCs + 2048, {data.begin() + 2048, data.end()}).ok());
  ASSERT_TRUE(Write(cache, 3 * kCs + 1000, {data.begin() + 1000, data.begin() + 2100}).ok());
  ASSERT_TRUE(Write(cache, 3 * kCs, {data.begin(), data.begin() + 1000}).ok());
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().fills, 0);
  ExpectStored(sink, {3});
}

TEST_P(CompressedWriteCacheTest, ZeroAndIncompressibleClustersAreNotCompressed) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 0, Bytes(kCs)).ok());
  ASSERT_TRUE(Write(cache, kCs, Random(kCs, 5)).ok());
  // Stored at once, without a segment.
  FakeSink::Counts n = sink.counts();
  EXPECT_EQ(n.zeros, 1);
  EXPECT_EQ(n.plain, 1);
  EXPECT_EQ(cache.staged_bytes(), 0u);
  ASSERT_TRUE(cache.Flush().ok());
  n = sink.counts();
  EXPECT_EQ(n.allocs, 0);
  EXPECT_FALSE(sink.IsCompressed(kCs));
  EXPECT_EQ(sink.Content(0), Bytes(kCs));
  ExpectStored(sink, {1});
}

TEST_P(CompressedWriteCacheTest, ZeroClustersAreCompressedWhereTheImageCannotZero) {
  FakeSink sink(type(), kCs);
  sink.DisableZeroClusters();
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 0, Bytes(kCs)).ok());
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().zeros, 0);
  EXPECT_TRUE(sink.IsCompressed(0));
  EXPECT_EQ(sink.Content(0), Bytes(kCs));
}

TEST_P(CompressedWriteCacheTest, CaptureAndApplyOverlayTheStagedBytes) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  const Bytes a = Compressible(300, 6), b = Compressible(500, 7);
  ASSERT_TRUE(cache.Write(kCs - 100, a).ok());  // across a cluster boundary
  ASSERT_TRUE(cache.Write(3 * kCs + 10, b).ok());
  EXPECT_EQ(cache.FirstStaged(0, 10 * kCs), 0u);  // cluster 0 holds the first 100 bytes
  EXPECT_EQ(cache.FirstStaged(2 * kCs, 10 * kCs), 3 * kCs);
  EXPECT_EQ(cache.FirstStaged(4 * kCs, 10 * kCs), std::nullopt);

  // A read of [kCs - 200, 3 * kCs + 20) over an image full of 0xee.
  const uint64_t from = kCs - 200, length = 2 * kCs + 220;
  auto snap = cache.Capture(from, length);
  Bytes buf(length, std::byte{0xee});
  CompressedWriteCache::Apply(snap, from, buf);
  for (uint64_t i = 0; i < length; i++) {
    const uint64_t at = from + i;
    std::byte want{0xee};
    if (at >= kCs - 100 && at < kCs + 200) want = a[at - (kCs - 100)];
    if (at >= 3 * kCs + 10) want = b[at - (3 * kCs + 10)];
    ASSERT_EQ(buf[i], want) << "guest byte " << at;
  }
}

TEST_P(CompressedWriteCacheTest, AFailedCommitKeepsTheDataStagedAndARetryStoresIt) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 0, Compressible(kCs, 8)).ok());
  ASSERT_TRUE(Write(cache, kCs, Compressible(kCs, 9)).ok());
  ASSERT_TRUE(Write(cache, 2 * kCs + 7, Compressible(100, 10)).ok());
  sink.FailCommit(1);
  Status failed = cache.Flush();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.ToErrno(), EIO) << failed.ToString();
  EXPECT_EQ(sink.counts().releases, 0) << "a commit drops the segment's hold itself";
  EXPECT_EQ(cache.staged_bytes(), 3 * kCs) << "nothing may be forgotten after a failed commit";
  // Readers still see the staged bytes.
  Bytes seen(kCs, std::byte{0});
  CompressedWriteCache::Apply(cache.Capture(kCs, kCs), kCs, seen);
  EXPECT_EQ(seen, Compressible(kCs, 9));

  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(cache.staged_bytes(), 0u);
  EXPECT_EQ(sink.counts().allocs, 2);
  ExpectStored(sink, {0, 1, 2});
}

TEST_P(CompressedWriteCacheTest, AFailedSegmentWriteReleasesItsClusters) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 4 * kCs, Compressible(kCs, 11)).ok());
  sink.FailWrite(1);
  Status failed = cache.Flush();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.ToErrno(), EIO);
  ASSERT_EQ(sink.released().size(), 1u);
  EXPECT_EQ(sink.released()[0], (std::pair<uint64_t, uint64_t>{kCs, 1}));
  EXPECT_EQ(sink.counts().commits, 0);
  EXPECT_EQ(cache.staged_bytes(), kCs);
  ASSERT_TRUE(cache.Flush().ok());
  ExpectStored(sink, {4});
}

TEST_P(CompressedWriteCacheTest, AFullHostIsReportedAsNoSpace) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 0, Compressible(kCs, 12)).ok());
  sink.FailAlloc(1);
  Status failed = cache.Flush();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.code(), ErrorCode::kNoSpace);
  EXPECT_EQ(failed.ToErrno(), ENOSPC);
  EXPECT_EQ(sink.counts().writes, 0);
  EXPECT_EQ(cache.staged_bytes(), kCs);
  ASSERT_TRUE(cache.Flush().ok());
  ExpectStored(sink, {0});
}

TEST_P(CompressedWriteCacheTest, AFailedFillKeepsTheClusterStaged) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 6 * kCs + 1, Compressible(10, 13)).ok());
  sink.FailFill(1);
  Status failed = cache.Flush();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.ToErrno(), EIO);
  EXPECT_EQ(cache.staged_bytes(), kCs);
  ASSERT_TRUE(cache.Flush().ok());
  ExpectStored(sink, {6});
}

TEST_P(CompressedWriteCacheTest, NoHostClusterHoldsMoreClustersThanItsRefcountAllows) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, /*max_per_host_cluster=*/2, kDisk, 0);
  for (int i = 0; i < 20; i++) ASSERT_TRUE(Write(cache, i * kCs, Compressible(kCs, i)).ok());
  ASSERT_TRUE(cache.Flush().ok());
  std::map<uint64_t, int> users;
  for (const auto& segment : sink.committed()) {
    for (const auto& p : segment) {
      for (uint64_t c = p.host_offset / kCs; c <= (p.host_offset + p.bytes - 1) / kCs; c++) {
        users[c]++;
      }
    }
  }
  ASSERT_FALSE(users.empty());
  for (const auto& [cluster, n] : users) EXPECT_LE(n, 2) << "host cluster " << cluster;
  for (uint64_t c = 0; c < 20; c++) ExpectStored(sink, {c});
}

TEST_P(CompressedWriteCacheTest, RewritingAPackedClusterCommitsItFirst) {
  ScopedSyncPoints sync_points;
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(Write(cache, 0, Compressible(kCs, 14)).ok());  // packed
  ASSERT_TRUE(Write(cache, 100, Compressible(50, 15)).ok());
  EXPECT_EQ(SyncPoints::Passes("CompressCache:WaitingForCommit"), 1u);
  EXPECT_EQ(sink.counts().commits, 1) << "the packed cluster must reach the image first";
  // The new bytes are staged on top of it.
  Bytes seen(kCs, std::byte{0});
  CompressedWriteCache::Apply(cache.Capture(0, kCs), 0, seen);
  EXPECT_EQ(Bytes(seen.begin() + 100, seen.begin() + 150), Compressible(50, 15));
  ASSERT_TRUE(cache.Flush().ok());
  ExpectStored(sink, {0});
}

TEST_P(CompressedWriteCacheTest, DirectWritesAndStagedClustersExcludeEachOther) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(cache.Write(kCs + 5, Compressible(10, 16)).ok());
  EXPECT_FALSE(cache.BeginDirectWrite(1)) << "cluster 1 is staged";
  EXPECT_TRUE(cache.BeginDirectWrite(2));
  EXPECT_TRUE(cache.BeginDirectWrite(2)) << "direct writers do not exclude each other";
  cache.EndDirectWrite(2);
  cache.EndDirectWrite(2);
  cache.EndDirectWrite(7);  // never admitted: nothing to end
  ASSERT_TRUE(cache.Write(2 * kCs, Compressible(10, 17)).ok()) << "no direct writer left";
  ASSERT_TRUE(cache.Flush().ok());
}

TEST_P(CompressedWriteCacheTest, DropStagedForgetsFillingClustersOnly) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0);
  ASSERT_TRUE(cache.Write(kCs, Compressible(100, 18)).ok());      // filling
  ASSERT_TRUE(cache.Write(3 * kCs, Compressible(kCs, 19)).ok());  // packed
  EXPECT_FALSE(cache.DropStaged(0, 4 * kCs)) << "a packed cluster is past dropping";
  EXPECT_EQ(cache.staged_bytes(), 2 * kCs) << "a refused drop changes nothing";
  ASSERT_TRUE(cache.SettleRange(0, 4 * kCs).ok());
  EXPECT_EQ(sink.counts().commits, 1) << "settling commits the packed cluster";
  EXPECT_TRUE(cache.DropStaged(0, 4 * kCs));
  EXPECT_EQ(cache.staged_bytes(), 0u);
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().fills, 0) << "the dropped cluster is never stored";
  EXPECT_EQ(sink.Content(3 * kCs), Compressible(kCs, 19));
}

TEST_P(CompressedWriteCacheTest, BytesPastTheEndOfTheDiskAreKnownZeros) {
  FakeSink sink(type(), kCs);
  const uint64_t disk = 10 * kCs + 1000;
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, disk, 0);
  ASSERT_TRUE(cache.Write(10 * kCs, Compressible(1000, 20)).ok());  // completes the cluster
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().fills, 0);
  Bytes want = Compressible(1000, 20);
  want.resize(kCs);
  EXPECT_EQ(sink.Content(10 * kCs), want);

  // Grown, the same tail is unknown again: it is filled from the image.
  cache.set_disk_size(12 * kCs);
  ASSERT_TRUE(cache.Write(11 * kCs, Compressible(1000, 21)).ok());
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().fills, 1);
}

TEST_P(CompressedWriteCacheTest, AFullCacheStoresItsOldestClustersFirst) {
  FakeSink sink(type(), kCs);
  // 16 clusters of staging, the least there is.
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 16 * kCs);
  for (uint64_t c = 0; c < 16; c++)
    ASSERT_TRUE(Write(cache, c * kCs + 1, Compressible(9, 22)).ok());
  EXPECT_EQ(sink.counts().fills, 0);
  ASSERT_TRUE(Write(cache, 16 * kCs + 1, Compressible(9, 23)).ok());
  ASSERT_FALSE(sink.fill_order().empty()) << "a full cache must make room";
  EXPECT_EQ(sink.fill_order().front(), 0u) << "the oldest cluster goes first";
  EXPECT_LE(cache.staged_bytes(), 16 * kCs);
  ASSERT_TRUE(cache.Flush().ok());
  for (uint64_t c = 0; c <= 16; c++) ExpectStored(sink, {c});
}

TEST_P(CompressedWriteCacheTest, WithAnExecutorWritesReturnBeforeCompression) {
  FakeSink sink(type(), kCs);
  std::vector<std::function<void()>> jobs;
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0,
                             [&](std::function<void()> job) { jobs.push_back(std::move(job)); });
  ASSERT_TRUE(Write(cache, 0, Compressible(kCs, 24)).ok());
  ASSERT_TRUE(Write(cache, kCs, Compressible(kCs, 25)).ok());
  ASSERT_EQ(jobs.size(), 2u);
  EXPECT_EQ(cache.staged_bytes(), 2 * kCs);
  Bytes seen(kCs);
  CompressedWriteCache::Apply(cache.Capture(kCs, kCs), kCs, seen);
  EXPECT_EQ(seen, Compressible(kCs, 25)) << "readers see a cluster being compressed";
  for (auto& job : jobs) job();
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().commits, 1);
  ExpectStored(sink, {0, 1});
}

TEST_P(CompressedWriteCacheTest, AnExecutorWithNoRoomMeansCompressingInline) {
  FakeSink sink(type(), kCs);
  CompressedWriteCache cache(sink, type(), kCs, kMaxPerHost, kDisk, 0,
                             [](std::function<void()>) { throw std::runtime_error("no room"); });
  ASSERT_TRUE(Write(cache, 0, Compressible(kCs, 26)).ok());
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(sink.counts().commits, 1);
  ExpectStored(sink, {0});
}

TEST_P(CompressedWriteCacheTest, ClustersShareOneStorePaddedTo4KiB) {
  // 64 KiB clusters compress to far less than a host cluster each.
  constexpr uint64_t kCs64 = 64 << 10;
  FakeSink sink(type(), kCs64);
  CompressedWriteCache cache(sink, type(), kCs64, kMaxPerHost, 16 * kCs64, 0);
  for (int i = 0; i < 3; i++) ASSERT_TRUE(cache.Write(i * kCs64, Compressible(kCs64, i)).ok());
  ASSERT_TRUE(cache.Flush().ok());
  const FakeSink::Counts n = sink.counts();
  EXPECT_EQ(n.fills, 0);
  EXPECT_EQ(n.stores, 1) << "one store for the three clusters";
  ASSERT_EQ(sink.segment_sizes().size(), 1u);
  const uint64_t size = sink.segment_sizes()[0];
  EXPECT_EQ(size % 4096, 0u) << "padded so that it can go O_DIRECT";
  EXPECT_LT(size, kCs64) << "no further than the one host cluster it fills";
  for (int i = 0; i < 3; i++) EXPECT_EQ(sink.Content(i * kCs64), Compressible(kCs64, i)) << i;
}

INSTANTIATE_TEST_SUITE_P(Codecs, CompressedWriteCacheTest,
                         ::testing::Values(CompressionType::kZlib, CompressionType::kZstd),
                         [](const auto& param_info) {
                           return param_info.param == CompressionType::kZstd ? "zstd" : "zlib";
                         });

// Packing does not depend on the codec: zstd only, which is the faster one
// on these 10 MiB. 2 MiB clusters make a segment of four; one compressed
// cluster per host cluster (the refcount limit) fills it with four.
class CompressedWriteCachePacking : public ::testing::Test {
 protected:
  static constexpr CompressionType kType = CompressionType::kZstd;
  static constexpr uint64_t kBig = 2 << 20;
  CompressedWriteCache& Open(CompressedWriteCache::Executor executor = {}) {
    cache_ = std::make_unique<CompressedWriteCache>(sink_, kType, kBig, /*max_per_host=*/1,
                                                    16 * kBig, 0, std::move(executor));
    return *cache_;
  }
  // Guest cluster i gets pattern i.
  Status WriteCluster(int i) { return cache_->Write(i * kBig, Compressible(kBig, i)); }
  void ExpectStored(int clusters) {
    for (int i = 0; i < clusters; i++) {
      EXPECT_EQ(sink_.Content(i * kBig), Compressible(kBig, i)) << "cluster " << i;
    }
  }
  FakeSink sink_{kType, kBig};
  std::unique_ptr<CompressedWriteCache> cache_;
};

TEST_F(CompressedWriteCachePacking, AFullSegmentIsWrittenWithoutAFlush) {
  CompressedWriteCache& cache = Open();
  for (int i = 0; i < 4; i++) ASSERT_TRUE(WriteCluster(i).ok());
  EXPECT_EQ(sink_.counts().commits, 0);
  ASSERT_TRUE(WriteCluster(4).ok());
  ASSERT_EQ(sink_.committed().size(), 1u) << "the fifth cluster found the segment full";
  EXPECT_EQ(sink_.committed()[0].size(), 4u);
  EXPECT_EQ(cache.staged_bytes(), kBig);
  ASSERT_TRUE(cache.Flush().ok());
  ExpectStored(5);
}

// The writer whose cluster found the segment full seals it; a failed
// commit is its error, and every cluster of the segment stays staged.
TEST_F(CompressedWriteCachePacking, AFailedCommitOfAFullSegmentFailsTheWriteThatSealedIt) {
  CompressedWriteCache& cache = Open();
  for (int i = 0; i < 4; i++) ASSERT_TRUE(WriteCluster(i).ok());
  sink_.FailCommit(1);
  Status failed = WriteCluster(4);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.ToErrno(), EIO) << failed.ToString();
  EXPECT_EQ(cache.staged_bytes(), 5 * kBig) << "nothing may be forgotten after a failed commit";
  Bytes seen(kBig);
  CompressedWriteCache::Apply(cache.Capture(2 * kBig, kBig), 2 * kBig, seen);
  EXPECT_EQ(seen, Compressible(kBig, 2));
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(cache.staged_bytes(), 0u);
  ExpectStored(5);
}

// A background job that seals a segment has no caller to report to: a
// failed commit leaves the clusters staged, and the next flush stores them.
TEST_F(CompressedWriteCachePacking, AFailedCommitOnTheExecutorIsRetriedByFlush) {
  std::vector<std::function<void()>> jobs;
  CompressedWriteCache& cache =
      Open([&](std::function<void()> job) { jobs.push_back(std::move(job)); });
  for (int i = 0; i < 5; i++) ASSERT_TRUE(WriteCluster(i).ok());
  ASSERT_EQ(jobs.size(), 5u);
  sink_.FailCommit(1);
  for (auto& job : jobs) job();  // the fifth finds the segment full and seals it
  EXPECT_EQ(sink_.counts().commits, 1);
  EXPECT_TRUE(sink_.committed().empty());
  EXPECT_EQ(cache.staged_bytes(), 5 * kBig);
  ASSERT_TRUE(cache.Flush().ok());
  EXPECT_EQ(cache.staged_bytes(), 0u);
  ExpectStored(5);
}

}  // namespace
}  // namespace qcow2fs
