// Mount table lookups and per-mount state files. See mount_state.h.
#include "mount_state.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

namespace qcow2fs::fusefs {
namespace {

constexpr const char kStateDir[] = "/run/qcow2fs";

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string Unescape(const std::string& field) {
  std::string out;
  for (size_t i = 0; i < field.size(); i++) {
    if (field[i] == '\\' && i + 3 < field.size() && field[i + 1] >= '0' && field[i + 1] <= '3' &&
        field[i + 2] >= '0' && field[i + 2] <= '7' && field[i + 3] >= '0' && field[i + 3] <= '7') {
      out += static_cast<char>((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 +
                               (field[i + 3] - '0'));
      i += 3;
    } else {
      out += field[i];
    }
  }
  return out;
}

std::vector<MountEntry> ReadMountTable() {
  std::vector<MountEntry> entries;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // ID PARENT MAJOR:MINOR ROOT TARGET OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
    std::istringstream fields(line);
    std::string id, parent, dev, root, target, options, word;
    if (!(fields >> id >> parent >> dev >> root >> target >> options)) continue;
    while (fields >> word && word != "-") {}
    std::string fstype, source;
    if (!(fields >> fstype >> source)) continue;
    entries.push_back({dev, Unescape(target), Unescape(fstype), Unescape(source)});
  }
  return entries;
}

std::string Escape(const std::string& path) {
  std::string out;
  for (char c : path) {
    if (c == '%') {
      out += "%25";
    } else if (c == '/') {
      out += "%2F";
    } else {
      out += c;
    }
  }
  if (out.size() <= 200) return out;
  // Too long for a file name: a hash of it (the record's dev and
  // mountpoint fields still say which mount it describes).
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : path) hash = (hash ^ c) * 0x100000001b3ull;
  char name[32];
  std::snprintf(name, sizeof name, "hash-%016" PRIx64, hash);
  return name;
}

bool WriteAll(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

constexpr const char kUtabDir[] = "/run/mount";
constexpr const char kUtab[] = "/run/mount/utab";
constexpr const char kUtabLock[] = "/run/mount/utab.lock";

// libmount's escaping of utab fields: space, tab, newline, backslash.
std::string Mangle(const std::string& field) {
  std::string out;
  for (char c : field) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\\') {
      char octal[5];
      std::snprintf(octal, sizeof octal, "\\%03o", static_cast<unsigned char>(c));
      out += octal;
    } else {
      out += c;
    }
  }
  return out;
}

// Rewrites utab under libmount's lock: drops the lines for `target` (and
// `source`, unless empty), then appends `add` (a whole line, or nothing).
Status RewriteUtab(const std::string& source, const std::string& target, const std::string& add) {
  if (mkdir(kUtabDir, 0755) != 0 && errno != EEXIST) return Status::FromErrno(errno, kUtabDir);
  int lock = open(kUtabLock, O_RDONLY | O_CREAT | O_CLOEXEC, 0644);
  if (lock < 0) return Status::FromErrno(errno, kUtabLock);
  while (flock(lock, LOCK_EX) != 0) {
    if (errno != EINTR) {
      Status status = Status::FromErrno(errno, kUtabLock);
      close(lock);
      return status;
    }
  }
  const std::string marker = "TARGET=" + Mangle(target) + " ";
  // When adding: entries of ours whose mount is gone (its daemon was
  // killed, the dead mount removed by fusermount3) go too.
  std::vector<MountEntry> mounts;
  if (!add.empty()) mounts = ReadMountTable();
  auto stale = [&mounts](const std::string& line) {
    if (mounts.empty() || line.find(" OPTS=helper=fuse.qcow2fs") == std::string::npos) return false;
    size_t start = line.find("TARGET=");
    if (start == std::string::npos) return false;
    start += 7;
    std::string mangled = line.substr(start, line.find(' ', start) - start);
    std::string line_target = Unescape(mangled);
    for (const MountEntry& m : mounts) {
      if (m.target == line_target && m.fstype == "fuse.qcow2fs") return false;
    }
    return true;
  };
  std::string text;
  bool changed = !add.empty();
  {
    std::ifstream in(kUtab);
    std::string line;
    while (std::getline(in, line)) {
      if ((line.find(marker) != std::string::npos &&
           (source.empty() || line.starts_with("SRC=" + Mangle(source) + " "))) ||
          stale(line)) {
        changed = true;
        continue;
      }
      text += line + "\n";
    }
  }
  text += add;
  Status status;
  if (changed) {
    std::string temporary = std::string(kUtab) + ".XXXXXX";
    int fd = mkostemp(temporary.data(), O_CLOEXEC);
    if (fd < 0) {
      status = Status::FromErrno(errno, kUtabDir);
    } else {
      if (fchmod(fd, 0644) != 0 || !WriteAll(fd, text) || rename(temporary.c_str(), kUtab) != 0) {
        status = Status::FromErrno(errno, kUtab);
        unlink(temporary.c_str());
      }
      close(fd);
    }
  }
  close(lock);
  return status;
}

}  // namespace

Status AddUtabEntry(const std::string& source, const std::string& target) {
  return RewriteUtab(
      "", target,
      "SRC=" + Mangle(source) + " TARGET=" + Mangle(target) + " ROOT=/ OPTS=helper=fuse.qcow2fs\n");
}

void RemoveUtabEntry(const std::string& source, const std::string& target) {
  (void)RewriteUtab(source, target, "");
}

std::optional<MountEntry> FindMount(const std::string& target) {
  std::optional<MountEntry> found;
  // Later lines are mounted later: the last match is the topmost mount.
  for (MountEntry& entry : ReadMountTable()) {
    if (entry.target == target) found = std::move(entry);
  }
  return found;
}

Result<bool> IsMountPoint(const std::string& path) {
  struct statx stx {};
  if (statx(AT_FDCWD, path.c_str(), AT_NO_AUTOMOUNT, STATX_BASIC_STATS, &stx) != 0) {
    // A FUSE mount whose daemon is gone.
    if (errno == ENOTCONN || errno == ECONNABORTED) return true;
    return Status::FromErrno(errno, "mount point " + path);
  }
  if (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT) {
    return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
  }
  // Kernels before 5.8: the mount table, by canonical path.
  char* real = realpath(path.c_str(), nullptr);
  if (real == nullptr) return Status::FromErrno(errno, "mount point " + path);
  std::string canonical(real);
  free(real);
  return FindMount(canonical).has_value();
}

std::optional<unsigned long long> ProcessStartTime(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return std::nullopt;
  // The command name, in parentheses, may hold anything: fields start after
  // the last ')'. Field 3 (state) follows; start time is field 22.
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream fields(stat.substr(paren + 1));
  std::string field;
  for (int i = 3; i < 22; i++) {
    if (!(fields >> field)) return std::nullopt;
  }
  unsigned long long start = 0;
  if (!(fields >> start)) return std::nullopt;
  return start;
}

std::string MountRecordPath(const std::string& mountpoint) {
  return std::string(kStateDir) + "/" + Escape(mountpoint);
}

namespace {

bool SameFile(int fd, const std::string& path) {
  struct stat open_st, path_st;
  return fstat(fd, &open_st) == 0 && stat(path.c_str(), &path_st) == 0 &&
         open_st.st_ino == path_st.st_ino && open_st.st_dev == path_st.st_dev;
}

// Records whose daemon is gone. Unlinking is safe even if a helper has one
// open: it reads through its descriptor.
void SweepMountRecords() {
  DIR* dir = opendir(kStateDir);
  if (dir == nullptr) return;
  while (dirent* entry = readdir(dir)) {
    if (entry->d_name[0] == '.' || std::strstr(entry->d_name, ".new.") != nullptr) continue;
    int fd = openat(dirfd(dir), entry->d_name, O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    std::optional<MountRecord> record = ReadMountRecord(fd);
    if (record && ProcessStartTime(record->pid) != record->start) {
      unlinkat(dirfd(dir), entry->d_name, 0);
    }
    close(fd);
  }
  closedir(dir);
}

}  // namespace

void RemoveMountRecord(int fd, const std::string& mountpoint) {
  const std::string path = MountRecordPath(mountpoint);
  if (SameFile(fd, path)) unlink(path.c_str());
}

Result<int> WriteMountRecord(const MountRecord& record) {
  if (mkdir(kStateDir, 0755) != 0 && errno != EEXIST) {
    return Status::FromErrno(errno, kStateDir);
  }
  SweepMountRecords();
  const std::string path = MountRecordPath(record.mountpoint);
  const std::string temporary = path + ".new." + std::to_string(getpid());
  int fd = open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, temporary);
  std::string text = "pid=" + std::to_string(record.pid) +
                     "\nstart=" + std::to_string(record.start) + "\ndev=" + record.dev +
                     "\nimage=" + record.image + "\nmountpoint=" + record.mountpoint + "\n";
  if (!WriteAll(fd, text) || rename(temporary.c_str(), path.c_str()) != 0) {
    Status status = Status::FromErrno(errno, path);
    close(fd);
    unlink(temporary.c_str());
    return status;
  }
  return fd;
}

void AppendExitStatus(int fd, int status) {
  if (lseek(fd, 0, SEEK_END) < 0) return;
  (void)WriteAll(fd, "exit=" + std::to_string(status) + "\n");
}

std::optional<MountRecord> ReadMountRecord(int fd) {
  std::string text;
  char buffer[4096];
  off_t offset = 0;
  while (true) {
    ssize_t n = pread(fd, buffer, sizeof buffer, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buffer, static_cast<size_t>(n));
    offset += n;
  }
  MountRecord record;
  bool has_pid = false;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    size_t eq = line.find('=');
    if (eq == std::string::npos) continue;
    std::string key = line.substr(0, eq), value = line.substr(eq + 1);
    try {
      if (key == "pid") {
        record.pid = static_cast<pid_t>(std::stol(value));
        has_pid = true;
      } else if (key == "start") {
        record.start = std::stoull(value);
      } else if (key == "dev") {
        record.dev = value;
      } else if (key == "image") {
        record.image = value;
      } else if (key == "mountpoint") {
        record.mountpoint = value;
      } else if (key == "exit") {
        record.exit_status = std::stoi(value);
      }
    } catch (const std::exception&) {
      return std::nullopt;
    }
  }
  if (!has_pid) return std::nullopt;
  return record;
}

}  // namespace qcow2fs::fusefs
