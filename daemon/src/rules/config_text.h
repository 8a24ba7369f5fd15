// Text for the config loader's messages: input quoted on one line and cut, character classes,
// "did you mean" suggestions. Internal to rules/ (config.cc, yaml_tree.cc, config_validators.cc).
#pragma once

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

namespace registry_proxy {
namespace config_internal {

// Text from the file is quoted at most this long.
constexpr size_t kMaxQuoted = 80;

std::string OneLine(std::string_view s);
std::string Escape(std::string_view s);
std::string Quote(std::string_view s);
std::string_view Suggest(std::string_view word, const std::vector<std::string_view>& known);
std::string About(std::string_view what, std::string_view value, const std::string& msg);

inline bool IsLower(char c) { return c >= 'a' && c <= 'z'; }
inline bool IsUpper(char c) { return c >= 'A' && c <= 'Z'; }
inline bool IsDigit(char c) { return c >= '0' && c <= '9'; }
inline bool IsAlnum(char c) { return IsLower(c) || IsUpper(c) || IsDigit(c); }
inline bool HasUpper(std::string_view s) { return std::any_of(s.begin(), s.end(), IsUpper); }
inline bool HasSpace(std::string_view s) {
  return s.find_first_of(" \t\r\n") != std::string_view::npos;
}

}  // namespace config_internal
}  // namespace registry_proxy
