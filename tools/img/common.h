// Pieces every qcow2fs-img subcommand uses: opening an image the way the
// command line asked, reporting core errors, and printing sizes as
// qemu-img does.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace qcow2fs::img {

// How a read-only command opens its image.
struct ReadOpen {
  bool force_share = false;             // -U: no locks at all
  std::optional<std::string> snapshot;  // -l: an internal snapshot
  std::string format;                   // "" probes
};

// Opens `path` read-only. With force_share no lock is taken, so an image in
// use by QEMU or a qcow2fs mount can be inspected.
Result<std::unique_ptr<Image>> OpenReadOnly(const std::string& path, const ReadOpen& how);

// The images of a backing chain, top first: `top` and every backing file
// under it, each opened on its own (read-only, locked as `how` says).
struct Chain {
  std::vector<std::unique_ptr<Image>> layers;
};
Result<Chain> OpenChain(const std::string& path, const ReadOpen& how);

// Prints "qcow2fs-img: <message>" on stderr, with a hint for a locked image,
// and returns the failure exit status.
int ReportError(const Status& status);
int ReportError(const std::string& message);

// A size as qemu-img prints it: three significant digits and a binary unit
// ("392 KiB", "1.39 MiB", "0 B").
std::string HumanSize(uint64_t bytes);

// A path as the user would write it: "./x" is shown as "x".
std::string DisplayPath(const std::string& path);

// `name` (as stored in an image header) resolved the way the core resolves
// backing and data file names: relative to the image's directory.
std::string ResolveNextTo(const std::string& image_path, const std::string& name);

}  // namespace qcow2fs::img
