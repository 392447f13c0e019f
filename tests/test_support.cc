#include "test_support.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <sstream>

namespace qcow2fs::test {

namespace {

std::string HexByte(unsigned v) {
  static const char* kDigits = "0123456789abcdef";
  std::string s = "0x";
  s += kDigits[(v >> 4) & 0xf];
  s += kDigits[v & 0xf];
  return s;
}

std::string Hex64(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string HexExcerpt(std::string_view data, size_t center) {
  const size_t begin = center >= 8 ? center - 8 : 0;
  const size_t end = std::min(data.size(), center + 8);
  std::string out;
  for (size_t i = begin; i < end; ++i) {
    if (i == center) out += '[';
    out += HexByte(static_cast<unsigned char>(data[i])).substr(2);
    if (i == center) out += ']';
    out += ' ';
  }
  return out;
}

std::string Tail(const std::string& s, size_t max = 4000) {
  if (s.size() <= max) return s;
  return "...(" + std::to_string(s.size() - max) + " bytes cut)...\n" + s.substr(s.size() - max);
}

}  // namespace

// ---------------------------------------------------------------- TempDir

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/qcow2fs-test-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    // Without a scratch directory nothing can run; make that loud.
    std::fprintf(stderr, "mkdtemp(%s) failed: %s\n", tmpl.c_str(), std::strerror(errno));
    std::abort();
  }
  path_ = buf.data();
}

TempDir::~TempDir() {
  const char* keep = std::getenv("QCOW2FS_KEEP_TMP");
  if (keep && *keep && std::string(keep) != "0") {
    std::fprintf(stderr, "keeping %s\n", path_.c_str());
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::string TempDir::Join(std::string_view name) const { return path_ + "/" + std::string(name); }

ScopedCwd::ScopedCwd(const std::string& dir) {
  std::error_code ec;
  old_ = std::filesystem::current_path(ec).string();
  if (ec) return;
  ok_ = ::chdir(dir.c_str()) == 0;
}

ScopedCwd::~ScopedCwd() {
  if (ok_ && ::chdir(old_.c_str()) != 0) {
    std::fprintf(stderr, "cannot return to %s\n", old_.c_str());
    std::abort();
  }
}

// --------------------------------------------------------------- Commands

std::string ShellQuote(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  out += "'";
  return out;
}

CommandResult RunCommand(const std::string& command) {
  CommandResult result;
  const std::string full = "( " + command + " ) </dev/null 2>&1";
  FILE* pipe = ::popen(full.c_str(), "r");
  if (pipe == nullptr) {
    result.output = std::string("popen failed: ") + std::strerror(errno);
    return result;
  }
  std::array<char, 65536> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) {
    result.output.append(buf.data(), n);
  }
  const int status = ::pclose(pipe);
  if (status == -1) {
    result.exit_code = -1;
  } else if (WIFEXITED(status)) {
    result.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    result.exit_code = 128 + WTERMSIG(status);
  }
  return result;
}

::testing::AssertionResult RunOk(const std::string& command, std::string* output) {
  CommandResult r = RunCommand(command);
  if (output) *output = r.output;
  if (r.exit_code != 0) {
    return ::testing::AssertionFailure()
           << "command failed (exit " << r.exit_code << "): " << command << "\n--- output ---\n"
           << Tail(r.output);
  }
  return ::testing::AssertionSuccess();
}

std::string FindOnPath(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream ss(p);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) dir = ".";
    std::string candidate = dir + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return "";
}

::testing::AssertionResult RequireProgram(const std::string& name) {
  if (FindOnPath(name).empty()) {
    return ::testing::AssertionFailure()
           << name
           << " not found on PATH: this test needs it (Debian: apt-get "
              "install qemu-utils; or run tools/install-deps.sh)";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult QemuImg(const std::string& args, std::string* output) {
  auto have = RequireProgram("qemu-img");
  if (!have) return have;
  return RunOk("qemu-img " + args, output);
}

::testing::AssertionResult QemuIo(const std::string& image,
                                  const std::vector<std::string>& commands,
                                  const std::string& format, const std::string& extra_args) {
  auto have = RequireProgram("qemu-io");
  if (!have) return have;
  std::string cmd = "qemu-io";
  if (!format.empty()) cmd += " -f " + format;
  if (!extra_args.empty()) cmd += " " + extra_args;
  for (const auto& c : commands) cmd += " -c " + ShellQuote(c);
  cmd += " " + ShellQuote(image);
  std::string out;
  auto r = RunOk(cmd, &out);
  if (!r) return r;
  // Older qemu-io versions exit 0 even when a command failed.
  if (out.find("failed") != std::string::npos || out.find("qemu-io:") != std::string::npos) {
    return ::testing::AssertionFailure()
           << "qemu-io reported an error: " << cmd << "\n--- output ---\n"
           << Tail(out);
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult QemuConvertToRaw(const std::string& image, const std::string& raw_path,
                                            const std::string& extra_args) {
  std::string args = "convert";
  if (!extra_args.empty()) args += " " + extra_args;
  args += " -O raw " + ShellQuote(image) + " " + ShellQuote(raw_path);
  return QemuImg(args);
}

::testing::AssertionResult QemuReadRange(const std::string& image, uint64_t offset, uint64_t length,
                                         std::string* out, const std::string& scratch_dir) {
  out->clear();
  if (length == 0) return ::testing::AssertionSuccess();
  const uint64_t start = offset & ~uint64_t{511};
  const uint64_t end = (offset + length + 511) & ~uint64_t{511};
  uint64_t bs = 65536;
  while (bs > 512 && ((start % bs) != 0 || (end % bs) != 0)) bs /= 2;
  static std::mutex mu;
  static uint64_t counter = 0;
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu);
    id = counter++;
  }
  const std::string tmp = scratch_dir + "/qemu-dd-" + std::to_string(id) + ".raw";
  std::filesystem::remove(tmp);
  // QEMU 7.2's dd treats count as the end block (skip included); newer ones
  // may count from skip. Asking for end/bs blocks covers both: we keep only
  // the first (end - start) bytes of the output.
  const std::string args =
      "dd -O raw bs=" + std::to_string(bs) + " skip=" + std::to_string(start / bs) +
      " count=" + std::to_string(end / bs) + " if=" + ShellQuote(image) + " of=" + ShellQuote(tmp);
  auto r = QemuImg(args);
  if (!r) return r;
  std::string data;
  auto rr = ReadWholeFile(tmp, &data);
  std::filesystem::remove(tmp);
  if (!rr) return rr;
  if (data.size() < end - start) {
    return ::testing::AssertionFailure() << "qemu-img " << args << " produced " << data.size()
                                         << " bytes, expected at least " << (end - start);
  }
  *out = data.substr(offset - start, length);
  return ::testing::AssertionSuccess();
}

namespace {
bool JsonNumber(const std::string& json, const std::string& key, uint64_t* value) {
  const std::string needle = "\"" + key + "\":";
  size_t pos = json.find(needle);
  if (pos == std::string::npos) return false;
  pos += needle.size();
  while (pos < json.size() && std::isspace(static_cast<unsigned char>(json[pos]))) {
    ++pos;
  }
  if (pos >= json.size() || !std::isdigit(static_cast<unsigned char>(json[pos]))) {
    return false;
  }
  *value = std::strtoull(json.c_str() + pos, nullptr, 10);
  return true;
}
}  // namespace

::testing::AssertionResult QemuImageInfo(const std::string& image, QemuInfo* info) {
  std::string out;
  auto r = QemuImg("info --output=json " + ShellQuote(image), &out);
  if (!r) return r;
  info->json = out;
  if (!JsonNumber(out, "virtual-size", &info->virtual_size)) {
    return ::testing::AssertionFailure() << "no virtual-size in qemu-img info output:\n"
                                         << Tail(out);
  }
  JsonNumber(out, "cluster-size", &info->cluster_size);
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------------ Files

::testing::AssertionResult ReadWholeFile(const std::string& path, std::string* out) {
  out->clear();
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return ::testing::AssertionFailure() << "open " << path << ": " << std::strerror(errno);
  }
  struct stat st;
  if (::fstat(fd, &st) == 0 && st.st_size > 0) {
    out->reserve(static_cast<size_t>(st.st_size));
  }
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ::testing::AssertionFailure() << "read " << path << ": " << std::strerror(err);
    }
    if (n == 0) break;
    out->append(buf.data(), static_cast<size_t>(n));
  }
  ::close(fd);
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult WriteWholeFile(const std::string& path, std::string_view data) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return ::testing::AssertionFailure() << "create " << path << ": " << std::strerror(errno);
  }
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ::testing::AssertionFailure() << "write " << path << ": " << std::strerror(err);
    }
    done += static_cast<size_t>(n);
  }
  if (::close(fd) != 0) {
    return ::testing::AssertionFailure() << "close " << path << ": " << std::strerror(errno);
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult ReadFileRange(const std::string& path, uint64_t offset, size_t length,
                                         std::string* out) {
  out->assign(length, '\0');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return ::testing::AssertionFailure() << "open " << path << ": " << std::strerror(errno);
  }
  size_t done = 0;
  while (done < length) {
    ssize_t n = ::pread(fd, out->data() + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      int err = errno;
      ::close(fd);
      return ::testing::AssertionFailure() << "pread " << path << ": " << std::strerror(err);
    }
    if (n == 0) {
      ::close(fd);
      return ::testing::AssertionFailure()
             << "pread " << path << " at " << (offset + done) << ": unexpected end of file";
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult PatchFile(const std::string& path, uint64_t offset,
                                     std::string_view bytes) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    return ::testing::AssertionFailure() << "open " << path << ": " << std::strerror(errno);
  }
  ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
  int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(bytes.size())) {
    return ::testing::AssertionFailure() << "pwrite " << path << " at " << offset << ": "
                                         << (n < 0 ? std::strerror(err) : "short write");
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult PatchBE32(const std::string& path, uint64_t offset, uint32_t value) {
  std::string b(4, '\0');
  PutBE32(b, 0, value);
  return PatchFile(path, offset, b);
}

::testing::AssertionResult PatchBE64(const std::string& path, uint64_t offset, uint64_t value) {
  std::string b(8, '\0');
  PutBE64(b, 0, value);
  return PatchFile(path, offset, b);
}

::testing::AssertionResult FileSize(const std::string& path, uint64_t* size) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return ::testing::AssertionFailure() << "stat " << path << ": " << std::strerror(errno);
  }
  *size = static_cast<uint64_t>(st.st_size);
  return ::testing::AssertionSuccess();
}

// ------------------------------------------------------------- Comparison

::testing::AssertionResult BuffersEqual(std::string_view expected, std::string_view actual,
                                        uint64_t base_offset, std::string_view what) {
  if (expected.size() != actual.size()) {
    return ::testing::AssertionFailure()
           << what << (what.empty() ? "" : ": ") << "length differs at offset " << base_offset
           << ": expected " << expected.size() << " bytes, got " << actual.size();
  }
  if (std::memcmp(expected.data(), actual.data(), expected.size()) == 0) {
    return ::testing::AssertionSuccess();
  }
  size_t first = 0;
  while (expected[first] == actual[first]) ++first;
  size_t count = 0;
  size_t last = first;
  for (size_t i = first; i < expected.size(); ++i) {
    if (expected[i] != actual[i]) {
      ++count;
      last = i;
    }
  }
  const uint64_t abs = base_offset + first;
  return ::testing::AssertionFailure()
         << what << (what.empty() ? "" : ": ") << "first difference at guest offset " << abs << " ("
         << Hex64(abs) << "): expected " << HexByte(static_cast<unsigned char>(expected[first]))
         << ", got " << HexByte(static_cast<unsigned char>(actual[first])) << "; " << count
         << " of " << expected.size() << " bytes differ, last at offset " << (base_offset + last)
         << " (" << Hex64(base_offset + last) << ")"
         << "\n  expected: " << HexExcerpt(expected, first)
         << "\n  actual:   " << HexExcerpt(actual, first) << "\n  (compared range starts at "
         << base_offset << " (" << Hex64(base_offset) << "))";
}

bool AllZero(std::string_view data) {
  return std::all_of(data.begin(), data.end(), [](char c) { return c == 0; });
}

std::span<std::byte> AsWritableBytes(std::string& s) {
  return {reinterpret_cast<std::byte*>(s.data()), s.size()};
}

std::span<const std::byte> AsBytes(std::string_view s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

std::string Describe(const Status& status) { return status.ToString(); }

std::unique_ptr<Image> OpenWritable(const std::string& path, OpenOptions options) {
  options.read_only = false;
  auto opened = Image::Open(path, options);
  EXPECT_TRUE(opened.ok()) << path << ": " << Describe(opened.status());
  return opened.ok() ? std::move(opened).value() : nullptr;
}

void SyncPointTest::SetUp() {
  ASSERT_TRUE(SyncPoints::compiled_in()) << "tests must link the core built with sync points";
  ASSERT_TRUE(RequireProgram("qemu-img"));
  ASSERT_TRUE(RequireProgram("qemu-io"));
}

bool ContainsNoCase(std::string_view haystack, std::string_view needle) {
  auto it = std::search(haystack.begin(), haystack.end(), needle.begin(), needle.end(),
                        [](char a, char b) {
                          return std::tolower(static_cast<unsigned char>(a)) ==
                                 std::tolower(static_cast<unsigned char>(b));
                        });
  return it != haystack.end();
}

// ------------------------------------------------------------- Endianness

uint16_t GetBE16(std::string_view b, size_t o) {
  return static_cast<uint16_t>((static_cast<unsigned char>(b[o]) << 8) |
                               static_cast<unsigned char>(b[o + 1]));
}
uint32_t GetBE32(std::string_view b, size_t o) {
  return (uint32_t{GetBE16(b, o)} << 16) | GetBE16(b, o + 2);
}
uint64_t GetBE64(std::string_view b, size_t o) {
  return (uint64_t{GetBE32(b, o)} << 32) | GetBE32(b, o + 4);
}
void PutBE16(std::string& b, size_t o, uint16_t v) {
  b[o] = static_cast<char>(v >> 8);
  b[o + 1] = static_cast<char>(v & 0xff);
}
void PutBE32(std::string& b, size_t o, uint32_t v) {
  PutBE16(b, o, static_cast<uint16_t>(v >> 16));
  PutBE16(b, o + 2, static_cast<uint16_t>(v & 0xffff));
}
void PutBE64(std::string& b, size_t o, uint64_t v) {
  PutBE32(b, o, static_cast<uint32_t>(v >> 32));
  PutBE32(b, o + 4, static_cast<uint32_t>(v & 0xffffffffu));
}

// ------------------------------------------------------------------- Data

uint64_t Rng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Rng::Uniform(uint64_t lo, uint64_t hi) {
  if (hi <= lo) return lo;
  const uint64_t span = hi - lo + 1;
  if (span == 0) return Next();  // full 64-bit range
  return lo + Next() % span;
}

std::string RandomBytes(size_t n, uint64_t seed) {
  Rng rng(seed * 0x2545f4914f6cdd1dull + 1);
  std::string out(n, '\0');
  size_t i = 0;
  while (i < n) {
    uint64_t v = rng.Next();
    for (int k = 0; k < 8 && i < n; ++k, ++i) {
      out[i] = static_cast<char>(v >> (8 * k));
    }
  }
  return out;
}

std::string SemiCompressible(size_t n, uint64_t seed) {
  static const char* kWords[] = {"qcow2", "cluster", "refcount", "table",  "backing", "snapshot",
                                 "guest", "offset",  "host",     "L1",     "L2",      "zlib",
                                 "zstd",  "header",  "extent",   "sector", "the",     "a",
                                 "of",    "and",     "data",     "file",   "image",   "disk"};
  Rng rng(seed * 0x9e3779b97f4a7c15ull + 7);
  std::string out;
  out.reserve(n);
  while (out.size() < n) {
    const size_t seg = std::min<size_t>(n - out.size(), rng.Uniform(64, 6000));
    const uint64_t kind = rng.Uniform(0, 9);
    if (kind < 3) {  // incompressible
      out += RandomBytes(seg, rng.Next());
    } else if (kind < 6) {  // text-like
      std::string t;
      while (t.size() < seg) {
        t += kWords[rng.Uniform(0, std::size(kWords) - 1)];
        t += (rng.Uniform(0, 7) == 0) ? '\n' : ' ';
        if (rng.Uniform(0, 15) == 0) t += std::to_string(rng.Next() % 100000);
      }
      out.append(t, 0, seg);
    } else if (kind < 8) {  // repetitive with noise
      const size_t period = rng.Uniform(1, 16);
      std::string pat = RandomBytes(period, rng.Next());
      for (size_t i = 0; i < seg; ++i) {
        char c = pat[i % period];
        if (rng.Uniform(0, 63) == 0) c = static_cast<char>(rng.Next());
        out += c;
      }
    } else if (kind == 8) {  // zeros
      out.append(seg, '\0');
    } else {  // counter
      uint32_t v = static_cast<uint32_t>(rng.Next());
      for (size_t i = 0; i < seg; ++i) out += static_cast<char>((v + i / 3) & 0xff);
    }
  }
  return out;
}

// ----------------------------------------------------------- qcow2 header

const Qcow2Header::Extension* Qcow2Header::FindExtension(uint32_t type) const {
  for (const auto& e : extensions) {
    if (e.type == type) return &e;
  }
  return nullptr;
}

void Qcow2Header::RemoveExtension(uint32_t type) {
  extensions.erase(std::remove_if(extensions.begin(), extensions.end(),
                                  [type](const Extension& e) { return e.type == type; }),
                   extensions.end());
}

::testing::AssertionResult LoadQcow2Header(const std::string& path, Qcow2Header* h) {
  std::string buf;
  auto r = ReadFileRange(path, 0, 104, &buf);
  if (!r) return r;
  *h = Qcow2Header{};
  h->magic = GetBE32(buf, hdr::kMagic);
  h->version = GetBE32(buf, hdr::kVersion);
  h->backing_file_offset = GetBE64(buf, hdr::kBackingFileOffset);
  h->backing_file_size = GetBE32(buf, hdr::kBackingFileSize);
  h->cluster_bits = GetBE32(buf, hdr::kClusterBits);
  h->size = GetBE64(buf, hdr::kSize);
  h->crypt_method = GetBE32(buf, hdr::kCryptMethod);
  h->l1_size = GetBE32(buf, hdr::kL1Size);
  h->l1_table_offset = GetBE64(buf, hdr::kL1TableOffset);
  h->refcount_table_offset = GetBE64(buf, hdr::kRefcountTableOffset);
  h->refcount_table_clusters = GetBE32(buf, hdr::kRefcountTableClusters);
  h->nb_snapshots = GetBE32(buf, hdr::kNbSnapshots);
  h->snapshots_offset = GetBE64(buf, hdr::kSnapshotsOffset);
  if (h->magic != hdr::kQcowMagic) {
    return ::testing::AssertionFailure() << path << ": not a qcow2 image";
  }
  if (h->cluster_bits < 9 || h->cluster_bits > 21) {
    return ::testing::AssertionFailure() << path << ": cluster_bits " << h->cluster_bits;
  }
  if (h->version >= 3) {
    h->incompatible_features = GetBE64(buf, hdr::kIncompatibleFeatures);
    h->compatible_features = GetBE64(buf, hdr::kCompatibleFeatures);
    h->autoclear_features = GetBE64(buf, hdr::kAutoclearFeatures);
    h->refcount_order = GetBE32(buf, hdr::kRefcountOrder);
    h->header_length = GetBE32(buf, hdr::kHeaderLength);
  } else {
    h->header_length = 72;
  }
  std::string cluster;
  r = ReadFileRange(path, 0, h->cluster_size(), &cluster);
  if (!r) return r;
  if (h->header_length < (h->version >= 3 ? 104u : 72u) || h->header_length > cluster.size()) {
    return ::testing::AssertionFailure() << path << ": header_length " << h->header_length;
  }
  if (h->version >= 3) {
    h->extra_fields = cluster.substr(104, h->header_length - 104);
  }
  size_t off = h->header_length;
  for (;;) {
    if (off + 8 > cluster.size()) {
      return ::testing::AssertionFailure()
             << path << ": header extensions run past the first cluster";
    }
    uint32_t type = GetBE32(cluster, off);
    uint32_t len = GetBE32(cluster, off + 4);
    if (type == hdr::kExtEnd) break;
    if (off + 8 + len > cluster.size()) {
      return ::testing::AssertionFailure()
             << path << ": header extension " << Hex64(type) << " runs past the first cluster";
    }
    h->extensions.push_back({type, cluster.substr(off + 8, len)});
    off += 8 + ((len + 7u) & ~7u);
  }
  if (h->backing_file_offset != 0) {
    if (h->backing_file_offset + h->backing_file_size > cluster.size()) {
      return ::testing::AssertionFailure()
             << path << ": backing file name outside the first cluster";
    }
    h->backing_file = cluster.substr(h->backing_file_offset, h->backing_file_size);
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult StoreQcow2Header(const std::string& path, const Qcow2Header& h) {
  const size_t cs = static_cast<size_t>(h.cluster_size());
  std::string out(cs, '\0');
  PutBE32(out, hdr::kMagic, h.magic);
  PutBE32(out, hdr::kVersion, h.version);
  PutBE32(out, hdr::kBackingFileSize, static_cast<uint32_t>(h.backing_file.size()));
  PutBE32(out, hdr::kClusterBits, h.cluster_bits);
  PutBE64(out, hdr::kSize, h.size);
  PutBE32(out, hdr::kCryptMethod, h.crypt_method);
  PutBE32(out, hdr::kL1Size, h.l1_size);
  PutBE64(out, hdr::kL1TableOffset, h.l1_table_offset);
  PutBE64(out, hdr::kRefcountTableOffset, h.refcount_table_offset);
  PutBE32(out, hdr::kRefcountTableClusters, h.refcount_table_clusters);
  PutBE32(out, hdr::kNbSnapshots, h.nb_snapshots);
  PutBE64(out, hdr::kSnapshotsOffset, h.snapshots_offset);
  size_t off = 72;
  if (h.version >= 3) {
    PutBE64(out, hdr::kIncompatibleFeatures, h.incompatible_features);
    PutBE64(out, hdr::kCompatibleFeatures, h.compatible_features);
    PutBE64(out, hdr::kAutoclearFeatures, h.autoclear_features);
    PutBE32(out, hdr::kRefcountOrder, h.refcount_order);
    PutBE32(out, hdr::kHeaderLength, h.header_length);
    if (h.header_length < 104 || h.header_length > cs ||
        104 + h.extra_fields.size() > h.header_length) {
      return ::testing::AssertionFailure()
             << "StoreQcow2Header: bad header_length " << h.header_length;
    }
    out.replace(104, h.extra_fields.size(), h.extra_fields);
    off = h.header_length;
  }
  for (const auto& e : h.extensions) {
    const size_t padded = (e.data.size() + 7) & ~size_t{7};
    if (off + 8 + padded + 8 > cs) {
      return ::testing::AssertionFailure()
             << "StoreQcow2Header: extensions do not fit in the first cluster";
    }
    PutBE32(out, off, e.type);
    PutBE32(out, off + 4, static_cast<uint32_t>(e.data.size()));
    out.replace(off + 8, e.data.size(), e.data);
    off += 8 + padded;
  }
  off += 8;  // end marker (zeros)
  if (!h.backing_file.empty()) {
    if (off + h.backing_file.size() > cs) {
      return ::testing::AssertionFailure() << "StoreQcow2Header: backing file name does not fit";
    }
    PutBE64(out, hdr::kBackingFileOffset, off);
    out.replace(off, h.backing_file.size(), h.backing_file);
  }
  return PatchFile(path, 0, out);
}

}  // namespace qcow2fs::test
