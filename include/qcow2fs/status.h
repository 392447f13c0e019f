// Status and Result: the error values the core returns instead of throwing.
//
// A Status is one pointer wide and costs nothing when OK; an error carries a
// code (what kind of failure, which decides the errno at the FUSE border), the
// errno of a failed system call where there was one, and a message that names
// the structure and offset at fault.
#pragma once

#include <cerrno>
#include <memory>
#include <optional>
#include <string>
#include <utility>

namespace qcow2fs {

enum class ErrorCode {
  kOk = 0,
  kIoError,          // the host file failed (sys_errno() says how)
  kCorrupt,          // on-disk metadata violates the format
  kInvalidArgument,  // the caller asked for something impossible
  kUnsupported,      // a valid image uses a feature qcow2fs does not implement
  kNoSpace,          // the host file system is full
  kReadOnly,         // the image is open read-only (or fenced after corruption)
  kLocked,           // another process holds the image
  kNotFound,         // a named file or snapshot does not exist
  kOutOfRange,       // a guest access past the virtual disk's end
  kAlreadyExists,    // a snapshot of that name exists
  kBusy,             // the object is in use (an open snapshot view)
};

const char* ErrorCodeName(ErrorCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(ErrorCode code, std::string message, int sys_errno = 0);

  static Status Ok() { return Status(); }
  // An error from a failed system call; ENOSPC/EDQUOT become kNoSpace.
  static Status FromErrno(int err, std::string what);

  bool ok() const { return rep_ == nullptr; }
  ErrorCode code() const { return rep_ ? rep_->code : ErrorCode::kOk; }
  int sys_errno() const { return rep_ ? rep_->sys_errno : 0; }
  const std::string& message() const;
  // "<code name>: <message>", or "OK".
  std::string ToString() const;
  // The errno a POSIX caller should see for this status.
  int ToErrno() const;

  // Prefixes context ("reading L2 table at 0x...: ") to an error; OK stays OK.
  Status Annotate(const std::string& context) const;

  Status(const Status& other) : rep_(other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr) {}
  Status& operator=(const Status& other) {
    if (this != &other) {
      rep_ = other.rep_ ? std::make_unique<Rep>(*other.rep_) : nullptr;
    }
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

 private:
  struct Rep {
    ErrorCode code;
    int sys_errno;
    std::string message;
  };
  std::unique_ptr<Rep> rep_;
};

// Either a value or an error Status. Accessing value() of an error is a
// programming error (asserted).
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}          // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {}  // NOLINT

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  Status take_status() { return std::move(status_); }

  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }
  T& operator*() { return *value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace qcow2fs

// Early return on error, for functions returning Status or Result<U>.
#define QCOW2FS_RETURN_IF_ERROR(expr)                  \
  do {                                                 \
    ::qcow2fs::Status qcow2fs_status_ = (expr);        \
    if (!qcow2fs_status_.ok()) return qcow2fs_status_; \
  } while (0)

#define QCOW2FS_CONCAT_INNER(a, b) a##b
#define QCOW2FS_CONCAT(a, b) QCOW2FS_CONCAT_INNER(a, b)
// Declares `lhs` from a Result-valued expression, returning its error if any.
// `lhs` is a declaration (`uint64_t x`), so it cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define QCOW2FS_ASSIGN_OR_RETURN(lhs, expr)                         \
  auto QCOW2FS_CONCAT(qcow2fs_result_, __LINE__) = (expr);          \
  if (!QCOW2FS_CONCAT(qcow2fs_result_, __LINE__).ok())              \
    return QCOW2FS_CONCAT(qcow2fs_result_, __LINE__).take_status(); \
  lhs = std::move(QCOW2FS_CONCAT(qcow2fs_result_, __LINE__)).value()
// NOLINTEND(bugprone-macro-parentheses)
