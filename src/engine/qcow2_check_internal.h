// The pieces of the image check, shared by its files:
//   qcow2_check_walk.cc    counts the references to every host cluster and
//                          compares them with the stored refcounts;
//   qcow2_check_copied.cc  checks (and fixes) the OFLAG_COPIED flags;
//   qcow2_check_repair.cc  fixes entries, refcounts, and rebuilds the
//                          refcount structure;
//   qcow2_check.cc         runs them in order and fills the report.
//
// Everything here runs on one thread over a file nobody else writes.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "format/header.h"
#include "io/file.h"
#include "qcow2fs/check.h"

namespace qcow2fs::check {

// The stored refcounts, read through the on-disk refcount table, one block
// at a time (a small cache of blocks, as the walks are mostly sequential).
class StoredRefcounts {
 public:
  StoredRefcounts(File& file, const Header& header, std::vector<uint64_t> table);

  // The stored refcount of host cluster `cluster`: 0 where the table has no
  // block (or an entry that is not a valid block offset, which the walk
  // reports), as QEMU reads it. Fails only when the file cannot be read.
  Result<uint64_t> Get(uint64_t cluster);
  // The table entry's block offset for table index `index`, or 0 when the
  // entry is absent or invalid (unaligned, reserved bits set).
  uint64_t BlockOffset(uint64_t index) const;
  uint64_t block_entries() const { return block_entries_; }
  const std::vector<uint64_t>& table() const { return table_; }

 private:
  File& file_;
  const uint64_t cluster_size_;
  const uint32_t order_;
  const uint64_t block_entries_;
  const std::vector<uint64_t> table_;
  std::map<uint64_t, std::vector<std::byte>> cache_;  // by table index
};

// A refcount that differs from the references found.
struct RefcountMismatch {
  uint64_t cluster = 0;
  uint64_t stored = 0;
  uint64_t references = 0;
};

// An 8-byte big-endian word of a table to rewrite: the fix of one bad
// L1/L2 entry (or its extended L2 bitmap word), chosen so that the guest
// reads what it read before (zeros or the backing file) without a
// reference to a cluster that does not exist.
struct WordPatch {
  uint64_t offset = 0;
  uint64_t value = 0;
  std::string what;  // for the repair message
};

// What the walk learned about the image.
struct Findings {
  Header header;
  uint64_t file_size = 0;
  // References to each host cluster (saturating at UINT32_MAX). Sized to
  // cover the file, plus a last partly allocated cluster if something
  // points into it.
  std::vector<uint32_t> refs;
  // The clusters of the refcount table and of each valid refcount block,
  // as counted in `refs` (one element per reference). A rebuilt structure
  // replaces them, so it counts them free.
  std::vector<uint64_t> old_refcount_clusters;
  std::vector<uint64_t> refcount_table;  // raw entries as stored
  // The refcount structure itself is broken (a block outside the file,
  // unaligned, shared, or a cluster in use with refcount 0): only a rebuild
  // can repair it.
  bool rebuild = false;
  // Every structure could be read. Without that the references are
  // incomplete and no repair may lower any refcount.
  bool complete = true;
  // Fixes of bad entries (applied only by a kAll repair; the walk of a
  // kAll repair does not count what they remove).
  std::vector<WordPatch> patches;
  std::vector<RefcountMismatch> mismatches;
  // First byte past every region some structure names that the repair
  // leaves in place: new refcount structures go at or after it.
  uint64_t reserved_end = 0;
};

using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// printf into a std::string (messages up to 511 bytes), for report lines
// worded as qemu-img check words them.
std::string Fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));

// Reads every structure of the image in `file`, counts references, compares
// them with the stored refcounts and fills `report` (counts, messages and
// figures) the way `qemu-img check` does without repairing. `mode` only
// decides which fixes are planned (kAll: entry patches). Fails only when
// the header cannot be read or decoded.
Result<Findings> WalkImage(File& file, RepairMode mode, const ProgressFn& progress,
                           CheckReport& report);

// Checks the OFLAG_COPIED flag of every active L1 and L2 entry against
// `refcount_of`; wrong flags are corruptions ("ERROR OFLAG_COPIED ..."),
// and with `repair` they are rewritten (each L2 table with one write, then a
// sync) and counted as fixed.
Status CheckCopiedFlags(File& file, const Findings& findings,
                        const std::function<Result<uint64_t>(uint64_t)>& refcount_of, bool repair,
                        CheckReport& report);

// Applies the entry patches (then syncs).
Status ApplyPatches(File& file, const Findings& findings, CheckReport& report);
// Sets the stored refcount of every mismatched cluster to its references
// (`leaks_only`: only those stored too high), writing each changed block
// once, then syncs. Requires !findings.rebuild.
Status FixRefcountsInPlace(File& file, const Findings& findings, bool leaks_only,
                           CheckReport& report);
// Writes a new refcount table and blocks after everything in use, counting
// exactly findings.refs (minus the old refcount structures, plus the new
// one), syncs, and then points the header at them with one write and a
// sync. On return findings.refs holds the new truth.
Status RebuildRefcounts(File& file, Findings& findings, CheckReport& report);

}  // namespace qcow2fs::check
