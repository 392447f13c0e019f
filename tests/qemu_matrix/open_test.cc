// Open-time behaviour against images made by QEMU's tools: encryption,
// the corrupt and dirty bits, unknown feature bits, missing snapshots and
// backing files, raw probing, reads past the end.
#include <cstdio>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"
#include "qemu_matrix/harness.h"
#include "test_support.h"

namespace qcow2fs::test::matrix {
namespace {

// A small v3 image with data, for the patching tests below.
AssertionResult MakeSimpleImage(const TempDir& dir, const std::string& name,
                                const std::string& opts = "") {
  Builder bld(dir);
  bld.Create(name, 8 * MiB, opts);
  return bld.Io(name, {W(0, 1 * MiB), W(3 * MiB + 1, 12345)});
}

TEST(QemuOpen, LuksEncryptionFailsNamingEncryption) {
  ASSERT_TRUE(RequireProgram("qemu-img"));
  TempDir dir;
  const std::string img = dir.Join("enc.qcow2");
  // QEMU benchmarks PBKDF2 with thread CPU time and, on a busy machine,
  // sometimes gives up with "Unable to get accurate CPU usage": retry that.
  const std::string create =
      "create -q -f qcow2 --object secret,id=sec0,data=123456 "
      "-o encrypt.format=luks,encrypt.key-secret=sec0,"
      "encrypt.iter-time=10 " +
      ShellQuote(img) + " 8M";
  std::string out;
  AssertionResult made = AssertionFailure();
  for (int attempt = 0; attempt < 5; ++attempt) {
    std::remove(img.c_str());
    made = QemuImg(create, &out);
    if (made || out.find("accurate CPU usage") == std::string::npos) break;
  }
  ASSERT_TRUE(made);
  Qcow2Header h;
  ASSERT_TRUE(LoadQcow2Header(img, &h));
  ASSERT_EQ(h.crypt_method, 2u) << "expected a LUKS-encrypted image";
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_FALSE(r.ok()) << "an encrypted image must not open";
  EXPECT_TRUE(ContainsNoCase(r.status().message(), "encrypt"))
      << "message should name encryption: " << Describe(r.status());
}

TEST(QemuOpen, AesEncryptionMethodFailsNamingEncryption) {
  TempDir dir;
  const std::string img = dir.Join("aes.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "aes.qcow2"));
  ASSERT_TRUE(PatchBE32(img, hdr::kCryptMethod, 1));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_FALSE(r.ok()) << "crypt_method=1 (AES) must not open";
  EXPECT_TRUE(ContainsNoCase(r.status().message(), "encrypt"))
      << "message should name encryption: " << Describe(r.status());
}

TEST(QemuOpen, CorruptBitOpensReadOnlyWithWarning) {
  TempDir dir;
  const std::string img = dir.Join("c.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "c.qcow2"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, hdr::kIncompatCorrupt));
  OpenOptions o;
  o.read_only = false;
  auto r = Image::Open(img, o);
  ASSERT_TRUE(r.ok()) << "a corrupt-flagged image should open read-only: " << Describe(r.status());
  Image& image = *r.value();
  EXPECT_TRUE(image.read_only());
  const ImageInfo info = image.info();
  EXPECT_TRUE(info.corrupt);
  EXPECT_TRUE(info.read_only);
  ASSERT_FALSE(info.warnings.empty()) << "expected a warning about the corrupt bit";
  bool named = false;
  for (const auto& w : info.warnings) named = named || ContainsNoCase(w, "corrupt");
  EXPECT_TRUE(named) << "warning should say 'corrupt': " << info.warnings[0];
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(image.Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
  std::string data(4096, 'x');
  Status ws = image.Write(0, AsBytes(data));
  EXPECT_FALSE(ws.ok()) << "write to a corrupt image must fail";
  EXPECT_EQ(ws.code(), ErrorCode::kReadOnly) << Describe(ws);
}

TEST(QemuOpen, DirtyBitOpensReadOnlyWithMessage) {
  TempDir dir;
  const std::string img = dir.Join("d.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "d.qcow2", "lazy_refcounts=on"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, hdr::kIncompatDirty));
  OpenOptions o;
  o.read_only = true;  // a writable open repairs it first (check_test.cc)
  auto r = Image::Open(img, o);
  ASSERT_TRUE(r.ok()) << "a dirty image should open read-only: " << Describe(r.status());
  Image& image = *r.value();
  EXPECT_TRUE(image.read_only());
  const ImageInfo info = image.info();
  EXPECT_TRUE(info.dirty);
  EXPECT_TRUE(info.lazy_refcounts);
  ASSERT_FALSE(info.warnings.empty()) << "expected a message about the dirty bit";
  bool named = false;
  for (const auto& w : info.warnings) named = named || ContainsNoCase(w, "dirty");
  EXPECT_TRUE(named) << "warning should say 'dirty': " << info.warnings[0];
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(image.Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
}

TEST(QemuOpen, UnknownIncompatibleFeatureFailsNamingTheBit) {
  for (int bit : {5, 13, 40, 63}) {
    SCOPED_TRACE("bit " + Num(bit));
    TempDir dir;
    const std::string img = dir.Join("u.qcow2");
    ASSERT_TRUE(MakeSimpleImage(dir, "u.qcow2"));
    ASSERT_TRUE(PatchBE64(img, hdr::kIncompatibleFeatures, uint64_t{1} << bit));
    auto r = Image::Open(img, OpenOptions{});
    ASSERT_FALSE(r.ok()) << "unknown incompatible feature bit " << bit << " must fail";
    const std::string& m = r.status().message();
    char hex[32];
    std::snprintf(hex, sizeof hex, "%llx", static_cast<unsigned long long>(uint64_t{1} << bit));
    EXPECT_TRUE(m.find(Num(bit)) != std::string::npos || ContainsNoCase(m, hex))
        << "message should name bit " << bit << ": " << Describe(r.status());
  }
}

TEST(QemuOpen, UnknownCompatibleAndAutoclearBitsAreIgnored) {
  TempDir dir;
  const std::string img = dir.Join("c.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "c.qcow2"));
  ASSERT_TRUE(QemuConvertToRaw(img, dir.Join("ref.raw")));
  std::string ref;
  ASSERT_TRUE(ReadWholeFile(dir.Join("ref.raw"), &ref));
  ASSERT_TRUE(PatchBE64(img, hdr::kCompatibleFeatures, uint64_t{1} << 17));
  ASSERT_TRUE(PatchBE64(img, hdr::kAutoclearFeatures, uint64_t{1} << 9));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  std::string got(ref.size(), '\0');
  ASSERT_TRUE(r.value()->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(ref, got, 0));
}

TEST(QemuOpen, MissingSnapshotIsNotFound) {
  TempDir dir;
  const std::string img = dir.Join("s.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "s.qcow2"));
  ASSERT_TRUE(QemuImg("snapshot -c real " + ShellQuote(img)));
  OpenOptions o;
  o.snapshot = "nonexistent";
  auto r = Image::Open(img, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kNotFound) << Describe(r.status());
  EXPECT_TRUE(r.status().message().find("nonexistent") != std::string::npos)
      << Describe(r.status());
}

TEST(QemuOpen, MissingBackingFileFailsNamingIt) {
  TempDir dir;
  Builder bld(dir);
  ASSERT_TRUE(bld.Create("base.qcow2", 8 * MiB, ""));
  ASSERT_TRUE(bld.Create("top.qcow2", 8 * MiB, "", "base.qcow2", "qcow2"));
  ASSERT_EQ(std::remove(dir.Join("base.qcow2").c_str()), 0);
  auto r = Image::Open(dir.Join("top.qcow2"), OpenOptions{});
  ASSERT_FALSE(r.ok()) << "opening with a missing backing file must fail";
  EXPECT_TRUE(r.status().message().find("base.qcow2") != std::string::npos) << Describe(r.status());
}

TEST(QemuOpen, RawImageIsProbedAndReadsIdentically) {
  TempDir dir;
  const std::string path = dir.Join("disk.raw");
  const std::string data = RandomBytes(3 * MiB + 512, 4242);
  ASSERT_TRUE(WriteWholeFile(path, data));
  auto r = Image::Open(path, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  EXPECT_EQ(r.value()->info().format, "raw");
  ASSERT_EQ(r.value()->size(), data.size());
  std::string got(data.size(), '\0');
  ASSERT_TRUE(r.value()->Read(0, AsWritableBytes(got)).ok());
  EXPECT_TRUE(BuffersEqual(data, got, 0));
}

TEST(QemuOpen, ReadPastEndIsRejected) {
  TempDir dir;
  const std::string img = dir.Join("e.qcow2");
  ASSERT_TRUE(MakeSimpleImage(dir, "e.qcow2"));
  auto r = Image::Open(img, OpenOptions{});
  ASSERT_TRUE(r.ok()) << Describe(r.status());
  std::string buf(4096, '\0');
  Status s = r.value()->Read(8 * MiB - 100, AsWritableBytes(buf));
  EXPECT_FALSE(s.ok()) << "a read crossing the end of the disk must fail";
  if (!s.ok()) {
    EXPECT_TRUE(s.code() == ErrorCode::kOutOfRange || s.code() == ErrorCode::kInvalidArgument)
        << Describe(s);
  }
}

}  // namespace
}  // namespace qcow2fs::test::matrix
