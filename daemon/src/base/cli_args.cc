#include "base/cli_args.h"

namespace registry_proxy {

std::optional<ParsedArgs> ParseArgs(const std::vector<std::string>& args,
                                    const std::vector<FlagSpec>& specs, std::ostream& err) {
  ParsedArgs out;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--") {
      out.positional.insert(out.positional.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (a.size() < 2 || a[0] != '-') {
      out.positional.push_back(a);
      continue;
    }
    std::string name = a, value;
    bool inline_value = false;
    if (size_t eq = a.find('='); a.rfind("--", 0) == 0 && eq != std::string::npos) {
      name = a.substr(0, eq);
      value = a.substr(eq + 1);
      inline_value = true;
    }
    const FlagSpec* spec = nullptr;
    for (const auto& s : specs) {
      if (s.name == name || (!s.alias.empty() && s.alias == name)) spec = &s;
    }
    if (!spec) {
      err << "unknown flag '" << name << "'\n";
      return std::nullopt;
    }
    if (spec->takes_value && !inline_value) {
      if (i + 1 >= args.size()) {
        err << "flag " << spec->name << " needs a value\n";
        return std::nullopt;
      }
      value = args[++i];
    } else if (!spec->takes_value && inline_value) {
      err << "flag " << spec->name << " takes no value\n";
      return std::nullopt;
    }
    out.values[spec->name] = value;
  }
  return out;
}

}  // namespace registry_proxy
