// Qcow2Image write path (being written).
#include "engine/qcow2_image.h"

namespace qcow2fs {

static Status NotYet() {
  return Status(ErrorCode::kReadOnly, "writing is not available yet");
}
Status Qcow2Image::Write(uint64_t, std::span<const std::byte>) { return NotYet(); }
Status Qcow2Image::WriteZeroes(uint64_t, uint64_t, bool) { return NotYet(); }
Status Qcow2Image::Discard(uint64_t, uint64_t) { return NotYet(); }
Status Qcow2Image::Flush() { return Status(); }
Status Qcow2Image::Resize(uint64_t) { return NotYet(); }
Status Image::Create(const std::string&, const CreateOptions&) { return NotYet(); }

}  // namespace qcow2fs
