// Parsing of mount.qcow2fs's arguments and -o option lists.
#include "options.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <functional>
#include <limits>
#include <string_view>
#include <system_error>
#include <utility>

namespace qcow2fs::fusefs {
namespace {

Status Invalid(std::string message) {
  return Status(ErrorCode::kInvalidArgument, std::move(message));
}

// clang-format off
// Mount flags libfuse understands and forwards to mount(2) as they are.
constexpr std::string_view kKernelFlags[] = {
    "suid", "nosuid", "dev", "nodev", "exec", "noexec",
    "sync", "async", "dirsync",
};

// Options that mount(8), mount.fuse3 and fstab conventions hand to every
// helper but that mean nothing to the daemon. The atime family is here too:
// the daemon never updates the file's atime, so they cannot change anything.
constexpr std::string_view kIgnoredOptions[] = {
    "defaults", "auto", "noauto", "user", "users", "nouser", "owner",
    "group", "_netdev", "nofail", "default_permissions",
    "atime", "noatime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "diratime", "nodiratime", "lazytime", "nolazytime",
};

// Prefixes of options that are for other programs: x-* and comment= are
// read by mount(8) and systemd, user= is added by mount(8) for user mounts.
constexpr std::string_view kIgnoredPrefixes[] = {"x-", "comment=", "user="};
// clang-format on

// commit= beyond a day is a mistake (a unit confusion), not a policy: a
// crash would lose that much.
constexpr unsigned kMaxCommitSeconds = 86400;

template <size_t N>
bool Contains(const std::string_view (&list)[N], std::string_view word) {
  for (std::string_view entry : list) {
    if (entry == word) return true;
  }
  return false;
}

Result<bool> ParseOnOff(std::string_view name, std::string_view value) {
  if (value == "on") return true;
  if (value == "off") return false;
  return Invalid(std::string(name) + "= must be on or off, not '" + std::string(value) + "'");
}

Result<CompressionType> ParseCompression(std::string_view name, std::string_view value) {
  if (value == "zlib") return CompressionType::kZlib;
  if (value == "zstd") return CompressionType::kZstd;
  return Invalid(std::string(name) + "= must be zlib or zstd, not '" + std::string(value) + "'");
}

// Remembers which creation-only options were given, to reject them without
// `create`.
struct ParseState {
  bool sloppy = false;
  bool rw_last = false;            // the last of ro and rw given was an explicit rw
  std::string create_only_option;  // first one seen, for the message
  bool has_size = false;
  bool has_compression_type = false;
};

using Handler =
    std::function<Status(std::string_view value, MountOptions& options, ParseState& state)>;

// Whether an option is for every mount or only describes the image that
// `create` makes (refused without create); a required one is listed
// without brackets in the usage text.
enum class Use { kMount, kCreateRequired, kCreateOptional };

// One -o option: how it is spelled, parsed and described. The table below
// is the only list of options: parsing, the create-only check, the usage
// text and the typo suggestions all read it.
struct OptionSpec {
  std::string_view name;
  // Placeholder of the value in the usage text ("SIZE", "on|off"); empty
  // for an option that takes no value.
  std::string_view value;
  Use use;
  // The usage line (continuation lines after '\n'); empty for an option
  // described together with another (rw with ro, the create options with
  // create).
  std::string_view help;
  Handler handle;
  // The usage line's left column when it is not NAME or NAME=VALUE.
  std::string_view label = {};

  bool takes_value() const { return !value.empty(); }
};

Status SetSize(std::string_view name, std::string_view value, uint64_t& out) {
  Result<uint64_t> size = ParseSize(std::string(value));
  if (!size.ok()) {
    return Invalid(std::string(name) + "=: " + size.status().message());
  }
  out = *size;
  return Status::Ok();
}

const std::vector<OptionSpec>& OptionTable() {
  // In the order of the usage text.
  static const std::vector<OptionSpec> table = {
      {"ro", "", Use::kMount, "read-only or read-write (default rw)",
       [](std::string_view, MountOptions& o, ParseState& s) {
         s.rw_last = false;
         o.read_only = true;
         return Status::Ok();
       },
       "ro, rw"},
      {"rw", "", Use::kMount, "",
       [](std::string_view, MountOptions& o, ParseState& s) {
         s.rw_last = true;
         o.read_only = false;
         return Status::Ok();
       }},
      {"cache-size", "SIZE", Use::kMount, "L2 table cache (K, M, G suffixes)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         uint64_t bytes = 0;
         QCOW2FS_RETURN_IF_ERROR(SetSize("cache-size", v, bytes));
         if (bytes > std::numeric_limits<size_t>::max()) {
           return Invalid("cache-size= is too large");
         }
         o.cache_bytes = static_cast<size_t>(bytes);
         return Status::Ok();
       }},
      {"compress-cache-size", "SIZE", Use::kMount, "memory for staging compressed writes",
       [](std::string_view v, MountOptions& o, ParseState&) {
         uint64_t bytes = 0;
         QCOW2FS_RETURN_IF_ERROR(SetSize("compress-cache-size", v, bytes));
         if (bytes > std::numeric_limits<size_t>::max()) {
           return Invalid("compress-cache-size= is too large");
         }
         o.compress_cache_bytes = static_cast<size_t>(bytes);
         return Status::Ok();
       }},
      {"write-behind", "SIZE", Use::kMount, "large writes queued ahead of the image (0: off)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         uint64_t bytes = 0;
         QCOW2FS_RETURN_IF_ERROR(SetSize("write-behind", v, bytes));
         if (bytes > (1u << 30)) return Invalid("write-behind= is at most 1G");
         o.write_behind_bytes = static_cast<size_t>(bytes);
         return Status::Ok();
       }},
      {"commit", "SECONDS", Use::kMount,
       "commit what fsync would at least this often\n"
       "(default 5; 0: only at fsync and unmount)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         unsigned seconds = 0;
         auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), seconds);
         if (v.empty() || error != std::errc() || end != v.data() + v.size() ||
             seconds > kMaxCommitSeconds) {
           return Invalid("commit= must be a number of seconds from 0 (off) to " +
                          std::to_string(kMaxCommitSeconds) + ", not '" + std::string(v) + "'");
         }
         o.commit_seconds = seconds;
         return Status::Ok();
       }},
      {"threads", "N", Use::kMount, "worker threads",
       [](std::string_view v, MountOptions& o, ParseState&) {
         unsigned threads = 0;
         auto [end, error] = std::from_chars(v.data(), v.data() + v.size(), threads);
         if (error != std::errc() || end != v.data() + v.size() || threads < 1 || threads > 256) {
           return Invalid("threads= must be a number from 1 to 256, not '" + std::string(v) + "'");
         }
         o.threads = threads;
         return Status::Ok();
       }},
      {"discard", "on|off", Use::kMount, "let hole punching free image space",
       [](std::string_view v, MountOptions& o, ParseState&) {
         QCOW2FS_ASSIGN_OR_RETURN(o.discard, ParseOnOff("discard", v));
         return Status::Ok();
       }},
      {"host-cache", "on|off", Use::kMount,
       "large transfers through the host page cache\n"
       "(default off: O_DIRECT where aligned)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         QCOW2FS_ASSIGN_OR_RETURN(o.host_cache, ParseOnOff("host-cache", v));
         return Status::Ok();
       }},
      {"compress", "zlib|zstd", Use::kMount, "store newly written clusters compressed",
       [](std::string_view v, MountOptions& o, ParseState&) {
         QCOW2FS_ASSIGN_OR_RETURN(o.compress, ParseCompression("compress", v));
         return Status::Ok();
       }},
      {"lock", "on|off", Use::kMount, "lock the image (off needs ro)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         QCOW2FS_ASSIGN_OR_RETURN(o.lock, ParseOnOff("lock", v));
         return Status::Ok();
       }},
      {"snapshot", "ID|NAME", Use::kMount, "mount an internal snapshot (read-only)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         if (v.empty()) return Invalid("snapshot= needs a snapshot ID or name");
         o.snapshot = std::string(v);
         return Status::Ok();
       }},
      {"filename", "NAME", Use::kMount, "name of the file in the mount",
       [](std::string_view v, MountOptions& o, ParseState&) {
         if (!IsValidFileName(std::string(v))) {
           return Invalid("filename= must be a plain file name, not '" + std::string(v) + "'");
         }
         o.filename = std::string(v);
         return Status::Ok();
       }},
      {"log", "FILE", Use::kMount, "append messages to FILE (instead of syslog)",
       [](std::string_view v, MountOptions& o, ParseState&) {
         if (v.empty()) return Invalid("log= needs a file name");
         o.log_file = std::string(v);
         return Status::Ok();
       }},
      {"allow_other", "", Use::kMount, "let other users in (file mode still applies)",
       [](std::string_view, MountOptions& o, ParseState&) {
         o.allow_other = true;
         return Status::Ok();
       }},
      {"nonempty", "", Use::kMount, "mount even if MOUNTDIR already is a mount point",
       [](std::string_view, MountOptions& o, ParseState&) {
         o.nonempty = true;
         return Status::Ok();
       }},
      {"create", "", Use::kMount, "create IMAGE first if it does not exist",
       [](std::string_view, MountOptions& o, ParseState&) {
         o.create = true;
         return Status::Ok();
       }},
      // The rest only describe the image that `create` makes.
      {"size", "SIZE", Use::kCreateRequired, "",
       [](std::string_view v, MountOptions& o, ParseState& s) {
         s.has_size = true;
         o.create_size_given = true;
         return SetSize("size", v, o.create_options.size);
       }},
      {"cluster_size", "SIZE", Use::kCreateOptional, "",
       [](std::string_view v, MountOptions& o, ParseState&) {
         uint64_t bytes = 0;
         QCOW2FS_RETURN_IF_ERROR(SetSize("cluster_size", v, bytes));
         if (bytes < 512 || bytes > (2u << 20) || (bytes & (bytes - 1)) != 0) {
           return Invalid("cluster_size= must be a power of two from 512 to 2M");
         }
         o.create_cluster_size_given = true;
         o.create_options.cluster_size = static_cast<uint32_t>(bytes);
         return Status::Ok();
       }},
      {"compression_type", "zlib|zstd", Use::kCreateOptional, "",
       [](std::string_view v, MountOptions& o, ParseState& s) {
         s.has_compression_type = true;
         o.create_compression_given = true;
         QCOW2FS_ASSIGN_OR_RETURN(o.create_options.compression,
                                  ParseCompression("compression_type", v));
         return Status::Ok();
       }},
      {"backing", "FILE", Use::kCreateOptional, "",
       [](std::string_view v, MountOptions& o, ParseState&) {
         if (v.empty()) return Invalid("backing= needs a file name");
         o.create_options.backing_file = std::string(v);
         return Status::Ok();
       }},
      {"backing_fmt", "qcow2|raw", Use::kCreateOptional, "",
       [](std::string_view v, MountOptions& o, ParseState&) {
         if (v != "qcow2" && v != "raw") {
           return Invalid("backing_fmt= must be qcow2 or raw");
         }
         o.create_options.backing_format = std::string(v);
         return Status::Ok();
       }},
  };
  return table;
}

// The usage text around the option list.
constexpr std::string_view kUsageHead =
    "usage: mount.qcow2fs [-f] [-d] [-o OPTION[,OPTION...]] IMAGE MOUNTDIR\n"
    "\n"
    "Mounts the qcow2 image IMAGE on MOUNTDIR as a file system holding one\n"
    "file, the image's guest disk (IMAGE's name with the extension .raw).\n"
    "\n"
    "  -f            stay in the foreground, log to stderr\n"
    "  -d            log every request\n"
    "  -o OPTIONS    comma-separated options:\n";
constexpr std::string_view kUsageTail =
    "     and the usual mount options (nosuid, nodev, noexec, noatime, ...)\n"
    "\n"
    "See mount.qcow2fs(8).\n";
// Option lines start at kUsageIndent; their help at kUsageHelpColumn, or
// two spaces after a longer left column; the usage text fits in
// kUsageWidth columns.
constexpr size_t kUsageIndent = 5;
constexpr size_t kUsageHelpColumn = 27;
constexpr size_t kUsageWidth = 79;

// "name=VALUE", or "name" for an option without a value.
std::string NameAndValue(const OptionSpec& spec) {
  std::string text(spec.name);
  if (spec.takes_value()) text += "=" + std::string(spec.value);
  return text;
}

// The start of the last line of `text`.
size_t LastLineStart(const std::string& text) {
  const size_t newline = text.rfind('\n');
  return newline == std::string::npos ? 0 : newline + 1;
}

// One option's lines: its left column (the create line lists every
// creation option, wrapped), then its help, on the same line where it fits.
std::string UsageLines(const OptionSpec& spec) {
  std::string out(kUsageIndent, ' ');
  out += spec.label.empty() ? NameAndValue(spec) : std::string(spec.label);
  if (spec.name == "create") {
    for (const OptionSpec& other : OptionTable()) {
      if (other.use == Use::kMount) continue;
      std::string piece = "," + NameAndValue(other);
      if (other.use == Use::kCreateOptional) piece = "[" + piece.append("]");
      if (out.size() - LastLineStart(out) + piece.size() > kUsageWidth) {
        out += "\n" + std::string(kUsageIndent + 2, ' ');
      }
      out += piece;
    }
  }
  std::string_view help = spec.help;
  size_t eol = help.find('\n');
  const size_t used = out.size() - LastLineStart(out);
  if (used + 2 + help.substr(0, eol).size() > kUsageWidth) {
    out += "\n" + std::string(kUsageHelpColumn, ' ');
  } else {
    out += std::string(used + 2 > kUsageHelpColumn ? 2 : kUsageHelpColumn - used, ' ');
  }
  out += help.substr(0, eol);
  while (eol != std::string_view::npos) {
    help = help.substr(eol + 1);
    eol = help.find('\n');
    out += "\n" + std::string(kUsageHelpColumn, ' ') + std::string(help.substr(0, eol));
  }
  return out + "\n";
}

// Option names may be spelled with '-' or '_' (cache-size, cache_size).
std::string Normalize(std::string_view name) {
  std::string normal(name);
  for (char& c : normal) {
    if (c == '_') c = '-';
  }
  return normal;
}

template <size_t N>
bool ContainsNormalized(const std::string_view (&list)[N], std::string_view word) {
  std::string normal = Normalize(word);
  for (std::string_view entry : list) {
    if (Normalize(entry) == normal) return true;
  }
  return false;
}

// Edit distance with adjacent transpositions counting one (optimal string
// alignment), on short option names.
size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.size()][b.size()];
}

Status ParseOne(std::string_view option, MountOptions& options, ParseState& state) {
  if (option.empty() || ContainsNormalized(kIgnoredOptions, option)) {
    return Status::Ok();
  }
  for (std::string_view prefix : kIgnoredPrefixes) {
    if (option.starts_with(prefix)) return Status::Ok();
  }
  if (Contains(kKernelFlags, option)) {
    options.kernel_flags.emplace_back(option);
    return Status::Ok();
  }

  size_t equals = option.find('=');
  std::string_view name = option.substr(0, equals);
  bool has_value = equals != std::string_view::npos;
  std::string_view value = has_value ? option.substr(equals + 1) : "";
  const std::string normal_name = Normalize(name);
  for (const OptionSpec& spec : OptionTable()) {
    if (Normalize(spec.name) != normal_name) continue;
    name = spec.name;  // the canonical spelling, for messages
    if (spec.takes_value() != has_value) {
      return Invalid(spec.takes_value() ? "option " + std::string(name) + " needs a value (" +
                                              std::string(name) + "=...)"
                                        : "option " + std::string(name) + " takes no value");
    }
    if (spec.use != Use::kMount && state.create_only_option.empty()) {
      state.create_only_option = std::string(name);
    }
    return spec.handle(value, options, state);
  }
  if (state.sloppy) return Status::Ok();
  std::string message = "unknown option '" + std::string(name) + "'";
  if (std::string closest = ClosestOption(name); !closest.empty()) {
    message += "; did you mean '" + closest + "'?";
  }
  return Invalid(message);
}

Status ParseList(const std::string& list, MountOptions& options, ParseState& state) {
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    QCOW2FS_RETURN_IF_ERROR(
        ParseOne(std::string_view(list).substr(start, comma - start), options, state));
    start = comma + 1;
  }
  return Status::Ok();
}

// Rules that involve more than one option; checked once all lists are in.
Status CheckCombinations(MountOptions& options, const ParseState& state) {
  if (!state.create_only_option.empty() && !options.create) {
    return Invalid(state.create_only_option + "= only applies together with the create option");
  }
  if (options.snapshot) {
    if (options.create) return Invalid("create and snapshot= exclude each other");
    // A snapshot is never written. An explicit rw is not refused (fstab
    // lines carry it by habit) but is not silently ignored either, as
    // mount(8) warns when it mounts a write-protected device read-only.
    if (state.rw_last) {
      options.warnings.push_back("snapshot= mounts are read-only; rw ignored");
    }
    options.read_only = true;
  }
  if (options.create) {
    if (options.read_only) return Invalid("create needs a writable mount, not ro");
    if (!state.has_size && options.create_options.backing_file.empty()) {
      return Invalid("create needs size= (or backing= to take its size)");
    }
  }
  if (options.compress) {
    if (options.read_only) {
      return Invalid("compress= only applies to writable mounts, not ro");
    }
    // A new image compresses the way it is asked to write.
    if (options.create) {
      if (!state.has_compression_type) {
        options.create_options.compression = *options.compress;
      } else if (options.create_options.compression != *options.compress) {
        return Invalid("compress= and compression_type= name different types");
      }
    }
  }
  if (!options.lock && !options.read_only) {
    return Invalid("lock=off is only allowed together with ro");
  }
  return Status::Ok();
}

}  // namespace

Result<uint64_t> ParseSize(const std::string& text) {
  uint64_t value = 0;
  const char* begin = text.data();
  const char* end = begin + text.size();
  auto [rest, error] = std::from_chars(begin, end, value);
  if (error != std::errc() || rest == begin) {
    return Invalid("'" + text + "' is not a size (examples: 512, 64K, 20G)");
  }
  int shift = 0;
  if (rest != end) {
    switch (*rest) {
      case 'k':
      case 'K':
        shift = 10;
        break;
      case 'm':
      case 'M':
        shift = 20;
        break;
      case 'g':
      case 'G':
        shift = 30;
        break;
      case 't':
      case 'T':
        shift = 40;
        break;
      default:
        return Invalid("'" + text + "' has an unknown size suffix (K, M, G, T)");
    }
    if (rest + 1 != end) {
      return Invalid("'" + text + "' is not a size (examples: 512, 64K, 20G)");
    }
  }
  if (shift > 0 && value > (std::numeric_limits<uint64_t>::max() >> shift)) {
    return Invalid("'" + text + "' is too large");
  }
  return value << shift;
}

std::string FormatSize(uint64_t bytes) {
  static constexpr char kSuffixes[] = {'T', 'G', 'M', 'K'};
  for (int i = 0; i < 4; ++i) {
    int shift = 40 - 10 * i;
    uint64_t unit = uint64_t{1} << shift;
    if (bytes != 0 && bytes % unit == 0) {
      return std::to_string(bytes >> shift) + kSuffixes[i];
    }
  }
  return std::to_string(bytes);
}

std::string ExistingImageWarning(const std::string& image_path, const MountOptions& options,
                                 const ImageInfo& info) {
  if (!options.create) return "";
  std::string differences;
  auto add = [&differences](const std::string& text) {
    if (!differences.empty()) differences += ", ";
    differences += text;
  };
  const CreateOptions& wanted = options.create_options;
  if (options.create_size_given && info.virtual_size != wanted.size) {
    add("size " + FormatSize(info.virtual_size) + ", not size=" + FormatSize(wanted.size));
  }
  if (options.create_cluster_size_given && info.cluster_size != wanted.cluster_size) {
    add("cluster size " + FormatSize(info.cluster_size) +
        ", not cluster_size=" + FormatSize(wanted.cluster_size));
  }
  if (options.create_compression_given && info.compression != wanted.compression) {
    auto name = [](CompressionType type) {
      return type == CompressionType::kZstd ? "zstd" : "zlib";
    };
    add(std::string("compression type ") + name(info.compression) +
        ", not compression_type=" + name(wanted.compression));
  }
  if (differences.empty()) return "";
  return image_path + " already exists and is mounted as it is (" + differences +
         "); create only makes missing images";
}

std::string ClosestOption(std::string_view name) {
  const std::string normal = Normalize(name);
  std::string best;
  size_t best_distance = std::numeric_limits<size_t>::max();
  auto consider = [&](std::string_view candidate) {
    size_t distance = EditDistance(normal, Normalize(candidate));
    if (distance < best_distance) {
      best_distance = distance;
      best = std::string(candidate);
    }
  };
  for (const OptionSpec& spec : OptionTable()) consider(spec.name);
  for (std::string_view flag : kKernelFlags) consider(flag);
  for (std::string_view ignored : kIgnoredOptions) consider(ignored);
  // One typo in a short name, two in a longer one; more is a guess.
  size_t allowed = normal.size() <= 4 ? 1 : 2;
  if (best_distance == 0 || best_distance > allowed) return "";
  return best;
}

std::string DefaultFileName(const std::string& image_path) {
  std::string base = image_path;
  while (base.size() > 1 && base.back() == '/') base.pop_back();
  size_t slash = base.rfind('/');
  if (slash != std::string::npos) base = base.substr(slash + 1);
  // A leading dot marks a hidden file, not an extension.
  size_t dot = base.rfind('.');
  if (dot != std::string::npos && dot > 0) base.resize(dot);
  return base + ".raw";
}

bool IsValidFileName(const std::string& name) {
  return !name.empty() && name.size() <= 255 && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

std::string UsageText() {
  std::string text(kUsageHead);
  for (const OptionSpec& spec : OptionTable()) {
    if (!spec.help.empty()) text += UsageLines(spec);
  }
  return text + std::string(kUsageTail);
}

std::vector<OptionDescription> KnownOptions() {
  std::vector<OptionDescription> known;
  for (const OptionSpec& spec : OptionTable()) {
    known.push_back({spec.name, spec.takes_value(), spec.use != Use::kMount});
  }
  return known;
}

Status ParseMountOptions(const std::string& list, bool sloppy, MountOptions& options) {
  ParseState state;
  state.sloppy = sloppy;
  QCOW2FS_RETURN_IF_ERROR(ParseList(list, options, state));
  return CheckCombinations(options, state);
}

Result<CommandLine> ParseCommandLine(std::span<const char* const> args) {
  CommandLine line;
  std::vector<std::string> option_lists;
  std::vector<std::string> positional;
  bool sloppy = false;

  for (size_t i = 0; i < args.size(); ++i) {
    std::string_view arg = args[i];
    auto next_value = [&](std::string_view flag) -> Result<std::string> {
      if (i + 1 >= args.size()) {
        return Invalid("option " + std::string(flag) + " needs an argument");
      }
      return std::string(args[++i]);
    };

    if (arg == "--") {
      for (++i; i < args.size(); ++i) positional.emplace_back(args[i]);
      break;
    }
    if (arg.size() < 2 || arg[0] != '-') {
      positional.emplace_back(arg);
    } else if (arg == "-f") {
      line.foreground = true;
    } else if (arg == "-d") {
      line.debug = true;
    } else if (arg == "-h" || arg == "--help") {
      line.help = true;
    } else if (arg == "-V" || arg == "--version") {
      line.version = true;
    } else if (arg == "-o") {
      QCOW2FS_ASSIGN_OR_RETURN(std::string list, next_value(arg));
      option_lists.push_back(std::move(list));
    } else if (arg.starts_with("-o")) {
      option_lists.emplace_back(arg.substr(2));
    } else if (arg == "-s") {
      sloppy = true;  // mount -s: ignore options we do not know
    } else if (arg == "-n" || arg == "-v") {
      // mount(8)'s "no mtab" and "verbose": nothing to do for us.
    } else if (arg == "-t") {
      // mount(8) and mount.fuse3 name the type they were asked for.
      QCOW2FS_ASSIGN_OR_RETURN(std::string type, next_value(arg));
      if (type != "fuse.qcow2fs" && type != "qcow2fs") {
        return Invalid("file system type '" + type + "' is not qcow2fs (expected fuse.qcow2fs)");
      }
    } else {
      return Invalid("unknown option '" + std::string(arg) + "'");
    }
  }
  if (line.help || line.version) return line;

  ParseState state;
  state.sloppy = sloppy;
  for (const std::string& list : option_lists) {
    QCOW2FS_RETURN_IF_ERROR(ParseList(list, line.options, state));
  }
  QCOW2FS_RETURN_IF_ERROR(CheckCombinations(line.options, state));

  if (positional.size() != 2) {
    return Invalid(positional.size() < 2 ? "expected an image and a mount point"
                                         : "too many arguments: '" + positional[2] + "'");
  }
  line.image = positional[0];
  line.mountpoint = positional[1];
  if (line.options.filename.empty()) {
    line.options.filename = DefaultFileName(line.image);
    if (!IsValidFileName(line.options.filename)) {
      return Invalid("cannot name the file after '" + line.image + "'; give filename=");
    }
  }
  return line;
}

}  // namespace qcow2fs::fusefs
