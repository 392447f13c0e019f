// The snapshot table as `info` and `snapshot list` print it.
#include "snapshot_table.h"

#include <cinttypes>
#include <cstdio>
#include <ctime>
#include <string>

#include "common.h"

namespace qcow2fs::img {
namespace {

constexpr uint64_t kNanosPerSecond = 1000000000;

std::string Date(uint64_t seconds) {
  const time_t t = static_cast<time_t>(seconds);
  struct tm local {};
  char buf[32];
  if (localtime_r(&t, &local) == nullptr ||
      std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &local) == 0) {
    return std::to_string(seconds);
  }
  return buf;
}

// Guest run time at the snapshot, hours:minutes:seconds.milliseconds.
std::string VmClock(uint64_t nanos) {
  const uint64_t ms = nanos / 1000000;
  char buf[48];
  std::snprintf(buf, sizeof buf, "%02" PRIu64 ":%02" PRIu64 ":%02" PRIu64 ".%03" PRIu64,
                ms / 3600000, ms / 60000 % 60, ms / 1000 % 60, ms % 1000);
  return buf;
}

}  // namespace

void PrintSnapshotTable(const std::vector<SnapshotInfo>& snapshots) {
  // Column widths as qemu-img's (without its ICOUNT column, which the
  // core does not read).
  std::printf("%-9s %-16s %8s %19s %12s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK");
  for (const SnapshotInfo& s : snapshots) {
    std::printf("%-9s %-16s %8s %19s %12s\n", s.id.c_str(), s.name.c_str(),
                HumanSize(s.vm_state_size).c_str(), Date(s.date_sec).c_str(),
                VmClock(s.vm_clock_nsec).c_str());
  }
}

void WriteSnapshotArray(JsonWriter& json, const std::vector<SnapshotInfo>& snapshots) {
  json.BeginArray();
  for (const SnapshotInfo& s : snapshots) {
    json.BeginObject();
    json.Field("id", s.id);
    json.Field("name", s.name);
    json.Field("vm-state-size", s.vm_state_size);
    json.Field("date-sec", s.date_sec);
    json.Field("date-nsec", uint64_t{s.date_nsec});
    json.Field("vm-clock-sec", s.vm_clock_nsec / kNanosPerSecond);
    json.Field("vm-clock-nsec", s.vm_clock_nsec % kNanosPerSecond);
    json.Field("disk-size", s.disk_size);
    json.EndObject();
  }
  json.EndArray();
}

}  // namespace qcow2fs::img
