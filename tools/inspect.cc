// qcow2fs-inspect: look into an image through the core's public API.
//
//   qcow2fs-inspect info IMAGE            header facts, snapshots, warnings
//   qcow2fs-inspect map IMAGE             how each guest range is stored
//   qcow2fs-inspect dump IMAGE [OUT]      the guest disk as raw bytes
//   qcow2fs-inspect read IMAGE OFF LEN    LEN bytes at OFF to stdout
// Options: --snapshot=ID|NAME reads an internal snapshot instead.
#include <fcntl.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "qcow2fs/image.h"

namespace {

int Usage() {
  std::fprintf(stderr,
               "usage: qcow2fs-inspect [--snapshot=NAME] info|map|dump|read "
               "IMAGE [ARGS]\n"
               "  info IMAGE           show header facts and snapshots\n"
               "  map IMAGE            show how guest ranges are stored\n"
               "  dump IMAGE [OUT]     write the guest disk as raw bytes\n"
               "  read IMAGE OFF LEN   write LEN bytes at OFF to stdout\n");
  return 2;
}

int Fail(const qcow2fs::Status& s) {
  std::fprintf(stderr, "qcow2fs-inspect: %s\n", s.ToString().c_str());
  return 1;
}

bool WriteAll(int fd, const std::byte* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

int Info(qcow2fs::Image& image) {
  const qcow2fs::ImageInfo i = image.info();
  std::printf("image:           %s\n", i.path.c_str());
  std::printf("format:          %s (version %d)\n", i.format.c_str(), i.version);
  std::printf("virtual size:    %" PRIu64 " bytes\n", i.virtual_size);
  std::printf("cluster size:    %u\n", i.cluster_size);
  std::printf("refcount bits:   %d\n", i.refcount_bits);
  std::printf("extended L2:     %s\n", i.extended_l2 ? "yes" : "no");
  std::printf("compression:     %s\n",
              i.compression == qcow2fs::CompressionType::kZstd ? "zstd" : "zlib");
  if (!i.backing_file.empty()) {
    std::printf("backing file:    %s (%s, format %s)\n", i.backing_file.c_str(),
                i.backing_file_resolved.c_str(),
                i.backing_format.empty() ? "probed" : i.backing_format.c_str());
  }
  if (!i.data_file.empty()) {
    std::printf("data file:       %s%s\n", i.data_file.c_str(),
                i.data_file_raw ? " (raw)" : "");
  }
  std::printf("allocated:       %" PRIu64 " bytes on the host\n",
              image.AllocatedBytes());
  for (const auto& s : i.snapshots) {
    std::printf("snapshot:        id %s name '%s' disk size %" PRIu64 "\n",
                s.id.c_str(), s.name.c_str(), s.disk_size);
  }
  for (const auto& w : i.warnings) std::printf("warning:         %s\n", w.c_str());
  return 0;
}

int Map(qcow2fs::Image& image) {
  std::printf("%-18s %-18s %-12s %s\n", "offset", "length", "kind", "host offset");
  for (uint64_t pos = 0; pos < image.size();) {
    auto st = image.GetBlockStatus(pos, image.size() - pos);
    if (!st.ok()) return Fail(st.status());
    const char* kind = st->kind == qcow2fs::BlockKind::kData
                           ? (st->compressed ? "compressed" : "data")
                       : st->kind == qcow2fs::BlockKind::kZero ? "zero"
                                                               : "unallocated";
    std::printf("0x%016" PRIx64 " 0x%016" PRIx64 " %-12s", pos, st->length, kind);
    if (st->host_offset) std::printf(" 0x%" PRIx64, *st->host_offset);
    std::printf("\n");
    pos += st->length;
  }
  return 0;
}

int Copy(qcow2fs::Image& image, uint64_t offset, uint64_t length, int fd) {
  std::vector<std::byte> buf(4 << 20);
  for (uint64_t done = 0; done < length;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), length - done));
    qcow2fs::Status s = image.Read(offset + done, {buf.data(), n});
    if (!s.ok()) return Fail(s);
    if (!WriteAll(fd, buf.data(), n)) {
      std::fprintf(stderr, "qcow2fs-inspect: write failed: %s\n", std::strerror(errno));
      return 1;
    }
    done += n;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  qcow2fs::OpenOptions options;
  std::vector<std::string> args;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a.rfind("--snapshot=", 0) == 0) {
      options.snapshot = a.substr(11);
    } else {
      args.push_back(a);
    }
  }
  if (args.size() < 2) return Usage();
  const std::string& cmd = args[0];
  auto image = qcow2fs::Image::Open(args[1], options);
  if (!image.ok()) return Fail(image.status());
  qcow2fs::Image& img = **image;
  if (cmd == "info" && args.size() == 2) return Info(img);
  if (cmd == "map" && args.size() == 2) return Map(img);
  if (cmd == "dump" && args.size() <= 3) {
    int fd = 1;
    if (args.size() == 3) {
      fd = ::open(args[2].c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd < 0) {
        std::fprintf(stderr, "qcow2fs-inspect: %s: %s\n", args[2].c_str(),
                     std::strerror(errno));
        return 1;
      }
    }
    int rc = Copy(img, 0, img.size(), fd);
    if (fd != 1 && ::close(fd) != 0) rc = 1;
    return rc;
  }
  if (cmd == "read" && args.size() == 4) {
    uint64_t off = std::stoull(args[2], nullptr, 0);
    uint64_t len = std::stoull(args[3], nullptr, 0);
    return Copy(img, off, len, 1);
  }
  return Usage();
}
