// Decoding, validation and encoding of the qcow2 header and extensions.
#include "format/header.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include "format/endian.h"
#include "format/hex.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

Status Corrupt(const std::string& what) {
  return Status(ErrorCode::kCorrupt, "qcow2 header: " + what);
}

uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// A table of `bytes` at `offset` must be cluster aligned, must not overlap
// the header cluster, and must lie inside the file.
Status CheckTable(const char* name, uint64_t offset, uint64_t bytes, uint64_t cluster_size,
                  uint64_t file_size) {
  if (bytes == 0) return Status();
  if (offset % cluster_size != 0) {
    return Corrupt(std::string(name) + " offset " + Hex(offset) + " is not cluster aligned");
  }
  if (offset == 0) {
    return Corrupt(std::string(name) + " overlaps the header at offset 0");
  }
  if (offset > limits::kMaxHostOffset || bytes > file_size || offset > file_size - bytes) {
    return Corrupt(std::string(name) + " at " + Hex(offset) + " (" + std::to_string(bytes) +
                   " bytes) lies past the end of the " + std::to_string(file_size) + "-byte file");
  }
  return Status();
}

Status DecodeExtensions(std::span<const std::byte> area, Header& h) {
  size_t pos = 0;
  bool seen_backing_format = false, seen_data_file = false, seen_features = false;
  while (true) {
    if (area.size() - pos < 8) {
      // The area ended without an end marker: QEMU accepts that when the
      // extensions exactly fill the space.
      if (pos == area.size()) return Status();
      return Corrupt("header extension at byte " + std::to_string(pos) +
                     " runs past the end of the extension area");
    }
    uint32_t type = LoadBe32(area.data() + pos);
    uint32_t len = LoadBe32(area.data() + pos + 4);
    pos += 8;
    if (type == kExtEnd) return Status();
    if (len > area.size() - pos) {
      return Corrupt("header extension " + Hex(type) + " of " + std::to_string(len) +
                     " bytes runs past the end of the extension area");
    }
    auto data = area.subspan(pos, len);
    std::string text(reinterpret_cast<const char*>(data.data()), data.size());
    switch (type) {
      case kExtBackingFormat:
        if (seen_backing_format) return Corrupt("two backing format extensions");
        seen_backing_format = true;
        h.backing_format = text;
        break;
      case kExtDataFile:
        if (seen_data_file) return Corrupt("two data file name extensions");
        seen_data_file = true;
        h.data_file = text;
        break;
      case kExtFeatureTable: {
        if (seen_features) return Corrupt("two feature name tables");
        seen_features = true;
        for (size_t i = 0; i + 48 <= data.size(); i += 48) {
          FeatureName f;
          f.type = static_cast<uint8_t>(data[i]);
          f.bit = static_cast<uint8_t>(data[i + 1]);
          const char* name = reinterpret_cast<const char*>(data.data() + i + 2);
          f.name.assign(name, strnlen(name, 46));
          h.feature_names.push_back(std::move(f));
        }
        break;
      }
      default:
        break;  // bitmaps, encryption pointer, unknown: kept verbatim below
    }
    h.extensions.push_back(HeaderExtension{type, std::vector<std::byte>(data.begin(), data.end())});
    pos += AlignUp(len, 8);
    if (pos > area.size()) pos = area.size();
  }
}

}  // namespace

std::string IncompatibleFeatureName(const Header& header, int bit) {
  static const char* const kKnown[] = {"dirty bit", "corrupt bit", "external data file",
                                       "compression type", "extended L2 entries"};
  for (const auto& f : header.feature_names) {
    if (f.type == 0 && f.bit == bit && !f.name.empty()) return f.name;
  }
  if (bit >= 0 && bit < 5) return kKnown[bit];
  return "unknown incompatible feature bit " + std::to_string(bit);
}

Result<Header> DecodeHeader(std::span<const std::byte> b, uint64_t file_size) {
  if (b.size() < kHeaderV2Length) {
    return Status(ErrorCode::kCorrupt, "not a qcow2 image: file is shorter than a qcow2 header");
  }
  const std::byte* p = b.data();
  if (LoadBe32(p + header_field::kMagic) != kQcow2Magic) {
    return Status(ErrorCode::kInvalidArgument, "not a qcow2 image: bad magic number");
  }
  Header h;
  h.version = LoadBe32(p + header_field::kVersion);
  if (h.version != 2 && h.version != 3) {
    return Status(ErrorCode::kUnsupported, "qcow2 version " + std::to_string(h.version) +
                                               " is not supported (only 2 and 3)");
  }
  h.backing_file_offset = LoadBe64(p + header_field::kBackingFileOffset);
  h.backing_file_size = LoadBe32(p + header_field::kBackingFileSize);
  h.cluster_bits = LoadBe32(p + header_field::kClusterBits);
  h.size = LoadBe64(p + header_field::kSize);
  h.crypt_method = LoadBe32(p + header_field::kCryptMethod);
  h.l1_size = LoadBe32(p + header_field::kL1Size);
  h.l1_table_offset = LoadBe64(p + header_field::kL1TableOffset);
  h.refcount_table_offset = LoadBe64(p + header_field::kRefcountTableOffset);
  h.refcount_table_clusters = LoadBe32(p + header_field::kRefcountTableClusters);
  h.nb_snapshots = LoadBe32(p + header_field::kNbSnapshots);
  h.snapshots_offset = LoadBe64(p + header_field::kSnapshotsOffset);

  if (h.cluster_bits < limits::kMinClusterBits || h.cluster_bits > limits::kMaxClusterBits) {
    return Corrupt("cluster_bits " + std::to_string(h.cluster_bits) + " is outside " +
                   std::to_string(limits::kMinClusterBits) + ".." +
                   std::to_string(limits::kMaxClusterBits) + " (512 B to 2 MiB clusters)");
  }
  const uint64_t cs = h.cluster_size();

  if (h.version == 2) {
    h.header_length = kHeaderV2Length;
    h.refcount_order = 4;
  } else {
    if (b.size() < kHeaderV3MinLength) {
      return Corrupt("file too short for a version 3 header");
    }
    h.incompatible_features = LoadBe64(p + header_field::kIncompatibleFeatures);
    h.compatible_features = LoadBe64(p + header_field::kCompatibleFeatures);
    h.autoclear_features = LoadBe64(p + header_field::kAutoclearFeatures);
    h.refcount_order = LoadBe32(p + header_field::kRefcountOrder);
    h.header_length = LoadBe32(p + header_field::kHeaderLength);
    if (h.header_length < kHeaderV3MinLength || h.header_length % 8 != 0 || h.header_length > cs ||
        h.header_length > b.size()) {
      return Corrupt("header_length " + std::to_string(h.header_length) +
                     " must be a multiple of 8 between " + std::to_string(kHeaderV3MinLength) +
                     " and the cluster size");
    }
    if (h.header_length > header_field::kCompressionType) {
      h.compression_type = static_cast<uint8_t>(p[header_field::kCompressionType]);
    }
    if (h.header_length > kHeaderV3Length) {
      h.unknown_fields.assign(p + kHeaderV3Length, p + h.header_length);
    }
  }

  if (h.crypt_method != 0) {
    return Status(ErrorCode::kUnsupported, std::string("image uses encryption (") +
                                               (h.crypt_method == 1   ? "AES"
                                                : h.crypt_method == 2 ? "LUKS"
                                                                      : "unknown method") +
                                               "), which qcow2fs does not support");
  }
  if (uint64_t unknown = h.incompatible_features & ~kIncompatKnown) {
    int bit = __builtin_ctzll(unknown);
    return Status(ErrorCode::kUnsupported, "image uses an unsupported incompatible feature: " +
                                               IncompatibleFeatureName(h, bit) + " (bit " +
                                               std::to_string(bit) + ")");
  }
  if (h.refcount_order > 6) {
    return Corrupt("refcount_order " + std::to_string(h.refcount_order) +
                   " exceeds 6 (64-bit refcounts)");
  }
  if (h.incompatible_features & kIncompatCompression) {
    if (h.header_length <= header_field::kCompressionType || h.compression_type == 0) {
      return Corrupt("compression type bit set but compression_type is zlib");
    }
  } else if (h.compression_type != 0) {
    return Corrupt("compression_type " + std::to_string(h.compression_type) +
                   " set without the compression type feature bit");
  }
  if (h.compression_type > 1) {
    return Status(ErrorCode::kUnsupported,
                  "unknown compression type " + std::to_string(h.compression_type));
  }
  if (h.extended_l2() && h.cluster_bits < limits::kMinClusterBitsExtendedL2) {
    return Corrupt("extended L2 entries need clusters of at least 16 KiB");
  }
  if (h.size > limits::kMaxVirtualSize) {
    return Corrupt("virtual size " + std::to_string(h.size) + " is too large");
  }

  // L1 table: big enough for the disk, small enough to be sane.
  if (uint64_t{h.l1_size} * 8 > limits::kMaxL1Bytes) {
    return Corrupt("L1 table of " + std::to_string(h.l1_size) + " entries exceeds the " +
                   std::to_string(limits::kMaxL1Bytes >> 20) + " MiB limit");
  }
  if (h.l1_size < h.l1_entries_for(h.size)) {
    return Corrupt("L1 table of " + std::to_string(h.l1_size) +
                   " entries is too small for the virtual size " + std::to_string(h.size));
  }
  QCOW2FS_RETURN_IF_ERROR(
      CheckTable("L1 table", h.l1_table_offset, uint64_t{h.l1_size} * 8, cs, file_size));

  // Refcount table.
  if (uint64_t{h.refcount_table_clusters} * cs > limits::kMaxRefcountTableBytes) {
    return Corrupt("refcount table of " + std::to_string(h.refcount_table_clusters) +
                   " clusters exceeds the " + std::to_string(limits::kMaxRefcountTableBytes >> 20) +
                   " MiB limit");
  }
  if (h.refcount_table_clusters == 0) {
    return Corrupt("refcount table has no clusters");
  }
  QCOW2FS_RETURN_IF_ERROR(CheckTable("refcount table", h.refcount_table_offset,
                                     uint64_t{h.refcount_table_clusters} * cs, cs, file_size));

  // Snapshot table location; entries are decoded by snapshot_table.cc.
  if (h.nb_snapshots > limits::kMaxSnapshots) {
    return Corrupt(std::to_string(h.nb_snapshots) + " snapshots exceed the limit of " +
                   std::to_string(limits::kMaxSnapshots));
  }
  if (h.nb_snapshots > 0) {
    // Each entry is at least 40 bytes.
    QCOW2FS_RETURN_IF_ERROR(CheckTable("snapshot table", h.snapshots_offset,
                                       uint64_t{h.nb_snapshots} * 40, cs, file_size));
  }

  // The extension area runs from the end of the header to the backing file
  // name, or to the end of the first cluster.
  uint64_t area_end = std::min<uint64_t>(cs, b.size());
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > limits::kMaxBackingFileNameBytes) {
      return Corrupt("backing file name of " + std::to_string(h.backing_file_size) +
                     " bytes exceeds " + std::to_string(limits::kMaxBackingFileNameBytes) +
                     " bytes");
    }
    if (h.backing_file_offset < h.header_length || h.backing_file_offset > b.size() ||
        h.backing_file_size > b.size() - h.backing_file_offset ||
        h.backing_file_offset + h.backing_file_size > cs) {
      return Corrupt("backing file name at " + Hex(h.backing_file_offset) +
                     " lies outside the first cluster");
    }
    h.backing_file.assign(reinterpret_cast<const char*>(p + h.backing_file_offset),
                          h.backing_file_size);
    area_end = std::min(area_end, h.backing_file_offset);
  }
  QCOW2FS_RETURN_IF_ERROR(
      DecodeExtensions(b.subspan(h.header_length, area_end - h.header_length), h));

  if (h.has_data_file() && h.nb_snapshots != 0) {
    return Corrupt("images with an external data file cannot have snapshots");
  }
  if (!h.has_data_file()) h.data_file.clear();
  return h;
}

Result<std::vector<std::byte>> EncodeHeader(const Header& h) {
  const uint64_t cs = h.cluster_size();
  std::vector<std::byte> out(cs);
  std::byte* p = out.data();
  const uint32_t header_length =
      h.version == 2 ? kHeaderV2Length : std::max<uint32_t>(h.header_length, kHeaderV3Length);
  StoreBe32(p + header_field::kMagic, kQcow2Magic);
  StoreBe32(p + header_field::kVersion, h.version);
  StoreBe32(p + header_field::kClusterBits, h.cluster_bits);
  StoreBe64(p + header_field::kSize, h.size);
  StoreBe32(p + header_field::kCryptMethod, h.crypt_method);
  StoreBe32(p + header_field::kL1Size, h.l1_size);
  StoreBe64(p + header_field::kL1TableOffset, h.l1_table_offset);
  StoreBe64(p + header_field::kRefcountTableOffset, h.refcount_table_offset);
  StoreBe32(p + header_field::kRefcountTableClusters, h.refcount_table_clusters);
  StoreBe32(p + header_field::kNbSnapshots, h.nb_snapshots);
  StoreBe64(p + header_field::kSnapshotsOffset, h.snapshots_offset);
  if (h.version >= 3) {
    StoreBe64(p + header_field::kIncompatibleFeatures, h.incompatible_features);
    StoreBe64(p + header_field::kCompatibleFeatures, h.compatible_features);
    StoreBe64(p + header_field::kAutoclearFeatures, h.autoclear_features);
    StoreBe32(p + header_field::kRefcountOrder, h.refcount_order);
    StoreBe32(p + header_field::kHeaderLength, header_length);
    p[header_field::kCompressionType] = static_cast<std::byte>(h.compression_type);
    if (!h.unknown_fields.empty()) {
      if (kHeaderV3Length + h.unknown_fields.size() > cs) {
        return Status(ErrorCode::kInvalidArgument, "header does not fit");
      }
      std::copy(h.unknown_fields.begin(), h.unknown_fields.end(), p + kHeaderV3Length);
    }
  }
  uint64_t pos = header_length;
  auto put = [&](uint32_t type, std::span<const std::byte> data) -> bool {
    uint64_t need = 8 + AlignUp(data.size(), 8);
    if (pos + need > cs) return false;
    StoreBe32(p + pos, type);
    StoreBe32(p + pos + 4, static_cast<uint32_t>(data.size()));
    std::copy(data.begin(), data.end(), p + pos + 8);
    pos += need;
    return true;
  };
  for (const auto& ext : h.extensions) {
    if (!put(ext.type, ext.data)) {
      return Status(ErrorCode::kInvalidArgument,
                    "header extensions do not fit in the first cluster");
    }
  }
  if (!put(kExtEnd, {})) {
    return Status(ErrorCode::kInvalidArgument, "header extensions do not fit in the first cluster");
  }
  if (!h.backing_file.empty()) {
    if (h.backing_file.size() > limits::kMaxBackingFileNameBytes ||
        pos + h.backing_file.size() > cs) {
      return Status(ErrorCode::kInvalidArgument,
                    "backing file name does not fit in the first cluster");
    }
    StoreBe64(p + header_field::kBackingFileOffset, pos);
    StoreBe32(p + header_field::kBackingFileSize, static_cast<uint32_t>(h.backing_file.size()));
    std::copy_n(reinterpret_cast<const std::byte*>(h.backing_file.data()), h.backing_file.size(),
                p + pos);
  }
  return out;
}

}  // namespace qcow2fs
