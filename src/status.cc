// Status: construction, formatting and the errno mapping used at the border.
#include "qcow2fs/status.h"

#include <cstring>

namespace qcow2fs {

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "OK";
    case ErrorCode::kIoError:
      return "I/O error";
    case ErrorCode::kCorrupt:
      return "corrupt image";
    case ErrorCode::kInvalidArgument:
      return "invalid argument";
    case ErrorCode::kUnsupported:
      return "unsupported";
    case ErrorCode::kNoSpace:
      return "no space left";
    case ErrorCode::kReadOnly:
      return "read-only";
    case ErrorCode::kLocked:
      return "locked";
    case ErrorCode::kNotFound:
      return "not found";
    case ErrorCode::kOutOfRange:
      return "out of range";
    case ErrorCode::kAlreadyExists:
      return "already exists";
    case ErrorCode::kBusy:
      return "busy";
  }
  return "unknown error";
}

Status::Status(ErrorCode code, std::string message, int sys_errno) {
  if (code != ErrorCode::kOk) {
    rep_ = std::make_unique<Rep>(Rep{code, sys_errno, std::move(message)});
  }
}

Status Status::FromErrno(int err, std::string what) {
  ErrorCode code = (err == ENOSPC || err == EDQUOT) ? ErrorCode::kNoSpace
                   : err == ENOENT                  ? ErrorCode::kNotFound
                   : err == EROFS                   ? ErrorCode::kReadOnly
                                                    : ErrorCode::kIoError;
  return Status(code, std::move(what) + ": " + std::strerror(err), err);
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  return std::string(ErrorCodeName(rep_->code)) + ": " + rep_->message;
}

int Status::ToErrno() const {
  switch (code()) {
    case ErrorCode::kOk:
      return 0;
    case ErrorCode::kIoError:
      return rep_->sys_errno ? rep_->sys_errno : EIO;
    case ErrorCode::kCorrupt:
      return EIO;
    case ErrorCode::kInvalidArgument:
      return EINVAL;
    case ErrorCode::kUnsupported:
      return EOPNOTSUPP;
    case ErrorCode::kNoSpace:
      return ENOSPC;
    case ErrorCode::kReadOnly:
      return EROFS;
    case ErrorCode::kLocked:
      return EBUSY;
    case ErrorCode::kNotFound:
      return ENOENT;
    case ErrorCode::kOutOfRange:
      return EINVAL;
    case ErrorCode::kAlreadyExists:
      return EEXIST;
    case ErrorCode::kBusy:
      return EBUSY;
  }
  return EIO;
}

Status Status::Annotate(const std::string& context) const {
  if (ok()) return Status();
  return Status(rep_->code, context + ": " + rep_->message, rep_->sys_errno);
}

}  // namespace qcow2fs
