// Consistency check and repair of a qcow2 image, offline (no other writer).
//
// CheckImage() reads every structure of the image (header, L1/L2 tables of
// the active state and of every snapshot, refcount table and blocks, the
// snapshot table, bitmap directory and tables) and compares the refcount of
// each host cluster with the number of references found. It reports the
// same classes of problem as `qemu-img check` and, with a repair mode, fixes
// them in crash-safe order: a repair interrupted at any point leaves an
// image that the next CheckImage() with the same mode repairs to clean.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs {

enum class RepairMode {
  kNone,   // report only; the image is opened read-only
  kLeaks,  // lower refcounts that are higher than the references (leaks)
  kAll,    // leaks and corruptions: rebuild refcounts from the references
};

struct CheckOptions {
  RepairMode repair = RepairMode::kNone;
  // Inspect an image that is in use: no image locks, read-only. Refused with
  // a repair mode.
  bool force_share = false;
  // Called now and then from the checking thread with the bytes of metadata
  // walked so far and the total to walk; may be empty.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct CheckReport {
  // What the image holds, as `qemu-img check` counts it: without a repair,
  // what the check found; after a repair, what a second check of the
  // repaired image still finds (so 0 when everything was fixed).
  uint64_t corruptions = 0;   // refcount below references, bad entries, overlaps
  uint64_t leaks = 0;         // clusters whose refcount exceeds their references
  uint64_t check_errors = 0;  // structures that could not be read at all
  // Fixed by the repair (0 without one). Refcount mismatches, bad entries
  // and wrong COPIED flags count one each.
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  bool refcounts_rebuilt = false;
  // Figures of the image (after any repair), as `qemu-img check` prints them.
  uint64_t image_end_offset = 0;     // end of the last cluster in use
  uint64_t total_clusters = 0;       // guest clusters (virtual size / cluster)
  uint64_t allocated_clusters = 0;   // guest clusters allocated in this image
  uint64_t fragmented_clusters = 0;  // allocated clusters not after their predecessor
  uint64_t compressed_clusters = 0;
  // One line per problem found, in the order found, worded as qemu-img
  // check words it, e.g. "Leaked cluster 12 refcount=1 reference=0" or
  // "ERROR cluster 7 refcount=1 reference=2". These are the first check's
  // lines; the counts above come from the second one after a repair.
  std::vector<std::string> messages;
  // One line per repair action taken, e.g. "Repairing cluster 12
  // refcount=1 reference=0", "Rebuilding refcount structure", "Cleared the
  // dirty bit".
  std::vector<std::string> repairs;

  // What `qemu-img check` would exit with for these findings: 0 clean,
  // 2 corruptions (after any repair), 3 leaks only, 1 check errors.
  int ExitCode() const;
};

// Checks (and with options.repair, repairs) the qcow2 image at `path`. Takes
// the image locks as a writer would when repairing, as a reader otherwise
// (none with force_share). A repair that leaves no corruption also clears
// the header's `dirty` and `corrupt` bits. Fails when the image cannot be
// opened or locked, is not qcow2, or its header does not decode, and when a
// repair write fails (the image is then left in a state the same repair
// completes); problems inside the image are findings in the report.
Result<CheckReport> CheckImage(const std::string& path, const CheckOptions& options);

}  // namespace qcow2fs
