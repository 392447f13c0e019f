// MetadataMap implementation.
#include "engine/metadata_map.h"

namespace qcow2fs {

void MetadataMap::RemoveKind(uint64_t cluster, Kind kind) {
  auto it = clusters_.find(cluster);
  if (it == clusters_.end()) return;
  it->second &= static_cast<uint8_t>(~kind);
  if (it->second == 0) clusters_.erase(it);
}

std::string MetadataMap::Describe(uint8_t kinds) {
  static const struct {
    Kind kind;
    const char* name;
  } kNames[] = {
      {kHeader, "the header"},
      {kL1Table, "the L1 table"},
      {kL2Table, "an L2 table"},
      {kRefcountTable, "the refcount table"},
      {kRefcountBlock, "a refcount block"},
      {kSnapshotTable, "the snapshot table"},
      {kSnapshotL1Table, "a snapshot's L1 table"},
  };
  std::string out;
  for (const auto& n : kNames) {
    if (!(kinds & n.kind)) continue;
    if (!out.empty()) out += " and ";
    out += n.name;
  }
  return out.empty() ? "no metadata" : out;
}

}  // namespace qcow2fs
