// The config file: YAML, strict, seed-compatible.
//
// A file written for the earlier tool (ketches/registry-proxy) loads unchanged:
//   enabled, proxies (registry -> mirror), excludeNamespaces, includeNamespaces,
//   podSelector, namespaceSelector (must be empty: no namespace labels reach a node).
// Extensions: rules, pullsWithoutNamespace, node. Unknown keys are errors.
//
// Loading never throws and never half-applies: it yields a complete immutable Config or a
// list of errors, each with file, line, column and field.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "rules/policy.h"

namespace registry_proxy {

// Settings for the node daemon (`serve`). Each has a default that works on a stock
// containerd node; later issues add more keys here (they are all under `node:`).
struct NodeSettings {
  // Where kubelet (imageServiceEndpoint) and crictl connect.
  std::string listen = "unix:///run/registry-proxy/registry-proxy.sock";
  // The CRI endpoint everything is forwarded to.
  std::string upstream = "unix:///run/containerd/containerd.sock";
  // containerd namespace in which CRI keeps its images; aliases are created there.
  std::string containerd_namespace = "k8s.io";
  // Prometheus text endpoint, host:port on loopback by default; "" turns it off.
  std::string metrics_address = "127.0.0.1:9464";
  // YAML file with per-mirror credentials (see README); "" = none.
  std::string credentials_file;
  // After a mirror served an image, keep its mirror-named records next to the upstream
  // names. Off by default so `crictl images` and pod status show only upstream names.
  bool keep_mirror_names = false;
  // Mirror failover (see mirror_health.h). Probe each mirror (GET /v2/) before handing it to
  // containerd; a dead one is skipped for mirror_cooldown (0 = no circuit breaker).
  bool mirror_probe = true;
  std::chrono::milliseconds mirror_probe_timeout{2000};
  std::chrono::milliseconds mirror_cooldown{30000};
  // How long a pull waits for a mirror's probe before passing over it, for this pull, to a
  // later mirror known alive (mirror_health.h, "Hedging"); 0 = wait for the probe's answer.
  std::chrono::milliseconds mirror_hedge_delay{400};
  // containerd's registry config_path: the probe reads <host>/hosts.toml there, as containerd.
  std::string containerd_hosts_dir = "/etc/containerd/certs.d";
  // Deadlines the daemon sets itself: per pull handed to containerd, and for the whole
  // PullImage call. 0 = none (large images legitimately take minutes).
  std::chrono::milliseconds pull_attempt_timeout{0};
  std::chrono::milliseconds pull_timeout{0};
};

struct Config {
  std::shared_ptr<const Policy> policy;  // never null
  NodeSettings node;
  std::string source;          // file path, or "<builtin>"/"<string>"
  std::string content_sha256;  // hex digest of the bytes loaded: a stable config version
};

struct ConfigError {
  std::string file;
  int line = 0;       // 1-based; 0 when unknown
  int column = 0;     // 1-based; 0 when unknown
  std::string field;  // dotted path: "rules[2].mirrors[0].host"; "" for the whole document
  std::string message;

  // "config.yaml:14:7: rules[2].mirrors[0].host: mirror host 'Harbor' must be lowercase"
  std::string ToString() const;
};

struct ConfigLoad {
  std::shared_ptr<const Config> config;  // null iff errors is non-empty
  std::vector<ConfigError> errors;

  bool ok() const { return config != nullptr; }
  std::string ErrorText() const;  // every error, one per line
};

// Parses YAML text. `source` names it in errors.
ConfigLoad ParseConfig(std::string_view yaml, std::string_view source);

// Reads and parses a file (following symlinks, as a ConfigMap volume needs). A missing or
// unreadable file is an error like any other.
ConfigLoad LoadConfigFile(const std::string& path);

// The default config shipped in config/config.yaml (compiled in): the earlier tool's default.
std::string_view BuiltinConfigYaml();
std::shared_ptr<const Config> BuiltinConfig();

}  // namespace registry_proxy
