// The mirror liveness probe: HTTP `GET <API root>/` (usually /v2/) of what containerd will
// contact for a mirror (a ProbeTarget, see hosts_toml.h), through the proxy containerd would use
// (HTTP_PROXY / HTTPS_PROXY / NO_PROXY with Go's rules, see proxy_env.h). libcurl does the HTTP,
// the TLS and the proxying (CONNECT for https://, absolute-form GET for http://); the proxy is
// decided here and handed to libcurl explicitly, so libcurl's own reading of the environment
// (whose NO_PROXY rules differ from Go's) never applies.
//
// Any HTTP answer below 500 (200, 401, 404, a redirect...) = alive; a 5xx (a proxy's 502/503 for
// an unreachable mirror included), a refused or reset connection, a name that does not resolve,
// a TLS failure, a proxy that refuses the tunnel, or no answer within the deadline = dead. The
// whole probe (name lookup, proxy, connect, TLS, request, status line) is bounded by the
// deadline, a black hole included.
//
// The mirror's certificate is not verified, whatever hosts.toml says (`ca`, `skip_verify`): the
// probe sends no credentials and asks only "does something answer HTTP there". A certificate
// problem is not an outage: containerd verifies as configured when it pulls and reports the
// problem in its own words, where a "dead" probe would hide it behind a silent fallback. (An
// https:// proxy's own certificate is verified, as Go does.)
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include "base/proxy_env.h"

namespace registry_proxy {

// Where a probe goes.
struct ProbeTarget {
  std::string scheme;  // "http" or "https"
  std::string host;    // "m.example:5000" (as in the URL; [v6] in brackets)
  std::string path;    // "/v2/" (the registry API root, with a trailing slash)
  std::string source;  // why: "default", "hosts.toml <file> [host.\"...\"]"...
  std::string Url() const { return scheme + "://" + host + path; }
};

struct ProbeResult {
  bool alive = false;
  int http_status = 0;  // 0 when no HTTP answer
  std::string detail;   // "HTTP 401", "connection refused", "no answer within 2000ms"...
  std::string proxy;    // the proxy the probe went through (no user:password@); "" = direct
};

// Runs one probe, bounded by `deadline`, stopping early when `stop` turns true. The default
// is HttpProbe.
using Prober = std::function<ProbeResult(const ProbeTarget& target,
                                         std::chrono::steady_clock::time_point deadline,
                                         const std::atomic<bool>& stop)>;

// The probe, with the proxy settings of this process's environment (read at each call).
ProbeResult HttpProbe(const ProbeTarget& target, std::chrono::steady_clock::time_point deadline,
                      const std::atomic<bool>& stop);

// The same with the given proxy settings.
ProbeResult ProbeWithProxyEnv(const ProbeTarget& target, const ProxyEnv& env,
                              std::chrono::steady_clock::time_point deadline,
                              const std::atomic<bool>& stop);

}  // namespace registry_proxy
