// L2Cache: an LRU cache of L2 tables, keyed by their host offset.
//
// Invariants:
//  - The cache is not thread-safe: its owner's metadata mutex guards it,
//    held by the caller of every method (the owner's pointer to the cache
//    is PT_GUARDED_BY that mutex, so a Clang build checks every call). Get()
//    is handed that mutex and drops it only while a miss is read from disk, with a "loading"
//    placeholder in the map so that a second thread asking for the same table waits for the first
//    instead of reading it again (and no stale copy can ever be inserted).
//  - A table handed out is pinned for as long as the caller keeps its
//    shared_ptr; pinned, loading and dirty tables are never evicted. A dirty
//    table is written back by the image (which knows the crash-safe order),
//    after which it may be evicted. The cache may therefore exceed its
//    capacity while many tables are dirty; over_capacity() tells the image
//    to write back.
//  - Entries are decoded to native byte order; with extended L2 entries two
//    consecutive words form one entry.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "base/mutex.h"
#include "base/thread_annotations.h"
#include "qcow2fs/status.h"

namespace qcow2fs {

struct L2Table {
  explicit L2Table(uint64_t host_offset, size_t words) : offset(host_offset), entries(words) {}
  const uint64_t offset;
  std::vector<uint64_t> entries;
  bool dirty = false;
  bool loading = false;
  Status load_status;
  // Entry indexes (sorted) of compressed clusters whose sectors ran past the
  // end of the image file, or into its first cluster, when the table was
  // read: their references are not ours to drop (see
  // Qcow2Image::CheckReleasableLocked). Almost always empty.
  std::vector<uint32_t> suspect_compressed;
};

class L2Cache {
 public:
  // Reads the table at `offset` from disk into `table` (entries in native
  // order, and what the image learns from them).
  using Loader = std::function<Status(uint64_t offset, L2Table& table)>;

  L2Cache(size_t capacity_tables, size_t words_per_table);

  // Returns the table at `offset`, loading it on a miss. `mu` is the
  // owner's metadata mutex, which guards the cache; it is released during
  // the load (and while waiting for another thread's load) and re-acquired.
  Result<std::shared_ptr<L2Table>> Get(Mutex& mu, uint64_t offset, const Loader& load) REQUIRES(mu);
  // Inserts a new all-zero table for a freshly allocated cluster, dirty.
  std::shared_ptr<L2Table> InsertNew(uint64_t offset);
  // Drops the table at `offset` (after its cluster was freed).
  void Erase(uint64_t offset);
  // Calls fn for every dirty table, in offset order.
  void ForEachDirty(const std::function<void(L2Table&)>& fn);
  // Evicts clean unpinned tables beyond the capacity.
  void Trim();
  bool over_capacity() const { return map_.size() > capacity_; }
  size_t capacity() const { return capacity_; }

 private:
  using Lru = std::list<std::shared_ptr<L2Table>>;

  const size_t capacity_;
  const size_t words_;
  Lru lru_;  // front = most recently used
  std::unordered_map<uint64_t, Lru::iterator> map_;
  CondVar loaded_;  // signalled when a load finishes
};

}  // namespace qcow2fs
