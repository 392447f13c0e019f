// The libfuse low-level callback table that serves a RawFileFs.
#pragma once

#include <fuse_lowlevel.h>

namespace qcow2fs::fusefs {

// Callbacks expecting the session's userdata to be a RawFileFs*. Each one
// decodes its request, calls the RawFileFs work function and sends exactly
// one reply; no exception leaves them.
const fuse_lowlevel_ops& LowLevelOps();

}  // namespace qcow2fs::fusefs
