// libFuzzer target for the config loader.
//
// Beyond "does not crash" (yaml-cpp is recursive and throws; the loader must contain both), it
// checks what the daemon relies on:
//  - a load either has a config with a policy and no errors, or errors and no config,
//  - every error is a non-empty single line of bounded size with a sane position,
//  - loading is deterministic (same bytes, same errors or the same digest),
//  - a policy that loaded can decide a few images without trouble.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>

#include "rules/config.h"

namespace {

using registry_proxy::ConfigError;
using registry_proxy::ConfigLoad;
using registry_proxy::ParseConfig;
using registry_proxy::PullContext;

[[noreturn]] void Violation(const char* what, const std::string& detail) {
  std::fprintf(stderr, "config_fuzz: %s: %s\n", what, detail.c_str());
  std::abort();
}

void CheckError(const ConfigError& e, int lines) {
  const std::string s = e.ToString();
  if (e.message.empty()) Violation("empty error message", s);
  if (s.find('\n') != std::string::npos) Violation("multi-line error", s);
  if (s.size() > 2048) Violation("oversized error", s.substr(0, 200));
  if (e.file != "<fuzz>") Violation("wrong file", s);
  if (e.line < 0 || e.column < 0 || e.line > lines + 1) Violation("bad position", s);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view yaml(reinterpret_cast<const char*>(data), size);
  const ConfigLoad load = ParseConfig(yaml, "<fuzz>");
  if (load.ok() != load.errors.empty()) Violation("ok() disagrees with errors", load.ErrorText());

  if (!load.ok()) {
    int lines = 1;
    for (char c : yaml) lines += c == '\n';
    if (load.errors.size() > 101) Violation("too many errors", std::to_string(load.errors.size()));
    for (const ConfigError& e : load.errors) CheckError(e, lines);
    if (ParseConfig(yaml, "<fuzz>").ErrorText() != load.ErrorText()) {
      Violation("errors differ between two loads", load.ErrorText());
    }
    return 0;
  }

  if (!load.config->policy) Violation("null policy", "");
  if (load.config->content_sha256.size() != 64)
    Violation("bad digest", load.config->content_sha256);
  const ConfigLoad again = ParseConfig(yaml, "<fuzz>");
  if (!again.ok() || again.config->content_sha256 != load.config->content_sha256) {
    Violation("second load differs", again.ErrorText());
  }

  const auto& policy = *load.config->policy;
  const std::map<std::string, std::string> labels = {{"app", "x"}};
  for (std::string_view image :
       {"nginx", "docker.io/bitnami/redis:7",
        "quay.io/a/b@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}) {
    for (std::optional<std::string_view> ns :
         {std::optional<std::string_view>(), std::optional<std::string_view>("default")}) {
      PullContext ctx;
      ctx.namespace_name = ns;
      ctx.pod_labels = &labels;
      if (policy.Decide(image, ctx).candidates.empty())
        Violation("no candidates", std::string(image));
    }
  }
  return 0;
}
