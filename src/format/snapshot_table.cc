// Decoding and encoding of the snapshot table.
#include "format/snapshot_table.h"

#include "format/endian.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

constexpr uint64_t kEntryFixedBytes = 40;

Status Corrupt(const std::string& what) {
  return Status(ErrorCode::kCorrupt, "snapshot table: " + what);
}

}  // namespace

Result<std::vector<SnapshotEntry>> ReadSnapshotTable(const Header& h, uint64_t file_size,
                                                     const ReadFn& read) {
  std::vector<SnapshotEntry> out;
  uint64_t pos = h.snapshots_offset;
  const uint64_t cs = h.cluster_size();
  for (uint32_t i = 0; i < h.nb_snapshots; i++) {
    if (pos - h.snapshots_offset + kEntryFixedBytes > limits::kMaxSnapshotTableBytes ||
        pos + kEntryFixedBytes > file_size) {
      return Corrupt("entry " + std::to_string(i) +
                     " lies past the end of the file or the 64 MiB limit");
    }
    std::byte fixed[kEntryFixedBytes];
    QCOW2FS_RETURN_IF_ERROR(read(pos, fixed));
    SnapshotEntry e;
    e.l1_table_offset = LoadBe64(fixed);
    e.l1_size = LoadBe32(fixed + 8);
    const uint16_t id_size = LoadBe16(fixed + 12);
    const uint16_t name_size = LoadBe16(fixed + 14);
    e.date_sec = LoadBe32(fixed + 16);
    e.date_nsec = LoadBe32(fixed + 20);
    e.vm_clock_nsec = LoadBe64(fixed + 24);
    e.vm_state_size = LoadBe32(fixed + 32);
    const uint32_t extra_size = LoadBe32(fixed + 36);
    if (extra_size > limits::kMaxSnapshotExtraData) {
      return Corrupt("entry " + std::to_string(i) + " has " + std::to_string(extra_size) +
                     " bytes of extra data");
    }
    const uint64_t var_bytes = uint64_t{extra_size} + id_size + name_size;
    const uint64_t entry_bytes = (kEntryFixedBytes + var_bytes + 7) & ~7ull;
    if (pos - h.snapshots_offset + entry_bytes > limits::kMaxSnapshotTableBytes ||
        pos + kEntryFixedBytes + var_bytes > file_size) {
      return Corrupt("entry " + std::to_string(i) +
                     " lies past the end of the file or the 64 MiB limit");
    }
    std::vector<std::byte> var(var_bytes);
    QCOW2FS_RETURN_IF_ERROR(read(pos + kEntryFixedBytes, var));
    e.extra_data.assign(var.begin(), var.begin() + extra_size);
    e.id.assign(reinterpret_cast<const char*>(var.data() + extra_size), id_size);
    e.name.assign(reinterpret_cast<const char*>(var.data() + extra_size + id_size), name_size);
    e.disk_size = h.size;
    if (extra_size >= 8) e.vm_state_size = LoadBe64(e.extra_data.data());
    if (extra_size >= 16) e.disk_size = LoadBe64(e.extra_data.data() + 8);

    if (e.l1_table_offset % cs != 0) {
      return Corrupt("snapshot '" + e.name + "' L1 table is not cluster aligned");
    }
    if (uint64_t{e.l1_size} * 8 > limits::kMaxL1Bytes) {
      return Corrupt("snapshot '" + e.name + "' L1 table is too large");
    }
    if (e.l1_size > 0 &&
        (e.l1_table_offset == 0 || e.l1_table_offset + uint64_t{e.l1_size} * 8 > file_size)) {
      return Corrupt("snapshot '" + e.name + "' L1 table lies outside the file");
    }
    if (e.disk_size > limits::kMaxVirtualSize) {
      return Corrupt("snapshot '" + e.name + "' disk size is too large");
    }
    out.push_back(std::move(e));
    pos += entry_bytes;
  }
  return out;
}

std::vector<std::byte> EncodeSnapshotTable(const std::vector<SnapshotEntry>& entries) {
  std::vector<std::byte> out;
  for (const auto& e : entries) {
    const uint64_t start = out.size();
    const uint64_t var_bytes = e.extra_data.size() + e.id.size() + e.name.size();
    out.resize(start + ((kEntryFixedBytes + var_bytes + 7) & ~7ull));
    std::byte* p = out.data() + start;
    StoreBe64(p, e.l1_table_offset);
    StoreBe32(p + 8, e.l1_size);
    StoreBe16(p + 12, static_cast<uint16_t>(e.id.size()));
    StoreBe16(p + 14, static_cast<uint16_t>(e.name.size()));
    StoreBe32(p + 16, e.date_sec);
    StoreBe32(p + 20, e.date_nsec);
    StoreBe64(p + 24, e.vm_clock_nsec);
    StoreBe32(p + 32, static_cast<uint32_t>(e.vm_state_size > 0xffffffffu ? 0 : e.vm_state_size));
    StoreBe32(p + 36, static_cast<uint32_t>(e.extra_data.size()));
    p += kEntryFixedBytes;
    for (std::byte b : e.extra_data) *p++ = b;
    for (char c : e.id) *p++ = static_cast<std::byte>(c);
    for (char c : e.name) *p++ = static_cast<std::byte>(c);
  }
  return out;
}

}  // namespace qcow2fs
