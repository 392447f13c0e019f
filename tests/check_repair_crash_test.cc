// Crash safety of the repair (engine/qcow2_check.h): broken images made by
// QEMU are repaired over a fault-injecting file that loses power at every
// mutating operation and at every sync of the repair in turn. Whatever
// survives (nothing unsynced, everything, the newest write alone, all but
// it, or random subsets) must be
// repaired to clean by the next CheckQcow2File(kAll), with the guest data
// QEMU read before the repair unchanged; a sample of the survivors is
// judged by `qemu-img check` and `qemu-img compare` too.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "engine/qcow2_check.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

constexpr uint64_t kDiskBytes = 8ull << 20;

struct Scenario {
  std::string name;
  std::string image;      // the broken image
  std::string reference;  // guest data as QEMU reads it
};

AssertionResult SetBE64At(const std::string& path, uint64_t offset, uint64_t value) {
  return PatchBE64(path, offset, value);
}

AssertionResult ReadBE64At(const std::string& path, uint64_t offset, uint64_t* v) {
  std::string buf;
  auto r = ReadFileRange(path, offset, 8, &buf);
  if (!r) return r;
  *v = GetBE64(buf, 0);
  return AssertionSuccess();
}

// Sets a 16-bit stored refcount (the images here use the default width).
AssertionResult SetRefcount16(const std::string& path, uint64_t cluster, uint16_t value,
                              uint64_t cluster_size) {
  Qcow2Header h;
  auto r = LoadQcow2Header(path, &h);
  if (!r) return r;
  uint64_t block = 0;
  r = ReadBE64At(path, h.refcount_table_offset + 8 * (cluster / (cluster_size / 2)), &block);
  if (!r) return r;
  if (block == 0) return AssertionFailure() << "no refcount block for cluster " << cluster;
  std::string bytes(2, '\0');
  PutBE16(bytes, 0, value);
  return PatchFile(path, block + 2 * (cluster % (cluster_size / 2)), bytes);
}

AssertionResult Finish(const TempDir& dir, const std::string& img, Scenario* s) {
  auto r = QemuConvertToRaw(img, dir.Join("ref.raw"), "-U");
  if (!r) return r;
  r = ReadWholeFile(dir.Join("ref.raw"), &s->reference);
  if (!r) return r;
  return ReadWholeFile(img, &s->image);
}

// Lazy refcounts and a killed QEMU: dirty, refcounts missing (a rebuild).
AssertionResult MakeDirty(const TempDir& dir, Scenario* s) {
  const std::string img = dir.Join("dirty.qcow2");
  auto r = QemuImg("create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4096 " + ShellQuote(img) +
                   " 8M");
  if (!r) return r;
  CommandResult k = RunCommand(
      "qemu-io -f qcow2 -c 'write -P 1 0 300k' -c 'write -P 2 5M 64k' "
      "-c 'sigraise 9' " +
      ShellQuote(img));
  if (k.exit_code != 128 + 9) return AssertionFailure() << "qemu-io: " << k.output;
  s->name = "dirty";
  return Finish(dir, img, s);
}

// A snapshot, one shared cluster counted once, two leaked clusters, and a
// COPIED flag set on a shared cluster: fixed in place.
AssertionResult MakeInPlace(const TempDir& dir, Scenario* s) {
  const std::string img = dir.Join("inplace.qcow2");
  auto r = QemuImg("create -q -f qcow2 " + ShellQuote(img) + " 8M");
  if (!r) return r;
  r = QemuIo(img, {"write -q -P 1 0 256k"});
  if (!r) return r;
  r = QemuImg("snapshot -c s " + ShellQuote(img));
  if (!r) return r;
  r = QemuIo(img, {"write -q -P 2 1M 128k"});
  if (!r) return r;
  Qcow2Header h;
  r = LoadQcow2Header(img, &h);
  if (!r) return r;
  uint64_t l1 = 0, e0 = 0, e1 = 0, size = 0;
  r = ReadBE64At(img, h.l1_table_offset, &l1);
  if (!r) return r;
  const uint64_t l2 = l1 & 0x00fffffffffffe00ull;
  r = ReadBE64At(img, l2, &e0);
  if (!r) return r;
  r = ReadBE64At(img, l2 + 8, &e1);
  if (!r) return r;
  r = SetRefcount16(img, (e0 & 0x00fffffffffffe00ull) >> 16, 1, 65536);
  if (!r) return r;
  r = SetBE64At(img, l2 + 8, e1 | (1ull << 63));
  if (!r) return r;
  r = FileSize(img, &size);
  if (!r) return r;
  const uint64_t end = size / 65536;
  r = RunOk("truncate -s " + std::to_string((end + 2) * 65536) + " " + ShellQuote(img));
  if (!r) return r;
  for (uint64_t c = end; c < end + 2; c++) {
    r = SetRefcount16(img, c, 1, 65536);
    if (!r) return r;
  }
  s->name = "in-place";
  return Finish(dir, img, s);
}

// An L2 entry past the end of the file and a data cluster counted free:
// an entry patch and a rebuild.
AssertionResult MakePatchAndRebuild(const TempDir& dir, Scenario* s) {
  const std::string img = dir.Join("rebuild.qcow2");
  auto r = QemuImg("create -q -f qcow2 -o cluster_size=4096 " + ShellQuote(img) + " 8M");
  if (!r) return r;
  r = QemuIo(img, {"write -q -P 1 0 64k", "write -q -c -P 3 1M 64k"});
  if (!r) return r;
  Qcow2Header h;
  r = LoadQcow2Header(img, &h);
  if (!r) return r;
  uint64_t l1 = 0, e0 = 0;
  r = ReadBE64At(img, h.l1_table_offset, &l1);
  if (!r) return r;
  const uint64_t l2 = l1 & 0x00fffffffffffe00ull;
  r = ReadBE64At(img, l2, &e0);
  if (!r) return r;
  r = SetRefcount16(img, (e0 & 0x00fffffffffffe00ull) >> 12, 0, 4096);
  if (!r) return r;
  r = SetBE64At(img, l2 + 8 * 3, (1ull << 63) | (1ull << 40));
  if (!r) return r;
  s->name = "patch-and-rebuild";
  return Finish(dir, img, s);
}

// Guest data of an image held in memory, read through the core.
AssertionResult GuestData(const std::string& contents, std::string* out) {
  OpenOptions o;
  o.format = "qcow2";
  o.lock = false;
  auto image = OpenQcow2(NewMemoryFile("mem.qcow2", contents), "/nonexistent/mem.qcow2", o,
                         HostFileOpener(false));
  if (!image.ok()) return AssertionFailure() << "open: " << Describe(image.status());
  out->assign((*image)->size(), '\0');
  Status s = (*image)->Read(0, AsWritableBytes(*out));
  if (!s.ok()) return AssertionFailure() << "read: " << Describe(s);
  return AssertionSuccess();
}

// Repairs `survivor` (a crashed repair's durable image) and requires it
// clean, with the reference guest data.
AssertionResult RepairsToClean(const Scenario& s, const std::string& survivor,
                               std::string* repaired) {
  FaultInjectionFile file("survivor.qcow2", survivor);
  CheckOptions all;
  all.repair = RepairMode::kAll;
  auto r = CheckQcow2File(file, all);
  if (!r.ok()) return AssertionFailure() << "repair: " << Describe(r.status());
  auto again = CheckQcow2File(file, CheckOptions{});
  if (!again.ok()) return AssertionFailure() << "check: " << Describe(again.status());
  if (again->ExitCode() != 0) {
    std::string lines;
    for (const auto& m : again->messages) lines += "  " + m + "\n";
    return AssertionFailure() << "still exits " << again->ExitCode() << " after repair:\n" << lines;
  }
  *repaired = file.CurrentImage();
  std::string data;
  auto d = GuestData(*repaired, &data);
  if (!d) return d;
  return BuffersEqual(s.reference, data, 0, "guest data after repair");
}

AssertionResult JudgedByQemu(const TempDir& dir, const Scenario& s, const std::string& image) {
  const std::string path = dir.Join("judged.qcow2");
  auto r = WriteWholeFile(path, image);
  if (!r) return r;
  r = RunOk("qemu-img check " + ShellQuote(path));
  if (!r) return r;
  r = WriteWholeFile(dir.Join("judged-ref.raw"), s.reference);
  if (!r) return r;
  return RunOk("qemu-img compare -f raw -F qcow2 " + ShellQuote(dir.Join("judged-ref.raw")) + " " +
               ShellQuote(path));
}

void CrashEverywhere(const TempDir& dir, const Scenario& s) {
  SCOPED_TRACE(s.name);
  ASSERT_EQ(s.reference.size(), kDiskBytes);
  CheckOptions all;
  all.repair = RepairMode::kAll;
  uint64_t ops = 0, syncs = 0;
  {
    FaultInjectionFile dry("dry.qcow2", s.image);
    auto r = CheckQcow2File(dry, all);
    ASSERT_TRUE(r.ok()) << Describe(r.status());
    ASSERT_GT(r->repairs.size(), 0u) << "the scenario must need a repair";
    ops = dry.mutating_ops();
    syncs = dry.syncs();
    std::string repaired;
    ASSERT_TRUE(RepairsToClean(s, dry.CurrentImage(), &repaired));
    ASSERT_TRUE(JudgedByQemu(dir, s, dry.CurrentImage()));
  }
  ASSERT_GT(ops, 0u);
  uint64_t judged = 0;
  // Nothing unsynced survives, all of it, only the newest write (the disk
  // reordered it before the older ones), all but the newest, and two
  // random subsets.
  auto survivors_of = [&](FaultInjectionFile& f, uint64_t seed) {
    const uint64_t n = f.unsynced_writes();
    return std::vector<std::string>{
        f.DurableImageKeepNone(),
        f.DurableImageKeepAll(),
        f.DurableImage(
            [n](const FaultInjectionFile::UnsyncedWrite& w) { return w.index + 1 == n; }),
        f.DurableImage([n](const FaultInjectionFile::UnsyncedWrite& w) { return w.index + 1 < n; }),
        f.DurableImage(seed),
        f.DurableImage(seed * 7919 + 1)};
  };
  for (uint64_t k = 0; k < ops + syncs; k++) {
    const bool at_sync = k >= ops;
    SCOPED_TRACE(at_sync ? "crash at sync " + std::to_string(k - ops)
                         : "crash at write " + std::to_string(k));
    FaultInjectionFile f("crash.qcow2", s.image);
    if (at_sync) {
      f.CrashAtSync(k - ops);
    } else {
      f.CrashAfter(k);
    }
    auto r = CheckQcow2File(f, all);
    EXPECT_FALSE(r.ok()) << "the repair must report the crash";
    ASSERT_TRUE(f.crashed());
    for (const std::string& survivor : survivors_of(f, k)) {
      std::string repaired;
      ASSERT_TRUE(RepairsToClean(s, survivor, &repaired));
      // QEMU judges a sample: every fourth crash point, and the last.
      if (k % 4 == 0 || k + 1 == ops + syncs) {
        ASSERT_TRUE(JudgedByQemu(dir, s, repaired));
        judged++;
      }
    }
  }
  EXPECT_GT(judged, 0u);
}

TEST(CheckRepairCrash, DirtyImageRebuild) {
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  Scenario s;
  ASSERT_TRUE(MakeDirty(dir, &s));
  CrashEverywhere(dir, s);
}

TEST(CheckRepairCrash, InPlaceRefcountAndCopiedFixes) {
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  Scenario s;
  ASSERT_TRUE(MakeInPlace(dir, &s));
  CrashEverywhere(dir, s);
}

TEST(CheckRepairCrash, EntryPatchAndRebuild) {
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  Scenario s;
  ASSERT_TRUE(MakePatchAndRebuild(dir, &s));
  CrashEverywhere(dir, s);
}

}  // namespace
}  // namespace qcow2fs::test
