// MetadataMap: which host clusters of the image file hold metadata, and of
// what kind, for the overlap checks that keep guest data and metadata
// apart (QEMU's "Preventing invalid write on metadata", at its default
// level and beyond: uncached L2 tables and refcount blocks are covered
// too).
//
// The map is built from the tables when an image is opened for writing
// and kept up to date as metadata clusters are allocated and freed. A
// cluster normally holds one kind; a cluster two structures claim (an L2
// table inside the refcount table, say) keeps both bits, so that neither
// structure's write may land there.
//
// Not thread-safe: the image's metadata mutex guards it. Memory: one hash
// entry per metadata cluster (an L2 table covers 512 MiB of guest data at
// 64 KiB clusters, a refcount block 2 GiB of host file).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>

namespace qcow2fs {

class MetadataMap {
 public:
  // Bits of a cluster's kind mask.
  enum Kind : uint8_t {
    kHeader = 1 << 0,
    kL1Table = 1 << 1,
    kL2Table = 1 << 2,
    kRefcountTable = 1 << 3,
    kRefcountBlock = 1 << 4,
    kSnapshotTable = 1 << 5,
    kSnapshotL1Table = 1 << 6,
  };

  void Add(uint64_t cluster, Kind kind) { clusters_[cluster] |= kind; }
  // Marks [first, first + count) as `kind`.
  void AddRange(uint64_t first, uint64_t count, Kind kind) {
    for (uint64_t c = first; c < first + count; c++) Add(c, kind);
  }
  // The cluster was freed: it holds nothing any more.
  void Remove(uint64_t cluster) { clusters_.erase(cluster); }
  // Drops one kind from a cluster (a structure moved away from it).
  void RemoveKind(uint64_t cluster, Kind kind);

  // The kinds a cluster holds (0: guest data or free).
  uint8_t KindsOf(uint64_t cluster) const {
    auto it = clusters_.find(cluster);
    return it == clusters_.end() ? 0 : it->second;
  }
  // "the L1 table", "an L2 table and the refcount table", ...
  static std::string Describe(uint8_t kinds);
  size_t size() const { return clusters_.size(); }

 private:
  std::unordered_map<uint64_t, uint8_t> clusters_;
};

}  // namespace qcow2fs
