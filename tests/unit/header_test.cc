// Unit tests of format/header: encode/decode round trips, and one-field
// mutations of a valid header, each expecting one specific error (crosvm's
// style). Pure byte arrays; no file, no QEMU.
#include "format/header.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "format/endian.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

// Field offsets from the spec's "Header" section, written out here on
// purpose: the test checks the code against the spec, not against itself.
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffBackingFileOffset = 8;
constexpr size_t kOffBackingFileSize = 16;
constexpr size_t kOffClusterBits = 20;
constexpr size_t kOffSize = 24;
constexpr size_t kOffCryptMethod = 32;
constexpr size_t kOffL1Size = 36;
constexpr size_t kOffL1TableOffset = 40;
constexpr size_t kOffRefcountTableOffset = 48;
constexpr size_t kOffRefcountTableClusters = 56;
constexpr size_t kOffNbSnapshots = 60;
constexpr size_t kOffSnapshotsOffset = 64;
constexpr size_t kOffIncompatible = 72;
constexpr size_t kOffCompatible = 80;
constexpr size_t kOffAutoclear = 88;
constexpr size_t kOffRefcountOrder = 96;
constexpr size_t kOffHeaderLength = 100;
constexpr size_t kOffCompressionType = 104;

constexpr uint64_t kCluster = 64 * 1024;
constexpr uint64_t kFileSize = 64 * kCluster;

// A valid v3 image header: 1 GiB disk, 64 KiB clusters, refcount table in
// cluster 1, L1 table in cluster 3, a 4 MiB file.
Header ValidHeader() {
  Header h;
  h.version = 3;
  h.cluster_bits = 16;
  h.size = 1ull << 30;
  h.l1_size = 2;  // 512 MiB per L2 table
  h.l1_table_offset = 3 * kCluster;
  h.refcount_table_offset = kCluster;
  h.refcount_table_clusters = 1;
  h.refcount_order = 4;
  h.header_length = kHeaderV3Length;
  return h;
}

std::vector<std::byte> Encode(const Header& h) {
  auto bytes = EncodeHeader(h);
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  return bytes.ok() ? std::move(bytes).value() : std::vector<std::byte>{};
}

std::vector<std::byte> ValidBytes() { return Encode(ValidHeader()); }

std::span<const std::byte> Bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Expects `bytes` to be refused with `code` and a message containing `text`.
::testing::AssertionResult Refused(const std::vector<std::byte>& bytes, ErrorCode code,
                                   const std::string& text, uint64_t file_size = kFileSize) {
  Result<Header> r = DecodeHeader(bytes, file_size);
  if (r.ok()) return ::testing::AssertionFailure() << "decoded; expected " << text;
  if (r.status().code() != code || r.status().message().find(text) == std::string::npos) {
    return ::testing::AssertionFailure() << "got " << r.status().ToString() << "; expected "
                                         << ErrorCodeName(code) << " with '" << text << "'";
  }
  return ::testing::AssertionSuccess();
}

TEST(HeaderRoundTrip, ValidV3HeaderDecodesToWhatWasEncoded) {
  const Header in = ValidHeader();
  const std::vector<std::byte> bytes = Encode(in);
  ASSERT_EQ(bytes.size(), kCluster);
  EXPECT_EQ(LoadBe32(bytes.data() + kOffMagic), kQcow2Magic);
  EXPECT_EQ(LoadBe32(bytes.data() + kOffHeaderLength), kHeaderV3Length);
  Result<Header> out = DecodeHeader(bytes, kFileSize);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->version, 3u);
  EXPECT_EQ(out->cluster_bits, 16u);
  EXPECT_EQ(out->size, in.size);
  EXPECT_EQ(out->l1_size, in.l1_size);
  EXPECT_EQ(out->l1_table_offset, in.l1_table_offset);
  EXPECT_EQ(out->refcount_table_offset, in.refcount_table_offset);
  EXPECT_EQ(out->refcount_table_clusters, in.refcount_table_clusters);
  EXPECT_EQ(out->refcount_order, 4u);
  EXPECT_EQ(out->header_length, kHeaderV3Length);
  EXPECT_EQ(out->compression_type, 0);
  EXPECT_TRUE(out->extensions.empty());
  EXPECT_TRUE(out->backing_file.empty());
  // Re-encoding what was decoded gives the same bytes.
  EXPECT_EQ(Encode(*out), bytes);
}

TEST(HeaderRoundTrip, DerivedSizesFollowTheFields) {
  Header h = ValidHeader();
  EXPECT_EQ(h.cluster_size(), kCluster);
  EXPECT_EQ(h.l2_entry_bytes(), 8u);
  EXPECT_EQ(h.l2_entries(), 8192u);
  EXPECT_EQ(h.l2_coverage(), 512ull << 20);
  EXPECT_EQ(h.l1_entries_for(1ull << 30), 2u);
  EXPECT_EQ(h.l1_entries_for((1ull << 30) + 1), 3u);
  EXPECT_EQ(h.refcount_bits(), 16u);
  h.incompatible_features |= kIncompatExtendedL2;
  EXPECT_EQ(h.l2_entry_bytes(), 16u);
  EXPECT_EQ(h.l2_coverage(), 256ull << 20);
}

TEST(HeaderRoundTrip, Version2HeaderHasImpliedFields) {
  Header in = ValidHeader();
  in.version = 2;
  const std::vector<std::byte> bytes = Encode(in);
  // Version 2 stops after snapshots_offset; the encoder writes nothing more.
  for (size_t i = kHeaderV2Length; i < kHeaderV3Length; i++) {
    ASSERT_EQ(bytes[i], std::byte{0}) << "byte " << i;
  }
  Result<Header> out = DecodeHeader(bytes, kFileSize);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->version, 2u);
  EXPECT_EQ(out->header_length, kHeaderV2Length);
  EXPECT_EQ(out->refcount_order, 4u);
  EXPECT_EQ(out->incompatible_features, 0u);
  // A v2 header is only 72 bytes: decoding needs no more.
  std::vector<std::byte> short_bytes(bytes.begin(), bytes.begin() + kHeaderV2Length);
  EXPECT_TRUE(DecodeHeader(short_bytes, kFileSize).ok());
}

TEST(HeaderRoundTrip, ExtensionsBackingNameAndUnknownFieldsSurvive) {
  Header in = ValidHeader();
  in.header_length = 128;
  in.unknown_fields.assign(128 - kHeaderV3Length, std::byte{0x5a});
  in.incompatible_features = kIncompatCompression;
  in.compression_type = 1;  // zstd
  in.compatible_features = kCompatLazyRefcounts | (1ull << 40);
  in.autoclear_features = kAutoclearBitmaps | (1ull << 33);
  in.backing_file = "../base/disk.qcow2";
  const std::string fmt = "qcow2";
  in.extensions.push_back({kExtBackingFormat, {Bytes(fmt).begin(), Bytes(fmt).end()}});
  in.extensions.push_back({0x12345678, std::vector<std::byte>(13, std::byte{0x77})});
  std::vector<std::byte> table(48, std::byte{0});
  table[0] = std::byte{0};  // incompatible
  table[1] = std::byte{3};
  std::memcpy(table.data() + 2, "compression type", 16);
  in.extensions.push_back({kExtFeatureTable, table});

  const std::vector<std::byte> bytes = Encode(in);
  Result<Header> out = DecodeHeader(bytes, kFileSize);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->header_length, 128u);
  EXPECT_EQ(out->unknown_fields, in.unknown_fields);
  EXPECT_EQ(out->compression_type, 1);
  EXPECT_EQ(out->compatible_features, in.compatible_features);
  EXPECT_EQ(out->autoclear_features, in.autoclear_features);
  EXPECT_EQ(out->backing_file, in.backing_file);
  EXPECT_EQ(out->backing_format, "qcow2");
  ASSERT_EQ(out->feature_names.size(), 1u);
  EXPECT_EQ(out->feature_names[0].bit, 3);
  EXPECT_EQ(out->feature_names[0].name, "compression type");
  // Every extension, in order, unknown ones included.
  ASSERT_EQ(out->extensions.size(), 3u);
  EXPECT_EQ(out->extensions[0].type, kExtBackingFormat);
  EXPECT_EQ(out->extensions[1].type, 0x12345678u);
  EXPECT_EQ(out->extensions[1].data, in.extensions[1].data);
  EXPECT_EQ(out->extensions[2].type, kExtFeatureTable);
  // The backing name follows the extensions and its end marker.
  const uint64_t name_at = LoadBe64(bytes.data() + kOffBackingFileOffset);
  EXPECT_EQ(LoadBe32(bytes.data() + kOffBackingFileSize), in.backing_file.size());
  EXPECT_GT(name_at, 128u);
  EXPECT_EQ(LoadBe32(bytes.data() + name_at - 8), kExtEnd);
  EXPECT_EQ(Encode(*out), bytes);
}

TEST(HeaderRoundTrip, DataFileNameIsKeptOnlyWithTheFeatureBit) {
  Header in = ValidHeader();
  const std::string name = "disk.data";
  in.extensions.push_back({kExtDataFile, {Bytes(name).begin(), Bytes(name).end()}});
  in.incompatible_features = kIncompatDataFile;
  in.autoclear_features = kAutoclearDataFileRaw;
  Result<Header> with = DecodeHeader(Encode(in), kFileSize);
  ASSERT_TRUE(with.ok()) << with.status().ToString();
  EXPECT_TRUE(with->has_data_file());
  EXPECT_TRUE(with->data_file_raw());
  EXPECT_EQ(with->data_file, "disk.data");

  in.incompatible_features = 0;
  Result<Header> without = DecodeHeader(Encode(in), kFileSize);
  ASSERT_TRUE(without.ok()) << without.status().ToString();
  EXPECT_EQ(without->data_file, "");
  EXPECT_EQ(without->extensions.size(), 1u);  // still preserved verbatim
}

TEST(HeaderRoundTrip, ExtendedL2AndEveryClusterSize) {
  for (uint32_t bits = limits::kMinClusterBits; bits <= limits::kMaxClusterBits; bits++) {
    SCOPED_TRACE("cluster_bits " + std::to_string(bits));
    Header in = ValidHeader();
    in.cluster_bits = bits;
    const uint64_t cs = in.cluster_size();
    in.refcount_table_offset = cs;
    in.l1_table_offset = 2 * cs;
    in.size = 3 * in.l2_coverage() - 5;
    in.l1_size = static_cast<uint32_t>(in.l1_entries_for(in.size));
    if (bits >= limits::kMinClusterBitsExtendedL2) {
      in.incompatible_features = kIncompatExtendedL2;
      in.size = 3 * in.l2_coverage() - 5;
      in.l1_size = static_cast<uint32_t>(in.l1_entries_for(in.size));
    }
    Result<Header> out = DecodeHeader(Encode(in), 4 * cs + 8 * uint64_t{in.l1_size});
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    EXPECT_EQ(out->cluster_bits, bits);
    EXPECT_EQ(out->extended_l2(), bits >= limits::kMinClusterBitsExtendedL2);
    EXPECT_EQ(out->l1_size, 3u);
  }
}

TEST(HeaderRoundTrip, ExtensionsThatExactlyFillTheAreaNeedNoEndMarker) {
  // QEMU accepts an extension area with no end marker when the extensions
  // fill it up to the backing file name.
  std::vector<std::byte> bytes = ValidBytes();
  const size_t ext_at = kHeaderV3Length;
  StoreBe32(bytes.data() + ext_at, 0x11111111);
  StoreBe32(bytes.data() + ext_at + 4, 8);
  const size_t name_at = ext_at + 16;
  std::memcpy(bytes.data() + name_at, "base", 4);
  StoreBe64(bytes.data() + kOffBackingFileOffset, name_at);
  StoreBe32(bytes.data() + kOffBackingFileSize, 4);
  Result<Header> out = DecodeHeader(bytes, kFileSize);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->backing_file, "base");
  ASSERT_EQ(out->extensions.size(), 1u);
  EXPECT_EQ(out->extensions[0].type, 0x11111111u);
}

// ---- One field changed, one specific error.

struct Mutation {
  std::string name;
  std::function<void(std::vector<std::byte>&)> change;
  ErrorCode code;
  std::string message;  // a part of the expected message
  uint64_t file_size = kFileSize;
};

void PrintTo(const Mutation& m, std::ostream* os) { *os << m.name; }

void Put32(std::vector<std::byte>& b, size_t at, uint32_t v) { StoreBe32(b.data() + at, v); }
void Put64(std::vector<std::byte>& b, size_t at, uint64_t v) { StoreBe64(b.data() + at, v); }

// Appends an extension at the start of the (empty) extension area of a
// ValidBytes() header, followed by an end marker.
size_t AddExtension(std::vector<std::byte>& b, size_t at, uint32_t type, const std::string& data) {
  Put32(b, at, type);
  Put32(b, at + 4, static_cast<uint32_t>(data.size()));
  std::memcpy(b.data() + at + 8, data.data(), data.size());
  const size_t next = at + 8 + (data.size() + 7) / 8 * 8;
  Put32(b, next, kExtEnd);
  Put32(b, next + 4, 0);
  return next;
}

std::vector<Mutation> Mutations() {
  const size_t ext = kHeaderV3Length;
  return {
      {"magic", [](auto& b) { Put32(b, kOffMagic, 0x514649fa); }, ErrorCode::kInvalidArgument,
       "bad magic number"},
      {"version_1", [](auto& b) { Put32(b, kOffVersion, 1); }, ErrorCode::kUnsupported,
       "qcow2 version 1 is not supported"},
      {"version_4", [](auto& b) { Put32(b, kOffVersion, 4); }, ErrorCode::kUnsupported,
       "qcow2 version 4 is not supported"},
      {"cluster_bits_below_min",
       [](auto& b) { Put32(b, kOffClusterBits, limits::kMinClusterBits - 1); }, ErrorCode::kCorrupt,
       "cluster_bits 8 is outside"},
      {"cluster_bits_above_max",
       [](auto& b) { Put32(b, kOffClusterBits, limits::kMaxClusterBits + 1); }, ErrorCode::kCorrupt,
       "cluster_bits 22 is outside"},
      {"cluster_bits_huge", [](auto& b) { Put32(b, kOffClusterBits, 63); }, ErrorCode::kCorrupt,
       "cluster_bits 63"},
      {"header_length_too_small", [](auto& b) { Put32(b, kOffHeaderLength, 96); },
       ErrorCode::kCorrupt, "header_length 96"},
      {"header_length_unaligned", [](auto& b) { Put32(b, kOffHeaderLength, 108); },
       ErrorCode::kCorrupt, "header_length 108"},
      {"header_length_past_cluster",
       [](auto& b) { Put32(b, kOffHeaderLength, static_cast<uint32_t>(kCluster + 8)); },
       ErrorCode::kCorrupt, "header_length 65544"},
      {"crypt_aes", [](auto& b) { Put32(b, kOffCryptMethod, 1); }, ErrorCode::kUnsupported,
       "encryption (AES)"},
      {"crypt_luks", [](auto& b) { Put32(b, kOffCryptMethod, 2); }, ErrorCode::kUnsupported,
       "encryption (LUKS)"},
      {"crypt_unknown", [](auto& b) { Put32(b, kOffCryptMethod, 9); }, ErrorCode::kUnsupported,
       "unknown method"},
      {"unknown_incompatible_bit", [](auto& b) { Put64(b, kOffIncompatible, 1ull << 5); },
       ErrorCode::kUnsupported, "unknown incompatible feature bit 5 (bit 5)"},
      {"unknown_incompatible_high_bit", [](auto& b) { Put64(b, kOffIncompatible, 1ull << 63); },
       ErrorCode::kUnsupported, "(bit 63)"},
      {"refcount_order_7", [](auto& b) { Put32(b, kOffRefcountOrder, 7); }, ErrorCode::kCorrupt,
       "refcount_order 7 exceeds 6"},
      {"compression_bit_without_type",
       [](auto& b) { Put64(b, kOffIncompatible, kIncompatCompression); }, ErrorCode::kCorrupt,
       "compression type bit set but compression_type is zlib"},
      {"compression_type_without_bit", [](auto& b) { b[kOffCompressionType] = std::byte{1}; },
       ErrorCode::kCorrupt, "compression_type 1 set without the compression type feature bit"},
      {"compression_type_unknown",
       [](auto& b) {
         Put64(b, kOffIncompatible, kIncompatCompression);
         b[kOffCompressionType] = std::byte{2};
       },
       ErrorCode::kUnsupported, "unknown compression type 2"},
      {"extended_l2_small_clusters",
       [](auto& b) {
         Put64(b, kOffIncompatible, kIncompatExtendedL2);
         Put32(b, kOffClusterBits, limits::kMinClusterBitsExtendedL2 - 1);
         Put32(b, kOffL1Size, 1 << 13);  // enough entries for 8 KiB clusters
       },
       ErrorCode::kCorrupt, "extended L2 entries need clusters of at least 16 KiB"},
      {"virtual_size_too_large", [](auto& b) { Put64(b, kOffSize, limits::kMaxVirtualSize + 1); },
       ErrorCode::kCorrupt, "virtual size 4611686018427387905 is too large"},
      {"l1_over_limit",
       [](auto& b) { Put32(b, kOffL1Size, static_cast<uint32_t>(limits::kMaxL1Bytes / 8 + 1)); },
       ErrorCode::kCorrupt, "exceeds the 32 MiB limit"},
      {"l1_too_small", [](auto& b) { Put32(b, kOffL1Size, 1); }, ErrorCode::kCorrupt,
       "L1 table of 1 entries is too small for the virtual size 1073741824"},
      {"l1_unaligned", [](auto& b) { Put64(b, kOffL1TableOffset, 3 * kCluster + 512); },
       ErrorCode::kCorrupt, "L1 table offset 0x30200 is not cluster aligned"},
      {"l1_at_header", [](auto& b) { Put64(b, kOffL1TableOffset, 0); }, ErrorCode::kCorrupt,
       "L1 table overlaps the header"},
      {"l1_past_eof", [](auto& b) { Put64(b, kOffL1TableOffset, kFileSize); }, ErrorCode::kCorrupt,
       "L1 table at 0x400000 (16 bytes) lies past the end"},
      {"l1_past_max_offset",
       [](auto& b) { Put64(b, kOffL1TableOffset, (limits::kMaxHostOffset + 1)); },
       ErrorCode::kCorrupt, "lies past the end", ~uint64_t{0}},
      {"refcount_table_empty", [](auto& b) { Put32(b, kOffRefcountTableClusters, 0); },
       ErrorCode::kCorrupt, "refcount table has no clusters"},
      {"refcount_table_over_limit",
       [](auto& b) {
         Put32(b, kOffRefcountTableClusters,
               static_cast<uint32_t>(limits::kMaxRefcountTableBytes / kCluster + 1));
       },
       ErrorCode::kCorrupt, "refcount table of 129 clusters exceeds the 8 MiB limit"},
      {"refcount_table_unaligned", [](auto& b) { Put64(b, kOffRefcountTableOffset, kCluster + 8); },
       ErrorCode::kCorrupt, "refcount table offset 0x10008 is not cluster aligned"},
      {"refcount_table_past_eof", [](auto& b) { Put64(b, kOffRefcountTableOffset, kFileSize); },
       ErrorCode::kCorrupt, "refcount table at 0x400000"},
      {"snapshots_over_limit",
       [](auto& b) { Put32(b, kOffNbSnapshots, limits::kMaxSnapshots + 1); }, ErrorCode::kCorrupt,
       "65537 snapshots exceed the limit of 65536"},
      {"snapshot_table_at_header", [](auto& b) { Put32(b, kOffNbSnapshots, 1); },
       ErrorCode::kCorrupt, "snapshot table overlaps the header"},
      {"snapshot_table_past_eof",
       [](auto& b) {
         Put32(b, kOffNbSnapshots, 1);
         Put64(b, kOffSnapshotsOffset, kFileSize);
       },
       ErrorCode::kCorrupt, "snapshot table at 0x400000 (40 bytes)"},
      {"backing_name_too_long",
       [](auto& b) {
         Put64(b, kOffBackingFileOffset, 512);
         Put32(b, kOffBackingFileSize, limits::kMaxBackingFileNameBytes + 1);
       },
       ErrorCode::kCorrupt, "backing file name of 1024 bytes exceeds 1023 bytes"},
      {"backing_name_past_cluster",
       [](auto& b) {
         Put64(b, kOffBackingFileOffset, kCluster - 4);
         Put32(b, kOffBackingFileSize, 8);
       },
       ErrorCode::kCorrupt, "backing file name at 0xfffc lies outside the first cluster"},
      {"backing_name_inside_header",
       [](auto& b) {
         Put64(b, kOffBackingFileOffset, 64);
         Put32(b, kOffBackingFileSize, 8);
       },
       ErrorCode::kCorrupt, "backing file name at 0x40 lies outside the first cluster"},
      {"extension_runs_past_area",
       [ext](auto& b) {
         Put32(b, ext, 0x12345678);
         Put32(b, ext + 4, static_cast<uint32_t>(kCluster));
       },
       ErrorCode::kCorrupt, "header extension 0x12345678 of 65536 bytes runs past the end"},
      {"extension_header_cut_by_backing_name",
       [ext](auto& b) {
         // The area ends 4 bytes into an extension header.
         Put32(b, ext, 0x12345678);
         Put64(b, kOffBackingFileOffset, ext + 4);
         Put32(b, kOffBackingFileSize, 4);
       },
       ErrorCode::kCorrupt, "header extension at byte 0 runs past the end"},
      {"two_backing_formats",
       [ext](auto& b) {
         size_t next = AddExtension(b, ext, kExtBackingFormat, "raw");
         AddExtension(b, next, kExtBackingFormat, "qcow2");
       },
       ErrorCode::kCorrupt, "two backing format extensions"},
      {"two_data_files",
       [ext](auto& b) {
         size_t next = AddExtension(b, ext, kExtDataFile, "a");
         AddExtension(b, next, kExtDataFile, "b");
       },
       ErrorCode::kCorrupt, "two data file name extensions"},
      {"two_feature_tables",
       [ext](auto& b) {
         size_t next = AddExtension(b, ext, kExtFeatureTable, std::string(48, '\0'));
         AddExtension(b, next, kExtFeatureTable, std::string(48, '\0'));
       },
       ErrorCode::kCorrupt, "two feature name tables"},
      {"data_file_with_snapshots",
       [](auto& b) {
         Put64(b, kOffIncompatible, kIncompatDataFile);
         Put32(b, kOffNbSnapshots, 1);
         Put64(b, kOffSnapshotsOffset, 5 * kCluster);
       },
       ErrorCode::kCorrupt, "external data file cannot have snapshots"},
  };
}

class HeaderMutation : public ::testing::TestWithParam<Mutation> {};

TEST_P(HeaderMutation, FailsWithOneSpecificError) {
  const Mutation& m = GetParam();
  std::vector<std::byte> bytes = ValidBytes();
  ASSERT_TRUE(DecodeHeader(bytes, m.file_size).ok()) << "the unchanged header must decode";
  m.change(bytes);
  EXPECT_TRUE(Refused(bytes, m.code, m.message, m.file_size));
}

INSTANTIATE_TEST_SUITE_P(OneField, HeaderMutation, ::testing::ValuesIn(Mutations()),
                         [](const auto& param_info) { return param_info.param.name; });

TEST(HeaderDecode, TooShortInputs) {
  const std::vector<std::byte> bytes = ValidBytes();
  EXPECT_TRUE(Refused({bytes.begin(), bytes.begin() + kHeaderV2Length - 1}, ErrorCode::kCorrupt,
                      "file is shorter than a qcow2 header"));
  EXPECT_TRUE(Refused({bytes.begin(), bytes.begin() + kHeaderV3MinLength - 8}, ErrorCode::kCorrupt,
                      "file too short for a version 3 header"));
  // header_length may not reach past the bytes given.
  EXPECT_TRUE(Refused({bytes.begin(), bytes.begin() + kHeaderV3MinLength}, ErrorCode::kCorrupt,
                      "header_length 112"));
}

TEST(HeaderDecode, OnlyTheFirstMatchingCheckReportsWhenTwoFieldsAreBad) {
  // Encryption is reported before unknown features: both bad, one error.
  std::vector<std::byte> bytes = ValidBytes();
  Put32(bytes, kOffCryptMethod, 2);
  Put64(bytes, kOffIncompatible, 1ull << 20);
  EXPECT_TRUE(Refused(bytes, ErrorCode::kUnsupported, "LUKS"));
}

TEST(HeaderEncode, RefusesWhatDoesNotFitInTheFirstCluster) {
  Header h = ValidHeader();
  h.cluster_bits = 9;  // 512-byte clusters: little room
  h.extensions.push_back({0x1, std::vector<std::byte>(400)});
  Result<std::vector<std::byte>> r = EncodeHeader(h);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("header extensions do not fit"), std::string::npos);

  h.extensions.clear();
  h.backing_file.assign(limits::kMaxBackingFileNameBytes + 1, 'b');
  h.cluster_bits = 16;
  r = EncodeHeader(h);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("backing file name does not fit"), std::string::npos);

  h.backing_file.assign(limits::kMaxBackingFileNameBytes, 'b');
  EXPECT_TRUE(EncodeHeader(h).ok());

  h.backing_file.clear();
  h.cluster_bits = 9;
  h.unknown_fields.assign(512, std::byte{1});
  r = EncodeHeader(h);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("header does not fit"), std::string::npos);
}

TEST(HeaderFeatureNames, KnownBitsTableNamesAndUnknownBits) {
  Header h = ValidHeader();
  EXPECT_EQ(IncompatibleFeatureName(h, 0), "dirty bit");
  EXPECT_EQ(IncompatibleFeatureName(h, 1), "corrupt bit");
  EXPECT_EQ(IncompatibleFeatureName(h, 2), "external data file");
  EXPECT_EQ(IncompatibleFeatureName(h, 3), "compression type");
  EXPECT_EQ(IncompatibleFeatureName(h, 4), "extended L2 entries");
  EXPECT_EQ(IncompatibleFeatureName(h, 5), "unknown incompatible feature bit 5");
  h.feature_names.push_back({1, 5, "a compatible one"});  // wrong type: ignored
  h.feature_names.push_back({0, 5, "from the table"});
  EXPECT_EQ(IncompatibleFeatureName(h, 5), "from the table");
  EXPECT_EQ(IncompatibleFeatureName(h, 6), "unknown incompatible feature bit 6");
}

}  // namespace
}  // namespace qcow2fs
