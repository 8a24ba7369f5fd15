// Log setup shared by `serve` and `webhook`: --log-level and --log-format.
//
// text (default): "2026-11-25T03:14:26.123 info pull nginx: attempt 1/2 ..." (local time).
// json: one object per line,
//   {"time":"2026-11-25T03:14:26.123Z","level":"info","msg":"pull nginx: attempt 1/2 ...",
//    "thread":1234,"namespace":"default","rule":"config.yaml:3","auth":"no"}
// time is UTC (RFC 3339, milliseconds); `key=value` words of the message (lowercase key,
// value without spaces or quotes, as the daemon's log lines write them) are repeated as string
// fields, except keys that would collide with time/level/msg/thread. Strings are escaped per
// RFC 8259 (quote, backslash, control characters); bytes that are not valid UTF-8 become
// U+FFFD, so every line is valid JSON whatever a message holds.
#pragma once

#include <spdlog/formatter.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "base/cli_args.h"

namespace registry_proxy {

enum class LogFormat { kText, kJson };

struct LogOptions {
  spdlog::level::level_enum level = spdlog::level::info;
  LogFormat format = LogFormat::kText;
};

// The help text lines for the two flags (for the commands' usage).
inline constexpr char kLogFlagsHelp[] =
    "      --log-level L     trace, debug, info (default), warn, error, critical, off\n"
    "      --log-format F    text (default) or json (one JSON object per line)\n";

// Reads --log-level and --log-format from parsed flags. On a bad value returns the message
// ("--log-format: unknown format 'xml' (text or json)").
std::optional<std::string> ParseLogFlags(const ParsedArgs& args, LogOptions* out);

// Applies to the default logger (and every logger created later through spdlog's registry).
// With json, gRPC's own log lines are routed through spdlog too.
void SetUpLogging(const LogOptions& options);

// A formatter writing one JSON object per message (see above).
std::unique_ptr<spdlog::formatter> MakeJsonFormatter();

// Appends `s` as a JSON string body (without the quotes), escaped as above.
void AppendJsonEscaped(std::string_view s, std::string* out);

}  // namespace registry_proxy
