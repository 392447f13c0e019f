// The internal snapshot table (spec "Snapshots"): variable-length entries
// packed from snapshots_offset, each padded to 8 bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "format/header.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

struct SnapshotEntry {
  uint64_t l1_table_offset = 0;
  uint32_t l1_size = 0;
  std::string id;
  std::string name;
  uint32_t date_sec = 0;
  uint32_t date_nsec = 0;
  uint64_t vm_clock_nsec = 0;
  uint64_t vm_state_size = 0;
  uint64_t disk_size = 0;  // from extra data; the header's size if absent
  std::vector<std::byte> extra_data;
};

// Reads `len` bytes at `offset` of the image file.
using ReadFn = std::function<Status(uint64_t offset, std::span<std::byte>)>;

// Reads and validates header.nb_snapshots entries from the image.
Result<std::vector<SnapshotEntry>> ReadSnapshotTable(const Header& header, uint64_t file_size,
                                                     const ReadFn& read);

// Encodes a snapshot table (for the writer).
std::vector<std::byte> EncodeSnapshotTable(const std::vector<SnapshotEntry>& entries);

}  // namespace qcow2fs
