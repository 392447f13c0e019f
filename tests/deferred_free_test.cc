// Space freed by discards and overwrites comes back without a flush: a
// program that never fsyncs (cp, a guest that never flushes) must not grow
// the image file without bound. Freed clusters wait in a queue until their
// references are gone from disk; the queue is applied once it holds 16 MiB
// worth, whoever is writing.
#include <gtest/gtest.h>

#include <string>

#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

struct Case {
  const char* name;
  const char* create_options;
  bool compress;
};

class DeferredFreeTest : public ::testing::TestWithParam<Case> {};

// Rewrites a 4 MiB working set 30 times (120 MiB written), with a discard
// between rounds or, in compress mode, plain overwrites (each replaces
// compressed clusters). The file stays within 16 MiB of queued frees, the
// working set and metadata of it.
TEST_P(DeferredFreeTest, RewriteLoopWithoutFlushStaysSmall) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  const Case& c = GetParam();
  TempDir dir;
  const std::string path = dir.Join("loop.qcow2");
  ASSERT_TRUE(QemuImg(std::string("create -q -f qcow2 -o ") + c.create_options + " " +
                      ShellQuote(path) + " 64M"));
  OpenOptions options;
  options.read_only = false;
  if (c.compress) options.compress = CompressionType::kZstd;
  auto opened = Image::Open(path, options);
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  std::unique_ptr<Image> image = std::move(opened).value();

  constexpr int kRounds = 30;
  constexpr uint64_t kWorkingSet = 4 * kMiB;
  std::string data;
  uint64_t max_length = 0;
  for (int round = 0; round < kRounds; round++) {
    data = SemiCompressible(kWorkingSet, static_cast<uint64_t>(round));
    ASSERT_TRUE(image->Write(0, AsBytes(data)).ok());
    if (!c.compress && round != kRounds - 1) {
      ASSERT_TRUE(image->Discard(0, kWorkingSet).ok());
    }
    uint64_t length = 0;
    ASSERT_TRUE(FileSize(path, &length));
    max_length = std::max(max_length, length);
  }
  constexpr uint64_t kBound = kWorkingSet + 2 * 16 * kMiB + 2 * kMiB;
  EXPECT_LE(max_length, kBound) << "the image file grew to " << max_length << " bytes for a "
                                << kWorkingSet << "-byte working set";

  std::string got(kWorkingSet, '\0');
  ASSERT_TRUE(image->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(data, got, 0, "last round"));
  ASSERT_TRUE(image->Flush().ok());
  image.reset();
  EXPECT_TRUE(QemuImg("check -q " + ShellQuote(path)));
  ASSERT_TRUE(QemuConvertToRaw(path, dir.Join("out.raw")));
  std::string raw;
  ASSERT_TRUE(ReadWholeFile(dir.Join("out.raw"), &raw));
  EXPECT_TRUE(BuffersEqual(data, raw.substr(0, kWorkingSet), 0, "qemu-img convert"));
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, DeferredFreeTest,
    ::testing::Values(Case{"punch_rewrite_64k", "cluster_size=64k", false},
                      Case{"punch_rewrite_4k", "cluster_size=4k", false},
                      Case{"compressed_overwrite", "cluster_size=64k,compression_type=zstd", true}),
    [](const ::testing::TestParamInfo<Case>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace qcow2fs::test
