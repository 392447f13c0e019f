// qcow2fs-img: inspect, check, convert and snapshot qcow2 images with the
// qcow2fs core, through its public API only. The command line follows
// qemu-img's where the two do the same thing.
#include <cstdio>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <string_view>

#include "args.h"
#include "commands.h"
#include "exit_codes.h"

#ifndef QCOW2FS_VERSION
#error "QCOW2FS_VERSION must be defined by the build"
#endif

namespace qcow2fs::img {
namespace {

constexpr char kHelp[] =
    "Usage: qcow2fs-img COMMAND [OPTIONS] IMAGE [ARGS]\n"
    "Inspect, check, convert and snapshot qcow2 disk images.\n"
    "\n"
    "Commands:\n"
    "  info     [--output=human|json] [--backing-chain] [-U] IMAGE\n"
    "           what the image is made of: sizes, features, backing file, snapshots\n"
    "  map      [--output=human|json] [-U] IMAGE\n"
    "           where each guest range is stored, through the backing chain\n"
    "  convert  [-p] [-U] [-l SNAPSHOT] IMAGE OUTPUT      (alias: dump)\n"
    "           write the guest disk to OUTPUT as a sparse raw file\n"
    "  check    [--output=human|json] [-r leaks|all] [-U] IMAGE\n"
    "           check the image's metadata; -r repairs it\n"
    "  snapshot list [--output=human|json] [-U] IMAGE\n"
    "  snapshot create|delete|apply IMAGE NAME\n"
    "           list, create, delete or revert to internal snapshots\n"
    "\n"
    "Options:\n"
    "  -h, --help      this help; 'qcow2fs-img COMMAND --help' for one command's\n"
    "  --version       the version\n"
    "  -U, --force-share\n"
    "                  open an image that is in use: read-only, without locks\n"
    "\n"
    "Exit status: 0 success; 1 failure or usage error; check: 2 corruptions\n"
    "found, 3 only leaked clusters found, 63 the format cannot be checked.\n"
    "See qcow2fs-img(1).\n";

struct Command {
  std::string_view name;
  int (*run)(const Args&);
};

constexpr Command kCommands[] = {
    {"info", RunInfo},    {"map", RunMap},     {"convert", RunConvert},
    {"dump", RunConvert}, {"check", RunCheck}, {"snapshot", RunSnapshot},
};

int Main(int argc, char** argv) {
  if (argc < 2) return UsageError("no command given");
  const std::string_view first = argv[1];
  if (first == "--help" || first == "-h" || first == "help") {
    std::fputs(kHelp, stdout);
    return kExitOk;
  }
  if (first == "--version" || first == "-V") {
    std::printf("qcow2fs-img %s\n", QCOW2FS_VERSION);
    return kExitOk;
  }
  if (!first.empty() && first[0] == '-') {
    return UsageError("unrecognized option '" + std::string(first) + "' (the command comes first)");
  }
  Args args(argv + 2, argv + argc);
  for (const Command& c : kCommands) {
    if (c.name == first) return c.run(args);
  }
  return UsageError("unknown command '" + std::string(first) + "'");
}

}  // namespace
}  // namespace qcow2fs::img

int main(int argc, char** argv) {
  try {
    return qcow2fs::img::Main(argc, argv);
  } catch (const std::bad_alloc&) {
    std::fputs("qcow2fs-img: out of memory\n", stderr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qcow2fs-img: %s\n", e.what());
  }
  return qcow2fs::img::kExitFailure;
}
