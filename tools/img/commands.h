// The subcommands of qcow2fs-img: one Run function and one help text each,
// in one file each (info.cc, map.cc, convert.cc, check.cc, snapshot.cc).
//
// A Run function gets the words after the command name and returns the
// process exit status (exit_codes.h). It prints its own help for -h/--help.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qcow2fs::img {

using Args = std::vector<std::string>;

int RunInfo(const Args& args);
int RunMap(const Args& args);
int RunConvert(const Args& args);
int RunCheck(const Args& args);
int RunSnapshot(const Args& args);
// snapshot create|delete|apply (snapshot_change.cc).
int RunSnapshotChange(std::string_view action, const Args& args);

extern const char kInfoHelp[];
extern const char kMapHelp[];
extern const char kConvertHelp[];
extern const char kCheckHelp[];
extern const char kSnapshotHelp[];

}  // namespace qcow2fs::img
