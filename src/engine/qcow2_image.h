// Qcow2Image: the qcow2 implementation of Image.
//
// Locks, in the order they are taken:
//   1. discard_lock_ (std::shared_mutex). Guest reads and writes hold the
//      shared side from the moment they look up a host offset until their
//      data I/O is done. Whatever drops a data cluster's refcount to zero
//      holds the exclusive side, so no host cluster is freed (and possibly
//      reused) while an in-flight request still uses it.
//   2. meta_mutex_ (std::mutex). Guards all metadata in memory: the L1
//      table, the L2 cache, refcounts and allocation state. It is never held
//      across data I/O; the L2 cache drops it while loading a table.
// See docs/concurrency.md for the whole design.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <vector>

#include "engine/image_open.h"
#include "engine/l2_cache.h"
#include "format/header.h"
#include "format/snapshot_table.h"
#include "io/file.h"
#include "qcow2fs/image.h"

namespace qcow2fs {

// One piece of a guest range and where its bytes come from.
struct Extent {
  enum class Kind : uint8_t { kData, kZero, kBacking, kCompressed };
  Kind kind = Kind::kZero;
  uint64_t guest_offset = 0;
  uint64_t length = 0;
  uint64_t host_offset = 0;      // kData: first byte; kCompressed: descriptor offset
  uint64_t compressed_bytes = 0;  // kCompressed: bytes to read at host_offset
  uint64_t cluster_guest_offset = 0;  // kCompressed: guest offset of its cluster
};

class Qcow2Image final : public Image {
 public:
  static Result<std::unique_ptr<Image>> Open(std::unique_ptr<File> file,
                                             const std::string& path,
                                             const OpenOptions& options,
                                             const FileOpener& opener,
                                             int chain_depth);
  ~Qcow2Image() override;

  uint64_t size() const override { return size_.load(std::memory_order_acquire); }
  bool read_only() const override { return read_only_; }
  ImageInfo info() const override;

  Status Read(uint64_t offset, std::span<std::byte> buf) override;
  Status Write(uint64_t offset, std::span<const std::byte> data) override;
  Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t length) override;
  Status Flush() override;
  Status Resize(uint64_t new_size) override;
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t length) override;
  uint64_t AllocatedBytes() const override;

 private:
  Qcow2Image() = default;

  Status LoadMetadata(const OpenOptions& options, const FileOpener& opener,
                      int chain_depth);
  Status OpenBacking(const OpenOptions& options, const FileOpener& opener,
                     int chain_depth);
  Status OpenDataFile(const FileOpener& opener);
  Status LoadL1(uint64_t offset, uint32_t entries);

  // Reads and validates one L2 table (the L2 cache's loader).
  Status LoadL2Table(uint64_t offset, std::span<uint64_t> words);
  // Maps [offset, end) into at most `max` extents, merging neighbours that
  // can be served by one I/O. Returns how many were produced (at least one
  // unless an error occurs). Caller holds meta_mutex_ via `lk`.
  Result<size_t> MapLocked(std::unique_lock<std::mutex>& lk, uint64_t offset,
                           uint64_t end, Extent* out, size_t max);
  Status ReadExtent(const Extent& e, std::byte* dst);
  Status ReadCompressed(const Extent& e, std::byte* dst);
  Status ReadBacking(uint64_t offset, std::span<std::byte> dst);
  std::string Where(uint64_t guest_offset) const;

  // Fixed after open.
  std::string path_;
  Header header_;
  std::unique_ptr<File> file_;
  std::unique_ptr<File> owned_data_file_;
  File* data_file_ = nullptr;  // file_ or owned_data_file_
  std::unique_ptr<Image> backing_;
  std::string backing_resolved_;
  std::vector<SnapshotEntry> snapshots_;
  std::vector<std::string> warnings_;
  bool read_only_ = true;
  CompressionType compression_ = CompressionType::kZlib;
  uint32_t cluster_bits_ = 16;
  uint64_t cluster_size_ = 65536;
  uint64_t l2_entries_ = 8192;
  uint32_t subcluster_bits_ = 16;  // cluster_bits_ - 5 with extended L2
  bool extended_l2_ = false;

  std::atomic<uint64_t> size_{0};  // virtual size; changes only on Resize
  // Length of the image file, for bounds checks of metadata. Only grows
  // while the image is open, so a stale read errs on the safe side.
  std::atomic<uint64_t> file_size_{0};

  mutable std::shared_mutex discard_lock_;
  std::mutex meta_mutex_;
  std::vector<uint64_t> l1_;  // guarded by meta_mutex_
  std::unique_ptr<L2Cache> l2_cache_;  // guarded by meta_mutex_
};

}  // namespace qcow2fs
