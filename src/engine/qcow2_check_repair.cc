// Repairs of the image check, each in an order that keeps the image
// repairable if it is interrupted at any write:
//   - entry patches only remove references that pointed outside the file
//     (or a preallocation that was never counted), so a subset of them
//     leaves the image as it was or better;
//   - in-place refcount fixes set each mismatched refcount to its reference
//     count; a crash leaves every refcount either old or right;
//   - a rebuild writes a complete new refcount structure past everything in
//     use, syncs, and only then points the header at it with one write: a
//     crash before that leaves the old structure in charge and the new one
//     as unused space past the end, a crash after it the new structure,
//     already durable.
#include <algorithm>
#include <cinttypes>

#include "engine/qcow2_check_internal.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/limits.h"
#include "format/refcount_block.h"

namespace qcow2fs::check {

Status ApplyPatches(File& file, const Findings& f, CheckReport& report) {
  for (const WordPatch& patch : f.patches) {
    std::byte word[8];
    StoreBe64(word, patch.value);
    QCOW2FS_RETURN_IF_ERROR(file.WriteAt(patch.offset, word).Annotate("repairing " + patch.what));
    report.repairs.push_back("Repairing " + patch.what);
    report.corruptions_fixed++;
  }
  if (!f.patches.empty()) {
    QCOW2FS_RETURN_IF_ERROR(file.Sync().Annotate("syncing repaired table entries"));
  }
  return Status();
}

Status FixRefcountsInPlace(File& file, const Findings& f, bool leaks_only, CheckReport& report) {
  const Header& h = f.header;
  const uint64_t max = MaxRefcount(h.refcount_order);
  StoredRefcounts layout(file, h, f.refcount_table);
  const uint64_t per_block = layout.block_entries();
  bool wrote = false;
  std::vector<std::byte> block(h.cluster_size());
  // Mismatches are in cluster order: one read and one write per block.
  for (size_t k = 0; k < f.mismatches.size();) {
    const uint64_t index = f.mismatches[k].cluster / per_block;
    size_t end = k;
    while (end < f.mismatches.size() && f.mismatches[end].cluster / per_block == index) end++;
    const uint64_t offset = layout.BlockOffset(index);
    if (offset == 0) {
      // A stored refcount above 0 comes from a block; 0 with references
      // asks for a rebuild, which the caller does instead.
      return Status(ErrorCode::kCorrupt,
                    "refcount block " + std::to_string(index) + " vanished during repair");
    }
    QCOW2FS_RETURN_IF_ERROR(file.ReadAt(offset, block));
    bool changed = false;
    for (size_t m = k; m < end; m++) {
      const RefcountMismatch& mm = f.mismatches[m];
      const bool leak = mm.stored > mm.references;
      if (leaks_only && !leak) continue;
      const uint64_t value = std::min(mm.references, max);
      SetRefcountEntry(block.data(), h.refcount_order, mm.cluster % per_block, value);
      changed = true;
      report.repairs.push_back(Fmt("Repairing cluster %" PRIu64 " refcount=%" PRIu64
                                   " reference=%" PRIu64,
                                   mm.cluster, mm.stored, mm.references));
      if (value != mm.references) continue;  // overflow: still wrong
      if (leak) {
        report.leaks_fixed++;
      } else {
        report.corruptions_fixed++;
      }
    }
    if (changed) {
      QCOW2FS_RETURN_IF_ERROR(
          file.WriteAt(offset, block).Annotate("writing refcount block " + std::to_string(index)));
      wrote = true;
    }
    k = end;
  }
  if (wrote) QCOW2FS_RETURN_IF_ERROR(file.Sync().Annotate("syncing repaired refcounts"));
  return Status();
}

Status RebuildRefcounts(File& file, Findings& f, CheckReport& report) {
  const Header& h = f.header;
  const uint32_t bits = h.cluster_bits;
  const uint64_t cs = h.cluster_size();
  const uint64_t per_block = cs * 8 >> h.refcount_order;
  const uint64_t max = MaxRefcount(h.refcount_order);
  std::vector<uint32_t>& refs = f.refs;

  // The old structure stops counting: the new one replaces it.
  for (uint64_t c : f.old_refcount_clusters) {
    if (c < refs.size() && refs[c] > 0) refs[c]--;
  }
  // Everything new goes past the end of the file, past every cluster in
  // use and past whatever a structure names that stays in place.
  uint64_t start = std::max<uint64_t>(refs.size(), (f.file_size + cs - 1) / cs);
  start = std::max(start, AlignUp(f.reserved_end, cs) / cs);

  // Blocks that hold a refcount other than 0 below `start`.
  std::vector<uint64_t> used_blocks;
  for (uint64_t b = 0; b * per_block < refs.size(); b++) {
    const uint64_t last = std::min<uint64_t>(refs.size(), (b + 1) * per_block);
    if (std::any_of(refs.begin() + b * per_block, refs.begin() + last,
                    [](uint32_t r) { return r != 0; })) {
      used_blocks.push_back(b);
    }
  }
  // Lay out [start, start + table_clusters) for the table and the blocks
  // after it; they must count themselves, which may need more blocks and a
  // larger table: repeat until the layout covers itself.
  uint64_t table_clusters = 1, block_count = 0;
  std::vector<uint64_t> blocks;
  while (true) {
    const uint64_t end = start + table_clusters + block_count;
    blocks = used_blocks;
    for (uint64_t b = start / per_block; b <= (end - 1) / per_block; b++) {
      if (blocks.empty() || blocks.back() < b) blocks.push_back(b);
    }
    const uint64_t need_table = AlignUp((blocks.back() + 1) * 8, cs) / cs;
    if (blocks.size() == block_count && need_table == table_clusters) break;
    block_count = blocks.size();
    table_clusters = std::max(table_clusters, need_table);
  }
  if (table_clusters * cs > limits::kMaxRefcountTableBytes) {
    return Status(ErrorCode::kNoSpace, "a refcount table for " + std::to_string(start) +
                                           " clusters would exceed the 8 MiB limit");
  }
  const uint64_t end = start + table_clusters + block_count;
  refs.resize(end, 0);
  for (uint64_t c = start; c < end; c++) refs[c] = 1;

  std::vector<std::byte> table(table_clusters * cs);
  std::vector<std::byte> block(cs);
  for (size_t k = 0; k < blocks.size(); k++) {
    const uint64_t offset = (start + table_clusters + k) << bits;
    StoreBe64(table.data() + 8 * blocks[k], offset);
    std::fill(block.begin(), block.end(), std::byte{0});
    const uint64_t first = blocks[k] * per_block;
    for (uint64_t c = first; c < std::min<uint64_t>(refs.size(), first + per_block); c++) {
      if (refs[c])
        SetRefcountEntry(block.data(), h.refcount_order, c - first,
                         std::min<uint64_t>(refs[c], max));
    }
    QCOW2FS_RETURN_IF_ERROR(file.WriteAt(offset, block).Annotate("writing a new refcount block"));
  }
  const uint64_t table_offset = start << bits;
  QCOW2FS_RETURN_IF_ERROR(
      file.WriteAt(table_offset, table).Annotate("writing the new refcount table"));
  QCOW2FS_RETURN_IF_ERROR(file.Sync().Annotate("syncing the new refcount structure"));

  // refcount_table_offset (8 bytes at 48) and refcount_table_clusters (4
  // bytes at 56) in one write.
  std::byte fields[12];
  StoreBe64(fields, table_offset);
  StoreBe32(fields + 8, static_cast<uint32_t>(table_clusters));
  QCOW2FS_RETURN_IF_ERROR(
      file.WriteAt(48, fields).Annotate("pointing the header at the new refcount table"));
  QCOW2FS_RETURN_IF_ERROR(file.Sync().Annotate("syncing the header"));

  f.header.refcount_table_offset = table_offset;
  f.header.refcount_table_clusters = static_cast<uint32_t>(table_clusters);
  f.refcount_table.assign(table_clusters * cs / 8, 0);
  for (size_t k = 0; k < blocks.size(); k++) {
    f.refcount_table[blocks[k]] = (start + table_clusters + k) << bits;
  }
  report.refcounts_rebuilt = true;
  report.repairs.push_back(Fmt("Rebuilt the refcount structure: table at %#" PRIx64 " (%" PRIu64
                               " clusters), %zu refcount blocks",
                               table_offset, table_clusters, blocks.size()));
  return Status();
}

}  // namespace qcow2fs::check
