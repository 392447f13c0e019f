// The read oracle: images made by QEMU's own tools at test time, read through
// qcow2fs, must be byte-identical to what `qemu-img convert -O raw` (or
// `qemu-img dd` for huge sparse disks) reads from them.
//
// Each parameter is a recipe: it builds one image (and its backing chain,
// data file, snapshots...) in a temporary directory with qemu-img/qemu-io and
// records which guest ranges it touched. The checker then compares:
//   - disks up to 64 MiB: the whole disk in 1 MiB chunks, a few large
//     unaligned reads, random unaligned reads of many sizes, reads across
//     cluster and subcluster boundaries around every touched range, and reads
//     across every L2-table boundary;
//   - larger (sparse) disks: every touched range widened by two clusters, L2
//     boundaries, the first and last MiB and a few untouched regions, each
//     read whole, in chunks and in random unaligned pieces;
//   - internal snapshots: the whole disk opened with OpenOptions::snapshot
//     against `qemu-img snapshot -a` on a copy, converted to raw;
//   - GetBlockStatus: a walk over the disk must tile it, and ranges it calls
//     zero must read as zeros.
// qemu-img and qemu-io must be on PATH; without them every case FAILS.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
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
constexpr uint64_t GiB = 1024 * MiB;
constexpr uint64_t TiB = 1024 * GiB;

// Disks up to this size are compared whole.
constexpr uint64_t kWholeReadLimit = 64 * MiB;

std::string Num(uint64_t v) { return std::to_string(v); }

uint64_t AlignDown(uint64_t v, uint64_t a) { return v / a * a; }
uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Guest bytes mapped by one L2 table.
uint64_t L2Coverage(uint64_t cs, bool extended) {
  return cs * (cs / (extended ? 16 : 8));
}

struct Region {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// What to open with OpenOptions::snapshot, and how qemu-img names it.
struct SnapshotRef {
  std::string open_name;   // passed to OpenOptions::snapshot
  std::string apply_name;  // passed to `qemu-img snapshot -a` (ID or name)
};

// The result of a recipe.
struct Built {
  std::string image;      // path handed to Image::Open (may be relative)
  std::string open_cwd;   // working directory for Image::Open, if set
  std::string qemu_image; // absolute path for qemu-img
  uint64_t cluster_size = 0;
  bool extended_l2 = false;
  bool has_backing = false;
  std::vector<Region> touched;
  std::vector<SnapshotRef> snapshots;
  // Expectations on ImageInfo, checked when set.
  std::optional<int> version;
  std::optional<std::string> backing_file;
  std::optional<bool> expect_compressed_data;
};

// One guest operation performed with qemu-io.
struct Op {
  enum Kind { kWrite, kZero, kZeroUnmap, kDiscard, kWriteCompressed } kind;
  uint64_t offset;
  uint64_t length;
};

Op W(uint64_t o, uint64_t l) { return {Op::kWrite, o, l}; }
Op Z(uint64_t o, uint64_t l) { return {Op::kZero, o, l}; }
Op ZU(uint64_t o, uint64_t l) { return {Op::kZeroUnmap, o, l}; }
Op D(uint64_t o, uint64_t l) { return {Op::kDiscard, o, l}; }
Op C(uint64_t o, uint64_t l) { return {Op::kWriteCompressed, o, l}; }

// Builds images inside one temporary directory.
class Builder {
 public:
  explicit Builder(const TempDir& dir) : dir_(dir) {}

  std::string Path(const std::string& name) const { return dir_.Join(name); }
  const std::string& dir() const { return dir_.path(); }

  // qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME SIZE, run
  // inside the directory so relative names are stored as given.
  AssertionResult Create(const std::string& name, uint64_t size,
                         const std::string& opts,
                         const std::string& backing = "",
                         const std::string& backing_fmt = "") {
    std::string cmd = "cd " + ShellQuote(dir()) + " && qemu-img create -q -f qcow2";
    if (!opts.empty()) cmd += " -o " + ShellQuote(opts);
    if (!backing.empty()) {
      cmd += " -b " + ShellQuote(backing);
      if (!backing_fmt.empty()) cmd += " -F " + backing_fmt;
    }
    cmd += " " + ShellQuote(name) + " " + Num(size);
    auto have = RequireProgram("qemu-img");
    if (!have) return have;
    return RunOk(cmd);
  }

  // Runs the ops on NAME with one qemu-io process. Data writes use fresh
  // random bytes (a different source per write) so misplaced data shows.
  AssertionResult Io(const std::string& name, const std::vector<Op>& ops,
                     const std::string& format = "qcow2") {
    std::vector<std::string> cmds;
    for (const Op& op : ops) {
      const std::string range = Num(op.offset) + " " + Num(op.length);
      switch (op.kind) {
        case Op::kWrite:
        case Op::kWriteCompressed: {
          const std::string src = Path("src-" + Num(src_counter_) + ".bin");
          const uint64_t seed = 1000 + src_counter_++;
          std::string data = op.kind == Op::kWrite
                                 ? RandomBytes(op.length, seed)
                                 : SemiCompressible(op.length, seed);
          auto r = WriteWholeFile(src, data);
          if (!r) return r;
          cmds.push_back(std::string("write -q") +
                         (op.kind == Op::kWriteCompressed ? " -c" : "") +
                         " -s " + src + " " + range);
          break;
        }
        case Op::kZero:
          cmds.push_back("write -q -z " + range);
          break;
        case Op::kZeroUnmap:
          cmds.push_back("write -q -z -u " + range);
          break;
        case Op::kDiscard:
          cmds.push_back("discard -q " + range);
          break;
      }
      touched.push_back({op.offset, op.length});
    }
    // Run from the directory: QEMU resolves a relative external data file
    // name against its working directory.
    ScopedCwd cwd(dir());
    if (!cwd.ok()) return AssertionFailure() << "chdir " << dir();
    auto r = QemuIo(Path(name), cmds, format);
    // The sources are no longer needed; keep the directory small.
    for (uint64_t i = first_unremoved_; i < src_counter_; ++i) {
      std::remove(Path("src-" + Num(i) + ".bin").c_str());
    }
    first_unremoved_ = src_counter_;
    return r;
  }

  AssertionResult Img(const std::string& args) {
    auto have = RequireProgram("qemu-img");
    if (!have) return have;
    return RunOk("cd " + ShellQuote(dir()) + " && qemu-img " + args);
  }

  std::vector<Region> touched;

 private:
  const TempDir& dir_;
  uint64_t src_counter_ = 0;
  uint64_t first_unremoved_ = 0;
};

// The usual mix of operations for a plain image: partial clusters, writes
// across cluster and L2 boundaries, zeroing allocated and unallocated
// clusters, discards, and data at the very end of the disk.
std::vector<Op> StandardOps(uint64_t cs, uint64_t size, bool extended = false) {
  std::vector<Op> ops = {
      W(0, 3 * cs + 100),
      W(5 * cs + 17, 1000),
      W(7 * cs - 300, 600),
      Z(2 * cs, cs),
      D(cs, cs),
      Z(5 * cs + 100, 50),
      Z(10 * cs, 2 * cs),
      W(12 * cs, 2 * cs),
      ZU(13 * cs, cs),
      W(AlignDown(size / 2, 512) + 5, 2 * cs),
      W(size - cs - 300, cs + 300),
  };
  const uint64_t cov = L2Coverage(cs, extended);
  if (cov + 2 * cs < size) {
    ops.push_back(W(cov - cs - 1234, 2 * cs + 2000));
  }
  if (2 * cov + 2 * cs < size) {
    ops.push_back(Z(2 * cov - cs, 2 * cs));
  }
  return ops;
}

using Recipe = std::function<AssertionResult(Builder&, Built*)>;

struct Case {
  std::string name;
  Recipe recipe;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// ------------------------------------------------------------ The checker

AssertionResult ReadImage(Image& img, uint64_t offset, uint64_t length,
                          std::string* out) {
  out->assign(length, '\x5c');  // poison: a read that skips bytes shows
  Status s = img.Read(offset, AsWritableBytes(*out));
  if (!s.ok()) {
    return AssertionFailure() << "Read(" << offset << ", " << length
                              << ") failed: " << Describe(s);
  }
  return AssertionSuccess();
}

AssertionResult ReadAndCompare(Image& img, uint64_t offset, uint64_t length,
                               std::string_view expected,
                               const std::string& what) {
  std::string got;
  auto r = ReadImage(img, offset, length, &got);
  if (!r) return r << " (" << what << ")";
  return BuffersEqual(expected, got, offset,
                      what + " read(" + Num(offset) + ", " + Num(length) + ")");
}

AssertionResult OpenImage(const Built& b, const OpenOptions& options,
                          std::unique_ptr<Image>* out) {
  std::optional<ScopedCwd> cwd;
  if (!b.open_cwd.empty()) {
    cwd.emplace(b.open_cwd);
    if (!cwd->ok()) return AssertionFailure() << "chdir " << b.open_cwd;
  }
  auto r = Image::Open(b.image, options);
  if (!r.ok()) {
    return AssertionFailure() << "Image::Open(" << b.image
                              << (b.open_cwd.empty() ? "" : " from cwd " + b.open_cwd)
                              << ") failed: " << Describe(r.status());
  }
  *out = std::move(r).value();
  return AssertionSuccess();
}

// Walks GetBlockStatus over the whole disk: extents must tile it; extents
// reported as zeros must read as zeros in the reference.
AssertionResult CheckBlockStatusWalk(Image& img, std::string_view reference,
                                     bool has_backing) {
  const uint64_t size = img.size();
  uint64_t off = 0;
  int steps = 0;
  while (off < size) {
    if (++steps > 1'000'000) {
      return AssertionFailure() << "GetBlockStatus walk did not finish";
    }
    auto r = img.GetBlockStatus(off, size - off);
    if (!r.ok()) {
      return AssertionFailure() << "GetBlockStatus(" << off << ", "
                                << (size - off) << ") failed: "
                                << Describe(r.status());
    }
    const BlockStatus& st = r.value();
    if (st.length == 0 || st.length > size - off) {
      return AssertionFailure() << "GetBlockStatus(" << off << ") returned length "
                                << st.length << " (remaining " << (size - off) << ")";
    }
    if (st.kind == BlockKind::kZero ||
        (st.kind == BlockKind::kUnallocated && !has_backing)) {
      if (!AllZero(reference.substr(off, st.length))) {
        auto nz = reference.substr(off, st.length).find_first_not_of('\0');
        return AssertionFailure()
               << "GetBlockStatus says [" << off << ", " << (off + st.length)
               << ") is " << (st.kind == BlockKind::kZero ? "zero" : "unallocated without backing")
               << " but QEMU reads non-zero data at " << (off + nz);
      }
    }
    if (st.kind == BlockKind::kData && !st.compressed && !st.host_offset) {
      return AssertionFailure() << "GetBlockStatus(" << off
                                << "): uncompressed data without host_offset";
    }
    off += st.length;
  }
  return AssertionSuccess();
}

// Reads around `boundary` (clamped to the disk) and compares.
AssertionResult BoundaryRead(Image& img, std::string_view ref, uint64_t boundary,
                             uint64_t before, uint64_t after,
                             const std::string& what) {
  const uint64_t size = ref.size();
  if (boundary > size) return AssertionSuccess();
  const uint64_t start = boundary >= before ? boundary - before : 0;
  const uint64_t end = std::min(size, boundary + after);
  if (end <= start) return AssertionSuccess();
  return ReadAndCompare(img, start, end - start, ref.substr(start, end - start),
                        what);
}

void CheckWholeDisk(Image& img, const Built& b, const std::string& ref,
                    uint64_t seed) {
  const uint64_t size = ref.size();
  ASSERT_EQ(img.size(), size) << "virtual size differs from qemu-img's";
  const uint64_t cs = b.cluster_size;

  // 1. The whole disk in 1 MiB chunks.
  for (uint64_t off = 0; off < size; off += MiB) {
    const uint64_t len = std::min(MiB, size - off);
    ASSERT_TRUE(ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len),
                               "1MiB chunk"));
  }
  // 2. Large reads at odd offsets (many clusters per call).
  for (uint64_t off = 12345; off < size; off += 8 * MiB + 4097) {
    const uint64_t len = std::min(8 * MiB + 777, size - off);
    ASSERT_TRUE(ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len),
                               "large unaligned"));
  }
  // 3. Random unaligned reads of many sizes.
  Rng rng(seed);
  for (int i = 0; i < 300; ++i) {
    uint64_t len;
    switch (i % 4) {
      case 0: len = rng.Uniform(1, 64); break;
      case 1: len = rng.Uniform(1, 2 * cs + 1); break;
      case 2: len = rng.Uniform(1, 256 * KiB); break;
      default: len = rng.Uniform(2, 2 * cs); break;
    }
    len = std::min(len, size);
    uint64_t off;
    if (i % 4 == 3) {
      // Straddle a cluster boundary.
      const uint64_t k = rng.Uniform(1, std::max<uint64_t>(1, size / cs - 1));
      const uint64_t back =
          rng.Uniform(1, std::max<uint64_t>(1, std::min(len - 1, k * cs)));
      off = k * cs - back;
    } else {
      off = rng.Uniform(0, size - len);
    }
    if (off + len > size) off = size - len;
    ASSERT_TRUE(ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len),
                               "random #" + Num(i)));
  }
  // 4. Cluster (and subcluster) boundaries around every touched range.
  const uint64_t sc = b.extended_l2 ? cs / 32 : cs;
  for (const Region& t : b.touched) {
    std::vector<uint64_t> bounds = {
        AlignDown(t.offset, cs), AlignUp(t.offset, cs),
        AlignDown(t.offset + t.length, cs), AlignUp(t.offset + t.length, cs),
        AlignDown(t.offset, sc), AlignUp(t.offset + t.length, sc),
        t.offset, t.offset + t.length};
    for (uint64_t bd : bounds) {
      ASSERT_TRUE(BoundaryRead(img, ref, bd, 37, 41, "boundary"));
      ASSERT_TRUE(BoundaryRead(img, ref, bd, 1, 1, "boundary"));
      ASSERT_TRUE(BoundaryRead(img, ref, bd, cs + 3, cs + 5, "boundary"));
    }
  }
  // 5. Every L2 table boundary.
  const uint64_t cov = L2Coverage(cs, b.extended_l2);
  for (uint64_t bd = cov; bd < size; bd += cov) {
    ASSERT_TRUE(BoundaryRead(img, ref, bd, cs + 13, cs + 17, "L2 boundary"));
    ASSERT_TRUE(BoundaryRead(img, ref, bd, 3, 5, "L2 boundary"));
  }
  // 6. Block status.
  ASSERT_TRUE(CheckBlockStatusWalk(img, ref, b.has_backing));
}

std::vector<Region> MergeRegions(std::vector<Region> rs, uint64_t size) {
  for (Region& r : rs) {
    uint64_t s = AlignDown(r.offset, 512);
    uint64_t e = std::min(size, AlignUp(r.offset + r.length, 512));
    r = {s, e > s ? e - s : 0};
  }
  std::sort(rs.begin(), rs.end(),
            [](const Region& a, const Region& b) { return a.offset < b.offset; });
  std::vector<Region> out;
  for (const Region& r : rs) {
    if (r.length == 0) continue;
    if (!out.empty() && r.offset <= out.back().offset + out.back().length) {
      uint64_t e = std::max(out.back().offset + out.back().length, r.offset + r.length);
      out.back().length = e - out.back().offset;
    } else {
      out.push_back(r);
    }
  }
  return out;
}

void CheckRangesWithImage(Image& img, const std::vector<Region>& regions,
                          const std::vector<std::string>& refs, uint64_t cs,
                          uint64_t seed) {
  Rng rng(seed);
  for (size_t i = 0; i < regions.size(); ++i) {
    const Region& r = regions[i];
    const std::string_view ref = refs[i];
    const std::string where = "region [" + Num(r.offset) + ", " +
                              Num(r.offset + r.length) + ")";
    // Whole region in one read, then in 1 MiB chunks.
    ASSERT_TRUE(ReadAndCompare(img, r.offset, r.length, ref, where));
    for (uint64_t o = 0; o < r.length; o += MiB) {
      const uint64_t len = std::min(MiB, r.length - o);
      ASSERT_TRUE(ReadAndCompare(img, r.offset + o, len, ref.substr(o, len), where));
    }
    // Random unaligned reads inside the region.
    for (int k = 0; k < 40; ++k) {
      const uint64_t len = rng.Uniform(1, std::min<uint64_t>(r.length, 2 * cs + 1));
      const uint64_t o = rng.Uniform(0, r.length - len);
      ASSERT_TRUE(ReadAndCompare(img, r.offset + o, len, ref.substr(o, len), where));
    }
    // Cluster boundaries inside the region.
    int n = 0;
    for (uint64_t bd = AlignUp(r.offset + 1, cs); bd < r.offset + r.length && n < 64;
         bd += cs, ++n) {
      const uint64_t s = std::max(r.offset, bd - 5);
      const uint64_t e = std::min(r.offset + r.length, bd + 7);
      ASSERT_TRUE(ReadAndCompare(img, s, e - s, ref.substr(s - r.offset, e - s),
                                 where + " cluster boundary"));
    }
    // Block status answers for the region.
    auto st = img.GetBlockStatus(r.offset, r.length);
    ASSERT_TRUE(st.ok()) << "GetBlockStatus(" << r.offset << ", " << r.length
                         << "): " << Describe(st.status());
    EXPECT_GT(st->length, 0u);
    EXPECT_LE(st->length, r.length);
    if (st->kind == BlockKind::kZero) {
      EXPECT_TRUE(AllZero(ref.substr(0, st->length)))
          << "GetBlockStatus says zero at " << r.offset << " but data differs";
    }
  }
}

uint64_t SeedOf(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
  return h;
}

class QemuReadMatrix : public ::testing::TestWithParam<Case> {};

TEST_P(QemuReadMatrix, MatchesQemu) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  const Case& c = GetParam();
  TempDir dir;
  Builder builder(dir);
  Built b;
  ASSERT_TRUE(c.recipe(builder, &b)) << "building the image failed";
  if (b.touched.empty()) b.touched = builder.touched;
  ASSERT_FALSE(b.image.empty());
  if (b.qemu_image.empty()) b.qemu_image = b.image;
  ASSERT_GT(b.cluster_size, 0u);

  // QEMU resolves a relative data file name against the working directory
  // (qcow2fs against the image's directory): run qemu-img from there.
  std::optional<ScopedCwd> qemu_cwd;
  qemu_cwd.emplace(std::filesystem::path(b.qemu_image).parent_path().string());
  ASSERT_TRUE(qemu_cwd->ok());
  QemuInfo qinfo;
  ASSERT_TRUE(QemuImageInfo(b.qemu_image, &qinfo));
  const uint64_t size = qinfo.virtual_size;
  const uint64_t seed = SeedOf(c.name);
  TempDir scratch;

  // References from QEMU first.
  std::string whole_ref;
  std::vector<Region> regions;
  std::vector<std::string> region_refs;
  if (size <= kWholeReadLimit) {
    const std::string raw = scratch.Join("reference.raw");
    ASSERT_TRUE(QemuConvertToRaw(b.qemu_image, raw));
    ASSERT_TRUE(ReadWholeFile(raw, &whole_ref));
    ASSERT_EQ(whole_ref.size(), size);
    std::remove(raw.c_str());
  } else {
    // Same region choice as CheckRanges, computed here so the references
    // exist before the image is opened.
    const uint64_t cs = b.cluster_size;
    auto widen = [&](uint64_t off, uint64_t len, uint64_t margin) {
      const uint64_t s = off >= margin ? off - margin : 0;
      const uint64_t e = std::min(size, off + len + margin);
      return Region{s, e - s};
    };
    std::vector<Region> want;
    for (const Region& t : b.touched) want.push_back(widen(t.offset, t.length, 2 * cs));
    want.push_back({0, std::min(size, MiB)});
    want.push_back(widen(size - std::min(size, MiB), std::min(size, MiB), 0));
    Rng rng(seed ^ 0x5555);
    for (int i = 0; i < 3; ++i) {
      want.push_back(widen(AlignDown(rng.Uniform(0, size - 1), 512), 256 * KiB, 0));
    }
    const uint64_t cov = L2Coverage(cs, b.extended_l2);
    std::vector<uint64_t> l2b;
    for (uint64_t k = 1; k <= 3 && k * cov < size; ++k) l2b.push_back(k * cov);
    l2b.push_back(AlignDown(size - 1, cov));
    for (const Region& t : b.touched) {
      l2b.push_back(AlignDown(t.offset, cov));
      l2b.push_back(AlignUp(t.offset + t.length, cov));
    }
    for (uint64_t bd : l2b) {
      if (bd > 0 && bd < size) want.push_back(widen(bd, 0, 2 * cs));
    }
    regions = MergeRegions(want, size);
    region_refs.resize(regions.size());
    for (size_t i = 0; i < regions.size(); ++i) {
      ASSERT_TRUE(QemuReadRange(b.qemu_image, regions[i].offset, regions[i].length,
                                &region_refs[i], scratch.path()));
    }
  }
  // Snapshot references: `qemu-img snapshot -a` on a copy (next to the
  // original, so relative backing names still resolve), then convert. Unlike
  // `convert -l`, this also restores the snapshot's own disk size.
  std::map<std::string, std::string> snapshot_refs;
  for (const SnapshotRef& s : b.snapshots) {
    const std::string copy = b.qemu_image + ".snapcopy";
    const std::string raw = scratch.Join("snap.raw");
    ASSERT_TRUE(RunOk("cp " + ShellQuote(b.qemu_image) + " " + ShellQuote(copy)));
    ASSERT_TRUE(QemuImg("snapshot -a " + ShellQuote(s.apply_name) + " " + ShellQuote(copy)));
    ASSERT_TRUE(QemuConvertToRaw(copy, raw));
    ASSERT_TRUE(ReadWholeFile(raw, &snapshot_refs[s.open_name]));
    std::remove(raw.c_str());
    std::remove(copy.c_str());
  }

  qemu_cwd.reset();

  // The active state.
  {
    std::unique_ptr<Image> img;
    ASSERT_TRUE(OpenImage(b, OpenOptions{}, &img));
    const ImageInfo info = img->info();
    EXPECT_EQ(info.format, "qcow2");
    EXPECT_EQ(info.virtual_size, size);
    EXPECT_EQ(info.cluster_size, b.cluster_size);
    EXPECT_EQ(info.extended_l2, b.extended_l2);
    EXPECT_TRUE(img->read_only());
    if (b.version) {
      EXPECT_EQ(info.version, *b.version);
    }
    if (b.backing_file) {
      EXPECT_EQ(info.backing_file, *b.backing_file);
    }
    if (!b.has_backing) {
      EXPECT_EQ(info.backing_file, "");
    }
    if (size <= kWholeReadLimit) {
      CheckWholeDisk(*img, b, whole_ref, seed);
    } else {
      CheckRangesWithImage(*img, regions, region_refs, b.cluster_size, seed);
    }
    if (HasFatalFailure()) return;
    if (b.expect_compressed_data) {
      // At least one compressed extent must be reported.
      bool found = false;
      for (uint64_t off = 0; off < size && !found;) {
        auto st = img->GetBlockStatus(off, size - off);
        ASSERT_TRUE(st.ok()) << Describe(st.status());
        ASSERT_GT(st->length, 0u);
        found = st->kind == BlockKind::kData && st->compressed;
        off += st->length;
      }
      EXPECT_EQ(found, *b.expect_compressed_data)
          << "GetBlockStatus should report compressed clusters";
    }
    for (const SnapshotRef& s : b.snapshots) {
      bool listed = false;
      for (const SnapshotInfo& si : info.snapshots) {
        listed = listed || si.name == s.open_name || si.id == s.open_name;
      }
      EXPECT_TRUE(listed) << "ImageInfo::snapshots does not list " << s.open_name;
    }
  }

  // Internal snapshots.
  for (const SnapshotRef& s : b.snapshots) {
    SCOPED_TRACE("snapshot " + s.open_name);
    OpenOptions o;
    o.snapshot = s.open_name;
    std::unique_ptr<Image> img;
    ASSERT_TRUE(OpenImage(b, o, &img));
    EXPECT_TRUE(img->read_only());
    const std::string& ref = snapshot_refs[s.open_name];
    ASSERT_EQ(img->size(), ref.size()) << "snapshot disk size";
    for (uint64_t off = 0; off < ref.size(); off += MiB) {
      const uint64_t len = std::min(MiB, ref.size() - off);
      ASSERT_TRUE(ReadAndCompare(*img, off, len, std::string_view(ref).substr(off, len),
                                 "snapshot " + s.open_name));
    }
    Rng rng(seed + 17);
    for (int i = 0; i < 50; ++i) {
      const uint64_t len = rng.Uniform(1, 3 * b.cluster_size);
      const uint64_t off = rng.Uniform(0, ref.size() - std::min<uint64_t>(len, ref.size()));
      const uint64_t l = std::min<uint64_t>(len, ref.size() - off);
      ASSERT_TRUE(ReadAndCompare(*img, off, l, std::string_view(ref).substr(off, l),
                                 "snapshot " + s.open_name + " random"));
    }
  }
}

// ---------------------------------------------------------------- Recipes

std::string CsName(uint64_t cs) {
  if (cs >= MiB) return Num(cs / MiB) + "M";
  if (cs >= KiB) return Num(cs / KiB) + "K";
  return Num(cs);
}

// Plain image of one version and cluster size; small enough to read whole.
Case PlainCase(int version, uint64_t cs) {
  return {"v" + Num(version) + "_cs" + CsName(cs),
          [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t size = std::max(16 * MiB, 20 * cs);
            const std::string opts = std::string("compat=") +
                                     (version == 2 ? "0.10" : "1.1") +
                                     ",cluster_size=" + Num(cs);
            auto r = bld.Create("img.qcow2", size, opts);
            if (!r) return r;
            r = bld.Io("img.qcow2", StandardOps(cs, size));
            if (!r) return r;
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = version;
            return AssertionSuccess();
          }};
}

// A disk spanning at least two L2 tables; compared by regions when large.
Case L2SpanCase(int version, uint64_t cs) {
  return {"l2span_v" + Num(version) + "_cs" + CsName(cs),
          [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t cov = L2Coverage(cs, false);
            const uint64_t size = 2 * cov + 8 * cs;
            const std::string opts = std::string("compat=") +
                                     (version == 2 ? "0.10" : "1.1") +
                                     ",cluster_size=" + Num(cs);
            auto r = bld.Create("img.qcow2", size, opts);
            if (!r) return r;
            std::vector<Op> ops = StandardOps(cs, size);
            ops.push_back(W(cov - 512, 1024));           // straddles tiny
            ops.push_back(W(2 * cov + cs + 3, cs));      // in the third table
            r = bld.Io("img.qcow2", ops);
            if (!r) return r;
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = version;
            return AssertionSuccess();
          }};
}

Case RefcountCase(int bits) {
  return {"refcount_bits_" + Num(bits), [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t cs = 4096, size = 16 * MiB;
            auto r = bld.Create("img.qcow2", size,
                                "cluster_size=4096,refcount_bits=" + Num(bits));
            if (!r) return r;
            r = bld.Io("img.qcow2", StandardOps(cs, size));
            if (!r) return r;
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = 3;
            return AssertionSuccess();
          }};
}

// Extended L2 entries over a backing file: subcluster writes, zeroed and
// discarded subclusters, unallocated subclusters reading from the backing.
Case ExtendedL2Case(uint64_t cs) {
  return {"extended_l2_cs" + CsName(cs), [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t sc = cs / 32;
            const uint64_t size = std::max(16 * MiB, 12 * cs);
            auto r = bld.Create("base.qcow2", size, "cluster_size=65536");
            if (!r) return r;
            r = bld.Io("base.qcow2", {W(0, std::min(size, 10 * cs)),
                                      W(size - 2 * cs, 2 * cs)});
            if (!r) return r;
            r = bld.Create("img.qcow2", size,
                           "cluster_size=" + Num(cs) + ",extended_l2=on",
                           "base.qcow2", "qcow2");
            if (!r) return r;
            std::vector<Op> ops = {
                W(cs + 3 * sc, sc),              // one subcluster
                W(2 * cs + 4096, 4096),          // 4K into a cluster
                W(3 * cs - 2 * sc, 5 * sc),      // across a cluster boundary
                Z(cs + 5 * sc, 2 * sc),          // zero subclusters (allocated)
                Z(5 * cs + sc, 2 * sc),          // zero subclusters (unallocated)
                W(4 * cs, 3 * sc),
                D(4 * cs + sc, sc),              // discard one subcluster
                W(6 * cs + sc + 100, 7),         // tiny unaligned
                Z(7 * cs, cs),                   // whole cluster over backing
                W(8 * cs, cs),
                Z(8 * cs + 10 * sc + 3, sc),     // unaligned zero
                ZU(8 * cs + 20 * sc, 4 * sc),
                W(9 * cs + 31 * sc, sc),         // last subcluster
                W(size - 2 * sc, 2 * sc),        // end of disk
            };
            r = bld.Io("img.qcow2", ops);
            if (!r) return r;
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->extended_l2 = true;
            b->has_backing = true;
            b->backing_file = "base.qcow2";
            return AssertionSuccess();
          }};
}

// Extended L2 with no backing and an L2 boundary inside a small disk.
Case ExtendedL2NoBackingCase(uint64_t cs) {
  return {"extended_l2_nobacking_cs" + CsName(cs),
          [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t sc = cs / 32;
            const uint64_t size = 2 * L2Coverage(cs, true) + 4 * cs;
            auto r = bld.Create("img.qcow2", size,
                                "cluster_size=" + Num(cs) + ",extended_l2=on");
            if (!r) return r;
            std::vector<Op> ops = StandardOps(cs, size, true);
            ops.push_back(W(20 * cs + 3 * sc, sc));
            ops.push_back(Z(20 * cs + 4 * sc, sc));
            ops.push_back(W(20 * cs + 9 * sc + 11, 2 * sc));
            r = bld.Io("img.qcow2", ops);
            if (!r) return r;
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->extended_l2 = true;
            return AssertionSuccess();
          }};
}

// qemu-img convert -c from semi-compressible data.
Case CompressedCase(const std::string& type, uint64_t cs, int version,
                    bool modify) {
  return {"compressed_" + type + "_v" + Num(version) + "_cs" + CsName(cs) +
              (modify ? "_modified" : ""),
          [=](Builder& bld, Built* b) -> AssertionResult {
            const uint64_t size = std::max(4 * MiB, 6 * cs);
            auto r = WriteWholeFile(bld.Path("src.raw"),
                                    SemiCompressible(size, cs + version));
            if (!r) return r;
            std::string opts = "cluster_size=" + Num(cs);
            opts += version == 2 ? ",compat=0.10" : ",compat=1.1";
            if (version == 3) opts += ",compression_type=" + type;
            r = bld.Img("convert -c -f raw -O qcow2 -o " + opts + " src.raw img.qcow2");
            if (!r) return r;
            std::remove(bld.Path("src.raw").c_str());
            std::string check;
            r = RunOk("qemu-img check " + ShellQuote(bld.Path("img.qcow2")), &check);
            if (!r) return r;
            // "... = 100.00% allocated, 0.00% fragmented, 87.50% compressed clusters"
            const size_t at = check.find("% compressed clusters");
            size_t num = at;
            while (num != std::string::npos && num > 0 &&
                   (std::isdigit(static_cast<unsigned char>(check[num - 1])) ||
                    check[num - 1] == '.')) {
              --num;
            }
            if (at == std::string::npos ||
                std::strtod(check.c_str() + num, nullptr) <= 0.0) {
              return AssertionFailure() << "image has no compressed clusters:\n" << check;
            }
            bld.touched.push_back({0, size});
            if (modify) {
              // QEMU writes compressed clusters only where nothing is
              // allocated: grow the disk and compress into the new part.
              r = bld.Img("resize img.qcow2 " + Num(size + 4 * cs));
              if (!r) return r;
              r = bld.Io("img.qcow2", {
                                          W(cs + 100, 200),         // partial overwrite
                                          Z(2 * cs, cs),            // zero a compressed cluster
                                          D(5 * cs, cs),            // discard one
                                          W(6 * cs - 10, 20),
                                          C(size, cs),              // compressed writes
                                          C(size + cs, 2 * cs),
                                          W(size + 3 * cs + 1, 5),
                                      });
              if (!r) return r;
            }
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = version;
            b->expect_compressed_data = true;
            return AssertionSuccess();
          }};
}

std::vector<Case> AllCases() {
  std::vector<Case> cases;
  for (int version : {2, 3}) {
    for (uint64_t cs = 512; cs <= 2 * MiB; cs *= 2) cases.push_back(PlainCase(version, cs));
  }
  for (int version : {2, 3}) {
    for (uint64_t cs : {16 * KiB, 64 * KiB, 256 * KiB, 2 * MiB}) {
      cases.push_back(L2SpanCase(version, cs));
    }
  }
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) cases.push_back(RefcountCase(bits));
  for (uint64_t cs = 16 * KiB; cs <= 2 * MiB; cs *= 2) cases.push_back(ExtendedL2Case(cs));
  for (uint64_t cs : {16 * KiB, 64 * KiB}) cases.push_back(ExtendedL2NoBackingCase(cs));
  for (const char* type : {"zlib", "zstd"}) {
    for (uint64_t cs : {512 * uint64_t{1}, 4 * KiB, 64 * KiB, 2 * MiB}) {
      cases.push_back(CompressedCase(type, cs, 3, false));
    }
    cases.push_back(CompressedCase(type, 64 * KiB, 3, true));
    cases.push_back(CompressedCase(type, 4 * KiB, 3, true));
  }
  for (uint64_t cs : {4 * KiB, 64 * KiB}) cases.push_back(CompressedCase("zlib", cs, 2, false));
  cases.push_back(CompressedCase("zlib", 64 * KiB, 2, true));

  // ---- Backing chains.
  cases.push_back({"backing_chain3", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 16 * MiB;
    auto r = bld.Create("base.qcow2", size, "cluster_size=4096");
    if (!r) return r;
    r = bld.Io("base.qcow2", {W(0, 8 * MiB), W(12 * MiB, 4 * MiB)});
    if (!r) return r;
    r = bld.Create("mid.qcow2", size, "cluster_size=65536", "base.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("mid.qcow2", {W(64 * KiB, 200 * KiB), Z(1 * MiB, 256 * KiB),
                             W(3 * MiB + 5, 100), D(4 * MiB, 64 * KiB),
                             Z(9 * MiB, 128 * KiB), W(13 * MiB - 1000, 3000)});
    if (!r) return r;
    r = bld.Create("top.qcow2", size, "cluster_size=16384", "mid.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("top.qcow2", {W(100 * KiB, 20 * KiB), W(1 * MiB + 100 * KiB, 10),
                             Z(6 * MiB, 64 * KiB), W(8 * MiB - 8 * KiB, 16 * KiB),
                             W(16 * MiB - 16 * KiB, 16 * KiB)});
    if (!r) return r;
    b->image = bld.Path("top.qcow2");
    b->cluster_size = 16384;
    b->has_backing = true;
    b->backing_file = "mid.qcow2";
    return AssertionSuccess();
  }});
  cases.push_back({"backing_chain3_v2", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 8 * MiB;
    auto r = bld.Create("base.qcow2", size, "compat=0.10,cluster_size=512");
    if (!r) return r;
    r = bld.Io("base.qcow2", {W(0, 4 * MiB)});
    if (!r) return r;
    r = bld.Create("mid.qcow2", size, "compat=0.10", "base.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("mid.qcow2", {W(64 * KiB, 100 * KiB), Z(1 * MiB, 128 * KiB)});
    if (!r) return r;
    r = bld.Create("top.qcow2", size, "compat=0.10,cluster_size=2048", "mid.qcow2",
                   "qcow2");
    if (!r) return r;
    r = bld.Io("top.qcow2", {W(70 * KiB, 3000), Z(1 * MiB + 4096, 4096),
                             W(5 * MiB, 8192)});
    if (!r) return r;
    b->image = bld.Path("top.qcow2");
    b->cluster_size = 2048;
    b->has_backing = true;
    b->version = 2;
    return AssertionSuccess();
  }});
  cases.push_back({"backing_raw", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 16 * MiB;
    std::string base = RandomBytes(size, 77);
    std::fill(base.begin() + 2 * MiB, base.begin() + 3 * MiB, '\0');
    auto r = WriteWholeFile(bld.Path("base.raw"), base);
    if (!r) return r;
    r = bld.Create("top.qcow2", size, "", "base.raw", "raw");
    if (!r) return r;
    r = bld.Io("top.qcow2", {W(100, 1000), Z(1 * MiB, 64 * KiB), D(2 * MiB, 64 * KiB),
                             W(5 * MiB + 3, 70 * KiB), ZU(7 * MiB, 128 * KiB)});
    if (!r) return r;
    b->image = bld.Path("top.qcow2");
    b->cluster_size = 65536;
    b->has_backing = true;
    b->backing_file = "base.raw";
    return AssertionSuccess();
  }});
  cases.push_back({"backing_relative_other_cwd", [](Builder& bld, Built* b) -> AssertionResult {
    // dir/a/top.qcow2 -> "../b/mid.qcow2" -> "base.qcow2" (dir/b/base.qcow2):
    // each name resolves against its own image's directory.
    auto r = RunOk("mkdir -p " + ShellQuote(bld.Path("a")) + " " +
                   ShellQuote(bld.Path("b")) + " " + ShellQuote(bld.Path("elsewhere")));
    if (!r) return r;
    const uint64_t size = 8 * MiB;
    r = bld.Create("b/base.qcow2", size, "");
    if (!r) return r;
    r = bld.Io("b/base.qcow2", {W(0, 4 * MiB)});
    if (!r) return r;
    // qemu-img resolves -b relative to the new image's directory.
    r = bld.Create("b/mid.qcow2", size, "", "base.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("b/mid.qcow2", {W(1 * MiB, 64 * KiB)});
    if (!r) return r;
    r = bld.Create("a/top.qcow2", size, "", "../b/mid.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("a/top.qcow2", {W(2 * MiB + 7, 9000)});
    if (!r) return r;
    b->image = "../a/top.qcow2";
    b->open_cwd = bld.Path("elsewhere");
    b->qemu_image = bld.Path("a/top.qcow2");
    b->cluster_size = 65536;
    b->has_backing = true;
    b->backing_file = "../b/mid.qcow2";
    return AssertionSuccess();
  }});
  cases.push_back({"backing_shorter_than_image", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("small.qcow2", 1 * MiB, "");
    if (!r) return r;
    r = bld.Io("small.qcow2", {W(0, 1 * MiB)});
    if (!r) return r;
    r = bld.Create("big.qcow2", 16 * MiB, "", "small.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("big.qcow2", {W(512 * KiB + 3, 1 * MiB), W(10 * MiB, 100)});
    if (!r) return r;
    bld.touched.push_back({1 * MiB - 64 * KiB, 128 * KiB});
    b->image = bld.Path("big.qcow2");
    b->cluster_size = 65536;
    b->has_backing = true;
    return AssertionSuccess();
  }});
  cases.push_back({"backing_shorter_2g", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("small.qcow2", 1 * MiB, "");
    if (!r) return r;
    r = bld.Io("small.qcow2", {W(0, 1 * MiB)});
    if (!r) return r;
    r = bld.Create("big.qcow2", 2 * GiB, "", "small.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("big.qcow2", {W(512 * KiB + 3, 100 * KiB), W(1 * GiB, 100)});
    if (!r) return r;
    bld.touched.push_back({0, 4 * MiB});
    b->image = bld.Path("big.qcow2");
    b->cluster_size = 65536;
    b->has_backing = true;
    return AssertionSuccess();
  }});
  cases.push_back({"backing_raw_unaligned_short", [](Builder& bld, Built* b) -> AssertionResult {
    // A raw backing file whose length is not a multiple of 512 or of the
    // cluster size: the tail past its end reads as zeros.
    auto r = WriteWholeFile(bld.Path("base.raw"), RandomBytes(1000001, 5));
    if (!r) return r;
    r = bld.Create("top.qcow2", 4 * MiB, "cluster_size=4096", "base.raw", "raw");
    if (!r) return r;
    r = bld.Io("top.qcow2", {W(4096, 4096)});
    if (!r) return r;
    bld.touched.push_back({1000001 - 5000, 10000});
    b->image = bld.Path("top.qcow2");
    b->cluster_size = 4096;
    b->has_backing = true;
    return AssertionSuccess();
  }});
  for (const std::string fmt : {"qcow2", "raw"}) {
    cases.push_back({"backing_no_format_extension_" + fmt,
                     [fmt](Builder& bld, Built* b) -> AssertionResult {
      const uint64_t size = 8 * MiB;
      const std::string base = "base." + fmt;
      AssertionResult r = AssertionSuccess();
      if (fmt == "raw") {
        r = WriteWholeFile(bld.Path(base), RandomBytes(size, 99));
      } else {
        r = bld.Create(base, size, "");
        if (r) r = bld.Io(base, {W(0, size)});
      }
      if (!r) return r;
      r = bld.Create("top.qcow2", size, "", base, fmt);
      if (!r) return r;
      r = bld.Io("top.qcow2", {W(1 * MiB, 64 * KiB + 1)});
      if (!r) return r;
      Qcow2Header h;
      r = LoadQcow2Header(bld.Path("top.qcow2"), &h);
      if (!r) return r;
      if (!h.FindExtension(hdr::kExtBackingFormat)) {
        return AssertionFailure() << "qemu-img wrote no backing format extension";
      }
      h.RemoveExtension(hdr::kExtBackingFormat);
      r = StoreQcow2Header(bld.Path("top.qcow2"), h);
      if (!r) return r;
      r = LoadQcow2Header(bld.Path("top.qcow2"), &h);
      if (!r) return r;
      if (h.FindExtension(hdr::kExtBackingFormat) || h.backing_file != base) {
        return AssertionFailure() << "header rewrite failed";
      }
      b->image = bld.Path("top.qcow2");
      b->cluster_size = 65536;
      b->has_backing = true;
      b->backing_file = base;
      return AssertionSuccess();
    }});
  }

  // ---- External data files.
  for (bool raw : {false, true}) {
    cases.push_back({std::string("data_file") + (raw ? "_raw" : ""),
                     [raw](Builder& bld, Built* b) -> AssertionResult {
      const uint64_t size = 16 * MiB, cs = 65536;
      std::string opts = "data_file=img.data";
      if (raw) opts += ",data_file_raw=on";
      auto r = bld.Create("img.qcow2", size, opts);
      if (!r) return r;
      std::vector<Op> ops = StandardOps(cs, size);
      if (raw) {
        // data_file_raw forbids unmapping; discards and zero-unmap are
        // still legal requests but keep the op list uncontroversial.
        ops.erase(std::remove_if(ops.begin(), ops.end(),
                                 [](const Op& o) { return o.kind == Op::kDiscard; }),
                  ops.end());
      }
      r = bld.Io("img.qcow2", ops);
      if (!r) return r;
      b->image = bld.Path("img.qcow2");
      b->cluster_size = cs;
      return AssertionSuccess();
    }});
  }

  // ---- Internal snapshots.
  for (int version : {2, 3}) {
    for (uint64_t cs : {512 * uint64_t{1}, 64 * KiB}) {
      cases.push_back({"snapshots_v" + Num(version) + "_cs" + CsName(cs),
                       [version, cs](Builder& bld, Built* b) -> AssertionResult {
        const uint64_t size = 8 * MiB;
        const std::string img = "img.qcow2";
        auto r = bld.Create(img, size,
                            std::string("compat=") + (version == 2 ? "0.10" : "1.1") +
                                ",cluster_size=" + Num(cs));
        if (!r) return r;
        r = bld.Io(img, {W(0, 1 * MiB), W(4 * MiB + 3, 5 * cs)});
        if (!r) return r;
        r = bld.Img("snapshot -c s0 " + img);
        if (!r) return r;
        r = bld.Img("snapshot -c s1 " + img);
        if (!r) return r;
        r = bld.Io(img, {W(cs, 3 * cs + 1), Z(512 * KiB, 4 * cs), D(4 * MiB, 2 * cs),
                         W(6 * MiB, 100)});
        if (!r) return r;
        r = bld.Img("snapshot -c s2 " + img);
        if (!r) return r;
        r = bld.Io(img, {W(2 * cs + 7, cs), W(7 * MiB, 64 * KiB)});
        if (!r) return r;
        r = bld.Img("snapshot -d s0 " + img);  // a deleted snapshot
        if (!r) return r;
        b->image = bld.Path(img);
        b->cluster_size = cs;
        b->version = version;
        // s0 (ID 1) is deleted; s1 is ID 2, s2 is ID 3.
        b->snapshots = {{"s1", "s1"}, {"s2", "s2"}, {"3", "3"}};
        return AssertionSuccess();
      }});
    }
  }
  cases.push_back({"snapshot_then_resize", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("img.qcow2", 4 * MiB, "");
    if (!r) return r;
    r = bld.Io("img.qcow2", {W(0, 4 * MiB)});
    if (!r) return r;
    r = bld.Img("snapshot -c small img.qcow2");
    if (!r) return r;
    r = bld.Img("resize img.qcow2 12M");
    if (!r) return r;
    r = bld.Io("img.qcow2", {W(3 * MiB, 2 * MiB), W(11 * MiB, 64 * KiB)});
    if (!r) return r;
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 65536;
    b->snapshots = {{"small", "small"}, {"1", "1"}};
    return AssertionSuccess();
  }});

  // ---- Preallocation.
  for (const char* mode : {"metadata", "falloc", "full"}) {
    cases.push_back({std::string("prealloc_") + mode,
                     [mode](Builder& bld, Built* b) -> AssertionResult {
      const uint64_t size = 16 * MiB, cs = 65536;
      auto r = bld.Create("img.qcow2", size, std::string("preallocation=") + mode);
      if (!r) return r;
      r = bld.Io("img.qcow2", StandardOps(cs, size));
      if (!r) return r;
      b->image = bld.Path("img.qcow2");
      b->cluster_size = cs;
      return AssertionSuccess();
    }});
  }
  cases.push_back({"prealloc_metadata_v2", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 16 * MiB, cs = 4096;
    auto r = bld.Create("img.qcow2", size,
                        "compat=0.10,cluster_size=4096,preallocation=metadata");
    if (!r) return r;
    r = bld.Io("img.qcow2", StandardOps(cs, size));
    if (!r) return r;
    b->image = bld.Path("img.qcow2");
    b->cluster_size = cs;
    return AssertionSuccess();
  }});

  // ---- A 16 TiB disk, read only where data was written (and around it).
  cases.push_back({"huge_16t", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 16 * TiB;
    auto r = bld.Create("img.qcow2", size, "");
    if (!r) return r;
    r = bld.Io("img.qcow2", {W(0, 4096), W(8 * TiB + 7, 100), W(16383 * GiB, 64 * KiB),
                             W(size - 4096, 4096)});
    if (!r) return r;
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 65536;
    return AssertionSuccess();
  }});

  // ---- Header variants.
  for (uint32_t hl : {104u, 112u, 128u, 256u}) {
    cases.push_back({"header_length_" + Num(hl), [hl](Builder& bld, Built* b) -> AssertionResult {
      const uint64_t size = 8 * MiB;
      auto r = bld.Create("base.qcow2", size, "");
      if (!r) return r;
      r = bld.Io("base.qcow2", {W(0, 2 * MiB)});
      if (!r) return r;
      r = bld.Create("img.qcow2", size, "", "base.qcow2", "qcow2");
      if (!r) return r;
      r = bld.Io("img.qcow2", {W(1 * MiB + 3, 100 * KiB)});
      if (!r) return r;
      Qcow2Header h;
      r = LoadQcow2Header(bld.Path("img.qcow2"), &h);
      if (!r) return r;
      if (h.header_length != 112) {
        return AssertionFailure() << "qemu-img 7.2+ should write header_length 112, got "
                                  << h.header_length;
      }
      h.header_length = hl;
      h.extra_fields.resize(hl - 104, '\0');  // compression type 0 = zlib
      r = StoreQcow2Header(bld.Path("img.qcow2"), h);
      if (!r) return r;
      b->image = bld.Path("img.qcow2");
      b->cluster_size = 65536;
      b->has_backing = true;
      b->backing_file = "base.qcow2";
      return AssertionSuccess();
    }});
  }
  cases.push_back({"unknown_header_extension", [](Builder& bld, Built* b) -> AssertionResult {
    const uint64_t size = 8 * MiB;
    auto r = bld.Create("base.qcow2", size, "");
    if (!r) return r;
    r = bld.Io("base.qcow2", {W(0, 2 * MiB)});
    if (!r) return r;
    r = bld.Create("img.qcow2", size, "", "base.qcow2", "qcow2");
    if (!r) return r;
    r = bld.Io("img.qcow2", {W(1 * MiB + 3, 100 * KiB)});
    if (!r) return r;
    Qcow2Header h;
    r = LoadQcow2Header(bld.Path("img.qcow2"), &h);
    if (!r) return r;
    h.extensions.insert(h.extensions.begin(),
                        {0x12345678, "an unknown extension, 37 bytes long!"});
    h.extensions.push_back({0x0badcafe, std::string(8, '\x7f')});
    r = StoreQcow2Header(bld.Path("img.qcow2"), h);
    if (!r) return r;
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 65536;
    b->has_backing = true;
    b->backing_file = "base.qcow2";
    return AssertionSuccess();
  }});
  cases.push_back({"feature_name_table", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("img.qcow2", 8 * MiB, "");
    if (!r) return r;
    r = bld.Io("img.qcow2", {W(5, 300 * KiB)});
    if (!r) return r;
    Qcow2Header h;
    r = LoadQcow2Header(bld.Path("img.qcow2"), &h);
    if (!r) return r;
    if (!h.FindExtension(hdr::kExtFeatureTable)) {
      return AssertionFailure() << "qemu-img wrote no feature name table";
    }
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 65536;
    return AssertionSuccess();
  }});
  cases.push_back({"bitmaps", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("img.qcow2", 16 * MiB, "");
    if (!r) return r;
    r = bld.Img("bitmap --add img.qcow2 b0");
    if (!r) return r;
    r = bld.Img("bitmap --add -g 128K --disable img.qcow2 b1");
    if (!r) return r;
    r = bld.Io("img.qcow2", StandardOps(65536, 16 * MiB));
    if (!r) return r;
    Qcow2Header h;
    r = LoadQcow2Header(bld.Path("img.qcow2"), &h);
    if (!r) return r;
    if (!h.FindExtension(hdr::kExtBitmaps) || (h.autoclear_features & 1) == 0) {
      return AssertionFailure() << "no bitmaps extension / autoclear bit";
    }
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 65536;
    return AssertionSuccess();
  }});
  cases.push_back({"lazy_refcounts", [](Builder& bld, Built* b) -> AssertionResult {
    auto r = bld.Create("img.qcow2", 16 * MiB, "lazy_refcounts=on,cluster_size=8192");
    if (!r) return r;
    r = bld.Io("img.qcow2", StandardOps(8192, 16 * MiB));
    if (!r) return r;
    b->image = bld.Path("img.qcow2");
    b->cluster_size = 8192;
    return AssertionSuccess();
  }});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Qemu, QemuReadMatrix, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           return param_info.param.name;
                         });

// ------------------------------------------------- Open-time behaviour

// A small v3 image with data, for the patching tests below.
AssertionResult MakeSimpleImage(const TempDir& dir, const std::string& name,
                                const std::string& opts = "") {
  Builder bld(dir);
  auto r = bld.Create(name, 8 * MiB, opts);
  if (!r) return r;
  return bld.Io(name, {W(0, 1 * MiB), W(3 * MiB + 1, 12345)});
}

TEST(QemuOpen, LuksEncryptionFailsNamingEncryption) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string img = dir.Join("enc.qcow2");
  // QEMU benchmarks PBKDF2 with thread CPU time and, on a busy machine,
  // sometimes gives up with "Unable to get accurate CPU usage": retry that.
  const std::string create = "create -q -f qcow2 --object secret,id=sec0,data=123456 "
                             "-o encrypt.format=luks,encrypt.key-secret=sec0,"
                             "encrypt.iter-time=10 " +
                             ShellQuote(img) + " 8M";
  std::string out;
  AssertionResult made = AssertionFailure();
  for (int attempt = 0; attempt < 5; ++attempt) {
    std::remove(img.c_str());
    made = QemuImg(create, &out);
    if (made || out.find("accurate CPU usage") == std::string::npos) break;
  }
  ASSERT_TRUE(made);
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  ASSERT_EQ(h.crypt_method, 2u) << "expected a LUKS-encrypted image";
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_FALSE(r.ok()) << "an encrypted image must not open";
  EXPECT_TRUE(ContainsNoCase(r.status().message(), "encrypt"))
      << "message should name encryption: " << Describe(r.status());
}

TEST(QemuOpen, AesEncryptionMethodFailsNamingEncryption) {
  TempDir dir;
  const std::string img = dir.Join("aes.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "aes.qcow2"));
  ASSERT_TRUE(PatchBE32(img, hdr::kCryptMethod, 1));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_FALSE(r.ok()) << "crypt_method=1 (AES) must not open";
  EXPECT_TRUE(ContainsNoCase(r.status().message(), "encrypt"))
      << "message should name encryption: " << Describe(r.status());
}

TEST(QemuOpen, CorruptBitOpensReadOnlyWithWarning) {
  TempDir dir;
  const std::string img = dir.Join("c.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "c.qcow2"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, hdr::kIncompatCorrupt));
  OpenOptions o;
  o.read_only = false;
  auto r = Image::Open(img, o);
  ASSERT_TRUE(r.ok()) << "a corrupt-flagged image should open read-only: "
                      << Describe(r.status());
  Image& image = *r.value();
  EXPECT_TRUE(image.read_only());
  const ImageInfo info = image.info();
  EXPECT_TRUE(info.corrupt);
  EXPECT_TRUE(info.read_only);
  ASSERT_FALSE(info.warnings.empty()) << "expected a warning about the corrupt bit";
  bool named = false;
  for (const auto& w : info.warnings) named = named || ContainsNoCase(w, "corrupt");
  EXPECT_TRUE(named) << "warning should say 'corrupt': " << info.warnings[0];
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(image.Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
  std::string data(4096, 'x');
  Status ws = image.Write(0, AsBytes(data));
  EXPECT_FALSE(ws.ok()) << "write to a corrupt image must fail";
  EXPECT_EQ(ws.code(), ErrorCode::kReadOnly) << Describe(ws);
}

TEST(QemuOpen, DirtyBitOpensReadOnlyWithMessage) {
  TempDir dir;
  const std::string img = dir.Join("d.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "d.qcow2", "lazy_refcounts=on"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, hdr::kIncompatDirty));
  OpenOptions o;
  o.read_only = false;
  auto r = Image::Open(img, o);
  ASSERT_TRUE(r.ok()) << "a dirty image should open read-only: " << Describe(r.status());
  Image& image = *r.value();
  EXPECT_TRUE(image.read_only());
  const ImageInfo info = image.info();
  EXPECT_TRUE(info.dirty);
  EXPECT_TRUE(info.lazy_refcounts);
  ASSERT_FALSE(info.warnings.empty()) << "expected a message about the dirty bit";
  bool named = false;
  for (const auto& w : info.warnings) named = named || ContainsNoCase(w, "dirty");
  EXPECT_TRUE(named) << "warning should say 'dirty': " << info.warnings[0];
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(image.Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
}

TEST(QemuOpen, UnknownIncompatibleFeatureFailsNamingTheBit) {
  for (int bit : {5, 13, 40, 63}) {
    SCOPED_TRACE("bit " + Num(bit));
    TempDir dir;
    const std::string img = dir.Join("u.qcow2");
    ASSERT_TRUE(MakeSimpleImage(dir, "u.qcow2"));
    ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, uint64_t{1} << bit));
    auto r = Image::Open(img, OpenOptions{});
    ASSERT_FALSE(r.ok()) << "unknown incompatible feature bit " << bit << " must fail";
    const std::string& m = r.status().message();
    char hex[32];
    std::snprintf(hex, sizeof hex, "%llx",
                  static_cast<unsigned long long>(uint64_t{1} << bit));
    EXPECT_TRUE(m.find(Num(bit)) != std::string::npos ||
                ContainsNoCase(m, hex))
        << "message should name bit " << bit << ": " << Describe(r.status());
  }
}

TEST(QemuOpen, UnknownCompatibleAndAutoclearBitsAreIgnored) {
  TempDir dir;
  const std::string img = dir.Join("c.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "c.qcow2"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kCompatibleFeatures, uint64_t{1} << 17));
  ASSERT_TRUE(PatchBE64(img, hdr::kAutoclearFeatures, uint64_t{1} << 9));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(r.value()->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
}

TEST(QemuOpen, MissingSnapshotIsNotFound) {
  TempDir dir;
  const std::string img = dir.Join("s.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "s.qcow2"));
  ASSERT_TRUE(QemuImg("snapshot -c real " + ShellQuote(img)));
  OpenOptions o;
  o.snapshot = "nonexistent";
  auto r = Image::Open(img, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound) << Describe(r.status());
  EXPECT_TRUE(r.status().message().find("nonexistent") != std::string::npos)
      << Describe(r.status());
}

TEST(QemuOpen, MissingBackingFileFailsNamingIt) {
  TempDir dir;
  Builder bld(dir);
  ASSERT_TRUE(bld.Create("base.qcow2", 8 * MiB, ""));
  ASSERT_TRUE(bld.Create("top.qcow2", 8 * MiB, "", "base.qcow2", "qcow2"));
  ASSERT_EQ(std::remove(dir.Join("base.qcow2").c_str()), 0);
  auto r = Image::Open(dir.Join("top.qcow2"), OpenOptions{});
  ASSERT_FALSE(r.ok()) << "opening with a missing backing file must fail";
  EXPECT_TRUE(r.status().message().find("base.qcow2") != std::string::npos)
      << Describe(r.status());
}

TEST(QemuOpen, RawImageIsProbedAndReadsIdentically) {
  TempDir dir;
  const std::string path = dir.Join("disk.raw");
  const std::string data = RandomBytes(3 * MiB + 512, 4242);
  ASSERT_TRUE(WriteWholeFile(path, data));
  auto r = Image::Open(path, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_EQ(r.value()->info().format, "raw");
  ASSERT_EQ(r.value()->size(), data.size());
  std::string got(data.size(), '\0');
  ASSERT_TRUE(r.value()->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(data, got, 0));
}

TEST(QemuOpen, ReadPastEndIsRejected) {
  TempDir dir;
  const std::string img = dir.Join("e.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "e.qcow2"));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  std::string buf(4096, '\0');
  Status s = r.value()->Read(8 * MiB - 100, AsWritableBytes(buf));
  EXPECT_FALSE(s.ok()) << "a read crossing the end of the disk must fail";
  if (!s.ok()) {
    EXPECT_TRUE(s.code() == ErrorCode::kOutOfRange ||
                s.code() == ErrorCode::kInvalidArgument)
        << Describe(s);
  }
}

}  // namespace
}  // namespace qcow2fs::test
