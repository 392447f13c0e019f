// Exact-model concurrency stress of the core Image API.
//
// Several threads run Write, WriteZeroes (may_unmap either way), Discard,
// Read, Flush and Resize (grow) at once on one image, while a shadow model
// knows every guest byte:
//
//  * the committed value of each byte: the result of the last completed
//    write / zero-write / discard covering it;
//  * every mutating operation's interval on a global sequence counter
//    (taken before the call starts and after it returns, under the model
//    mutex, so the model's interval always contains the real one).
//
// A read must return, for every byte, either the value committed when the
// read started or the value some operation overlapping that byte would
// leave there, where that operation was in flight at some point during the
// read. Written data is a pure function of (tag, guest offset), so the
// candidate values of a byte are cheap to compute; value collisions are
// harmless because membership in the candidate set is what is checked.
//
// Mutating operations take a byte-exact range lock in the test, so two of
// them never touch the same byte at once and the final content is exact;
// they do share clusters (two writers on disjoint bytes of one cluster is
// exactly where lost-write bugs live, and two "pair" threads do that on
// purpose). Reads take no lock.
//
// At the end the image is flushed, compared with the model through the
// image, closed, checked with `qemu-img check` (exit 0: no corruption and
// no leaks -- the core documents leaks only after a crash), compared with
// the model by `qemu-img compare`, and reopened and compared again.
//
// Replay: QCOW2FS_STRESS_SEED=N. Length: QCOW2FS_STRESS_SECONDS (per image
// kind) and/or QCOW2FS_STRESS_OPS (mutating+read operations per image kind
// over all mixed threads). The seed is printed at the start of every case
// and in every failure message. Thread interleavings are not reproducible,
// so a seed replays the operation mix, not the exact schedule.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qcow2fs/image.h"
#include "test_support.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define QCOW2FS_MODEL_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define QCOW2FS_MODEL_SANITIZED 1
#endif
#endif
#ifndef QCOW2FS_MODEL_SANITIZED
#define QCOW2FS_MODEL_SANITIZED 0
#endif

namespace qcow2fs::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kInitialSize = 16 * kMiB;
constexpr uint64_t kBackingSize = 12 * kMiB;  // shorter than the top image
constexpr uint64_t kMaxGrowth = 9 * kMiB;     // 3 resizes of at most 3 MiB
constexpr uint64_t kMaxSize = kInitialSize + kMaxGrowth + kMiB;
constexpr uint64_t kMaxIo = 2 * kMiB;
constexpr int kResizes = 3;

// ------------------------------------------------------------ configuration

uint64_t EnvU64(const char* name, uint64_t fallback, bool* set = nullptr) {
  const char* v = std::getenv(name);
  if (set) *set = v && *v;
  if (!v || !*v) return fallback;
  return std::strtoull(v, nullptr, 0);
}

double EnvDouble(const char* name, double fallback, bool* set = nullptr) {
  const char* v = std::getenv(name);
  if (set) *set = v && *v;
  if (!v || !*v) return fallback;
  return std::strtod(v, nullptr);
}

uint64_t BaseSeed() {
  static const uint64_t seed = [] {
    bool set = false;
    uint64_t s = EnvU64("QCOW2FS_STRESS_SEED", 0, &set);
    if (!set) {
      s = static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count()) %
          1000000007ull;
    }
    return s;
  }();
  return seed;
}

struct Budget {
  double seconds;
  uint64_t ops;
};

Budget StressBudget() {
  bool secs_set = false, ops_set = false;
  const double secs = EnvDouble("QCOW2FS_STRESS_SECONDS", 0, &secs_set);
  const uint64_t ops = EnvU64("QCOW2FS_STRESS_OPS", 0, &ops_set);
  Budget b;
  if (secs_set || ops_set) {
    b.seconds = secs_set ? secs : 1e9;
    b.ops = ops_set ? ops : ~uint64_t{0};
  } else if (QCOW2FS_MODEL_SANITIZED) {
    b.seconds = 1.0;
    b.ops = 1000;
  } else {
    b.seconds = 1.0;
    b.ops = 5000;
  }
  return b;
}

// ------------------------------------------------------------ data pattern

uint64_t Mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  return x ^ (x >> 33);
}

// The byte write `tag` puts at guest offset `p`. Four styles by tag, so
// compressed clusters see incompressible, run-length, text-like and sparse
// data (and plain zeros written as data).
uint8_t ByteAt(uint64_t tag, uint64_t p) {
  const uint64_t k = tag * 0x9e3779b97f4a7c15ull;
  switch (tag & 3) {
    case 0:
      return static_cast<uint8_t>(Mix(k ^ (p >> 3)) >> ((p & 7) * 8));
    case 1:
      return static_cast<uint8_t>(Mix(k ^ (p >> 6)));
    case 2:
      return static_cast<uint8_t>("qcow2fs "[(Mix(k ^ (p >> 3)) >> ((p & 7) * 3)) & 7]);
    default:
      if (Mix(~k ^ (p >> 12)) & 1) return 0;
      return static_cast<uint8_t>(Mix(k ^ (p >> 3)) >> ((p & 7) * 8));
  }
}

// FillWrite(tag, offset, buf)[i] == ByteAt(tag, offset + i), one hash per
// 8 bytes rather than per byte (this runs over 2 MiB buffers under TSan).
void FillWrite(uint64_t tag, uint64_t offset, std::string& buf) {
  const uint64_t k = tag * 0x9e3779b97f4a7c15ull;
  const uint64_t end = offset + buf.size();
  char* out = buf.data() - offset;  // out[p] for guest offset p
  uint64_t p = offset;
  while (p < end) {
    const uint64_t word_end = std::min(end, (p | 7) + 1);
    const uint64_t w = p >> 3;
    switch (tag & 3) {
      case 0:
      case 3: {
        const bool zero = (tag & 3) == 3 && (Mix(~k ^ (p >> 12)) & 1);
        const uint64_t h = zero ? 0 : Mix(k ^ w);
        for (; p < word_end; p++) out[p] = static_cast<char>(h >> ((p & 7) * 8));
        break;
      }
      case 1: {
        const char c = static_cast<char>(Mix(k ^ (p >> 6)));
        for (; p < word_end; p++) out[p] = c;
        break;
      }
      default: {
        const uint64_t h = Mix(k ^ w);
        for (; p < word_end; p++) out[p] = "qcow2fs "[(h >> ((p & 7) * 3)) & 7];
        break;
      }
    }
  }
}

TEST(ModelStressPattern, FillWriteMatchesByteAt) {
  for (uint64_t tag = 1; tag < 9; tag++) {
    for (uint64_t off : {uint64_t{0}, uint64_t{5}, uint64_t{4093}, uint64_t{1} << 20}) {
      std::string buf(9000 + tag, '\0');
      FillWrite(tag, off, buf);
      for (size_t i = 0; i < buf.size(); i++) {
        ASSERT_EQ(static_cast<uint8_t>(buf[i]), ByteAt(tag, off + i))
            << "tag " << tag << " offset " << off + i;
      }
    }
  }
}

// ------------------------------------------------------------ range lock

// Byte-exact: two holders may share a cluster as long as their bytes are
// disjoint. One range per holder, so no lock-order deadlock.
class RangeLock {
 public:
  void Lock(uint64_t off, uint64_t len) {
    std::unique_lock lk(mu_);
    cv_.wait(lk, [&] {
      for (const auto& [o, l] : held_) {
        if (off < o + l && o < off + len) return false;
      }
      return true;
    });
    held_.emplace(off, len);
  }
  void Unlock(uint64_t off, uint64_t len) {
    {
      std::lock_guard lk(mu_);
      held_.erase(held_.find({off, len}));
    }
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::multiset<std::pair<uint64_t, uint64_t>> held_;
};

// ------------------------------------------------------------ model

enum class OpKind { kWrite, kZero, kDiscard };

const char* KindName(OpKind k) {
  switch (k) {
    case OpKind::kWrite:
      return "write";
    case OpKind::kZero:
      return "zero";
    case OpKind::kDiscard:
      return "discard";
  }
  return "?";
}

struct OpRec {
  uint64_t id = 0;
  OpKind kind = OpKind::kWrite;
  uint64_t off = 0, len = 0;
  uint64_t tag = 0;
  uint64_t size_at_start = 0;  // for discard's end-of-disk rule
  uint64_t start_seq = 0, end_seq = 0;
  bool Overlaps(uint64_t o, uint64_t l) const { return off < o + l && o < off + len; }
};

struct ModelConfig {
  uint64_t cluster_size = 0;
  // Whole clusters of a discard show the backing data again (v2 + backing).
  bool discard_shows_backing = false;
  std::string backing_view;  // backing content, zero-padded to kMaxSize
};

class Model {
 public:
  Model(std::string initial, ModelConfig cfg) : cfg_(std::move(cfg)) {
    size_.store(initial.size());
    initial_ = initial;
    initial_.resize(kMaxSize, '\0');
    committed_ = std::move(initial);
    committed_.resize(kMaxSize, '\0');
    cfg_.backing_view.resize(kMaxSize, '\0');
  }

  uint64_t size() const { return size_.load(std::memory_order_acquire); }
  void set_size(uint64_t s) { size_.store(s, std::memory_order_release); }
  const std::string& committed() const { return committed_; }

  // The value `op` leaves at byte p.
  uint8_t ValueOf(const OpRec& op, uint64_t p) const {
    switch (op.kind) {
      case OpKind::kWrite:
        return ByteAt(op.tag, p);
      case OpKind::kZero:
        return 0;
      case OpKind::kDiscard:
        if (cfg_.discard_shows_backing) {
          const uint64_t cs = cfg_.cluster_size;
          const uint64_t end = op.off + op.len;
          const uint64_t first = (op.off + cs - 1) / cs * cs;
          const uint64_t last = end == op.size_at_start ? (end + cs - 1) / cs * cs : end / cs * cs;
          if (p >= first && p < last) return static_cast<uint8_t>(cfg_.backing_view[p]);
        }
        return 0;
    }
    return 0;
  }

  void Begin(OpRec& op) {
    std::lock_guard lk(mu_);
    op.id = ++next_id_;
    op.start_seq = ++seq_;
    inflight_.emplace(op.id, op);
  }

  // `data` is the written buffer for writes.
  void End(OpRec& op, const std::string* data) {
    std::lock_guard lk(mu_);
    op.end_seq = ++seq_;
    inflight_.erase(op.id);
    if (op.kind == OpKind::kWrite) {
      std::memcpy(committed_.data() + op.off, data->data(), op.len);
    } else {
      for (uint64_t p = op.off; p < op.off + op.len; p++) {
        committed_[p] = static_cast<char>(ValueOf(op, p));
      }
    }
    if (!active_reads_.empty()) completed_.push_back(op);
    history_.push_back(op);
    Prune();
  }

  // For a failure message: which operations (completed or in flight), or
  // the initial content, the bytes got[i..] (guest offset p..) look like.
  std::string Explain(uint64_t p, std::string_view got, uint64_t read_start, uint64_t read_end) {
    std::lock_guard lk(mu_);
    const size_t n = std::min<size_t>(got.size(), 64);
    std::vector<const OpRec*> all;
    for (const auto& op : history_) all.push_back(&op);
    for (const auto& [id, op] : inflight_) all.push_back(&op);
    std::ostringstream m;
    int listed = 0;
    auto matches = [&](auto value_at) {
      size_t k = 0;
      for (size_t i = 0; i < n; i++) k += value_at(p + i) == static_cast<uint8_t>(got[i]);
      return k;
    };
    const size_t init = matches([&](uint64_t q) { return static_cast<uint8_t>(initial_[q]); });
    m << " The next " << n << " bytes read match the initial content in " << init << ";";
    for (auto it = all.rbegin(); it != all.rend() && listed < 4; ++it) {
      const OpRec& op = **it;
      if (p < op.off || p + n > op.off + op.len) continue;
      const size_t k = matches([&](uint64_t q) { return ValueOf(op, q); });
      if (k * 4 < n * 3) continue;
      m << " they match " << KindName(op.kind) << " " << op.off << "+" << op.len << " in " << k
        << " (op seq " << op.start_seq << ".."
        << (op.end_seq ? std::to_string(op.end_seq) : "in flight") << ", read seq " << read_start
        << ".." << read_end << ");";
      listed++;
    }
    if (listed == 0) m << " no operation covering them wrote such bytes;";
    return m.str();
  }

  struct ReadCtx {
    uint64_t off = 0, len = 0;
    uint64_t start_seq = 0, end_seq = 0;
    std::string before;  // committed bytes when the read started
  };

  void BeginRead(ReadCtx& r) {
    std::lock_guard lk(mu_);
    r.start_seq = ++seq_;
    r.before.assign(committed_.data() + r.off, r.len);
    active_reads_.insert(r.start_seq);
  }

  // Returns the operations that may explain bytes of the read.
  std::vector<OpRec> EndRead(ReadCtx& r) {
    std::vector<OpRec> out;
    std::lock_guard lk(mu_);
    r.end_seq = ++seq_;
    for (const auto& [id, op] : inflight_) {
      if (op.Overlaps(r.off, r.len)) out.push_back(op);
    }
    for (auto it = completed_.rbegin(); it != completed_.rend() && it->end_seq > r.start_seq;
         ++it) {
      if (it->Overlaps(r.off, r.len)) out.push_back(*it);
    }
    active_reads_.erase(active_reads_.find(r.start_seq));
    Prune();
    return out;
  }

 private:
  void Prune() {
    if (active_reads_.empty()) {
      completed_.clear();
      return;
    }
    const uint64_t oldest = *active_reads_.begin();
    while (!completed_.empty() && completed_.front().end_seq < oldest) completed_.pop_front();
  }

  ModelConfig cfg_;
  std::atomic<uint64_t> size_{0};
  std::mutex mu_;
  std::string committed_;
  std::string initial_;
  std::vector<OpRec> history_;
  uint64_t seq_ = 0, next_id_ = 0;
  std::map<uint64_t, OpRec> inflight_;
  std::deque<OpRec> completed_;
  std::multiset<uint64_t> active_reads_;
};

// ------------------------------------------------------------ thread pool

// The compress executor: a few threads, drained and joined at the end
// (after the image, which must not outlive it, is closed).
class ThreadPool {
 public:
  explicit ThreadPool(int n) {
    for (int i = 0; i < n; i++) workers_.emplace_back([this] { Loop(); });
  }
  ~ThreadPool() { Join(); }
  void Submit(std::function<void()> job) {
    {
      std::lock_guard lk(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }
  void Join() {
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) {
      if (t.joinable()) t.join();
    }
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// ------------------------------------------------------------ image kinds

struct ImageKind {
  std::string name;
  // Creates the image (and whatever it needs) in `dir`.
  std::function<::testing::AssertionResult(const TempDir& dir, const std::string& image)> make;
  uint64_t cluster_size = 65536;
  size_t l2_cache_tables = 0;  // 0: default cache
  bool v2_backing = false;     // whole-cluster discards show backing data
  std::string backing;         // backing file name in dir, if any
  std::string snapshot;        // internal snapshot that must stay unchanged
  std::optional<CompressionType> compress;
  bool executor = false;
  size_t compress_cache_bytes = 0;
};

::testing::AssertionResult Create(const std::string& image, const std::string& opts,
                                  uint64_t size = kInitialSize) {
  return QemuImg("create -q -f qcow2 -o " + opts + " " + ShellQuote(image) + " " +
                 std::to_string(size));
}

// Prior content written by QEMU, so the stress starts on allocated, zero
// and unallocated clusters alike.
::testing::AssertionResult Populate(const std::string& image) {
  return QemuIo(image, {"write -P 0x11 0 300k", "write -P 0x22 5M 1M", "write -z 8M 256k",
                        "write -P 0x33 12M 65k", "write -P 0x44 15M 1000k"});
}

std::vector<ImageKind> Kinds() {
  std::vector<ImageKind> k;
  auto simple = [&](std::string name, std::string opts, uint64_t cs, size_t l2_tables = 0) {
    ImageKind ik;
    ik.name = name;
    ik.make = [opts](const TempDir&, const std::string& img) {
      auto r = Create(img, opts);
      return r ? Populate(img) : r;
    };
    ik.cluster_size = cs;
    ik.l2_cache_tables = l2_tables;
    k.push_back(ik);
  };
  simple("v3_512", "cluster_size=512", 512);
  simple("v3_4k", "cluster_size=4k", 4096);
  simple("v3_64k", "cluster_size=64k", 65536);
  simple("v3_2m", "cluster_size=2M", 2 * kMiB);
  simple("tiny_l2_cache_4k", "cluster_size=4k", 4096, 1);
  simple("tiny_l2_cache_64k", "cluster_size=64k,refcount_bits=1", 65536, 2);
  simple("tiny_l2_cache_512", "cluster_size=512", 512, 4);
  simple("refcount1_4k", "cluster_size=4k,refcount_bits=1", 4096);
  simple("refcount16_16k", "cluster_size=16k,refcount_bits=16", 16384);
  simple("refcount64_1k", "cluster_size=1k,refcount_bits=64", 1024);
  simple("v2_64k", "compat=0.10,cluster_size=64k", 65536);
  simple("v2_512", "compat=0.10,cluster_size=512", 512, 2);
  simple("extended_l2_64k", "cluster_size=64k,extended_l2=on", 65536);
  simple("extended_l2_32k_tiny_l2", "cluster_size=32k,extended_l2=on", 32768, 1);

  auto with_backing = [&](std::string name, std::string base_opts, std::string opts, uint64_t cs,
                          bool v2, size_t l2_tables = 0) {
    ImageKind ik;
    ik.name = name;
    ik.make = [base_opts, opts](const TempDir& d, const std::string& img) {
      const std::string base = d.Join("base.qcow2");
      auto r = Create(base, base_opts, kBackingSize);
      if (!r) return r;
      r = QemuIo(base, {"write -P 0x5a 0 12M", "write -P 0x6b 3M 333k", "write -z 6M 64k"});
      if (!r) return r;
      r = QemuImg("create -q -f qcow2 -b base.qcow2 -F qcow2 -o " + opts + " " + ShellQuote(img) +
                  " " + std::to_string(kInitialSize));
      return r ? QemuIo(img, {"write -P 0x55 1M 100k", "write -z 2M 64k"}) : r;
    };
    ik.cluster_size = cs;
    ik.v2_backing = v2;
    ik.backing = "base.qcow2";
    ik.l2_cache_tables = l2_tables;
    k.push_back(ik);
  };
  with_backing("backing_v3_64k", "cluster_size=64k", "cluster_size=64k", 65536, false);
  with_backing("backing_v3_4k_tiny_l2", "cluster_size=64k", "cluster_size=4k", 4096, false, 2);
  with_backing("backing_v2_4k", "compat=0.10", "compat=0.10,cluster_size=4k", 4096, true);
  // No zero clusters in version 2 over a backing file: zeros are compressed.
  with_backing("backing_v2_4k_compress_executor", "compat=0.10", "compat=0.10,cluster_size=4k",
               4096, true);
  k.back().compress = CompressionType::kZlib;
  k.back().executor = true;
  with_backing("backing_extended_l2_64k", "cluster_size=64k", "cluster_size=64k,extended_l2=on",
               65536, false);
  with_backing("backing_extended_l2_16k", "cluster_size=4k", "cluster_size=16k,extended_l2=on",
               16384, false);

  {
    ImageKind ik;
    ik.name = "snapshot_16k";
    ik.make = [](const TempDir&, const std::string& img) {
      auto r = Create(img, "cluster_size=16k");
      if (!r) return r;
      r = Populate(img);
      if (!r) return r;
      r = QemuImg("snapshot -c s1 " + ShellQuote(img));
      return r ? QemuIo(img, {"write -P 0x66 6M 64k"}) : r;
    };
    ik.cluster_size = 16384;
    ik.snapshot = "s1";
    k.push_back(ik);
  }
  {
    ImageKind ik;
    ik.name = "snapshot_extended_l2_32k";
    ik.make = [](const TempDir&, const std::string& img) {
      auto r = Create(img, "cluster_size=32k,extended_l2=on");
      if (!r) return r;
      r = Populate(img);
      if (!r) return r;
      r = QemuImg("snapshot -c s1 " + ShellQuote(img));
      return r ? QemuIo(img, {"write -P 0x66 6M 64k"}) : r;
    };
    ik.cluster_size = 32768;
    ik.snapshot = "s1";
    ik.l2_cache_tables = 2;
    k.push_back(ik);
  }

  auto data_file = [&](std::string name, std::string extra, uint64_t cs) {
    ImageKind ik;
    ik.name = name;
    ik.make = [extra, cs](const TempDir& d, const std::string& img) {
      auto r = Create(
          img, "cluster_size=" + std::to_string(cs) + ",data_file=" + d.Join("img.data") + extra);
      return r ? Populate(img) : r;
    };
    ik.cluster_size = cs;
    k.push_back(ik);
  };
  data_file("data_file_64k", "", 65536);
  data_file("data_file_raw_64k", ",data_file_raw=on", 65536);
  data_file("data_file_extended_l2_32k", ",extended_l2=on", 32768);

  auto compressed = [&](std::string name, std::string type, uint64_t cs, bool executor,
                        size_t cache_bytes, std::string extra = "") {
    ImageKind ik;
    ik.name = name;
    ik.make = [type, cs, extra](const TempDir& d, const std::string& img) {
      // 4 MiB of data in the 16 MiB disk: convert -c of all of it would
      // take seconds; the rest stays unallocated.
      const std::string raw = d.Join("src.raw");
      std::string content(kInitialSize, '\0');
      content.replace(0, 3 * kMiB, SemiCompressible(3 * kMiB, 3));
      content.replace(9 * kMiB, kMiB, SemiCompressible(kMiB, 4));
      auto r = WriteWholeFile(raw, content);
      if (!r) return r;
      return QemuImg("convert -q -c -O qcow2 -o cluster_size=" + std::to_string(cs) +
                     ",compression_type=" + type + extra + " " + ShellQuote(raw) + " " +
                     ShellQuote(img));
    };
    ik.cluster_size = cs;
    ik.compress = type == "zstd" ? CompressionType::kZstd : CompressionType::kZlib;
    ik.executor = executor;
    ik.compress_cache_bytes = cache_bytes;
    k.push_back(ik);
  };
  compressed("compress_zlib_64k", "zlib", 65536, false, 0);
  compressed("compress_zlib_4k_executor", "zlib", 4096, true, 0);
  compressed("compress_zstd_4k", "zstd", 4096, false, 64 * 1024);
  compressed("compress_zstd_64k_executor_small_cache", "zstd", 65536, true, 1 * kMiB);
  compressed("compress_zlib_16k_refcount2_executor", "zlib", 16384, true, 0, ",refcount_bits=2");
  return k;
}

// ------------------------------------------------------------ the test

std::string Hex2(uint8_t v) {
  static const char* d = "0123456789abcdef";
  return std::string("0x") + d[v >> 4] + d[v & 15];
}

::testing::AssertionResult CompareThroughImage(Image& image, const std::string& expected,
                                               uint64_t size, const std::string& what) {
  if (image.size() != size) {
    return ::testing::AssertionFailure()
           << what << ": size " << image.size() << ", model says " << size;
  }
  std::string got;
  for (uint64_t off = 0; off < size; off += 4 * kMiB) {
    const uint64_t n = std::min<uint64_t>(4 * kMiB, size - off);
    got.assign(n, '\0');
    Status s = image.Read(off, AsWritableBytes(got));
    if (!s.ok()) {
      return ::testing::AssertionFailure() << what << ": read at " << off << ": " << Describe(s);
    }
    auto r = BuffersEqual(std::string_view(expected).substr(off, n), got, off, what);
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

void PrintTo(const ImageKind& kind, std::ostream* os) { *os << kind.name; }

class ModelStressTest : public ::testing::TestWithParam<ImageKind> {};

TEST_P(ModelStressTest, ConcurrentOperationsMatchExactModel) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
  const ImageKind& kind = GetParam();
  const uint64_t seed = BaseSeed();
  const Budget budget = StressBudget();
  const std::string tagline = "[seed=" + std::to_string(seed) + " kind=" + kind.name + "]";
  std::printf("%s QCOW2FS_STRESS_SEED=%llu to replay; budget %.1f s / %llu ops\n", tagline.c_str(),
              static_cast<unsigned long long>(seed), budget.seconds,
              static_cast<unsigned long long>(budget.ops));
  std::fflush(stdout);
  SCOPED_TRACE(tagline);

  const auto case_start = std::chrono::steady_clock::now();
  auto since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  const uint64_t cs = kind.cluster_size;
  TempDir dir;
  const std::string path = dir.Join("img.qcow2");
  ASSERT_TRUE(kind.make(dir, path));

  // The model starts from what QEMU reads.
  std::string initial;
  ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("initial.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("initial.raw"), &initial));
  ASSERT_EQ(initial.size(), kInitialSize);
  ModelConfig cfg;
  cfg.cluster_size = cs;
  cfg.discard_shows_backing = kind.v2_backing;
  if (kind.v2_backing) {
    ASSERT_TRUE(QemuConvertToRaw(dir.Join(kind.backing), dir.Join("backing.raw")));
    ASSERT_TRUE(ReadWholeFile(dir.Join("backing.raw"), &cfg.backing_view));
  }
  std::string snapshot_before;
  if (!kind.snapshot.empty()) {
    ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("snap.raw"), "-l snapshot.name=" + kind.snapshot));
    ASSERT_TRUE(ReadWholeFile(dir.Join("snap.raw"), &snapshot_before));
  }
  Model model(std::move(initial), std::move(cfg));

  // Declared before the image: it must outlive it.
  std::unique_ptr<ThreadPool> pool;
  if (kind.executor) pool = std::make_unique<ThreadPool>(2);
  OpenOptions options;
  options.read_only = false;
  if (kind.l2_cache_tables) options.l2_cache_bytes = kind.l2_cache_tables * cs;
  options.compress = kind.compress;
  options.compress_cache_bytes = kind.compress_cache_bytes;
  if (pool) {
    ThreadPool* p = pool.get();
    options.compress_executor = [p](std::function<void()> job) { p->Submit(std::move(job)); };
  }
  auto opened = Image::Open(path, options);
  ASSERT_TRUE(opened.ok()) << tagline << " " << Describe(opened.status());
  std::unique_ptr<Image> owner = std::move(opened).value();
  Image& image = *owner;

  RangeLock range_lock;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops_done{0};
  std::atomic<uint64_t> next_tag{(seed & 0xffffff) << 32};
  std::mutex err_mu;
  std::vector<std::string> errors;
  auto fail = [&](const std::string& msg) {
    std::lock_guard lk(err_mu);
    if (errors.size() < 4) errors.push_back(tagline + " " + msg);
    stop.store(true);
  };
  const double setup_seconds = since(case_start);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  auto progress = [&] {
    const double by_time = elapsed() / budget.seconds;
    const double by_ops = budget.ops == ~uint64_t{0} ? 0.0
                                                     : static_cast<double>(ops_done.load()) /
                                                           static_cast<double>(budget.ops);
    return std::max(by_time, by_ops);
  };

  // One mutating operation, with range lock and model bookkeeping.
  auto mutate = [&](OpKind op_kind, uint64_t off, uint64_t len, bool may_unmap, const char* who) {
    if (len == 0) return;
    range_lock.Lock(off, len);
    OpRec op;
    op.kind = op_kind;
    op.off = off;
    op.len = len;
    op.size_at_start = model.size();
    std::string data;
    if (op_kind == OpKind::kWrite) {
      op.tag = next_tag.fetch_add(1);
      data.resize(len);
      FillWrite(op.tag, off, data);
    }
    model.Begin(op);
    Status s;
    switch (op_kind) {
      case OpKind::kWrite:
        s = image.Write(off, AsBytes(data));
        break;
      case OpKind::kZero:
        s = image.WriteZeroes(off, len, may_unmap);
        break;
      case OpKind::kDiscard:
        s = image.Discard(off, len);
        break;
    }
    model.End(op, &data);
    range_lock.Unlock(off, len);
    if (!s.ok()) {
      fail(std::string(who) + ": " + KindName(op_kind) + " " + std::to_string(off) + "+" +
           std::to_string(len) +
           (op_kind == OpKind::kZero ? (may_unmap ? " (unmap)" : " (no unmap)") : "") +
           " failed: " + Describe(s));
    }
  };

  auto checked_read = [&](uint64_t off, uint64_t len, const char* who) {
    if (len == 0) return;
    Model::ReadCtx r;
    r.off = off;
    r.len = len;
    model.BeginRead(r);
    std::string got(len, '\0');
    Status s = image.Read(off, AsWritableBytes(got));
    std::vector<OpRec> cands = model.EndRead(r);
    if (!s.ok()) {
      fail(std::string(who) + ": read " + std::to_string(off) + "+" + std::to_string(len) +
           " failed: " + Describe(s));
      return;
    }
    if (std::memcmp(got.data(), r.before.data(), len) == 0) return;
    for (uint64_t i = 0; i < len; i++) {
      const uint8_t g = static_cast<uint8_t>(got[i]);
      if (g == static_cast<uint8_t>(r.before[i])) continue;
      const uint64_t p = off + i;
      bool ok = false;
      for (const OpRec& c : cands) {
        if (p >= c.off && p < c.off + c.len && model.ValueOf(c, p) == g) {
          ok = true;
          break;
        }
      }
      if (ok) continue;
      // Count the bad run for the message.
      uint64_t bad = 0, first_good_after = len;
      for (uint64_t j = i; j < len; j++) {
        const uint8_t gj = static_cast<uint8_t>(got[j]);
        bool okj = gj == static_cast<uint8_t>(r.before[j]);
        for (const OpRec& c : cands) {
          if (okj) break;
          okj = off + j >= c.off && off + j < c.off + c.len && model.ValueOf(c, off + j) == gj;
        }
        if (!okj)
          bad++;
        else if (first_good_after == len)
          first_good_after = j;
      }
      std::ostringstream m;
      m << who << ": read " << off << "+" << len << " (cluster size " << cs
        << "): first unexplained byte at guest offset " << p << " (cluster " << p / cs << " + "
        << p % cs << "): got " << Hex2(g) << ", committed at read start "
        << Hex2(static_cast<uint8_t>(r.before[i])) << "; " << bad
        << " unexplained bytes in the read, first run ends at offset " << off + first_good_after
        << "; concurrent ops on that byte:";
      int listed = 0;
      for (const OpRec& c : cands) {
        if (p < c.off || p >= c.off + c.len) continue;
        m << " [" << KindName(c.kind) << " " << c.off << "+" << c.len << " would give "
          << Hex2(model.ValueOf(c, p)) << "]";
        if (++listed == 6) break;
      }
      if (listed == 0) m << " none";
      m << "." << model.Explain(p, std::string_view(got).substr(i), r.start_seq, r.end_seq);
      fail(m.str());
      return;
    }
  };

  auto pick_len = [&](Rng& rng) -> uint64_t {
    const uint64_t r = rng.Uniform(0, 99);
    if (r < 25) return rng.Uniform(1, 512);
    if (r < 60) return rng.Uniform(1, std::min<uint64_t>(2 * cs, kMaxIo));
    if (r < 85) return rng.Uniform(1, 64 * 1024);
    return rng.Uniform(1, kMaxIo);
  };
  // A hot window of a few clusters, so threads often share clusters.
  const uint64_t hot_len =
      std::min<uint64_t>(std::max<uint64_t>(4 * cs, 256 * 1024), kInitialSize / 2);
  const uint64_t hot_off = Rng(seed ^ 0x5eed).Uniform(0, (kInitialSize - hot_len) / cs) * cs;
  auto pick_range = [&](Rng& rng, bool aligned, uint64_t* off, uint64_t* len) {
    const uint64_t size = model.size();
    uint64_t lo = 0, span = size;
    if (rng.Uniform(0, 99) < 40) {
      lo = hot_off;
      span = hot_len;
    }
    *off = lo + rng.Uniform(0, span - 1);
    *len = pick_len(rng);
    if (aligned) {
      *off = *off / cs * cs;
      *len = std::max<uint64_t>(cs, *len / cs * cs);
    }
    if (*off >= size) *off = size - 1;
    *len = std::min(*len, size - *off);
  };

  std::vector<std::thread> threads;
  // Mixed workers.
  constexpr int kMixed = 3;
  for (int t = 0; t < kMixed; t++) {
    threads.emplace_back([&, t] {
      Rng rng(seed * 1000003 + static_cast<uint64_t>(t));
      const std::string who = "mixed" + std::to_string(t);
      while (!stop.load() && ops_done.fetch_add(1) < budget.ops && elapsed() < budget.seconds) {
        const uint64_t r = rng.Uniform(0, 99);
        uint64_t off, len;
        if (r < 55) {
          pick_range(rng, rng.Uniform(0, 9) == 0, &off, &len);
          mutate(OpKind::kWrite, off, len, false, who.c_str());
        } else if (r < 65) {
          pick_range(rng, rng.Uniform(0, 1) == 0, &off, &len);
          mutate(OpKind::kZero, off, len, rng.Uniform(0, 1) == 0, who.c_str());
        } else if (r < 73) {
          pick_range(rng, rng.Uniform(0, 1) == 0, &off, &len);
          mutate(OpKind::kDiscard, off, len, true, who.c_str());
        } else {
          pick_range(rng, false, &off, &len);
          checked_read(off, len, who.c_str());
        }
      }
      stop.store(true);
    });
  }
  // A pure reader, reading larger ranges.
  threads.emplace_back([&] {
    Rng rng(seed * 1000003 + 77);
    while (!stop.load()) {
      uint64_t off, len;
      pick_range(rng, false, &off, &len);
      if (rng.Uniform(0, 3) == 0) len = std::min<uint64_t>(model.size() - off, kMaxIo);
      checked_read(off, len, "reader");
    }
  });
  // Two writers that hit the same cluster(s) at the same moment on disjoint
  // bytes: a split point, a piece on either side of it. Modes: small pieces
  // inside one cluster; pieces around a subcluster boundary (1/32 cluster,
  // where extended L2 allocates, zeroes and copies); large pieces (up to
  // 2 MiB) over several clusters. Sometimes the cluster is discarded first,
  // so both writes race to allocate it.
  std::atomic<bool> pair_stop{false};
  std::atomic<uint64_t> pair_size{0};
  auto on_phase = [&]() noexcept {
    pair_stop.store(stop.load());
    pair_size.store(model.size());
  };
  std::barrier pair_sync(2, on_phase);
  const uint64_t sub = std::max<uint64_t>(cs / 32, 512);
  for (int t = 0; t < 2; t++) {
    threads.emplace_back([&, t] {
      Rng shared(seed * 7919 + 1);  // both threads draw the same sequence
      Rng own(seed * 7919 + 10 + static_cast<uint64_t>(t));
      const std::string who = "pair" + std::to_string(t);
      for (;;) {
        pair_sync.arrive_and_wait();
        if (pair_stop.load()) break;
        const uint64_t size = pair_size.load();
        const uint64_t mode = shared.Uniform(0, 99);
        const bool hot = shared.Uniform(0, 99) < 60;
        const uint64_t base = hot ? hot_off : 0;
        const uint64_t span = hot ? hot_len : size;
        uint64_t split = base + shared.Uniform(1, span - 1);
        uint64_t left, right;
        if (mode < 40) {  // small, inside the cluster of `split`
          const uint64_t cluster = split / cs * cs;
          left = shared.Uniform(1, std::max<uint64_t>(1, split - cluster));
          right = shared.Uniform(1, std::max<uint64_t>(1, cluster + cs - split));
        } else if (mode < 70) {  // around a subcluster boundary
          const uint64_t boundary = std::max<uint64_t>(sub, split / sub * sub);
          split = boundary - std::min<uint64_t>(300, boundary) + shared.Uniform(0, 600);
          left = shared.Uniform(1, sub + 512);
          right = shared.Uniform(1, sub + 512);
        } else {  // large
          left = shared.Uniform(1, kMaxIo);
          right = shared.Uniform(1, kMaxIo);
        }
        split = std::clamp<uint64_t>(split, 1, size - 1);
        left = std::min(left, split);
        right = std::min(right, size - split);
        const bool discard_first = shared.Uniform(0, 9) == 0;
        if (discard_first) {
          if (t == 0) {
            const uint64_t c0 = (split - left) / cs * cs;
            const uint64_t c1 = std::min(size, (split + right + cs - 1) / cs * cs);
            mutate(OpKind::kDiscard, c0, c1 - c0, true, who.c_str());
          }
          pair_sync.arrive_and_wait();  // both start on the freed cluster(s)
        }
        const bool zero = own.Uniform(0, 9) == 0;
        const OpKind k = zero ? OpKind::kZero : OpKind::kWrite;
        if (t == 0) {
          mutate(k, split - left, left, own.Uniform(0, 1) == 0, who.c_str());
        } else {
          mutate(k, split, right, own.Uniform(0, 1) == 0, who.c_str());
        }
      }
    });
  }
  // Flusher, which also grows the disk a few times.
  threads.emplace_back([&] {
    Rng rng(seed * 1000003 + 99);
    int resizes = 0;
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::microseconds(rng.Uniform(0, 4000)));
      if (resizes < kResizes && progress() >= (resizes + 1.0) / (kResizes + 1.0)) {
        const uint64_t old_size = model.size();
        const uint64_t want = old_size + rng.Uniform(1, 3 * kMiB);
        Status s = image.Resize(want);
        resizes++;
        if (!s.ok()) {
          fail("resize to " + std::to_string(want) + " failed: " + Describe(s));
          break;
        }
        const uint64_t got = image.size();
        if (got != (want + 511) / 512 * 512) {
          fail("resize to " + std::to_string(want) + " gave size " + std::to_string(got));
          break;
        }
        model.set_size(got);  // the new bytes are zeros in the model already
        continue;
      }
      Status s = image.Flush();
      if (!s.ok()) fail("flush failed: " + Describe(s));
    }
  });
  for (auto& th : threads) th.join();
  const double stress_seconds = elapsed();
  std::printf("%s %llu operations in %.2f s (setup %.2f s), final size %llu\n", tagline.c_str(),
              static_cast<unsigned long long>(std::min(ops_done.load(), budget.ops)),
              stress_seconds, setup_seconds, static_cast<unsigned long long>(model.size()));
  const auto verify_start = std::chrono::steady_clock::now();
  // Report, then verify the final state anyway: it tells a transient bad
  // read from a lost write.
  for (const auto& e : errors) ADD_FAILURE() << e;

  const uint64_t final_size = model.size();
  Status s = image.Flush();
  ASSERT_TRUE(s.ok()) << tagline << " final flush: " << Describe(s);
  EXPECT_TRUE(CompareThroughImage(image, model.committed(), final_size, "open image vs model"))
      << tagline;
  owner.reset();  // close: final write-back
  if (pool) pool->Join();
  const double close_seconds = since(verify_start);

  std::string out;
  EXPECT_TRUE(QemuImg("check " + ShellQuote(path), &out)) << tagline << " " << out;
  const std::string model_raw = dir.Join("model.raw");
  ASSERT_TRUE(WriteWholeFile(model_raw, std::string_view(model.committed()).substr(0, final_size)));
  EXPECT_TRUE(
      QemuImg("compare -q -f qcow2 -F raw " + ShellQuote(path) + " " + ShellQuote(model_raw)))
      << tagline << " qemu-img compare with the model";
  {
    std::string qemu_view;
    ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("final.raw")));
    ASSERT_TRUE(ReadWholeFile(dir.Join("final.raw"), &qemu_view));
    EXPECT_TRUE(BuffersEqual(std::string_view(model.committed()).substr(0, final_size), qemu_view,
                             0, "qemu-img convert vs model"))
        << tagline;
  }
  {
    OpenOptions ro;
    ro.read_only = true;
    auto reopened = Image::Open(path, ro);
    ASSERT_TRUE(reopened.ok()) << tagline << " reopen: " << Describe(reopened.status());
    EXPECT_TRUE(
        CompareThroughImage(**reopened, model.committed(), final_size, "reopened image vs model"))
        << tagline;
  }
  if (!kind.snapshot.empty()) {
    std::string snapshot_after;
    ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("snap2.raw"), "-l snapshot.name=" + kind.snapshot));
    ASSERT_TRUE(ReadWholeFile(dir.Join("snap2.raw"), &snapshot_after));
    ASSERT_GE(snapshot_after.size(), snapshot_before.size());
    snapshot_after.resize(snapshot_before.size());
    EXPECT_TRUE(BuffersEqual(snapshot_before, snapshot_after, 0, "internal snapshot")) << tagline;
  }
  std::printf("%s verify %.2f s (final flush+compare+close %.2f s)\n", tagline.c_str(),
              since(verify_start), close_seconds);
}

INSTANTIATE_TEST_SUITE_P(Kinds, ModelStressTest, ::testing::ValuesIn(Kinds()),
                         [](const auto& param_info) { return param_info.param.name; });

// Combinations the core refuses by design: compressed writes need a
// refcount width that can count several compressed clusters in one host
// cluster, and cannot go to an external data file.
TEST(ModelStressRejections, CompressRefusedWhereTheFormatCannotHoldIt) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  struct Refused {
    std::string name, opts;
  };
  const std::vector<Refused> refused = {
      {"refcount_bits=1", "cluster_size=64k,refcount_bits=1"},
      {"data_file", "cluster_size=64k,data_file=" + dir.Join("x.data")},
      {"data_file_raw", "cluster_size=64k,data_file=" + dir.Join("y.data") + ",data_file_raw=on"},
  };
  int n = 0;
  for (const auto& r : refused) {
    for (CompressionType type : {CompressionType::kZlib, CompressionType::kZstd}) {
      const std::string path = dir.Join("r" + std::to_string(n++) + ".qcow2");
      ASSERT_TRUE(
          Create(path, r.opts + (type == CompressionType::kZstd ? ",compression_type=zstd"
                                                                : ",compression_type=zlib")));
      OpenOptions o;
      o.read_only = false;
      o.compress = type;
      auto image = Image::Open(path, o);
      EXPECT_FALSE(image.ok()) << r.name << ": compress mode was accepted";
      if (!image.ok()) {
        EXPECT_EQ(image.status().code(), ErrorCode::kUnsupported)
            << r.name << ": " << Describe(image.status());
      }
    }
  }
}

}  // namespace
}  // namespace qcow2fs::test
