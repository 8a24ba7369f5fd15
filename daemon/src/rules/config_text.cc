#include "rules/config_text.h"

#include "base/string_util.h"

namespace registry_proxy {
namespace config_internal {

// Text on one line: newlines as \n, other control characters hex-escaped. Messages from other
// modules may quote input raw; ErrorText is one line per error.
std::string OneLine(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    } else {
      out.push_back(ch);
    }
  }
  return out;
}

// Text from the file, on one line (control characters escaped) and capped at 80 bytes, so a
// megabyte of garbage yields a short error.
std::string Escape(std::string_view s) {
  // Cut on a character boundary: the input is UTF-8 and messages must stay UTF-8 (JSON).
  size_t n = std::min(s.size(), kMaxQuoted);
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;
  return OneLine(s.substr(0, n));
}

// A value for a message: 'value', or 'value...'...(N bytes) when long.
std::string Quote(std::string_view s) {
  std::string out = "'" + Escape(s) + "'";
  if (s.size() > kMaxQuoted) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

namespace {

char ToLower(char c) { return IsUpper(c) ? static_cast<char>(c - 'A' + 'a') : c; }

// Optimal string alignment distance (Levenshtein plus adjacent transpositions), ignoring
// case, so "excludenamespaces", "exclude_namespaces" and "enabeld" all find their key.
size_t EditDistance(std::string_view a, std::string_view b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i) {
    for (size_t j = 1; j <= m; ++j) {
      const size_t cost = ToLower(a[i - 1]) == ToLower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && ToLower(a[i - 1]) == ToLower(b[j - 2]) &&
          ToLower(a[i - 2]) == ToLower(b[j - 1])) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[n][m];
}

}  // namespace

// The closest of `known` within distance 2, or "".
std::string_view Suggest(std::string_view word, const std::vector<std::string_view>& known) {
  // Keys are short; a long word is not a typo of one (and would make the table large).
  if (word.size() > 64) return {};
  std::string_view best;
  size_t best_d = 3;
  for (std::string_view k : known) {
    const size_t d = EditDistance(word, k);
    if (d < best_d) best_d = d, best = k;
  }
  return best;
}

// Puts "what 'value'" in front of a message from another module unless it already names it.
std::string About(std::string_view what, std::string_view value, const std::string& msg) {
  if (!value.empty() && msg.find(value) != std::string::npos) return msg;
  return StrCat({what, " ", Quote(value), ": ", msg});
}

}  // namespace config_internal
}  // namespace registry_proxy
