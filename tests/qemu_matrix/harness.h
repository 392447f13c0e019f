// The read matrix's harness: what a recipe builds (Built), the builder that
// runs qemu-img and qemu-io in a temporary directory, and the checks that
// compare what qcow2fs reads with QEMU's reference bytes.
//
// qemu-img and qemu-io must be on PATH; without them every case FAILS.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <gtest/gtest.h>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test::matrix {

using ::testing::AssertionFailure;
using ::testing::AssertionResult;
using ::testing::AssertionSuccess;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t GiB = 1024 * MiB;
constexpr uint64_t TiB = 1024 * GiB;

// Disks up to this size are compared whole.
constexpr uint64_t kWholeReadLimit = 64 * MiB;

inline std::string Num(uint64_t v) { return std::to_string(v); }

inline uint64_t AlignDown(uint64_t v, uint64_t a) { return v / a * a; }
inline uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Guest bytes mapped by one L2 table.
inline uint64_t L2Coverage(uint64_t cs, bool extended) { return cs * (cs / (extended ? 16 : 8)); }

struct Region {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// What to open with OpenOptions::snapshot, and how qemu-img names it.
struct SnapshotRef {
  std::string open_name;   // passed to OpenOptions::snapshot
  std::string apply_name;  // passed to `qemu-img snapshot -a` (ID or name)
};

// The result of a recipe.
struct Built {
  std::string image;       // path handed to Image::Open (may be relative)
  std::string open_cwd;    // working directory for Image::Open, if set
  std::string qemu_image;  // absolute path for qemu-img
  uint64_t cluster_size = 0;
  bool extended_l2 = false;
  bool has_backing = false;
  std::vector<Region> touched;
  std::vector<SnapshotRef> snapshots;
  // Expectations on ImageInfo, checked when set.
  std::optional<int> version;
  std::optional<std::string> backing_file;
  std::optional<bool> expect_compressed_data;
};

// One guest operation performed with qemu-io.
struct Op {
  enum Kind { kWrite, kZero, kZeroUnmap, kDiscard, kWriteCompressed } kind;
  uint64_t offset;
  uint64_t length;
};

inline Op W(uint64_t o, uint64_t l) { return {Op::kWrite, o, l}; }
inline Op Z(uint64_t o, uint64_t l) { return {Op::kZero, o, l}; }
inline Op ZU(uint64_t o, uint64_t l) { return {Op::kZeroUnmap, o, l}; }
inline Op D(uint64_t o, uint64_t l) { return {Op::kDiscard, o, l}; }
inline Op C(uint64_t o, uint64_t l) { return {Op::kWriteCompressed, o, l}; }

// Builds images inside one temporary directory. A recipe runs its steps
// one after another without checking each: once a step has failed, later
// steps do nothing, and result() is the first failure. Each step returns
// result() as it stands after it.
class Builder {
 public:
  explicit Builder(const TempDir& dir) : dir_(dir) {}

  std::string Path(const std::string& name) const { return dir_.Join(name); }
  const std::string& dir() const { return dir_.path(); }

  // qemu-img create -f qcow2 [-o OPTS] [-b BACKING -F FMT] NAME SIZE, run
  // inside the directory so relative names are stored as given.
  AssertionResult Create(const std::string& name, uint64_t size, const std::string& opts,
                         const std::string& backing = "", const std::string& backing_fmt = "");
  // Runs the ops on NAME with one qemu-io process. Data writes use fresh
  // random bytes (a different source per write) so misplaced data shows.
  AssertionResult Io(const std::string& name, const std::vector<Op>& ops,
                     const std::string& format = "qcow2");
  // qemu-img ARGS, run inside the directory.
  AssertionResult Img(const std::string& args);
  // Writes `data` to the file NAME in the directory.
  AssertionResult WriteFile(const std::string& name, const std::string& data);
  // Runs a shell command; its output goes to `output` if given.
  AssertionResult Run(const std::string& command, std::string* output = nullptr);
  // Runs `check` (anything else a recipe needs to do or verify) unless a
  // step has failed already.
  AssertionResult Check(const std::function<AssertionResult()>& check);

  bool ok() const { return static_cast<bool>(first_failure_); }
  AssertionResult result() const { return first_failure_; }

  std::vector<Region> touched;

 private:
  AssertionResult Step(const std::function<AssertionResult()>& step);

  const TempDir& dir_;
  AssertionResult first_failure_ = AssertionSuccess();
  uint64_t src_counter_ = 0;
  uint64_t first_unremoved_ = 0;
};

// The usual mix of operations for a plain image: partial clusters, writes
// across cluster and L2 boundaries, zeroing allocated and unallocated
// clusters, discards, and data at the very end of the disk.
std::vector<Op> StandardOps(uint64_t cs, uint64_t size, bool extended = false);

// ---- The checker.

AssertionResult ReadAndCompare(Image& img, uint64_t offset, uint64_t length,
                               std::string_view expected, const std::string& what);
AssertionResult OpenImage(const Built& b, const OpenOptions& options, std::unique_ptr<Image>* out);
// Reads the whole disk in many ways (chunks, large and random unaligned
// reads, cluster and L2 boundaries) and walks its block status; fatal
// failures end the test.
void CheckWholeDisk(Image& img, const Built& b, const std::string& ref, uint64_t seed);
// The touched regions of a large disk, aligned to sectors, sorted, merged.
std::vector<Region> MergeRegions(std::vector<Region> rs, uint64_t size);
// The same checks on each region of a disk too large to read whole.
void CheckRangesWithImage(Image& img, const std::vector<Region>& regions,
                          const std::vector<std::string>& refs, uint64_t cs, uint64_t seed);
// A stable seed from a case name (FNV-1a).
uint64_t SeedOf(const std::string& s);

}  // namespace qcow2fs::test::matrix
