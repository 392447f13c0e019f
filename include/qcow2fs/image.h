// The qcow2fs core: a qcow2 (or raw) disk image as a thread-safe guest disk.
//
// Every method of Image may be called from many threads at once. Guest I/O is
// positional (pread/pwrite style) on byte ranges of any size and alignment
// inside [0, size()). Nothing here throws; errors are Status values whose
// message names the structure and offset at fault.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs {

enum class CompressionType { kZlib = 0, kZstd = 1 };

struct OpenOptions {
  bool read_only = true;
  // Bytes of L2 tables kept in memory. 0 picks the default, as QEMU's on
  // Linux: enough tables to map the whole disk, at least 1 MiB, at most
  // 32 MiB.
  size_t l2_cache_bytes = 0;
  // Take the image-level flock and QEMU's byte-range locks. Turning this off
  // is only safe for read-only access to an image nobody writes.
  bool lock = true;
  // Open an internal snapshot (by ID or name) instead of the active state.
  // Implies read-only.
  std::optional<std::string> snapshot;
  // Large guest data transfers (64 KiB or more) bypass the host page cache
  // (O_DIRECT) wherever they meet the host's direct-I/O alignment, as with
  // QEMU's cache.direct=on; small ones, metadata and unaligned pieces stay
  // cached, where a warm cache serves random I/O faster than the disk. Applies to backing
  // and external data files too. Ignored where the host refuses O_DIRECT.
  // The caller's buffers must then be aligned (4 KiB is always enough) for
  // the direct path to be taken.
  bool direct_io = false;
  // Format of the file: "qcow2", "raw", or empty to probe (qcow2 magic, else
  // raw). The top image of a mount is required to be qcow2 by the daemon.
  std::string format;
  // Store newly written guest clusters compressed (must match the image's
  // compression type). Small and unaligned writes are staged in memory until
  // a whole cluster is known; Flush() writes out everything staged.
  std::optional<CompressionType> compress;
  // Memory bound of that staging, in bytes. 0 picks 64 MiB (at least 16
  // clusters). Writers wait when it is full.
  size_t compress_cache_bytes = 0;
  // Where compression of completed clusters runs. The daemon passes its
  // oneTBB arena, so a single writer (cp) still keeps every CPU busy and is
  // not held up by compression. Empty: compress on the writing thread.
  // The executor must outlive the image.
  std::function<void(std::function<void()>)> compress_executor;
};

struct CreateOptions {
  uint64_t size = 0;                                     // virtual size, rounded up to 512 bytes
  uint32_t cluster_size = 65536;                         // 512 .. 2 MiB, a power of two
  int version = 3;                                       // 2 or 3
  int refcount_bits = 16;                                // 1, 2, 4, ..., 64 (v2: only 16)
  bool extended_l2 = false;                              // v3 only, cluster_size >= 16 KiB
  CompressionType compression = CompressionType::kZlib;  // zstd needs v3
  std::string backing_file;                              // as stored in the header
  std::string backing_format;                            // "qcow2" or "raw"; probed when empty
};

// One internal snapshot, as read from the snapshot table.
struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t disk_size = 0;
  uint64_t vm_state_size = 0;
  uint64_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
};

// What an image is made of; the fields a tool or a log line needs.
struct ImageInfo {
  std::string format;  // "qcow2" or "raw"
  std::string path;
  int version = 0;
  uint64_t virtual_size = 0;
  uint32_t cluster_size = 0;
  int refcount_bits = 0;
  bool extended_l2 = false;
  CompressionType compression = CompressionType::kZlib;
  std::string backing_file;  // as stored in the header
  std::string backing_file_resolved;
  std::string backing_format;
  std::string data_file;  // external data file name, if any
  bool data_file_raw = false;
  bool read_only = true;
  bool corrupt = false;
  bool dirty = false;
  bool lazy_refcounts = false;
  uint64_t l1_size = 0;
  std::vector<SnapshotInfo> snapshots;
  std::vector<std::string> warnings;  // e.g. why the image was opened read-only
};

// How a guest range is stored in this image (not looking into backing files).
enum class BlockKind {
  kData,         // allocated in this image (normal or compressed)
  kZero,         // reads as zeros without being backed by data
  kUnallocated,  // reads from the backing file, or zeros without one
};

struct BlockStatus {
  BlockKind kind = BlockKind::kUnallocated;
  uint64_t length = 0;  // bytes from the queried offset with this kind
  bool compressed = false;
  std::optional<uint64_t> host_offset;  // first byte, for uncompressed data
};

class Image {
 public:
  // Opens an image. Backing files and external data files are opened
  // read-only, resolved relative to the image's directory.
  static Result<std::unique_ptr<Image>> Open(const std::string& path, const OpenOptions& options);
  // Creates a new qcow2 image at `path` (which must not exist).
  static Status Create(const std::string& path, const CreateOptions& options);

  virtual ~Image() = default;
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;

  // Virtual disk size in bytes.
  virtual uint64_t size() const = 0;
  virtual bool read_only() const = 0;
  virtual ImageInfo info() const = 0;

  // Reads buf.size() bytes at guest `offset`. The range must lie inside the
  // disk. A corrupt mapping fails the call with kCorrupt; other ranges stay
  // readable.
  virtual Status Read(uint64_t offset, std::span<std::byte> buf) = 0;
  // Writes data at guest `offset`; on return it is visible to readers. It is
  // durable only after Flush().
  virtual Status Write(uint64_t offset, std::span<const std::byte> data) = 0;
  // Makes [offset, offset+length) read as zeros. With may_unmap the core may
  // free the host clusters instead of writing zeros.
  virtual Status WriteZeroes(uint64_t offset, uint64_t length, bool may_unmap) = 0;
  // Tells the image the guest no longer needs the range. Whole clusters are
  // freed (and the host file's blocks punched at the next flush); partial
  // clusters at the edges are written with zeros. The range reads as zeros
  // afterwards, except whole clusters of a version 2 image with a backing
  // file, which show the backing data again (v2 has no zero flag).
  virtual Status Discard(uint64_t offset, uint64_t length) = 0;
  // Writes back all dirty metadata in crash-safe order, then syncs: every
  // write completed before the call survives a crash after it returns.
  virtual Status Flush() = 0;
  // Changes the virtual size, rounded up to a multiple of 512 bytes (QEMU
  // ignores a partial last sector). Growing always works on a writable
  // image; shrinking only when nothing is allocated past the new end.
  virtual Status Resize(uint64_t new_size) = 0;
  // How the range starting at `offset` is stored: the kind of its first byte
  // and how many bytes from there share it (at most `length`).
  virtual Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t length) = 0;
  // Whether the range starting at `offset` reads as data or as zeros,
  // looking through the backing chain as `qemu-img map` does: kData where
  // some layer holds data, kZero where every layer reads zeros (zero
  // clusters, unallocated ranges past the end of a shorter backing file or
  // without one, holes of a raw file). Never kUnallocated. For SEEK_DATA
  // and SEEK_HOLE.
  virtual Result<BlockStatus> GetDataStatus(uint64_t offset, uint64_t length) = 0;
  // Bytes the image occupies on the host (allocated blocks of its files).
  virtual uint64_t AllocatedBytes() const = 0;

  // Internal snapshots (qcow2 only: a raw image fails with kUnsupported).
  //
  // Takes a snapshot of the disk named `name`, online: every write that
  // completed before the call is in it, no write that starts after it
  // returns is. Staged and write-back data are written out first; guest
  // writes wait while the metadata step runs, reads do not. The new
  // snapshot's ID is one more than the highest numeric ID in the table.
  // Crash-safe: a crash at any instant leaves either no snapshot or a
  // complete one, with at worst leaked clusters; a crash between the
  // refcount and the L2 update (the same window as QEMU's) can also leave
  // OFLAG_COPIED flags that disagree with refcounts, which a repair
  // rewrites and which put no data at risk. Fails with kAlreadyExists
  // when a snapshot has that name (or that ID), kInvalidArgument for an
  // empty name, kUnsupported for refcount_bits=1 images (no room for a
  // second reference), kReadOnly on a read-only image.
  virtual Status CreateSnapshot(const std::string& name) = 0;
  // Deletes the snapshot with that ID, else that name. The table entry goes
  // first, then the refcounts drop and clusters nothing else uses are freed,
  // under the exclusive side of the discard lock. kBusy while a view of it
  // (OpenSnapshot) is alive; kNotFound when there is none.
  virtual Status DeleteSnapshot(const std::string& id_or_name) = 0;
  // A read-only view of a snapshot's disk (its own size, block status and
  // data), readable while this image is written. It reads the same file
  // (reopened through this process's descriptor), takes no locks of its
  // own, and must not outlive this image. kNotFound when there is none.
  virtual Result<std::unique_ptr<Image>> OpenSnapshot(const std::string& id_or_name) = 0;
  // Reverts the image at `path` to a snapshot, offline (as `qemu-img
  // snapshot -a`): the active disk becomes the snapshot's, which stays.
  // Takes the image locks as a writer; fails with kLocked when the image is
  // in use.
  static Status ApplySnapshot(const std::string& path, const std::string& id_or_name);

 protected:
  Image() = default;
};

}  // namespace qcow2fs
