// Which proxy a request uses, decided from HTTP_PROXY / HTTPS_PROXY / NO_PROXY with the rules
// of Go's net/http ProxyFromEnvironment (golang.org/x/net/http/httpproxy), which containerd
// uses for every registry request: the probe must reach a mirror the way containerd will.
//
// The rules:
//  - https:// requests use HTTPS_PROXY, http:// requests HTTP_PROXY (the upper-case variable
//    when it is set and not empty, else the lower-case one); none set = direct.
//  - A proxy value without an http://, https:// or socks5:// scheme gets http:// in front.
//  - Never proxied: the host "localhost" and loopback IP literals (127.0.0.0/8, ::1), whatever
//    NO_PROXY says. (A name that merely resolves to loopback is proxied, as in Go.)
//  - NO_PROXY is a comma-separated list, entries trimmed and lower-cased, empty ones ignored:
//      "*"                   no request is proxied;
//      "10.0.0.0/8", "fd00::/8"  a CIDR: IP literal hosts inside it;
//      "1.2.3.4", "::1", "1.2.3.4:5000", "[::1]:5000"  an IP literal host (and port, if given);
//      "example.com"         example.com itself and its subdomains (a.example.com);
//      ".example.com", "*.example.com"  subdomains only, not example.com itself;
//      "example.com:5000"    the same, on that port only (the request's port, 443/80 when the
//                            URL has none);
//    an entry with an empty host (":5000") is ignored. Domain entries match IP hosts as text.
// Not carried over from Go: the CGI rule (REQUEST_METHOD set) and IDNA (hosts are ASCII here).
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace registry_proxy {

// The proxy variables as read from an environment (values as found, unparsed).
struct ProxyEnv {
  std::string http_proxy;   // HTTP_PROXY, else http_proxy
  std::string https_proxy;  // HTTPS_PROXY, else https_proxy
  std::string no_proxy;     // NO_PROXY, else no_proxy
};

// This process's environment.
ProxyEnv ProxyEnvFromEnvironment();

// The proxy URL for a request to scheme://host (host as in a URL: "m.example", "m.example:5000",
// "[fd00::1]:5000"), or "" for a direct connection. Go's "socks5://" comes back as
// "socks5h://": Go's SOCKS5 dialer lets the proxy resolve the name, and libcurl calls that
// socks5h.
std::string ProxyFor(const ProxyEnv& env, const std::string& scheme, const std::string& host);

// containerd's proxy settings as its systemd unit gives them, for `node install` to hand the
// same to our unit (a drop-in), so that the probe goes where containerd goes.
struct UnitProxySettings {
  // The proxy variables of Environment= lines (HTTP_PROXY, HTTPS_PROXY, NO_PROXY and their
  // lower-case forms), by name; the last assignment of a name wins; `Environment=` (empty)
  // resets, as in systemd.
  std::map<std::string, std::string> vars;
  // EnvironmentFile= entries as written ("-/etc/default/containerd"); copied as they are (every
  // variable of such a file comes with it, as containerd gets it).
  std::vector<std::string> files;
  std::vector<std::string> sources;  // the unit files that contributed, for the drop-in's header
};

// `unit_files`: (path, text) of a unit and its drop-ins, in the order systemd reads them. Only
// the [Service] section counts.
UnitProxySettings ProxySettingsOfUnit(
    const std::vector<std::pair<std::string, std::string>>& unit_files);

// The drop-in for our unit carrying `s`, or "" when there is nothing to carry.
std::string ProxyDropIn(const UnitProxySettings& s);

}  // namespace registry_proxy
