// Power cut at every write and every sync while a snapshot is taken and
// another dropped. Whatever survives must be an image where each snapshot
// either does not exist or is complete (equal to the disk when it was
// taken), the active disk holds every flushed write, and QEMU's check
// finds at worst leaked clusters. Between a refcount step and the flag step
// OFLAG_COPIED flags disagree with refcounts (QEMU's own order has that
// window; data is safe there): a survivor from inside it must carry the
// header's dirty bit, and the next writable open, qcow2fs's or QEMU's,
// must repair it to a clean image.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "engine/image_open.h"
#include "engine/qcow2_image.h"
#include "forwarding_file.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kDisk = 1 << 20;

// Crash survivors marked dirty (printed); every other one of them is
// repaired by QEMU, the rest by qcow2fs.
int dirty_survivors = 0;

// Judges the crash survivor at `path` and leaves it repaired: empty when
// acceptable, else why not. One not marked dirty must pass qemu-img check
// as it is (leaks allowed); one marked dirty must be clean after the next
// writable open.
std::string JudgeAndRepair(const std::string& path) {
  std::string file;
  if (!ReadWholeFile(path, &file)) return "cannot read " + path;
  if (!(GetBE64(file, hdr::kIncompatibleFeatures) & hdr::kIncompatDirty)) {
    CommandResult check = RunCommand("qemu-img check " + ShellQuote(path));
    if (check.exit_code == 0 || check.exit_code == 3) return "";
    return "qemu-img check exit " + std::to_string(check.exit_code) +
           " on an image not marked dirty:\n" + check.output;
  }
  const bool by_qemu = dirty_survivors++ % 2 == 1;
  if (by_qemu) {
    // qemu-io opens the image read-write, which repairs a dirty image.
    CommandResult io = RunCommand("qemu-io -c 'read 0 512' " + ShellQuote(path));
    if (io.exit_code != 0) return "QEMU could not open the dirty image:\n" + io.output;
  } else {
    OpenOptions options;
    options.lock = false;
    if (!OpenWritable(path, options)) return "qcow2fs could not open the dirty image";
  }
  CommandResult again = RunCommand("qemu-img check " + ShellQuote(path));
  if (again.exit_code != 0) {
    return std::string("not clean after ") + (by_qemu ? "QEMU's" : "qcow2fs's") +
           " writable open repaired the dirty image:\n" + again.output;
  }
  return "";
}

// The snapshot's disk as QEMU reads it, or nullopt when it does not exist.
std::optional<std::string> SnapshotDisk(const TempDir& dir, const std::string& path,
                                        const std::string& name) {
  CommandResult list = RunCommand("qemu-img snapshot -l " + ShellQuote(path));
  if (list.output.find(" " + name + " ") == std::string::npos) return std::nullopt;
  const std::string raw = dir.Join(name + ".raw");
  if (!QemuConvertToRaw(path, raw, "-l snapshot.name=" + name)) return std::string("<unreadable>");
  std::string out;
  if (!ReadWholeFile(raw, &out)) return std::string("<unreadable>");
  return out;
}

// Opens a fault-injecting copy of an image for writing; the image names
// no other file.
Result<std::unique_ptr<Image>> OpenOnFaultyFile(const std::shared_ptr<FaultInjectionFile>& f,
                                                const std::string& name) {
  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  const FileOpener opener = [](const std::string&, bool) -> Result<std::unique_ptr<File>> {
    return Status(ErrorCode::kNotFound, "no other files");
  };
  return OpenQcow2(std::make_unique<SharedFile>(f), name, options, opener);
}

// Mutating operations and syncs on the file at two moments of a run.
struct Counts {
  uint64_t ops = 0;
  uint64_t syncs = 0;
};

// Runs `workload` on `initial_file` (opened as `name`) without a crash:
// it must get to `reached`, and the image it leaves, written to `done`,
// must be clean. Sets *to to the counts at the end.
::testing::AssertionResult RunWhole(const std::string& initial_file, const std::string& name,
                                    const std::function<int(Image&)>& workload, int reached,
                                    const std::string& done, Counts* to) {
  auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
  {
    auto image = OpenOnFaultyFile(f, name);
    if (!image.ok()) return ::testing::AssertionFailure() << Describe(image.status());
    const int got = workload(**image);
    if (got != reached) {
      return ::testing::AssertionFailure() << "the workload got to " << got << ", not " << reached;
    }
  }
  *to = {f->mutating_ops(), f->syncs()};
  if (!WriteWholeFile(done, f->CurrentImage())) return ::testing::AssertionFailure() << done;
  CommandResult check = RunCommand("qemu-img check " + ShellQuote(done));
  if (check.exit_code != 0) return ::testing::AssertionFailure() << check.output;
  return ::testing::AssertionSuccess();
}

// Cuts power after every mutating operation in [from.ops, to.ops) and at
// every sync in [from.syncs, to.syncs) of `workload` run on `initial_file`
// (opened as `name`), and for each point writes two survivors (every
// unsynced write kept; a subset kept) to `path` and calls
// judge(how far the workload got). Stops at the first failure; returns the
// survivors judged.
int CrashEverywhere(const std::string& initial_file, const std::string& name, Counts from,
                    Counts to, const std::function<int(Image&)>& workload, const std::string& path,
                    const std::function<void(int)>& judge) {
  int points = 0;
  for (int at_sync = 0; at_sync < 2; at_sync++) {
    const uint64_t first = at_sync ? from.syncs : from.ops;
    const uint64_t last = at_sync ? to.syncs : to.ops;
    for (uint64_t n = first; n < last; n++) {
      auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
      if (at_sync) {
        f->CrashAtSync(n);
      } else {
        f->CrashAfter(n);
      }
      int reached;
      {
        auto image = OpenOnFaultyFile(f, name);
        EXPECT_TRUE(image.ok()) << Describe(image.status());
        if (!image.ok()) return points;
        reached = workload(**image);
      }
      EXPECT_TRUE(f->crashed());
      const std::string where =
          std::string(at_sync ? "crash at sync " : "crash at op ") + std::to_string(n);
      int policy = 0;
      for (const std::string& image : {f->DurableImageKeepAll(), f->DurableImage(n * 2 + 1)}) {
        SCOPED_TRACE(where + ", survivors policy " + std::to_string(policy++));
        points++;
        EXPECT_TRUE(WriteWholeFile(path, image));
        EXPECT_EQ(JudgeAndRepair(path), "");
        judge(reached);
        if (::testing::Test::HasFailure()) return points;
      }
    }
  }
  return points;
}

TEST(SnapshotCrashTest, EveryCrashPointLeavesNoSnapshotOrAWholeOne) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  const std::string fresh = dir.Join("fresh.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=4k " + ShellQuote(fresh) + " 1M"));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x11 0 256k", "write -P 0x12 512k 64k"}));
  ASSERT_TRUE(QemuImg("snapshot -c old " + ShellQuote(fresh)));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x13 128k 256k"}));
  std::string initial_file, old_disk;
  ASSERT_TRUE(ReadWholeFile(fresh, &initial_file));
  {
    auto d = SnapshotDisk(dir, fresh, "old");
    ASSERT_TRUE(d.has_value());
    old_disk = *d;
  }
  ASSERT_TRUE(QemuConvertToRaw(fresh, dir.Join("active.raw")));
  std::string disk;
  ASSERT_TRUE(ReadWholeFile(dir.Join("active.raw"), &disk));
  const std::string update(96 << 10, 'u');
  disk.replace(300 << 10, update.size(), update);  // the flushed write below
  const std::string after_snapshot(64 << 10, 'v');

  // The workload: a flushed write, take "new", write more, drop "old".
  // Returns how far it got (0: the flushed write, 1: "new" taken, 2:
  // "old" dropped and flushed).
  auto workload = [&](Image& image) {
    if (!image.Write(300 << 10, AsBytes(update)).ok() || !image.Flush().ok()) return -1;
    if (!image.CreateSnapshot("new").ok()) return 0;
    if (!image.Write(0, AsBytes(after_snapshot)).ok()) return 1;
    if (!image.DeleteSnapshot("old").ok() || !image.Flush().ok()) return 1;
    return 2;
  };

  Counts from, to;
  {
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    auto image = OpenOnFaultyFile(f, fresh);
    ASSERT_TRUE(image.ok()) << Describe(image.status());
    ASSERT_TRUE((*image)->Write(300 << 10, AsBytes(update)).ok());
    ASSERT_TRUE((*image)->Flush().ok());
    from = {f->mutating_ops(), f->syncs()};
  }
  {
    const std::string done = dir.Join("done.qcow2");
    ASSERT_TRUE(RunWhole(initial_file, fresh, workload, 2, done, &to));
    ASSERT_FALSE(SnapshotDisk(dir, done, "old").has_value());
    ASSERT_EQ(SnapshotDisk(dir, done, "new"), disk);
  }
  ASSERT_GT(to.ops, from.ops);

  const std::string path = dir.Join("crashed.qcow2");
  const int points =
      CrashEverywhere(initial_file, fresh, from, to, workload, path, [&](int reached) {
        // The write flushed before the snapshot survives; each snapshot is
        // absent or whole.
        const auto taken = SnapshotDisk(dir, path, "new");
        if (taken) {
          EXPECT_TRUE(*taken == disk) << "snapshot 'new' exists but is not the disk it took";
        }
        if (reached >= 2) {
          EXPECT_TRUE(taken.has_value());
        }
        const auto old = SnapshotDisk(dir, path, "old");
        if (old) {
          EXPECT_TRUE(*old == old_disk) << "snapshot 'old' exists but changed";
        }
        std::string active;
        ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("crashed.raw")));
        ASSERT_TRUE(ReadWholeFile(dir.Join("crashed.raw"), &active));
        EXPECT_TRUE(active.compare(300 << 10, update.size(), update) == 0)
            << "a flushed write was lost";
      });
  EXPECT_GT(points, 20);
  // Crashes inside the window do happen here: they must have been marked.
  EXPECT_GT(dirty_survivors, 1);
  std::printf("%d crash images judged; %d marked dirty and repaired on open\n", points,
              dirty_survivors);
}

// Power cut at every write and sync of a revert (qcow2fs-img snapshot
// apply): the survivor's disk is the one before or the snapshot's, whole;
// the snapshot stays; QEMU's check finds at worst leaks. (A revert has no
// window where flags disagree with refcounts: what the new active disk
// reaches, the snapshot reaches too. So no survivor is marked dirty.)
TEST(SnapshotCrashTest, EveryCrashPointOfARevertLeavesOneDiskOrTheOther) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  TempDir dir;
  const std::string fresh = dir.Join("fresh.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=4k " + ShellQuote(fresh) + " 1M"));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x21 0 256k", "write -P 0x22 512k 64k"}));
  ASSERT_TRUE(QemuImg("snapshot -c old " + ShellQuote(fresh)));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x23 128k 256k", "write -z 512k 32k"}));
  std::string initial_file, current;
  ASSERT_TRUE(ReadWholeFile(fresh, &initial_file));
  const auto old_disk = SnapshotDisk(dir, fresh, "old");
  ASSERT_TRUE(old_disk.has_value());
  ASSERT_TRUE(QemuConvertToRaw(fresh, dir.Join("current.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("current.raw"), &current));
  ASSERT_NE(current, *old_disk);

  // Returns 1 once the revert is done and flushed, 0 before.
  auto workload = [](Image& image) {
    auto* qcow2 = dynamic_cast<Qcow2Image*>(&image);
    if (!qcow2 || !qcow2->RevertToSnapshot("old").ok() || !image.Flush().ok()) return 0;
    return 1;
  };
  Counts from, to;
  {
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    ASSERT_TRUE(OpenOnFaultyFile(f, fresh).ok());
    from = {f->mutating_ops(), f->syncs()};
  }
  {
    const std::string done = dir.Join("done.qcow2");
    ASSERT_TRUE(RunWhole(initial_file, fresh, workload, 1, done, &to));
    ASSERT_TRUE(QemuConvertToRaw(done, dir.Join("done.raw")));
    std::string reverted;
    ASSERT_TRUE(ReadWholeFile(dir.Join("done.raw"), &reverted));
    ASSERT_TRUE(reverted == *old_disk);
  }
  ASSERT_GT(to.ops, from.ops);

  const int dirty_before = dirty_survivors;
  const std::string path = dir.Join("crashed.qcow2");
  const int points =
      CrashEverywhere(initial_file, fresh, from, to, workload, path, [&](int reached) {
        std::string active;
        ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("crashed.raw")));
        ASSERT_TRUE(ReadWholeFile(dir.Join("crashed.raw"), &active));
        EXPECT_TRUE(active == current || active == *old_disk)
            << "the disk is neither the one before the revert nor the snapshot's";
        if (reached >= 1) {
          EXPECT_TRUE(active == *old_disk) << "a finished revert was lost";
        }
        EXPECT_EQ(SnapshotDisk(dir, path, "old"), old_disk) << "the snapshot changed or went";
      });
  EXPECT_GT(points, 10);
  EXPECT_EQ(dirty_survivors, dirty_before) << "a revert marked the image dirty";
  std::printf("%d crash images judged\n", points);
}

}  // namespace
}  // namespace qcow2fs::test
