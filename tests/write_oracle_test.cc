// The write oracle: random writes, zero-writes, discards and resizes through
// the core, mirrored into a shadow raw file; afterwards `qemu-img check`
// must find the image clean and `qemu-img compare` identical to the shadow.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

struct WriteCase {
  std::string name;
  // Creates `image` (and whatever it needs) in `dir`.
  std::function<::testing::AssertionResult(const TempDir& dir, const std::string& image)> make;
  uint64_t cluster_size = 65536;
  bool v2_with_backing = false;  // discard falls back to backing data
};

::testing::AssertionResult Create(const std::string& image, const std::string& opts,
                                  const std::string& size = "24M") {
  return QemuImg("create -q -f qcow2 -o " + opts + " " + ShellQuote(image) + " " + size);
}

// Writes a few patterns with qemu-io so the image has prior content.
::testing::AssertionResult Populate(const std::string& image) {
  return QemuIo(image, {"write -P 0x11 0 300k", "write -P 0x22 5M 1M", "write -z 8M 256k",
                        "write -P 0x33 20M 65k"});
}

std::vector<WriteCase> Cases() {
  std::vector<WriteCase> c;
  auto simple = [&](std::string name, std::string opts, uint64_t cs) {
    c.push_back({name,
                 [opts](const TempDir&, const std::string& img) {
                   auto r = Create(img, opts);
                   return r ? Populate(img) : r;
                 },
                 cs});
  };
  simple("v3_64k", "cluster_size=64k", 65536);
  simple("v2_64k", "compat=0.10,cluster_size=64k", 65536);
  simple("v3_512", "cluster_size=512", 512);
  simple("v3_4k_refcount1", "cluster_size=4k,refcount_bits=1", 4096);
  simple("v3_4k_refcount2", "cluster_size=4k,refcount_bits=2", 4096);
  simple("v3_4k_refcount4", "cluster_size=4k,refcount_bits=4", 4096);
  simple("v3_1k_refcount8", "cluster_size=1k,refcount_bits=8", 1024);
  simple("v3_4k_refcount32", "cluster_size=4k,refcount_bits=32", 4096);
  simple("v3_512_refcount64", "cluster_size=512,refcount_bits=64", 512);
  simple("v3_2m", "cluster_size=2M", 2 << 20);
  simple("extended_l2_64k", "cluster_size=64k,extended_l2=on", 65536);
  simple("extended_l2_32k", "cluster_size=32k,extended_l2=on", 32768);
  simple("prealloc_metadata", "cluster_size=64k,preallocation=metadata", 65536);
  simple("prealloc_falloc", "cluster_size=64k,preallocation=falloc", 65536);

  auto with_backing = [&](std::string name, std::string base_opts, std::string opts, uint64_t cs,
                          bool v2) {
    c.push_back({name,
                 [base_opts, opts](const TempDir& d, const std::string& img) {
                   const std::string base = d.Join("base.qcow2");
                   auto r = Create(base, base_opts, "20M");  // shorter than the top
                   if (!r) return r;
                   r = QemuIo(base, {"write -P 0x44 0 20M"});
                   if (!r) return r;
                   r = QemuImg("create -q -f qcow2 -b base.qcow2 -F qcow2 -o " + opts + " " +
                               ShellQuote(img) + " 24M");
                   return r ? QemuIo(img, {"write -P 0x55 1M 100k"}) : r;
                 },
                 cs, v2});
  };
  with_backing("backing_v3", "cluster_size=64k", "cluster_size=64k", 65536, false);
  with_backing("backing_v2", "compat=0.10", "compat=0.10,cluster_size=4k", 4096, true);
  with_backing("backing_extended_l2", "cluster_size=64k", "cluster_size=64k,extended_l2=on", 65536,
               false);

  c.push_back({"raw_backing",
               [](const TempDir& d, const std::string& img) {
                 const std::string base = d.Join("base.raw");
                 auto r = WriteWholeFile(base, RandomBytes(12 << 20, 7));
                 if (!r) return r;
                 return QemuImg("create -q -f qcow2 -b base.raw -F raw " + ShellQuote(img) +
                                " 24M");
               },
               65536});

  for (std::string type : {"zlib", "zstd"}) {
    c.push_back({"compressed_" + type,
                 [type](const TempDir& d, const std::string& img) {
                   const std::string raw = d.Join("src.raw");
                   auto r = WriteWholeFile(raw, SemiCompressible(24 << 20, 3));
                   if (!r) return r;
                   return QemuImg("convert -q -c -O qcow2 -o cluster_size=4k,compression_type=" +
                                  type + " " + ShellQuote(raw) + " " + ShellQuote(img));
                 },
                 4096});
  }

  c.push_back({"snapshot",
               [](const TempDir&, const std::string& img) {
                 auto r = Create(img, "cluster_size=16k");
                 if (!r) return r;
                 r = Populate(img);
                 if (!r) return r;
                 r = QemuImg("snapshot -c s1 " + ShellQuote(img));
                 return r ? QemuIo(img, {"write -P 0x66 6M 64k"}) : r;
               },
               16384});

  c.push_back({"data_file",
               [](const TempDir& d, const std::string& img) {
                 auto r = Create(img, "data_file=" + d.Join("img.data"));
                 return r ? Populate(img) : r;
               },
               65536});
  c.push_back({"data_file_raw",
               [](const TempDir& d, const std::string& img) {
                 auto r = Create(img, "data_file=" + d.Join("img.data") + ",data_file_raw=on");
                 return r ? Populate(img) : r;
               },
               65536});
  return c;
}

class WriteOracleTest : public ::testing::TestWithParam<WriteCase> {};

// Applies a seeded random mix of operations to `image` and `shadow`.
void RunOperations(Image& image, std::string& shadow, const std::string& backing_view,
                   const WriteCase& wc, uint64_t seed, int ops) {
  Rng rng(seed);
  const uint64_t size = image.size();
  const uint64_t cs = wc.cluster_size;
  for (int i = 0; i < ops; i++) {
    const uint64_t kind = rng.Uniform(0, 99);
    uint64_t off = rng.Uniform(0, size - 1);
    uint64_t len;
    if (kind < 10) {  // large, possibly aligned
      off = off / cs * cs;
      len = std::min<uint64_t>(size - off, rng.Uniform(1, 4) * std::max<uint64_t>(cs, 256 << 10));
    } else {
      len = std::min<uint64_t>(size - off, rng.Uniform(1, 3 * cs));
    }
    if (kind < 70) {
      std::string data = RandomBytes(len, seed * 1000 + static_cast<uint64_t>(i));
      Status s = image.Write(off, AsBytes(data));
      ASSERT_TRUE(s.ok()) << "write " << off << "+" << len << ": " << Describe(s);
      shadow.replace(off, len, data);
    } else if (kind < 82) {
      Status s = image.WriteZeroes(off, len, rng.Uniform(0, 1));
      ASSERT_TRUE(s.ok()) << "zero " << off << "+" << len << ": " << Describe(s);
      shadow.replace(off, len, std::string(len, '\0'));
    } else if (kind < 92) {
      Status s = image.Discard(off, len);
      ASSERT_TRUE(s.ok()) << "discard " << off << "+" << len << ": " << Describe(s);
      // Whole clusters of a v2 image with a backing file show the backing
      // data again; everything else reads as zeros.
      for (uint64_t p = off; p < off + len; p++) shadow[p] = 0;
      if (wc.v2_with_backing) {
        uint64_t first = (off + cs - 1) / cs * cs;
        uint64_t last = (off + len) / cs * cs;
        if (off + len == size) last = (size + cs - 1) / cs * cs;
        for (uint64_t p = first; p < std::min(last, size); p++) shadow[p] = backing_view[p];
      }
    } else if (kind < 96) {
      Status s = image.Flush();
      ASSERT_TRUE(s.ok()) << Describe(s);
    } else {
      std::string got(len, '\0');
      Status s = image.Read(off, AsWritableBytes(got));
      ASSERT_TRUE(s.ok()) << Describe(s);
      ASSERT_TRUE(BuffersEqual(shadow.substr(off, len), got, off, "read-back"));
    }
  }
}

TEST_P(WriteOracleTest, RandomOperationsMatchShadowAndCheckClean) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const WriteCase& wc = GetParam();
  TempDir dir;
  const std::string image_path = dir.Join("img.qcow2");
  ASSERT_TRUE(wc.make(dir, image_path));
  const std::string shadow_path = dir.Join("shadow.raw");
  ASSERT_TRUE(QemuConvertToRaw(image_path, shadow_path));
  std::string shadow;
  ASSERT_TRUE(ReadWholeFile(shadow_path, &shadow));
  std::string snapshot_before;
  if (wc.name == "snapshot") {
    ASSERT_TRUE(QemuConvertToRaw(image_path, dir.Join("snap.raw"), "-l snapshot.name=s1"));
    ASSERT_TRUE(ReadWholeFile(dir.Join("snap.raw"), &snapshot_before));
  }
  // What whole-cluster discards of a v2 image fall back to.
  std::string backing_view;
  if (wc.v2_with_backing) {
    ASSERT_TRUE(QemuConvertToRaw(dir.Join("base.qcow2"), dir.Join("base.raw")));
    ASSERT_TRUE(ReadWholeFile(dir.Join("base.raw"), &backing_view));
    backing_view.resize(shadow.size(), '\0');
  }

  OpenOptions options;
  options.read_only = false;
  options.l2_cache_bytes = 4 * wc.cluster_size;  // force evictions and write-back
  {
    auto image = Image::Open(image_path, options);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    RunOperations(**image, shadow, backing_view, wc, 42, 150);
    // Grow to an unaligned size that needs a bigger L1 table at small
    // cluster sizes, then keep going over the new range.
    uint64_t grown = shadow.size() + (5 << 20) + 12345;
    Status s = (*image)->Resize(grown);
    ASSERT_TRUE(s.ok()) << Describe(s);
    ASSERT_EQ((*image)->size(), (grown + 511) / 512 * 512) << "size is rounded to sectors";
    grown = (*image)->size();
    shadow.resize(grown, '\0');
    backing_view.resize(grown, '\0');
    RunOperations(**image, shadow, backing_view, wc, 43, 150);
    ASSERT_TRUE((*image)->Flush().ok());
    // Reopened state must match too, so close and check from disk.
  }
  ASSERT_TRUE(WriteWholeFile(shadow_path, shadow));
  std::string out;
  EXPECT_TRUE(QemuImg("check " + ShellQuote(image_path), &out)) << out;
  EXPECT_TRUE(QemuImg("compare -q -f qcow2 -F raw " + ShellQuote(image_path) + " " +
                      ShellQuote(shadow_path)));
  if (wc.name == "snapshot") {
    std::string snapshot_after;
    ASSERT_TRUE(QemuConvertToRaw(image_path, dir.Join("snap2.raw"), "-l snapshot.name=s1"));
    ASSERT_TRUE(ReadWholeFile(dir.Join("snap2.raw"), &snapshot_after));
    // convert -l reads the snapshot at the current disk size: compare the
    // snapshot's own size.
    ASSERT_GE(snapshot_after.size(), snapshot_before.size());
    snapshot_after.resize(snapshot_before.size());
    EXPECT_TRUE(BuffersEqual(snapshot_before, snapshot_after, 0, "snapshot s1"));
  }
}

INSTANTIATE_TEST_SUITE_P(Images, WriteOracleTest, ::testing::ValuesIn(Cases()),
                         [](const auto& param_info) { return param_info.param.name; });

}  // namespace
}  // namespace qcow2fs::test
