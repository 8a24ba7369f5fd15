// The config loader's validators: one value each (a socket address, a namespace, a label, a
// duration, a mirror that would loop), with the message to show. Pure; internal to rules/.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "base/status.h"
#include "rules/policy.h"

namespace registry_proxy {
namespace config_internal {

// The `node:` settings.
Result<std::string> SocketAddress(std::string_view s);
Status ContainerdNamespace(std::string_view s);
Status ListenAddress(std::string_view s);
Result<std::chrono::milliseconds> ParseDuration(std::string_view s);

// Kubernetes names.
Status NamespaceName(std::string_view s);
bool IsLabelName(std::string_view s);
bool IsDnsSubdomain(std::string_view s);
Status LabelKey(std::string_view key);
Status LabelValue(std::string_view value);

// Rules and mirrors.
bool LooksLikeHost(std::string_view first);
bool MirrorLoops(const Mirror& m, std::string_view match);

}  // namespace config_internal
}  // namespace registry_proxy
