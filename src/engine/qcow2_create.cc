// Image::Create: writes the smallest valid qcow2 file (header, refcount
// table, one refcount block, no L1 table) and then grows it to the
// requested size through the normal resize path, so that creation and
// growth share one implementation of L1 allocation.
#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "engine/image_open.h"
#include "format/endian.h"
#include "format/header.h"
#include "format/limits.h"
#include "format/refcount_block.h"

namespace qcow2fs {
namespace {

Status Invalid(const std::string& what) {
  return Status(ErrorCode::kInvalidArgument, "cannot create image: " + what);
}

HeaderExtension FeatureTable() {
  struct Entry {
    uint8_t type, bit;
    const char* name;
  };
  static const Entry kEntries[] = {
      {0, 0, "dirty bit"},        {0, 1, "corrupt bit"},         {0, 2, "external data file"},
      {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
      {2, 0, "bitmaps"},          {2, 1, "raw external data"},
  };
  HeaderExtension ext{kExtFeatureTable, {}};
  for (const Entry& e : kEntries) {
    std::byte entry[48] = {};
    entry[0] = std::byte{e.type};
    entry[1] = std::byte{e.bit};
    std::memcpy(entry + 2, e.name, std::strlen(e.name));
    ext.data.insert(ext.data.end(), entry, entry + 48);
  }
  return ext;
}

HeaderExtension StringExtension(uint32_t type, const std::string& s) {
  HeaderExtension ext{type, {}};
  for (char c : s) ext.data.push_back(static_cast<std::byte>(c));
  return ext;
}

}  // namespace

Status Image::Create(const std::string& path, const CreateOptions& o) {
  const uint32_t cs = o.cluster_size;
  if (cs < 512 || cs > (1u << limits::kMaxClusterBits) || (cs & (cs - 1)) != 0) {
    return Invalid("cluster size must be a power of two from 512 to 2M");
  }
  if (o.version != 2 && o.version != 3) return Invalid("version must be 2 or 3");
  if (o.refcount_bits < 1 || o.refcount_bits > 64 ||
      (o.refcount_bits & (o.refcount_bits - 1)) != 0) {
    return Invalid("refcount bits must be a power of two from 1 to 64");
  }
  if (o.version == 2 && o.refcount_bits != 16) {
    return Invalid("version 2 images have 16-bit refcounts");
  }
  if (o.extended_l2 && (o.version != 3 || cs < 16384)) {
    return Invalid("extended L2 entries need version 3 and clusters of 16K or more");
  }
  if (o.compression == CompressionType::kZstd && o.version != 3) {
    return Invalid("zstd compression needs a version 3 image");
  }

  uint64_t size = o.size;
  std::string backing_format = o.backing_format;
  if (!o.backing_file.empty()) {
    const std::string dir =
        path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/') + 1);
    const std::string resolved =
        o.backing_file[0] == '/' ? o.backing_file : dir + "/" + o.backing_file;
    OpenOptions bo;
    bo.read_only = true;
    bo.format = backing_format;
    auto backing = Image::Open(resolved, bo);
    if (!backing.ok()) return backing.status().Annotate("cannot open backing file");
    if (backing_format.empty()) backing_format = (*backing)->info().format;
    if (size == 0) size = (*backing)->size();
  }
  if (size > limits::kMaxVirtualSize) return Invalid("size is too large");

  Header h;
  h.version = static_cast<uint32_t>(o.version);
  h.cluster_bits = static_cast<uint32_t>(__builtin_ctz(cs));
  h.refcount_order = static_cast<uint32_t>(__builtin_ctz(static_cast<unsigned>(o.refcount_bits)));
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = 1;
  h.header_length = o.version == 2 ? kHeaderV2Length : kHeaderV3Length;
  if (o.extended_l2) h.incompatible_features |= kIncompatExtendedL2;
  if (o.compression == CompressionType::kZstd) {
    h.incompatible_features |= kIncompatCompression;
    h.compression_type = 1;
  }
  if (!backing_format.empty() && !o.backing_file.empty()) {
    h.extensions.push_back(StringExtension(kExtBackingFormat, backing_format));
  }
  if (o.version == 3) h.extensions.push_back(FeatureTable());
  h.backing_file = o.backing_file;
  h.backing_format = backing_format;
  QCOW2FS_ASSIGN_OR_RETURN(std::vector<std::byte> header, EncodeHeader(h));

  // Cluster 0 header, 1 refcount table, 2 the refcount block counting all
  // three (a block covers at least 64 clusters).
  std::vector<std::byte> file(3 * uint64_t{cs});
  std::memcpy(file.data(), header.data(), cs);
  StoreBe64(file.data() + cs, 2 * uint64_t{cs});
  for (uint64_t c = 0; c < 3; c++) {
    SetRefcountEntry(file.data() + 2 * uint64_t{cs}, h.refcount_order, c, 1);
  }

  // Refused before anything exists on disk where it can be known now.
  if (h.l1_entries_for(size) * 8 > limits::kMaxL1Bytes) {
    return Invalid("size " + std::to_string(size) + " needs an L1 table over 32 MiB");
  }

  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "cannot create " + path);
  size_t done = 0;
  while (done < file.size()) {
    ssize_t n = ::pwrite(fd, file.data() + done, file.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Status s = Status::FromErrno(errno, "writing " + path);
      ::close(fd);
      ::unlink(path.c_str());
      return s;
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);

  // Grown to its size through the ordinary resize path. A failure removes
  // the file: a half-made image must not be mounted by the next attempt.
  Status grown = [&]() -> Status {
    OpenOptions open_options;
    open_options.read_only = false;
    auto image = Image::Open(path, open_options);
    if (!image.ok()) return image.status();
    QCOW2FS_RETURN_IF_ERROR((*image)->Resize(size));
    return (*image)->Flush();
  }();
  if (!grown.ok()) ::unlink(path.c_str());
  return grown;
}

}  // namespace qcow2fs
