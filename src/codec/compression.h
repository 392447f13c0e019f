// Compressed cluster codecs (spec "Compressed Clusters Descriptor" and the
// compression_type header field): raw deflate with a 4 KiB window, as QEMU
// writes it, and zstd frames.
//
// Pure functions, thread-safe: each thread keeps its own codec contexts.
#pragma once

#include <cstddef>
#include <span>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

// Decompresses one cluster. `in` may extend past the end of the compressed
// stream (descriptors round up to whole sectors); decompression stops once
// `out` (exactly one cluster) is full. Fails with kCorrupt if the stream is
// invalid or produces less than a cluster.
Status DecompressCluster(CompressionType type, std::span<const std::byte> in,
                         std::span<std::byte> out);

// Compresses one cluster into `out`. Returns the compressed size, or 0 when
// the result would not be smaller than out.size() (store uncompressed).
Result<size_t> CompressCluster(CompressionType type, std::span<const std::byte> in,
                               std::span<std::byte> out);

}  // namespace qcow2fs
