// Image check and repair (include/qcow2fs/check.h) judged by QEMU: images
// made by qemu-img and qemu-io, broken the way real images break (refcounts
// edited, entries pointing past the end, metadata overlapping, a QEMU killed
// with lazy refcounts), checked by both tools. The reports must agree
// figure by figure and line by line; after a repair `qemu-img check` must
// find the image clean and `qemu-img compare` the guest data unchanged.
#include <algorithm>
#include <cstdint>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "qcow2fs/check.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// `qemu-img check --output=json`: its exit status, the JSON numbers, and
// the per-cluster lines it prints on standard error.
struct QemuCheck {
  int exit_code = -1;
  std::map<std::string, uint64_t> fields;
  std::vector<std::string> lines;
  std::string output;
  uint64_t Field(const std::string& name) const {
    auto it = fields.find(name);
    return it == fields.end() ? 0 : it->second;  // QEMU omits zero counts
  }
};

// The lines both tools print for refcount and COPIED problems.
bool IsComparedLine(const std::string& line) {
  static const std::regex re(
      "^((ERROR|Leaked) cluster [0-9]+ refcount=[0-9]+ reference=[0-9]+"
      "|ERROR OFLAG_COPIED .*"
      "|ERROR: counting reference for region .*)$");
  return std::regex_match(line, re);
}

QemuCheck RunQemuCheck(const std::string& image) {
  QemuCheck c;
  CommandResult r = RunCommand("qemu-img check --output=json " + ShellQuote(image));
  c.exit_code = r.exit_code;
  c.output = r.output;
  static const std::regex field("\"([a-z-]+)\": ([0-9]+)");
  for (auto it = std::sregex_iterator(r.output.begin(), r.output.end(), field);
       it != std::sregex_iterator(); ++it) {
    c.fields[(*it)[1]] = std::stoull((*it)[2]);
  }
  size_t pos = 0;
  while (pos < r.output.size()) {
    size_t nl = r.output.find('\n', pos);
    if (nl == std::string::npos) nl = r.output.size();
    std::string line = r.output.substr(pos, nl - pos);
    if (IsComparedLine(line)) c.lines.push_back(line);
    pos = nl + 1;
  }
  return c;
}

// Our report and QEMU's on the same image: every figure and count, the
// exit status, and the per-cluster lines (as multisets).
AssertionResult SameAsQemu(const std::string& image, const CheckReport& ours) {
  QemuCheck q = RunQemuCheck(image);
  std::string diff;
  auto expect = [&](const char* name, uint64_t got) {
    if (q.Field(name) != got) {
      diff += std::string(name) + ": qemu " + std::to_string(q.Field(name)) + ", ours " +
              std::to_string(got) + "\n";
    }
  };
  expect("image-end-offset", ours.image_end_offset);
  expect("total-clusters", ours.total_clusters);
  expect("allocated-clusters", ours.allocated_clusters);
  expect("fragmented-clusters", ours.fragmented_clusters);
  expect("compressed-clusters", ours.compressed_clusters);
  expect("corruptions", ours.corruptions);
  expect("leaks", ours.leaks);
  expect("check-errors", ours.check_errors);
  if (q.exit_code != ours.ExitCode()) {
    diff += "exit code: qemu " + std::to_string(q.exit_code) + ", ours " +
            std::to_string(ours.ExitCode()) + "\n";
  }
  std::vector<std::string> mine;
  for (const auto& m : ours.messages) {
    if (IsComparedLine(m)) mine.push_back(m);
  }
  std::vector<std::string> theirs = q.lines;
  std::sort(mine.begin(), mine.end());
  std::sort(theirs.begin(), theirs.end());
  if (mine != theirs) {
    diff += "lines differ:\n  qemu:\n";
    for (const auto& l : theirs) diff += "    " + l + "\n";
    diff += "  ours:\n";
    for (const auto& l : mine) diff += "    " + l + "\n";
  }
  if (diff.empty()) return AssertionSuccess();
  std::string all;
  for (const auto& m : ours.messages) all += "    " + m + "\n";
  return AssertionFailure() << image << ":\n"
                            << diff << "qemu-img said:\n"
                            << q.output << "\nour messages:\n"
                            << all;
}

Result<CheckReport> Check(const std::string& image, RepairMode mode = RepairMode::kNone) {
  CheckOptions o;
  o.repair = mode;
  return CheckImage(image, o);
}

// Checks `image` with both tools and expects the same findings.
AssertionResult CheckMatchesQemu(const std::string& image, CheckReport* out = nullptr) {
  auto r = Check(image);
  if (!r.ok()) return AssertionFailure() << "CheckImage: " << Describe(r.status());
  if (out) *out = *r;
  return SameAsQemu(image, *r);
}

// After a repair: QEMU finds the image clean and its guest data equal to
// `reference` (a raw file of what the guest read before).
AssertionResult CleanAndUnchanged(const std::string& image, const std::string& reference) {
  QemuCheck q = RunQemuCheck(image);
  if (q.exit_code != 0) {
    return AssertionFailure() << "qemu-img check after repair exits " << q.exit_code << ":\n"
                              << q.output;
  }
  return RunOk("qemu-img compare -f raw -F qcow2 " + ShellQuote(reference) + " " +
               ShellQuote(image));
}

// --- editing images ---------------------------------------------------

struct Layout {
  uint64_t cluster_size = 0;
  uint32_t refcount_order = 4;
  uint64_t refcount_table = 0;
  uint64_t l1_table = 0;
  bool extended_l2 = false;
};

AssertionResult ReadLayout(const std::string& image, Layout* l) {
  Qcow2Header h;
  auto r = LoadQcow2Header(image, &h);
  if (!r) return r;
  l->cluster_size = h.cluster_size();
  l->refcount_order = h.version >= 3 ? h.refcount_order : 4;
  l->refcount_table = h.refcount_table_offset;
  l->l1_table = h.l1_table_offset;
  l->extended_l2 = h.incompatible_features & hdr::kIncompatExtendedL2;
  return AssertionSuccess();
}

AssertionResult ReadBE64At(const std::string& path, uint64_t offset, uint64_t* v) {
  std::string buf;
  auto r = ReadFileRange(path, offset, 8, &buf);
  if (!r) return r;
  *v = GetBE64(buf, 0);
  return AssertionSuccess();
}

// Sets the stored refcount of host cluster `cluster` (its block must exist).
AssertionResult SetRefcount(const std::string& image, uint64_t cluster, uint64_t value) {
  Layout l;
  auto r = ReadLayout(image, &l);
  if (!r) return r;
  const uint64_t bits = uint64_t{1} << l.refcount_order;
  const uint64_t per_block = l.cluster_size * 8 / bits;
  uint64_t block = 0;
  r = ReadBE64At(image, l.refcount_table + 8 * (cluster / per_block), &block);
  if (!r) return r;
  if (block == 0) return AssertionFailure() << "no refcount block for cluster " << cluster;
  const uint64_t bit = (cluster % per_block) * bits;
  std::string bytes;
  const uint64_t width = std::max<uint64_t>(bits / 8, 1);
  r = ReadFileRange(image, block + bit / 8, width, &bytes);
  if (!r) return r;
  if (bits < 8) {
    const uint32_t shift = bit % 8;
    const uint32_t mask = ((1u << bits) - 1) << shift;
    auto b = static_cast<uint8_t>(bytes[0]);
    b = static_cast<uint8_t>((b & ~mask) | ((value << shift) & mask));
    bytes[0] = static_cast<char>(b);
  } else {
    for (uint64_t i = 0; i < width; i++) {
      bytes[width - 1 - i] = static_cast<char>((value >> (8 * i)) & 0xff);
    }
  }
  return PatchFile(image, block + bit / 8, bytes);
}

// Offset of the L2 entry for guest cluster `index` (first L2 table).
AssertionResult L2EntryOffset(const std::string& image, uint64_t index, uint64_t* offset) {
  Layout l;
  auto r = ReadLayout(image, &l);
  if (!r) return r;
  uint64_t l1 = 0;
  r = ReadBE64At(image, l.l1_table, &l1);
  if (!r) return r;
  const uint64_t l2 = l1 & 0x00fffffffffffe00ull;
  if (l2 == 0) return AssertionFailure() << "no L2 table";
  *offset = l2 + index * (l.extended_l2 ? 16 : 8);
  return AssertionSuccess();
}

struct Env {
  TempDir dir;
  std::string Path(const std::string& name) const { return dir.Join(name); }
};

// Creates `name` with qemu-img (options `opts`, `size`) and runs qemu-io
// commands on it.
AssertionResult MakeImage(const Env& env, const std::string& name, const std::string& opts,
                          const std::string& size, const std::vector<std::string>& io) {
  auto r = RequireProgram("qemu-img");
  if (!r) return r;
  r = QemuImg("create -q -f qcow2 " + (opts.empty() ? "" : "-o " + opts + " ") +
              ShellQuote(env.Path(name)) + " " + size);
  if (!r) return r;
  if (io.empty()) return AssertionSuccess();
  return QemuIo(env.Path(name), io);
}

// --- clean images -----------------------------------------------------

struct CleanCase {
  std::string name;
  std::string opts;
  bool snapshot;
  bool bitmap;
  std::string compressed = "4M 512k";        // whole clusters, written with -c
  std::string compressed_after = "5M 256k";  // the same, after the snapshot
};

TEST(CheckClean, ManyKindsMatchQemu) {
  const std::vector<CleanCase> cases = {
      {"v3-64k", "cluster_size=65536", true, true},
      {"v2-64k", "compat=0.10", true, false},
      {"512b", "cluster_size=512", true, false},
      {"4k-rb1", "cluster_size=4096,refcount_bits=1", false, false},
      {"4k-rb2", "cluster_size=4096,refcount_bits=2", false, false},
      {"64k-rb4", "refcount_bits=4", false, true},
      {"64k-rb8", "refcount_bits=8", true, false},
      {"64k-rb32", "refcount_bits=32", true, false},
      {"16k-rb64", "cluster_size=16384,refcount_bits=64", true, true},
      {"2m", "cluster_size=2097152", true, false, "4M 2M", "6M 2M"},
      {"ext-l2-32k", "cluster_size=32768,extended_l2=on", true, true},
      {"ext-l2-2m", "cluster_size=2097152,extended_l2=on", false, false, "4M 2M"},
      {"zstd", "compression_type=zstd", true, false},
      {"prealloc", "preallocation=metadata", false, false, ""},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Env env;
    const std::string img = env.Path("i.qcow2");
    std::vector<std::string> io = {"write -q -P 1 0 3M", "write -q -z 8M 1M",
                                   "write -q -P 3 9M 64k", "write -q -P 4 20M 100k",
                                   "discard -q 9M 64k"};
    // Preallocated images take no compressed writes.
    if (!c.compressed.empty()) io.push_back("write -q -c -P 2 " + c.compressed);
    ASSERT_TRUE(MakeImage(env, "i.qcow2", c.opts, "24M", io));
    if (c.snapshot) {
      ASSERT_TRUE(QemuImg("snapshot -c s1 " + ShellQuote(img)));
      ASSERT_TRUE(QemuIo(img, {"write -q -P 5 64k 1M", "write -q -c -P 6 " + c.compressed_after}));
      ASSERT_TRUE(QemuImg("snapshot -c s2 " + ShellQuote(img)));
      ASSERT_TRUE(QemuIo(img, {"write -q -P 7 128k 64k"}));
    }
    if (c.bitmap) {
      ASSERT_TRUE(QemuImg("bitmap --add " + ShellQuote(img) + " b0"));
      ASSERT_TRUE(QemuImg("bitmap --add -g 65536 " + ShellQuote(img) + " b1"));
      // Bitmap data gets written when the image is closed by a writer that
      // recorded writes: enable b1 and write through qemu-io.
      ASSERT_TRUE(QemuIo(img, {"write -q -P 8 12M 2M"}));
    }
    CheckReport report;
    ASSERT_TRUE(CheckMatchesQemu(img, &report));
    EXPECT_EQ(report.ExitCode(), 0);
    EXPECT_TRUE(report.messages.empty()) << report.messages[0];
    EXPECT_GT(report.allocated_clusters, 0u);
  }
}

TEST(CheckClean, RepairOfACleanImageWritesNothing) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {"write -q -P 1 0 1M"}));
  std::string before, after;
  ASSERT_TRUE(ReadWholeFile(img, &before));
  auto r = Check(img, RepairMode::kAll);
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_EQ(r->ExitCode(), 0);
  EXPECT_TRUE(r->repairs.empty());
  ASSERT_TRUE(ReadWholeFile(img, &after));
  EXPECT_TRUE(before == after) << "a clean image must not change";
}

TEST(CheckClean, ProgressReachesTheTotal) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "cluster_size=4096", "64M",
                        {"write -q -P 1 0 8M", "write -q -P 2 40M 8M"}));
  CheckOptions o;
  uint64_t calls = 0, last_done = 0, last_total = 0;
  bool monotonic = true;
  o.progress = [&](uint64_t done, uint64_t total) {
    calls++;
    monotonic = monotonic && done >= last_done && done <= total;
    last_done = done;
    last_total = total;
  };
  auto r = CheckImage(img, o);
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_GT(calls, 2u);
  EXPECT_TRUE(monotonic);
  EXPECT_EQ(last_done, last_total);
  EXPECT_GT(last_total, 0u);
}

// --- leaks --------------------------------------------------------------

TEST(CheckLeaks, RefcountsOfUnusedClustersAreLeaksAndRepairReclaimsThem) {
  for (const std::string opts : {"refcount_bits=16", "cluster_size=4096,refcount_bits=1",
                                 "refcount_bits=64", "cluster_size=32768,extended_l2=on"}) {
    SCOPED_TRACE(opts);
    Env env;
    const std::string img = env.Path("i.qcow2");
    ASSERT_TRUE(MakeImage(env, "i.qcow2", opts, "8M", {"write -q -P 1 0 512k"}));
    ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));
    Layout l;
    ASSERT_TRUE(ReadLayout(img, &l));
    uint64_t size = 0;
    ASSERT_TRUE(FileSize(img, &size));
    // Three clusters past the end, counted as used: leaks (two inside the
    // file, one past its end, which QEMU does not look at).
    const uint64_t first = (size + l.cluster_size - 1) / l.cluster_size;
    ASSERT_TRUE(RunOk("truncate -s " + std::to_string((first + 2) * l.cluster_size) + " " +
                      ShellQuote(img)));
    for (uint64_t c = first; c < first + 3; c++) ASSERT_TRUE(SetRefcount(img, c, 1));

    CheckReport report;
    ASSERT_TRUE(CheckMatchesQemu(img, &report));
    EXPECT_EQ(report.leaks, 2u);
    EXPECT_EQ(report.ExitCode(), 3);

    auto fixed = Check(img, RepairMode::kLeaks);
    ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
    EXPECT_EQ(fixed->leaks_fixed, 2u);
    EXPECT_EQ(fixed->leaks, 0u);
    EXPECT_EQ(fixed->ExitCode(), 0);
    EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
  }
}

// --- corruptions --------------------------------------------------------

TEST(CheckCorrupt, RefcountBelowReferencesOfASharedClusterIsFixedInPlace) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {"write -q -P 1 0 256k"}));
  ASSERT_TRUE(QemuImg("snapshot -c s " + ShellQuote(img)));
  ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));
  uint64_t entry_offset = 0, entry = 0;
  ASSERT_TRUE(L2EntryOffset(img, 1, &entry_offset));
  ASSERT_TRUE(ReadBE64At(img, entry_offset, &entry));
  const uint64_t cluster = (entry & 0x00fffffffffffe00ull) >> 16;
  ASSERT_TRUE(SetRefcount(img, cluster, 1));  // shared by the snapshot: 2

  CheckReport report;
  ASSERT_TRUE(CheckMatchesQemu(img, &report));
  EXPECT_GE(report.corruptions, 1u);
  EXPECT_EQ(report.ExitCode(), 2);

  // Leaks-only repair leaves a corruption, and says so.
  auto leaks = Check(img, RepairMode::kLeaks);
  ASSERT_TRUE(leaks.ok()) << Describe(leaks.status());
  EXPECT_EQ(leaks->ExitCode(), 2);

  auto fixed = Check(img, RepairMode::kAll);
  ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
  EXPECT_FALSE(fixed->refcounts_rebuilt);
  EXPECT_GE(fixed->corruptions_fixed, 1u);
  EXPECT_EQ(fixed->ExitCode(), 0) << fixed->messages.size();
  EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
  // And the snapshot still reads as it did.
  ASSERT_TRUE(RunOk("qemu-img snapshot -a s " + ShellQuote(img)));
  EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
}

TEST(CheckCorrupt, RefcountZeroOfAClusterInUseRebuildsTheRefcounts) {
  for (const std::string opts : {"", "cluster_size=4096,refcount_bits=2", "compat=0.10",
                                 "cluster_size=65536,extended_l2=on,refcount_bits=64"}) {
    SCOPED_TRACE(opts);
    Env env;
    const std::string img = env.Path("i.qcow2");
    ASSERT_TRUE(MakeImage(env, "i.qcow2", opts, "8M",
                          {"write -q -P 1 0 256k", "write -q -c -P 2 1M 128k"}));
    ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));
    Layout l;
    ASSERT_TRUE(ReadLayout(img, &l));
    uint64_t entry_offset = 0, entry = 0;
    ASSERT_TRUE(L2EntryOffset(img, 0, &entry_offset));
    ASSERT_TRUE(ReadBE64At(img, entry_offset, &entry));
    ASSERT_TRUE(SetRefcount(img, (entry & 0x00fffffffffffe00ull) / l.cluster_size, 0));
    // And the refcount block's own refcount, so the structure is broken too.
    uint64_t block = 0;
    ASSERT_TRUE(ReadBE64At(img, l.refcount_table, &block));
    ASSERT_TRUE(SetRefcount(img, block / l.cluster_size, 0));

    CheckReport report;
    ASSERT_TRUE(CheckMatchesQemu(img, &report));
    EXPECT_EQ(report.ExitCode(), 2);

    auto fixed = Check(img, RepairMode::kAll);
    ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
    EXPECT_TRUE(fixed->refcounts_rebuilt);
    EXPECT_EQ(fixed->ExitCode(), 0);
    EXPECT_EQ(fixed->leaks, 0u) << "the old structure is counted free";
    EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
    CheckReport again;
    EXPECT_TRUE(CheckMatchesQemu(img, &again));
  }
}

TEST(CheckCorrupt, L2EntryPastTheEndIsReportedAndRepairedToZeros) {
  for (const std::string opts : {"", "compat=0.10", "cluster_size=32768,extended_l2=on"}) {
    SCOPED_TRACE(opts);
    Env env;
    const std::string img = env.Path("i.qcow2");
    ASSERT_TRUE(MakeImage(env, "i.qcow2", opts, "8M",
                          {"write -q -P 1 0 256k", "write -q -c -P 2 1M 128k"}));
    Layout l;
    ASSERT_TRUE(ReadLayout(img, &l));
    uint64_t entry_offset = 0, entry = 0;
    ASSERT_TRUE(L2EntryOffset(img, 1, &entry_offset));
    ASSERT_TRUE(ReadBE64At(img, entry_offset, &entry));
    std::string word(8, '\0');
    PutBE64(word, 0, (entry & ~0x00fffffffffffe00ull) | (uint64_t{1} << 36));
    ASSERT_TRUE(PatchFile(img, entry_offset, word));
    // What QEMU reads now (zeros there) is what the repair must keep.
    ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));

    CheckReport report;
    ASSERT_TRUE(CheckMatchesQemu(img, &report));
    EXPECT_EQ(report.ExitCode(), 2);

    auto fixed = Check(img, RepairMode::kAll);
    ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
    EXPECT_EQ(fixed->ExitCode(), 0);
    EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
  }
}

TEST(CheckCorrupt, DataClusterOnARefcountBlockMovesTheRefcounts) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {"write -q -P 1 0 256k"}));
  Layout l;
  ASSERT_TRUE(ReadLayout(img, &l));
  uint64_t block = 0, entry_offset = 0;
  ASSERT_TRUE(ReadBE64At(img, l.refcount_table, &block));
  ASSERT_TRUE(L2EntryOffset(img, 2, &entry_offset));
  std::string word(8, '\0');
  PutBE64(word, 0, (uint64_t{1} << 63) | block);
  ASSERT_TRUE(PatchFile(img, entry_offset, word));
  ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));

  CheckReport report;
  ASSERT_TRUE(CheckMatchesQemu(img, &report));
  EXPECT_EQ(report.ExitCode(), 2);
  bool named = false;
  for (const auto& m : report.messages)
    named = named || m.find("refcount block 0") != std::string::npos;
  EXPECT_TRUE(named) << "the shared refcount block is reported";

  auto fixed = Check(img, RepairMode::kAll);
  ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
  EXPECT_TRUE(fixed->refcounts_rebuilt);
  EXPECT_EQ(fixed->ExitCode(), 0);
  EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
}

TEST(CheckCorrupt, L2TableOnTheL1TableIsAnOverlap) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {"write -q -P 1 0 256k"}));
  Layout l;
  ASSERT_TRUE(ReadLayout(img, &l));
  uint64_t entry_offset = 0;
  ASSERT_TRUE(L2EntryOffset(img, 3, &entry_offset));
  std::string word(8, '\0');
  PutBE64(word, 0, (uint64_t{1} << 63) | l.l1_table);
  ASSERT_TRUE(PatchFile(img, entry_offset, word));
  ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw")));
  CheckReport report;
  ASSERT_TRUE(CheckMatchesQemu(img, &report));
  EXPECT_EQ(report.ExitCode(), 2);
  auto fixed = Check(img, RepairMode::kAll);
  ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
  EXPECT_EQ(fixed->ExitCode(), 0);
  EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
}

// --- dirty and corrupt images ------------------------------------------

// A QEMU killed after writes with lazy refcounts: dirty bit set, refcounts
// of the new clusters missing.
AssertionResult MakeDirtyImage(const Env& env, const std::string& name, const std::string& opts) {
  auto r = MakeImage(env, name, "lazy_refcounts=on" + (opts.empty() ? "" : "," + opts), "16M",
                     {"write -q -P 9 0 64k"});
  if (!r) return r;
  CommandResult k = RunCommand(
      "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 3M 512k' "
      "-c 'sigraise 9' " +
      ShellQuote(env.Path(name)));
  if (k.exit_code != 128 + 9) {
    return AssertionFailure() << "qemu-io should die by SIGKILL, exit " << k.exit_code << "\n"
                              << k.output;
  }
  Qcow2Header h;
  r = LoadQcow2Header(env.Path(name), &h);
  if (!r) return r;
  if (!(h.incompatible_features & hdr::kIncompatDirty)) {
    return AssertionFailure() << "qemu-io left no dirty bit";
  }
  return AssertionSuccess();
}

TEST(CheckDirty, QemuKilledWithLazyRefcountsIsRepairedByCheck) {
  for (const std::string opts : {"", "cluster_size=4096,refcount_bits=8"}) {
    SCOPED_TRACE(opts);
    Env env;
    const std::string img = env.Path("d.qcow2");
    ASSERT_TRUE(MakeDirtyImage(env, "d.qcow2", opts));
    ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw"), "-U"));
    CheckReport report;
    ASSERT_TRUE(CheckMatchesQemu(img, &report));
    EXPECT_EQ(report.ExitCode(), 2);
    auto fixed = Check(img, RepairMode::kAll);
    ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
    EXPECT_EQ(fixed->ExitCode(), 0);
    Qcow2Header h;
    ASSERT_TRUE(LoadQcow2Header(img, &h));
    EXPECT_FALSE(h.incompatible_features & hdr::kIncompatDirty) << "dirty bit cleared";
    EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
  }
}

TEST(CheckDirty, WritableOpenRepairsADirtyImageFirst) {
  Env env;
  const std::string img = env.Path("d.qcow2");
  ASSERT_TRUE(MakeDirtyImage(env, "d.qcow2", ""));
  ASSERT_TRUE(QemuConvertToRaw(img, env.Path("ref.raw"), "-U"));
  {
    OpenOptions o;
    o.read_only = false;
    auto r = Image::Open(img, o);
    ASSERT_TRUE(r.ok()) << Describe(r.status());
    Image& image = *r.value();
    EXPECT_FALSE(image.read_only());
    const ImageInfo info = image.info();
    EXPECT_FALSE(info.dirty);
    ASSERT_FALSE(info.warnings.empty());
    EXPECT_TRUE(ContainsNoCase(info.warnings[0], "dirty")) << info.warnings[0];
    EXPECT_TRUE(ContainsNoCase(info.warnings[0], "repaired")) << info.warnings[0];
    EXPECT_EQ(info.warnings[0].find('\n'), std::string::npos);
    std::string got(16 * MiB, '\0');
    ASSERT_TRUE(image.Read(0, AsWritableBytes(got)).ok());
    std::string ref;
    ASSERT_TRUE(ReadWholeFile(env.Path("ref.raw"), &ref));
    EXPECT_TRUE(BuffersEqual(ref, got, 0));
  }
  EXPECT_TRUE(CleanAndUnchanged(img, env.Path("ref.raw")));
}

TEST(CheckDirty, ReadOnlyOpenLeavesADirtyImageAlone) {
  Env env;
  const std::string img = env.Path("d.qcow2");
  ASSERT_TRUE(MakeDirtyImage(env, "d.qcow2", ""));
  std::string before, after;
  ASSERT_TRUE(ReadWholeFile(img, &before));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_TRUE(r.value()->info().dirty);
  r.value().reset();
  ASSERT_TRUE(ReadWholeFile(img, &after));
  EXPECT_TRUE(before == after);
}

TEST(CheckCorruptBit, StaysReadOnlyUntilARepairClearsIt) {
  Env env;
  const std::string img = env.Path("c.qcow2");
  ASSERT_TRUE(MakeImage(env, "c.qcow2", "", "8M", {"write -q -P 1 0 1M"}));
  ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, hdr::kIncompatCorrupt));
  OpenOptions o;
  o.read_only = false;
  {
    auto r = Image::Open(img, o);
    ASSERT_TRUE(r.ok()) << Describe(r.status());
    EXPECT_TRUE(r.value()->read_only()) << "corrupt images need an explicit repair";
  }
  auto none = Check(img);
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->ExitCode(), 0);
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  EXPECT_TRUE(h.incompatible_features & hdr::kIncompatCorrupt) << "a check alone changes nothing";
  auto fixed = Check(img, RepairMode::kAll);
  ASSERT_TRUE(fixed.ok()) << Describe(fixed.status());
  EXPECT_EQ(fixed->ExitCode(), 0);
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  EXPECT_FALSE(h.incompatible_features & hdr::kIncompatCorrupt);
  auto r = Image::Open(img, o);
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_FALSE(r.value()->read_only());
}

// --- options and locks ------------------------------------------------

TEST(CheckOptionsTest, ForceShareWithRepairIsRefused) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {}));
  CheckOptions o;
  o.force_share = true;
  o.repair = RepairMode::kLeaks;
  auto r = CheckImage(img, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
}

TEST(CheckOptionsTest, ImagesInUseNeedForceShare) {
  Env env;
  const std::string img = env.Path("i.qcow2");
  ASSERT_TRUE(MakeImage(env, "i.qcow2", "", "8M", {"write -q -P 1 0 1M"}));
  OpenOptions o;
  o.read_only = false;
  auto open = Image::Open(img, o);
  ASSERT_TRUE(open.ok()) << Describe(open.status());
  auto locked = Check(img);
  ASSERT_FALSE(locked.ok());
  EXPECT_EQ(locked.status().code(), ErrorCode::kLocked) << Describe(locked.status());
  CheckOptions shared;
  shared.force_share = true;
  auto r = CheckImage(img, shared);
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_EQ(r->ExitCode(), 0);
}

TEST(CheckOptionsTest, NotQcow2IsAnError) {
  Env env;
  ASSERT_TRUE(WriteWholeFile(env.Path("raw.img"), std::string(64 * KiB, 'r')));
  auto r = Check(env.Path("raw.img"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(Check(env.Path("missing.qcow2")).ok());
}

}  // namespace
}  // namespace qcow2fs::test
