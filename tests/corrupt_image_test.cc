// Corrupt images: start from a valid image made by qemu-img, change ONE
// field, and expect a specific, well-described error. Nothing may crash,
// hang or allocate gigabytes. Metadata that is only reached by a read (an L2
// entry, a compressed cluster) must fail that read with kCorrupt while every
// other guest range still reads correctly.
#include <sys/resource.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kCopied = 1ull << 63;
constexpr uint64_t kCompressed = 1ull << 62;

std::string Num(uint64_t v) { return std::to_string(v); }

long MaxRssKiB() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

// Builds the baseline: a backing file and an image over it with data in
// several clusters, a zeroed cluster and one internal snapshot.
//   dir/backing.qcow2, dir/img.qcow2 (v3, 64 KiB clusters, 8 MiB),
//   dir/ref.raw (what QEMU reads from img.qcow2).
AssertionResult MakeBaseline(const TempDir& dir, const std::string& extra_opts = "") {
  auto r = RequireProgram("qemu-img");
  if (!r) return r;
  r = RequireProgram("qemu-io");
  if (!r) return r;
  const std::string cd = "cd " + ShellQuote(dir.path()) + " && ";
  r = RunOk(cd + "qemu-img create -q -f qcow2 backing.qcow2 8M");
  if (!r) return r;
  r = QemuIo(dir.Join("backing.qcow2"), {"write -q -P 0x42 0 8M"});
  if (!r) return r;
  std::string opts = "cluster_size=65536";
  if (!extra_opts.empty()) opts += "," + extra_opts;
  r = RunOk(cd + "qemu-img create -q -f qcow2 -o " + opts +
            " -b backing.qcow2 -F qcow2 img.qcow2 8M");
  if (!r) return r;
  r = WriteWholeFile(dir.Join("data.bin"), RandomBytes(6 * 65536, 11));
  if (!r) return r;
  r = QemuIo(dir.Join("img.qcow2"),
             {"write -q -s " + dir.Join("data.bin") + " 0 393216",  // clusters 0-5
              "write -q -z 393216 65536",                           // cluster 6 zero
              "write -q -P 0x17 1048576 65536"});                   // cluster 16
  if (!r) return r;
  r = QemuImg("snapshot -c s1 " + ShellQuote(dir.Join("img.qcow2")));
  if (!r) return r;
  r = QemuIo(dir.Join("img.qcow2"), {"write -q -P 0x18 2097152 65536"});  // cluster 32
  if (!r) return r;
  return QemuConvertToRaw(dir.Join("img.qcow2"), dir.Join("ref.raw"));
}

OpenOptions Qcow2Options() {
  OpenOptions o;
  o.format = "qcow2";  // a broken magic must not make it probe as raw
  return o;
}

// Opens the unmodified image: if this fails, every "expected failure" below
// would prove nothing.
AssertionResult BaselineOpens(const std::string& path) {
  auto r = Image::Open(path, Qcow2Options());
  if (!r.ok()) {
    return AssertionFailure() << "the unmodified baseline image does not open: "
                              << Describe(r.status());
  }
  return AssertionSuccess();
}

// ------------------------------------------------------ Open-time errors

struct HeaderCase {
  std::string name;
  // Patches the image (header already loaded for convenience).
  std::function<AssertionResult(const std::string& path, const Qcow2Header& h)> patch;
  std::vector<ErrorCode> codes;       // any of these
  std::vector<std::string> keywords;  // message contains any of these (no case)
};

void PrintTo(const HeaderCase& c, std::ostream* os) { *os << c.name; }

class CorruptHeader : public ::testing::TestWithParam<HeaderCase> {};

TEST_P(CorruptHeader, OpenFailsWithSpecificError) {
  const HeaderCase& c = GetParam();
  TempDir dir;
  ASSERT_TRUE(MakeBaseline(dir));
  const std::string img = dir.Join("img.qcow2");
  ASSERT_TRUE(BaselineOpens(img));
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  ASSERT_TRUE(c.patch(img, h));

  const long rss_before = MaxRssKiB();
  const auto t0 = std::chrono::steady_clock::now();
  auto r = Image::Open(img, Qcow2Options());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const long rss_growth_mib = (MaxRssKiB() - rss_before) / 1024;

  EXPECT_LT(secs, 10.0) << "open of a corrupt image must fail fast";
  EXPECT_LT(rss_growth_mib, 512) << "open of a corrupt image allocated " << rss_growth_mib
                                 << " MiB";
  ASSERT_FALSE(r.ok()) << c.name << ": the corrupt image opened";
  const Status& s = r.status();
  EXPECT_FALSE(s.message().empty()) << "error without a message";
  bool code_ok = false;
  std::string want_codes;
  for (ErrorCode ec : c.codes) {
    code_ok = code_ok || s.code() == ec;
    want_codes += std::string(want_codes.empty() ? "" : " or ") + ErrorCodeName(ec);
  }
  EXPECT_TRUE(code_ok) << "expected " << want_codes << ", got " << Describe(s);
  bool named = false;
  std::string want_words;
  for (const auto& k : c.keywords) {
    named = named || ContainsNoCase(s.message(), k);
    want_words += std::string(want_words.empty() ? "" : " / ") + "'" + k + "'";
  }
  EXPECT_TRUE(named) << "message should name the problem (" << want_words << "): " << Describe(s);

  // Read-write open must fail as well, not "repair" silently.
  OpenOptions rw = Qcow2Options();
  rw.read_only = false;
  auto r2 = Image::Open(img, rw);
  EXPECT_FALSE(r2.ok()) << "read-write open of the corrupt image succeeded";
}

AssertionResult Be32(const std::string& p, uint64_t off, uint32_t v) {
  return PatchBE32(p, off, v);
}
AssertionResult Be64(const std::string& p, uint64_t off, uint64_t v) {
  return PatchBE64(p, off, v);
}

std::vector<HeaderCase> HeaderCases() {
  using EC = ErrorCode;
  std::vector<HeaderCase> v;
  v.push_back(
      {"bad_magic",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kMagic, 0x514649fc); },
       {EC::kCorrupt, EC::kInvalidArgument, EC::kUnsupported},
       {"magic", "not a qcow2"}});
  v.push_back({"version_1",
               [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kVersion, 1); },
               {EC::kUnsupported},
               {"version"}});
  v.push_back({"version_4",
               [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kVersion, 4); },
               {EC::kUnsupported},
               {"version"}});
  v.push_back(
      {"cluster_bits_8",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kClusterBits, 8); },
       {EC::kCorrupt, EC::kUnsupported},
       {"cluster"}});
  v.push_back(
      {"cluster_bits_22",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kClusterBits, 22); },
       {EC::kCorrupt, EC::kUnsupported},
       {"cluster"}});
  v.push_back(
      {"l1_size_huge",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kL1Size, 0x7fffffff); },
       {EC::kCorrupt},
       {"L1"}});
  v.push_back({"l1_size_max_beyond_eof",
               [](const std::string& p, const Qcow2Header&) {
                 // 32 MiB of L1 table (QEMU's limit) in a file far smaller.
                 return Be32(p, hdr::kL1Size, 0x400000);
               },
               {EC::kCorrupt},
               {"L1"}});
  v.push_back({"l1_size_too_small_for_disk",
               [](const std::string& p, const Qcow2Header&) {
                 // 64 GiB disk needs 128 L1 entries at 64 KiB clusters; there is 1.
                 return Be64(p, hdr::kSize, 64ull << 30);
               },
               {EC::kCorrupt},
               {"L1"}});
  v.push_back({"l1_table_offset_unaligned",
               [](const std::string& p, const Qcow2Header& h) {
                 return Be64(p, hdr::kL1TableOffset, h.l1_table_offset + 512);
               },
               {EC::kCorrupt},
               {"L1"}});
  v.push_back({"l1_table_offset_beyond_eof",
               [](const std::string& p, const Qcow2Header&) {
                 return Be64(p, hdr::kL1TableOffset, 1ull << 40);
               },
               {EC::kCorrupt},
               {"L1"}});
  v.push_back({"refcount_table_offset_unaligned",
               [](const std::string& p, const Qcow2Header& h) {
                 return Be64(p, hdr::kRefcountTableOffset, h.refcount_table_offset + 8);
               },
               {EC::kCorrupt},
               {"refcount"}});
  v.push_back({"refcount_table_clusters_huge",
               [](const std::string& p, const Qcow2Header&) {
                 return Be32(p, hdr::kRefcountTableClusters, 0xffffffff);
               },
               {EC::kCorrupt},
               {"refcount"}});
  v.push_back(
      {"refcount_order_7",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kRefcountOrder, 7); },
       {EC::kCorrupt, EC::kUnsupported},
       {"refcount"}});
  v.push_back(
      {"header_length_not_multiple_of_8",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kHeaderLength, 108); },
       {EC::kCorrupt},
       {"header"}});
  v.push_back(
      {"header_length_below_104",
       [](const std::string& p, const Qcow2Header&) { return Be32(p, hdr::kHeaderLength, 96); },
       {EC::kCorrupt},
       {"header"}});
  v.push_back({"header_length_larger_than_cluster",
               [](const std::string& p, const Qcow2Header&) {
                 return Be32(p, hdr::kHeaderLength, 65536 + 8);
               },
               {EC::kCorrupt},
               {"header"}});
  v.push_back({"extension_length_past_cluster",
               [](const std::string& p, const Qcow2Header& h) {
                 // The first extension's length field.
                 return Be32(p, h.header_length + 4, 65536);
               },
               {EC::kCorrupt},
               {"extension"}});
  v.push_back({"backing_file_size_1024",
               [](const std::string& p, const Qcow2Header&) {
                 return Be32(p, hdr::kBackingFileSize, 1024);
               },
               {EC::kCorrupt},
               {"backing"}});
  v.push_back({"backing_file_offset_past_cluster",
               [](const std::string& p, const Qcow2Header&) {
                 return Be64(p, hdr::kBackingFileOffset, 65536 - 4);
               },
               {EC::kCorrupt},
               {"backing"}});
  v.push_back({"snapshots_offset_beyond_eof",
               [](const std::string& p, const Qcow2Header&) {
                 return Be64(p, hdr::kSnapshotsOffset, 1ull << 40);
               },
               {EC::kCorrupt},
               {"snapshot"}});
  v.push_back({"snapshots_offset_unaligned",
               [](const std::string& p, const Qcow2Header& h) {
                 return Be64(p, hdr::kSnapshotsOffset, h.snapshots_offset + 8);
               },
               {EC::kCorrupt},
               {"snapshot"}});
  v.push_back({"nb_snapshots_huge",
               [](const std::string& p, const Qcow2Header&) {
                 return Be32(p, hdr::kNbSnapshots, 0xffffffff);
               },
               {EC::kCorrupt},
               {"snapshot"}});
  v.push_back({"unknown_compression_type",
               [](const std::string& p, const Qcow2Header& h) {
                 auto r = Be64(p, hdr::kIncompatibleFeatures,
                               h.incompatible_features | hdr::kIncompatCompression);
                 if (!r) return r;
                 return PatchFile(p, hdr::kCompressionType, std::string(1, '\x07'));
               },
               {EC::kUnsupported, EC::kCorrupt},
               {"compression"}});
  v.push_back({"compression_type_without_bit",
               [](const std::string& p, const Qcow2Header&) {
                 // zstd named in the header without the incompatible bit.
                 return PatchFile(p, hdr::kCompressionType, std::string(1, '\x01'));
               },
               {EC::kCorrupt},
               {"compression"}});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Qcow2, CorruptHeader, ::testing::ValuesIn(HeaderCases()),
                         [](const ::testing::TestParamInfo<HeaderCase>& i) {
                           return i.param.name;
                         });

// ------------------------------------------------------ Read-time errors

struct Mapping {
  uint64_t l1_offset = 0;
  uint64_t l2_offset = 0;  // of L1[0]
  uint32_t cluster_bits = 0;
};

AssertionResult LoadMapping(const std::string& path, Mapping* m) {
  Qcow2Header h;
  auto r = LoadQcow2Header(path, &h);
  if (!r) return r;
  m->l1_offset = h.l1_table_offset;
  m->cluster_bits = h.cluster_bits;
  std::string e;
  r = ReadFileRange(path, h.l1_table_offset, 8, &e);
  if (!r) return r;
  m->l2_offset = GetBE64(e, 0) & kL2OffsetMask;
  if (m->l2_offset == 0) return AssertionFailure() << "L1[0] is empty";
  return AssertionSuccess();
}

AssertionResult ReadL2Entry(const std::string& path, const Mapping& m, uint64_t index,
                            uint64_t* entry) {
  std::string e;
  auto r = ReadFileRange(path, m.l2_offset + 8 * index, 8, &e);
  if (!r) return r;
  *entry = GetBE64(e, 0);
  return AssertionSuccess();
}

AssertionResult WriteL2Entry(const std::string& path, const Mapping& m, uint64_t index,
                             uint64_t entry) {
  return PatchBE64(path, m.l2_offset + 8 * index, entry);
}

// Reads [offset, offset+length) and expects kCorrupt (EIO) with a message.
void ExpectCorruptRead(Image& img, uint64_t offset, uint64_t length,
                       const std::vector<std::string>& keywords) {
  std::string buf(length, '\0');
  Status s = img.Read(offset, AsWritableBytes(buf));
  ASSERT_FALSE(s.ok()) << "Read(" << offset << ", " << length
                       << ") of a corrupt mapping succeeded, returning "
                       << (AllZero(buf) ? "zeros" : "non-zero data");
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
  EXPECT_EQ(s.ToErrno(), EIO) << Describe(s);
  EXPECT_FALSE(s.message().empty());
  bool named = keywords.empty();
  for (const auto& k : keywords) named = named || ContainsNoCase(s.message(), k);
  EXPECT_TRUE(named) << "message should name the structure: " << Describe(s);
  // Block status of the range must not crash (an error is fine).
  auto st = img.GetBlockStatus(offset, length);
  if (!st.ok()) {
    EXPECT_FALSE(st.status().message().empty());
  }
}

// Every cluster except those in [bad_begin, bad_end) reads as QEMU read the
// unmodified image.
void ExpectOthersIntact(Image& img, const std::string& ref, uint64_t cs, uint64_t bad_begin,
                        uint64_t bad_end) {
  for (uint64_t off = 0; off < ref.size(); off += cs) {
    if (off + cs > bad_begin && off < bad_end) continue;
    std::string got(cs, '\0');
    Status s = img.Read(off, AsWritableBytes(got));
    ASSERT_TRUE(s.ok()) << "Read(" << off << ") of an intact cluster failed: " << Describe(s);
    ASSERT_TRUE(BuffersEqual(std::string_view(ref).substr(off, cs), got, off));
  }
}

struct L2Case {
  std::string name;
  // New L2 entry for guest cluster 2, given the old one and the file size.
  std::function<uint64_t(uint64_t old, uint64_t file_size)> entry;
};

void PrintTo(const L2Case& c, std::ostream* os) { *os << c.name; }

class CorruptL2Entry : public ::testing::TestWithParam<L2Case> {};

TEST_P(CorruptL2Entry, ThatClusterFailsOthersRead) {
  TempDir dir;
  ASSERT_TRUE(MakeBaseline(dir));
  const std::string img = dir.Join("img.qcow2");
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  Mapping m;
  ASSERT_TRUE(LoadMapping(img, &m));
  uint64_t old;
  ASSERT_TRUE(ReadL2Entry(img, m, 2, &old));
  ASSERT_NE(old & kL2OffsetMask, 0u) << "cluster 2 should be allocated";
  uint64_t fsize;
  ASSERT_TRUE(FileSize(img, &fsize));
  const uint64_t bad = GetParam().entry(old, fsize);
  char trace[160];
  std::snprintf(trace, sizeof trace,
                "L2 entry of guest cluster 2 (64 KiB clusters) changed from 0x%016llx "
                "to 0x%016llx; image file is %llu bytes",
                static_cast<unsigned long long>(old), static_cast<unsigned long long>(bad),
                static_cast<unsigned long long>(fsize));
  SCOPED_TRACE(trace);
  ASSERT_TRUE(WriteL2Entry(img, m, 2, bad));

  auto r = Image::Open(img, Qcow2Options());
  ASSERT_TRUE(r.ok()) << "a bad L2 entry must not prevent opening: " << Describe(r.status());
  Image& image = *r.value();
  const uint64_t cs = 65536;
  ExpectCorruptRead(image, 2 * cs, cs, {"L2", "cluster"});
  ExpectCorruptRead(image, 2 * cs + 100, 10, {"L2", "cluster"});
  // A read spanning good and bad clusters fails as a whole.
  ExpectCorruptRead(image, cs, 3 * cs, {"L2", "cluster"});
  ExpectOthersIntact(image, ref, cs, 2 * cs, 3 * cs);
  // And again after the failure: nothing was poisoned.
  ExpectCorruptRead(image, 2 * cs, 512, {});
  ExpectOthersIntact(image, ref, cs, 2 * cs, 3 * cs);
}

INSTANTIATE_TEST_SUITE_P(
    Qcow2, CorruptL2Entry,
    ::testing::Values(L2Case{"beyond_eof",
                             [](uint64_t, uint64_t fsize) {
                               return kCopied |
                                      ((fsize + (100ull << 16)) & kL2OffsetMask & ~0xffffull);
                             }},
                      L2Case{"far_beyond_eof",
                             [](uint64_t, uint64_t) { return kCopied | (0x00ff000000000000ull); }},
                      L2Case{"unaligned", [](uint64_t old, uint64_t) { return old + 512; }},
                      L2Case{"zero_flag_with_unaligned_offset",
                             [](uint64_t old, uint64_t) { return (old + 512) | 1; }}),
    [](const ::testing::TestParamInfo<L2Case>& i) { return i.param.name; });

// Offset 0 with the copied flag is "host offset 0" only with an external
// data file; in the image file the spec does not allow it, and QEMU reads
// the cluster as unallocated (here: the backing file's bytes). So does
// qcow2fs: QEMU's reading is the judge.
TEST(CorruptL2EntryAsQemuReadsIt, OffsetZeroWithCopiedIsUnallocated) {
  TempDir dir;
  ASSERT_TRUE(MakeBaseline(dir));
  const std::string img = dir.Join("img.qcow2");
  Mapping m;
  ASSERT_TRUE(LoadMapping(img, &m));
  ASSERT_TRUE(WriteL2Entry(img, m, 2, kCopied));
  std::string qemu;
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("qemu.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("qemu.raw"), &qemu));
  // Unallocated: the backing file's bytes show through.
  ASSERT_EQ(std::string_view(qemu).substr(2 * 65536, 65536), std::string(65536, '\x42'));
  auto r = Image::Open(img, Qcow2Options());
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  std::string got(qemu.size(), '\0');
  ASSERT_TRUE((*r)->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(qemu, got, 0));
}

TEST(CorruptL1Entry, ThatL2RangeFailsOthersRead) {
  // 4 KiB clusters: one L2 table maps 2 MiB, so an 8 MiB disk has 4.
  TempDir dir;
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const std::string img = dir.Join("img.qcow2");
  const uint64_t cs = 4096, cover = 2 * MiB;
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=4096 " + ShellQuote(img) + " 8M"));
  ASSERT_TRUE(WriteWholeFile(dir.Join("d.bin"), RandomBytes(8 * MiB, 3)));
  ASSERT_TRUE(QemuIo(img, {"write -q -s " + dir.Join("d.bin") + " 0 8M"}));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  uint64_t fsize;
  ASSERT_TRUE(FileSize(img, &fsize));

  struct Variant {
    const char* name;
    uint64_t entry;
  };
  std::string l1_1;
  ASSERT_TRUE(ReadFileRange(img, h.l1_table_offset + 8, 8, &l1_1));
  const uint64_t old = GetBE64(l1_1, 0);
  ASSERT_NE(old & kL2OffsetMask, 0u);
  for (const Variant& v : {Variant{"beyond_eof", kCopied | ((fsize + 64 * KiB) & ~(cs - 1))},
                           Variant{"unaligned", old + 512}}) {
    SCOPED_TRACE(v.name);
    ASSERT_TRUE(PatchBE64(img, h.l1_table_offset + 8, v.entry));
    {
      auto r = Image::Open(img, Qcow2Options());
      if (r.ok()) {
        // Either open notices (then it must say L1), or the read does.
        ExpectCorruptRead(*r.value(), cover, cover, {"L1", "L2"});
        ExpectCorruptRead(*r.value(), cover + 3 * cs + 5, 10, {"L1", "L2"});
        ExpectOthersIntact(*r.value(), ref, 64 * KiB, cover, 2 * cover);
      } else {
        EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt) << Describe(r.status());
        EXPECT_TRUE(ContainsNoCase(r.status().message(), "L1")) << Describe(r.status());
      }
    }
    ASSERT_TRUE(PatchBE64(img, h.l1_table_offset + 8, old));
  }
}

// Compressed images: garbage in one compressed cluster fails that cluster.
class CorruptCompressed : public ::testing::TestWithParam<std::string> {};

TEST_P(CorruptCompressed, ThatClusterFailsOthersRead) {
  const std::string type = GetParam();
  TempDir dir;
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const uint64_t cs = 65536;
  ASSERT_TRUE(WriteWholeFile(dir.Join("src.raw"), SemiCompressible(2 * MiB, 21)));
  const std::string img = dir.Join("img.qcow2");
  ASSERT_TRUE(QemuImg("convert -c -f raw -O qcow2 -o cluster_size=65536,compression_type=" + type +
                      " " + ShellQuote(dir.Join("src.raw")) + " " + ShellQuote(img)));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  Mapping m;
  ASSERT_TRUE(LoadMapping(img, &m));
  ASSERT_TRUE(BaselineOpens(img));

  // The first compressed cluster after cluster 0.
  uint64_t index = 0, entry = 0;
  for (uint64_t i = 1; i < 32; ++i) {
    ASSERT_TRUE(ReadL2Entry(img, m, i, &entry));
    if (entry & kCompressed) {
      index = i;
      break;
    }
  }
  ASSERT_NE(index, 0u) << "no compressed cluster found";
  const int x = 62 - (static_cast<int>(m.cluster_bits) - 8);
  const uint64_t host = entry & ((1ull << x) - 1);

  {
    SCOPED_TRACE("garbage compressed data");
    std::string saved;
    ASSERT_TRUE(ReadFileRange(img, host, 64, &saved));
    ASSERT_TRUE(PatchFile(img, host, std::string(64, '\xff')));
    {
      auto r = Image::Open(img, Qcow2Options());
      ASSERT_TRUE(r.ok()) << Describe(r.status());
      ExpectCorruptRead(*r.value(), index * cs, cs, {});
      ExpectCorruptRead(*r.value(), index * cs + 1000, 1, {});
      ExpectOthersIntact(*r.value(), ref, cs, index * cs, (index + 1) * cs);
    }
    ASSERT_TRUE(PatchFile(img, host, saved));
  }
  {
    SCOPED_TRACE("compressed descriptor beyond EOF");
    uint64_t fsize;
    ASSERT_TRUE(FileSize(img, &fsize));
    const uint64_t bad =
        (entry & ~((1ull << x) - 1)) | ((fsize + (1ull << 20)) & ((1ull << x) - 1));
    ASSERT_TRUE(WriteL2Entry(img, m, index, bad));
    auto r = Image::Open(img, Qcow2Options());
    ASSERT_TRUE(r.ok()) << Describe(r.status());
    ExpectCorruptRead(*r.value(), index * cs, cs, {});
    ExpectOthersIntact(*r.value(), ref, cs, index * cs, (index + 1) * cs);
  }
  {
    SCOPED_TRACE("compressed descriptor with all size bits set");
    const uint64_t bad = entry | (((1ull << 62) - 1) & ~((1ull << x) - 1));
    ASSERT_TRUE(WriteL2Entry(img, m, index, bad));
    auto r = Image::Open(img, Qcow2Options());
    ASSERT_TRUE(r.ok()) << Describe(r.status());
    std::string buf(cs, '\0');
    Status s = r.value()->Read(index * cs, AsWritableBytes(buf));
    // The stream may still decode (trailing sectors are ignored), but if it
    // fails it must be a corruption error, and other clusters stay intact.
    if (!s.ok()) {
      EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << Describe(s);
    }
    ExpectOthersIntact(*r.value(), ref, cs, index * cs, (index + 1) * cs);
  }
}

INSTANTIATE_TEST_SUITE_P(Qcow2, CorruptCompressed, ::testing::Values("zlib", "zstd"));

// Extended L2: both "allocated" and "zero" bits set for one subcluster is
// invalid; that subcluster's cluster must fail, others read.
TEST(CorruptExtendedL2, AllocatedAndZeroBitsBothSet) {
  TempDir dir;
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const std::string img = dir.Join("img.qcow2");
  const uint64_t cs = 65536;
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=65536,extended_l2=on " + ShellQuote(img) +
                      " 4M"));
  ASSERT_TRUE(WriteWholeFile(dir.Join("d.bin"), RandomBytes(4 * cs, 8)));
  ASSERT_TRUE(QemuIo(img, {"write -q -s " + dir.Join("d.bin") + " 0 262144"}));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  Mapping m;
  ASSERT_TRUE(LoadMapping(img, &m));
  // Extended entries are 16 bytes: entry then the subcluster bitmap
  // (low 32 bits: allocated, high 32 bits: reads as zero).
  std::string bm;
  ASSERT_TRUE(ReadFileRange(img, m.l2_offset + 16 * 1 + 8, 8, &bm));
  uint64_t bitmap = GetBE64(bm, 0);
  ASSERT_EQ(bitmap & 0xffffffffu, 0xffffffffu) << "cluster 1 should be fully allocated";
  ASSERT_TRUE(PatchBE64(img, m.l2_offset + 16 * 1 + 8, bitmap | (1ull << 32)));
  auto r = Image::Open(img, Qcow2Options());
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  ExpectCorruptRead(*r.value(), cs, cs, {});
  ExpectOthersIntact(*r.value(), ref, cs, cs, 2 * cs);
}

// Snapshot table: one entry whose L1 table points beyond EOF. The active
// state must stay readable; opening that snapshot must fail cleanly.
TEST(CorruptSnapshot, SnapshotL1BeyondEofFailsOnlyThatSnapshot) {
  TempDir dir;
  ASSERT_TRUE(MakeBaseline(dir));
  const std::string img = dir.Join("img.qcow2");
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  ASSERT_EQ(h.nb_snapshots, 1u);
  // Snapshot entry: l1_table_offset (u64) then l1_size (u32).
  ASSERT_TRUE(PatchBE64(img, h.snapshots_offset, 1ull << 40));
  auto r = Image::Open(img, Qcow2Options());
  if (r.ok()) {
    std::string got(ref.size(), '\0');
    Status s = r.value()->Read(0, AsWritableBytes(got));
    ASSERT_TRUE(s.ok()) << Describe(s);
    EXPECT_TRUE(BuffersEqual(ref, got, 0));
  } else {
    // Rejecting the whole image is acceptable if the message says why.
    EXPECT_EQ(r.status().code(), ErrorCode::kCorrupt) << Describe(r.status());
    EXPECT_TRUE(ContainsNoCase(r.status().message(), "snapshot")) << Describe(r.status());
  }
  OpenOptions o = Qcow2Options();
  o.snapshot = "s1";
  auto rs = Image::Open(img, o);
  ASSERT_FALSE(rs.ok()) << "a snapshot whose L1 table is beyond EOF opened";
  EXPECT_EQ(rs.status().code(), ErrorCode::kCorrupt) << Describe(rs.status());
  EXPECT_TRUE(ContainsNoCase(rs.status().message(), "L1") ||
              ContainsNoCase(rs.status().message(), "snapshot"))
      << Describe(rs.status());
}

// Truncated image files: every truncation point must fail cleanly or open.
TEST(CorruptTruncated, EveryTruncationFailsCleanly) {
  TempDir dir;
  ASSERT_TRUE(MakeBaseline(dir));
  const std::string img = dir.Join("img.qcow2");
  std::string full;
  ASSERT_TRUE(ReadWholeFile(img, &full));
  ASSERT_TRUE(BaselineOpens(img));
  const std::string cut = dir.Join("cut.qcow2");
  for (uint64_t len :
       {uint64_t{0}, uint64_t{4}, uint64_t{71}, uint64_t{103}, uint64_t{512}, uint64_t{65536},
        uint64_t{131072}, uint64_t{196608}, uint64_t{262144}, full.size() / 2, full.size() - 1}) {
    SCOPED_TRACE("truncated to " + Num(len));
    ASSERT_TRUE(WriteWholeFile(cut, std::string_view(full).substr(0, len)));
    auto r = Image::Open(cut, Qcow2Options());
    if (!r.ok()) {
      EXPECT_FALSE(r.status().message().empty());
      continue;
    }
    // If it opened, reads may fail but must not crash.
    std::string buf(1 * MiB, '\0');
    for (uint64_t off = 0; off + buf.size() <= r.value()->size(); off += buf.size()) {
      Status s = r.value()->Read(off, AsWritableBytes(buf));
      if (!s.ok()) {
        EXPECT_FALSE(s.message().empty());
      }
    }
  }
}

}  // namespace
}  // namespace qcow2fs::test
