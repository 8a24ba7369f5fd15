#include "ops/logging.h"

#include <time.h>

#include <chrono>
#include <cstdio>
#include <vector>

namespace registry_proxy {
namespace {

constexpr char kHex[] = "0123456789abcdef";

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is not one (overlong forms,
// surrogates and code points past U+10FFFF are invalid).
size_t Utf8Length(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  const unsigned char c = b(0);
  size_t n;
  uint32_t cp;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
    cp = c & 0x1f;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    cp = c & 0x0f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((b(k) & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (b(k) & 0x3f);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) || cp > 0x10ffff ||
      (cp >= 0xd800 && cp <= 0xdfff)) {
    return 0;
  }
  return n;
}

bool IsKeyChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || c == '_' || (!first && c >= '0' && c <= '9');
}

// `key=value` words of a message, in order; keys seen once.
std::vector<std::pair<std::string_view, std::string_view>> Fields(std::string_view msg) {
  std::vector<std::pair<std::string_view, std::string_view>> out;
  size_t i = 0;
  while (i < msg.size()) {
    while (i < msg.size() && msg[i] == ' ') ++i;
    size_t end = msg.find(' ', i);
    if (end == std::string_view::npos) end = msg.size();
    std::string_view word = msg.substr(i, end - i);
    i = end;
    const size_t eq = word.find('=');
    if (eq == 0 || eq == std::string_view::npos || eq + 1 == word.size()) continue;
    std::string_view key = word.substr(0, eq), value = word.substr(eq + 1);
    bool ok = true;
    for (size_t k = 0; k < key.size() && ok; ++k) ok = IsKeyChar(key[k], k == 0);
    if (!ok || value.find('"') != std::string_view::npos) continue;
    while (!value.empty() && (value.back() == ',' || value.back() == ';')) value.remove_suffix(1);
    if (value.empty()) continue;
    if (key == "time" || key == "level" || key == "msg" || key == "thread") continue;
    bool seen = false;
    for (const auto& [k, v] : out) seen = seen || k == key;
    if (!seen) out.emplace_back(key, value);
  }
  return out;
}

class JsonFormatter final : public spdlog::formatter {
 public:
  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    std::string line;
    line.reserve(msg.payload.size() + 96);
    line += "{\"time\":\"";
    const auto since = msg.time.time_since_epoch();
    const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since);
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(since - secs).count();
    const time_t t = static_cast<time_t>(secs.count());
    struct tm tm;
    gmtime_r(&t, &tm);
    char buf[96];
    std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
                  tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, int(ms));
    line += buf;
    line += "\",\"level\":\"";
    const auto level = spdlog::level::to_string_view(msg.level);
    line.append(level.data(), level.size());
    line += "\",\"msg\":\"";
    const std::string_view payload(msg.payload.data(), msg.payload.size());
    AppendJsonEscaped(payload, &line);
    line += "\",\"thread\":";
    line += std::to_string(msg.thread_id);
    for (const auto& [key, value] : Fields(payload)) {
      line += ",\"";
      line += key;  // [a-z_][a-z0-9_]*: nothing to escape
      line += "\":\"";
      AppendJsonEscaped(value, &line);
      line += '"';
    }
    line += "}\n";
    dest.append(line.data(), line.data() + line.size());
  }

  std::unique_ptr<spdlog::formatter> clone() const override {
    return std::make_unique<JsonFormatter>();
  }
};

}  // namespace

void AppendJsonEscaped(std::string_view s, std::string* out) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x80) {
      const size_t n = Utf8Length(s, i);
      if (n == 0) {
        *out += "\\ufffd";
        ++i;
      } else {
        out->append(s.substr(i, n));
        i += n;
      }
      continue;
    }
    switch (c) {
      case '"':
        *out += "\\\"";
        break;
      case '\\':
        *out += "\\\\";
        break;
      case '\n':
        *out += "\\n";
        break;
      case '\r':
        *out += "\\r";
        break;
      case '\t':
        *out += "\\t";
        break;
      case '\b':
        *out += "\\b";
        break;
      case '\f':
        *out += "\\f";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          *out += "\\u00";
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 0xf]);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
    ++i;
  }
}

std::unique_ptr<spdlog::formatter> MakeJsonFormatter() { return std::make_unique<JsonFormatter>(); }

std::optional<std::string> ParseLogFlags(const ParsedArgs& args, LogOptions* out) {
  if (auto l = args.Get("--log-level")) {
    auto level = spdlog::level::from_str(*l);
    if (level == spdlog::level::off && *l != "off") {
      return "--log-level: unknown level '" + *l +
             "' (trace, debug, info, warn, error, critical, off)";
    }
    out->level = level;
  }
  if (auto f = args.Get("--log-format")) {
    if (*f == "text") {
      out->format = LogFormat::kText;
    } else if (*f == "json") {
      out->format = LogFormat::kJson;
    } else {
      return "--log-format: unknown format '" + *f + "' (text or json)";
    }
  }
  return std::nullopt;
}

void SetUpLogging(const LogOptions& options) {
  spdlog::set_level(options.level);
  // text: the pattern RunCli gave the default logger stays.
  if (options.format == LogFormat::kJson) {
    spdlog::set_formatter(MakeJsonFormatter());
  }
}

}  // namespace registry_proxy
