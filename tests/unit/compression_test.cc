// Unit tests of codec/compression: zlib (raw deflate, 4 KiB window, as QEMU
// inflates it) and zstd round trips at every cluster size, the output bound
// ("0: store uncompressed"), and corrupt or short input.
#include "codec/compression.h"

#include <gtest/gtest.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <string>
#include <vector>

namespace qcow2fs {
namespace {

using Bytes = std::vector<std::byte>;

Bytes Compressible(size_t n, uint64_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; i++) {
    b[i] = static_cast<std::byte>((i / 64 + seed) % 7 + 'a');
  }
  return b;
}

Bytes Random(size_t n, uint64_t seed) {
  Bytes b(n);
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    b[i] = static_cast<std::byte>(x >> 24);
  }
  return b;
}

// Compresses `in` into a buffer of `bound` bytes; returns the stream.
Bytes Compress(CompressionType type, const Bytes& in, size_t bound) {
  Bytes out(bound);
  Result<size_t> n = CompressCluster(type, in, out);
  EXPECT_TRUE(n.ok()) << n.status().ToString();
  out.resize(n.ok() ? *n : 0);
  return out;
}

class Codec : public ::testing::TestWithParam<CompressionType> {};

TEST_P(Codec, RoundTripsAtEveryClusterSize) {
  for (size_t cs = 512; cs <= (2u << 20); cs *= 2) {
    SCOPED_TRACE("cluster " + std::to_string(cs));
    const Bytes in = Compressible(cs, cs);
    const Bytes stream = Compress(GetParam(), in, cs);
    ASSERT_FALSE(stream.empty()) << "compressible data must compress";
    ASSERT_LT(stream.size(), cs);
    Bytes out(cs);
    ASSERT_TRUE(DecompressCluster(GetParam(), stream, out).ok());
    ASSERT_EQ(out, in);
  }
}

TEST_P(Codec, IncompressibleDataIsStoredUncompressed) {
  const Bytes in = Random(65536, 1);
  Bytes out(65536);
  Result<size_t> n = CompressCluster(GetParam(), in, out);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);
}

TEST_P(Codec, TheOutputBoundIsRespected) {
  const Bytes in = Compressible(65536, 2);
  const size_t needed = Compress(GetParam(), in, in.size()).size();
  ASSERT_GT(needed, 0u);
  // Whatever the room, the answer is a stream shorter than it that inflates
  // to the input, or 0 (store uncompressed); nothing is written past it.
  for (size_t bound : {needed / 2, needed - 1, needed, needed + 1, needed + 64, in.size()}) {
    SCOPED_TRACE("bound " + std::to_string(bound));
    Bytes out(bound + 64, std::byte{0xa5});
    Result<size_t> n = CompressCluster(GetParam(), in, {out.data(), bound});
    ASSERT_TRUE(n.ok()) << n.status().ToString();
    ASSERT_LT(*n, bound) << "a stream as long as the bound saves nothing";
    for (size_t i = bound; i < out.size(); i++) ASSERT_EQ(out[i], std::byte{0xa5}) << i;
    if (*n == 0) continue;
    Bytes back(in.size());
    ASSERT_TRUE(DecompressCluster(GetParam(), {out.data(), *n}, back).ok());
    ASSERT_EQ(back, in);
  }
  Bytes exact(needed);
  Result<size_t> n = CompressCluster(GetParam(), in, exact);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u) << "a stream that fills the whole bound is refused";
}

TEST_P(Codec, TrailingBytesAfterTheStreamAreIgnored) {
  // A descriptor rounds up to whole sectors: what follows the stream may be
  // padding or the next cluster's data.
  const Bytes in = Compressible(4096, 3);
  Bytes stream = Compress(GetParam(), in, in.size());
  const Bytes next = Random(700, 4);
  stream.insert(stream.end(), next.begin(), next.end());
  Bytes out(4096);
  ASSERT_TRUE(DecompressCluster(GetParam(), stream, out).ok());
  EXPECT_EQ(out, in);
}

TEST_P(Codec, GarbageIsCorrupt) {
  Bytes out(4096);
  Status s = DecompressCluster(GetParam(), Random(600, 5), out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt);
  EXPECT_EQ(s.ToErrno(), EIO);
}

TEST_P(Codec, ATruncatedStreamIsCorrupt) {
  const Bytes in = Random(2048, 6);  // compresses poorly: a long stream
  Bytes padded = in;
  padded.resize(4096);  // zeros: compressible overall
  const Bytes stream = Compress(GetParam(), padded, padded.size());
  ASSERT_GT(stream.size(), 1000u);
  Bytes out(4096);
  Status s = DecompressCluster(GetParam(), {stream.begin(), stream.begin() + 900}, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << s.ToString();
}

TEST_P(Codec, AStreamShorterThanTheClusterIsCorrupt) {
  // A valid stream of half a cluster does not fill one.
  const Bytes half = Compressible(2048, 7);
  const Bytes stream = Compress(GetParam(), half, half.size());
  Bytes out(4096);
  Status s = DecompressCluster(GetParam(), stream, out);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kCorrupt) << s.ToString();
}

TEST_P(Codec, EmptyInputIsCorrupt) {
  Bytes out(512);
  EXPECT_EQ(DecompressCluster(GetParam(), {}, out).code(), ErrorCode::kCorrupt);
}

INSTANTIATE_TEST_SUITE_P(Types, Codec,
                         ::testing::Values(CompressionType::kZlib, CompressionType::kZstd),
                         [](const auto& param_info) {
                           return param_info.param == CompressionType::kZstd ? "zstd" : "zlib";
                         });

// QEMU inflates with windowBits -12: raw deflate, no zlib header, no match
// further back than 4 KiB. Random blocks that repeat 8 KiB apart would be
// matched by a 32 KiB window; the zeros between them keep the data
// compressible with a 4 KiB one. Inflating a little output at a time makes
// zlib resolve matches from its 4 KiB window only, so a match further back
// is an error, as it would be for a reader with that window.
TEST(Zlib, StreamsInflateWithQemusFourKiBWindow) {
  Bytes block = Random(6144, 8);
  block.resize(8192);
  Bytes in;
  for (int i = 0; i < 8; i++) in.insert(in.end(), block.begin(), block.end());
  Bytes stream = Compress(CompressionType::kZlib, in, in.size());
  ASSERT_FALSE(stream.empty());
  z_stream z{};
  ASSERT_EQ(inflateInit2(&z, -12), Z_OK);
  Bytes out(in.size());
  z.next_in = reinterpret_cast<Bytef*>(stream.data());
  z.avail_in = static_cast<uInt>(stream.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  int ret = Z_OK;
  while (ret == Z_OK) {
    const size_t done = static_cast<size_t>(z.next_out - reinterpret_cast<Bytef*>(out.data()));
    z.avail_out = static_cast<uInt>(std::min<size_t>(256, out.size() - done));
    ret = inflate(&z, Z_NO_FLUSH);
    if (ret == Z_BUF_ERROR && z.avail_out == 0) ret = Z_OK;
  }
  inflateEnd(&z);
  EXPECT_EQ(ret, Z_STREAM_END) << "a 4 KiB-window reader fails: " << (z.msg ? z.msg : "");
  EXPECT_EQ(out, in);
}

TEST(Zstd, StreamsAreOrdinaryZstdFrames) {
  const Bytes in = Compressible(65536, 9);
  const Bytes stream = Compress(CompressionType::kZstd, in, in.size());
  Bytes out(in.size());
  const size_t n = ZSTD_decompress(out.data(), out.size(), stream.data(), stream.size());
  ASSERT_FALSE(ZSTD_isError(n)) << ZSTD_getErrorName(n);
  EXPECT_EQ(n, in.size());
  EXPECT_EQ(out, in);
}

}  // namespace
}  // namespace qcow2fs
