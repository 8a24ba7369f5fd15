// Flag parsing shared by the subcommands.
#pragma once

#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace registry_proxy {

// A small flag parser: --flag value, --flag=value, short aliases, boolean switches,
// positionals. Anything unknown is a usage error.

struct FlagSpec {
  std::string name;   // "--namespace"
  std::string alias;  // "-n" or ""
  bool takes_value = true;
};

struct ParsedArgs {
  std::map<std::string, std::string> values;  // by long name; "" for switches
  std::vector<std::string> positional;
  bool Has(const std::string& name) const { return values.count(name) != 0; }
  std::optional<std::string> Get(const std::string& name) const {
    auto it = values.find(name);
    if (it == values.end()) return std::nullopt;
    return it->second;
  }
};

// Parses `args`; on a usage error writes it to `err` and returns nullopt.
std::optional<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                                    const std::vector<FlagSpec>& specs, std::ostream& err);

}  // namespace registry_proxy
