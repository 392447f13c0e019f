// Shared helpers for the qcow2fs tests: temporary directories, running
// commands (qemu-img, qemu-io), whole-file I/O, buffer comparison that names
// the first differing offset, and a small editor for qcow2 headers so tests
// can craft images that QEMU does not write itself.
//
// Helpers that can fail return ::testing::AssertionResult, so a test writes
//   ASSERT_TRUE(QemuImg("create -f qcow2 " + path + " 16M"));
// and a failure prints the command and everything it printed.
//
// A missing prerequisite (qemu-img, qemu-io not on PATH) is a test FAILURE,
// never a skip.
#pragma once

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/sync_point.h"
#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace qcow2fs::test {

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it
// when the object dies. Set QCOW2FS_KEEP_TMP=1 to keep it for debugging.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path()/name
  std::string Join(std::string_view name) const;

 private:
  std::string path_;
};

// Changes the working directory for the lifetime of the object.
class ScopedCwd {
 public:
  explicit ScopedCwd(const std::string& dir);
  ~ScopedCwd();
  ScopedCwd(const ScopedCwd&) = delete;
  ScopedCwd& operator=(const ScopedCwd&) = delete;
  bool ok() const { return ok_; }

 private:
  std::string old_;
  bool ok_ = false;
};

struct CommandResult {
  int exit_code = -1;  // 128+N when killed by signal N
  std::string output;  // stdout and stderr, interleaved
};

// Runs `command` with /bin/sh -c, stdin from /dev/null.
CommandResult RunCommand(const std::string& command);

// Quotes a string for /bin/sh.
std::string ShellQuote(std::string_view s);

// Runs a command and succeeds only when it exits 0.
::testing::AssertionResult RunOk(const std::string& command, std::string* output = nullptr);

// Full path of `name` found on PATH, or empty.
std::string FindOnPath(const std::string& name);
// Succeeds when `name` is on PATH; the failure message says what to install.
::testing::AssertionResult RequireProgram(const std::string& name);

// `qemu-img ARGS` (ARGS is already shell-quoted where needed).
::testing::AssertionResult QemuImg(const std::string& args, std::string* output = nullptr);
// `qemu-io -f FORMAT -c CMD1 -c CMD2 ... IMAGE`. Fails when qemu-io exits
// non-zero or prints that any command failed.
::testing::AssertionResult QemuIo(const std::string& image,
                                  const std::vector<std::string>& commands,
                                  const std::string& format = "qcow2",
                                  const std::string& extra_args = "");
// `qemu-img convert [EXTRA] -O raw IMAGE RAW`.
::testing::AssertionResult QemuConvertToRaw(const std::string& image, const std::string& raw_path,
                                            const std::string& extra_args = "");
// Guest bytes [offset, offset+length) of `image` as QEMU reads them (through
// `qemu-img dd`), for images too large to convert whole.
::testing::AssertionResult QemuReadRange(const std::string& image, uint64_t offset, uint64_t length,
                                         std::string* out, const std::string& scratch_dir);
// `qemu-img info --output=json` fields.
struct QemuInfo {
  uint64_t virtual_size = 0;
  uint64_t cluster_size = 0;
  std::string json;
};
::testing::AssertionResult QemuImageInfo(const std::string& image, QemuInfo* info);

// Whole-file and ranged host file I/O.
::testing::AssertionResult ReadWholeFile(const std::string& path, std::string* out);
::testing::AssertionResult WriteWholeFile(const std::string& path, std::string_view data);
::testing::AssertionResult ReadFileRange(const std::string& path, uint64_t offset, size_t length,
                                         std::string* out);
::testing::AssertionResult PatchFile(const std::string& path, uint64_t offset,
                                     std::string_view bytes);
::testing::AssertionResult PatchBE32(const std::string& path, uint64_t offset, uint32_t value);
::testing::AssertionResult PatchBE64(const std::string& path, uint64_t offset, uint64_t value);
::testing::AssertionResult FileSize(const std::string& path, uint64_t* size);

// Compares two buffers; on mismatch names the first differing offset
// (base_offset + index), both byte values, how many bytes differ, and a hex
// excerpt around the first difference.
::testing::AssertionResult BuffersEqual(std::string_view expected, std::string_view actual,
                                        uint64_t base_offset, std::string_view what = "");
// True when every byte is zero.
bool AllZero(std::string_view data);

std::span<std::byte> AsWritableBytes(std::string& s);
std::span<const std::byte> AsBytes(std::string_view s);

// "code: message" of a Status, for failure messages.
std::string Describe(const Status& status);

// Opens the image at `path` read-write (whatever options.read_only says);
// a failure is a test failure, and the result is then null.
std::unique_ptr<Image> OpenWritable(const std::string& path, OpenOptions options = {});

// For tests that force interleavings through the core's sync points
// (base/sync_point.h) on images made by QEMU's tools: checks that the
// core was built with sync points and that qemu-img and qemu-io are there,
// and resets every sync point before and after the test.
class SyncPointTest : public ::testing::Test {
 protected:
  void SetUp() override;
  ScopedSyncPoints sync_points_;
  TempDir dir_;
};
// Case-insensitive substring test.
bool ContainsNoCase(std::string_view haystack, std::string_view needle);

// Big-endian access into byte strings.
uint16_t GetBE16(std::string_view buf, size_t offset);
uint32_t GetBE32(std::string_view buf, size_t offset);
uint64_t GetBE64(std::string_view buf, size_t offset);
void PutBE16(std::string& buf, size_t offset, uint16_t value);
void PutBE32(std::string& buf, size_t offset, uint32_t value);
void PutBE64(std::string& buf, size_t offset, uint64_t value);

// Deterministic data. RandomBytes does not compress; SemiCompressible mixes
// incompressible, text-like, repetitive and zero stretches so compressed
// clusters have very different sizes.
std::string RandomBytes(size_t n, uint64_t seed);
std::string SemiCompressible(size_t n, uint64_t seed);

// A small deterministic PRNG (splitmix64) for test-chosen offsets.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in [lo, hi] (inclusive).
  uint64_t Uniform(uint64_t lo, uint64_t hi);

 private:
  uint64_t state_;
};

// Offsets of the qcow2 header fields (see QEMU's docs/interop/qcow2.txt).
namespace hdr {
inline constexpr uint64_t kMagic = 0;
inline constexpr uint64_t kVersion = 4;
inline constexpr uint64_t kBackingFileOffset = 8;
inline constexpr uint64_t kBackingFileSize = 16;
inline constexpr uint64_t kClusterBits = 20;
inline constexpr uint64_t kSize = 24;
inline constexpr uint64_t kCryptMethod = 32;
inline constexpr uint64_t kL1Size = 36;
inline constexpr uint64_t kL1TableOffset = 40;
inline constexpr uint64_t kRefcountTableOffset = 48;
inline constexpr uint64_t kRefcountTableClusters = 56;
inline constexpr uint64_t kNbSnapshots = 60;
inline constexpr uint64_t kSnapshotsOffset = 64;
inline constexpr uint64_t kIncompatibleFeatures = 72;
inline constexpr uint64_t kCompatibleFeatures = 80;
inline constexpr uint64_t kAutoclearFeatures = 88;
inline constexpr uint64_t kRefcountOrder = 96;
inline constexpr uint64_t kHeaderLength = 100;
inline constexpr uint64_t kCompressionType = 104;

inline constexpr uint32_t kQcowMagic = 0x514649fb;
inline constexpr uint32_t kExtEnd = 0;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
}  // namespace hdr

// The header cluster of a qcow2 image, parsed into fields, extensions and
// the backing file name, so tests can rewrite it (e.g. drop the backing
// format extension, insert an unknown extension, grow header_length).
struct Qcow2Header {
  uint32_t magic = 0;
  uint32_t version = 0;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 0;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  // Version 3 only.
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 72;
  // Bytes [104, header_length) for v3 (compression type and padding).
  std::string extra_fields;

  struct Extension {
    uint32_t type = 0;
    std::string data;
  };
  std::vector<Extension> extensions;
  std::string backing_file;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  const Extension* FindExtension(uint32_t type) const;
  void RemoveExtension(uint32_t type);
};

// Parses the header cluster of a well-formed image.
::testing::AssertionResult LoadQcow2Header(const std::string& path, Qcow2Header* header);
// Writes the header back the way QEMU lays it out: fixed fields, extra
// fields up to header_length, extensions (8-byte aligned), end marker, then
// the backing file name (backing_file_offset/size are recomputed). Fails if
// that does not fit in the first cluster.
::testing::AssertionResult StoreQcow2Header(const std::string& path, const Qcow2Header& header);

}  // namespace qcow2fs::test
