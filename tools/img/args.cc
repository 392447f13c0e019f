// Command-line parsing shared by every subcommand.
#include "args.h"

#include <cstdio>

#include "exit_codes.h"

namespace qcow2fs::img {
namespace {

std::string KeyOf(const OptionSpec& spec) {
  return spec.long_name.empty() ? std::string(1, spec.short_name) : std::string(spec.long_name);
}

}  // namespace

std::optional<std::string> ParsedArgs::value(std::string_view name) const {
  auto it = options.find(name);
  if (it == options.end()) return std::nullopt;
  return it->second;
}

ParsedArgs ParseArgs(const std::vector<std::string>& args, const std::vector<OptionSpec>& specs) {
  ParsedArgs out;
  auto fail = [&out](std::string message) {
    if (out.error.empty()) out.error = std::move(message);
  };
  bool options_done = false;
  for (size_t i = 0; i < args.size(); i++) {
    const std::string& a = args[i];
    if (options_done || a.size() < 2 || a[0] != '-') {
      out.operands.push_back(a);
      continue;
    }
    if (a == "--") {
      options_done = true;
      continue;
    }
    if (a[1] == '-') {
      const size_t eq = a.find('=');
      const std::string name = a.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      if (name == "help") {
        out.help = true;
        continue;
      }
      const OptionSpec* spec = nullptr;
      for (const auto& s : specs) {
        if (!s.long_name.empty() && s.long_name == name) spec = &s;
      }
      if (spec == nullptr) {
        fail("unrecognized option '--" + name + "'");
        continue;
      }
      if (!spec->takes_value) {
        if (eq != std::string::npos) fail("option '--" + name + "' takes no value");
        out.options[KeyOf(*spec)] = "";
      } else if (eq != std::string::npos) {
        out.options[KeyOf(*spec)] = a.substr(eq + 1);
      } else if (i + 1 < args.size()) {
        out.options[KeyOf(*spec)] = args[++i];
      } else {
        fail("option '--" + name + "' needs a value");
      }
      continue;
    }
    // One or more short options run together: -pU, -lNAME, -l NAME.
    for (size_t j = 1; j < a.size(); j++) {
      const char c = a[j];
      if (c == 'h') {
        out.help = true;
        continue;
      }
      const OptionSpec* spec = nullptr;
      for (const auto& s : specs) {
        if (s.short_name == c) spec = &s;
      }
      if (spec == nullptr) {
        fail(std::string("invalid option '-") + c + "'");
        break;
      }
      if (!spec->takes_value) {
        out.options[KeyOf(*spec)] = "";
        continue;
      }
      if (j + 1 < a.size()) {
        out.options[KeyOf(*spec)] = a.substr(j + 1);
      } else if (i + 1 < args.size()) {
        out.options[KeyOf(*spec)] = args[++i];
      } else {
        fail(std::string("option '-") + c + "' needs a value");
      }
      break;
    }
  }
  return out;
}

OutputFormat OutputFormatOf(ParsedArgs& parsed) {
  const auto v = parsed.value("output");
  if (!v || *v == "human") return OutputFormat::kHuman;
  if (*v == "json") return OutputFormat::kJson;
  if (parsed.error.empty()) {
    parsed.error = "--output must be 'human' or 'json', not '" + *v + "'";
  }
  return OutputFormat::kHuman;
}

void ExpectOperands(ParsedArgs& parsed, const std::vector<std::string_view>& names) {
  if (!parsed.error.empty()) return;
  if (parsed.operands.size() < names.size()) {
    parsed.error = "missing " + std::string(names[parsed.operands.size()]) + " operand";
  } else if (parsed.operands.size() > names.size()) {
    parsed.error = "unexpected operand '" + parsed.operands[names.size()] + "'";
  }
}

int UsageError(std::string_view message) {
  std::fprintf(stderr, "qcow2fs-img: %.*s\nTry 'qcow2fs-img --help'.\n",
               static_cast<int>(message.size()), message.data());
  return kExitUsage;
}

}  // namespace qcow2fs::img
