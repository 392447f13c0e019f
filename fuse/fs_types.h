// Plain results of the file system's work functions (raw_file_fs.h,
// snapshot_dir.h), filled without knowing the FUSE wire protocol and turned
// into replies by lowlevel_ops.cc.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <cstdint>
#include <string>

namespace qcow2fs::fusefs {

// A name resolved to an inode, for LOOKUP and MKDIR replies. The timeouts
// are how long the kernel may trust the name and the attributes: each kind
// of inode knows how often its own change.
struct Entry {
  fuse_ino_t ino = 0;
  // Distinguishes two inodes that had the same number at different times
  // (a snapshot deleted and another taken with the same ID): the kernel
  // drops what it cached of the old one instead of mixing the two.
  uint64_t generation = 0;
  struct stat attr {};
  double entry_timeout = 0;
  double attr_timeout = 0;
};

// One directory entry for READDIR. A listing resumed at offset `off`
// continues with the entries whose cookie is greater than `off`, and an
// entry is sent with its own cookie as the next offset: cookies that follow
// the entry rather than its position keep a listing from skipping or
// repeating names when the directory changes between two READDIR calls.
struct DirEntry {
  std::string name;
  fuse_ino_t ino;
  mode_t type;  // S_IFDIR or S_IFREG
  uint64_t cookie;
};

}  // namespace qcow2fs::fusefs
