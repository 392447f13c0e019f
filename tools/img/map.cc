// qcow2fs-img map: where each guest range of an image is stored, looking
// through its backing chain, as `qemu-img map` reports it.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <optional>
#include <string>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"
#include "json.h"

namespace qcow2fs::img {

const char kMapHelp[] =
    "Usage: qcow2fs-img map [--output=human|json] [-U] IMAGE\n"
    "Show how each guest range of IMAGE is stored, looking through its backing\n"
    "chain: which image of the chain holds it (its depth, 0 = IMAGE), whether\n"
    "it is data or reads as zeros, and where the data lies in which file.\n"
    "\n"
    "  --output=human  (default) the ranges holding data: guest offset, length,\n"
    "                  offset in the file, file; compressed ranges have no\n"
    "                  offset and say \"compressed\"\n"
    "  --output=json   every range, one JSON object a line, with qemu-img's\n"
    "                  keys: start, length, depth, present, zero, data,\n"
    "                  compressed, offset (when the data has one)\n"
    "  -U, --force-share  open an image in use: read-only, no locks\n"
    "  -h, --help      this help\n";

namespace {

struct MapEntry {
  uint64_t start = 0;
  uint64_t length = 0;
  size_t depth = 0;
  bool present = false;  // some layer at `depth` answers for the range
  bool zero = false;
  bool data = false;
  bool compressed = false;
  std::optional<uint64_t> offset;  // in `file`
  std::string file;

  // Whether `next` continues this entry (qemu-img's rule: same kind, and
  // host offsets that continue each other).
  bool Continues(const MapEntry& next) const {
    if (start + length != next.start || depth != next.depth || present != next.present ||
        zero != next.zero || data != next.data || compressed != next.compressed ||
        offset.has_value() != next.offset.has_value() || file != next.file) {
      return false;
    }
    return !offset || *offset + length == *next.offset;
  }
};

struct Layer {
  Image* image;
  ImageInfo info;
  std::string shown_path;
  std::string data_path;  // where its data lies: the data file, or itself
};

// The entry for the range starting at `pos`, at most `length` long, found by
// asking each layer in turn until one answers for it.
Result<MapEntry> Resolve(const std::vector<Layer>& layers, uint64_t pos, uint64_t length) {
  MapEntry e;
  e.start = pos;
  for (size_t d = 0; d < layers.size(); d++) {
    const Layer& layer = layers[d];
    e.depth = d;
    if (layer.info.format == "raw") {
      // A raw file answers for everything it covers: data, or a hole that
      // reads as zeros, always at the same offset in the file.
      auto st = layer.image->GetDataStatus(pos, length);
      if (!st.ok()) return st.take_status();
      e.length = st->length;
      e.present = true;
      e.data = st->kind == BlockKind::kData;
      e.zero = !e.data;
      e.offset = pos;
      e.file = layer.shown_path;
      return e;
    }
    // First the rest of this cluster: a data cluster's host offset holds
    // for it alone, and asking for more would walk the whole data run each
    // time (quadratic in its length). Anything else is asked again for its
    // whole run.
    const uint64_t cluster = layer.info.cluster_size;
    auto st = layer.image->GetBlockStatus(pos, std::min(length, cluster - pos % cluster));
    if (!st.ok()) return st.take_status();
    if (st->kind != BlockKind::kData || st->compressed) {
      st = layer.image->GetBlockStatus(pos, length);
      if (!st.ok()) return st.take_status();
    }
    switch (st->kind) {
      case BlockKind::kData: {
        e.present = true;
        e.data = true;
        e.compressed = st->compressed;
        e.length = st->length;
        if (!st->compressed && st->host_offset) {
          e.offset = *st->host_offset;
          e.file = layer.data_path;
        }
        return e;
      }
      case BlockKind::kZero:
        e.present = true;
        e.zero = true;
        e.length = st->length;
        return e;
      case BlockKind::kUnallocated:
        length = st->length;
        if (d + 1 < layers.size() && pos < layers[d + 1].image->size()) {
          length = std::min(length, layers[d + 1].image->size() - pos);
          continue;  // the backing file answers
        }
        // No backing file, or past its end: reads as zeros, held by nobody.
        e.length = length;
        e.zero = true;
        return e;
    }
  }
  return Status(ErrorCode::kCorrupt,
                "no layer of the chain answers for guest offset " + std::to_string(pos));
}

void PrintJsonEntry(const MapEntry& e, bool first) {
  JsonWriter json(/*pretty=*/false);
  json.BeginObject();
  json.Field("start", e.start);
  json.Field("length", e.length);
  json.Field("depth", static_cast<uint64_t>(e.depth));
  json.Field("present", e.present);
  json.Field("zero", e.zero);
  json.Field("data", e.data);
  json.Field("compressed", e.compressed);
  if (e.offset) json.Field("offset", *e.offset);
  json.EndObject();
  std::printf("%s%s", first ? "[" : ",\n", json.str().c_str());
}

void PrintHumanEntry(const MapEntry& e) {
  if (!e.data) return;
  if (e.offset) {
    std::printf("%#-15" PRIx64 " %#-15" PRIx64 " %#-15" PRIx64 " %s\n", e.start, e.length,
                *e.offset, e.file.c_str());
  } else {
    std::printf("%#-15" PRIx64 " %#-15" PRIx64 " %-15s %s\n", e.start, e.length, "compressed",
                e.file.c_str());
  }
}

}  // namespace

int RunMap(const Args& args) {
  ParsedArgs parsed = ParseArgs(args, {kOutputOption, kForceShareOption});
  if (parsed.help) {
    std::fputs(kMapHelp, stdout);
    return kExitOk;
  }
  const OutputFormat format = OutputFormatOf(parsed);
  ExpectOperands(parsed, {"IMAGE"});
  if (!parsed.error.empty()) return UsageError(parsed.error);
  const std::string& path = parsed.operands[0];

  ReadOpen how;
  how.force_share = parsed.has("force-share");
  auto chain = OpenChain(path, how);
  if (!chain.ok()) return ReportError(chain.status());
  std::vector<Layer> layers;
  for (size_t d = 0; d < chain->layers.size(); d++) {
    Layer layer;
    layer.image = chain->layers[d].get();
    layer.info = layer.image->info();
    layer.shown_path = d == 0 ? path : DisplayPath(layer.info.path);
    layer.data_path = layer.info.data_file.empty()
                          ? layer.shown_path
                          : DisplayPath(ResolveNextTo(layer.shown_path, layer.info.data_file));
    layers.push_back(std::move(layer));
  }
  // Compressed ranges carry the name of the file they are stored in, even
  // without an offset.
  const bool json = format == OutputFormat::kJson;
  if (!json) std::printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");

  const uint64_t size = layers[0].image->size();
  std::optional<MapEntry> pending;
  bool first = true;
  auto emit = [&](const MapEntry& e) {
    if (json) {
      PrintJsonEntry(e, first);
    } else {
      PrintHumanEntry(e);
    }
    first = false;
  };
  for (uint64_t pos = 0; pos < size;) {
    auto entry = Resolve(layers, pos, size - pos);
    if (!entry.ok()) {
      if (json && !first) std::printf("]\n");
      std::fflush(stdout);
      return ReportError(entry.status());
    }
    if (entry->compressed && entry->file.empty()) {
      entry->file = layers[entry->depth].shown_path;
    }
    pos += entry->length;
    if (pending && pending->Continues(*entry)) {
      pending->length += entry->length;
      continue;
    }
    if (pending) emit(*pending);
    pending = std::move(entry).value();
  }
  if (pending) emit(*pending);
  if (json) std::printf(first ? "[]\n" : "]\n");
  return std::fflush(stdout) == 0 ? kExitOk : ReportError("writing standard output failed");
}

}  // namespace qcow2fs::img
