// Command-line parsing shared by every subcommand: GNU-style short and long
// options, anywhere among the operands, `--` ending them.
//
// Accepted spellings: -U, -pU (flags run together), -l NAME, -lNAME,
// --output=json, --output json. A usage error is one line for the user;
// the caller prints it with "Try 'qcow2fs-img --help'.".
#pragma once

#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qcow2fs::img {

struct OptionSpec {
  char short_name = 0;         // 0: long form only
  std::string_view long_name;  // "" : short form only
  bool takes_value = false;
};

struct ParsedArgs {
  // Options seen, by long name (or the short letter where there is no long
  // name); a flag's value is "". The last occurrence wins.
  std::map<std::string, std::string, std::less<>> options;
  std::vector<std::string> operands;
  bool help = false;  // -h or --help was given (always accepted)
  std::string error;  // non-empty: a usage error, one line

  bool has(std::string_view name) const { return options.find(name) != options.end(); }
  std::optional<std::string> value(std::string_view name) const;
};

// Parses `args` (the words after the command name) against `specs`.
ParsedArgs ParseArgs(const std::vector<std::string>& args, const std::vector<OptionSpec>& specs);

// The options most commands share.
inline constexpr OptionSpec kOutputOption{0, "output", true};
inline constexpr OptionSpec kForceShareOption{'U', "force-share", false};

enum class OutputFormat { kHuman, kJson };

// Reads --output; sets `error` for anything but human or json.
OutputFormat OutputFormatOf(ParsedArgs& parsed);

// Prints a usage error (one line, then the pointer to --help) on stderr and
// returns the usage exit status.
int UsageError(std::string_view message);

// Checks the operand count; on a mismatch sets `error` naming what is
// missing or extra. `names` describes the operands ("IMAGE", "OUTPUT").
void ExpectOperands(ParsedArgs& parsed, const std::vector<std::string_view>& names);

}  // namespace qcow2fs::img
