// libfuse session lifetime. See session.h.
#include "session.h"

#include <utility>

#include "log.h"

namespace qcow2fs::fusefs {
namespace {

// fuse_opt splits -o lists at commas; a literal comma (say, in the image
// path used as fsname) must be escaped, and so must the escape character.
std::string EscapeOption(const std::string& option) {
  std::string escaped;
  for (char c : option) {
    if (c == ',' || c == '\\') escaped += '\\';
    escaped += c;
  }
  return escaped;
}

}  // namespace

Result<std::unique_ptr<FuseSession>> FuseSession::Create(
    const std::vector<std::string>& mount_options, const fuse_lowlevel_ops& ops,
    void* userdata) {
  std::string joined;
  for (const std::string& option : mount_options) {
    if (!joined.empty()) joined += ',';
    joined += EscapeOption(option);
  }
  // fuse_args wants mutable C strings; these live until fuse_session_new
  // has copied what it keeps.
  std::string program = "qcow2fs";
  std::string dash_o = "-o";
  std::vector<char*> argv = {program.data(), dash_o.data(), joined.data(),
                             nullptr};
  fuse_args args = FUSE_ARGS_INIT(3, argv.data());

  LibfuseErrorCapture capture;
  fuse_session* session = fuse_session_new(&args, &ops, sizeof(ops), userdata);
  fuse_opt_free_args(&args);
  if (session == nullptr) {
    return Status(ErrorCode::kInvalidArgument,
                  "cannot set up the FUSE session: " + capture.errors());
  }
  return std::unique_ptr<FuseSession>(new FuseSession(session));
}

FuseSession::~FuseSession() {
  Unmount();
  fuse_session_destroy(session_);
}

Status FuseSession::Mount(const std::string& mountpoint) {
  LibfuseErrorCapture capture;
  if (fuse_session_mount(session_, mountpoint.c_str()) != 0) {
    std::string cause = capture.errors();
    return Status(ErrorCode::kIoError,
                  "cannot mount on " + mountpoint +
                      (cause.empty() ? std::string() : ": " + cause));
  }
  mounted_ = true;
  return Status::Ok();
}

void FuseSession::Unmount() {
  if (!mounted_) return;
  mounted_ = false;
  fuse_session_unmount(session_);
}

}  // namespace qcow2fs::fusefs
