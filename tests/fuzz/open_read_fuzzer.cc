// libFuzzer target: the input bytes are a qcow2 image held in memory.
//
// It is opened through OpenQcow2 with an opener that refuses every backing
// and external data file, then read at the first clusters, at offsets taken
// from the input itself, and walked with GetBlockStatus; internal snapshots
// are opened too. Errors are fine; crashes, sanitizer reports, hangs and
// huge allocations are bugs.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "io/file.h"
#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace {

using qcow2fs::BlockKind;
using qcow2fs::ErrorCode;
using qcow2fs::File;
using qcow2fs::Image;
using qcow2fs::OpenOptions;
using qcow2fs::Result;
using qcow2fs::Status;

// Reads are capped so one input runs in milliseconds: the point is to reach
// every parsing and mapping path, not to move bulk data.
constexpr uint64_t kMaxRead = 256 << 10;
constexpr uint64_t kMaxWalkRead = 64 << 10;

// Messages must be well-formed strings; touching every byte lets ASan see a
// dangling or unterminated one.
volatile size_t g_sink = 0;
void Consume(const Status& s) {
  if (s.ok()) return;
  const std::string& m = s.message();
  size_t h = m.size();
  for (char c : m) h = h * 31 + static_cast<unsigned char>(c);
  g_sink = g_sink + h + s.ToString().size() + static_cast<size_t>(s.ToErrno());
}

uint64_t TakeU64(const uint8_t* data, size_t size, size_t from_end) {
  if (size < from_end + 8) return 0;
  uint64_t v;
  std::memcpy(&v, data + size - from_end - 8, 8);
  return v;
}

void Read(Image& img, uint64_t offset, uint64_t length, std::vector<std::byte>& buf) {
  const uint64_t size = img.size();
  if (size == 0 || offset >= size) return;
  length = std::min({length, size - offset, kMaxRead});
  if (length == 0) return;
  buf.resize(length);
  Consume(img.Read(offset, std::span<std::byte>(buf.data(), length)));
}

void Exercise(Image& img, const uint8_t* data, size_t size) {
  const uint64_t vsize = img.size();
  const qcow2fs::ImageInfo info = img.info();
  g_sink = g_sink + info.warnings.size() + info.snapshots.size() + info.backing_file.size();
  const uint64_t cs = std::max<uint64_t>(info.cluster_size, 512);
  std::vector<std::byte> buf;

  // The first clusters, whole and unaligned.
  Read(img, 0, std::min<uint64_t>(4 * cs, kMaxRead), buf);
  Read(img, 1, 3 * cs / 2, buf);
  Read(img, cs - 7, 14, buf);
  // Offsets derived from the input (its last bytes), and the end of the disk.
  for (size_t k = 0; k < 4; ++k) {
    const uint64_t v = TakeU64(data, size, 8 * k);
    if (vsize == 0) break;
    const uint64_t off = v % vsize;
    const uint64_t len = 1 + (v >> 40) % (2 * cs);
    Read(img, off, len, buf);
  }
  if (vsize > cs) Read(img, vsize - cs, cs, buf);

  // Block status walk from the start, bounded.
  uint64_t off = 0;
  int walk_reads = 0;
  for (int i = 0; i < 64 && off < vsize; ++i) {
    auto st = img.GetBlockStatus(off, vsize - off);
    if (!st.ok()) {
      Consume(st.status());
      break;
    }
    if (st->length == 0) __builtin_trap();  // would loop forever
    if (st->length > vsize - off) __builtin_trap();
    if (st->kind != BlockKind::kUnallocated && walk_reads < 16) {
      ++walk_reads;
      Read(img, off, std::min<uint64_t>(st->length, kMaxWalkRead), buf);
    }
    off += st->length;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string contents(reinterpret_cast<const char*>(data), size);
  const qcow2fs::FileOpener refuse = [](const std::string& path,
                                        bool) -> Result<std::unique_ptr<File>> {
    return Status(ErrorCode::kNotFound, "fuzzer opens no other files: " + path);
  };
  OpenOptions options;
  options.read_only = true;
  options.lock = false;
  options.l2_cache_bytes = 1 << 20;

  auto opened = qcow2fs::OpenQcow2(qcow2fs::NewMemoryFile("fuzz.qcow2", contents),
                                   "/fuzz/fuzz.qcow2", options, refuse);
  if (!opened.ok()) {
    Consume(opened.status());
    return 0;
  }
  std::unique_ptr<Image> img = std::move(opened).value();
  Exercise(*img, data, size);

  // Internal snapshots: the first two, by ID and by name.
  const qcow2fs::ImageInfo info = img->info();
  img.reset();
  for (size_t i = 0; i < info.snapshots.size() && i < 2; ++i) {
    OpenOptions so = options;
    so.snapshot = (i == 0) ? info.snapshots[i].id : info.snapshots[i].name;
    auto snap = qcow2fs::OpenQcow2(qcow2fs::NewMemoryFile("fuzz.qcow2", contents),
                                   "/fuzz/fuzz.qcow2", so, refuse);
    if (!snap.ok()) {
      Consume(snap.status());
      continue;
    }
    Exercise(*snap.value(), data, size);
  }
  return 0;
}
