// Internal entry points for opening images over File objects.
//
// Image::Open resolves paths and opens host files; these functions take
// already opened files, so tests and the fuzzer can open images held in
// memory or wrapped in fault injection.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "io/file.h"
#include "qcow2fs/image.h"

namespace qcow2fs {

// Opens a file that is referenced by an image (backing or external data
// file): receives the name as stored in the image, resolved against the
// image's directory, and whether it must be writable.
using FileOpener =
    std::function<Result<std::unique_ptr<File>>(const std::string& resolved_path, bool writable)>;

// Opens `file` as a qcow2 image. `opener` is used for backing and external
// data files; `path` is the image's own path, for resolving relative names.
Result<std::unique_ptr<Image>> OpenQcow2(std::unique_ptr<File> file, const std::string& path,
                                         const OpenOptions& options, const FileOpener& opener);

// Opens `file` in the format options.format names, or probes it: the qcow2
// magic means qcow2, anything else raw. `chain_depth` counts backing levels
// above this image, to stop backing loops.
Result<std::unique_ptr<Image>> OpenImageFile(std::unique_ptr<File> file, const std::string& path,
                                             const OpenOptions& options, const FileOpener& opener,
                                             int chain_depth = 0);

// Wraps a file as a raw (read-only unless options say otherwise) image.
Result<std::unique_ptr<Image>> OpenRaw(std::unique_ptr<File> file, const OpenOptions& options);

// The default opener: host files through OpenPosixFile, direct or not.
FileOpener HostFileOpener(bool direct_io);

}  // namespace qcow2fs
