// Names, inodes, attributes and open views of the .snapshots directory.
// See snapshot_dir.h.
#include "snapshot_dir.h"

#include <fcntl.h>
#include <limits.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <set>
#include <utility>

#include "log.h"

namespace qcow2fs::fusefs {

// One open snapshot disk. `opens` counts the handles that point here (under
// views_mu_, which guards the map that owns every View); the image is only
// read through, and is thread-safe.
struct SnapshotDir::View {
  std::unique_ptr<Image> image;
  unsigned opens = 0;
};

namespace {

// Names inside .snapshots: the kernel asks again at every path walk (one
// LOOKUP, answered from the table in memory). The kernel updates its own
// cache for a mkdir or rmdir made through it, but a new snapshot can change
// the name another one is shown under (its new ID being someone's name):
// with names never cached, the listing and lookups are right at once.
constexpr double kNameTimeout = 0.0;
// What a snapshot shows never changes: its directory's and file's
// attributes, the file's name in its directory. A snapshot taken later
// under the same ID is another inode (a new generation).
constexpr double kFixedTimeout = 86400.0;
// .snapshots' own attributes (its link count follows the snapshots). The
// kernel drops them by itself after a mkdir or rmdir made through it.
constexpr double kDirAttrTimeout = 1.0;

bool UsableFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.size() <= NAME_MAX &&
         name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos;
}

// A decimal number as QEMU writes IDs: digits, no leading zero, and small
// enough to map onto a fixed inode pair.
std::optional<uint64_t> NumericId(const std::string& id) {
  if (id.empty() || id.size() > 12 || (id.size() > 1 && id[0] == '0')) return std::nullopt;
  uint64_t value = 0;
  for (char c : id) {
    if (c < '0' || c > '9') return std::nullopt;
    value = value * 10 + static_cast<uint64_t>(c - '0');
  }
  if (value >= SnapshotDir::kMaxNumericId) return std::nullopt;
  return value;
}

timespec DateOf(const SnapshotInfo& info) {
  timespec date{};
  date.tv_sec = static_cast<time_t>(info.date_sec);
  date.tv_nsec = static_cast<long>(std::min<uint32_t>(info.date_nsec, 999999999));
  return date;
}

// Who may do what follows the image file, as for the live disk: reading a
// snapshot needs read access to the image, taking or dropping one write
// access (and a writable mount). Directories get x wherever they get r.
mode_t DirPermissions(const struct stat& host, bool writable) {
  mode_t permissions = host.st_mode & (writable ? 0666 : 0444);
  return permissions | ((permissions & 0444) >> 2);
}

}  // namespace

SnapshotDir::SnapshotDir(Image& image, int image_path_fd, std::string file_name, bool read_only,
                         uint32_t block_size)
    : image_(image),
      image_path_fd_(image_path_fd),
      file_name_(std::move(file_name)),
      read_only_(read_only),
      block_size_(block_size) {}

SnapshotDir::~SnapshotDir() = default;

std::vector<std::string> SnapshotDir::ShownNames(const std::vector<SnapshotInfo>& snapshots) {
  std::map<std::string_view, int> name_count;
  std::set<std::string_view> ids;
  for (const SnapshotInfo& s : snapshots) {
    ++name_count[s.name];
    ids.insert(s.id);
  }
  std::vector<std::string> shown;
  std::set<std::string> used;
  shown.reserve(snapshots.size());
  for (const SnapshotInfo& s : snapshots) {
    // A name that is another snapshot's ID would hide that one's
    // directory, should it be shown under its ID.
    const bool by_name = UsableFileName(s.name) && name_count[s.name] == 1 &&
                         (s.name == s.id || !ids.contains(s.name));
    std::string name = by_name ? s.name : UsableFileName(s.id) ? s.id : std::string();
    // Only a table with duplicate IDs gets here twice with one name.
    if (!name.empty() && !used.insert(name).second) name.clear();
    shown.push_back(std::move(name));
  }
  return shown;
}

fuse_ino_t SnapshotDir::DirInoLocked(const std::string& id) {
  if (std::optional<uint64_t> n = NumericId(id)) return kFirstSnapshotIno + 2 * *n;
  auto [it, added] = other_inos_.try_emplace(id, 0);
  if (added) it->second = kOtherIdIno + 2 * (other_inos_.size() - 1);
  return it->second;
}

std::vector<SnapshotDir::Listed> SnapshotDir::List() {
  std::vector<SnapshotInfo> snapshots = image_.info().snapshots;
  std::vector<std::string> shown = ShownNames(snapshots);
  std::vector<Listed> listed;
  listed.reserve(snapshots.size());
  MutexLock lk(names_mu_);
  std::set<std::string> present;
  for (size_t i = 0; i < snapshots.size(); ++i) {
    if (shown[i].empty()) continue;
    SnapshotInfo& s = snapshots[i];
    present.insert(s.id);
    Incarnation& known = incarnations_[s.id];
    if (known.generation == 0 || known.name != s.name || known.date_sec != s.date_sec ||
        known.date_nsec != s.date_nsec || known.vm_clock_nsec != s.vm_clock_nsec ||
        known.disk_size != s.disk_size) {
      known = Incarnation{s.name,          s.date_sec,  s.date_nsec,
                          s.vm_clock_nsec, s.disk_size, next_generation_++};
    }
    Listed entry;
    entry.dir_ino = DirInoLocked(s.id);
    entry.generation = known.generation;
    entry.shown = std::move(shown[i]);
    entry.info = std::move(s);
    listed.push_back(std::move(entry));
  }
  // A snapshot gone from the table gets a new generation if its ID returns,
  // even with equal dates (two snapshots taken within a clock tick).
  std::erase_if(incarnations_, [&](const auto& item) { return !present.contains(item.first); });
  return listed;
}

std::optional<SnapshotDir::Listed> SnapshotDir::FindShown(std::string_view name) {
  for (Listed& s : List()) {
    if (s.shown == name) return std::move(s);
  }
  return std::nullopt;
}

std::optional<SnapshotDir::Listed> SnapshotDir::FindByDirIno(fuse_ino_t dir_ino) {
  for (Listed& s : List()) {
    if (s.dir_ino == dir_ino) return std::move(s);
  }
  return std::nullopt;
}

bool SnapshotDir::Shows(std::string_view name) { return FindShown(name).has_value(); }

int SnapshotDir::HostStat(struct stat& host) const {
  return fstat(image_path_fd_, &host) == 0 ? 0 : errno;
}

int SnapshotDir::RootEntry(Entry& out) {
  struct stat host;
  if (int err = HostStat(host)) return err;
  out = Entry{};
  out.ino = kDirIno;
  out.attr.st_ino = kDirIno;
  out.attr.st_mode = S_IFDIR | DirPermissions(host, !read_only_);
  out.attr.st_nlink = static_cast<nlink_t>(2 + List().size());
  out.attr.st_uid = host.st_uid;
  out.attr.st_gid = host.st_gid;
  out.attr.st_atim = host.st_atim;
  out.attr.st_mtim = host.st_mtim;
  out.attr.st_ctim = host.st_ctim;
  out.entry_timeout = kFixedTimeout;  // the name in the root never changes
  out.attr_timeout = kDirAttrTimeout;
  return 0;
}

void SnapshotDir::FillDirAttr(const Listed& snapshot, const struct stat& host,
                              struct stat& attr) const {
  attr = {};
  attr.st_ino = snapshot.dir_ino;
  // Nothing can be created inside a snapshot.
  attr.st_mode = S_IFDIR | DirPermissions(host, false);
  attr.st_nlink = 2;
  attr.st_uid = host.st_uid;
  attr.st_gid = host.st_gid;
  attr.st_atim = attr.st_mtim = attr.st_ctim = DateOf(snapshot.info);
}

void SnapshotDir::FillFileAttr(const Listed& snapshot, const struct stat& host, uint64_t allocated,
                               struct stat& attr) const {
  attr = {};
  attr.st_ino = snapshot.dir_ino + 1;
  attr.st_mode = S_IFREG | (host.st_mode & 0444);
  attr.st_nlink = 1;
  attr.st_uid = host.st_uid;
  attr.st_gid = host.st_gid;
  attr.st_size = static_cast<off_t>(snapshot.info.disk_size);
  attr.st_blksize = static_cast<blksize_t>(block_size_);
  attr.st_blocks = static_cast<blkcnt_t>((allocated + 511) / 512);
  attr.st_atim = attr.st_mtim = attr.st_ctim = DateOf(snapshot.info);
}

uint64_t SnapshotDir::AllocatedBytes(const Listed& snapshot) {
  MutexLock lk(views_mu_);
  if (auto it = allocated_.find(snapshot.info.id);
      it != allocated_.end() && it->second.generation == snapshot.generation) {
    return it->second.bytes;
  }
  // A short-lived view when the file is not open: views_mu_ keeps rmdir
  // out meanwhile.
  std::unique_ptr<Image> temporary;
  Image* view = nullptr;
  if (auto it = views_.find(snapshot.info.id); it != views_.end()) {
    view = it->second->image.get();
  } else {
    Result<std::unique_ptr<Image>> opened = image_.OpenSnapshot(snapshot.info.id);
    if (!opened.ok()) {
      Log(LOG_ERR, "cannot open snapshot %s to count its blocks: %s", snapshot.info.id.c_str(),
          opened.status().ToString().c_str());
      return 0;
    }
    temporary = std::move(opened).value();
    view = temporary.get();
  }
  const uint64_t size = view->size();
  uint64_t bytes = 0;
  for (uint64_t position = 0; position < size;) {
    Result<BlockStatus> status = view->GetBlockStatus(position, size - position);
    if (!status.ok() || status->length == 0) {
      Log(LOG_ERR, "block status of snapshot %s at guest offset %" PRIu64 " failed: %s",
          snapshot.info.id.c_str(), position,
          status.ok() ? "empty extent" : status.status().ToString().c_str());
      return 0;
    }
    const uint64_t length = std::min(status->length, size - position);
    if (status->kind == BlockKind::kData) bytes += length;
    position += length;
  }
  allocated_[snapshot.info.id] = Allocated{snapshot.generation, bytes};
  return bytes;
}

int SnapshotDir::FileEntry(const Listed& snapshot, Entry& out) {
  struct stat host;
  if (int err = HostStat(host)) return err;
  out = Entry{};
  out.ino = snapshot.dir_ino + 1;
  out.generation = snapshot.generation;
  FillFileAttr(snapshot, host, AllocatedBytes(snapshot), out.attr);
  out.entry_timeout = kFixedTimeout;
  out.attr_timeout = kFixedTimeout;
  return 0;
}

int SnapshotDir::Lookup(fuse_ino_t parent, std::string_view name, Entry& out) {
  if (IsFile(parent)) return ENOTDIR;
  if (parent == kDirIno) {
    std::optional<Listed> snapshot = FindShown(name);
    if (!snapshot) return ENOENT;
    struct stat host;
    if (int err = HostStat(host)) return err;
    out = Entry{};
    out.ino = snapshot->dir_ino;
    out.generation = snapshot->generation;
    FillDirAttr(*snapshot, host, out.attr);
    out.entry_timeout = kNameTimeout;
    out.attr_timeout = kFixedTimeout;
    return 0;
  }
  std::optional<Listed> snapshot = FindByDirIno(parent);
  if (!snapshot) return ENOENT;
  if (name != file_name_) return ENOENT;
  return FileEntry(*snapshot, out);
}

int SnapshotDir::GetAttr(fuse_ino_t ino, struct stat& attr, double& attr_timeout) {
  if (ino == kDirIno) {
    Entry entry;
    if (int err = RootEntry(entry)) return err;
    attr = entry.attr;
    attr_timeout = entry.attr_timeout;
    return 0;
  }
  if (ino < kFirstSnapshotIno) return ENOENT;
  std::optional<Listed> snapshot = FindByDirIno(ino & ~fuse_ino_t{1});
  if (!snapshot) return ENOENT;
  if (IsFile(ino)) {
    Entry entry;
    if (int err = FileEntry(*snapshot, entry)) return err;
    attr = entry.attr;
    attr_timeout = entry.attr_timeout;
    return 0;
  }
  struct stat host;
  if (int err = HostStat(host)) return err;
  FillDirAttr(*snapshot, host, attr);
  attr_timeout = kFixedTimeout;
  return 0;
}

int SnapshotDir::OpenDir(fuse_ino_t ino) const {
  if (IsFile(ino)) return ENOTDIR;
  return ino == kDirIno || ino >= kFirstSnapshotIno ? 0 : ENOENT;
}

int SnapshotDir::ReadDir(fuse_ino_t ino, std::vector<DirEntry>& entries) {
  if (int err = OpenDir(ino)) return err;
  if (ino == kDirIno) {
    entries = {{".", kDirIno, S_IFDIR, 1}, {"..", FUSE_ROOT_ID, S_IFDIR, 2}};
    std::vector<Listed> listed = List();
    // By inode, so that a cookie (the inode) resumes a listing at the same
    // place whatever was taken or dropped in between.
    std::sort(listed.begin(), listed.end(),
              [](const Listed& a, const Listed& b) { return a.dir_ino < b.dir_ino; });
    for (Listed& s : listed) {
      entries.push_back({std::move(s.shown), s.dir_ino, S_IFDIR, s.dir_ino});
    }
    return 0;
  }
  std::optional<Listed> snapshot = FindByDirIno(ino);
  if (!snapshot) return ENOENT;
  entries = {
      {".", ino, S_IFDIR, 1}, {"..", kDirIno, S_IFDIR, 2}, {file_name_, ino + 1, S_IFREG, 3}};
  return 0;
}

int SnapshotDir::Open(fuse_ino_t ino, int flags, uint64_t& handle) {
  if (!IsFile(ino)) return ino == kDirIno || ino >= kFirstSnapshotIno ? EISDIR : ENOENT;
  if ((flags & O_ACCMODE) != O_RDONLY) return EROFS;
  MutexLock lk(views_mu_);
  std::optional<Listed> snapshot = FindByDirIno(ino - 1);
  if (!snapshot) return ENOENT;
  std::unique_ptr<View>& view = views_[snapshot->info.id];
  if (!view) {
    Result<std::unique_ptr<Image>> opened = image_.OpenSnapshot(snapshot->info.id);
    if (!opened.ok()) {
      views_.erase(snapshot->info.id);
      if (opened.status().code() != ErrorCode::kNotFound) {
        Log(LOG_ERR, "cannot open snapshot %s: %s", snapshot->info.id.c_str(),
            opened.status().ToString().c_str());
      }
      return opened.status().ToErrno();
    }
    view = std::make_unique<View>();
    view->image = std::move(opened).value();
  }
  ++view->opens;
  handle = reinterpret_cast<uintptr_t>(view.get());
  return 0;
}

void SnapshotDir::Release(uint64_t handle) {
  const View* view = reinterpret_cast<const View*>(static_cast<uintptr_t>(handle));
  MutexLock lk(views_mu_);
  // Found by address, not through the handle: CloseAll() may have closed
  // the view already.
  auto it = std::find_if(views_.begin(), views_.end(),
                         [view](const auto& item) { return item.second.get() == view; });
  if (it != views_.end() && --it->second->opens == 0) views_.erase(it);
}

Image& SnapshotDir::ViewOf(uint64_t handle) {
  return *reinterpret_cast<View*>(static_cast<uintptr_t>(handle))->image;
}

int SnapshotDir::Take(std::string_view name, Entry& out) {
  MutexLock lk(views_mu_);
  const auto started = std::chrono::steady_clock::now();
  Status status = image_.CreateSnapshot(std::string(name));
  if (!status.ok()) {
    // A name in use is the caller's business; anything else (an image
    // whose refcounts cannot count a second reference, a failing host)
    // the administrator's.
    if (status.code() != ErrorCode::kAlreadyExists) {
      Log(LOG_ERR, "cannot take snapshot '%.*s': %s", static_cast<int>(name.size()), name.data(),
          status.ToString().c_str());
    }
    return status.ToErrno();
  }
  const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - started;
  std::optional<Listed> snapshot = FindShown(name);
  if (!snapshot) {
    // Cannot happen by the naming rules (the core refuses a name that is
    // another's name or ID); the snapshot exists all the same.
    Log(LOG_ERR, "snapshot '%.*s' was taken but is not shown under that name",
        static_cast<int>(name.size()), name.data());
    return EIO;
  }
  Log(LOG_INFO, "took snapshot '%s' (ID %s) in %.1f ms", snapshot->info.name.c_str(),
      snapshot->info.id.c_str(), took.count());
  struct stat host;
  if (int err = HostStat(host)) return err;
  out = Entry{};
  out.ino = snapshot->dir_ino;
  out.generation = snapshot->generation;
  FillDirAttr(*snapshot, host, out.attr);
  out.entry_timeout = kNameTimeout;
  out.attr_timeout = kFixedTimeout;
  return 0;
}

int SnapshotDir::Drop(std::string_view name) {
  MutexLock lk(views_mu_);
  std::optional<Listed> snapshot = FindShown(name);
  if (!snapshot) return ENOENT;
  const std::string& id = snapshot->info.id;
  if (views_.contains(id)) return EBUSY;
  // By ID: the directory's name may be another snapshot's ID only when it
  // is this one's.
  Status status = image_.DeleteSnapshot(id);
  if (!status.ok()) {
    if (status.code() != ErrorCode::kBusy && status.code() != ErrorCode::kNotFound) {
      Log(LOG_ERR, "cannot drop snapshot '%s' (ID %s): %s", snapshot->info.name.c_str(), id.c_str(),
          status.ToString().c_str());
    }
    return status.ToErrno();
  }
  allocated_.erase(id);
  {
    MutexLock names(names_mu_);
    incarnations_.erase(id);
  }
  Log(LOG_INFO, "dropped snapshot '%s' (ID %s)", snapshot->info.name.c_str(), id.c_str());
  return 0;
}

void SnapshotDir::CloseAll() {
  MutexLock lk(views_mu_);
  views_.clear();
}

}  // namespace qcow2fs::fusefs
