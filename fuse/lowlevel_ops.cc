// Request decoding and replies: the border between libfuse's C callbacks and
// RawFileFs. Every callback has the same shape: decode, run the work
// function under Guarded() (so no exception reaches C code), trace, then
// send exactly one fuse_reply_*: the error, or the success payload.
//
// These run on the request pool's threads, one request per call, and are
// done with the request (and its buffer) when they return.
#include "lowlevel_ops.h"

#include <fcntl.h>

#include <cerrno>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <span>
#include <vector>

#include "log.h"
#include "raw_file_fs.h"

namespace qcow2fs::fusefs {
namespace {

RawFileFs& Fs(fuse_req_t req) { return *static_cast<RawFileFs*>(fuse_req_userdata(req)); }

// Runs a work function at the C border.
template <typename Work>
int Guarded(Work&& work) noexcept {
  try {
    return work();
  } catch (const std::bad_alloc&) {
    return ENOMEM;
  } catch (const std::exception& e) {
    Log(LOG_ERR, "internal error: %s", e.what());
    return EIO;
  } catch (...) {
    Log(LOG_ERR, "internal error: unknown exception");
    return EIO;
  }
}

// With -d, one line per request: operation, arguments, outcome, caller.
__attribute__((format(printf, 4, 5))) void Trace(fuse_req_t req, const char* op, int err,
                                                 const char* format, ...) noexcept {
  if (!Fs(req).config().debug) return;
  char args[256];
  va_list list;
  va_start(list, format);
  std::vsnprintf(args, sizeof(args), format, list);
  va_end(list);
  const char* outcome = err == 0 ? "OK" : strerrorname_np(err);
  Log(LOG_DEBUG, "%s %s -> %s (pid %d)", op, args, outcome != nullptr ? outcome : "?",
      static_cast<int>(fuse_req_ctx(req)->pid));
}

uint64_t Ino(fuse_ino_t ino) { return static_cast<uint64_t>(ino); }
intmax_t Off(off_t off) { return static_cast<intmax_t>(off); }

void OnInit(void* userdata, fuse_conn_info* conn) noexcept {
  static_cast<RawFileFs*>(userdata)->ConfigureConnection(*conn);
}

void OnDestroy(void* userdata) noexcept {
  Guarded([&] {
    static_cast<RawFileFs*>(userdata)->Shutdown();
    return 0;
  });
}

// An Entry as libfuse sends it.
fuse_entry_param EntryParam(const Entry& entry) {
  fuse_entry_param param{};
  param.ino = entry.ino;
  param.generation = entry.generation;
  param.attr = entry.attr;
  param.attr_timeout = entry.attr_timeout;
  param.entry_timeout = entry.entry_timeout;
  return param;
}

void OnLookup(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  Entry entry;
  int err = Guarded([&] { return Fs(req).Lookup(parent, name, entry); });
  Trace(req, "LOOKUP", err, "parent=%" PRIu64 " name=%s", Ino(parent), name);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_entry_param param = EntryParam(entry);
  fuse_reply_entry(req, &param);
}

void OnGetAttr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) noexcept {
  struct stat attr;
  double timeout = 0;
  int err = Guarded([&] { return Fs(req).GetAttr(ino, attr, timeout); });
  Trace(req, "GETATTR", err, "ino=%" PRIu64, Ino(ino));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_attr(req, &attr, timeout);
}

void OnSetAttr(fuse_req_t req, fuse_ino_t ino, struct stat* wanted, int to_set,
               fuse_file_info*) noexcept {
  struct stat attr;
  double timeout = 0;
  int err = Guarded([&] { return Fs(req).SetAttr(ino, *wanted, to_set, attr, timeout); });
  Trace(req, "SETATTR", err, "ino=%" PRIu64 " to_set=0x%x size=%jd", Ino(ino),
        static_cast<unsigned>(to_set), Off(wanted->st_size));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_attr(req, &attr, timeout);
}

// mkdir .snapshots/NAME takes a snapshot, answered like a LOOKUP of it.
void OnMkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) noexcept {
  Entry entry;
  int err = Guarded([&] { return Fs(req).Mkdir(parent, name, entry); });
  Trace(req, "MKDIR", err, "parent=%" PRIu64 " name=%s mode=0%o", Ino(parent), name,
        static_cast<unsigned>(mode));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_entry_param param = EntryParam(entry);
  fuse_reply_entry(req, &param);
}

void OnRmdir(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  int err = Guarded([&] { return Fs(req).Rmdir(parent, name); });
  Trace(req, "RMDIR", err, "parent=%" PRIu64 " name=%s", Ino(parent), name);
  fuse_reply_err(req, err);
}

void OnOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  uint64_t handle = 0;
  int err = Guarded([&] { return Fs(req).Open(ino, fi->flags, handle); });
  Trace(req, "OPEN", err, "ino=%" PRIu64 " flags=0%o", Ino(ino), static_cast<unsigned>(fi->flags));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fi->fh = handle;
  // Only this daemon changes the image, and the kernel drops the pages
  // that a direct write, hole punch or truncate makes stale; what is cached
  // from an earlier open is still right. A snapshot's pages never go stale.
  fi->keep_cache = 1;
  // Closing needs no round trip, unless FLUSH may have a failed queued
  // write or background commit to report to a writer.
  fi->noflush = Fs(req).WantsFlush(fi->flags) ? 0 : 1;
  fuse_reply_open(req, fi);
}

void OnRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) noexcept {
  ReadBuffer data;
  int err = Guarded([&] {
    return off < 0 ? EINVAL : Fs(req).Read(ino, fi->fh, static_cast<uint64_t>(off), size, data);
  });
  Trace(req, "READ", err, "off=%jd size=%zu got=%zu", Off(off), size, data.size);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_buf(req, reinterpret_cast<const char*>(data.data), data.size);
}

void OnWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off,
             fuse_file_info*) noexcept {
  // `buf` points into the request's own buffer, which the pool keeps until
  // this callback returns; the core has consumed the data by then.
  size_t written = 0;
  int err = Guarded([&] {
    return off < 0 ? EINVAL
                   : Fs(req).Write(ino, static_cast<uint64_t>(off),
                                   std::as_bytes(std::span(buf, size)), written);
  });
  Trace(req, "WRITE", err, "off=%jd size=%zu written=%zu", Off(off), size, written);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_write(req, written);
}

// FLUSH (close) does not flush the image: close() does not promise
// durability; fsync() does. It waits for the write-behind queue and reports
// a queued write or background commit that failed, so that a writer that
// never fsyncs (cp) learns of it, as NFS reports write-back errors at
// close. RELEASE closes a snapshot's view with its last handle;
// RELEASEDIR has nothing to do.
void OnFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) noexcept {
  int err = Guarded([&] { return Fs(req).Flush(ino); });
  Trace(req, "FLUSH", err, "ino=%" PRIu64, Ino(ino));
  fuse_reply_err(req, err);
}

void OnRelease(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  int err = Guarded([&] {
    Fs(req).Release(ino, fi->fh);
    return 0;
  });
  Trace(req, "RELEASE", err, "ino=%" PRIu64, Ino(ino));
  fuse_reply_err(req, err);
}

void OnFsync(fuse_req_t req, fuse_ino_t ino, int datasync, fuse_file_info*) noexcept {
  // fdatasync and fsync are the same here: the metadata that matters is the
  // image's own, and Flush writes it either way.
  int err = Guarded([&] { return Fs(req).Fsync(ino); });
  Trace(req, "FSYNC", err, "ino=%" PRIu64 " datasync=%d", Ino(ino), datasync);
  fuse_reply_err(req, err);
}

void OnOpenDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  bool cache_listing = false;
  int err = Guarded([&] { return Fs(req).OpenDir(ino, cache_listing); });
  Trace(req, "OPENDIR", err, "ino=%" PRIu64, Ino(ino));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fi->cache_readdir = cache_listing ? 1 : 0;
  fuse_reply_open(req, fi);
}

void OnReadDir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) noexcept {
  std::vector<char> buf;
  size_t used = 0;
  int err = Guarded([&] {
    std::vector<DirEntry> entries;
    if (int e = Fs(req).ReadDir(ino, entries)) return e;
    if (off < 0) return EINVAL;
    buf.resize(size);
    // Resumes after the last entry sent (see DirEntry).
    for (const DirEntry& entry : entries) {
      if (entry.cookie <= static_cast<uint64_t>(off)) continue;
      struct stat attr {};
      attr.st_ino = entry.ino;
      attr.st_mode = entry.type;
      size_t needed = fuse_add_direntry(req, buf.data() + used, size - used, entry.name.c_str(),
                                        &attr, static_cast<off_t>(entry.cookie));
      if (needed > size - used) break;
      used += needed;
    }
    return 0;
  });
  Trace(req, "READDIR", err, "ino=%" PRIu64 " off=%jd size=%zu", Ino(ino), Off(off), size);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void OnReleaseDir(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) noexcept {
  Trace(req, "RELEASEDIR", 0, "ino=%" PRIu64, Ino(ino));
  fuse_reply_err(req, 0);
}

// Commits on .snapshots (a snapshot just taken or dropped reaches the
// disk); the other directories have no state to write.
void OnFsyncDir(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) noexcept {
  int err = Guarded([&] { return Fs(req).FsyncDir(ino); });
  Trace(req, "FSYNCDIR", err, "ino=%" PRIu64, Ino(ino));
  fuse_reply_err(req, err);
}

void OnStatFs(fuse_req_t req, fuse_ino_t ino) noexcept {
  struct statvfs stats;
  int err = Guarded([&] { return Fs(req).StatFs(stats); });
  Trace(req, "STATFS", err, "ino=%" PRIu64, Ino(ino));
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_statfs(req, &stats);
}

void OnFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
                 fuse_file_info*) noexcept {
  int err = Guarded([&] {
    if (offset < 0 || length <= 0) return EINVAL;
    return Fs(req).Fallocate(ino, mode, static_cast<uint64_t>(offset),
                             static_cast<uint64_t>(length));
  });
  Trace(req, "FALLOCATE", err, "mode=0x%x off=%jd len=%jd", static_cast<unsigned>(mode),
        Off(offset), Off(length));
  fuse_reply_err(req, err);
}

void OnLseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info* fi) noexcept {
  uint64_t result = 0;
  int err = Guarded([&] {
    return off < 0 ? ENXIO : Fs(req).Lseek(ino, fi->fh, static_cast<uint64_t>(off), whence, result);
  });
  Trace(req, "LSEEK", err, "off=%jd whence=%s -> %" PRIu64, Off(off),
        whence == SEEK_DATA   ? "DATA"
        : whence == SEEK_HOLE ? "HOLE"
                              : "?",
        result);
  if (err != 0) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_reply_lseek(req, static_cast<off_t>(result));
}

}  // namespace

const fuse_lowlevel_ops& LowLevelOps() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops table{};
    table.init = OnInit;
    table.destroy = OnDestroy;
    table.lookup = OnLookup;
    table.getattr = OnGetAttr;
    table.setattr = OnSetAttr;
    table.mkdir = OnMkdir;
    table.rmdir = OnRmdir;
    table.open = OnOpen;
    table.read = OnRead;
    table.write = OnWrite;
    table.flush = OnFlush;
    table.release = OnRelease;
    table.fsync = OnFsync;
    table.opendir = OnOpenDir;
    table.readdir = OnReadDir;
    table.releasedir = OnReleaseDir;
    table.fsyncdir = OnFsyncDir;
    table.statfs = OnStatFs;
    table.fallocate = OnFallocate;
    table.lseek = OnLseek;
    return table;
  }();
  return ops;
}

}  // namespace qcow2fs::fusefs
