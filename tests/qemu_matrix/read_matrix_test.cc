// The read oracle: images made by QEMU's own tools at test time, read through
// qcow2fs, must be byte-identical to what `qemu-img convert -O raw` (or
// `qemu-img dd` for huge sparse disks) reads from them.
//
// Each parameter is a recipe (recipes.cc): it builds one image (and its
// backing chain, data file, snapshots...) in a temporary directory with
// qemu-img/qemu-io and records which guest ranges it touched. The checker
// (harness.cc) then compares:
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
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"
#include "qemu_matrix/harness.h"
#include "qemu_matrix/recipes.h"
#include "test_support.h"

namespace qcow2fs::test::matrix {
namespace {

class QemuReadMatrix : public ::testing::TestWithParam<Case> {};

TEST_P(QemuReadMatrix, MatchesQemu) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  const Case& c = GetParam();
  TempDir dir;
  Builder builder(dir);
  Built b;
  c.recipe(builder, &b);
  ASSERT_TRUE(builder.result()) << "building the image failed";
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
    // The regions CheckRangesWithImage reads, chosen here so the references
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
      ASSERT_TRUE(QemuReadRange(b.qemu_image, regions[i].offset, regions[i].length, &region_refs[i],
                                scratch.path()));
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

INSTANTIATE_TEST_SUITE_P(Qemu, QemuReadMatrix, ::testing::ValuesIn(AllCases()),
                         [](const ::testing::TestParamInfo<Case>& param_info) {
                           return param_info.param.name;
                         });

}  // namespace
}  // namespace qcow2fs::test::matrix
