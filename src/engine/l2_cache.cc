// L2Cache implementation: LRU list plus hash map, loads outside the lock.
#include "engine/l2_cache.h"

#include <algorithm>

namespace qcow2fs {

L2Cache::L2Cache(size_t capacity_tables, size_t words_per_table)
    : capacity_(std::max<size_t>(capacity_tables, 2)), words_(words_per_table) {}

Result<std::shared_ptr<L2Table>> L2Cache::Get(Mutex& mu, uint64_t offset, const Loader& load) {
  while (true) {
    auto it = map_.find(offset);
    if (it == map_.end()) break;
    std::shared_ptr<L2Table> table = *it->second;
    if (table->loading) {
      loaded_.Wait(mu);
      continue;  // the entry may have been dropped after a failed load
    }
    lru_.splice(lru_.begin(), lru_, it->second);
    return table;
  }

  auto table = std::make_shared<L2Table>(offset, words_);
  table->loading = true;
  lru_.push_front(table);
  map_[offset] = lru_.begin();
  Trim();

  Status status;
  {
    MutexUnlock unlocked(mu);
    status = load(offset, *table);
  }

  table->loading = false;
  loaded_.NotifyAll();
  if (!status.ok()) {
    // Do not cache failures: a transient I/O error must not stick.
    auto it = map_.find(offset);
    if (it != map_.end() && *it->second == table) {
      lru_.erase(it->second);
      map_.erase(it);
    }
    return status;
  }
  return table;
}

std::shared_ptr<L2Table> L2Cache::InsertNew(uint64_t offset) {
  Erase(offset);
  auto table = std::make_shared<L2Table>(offset, words_);
  table->dirty = true;
  lru_.push_front(table);
  map_[offset] = lru_.begin();
  Trim();
  return table;
}

void L2Cache::Erase(uint64_t offset) {
  auto it = map_.find(offset);
  if (it == map_.end()) return;
  lru_.erase(it->second);
  map_.erase(it);
}

void L2Cache::ForEachDirty(const std::function<void(L2Table&)>& fn) {
  std::vector<L2Table*> dirty;
  for (auto& t : lru_) {
    if (t->dirty) dirty.push_back(t.get());
  }
  std::sort(dirty.begin(), dirty.end(),
            [](const L2Table* a, const L2Table* b) { return a->offset < b->offset; });
  for (L2Table* t : dirty) fn(*t);
}

void L2Cache::Trim() {
  // Walk from the least recently used end; use_count() == 1 means only the
  // cache holds the table, so nobody is using it.
  for (auto it = lru_.end(); map_.size() > capacity_ && it != lru_.begin();) {
    --it;
    const auto& t = *it;
    if (t->dirty || t->loading || t.use_count() > 1) continue;
    map_.erase(t->offset);
    it = lru_.erase(it);
  }
}

}  // namespace qcow2fs
