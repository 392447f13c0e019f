// Crash safety under concurrency: three writers (random unaligned writes,
// zero-writes and discards, each in its own third of the disk) and a thread
// that flushes over and over run against one image whose file loses power
// at a chosen Sync() or mutating operation. For every crash point the
// surviving file is built with several keep-policies for the unsynced
// writes (keep all, keep none, seeded random subsets); each must pass
// `qemu-img check` (leaks allowed) and read back, through qcow2fs:
//   - every byte whose last change completed before the start of the last
//     Flush() that returned OK, and that nothing touched afterwards, exactly;
//   - every other byte as its value at that flush or as the value one of the
//     later operations on it wrote.
//
// Failures name the image kind, the seed and the crash point. The workload
// seed can be changed with QCOW2FS_CRASH_SEED=<n> to explore further.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "engine/image_open.h"
#include "forwarding_file.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr int kWriters = 3;
constexpr int kOpsPerWriter = 24;
constexpr uint64_t kDiskSize = 6 << 20;
constexpr uint64_t kRegion = kDiskSize / kWriters;
// Crash points tried per image kind (sampled evenly when there are more).
constexpr uint64_t kMaxSyncPoints = 16;
constexpr uint64_t kMaxOpPoints = 6;
// Writers wait while this many operations have completed since the start
// of the last flush, so flushes interleave with the writes instead of
// losing the race to them.
constexpr uint64_t kOpsPerFlush = 4;

enum class Backing { kNone, kRaw, kQcow2 };

struct CrashKind {
  std::string name;
  std::string create_options;
  uint64_t cluster_size;
  Backing backing = Backing::kNone;
  uint64_t l2_cache_tables = 0;  // 0: the default cache
  bool compress = false;         // zstd staging cache
  bool snapshot = false;         // an internal snapshot taken before opening
};

void PrintTo(const CrashKind& kind, std::ostream* os) { *os << kind.name; }

// One guest operation of a writer, as the model needs it.
struct Op {
  uint64_t offset = 0;
  uint64_t length = 0;
  std::string data;  // what the range reads as once the op is done
  bool ok = false;
  uint64_t end_tick = UINT64_MAX;  // clock after the op returned OK
};

struct RunResult {
  std::vector<Op> ops[kWriters];
  uint64_t last_ok_flush_start = 0;  // 0: no flush succeeded
  uint64_t flushes_ok = 0;
};

// Runs the concurrent workload on `image` until it ends or the file dies.
RunResult RunWorkload(Image& image, uint64_t seed, uint64_t cluster_size) {
  RunResult r;
  std::atomic<uint64_t> clock{1};
  std::atomic<uint64_t> completed{0};
  std::atomic<uint64_t> flushed_upto{0};  // `completed` when the last flush began
  std::atomic<bool> flusher_running{true};
  std::atomic<int> writers_left{kWriters};
  std::atomic<bool> failed{false};

  auto writer = [&](int t) {
    Rng rng(seed * 1000003 + static_cast<uint64_t>(t));
    const uint64_t base = static_cast<uint64_t>(t) * kRegion;
    for (int i = 0; i < kOpsPerWriter && !failed.load(); i++) {
      while (flusher_running.load() && !failed.load() &&
             completed.load() >= flushed_upto.load() + kOpsPerFlush + 2) {
        std::this_thread::yield();
      }
      Op op;
      const uint64_t kind = rng.Uniform(0, 19);
      op.offset = base + rng.Uniform(0, kRegion - 1);
      op.length =
          std::min<uint64_t>(base + kRegion - op.offset,
                             rng.Uniform(1, kind < 2 ? 4 * cluster_size : 2 * cluster_size));
      Status s;
      if (kind < 14) {
        op.data = RandomBytes(op.length, seed ^ (static_cast<uint64_t>(t) << 32) ^ i);
        // Some writes fill whole aligned clusters, so zero/discard paths
        // and full-cluster allocation are exercised too.
        if (kind == 13) {
          op.offset = base + rng.Uniform(0, kRegion / cluster_size - 2) * cluster_size;
          op.length =
              std::min<uint64_t>(base + kRegion - op.offset, cluster_size * rng.Uniform(1, 2));
          op.data = SemiCompressible(op.length, seed + i);
        }
        s = image.Write(op.offset, AsBytes(op.data));
      } else if (kind < 17) {
        op.data.assign(op.length, '\0');
        s = image.WriteZeroes(op.offset, op.length, kind == 16);
      } else {
        op.data.assign(op.length, '\0');
        s = image.Discard(op.offset, op.length);
      }
      op.ok = s.ok();
      if (op.ok) op.end_tick = clock.fetch_add(1);
      r.ops[t].push_back(std::move(op));
      completed.fetch_add(1);
      if (!s.ok()) {
        failed.store(true);
        break;
      }
    }
    writers_left.fetch_sub(1);
  };

  auto flusher = [&] {
    while (writers_left.load() > 0 && !failed.load()) {
      // Flush after every few completed operations, so the number of
      // flushes (and sync points) stays bounded.
      const uint64_t now = completed.load();
      if (now < flushed_upto.load() + kOpsPerFlush) {
        std::this_thread::yield();
        continue;
      }
      flushed_upto.store(now);
      const uint64_t start = clock.fetch_add(1);
      if (!image.Flush().ok()) {
        failed.store(true);
        break;
      }
      r.last_ok_flush_start = start;
      r.flushes_ok++;
    }
    flusher_running.store(false);
  };

  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; t++) threads.emplace_back(writer, t);
  threads.emplace_back(flusher);
  for (auto& th : threads) th.join();
  if (!failed.load()) {
    const uint64_t start = clock.fetch_add(1);
    if (image.Flush().ok()) {
      r.last_ok_flush_start = start;
      r.flushes_ok++;
    }
  }
  return r;
}

// Checks `disk` (as read back after the crash) against the model.
::testing::AssertionResult CheckAgainstModel(const std::string& initial, const RunResult& r,
                                             const std::string& disk) {
  const uint64_t f = r.last_ok_flush_start;
  for (int t = 0; t < kWriters; t++) {
    const uint64_t base = static_cast<uint64_t>(t) * kRegion;
    std::string flushed = initial.substr(base, kRegion);
    std::vector<const Op*> later;
    for (const Op& op : r.ops[t]) {
      if (op.ok && op.end_tick < f) {
        flushed.replace(op.offset - base, op.length, op.data);
      } else {
        later.push_back(&op);
      }
    }
    for (uint64_t i = 0; i < kRegion; i++) {
      const char got = disk[base + i];
      if (got == flushed[i]) continue;
      const uint64_t p = base + i;
      bool possible = false;
      bool touched = false;
      for (const Op* op : later) {
        if (p < op->offset || p >= op->offset + op->length) continue;
        touched = true;
        if (op->data[p - op->offset] == got) {
          possible = true;
          break;
        }
      }
      if (!possible) {
        std::ostringstream msg;
        msg << "writer " << t << ": guest byte " << p << " reads 0x" << std::hex
            << (static_cast<unsigned>(got) & 0xff) << ", expected 0x"
            << (static_cast<unsigned>(flushed[i]) & 0xff) << std::dec
            << (touched ? " or a value a later operation wrote"
                        : " (flushed, not touched afterwards)")
            << "; " << r.flushes_ok << " flushes succeeded";
        // Which operations covered the byte, for the report.
        for (const Op& op : r.ops[t]) {
          if (p >= op.offset && p < op.offset + op.length) {
            msg << "\n  op [" << op.offset << ", +" << op.length << ") ok=" << op.ok
                << " end_tick=" << op.end_tick << " byte=0x" << std::hex
                << (static_cast<unsigned>(op.data[p - op.offset]) & 0xff) << std::dec;
          }
        }
        msg << "\n  last successful flush started at tick " << f;
        return ::testing::AssertionFailure() << msg.str();
      }
    }
  }
  return ::testing::AssertionSuccess();
}

uint64_t BaseSeed() {
  const char* env = std::getenv("QCOW2FS_CRASH_SEED");
  return env ? std::strtoull(env, nullptr, 0) : 1;
}

class ConcurrentCrashTest : public ::testing::TestWithParam<CrashKind> {};

TEST_P(ConcurrentCrashTest, CrashAtSyncsAndWritesWhileWritingAndFlushing) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const CrashKind& kind = GetParam();
  TempDir dir;
  const std::string fresh = dir.Join("fresh.qcow2");
  const std::string size = std::to_string(kDiskSize);
  std::string backing_args;
  if (kind.backing == Backing::kRaw) {
    std::string base(kDiskSize, '\0');
    for (uint64_t i = 0; i < kDiskSize; i++) base[i] = static_cast<char>(0x30 + (i / 4096) % 64);
    ASSERT_TRUE(WriteWholeFile(dir.Join("base.raw"), base));
    backing_args = " -b base.raw -F raw";
  } else if (kind.backing == Backing::kQcow2) {
    const std::string base = dir.Join("base.qcow2");
    ASSERT_TRUE(QemuImg("create -q -f qcow2 " + ShellQuote(base) + " " + size));
    ASSERT_TRUE(QemuIo(base, {"write -P 0x3c 0 " + size, "write -P 0xc3 1M 1M"}));
    backing_args = " -b base.qcow2 -F qcow2";
  }
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o " + kind.create_options + backing_args + " " +
                      ShellQuote(fresh) + " " + size));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x5a 0 1M", "write -P 0xa5 3M 512k", "write -z 4608k 64k"}));
  if (kind.snapshot) {
    ASSERT_TRUE(QemuImg("snapshot -c before " + ShellQuote(fresh)));
    ASSERT_TRUE(QemuIo(fresh, {"write -P 0x77 2M 256k"}));
  }
  std::string initial_file, initial_disk;
  ASSERT_TRUE(ReadWholeFile(fresh, &initial_file));
  ASSERT_TRUE(QemuConvertToRaw(fresh, dir.Join("fresh.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("fresh.raw"), &initial_disk));
  ASSERT_EQ(initial_disk.size(), kDiskSize);

  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  if (kind.l2_cache_tables) options.l2_cache_bytes = kind.l2_cache_tables * kind.cluster_size;
  if (kind.compress) options.compress = CompressionType::kZstd;
  const FileOpener opener = [](const std::string& path,
                               bool writable) -> Result<std::unique_ptr<File>> {
    if (writable) return Status(ErrorCode::kNotFound, "no writable files but the image");
    return OpenPosixFile(path, false);
  };
  const uint64_t seed0 = BaseSeed();

  // One run without a crash: how many syncs and mutating operations the
  // workload performs (the count varies with the interleaving).
  uint64_t total_syncs, total_ops;
  {
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    RunResult r;
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, opener);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      r = RunWorkload(**image, seed0, kind.cluster_size);
    }
    ASSERT_FALSE(f->crashed());
    total_syncs = f->syncs();
    total_ops = f->mutating_ops();
    ASSERT_GT(r.flushes_ok, 3u);
    ASSERT_GT(total_syncs, 5u);
    // Without a crash everything was flushed: the file must match exactly.
    const std::string after = dir.Join("after.qcow2");
    ASSERT_TRUE(WriteWholeFile(after, f->CurrentImage()));
    CommandResult check = RunCommand("qemu-img check " + ShellQuote(after));
    ASSERT_EQ(check.exit_code, 0) << check.output;
    OpenOptions ro;
    ro.lock = false;
    auto reopened = Image::Open(after, ro);
    ASSERT_TRUE(reopened.ok()) << Describe(reopened.status());
    std::string disk(kDiskSize, '\0');
    ASSERT_TRUE((*reopened)->Read(0, AsWritableBytes(disk)).ok());
    ASSERT_TRUE(CheckAgainstModel(initial_disk, r, disk)) << "seed " << seed0 << ", no crash";
  }

  struct Point {
    bool at_sync;
    uint64_t n;
  };
  std::vector<Point> points;
  const uint64_t sync_step =
      std::max<uint64_t>(1, (total_syncs + kMaxSyncPoints - 1) / kMaxSyncPoints);
  for (uint64_t n = 0; n < total_syncs; n += sync_step) points.push_back({true, n});
  const uint64_t op_step = std::max<uint64_t>(1, total_ops / kMaxOpPoints);
  for (uint64_t n = op_step / 2; n < total_ops; n += op_step) points.push_back({false, n});

  int crashes = 0, checked = 0;
  for (size_t pi = 0; pi < points.size(); pi++) {
    const Point& pt = points[pi];
    const uint64_t seed = seed0 * 7919 + pi;
    const std::string where = std::string(pt.at_sync ? "CrashAtSync(" : "CrashAfter(") +
                              std::to_string(pt.n) + ") of " +
                              std::to_string(pt.at_sync ? total_syncs : total_ops) +
                              (pt.at_sync ? " syncs" : " mutating ops");
    SCOPED_TRACE("kind " + kind.name + ", workload seed " + std::to_string(seed) + " (base " +
                 std::to_string(seed0) + "), " + where);
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    if (pt.at_sync) {
      f->CrashAtSync(pt.n);
    } else {
      f->CrashAfter(pt.n);
    }
    RunResult r;
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, opener);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      r = RunWorkload(**image, seed, kind.cluster_size);
    }
    // Another interleaving may sync less often than the counting run.
    if (f->crashed()) crashes++;

    struct Policy {
      std::string name;
      std::function<std::string()> build;
    };
    std::vector<Policy> policies = {
        {"keep all", [&] { return f->DurableImageKeepAll(); }},
        {"keep none", [&] { return f->DurableImageKeepNone(); }},
        {"random subset, seed " + std::to_string(seed), [&] { return f->DurableImage(seed); }},
        // Only the newest half of the unsynced writes: metadata written
        // last survives, the data written before it does not.
        {"keep newest half",
         [&] {
           const uint64_t n = f->unsynced_writes();
           return f->DurableImage(
               [n](const FaultInjectionFile::UnsyncedWrite& w) { return w.index >= n / 2; });
         }},
        // Only the oldest half: an in-order write cache.
        {"keep oldest half",
         [&] {
           const uint64_t n = f->unsynced_writes();
           return f->DurableImage(
               [n](const FaultInjectionFile::UnsyncedWrite& w) { return w.index < n / 2; });
         }},
    };
    std::unordered_set<size_t> seen;
    for (const Policy& policy : policies) {
      SCOPED_TRACE("durable image: " + policy.name + " of " + std::to_string(f->unsynced_writes()) +
                   " unsynced writes");
      const std::string durable = policy.build();
      if (!seen.insert(std::hash<std::string>{}(durable)).second) continue;
      checked++;
      const std::string after = dir.Join("after.qcow2");
      ASSERT_TRUE(WriteWholeFile(after, durable));
      CommandResult check = RunCommand("qemu-img check " + ShellQuote(after));
      // 0: clean, 3: leaked clusters only. Anything else is corruption.
      ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
      ASSERT_EQ(check.output.find("ERROR"), std::string::npos) << check.output;
      OpenOptions ro;
      ro.lock = false;
      auto reopened = Image::Open(after, ro);
      ASSERT_TRUE(reopened.ok()) << Describe(reopened.status());
      std::string disk(kDiskSize, '\0');
      Status rs = (*reopened)->Read(0, AsWritableBytes(disk));
      ASSERT_TRUE(rs.ok()) << Describe(rs);
      ASSERT_TRUE(CheckAgainstModel(initial_disk, r, disk));
    }
  }
  // Interleavings differ in how often they sync, so not every point is
  // reached in every run; most must be.
  EXPECT_GE(crashes, static_cast<int>(points.size() / 3));
  RecordProperty("crash_points", static_cast<int>(points.size()));
  RecordProperty("images_checked", checked);
  std::printf(
      "[ %s ] %llu syncs, %llu mutating ops in the counting run; %d crashes of %zu "
      "points; %d durable images checked\n",
      kind.name.c_str(), static_cast<unsigned long long>(total_syncs),
      static_cast<unsigned long long>(total_ops), crashes, points.size(), checked);
}

INSTANTIATE_TEST_SUITE_P(
    Images, ConcurrentCrashTest,
    ::testing::Values(
        CrashKind{"v3_64k", "cluster_size=64k", 65536},
        CrashKind{"v3_4k_tiny_l2_cache", "cluster_size=4k", 4096, Backing::kNone, 1},
        CrashKind{"extended_l2_backing", "cluster_size=64k,extended_l2=on", 65536, Backing::kQcow2},
        CrashKind{"backing_raw", "cluster_size=64k", 65536, Backing::kRaw},
        CrashKind{"refcount_bits_1", "cluster_size=16k,refcount_bits=1", 16384},
        CrashKind{"compat_0_10", "compat=0.10", 65536},
        CrashKind{"compress_zstd", "cluster_size=64k,compression_type=zstd", 65536, Backing::kNone,
                  0, true},
        CrashKind{"internal_snapshot", "cluster_size=64k", 65536, Backing::kNone, 0, false, true}),
    [](const auto& param_info) { return param_info.param.name; });

}  // namespace
}  // namespace qcow2fs::test
