// The reference-counting walk of the image check: reads every structure of
// the image, counts each host cluster it uses, and compares the counts with
// the stored refcounts. Problems are reported with qemu-img check's words,
// so the two tools' reports can be compared line by line.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <limits>

#include "engine/qcow2_check_internal.h"
#include "format/align.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"
#include "format/refcount_block.h"
#include "format/snapshot_table.h"

namespace qcow2fs::check {
namespace {

// Reserved bits of table entries (spec "Cluster mapping", "Host cluster
// management"): set, they make the entry corrupt.
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;
constexpr uint64_t kL2StandardReservedMask = 0x3f000000000001feull;
constexpr uint64_t kRefcountTableReservedMask = 0x1ffull;
// Bitmap table entries: bits 9-55 hold the data cluster's offset.
constexpr uint64_t kBitmapTableOffsetMask = 0x00fffffffffffe00ull;
// QEMU's limits for persistent bitmaps: a bitmaps extension naming more or
// larger structures is refused before anything is allocated.
constexpr uint32_t kMaxBitmaps = 65535;
constexpr uint64_t kMaxBitmapDirectoryBytes = 64ull << 20;
constexpr uint64_t kMaxBitmapTableEntries = 0x8000000;
constexpr uint64_t kBitmapDirectoryEntryFixedBytes = 24;

class Walker {
 public:
  Walker(File& file, RepairMode mode, const ProgressFn& progress, CheckReport& report, Findings& f)
      : file_(file), mode_(mode), progress_(progress), report_(report), f_(f) {}

  Status Run();

 private:
  const Header& h() const { return f_.header; }
  uint64_t cs() const { return f_.header.cluster_size(); }

  void Corruption(std::string message) {
    report_.corruptions++;
    report_.messages.push_back(std::move(message));
  }
  // A structure that could not be read: the references are incomplete, so
  // nothing may be repaired on their strength.
  void CheckError(std::string message) {
    report_.check_errors++;
    report_.messages.push_back(std::move(message));
    f_.complete = false;
  }
  // Whether [offset, offset + size) starts or reaches a whole cluster or
  // more past the end of the file. The last cluster of an image may be
  // partly written, so up to a cluster beyond the end is tolerated, as QEMU
  // does.
  bool PastEnd(uint64_t offset, uint64_t size) const {
    return offset > limits::kMaxHostOffset || size > limits::kMaxHostOffset ||
           offset + size >= f_.file_size + cs();
  }
  // Counts one reference to every cluster [offset, offset + size) touches.
  // Returns false (and reports a corruption) for a region past the end.
  bool Count(uint64_t offset, uint64_t size);
  // For a region some structure names and no repair removes.
  void Reserve(uint64_t offset, uint64_t size) {
    if (offset <= limits::kMaxHostOffset && size <= limits::kMaxHostOffset) {
      f_.reserved_end = std::max(f_.reserved_end, offset + size);
    }
  }
  // Plans the kAll fix of the L2 entry at `entry_offset` (word `entry`,
  // bitmap word `bitmap`): it will read as zeros without a host cluster.
  void PatchToZero(uint64_t entry_offset, uint64_t bitmap, bool compressed,
                   const std::string& what);

  void Progress(uint64_t bytes);
  Status EstimateTotal();
  Status WalkL1(uint64_t l1_offset, uint32_t l1_size, bool active);
  Status WalkL2(uint64_t l2_offset, bool active);
  Status WalkSnapshots();
  Status WalkBitmaps();
  Status WalkRefcountBlocks();
  Status Compare();

  File& file_;
  const RepairMode mode_;
  const ProgressFn& progress_;
  CheckReport& report_;
  Findings& f_;
  std::vector<SnapshotEntry> snapshots_;
  bool snapshots_ok_ = true;
  uint64_t snapshot_table_bytes_ = 0;
  uint64_t done_ = 0, total_ = 0, last_reported_ = 0;
};

bool Walker::Count(uint64_t offset, uint64_t size) {
  if (size == 0) return true;
  if (PastEnd(offset, size)) {
    Corruption(
        Fmt("ERROR: counting reference for region exceeding the end of the file "
            "by one cluster or more: offset %#" PRIx64 " size %#" PRIx64,
            offset, size));
    return false;
  }
  const uint64_t first = offset >> h().cluster_bits;
  const uint64_t last = (offset + size - 1) >> h().cluster_bits;
  if (last >= f_.refs.size()) f_.refs.resize(last + 1, 0);
  const uint64_t max =
      std::min<uint64_t>(MaxRefcount(h().refcount_order), std::numeric_limits<uint32_t>::max());
  for (uint64_t k = first; k <= last; k++) {
    if (f_.refs[k] >= max) {
      Corruption(Fmt("ERROR: overflow cluster offset=%#" PRIx64, k << h().cluster_bits));
      continue;
    }
    f_.refs[k]++;
  }
  return true;
}

void Walker::PatchToZero(uint64_t entry_offset, uint64_t bitmap, bool compressed,
                         const std::string& what) {
  if (mode_ != RepairMode::kAll) return;
  if (h().extended_l2()) {
    // Allocated subclusters (all of a compressed cluster) become zero ones;
    // unallocated ones keep reading from the backing file.
    const uint64_t zero =
        compressed ? kAllSubclustersZero : ((bitmap | (bitmap << 32)) & kAllSubclustersZero);
    f_.patches.push_back({entry_offset, 0, what});
    f_.patches.push_back({entry_offset + 8, zero, what + " (subcluster bitmap)"});
  } else {
    // Version 2 has no zero flag: the cluster becomes unallocated.
    f_.patches.push_back({entry_offset, h().version >= 3 ? kOflagZero : 0, what});
  }
}

void Walker::Progress(uint64_t bytes) {
  done_ += bytes;
  if (!progress_) return;
  if (done_ >= total_ || done_ - last_reported_ >= std::max<uint64_t>(total_ / 1000, 1)) {
    last_reported_ = done_;
    progress_(std::min(done_, total_), total_);
  }
}

// The bytes of metadata the walk will read: L1 tables, one cluster per L2
// table reference, the refcount table and its blocks.
Status Walker::EstimateTotal() {
  auto l1_bytes = [&](uint64_t offset, uint32_t entries) -> uint64_t {
    std::vector<std::byte> raw(uint64_t{entries} * 8);
    if (!file_.ReadAt(offset, raw).ok()) return raw.size();
    uint64_t bytes = raw.size();
    for (uint32_t i = 0; i < entries; i++) {
      if (LoadBe64(raw.data() + 8 * i) & kL1OffsetMask) bytes += cs();
    }
    return bytes;
  };
  total_ = l1_bytes(h().l1_table_offset, h().l1_size);
  for (const auto& s : snapshots_) total_ += l1_bytes(s.l1_table_offset, s.l1_size);
  total_ += uint64_t{h().refcount_table_clusters} * cs();
  for (uint64_t e : f_.refcount_table) {
    if (e) total_ += cs();
  }
  return Status();
}

Status Walker::WalkL1(uint64_t l1_offset, uint32_t l1_size, bool active) {
  if (l1_size == 0) return Status();
  const uint64_t bytes = uint64_t{l1_size} * 8;
  Count(l1_offset, bytes);
  std::vector<std::byte> raw(bytes);
  if (Status s = file_.ReadAt(l1_offset, raw); !s.ok()) {
    CheckError("ERROR: I/O error reading the L1 table at " + Hex(l1_offset) + ": " + s.message());
    return Status();
  }
  Progress(bytes);
  for (uint32_t i = 0; i < l1_size; i++) {
    const uint64_t entry = LoadBe64(raw.data() + 8 * uint64_t{i});
    if (entry == 0) continue;
    if (entry & kL1ReservedMask) {
      Corruption(Fmt("ERROR found L1 entry with reserved bits set: %" PRIx64, entry));
    }
    const uint64_t l2_offset = entry & kL1OffsetMask;
    if (PastEnd(l2_offset, cs())) {
      Count(l2_offset, cs());  // reports it
      // The table reads as zeros (every cluster unallocated): so does an
      // L1 entry of 0.
      if (mode_ == RepairMode::kAll) {
        f_.patches.push_back({l1_offset + 8 * uint64_t{i}, 0,
                              Fmt("L1 entry %u: L2 table at %#" PRIx64
                                  " lies past the end of the file; entry cleared",
                                  i, l2_offset)});
      }
      Progress(cs());
      continue;
    }
    Count(l2_offset, cs());
    if (l2_offset % cs()) {
      Corruption(Fmt("ERROR l2_offset=%" PRIx64
                     ": Table is not cluster aligned; L1 entry corrupted",
                     l2_offset));
    }
    QCOW2FS_RETURN_IF_ERROR(WalkL2(l2_offset, active));
  }
  return Status();
}

Status Walker::WalkL2(uint64_t l2_offset, bool active) {
  const bool extended = h().extended_l2();
  const bool data_file = h().has_data_file();
  const uint64_t entry_bytes = h().l2_entry_bytes();
  std::vector<std::byte> table(cs());
  if (Status s = file_.ReadAt(l2_offset, table); !s.ok()) {
    CheckError("ERROR: I/O error reading the L2 table at " + Hex(l2_offset) + ": " + s.message());
    return Status();
  }
  Progress(cs());
  uint64_t next_contiguous = 0;
  for (uint64_t i = 0; i < h().l2_entries(); i++) {
    const uint64_t entry_offset = l2_offset + i * entry_bytes;
    uint64_t entry = LoadBe64(table.data() + i * entry_bytes);
    const uint64_t bitmap = extended ? LoadBe64(table.data() + i * entry_bytes + 8) : 0;
    const ClusterType type = ClassifyL2Entry(entry, extended, data_file);
    if (type != ClusterType::kCompressed && (entry & kL2StandardReservedMask)) {
      Corruption(Fmt("ERROR found l2 entry with reserved bits set: %" PRIx64, entry));
    }
    switch (type) {
      case ClusterType::kCompressed: {
        const uint32_t x = 62 - (h().cluster_bits - 8);
        if (entry & kOflagCopied) {
          Corruption(Fmt("ERROR: coffset=%#" PRIx64
                         ": copied flag must never be set for compressed clusters",
                         entry & ((uint64_t{1} << x) - 1)));
          entry &= ~kOflagCopied;
          if (mode_ == RepairMode::kAll) {
            f_.patches.push_back(
                {entry_offset, entry,
                 "compressed L2 entry at " + Hex(entry_offset) + ": copied flag cleared"});
          }
        }
        if (data_file) {
          Corruption(Fmt("ERROR compressed cluster %" PRIu64 " with data file, entry=%#" PRIx64, i,
                         entry));
          break;
        }
        if (bitmap) {
          Corruption(Fmt("ERROR compressed cluster %" PRIu64
                         " with non-zero subcluster allocation bitmap, entry=%#" PRIx64,
                         i, entry));
          break;
        }
        const CompressedDescriptor d = DecodeCompressed(entry, h().cluster_bits);
        if (!Count(d.host_offset, d.max_bytes)) {
          PatchToZero(entry_offset, bitmap, true,
                      "L2 entry at " + Hex(entry_offset) +
                          ": compressed data past the end of the file now reads as zeros");
        }
        if (active) {
          report_.allocated_clusters++;
          report_.compressed_clusters++;
          // A compressed cluster shares sectors with its neighbours: each
          // is read on its own, so each counts as a fragment.
          report_.fragmented_clusters++;
        }
        break;
      }
      case ClusterType::kZeroAlloc:
      case ClusterType::kNormal: {
        const uint64_t offset = entry & kL2OffsetMask;
        if ((bitmap >> 32) & bitmap) {
          Corruption(Fmt("ERROR offset=%" PRIx64
                         ": Allocated cluster has corrupted subcluster allocation bitmap",
                         offset));
        }
        if (offset % cs()) {
          const bool holds_data =
              extended ? (bitmap & kAllSubclustersAllocated) != 0 : !(entry & kOflagZero);
          if (!holds_data) {
            Corruption(Fmt("%s offset=%" PRIx64
                           ": Preallocated cluster is not properly aligned; L2 entry "
                           "corrupted.",
                           mode_ == RepairMode::kAll ? "Repairing" : "ERROR", offset));
            if (mode_ == RepairMode::kAll) {
              // A preallocated zero cluster loses its preallocation; it
              // still reads as zeros, and its cluster is not counted.
              PatchToZero(entry_offset, bitmap, false,
                          "L2 entry at " + Hex(entry_offset) + ": unaligned preallocation dropped");
              continue;
            }
          } else {
            Corruption(Fmt("ERROR offset=%" PRIx64
                           ": Data cluster is not properly aligned; L2 entry corrupted.",
                           offset));
          }
        }
        if (active) {
          report_.allocated_clusters++;
          if (next_contiguous && offset != next_contiguous) report_.fragmented_clusters++;
          next_contiguous = offset + cs();
        }
        if (!data_file && !Count(offset, cs())) {
          PatchToZero(entry_offset, bitmap, false,
                      "L2 entry at " + Hex(entry_offset) +
                          ": cluster past the end of the file now reads as zeros");
        }
        break;
      }
      case ClusterType::kZeroPlain:
        break;
      case ClusterType::kUnallocated:
        if (bitmap & kAllSubclustersAllocated) {
          Corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map");
        }
        break;
    }
  }
  return Status();
}

Status Walker::WalkSnapshots() {
  for (const auto& s : snapshots_) {
    QCOW2FS_RETURN_IF_ERROR(WalkL1(s.l1_table_offset, s.l1_size, false));
  }
  Count(h().snapshots_offset, snapshot_table_bytes_);
  return Status();
}

// Persistent bitmaps (spec "Bitmaps extension"): counted only while the
// autoclear bit says they are valid; otherwise QEMU ignores them too and
// their clusters are leaks.
Status Walker::WalkBitmaps() {
  if (!(h().autoclear_features & kAutoclearBitmaps)) return Status();
  const HeaderExtension* ext = nullptr;
  for (const auto& e : h().extensions) {
    if (e.type == kExtBitmaps) ext = &e;
  }
  if (!ext) return Status();
  if (ext->data.size() < 24) {
    CheckError("ERROR the bitmaps extension is shorter than 24 bytes");
    return Status();
  }
  const uint32_t count = LoadBe32(ext->data.data());
  const uint64_t dir_bytes = LoadBe64(ext->data.data() + 8);
  const uint64_t dir_offset = LoadBe64(ext->data.data() + 16);
  if (count == 0) return Status();
  if (count > kMaxBitmaps || dir_bytes > kMaxBitmapDirectoryBytes ||
      dir_bytes < count * kBitmapDirectoryEntryFixedBytes || dir_offset % cs() ||
      PastEnd(dir_offset, dir_bytes)) {
    CheckError(Fmt("ERROR bitmap directory at %#" PRIx64 " (%" PRIu64
                   " bytes, %u bitmaps) is invalid",
                   dir_offset, dir_bytes, count));
    return Status();
  }
  Count(dir_offset, dir_bytes);
  std::vector<std::byte> dir(dir_bytes);
  if (Status s = file_.ReadAt(dir_offset, dir); !s.ok()) {
    CheckError("ERROR: I/O error reading the bitmap directory: " + s.message());
    return Status();
  }
  uint64_t pos = 0;
  for (uint32_t b = 0; b < count; b++) {
    if (dir_bytes - pos < kBitmapDirectoryEntryFixedBytes) {
      CheckError("ERROR bitmap directory entry " + std::to_string(b) +
                 " runs past the end of the directory");
      return Status();
    }
    const std::byte* p = dir.data() + pos;
    const uint64_t table_offset = LoadBe64(p);
    const uint32_t table_entries = LoadBe32(p + 8);
    const uint16_t name_bytes = LoadBe16(p + 18);
    const uint32_t extra_bytes = LoadBe32(p + 20);
    pos += AlignUp(kBitmapDirectoryEntryFixedBytes + uint64_t{extra_bytes} + name_bytes, 8);
    if (pos > dir_bytes) {
      CheckError("ERROR bitmap directory entry " + std::to_string(b) +
                 " runs past the end of the directory");
      return Status();
    }
    if (table_entries > kMaxBitmapTableEntries || table_offset % cs() ||
        PastEnd(table_offset, uint64_t{table_entries} * 8)) {
      CheckError(Fmt("ERROR bitmap %u: table at %#" PRIx64 " (%u entries) is invalid", b,
                     table_offset, table_entries));
      continue;
    }
    Count(table_offset, uint64_t{table_entries} * 8);
    std::vector<std::byte> table(uint64_t{table_entries} * 8);
    if (Status s = file_.ReadAt(table_offset, table); !s.ok()) {
      CheckError("ERROR: I/O error reading a bitmap table: " + s.message());
      continue;
    }
    for (uint32_t i = 0; i < table_entries; i++) {
      const uint64_t offset = LoadBe64(table.data() + 8 * uint64_t{i}) & kBitmapTableOffsetMask;
      if (offset == 0) continue;
      if (offset % cs()) {
        Corruption(Fmt("ERROR bitmap %u table entry %u: offset %#" PRIx64 " is not cluster aligned",
                       b, i, offset));
      }
      // No repair rewrites bitmap tables: whatever they name must stay
      // clear of new structures, even past the end of the file.
      Reserve(offset, cs());
      Count(offset, cs());
    }
  }
  return Status();
}

Status Walker::WalkRefcountBlocks() {
  const uint64_t cluster_count = f_.refs.size();
  for (uint64_t i = 0; i < f_.refcount_table.size(); i++) {
    const uint64_t entry = f_.refcount_table[i];
    const uint64_t offset = entry & kRefcountTableOffsetMask;
    if (entry & kRefcountTableReservedMask) {
      Corruption(Fmt("ERROR refcount table entry %" PRIu64 " has reserved bits set", i));
      f_.rebuild = true;
      continue;
    }
    if (offset % cs()) {
      Corruption(Fmt("ERROR refcount block %" PRIu64
                     " is not cluster aligned; refcount table entry corrupted",
                     i));
      f_.rebuild = true;
      continue;
    }
    if ((offset >> h().cluster_bits) >= cluster_count) {
      Corruption(Fmt("ERROR refcount block %" PRIu64 " is outside image", i));
      f_.rebuild = true;
      continue;
    }
    if (offset == 0) continue;
    Count(offset, cs());
    Progress(cs());
    const uint64_t cluster = offset >> h().cluster_bits;
    f_.old_refcount_clusters.push_back(cluster);
    if (f_.refs[cluster] != 1) {
      Corruption(Fmt("ERROR refcount block %" PRIu64 " refcount=%" PRIu32, i, f_.refs[cluster]));
      f_.rebuild = true;
    }
  }
  return Status();
}

Status Walker::Compare() {
  StoredRefcounts stored(file_, h(), f_.refcount_table);
  uint64_t highest = 0;
  for (uint64_t i = 0; i < f_.refs.size(); i++) {
    auto r = stored.Get(i);
    if (!r.ok()) {
      report_.check_errors++;
      f_.complete = false;
      report_.messages.push_back(Fmt("Can't get refcount for cluster %" PRIu64 ": ", i) +
                                 r.status().message());
      continue;
    }
    const uint64_t refcount = *r;
    const uint64_t references = f_.refs[i];
    if (refcount || references) highest = i;
    if (refcount == references) continue;
    // A cluster in use that counts as free could be handed out again:
    // only a new refcount structure is trusted to cover it.
    if (refcount == 0) f_.rebuild = true;
    report_.messages.push_back(Fmt("%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
                                   refcount < references ? "ERROR" : "Leaked", i, refcount,
                                   references));
    if (refcount < references) {
      report_.corruptions++;
    } else {
      report_.leaks++;
    }
    f_.mismatches.push_back({i, refcount, references});
  }
  report_.image_end_offset = (highest + 1) * cs();
  return Status();
}

Status Walker::Run() {
  QCOW2FS_ASSIGN_OR_RETURN(f_.file_size, file_.Size());
  std::vector<std::byte> first(
      std::min<uint64_t>(f_.file_size, uint64_t{1} << limits::kMaxClusterBits));
  QCOW2FS_RETURN_IF_ERROR(file_.ReadAt(0, first));
  QCOW2FS_ASSIGN_OR_RETURN(f_.header, DecodeHeader(first, f_.file_size));
  report_.total_clusters = (h().size + cs() - 1) / cs();
  f_.refs.assign((f_.file_size + cs() - 1) / cs(), 0);

  std::vector<std::byte> table(uint64_t{h().refcount_table_clusters} * cs());
  QCOW2FS_RETURN_IF_ERROR(
      file_.ReadAt(h().refcount_table_offset, table).Annotate("reading the refcount table"));
  f_.refcount_table.resize(table.size() / 8);
  for (size_t i = 0; i < f_.refcount_table.size(); i++) {
    f_.refcount_table[i] = LoadBe64(table.data() + 8 * i);
  }

  if (h().nb_snapshots > 0) {
    auto read = [this](uint64_t off, std::span<std::byte> buf) { return file_.ReadAt(off, buf); };
    auto snapshots = ReadSnapshotTable(h(), f_.file_size, read);
    if (snapshots.ok()) {
      snapshots_ = std::move(snapshots).value();
      for (const auto& s : snapshots_) {
        snapshot_table_bytes_ += AlignUp(40 + s.extra_data.size() + s.id.size() + s.name.size(), 8);
      }
    } else {
      snapshots_ok_ = false;
      CheckError("ERROR reading the snapshot table: " + snapshots.status().message());
    }
  }
  QCOW2FS_RETURN_IF_ERROR(EstimateTotal());

  // In QEMU's order, so messages come out in the same sequence.
  Count(0, cs());
  QCOW2FS_RETURN_IF_ERROR(WalkL1(h().l1_table_offset, h().l1_size, true));
  if (snapshots_ok_) QCOW2FS_RETURN_IF_ERROR(WalkSnapshots());
  const uint64_t table_bytes = uint64_t{h().refcount_table_clusters} * cs();
  if (Count(h().refcount_table_offset, table_bytes)) {
    for (uint64_t c = 0; c < h().refcount_table_clusters; c++) {
      f_.old_refcount_clusters.push_back((h().refcount_table_offset >> h().cluster_bits) + c);
    }
  }
  Progress(table_bytes);
  QCOW2FS_RETURN_IF_ERROR(WalkBitmaps());
  QCOW2FS_RETURN_IF_ERROR(WalkRefcountBlocks());
  QCOW2FS_RETURN_IF_ERROR(Compare());
  if (progress_) progress_(total_, total_);
  return Status();
}

}  // namespace

StoredRefcounts::StoredRefcounts(File& file, const Header& header, std::vector<uint64_t> table)
    : file_(file),
      cluster_size_(header.cluster_size()),
      order_(header.refcount_order),
      block_entries_(header.cluster_size() * 8 >> header.refcount_order),
      table_(std::move(table)) {}

uint64_t StoredRefcounts::BlockOffset(uint64_t index) const {
  if (index >= table_.size()) return 0;
  const uint64_t entry = table_[index];
  if ((entry & ~kRefcountTableOffsetMask) || entry % cluster_size_ ||
      entry > limits::kMaxHostOffset) {
    return 0;
  }
  return entry;
}

Result<uint64_t> StoredRefcounts::Get(uint64_t cluster) {
  const uint64_t index = cluster / block_entries_;
  const uint64_t offset = BlockOffset(index);
  if (offset == 0) return uint64_t{0};
  auto it = cache_.find(index);
  if (it == cache_.end()) {
    // The walks go mostly in cluster order: a few blocks are plenty.
    if (cache_.size() >= 64) cache_.clear();
    std::vector<std::byte> block(cluster_size_);
    QCOW2FS_RETURN_IF_ERROR(file_.ReadAt(offset, block));
    it = cache_.emplace(index, std::move(block)).first;
  }
  return GetRefcountEntry(it->second.data(), order_, cluster % block_entries_);
}

Result<Findings> WalkImage(File& file, RepairMode mode, const ProgressFn& progress,
                           CheckReport& report) {
  Findings f;
  Walker walker(file, mode, progress, report, f);
  QCOW2FS_RETURN_IF_ERROR(walker.Run());
  return f;
}

}  // namespace qcow2fs::check
