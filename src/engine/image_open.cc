// Image::Open and the format probe: the entry from paths to Image objects.
#include "engine/image_open.h"

#include <cstring>
#include <optional>

#include "engine/image_lock.h"
#include "engine/qcow2_check.h"
#include "engine/qcow2_image.h"
#include "format/endian.h"
#include "format/header.h"
#include "io/owner_access.h"

namespace qcow2fs {
namespace {

// A writable open of an image left `dirty` (not closed cleanly while its
// refcounts were being changed: QEMU with lazy refcounts, or a snapshot's
// metadata step) repairs its refcounts first, as QEMU does on open: the check
// with RepairMode::kAll, which clears the dirty bit once the image is
// consistent. Returns the warning to show, or nothing for a clean image.
// An image also marked corrupt is left alone (it opens read-only and needs
// an explicit check -r all); a repair that fails leaves the dirty bit, so
// the image opens read-only, and says why.
std::optional<std::string> RepairIfDirty(File& file) {
  std::byte fields[80];
  if (!file.ReadAt(0, fields).ok() || LoadBe32(fields + header_field::kVersion) < 3) {
    return std::nullopt;
  }
  const uint64_t incompatible = LoadBe64(fields + header_field::kIncompatibleFeatures);
  if (!(incompatible & kIncompatDirty) || (incompatible & kIncompatCorrupt)) {
    return std::nullopt;
  }
  CheckOptions options;
  options.repair = RepairMode::kAll;
  auto report = CheckQcow2File(file, options);
  if (!report.ok()) {
    return "image was not closed cleanly (dirty) and repairing its refcounts failed (" +
           report.status().ToString() + "); opened read-only";
  }
  if (report->corruptions != 0 || report->check_errors != 0) {
    return "image was not closed cleanly (dirty) and its refcounts could not be fully "
           "repaired (" +
           std::to_string(report->corruptions) + " corruptions, " +
           std::to_string(report->check_errors) +
           " check errors remain); opened read-only: run 'qcow2fs-img check -r all'";
  }
  return "image was not closed cleanly (dirty); refcounts repaired: " +
         std::to_string(report->leaks_fixed) + " leaks, " +
         std::to_string(report->corruptions_fixed) + " corruptions fixed";
}

}  // namespace

FileOpener HostFileOpener(bool direct_io) {
  return [direct_io](const std::string& path, bool writable) {
    return OpenPosixFile(path, writable, direct_io);
  };
}

Result<std::unique_ptr<Image>> OpenImageFile(std::unique_ptr<File> file, const std::string& path,
                                             const OpenOptions& options, const FileOpener& opener,
                                             int chain_depth) {
  std::byte magic[4];
  QCOW2FS_RETURN_IF_ERROR(file->ReadAt(0, magic));
  const bool is_qcow2 = LoadBe32(magic) == kQcow2Magic;
  if (options.format == "qcow2" && !is_qcow2) {
    return Status(ErrorCode::kInvalidArgument, path + " is not a qcow2 image");
  }
  if (!options.format.empty() && options.format != "qcow2" && options.format != "raw") {
    return Status(ErrorCode::kUnsupported,
                  "image format '" + options.format + "' is not supported");
  }
  if (options.lock && file->fd() >= 0) {
    QCOW2FS_RETURN_IF_ERROR(
        LockImageFile(file->fd(), path, !options.read_only && !options.snapshot));
  }
  if (is_qcow2 && options.format != "raw") {
    std::optional<std::string> repaired;
    if (!options.read_only && !options.snapshot) repaired = RepairIfDirty(*file);
    auto image = Qcow2Image::Open(std::move(file), path, options, opener, chain_depth);
    if (image.ok() && repaired) {
      static_cast<Qcow2Image*>(image->get())->AddWarning(std::move(*repaired));
    }
    return image;
  }
  return OpenRaw(std::move(file), options);
}

Result<std::unique_ptr<Image>> OpenQcow2(std::unique_ptr<File> file, const std::string& path,
                                         const OpenOptions& options, const FileOpener& opener) {
  OpenOptions o = options;
  o.format = "qcow2";
  return OpenImageFile(std::move(file), path, o, opener);
}

Result<std::unique_ptr<Image>> Image::Open(const std::string& path, const OpenOptions& options) {
  const bool writable = !options.read_only && !options.snapshot;
  QCOW2FS_ASSIGN_OR_RETURN(auto file, OpenPosixFile(path, writable, options.direct_io));
  FileOpener opener = HostFileOpener(options.direct_io);
  // Root opening another user's image follows the names inside it with that
  // user's rights (io/owner_access.h).
  if (auto owner = ForeignOwnerOf(file->fd())) {
    opener = [base = std::move(opener), owner = *owner](const std::string& p, bool w) {
      return OpenAsOwner(owner, [&] { return base(p, w); });
    };
  }
  return OpenImageFile(std::move(file), path, options, opener);
}

}  // namespace qcow2fs
