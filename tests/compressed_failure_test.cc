// Compressed writes when the host fails: a segment that cannot be written
// makes the flush that sealed it fail, keeps its clusters staged (readable,
// and stored by the next flush) and leaks nothing.
#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

#include "engine/image_open.h"
#include "forwarding_file.h"
#include "io/fault_injection_file.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

constexpr uint64_t kCluster = 64 * 1024;

TEST(CompressedFailureTest, FailedSegmentWriteIsReportedAndRetried) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string path = dir.Join("c.qcow2");
  ASSERT_TRUE(QemuImg("create -q -f qcow2 -o cluster_size=64k,compression_type=zstd " +
                      ShellQuote(path) + " 16M"));
  std::string initial;
  ASSERT_TRUE(ReadWholeFile(path, &initial));
  auto f = std::make_shared<FaultInjectionFile>("img", initial);
  OpenOptions options;
  options.read_only = false;
  options.lock = false;
  options.compress = CompressionType::kZstd;
  auto refuse = [](const std::string&, bool) -> Result<std::unique_ptr<File>> {
    return Status(ErrorCode::kNotFound, "no other files in this test");
  };
  auto opened = OpenQcow2(std::make_unique<SharedFile>(f), path, options, refuse);
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  std::unique_ptr<Image> image = std::move(opened).value();

  // Four complete clusters: compressed and packed, waiting for the segment
  // to be sealed.
  const std::string data = SemiCompressible(4 * kCluster, 9);
  ASSERT_TRUE(image->Write(0, AsBytes(data)).ok());
  f->FailOnceAfter(0, ENOSPC);  // the segment's write
  Status flushed = image->Flush();
  ASSERT_FALSE(flushed.ok()) << "a flush whose segment could not be written succeeded";
  EXPECT_EQ(flushed.sys_errno(), ENOSPC) << Describe(flushed);

  std::string got(data.size(), '\0');
  ASSERT_TRUE(image->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(data, got, 0, "staged data after the failed flush"));
  ASSERT_TRUE(image->Flush().ok()) << "the retry failed";
  ASSERT_TRUE(image->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(data, got, 0, "after the retry"));
  image.reset();

  const std::string out = dir.Join("after.qcow2");
  ASSERT_TRUE(WriteWholeFile(out, f->CurrentImage()));
  EXPECT_TRUE(QemuImg("check -q " + ShellQuote(out))) << "leaks or corruption after the retry";
  ASSERT_TRUE(QemuConvertToRaw(out, dir.Join("after.raw")));
  std::string raw;
  ASSERT_TRUE(ReadWholeFile(dir.Join("after.raw"), &raw));
  EXPECT_TRUE(BuffersEqual(data, raw.substr(0, data.size()), 0, "qemu-img convert"));
  std::string check;
  ASSERT_TRUE(QemuImg("check " + ShellQuote(out), &check));
  EXPECT_TRUE(ContainsNoCase(check, "100.00% compressed clusters")) << check;
}

}  // namespace
}  // namespace qcow2fs::test
