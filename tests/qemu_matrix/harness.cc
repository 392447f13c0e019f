// The read matrix's harness: the image builder and the checker.
#include "qemu_matrix/harness.h"

#include <algorithm>
#include <cstdio>

namespace qcow2fs::test::matrix {

AssertionResult Builder::Step(const std::function<AssertionResult()>& step) {
  if (!ok()) return first_failure_;
  AssertionResult r = step();
  if (!r) first_failure_ = r;
  return r;
}

AssertionResult Builder::Check(const std::function<AssertionResult()>& check) {
  return Step(check);
}

AssertionResult Builder::Create(const std::string& name, uint64_t size, const std::string& opts,
                                const std::string& backing, const std::string& backing_fmt) {
  return Step([&] {
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
  });
}

AssertionResult Builder::Io(const std::string& name, const std::vector<Op>& ops,
                            const std::string& format) {
  return Step([&]() -> AssertionResult {
    std::vector<std::string> cmds;
    for (const Op& op : ops) {
      const std::string range = Num(op.offset) + " " + Num(op.length);
      switch (op.kind) {
        case Op::kWrite:
        case Op::kWriteCompressed: {
          const std::string src = Path("src-" + Num(src_counter_) + ".bin");
          const uint64_t seed = 1000 + src_counter_++;
          std::string data = op.kind == Op::kWrite ? RandomBytes(op.length, seed)
                                                   : SemiCompressible(op.length, seed);
          auto r = WriteWholeFile(src, data);
          if (!r) return r;
          cmds.push_back(std::string("write -q") + (op.kind == Op::kWriteCompressed ? " -c" : "") +
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
  });
}

AssertionResult Builder::Img(const std::string& args) {
  return Step([&] {
    auto have = RequireProgram("qemu-img");
    if (!have) return have;
    return RunOk("cd " + ShellQuote(dir()) + " && qemu-img " + args);
  });
}

AssertionResult Builder::WriteFile(const std::string& name, const std::string& data) {
  return Step([&] { return WriteWholeFile(Path(name), data); });
}

AssertionResult Builder::Run(const std::string& command, std::string* output) {
  return Step([&] { return RunOk(command, output); });
}

std::vector<Op> StandardOps(uint64_t cs, uint64_t size, bool extended) {
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

// ---- The checker.

namespace {

AssertionResult ReadImage(Image& img, uint64_t offset, uint64_t length, std::string* out) {
  out->assign(length, '\x5c');  // poison: a read that skips bytes shows
  Status s = img.Read(offset, AsWritableBytes(*out));
  if (!s.ok()) {
    return AssertionFailure() << "Read(" << offset << ", " << length << ") failed: " << Describe(s);
  }
  return AssertionSuccess();
}

// Walks GetBlockStatus over the whole disk: extents must tile it; extents
// reported as zeros must read as zeros in the reference.
AssertionResult CheckBlockStatusWalk(Image& img, std::string_view reference, bool has_backing) {
  const uint64_t size = img.size();
  uint64_t off = 0;
  int steps = 0;
  while (off < size) {
    if (++steps > 1'000'000) {
      return AssertionFailure() << "GetBlockStatus walk did not finish";
    }
    auto r = img.GetBlockStatus(off, size - off);
    if (!r.ok()) {
      return AssertionFailure() << "GetBlockStatus(" << off << ", " << (size - off)
                                << ") failed: " << Describe(r.status());
    }
    const BlockStatus& st = r.value();
    if (st.length == 0 || st.length > size - off) {
      return AssertionFailure() << "GetBlockStatus(" << off << ") returned length " << st.length
                                << " (remaining " << (size - off) << ")";
    }
    if (st.kind == BlockKind::kZero || (st.kind == BlockKind::kUnallocated && !has_backing)) {
      if (!AllZero(reference.substr(off, st.length))) {
        auto nz = reference.substr(off, st.length).find_first_not_of('\0');
        return AssertionFailure() << "GetBlockStatus says [" << off << ", " << (off + st.length)
                                  << ") is "
                                  << (st.kind == BlockKind::kZero ? "zero"
                                                                  : "unallocated without backing")
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
AssertionResult BoundaryRead(Image& img, std::string_view ref, uint64_t boundary, uint64_t before,
                             uint64_t after, const std::string& what) {
  const uint64_t size = ref.size();
  if (boundary > size) return AssertionSuccess();
  const uint64_t start = boundary >= before ? boundary - before : 0;
  const uint64_t end = std::min(size, boundary + after);
  if (end <= start) return AssertionSuccess();
  return ReadAndCompare(img, start, end - start, ref.substr(start, end - start), what);
}

}  // namespace

AssertionResult ReadAndCompare(Image& img, uint64_t offset, uint64_t length,
                               std::string_view expected, const std::string& what) {
  std::string got;
  auto r = ReadImage(img, offset, length, &got);
  if (!r) return r << " (" << what << ")";
  return BuffersEqual(expected, got, offset,
                      what + " read(" + Num(offset) + ", " + Num(length) + ")");
}

AssertionResult OpenImage(const Built& b, const OpenOptions& options, std::unique_ptr<Image>* out) {
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

void CheckWholeDisk(Image& img, const Built& b, const std::string& ref, uint64_t seed) {
  const uint64_t size = ref.size();
  ASSERT_EQ(img.size(), size) << "virtual size differs from qemu-img's";
  const uint64_t cs = b.cluster_size;

  // 1. The whole disk in 1 MiB chunks.
  for (uint64_t off = 0; off < size; off += MiB) {
    const uint64_t len = std::min(MiB, size - off);
    ASSERT_TRUE(
        ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len), "1MiB chunk"));
  }
  // 2. Large reads at odd offsets (many clusters per call).
  for (uint64_t off = 12345; off < size; off += 8 * MiB + 4097) {
    const uint64_t len = std::min(8 * MiB + 777, size - off);
    ASSERT_TRUE(
        ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len), "large unaligned"));
  }
  // 3. Random unaligned reads of many sizes.
  Rng rng(seed);
  for (int i = 0; i < 300; ++i) {
    uint64_t len;
    switch (i % 4) {
      case 0:
        len = rng.Uniform(1, 64);
        break;
      case 1:
        len = rng.Uniform(1, 2 * cs + 1);
        break;
      case 2:
        len = rng.Uniform(1, 256 * KiB);
        break;
      default:
        len = rng.Uniform(2, 2 * cs);
        break;
    }
    len = std::min(len, size);
    uint64_t off;
    if (i % 4 == 3) {
      // Straddle a cluster boundary.
      const uint64_t k = rng.Uniform(1, std::max<uint64_t>(1, size / cs - 1));
      const uint64_t back = rng.Uniform(1, std::max<uint64_t>(1, std::min(len - 1, k * cs)));
      off = k * cs - back;
    } else {
      off = rng.Uniform(0, size - len);
    }
    if (off + len > size) off = size - len;
    ASSERT_TRUE(
        ReadAndCompare(img, off, len, std::string_view(ref).substr(off, len), "random #" + Num(i)));
  }
  // 4. Cluster (and subcluster) boundaries around every touched range.
  const uint64_t sc = b.extended_l2 ? cs / 32 : cs;
  for (const Region& t : b.touched) {
    std::vector<uint64_t> bounds = {AlignDown(t.offset, cs),
                                    AlignUp(t.offset, cs),
                                    AlignDown(t.offset + t.length, cs),
                                    AlignUp(t.offset + t.length, cs),
                                    AlignDown(t.offset, sc),
                                    AlignUp(t.offset + t.length, sc),
                                    t.offset,
                                    t.offset + t.length};
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
                          const std::vector<std::string>& refs, uint64_t cs, uint64_t seed) {
  Rng rng(seed);
  for (size_t i = 0; i < regions.size(); ++i) {
    const Region& r = regions[i];
    const std::string_view ref = refs[i];
    const std::string where = "region [" + Num(r.offset) + ", " + Num(r.offset + r.length) + ")";
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

}  // namespace qcow2fs::test::matrix
