// containerd's registry host configuration (hosts.toml in a config_path directory), read as
// containerd reads it, for one purpose: what the mirror probe targets (ProbeTarget, probe.h).
//
// containerd's rules (remotes/docker/config/hosts.go, the same in 1.6, 1.7 and 2.x unless said):
//  - The directory: for registry host "h:p", the first that exists of <root>/h_p_, <root>/h:p,
//    <root>/_default; for "h", <root>/h, <root>/_default. config_path may list several roots
//    separated by ':' (the CRI plugin tries them in order).
//  - In that directory hosts.toml; absent or empty = the default host (certificate files only).
//  - The hosts, in order: the [host."URL"] tables in file order, then the file's top level
//    (`server`, and top-level capabilities/skip_verify/ca apply to it); without `server` that
//    last entry is the default host.
//  - A URL without a scheme gets https://; its path, cleaned, gets /v2 appended unless it ends
//    in /v2 (or `override_path = true`: the path is the API root as written).
//  - capabilities: "pull", "resolve", "push" (any case); absent or empty = all three; anything
//    else rejects the file.
//  - A file containerd cannot read (TOML syntax, a wrong type for a key it knows, an unknown
//    capability) is ignored with an error in containerd's log: the default host is used.
//  - 1.6 and 1.7 (go-toml v1) also reject a file without any [host."URL"] table ("invalid `host`
//    tree") and use the default host; 2.x accepts it and contacts `server`. We follow 2.x: with
//    the usual `server = "https://<the registry>"` both contact the same host.
//  - The default host: https://h, except https://registry-1.docker.io for docker.io and
//    http://h for localhost and loopback IP literals.
// The probe target is the first host with the "pull" capability (the one a pull contacts first);
// with none, the last (the top level). `skip_verify` and `ca` are read (a wrong type rejects the
// file, as in containerd) but the probe does not verify certificates (see probe.h).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "pull/probe.h"

namespace registry_proxy {

// One host of hosts.toml.
struct HostsTomlHost {
  std::string url;      // as written ("" for a top level without `server`)
  bool pull = true;     // "pull" among the capabilities (or none given)
  bool resolve = true;  // "resolve" ...
  bool push = true;     // "push" ...
  bool override_path = false;
  std::optional<bool> skip_verify;
  std::vector<std::string> ca;  // as written
};

struct HostsToml {
  std::string server;                // "" when absent
  std::vector<HostsTomlHost> hosts;  // [host."URL"] tables, in file order
  HostsTomlHost top;                 // the top level (url = server)
};

// Reads hosts.toml text (TOML 1.0). An error says where and why.
Result<HostsToml> ParseHostsToml(std::string_view text);

// What containerd contacts first for a pull from registry `host` (host[:port], as in an image
// reference), given its registry config_path `hosts_dir`. `problem` (may be null) receives why
// a hosts.toml present was not used (unreadable: the default is used, as containerd does).
ProbeTarget ResolveProbeTarget(const std::string& host, const std::string& hosts_dir,
                               std::string* problem);

}  // namespace registry_proxy
