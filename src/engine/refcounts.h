// Refcounts: the refcount table and blocks in memory, and host cluster
// allocation.
//
// Not thread-safe: the image's metadata mutex guards it (the caller holds
// it for every call; this class never takes or drops it). The image's
// pointer to it is PT_GUARDED_BY that mutex, so a Clang build checks every
// call. Changes stay in memory until WriteBack(), which writes them in the
// order that keeps the image consistent at every instant:
//   1. new and changed refcount blocks, then sync;
//   2. the refcount table (in place, or a new, larger copy), then sync;
//   3. the header, if the table moved (the caller writes it), then sync.
// A refcount block is thus on disk before any table entry points to it, and
// a moved table is complete before the header points to it.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

#include "engine/metadata_map.h"
#include "format/header.h"
#include "io/file.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

class Refcounts {
 public:
  Refcounts(File& file, const Header& header);

  // Reads the refcount table.
  Status Load();
  // Keeps `map` told of refcount blocks and table clusters as they are
  // created, and refuses to hand out a cluster the map says holds metadata
  // (a free refcount on such a cluster is corruption, reported as
  // kCorrupt). The map must outlive this object.
  void set_metadata_map(MetadataMap* map) { map_ = map; }
  // Host offsets of the refcount blocks (0: none), by table index.
  const std::vector<uint64_t>& block_offsets() const { return table_; }
  // Host offsets of the blocks WriteBack() would write now.
  std::vector<uint64_t> DirtyBlockOffsets() const;

  Result<uint64_t> Get(uint64_t cluster);
  // Sets a cluster's refcount, creating its refcount block if needed.
  Status Set(uint64_t cluster, uint64_t value);
  // Adds `delta` (may be negative) to a cluster's refcount; fails with
  // kCorrupt on underflow or overflow.
  Status Add(uint64_t cluster, int64_t delta);

  // Finds `count` contiguous free clusters, sets their refcounts to 1 and
  // returns the host offset of the first.
  Result<uint64_t> Allocate(uint64_t count);

  bool dirty() const { return !dirty_blocks_.empty() || table_dirty_; }
  // Writes dirty blocks and the table (steps 1 and 2 above). Returns true
  // when the table moved and the header must be rewritten to point to it.
  Result<bool> WriteBack();
  // The clusters of the table that WriteBack() replaced; free them once the
  // header no longer points to them.
  std::vector<uint64_t> TakeRetiredTableClusters();

  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const { return table_clusters_; }
  // Moves the free-space search's starting point to the first free cluster,
  // reading at most `max_block_reads` refcount blocks that are not cached.
  // Returns true when it stands on a free cluster, false when the budget ran
  // out first (the progress is kept: call again, possibly after releasing
  // the metadata mutex, so that a search over many full blocks does not
  // keep every reader waiting). Fails with kNoSpace when more than
  // kMaxUsedPastEnd clusters in a row past the end of the file are marked
  // in use (Allocate fails the same way, and also when it would have to
  // search that far past the end for a long enough run of free clusters).
  Result<bool> AdvanceFreeCursor(size_t max_block_reads);
  static constexpr uint64_t kMaxUsedPastEnd = uint64_t{1} << 20;
  // How many free clusters, at most `max_count`, follow from the search's
  // starting point (0 when it is not on a free cluster). After
  // AdvanceFreeCursor returned true, with the metadata mutex held since,
  // Allocate(n) for any n up to this length takes exactly those clusters
  // and searches no further: a data write sizes its run with it, so a
  // fragmented image costs it shorter runs, never a long search.
  Result<uint64_t> FreeRunAtCursor(uint64_t max_count);

  // Lowest cluster worth searching for free space (after a free).
  void HintFree(uint64_t cluster) {
    if (cluster < free_cursor_) free_cursor_ = cluster;
  }

 private:
  Result<std::vector<std::byte>*> Block(uint64_t table_index, bool create);
  // Drops clean blocks when the cache is full.
  void EvictCleanBlocks();
  Status GrowTable(uint64_t min_entries);
  // First cluster of `count` free ones in a row, searching from the cursor
  // (which it moves to the first free cluster it sees).
  Result<uint64_t> FindFree(uint64_t count);
  // Whether `cluster` may be handed out: not cluster 0, not reserved, and
  // refcount 0. kCorrupt when the refcount is 0 but the metadata map knows
  // the cluster as metadata.
  Result<bool> IsFree(uint64_t cluster);
  bool IsReserved(uint64_t cluster) const;
  // Fails with kNoSpace when a search for `count` free clusters in a row,
  // which found none in [first, end), has gone more than kMaxUsedPastEnd
  // clusters past the end of the file (asked of the file only once `end`
  // is that far from cluster 0).
  Status CheckSearchReach(uint64_t first, uint64_t end, uint64_t count);

  File& file_;
  const uint32_t cluster_bits_;
  const uint64_t cluster_size_;
  const uint32_t order_;
  const uint64_t block_entries_;  // refcounts per block

  uint64_t table_offset_;
  uint32_t table_clusters_;
  std::vector<uint64_t> table_;  // refcount block offsets
  bool table_dirty_ = false;
  bool table_moved_ = false;
  std::vector<uint64_t> retired_table_;  // old table clusters to free

  // Loaded blocks, by table index: at most max_cached_blocks_ clean ones
  // (32 MiB worth, at least 16) plus the dirty ones.
  std::map<uint64_t, std::vector<std::byte>> blocks_;  // by table index
  const size_t max_cached_blocks_;
  std::map<uint64_t, bool> dirty_blocks_;  // table indexes
  uint64_t free_cursor_ = 0;
  MetadataMap* map_ = nullptr;
  // Cluster ranges [first, second) handed out but not yet counted: the run
  // being allocated, a growing table, a new refcount block. Counting them
  // may create blocks, whose allocation must not pick these clusters.
  std::vector<std::pair<uint64_t, uint64_t>> reserved_;
  // Counts [start, start + count) as used, with the range reserved meanwhile.
  Status CountNewClusters(uint64_t start, uint64_t count);
};

}  // namespace qcow2fs
