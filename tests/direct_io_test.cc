// Direct host I/O: large aligned transfers bypass the page cache, the rest
// goes through it, and the two routes always agree on the file's content.
//
// These tests run on /var/tmp (a disk file system on Debian), not $TMPDIR,
// which may be a tmpfs without O_DIRECT.
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

#include "io/file.h"
#include "qcow2fs/aligned_buffer.h"
#include "qcow2fs/image.h"
#include "test_support.h"

namespace qcow2fs::test {
namespace {

// A page-aligned buffer (as the daemon hands the core) holding `bytes`.
AlignedBuffer Holding(std::string_view bytes) {
  AlignedBuffer buf(bytes.size());
  std::memcpy(buf.data(), bytes.data(), bytes.size());
  return buf;
}

std::string Str(const AlignedBuffer& buf) {
  return {reinterpret_cast<const char*>(buf.data()), buf.size()};
}

// A directory on /var/tmp, removed afterwards.
class DiskDir {
 public:
  DiskDir() {
    char tmpl[] = "/var/tmp/qcow2fs-direct-XXXXXX";
    if (mkdtemp(tmpl) != nullptr) path_ = tmpl;
  }
  ~DiskDir() {
    if (!path_.empty()) RunCommand("rm -rf " + ShellQuote(path_));
  }
  bool ok() const { return !path_.empty(); }
  std::string Join(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Whether [offset, offset+length) of `path` sits in the page cache: a
// buffered read with RWF_NOWAIT fails with EAGAIN when it would have to go
// to the disk.
bool Cached(const std::string& path, uint64_t offset, size_t length) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  std::string buf(length, '\0');
  iovec iov{buf.data(), length};
  const ssize_t n = ::preadv2(fd, &iov, 1, static_cast<off_t>(offset), RWF_NOWAIT);
  ::close(fd);
  return n == static_cast<ssize_t>(length);
}

void DropCache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

TEST(DirectIo, LargeAlignedWritesBypassThePageCacheSmallOnesDoNot) {
  DiskDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.Join("f");
  ASSERT_TRUE(WriteWholeFile(path, ""));
  for (bool direct : {false, true}) {
    SCOPED_TRACE(direct ? "direct" : "buffered");
    auto file = OpenPosixFile(path, true, direct);
    ASSERT_TRUE(file.ok()) << Describe(file.status());
    AlignedBuffer big = Holding(RandomBytes(1 << 20, 1));
    const uint64_t at = direct ? (4 << 20) : 0;
    ASSERT_TRUE((*file)->WriteAt(at, big.span()).ok());
    DropCache(path);  // what the buffered write cached goes
    ASSERT_TRUE((*file)->WriteAt(at, big.span()).ok());
    EXPECT_EQ(Cached(path, at, 1 << 20), !direct);
    // Small writes always use the cache, even when aligned.
    AlignedBuffer small = Holding(RandomBytes(4096, 2));
    ASSERT_TRUE((*file)->WriteAt(at + (2 << 20), small.span()).ok());
    EXPECT_TRUE(Cached(path, at + (2 << 20), 4096));
  }
}

TEST(DirectIo, BothRoutesSeeEachOthersWrites) {
  DiskDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.Join("f");
  ASSERT_TRUE(WriteWholeFile(path, ""));
  auto opened = OpenPosixFile(path, true, true);
  ASSERT_TRUE(opened.ok()) << Describe(opened.status());
  File& file = **opened;
  const size_t mib = 1 << 20;
  std::string shadow(4 * mib, '\0');

  // Buffered small writes, not yet written back, then a direct read.
  for (int i = 0; i < 16; i++) {
    const uint64_t off = static_cast<uint64_t>(i) * 200000 + 13;
    std::string data = RandomBytes(3000, 10 + i);
    ASSERT_TRUE(file.WriteAt(off, AsBytes(data)).ok());
    shadow.replace(off, data.size(), data);
  }
  AlignedBuffer whole(4 * mib);
  ASSERT_TRUE(file.ReadAt(0, whole.span()).ok());
  EXPECT_TRUE(BuffersEqual(shadow, Str(whole), 0, "direct read after buffered writes"));

  // Buffered reads cache pages, a direct write replaces them: buffered
  // reads must then see the new bytes, not the cached ones.
  std::string small(8192, '\0');
  ASSERT_TRUE(file.ReadAt(mib, AsWritableBytes(small)).ok());
  AlignedBuffer big = Holding(RandomBytes(2 * mib, 30));
  ASSERT_TRUE(file.WriteAt(mib, big.span()).ok());
  shadow.replace(mib, 2 * mib, Str(big));
  ASSERT_TRUE(file.ReadAt(mib, AsWritableBytes(small)).ok());
  EXPECT_TRUE(
      BuffersEqual(shadow.substr(mib, 8192), small, mib, "buffered read after direct write"));
  // The file ends where the last write did; reads beyond are zeros.
  std::string all;
  ASSERT_TRUE(ReadWholeFile(path, &all));
  EXPECT_TRUE(BuffersEqual(shadow.substr(0, 3 * mib), all, 0, "file content"));
}

TEST(DirectIo, ReadsPastAnUnalignedEndOfFileGiveZeros) {
  DiskDir dir;
  ASSERT_TRUE(dir.ok());
  const std::string path = dir.Join("f");
  const std::string content = RandomBytes(100000, 5);  // not a multiple of 4 KiB
  ASSERT_TRUE(WriteWholeFile(path, content));
  auto file = OpenPosixFile(path, false, true);
  ASSERT_TRUE(file.ok()) << Describe(file.status());
  AlignedBuffer buf(256 << 10);
  ASSERT_TRUE((*file)->ReadAt(0, buf.span()).ok());
  std::string expected = content + std::string((256 << 10) - content.size(), '\0');
  EXPECT_TRUE(BuffersEqual(expected, Str(buf), 0, "read across end of file"));
}

// The core over a direct file: large aligned guest transfers from aligned
// buffers take the direct route, partial clusters and small requests the
// cached one; QEMU must find the result clean and identical to a shadow.
TEST(DirectIo, ImageWritesMixingBothRoutesStayConsistent) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  DiskDir dir;
  ASSERT_TRUE(dir.ok());
  for (const std::string opts :
       {"cluster_size=64k", "cluster_size=4k", "cluster_size=64k,extended_l2=on"}) {
    SCOPED_TRACE(opts);
    const std::string image_path = dir.Join("img.qcow2");
    ASSERT_TRUE(QemuImg("create -q -f qcow2 -o " + opts + " " + ShellQuote(image_path) + " 32M"));
    const uint64_t size = 32 << 20;
    std::string shadow(size, '\0');
    OpenOptions options;
    options.read_only = false;
    options.direct_io = true;
    {
      auto image = Image::Open(image_path, options);
      ASSERT_TRUE(image.ok()) << Describe(image.status());
      Rng rng(99);
      for (int i = 0; i < 300; i++) {
        const bool large = rng.Uniform(0, 1) == 1;
        const uint64_t len = large ? rng.Uniform(1, 8) * (128 << 10) : rng.Uniform(1, 20000);
        uint64_t off = rng.Uniform(0, size - len);
        if (large) off = off / 4096 * 4096;
        const uint64_t what = rng.Uniform(0, 9);
        if (what < 6) {
          AlignedBuffer data = Holding(RandomBytes(len, 1000 + static_cast<uint64_t>(i)));
          ASSERT_TRUE((*image)->Write(off, data.span()).ok());
          shadow.replace(off, len, Str(data));
        } else if (what < 7) {
          ASSERT_TRUE((*image)->Discard(off, len).ok());
          shadow.replace(off, len, std::string(len, '\0'));
        } else {
          AlignedBuffer got(len);
          ASSERT_TRUE((*image)->Read(off, got.span()).ok());
          ASSERT_TRUE(BuffersEqual(shadow.substr(off, len), Str(got), off, "read-back"));
        }
      }
      ASSERT_TRUE((*image)->Flush().ok());
    }
    ASSERT_TRUE(QemuImg("check -q " + ShellQuote(image_path)));
    const std::string shadow_path = dir.Join("shadow.raw");
    ASSERT_TRUE(WriteWholeFile(shadow_path, shadow));
    ASSERT_TRUE(QemuImg("compare -q -f qcow2 -F raw " + ShellQuote(image_path) + " " +
                        ShellQuote(shadow_path)));
  }
}

}  // namespace
}  // namespace qcow2fs::test
