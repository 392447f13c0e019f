// Refcounts implementation: block cache, allocation, table growth.
#include "engine/refcounts.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"
#include "format/refcount_block.h"

namespace qcow2fs {
Refcounts::Refcounts(File& file, const Header& header)
    : file_(file),
      cluster_bits_(header.cluster_bits),
      cluster_size_(header.cluster_size()),
      order_(header.refcount_order),
      block_entries_(header.cluster_size() * 8 >> header.refcount_order),
      table_offset_(header.refcount_table_offset),
      table_clusters_(header.refcount_table_clusters),
      max_cached_blocks_(std::max<size_t>(16, (size_t{32} << 20) / header.cluster_size())) {}

Status Refcounts::Load() {
  const uint64_t bytes = uint64_t{table_clusters_} * cluster_size_;
  std::vector<std::byte> raw(bytes);
  QCOW2FS_RETURN_IF_ERROR(file_.ReadAt(table_offset_, raw));
  table_.resize(bytes / 8);
  for (size_t i = 0; i < table_.size(); i++) {
    table_[i] = LoadBe64(raw.data() + 8 * i);
    if ((table_[i] & ~kRefcountTableOffsetMask) != 0 || table_[i] % cluster_size_ != 0 ||
        table_[i] > limits::kMaxHostOffset) {
      return Status(ErrorCode::kCorrupt, "refcount table entry " + std::to_string(i) +
                                             " points to unaligned or invalid offset " +
                                             Hex(table_[i]));
    }
  }
  // Two table entries naming one block would make every update of one
  // change the other; QEMU's check calls it corruption, and a hostile
  // image uses it to make a table of a million entries cost one cluster.
  std::vector<std::pair<uint64_t, size_t>> used;
  for (size_t i = 0; i < table_.size(); i++) {
    if (table_[i] != 0) used.emplace_back(table_[i], i);
  }
  std::sort(used.begin(), used.end());
  for (size_t k = 1; k < used.size(); k++) {
    if (used[k].first == used[k - 1].first) {
      return Status(ErrorCode::kCorrupt,
                    "refcount table entries " + std::to_string(used[k - 1].second) + " and " +
                        std::to_string(used[k].second) + " both point to the refcount block at " +
                        Hex(used[k].first));
    }
  }
  return Status();
}

Result<std::vector<std::byte>*> Refcounts::Block(uint64_t index, bool create) {
  auto it = blocks_.find(index);
  if (it != blocks_.end()) return &it->second;
  if (index < table_.size() && table_[index] != 0) {
    std::vector<std::byte> block(cluster_size_);
    QCOW2FS_RETURN_IF_ERROR(file_.ReadAt(table_[index], block)
                                .Annotate("reading refcount block at " + Hex(table_[index])));
    EvictCleanBlocks();
    return &blocks_.emplace(index, std::move(block)).first->second;
  }
  if (!create) return static_cast<std::vector<std::byte>*>(nullptr);

  // A new block. It needs a cluster, whose own refcount lives either in the
  // new block itself or in another block (created recursively).
  if (index >= table_.size()) {
    // Growing counts the new table's clusters, which may create this very
    // block: look again afterwards.
    QCOW2FS_RETURN_IF_ERROR(GrowTable(index + 1));
    return Block(index, create);
  }
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t cluster, FindFree(1));
  auto& block = blocks_.emplace(index, std::vector<std::byte>(cluster_size_)).first->second;
  table_[index] = cluster << cluster_bits_;
  if (map_) map_->Add(cluster, MetadataMap::kRefcountBlock);
  table_dirty_ = true;
  dirty_blocks_[index] = true;
  QCOW2FS_RETURN_IF_ERROR(CountNewClusters(cluster, 1));
  return &block;
}

void Refcounts::EvictCleanBlocks() {
  if (blocks_.size() < max_cached_blocks_) return;
  // Down to half the bound in one pass, so the pass is paid rarely. Dirty
  // blocks stay until WriteBack; blocks are only evicted here, before a
  // new one is inserted, so no pointer Block() returned is in use.
  for (auto it = blocks_.begin(); it != blocks_.end() && blocks_.size() > max_cached_blocks_ / 2;) {
    if (dirty_blocks_.count(it->first)) {
      ++it;
    } else {
      it = blocks_.erase(it);
    }
  }
}

Result<uint64_t> Refcounts::Get(uint64_t cluster) {
  QCOW2FS_ASSIGN_OR_RETURN(auto* block, Block(cluster / block_entries_, false));
  if (!block) return uint64_t{0};
  return GetRefcountEntry(block->data(), order_, cluster % block_entries_);
}

Status Refcounts::Set(uint64_t cluster, uint64_t value) {
  if (value > MaxRefcount(order_)) {
    return Status(ErrorCode::kCorrupt,
                  "refcount of cluster " + Hex(cluster << cluster_bits_) + " would overflow");
  }
  const uint64_t index = cluster / block_entries_;
  QCOW2FS_ASSIGN_OR_RETURN(auto* block, Block(index, true));
  SetRefcountEntry(block->data(), order_, cluster % block_entries_, value);
  dirty_blocks_[index] = true;
  return Status();
}

Status Refcounts::Add(uint64_t cluster, int64_t delta) {
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t current, Get(cluster));
  if (delta < 0 && current < static_cast<uint64_t>(-delta)) {
    return Status(ErrorCode::kCorrupt, "refcount of cluster " + Hex(cluster << cluster_bits_) +
                                           " would drop below zero");
  }
  const uint64_t next = current + static_cast<uint64_t>(delta);
  if (next == 0) HintFree(cluster);
  return Set(cluster, next);
}

bool Refcounts::IsReserved(uint64_t cluster) const {
  return std::any_of(reserved_.begin(), reserved_.end(),
                     [cluster](const auto& r) { return cluster >= r.first && cluster < r.second; });
}

Result<bool> Refcounts::IsFree(uint64_t cluster) {
  if (cluster == 0 || IsReserved(cluster)) return false;
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t rc, Get(cluster));
  if (rc != 0) return false;
  if (map_ && map_->KindsOf(cluster) != 0) {
    return Status(ErrorCode::kCorrupt, "cluster " + Hex(cluster << cluster_bits_) + " holds " +
                                           MetadataMap::Describe(map_->KindsOf(cluster)) +
                                           " but its refcount is 0");
  }
  return true;
}

Result<uint64_t> Refcounts::FindFree(uint64_t count) {
  // How often, in clusters, the search asks whether it has gone too far
  // past the end of the file (the question costs a stat).
  constexpr uint64_t kReachCheckInterval = uint64_t{1} << 16;
  const uint64_t start = free_cursor_;
  uint64_t run_start = start, run_len = 0;
  bool first_free_seen = false;
  for (uint64_t c = start;; c++) {
    if ((c << cluster_bits_) > limits::kMaxHostOffset) {
      return Status(ErrorCode::kNoSpace, "image file has no room for more clusters");
    }
    if (c >= kMaxUsedPastEnd && c % kReachCheckInterval == 0) {
      QCOW2FS_RETURN_IF_ERROR(CheckSearchReach(start, c, count));
    }
    QCOW2FS_ASSIGN_OR_RETURN(bool free, IsFree(c));
    if (!free) {
      run_start = c + 1;
      run_len = 0;
      continue;
    }
    if (!first_free_seen) {
      first_free_seen = true;
      free_cursor_ = c;
    }
    if (++run_len == count) return run_start;
  }
}

Result<uint64_t> Refcounts::FreeRunAtCursor(uint64_t max_count) {
  uint64_t length = 0;
  while (length < max_count) {
    QCOW2FS_ASSIGN_OR_RETURN(bool free, IsFree(free_cursor_ + length));
    if (!free) break;
    length++;
  }
  return length;
}

Result<bool> Refcounts::AdvanceFreeCursor(size_t max_block_reads) {
  size_t reads = 0;
  const uint64_t start = std::max<uint64_t>(free_cursor_, 1);
  for (uint64_t c = start;;) {
    const uint64_t index = c / block_entries_;
    const uint64_t block_end = (index + 1) * block_entries_;
    // No block: every cluster it would count is free.
    if (index >= table_.size() || table_[index] == 0) {
      free_cursor_ = c;
      return true;
    }
    if (!blocks_.count(index)) {
      if (reads == max_block_reads) {
        free_cursor_ = c;
        return false;
      }
      reads++;
    }
    QCOW2FS_ASSIGN_OR_RETURN(auto* block, Block(index, false));
    for (; c < block_end; c++) {
      if (GetRefcountEntry(block->data(), order_, c % block_entries_) == 0) {
        free_cursor_ = c;
        return true;
      }
    }
    QCOW2FS_RETURN_IF_ERROR(CheckSearchReach(start, c, 1));
  }
}

Status Refcounts::CheckSearchReach(uint64_t first, uint64_t end, uint64_t count) {
  if (end < kMaxUsedPastEnd) return Status();
  // Clusters past the end of the file are only ever in use while this
  // process allocates them, a few at a time; a long stretch of them marked
  // in use is refcounts gone wrong, and searching on would walk every block
  // the table names.
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t file_size, file_.Size());
  const uint64_t file_end = (file_size + cluster_size_ - 1) >> cluster_bits_;
  if (end <= file_end || end - file_end < kMaxUsedPastEnd) return Status();
  // Not corruption that endangers data (the clusters are leaked, not
  // shared), so it does not fence the image: what needs no new cluster
  // goes on.
  const std::string what = count == 1
                               ? std::string("every cluster")
                               : "all but runs shorter than " + std::to_string(count) + " clusters";
  return Status(ErrorCode::kNoSpace,
                "refcounts mark " + what + " from the end of the image file (" +
                    Hex(std::max(first, file_end) << cluster_bits_) + ") to " +
                    Hex(end << cluster_bits_) +
                    " in use: no free cluster to allocate (the refcounts need a repair)");
}

Result<uint64_t> Refcounts::Allocate(uint64_t count) {
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t start, FindFree(count));
  QCOW2FS_RETURN_IF_ERROR(CountNewClusters(start, count));
  if (free_cursor_ == start) free_cursor_ = start + count;
  return start << cluster_bits_;
}

Status Refcounts::CountNewClusters(uint64_t start, uint64_t count) {
  reserved_.emplace_back(start, start + count);
  Status status;
  for (uint64_t c = start; c < start + count && status.ok(); c++) {
    status = Set(c, 1);
  }
  reserved_.pop_back();
  return status;
}

Status Refcounts::GrowTable(uint64_t min_entries) {
  const uint64_t per_cluster = cluster_size_ / 8;
  uint64_t entries = std::max<uint64_t>(min_entries, table_.size() * 2);
  while (true) {
    const uint64_t clusters = (entries + per_cluster - 1) / per_cluster;
    if (clusters * cluster_size_ > limits::kMaxRefcountTableBytes) {
      return Status(ErrorCode::kNoSpace, "refcount table would exceed 8 MiB");
    }
    QCOW2FS_ASSIGN_OR_RETURN(uint64_t start, FindFree(clusters));
    // The new table must also cover the blocks that count its own clusters.
    if ((start + clusters) / block_entries_ + 1 >= entries) {
      entries = (start + clusters) / block_entries_ + 2;
      continue;
    }
    for (uint64_t c = table_offset_ >> cluster_bits_;
         c < (table_offset_ >> cluster_bits_) + table_clusters_; c++) {
      retired_table_.push_back(c);
    }
    table_.resize(clusters * per_cluster, 0);
    table_offset_ = start << cluster_bits_;
    table_clusters_ = static_cast<uint32_t>(clusters);
    if (map_) map_->AddRange(start, clusters, MetadataMap::kRefcountTable);
    table_dirty_ = true;
    table_moved_ = true;
    return CountNewClusters(start, clusters);
  }
}

Result<bool> Refcounts::WriteBack() {
  if (!dirty_blocks_.empty()) {
    for (const auto& [index, unused] : dirty_blocks_) {
      QCOW2FS_RETURN_IF_ERROR(file_.WriteAt(table_[index], blocks_.at(index)));
    }
    QCOW2FS_RETURN_IF_ERROR(file_.Sync());
    dirty_blocks_.clear();
  }
  if (table_dirty_) {
    std::vector<std::byte> raw(uint64_t{table_clusters_} * cluster_size_);
    for (size_t i = 0; i < table_.size(); i++) StoreBe64(raw.data() + 8 * i, table_[i]);
    QCOW2FS_RETURN_IF_ERROR(file_.WriteAt(table_offset_, raw));
    QCOW2FS_RETURN_IF_ERROR(file_.Sync());
    table_dirty_ = false;
  }
  const bool moved = table_moved_;
  table_moved_ = false;
  return moved;
}

std::vector<uint64_t> Refcounts::DirtyBlockOffsets() const {
  std::vector<uint64_t> out;
  for (const auto& [index, unused] : dirty_blocks_) out.push_back(table_[index]);
  return out;
}

std::vector<uint64_t> Refcounts::TakeRetiredTableClusters() {
  return std::exchange(retired_table_, {});
}

}  // namespace qcow2fs
