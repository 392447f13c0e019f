// The snapshot table as `info` and `snapshot list` print it: qemu-img's
// columns in text, qemu-img's keys in JSON.
#pragma once

#include <vector>

#include "json.h"
#include "qcow2fs/image.h"

namespace qcow2fs::img {

// The header line and one line per snapshot, on stdout.
void PrintSnapshotTable(const std::vector<SnapshotInfo>& snapshots);

// A JSON array of snapshot objects: id, name, vm-state-size, date-sec,
// date-nsec, vm-clock-sec, vm-clock-nsec (and the qcow2fs addition
// disk-size, the virtual size the snapshot was taken at).
void WriteSnapshotArray(JsonWriter& json, const std::vector<SnapshotInfo>& snapshots);

}  // namespace qcow2fs::img
