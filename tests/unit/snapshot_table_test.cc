// Unit tests of format/snapshot_table: encode then read back through an
// in-memory read function, the entry layout, and each validation error.
#include "format/snapshot_table.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

constexpr uint64_t kCluster = 65536;
constexpr uint64_t kTableAt = 4 * kCluster;

Header ImageHeader(uint32_t nb_snapshots) {
  Header h;
  h.cluster_bits = 16;
  h.size = 1ull << 30;
  h.nb_snapshots = nb_snapshots;
  h.snapshots_offset = kTableAt;
  return h;
}

// The spec's extra data: vm_state_size (64 bits), then disk_size.
std::vector<std::byte> ExtraData(uint64_t vm_state_size, uint64_t disk_size, size_t bytes = 16) {
  std::vector<std::byte> extra(bytes);
  StoreBe64(extra.data(), vm_state_size);
  StoreBe64(extra.data() + 8, disk_size);
  return extra;
}

SnapshotEntry Entry(const std::string& id, const std::string& name, uint64_t l1_offset) {
  SnapshotEntry e;
  e.id = id;
  e.name = name;
  e.l1_table_offset = l1_offset;
  e.l1_size = 2;
  e.date_sec = 1700000000;
  e.date_nsec = 123456789;
  e.vm_clock_nsec = 987654321012ull;
  e.vm_state_size = 0;
  e.extra_data = ExtraData(0, 2ull << 30);
  return e;
}

// An image file holding `table` at kTableAt, `file_size` bytes long.
struct FakeFile {
  std::vector<std::byte> bytes;
  int reads = 0;
  Status fail;
  ReadFn Reader() {
    return [this](uint64_t offset, std::span<std::byte> out) -> Status {
      reads++;
      if (!fail.ok()) return fail;
      if (offset > bytes.size() || out.size() > bytes.size() - offset) {
        return Status(ErrorCode::kIoError, "read past the end of the fake file", EIO);
      }
      std::memcpy(out.data(), bytes.data() + offset, out.size());
      return Status();
    };
  }
};

FakeFile FileWith(const std::vector<std::byte>& table, uint64_t file_size = 16 * kCluster) {
  FakeFile f;
  f.bytes.assign(kTableAt, std::byte{0});
  f.bytes.insert(f.bytes.end(), table.begin(), table.end());
  f.bytes.resize(file_size);
  return f;
}

::testing::AssertionResult FailsWith(const Header& h, FakeFile& f, const std::string& text) {
  auto r = ReadSnapshotTable(h, f.bytes.size(), f.Reader());
  if (r.ok()) return ::testing::AssertionFailure() << "read; expected " << text;
  if (r.status().code() != ErrorCode::kCorrupt ||
      r.status().message().find(text) == std::string::npos) {
    return ::testing::AssertionFailure()
           << "got " << r.status().ToString() << "; expected " << text;
  }
  return ::testing::AssertionSuccess();
}

TEST(SnapshotTable, EntriesRoundTrip) {
  std::vector<SnapshotEntry> in = {Entry("1", "first", 5 * kCluster),
                                   Entry("22", "second snapshot", 6 * kCluster)};
  in[1].extra_data = ExtraData(1ull << 40, 3ull << 30, 24);  // longer than we know
  in[1].vm_state_size = 1ull << 40;
  const std::vector<std::byte> table = EncodeSnapshotTable(in);
  FakeFile f = FileWith(table);
  auto out = ReadSnapshotTable(ImageHeader(2), f.bytes.size(), f.Reader());
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  ASSERT_EQ(out->size(), 2u);
  for (size_t i = 0; i < 2; i++) {
    SCOPED_TRACE("entry " + std::to_string(i));
    const SnapshotEntry& a = in[i];
    const SnapshotEntry& b = (*out)[i];
    EXPECT_EQ(b.id, a.id);
    EXPECT_EQ(b.name, a.name);
    EXPECT_EQ(b.l1_table_offset, a.l1_table_offset);
    EXPECT_EQ(b.l1_size, a.l1_size);
    EXPECT_EQ(b.date_sec, a.date_sec);
    EXPECT_EQ(b.date_nsec, a.date_nsec);
    EXPECT_EQ(b.vm_clock_nsec, a.vm_clock_nsec);
    EXPECT_EQ(b.vm_state_size, a.vm_state_size);
    EXPECT_EQ(b.extra_data, a.extra_data);
  }
  EXPECT_EQ((*out)[0].disk_size, 2ull << 30);
  EXPECT_EQ((*out)[1].disk_size, 3ull << 30);
  EXPECT_EQ(EncodeSnapshotTable(*out), table);
}

TEST(SnapshotTable, EntryLayoutIsPaddedToEightBytes) {
  SnapshotEntry e = Entry("7", "abc", 5 * kCluster);
  e.extra_data = ExtraData(0, 1ull << 30);
  const std::vector<std::byte> table = EncodeSnapshotTable({e, e});
  // 40 fixed bytes + 16 extra + 1 id + 3 name = 60, padded to 64.
  ASSERT_EQ(table.size(), 128u);
  EXPECT_EQ(LoadBe64(table.data()), 5 * kCluster);
  EXPECT_EQ(LoadBe32(table.data() + 8), 2u);
  EXPECT_EQ(LoadBe16(table.data() + 12), 1u);   // id_str_size
  EXPECT_EQ(LoadBe16(table.data() + 14), 3u);   // name_size
  EXPECT_EQ(LoadBe32(table.data() + 36), 16u);  // extra_data_size
  EXPECT_EQ(static_cast<char>(table[56]), '7');
  EXPECT_EQ(std::memcmp(table.data() + 57, "abc", 3), 0);
  EXPECT_EQ(LoadBe64(table.data() + 64), 5 * kCluster);  // the second entry
}

TEST(SnapshotTable, WithoutExtraDataTheDiskSizeIsTheImages) {
  SnapshotEntry e = Entry("1", "old", 5 * kCluster);
  e.extra_data.clear();
  e.vm_state_size = 4096;  // fits the 32-bit field of version 2
  FakeFile f = FileWith(EncodeSnapshotTable({e}));
  auto out = ReadSnapshotTable(ImageHeader(1), f.bytes.size(), f.Reader());
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ((*out)[0].disk_size, 1ull << 30);
  EXPECT_EQ((*out)[0].vm_state_size, 4096u);
}

TEST(SnapshotTable, LargeVmStateIsOnlyInTheExtraData) {
  SnapshotEntry e = Entry("1", "big", 5 * kCluster);
  e.vm_state_size = 1ull << 33;
  const std::vector<std::byte> table = EncodeSnapshotTable({e});
  EXPECT_EQ(LoadBe32(table.data() + 32), 0u) << "too large for the 32-bit field";
}

TEST(SnapshotTable, NoSnapshotsReadsNothing) {
  FakeFile f = FileWith({});
  auto out = ReadSnapshotTable(ImageHeader(0), f.bytes.size(), f.Reader());
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(out->empty());
  EXPECT_EQ(f.reads, 0);
}

TEST(SnapshotTable, ReadErrorsPassThrough) {
  FakeFile f = FileWith(EncodeSnapshotTable({Entry("1", "a", 5 * kCluster)}));
  f.fail = Status(ErrorCode::kIoError, "the disk went away", EIO);
  auto out = ReadSnapshotTable(ImageHeader(1), f.bytes.size(), f.Reader());
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), ErrorCode::kIoError);
  EXPECT_EQ(out.status().ToErrno(), EIO);
}

// ---- One field changed, one specific error.

TEST(SnapshotTableErrors, TooMuchExtraData) {
  SnapshotEntry e = Entry("1", "x", 5 * kCluster);
  e.extra_data.resize(limits::kMaxSnapshotExtraData + 8);
  FakeFile f = FileWith(EncodeSnapshotTable({e}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), f, "entry 0 has 1032 bytes of extra data"));
}

TEST(SnapshotTableErrors, UnalignedL1Table) {
  FakeFile f = FileWith(EncodeSnapshotTable({Entry("1", "x", 5 * kCluster + 512)}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), f, "snapshot 'x' L1 table is not cluster aligned"));
}

TEST(SnapshotTableErrors, L1TableOverTheLimit) {
  SnapshotEntry e = Entry("1", "x", 5 * kCluster);
  e.l1_size = static_cast<uint32_t>(limits::kMaxL1Bytes / 8 + 1);
  FakeFile f = FileWith(EncodeSnapshotTable({e}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), f, "snapshot 'x' L1 table is too large"));
}

TEST(SnapshotTableErrors, L1TableOutsideTheFile) {
  FakeFile f = FileWith(EncodeSnapshotTable({Entry("1", "x", 16 * kCluster)}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), f, "snapshot 'x' L1 table lies outside the file"));
  FakeFile at_zero = FileWith(EncodeSnapshotTable({Entry("1", "y", 0)}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), at_zero, "snapshot 'y' L1 table lies outside the file"));
}

TEST(SnapshotTableErrors, DiskSizeTooLarge) {
  SnapshotEntry e = Entry("1", "x", 5 * kCluster);
  e.extra_data = ExtraData(0, limits::kMaxVirtualSize + 1);
  FakeFile f = FileWith(EncodeSnapshotTable({e}));
  EXPECT_TRUE(FailsWith(ImageHeader(1), f, "snapshot 'x' disk size is too large"));
}

TEST(SnapshotTableErrors, EntriesPastTheEndOfTheFile) {
  // L1 tables before the snapshot table, so only the entries can be outside.
  const std::vector<std::byte> table = EncodeSnapshotTable({Entry("1", "x", kCluster)});
  // The fixed part of a second entry the header claims is past the end.
  FakeFile f = FileWith(table, kTableAt + table.size() + 39);
  EXPECT_TRUE(FailsWith(ImageHeader(2), f, "entry 1 lies past the end of the file"));
  // The variable part (extra data, id, name) of the first one is.
  FakeFile cut = FileWith(table, kTableAt + 50);
  EXPECT_TRUE(FailsWith(ImageHeader(1), cut, "entry 0 lies past the end of the file"));
}

}  // namespace
}  // namespace qcow2fs
