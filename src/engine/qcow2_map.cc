// Qcow2Image guest-to-host mapping: L2 tables found through the L1 table
// (validated, loaded into the cache, or made the active disk's own before
// a write changes them) and guest ranges mapped to extents.
#include <algorithm>
#include <string>

#include "engine/qcow2_image.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"

namespace qcow2fs {
namespace {

bool CanMerge(const Extent& a, const Extent& b) {
  if (a.kind != b.kind || a.guest_offset + a.length != b.guest_offset) {
    return false;
  }
  switch (a.kind) {
    case Extent::Kind::kZero:
    case Extent::Kind::kBacking:
      return true;
    case Extent::Kind::kData:
      return a.host_offset + a.length == b.host_offset;
    case Extent::Kind::kCompressed:
      return false;
  }
  return false;
}

}  // namespace

Status Qcow2Image::LoadL2Table(uint64_t offset, L2Table& table) {
  std::vector<std::byte> raw(cluster_size_);
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(offset, raw));
  std::vector<uint64_t>& words = table.entries;
  for (size_t i = 0; i < words.size(); i++) {
    words[i] = LoadBe64(raw.data() + 8 * i);
  }
  // Compressed clusters whose sectors do not lie within the file as it is
  // now: nothing of ours can be there yet, but clusters allocated later
  // will be, and dropping such an entry's references would free them.
  const uint64_t file_size = file_size_.load(std::memory_order_acquire);
  const bool has_data_file = has_data_file_;
  const L2Entries entries(words, extended_l2_);
  for (uint64_t index = 0; index < l2_entries_; index++) {
    const uint64_t word = entries.word(index);
    if (ClassifyL2Entry(word, extended_l2_, has_data_file) != ClusterType::kCompressed) continue;
    const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
    // The tail of a sector past the end is normal (QEMU does not pad the
    // file); a whole cluster past it is not.
    const uint64_t last_cluster = AlignDown(d.host_offset + d.max_bytes - 1, cluster_size_);
    if (d.host_offset < cluster_size_ || last_cluster >= file_size) {
      table.suspect_compressed.push_back(static_cast<uint32_t>(index));
    }
  }
  return Status();
}

Status Qcow2Image::CheckL2TableOffset(uint64_t l1_index, uint64_t l2_offset, uint64_t guest) const {
  // Read per table: writers grow it (when they allocate) before any entry
  // points past the old end.
  const uint64_t file_size = file_size_.load(std::memory_order_acquire);
  if (l2_offset % cluster_size_ == 0 && l2_offset <= file_size &&
      file_size - l2_offset >= cluster_size_) {
    return Status();
  }
  return Status(ErrorCode::kCorrupt, "L1 entry " + std::to_string(l1_index) +
                                         " points to L2 table at " + Hex(l2_offset) +
                                         ", which is unaligned or past the end of " +
                                         "the file (mapping " + Where(guest) + ")");
}

Result<std::shared_ptr<L2Table>> Qcow2Image::L2ForMappingLocked(uint64_t l1_index, uint64_t guest) {
  const uint64_t l2_offset = L1EntryL2Offset(l1_[l1_index]);
  QCOW2FS_RETURN_IF_ERROR(CheckL2TableOffset(l1_index, l2_offset, guest));
  auto table = l2_cache_->Get(meta_mutex_, l2_offset,
                              [this](uint64_t off, L2Table& t) { return LoadL2Table(off, t); });
  if (!table.ok()) return table.status().Annotate("reading L2 table at " + Hex(l2_offset));
  return table;
}

Result<std::shared_ptr<L2Table>> Qcow2Image::L2ForWriteLocked(uint64_t l1_index) {
  const uint64_t l1_entry = l1_[l1_index];
  const uint64_t old_offset = L1EntryL2Offset(l1_entry);
  if (old_offset != 0 && (l1_entry & kOflagCopied)) {
    return L2ForMappingLocked(l1_index, l1_index * (l2_entries_ << cluster_bits_));
  }
  // No table yet, or one shared with a snapshot: make our own copy.
  std::vector<uint64_t> old_entries;
  std::vector<uint32_t> old_suspects;
  if (old_offset != 0) {
    QCOW2FS_ASSIGN_OR_RETURN(
        auto old, L2ForMappingLocked(l1_index, l1_index * (l2_entries_ << cluster_bits_)));
    old_entries = old->entries;
    old_suspects = old->suspect_compressed;
    // Another writer may have copied it while the load dropped the lock.
    if (l1_[l1_index] != l1_entry) return L2ForWriteLocked(l1_index);
  }
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t new_offset, AllocateClustersLocked(1));
  auto table = l2_cache_->InsertNew(new_offset);
  metadata_.Add(new_offset >> cluster_bits_, MetadataMap::kL2Table);
  if (!old_entries.empty()) {
    table->entries = std::move(old_entries);
    table->suspect_compressed = std::move(old_suspects);
    ReleaseClusterLocked(old_offset);
    // The old table stays metadata only while a snapshot still uses it.
    if (!snapshot_l2_tables_.count(old_offset >> cluster_bits_)) {
      metadata_.RemoveKind(old_offset >> cluster_bits_, MetadataMap::kL2Table);
    }
  }
  l1_[l1_index] = new_offset | kOflagCopied;
  l1_dirty_.insert(l1_index);
  return table;
}

Result<size_t> Qcow2Image::MapLocked(uint64_t offset, uint64_t end, Extent* out, size_t max) {
  size_t n = 0;
  auto emit = [&](const Extent& e) {
    if (n > 0 && CanMerge(out[n - 1], e)) {
      out[n - 1].length += e.length;
      return true;
    }
    if (n == max) return false;
    out[n++] = e;
    return true;
  };
  auto corrupt = [&](uint64_t guest, const std::string& what) {
    return Status(ErrorCode::kCorrupt, what + " (mapping " + Where(guest) + ")");
  };
  const uint64_t l2_coverage = l2_entries_ << cluster_bits_;
  const bool has_data_file = has_data_file_;

  uint64_t pos = offset;
  while (pos < end) {
    const uint64_t l1_index = pos / l2_coverage;
    const uint64_t table_end = std::min(end, (l1_index + 1) * l2_coverage);
    const uint64_t l1_entry = l1_index < l1_.size() ? l1_[l1_index] : 0;
    if (L1EntryL2Offset(l1_entry) == 0) {
      if (!emit({Extent::Kind::kBacking, pos, table_end - pos})) return n;
      pos = table_end;
      continue;
    }
    QCOW2FS_ASSIGN_OR_RETURN(const std::shared_ptr<L2Table> table,
                             L2ForMappingLocked(l1_index, pos));
    const L2Entries entries(table->entries, extended_l2_);
    // Read after the load, which may drop the lock while others allocate.
    const uint64_t file_size = file_size_.load(std::memory_order_acquire);

    uint64_t index = (pos >> cluster_bits_) & (l2_entries_ - 1);
    for (; pos < table_end; index++) {
      const uint64_t cluster_start = pos & ~(cluster_size_ - 1);
      const uint64_t cluster_end = std::min(table_end, cluster_start + cluster_size_);
      const uint64_t word = entries.word(index);
      const ClusterType type = ClassifyL2Entry(word, extended_l2_, has_data_file);
      const uint64_t host = word & kL2OffsetMask;

      if (type == ClusterType::kCompressed) {
        if (has_data_file) {
          return corrupt(pos,
                         "compressed cluster in an image with an "
                         "external data file");
        }
        if (entries.bitmap(index) != 0) {
          return corrupt(pos, "compressed cluster with a subcluster bitmap");
        }
        const CompressedDescriptor d = DecodeCompressed(word, cluster_bits_);
        if (d.host_offset < cluster_size_ || d.host_offset >= file_size) {
          return corrupt(pos, "compressed cluster at host offset " + Hex(d.host_offset) +
                                  " lies outside the image file");
        }
        Extent e{Extent::Kind::kCompressed,
                 pos,
                 cluster_end - pos,
                 d.host_offset,
                 std::min(d.max_bytes, file_size - d.host_offset),
                 cluster_start};
        if (!emit(e)) return n;
        pos = cluster_end;
        continue;
      }

      // Where an allocated cluster's data lives; checked only when used.
      auto check_host = [&]() -> Status {
        if (host % cluster_size_ != 0) {
          return corrupt(pos, "L2 entry points to unaligned host offset " + Hex(host));
        }
        if (host == 0 && !has_data_file) {
          return corrupt(pos, "L2 entry points to the image header");
        }
        if (!has_data_file && host >= file_size) {
          return corrupt(pos, "L2 entry points to host offset " + Hex(host) +
                                  ", past the end of the image file");
        }
        return Status();
      };
      // Offset 0 with the copied flag means "host offset 0" only in an
      // external data file; in the image file the spec does not allow it,
      // and ClassifyL2Entry reads it as unallocated, as QEMU does (which
      // reads the cluster as zeros or the backing file's and allocates a
      // new one on the first write).
      if (type == ClusterType::kZeroAlloc && host % cluster_size_ != 0) {
        return corrupt(pos, "zero cluster preallocated at unaligned host offset " + Hex(host));
      }

      if (!extended_l2_) {
        Extent e{Extent::Kind::kBacking, pos, cluster_end - pos};
        if (type == ClusterType::kZeroPlain || type == ClusterType::kZeroAlloc) {
          e.kind = Extent::Kind::kZero;
        } else if (type == ClusterType::kNormal) {
          QCOW2FS_RETURN_IF_ERROR(check_host());
          e.kind = Extent::Kind::kData;
          e.host_offset = host + (pos - cluster_start);
        }
        if (!emit(e)) return n;
        pos = cluster_end;
        continue;
      }

      // Extended L2: each of the 32 subclusters has its own state.
      const uint64_t bitmap = entries.bitmap(index);
      while (pos < cluster_end) {
        const int sc = static_cast<int>((pos - cluster_start) >> subcluster_bits_);
        const uint64_t sc_end =
            std::min(cluster_end, cluster_start + ((uint64_t{1} + sc) << subcluster_bits_));
        Extent e{Extent::Kind::kBacking, pos, sc_end - pos};
        switch (SubclusterStateOf(bitmap, sc)) {
          case SubclusterState::kInvalid:
            return corrupt(pos, "subcluster " + std::to_string(sc) + " is both allocated and zero");
          case SubclusterState::kAllocated:
            QCOW2FS_RETURN_IF_ERROR(check_host());
            e.kind = Extent::Kind::kData;
            e.host_offset = host + (pos - cluster_start);
            break;
          case SubclusterState::kZero:
            e.kind = Extent::Kind::kZero;
            break;
          case SubclusterState::kUnallocated:
            break;
        }
        if (!emit(e)) return n;
        pos = sc_end;
      }
    }
  }
  return n;
}

}  // namespace qcow2fs
