// qcow2fs-read-bench: drives the core's read path (Image::Read) from N
// threads, with no FUSE in between, and prints throughput and latency.
//
//   qcow2fs-read-bench [OPTIONS] IMAGE
//     --threads=N        reader threads (default 1)
//     --bs=SIZE          bytes per Read call (default 1M; K, M, G suffixes)
//     --mode=seq|rand    sequential or uniformly random aligned offsets
//     --runtime=SEC      stop after SEC seconds (default 10)
//     --total=SIZE       stop after SIZE bytes in all (instead of --runtime)
//     --cache-size=SIZE  L2 cache bytes (OpenOptions::l2_cache_bytes)
//     --verify=RAWFILE   compare every block with RAWFILE (slows things down)
//     --seed=N           random seed (default 1)
//
// Sequential mode splits the disk into one slice per thread; each thread
// reads its slice front to back and wraps around (so --total equal to the
// disk size reads every byte exactly once). Random mode picks bs-aligned
// offsets over the whole disk. Each thread has its own buffer, like pread.
//
// The last line of output is machine-readable:
//   RESULT mode=rand threads=2 bs=4096 bytes=... seconds=... mibps=... iops=...
//          lat_mean_us=... lat_p50_us=... lat_p99_us=...
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qcow2fs/image.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Config {
  std::string image;
  int threads = 1;
  uint64_t bs = 1 << 20;
  bool random = false;
  double runtime = 10.0;
  uint64_t total = 0;  // 0: time-based
  size_t cache_size = 0;
  std::string verify;
  uint64_t seed = 1;
};

int Usage() {
  std::fprintf(stderr,
               "usage: qcow2fs-read-bench [--threads=N] [--bs=SIZE] "
               "[--mode=seq|rand]\n"
               "         [--runtime=SEC | --total=SIZE] [--cache-size=SIZE] "
               "[--verify=RAWFILE]\n"
               "         [--seed=N] IMAGE\n");
  return 2;
}

// "64k", "1M", "2G", "4096" -> bytes; false on junk.
bool ParseSize(const char* s, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s) return false;
  uint64_t mult = 1;
  switch (*end) {
    case '\0':
      break;
    case 'k':
    case 'K':
      mult = 1ULL << 10;
      ++end;
      break;
    case 'm':
    case 'M':
      mult = 1ULL << 20;
      ++end;
      break;
    case 'g':
    case 'G':
      mult = 1ULL << 30;
      ++end;
      break;
    default:
      return false;
  }
  if (*end == 'i' || *end == 'B') ++end;  // tolerate KiB/MB spellings
  if (*end == 'B') ++end;
  if (*end != '\0') return false;
  *out = v * mult;
  return true;
}

bool ParseArgs(int argc, char** argv, Config* c) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      size_t n = std::strlen(name);
      if (a.compare(0, n, name) == 0 && a.size() > n && a[n] == '=') {
        return argv[i] + n + 1;
      }
      return nullptr;
    };
    const char* v;
    uint64_t u = 0;
    if ((v = val("--threads"))) {
      c->threads = std::atoi(v);
      if (c->threads < 1 || c->threads > 1024) return false;
    } else if ((v = val("--bs"))) {
      if (!ParseSize(v, &c->bs) || c->bs == 0) return false;
    } else if ((v = val("--mode"))) {
      if (std::strcmp(v, "seq") == 0) {
        c->random = false;
      } else if (std::strcmp(v, "rand") == 0) {
        c->random = true;
      } else {
        return false;
      }
    } else if ((v = val("--runtime"))) {
      c->runtime = std::atof(v);
      if (c->runtime <= 0) return false;
    } else if ((v = val("--total"))) {
      if (!ParseSize(v, &c->total)) return false;
    } else if ((v = val("--cache-size"))) {
      if (!ParseSize(v, &u)) return false;
      c->cache_size = static_cast<size_t>(u);
    } else if ((v = val("--verify"))) {
      c->verify = v;
    } else if ((v = val("--seed"))) {
      c->seed = std::strtoull(v, nullptr, 10);
    } else if (a.empty() || a[0] == '-' || !c->image.empty()) {
      return false;  // -h/--help, an option this tool does not know, a second image
    } else {
      c->image = a;
    }
  }
  return !c->image.empty();
}

struct ThreadResult {
  uint64_t bytes = 0;
  uint64_t ops = 0;
  std::vector<uint32_t> lat_ns;  // per Read call, saturating at ~4.29 s
  std::string error;
};

struct Shared {
  qcow2fs::Image* image = nullptr;
  const Config* cfg = nullptr;
  uint64_t disk = 0;
  int raw_fd = -1;
  std::atomic<bool> stop{false};
  std::atomic<bool> failed{false};
  Clock::time_point deadline;
};

void Reader(Shared* sh, int index, ThreadResult* out) {
  const Config& cfg = *sh->cfg;
  const uint64_t bs = cfg.bs;
  // Heap buffers, page aligned like a typical O_DIRECT caller's.
  auto* buf = static_cast<std::byte*>(std::aligned_alloc(4096, (bs + 4095) & ~4095ULL));
  std::unique_ptr<std::byte, decltype(&std::free)> hold(buf, &std::free);
  std::vector<std::byte> ref(cfg.verify.empty() ? 0 : bs);
  std::memset(buf, 0, bs);

  const uint64_t blocks = sh->disk / bs;  // whole blocks on the disk
  std::mt19937_64 rng(cfg.seed * 1000003ULL + static_cast<uint64_t>(index));
  std::uniform_int_distribution<uint64_t> pick(0, blocks - 1);

  // Sequential: this thread's slice of whole blocks [first, first + count).
  const uint64_t per = blocks / static_cast<uint64_t>(cfg.threads);
  const uint64_t first = per * static_cast<uint64_t>(index);
  const uint64_t count = (index == cfg.threads - 1) ? blocks - first : per;
  uint64_t pos = 0;

  // Byte budget of this thread in --total mode (the last one takes the rest).
  uint64_t budget = UINT64_MAX;
  if (cfg.total != 0) {
    const uint64_t share = cfg.total / static_cast<uint64_t>(cfg.threads);
    budget = (index == cfg.threads - 1) ? cfg.total - share * static_cast<uint64_t>(cfg.threads - 1)
                                        : share;
  }
  out->lat_ns.reserve(1 << 16);

  uint64_t n_since_clock = 0;
  while (!sh->stop.load(std::memory_order_relaxed) && out->bytes < budget) {
    uint64_t off;
    if (cfg.random) {
      off = pick(rng) * bs;
    } else {
      if (count == 0) break;
      off = (first + pos) * bs;
      pos = (pos + 1) % count;
    }
    const uint64_t len = std::min<uint64_t>(bs, budget - out->bytes);
    const auto t0 = Clock::now();
    qcow2fs::Status s = sh->image->Read(off, std::span<std::byte>(buf, len));
    const auto t1 = Clock::now();
    if (!s.ok()) {
      out->error =
          "Read(" + std::to_string(off) + ", " + std::to_string(len) + "): " + s.ToString();
      sh->failed = true;
      sh->stop = true;
      return;
    }
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
    out->lat_ns.push_back(static_cast<uint32_t>(std::min<int64_t>(ns, UINT32_MAX)));
    out->bytes += len;
    out->ops += 1;
    if (sh->raw_fd >= 0) {
      ssize_t r = ::pread(sh->raw_fd, ref.data(), len, static_cast<off_t>(off));
      if (r != static_cast<ssize_t>(len) || std::memcmp(ref.data(), buf, len) != 0) {
        out->error = "verify: data differs from the raw file at " + std::to_string(off);
        sh->failed = true;
        sh->stop = true;
        return;
      }
    }
    if (cfg.total == 0 && ++n_since_clock >= 16) {
      n_since_clock = 0;
      if (t1 >= sh->deadline) sh->stop = true;
    }
  }
}

double Percentile(const std::vector<uint32_t>& sorted, double p) {
  if (sorted.empty()) return 0;
  const auto i = static_cast<size_t>(std::lround(p * static_cast<double>(sorted.size() - 1)));
  return static_cast<double>(sorted[std::min(i, sorted.size() - 1)]);
}

}  // namespace

int main(int argc, char** argv) {
  Config cfg;
  if (!ParseArgs(argc, argv, &cfg)) return Usage();

  qcow2fs::OpenOptions opts;
  opts.read_only = true;
  opts.l2_cache_bytes = cfg.cache_size;
  auto opened = qcow2fs::Image::Open(cfg.image, opts);
  if (!opened.ok()) {
    std::fprintf(stderr, "qcow2fs-read-bench: %s: %s\n", cfg.image.c_str(),
                 opened.status().ToString().c_str());
    return 1;
  }
  std::unique_ptr<qcow2fs::Image> image = std::move(opened).value();

  Shared sh;
  sh.image = image.get();
  sh.cfg = &cfg;
  sh.disk = image->size();
  if (sh.disk < cfg.bs) {
    std::fprintf(stderr, "qcow2fs-read-bench: disk (%" PRIu64 " bytes) is smaller than one block\n",
                 sh.disk);
    return 1;
  }
  if (!cfg.verify.empty()) {
    sh.raw_fd = ::open(cfg.verify.c_str(), O_RDONLY | O_CLOEXEC);
    if (sh.raw_fd < 0) {
      std::fprintf(stderr, "qcow2fs-read-bench: %s: %s\n", cfg.verify.c_str(),
                   std::strerror(errno));
      return 1;
    }
  }

  const qcow2fs::ImageInfo info = image->info();
  std::printf("image %s: %s, %" PRIu64 " MiB, cluster %u, mode %s, bs %" PRIu64
              ", threads %d, %s\n",
              cfg.image.c_str(), info.format.c_str(), sh.disk >> 20, info.cluster_size,
              cfg.random ? "rand" : "seq", cfg.bs, cfg.threads,
              cfg.total ? ("total " + std::to_string(cfg.total) + " bytes").c_str()
                        : ("runtime " + std::to_string(cfg.runtime) + " s").c_str());

  std::vector<ThreadResult> results(static_cast<size_t>(cfg.threads));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(cfg.threads));
  const auto start = Clock::now();
  sh.deadline = start + std::chrono::duration_cast<Clock::duration>(
                            std::chrono::duration<double>(cfg.runtime));
  for (int i = 0; i < cfg.threads; ++i) {
    threads.emplace_back(Reader, &sh, i, &results[static_cast<size_t>(i)]);
  }
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(Clock::now() - start).count();
  if (sh.raw_fd >= 0) ::close(sh.raw_fd);

  uint64_t bytes = 0, ops = 0;
  std::vector<uint32_t> lat;
  for (const auto& r : results) {
    if (!r.error.empty()) {
      std::fprintf(stderr, "qcow2fs-read-bench: %s\n", r.error.c_str());
    }
    bytes += r.bytes;
    ops += r.ops;
    lat.insert(lat.end(), r.lat_ns.begin(), r.lat_ns.end());
  }
  if (sh.failed) return 1;
  std::sort(lat.begin(), lat.end());
  double mean = 0;
  for (uint32_t l : lat) mean += l;
  mean = lat.empty() ? 0 : mean / static_cast<double>(lat.size());

  const double mibps = static_cast<double>(bytes) / (1 << 20) / secs;
  const double iops = static_cast<double>(ops) / secs;
  std::printf("read %" PRIu64
              " MiB in %.2f s: %.1f MiB/s, %.0f IOPS, latency "
              "mean %.1f us, p50 %.1f us, p99 %.1f us\n",
              bytes >> 20, secs, mibps, iops, mean / 1e3, Percentile(lat, 0.50) / 1e3,
              Percentile(lat, 0.99) / 1e3);
  std::printf("RESULT mode=%s threads=%d bs=%" PRIu64 " bytes=%" PRIu64
              " seconds=%.3f mibps=%.1f iops=%.0f lat_mean_us=%.1f "
              "lat_p50_us=%.1f lat_p99_us=%.1f\n",
              cfg.random ? "rand" : "seq", cfg.threads, cfg.bs, bytes, secs, mibps, iops,
              mean / 1e3, Percentile(lat, 0.50) / 1e3, Percentile(lat, 0.99) / 1e3);
  return 0;
}
