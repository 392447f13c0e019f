// zlib (deflate) and zstd cluster codecs.
//
// Inflate uses libdeflate: a compressed cluster is one whole buffer, which is
// libdeflate's model, and it inflates about twice as fast as zlib. Deflate
// uses zlib because QEMU inflates with a 4 KiB window (windowBits -12): a
// stream must not reference further back, and only zlib lets us cap the
// window; libdeflate always uses 32 KiB.
#include "codec/compression.h"

#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

#include <memory>

namespace qcow2fs {
namespace {

struct DeflateDecompressorDeleter {
  void operator()(libdeflate_decompressor* d) const { libdeflate_free_decompressor(d); }
};
struct ZstdDctxDeleter {
  void operator()(ZSTD_DCtx* c) const { ZSTD_freeDCtx(c); }
};
struct ZstdCctxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};

Status Corrupt(const char* what) { return Status(ErrorCode::kCorrupt, what); }

Status InflateCluster(std::span<const std::byte> in, std::span<std::byte> out) {
  thread_local std::unique_ptr<libdeflate_decompressor, DeflateDecompressorDeleter> d(
      libdeflate_alloc_decompressor());
  if (!d) return Status(ErrorCode::kIoError, "out of memory for inflate", ENOMEM);
  size_t consumed = 0;
  // Without an actual_out pointer libdeflate insists on filling `out`
  // exactly, which is the contract of a compressed cluster.
  libdeflate_result r = libdeflate_deflate_decompress_ex(d.get(), in.data(), in.size(), out.data(),
                                                         out.size(), &consumed, nullptr);
  if (r != LIBDEFLATE_SUCCESS) {
    return Corrupt("compressed cluster: invalid deflate data");
  }
  return Status();
}

Status ZstdDecompressCluster(std::span<const std::byte> in, std::span<std::byte> out) {
  thread_local std::unique_ptr<ZSTD_DCtx, ZstdDctxDeleter> ctx(ZSTD_createDCtx());
  if (!ctx) return Status(ErrorCode::kIoError, "out of memory for zstd", ENOMEM);
  ZSTD_DCtx_reset(ctx.get(), ZSTD_reset_session_only);
  ZSTD_inBuffer input{in.data(), in.size(), 0};
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  // Stream until the cluster is full: the input may carry trailing sector
  // padding (or the next cluster's data), which must be ignored.
  while (output.pos < output.size) {
    size_t before_in = input.pos, before_out = output.pos;
    size_t ret = ZSTD_decompressStream(ctx.get(), &output, &input);
    if (ZSTD_isError(ret)) return Corrupt("compressed cluster: invalid zstd data");
    if (output.pos == output.size) break;
    if (ret == 0 || (input.pos == before_in && output.pos == before_out)) {
      return Corrupt("compressed cluster: zstd data ends before the cluster");
    }
  }
  return Status();
}

}  // namespace

Status DecompressCluster(CompressionType type, std::span<const std::byte> in,
                         std::span<std::byte> out) {
  return type == CompressionType::kZstd ? ZstdDecompressCluster(in, out) : InflateCluster(in, out);
}

Result<size_t> CompressCluster(CompressionType type, std::span<const std::byte> in,
                               std::span<std::byte> out) {
  if (type == CompressionType::kZstd) {
    thread_local std::unique_ptr<ZSTD_CCtx, ZstdCctxDeleter> ctx(ZSTD_createCCtx());
    if (!ctx) return Status(ErrorCode::kIoError, "out of memory for zstd", ENOMEM);
    size_t n = ZSTD_compressCCtx(ctx.get(), out.data(), out.size(), in.data(), in.size(),
                                 ZSTD_CLEVEL_DEFAULT);
    if (ZSTD_isError(n) || n >= out.size()) return size_t{0};
    return n;
  }
  z_stream s{};
  // Raw deflate (negative windowBits) with a 4 KiB window, as QEMU expects.
  if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
    return Status(ErrorCode::kIoError, "deflateInit2 failed", ENOMEM);
  }
  s.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  s.avail_in = static_cast<uInt>(in.size());
  s.next_out = reinterpret_cast<Bytef*>(out.data());
  s.avail_out = static_cast<uInt>(out.size());
  int ret = deflate(&s, Z_FINISH);
  size_t n = out.size() - s.avail_out;
  deflateEnd(&s);
  if (ret != Z_STREAM_END || n >= out.size()) return size_t{0};
  return n;
}

}  // namespace qcow2fs
