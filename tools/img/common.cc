// Pieces every qcow2fs-img subcommand uses.
#include "common.h"

#include <cmath>
#include <cstdio>

#include "exit_codes.h"

namespace qcow2fs::img {

Result<std::unique_ptr<Image>> OpenReadOnly(const std::string& path, const ReadOpen& how) {
  OpenOptions options;
  options.read_only = true;
  options.lock = !how.force_share;
  options.snapshot = how.snapshot;
  options.format = how.format;
  return Image::Open(path, options);
}

Result<Chain> OpenChain(const std::string& path, const ReadOpen& how) {
  Chain chain;
  auto top = OpenReadOnly(path, how);
  if (!top.ok()) return top.take_status();
  chain.layers.push_back(std::move(top).value());
  // The core has already opened (and checked) the whole chain for the top
  // image; each layer is opened again here only so that it can be asked
  // about itself. A chain is at most as deep as the core allows, so this
  // ends.
  for (;;) {
    const ImageInfo info = chain.layers.back()->info();
    if (info.backing_file.empty()) break;
    ReadOpen below;
    below.force_share = how.force_share;
    below.format = info.backing_format;
    auto layer = OpenReadOnly(info.backing_file_resolved, below);
    if (!layer.ok()) {
      return layer.take_status().Annotate("opening backing file '" + info.backing_file + "'");
    }
    chain.layers.push_back(std::move(layer).value());
  }
  return chain;
}

int ReportError(const std::string& message) {
  std::fprintf(stderr, "qcow2fs-img: %s\n", message.c_str());
  return kExitFailure;
}

int ReportError(const Status& status) {
  ReportError(status.message().empty() ? status.ToString() : status.message());
  if (status.code() == ErrorCode::kLocked) {
    std::fprintf(stderr,
                 "qcow2fs-img: (-U inspects an image in use, read-only and "
                 "without locks; what it shows may be changing)\n");
  }
  return kExitFailure;
}

std::string HumanSize(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  // The largest unit in which the figure stays at least 1000/1024 of one:
  // 1000 bytes is "0.977 KiB", never a four-digit "1000 B".
  int unit = 0;
  double value = static_cast<double>(bytes);
  while (unit < 6 && value >= 1000.0) {
    value /= 1024.0;
    unit++;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g %s", value, kUnits[unit]);
  return buf;
}

std::string DisplayPath(const std::string& path) {
  std::string p = path;
  while (p.size() > 2 && p.compare(0, 2, "./") == 0) p.erase(0, 2);
  return p;
}

std::string ResolveNextTo(const std::string& image_path, const std::string& name) {
  if (name.empty() || name[0] == '/') return name;
  const size_t slash = image_path.rfind('/');
  if (slash == std::string::npos) return name;
  return image_path.substr(0, slash + 1) + name;
}

}  // namespace qcow2fs::img
