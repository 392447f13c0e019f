// Qcow2Image: opening (header, snapshots, L1, backing and data files) and
// the image-wide queries.
#include "engine/qcow2_image.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>

#include <sys/stat.h>

#include "engine/image_lock.h"
#include "format/endian.h"
#include "format/hex.h"
#include "format/l2_entry.h"
#include "format/limits.h"

namespace qcow2fs {
namespace {

std::string DirName(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Backing and data file names are relative to the image's directory.
std::string ResolveRelative(const std::string& image_path, const std::string& name) {
  if (!name.empty() && name[0] == '/') return name;
  return DirName(image_path) + "/" + name;
}

// The default L2 cache covers the whole disk, as QEMU's does on Linux,
// within [1 MiB, 32 MiB].
size_t DefaultL2CacheBytes(const Header& h, uint64_t virtual_size) {
  uint64_t tables = (virtual_size + h.l2_coverage() - 1) / h.l2_coverage();
  uint64_t bytes = tables * h.cluster_size();
  return static_cast<size_t>(std::clamp<uint64_t>(bytes, 1 << 20, 32 << 20));
}

}  // namespace

Qcow2Image::~Qcow2Image() {
  if (read_only_ || !refcounts_ || fenced_.load()) return;
  // Flush applies deferred frees, which dirties refcount blocks once more.
  Status s = Flush();
  if (s.ok()) {
    MutexLock lk(meta_mutex_);
    s = WriteBackLocked();
  }
  if (!s.ok()) {
    std::fprintf(stderr, "qcow2fs: closing %s: %s\n", path_.c_str(), s.ToString().c_str());
  }
}

Result<std::unique_ptr<Image>> Qcow2Image::Open(std::unique_ptr<File> file, const std::string& path,
                                                const OpenOptions& options,
                                                const FileOpener& opener, int chain_depth) {
  std::unique_ptr<Qcow2Image> image(new Qcow2Image());
  image->path_ = path;
  image->file_ = std::move(file);
  QCOW2FS_RETURN_IF_ERROR(image->LoadMetadata(options, opener, chain_depth).Annotate(path));
  return std::unique_ptr<Image>(std::move(image));
}

Status Qcow2Image::LoadMetadata(const OpenOptions& options, const FileOpener& opener,
                                int chain_depth) {
  // Nobody else can reach the image yet; the lock is free and lets the
  // analysis check what is filled in below.
  MutexLock lk(meta_mutex_);
  QCOW2FS_ASSIGN_OR_RETURN(uint64_t file_size, file_->Size());
  file_size_ = file_size;

  // The header and its extensions live in the first cluster, which is at
  // most 2 MiB.
  std::vector<std::byte> first(
      std::min<uint64_t>(file_size, uint64_t{1} << limits::kMaxClusterBits));
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(0, first));
  QCOW2FS_ASSIGN_OR_RETURN(header_, DecodeHeader(first, file_size));

  cluster_bits_ = header_.cluster_bits;
  cluster_size_ = header_.cluster_size();
  l2_entries_ = header_.l2_entries();
  extended_l2_ = header_.extended_l2();
  version_ = header_.version;
  has_data_file_ = header_.has_data_file();
  refcount_order_ = header_.refcount_order;
  subcluster_bits_ = extended_l2_ ? cluster_bits_ - 5 : cluster_bits_;
  compression_ = header_.compression_type == 1 ? CompressionType::kZstd : CompressionType::kZlib;

  read_only_ = options.read_only || options.snapshot.has_value();
  if (header_.incompatible_features & kIncompatCorrupt) {
    warnings_.push_back(
        "image is marked corrupt; opened read-only (run 'qemu-img check -r "
        "all' to repair)");
    read_only_ = true;
  }
  if (header_.incompatible_features & kIncompatDirty) {
    warnings_.push_back(
        "image is dirty (not closed cleanly while its refcounts were being "
        "changed); opened read-only until its refcounts are repaired");
    read_only_ = true;
  }

  if (header_.nb_snapshots > 0) {
    auto read = [this](uint64_t off, std::span<std::byte> buf) { return file_->ReadAt(off, buf); };
    QCOW2FS_ASSIGN_OR_RETURN(snapshots_, ReadSnapshotTable(header_, file_size, read));
    for (const auto& s : snapshots_) {
      snapshot_table_bytes_ +=
          (40 + s.extra_data.size() + s.id.size() + s.name.size() + 7) & ~uint64_t{7};
    }
  }

  uint64_t l1_offset = header_.l1_table_offset;
  uint32_t l1_entries = header_.l1_size;
  uint64_t virtual_size = header_.size;
  if (options.snapshot) {
    auto it = std::find_if(snapshots_.begin(), snapshots_.end(), [&](const SnapshotEntry& s) {
      return s.id == *options.snapshot || s.name == *options.snapshot;
    });
    if (it == snapshots_.end()) {
      return Status(ErrorCode::kNotFound,
                    "no snapshot with ID or name '" + *options.snapshot + "'");
    }
    l1_offset = it->l1_table_offset;
    l1_entries = it->l1_size;
    virtual_size = it->disk_size;
    // A snapshot with VM state may have a larger L1 than its disk needs;
    // one that is too small is corrupt.
    if (l1_entries < header_.l1_entries_for(virtual_size)) {
      return Status(ErrorCode::kCorrupt, "snapshot '" + it->name +
                                             "' has an L1 table too small "
                                             "for its disk size");
    }
  }
  size_ = virtual_size;
  QCOW2FS_RETURN_IF_ERROR(LoadL1(l1_offset, l1_entries));

  size_t cache_bytes =
      options.l2_cache_bytes ? options.l2_cache_bytes : DefaultL2CacheBytes(header_, virtual_size);
  l2_cache_ =
      std::make_unique<L2Cache>(cache_bytes / cluster_size_, cluster_size_ / sizeof(uint64_t));

  // The backing chain first: the data file must be none of its files. The
  // opener is wrapped to note every file the chain opens (their data files
  // included; it is not kept past this call). A file opened a second time
  // means the chain loops: refused at once, before it is locked again
  // (which would blame "another process") or followed 64 levels deep.
  std::vector<std::pair<dev_t, ino_t>> chain_files;
  struct stat own;
  if (file_->fd() >= 0 && ::fstat(file_->fd(), &own) == 0) {
    chain_files.emplace_back(own.st_dev, own.st_ino);
  }
  const FileOpener noting = [&](const std::string& p, bool w) -> Result<std::unique_ptr<File>> {
    auto f = opener(p, w);
    struct stat st;
    if (!f.ok() || (*f)->fd() < 0 || ::fstat((*f)->fd(), &st) != 0) return f;
    const std::pair<dev_t, ino_t> id{st.st_dev, st.st_ino};
    if (std::find(chain_files.begin(), chain_files.end(), id) != chain_files.end()) {
      return Status(ErrorCode::kCorrupt,
                    "the backing chain loops: " + p + " is already part of it");
    }
    chain_files.push_back(id);
    return f;
  };
  QCOW2FS_RETURN_IF_ERROR(OpenBacking(options, noting, chain_depth));
  QCOW2FS_RETURN_IF_ERROR(OpenDataFile(options, opener, chain_files));
  if (!read_only_) QCOW2FS_RETURN_IF_ERROR(PrepareForWriting());
  if (options.compress) QCOW2FS_RETURN_IF_ERROR(SetUpCompressedWrites(options));
  return Status();
}

Status Qcow2Image::LoadL1(uint64_t offset, uint32_t entries) {
  std::vector<std::byte> raw(uint64_t{entries} * 8);
  QCOW2FS_RETURN_IF_ERROR(file_->ReadAt(offset, raw));
  l1_.resize(entries);
  for (uint32_t i = 0; i < entries; i++) l1_[i] = LoadBe64(raw.data() + 8 * i);
  return Status();
}

Status Qcow2Image::OpenDataFile(const OpenOptions& options, const FileOpener& opener,
                                const std::vector<std::pair<dev_t, ino_t>>& chain_files) {
  if (!header_.has_data_file()) {
    data_file_ = file_.get();
    return Status();
  }
  if (header_.data_file.empty()) {
    return Status(ErrorCode::kCorrupt, "image needs an external data file but names none");
  }
  const std::string resolved = ResolveRelative(path_, header_.data_file);
  auto file = opener(resolved, !read_only_);
  if (!file.ok()) {
    return file.status().Annotate("opening external data file '" + header_.data_file + "'");
  }
  owned_data_file_ = std::move(file).value();
  data_file_ = owned_data_file_.get();
  // Guest writes go to the data file: it must not be the image itself or
  // any file of the backing chain, whose metadata or data they would
  // destroy.
  struct stat data_st, own_st;
  if (data_file_->fd() >= 0 && ::fstat(data_file_->fd(), &data_st) == 0) {
    const std::pair<dev_t, ino_t> id{data_st.st_dev, data_st.st_ino};
    const bool is_self = file_->fd() >= 0 && ::fstat(file_->fd(), &own_st) == 0 &&
                         own_st.st_dev == data_st.st_dev && own_st.st_ino == data_st.st_ino;
    if (is_self) {
      return Status(ErrorCode::kCorrupt,
                    "external data file '" + header_.data_file + "' is the image file itself");
    }
    if (std::find(chain_files.begin(), chain_files.end(), id) != chain_files.end()) {
      return Status(ErrorCode::kCorrupt, "external data file '" + header_.data_file +
                                             "' is a file of the backing chain");
    }
  }
  // Locked like the image, so that no other writer (QEMU included) changes
  // the guest data under us.
  if (options.lock && data_file_->fd() >= 0) {
    QCOW2FS_RETURN_IF_ERROR(
        LockImageFile(data_file_->fd(), resolved, !read_only_).Annotate("external data file"));
  }
  return Status();
}

Status Qcow2Image::OpenBacking(const OpenOptions& options, const FileOpener& opener,
                               int chain_depth) {
  if (header_.backing_file.empty()) return Status();
  if (chain_depth + 1 >= limits::kMaxBackingChainDepth) {
    return Status(ErrorCode::kCorrupt, "backing chain is longer than 64 images (a loop?)");
  }
  const std::string& name = header_.backing_file;
  if (name.rfind("json:", 0) == 0 || name.find("://") != std::string::npos) {
    return Status(ErrorCode::kUnsupported, "backing file '" + name + "' is not a plain file name");
  }
  const std::string& fmt = header_.backing_format;
  if (!fmt.empty() && fmt != "qcow2" && fmt != "raw") {
    return Status(ErrorCode::kUnsupported, "backing file format '" + fmt + "' is not supported");
  }
  backing_resolved_ = ResolveRelative(path_, name);
  auto file = opener(backing_resolved_, false);
  if (!file.ok()) {
    return file.status().Annotate("opening backing file '" + name + "'");
  }
  OpenOptions backing_options;
  backing_options.read_only = true;
  backing_options.lock = options.lock;
  backing_options.format = fmt;
  auto backing = OpenImageFile(std::move(file).value(), backing_resolved_, backing_options, opener,
                               chain_depth + 1);
  if (!backing.ok()) {
    return backing.status().Annotate("opening backing file '" + name + "'");
  }
  backing_ = std::move(backing).value();
  return Status();
}

ImageInfo Qcow2Image::info() const {
  // The header and the snapshot table change under meta_mutex_ (snapshots,
  // resize, the corrupt bit).
  MutexLock lk(meta_mutex_);
  ImageInfo i;
  i.format = "qcow2";
  i.path = path_;
  i.version = static_cast<int>(header_.version);
  i.virtual_size = size();
  i.cluster_size = static_cast<uint32_t>(cluster_size_);
  i.refcount_bits = static_cast<int>(header_.refcount_bits());
  i.extended_l2 = extended_l2_;
  i.compression = compression_;
  i.backing_file = header_.backing_file;
  i.backing_file_resolved = backing_resolved_;
  i.backing_format = header_.backing_format;
  i.data_file = header_.data_file;
  i.data_file_raw = header_.data_file_raw();
  i.read_only = read_only_;
  i.corrupt = header_.incompatible_features & kIncompatCorrupt;
  i.dirty = header_.incompatible_features & kIncompatDirty;
  i.lazy_refcounts = header_.compatible_features & kCompatLazyRefcounts;
  i.l1_size = header_.l1_size;
  for (const auto& s : snapshots_) {
    i.snapshots.push_back(SnapshotInfo{s.id, s.name, s.disk_size, s.vm_state_size, s.date_sec,
                                       s.date_nsec, s.vm_clock_nsec});
  }
  i.warnings = warnings_;
  return i;
}

uint64_t Qcow2Image::AllocatedBytes() const {
  uint64_t bytes = file_->AllocatedBytes();
  if (owned_data_file_) bytes += owned_data_file_->AllocatedBytes();
  return bytes;
}

std::string Qcow2Image::Where(uint64_t guest_offset) const {
  return "guest offset " + Hex(guest_offset);
}

}  // namespace qcow2fs
