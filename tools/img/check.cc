// qcow2fs-img check: the core's consistency check (and repair), reported
// as `qemu-img check` reports it, with its exit statuses.
#include <cinttypes>
#include <cstdio>
#include <string>

#include "args.h"
#include "commands.h"
#include "common.h"
#include "exit_codes.h"
#include "json.h"
#include "progress.h"
#include "qcow2fs/check.h"

namespace qcow2fs::img {

const char kCheckHelp[] =
    "Usage: qcow2fs-img check [--output=human|json] [-r leaks|all] [-U] IMAGE\n"
    "Check the metadata of the qcow2 image IMAGE: every table of the active\n"
    "state and of each snapshot, and the refcount of every host cluster\n"
    "against the references found. Each problem found is one line on\n"
    "standard error; the summary goes to standard output.\n"
    "\n"
    "  -r leaks           repair leaked clusters (refcounts above their\n"
    "                     references): space is reclaimed, no data changes\n"
    "  -r all             repair leaks and corruptions: refcounts are rebuilt\n"
    "                     from the tables; the image is checked again afterwards\n"
    "  --output=human|json  text as qemu-img prints it (default) or JSON\n"
    "  -U, --force-share  check an image in use: read-only, no locks (what it\n"
    "                     reports may be changing; not with -r)\n"
    "  -h, --help         this help\n"
    "\n"
    "Exit status: 0 no problem found; 1 the check could not be done; 2\n"
    "corruptions remain; 3 only leaked clusters remain (no harm to data);\n"
    "63 the image's format cannot be checked (raw).\n";

namespace {

void PrintLines(const std::vector<std::string>& lines) {
  for (const std::string& line : lines) std::fprintf(stderr, "%s\n", line.c_str());
}

double Percent(uint64_t part, uint64_t whole) {
  return whole == 0 ? 0.0 : 100.0 * static_cast<double>(part) / static_cast<double>(whole);
}

void PrintHumanSummary(const CheckReport& r) {
  if (r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0) {
    std::printf("No errors were found on the image.\n");
  } else {
    if (r.corruptions != 0) {
      std::printf("\n%" PRIu64
                  " errors were found on the image.\n"
                  "Data may be corrupted, or further writes to the image may corrupt it.\n",
                  r.corruptions);
    }
    if (r.leaks != 0) {
      std::printf("\n%" PRIu64
                  " leaked clusters were found on the image.\n"
                  "This means waste of disk space, but no harm to data.\n",
                  r.leaks);
    }
    if (r.check_errors != 0) {
      std::printf("\n%" PRIu64 " internal errors have occurred during the check.\n",
                  r.check_errors);
    }
  }
  if (r.total_clusters != 0 && r.allocated_clusters != 0) {
    std::printf("%" PRIu64 "/%" PRIu64
                " = %0.2f%% allocated, %0.2f%% fragmented, "
                "%0.2f%% compressed clusters\n",
                r.allocated_clusters, r.total_clusters,
                Percent(r.allocated_clusters, r.total_clusters),
                Percent(r.fragmented_clusters, r.allocated_clusters),
                Percent(r.compressed_clusters, r.allocated_clusters));
  }
  if (r.image_end_offset != 0) {
    std::printf("Image end offset: %" PRIu64 "\n", r.image_end_offset);
  }
}

void PrintJson(const CheckReport& r, const std::string& path) {
  JsonWriter json;
  json.BeginObject();
  json.Field("filename", path);
  json.Field("format", "qcow2");
  json.Field("check-errors", r.check_errors);
  // As qemu-img: the counters that are zero are left out.
  auto optional = [&json](const char* key, uint64_t value) {
    if (value != 0) json.Field(key, value);
  };
  optional("image-end-offset", r.image_end_offset);
  optional("corruptions", r.corruptions);
  optional("leaks", r.leaks);
  optional("corruptions-fixed", r.corruptions_fixed);
  optional("leaks-fixed", r.leaks_fixed);
  optional("total-clusters", r.total_clusters);
  optional("allocated-clusters", r.allocated_clusters);
  optional("fragmented-clusters", r.fragmented_clusters);
  optional("compressed-clusters", r.compressed_clusters);
  json.EndObject();
  std::printf("%s\n", json.str().c_str());
}

Result<CheckReport> RunCheckPass(const std::string& path, RepairMode mode, bool force_share,
                                 const char* label) {
  ProgressBar progress(label, true);
  CheckOptions options;
  options.repair = mode;
  options.force_share = force_share;
  if (progress.active()) {
    options.progress = [&progress](uint64_t done, uint64_t total) { progress.Update(done, total); };
  }
  auto report = CheckImage(path, options);
  progress.Finish();
  return report;
}

}  // namespace

int RunCheck(const Args& args) {
  ParsedArgs parsed =
      ParseArgs(args, {kOutputOption, kForceShareOption, OptionSpec{'r', "", true}});
  if (parsed.help) {
    std::fputs(kCheckHelp, stdout);
    return kExitOk;
  }
  const OutputFormat format = OutputFormatOf(parsed);
  ExpectOperands(parsed, {"IMAGE"});
  RepairMode mode = RepairMode::kNone;
  if (const auto r = parsed.value("r")) {
    if (*r == "leaks") {
      mode = RepairMode::kLeaks;
    } else if (*r == "all") {
      mode = RepairMode::kAll;
    } else if (parsed.error.empty()) {
      parsed.error = "-r must be 'leaks' or 'all', not '" + *r + "'";
    }
  }
  const bool force_share = parsed.has("force-share");
  if (force_share && mode != RepairMode::kNone && parsed.error.empty()) {
    parsed.error = "-U cannot be combined with -r: a repair needs the image to itself";
  }
  if (!parsed.error.empty()) return UsageError(parsed.error);
  const std::string& path = parsed.operands[0];

  // Only qcow2 has metadata to check; a raw file (or anything the core
  // takes for one) is reported as qemu-img does.
  {
    ReadOpen peek;
    peek.force_share = true;
    auto image = OpenReadOnly(path, peek);
    if (image.ok() && (*image)->info().format != "qcow2") {
      std::fprintf(stderr, "qcow2fs-img: %s: the %s format has nothing to check\n", path.c_str(),
                   (*image)->info().format.c_str());
      return kExitNotSupported;
    }
  }

  auto first = RunCheckPass(path, mode, force_share, "checking");
  if (!first.ok()) return ReportError(first.status());
  CheckReport report = std::move(first).value();
  PrintLines(report.messages);
  PrintLines(report.repairs);

  if (report.leaks_fixed != 0 || report.corruptions_fixed != 0 || report.refcounts_rebuilt) {
    if (format == OutputFormat::kHuman) {
      std::printf(
          "The following inconsistencies were found and repaired:\n\n"
          "    %" PRIu64
          " leaked clusters\n"
          "    %" PRIu64
          " corruptions\n\n"
          "Double checking the fixed image now...\n",
          report.leaks_fixed, report.corruptions_fixed);
      std::fflush(stdout);
    }
    // What is reported (and decides the exit status) is the image as the
    // repair left it, as with qemu-img.
    auto again = RunCheckPass(path, RepairMode::kNone, false, "double checking");
    if (!again.ok()) return ReportError(again.status().Annotate("checking the repaired image"));
    CheckReport after = std::move(again).value();
    PrintLines(after.messages);
    after.leaks_fixed = report.leaks_fixed;
    after.corruptions_fixed = report.corruptions_fixed;
    after.refcounts_rebuilt = report.refcounts_rebuilt;
    report = std::move(after);
  }

  if (format == OutputFormat::kJson) {
    PrintJson(report, path);
  } else {
    PrintHumanSummary(report);
  }
  if (std::fflush(stdout) != 0) return ReportError("writing standard output failed");
  return report.ExitCode();
}

}  // namespace qcow2fs::img
