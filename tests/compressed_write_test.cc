// Compressed writes through the staging cache: small, unaligned writes in
// random order from several threads must come out as a valid image of
// compressed clusters with exactly the data written.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "base/sync_point.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

struct CompressCase {
  std::string name;
  std::string create_options;
  CompressionType type;
};

class CompressedWriteTest : public ::testing::TestWithParam<CompressCase> {
 protected:
  void SetUp() override {
    ASSERT_TRUE(RequireProgram("qemu-img"));
    path_ = dir_.Join("c.qcow2");
    ASSERT_TRUE(QemuImg("create -q -f qcow2 -o " + GetParam().create_options + " " +
                        ShellQuote(path_) + " 16M"));
  }
  // With `background`, compression runs on other threads, as in the daemon;
  // with `lagging`, those threads start only once a flush waits for them, so
  // it finds every cluster still waiting to be compressed (as at unmount
  // after a fast cp). A test that lags holds a ScopedSyncPoints.
  std::unique_ptr<Image> OpenCompressed(size_t cache_bytes = 0, bool background = false,
                                        bool lagging = false) {
    OpenOptions o;
    o.read_only = false;
    o.compress = GetParam().type;
    o.compress_cache_bytes = cache_bytes;
    if (background) {
      o.compress_executor = [lagging](std::function<void()> job) {
        std::thread([lagging, job = std::move(job)] {
          if (lagging) SyncPoints::WaitUntilPassed("CompressCache:FlushWaiting", 1);
          job();
        }).detach();
      };
    }
    auto image = Image::Open(path_, o);
    EXPECT_TRUE(image.ok()) << Describe(image.status());
    return image.ok() ? std::move(image).value() : nullptr;
  }
  // qemu-img check must be clean and report compressed clusters.
  void ExpectValidCompressed(const std::string& expected) {
    std::string out;
    ASSERT_TRUE(QemuImg("check " + ShellQuote(path_), &out)) << out;
    EXPECT_NE(out.find("compressed clusters"), std::string::npos) << out;
    EXPECT_EQ(out.find(" 0.00% compressed clusters"), std::string::npos) << out;
    ASSERT_TRUE(WriteWholeFile(dir_.Join("expected.raw"), expected));
    EXPECT_TRUE(QemuImg("compare -q -f qcow2 -F raw " + ShellQuote(path_) + " " +
                        ShellQuote(dir_.Join("expected.raw"))));
  }
  // Our image must take no more space than what `qemu-img convert -c` makes
  // from expected.raw (du), and be no longer (ls -l) but for one cluster:
  // we allocate the L2 table when the first segment is sealed, so it may
  // end the file, where QEMU's file ends with compressed data that fills
  // only part of its last cluster.
  void ExpectNoLargerThanQemuImg() {
    const std::string reference = dir_.Join("reference.qcow2");
    ASSERT_TRUE(QemuImg("convert -q -c -O qcow2 -o " + GetParam().create_options + " " +
                        ShellQuote(dir_.Join("expected.raw")) + " " + ShellQuote(reference)));
    struct stat ours {
    }, theirs{};
    ASSERT_EQ(stat(path_.c_str(), &ours), 0);
    ASSERT_EQ(stat(reference.c_str(), &theirs), 0);
    const int64_t ours_du = ours.st_blocks * 512, theirs_du = theirs.st_blocks * 512;
    EXPECT_LE(ours_du, theirs_du) << "allocated: qcow2fs " << ours_du
                                  << " bytes vs qemu-img convert -c " << theirs_du;
    std::string header;
    ASSERT_TRUE(ReadWholeFile(path_, &header));
    const int64_t cluster_size = int64_t{1} << GetBE32(header, 20);
    EXPECT_LE(ours.st_size, theirs.st_size + cluster_size)
        << "apparent: qcow2fs " << ours.st_size << " bytes vs qemu-img convert -c "
        << theirs.st_size;
    // No more clusters stored uncompressed than QEMU stores.
    EXPECT_LE(UncompressedClusters(path_), UncompressedClusters(reference));
  }
  int64_t UncompressedClusters(const std::string& path) {
    std::string out;
    EXPECT_TRUE(QemuImg("check --output=json " + ShellQuote(path), &out)) << out;
    auto number = [&](const std::string& key) -> int64_t {
      const auto at = out.find("\"" + key + "\": ");
      return at == std::string::npos ? 0 : std::stoll(out.substr(at + key.size() + 4));
    };
    return number("allocated-clusters") - number("compressed-clusters");
  }
  TempDir dir_;
  std::string path_;
};

TEST_P(CompressedWriteTest, UnalignedWritesFromThreadsInRandomOrder) {
  const uint64_t size = 16 << 20;
  const std::string source = SemiCompressible(size, 11);
  // Cut the disk into unaligned pieces of 1 B to 200 KiB and shuffle them.
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  Rng rng(5);
  for (uint64_t pos = 0; pos < size;) {
    const uint64_t len = std::min(size - pos, rng.Uniform(1, 200 << 10));
    pieces.emplace_back(pos, len);
    pos += len;
  }
  for (size_t i = pieces.size() - 1; i > 0; i--) std::swap(pieces[i], pieces[rng.Uniform(0, i)]);
  {
    // Small: writers must wait and evict while background jobs run.
    auto image = OpenCompressed(2 << 20, /*background=*/true);
    ASSERT_TRUE(image);
    std::atomic<size_t> next{0};
    std::atomic<int> failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++) {
      threads.emplace_back([&] {
        for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
          const auto [off, len] = pieces[i];
          if (!image->Write(off, AsBytes(std::string_view(source).substr(off, len))).ok()) {
            failures++;
          }
          // Reads during staging return what this thread just wrote.
          std::string back(len, '\0');
          if (!image->Read(off, AsWritableBytes(back)).ok() ||
              back != std::string_view(source).substr(off, len)) {
            failures++;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    ASSERT_EQ(failures.load(), 0);
    ASSERT_TRUE(image->Flush().ok());
  }
  ExpectValidCompressed(source);
}

// The way cp reaches the image: 128 KiB writes, in order, two at a time.
// The result must be about as small as `qemu-img convert -c` makes it.
TEST_P(CompressedWriteTest, SequentialCopyIsAsSmallAsQemuImgConvert) {
  const uint64_t size = 16 << 20, chunk = 128 << 10;
  const std::string source = SemiCompressible(size, 31);
  {
    // Compression lags behind the writers: the flush finds the clusters
    // still queued, and must pack them densely, not seal a segment per
    // cluster as they trickle in.
    ScopedSyncPoints sync_points;
    auto image = OpenCompressed(0, /*background=*/true, /*lagging=*/true);
    ASSERT_TRUE(image);
    std::atomic<uint64_t> next{0};
    std::vector<std::thread> threads;
    std::atomic<int> failures{0};
    for (int t = 0; t < 2; t++) {
      threads.emplace_back([&] {
        for (uint64_t off; (off = next.fetch_add(chunk)) < size;) {
          if (!image->Write(off, AsBytes(std::string_view(source).substr(off, chunk))).ok()) {
            failures++;
          }
        }
      });
    }
    for (auto& th : threads) th.join();
    ASSERT_EQ(failures.load(), 0);
    ASSERT_TRUE(image->Flush().ok());
  }
  ExpectValidCompressed(source);
  ExpectNoLargerThanQemuImg();
}

// cp --sparse=always punches every hole it skips, and holes start and end
// inside clusters: the zeroed pieces must be staged like written data, so
// the clusters around holes are compressed too, not stored as normal ones.
TEST_P(CompressedWriteTest, SparseCopyPunchingHolesInsideClustersStaysCompressed) {
  const uint64_t size = 16 << 20, chunk = 128 << 10;
  std::string model = SemiCompressible(size, 41);
  // Holes of 8 KiB to 1 MiB at 4 KiB granularity, as ext4 leaves them.
  std::vector<std::pair<uint64_t, uint64_t>> holes;
  Rng rng(3);
  for (uint64_t pos = rng.Uniform(1, 64) << 12; pos < size;) {
    const uint64_t len = std::min(size - pos, rng.Uniform(2, 256) << 12);
    holes.emplace_back(pos, len);
    model.replace(pos, len, std::string(len, '\0'));
    pos += len + (rng.Uniform(1, 256) << 12);
  }
  {
    auto image = OpenCompressed(0, /*background=*/true);
    ASSERT_TRUE(image);
    size_t next_hole = 0;
    for (uint64_t pos = 0; pos < size;) {
      if (next_hole < holes.size() && holes[next_hole].first == pos) {
        const auto [off, len] = holes[next_hole++];
        ASSERT_TRUE(image->Discard(off, len).ok());
        pos += len;
        continue;
      }
      uint64_t end = std::min(size, pos + chunk);
      if (next_hole < holes.size()) end = std::min(end, holes[next_hole].first);
      ASSERT_TRUE(image->Write(pos, AsBytes(std::string_view(model).substr(pos, end - pos))).ok());
      pos = end;
    }
    ASSERT_TRUE(image->Flush().ok());
  }
  ExpectValidCompressed(model);
  ExpectNoLargerThanQemuImg();
}

TEST_P(CompressedWriteTest, DiscardOfStagedDataAndRewriteOfCompressedData) {
  const uint64_t size = 16 << 20;
  std::string model = SemiCompressible(size, 21);
  {
    auto image = OpenCompressed();
    ASSERT_TRUE(image);
    ASSERT_TRUE(image->Write(0, AsBytes(model)).ok());
    ASSERT_TRUE(image->Flush().ok());
    // Rewrite parts of compressed clusters (read-modify-write) ...
    Rng rng(9);
    for (int i = 0; i < 50; i++) {
      const uint64_t off = rng.Uniform(0, size - 1);
      const uint64_t len = std::min<uint64_t>(size - off, rng.Uniform(1, 100000));
      std::string data = SemiCompressible(len, 100 + static_cast<uint64_t>(i));
      ASSERT_TRUE(image->Write(off, AsBytes(data)).ok());
      model.replace(off, len, data);
    }
    // ... stage a partial cluster and discard part of it before it is written.
    std::string part = RandomBytes(3000, 1);
    ASSERT_TRUE(image->Write(5 << 20, AsBytes(part)).ok());
    model.replace(5 << 20, part.size(), part);
    ASSERT_TRUE(image->Discard((5 << 20) + 1000, 1000).ok());
    model.replace((5 << 20) + 1000, 1000, std::string(1000, '\0'));
    std::string back(3000, '\0');
    ASSERT_TRUE(image->Read(5 << 20, AsWritableBytes(back)).ok());
    EXPECT_TRUE(BuffersEqual(model.substr(5 << 20, 3000), back, 5 << 20, "staged+discarded"));
    ASSERT_TRUE(image->Flush().ok());
  }
  ExpectValidCompressed(model);
}

INSTANTIATE_TEST_SUITE_P(
    Types, CompressedWriteTest,
    ::testing::Values(
        CompressCase{"zlib_64k", "cluster_size=64k", CompressionType::kZlib},
        CompressCase{"zstd_64k", "cluster_size=64k,compression_type=zstd", CompressionType::kZstd},
        CompressCase{"zlib_4k", "cluster_size=4k", CompressionType::kZlib},
        CompressCase{"zstd_ext_l2", "cluster_size=64k,extended_l2=on,compression_type=zstd",
                     CompressionType::kZstd}),
    [](const auto& param_info) { return param_info.param.name; });

// A version 2 image over a backing file has no zero clusters: zeros must be
// stored as data there. All-zero clusters, written or zeroed, staged in
// compress mode, used to be stored through the zeroing path, which wrote
// the zeros back into the staging cache and waited on its own commit.
TEST(CompressedWriteOverBackingTest, ZerosOnVersion2ImageAreStoredCompressed) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  constexpr uint64_t kCluster = 64 * 1024, kSize = 4 << 20;
  const std::string base = dir.Join("base.qcow2"), path = dir.Join("v2.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o compat=0.10 " + ShellQuote(base) + " 4M"));
  ASSERT_TRUE(QemuIo(base, {"write -P 0x5a 0 4M"}));
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o compat=0.10,cluster_size=64k -b base.qcow2 -F qcow2 " +
                      ShellQuote(path) + " 4M"));
  std::string model(kSize, '\x5a');
  {
    OpenOptions o;
    o.read_only = false;
    o.compress = CompressionType::kZlib;
    auto opened = Image::Open(path, o);
    ASSERT_TRUE(opened.ok()) << Describe(opened.status());
    Image& image = **opened;
    const std::string zeros(kCluster, '\0');
    // A whole cluster of zeros, in one write and in two halves.
    ASSERT_TRUE(image.Write(0, AsBytes(zeros)).ok());
    ASSERT_TRUE(image.Write(2 * kCluster, AsBytes(zeros.substr(0, kCluster / 2))).ok());
    ASSERT_TRUE(image.Write(2 * kCluster + kCluster / 2, AsBytes(zeros.substr(kCluster / 2))).ok());
    // Zeroing whole clusters writes zeros, which are staged too.
    ASSERT_TRUE(image.WriteZeroes(4 * kCluster, 2 * kCluster, /*may_unmap=*/true).ok());
    // Half a cluster: the rest is filled from the backing file's bytes.
    ASSERT_TRUE(image.Write(8 * kCluster, AsBytes(zeros.substr(0, kCluster / 2))).ok());
    for (uint64_t at : {uint64_t{0}, 2 * kCluster, 4 * kCluster, 5 * kCluster}) {
      model.replace(at, kCluster, zeros);
    }
    model.replace(8 * kCluster, kCluster / 2, zeros.substr(0, kCluster / 2));
    ASSERT_TRUE(image.Flush().ok());
    std::string back(kSize, '\1');
    ASSERT_TRUE(image.Read(0, AsWritableBytes(back)).ok());
    EXPECT_TRUE(BuffersEqual(model, back, 0, "read back before closing"));
  }
  std::string out;
  ASSERT_TRUE(QemuImg("check " + ShellQuote(path), &out)) << out;
  EXPECT_NE(out.find("compressed clusters"), std::string::npos) << out;
  ASSERT_TRUE(WriteWholeFile(dir.Join("expected.raw"), model));
  EXPECT_TRUE(QemuImg("compare -q -f qcow2 -F raw " + ShellQuote(path) + " " +
                      ShellQuote(dir.Join("expected.raw"))));
}

TEST(CompressedWriteOptionsTest, MismatchedCompressionTypeIsRefused) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string path = dir.Join("z.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(path) + " 1M"));
  OpenOptions o;
  o.read_only = false;
  o.compress = CompressionType::kZstd;
  auto image = Image::Open(path, o);
  ASSERT_FALSE(image.ok());
  EXPECT_TRUE(ContainsNoCase(image.status().message(), "compression_type=zstd"))
      << image.status().message();
}

}  // namespace
}  // namespace qcow2fs::test
