// The command line of mount.qcow2fs, parsed into plain values.
//
// Kept free of libfuse and of I/O so it can be unit-tested: parsing only
// checks syntax and combinations; whether the image or the mount point exist
// is for main() to find out.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qcow2fs/image.h"
#include "qcow2fs/status.h"

namespace qcow2fs::fusefs {

struct MountOptions {
  bool read_only = false;
  // OpenOptions::l2_cache_bytes; 0 lets the core choose.
  size_t cache_bytes = 0;
  // OpenOptions::compress_cache_bytes (memory for staging compressed
  // writes); 0 lets the core choose.
  size_t compress_cache_bytes = 0;
  // Bytes of large writes queued ahead of the image (FsConfig); 0: none.
  size_t write_behind_bytes = 8 << 20;
  // Seconds between background commits of a writable mount (drain the
  // write-behind queue, Image::Flush), like ext4's commit=; 0: none.
  unsigned commit_seconds = 5;
  // Worker threads serving requests; 0 picks a default from the CPU count.
  unsigned threads = 0;
  // Whether punching holes may free space in the image.
  bool discard = true;
  // Whether large guest data transfers go through the host's page cache.
  // Off (default): aligned transfers of 64 KiB or more use O_DIRECT.
  bool host_cache = false;
  // Store newly written clusters compressed (OpenOptions::compress). Must
  // match the image's compression type; `create` makes it so by default.
  std::optional<CompressionType> compress;
  bool allow_other = false;
  // Mount even if the mount point already is one (stacking a mount on it).
  bool nonempty = false;
  bool lock = true;
  std::optional<std::string> snapshot;
  // Name of the file inside the mount; empty means derive it from the image.
  std::string filename;
  // Create the image first if it does not exist, from create_options.
  bool create = false;
  CreateOptions create_options;
  // Which creation options were given, to warn when `create` finds an
  // existing image that differs (it is mounted as it is).
  bool create_size_given = false;
  bool create_cluster_size_given = false;
  bool create_compression_given = false;
  // Mount flags handed to libfuse unchanged (nosuid, nodev, noexec, sync...).
  std::vector<std::string> kernel_flags;
  // -o log=FILE: messages are appended to this file; empty: none.
  std::string log_file;
  // Options that were accepted but do not do what they say, one line each
  // (without the "warning: " prefix), for main() to print.
  std::vector<std::string> warnings;
};

struct CommandLine {
  std::string image;
  std::string mountpoint;
  bool foreground = false;
  bool debug = false;
  bool help = false;
  bool version = false;
  MountOptions options;
};

// Parses the arguments after argv[0]. Accepts the forms used by people
// (mount.qcow2fs [-f] [-d] [-o OPTS] IMAGE DIR) and by mount(8) and
// mount.fuse3, which append -n, -s, -v and -t TYPE. Errors are
// kInvalidArgument with a message fit for one line on stderr.
Result<CommandLine> ParseCommandLine(std::span<const char* const> args);

// Parses one -o list ("ro,cache-size=64M,...") into `options`, on top of what
// it already holds. With `sloppy` (mount -s) unknown options are ignored.
Status ParseMountOptions(const std::string& list, bool sloppy, MountOptions& options);

// "512", "64K", "20G", "1t": a byte count with an optional binary suffix.
Result<uint64_t> ParseSize(const std::string& text);

// The reverse of ParseSize, exact: 5 << 30 -> "5G", 1536 -> "1536".
std::string FormatSize(uint64_t bytes);

// With `create`, for an image that already existed and is mounted as it is:
// a warning naming the creation options it does not match ("" if it
// matches them all, or if create was not given).
std::string ExistingImageWarning(const std::string& image_path, const MountOptions& options,
                                 const ImageInfo& info);

// The text of --help: the command line, then every -o option.
std::string UsageText();

// One -o option as the parser knows it (spelled canonically).
struct OptionDescription {
  std::string_view name;
  bool takes_value;
  bool create_only;  // refused without `create`
};
// Every -o option the parser accepts, besides the kernel flags and the
// options it ignores, in the order of the usage text.
std::vector<OptionDescription> KnownOptions();

// The known option closest to `name` by edit distance, if one is close
// enough to be a typo of it ("cach-size" -> "cache-size"); "" if none.
std::string ClosestOption(std::string_view name);

// The file name shown in the mount: the image's base name with its last
// extension replaced by ".raw" ("vm.qcow2" -> "vm.raw").
std::string DefaultFileName(const std::string& image_path);

// Whether `name` can be the one entry of the mount's root directory.
bool IsValidFileName(const std::string& name);

}  // namespace qcow2fs::fusefs
