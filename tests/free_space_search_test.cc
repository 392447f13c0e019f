// The free-cluster search on images whose refcounts mark long stretches in
// use: the search goes a few refcount blocks at a time and lets readers in
// between (the metadata mutex is released at "Allocate:SearchPaused"), and a
// search that could only end past a million in-use clusters beyond the end
// of the file fails the write with a message instead of walking on.
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include "base/sync_point.h"
#include "format/header.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kCluster = 512;
constexpr uint64_t kHeaderRefcountTableOffset = header_field::kRefcountTableOffset;
constexpr uint64_t kHeaderRefcountTableClusters = header_field::kRefcountTableClusters;

// Appends `blocks` refcount blocks of `cluster` bytes, each a repetition of
// `entry`, fills the first block with `block0_entry` repeated (all ones or
// an entry that is not zero: every cluster it covers in use), and points
// the entries 1..blocks of a new refcount table at the end of the file at
// the new blocks. Returns the number of clusters the refcounts then cover.
uint64_t FillRefcounts(const std::string& path, uint64_t blocks, const std::string& entry,
                       uint64_t entries_per_block, const std::string& block0_entry = "",
                       uint64_t cluster = kCluster) {
  auto repeat = [cluster](const std::string& unit) {
    std::string out;
    while (out.size() < cluster) out += unit;
    return out;
  };
  const std::string fill = repeat(entry);
  std::string img;
  EXPECT_TRUE(ReadWholeFile(path, &img));
  const uint64_t table = GetBE64(img, kHeaderRefcountTableOffset);
  const uint64_t block0 = GetBE64(img, table);
  img.replace(block0, cluster, block0_entry.empty() ? fill : repeat(block0_entry));
  img.resize((img.size() + cluster - 1) / cluster * cluster, '\0');
  const uint64_t first_block = img.size();
  for (uint64_t i = 0; i < blocks; i++) img += fill;
  const uint64_t entries = blocks + 1;
  const uint64_t table_clusters = (entries * 8 + cluster - 1) / cluster;
  std::string new_table(table_clusters * cluster, '\0');
  PutBE64(new_table, 0, block0);
  for (uint64_t i = 0; i < blocks; i++) PutBE64(new_table, 8 * (i + 1), first_block + i * cluster);
  const uint64_t new_table_offset = img.size();
  img.append(new_table);
  PutBE64(img, kHeaderRefcountTableOffset, new_table_offset);
  PutBE32(img, kHeaderRefcountTableClusters, static_cast<uint32_t>(table_clusters));
  EXPECT_TRUE(WriteWholeFile(path, img));
  return entries * entries_per_block;
}

// QEMU finds the leaks the refcount edit made and nothing worse (exit 3,
// not 2), and its reads (`reads`: qemu-io -c options with patterns) find
// the data that was written.
void ExpectOnlyLeaksAndReads(const std::string& path, const std::string& reads) {
  CommandResult check = RunCommand("qemu-img check " + ShellQuote(path));
  EXPECT_EQ(check.exit_code, 3) << check.output;
  CommandResult read = RunCommand("qemu-io -f qcow2 " + reads + " " + ShellQuote(path));
  EXPECT_EQ(read.exit_code, 0) << read.output;
  EXPECT_EQ(read.output.find("Pattern verification failed"), std::string::npos) << read.output;
}

constexpr uint64_t kBigCluster = 64 * 1024;

// refcount_bits=1 and 64 KiB clusters, the first 64 KiB of the disk written
// (0x61), then the refcounts edited: block 0 all in use, eight more blocks
// of alternating bits, so every other cluster is free over four million
// clusters, nearly all past the end of the file. Opened writable.
std::unique_ptr<Image> OpenFragmented(const std::string& path, const std::string& size) {
  if (!QemuImg("create -q -f qcow2 -o cluster_size=64k,refcount_bits=1 " + ShellQuote(path) + " " +
               size) ||
      !QemuIo(path, {"write -P 0x61 0 64k"})) {
    ADD_FAILURE() << "could not build " << path;
    return nullptr;
  }
  FillRefcounts(path, 8, "\x55", kBigCluster * 8, "\xff", kBigCluster);
  return OpenWritable(path);
}

class FreeSpaceSearchTest : public SyncPointTest {};

// 40 full refcount blocks (64 entries each) before the first free cluster:
// the search needs three steps of at most 16 block reads. While the writer
// is paused between steps, a read that has to load an L2 table (and so
// needs the metadata mutex) completes; then the write lands past the full
// stretch and reads back.
TEST_F(FreeSpaceSearchTest, SearchOverFullBlocksLetsReadersIn) {
  const std::string path = dir_.Join("full.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " +
                      ShellQuote(path) + " 1M"));
  // Data behind two L2 tables (one table maps 32 KiB here).
  ASSERT_TRUE(QemuIo(path, {"write -P 0x61 0 4k"}));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x62 64k 4k"}));
  const uint64_t covered =
      FillRefcounts(path, 40, std::string(7, '\0') + '\x01', kCluster * 8 / 64);

  auto image = OpenWritable(path);
  ASSERT_NE(image, nullptr);
  SyncPoints::Arm("Allocate:SearchPaused");
  const std::string data(4096, 'w');
  auto writer =
      std::async(std::launch::async, [&] { return image->Write(256 * 1024, AsBytes(data)); });
  ASSERT_TRUE(SyncPoints::WaitUntilStopped("Allocate:SearchPaused"));

  // The writer is parked mid-search: a read that loads an L2 table goes on.
  auto reader = std::async(std::launch::async, [&] {
    std::string out(4096, '\0');
    Status s = image->Read(64 * 1024, AsWritableBytes(out));
    return s.ok() ? out : "error: " + Describe(s);
  });
  // A hang guard only: the read needs no more than an L2 table load.
  ASSERT_EQ(reader.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "a read waited for the paused free-space search";
  EXPECT_EQ(reader.get(), std::string(4096, 'b'));

  SyncPoints::Release("Allocate:SearchPaused");
  Status written = writer.get();
  ASSERT_TRUE(written.ok()) << Describe(written);
  EXPECT_GE(SyncPoints::Passes("Allocate:SearchPaused"), 2u);

  auto status = image->GetBlockStatus(256 * 1024, 4096);
  ASSERT_TRUE(status.ok()) << Describe(status.status());
  ASSERT_TRUE(status->host_offset.has_value());
  EXPECT_GE(*status->host_offset, covered * kCluster) << "the write took a cluster marked in use";
  std::string back(4096, '\0');
  ASSERT_TRUE(image->Read(256 * 1024, AsWritableBytes(back)).ok());
  EXPECT_EQ(back, data);
  ASSERT_TRUE(image->Flush().ok());
  image.reset();

  ExpectOnlyLeaksAndReads(path, "-c 'read -P 0x77 256k 4k' -c 'read -P 0x61 0 4k'");
}

// refcount_bits=1: 4096 clusters per 512-byte block. 300 blocks of all ones
// mark 1.2 million clusters in use, nearly all past the end of the file. A
// write that needs a new cluster fails with a message naming the problem,
// without walking on; the image is not fenced, so reads and in-place writes
// go on.
TEST_F(FreeSpaceSearchTest, InUseFarPastEndOfFileFailsTheWrite) {
  const std::string path = dir_.Join("phantom.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=512,refcount_bits=1 " + ShellQuote(path) +
                      " 1M"));
  ASSERT_TRUE(QemuIo(path, {"write -P 0x61 0 4k"}));
  FillRefcounts(path, 300, "\xff", kCluster * 8);

  auto image = OpenWritable(path);
  ASSERT_NE(image, nullptr);
  const std::string data(4096, 'w');
  Status s = image->Write(512 * 1024, AsBytes(data));
  ASSERT_FALSE(s.ok()) << "a write got a cluster although the refcounts mark every one in use";
  EXPECT_EQ(s.code(), ErrorCode::kNoSpace) << Describe(s);
  EXPECT_TRUE(ContainsNoCase(s.message(), "no free cluster to allocate")) << Describe(s);

  std::string back(4096, '\0');
  Status r = image->Read(0, AsWritableBytes(back));
  ASSERT_TRUE(r.ok()) << Describe(r);
  EXPECT_EQ(back, std::string(4096, 'a'));
  Status in_place = image->Write(0, AsBytes(data));
  EXPECT_TRUE(in_place.ok()) << Describe(in_place);
  EXPECT_FALSE(image->info().corrupt);
}

// Fragmented refcounts (OpenFragmented). Growing the disk to 8 TiB needs a two-cluster L1
// table, and no two free clusters in a row exist there: the search gives up
// a million clusters past the end of the file with a message, instead of
// walking all eight blocks (a table of thousands of such blocks would keep
// it walking, with the metadata mutex held, for minutes). The disk keeps
// its size and the image is not fenced.
TEST_F(FreeSpaceSearchTest, FragmentedPastEndOfFileBoundsTheRunSearch) {
  auto image = OpenFragmented(dir_.Join("fragmented.qcow2"), "1M");
  ASSERT_NE(image, nullptr);
  Status grown = image->Resize(uint64_t{8} << 40);
  ASSERT_FALSE(grown.ok()) << "the L1 table found a run the refcounts leave no room for";
  EXPECT_EQ(grown.code(), ErrorCode::kNoSpace) << Describe(grown);
  EXPECT_TRUE(ContainsNoCase(grown.message(), "runs shorter than 2 clusters")) << Describe(grown);
  EXPECT_EQ(image->size(), uint64_t{1} << 20);
  EXPECT_FALSE(image->info().corrupt);

  std::string back(4096, '\0');
  Status r = image->Read(0, AsWritableBytes(back));
  ASSERT_TRUE(r.ok()) << Describe(r);
  EXPECT_EQ(back, std::string(4096, 'a'));
}

// The same fragmented refcounts: a 1 MiB data write needs sixteen new
// clusters and no two free ones are adjacent. The write sizes each run by
// the free clusters at the search's starting point, so it lands one cluster
// at a time on clusters the refcounts mark free, without a search for
// sixteen in a row.
TEST_F(FreeSpaceSearchTest, FragmentedFreeSpaceTakesShorterRuns) {
  const std::string path = dir_.Join("fragmented.qcow2");
  auto image = OpenFragmented(path, "4M");
  ASSERT_NE(image, nullptr);
  std::string data(1 << 20, '\0');
  for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>('A' + i / kBigCluster);
  Status written = image->Write(1 << 20, AsBytes(data));
  ASSERT_TRUE(written.ok()) << Describe(written);
  for (uint64_t g = 1 << 20; g < 2 << 20; g += kBigCluster) {
    auto status = image->GetBlockStatus(g, kBigCluster);
    ASSERT_TRUE(status.ok()) << Describe(status.status());
    ASSERT_TRUE(status->host_offset.has_value());
    // Block 0 covers the first 512 Ki clusters, all in use.
    EXPECT_GE(*status->host_offset, kBigCluster * kBigCluster * 8)
        << "guest " << g << " took a cluster marked in use";
  }
  std::string back(data.size(), '\0');
  ASSERT_TRUE(image->Read(1 << 20, AsWritableBytes(back)).ok());
  EXPECT_TRUE(back == data) << "the data read back differs";
  ASSERT_TRUE(image->Flush().ok());
  image.reset();

  ExpectOnlyLeaksAndReads(path, "-c 'read -P 0x41 1M 64k' -c 'read -P 0x50 1984k 64k'");
}

}  // namespace
}  // namespace qcow2fs::test
