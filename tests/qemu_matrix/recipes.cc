// The read matrix's recipes: each builds one image (and its backing chain,
// data file, snapshots...) with qemu-img and qemu-io, and says what the
// checker should expect of it.
#include "qemu_matrix/recipes.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>

namespace qcow2fs::test::matrix {
namespace {

std::string CsName(uint64_t cs) {
  if (cs >= MiB) return Num(cs / MiB) + "M";
  if (cs >= KiB) return Num(cs / KiB) + "K";
  return Num(cs);
}

// Plain image of one version and cluster size; small enough to read whole.
Case PlainCase(int version, uint64_t cs) {
  return {"v" + Num(version) + "_cs" + CsName(cs), [=](Builder& bld, Built* b) {
            const uint64_t size = std::max(16 * MiB, 20 * cs);
            const std::string opts = std::string("compat=") + (version == 2 ? "0.10" : "1.1") +
                                     ",cluster_size=" + Num(cs);
            bld.Create("img.qcow2", size, opts);
            bld.Io("img.qcow2", StandardOps(cs, size));
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = version;
          }};
}

// A disk spanning at least two L2 tables; compared by regions when large.
Case L2SpanCase(int version, uint64_t cs) {
  return {"l2span_v" + Num(version) + "_cs" + CsName(cs), [=](Builder& bld, Built* b) {
            const uint64_t cov = L2Coverage(cs, false);
            const uint64_t size = 2 * cov + 8 * cs;
            const std::string opts = std::string("compat=") + (version == 2 ? "0.10" : "1.1") +
                                     ",cluster_size=" + Num(cs);
            bld.Create("img.qcow2", size, opts);
            std::vector<Op> ops = StandardOps(cs, size);
            ops.push_back(W(cov - 512, 1024));       // straddles tiny
            ops.push_back(W(2 * cov + cs + 3, cs));  // in the third table
            bld.Io("img.qcow2", ops);
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = version;
          }};
}

Case RefcountCase(int bits) {
  return {"refcount_bits_" + Num(bits), [=](Builder& bld, Built* b) {
            const uint64_t cs = 4096, size = 16 * MiB;
            bld.Create("img.qcow2", size, "cluster_size=4096,refcount_bits=" + Num(bits));
            bld.Io("img.qcow2", StandardOps(cs, size));
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->version = 3;
          }};
}

// Extended L2 entries over a backing file: subcluster writes, zeroed and
// discarded subclusters, unallocated subclusters reading from the backing.
Case ExtendedL2Case(uint64_t cs) {
  return {"extended_l2_cs" + CsName(cs), [=](Builder& bld, Built* b) {
            const uint64_t sc = cs / 32;
            const uint64_t size = std::max(16 * MiB, 12 * cs);
            bld.Create("base.qcow2", size, "cluster_size=65536");
            bld.Io("base.qcow2", {W(0, std::min(size, 10 * cs)), W(size - 2 * cs, 2 * cs)});
            bld.Create("img.qcow2", size, "cluster_size=" + Num(cs) + ",extended_l2=on",
                       "base.qcow2", "qcow2");
            std::vector<Op> ops = {
                W(cs + 3 * sc, sc),          // one subcluster
                W(2 * cs + 4096, 4096),      // 4K into a cluster
                W(3 * cs - 2 * sc, 5 * sc),  // across a cluster boundary
                Z(cs + 5 * sc, 2 * sc),      // zero subclusters (allocated)
                Z(5 * cs + sc, 2 * sc),      // zero subclusters (unallocated)
                W(4 * cs, 3 * sc),
                D(4 * cs + sc, sc),       // discard one subcluster
                W(6 * cs + sc + 100, 7),  // tiny unaligned
                Z(7 * cs, cs),            // whole cluster over backing
                W(8 * cs, cs),
                Z(8 * cs + 10 * sc + 3, sc),  // unaligned zero
                ZU(8 * cs + 20 * sc, 4 * sc),
                W(9 * cs + 31 * sc, sc),   // last subcluster
                W(size - 2 * sc, 2 * sc),  // end of disk
            };
            bld.Io("img.qcow2", ops);
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->extended_l2 = true;
            b->has_backing = true;
            b->backing_file = "base.qcow2";
          }};
}

// Extended L2 with no backing and an L2 boundary inside a small disk.
Case ExtendedL2NoBackingCase(uint64_t cs) {
  return {"extended_l2_nobacking_cs" + CsName(cs), [=](Builder& bld, Built* b) {
            const uint64_t sc = cs / 32;
            const uint64_t size = 2 * L2Coverage(cs, true) + 4 * cs;
            bld.Create("img.qcow2", size, "cluster_size=" + Num(cs) + ",extended_l2=on");
            std::vector<Op> ops = StandardOps(cs, size, true);
            ops.push_back(W(20 * cs + 3 * sc, sc));
            ops.push_back(Z(20 * cs + 4 * sc, sc));
            ops.push_back(W(20 * cs + 9 * sc + 11, 2 * sc));
            bld.Io("img.qcow2", ops);
            b->image = bld.Path("img.qcow2");
            b->cluster_size = cs;
            b->extended_l2 = true;
          }};
}

// qemu-img convert -c from semi-compressible data.
Case CompressedCase(const std::string& type, uint64_t cs, int version, bool modify) {
  return {
      "compressed_" + type + "_v" + Num(version) + "_cs" + CsName(cs) + (modify ? "_modified" : ""),
      [=](Builder& bld, Built* b) {
        const uint64_t size = std::max(4 * MiB, 6 * cs);
        bld.WriteFile("src.raw", SemiCompressible(size, cs + version));
        std::string opts = "cluster_size=" + Num(cs);
        opts += version == 2 ? ",compat=0.10" : ",compat=1.1";
        if (version == 3) opts += ",compression_type=" + type;
        bld.Img("convert -c -f raw -O qcow2 -o " + opts + " src.raw img.qcow2");
        std::remove(bld.Path("src.raw").c_str());
        std::string check;
        bld.Run("qemu-img check " + ShellQuote(bld.Path("img.qcow2")), &check);
        bld.Check([&]() -> AssertionResult {
          // "... = 100.00% allocated, 0.00% fragmented, 87.50% compressed clusters"
          const size_t at = check.find("% compressed clusters");
          size_t num = at;
          while (
              num != std::string::npos && num > 0 &&
              (std::isdigit(static_cast<unsigned char>(check[num - 1])) || check[num - 1] == '.')) {
            --num;
          }
          if (at == std::string::npos || std::strtod(check.c_str() + num, nullptr) <= 0.0) {
            return AssertionFailure() << "image has no compressed clusters:\n" << check;
          }
          return AssertionSuccess();
        });
        bld.touched.push_back({0, size});
        if (modify) {
          // QEMU writes compressed clusters only where nothing is
          // allocated: grow the disk and compress into the new part.
          bld.Img("resize img.qcow2 " + Num(size + 4 * cs));
          bld.Io("img.qcow2", {
                                  W(cs + 100, 200),  // partial overwrite
                                  Z(2 * cs, cs),     // zero a compressed cluster
                                  D(5 * cs, cs),     // discard one
                                  W(6 * cs - 10, 20),
                                  C(size, cs),  // compressed writes
                                  C(size + cs, 2 * cs),
                                  W(size + 3 * cs + 1, 5),
                              });
        }
        b->image = bld.Path("img.qcow2");
        b->cluster_size = cs;
        b->version = version;
        b->expect_compressed_data = true;
      }};
}

}  // namespace

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
  cases.push_back({"backing_chain3", [](Builder& bld, Built* b) {
                     const uint64_t size = 16 * MiB;
                     bld.Create("base.qcow2", size, "cluster_size=4096");
                     bld.Io("base.qcow2", {W(0, 8 * MiB), W(12 * MiB, 4 * MiB)});
                     bld.Create("mid.qcow2", size, "cluster_size=65536", "base.qcow2", "qcow2");
                     bld.Io("mid.qcow2", {W(64 * KiB, 200 * KiB), Z(1 * MiB, 256 * KiB),
                                          W(3 * MiB + 5, 100), D(4 * MiB, 64 * KiB),
                                          Z(9 * MiB, 128 * KiB), W(13 * MiB - 1000, 3000)});
                     bld.Create("top.qcow2", size, "cluster_size=16384", "mid.qcow2", "qcow2");
                     bld.Io("top.qcow2", {W(100 * KiB, 20 * KiB), W(1 * MiB + 100 * KiB, 10),
                                          Z(6 * MiB, 64 * KiB), W(8 * MiB - 8 * KiB, 16 * KiB),
                                          W(16 * MiB - 16 * KiB, 16 * KiB)});
                     b->image = bld.Path("top.qcow2");
                     b->cluster_size = 16384;
                     b->has_backing = true;
                     b->backing_file = "mid.qcow2";
                   }});
  cases.push_back(
      {"backing_chain3_v2", [](Builder& bld, Built* b) {
         const uint64_t size = 8 * MiB;
         bld.Create("base.qcow2", size, "compat=0.10,cluster_size=512");
         bld.Io("base.qcow2", {W(0, 4 * MiB)});
         bld.Create("mid.qcow2", size, "compat=0.10", "base.qcow2", "qcow2");
         bld.Io("mid.qcow2", {W(64 * KiB, 100 * KiB), Z(1 * MiB, 128 * KiB)});
         bld.Create("top.qcow2", size, "compat=0.10,cluster_size=2048", "mid.qcow2", "qcow2");
         bld.Io("top.qcow2", {W(70 * KiB, 3000), Z(1 * MiB + 4096, 4096), W(5 * MiB, 8192)});
         b->image = bld.Path("top.qcow2");
         b->cluster_size = 2048;
         b->has_backing = true;
         b->version = 2;
       }});
  cases.push_back({"backing_raw", [](Builder& bld, Built* b) {
                     const uint64_t size = 16 * MiB;
                     std::string base = RandomBytes(size, 77);
                     std::fill(base.begin() + 2 * MiB, base.begin() + 3 * MiB, '\0');
                     bld.WriteFile("base.raw", base);
                     bld.Create("top.qcow2", size, "", "base.raw", "raw");
                     bld.Io("top.qcow2", {W(100, 1000), Z(1 * MiB, 64 * KiB), D(2 * MiB, 64 * KiB),
                                          W(5 * MiB + 3, 70 * KiB), ZU(7 * MiB, 128 * KiB)});
                     b->image = bld.Path("top.qcow2");
                     b->cluster_size = 65536;
                     b->has_backing = true;
                     b->backing_file = "base.raw";
                   }});
  cases.push_back({"backing_relative_other_cwd", [](Builder& bld, Built* b) {
                     // dir/a/top.qcow2 -> "../b/mid.qcow2" -> "base.qcow2" (dir/b/base.qcow2):
                     // each name resolves against its own image's directory.
                     bld.Run("mkdir -p " + ShellQuote(bld.Path("a")) + " " +
                             ShellQuote(bld.Path("b")) + " " + ShellQuote(bld.Path("elsewhere")));
                     const uint64_t size = 8 * MiB;
                     bld.Create("b/base.qcow2", size, "");
                     bld.Io("b/base.qcow2", {W(0, 4 * MiB)});
                     // qemu-img resolves -b relative to the new image's directory.
                     bld.Create("b/mid.qcow2", size, "", "base.qcow2", "qcow2");
                     bld.Io("b/mid.qcow2", {W(1 * MiB, 64 * KiB)});
                     bld.Create("a/top.qcow2", size, "", "../b/mid.qcow2", "qcow2");
                     bld.Io("a/top.qcow2", {W(2 * MiB + 7, 9000)});
                     b->image = "../a/top.qcow2";
                     b->open_cwd = bld.Path("elsewhere");
                     b->qemu_image = bld.Path("a/top.qcow2");
                     b->cluster_size = 65536;
                     b->has_backing = true;
                     b->backing_file = "../b/mid.qcow2";
                   }});
  cases.push_back({"backing_shorter_than_image", [](Builder& bld, Built* b) {
                     bld.Create("small.qcow2", 1 * MiB, "");
                     bld.Io("small.qcow2", {W(0, 1 * MiB)});
                     bld.Create("big.qcow2", 16 * MiB, "", "small.qcow2", "qcow2");
                     bld.Io("big.qcow2", {W(512 * KiB + 3, 1 * MiB), W(10 * MiB, 100)});
                     bld.touched.push_back({1 * MiB - 64 * KiB, 128 * KiB});
                     b->image = bld.Path("big.qcow2");
                     b->cluster_size = 65536;
                     b->has_backing = true;
                   }});
  cases.push_back({"backing_shorter_2g", [](Builder& bld, Built* b) {
                     bld.Create("small.qcow2", 1 * MiB, "");
                     bld.Io("small.qcow2", {W(0, 1 * MiB)});
                     bld.Create("big.qcow2", 2 * GiB, "", "small.qcow2", "qcow2");
                     bld.Io("big.qcow2", {W(512 * KiB + 3, 100 * KiB), W(1 * GiB, 100)});
                     bld.touched.push_back({0, 4 * MiB});
                     b->image = bld.Path("big.qcow2");
                     b->cluster_size = 65536;
                     b->has_backing = true;
                   }});
  cases.push_back({"backing_raw_unaligned_short", [](Builder& bld, Built* b) {
                     // A raw backing file whose length is not a multiple of 512 or of the
                     // cluster size: the tail past its end reads as zeros.
                     bld.WriteFile("base.raw", RandomBytes(1000001, 5));
                     bld.Create("top.qcow2", 4 * MiB, "cluster_size=4096", "base.raw", "raw");
                     bld.Io("top.qcow2", {W(4096, 4096)});
                     bld.touched.push_back({1000001 - 5000, 10000});
                     b->image = bld.Path("top.qcow2");
                     b->cluster_size = 4096;
                     b->has_backing = true;
                   }});
  for (const std::string fmt : {"qcow2", "raw"}) {
    cases.push_back({"backing_no_format_extension_" + fmt, [fmt](Builder& bld, Built* b) {
                       const uint64_t size = 8 * MiB;
                       const std::string base = "base." + fmt;
                       if (fmt == "raw") {
                         bld.WriteFile(base, RandomBytes(size, 99));
                       } else {
                         bld.Create(base, size, "");
                         bld.Io(base, {W(0, size)});
                       }
                       bld.Create("top.qcow2", size, "", base, fmt);
                       bld.Io("top.qcow2", {W(1 * MiB, 64 * KiB + 1)});
                       Qcow2Header h;
                       bld.Check([&] { return LoadQcow2Header(bld.Path("top.qcow2"), &h); });
                       bld.Check([&]() -> AssertionResult {
                         if (!h.FindExtension(hdr::kExtBackingFormat)) {
                           return AssertionFailure()
                                  << "qemu-img wrote no backing format extension";
                         }
                         h.RemoveExtension(hdr::kExtBackingFormat);
                         return StoreQcow2Header(bld.Path("top.qcow2"), h);
                       });
                       bld.Check([&] { return LoadQcow2Header(bld.Path("top.qcow2"), &h); });
                       bld.Check([&]() -> AssertionResult {
                         if (h.FindExtension(hdr::kExtBackingFormat) || h.backing_file != base) {
                           return AssertionFailure() << "header rewrite failed";
                         }
                         return AssertionSuccess();
                       });
                       b->image = bld.Path("top.qcow2");
                       b->cluster_size = 65536;
                       b->has_backing = true;
                       b->backing_file = base;
                     }});
  }

  // ---- External data files.
  for (bool raw : {false, true}) {
    cases.push_back({std::string("data_file") + (raw ? "_raw" : ""), [raw](Builder& bld, Built* b) {
                       const uint64_t size = 16 * MiB, cs = 65536;
                       std::string opts = "data_file=img.data";
                       if (raw) opts += ",data_file_raw=on";
                       bld.Create("img.qcow2", size, opts);
                       std::vector<Op> ops = StandardOps(cs, size);
                       if (raw) {
                         // data_file_raw forbids unmapping; discards and zero-unmap are
                         // still legal requests but keep the op list uncontroversial.
                         ops.erase(
                             std::remove_if(ops.begin(), ops.end(),
                                            [](const Op& o) { return o.kind == Op::kDiscard; }),
                             ops.end());
                       }
                       bld.Io("img.qcow2", ops);
                       b->image = bld.Path("img.qcow2");
                       b->cluster_size = cs;
                     }});
  }

  // ---- Internal snapshots.
  for (int version : {2, 3}) {
    for (uint64_t cs : {512 * uint64_t{1}, 64 * KiB}) {
      cases.push_back({"snapshots_v" + Num(version) + "_cs" + CsName(cs),
                       [version, cs](Builder& bld, Built* b) {
                         const uint64_t size = 8 * MiB;
                         const std::string img = "img.qcow2";
                         bld.Create(img, size,
                                    std::string("compat=") + (version == 2 ? "0.10" : "1.1") +
                                        ",cluster_size=" + Num(cs));
                         bld.Io(img, {W(0, 1 * MiB), W(4 * MiB + 3, 5 * cs)});
                         bld.Img("snapshot -c s0 " + img);
                         bld.Img("snapshot -c s1 " + img);
                         bld.Io(img, {W(cs, 3 * cs + 1), Z(512 * KiB, 4 * cs), D(4 * MiB, 2 * cs),
                                      W(6 * MiB, 100)});
                         bld.Img("snapshot -c s2 " + img);
                         bld.Io(img, {W(2 * cs + 7, cs), W(7 * MiB, 64 * KiB)});
                         bld.Img("snapshot -d s0 " + img);  // a deleted snapshot
                         b->image = bld.Path(img);
                         b->cluster_size = cs;
                         b->version = version;
                         // s0 (ID 1) is deleted; s1 is ID 2, s2 is ID 3.
                         b->snapshots = {{"s1", "s1"}, {"s2", "s2"}, {"3", "3"}};
                       }});
    }
  }
  cases.push_back({"snapshot_then_resize", [](Builder& bld, Built* b) {
                     bld.Create("img.qcow2", 4 * MiB, "");
                     bld.Io("img.qcow2", {W(0, 4 * MiB)});
                     bld.Img("snapshot -c small img.qcow2");
                     bld.Img("resize img.qcow2 12M");
                     bld.Io("img.qcow2", {W(3 * MiB, 2 * MiB), W(11 * MiB, 64 * KiB)});
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 65536;
                     b->snapshots = {{"small", "small"}, {"1", "1"}};
                   }});

  // ---- Preallocation.
  for (const char* mode : {"metadata", "falloc", "full"}) {
    cases.push_back({std::string("prealloc_") + mode, [mode](Builder& bld, Built* b) {
                       const uint64_t size = 16 * MiB, cs = 65536;
                       bld.Create("img.qcow2", size, std::string("preallocation=") + mode);
                       bld.Io("img.qcow2", StandardOps(cs, size));
                       b->image = bld.Path("img.qcow2");
                       b->cluster_size = cs;
                     }});
  }
  cases.push_back({"prealloc_metadata_v2", [](Builder& bld, Built* b) {
                     const uint64_t size = 16 * MiB, cs = 4096;
                     bld.Create("img.qcow2", size,
                                "compat=0.10,cluster_size=4096,preallocation=metadata");
                     bld.Io("img.qcow2", StandardOps(cs, size));
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = cs;
                   }});

  // ---- A 16 TiB disk, read only where data was written (and around it).
  cases.push_back({"huge_16t", [](Builder& bld, Built* b) {
                     const uint64_t size = 16 * TiB;
                     bld.Create("img.qcow2", size, "");
                     bld.Io("img.qcow2", {W(0, 4096), W(8 * TiB + 7, 100), W(16383 * GiB, 64 * KiB),
                                          W(size - 4096, 4096)});
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 65536;
                   }});

  // ---- Header variants.
  for (uint32_t hl : {104u, 112u, 128u, 256u}) {
    cases.push_back({"header_length_" + Num(hl), [hl](Builder& bld, Built* b) {
                       const uint64_t size = 8 * MiB;
                       bld.Create("base.qcow2", size, "");
                       bld.Io("base.qcow2", {W(0, 2 * MiB)});
                       bld.Create("img.qcow2", size, "", "base.qcow2", "qcow2");
                       bld.Io("img.qcow2", {W(1 * MiB + 3, 100 * KiB)});
                       Qcow2Header h;
                       bld.Check([&] { return LoadQcow2Header(bld.Path("img.qcow2"), &h); });
                       bld.Check([&]() -> AssertionResult {
                         if (h.header_length != 112) {
                           return AssertionFailure()
                                  << "qemu-img 7.2+ should write header_length 112, got "
                                  << h.header_length;
                         }
                         h.header_length = hl;
                         h.extra_fields.resize(hl - 104, '\0');  // compression type 0 = zlib
                         return StoreQcow2Header(bld.Path("img.qcow2"), h);
                       });
                       b->image = bld.Path("img.qcow2");
                       b->cluster_size = 65536;
                       b->has_backing = true;
                       b->backing_file = "base.qcow2";
                     }});
  }
  cases.push_back({"unknown_header_extension", [](Builder& bld, Built* b) {
                     const uint64_t size = 8 * MiB;
                     bld.Create("base.qcow2", size, "");
                     bld.Io("base.qcow2", {W(0, 2 * MiB)});
                     bld.Create("img.qcow2", size, "", "base.qcow2", "qcow2");
                     bld.Io("img.qcow2", {W(1 * MiB + 3, 100 * KiB)});
                     Qcow2Header h;
                     bld.Check([&] { return LoadQcow2Header(bld.Path("img.qcow2"), &h); });
                     bld.Check([&]() -> AssertionResult {
                       h.extensions.insert(h.extensions.begin(),
                                           {0x12345678, "an unknown extension, 37 bytes long!"});
                       h.extensions.push_back({0x0badcafe, std::string(8, '\x7f')});
                       return StoreQcow2Header(bld.Path("img.qcow2"), h);
                     });
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 65536;
                     b->has_backing = true;
                     b->backing_file = "base.qcow2";
                   }});
  cases.push_back({"feature_name_table", [](Builder& bld, Built* b) {
                     bld.Create("img.qcow2", 8 * MiB, "");
                     bld.Io("img.qcow2", {W(5, 300 * KiB)});
                     Qcow2Header h;
                     bld.Check([&] { return LoadQcow2Header(bld.Path("img.qcow2"), &h); });
                     bld.Check([&]() -> AssertionResult {
                       if (!h.FindExtension(hdr::kExtFeatureTable)) {
                         return AssertionFailure() << "qemu-img wrote no feature name table";
                       }
                       return AssertionSuccess();
                     });
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 65536;
                   }});
  cases.push_back({"bitmaps", [](Builder& bld, Built* b) {
                     bld.Create("img.qcow2", 16 * MiB, "");
                     bld.Img("bitmap --add img.qcow2 b0");
                     bld.Img("bitmap --add -g 128K --disable img.qcow2 b1");
                     bld.Io("img.qcow2", StandardOps(65536, 16 * MiB));
                     Qcow2Header h;
                     bld.Check([&] { return LoadQcow2Header(bld.Path("img.qcow2"), &h); });
                     bld.Check([&]() -> AssertionResult {
                       if (!h.FindExtension(hdr::kExtBitmaps) || (h.autoclear_features & 1) == 0) {
                         return AssertionFailure() << "no bitmaps extension / autoclear bit";
                       }
                       return AssertionSuccess();
                     });
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 65536;
                   }});
  cases.push_back({"lazy_refcounts", [](Builder& bld, Built* b) {
                     bld.Create("img.qcow2", 16 * MiB, "lazy_refcounts=on,cluster_size=8192");
                     bld.Io("img.qcow2", StandardOps(8192, 16 * MiB));
                     b->image = bld.Path("img.qcow2");
                     b->cluster_size = 8192;
                   }});
  return cases;
}

}  // namespace qcow2fs::test::matrix
