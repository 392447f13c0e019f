// CheckImage: opens and locks the image, runs the walk, the repairs in their
// crash-safe order and, after a repair, a second check whose findings are
// the report's (as `qemu-img check -r` double-checks the fixed image).
#include "engine/qcow2_check.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>

#include "engine/image_lock.h"
#include "engine/qcow2_check_internal.h"
#include "format/endian.h"
#include "format/header.h"
#include "format/refcount_block.h"

namespace qcow2fs {

namespace check {

std::string Fmt(const char* format, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  return buf;
}

}  // namespace check

namespace {

using check::Findings;

// The stored refcounts as they are on disk now.
Status CheckCopiedAgainstDisk(File& file, const Findings& f, CheckReport& report) {
  check::StoredRefcounts stored(file, f.header, f.refcount_table);
  return check::CheckCopiedFlags(
      file, f, [&](uint64_t c) { return stored.Get(c); }, false, report);
}

// After a successful repair the references are the refcounts (clamped to
// what the width can hold, as they were written).
Status RepairCopiedFromReferences(File& file, const Findings& f, CheckReport& report) {
  const uint64_t max = MaxRefcount(f.header.refcount_order);
  return check::CheckCopiedFlags(
      file, f,
      [&](uint64_t c) -> Result<uint64_t> {
        return c < f.refs.size() ? std::min<uint64_t>(f.refs[c], max) : 0;
      },
      true, report);
}

// Runs the repairs `mode` allows on what the first walk found. Returns
// whether anything was written.
Result<bool> Repair(File& file, RepairMode mode, Findings& f, CheckReport& report) {
  const uint64_t fixed_before = report.corruptions_fixed + report.leaks_fixed;
  if (!f.complete) {
    report.messages.push_back(
        "ERROR some structures could not be read; refusing to repair refcounts");
    QCOW2FS_RETURN_IF_ERROR(CheckCopiedAgainstDisk(file, f, report));
    return false;
  }
  if (mode == RepairMode::kAll) {
    QCOW2FS_RETURN_IF_ERROR(check::ApplyPatches(file, f, report));
    if (f.rebuild) {
      report.repairs.push_back("Rebuilding refcount structure");
      QCOW2FS_RETURN_IF_ERROR(check::RebuildRefcounts(file, f, report));
      // Every mismatch is gone with the old structure; so are the
      // structural faults of the old blocks, which the second check shows.
      for (const auto& m : f.mismatches) {
        if (m.stored > m.references) {
          report.leaks_fixed++;
        } else {
          report.corruptions_fixed++;
        }
      }
    } else if (!f.mismatches.empty()) {
      QCOW2FS_RETURN_IF_ERROR(check::FixRefcountsInPlace(file, f, false, report));
    }
    QCOW2FS_RETURN_IF_ERROR(RepairCopiedFromReferences(file, f, report));
  } else {
    if (f.rebuild) {
      report.check_errors++;
      report.messages.push_back("ERROR need to rebuild refcount structures");
      QCOW2FS_RETURN_IF_ERROR(CheckCopiedAgainstDisk(file, f, report));
      return false;
    }
    const bool any_leak = std::any_of(f.mismatches.begin(), f.mismatches.end(),
                                      [](const auto& m) { return m.stored > m.references; });
    if (any_leak) QCOW2FS_RETURN_IF_ERROR(check::FixRefcountsInPlace(file, f, true, report));
    // COPIED flags follow the refcounts only where those are right now.
    if (report.corruptions == 0 && report.check_errors == 0) {
      QCOW2FS_RETURN_IF_ERROR(RepairCopiedFromReferences(file, f, report));
    } else {
      QCOW2FS_RETURN_IF_ERROR(CheckCopiedAgainstDisk(file, f, report));
    }
  }
  return report.corruptions_fixed + report.leaks_fixed > fixed_before || report.refcounts_rebuilt;
}

}  // namespace

int CheckReport::ExitCode() const {
  if (check_errors) return 1;
  if (corruptions) return 2;
  if (leaks) return 3;
  return 0;
}

Status MarkImageClean(File& file) {
  std::byte fields[104];
  QCOW2FS_RETURN_IF_ERROR(file.ReadAt(0, fields));
  if (LoadBe32(fields) != kQcow2Magic || LoadBe32(fields + 4) < 3) return Status();
  const uint64_t incompatible = LoadBe64(fields + 72);
  const uint64_t clean = incompatible & ~(kIncompatDirty | kIncompatCorrupt);
  if (clean == incompatible) return Status();
  std::byte word[8];
  StoreBe64(word, clean);
  QCOW2FS_RETURN_IF_ERROR(file.WriteAt(72, word).Annotate("clearing the dirty and corrupt bits"));
  return file.Sync().Annotate("syncing the header");
}

Result<CheckReport> CheckQcow2File(File& file, const CheckOptions& options) {
  CheckReport report;
  QCOW2FS_ASSIGN_OR_RETURN(Findings f,
                           check::WalkImage(file, options.repair, options.progress, report));
  if (options.repair == RepairMode::kNone) {
    QCOW2FS_RETURN_IF_ERROR(CheckCopiedAgainstDisk(file, f, report));
    return report;
  }
  const uint64_t incompatible = f.header.incompatible_features;
  QCOW2FS_ASSIGN_OR_RETURN(bool repaired, Repair(file, options.repair, f, report));
  if (repaired) {
    // The report describes the image as it is now: check it again.
    CheckReport again;
    QCOW2FS_ASSIGN_OR_RETURN(Findings g, check::WalkImage(file, RepairMode::kNone, {}, again));
    QCOW2FS_RETURN_IF_ERROR(CheckCopiedAgainstDisk(file, g, again));
    report.corruptions = again.corruptions;
    report.leaks = again.leaks;
    report.check_errors = again.check_errors;
    report.image_end_offset = again.image_end_offset;
    report.total_clusters = again.total_clusters;
    report.allocated_clusters = again.allocated_clusters;
    report.fragmented_clusters = again.fragmented_clusters;
    report.compressed_clusters = again.compressed_clusters;
  }
  // As QEMU: an image that checks free of corruption after a repair is no
  // longer dirty or corrupt.
  if (report.corruptions == 0 && report.check_errors == 0 &&
      (incompatible & (kIncompatDirty | kIncompatCorrupt))) {
    QCOW2FS_RETURN_IF_ERROR(MarkImageClean(file));
    if (incompatible & kIncompatDirty) report.repairs.push_back("Cleared the dirty bit");
    if (incompatible & kIncompatCorrupt) report.repairs.push_back("Cleared the corrupt bit");
  }
  return report;
}

Result<CheckReport> CheckImage(const std::string& path, const CheckOptions& options) {
  const bool writable = options.repair != RepairMode::kNone;
  if (writable && options.force_share) {
    return Status(ErrorCode::kInvalidArgument, "force_share (-U) cannot be combined with a repair");
  }
  QCOW2FS_ASSIGN_OR_RETURN(auto file, OpenPosixFile(path, writable));
  std::byte magic[4];
  QCOW2FS_RETURN_IF_ERROR(file->ReadAt(0, magic));
  if (LoadBe32(magic) != kQcow2Magic) {
    return Status(ErrorCode::kInvalidArgument, path + " is not a qcow2 image");
  }
  if (!options.force_share && file->fd() >= 0) {
    QCOW2FS_RETURN_IF_ERROR(LockImageFile(file->fd(), path, writable));
  }
  auto report = CheckQcow2File(*file, options);
  if (!report.ok()) return report.status().Annotate(path);
  return report;
}

}  // namespace qcow2fs
