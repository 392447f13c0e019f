// Concurrency stress in the spirit of QEMU's qcow2-discard-during-rewrite:
// writers, rewriters, discarders, zero-writers, readers and a flusher run at
// once on overlapping and disjoint ranges. Every 512-byte sector written
// names its own guest offset and carries a checksum, so a reader can tell a
// sector that belongs where it was read (or zeros) from data of another
// cluster, which is what a host cluster freed and reused under an in-flight
// request would show. Meant to run under ThreadSanitizer as well.
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "base/sync_point.h"
#include "engine/image_open.h"
#include "forwarding_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kSector = 512;

uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}

// Fills `buf` (sector multiple) with sectors for guest offset `offset`.
void FillSectors(std::string& buf, uint64_t offset, uint64_t tag) {
  for (uint64_t s = 0; s < buf.size(); s += kSector) {
    const uint64_t where = offset + s;
    uint64_t words[kSector / 8];
    words[0] = where;
    words[1] = tag;
    for (size_t i = 2; i < kSector / 8; i++) words[i] = Mix(where ^ (tag << 20) ^ i);
    std::memcpy(buf.data() + s, words, kSector);
  }
}

// Returns an empty string if every sector is zeros or names its own offset;
// otherwise a description of the first bad one.
std::string CheckSectors(const std::string& buf, uint64_t offset) {
  for (uint64_t s = 0; s < buf.size(); s += kSector) {
    const char* p = buf.data() + s;
    if (AllZero({p, kSector})) continue;
    uint64_t words[kSector / 8];
    std::memcpy(words, p, kSector);
    const uint64_t where = offset + s;
    // Only the offset word is checked: a read racing an in-place rewrite of
    // the same sector may legitimately see a mix of the two writes, but
    // both name this offset; a reused cluster shows another offset.
    if (words[0] != where) {
      return "sector at " + std::to_string(where) + " holds data for offset " +
             std::to_string(words[0]);
    }
  }
  return {};
}

// Stalls some reads so that requests sit between mapping and I/O for a
// while: the window in which a wrongly freed cluster could be reused.
// A read of the gated host range also stops at the gate until it opens
// (or, as a guard against a hung test, two minutes pass), so a test can act
// while a request is in flight.
class SlowReadFile final : public ForwardingFile {
 public:
  explicit SlowReadFile(std::unique_ptr<File> f) : ForwardingFile(*f), f_(std::move(f)) {}
  Status ReadAt(uint64_t o, std::span<std::byte> b) override {
    if ((counter_.fetch_add(1) & 3) == 0)
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    {
      std::unique_lock lock(mu_);
      if (gated_ && o < gate_offset_ + gate_length_ && gate_offset_ < o + b.size()) {
        in_gate_ = true;
        cv_.notify_all();
        cv_.wait_for(lock, std::chrono::seconds(120), [&] { return !gated_; });
      }
    }
    return f_->ReadAt(o, b);
  }
  void CloseGate(uint64_t offset, uint64_t length) {
    std::lock_guard lock(mu_);
    gated_ = true;
    in_gate_ = false;
    gate_offset_ = offset;
    gate_length_ = length;
  }
  void WaitUntilInGate() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return in_gate_; });
  }
  void OpenGate() {
    std::lock_guard lock(mu_);
    gated_ = false;
    cv_.notify_all();
  }

 private:
  std::unique_ptr<File> f_;
  std::atomic<uint64_t> counter_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool gated_ = false, in_gate_ = false;
  uint64_t gate_offset_ = 0, gate_length_ = 0;
};

struct StressCase {
  std::string name;
  std::string create_options;
  uint64_t cluster_size;
};

class ConcurrencyStressTest : public ::testing::TestWithParam<StressCase> {};

TEST_P(ConcurrencyStressTest, NoRequestSeesAFreedClusterReused) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const StressCase& sc = GetParam();
  const uint64_t cs = sc.cluster_size;
  TempDir dir;
  const std::string path = dir.Join("stress.qcow2");
  // Layout: [0, 8M) shared churn; [8M, 12M) one private range per writer;
  // [12M, 16M) fresh clusters written in halves by two threads at once.
  ASSERT_TRUE(
      QemuImg("create -q -f qcow2 -o " + sc.create_options + " " + ShellQuote(path) + " 16M"));
  OpenOptions options;
  options.read_only = false;
  options.l2_cache_bytes = 4 * cs;
  auto file = OpenPosixFile(path, true);
  ASSERT_TRUE(file.ok()) << Describe(file.status());
  auto opened = OpenQcow2(std::make_unique<SlowReadFile>(std::move(file).value()), path, options,
                          HostFileOpener(false));
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  std::unique_ptr<Image> owner = std::move(opened).value();
  Image& image = *owner;

  constexpr uint64_t kShared = 8 << 20;
  constexpr uint64_t kPrivateBase = 8 << 20, kPrivateSize = 2 << 20;
  constexpr uint64_t kHalvesBase = 12 << 20, kHalvesSize = 4 << 20;
  const int iterations = 400;
  std::atomic<int> failures{0};
  std::vector<std::string> errors(16);
  auto fail = [&](int who, const std::string& what) {
    if (failures.fetch_add(1) < 1) errors[static_cast<size_t>(who)] = what;
  };

  std::vector<std::thread> threads;
  // Rewriters: sector-sized to multi-cluster writes across the shared range.
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      Rng rng(100 + static_cast<uint64_t>(t));
      for (int i = 0; i < iterations && !failures; i++) {
        const uint64_t off = rng.Uniform(0, kShared / kSector - 1) * kSector;
        const uint64_t len = std::min(kShared - off, rng.Uniform(1, 3 * cs / kSector) * kSector);
        std::string buf(len, '\0');
        FillSectors(buf, off, static_cast<uint64_t>(t * 100000 + i));
        Status s = image.Write(off, AsBytes(buf));
        if (!s.ok()) fail(t, "write: " + Describe(s));
      }
    });
  }
  // Discarder and zero-writer on whole and partial clusters of the same range.
  threads.emplace_back([&] {
    Rng rng(200);
    for (int i = 0; i < iterations && !failures; i++) {
      const uint64_t off = rng.Uniform(0, kShared / cs - 1) * cs;
      const uint64_t len = std::min(kShared - off, rng.Uniform(1, 4) * cs);
      Status s = (i % 3 == 0) ? image.WriteZeroes(off, len, i % 2 == 0) : image.Discard(off, len);
      if (!s.ok()) fail(2, "discard: " + Describe(s));
    }
  });
  // Readers: everything read must be zeros or sectors that belong there.
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      Rng rng(300 + static_cast<uint64_t>(t));
      for (int i = 0; i < iterations * 2 && !failures; i++) {
        const uint64_t off = rng.Uniform(0, kShared / kSector - 1) * kSector;
        const uint64_t len = std::min(kShared - off, rng.Uniform(1, 4 * cs / kSector) * kSector);
        std::string buf(len, '\0');
        Status s = image.Read(off, AsWritableBytes(buf));
        if (!s.ok()) {
          fail(3 + t, "read: " + Describe(s));
          continue;
        }
        std::string bad = CheckSectors(buf, off);
        if (!bad.empty()) fail(3 + t, bad);
      }
    });
  }
  // Private writers: exact read-back of their own data.
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      Rng rng(400 + static_cast<uint64_t>(t));
      const uint64_t base = kPrivateBase + static_cast<uint64_t>(t) * kPrivateSize;
      for (int i = 0; i < iterations && !failures; i++) {
        const uint64_t off = base + rng.Uniform(0, kPrivateSize / kSector - 1) * kSector;
        const uint64_t len =
            std::min(base + kPrivateSize - off, rng.Uniform(1, 2 * cs / kSector) * kSector);
        std::string buf(len, '\0');
        FillSectors(buf, off, static_cast<uint64_t>(i));
        Status s = image.Write(off, AsBytes(buf));
        std::string back(len, '\0');
        if (s.ok()) s = image.Read(off, AsWritableBytes(back));
        if (!s.ok())
          fail(5 + t, Describe(s));
        else if (back != buf)
          fail(5 + t, "private range read back wrong at " + std::to_string(off));
      }
    });
  }
  // Two writers fill the two halves of the same fresh clusters at once:
  // neither half may be lost, no cluster allocated twice.
  std::barrier sync_point(2);
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      const uint64_t half = cs / 2;
      for (uint64_t c = kHalvesBase; c < kHalvesBase + kHalvesSize; c += cs) {
        sync_point.arrive_and_wait();
        std::string buf(half, '\0');
        FillSectors(buf, c + static_cast<uint64_t>(t) * half, 7);
        Status s = image.Write(c + static_cast<uint64_t>(t) * half, AsBytes(buf));
        if (!s.ok()) fail(7 + t, Describe(s));
      }
      sync_point.arrive_and_drop();  // never leave the partner waiting
    });
  }
  // Flusher.
  threads.emplace_back([&] {
    for (int i = 0; i < 40 && !failures; i++) {
      Status s = image.Flush();
      if (!s.ok()) fail(9, "flush: " + Describe(s));
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  for (auto& th : threads) th.join();
  for (const auto& e : errors) EXPECT_TRUE(e.empty()) << e;
  ASSERT_EQ(failures.load(), 0);

  // Both halves of every fresh cluster are there.
  std::string halves(kHalvesSize, '\0'), expect(kHalvesSize, '\0');
  ASSERT_TRUE(image.Read(kHalvesBase, AsWritableBytes(halves)).ok());
  FillSectors(expect, kHalvesBase, 7);
  EXPECT_TRUE(BuffersEqual(expect, halves, kHalvesBase, "half-written clusters"));
  owner.reset();  // close the image: final write-back

  std::string out;
  EXPECT_TRUE(QemuImg("check " + ShellQuote(path), &out)) << out;
}

// The deterministic core of the stress test: a read is held between its
// host-offset lookup and its I/O while another thread discards the cluster,
// flushes (which frees it) and writes elsewhere (which would reuse it). The
// read must still return the data it was mapped to.
TEST(DiscardDuringReadTest, InFlightReadKeepsItsCluster) {
  ASSERT_TRUE(SyncPoints::compiled_in()) << "tests must link the core built with sync points";
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ScopedSyncPoints sync_points;
  TempDir dir;
  const std::string path = dir.Join("gate.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k " + ShellQuote(path) + " 4M"));
  OpenOptions options;
  options.read_only = false;
  auto file = OpenPosixFile(path, true);
  ASSERT_TRUE(file.ok());
  auto* gate = new SlowReadFile(std::move(file).value());
  auto opened = OpenQcow2(std::unique_ptr<File>(gate), path, options, HostFileOpener(false));
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  std::unique_ptr<Image> image = std::move(opened).value();

  const uint64_t a = 1 << 20, b = 2 << 20, cs = 65536;
  std::string data_a(cs, '\0'), data_b(cs, '\0');
  FillSectors(data_a, a, 1);
  FillSectors(data_b, b, 2);
  ASSERT_TRUE(image->Write(a, AsBytes(data_a)).ok());
  ASSERT_TRUE(image->Flush().ok());
  auto st = image->GetBlockStatus(a, cs);
  ASSERT_TRUE(st.ok() && st->host_offset);
  gate->CloseGate(*st->host_offset, cs);

  std::string got(cs, '\0');
  std::thread reader([&] { EXPECT_TRUE(image->Read(a, AsWritableBytes(got)).ok()); });
  gate->WaitUntilInGate();
  std::thread churn([&] {
    EXPECT_TRUE(image->Discard(a, cs).ok());
    EXPECT_TRUE(image->Flush().ok());
    EXPECT_TRUE(image->Write(b, AsBytes(data_b)).ok());
    SyncPoints::Reached("Test:ChurnDone", 0);
  });
  // Open the gate once the discard waits for the read (the core passes
  // Discard:WaitingForRequests only then), or once a wrong implementation
  // has freed and reused the cluster under it.
  EXPECT_GE(SyncPoints::WaitUntilAnyReached({"Discard:WaitingForRequests", "Test:ChurnDone"}), 0)
      << "neither the discard nor the churn got anywhere";
  gate->OpenGate();
  reader.join();
  churn.join();
  EXPECT_EQ(CheckSectors(got, a), "");
  EXPECT_TRUE(BuffersEqual(data_a, got, a, "in-flight read"));
  image.reset();
  std::string out;
  EXPECT_TRUE(QemuImg("check " + ShellQuote(path), &out)) << out;
}

INSTANTIATE_TEST_SUITE_P(Images, ConcurrencyStressTest,
                         ::testing::Values(StressCase{"v3_64k", "cluster_size=64k", 65536},
                                           StressCase{"v3_4k", "cluster_size=4k", 4096},
                                           StressCase{"extended_l2_64k",
                                                      "cluster_size=64k,extended_l2=on", 65536}),
                         [](const auto& param_info) { return param_info.param.name; });

}  // namespace
}  // namespace qcow2fs::test
