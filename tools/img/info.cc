// qcow2fs-img info: what an image is made of, as `qemu-img info` shows it.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"
#include "json.h"
#include "snapshot_table.h"

namespace qcow2fs::img {

const char kInfoHelp[] =
    "Usage: qcow2fs-img info [--output=human|json] [--backing-chain] [-U] IMAGE\n"
    "Show what IMAGE is made of: format, virtual size, the host space it takes,\n"
    "cluster size, format version and features, backing file, external data\n"
    "file, internal snapshots, and any warning the core has about it.\n"
    "\n"
    "  --output=human|json  human-readable text (default) or JSON with\n"
    "                       qemu-img's keys\n"
    "  --backing-chain      the same for every image of the backing chain, top\n"
    "                       first (a JSON array)\n"
    "  -U, --force-share    open an image in use: read-only, no locks\n"
    "  -h, --help           this help\n";

namespace {

const char* CompressionName(CompressionType t) {
  return t == CompressionType::kZstd ? "zstd" : "zlib";
}

const char* Compat(const ImageInfo& i) { return i.version >= 3 ? "1.1" : "0.10"; }

void PrintHuman(Image& image, const std::string& shown_path) {
  const ImageInfo i = image.info();
  std::printf("image: %s\n", shown_path.c_str());
  std::printf("file format: %s\n", i.format.c_str());
  std::printf("virtual size: %s (%" PRIu64 " bytes)\n", HumanSize(i.virtual_size).c_str(),
              i.virtual_size);
  std::printf("disk size: %s\n", HumanSize(image.AllocatedBytes()).c_str());
  if (i.format != "qcow2") return;
  std::printf("cluster_size: %u\n", i.cluster_size);
  if (i.dirty) std::printf("cleanly shut down: no\n");
  if (!i.backing_file.empty()) {
    const std::string actual = DisplayPath(i.backing_file_resolved);
    if (actual != i.backing_file) {
      std::printf("backing file: %s (actual path: %s)\n", i.backing_file.c_str(), actual.c_str());
    } else {
      std::printf("backing file: %s\n", i.backing_file.c_str());
    }
    if (!i.backing_format.empty()) {
      std::printf("backing file format: %s\n", i.backing_format.c_str());
    }
  }
  if (!i.snapshots.empty()) {
    std::printf("Snapshot list:\n");
    PrintSnapshotTable(i.snapshots);
  }
  std::printf("Format specific information:\n");
  std::printf("    compat: %s\n", Compat(i));
  std::printf("    compression type: %s\n", CompressionName(i.compression));
  if (i.version >= 3) {
    std::printf("    lazy refcounts: %s\n", i.lazy_refcounts ? "true" : "false");
  }
  std::printf("    refcount bits: %d\n", i.refcount_bits);
  if (!i.data_file.empty()) {
    std::printf("    data file: %s\n", i.data_file.c_str());
    std::printf("    data file raw: %s\n", i.data_file_raw ? "true" : "false");
  }
  if (i.version >= 3) {
    std::printf("    corrupt: %s\n", i.corrupt ? "true" : "false");
    std::printf("    extended l2: %s\n", i.extended_l2 ? "true" : "false");
  }
  for (const std::string& w : i.warnings) std::printf("warning: %s\n", w.c_str());
}

void WriteJson(JsonWriter& json, Image& image, const std::string& shown_path) {
  const ImageInfo i = image.info();
  json.BeginObject();
  json.Field("filename", shown_path);
  json.Field("format", i.format);
  json.Field("virtual-size", i.virtual_size);
  json.Field("actual-size", image.AllocatedBytes());
  json.Field("dirty-flag", i.dirty);
  if (i.format == "qcow2") {
    json.Field("cluster-size", uint64_t{i.cluster_size});
    if (!i.backing_file.empty()) {
      json.Field("backing-filename", i.backing_file);
      json.Field("full-backing-filename", DisplayPath(i.backing_file_resolved));
      if (!i.backing_format.empty()) json.Field("backing-filename-format", i.backing_format);
    }
    if (!i.snapshots.empty()) {
      json.Key("snapshots");
      WriteSnapshotArray(json, i.snapshots);
    }
    json.Key("format-specific");
    json.BeginObject();
    json.Field("type", "qcow2");
    json.Key("data");
    json.BeginObject();
    json.Field("compat", Compat(i));
    json.Field("compression-type", CompressionName(i.compression));
    if (i.version >= 3) json.Field("lazy-refcounts", i.lazy_refcounts);
    json.Field("refcount-bits", i.refcount_bits);
    if (!i.data_file.empty()) {
      json.Field("data-file", i.data_file);
      json.Field("data-file-raw", i.data_file_raw);
    }
    if (i.version >= 3) {
      json.Field("corrupt", i.corrupt);
      json.Field("extended-l2", i.extended_l2);
    }
    json.EndObject();
    json.EndObject();
  }
  if (!i.warnings.empty()) {
    json.Key("warnings");
    json.BeginArray();
    for (const std::string& w : i.warnings) json.String(w);
    json.EndArray();
  }
  json.EndObject();
}

}  // namespace

int RunInfo(const Args& args) {
  ParsedArgs parsed =
      ParseArgs(args, {kOutputOption, kForceShareOption, OptionSpec{0, "backing-chain", false}});
  if (parsed.help) {
    std::fputs(kInfoHelp, stdout);
    return kExitOk;
  }
  const OutputFormat format = OutputFormatOf(parsed);
  ExpectOperands(parsed, {"IMAGE"});
  if (!parsed.error.empty()) return UsageError(parsed.error);
  const std::string& path = parsed.operands[0];

  ReadOpen how;
  how.force_share = parsed.has("force-share");
  std::vector<std::unique_ptr<Image>> images;
  if (parsed.has("backing-chain")) {
    auto chain = OpenChain(path, how);
    if (!chain.ok()) return ReportError(chain.status());
    images = std::move(chain->layers);
  } else {
    auto image = OpenReadOnly(path, how);
    if (!image.ok()) return ReportError(image.status());
    images.push_back(std::move(image).value());
  }
  // The top image is shown as the user named it, the others by the path the
  // core resolved.
  auto shown = [&](size_t n) { return n == 0 ? path : DisplayPath(images[n]->info().path); };

  if (format == OutputFormat::kJson) {
    JsonWriter json;
    const bool chain = parsed.has("backing-chain");
    if (chain) json.BeginArray();
    for (size_t n = 0; n < images.size(); n++) WriteJson(json, *images[n], shown(n));
    if (chain) json.EndArray();
    std::printf("%s\n", json.str().c_str());
  } else {
    for (size_t n = 0; n < images.size(); n++) {
      if (n > 0) std::printf("\n");
      PrintHuman(*images[n], shown(n));
    }
  }
  return std::fflush(stdout) == 0 ? kExitOk : ReportError("writing standard output failed");
}

}  // namespace qcow2fs::img
