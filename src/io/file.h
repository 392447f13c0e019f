// File: the one seam between the core and host storage.
//
// The core reaches image, backing and data files only through this interface,
// so tests can substitute memory files and the fault-injecting decorator
// (fault_injection_file.h). All methods are thread-safe for non-overlapping
// ranges, like pread/pwrite. Reads past the end of the file return zeros for
// the missing part (as QEMU's file driver does); a short read inside the file
// is retried, never returned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "qcow2fs/status.h"

namespace qcow2fs {

class File {
 public:
  virtual ~File() = default;

  // Fills buf from `offset`; bytes past the end of the file read as zeros.
  virtual Status ReadAt(uint64_t offset, std::span<std::byte> buf) = 0;
  // Writes all of data at `offset`, extending the file if needed.
  virtual Status WriteAt(uint64_t offset, std::span<const std::byte> data) = 0;
  // Makes everything written so far durable (fdatasync).
  virtual Status Sync() = 0;
  // Deallocates [offset, offset+length); the range then reads as zeros.
  // Falls back to writing zeros where the host cannot punch holes.
  virtual Status PunchHole(uint64_t offset, uint64_t length) = 0;
  // Sets the file's length.
  virtual Status Truncate(uint64_t length) = 0;
  // Reserves blocks for [offset, offset+length) (posix_fallocate-like).
  virtual Status Allocate(uint64_t offset, uint64_t length) = 0;
  // Current length of the file.
  virtual Result<uint64_t> Size() = 0;
  // Bytes the file occupies on the host (st_blocks * 512 for a real file).
  virtual uint64_t AllocatedBytes() = 0;
  // Name for messages.
  virtual const std::string& name() const = 0;
  // The file descriptor for locking, or -1 for files that are not real.
  virtual int fd() const { return -1; }
};

// Opens a host file. `writable` selects O_RDWR. With `direct_io`, large
// transfers (64 KiB or more) that meet the host's direct-I/O alignment
// bypass the page cache (O_DIRECT); small or unaligned ones, and everything
// where the file system refuses O_DIRECT, go through it.
Result<std::unique_ptr<File>> OpenPosixFile(const std::string& path, bool writable,
                                            bool direct_io = false);

// A file held in memory, for tests and the fuzzer.
std::unique_ptr<File> NewMemoryFile(std::string name, std::string contents);

}  // namespace qcow2fs
