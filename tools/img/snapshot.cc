// qcow2fs-img snapshot: list, create, delete and apply (revert to) internal
// snapshots, as `qemu-img snapshot -l/-c/-d/-a` do.
#include <cstdio>
#include <string>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"
#include "json.h"
#include "snapshot_table.h"

namespace qcow2fs::img {

const char kSnapshotHelp[] =
    "Usage: qcow2fs-img snapshot list [--output=human|json] [-U] IMAGE\n"
    "       qcow2fs-img snapshot create IMAGE NAME\n"
    "       qcow2fs-img snapshot delete IMAGE ID|NAME\n"
    "       qcow2fs-img snapshot apply IMAGE ID|NAME\n"
    "Work with the internal snapshots of the qcow2 image IMAGE.\n"
    "\n"
    "  list    the snapshot table: ID, name, VM state size, date, VM clock\n"
    "  create  take a snapshot of the current disk state, named NAME\n"
    "  delete  remove a snapshot, freeing the clusters only it used\n"
    "  apply   revert the disk to a snapshot (what was written since is lost)\n"
    "\n"
    "create, delete and apply change the image: it must not be in use.\n"
    "\n"
    "  --output=human|json  (list) text (default) or a JSON array with\n"
    "                       qemu-img's keys\n"
    "  -U, --force-share    (list) open an image in use: read-only, no locks\n"
    "  -h, --help           this help\n";

namespace {

int List(const Args& args) {
  ParsedArgs parsed = ParseArgs(args, {kOutputOption, kForceShareOption});
  if (parsed.help) {
    std::fputs(kSnapshotHelp, stdout);
    return kExitOk;
  }
  const OutputFormat format = OutputFormatOf(parsed);
  ExpectOperands(parsed, {"IMAGE"});
  if (!parsed.error.empty()) return UsageError(parsed.error);
  ReadOpen how;
  how.force_share = parsed.has("force-share");
  auto image = OpenReadOnly(parsed.operands[0], how);
  if (!image.ok()) return ReportError(image.status());
  const ImageInfo info = (*image)->info();
  if (format == OutputFormat::kJson) {
    JsonWriter json;
    WriteSnapshotArray(json, info.snapshots);
    std::printf("%s\n", json.str().c_str());
  } else if (!info.snapshots.empty()) {
    std::printf("Snapshot list:\n");
    PrintSnapshotTable(info.snapshots);
  }
  return std::fflush(stdout) == 0 ? kExitOk : ReportError("writing standard output failed");
}

}  // namespace

int RunSnapshot(const Args& args) {
  if (args.empty()) return UsageError("snapshot: missing action (list, create, delete or apply)");
  const std::string& action = args[0];
  if (action == "--help" || action == "-h") {
    std::fputs(kSnapshotHelp, stdout);
    return kExitOk;
  }
  const Args rest(args.begin() + 1, args.end());
  if (action == "list") return List(rest);
  if (action == "create" || action == "delete" || action == "apply") {
    return RunSnapshotChange(action, rest);
  }
  return UsageError("snapshot: unknown action '" + action + "' (list, create, delete or apply)");
}

}  // namespace qcow2fs::img
