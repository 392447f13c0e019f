// Crash safety: a workload of writes, zero-writes, discards and flushes is
// cut off by a simulated power loss after its Nth mutating file operation,
// for many N. The surviving image (synced data plus a random subset of the
// unsynced writes) must show no corruption in `qemu-img check` (leaks are
// allowed), and every byte written before the last successful flush, and
// not touched after it, must read back intact.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "forwarding_file.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

// Lets the test keep the FaultInjectionFile after the image that owns its
// File is gone.
class SharedFile final : public ForwardingFile {
 public:
  explicit SharedFile(std::shared_ptr<FaultInjectionFile> f) : ForwardingFile(*f), f_(std::move(f)) {}

 private:
  std::shared_ptr<FaultInjectionFile> f_;
};

struct Model {
  std::string current;
  std::string flushed;             // content as of the last successful flush
  std::vector<bool> touched;       // bytes changed since that flush
};

// Runs the deterministic workload until it ends or an operation fails.
void RunWorkload(Image& image, Model& m, uint64_t cluster_size) {
  Rng rng(7);
  const uint64_t size = image.size();
  for (int i = 0; i < 60; i++) {
    const uint64_t kind = rng.Uniform(0, 9);
    const uint64_t off = rng.Uniform(0, size - 1);
    const uint64_t len = std::min<uint64_t>(size - off, rng.Uniform(1, 3 * cluster_size));
    Status s;
    std::string data;
    if (kind < 6) {
      data = SemiCompressible(len, static_cast<uint64_t>(i));
      s = image.Write(off, AsBytes(data));
    } else if (kind < 8) {
      data.assign(len, '\0');
      s = image.WriteZeroes(off, len, kind == 7);
    } else {
      data.assign(len, '\0');
      s = image.Discard(off, len);
    }
    // A failed operation may have landed partly: its bytes are unknown.
    for (uint64_t p = off; p < off + len; p++) m.touched[p] = true;
    if (!s.ok()) return;
    m.current.replace(off, len, data);
    if (i % 6 == 5) {
      if (!image.Flush().ok()) return;
      m.flushed = m.current;
      m.touched.assign(size, false);
    }
  }
  if (image.Flush().ok()) {
    m.flushed = m.current;
    m.touched.assign(size, false);
  }
}

struct CrashCase {
  std::string name;
  std::string create_options;
  uint64_t cluster_size;
  bool compress = false;  // through the compressed-write staging cache
};

class CrashSafetyTest : public ::testing::TestWithParam<CrashCase> {};

TEST_P(CrashSafetyTest, CrashAtAnyWriteLeavesAtWorstLeaks) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const CrashCase& cc = GetParam();
  TempDir dir;
  const std::string fresh = dir.Join("fresh.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o " + cc.create_options + " " + ShellQuote(fresh) +
                      " 6M"));
  ASSERT_TRUE(QemuIo(fresh, {"write -P 0x5a 0 1M", "write -P 0xa5 3M 512k"}));
  std::string initial_file, initial_disk;
  ASSERT_TRUE(ReadWholeFile(fresh, &initial_file));
  ASSERT_TRUE(QemuConvertToRaw(fresh, dir.Join("fresh.raw")));
  ASSERT_TRUE(ReadWholeFile(dir.Join("fresh.raw"), &initial_disk));

  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  options.l2_cache_bytes = 2 * cc.cluster_size;  // evictions write back mid-run
  if (cc.compress) options.compress = CompressionType::kZlib;
  auto refuse = [](const std::string&, bool) -> Result<std::unique_ptr<File>> {
    return Status(ErrorCode::kNotFound, "no other files in this test");
  };

  // A full run counts the mutating operations to crash at.
  uint64_t total_ops;
  {
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    Model m{initial_disk, initial_disk, std::vector<bool>(initial_disk.size())};
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, refuse);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      RunWorkload(**image, m, cc.cluster_size);
    }
    total_ops = f->mutating_ops();
    ASSERT_GT(total_ops, 50u);
  }

  const uint64_t step = std::max<uint64_t>(1, total_ops / 70);
  int crashes = 0;
  for (uint64_t n = 0; n < total_ops; n += step) {
    SCOPED_TRACE("crash after " + std::to_string(n) + " of " + std::to_string(total_ops) +
                 " mutating operations");
    auto f = std::make_shared<FaultInjectionFile>("img", initial_file);
    f->CrashAfter(n);
    Model m{initial_disk, initial_disk, std::vector<bool>(initial_disk.size())};
    {
      auto image = OpenQcow2(std::make_unique<SharedFile>(f), fresh, options, refuse);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      RunWorkload(**image, m, cc.cluster_size);
    }
    ASSERT_TRUE(f->crashed());
    crashes++;
    const std::string after = dir.Join("after.qcow2");
    ASSERT_TRUE(WriteWholeFile(after, f->DurableImage(n)));

    CommandResult check = RunCommand("qemu-img check " + ShellQuote(after));
    // 0: clean, 3: leaked clusters only. Anything else is corruption.
    ASSERT_TRUE(check.exit_code == 0 || check.exit_code == 3) << check.output;
    ASSERT_EQ(check.output.find("ERROR"), std::string::npos) << check.output;

    OpenOptions ro;
    ro.lock = false;
    auto reopened = Image::Open(after, ro);
    ASSERT_TRUE(reopened.ok()) << Describe(reopened.status());
    std::string disk(initial_disk.size(), '\0');
    ASSERT_TRUE((*reopened)->Read(0, AsWritableBytes(disk)).ok());
    for (uint64_t p = 0; p < disk.size(); p++) {
      if (!m.touched[p] && disk[p] != m.flushed[p]) {
        FAIL() << "byte " << p << " written before the last flush was lost";
      }
    }
  }
  EXPECT_GT(crashes, 30);
}

INSTANTIATE_TEST_SUITE_P(
    Images, CrashSafetyTest,
    ::testing::Values(CrashCase{"v3_4k", "cluster_size=4k", 4096},
                      CrashCase{"v3_512_refcount64", "cluster_size=512,refcount_bits=64", 512},
                      CrashCase{"v2_64k", "compat=0.10", 65536},
                      CrashCase{"extended_l2_32k", "cluster_size=32k,extended_l2=on", 32768},
                      CrashCase{"compressed_staging_4k", "cluster_size=4k", 4096, true}),
    [](const auto& param_info) { return param_info.param.name; });

}  // namespace
}  // namespace qcow2fs::test
