// The exit statuses of qcow2fs-img, the same numbers qemu-img uses, so that
// scripts written for one work with the other.
#pragma once

namespace qcow2fs::img {

inline constexpr int kExitOk = 0;
// The command failed (the image could not be opened, a write failed), or
// the command line was wrong: qemu-img uses 1 for both.
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 1;
// check: corruptions remain in the image (after any repair).
inline constexpr int kExitCorrupt = 2;
// check: only leaked clusters remain: wasted space, no harm to data.
inline constexpr int kExitLeaks = 3;
// check: the image's format has nothing to check (raw).
inline constexpr int kExitNotSupported = 63;

}  // namespace qcow2fs::img
