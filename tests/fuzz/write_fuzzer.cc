// libFuzzer target for the write path: arbitrary image bytes, then a short
// program of guest writes, zeroings, discards, flushes and grows.
//
// Input layout:
//   [u32 LE n] [n bytes: the image, n capped at 4 MiB] [options byte] [ops]
// Each op is one opcode byte, then LEB128 varints for offset and length
// (offsets wrap at the disk size, lengths at 256 KiB and the end of the
// disk); at most 32 ops. A missing tail reads as zeros.
//
// The image is opened writable on an in-memory file (backing files are empty
// raw files, an external data file is an empty memory file), then the
// program runs. Any op may fail: hostile images fence writes. Oracles,
// which parse the qcow2 structures themselves (not through the core's
// decoder) from the bytes as they were at open:
//  (a) the snapshot table, the snapshot L1 tables and the L2 tables only
//      snapshots name are byte-identical after the program (outside the
//      header cluster): no guest write, table write or free may touch them;
//  (b) the header fields a writer has no business changing are unchanged
//      (only the size, L1/refcount table location, the corrupt bit, and
//      clearing autoclear bits are allowed);
//  (c) every guest byte a successful op wrote (data, or zeros for
//      WriteZeroes/Discard/grown sector tails) and no later op touched
//      reads back as written through the open image, and, when every op and
//      the final flush succeeded, after reopening the file read-only.
// Plus the usual: no crash, no sanitizer report, no hang, bounded memory.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "io/file.h"
#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace {

using qcow2fs::ErrorCode;
using qcow2fs::File;
using qcow2fs::Image;
using qcow2fs::OpenOptions;
using qcow2fs::Result;
using qcow2fs::Status;

constexpr size_t kMaxImageBytes = 4 << 20;
constexpr uint64_t kMaxOpBytes = 256 << 10;
constexpr int kMaxOps = 32;
constexpr uint64_t kMaxGrow = 64ull << 20;

volatile size_t g_sink = 0;
void Consume(const Status& s) {
  if (s.ok()) return;
  size_t h = s.message().size();
  for (char c : s.message()) h = h * 31 + static_cast<unsigned char>(c);
  g_sink = g_sink + h + s.ToString().size();
}

[[noreturn]] void Fail(const char* what, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
  std::fprintf(stderr, "write_fuzzer: ORACLE FAILURE: %s (0x%llx 0x%llx 0x%llx)\n", what,
               static_cast<unsigned long long>(a), static_cast<unsigned long long>(b),
               static_cast<unsigned long long>(c));
  std::fflush(stderr);
  __builtin_trap();
}

// ---------------------------------------------------------------- files

// A memory file whose bytes outlive the image that owns the File object.
using Bytes = std::shared_ptr<std::string>;

class SharedMemoryFile final : public File {
 public:
  SharedMemoryFile(std::string name, Bytes data) : name_(std::move(name)), data_(std::move(data)) {}
  Status ReadAt(uint64_t offset, std::span<std::byte> buf) override {
    std::lock_guard lock(mu_);
    std::fill(buf.begin(), buf.end(), std::byte{0});
    if (offset < data_->size() && !buf.empty()) {
      const uint64_t n = std::min<uint64_t>(buf.size(), data_->size() - offset);
      std::memcpy(buf.data(), data_->data() + offset, n);
    }
    return Status();
  }
  Status WriteAt(uint64_t offset, std::span<const std::byte> d) override {
    std::lock_guard lock(mu_);
    if (offset + d.size() > kMaxFile) return Status(ErrorCode::kNoSpace, "memory file full");
    if (offset + d.size() > data_->size()) data_->resize(offset + d.size());
    if (!d.empty()) std::memcpy(data_->data() + offset, d.data(), d.size());
    return Status();
  }
  Status Sync() override { return Status(); }
  Status PunchHole(uint64_t offset, uint64_t length) override {
    std::lock_guard lock(mu_);
    if (offset < data_->size()) {
      const uint64_t n = std::min<uint64_t>(length, data_->size() - offset);
      std::memset(data_->data() + offset, 0, n);
    }
    return Status();
  }
  Status Truncate(uint64_t length) override {
    std::lock_guard lock(mu_);
    if (length > kMaxFile) return Status(ErrorCode::kNoSpace, "memory file full");
    data_->resize(length);
    return Status();
  }
  Status Allocate(uint64_t offset, uint64_t length) override {
    std::lock_guard lock(mu_);
    if (offset + length > kMaxFile) return Status(ErrorCode::kNoSpace, "memory file full");
    if (offset + length > data_->size()) data_->resize(offset + length);
    return Status();
  }
  Result<uint64_t> Size() override {
    std::lock_guard lock(mu_);
    return static_cast<uint64_t>(data_->size());
  }
  uint64_t AllocatedBytes() override {
    std::lock_guard lock(mu_);
    return data_->size();
  }
  const std::string& name() const override { return name_; }

 private:
  // Bounds memory: a hostile L2 entry may point far past the end.
  static constexpr uint64_t kMaxFile = 256ull << 20;
  const std::string name_;
  std::mutex mu_;
  Bytes data_;
};

// ------------------------------------------------- independent qcow2 parse

uint64_t Be(const std::string& f, uint64_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) {
    v <<= 8;
    if (off + i < f.size()) v |= static_cast<unsigned char>(f[off + i]);
  }
  return v;
}

constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;

struct HeaderFields {
  uint32_t version = 0, cluster_bits = 0, crypt = 0, nb_snapshots = 0;
  uint64_t snapshots_offset = 0, l1_offset = 0, rt_offset = 0, size = 0;
  uint32_t l1_size = 0, rt_clusters = 0;
  uint64_t incompat = 0, compat = 0, autoclear = 0;
  uint32_t refcount_order = 4;
  uint8_t compression = 0;
  std::string backing;
};

HeaderFields ParseHeader(const std::string& f) {
  HeaderFields h;
  h.version = Be(f, 4, 4);
  const uint64_t bf_off = Be(f, 8, 8);
  const uint32_t bf_size = Be(f, 16, 4);
  h.cluster_bits = Be(f, 20, 4);
  h.size = Be(f, 24, 8);
  h.crypt = Be(f, 32, 4);
  h.l1_size = Be(f, 36, 4);
  h.l1_offset = Be(f, 40, 8);
  h.rt_offset = Be(f, 48, 8);
  h.rt_clusters = Be(f, 56, 4);
  h.nb_snapshots = Be(f, 60, 4);
  h.snapshots_offset = Be(f, 64, 8);
  if (h.version >= 3) {
    h.incompat = Be(f, 72, 8);
    h.compat = Be(f, 80, 8);
    h.autoclear = Be(f, 88, 8);
    h.refcount_order = Be(f, 96, 4);
    const uint32_t hlen = Be(f, 100, 4);
    if (hlen > 104) h.compression = static_cast<uint8_t>(Be(f, 104, 1));
  }
  if (bf_off != 0 && bf_size != 0 && bf_size <= 1023 && bf_off < f.size()) {
    h.backing = f.substr(bf_off, std::min<uint64_t>(bf_size, f.size() - bf_off));
  }
  return h;
}

// Byte ranges [start, end) of the file that no guest write program may
// change (outside the header cluster).
struct Protected {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
};

Protected ProtectedRanges(const std::string& f, const HeaderFields& h) {
  Protected p;
  if (h.cluster_bits < 9 || h.cluster_bits > 21) return p;
  const uint64_t cs = uint64_t{1} << h.cluster_bits;
  const uint64_t fsize = f.size();
  auto add = [&](uint64_t start, uint64_t len) {
    if (len == 0 || start >= fsize) return;
    const uint64_t end = std::min(fsize, start + std::min(len, fsize));
    const uint64_t s = std::max(start, cs);  // the header cluster is (b)'s job
    if (s < end) p.ranges.emplace_back(s, end);
  };
  auto l1_entries = [&](uint64_t off, uint64_t n) {
    std::vector<uint64_t> l2;
    n = std::min<uint64_t>(n, 4 << 20);
    for (uint64_t i = 0; i < n && off + 8 * i + 8 <= fsize; i++) {
      const uint64_t t = Be(f, off + 8 * i, 8) & kL1OffsetMask;
      if (t != 0 && t % cs == 0 && t + cs <= fsize) l2.push_back(t);
    }
    return l2;
  };
  std::vector<uint64_t> active = l1_entries(h.l1_offset, h.l1_size);
  const std::set<uint64_t> active_set(active.begin(), active.end());

  // The snapshot table, entry by entry (as the spec lays it out).
  uint64_t pos = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots && i < 4096; i++) {
    if (pos + 40 > fsize) break;
    const uint64_t l1_off = Be(f, pos, 8);
    const uint32_t l1_size = Be(f, pos + 8, 4);
    const uint64_t var = Be(f, pos + 36, 4) + Be(f, pos + 12, 2) + Be(f, pos + 14, 2);
    const uint64_t entry = (40 + var + 7) & ~uint64_t{7};
    if (pos + 40 + var > fsize) break;
    add(pos, entry);
    if (l1_size != 0 && l1_off % cs == 0) {
      add(l1_off, uint64_t{l1_size} * 8);
      for (uint64_t t : l1_entries(l1_off, l1_size)) {
        if (!active_set.count(t)) add(t, cs);
      }
    }
    pos += entry;
  }
  return p;
}

// Whether every cluster the image references (its metadata, and the data
// of every L2 entry of the active and snapshot tables) lies inside the file
// and has a refcount above zero, as `qemu-img check` would find. Only then
// is the image "clean at open": where refcounts call a referenced cluster
// free, QEMU and qcow2fs alike may allocate it for new data, and what was
// written to the old reference is not ours to promise (the floor is QEMU).
bool ReferencesCounted(const std::string& f, const HeaderFields& h) {
  if (h.cluster_bits < 9 || h.cluster_bits > 21 || h.refcount_order > 6) return false;
  const uint64_t cs = uint64_t{1} << h.cluster_bits;
  const uint64_t fsize = f.size();
  const uint64_t bits = uint64_t{1} << h.refcount_order;
  const uint64_t per_block = cs * 8 / bits;
  const uint64_t rt_bytes = uint64_t{h.rt_clusters} * cs;
  if (h.rt_offset % cs != 0 || h.rt_offset + rt_bytes > fsize || rt_bytes > (8u << 20))
    return false;
  bool ok = true;
  auto refcount = [&](uint64_t c) -> uint64_t {
    const uint64_t block_index = c / per_block;
    if (block_index * 8 >= rt_bytes) return 0;
    const uint64_t block = Be(f, h.rt_offset + 8 * block_index, 8) & kL1OffsetMask;
    if (block == 0) return 0;
    if (block % cs != 0 || block + cs > fsize) {
      ok = false;
      return 0;
    }
    const uint64_t i = c % per_block;
    if (bits >= 8) return Be(f, block + i * (bits / 8), static_cast<int>(bits / 8));
    const uint64_t byte = static_cast<unsigned char>(f[block + i * bits / 8]);
    return (byte >> (i * bits % 8)) & ((1u << bits) - 1);
  };
  uint64_t budget = 1 << 20;                // references examined, bounding the work
  std::map<uint64_t, uint64_t> references;  // cluster -> times referenced
  auto counted = [&](uint64_t offset, uint64_t bytes) {
    for (uint64_t c = offset / cs; bytes && c <= (offset + bytes - 1) / cs && ok; c++) {
      if (budget-- == 0 || c * cs >= fsize) ok = false;
      references[c]++;
    }
  };
  const bool extended = h.version >= 3 && (h.incompat & (1u << 4));
  const uint64_t entry_bytes = extended ? 16 : 8;
  const int x = 62 - (static_cast<int>(h.cluster_bits) - 8);
  auto l2_table = [&](uint64_t t) {
    counted(t, cs);
    for (uint64_t e = t; e + 8 <= t + cs && ok; e += entry_bytes) {
      const uint64_t w = Be(f, e, 8);
      if (w & (1ull << 62)) {  // compressed
        const uint64_t host = w & ((1ull << x) - 1);
        const uint64_t sectors = ((w & ((1ull << 62) - 1)) >> x) + 1;
        counted(host, sectors * 512 - host % 512);
      } else if ((w & kL1OffsetMask) != 0) {
        // Reserved bits (an unaligned offset) make the entry invalid.
        if ((w & kL1OffsetMask) % cs != 0) ok = false;
        counted(w & kL1OffsetMask, cs);
      }
    }
  };
  auto l1_table = [&](uint64_t off, uint64_t n) {
    counted(off, n * 8);
    for (uint64_t i = 0; i < std::min<uint64_t>(n, 1 << 16) && ok; i++) {
      const uint64_t t = Be(f, off + 8 * i, 8) & kL1OffsetMask;
      if (t != 0) l2_table(t);
    }
  };
  counted(0, cs);
  counted(h.rt_offset, rt_bytes);
  for (uint64_t i = 0; i < rt_bytes / 8 && ok; i++) {
    const uint64_t block = Be(f, h.rt_offset + 8 * i, 8) & kL1OffsetMask;
    if (block != 0) counted(block, cs);
  }
  l1_table(h.l1_offset, h.l1_size);
  uint64_t pos = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots && i < 4096 && ok; i++) {
    if (pos + 40 > fsize) return false;
    const uint64_t var = Be(f, pos + 36, 4) + Be(f, pos + 12, 2) + Be(f, pos + 14, 2);
    const uint64_t entry = (40 + var + 7) & ~uint64_t{7};
    counted(pos, entry);
    l1_table(Be(f, pos, 8), Be(f, pos + 8, 4));
    pos += entry;
  }
  // Each cluster counted at least as often as it is referenced (what
  // qemu-img check reports as "refcount=1 reference=2" is corruption).
  for (const auto& [c, n] : references) {
    if (!ok) break;
    if (refcount(c) < n) ok = false;
  }
  return ok;
}

// ---------------------------------------------------------- the shadow

// What each guest byte is known to hold: op `op`'s pattern, or zero.
struct Seg {
  uint64_t end;
  int op;  // -1: zeros
};
using Shadow = std::map<uint64_t, Seg>;

uint8_t Pattern(int op, uint64_t x) {
  return static_cast<uint8_t>((x * 0x9e3779b1u >> 7) ^ (x >> 9) ^ (op * 0x3b + 1));
}

void SplitAt(Shadow& s, uint64_t x) {
  auto it = s.upper_bound(x);
  if (it == s.begin()) return;
  --it;
  if (it->first < x && it->second.end > x) {
    Seg right = it->second;
    it->second.end = x;
    s.emplace(x, right);
  }
}

// Forgets [b, e) (unknown), then optionally records it as op `op`.
void Assign(Shadow& s, uint64_t b, uint64_t e, bool known, int op) {
  if (b >= e) return;
  SplitAt(s, b);
  SplitAt(s, e);
  s.erase(s.lower_bound(b), s.lower_bound(e));
  if (known) s.emplace(b, Seg{e, op});
}

// Compares the image's contents with the shadow. Returns false if a read
// failed (the caller decides whether that is a bug).
bool CheckShadow(Image& img, const Shadow& s, bool read_errors_are_bugs, const char* when) {
  std::vector<std::byte> buf;
  bool all_ok = true;
  for (const auto& [b, seg] : s) {
    if (seg.end > img.size()) Fail("known range past the disk end", b, seg.end, img.size());
    buf.resize(seg.end - b);
    Status st = img.Read(b, buf);
    if (!st.ok()) {
      Consume(st);
      if (read_errors_are_bugs) {
        std::fprintf(stderr, "write_fuzzer: %s: read of written range failed: %s\n", when,
                     st.ToString().c_str());
        Fail("read of a written range failed", b, seg.end);
      }
      all_ok = false;
      continue;
    }
    for (uint64_t x = b; x < seg.end; x++) {
      const uint8_t want = seg.op < 0 ? 0 : Pattern(seg.op, x);
      const uint8_t got = static_cast<uint8_t>(buf[x - b]);
      if (want != got) {
        std::fprintf(stderr,
                     "write_fuzzer: %s: guest byte 0x%llx reads 0x%02x, op %d left 0x%02x\n", when,
                     static_cast<unsigned long long>(x), got, seg.op, want);
        Fail("guest data does not read back as written", x, got, want);
      }
    }
  }
  return all_ok;
}

// ---------------------------------------------------------- input

struct Reader {
  const uint8_t* p;
  size_t n;
  size_t i = 0;
  uint8_t Byte() { return i < n ? p[i++] : 0; }
  uint64_t Varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const uint8_t b = Byte();
      v |= uint64_t{b & 0x7fu} << shift;
      if (!(b & 0x80)) break;
    }
    return v;
  }
  bool done() const { return i >= n; }
};

enum Op : uint8_t { kWrite, kZeroUnmap, kZero, kDiscard, kFlush, kGrow, kNumOps };
const char* const kOpNames[] = {"write", "zero-unmap", "zero", "discard", "flush", "grow"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t image_len;
  std::memcpy(&image_len, data, 4);
  image_len = std::min<uint64_t>({image_len, kMaxImageBytes, size - 4});
  const std::string original(reinterpret_cast<const char*>(data + 4), image_len);
  Reader prog{data + 4 + image_len, size - 4 - image_len};
  const uint8_t flags = prog.Byte();

  HeaderFields h0 = ParseHeader(original);
  const Protected protect = ProtectedRanges(original, h0);
  const bool counted_at_open = ReferencesCounted(original, h0);

  auto image_bytes = std::make_shared<std::string>(original);
  // Every other file the image opens, by resolved path, for the reopen.
  std::map<std::string, Bytes> others;
  const qcow2fs::FileOpener opener = [&](const std::string& path,
                                         bool writable) -> Result<std::unique_ptr<File>> {
    // writable: the external data file. Else a backing file, or the data
    // file of a backing image (flag 4 gives them as empty raw files).
    if (!writable && !(flags & 4)) {
      return Status(ErrorCode::kNotFound, "write_fuzzer opens no backing files: " + path);
    }
    Bytes& b = others[path];
    if (!b) b = std::make_shared<std::string>();
    return std::unique_ptr<File>(new SharedMemoryFile(path, b));
  };
  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  options.l2_cache_bytes = (flags & 1) ? 1 : (1 << 20);  // 1: the smallest cache
  if (flags & 2) {
    options.compress =
        h0.compression == 1 ? qcow2fs::CompressionType::kZstd : qcow2fs::CompressionType::kZlib;
    options.compress_cache_bytes = (flags & 8) ? 1 : 0;
  }

  auto opened =
      qcow2fs::OpenQcow2(std::unique_ptr<File>(new SharedMemoryFile("fuzz.qcow2", image_bytes)),
                         "/fuzz/fuzz.qcow2", options, opener);
  if (!opened.ok()) {
    Consume(opened.status());
    return 0;
  }
  std::unique_ptr<Image> img = std::move(opened).value();
  if (img->read_only()) return 0;  // marked corrupt or dirty
  // With a backing file, a v2 discard shows backing data (zeros here, the
  // backing file is empty); external data files keep the model the same.

  // WRITE_FUZZER_TRACE=1 prints the program and each op's status.
  static const bool trace = std::getenv("WRITE_FUZZER_TRACE") != nullptr;
  if (trace) {
    std::fprintf(stderr,
                 "write_fuzzer: image %zu bytes, flags 0x%x, disk 0x%llx, cluster %u, "
                 "references counted at open: %s\n",
                 original.size(), flags, static_cast<unsigned long long>(img->size()),
                 img->info().cluster_size, counted_at_open ? "yes" : "no");
  }
  Shadow shadow;
  bool any_failed = false;
  std::vector<std::byte> buf;
  for (int op_index = 0; op_index < kMaxOps && !prog.done(); op_index++) {
    const uint8_t opcode = prog.Byte() % kNumOps;
    const uint64_t a = prog.Varint();
    const uint64_t b = prog.Varint();
    const uint64_t disk = img->size();
    Status st;
    uint64_t off = 0, len = 0;
    if (opcode != kFlush && opcode != kGrow) {
      if (disk == 0) continue;
      off = a % disk;
      len = std::min({1 + b % kMaxOpBytes, disk - off});
    }
    switch (opcode) {
      case kWrite: {
        buf.resize(len);
        for (uint64_t x = 0; x < len; x++) buf[x] = std::byte{Pattern(op_index, off + x)};
        st = img->Write(off, buf);
        break;
      }
      case kZeroUnmap:
      case kZero:
        st = img->WriteZeroes(off, len, opcode == kZeroUnmap);
        break;
      case kDiscard:
        st = img->Discard(off, len);
        break;
      case kFlush:
        st = img->Flush();
        break;
      case kGrow: {
        const uint64_t new_size = disk + a % kMaxGrow;
        st = img->Resize(new_size);
        if (st.ok()) {
          // The rest of the old last cluster, up to the new size, reads as
          // zeros (the core's promise); beyond it, old L2 entries may
          // show through, as in QEMU.
          const uint64_t cs = img->info().cluster_size;
          const uint64_t stop = std::min<uint64_t>(img->size(), (disk + cs - 1) / cs * cs);
          if (disk % cs != 0) Assign(shadow, disk, stop, true, -1);
        }
        break;
      }
    }
    if (trace) {
      std::fprintf(stderr, "write_fuzzer: op %d: %s off=0x%llx len=0x%llx a=0x%llx -> %s\n",
                   op_index, kOpNames[opcode], static_cast<unsigned long long>(off),
                   static_cast<unsigned long long>(len), static_cast<unsigned long long>(a),
                   st.ToString().c_str());
    }
    if (!st.ok()) {
      Consume(st);
      any_failed = true;
      if (len) Assign(shadow, off, off + len, false, 0);
      continue;
    }
    if (opcode == kWrite) Assign(shadow, off, off + len, true, op_index);
    if (opcode == kZeroUnmap || opcode == kZero || opcode == kDiscard) {
      Assign(shadow, off, off + len, true, -1);
    }
  }

  // (c) through the open image.
  // In compress mode writes are staged and reach the tables at the flush:
  // a corrupt mapping then fails the read (documented for Read) although
  // the write was accepted, so only wrong bytes count there.
  if (counted_at_open) CheckShadow(*img, shadow, !any_failed && !(flags & 2), "live");
  Status fl = img->Flush();
  Consume(fl);
  const bool clean = counted_at_open && !any_failed && fl.ok() && !img->info().corrupt;
  img.reset();  // closes (flushes once more)

  const std::string& after = *image_bytes;
  // (a) structures only snapshots use.
  for (const auto& [b, e] : protect.ranges) {
    for (uint64_t x = b; x < e; x++) {
      const char got = x < after.size() ? after[x] : 0;
      if (got != original[x]) Fail("a snapshot structure changed (range, byte)", b, e, x);
    }
  }
  // (b) header fields.
  const HeaderFields h1 = ParseHeader(after);
  auto same = [](const char* field, uint64_t before, uint64_t after) {
    if (before != after) {
      std::fprintf(stderr, "write_fuzzer: header %s was 0x%llx, is 0x%llx\n", field,
                   static_cast<unsigned long long>(before), static_cast<unsigned long long>(after));
      Fail("a header field changed that a writer must not change", before, after);
    }
  };
  same("magic", Be(original, 0, 4), Be(after, 0, 4));
  same("version", h0.version, h1.version);
  same("cluster_bits", h0.cluster_bits, h1.cluster_bits);
  same("crypt_method", h0.crypt, h1.crypt);
  same("nb_snapshots", h0.nb_snapshots, h1.nb_snapshots);
  same("snapshots_offset", h0.snapshots_offset, h1.snapshots_offset);
  same("compatible_features", h0.compat, h1.compat);
  same("refcount_order", h0.refcount_order, h1.refcount_order);
  same("compression_type", h0.compression, h1.compression);
  same("incompatible_features (but corrupt)", h0.incompat & ~uint64_t{2},
       h1.incompat & ~uint64_t{2});
  same("autoclear_features bits set", 0, h1.autoclear & ~h0.autoclear);
  if (h0.backing != h1.backing) Fail("the backing file name changed");
  if (h1.size < h0.size) Fail("the disk shrank", h0.size, h1.size);

  // (c) after reopening, when nothing went wrong.
  if (clean) {
    OpenOptions ro;
    ro.read_only = true;
    ro.lock = false;
    const qcow2fs::FileOpener ro_opener = [&](const std::string& path,
                                              bool) -> Result<std::unique_ptr<File>> {
      auto it = others.find(path);
      if (it == others.end()) return Status(ErrorCode::kNotFound, "no such file: " + path);
      return std::unique_ptr<File>(
          new SharedMemoryFile(path, std::make_shared<std::string>(*it->second)));
    };
    auto again = qcow2fs::OpenQcow2(std::unique_ptr<File>(new SharedMemoryFile(
                                        "fuzz.qcow2", std::make_shared<std::string>(after))),
                                    "/fuzz/fuzz.qcow2", ro, ro_opener);
    if (!again.ok()) {
      std::fprintf(stderr, "write_fuzzer: reopen failed: %s\n", again.status().ToString().c_str());
      Fail("a cleanly written image does not reopen");
    }
    CheckShadow(*again.value(), shadow, true, "reopened");
    if (trace)
      std::fprintf(stderr, "write_fuzzer: reopened, %zu known ranges match\n", shadow.size());
  }
  return 0;
}
