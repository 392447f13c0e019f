// The OFLAG_COPIED check of the image check: an active L1 or L2 entry must
// carry the flag exactly when its cluster's refcount is 1 (spec "Cluster
// mapping"). A flag set on a shared cluster would let a writer overwrite it
// in place under a snapshot; a missing one only costs copies. Only the
// active tables carry meaningful flags; snapshot tables are not checked.
#include <cinttypes>

#include "engine/qcow2_check_internal.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"

namespace qcow2fs::check {
namespace {

bool Overlaps(uint64_t a, uint64_t a_len, uint64_t b, uint64_t b_len) {
  return a_len && b_len && a < b + b_len && b < a + a_len;
}

// Whether rewriting an L2 table at `offset` would hit a structure the
// header names directly (the header, the active L1 table, the refcount
// table, the snapshot table): a table that overlaps one of them is
// corrupt and is left alone, its flags reported but not rewritten.
bool HitsFixedMetadata(const Header& h, uint64_t offset) {
  const uint64_t cs = h.cluster_size();
  return Overlaps(offset, cs, 0, cs) ||
         Overlaps(offset, cs, h.l1_table_offset, uint64_t{h.l1_size} * 8) ||
         Overlaps(offset, cs, h.refcount_table_offset, uint64_t{h.refcount_table_clusters} * cs) ||
         (h.nb_snapshots && Overlaps(offset, cs, h.snapshots_offset, cs));
}

}  // namespace

Status CheckCopiedFlags(File& file, const Findings& f,
                        const std::function<Result<uint64_t>(uint64_t)>& refcount_of, bool repair,
                        CheckReport& report) {
  const Header& h = f.header;
  const uint64_t cs = h.cluster_size();
  const uint64_t entry_bytes = h.l2_entry_bytes();
  std::vector<std::byte> l1(uint64_t{h.l1_size} * 8);
  if (Status s = file.ReadAt(h.l1_table_offset, l1); !s.ok()) {
    report.check_errors++;
    report.messages.push_back("ERROR: Could not read the L1 table: " + s.message());
    return Status();
  }
  bool wrote = false;
  std::vector<std::byte> table(cs);
  for (uint32_t i = 0; i < h.l1_size; i++) {
    const uint64_t l1_entry = LoadBe64(l1.data() + 8 * uint64_t{i});
    const uint64_t l2_offset = l1_entry & kL1OffsetMask;
    if (l2_offset == 0) continue;
    auto l2_refcount = refcount_of(l2_offset >> h.cluster_bits);
    if (!l2_refcount.ok()) continue;  // the refcount walk reported it
    if ((*l2_refcount == 1) != ((l1_entry & kOflagCopied) != 0)) {
      const std::string what =
          Fmt("OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64 " refcount=%" PRIu64, i,
              l1_entry, *l2_refcount);
      if (repair) {
        const uint64_t fixed =
            *l2_refcount == 1 ? l1_entry | kOflagCopied : l1_entry & ~kOflagCopied;
        std::byte word[8];
        StoreBe64(word, fixed);
        QCOW2FS_RETURN_IF_ERROR(
            file.WriteAt(h.l1_table_offset + 8 * uint64_t{i}, word)
                .Annotate("repairing the COPIED flag of L1 entry " + std::to_string(i)));
        wrote = true;
        report.repairs.push_back("Repairing " + what);
        report.corruptions_fixed++;
      } else {
        report.corruptions++;
        report.messages.push_back("ERROR " + what);
      }
    }
    if (Status s = file.ReadAt(l2_offset, table); !s.ok()) {
      report.check_errors++;
      report.messages.push_back("ERROR: Could not read L2 table: " + s.message());
      continue;
    }
    uint64_t dirty = 0;
    std::vector<std::string> fixes;
    for (uint64_t j = 0; j < h.l2_entries(); j++) {
      std::byte* p = table.data() + j * entry_bytes;
      const uint64_t entry = LoadBe64(p);
      const ClusterType type = ClassifyL2Entry(entry, h.extended_l2(), h.has_data_file());
      if (type != ClusterType::kNormal && type != ClusterType::kZeroAlloc) continue;
      uint64_t refcount = 1;  // every cluster of an external data file
      if (!h.has_data_file()) {
        auto r = refcount_of((entry & kL2OffsetMask) >> h.cluster_bits);
        if (!r.ok()) continue;
        refcount = *r;
      }
      if ((refcount == 1) == ((entry & kOflagCopied) != 0)) continue;
      const std::string what =
          Fmt("OFLAG_COPIED data cluster: l2_entry=%" PRIx64 " refcount=%" PRIu64, entry, refcount);
      if (repair && !HitsFixedMetadata(h, l2_offset) && l2_offset % cs == 0) {
        StoreBe64(p, refcount == 1 ? entry | kOflagCopied : entry & ~kOflagCopied);
        dirty++;
        fixes.push_back("Repairing " + what);
      } else {
        report.corruptions++;
        report.messages.push_back("ERROR " + what);
      }
    }
    if (dirty) {
      QCOW2FS_RETURN_IF_ERROR(
          file.WriteAt(l2_offset, table)
              .Annotate("repairing COPIED flags in the L2 table at " + Hex(l2_offset)));
      wrote = true;
      report.corruptions_fixed += dirty;
      for (auto& line : fixes) report.repairs.push_back(std::move(line));
    }
  }
  if (wrote) QCOW2FS_RETURN_IF_ERROR(file.Sync().Annotate("syncing COPIED flag repairs"));
  return Status();
}

}  // namespace qcow2fs::check
