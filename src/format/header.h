// The qcow2 header and its extensions (spec sections "Header" and "Header
// extensions"): decoding with full validation, and encoding for the writer.
//
// Pure functions over bytes; nothing here touches a file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "qcow2fs/status.h"

namespace qcow2fs {

inline constexpr uint32_t kQcow2Magic = 0x514649fb;  // "QFI\xfb"
inline constexpr uint32_t kHeaderV2Length = 72;
inline constexpr uint32_t kHeaderV3MinLength = 104;
// Bytes of header a v3 image written by us carries (through the
// compression_type byte plus padding).
inline constexpr uint32_t kHeaderV3Length = 112;

// Byte offsets of the header fields (spec "Header"), shared by decoding
// and encoding. Fields from kIncompatibleFeatures on exist in version 3.
namespace header_field {
inline constexpr size_t kMagic = 0;
inline constexpr size_t kVersion = 4;
inline constexpr size_t kBackingFileOffset = 8;
inline constexpr size_t kBackingFileSize = 16;
inline constexpr size_t kClusterBits = 20;
inline constexpr size_t kSize = 24;
inline constexpr size_t kCryptMethod = 32;
inline constexpr size_t kL1Size = 36;
inline constexpr size_t kL1TableOffset = 40;
inline constexpr size_t kRefcountTableOffset = 48;
inline constexpr size_t kRefcountTableClusters = 56;
inline constexpr size_t kNbSnapshots = 60;
inline constexpr size_t kSnapshotsOffset = 64;
inline constexpr size_t kIncompatibleFeatures = 72;
inline constexpr size_t kCompatibleFeatures = 80;
inline constexpr size_t kAutoclearFeatures = 88;
inline constexpr size_t kRefcountOrder = 96;
inline constexpr size_t kHeaderLength = 100;
inline constexpr size_t kCompressionType = 104;  // one byte, when header_length > 104
}  // namespace header_field

// incompatible_features bits.
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = (1ull << 5) - 1;
// compatible_features bits.
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// autoclear_features bits.
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
inline constexpr uint64_t kAutoclearKnown = kAutoclearDataFileRaw;

// Header extension types.
inline constexpr uint32_t kExtEnd = 0x00000000;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtEncryption = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;

struct HeaderExtension {
  uint32_t type = 0;
  std::vector<std::byte> data;
};

struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible_features = 0;
  uint64_t compatible_features = 0;
  uint64_t autoclear_features = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kHeaderV3Length;
  uint8_t compression_type = 0;
  // Bytes of additional header fields we do not know (header_length beyond
  // the compression_type field), preserved when the header is rewritten.
  std::vector<std::byte> unknown_fields;

  // Decoded from extensions and the backing name area.
  std::string backing_file;
  std::string backing_format;
  std::string data_file;
  std::vector<FeatureName> feature_names;
  // Every extension except the end marker, in on-disk order, so the writer
  // can preserve the ones it does not interpret.
  std::vector<HeaderExtension> extensions;

  uint64_t cluster_size() const { return 1ull << cluster_bits; }
  bool extended_l2() const { return incompatible_features & kIncompatExtendedL2; }
  bool has_data_file() const { return incompatible_features & kIncompatDataFile; }
  bool data_file_raw() const { return autoclear_features & kAutoclearDataFileRaw; }
  uint32_t refcount_bits() const { return 1u << refcount_order; }
  // Bytes per L2 entry: 8, or 16 with extended L2 entries.
  uint32_t l2_entry_bytes() const { return extended_l2() ? 16 : 8; }
  uint64_t l2_entries() const { return cluster_size() / l2_entry_bytes(); }
  // Guest bytes mapped by one L2 table.
  uint64_t l2_coverage() const { return l2_entries() * cluster_size(); }
  // L1 entries needed to map `virtual_size` bytes.
  uint64_t l1_entries_for(uint64_t virtual_size) const {
    return (virtual_size + l2_coverage() - 1) / l2_coverage();
  }
};

// Decodes and validates the header in `first_cluster_bytes` (the image's
// first bytes: at least the header, ideally the whole first cluster) of an
// image whose file is `file_size` bytes long. Structural errors are
// kCorrupt; unknown incompatible features and encryption are kUnsupported
// with a message naming the feature.
Result<Header> DecodeHeader(std::span<const std::byte> first_bytes, uint64_t file_size);

// Encodes the header, its extensions and the backing file name into a
// buffer of one cluster. Fails if they do not fit.
Result<std::vector<std::byte>> EncodeHeader(const Header& header);

// Human name of an incompatible feature bit, from the image's feature name
// table when it has one.
std::string IncompatibleFeatureName(const Header& header, int bit);

}  // namespace qcow2fs
