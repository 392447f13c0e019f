// Internal entry point of the image check (include/qcow2fs/check.h) over an
// opened File, so tests can check and repair images held in memory or
// wrapped in fault injection, and the opener can repair a dirty image on
// the file it has already opened and locked.
#pragma once

#include "io/file.h"
#include "qcow2fs/check.h"

namespace qcow2fs {

// Checks (and with options.repair, repairs) the qcow2 image in `file`. The
// caller has opened it writable when repairing and holds whatever locks it
// wants; options.force_share is ignored here. Fails only when the file
// cannot be read as qcow2 at all (bad magic, a header that does not
// decode) or when a repair write fails; then the image is left in a state
// that another check with the same mode repairs.
Result<CheckReport> CheckQcow2File(File& file, const CheckOptions& options);

// Clears the `dirty` and `corrupt` incompatible feature bits in the header of
// `file` (version 3 images; a no-op when neither is set), then syncs.
Status MarkImageClean(File& file);

}  // namespace qcow2fs
