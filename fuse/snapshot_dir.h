// The hidden directory `.snapshots/` of a mount: one directory per internal
// snapshot of the image, holding that snapshot's disk as a read-only file
// of the same name as the live one. `mkdir .snapshots/NAME` takes a
// snapshot, `rmdir .snapshots/NAME` drops one.
//
// Names. A snapshot appears under its name when that is a usable file name
// (not empty, ".", "..", longer than NAME_MAX, nor holding '/' or NUL),
// no other snapshot has the same name and none has it as its ID; otherwise
// under its ID. IDs are unique in the table, so every snapshot has exactly
// one directory (one whose ID is not a usable file name either, which only
// a hand-made table can hold, is not shown).
//
// Inode numbers. .snapshots is kDirIno. A snapshot whose ID is a decimal
// number n (QEMU's, and ours, always are) has directory kFirstSnapshotIno +
// 2n and file one more, the same in every mount; any other ID gets a pair
// from kOtherIdIno up, for the life of the mount. All lie above the live
// file's. Because IDs are reused (drop the newest snapshot, take another),
// each snapshot also gets a generation, new for each snapshot seen under an
// ID, so that the kernel never mixes an old snapshot's cached pages or
// attributes with a new one's.
//
// Views. A snapshot's disk is read through Image::OpenSnapshot, opened on
// the first open(2) of its file and closed with the last close, so that
// rmdir can tell it is in use (EBUSY). Reads take no lock here: a handle
// points at its view, which lives until the handle is released.
//
// Thread safety: every method may run on many threads at once.
// Lock order: views_mu_, then names_mu_ (ACQUIRED_BEFORE below), then the
// image's own locks: views_mu_ is held across calls into the image
// (opening a view, taking and dropping a snapshot, counting a snapshot's
// blocks), names_mu_ never is. Neither is held while calling into the
// RawFileFs, and the core calls nothing back.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "fs_types.h"
#include "mutex.h"
#include "qcow2fs/image.h"
#include "thread_annotations.h"

namespace qcow2fs::fusefs {

class SnapshotDir {
 public:
  static constexpr fuse_ino_t kDirIno = FUSE_ROOT_ID + 2;
  static constexpr std::string_view kDirName = ".snapshots";
  static constexpr fuse_ino_t kFirstSnapshotIno = 16;
  // Decimal IDs below this map to fixed inode numbers.
  static constexpr uint64_t kMaxNumericId = uint64_t{1} << 40;
  static constexpr fuse_ino_t kOtherIdIno = fuse_ino_t{1} << 48;

  // `image` is the live image and must outlive CloseAll(); `image_path_fd`
  // an O_PATH descriptor of its file (owner, mode); `file_name` the name of
  // each snapshot's disk file; `block_size` the files' st_blksize.
  SnapshotDir(Image& image, int image_path_fd, std::string file_name, bool read_only,
              uint32_t block_size);
  ~SnapshotDir();
  SnapshotDir(const SnapshotDir&) = delete;
  SnapshotDir& operator=(const SnapshotDir&) = delete;

  // Whether `ino` is .snapshots or lies inside it.
  static bool Owns(fuse_ino_t ino) { return ino >= kDirIno; }
  // Whether `ino` names a snapshot's disk file (rather than a directory).
  static bool IsFile(fuse_ino_t ino) { return ino >= kFirstSnapshotIno && ino % 2 == 1; }
  // The directory name each snapshot gets (empty: not shown), in the
  // table's order. Pure; see the rules above.
  static std::vector<std::string> ShownNames(const std::vector<SnapshotInfo>& snapshots);

  // .snapshots as an entry of the root directory.
  int RootEntry(Entry& out);
  // `parent` must be owned by this directory.
  int Lookup(fuse_ino_t parent, std::string_view name, Entry& out);
  int GetAttr(fuse_ino_t ino, struct stat& attr, double& attr_timeout);
  int OpenDir(fuse_ino_t ino) const;
  int ReadDir(fuse_ino_t ino, std::vector<DirEntry>& entries);

  // Opens a snapshot's disk for reading (EROFS for any other access mode).
  // `handle` identifies the open view until Release(handle).
  int Open(fuse_ino_t ino, int flags, uint64_t& handle) EXCLUDES(views_mu_);
  void Release(uint64_t handle) EXCLUDES(views_mu_);
  // The snapshot's disk behind an open handle, valid until it is released.
  static Image& ViewOf(uint64_t handle);

  // Whether a snapshot is shown under `name` (EEXIST before any work).
  bool Shows(std::string_view name);
  // Takes a snapshot of the live disk named `name` and describes its new
  // directory. The caller has written out everything acknowledged before.
  int Take(std::string_view name, Entry& out) EXCLUDES(views_mu_);
  // Drops the snapshot shown under `name`: EBUSY while its file is open.
  int Drop(std::string_view name) EXCLUDES(views_mu_);
  // Closes every view, whatever handles are left: before the image closes.
  void CloseAll() EXCLUDES(views_mu_);

 private:
  struct View;
  // A snapshot as this directory shows it.
  struct Listed {
    SnapshotInfo info;
    std::string shown;
    fuse_ino_t dir_ino = 0;
    uint64_t generation = 0;
  };
  // Which snapshot a generation belongs to: the fields that tell two
  // snapshots with the same ID apart.
  struct Incarnation {
    std::string name;
    uint64_t date_sec = 0;
    uint32_t date_nsec = 0;
    uint64_t vm_clock_nsec = 0;
    uint64_t disk_size = 0;
    uint64_t generation = 0;
  };
  struct Allocated {
    uint64_t generation = 0;
    uint64_t bytes = 0;
  };

  // The snapshots shown, in the table's order, with inodes and generations.
  // Called with or without views_mu_.
  std::vector<Listed> List() EXCLUDES(names_mu_);
  std::optional<Listed> FindShown(std::string_view name) EXCLUDES(names_mu_);
  std::optional<Listed> FindByDirIno(fuse_ino_t dir_ino) EXCLUDES(names_mu_);
  // Inode number of a snapshot's directory.
  fuse_ino_t DirInoLocked(const std::string& id) REQUIRES(names_mu_);
  int HostStat(struct stat& host) const;
  void FillDirAttr(const Listed& snapshot, const struct stat& host, struct stat& attr) const;
  void FillFileAttr(const Listed& snapshot, const struct stat& host, uint64_t allocated,
                    struct stat& attr) const;
  int FileEntry(const Listed& snapshot, Entry& out) EXCLUDES(views_mu_);
  // Bytes of the snapshot's disk allocated in this image (data clusters,
  // as GetBlockStatus reports them), for st_blocks: computed once per
  // snapshot, since its content never changes. 0 if that fails (logged).
  uint64_t AllocatedBytes(const Listed& snapshot) EXCLUDES(views_mu_);

  Image& image_;
  const int image_path_fd_;
  const std::string file_name_;
  const bool read_only_;
  const uint32_t block_size_;

  // Held across opening, taking and dropping snapshots, so that a name
  // resolved to an ID still means that snapshot when the view opens, and a
  // drop sees every open view.
  Mutex views_mu_ ACQUIRED_BEFORE(names_mu_);
  // By ID; open ones only. A View's `opens` is guarded by views_mu_ too
  // (it is reached only through this map); its image is not.
  std::map<std::string, std::unique_ptr<View>> views_ GUARDED_BY(views_mu_);
  std::map<std::string, Allocated> allocated_ GUARDED_BY(views_mu_);  // by ID

  Mutex names_mu_;
  std::map<std::string, fuse_ino_t> other_inos_ GUARDED_BY(names_mu_);     // non-decimal IDs
  std::map<std::string, Incarnation> incarnations_ GUARDED_BY(names_mu_);  // by ID
  uint64_t next_generation_ GUARDED_BY(names_mu_) = 1;
};

}  // namespace qcow2fs::fusefs
