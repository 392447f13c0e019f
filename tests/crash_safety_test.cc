// Crash safety: a workload of writes, zero-writes, discards and flushes is
// cut off by a simulated power loss after its Nth mutating file operation,
// for many N. The surviving image (synced data plus a random subset of the
// unsynced writes) must show no corruption in `qemu-img check` (leaks are
// allowed), and every byte written before the last successful flush, and
// not touched after it, must read back intact.
#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "forwarding_file.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

struct Model {
  std::string current;
  std::string flushed;        // content as of the last successful flush
  std::vector<bool> touched;  // bytes changed since that flush
};

// Runs the deterministic workload until it ends or an operation fails.
void RunWorkload(Image& image, Model& m, uint64_t cluster_size) {
  Rng rng(7);
  const uint64_t size = image.size();
  for (int i = 0; i < 60; i++) {
    const uint64_t kind = rng.Uniform(0, 9);
    const uint64_t off = rng.Uniform(0, size - 1);
    const uint64_t len = std::min<uint64_t>(size - off, rng.Uniform(1, 3 * cluster_size));
    Status s;
    std::string data;
    if (kind < 6) {
      data = SemiCompressible(len, static_cast<uint64_t>(i));
      s = image.Write(off, AsBytes(data));
    } else if (kind < 8) {
      data.assign(len, '\0');
      s = image.WriteZeroes(off, len, kind == 7);
    } else {
      data.assign(len, '\0');
      s = image.Discard(off, len);
    }
    // A failed operation may have landed partly: its bytes are unknown.
    for (uint64_t p = off; p < off + len; p++) m.touched[p] = true;
    if (!s.ok()) return;
    m.current.replace(off, len, data);
    if (i % 6 == 5) {
      if (!image.Flush().ok()) return;
      m.flushed = m.current;
      m.touched.assign(size, false);
    }
  }
  if (image.Flush().ok()) {
    m.flushed = m.current;
    m.touched.assign(size, false);
  }
}

struct CrashCase {
  std::string name;
  std::string create_options;
  uint64_t cluster_size;
  bool compress = false;  // through the compressed-write staging cache
};

class CrashSafetyTest : public ::testing::TestWithParam<CrashCase> {};

TEST_P(CrashSafetyTest, CrashAtAnyWriteLeavesAtWorstLeaks) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const CrashCase& cc = GetParam();
  TempDir dir;
  const std::string fresh = dir.Join("fresh.qcow2");
  ASSERT_TRUE(
      QemuImg("create -q -f qcow2 -o " + cc.create_options + " " + ShellQuote(fresh) + " 6M"));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x5a 0 1M", "write -P 0xa5 3M 512k"}));
  std::string initial_file, initial_disk;
  ASSERT_TRUE(ReadWholeFile(fresh, &initial_file));
  ASSERT_TRUE(QemuConvertToRaw(fresh, dir.Join("fresh.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("fresh.raw"), &initial_disk));

  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  options.l2_cache_bytes = 2 * cc.cluster_size;  // evictions write back mid-run
  if (cc.compress) options.compress = CompressionType::kZlib;
  auto refuse = [](const std::string&, bool) -> Result<std::unique_ptr<File>> {
    return Status(ErrorCode::kNotFound, "no other files in this test");
  };

  // A full run counts the mutating operations to crash at.
  uint64_t total_ops;
  {
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    Model m{initial_disk, initial_disk, std::vector<bool>(initial_disk.size())};
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, refuse);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      RunWorkload(**image, m, cc.cluster_size);
    }
    total_ops = f->mutating_ops();
    ASSERT_GT(total_ops, 50u);
  }

  // About 70 crash points per kind; half as many in the sanitizer builds,
  // which run every test several times slower (the release stage covers
  // them all).
  const uint64_t step = std::max<uint64_t>(1, total_ops / (kSanitized ? 35 : 70));
  int crashes = 0;
  for (uint64_t n = 0; n < total_ops; n += step) {
    SCOPED_TRACE("crash after " + std::to_string(n) + " of " + std::to_string(total_ops) +
                 " mutating operations");
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    f->CrashAfter(n);
    Model m{initial_disk, initial_disk, std::vector<bool>(initial_disk.size())};
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, refuse);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      RunWorkload(**image, m, cc.cluster_size);
    }
    ASSERT_TRUE(f->crashed());
    crashes++;
    const std::string after = dir.Join("after.qcow2");
    ASSERT_TRUE(WriteWholeFile(after, f->DurableImage(n)));

    CommandResult check = RunCommand("qemu-img check " + ShellQuote(after));
    // 0: clean, 3: leaked clusters only. Anything else is corruption.
    ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
    ASSERT_EQ(check.output.find("ERROR"), std::string::npos) << check.output;

    OpenOptions ro;
    ro.lock = false;
    auto reopened = Image::Open(after, ro);
    ASSERT_TRUE(reopened.ok()) << Describe(reopened.status());
    std::string disk(initial_disk.size(), '\0');
    ASSERT_TRUE((*reopened)->Read(0, AsWritableBytes(disk)).ok());
    for (uint64_t p = 0; p < disk.size(); p++) {
      if (!m.touched[p] && disk[p] != m.flushed[p]) {
        FAIL() << "byte " << p << " written before the last flush was lost";
      }
    }
  }
  EXPECT_GT(crashes, 30);
}

INSTANTIATE_TEST_SUITE_P(
    Images, CrashSafetyTest,
    ::testing::Values(CrashCase{"v3_4k", "cluster_size=4k", 4096},
                      CrashCase{"v3_512_refcount64", "cluster_size=512,refcount_bits=64", 512},
                      CrashCase{"v2_64k", "compat=0.10", 65536},
                      CrashCase{"extended_l2_32k", "cluster_size=32k,extended_l2=on", 32768},
                      CrashCase{"compressed_staging_4k", "cluster_size=4k", 4096, true}),
    [](const auto& param_info) { return param_info.param.name; });

// ---------------------------------------------------------------------------
// Ordering of guest data against the L2 entries that point to it.
//
// Every L2 update must reach the disk only after the guest data it maps is
// durable, also when the update allocated nothing since the last metadata
// write-back (so no refcount sync happened in between): an extended-L2
// subcluster filled inside a cluster the image owns; an allocating write
// whose allocation a concurrent flush already wrote back; any write to an
// external data file (its clusters are never counted, and the data file is
// another device). These tests cut power at each sync of the flush that
// writes such an L2 entry and keep every unsynced write except the guest
// data itself: the guest range must then read as its old content or its
// new content, never as whatever the host file held before (zeros).

// A file that runs `hook` (once) before the next WriteAt once armed.
class HookFile final : public ForwardingFile {
 public:
  explicit HookFile(std::shared_ptr<FaultInjectionFile> f) : ForwardingFile(*f), f_(std::move(f)) {}
  void ArmBeforeNextWrite(std::function<void()> hook) { hook_ = std::move(hook); }
  Status WriteAt(uint64_t o, std::span<const std::byte> d) override {
    if (hook_) {
      auto hook = std::move(hook_);
      hook_ = nullptr;
      hook();
    }
    return ForwardingFile::WriteAt(o, d);
  }

 private:
  std::shared_ptr<FaultInjectionFile> f_;
  std::function<void()> hook_;
};

constexpr char kBackingByte = 0x11;
constexpr uint64_t kDisk = 1 << 20;

// Opens backing files from the host (read-only) and hands out `data` for
// the external data file `data_path`.
FileOpener TestOpener(std::string data_path, std::shared_ptr<FaultInjectionFile> data) {
  return
      [data_path, data](const std::string& path, bool writable) -> Result<std::unique_ptr<File>> {
        if (data && path == data_path) return std::unique_ptr<File>(new SharedFile(data));
        if (writable) return Status(ErrorCode::kNotFound, "unexpected writable file " + path);
        return OpenPosixFile(path, false);
      };
}

OpenOptions WritableOptions() {
  OpenOptions o;
  o.read_only = false;
  o.lock = false;
  return o;
}

// Checks the durable image at `path` with qemu-img and reads guest bytes
// [off, off+len) back with qcow2fs.
::testing::AssertionResult CheckAndRead(const std::string& path, uint64_t off, uint64_t len,
                                        std::string* out) {
  CommandResult check = RunCommand("qemu-img check " + ShellQuote(path));
  if (!(check.exit_code == 0 || check.exit_code == 3) ||
      check.output.find("ERROR") != std::string::npos) {
    return ::testing::AssertionFailure() << "qemu-img check exit " << check.exit_code << ":\n"
                                         << check.output;
  }
  OpenOptions ro;
  ro.lock = false;
  auto image = Image::Open(path, ro);
  if (!image.ok()) return ::testing::AssertionFailure() << Describe(image.status());
  out->assign(len, '\0');
  Status s = (*image)->Read(off, AsWritableBytes(*out));
  if (!s.ok()) return ::testing::AssertionFailure() << Describe(s);
  return ::testing::AssertionSuccess();
}

// Every byte of `got` equals the same byte of `old_content` or of
// `new_content`, and the whole range is one or the other where they differ
// only inside `new_range` (checked per byte).
::testing::AssertionResult OldOrNew(std::string_view got, std::string_view old_content,
                                    std::string_view new_content, uint64_t base) {
  for (size_t i = 0; i < got.size(); i++) {
    if (got[i] != old_content[i] && got[i] != new_content[i]) {
      std::ostringstream msg;
      msg << "guest byte " << base + i << " reads 0x" << std::hex
          << (static_cast<unsigned>(got[i]) & 0xff) << ", neither the old 0x"
          << (static_cast<unsigned>(old_content[i]) & 0xff) << " nor the new 0x"
          << (static_cast<unsigned>(new_content[i]) & 0xff)
          << " (the L2 entry survived the crash, its data did not)";
      return ::testing::AssertionFailure() << msg.str();
    }
  }
  return ::testing::AssertionSuccess();
}

TEST(CrashOrderingTest, ExtendedL2SubclusterFillIsDurableBeforeItsL2Entry) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  ASSERT_TRUE(WriteWholeFile(dir.Join("base.raw"), std::string(kDisk, kBackingByte)));
  const std::string top = dir.Join("top.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k,extended_l2=on -b base.raw -F raw " +
                      ShellQuote(top) + " 1M"));
  std::string initial;
  ASSERT_TRUE(ReadWholeFile(top, &initial));
  constexpr uint64_t kSub = 2048;             // 64 KiB / 32
  const std::string first(4 * kSub, '\xaa');  // subclusters 0-3
  const std::string fill(kSub, '\xbb');       // subcluster 10
  const uint64_t fill_at = 10 * kSub;

  int crashes = 0;
  for (uint64_t n = 0; n < 16; n++) {
    SCOPED_TRACE("power cut at sync " + std::to_string(n) + " of the flush after the fill");
    auto f = std::make_shared<FaultInjectionFile>("img", initial);
    uint64_t host = 0;
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), top, WritableOptions(),
                             TestOpener("", nullptr));
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      Image& img = **image;
      ASSERT_TRUE(img.Write(0, AsBytes(first)).ok());
      ASSERT_TRUE(img.Flush().ok());
      auto bs = img.GetBlockStatus(0, 65536);
      ASSERT_TRUE(bs.ok() && bs->kind == BlockKind::kData && bs->host_offset);
      host = *bs->host_offset;
      // Fills subcluster 10 of the cluster the image already owns: nothing
      // is allocated, only the L2 bitmap changes.
      ASSERT_TRUE(img.Write(fill_at, AsBytes(fill)).ok());
      f->CrashAtSync(n);
      if (img.Flush().ok()) break;  // n is past the flush's last sync
    }
    ASSERT_TRUE(f->crashed());
    crashes++;
    const std::string after = dir.Join("after.qcow2");
    // Everything reaches the disk except the guest data write.
    ASSERT_TRUE(
        WriteWholeFile(after, f->DurableImage([&](const FaultInjectionFile::UnsyncedWrite& w) {
          return !(w.length > 0 && w.offset < host + 65536 && w.offset + w.length > host);
        })));
    std::string got;
    ASSERT_TRUE(CheckAndRead(after, 0, 65536, &got));
    ASSERT_TRUE(BuffersEqual(first, std::string_view(got).substr(0, first.size()), 0,
                             "flushed subclusters 0-3"));
    EXPECT_TRUE(OldOrNew(std::string_view(got).substr(fill_at, kSub),
                         std::string(kSub, kBackingByte), fill, fill_at));
  }
  EXPECT_GE(crashes, 1);
}

TEST(CrashOrderingTest, AllocationWrittenBackEarlyStillOrdersDataBeforeL2) {
  // A flush that runs while an allocating write's data is in flight writes
  // the new cluster's refcount back; the write's L2 update then finds no
  // dirty refcounts. The flush runs from a hook just before the data write
  // reaches the file, so the interleaving is exact.
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  ASSERT_TRUE(WriteWholeFile(dir.Join("base.raw"), std::string(kDisk, kBackingByte)));
  const std::string top = dir.Join("top.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k -b base.raw -F raw " +
                      ShellQuote(top) + " 1M"));
  std::string initial;
  ASSERT_TRUE(ReadWholeFile(top, &initial));
  const std::string first(65536, '\xaa');
  const std::string part(4096, '\xbb');
  const uint64_t part_at = 65536 + 8192;  // inside cluster 1: copy-on-write from base

  int crashes = 0;
  for (uint64_t n = 0; n < 16; n++) {
    SCOPED_TRACE("power cut at sync " + std::to_string(n) + " of the flush after the write");
    auto f = std::make_shared<FaultInjectionFile>("img", initial);
    uint64_t host = 0;
    {
      auto hooked = std::make_unique<HookFile>(f);
      HookFile* hook = hooked.get();
      auto image = OpenQcow2(std::move(hooked), top, WritableOptions(), TestOpener("", nullptr));
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      Image& img = **image;
      ASSERT_TRUE(img.Write(0, AsBytes(first)).ok());  // the L2 table exists and is durable
      ASSERT_TRUE(img.Flush().ok());
      Status hook_flush = Status(ErrorCode::kIoError, "hook did not run");
      hook->ArmBeforeNextWrite([&] { hook_flush = img.Flush(); });
      ASSERT_TRUE(img.Write(part_at, AsBytes(part)).ok());
      ASSERT_TRUE(hook_flush.ok()) << Describe(hook_flush);
      auto bs = img.GetBlockStatus(65536, 65536);
      ASSERT_TRUE(bs.ok() && bs->kind == BlockKind::kData && bs->host_offset);
      host = *bs->host_offset;
      f->CrashAtSync(n);
      if (img.Flush().ok()) break;
    }
    ASSERT_TRUE(f->crashed());
    crashes++;
    const std::string after = dir.Join("after.qcow2");
    ASSERT_TRUE(
        WriteWholeFile(after, f->DurableImage([&](const FaultInjectionFile::UnsyncedWrite& w) {
          return !(w.length > 0 && w.offset < host + 65536 && w.offset + w.length > host);
        })));
    std::string got;
    ASSERT_TRUE(CheckAndRead(after, 0, 2 * 65536, &got));
    ASSERT_TRUE(
        BuffersEqual(first, std::string_view(got).substr(0, 65536), 0, "flushed cluster 0"));
    std::string old_c(65536, kBackingByte), new_c = old_c;
    new_c.replace(part_at - 65536, part.size(), part);
    // Old or new per byte is not enough here: the whole cluster must be
    // one or the other, and the old one is all backing bytes.
    std::string_view c1 = std::string_view(got).substr(65536);
    EXPECT_TRUE(c1 == old_c || c1 == new_c) << OldOrNew(c1, old_c, new_c, 65536).message();
  }
  EXPECT_GE(crashes, 1);
}

TEST(CrashOrderingTest, ExternalDataFileIsDurableBeforeTheL2Entry) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  ASSERT_TRUE(WriteWholeFile(dir.Join("base.raw"), std::string(kDisk, kBackingByte)));
  const std::string top = dir.Join("top.qcow2");
  const std::string data_path = dir.Join("data.raw");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k,data_file=" + ShellQuote(data_path) +
                      " -b base.raw -F raw " + ShellQuote(top) + " 1M"));
  std::string initial, initial_data;
  ASSERT_TRUE(ReadWholeFile(top, &initial));
  ASSERT_TRUE(ReadWholeFile(data_path, &initial_data));
  const std::string first(65536, '\xaa');
  const std::string part(4096, '\xbb');
  const uint64_t part_at = 65536 + 8192;

  int crashes = 0;
  for (const bool crash_data_file : {false, true}) {
    for (uint64_t n = 0; n < 16; n++) {
      SCOPED_TRACE(std::string("power cut at sync ") + std::to_string(n) + " of the " +
                   (crash_data_file ? "data file" : "image file") +
                   " in the flush after the write");
      auto f = std::make_shared<FaultInjectionFile>("img", initial);
      auto d = std::make_shared<FaultInjectionFile>("data", initial_data);
      // One machine: when either file loses power, so does the other.
      // (Weak references: the files must not keep each other alive.)
      f->OnCrash([w = std::weak_ptr<FaultInjectionFile>(d)] {
        if (auto other = w.lock()) other->Crash();
      });
      d->OnCrash([w = std::weak_ptr<FaultInjectionFile>(f)] {
        if (auto other = w.lock()) other->Crash();
      });
      {
        auto image = OpenQcow2(std::make_unique<SharedFile>(f), top, WritableOptions(),
                               TestOpener(data_path, d));
        ASSERT_TRUE(image.ok()) << Describe(image.status());
        Image& img = **image;
        ASSERT_TRUE(img.Write(0, AsBytes(first)).ok());  // the L2 table exists and is durable
        ASSERT_TRUE(img.Flush().ok());
        ASSERT_TRUE(img.Write(part_at, AsBytes(part)).ok());
        (crash_data_file ? d : f)->CrashAtSync(n);
        if (img.Flush().ok()) break;
      }
      ASSERT_TRUE(f->crashed() && d->crashed());
      crashes++;
      const std::string after = dir.Join("after.qcow2");
      // The image keeps every metadata write; the data file (guest data
      // only) keeps none of its unsynced writes.
      ASSERT_TRUE(WriteWholeFile(after, f->DurableImageKeepAll()));
      ASSERT_TRUE(WriteWholeFile(data_path, d->DurableImageKeepNone()));
      std::string got;
      ASSERT_TRUE(CheckAndRead(after, 0, 2 * 65536, &got));
      ASSERT_TRUE(
          BuffersEqual(first, std::string_view(got).substr(0, 65536), 0, "flushed cluster 0"));
      std::string old_c(65536, kBackingByte), new_c = old_c;
      new_c.replace(part_at - 65536, part.size(), part);
      std::string_view c1 = std::string_view(got).substr(65536);
      EXPECT_TRUE(c1 == old_c || c1 == new_c) << OldOrNew(c1, old_c, new_c, 65536).message();
    }
  }
  EXPECT_GE(crashes, 2);
}

}  // namespace
}  // namespace qcow2fs::test
