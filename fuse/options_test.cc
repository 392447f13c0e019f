// Unit tests for mount.qcow2fs's command-line and -o parsing.
#include "options.h"

#include <gtest/gtest.h>

#include <initializer_list>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace qcow2fs::fusefs {
namespace {

Result<CommandLine> Parse(std::initializer_list<const char*> args) {
  std::vector<const char*> argv(args);
  return ParseCommandLine(argv);
}

// The error message of a parse that must fail.
std::string ErrorOf(std::initializer_list<const char*> args) {
  Result<CommandLine> line = Parse(args);
  EXPECT_FALSE(line.ok());
  EXPECT_EQ(line.status().code(), ErrorCode::kInvalidArgument);
  return line.status().message();
}

TEST(ParseSize, PlainAndSuffixed) {
  EXPECT_EQ(*ParseSize("0"), 0u);
  EXPECT_EQ(*ParseSize("512"), 512u);
  EXPECT_EQ(*ParseSize("64K"), 64u << 10);
  EXPECT_EQ(*ParseSize("64k"), 64u << 10);
  EXPECT_EQ(*ParseSize("2M"), 2u << 20);
  EXPECT_EQ(*ParseSize("20G"), 20ull << 30);
  EXPECT_EQ(*ParseSize("1t"), 1ull << 40);
}

TEST(ParseSize, Rejects) {
  for (const char* text :
       {"", "K", "-1", "1.5G", "12X", "1KB", "10 M", "99999999999999999999", "17179869184T"}) {
    EXPECT_FALSE(ParseSize(text).ok()) << text;
  }
}

TEST(DefaultFileName, ReplacesLastExtension) {
  EXPECT_EQ(DefaultFileName("vm.qcow2"), "vm.raw");
  EXPECT_EQ(DefaultFileName("/srv/images/vm.qcow2"), "vm.raw");
  EXPECT_EQ(DefaultFileName("a.b.qcow2"), "a.b.raw");
  EXPECT_EQ(DefaultFileName("disk"), "disk.raw");
  EXPECT_EQ(DefaultFileName("./dir.d/disk"), "disk.raw");
  EXPECT_EQ(DefaultFileName(".hidden"), ".hidden.raw");
  EXPECT_EQ(DefaultFileName("disk.raw"), "disk.raw");
}

TEST(IsValidFileName, Rules) {
  EXPECT_TRUE(IsValidFileName("disk.img"));
  EXPECT_FALSE(IsValidFileName(""));
  EXPECT_FALSE(IsValidFileName("."));
  EXPECT_FALSE(IsValidFileName(".."));
  EXPECT_FALSE(IsValidFileName("a/b"));
  EXPECT_FALSE(IsValidFileName(std::string(256, 'x')));
}

TEST(ParseCommandLine, Defaults) {
  Result<CommandLine> line = Parse({"vm.qcow2", "/mnt"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_EQ(line->image, "vm.qcow2");
  EXPECT_EQ(line->mountpoint, "/mnt");
  EXPECT_FALSE(line->foreground);
  EXPECT_FALSE(line->debug);
  const MountOptions& o = line->options;
  EXPECT_FALSE(o.read_only);
  EXPECT_EQ(o.cache_bytes, 0u);
  EXPECT_EQ(o.threads, 0u);
  EXPECT_TRUE(o.discard);
  EXPECT_FALSE(o.host_cache);
  EXPECT_EQ(o.write_behind_bytes, 8u << 20);
  EXPECT_EQ(o.commit_seconds, 5u);
  EXPECT_TRUE(o.lock);
  EXPECT_FALSE(o.allow_other);
  EXPECT_FALSE(o.create);
  EXPECT_FALSE(o.compress.has_value());
  EXPECT_FALSE(o.snapshot.has_value());
  EXPECT_EQ(o.filename, "vm.raw");
  EXPECT_TRUE(o.kernel_flags.empty());
}

TEST(ParseCommandLine, FlagsAnywhere) {
  Result<CommandLine> line = Parse({"-f", "vm.qcow2", "-d", "-o", "ro", "/mnt", "-oallow_other"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_TRUE(line->foreground);
  EXPECT_TRUE(line->debug);
  EXPECT_TRUE(line->options.read_only);
  EXPECT_TRUE(line->options.allow_other);
}

TEST(ParseCommandLine, QcowOptions) {
  Result<CommandLine> line =
      Parse({"-o",
             "ro,cache-size=64M,compress-cache-size=128M,threads=8,discard=off,lock=off,"
             "host-cache=on,write-behind=0,filename=disk.img,"
             "snapshot=before-upgrade",
             "vm.qcow2", "/mnt"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  const MountOptions& o = line->options;
  EXPECT_TRUE(o.read_only);
  EXPECT_EQ(o.cache_bytes, 64u << 20);
  EXPECT_EQ(o.compress_cache_bytes, 128u << 20);
  EXPECT_EQ(o.threads, 8u);
  EXPECT_FALSE(o.discard);
  EXPECT_TRUE(o.host_cache);
  EXPECT_EQ(o.write_behind_bytes, 0u);
  EXPECT_FALSE(o.lock);
  EXPECT_EQ(o.filename, "disk.img");
  ASSERT_TRUE(o.snapshot.has_value());
  EXPECT_EQ(*o.snapshot, "before-upgrade");
}

TEST(ParseCommandLine, CommitInterval) {
  EXPECT_EQ(Parse({"i", "m"})->options.commit_seconds, 5u);
  EXPECT_EQ(Parse({"-o", "commit=0", "i", "m"})->options.commit_seconds, 0u);
  EXPECT_EQ(Parse({"-o", "commit=1", "i", "m"})->options.commit_seconds, 1u);
  EXPECT_EQ(Parse({"-o", "commit=30", "i", "m"})->options.commit_seconds, 30u);
  EXPECT_EQ(Parse({"-o", "commit=86400", "i", "m"})->options.commit_seconds, 86400u);
  // The last one given wins, as for every option.
  EXPECT_EQ(Parse({"-o", "commit=1,commit=7", "i", "m"})->options.commit_seconds, 7u);
  // Read-only mounts accept it (there is nothing to commit), as ext4 does.
  EXPECT_TRUE(Parse({"-o", "ro,commit=1", "i", "m"}).ok());
  for (const char* bad :
       {"commit=-1", "commit=", "commit=abc", "commit=5s", "commit=1.5", "commit= 5", "commit=+5",
        "commit=86401", "commit=4294967296", "commit=99999999999999999999"}) {
    std::string error = ErrorOf({"-o", bad, "i", "m"});
    // One clear line that names the option and the value given.
    EXPECT_NE(error.find("commit="), std::string::npos) << bad << ": " << error;
    EXPECT_EQ(error.find('\n'), std::string::npos) << bad << ": " << error;
    std::string value = std::string(bad).substr(7);
    EXPECT_NE(error.find("'" + value + "'"), std::string::npos) << bad << ": " << error;
  }
  EXPECT_NE(ErrorOf({"-o", "commit", "i", "m"}).find("needs a value"), std::string::npos);
}

TEST(ParseCommandLine, LastOfRoAndRwWins) {
  EXPECT_FALSE(Parse({"-o", "ro,rw", "i", "m"})->options.read_only);
  EXPECT_TRUE(Parse({"-o", "rw", "-o", "ro", "i", "m"})->options.read_only);
}

TEST(ParseCommandLine, KernelFlagsPassThrough) {
  Result<CommandLine> line = Parse({"-o", "nosuid,nodev,noexec,sync,dev,suid", "i", "m"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_EQ(line->options.kernel_flags,
            (std::vector<std::string>{"nosuid", "nodev", "noexec", "sync", "dev", "suid"}));
}

TEST(ParseCommandLine, MountHelperNoiseIsAccepted) {
  // What mount(8), mount.fuse3 and fstab lines add.
  Result<CommandLine> line =
      Parse({"/srv/vm.qcow2", "/mnt", "-n", "-v", "-o",
             "defaults,auto,noauto,user,users,nouser,owner,group,_netdev,nofail,"
             "noatime,relatime,default_permissions,x-systemd.automount,"
             "comment=x,user=alice,,",
             "-t", "fuse.qcow2fs"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_TRUE(line->options.kernel_flags.empty());
  EXPECT_EQ(line->options.filename, "vm.raw");
}

TEST(ParseCommandLine, Create) {
  Result<CommandLine> line = Parse({"-o",
                                    "create,size=20G,cluster_size=1M,compression_type=zstd,"
                                    "backing=base.qcow2,backing_fmt=qcow2",
                                    "new.qcow2", "/mnt"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  const MountOptions& o = line->options;
  EXPECT_TRUE(o.create);
  EXPECT_EQ(o.create_options.size, 20ull << 30);
  EXPECT_EQ(o.create_options.cluster_size, 1u << 20);
  EXPECT_EQ(o.create_options.compression, CompressionType::kZstd);
  EXPECT_EQ(o.create_options.backing_file, "base.qcow2");
  EXPECT_EQ(o.create_options.backing_format, "qcow2");
}

TEST(ParseCommandLine, Compress) {
  Result<CommandLine> line = Parse({"-o", "compress=zstd", "i", "m"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  ASSERT_TRUE(line->options.compress.has_value());
  EXPECT_EQ(*line->options.compress, CompressionType::kZstd);
  ErrorOf({"-o", "compress=zstd,ro", "i", "m"});
}

TEST(ParseCommandLine, CreateTakesTheCompressionOfCompress) {
  Result<CommandLine> line = Parse({"-o", "create,size=1G,compress=zstd", "i", "m"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_EQ(line->options.create_options.compression, CompressionType::kZstd);
  EXPECT_TRUE(Parse({"-o", "create,size=1G,compress=zlib,compression_type=zlib", "i", "m"}).ok());
  ErrorOf({"-o", "create,size=1G,compress=zlib,compression_type=zstd", "i", "m"});
}

TEST(ParseCommandLine, CreateWithBackingNeedsNoSize) {
  EXPECT_TRUE(Parse({"-o", "create,backing=base.qcow2", "n", "m"}).ok());
}

TEST(ParseCommandLine, SnapshotImpliesReadOnly) {
  Result<CommandLine> line = Parse({"-o", "snapshot=1", "i", "m"});
  ASSERT_TRUE(line.ok());
  EXPECT_TRUE(line->options.read_only);
}

TEST(ParseCommandLine, HelpAndVersionNeedNoArguments) {
  EXPECT_TRUE(Parse({"--help"})->help);
  EXPECT_TRUE(Parse({"-h"})->help);
  EXPECT_TRUE(Parse({"-V"})->version);
}

TEST(ParseCommandLine, SloppyIgnoresUnknownOptions) {
  EXPECT_TRUE(Parse({"-s", "-o", "frobnicate,ro", "i", "m"}).ok());
}

TEST(ParseCommandLine, Errors) {
  EXPECT_NE(ErrorOf({"-o", "frobnicate", "i", "m"}).find("frobnicate"), std::string::npos);
  EXPECT_NE(ErrorOf({"-x", "i", "m"}).find("-x"), std::string::npos);
  ErrorOf({"i"});
  ErrorOf({"i", "m", "extra"});
  ErrorOf({"-o"});
  ErrorOf({"-o", "threads=0", "i", "m"});
  ErrorOf({"-o", "threads=257", "i", "m"});
  ErrorOf({"-o", "threads=4x", "i", "m"});
  ErrorOf({"-o", "cache-size=lots", "i", "m"});
  ErrorOf({"-o", "discard=maybe", "i", "m"});
  ErrorOf({"-o", "host-cache=yes", "i", "m"});
  ErrorOf({"-o", "write-behind=2G", "i", "m"});
  ErrorOf({"-o", "compress=lz4", "i", "m"});
  ErrorOf({"-o", "filename=a/b", "i", "m"});
  ErrorOf({"-o", "filename=..", "i", "m"});
  ErrorOf({"-o", "ro=1", "i", "m"});
  ErrorOf({"-o", "threads", "i", "m"});
  ErrorOf({"-o", "snapshot=", "i", "m"});
  ErrorOf({"-t", "ext4", "i", "m"});
}

TEST(ParseCommandLine, RejectedCombinations) {
  EXPECT_NE(ErrorOf({"-o", "lock=off", "i", "m"}).find("lock=off"), std::string::npos);
  EXPECT_TRUE(Parse({"-o", "lock=off,ro", "i", "m"}).ok());
  EXPECT_NE(ErrorOf({"-o", "size=1G", "i", "m"}).find("create"), std::string::npos);
  ErrorOf({"-o", "cluster_size=64K", "i", "m"});
  ErrorOf({"-o", "create", "i", "m"});  // no size
  ErrorOf({"-o", "create,size=1G,ro", "i", "m"});
  ErrorOf({"-o", "create,size=1G,snapshot=s", "i", "m"});
  ErrorOf({"-o", "create,size=1G,cluster_size=3K", "i", "m"});
  ErrorOf({"-o", "create,size=1G,cluster_size=4M", "i", "m"});
  ErrorOf({"-o", "create,size=1G,backing_fmt=vmdk", "i", "m"});
}

TEST(ParseCommandLine, DashAndUnderscoreSpellings) {
  Result<CommandLine> line =
      Parse({"-o",
             "cache_size=64M,compress_cache_size=1M,write_behind=0,host_cache=on,"
             "allow-other,create,size=1G,cluster-size=1M,compression-type=zstd,"
             "backing-fmt=raw,backing=b,default-permissions,_netdev",
             "i", "m"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  const MountOptions& o = line->options;
  EXPECT_EQ(o.cache_bytes, 64u << 20);
  EXPECT_EQ(o.compress_cache_bytes, 1u << 20);
  EXPECT_EQ(o.write_behind_bytes, 0u);
  EXPECT_TRUE(o.host_cache);
  EXPECT_TRUE(o.allow_other);
  EXPECT_EQ(o.create_options.cluster_size, 1u << 20);
  EXPECT_EQ(o.create_options.compression, CompressionType::kZstd);
  EXPECT_EQ(o.create_options.backing_format, "raw");
  // Creation-only options are recognised as such in either spelling.
  EXPECT_NE(ErrorOf({"-o", "cluster-size=64K", "i", "m"}).find("create"), std::string::npos);
  // Errors name the option by its documented spelling.
  EXPECT_NE(ErrorOf({"-o", "cache_size=lots", "i", "m"}).find("cache-size="), std::string::npos);
}

TEST(ParseCommandLine, UnknownOptionSuggestsTheClosest) {
  EXPECT_EQ(ErrorOf({"-o", "cach-size=64M", "i", "m"}),
            "unknown option 'cach-size'; did you mean 'cache-size'?");
  EXPECT_NE(ErrorOf({"-o", "writebehind=0", "i", "m"}).find("did you mean 'write-behind'?"),
            std::string::npos);
  EXPECT_NE(ErrorOf({"-o", "snapshto=a", "i", "m"}).find("did you mean 'snapshot'?"),
            std::string::npos);
  EXPECT_NE(ErrorOf({"-o", "allow_others", "i", "m"}).find("did you mean 'allow_other'?"),
            std::string::npos);
  EXPECT_NE(ErrorOf({"-o", "nosiud", "i", "m"}).find("did you mean 'nosuid'?"), std::string::npos);
  // Nothing close: no guess.
  EXPECT_EQ(ErrorOf({"-o", "frobnicate", "i", "m"}), "unknown option 'frobnicate'");
  EXPECT_EQ(ErrorOf({"-o", "xyz", "i", "m"}), "unknown option 'xyz'");
  EXPECT_EQ(ClosestOption("threds"), "threads");
  EXPECT_EQ(ClosestOption("compres"), "compress");
  EXPECT_EQ(ClosestOption("qwertyuiop"), "");
}

TEST(ParseCommandLine, SnapshotWithExplicitRwWarns) {
  Result<CommandLine> line = Parse({"-o", "snapshot=s,rw", "i", "m"});
  ASSERT_TRUE(line.ok()) << line.status().ToString();
  EXPECT_TRUE(line->options.read_only);
  ASSERT_EQ(line->options.warnings.size(), 1u);
  EXPECT_NE(line->options.warnings[0].find("read-only"), std::string::npos);
  EXPECT_EQ(line->options.warnings[0].find('\n'), std::string::npos);
  // rw before ro, or no rw at all: nothing to warn about.
  EXPECT_TRUE(Parse({"-o", "rw,snapshot=s,ro", "i", "m"})->options.warnings.empty());
  EXPECT_TRUE(Parse({"-o", "snapshot=s", "i", "m"})->options.warnings.empty());
  EXPECT_TRUE(Parse({"-o", "snapshot=s,ro", "i", "m"})->options.warnings.empty());
  // Across -o lists too.
  EXPECT_EQ(Parse({"-o", "rw", "-o", "snapshot=s", "i", "m"})->options.warnings.size(), 1u);
}

TEST(ParseCommandLine, LogFile) {
  EXPECT_EQ(Parse({"-o", "log=/var/log/q.log", "i", "m"})->options.log_file, "/var/log/q.log");
  EXPECT_TRUE(Parse({"i", "m"})->options.log_file.empty());
  ErrorOf({"-o", "log=", "i", "m"});
  ErrorOf({"-o", "log", "i", "m"});
}

TEST(FormatSize, ExactSuffixes) {
  EXPECT_EQ(FormatSize(0), "0");
  EXPECT_EQ(FormatSize(512), "512");
  EXPECT_EQ(FormatSize(64 << 10), "64K");
  EXPECT_EQ(FormatSize(100u << 20), "100M");
  EXPECT_EQ(FormatSize(5ull << 30), "5G");
  EXPECT_EQ(FormatSize(2ull << 40), "2T");
  EXPECT_EQ(FormatSize((1ull << 30) + 512), std::to_string((1ull << 30) + 512));
}

TEST(ExistingImageWarning, NamesWhatDiffers) {
  Result<CommandLine> line = Parse({"-o", "create,size=5G", "vm.qcow2", "m"});
  ASSERT_TRUE(line.ok());
  ImageInfo info;
  info.virtual_size = 100u << 20;
  info.cluster_size = 64 << 10;
  std::string warning = ExistingImageWarning("/x/vm.qcow2", line->options, info);
  EXPECT_NE(warning.find("/x/vm.qcow2"), std::string::npos) << warning;
  EXPECT_NE(warning.find("as it is"), std::string::npos) << warning;
  EXPECT_NE(warning.find("size 100M, not size=5G"), std::string::npos) << warning;
  // Same size: nothing to say. Options not given are not compared.
  info.virtual_size = 5ull << 30;
  info.compression = CompressionType::kZstd;
  EXPECT_EQ(ExistingImageWarning("vm.qcow2", line->options, info), "");
  // Without create there is nothing to compare.
  EXPECT_EQ(ExistingImageWarning("vm.qcow2", Parse({"i", "m"})->options, info), "");

  line = Parse({"-o", "create,size=5G,cluster_size=1M,compression_type=zlib", "vm.qcow2", "m"});
  ASSERT_TRUE(line.ok());
  warning = ExistingImageWarning("vm.qcow2", line->options, info);
  EXPECT_NE(warning.find("cluster size 64K, not cluster_size=1M"), std::string::npos) << warning;
  EXPECT_NE(warning.find("compression type zstd, not compression_type=zlib"), std::string::npos)
      << warning;
  EXPECT_EQ(warning.find("size 5G"), std::string::npos) << warning;
  EXPECT_EQ(warning.find('\n'), std::string::npos) << warning;
}

TEST(ParseMountOptions, AddsToExistingOptions) {
  MountOptions options;
  ASSERT_TRUE(ParseMountOptions("ro,threads=2", false, options).ok());
  EXPECT_TRUE(options.read_only);
  EXPECT_EQ(options.threads, 2u);
  EXPECT_FALSE(ParseMountOptions("bogus", false, options).ok());
  EXPECT_TRUE(ParseMountOptions("bogus", true, options).ok());
}

// ---- What the one option table makes checkable.

// A valid value for each option that takes one; the test below fails when
// an option is added without one here.
const std::map<std::string_view, const char*>& SampleValues() {
  static const std::map<std::string_view, const char*> values = {
      {"cache-size", "4M"},
      {"compress-cache-size", "16M"},
      {"write-behind", "1M"},
      {"commit", "10"},
      {"threads", "8"},
      {"discard", "off"},
      {"host-cache", "on"},
      {"compress", "zstd"},
      {"lock", "on"},
      {"snapshot", "s1"},
      {"filename", "disk.img"},
      {"log", "/tmp/q.log"},
      {"size", "1G"},
      {"cluster_size", "64K"},
      {"compression_type", "zstd"},
      {"backing", "base.qcow2"},
      {"backing_fmt", "qcow2"},
  };
  return values;
}

std::string WithValue(const OptionDescription& option) {
  std::string text(option.name);
  if (option.takes_value) text += std::string("=") + SampleValues().at(option.name);
  return text;
}

TEST(OptionTable, EveryOptionIsInTheUsageText) {
  const std::string usage = UsageText();
  ASSERT_FALSE(KnownOptions().empty());
  for (const OptionDescription& option : KnownOptions()) {
    const std::string shown = std::string(option.name) + (option.takes_value ? "=" : "");
    EXPECT_NE(usage.find(shown), std::string::npos) << shown << " is missing from:\n" << usage;
  }
}

TEST(OptionTable, TheUsageTextFitsATerminal) {
  const std::string usage = UsageText();
  EXPECT_EQ(usage.rfind("usage: mount.qcow2fs ", 0), 0u);
  size_t start = 0;
  while (start < usage.size()) {
    size_t end = usage.find('\n', start);
    ASSERT_NE(end, std::string::npos) << "the text ends with a newline";
    EXPECT_LE(end - start, 79u) << usage.substr(start, end - start);
    start = end + 1;
  }
}

TEST(OptionTable, EveryOptionParsesInBothSpellings) {
  for (const OptionDescription& option : KnownOptions()) {
    if (option.takes_value) {
      ASSERT_TRUE(SampleValues().count(option.name)) << option.name;
    }
    // ro and snapshot= make a mount read-only; create needs rw and size.
    std::string list = option.create_only || option.name == "create" ? "create,size=1G," : "";
    list += option.name == "lock" || option.name == "snapshot" ? "ro," : "";
    for (char from : {'-', '_'}) {
      std::string spelled = WithValue(option);
      const size_t name_end = option.name.size();
      for (size_t i = 0; i < name_end; i++) {
        if (spelled[i] == from) spelled[i] = from == '-' ? '_' : '-';
      }
      MountOptions options;
      Status s = ParseMountOptions(list + spelled, false, options);
      EXPECT_TRUE(s.ok()) << list + spelled << ": " << s.ToString();
    }
  }
}

TEST(OptionTable, CreateOptionsAreRefusedWithoutCreate) {
  int create_only = 0;
  for (const OptionDescription& option : KnownOptions()) {
    MountOptions options;
    Status s = ParseMountOptions(WithValue(option), false, options);
    if (!option.create_only) continue;
    create_only++;
    ASSERT_FALSE(s.ok()) << option.name << " was accepted without create";
    EXPECT_EQ(s.message(),
              std::string(option.name) + "= only applies together with the create option");
  }
  EXPECT_EQ(create_only, 5) << "size, cluster_size, compression_type, backing, backing_fmt";
}

TEST(OptionTable, ValuesAreRequiredExactlyWhereTheTableSays) {
  for (const OptionDescription& option : KnownOptions()) {
    MountOptions options;
    const std::string name(option.name);
    Status s = ParseMountOptions(option.takes_value ? name : name + "=x", false, options);
    ASSERT_FALSE(s.ok()) << name;
    EXPECT_EQ(s.message(), option.takes_value
                               ? "option " + name + " needs a value (" + name + "=...)"
                               : "option " + name + " takes no value");
  }
}

TEST(OptionTable, TyposOfEveryOptionAreRecognised) {
  for (const OptionDescription& option : KnownOptions()) {
    if (option.name.size() < 5) continue;  // one typo in a short name may be another name
    // Two neighbouring letters swapped (where they differ).
    std::string typo(option.name);
    size_t at = 1;
    while (typo[at] == typo[at + 1]) at++;
    std::swap(typo[at], typo[at + 1]);
    EXPECT_EQ(ClosestOption(typo), option.name) << typo;
  }
}

}  // namespace
}  // namespace qcow2fs::fusefs
