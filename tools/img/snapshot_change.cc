// qcow2fs-img snapshot create|delete|apply: the actions that change the
// image's snapshot table, on the core's snapshot API.
#include <cstdio>
#include <string>
#include <string_view>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"

namespace qcow2fs::img {

// create, delete, apply: IMAGE NAME, no options.
int RunSnapshotChange(std::string_view action, const Args& args) {
  ParsedArgs parsed = ParseArgs(args, {});
  if (parsed.help) {
    std::fputs(kSnapshotHelp, stdout);
    return kExitOk;
  }
  ExpectOperands(parsed, {"IMAGE", action == "create" ? "NAME" : "ID|NAME"});
  if (parsed.error.empty() && parsed.operands[1].empty()) {
    parsed.error = "the snapshot name must not be empty";
  }
  if (!parsed.error.empty()) return UsageError(parsed.error);
  const std::string& path = parsed.operands[0];
  const std::string& name = parsed.operands[1];

  if (action == "apply") {
    const Status s = Image::ApplySnapshot(path, name);
    return s.ok() ? kExitOk : ReportError(s);
  }
  OpenOptions options;
  options.read_only = false;
  auto image = Image::Open(path, options);
  if (!image.ok()) return ReportError(image.status());
  Status s = action == "create" ? (*image)->CreateSnapshot(name) : (*image)->DeleteSnapshot(name);
  if (s.ok()) s = (*image)->Flush();
  return s.ok() ? kExitOk : ReportError(s);
}

}  // namespace qcow2fs::img
