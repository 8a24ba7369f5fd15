#include "base/proxy_env.h"

#include <arpa/inet.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

namespace registry_proxy {
namespace {

std::string Lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}

std::string_view TrimSpace(std::string_view s) {
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (!s.empty() && space(s.front())) s.remove_prefix(1);
  while (!s.empty() && space(s.back())) s.remove_suffix(1);
  return s;
}

// The first of `names` set to a non-empty value, as Go's getEnvAny.
std::string EnvAny(const char* upper, const char* lower) {
  for (const char* n : {upper, lower}) {
    const char* v = std::getenv(n);
    if (v != nullptr && *v != '\0') return v;
  }
  return "";
}

// An IP address as Go's net.IP: 16 bytes, IPv4 as ::ffff:a.b.c.d.
struct Ip {
  std::array<unsigned char, 16> b{};
  bool v4 = false;  // an IPv4 address (or IPv4-mapped IPv6, as Go's To4)
};

std::optional<Ip> ParseIp(const std::string& s) {
  Ip ip;
  in_addr a4{};
  if (inet_pton(AF_INET, s.c_str(), &a4) == 1) {
    ip.b[10] = ip.b[11] = 0xff;
    std::memcpy(&ip.b[12], &a4, 4);
    ip.v4 = true;
    return ip;
  }
  in6_addr a6{};
  if (inet_pton(AF_INET6, s.c_str(), &a6) != 1) return std::nullopt;
  std::memcpy(ip.b.data(), &a6, 16);
  static const unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  ip.v4 = std::memcmp(ip.b.data(), kMapped, 12) == 0;
  return ip;
}

bool IsLoopback(const Ip& ip) {
  if (ip.v4) return ip.b[12] == 127;
  static const std::array<unsigned char, 16> kOne = {0, 0, 0, 0, 0, 0, 0, 0,
                                                     0, 0, 0, 0, 0, 0, 0, 1};
  return ip.b == kOne;
}

// "addr/bits", as Go's net.ParseCIDR.
struct Cidr {
  Ip net;
  int bits = 0;
  bool Contains(const Ip& ip) const {
    if (ip.v4 != net.v4) return false;
    const int offset = net.v4 ? 12 : 0;  // IPv4 bits start at byte 12
    for (int i = 0; i < bits; ++i) {
      const int byte = offset + i / 8, mask = 0x80 >> (i % 8);
      if ((ip.b[byte] & mask) != (net.b[byte] & mask)) return false;
    }
    return true;
  }
};

std::optional<Cidr> ParseCidr(const std::string& s) {
  const size_t slash = s.find('/');
  if (slash == std::string::npos) return std::nullopt;
  const std::string addr = s.substr(0, slash), bits = s.substr(slash + 1);
  in_addr a4{};
  const bool v4 = inet_pton(AF_INET, addr.c_str(), &a4) == 1;
  auto ip = ParseIp(addr);
  if (!ip || bits.empty() || bits.size() > 3) return std::nullopt;
  int n = 0;
  for (char c : bits) {
    if (c < '0' || c > '9') return std::nullopt;
    n = n * 10 + (c - '0');
  }
  if (n > (v4 ? 32 : 128)) return std::nullopt;
  Cidr out;
  out.net = *ip;
  out.net.v4 = v4;  // "::ffff:1.2.3.4/120" stays an IPv6 network
  out.bits = n;
  return out;
}

// Go's net.SplitHostPort: "host:port" or "[host]:port" (port may be empty); nullopt when
// there is no port, or too many colons.
std::optional<std::pair<std::string, std::string>> SplitHostPort(const std::string& hp) {
  const size_t i = hp.rfind(':');
  if (i == std::string::npos) return std::nullopt;
  std::string host;
  size_t j = 0, k = 0;
  if (!hp.empty() && hp[0] == '[') {
    const size_t end = hp.find(']');
    if (end == std::string::npos || end + 1 != i) return std::nullopt;
    host = hp.substr(1, end - 1);
    j = 1;
    k = end + 1;
  } else {
    host = hp.substr(0, i);
    if (host.find(':') != std::string::npos) return std::nullopt;
  }
  if (hp.find('[', j) != std::string::npos) return std::nullopt;
  if (hp.find(']', k) != std::string::npos) return std::nullopt;
  return std::make_pair(host, hp.substr(i + 1));
}

// A URL's host -> (hostname, port), as Go's url.Hostname() and url.Port().
std::pair<std::string, std::string> UrlHostPort(const std::string& host) {
  std::string name = host, port;
  const size_t colon = host.rfind(':');
  if (colon != std::string::npos && host.find(']', colon) == std::string::npos) {
    bool digits = true;
    for (size_t i = colon + 1; i < host.size(); ++i)
      digits = digits && host[i] >= '0' && host[i] <= '9';
    if (digits) {
      name = host.substr(0, colon);
      port = host.substr(colon + 1);
    }
  }
  if (name.size() >= 2 && name.front() == '[' && name.back() == ']') {
    name = name.substr(1, name.size() - 2);
  }
  return {name, port};
}

// Go's parseProxy: a value without an http, https or socks5 scheme gets http://.
std::string ParseProxy(const std::string& value) {
  if (value.empty()) return "";
  const size_t sep = value.find("://");
  if (sep != std::string::npos) {
    const std::string scheme = Lower(value.substr(0, sep));
    const std::string rest = value.substr(sep + 3);
    if (scheme == "http" || scheme == "https") return scheme + "://" + rest;
    if (scheme == "socks5") return "socks5h://" + rest;  // the proxy resolves names, as in Go
  }
  return "http://" + value;
}

struct NoProxyEntry {
  enum Kind { kAll, kCidr, kIp, kDomain } kind = kAll;
  Cidr cidr;
  Ip ip;
  std::string domain;       // ".example.com"
  bool match_host = false;  // also example.com itself
  std::string port;         // "" = any
};

std::vector<NoProxyEntry> ParseNoProxy(const std::string& no_proxy) {
  std::vector<NoProxyEntry> out;
  size_t start = 0;
  while (start <= no_proxy.size()) {
    size_t comma = no_proxy.find(',', start);
    if (comma == std::string::npos) comma = no_proxy.size();
    const std::string p = Lower(TrimSpace(std::string_view(no_proxy).substr(start, comma - start)));
    start = comma + 1;
    if (p.empty()) continue;
    NoProxyEntry e;
    if (p == "*") return {e};
    if (auto c = ParseCidr(p)) {
      e.kind = NoProxyEntry::kCidr;
      e.cidr = *c;
      out.push_back(e);
      continue;
    }
    std::string host = p;
    if (auto hp = SplitHostPort(p)) {
      host = hp->first;
      e.port = hp->second;
      if (host.empty()) continue;  // ":5000": malformed, ignored
    }
    if (auto ip = ParseIp(host)) {
      e.kind = NoProxyEntry::kIp;
      e.ip = *ip;
      out.push_back(e);
      continue;
    }
    if (host.rfind("*.", 0) == 0) host.erase(0, 1);
    e.kind = NoProxyEntry::kDomain;
    e.match_host = host[0] != '.';
    e.domain = e.match_host ? "." + host : host;
    out.push_back(e);
  }
  return out;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Go's useProxy.
bool UseProxy(const std::string& no_proxy, const std::string& name, const std::string& port) {
  if (name == "localhost") return false;
  const std::optional<Ip> ip = ParseIp(name);
  if (ip && IsLoopback(*ip)) return false;
  const std::string host = Lower(TrimSpace(name));
  for (const NoProxyEntry& e : ParseNoProxy(no_proxy)) {
    const bool port_ok = e.port.empty() || e.port == port;
    switch (e.kind) {
      case NoProxyEntry::kAll:
        return false;
      case NoProxyEntry::kCidr:
        if (ip && e.cidr.Contains(*ip)) return false;
        break;
      case NoProxyEntry::kIp:
        if (ip && ip->b == e.ip.b && port_ok) return false;
        break;
      case NoProxyEntry::kDomain:
        if ((EndsWith(host, e.domain) || (e.match_host && host == e.domain.substr(1))) && port_ok) {
          return false;
        }
        break;
    }
  }
  return true;
}

}  // namespace

ProxyEnv ProxyEnvFromEnvironment() {
  ProxyEnv env;
  env.http_proxy = EnvAny("HTTP_PROXY", "http_proxy");
  env.https_proxy = EnvAny("HTTPS_PROXY", "https_proxy");
  env.no_proxy = EnvAny("NO_PROXY", "no_proxy");
  return env;
}

std::string ProxyFor(const ProxyEnv& env, const std::string& scheme, const std::string& host) {
  std::string proxy;
  if (scheme == "https") {
    proxy = ParseProxy(env.https_proxy);
  } else if (scheme == "http") {
    proxy = ParseProxy(env.http_proxy);
  }
  if (proxy.empty()) return "";
  auto [name, port] = UrlHostPort(host);
  if (port.empty()) port = scheme == "https" ? "443" : "80";
  return UseProxy(env.no_proxy, name, port) ? proxy : "";
}

namespace {

bool IsProxyVar(const std::string& name) {
  static const char* const kNames[] = {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                                       "http_proxy", "https_proxy", "no_proxy"};
  for (const char* n : kNames) {
    if (name == n) return true;
  }
  return false;
}

// The words of an Environment= value, as systemd splits them: by spaces, "double" and 'single'
// quotes grouping, backslash escapes inside double quotes.
std::vector<std::string> UnitWords(std::string_view v) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < v.size()) {
    while (i < v.size() && (v[i] == ' ' || v[i] == '\t')) ++i;
    if (i >= v.size()) break;
    std::string word;
    while (i < v.size() && v[i] != ' ' && v[i] != '\t') {
      const char q = v[i];
      if (q == '"' || q == '\'') {
        for (++i; i < v.size() && v[i] != q; ++i) {
          if (q == '"' && v[i] == '\\' && i + 1 < v.size()) ++i;
          word += v[i];
        }
        ++i;  // the closing quote
      } else {
        word += v[i++];
      }
    }
    out.push_back(word);
  }
  return out;
}

// A value for a double-quoted Environment= word: \ and " escaped, % doubled (a specifier).
std::string UnitQuote(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '%') out += '%';
    out += c;
  }
  return out + "\"";
}

}  // namespace

UnitProxySettings ProxySettingsOfUnit(
    const std::vector<std::pair<std::string, std::string>>& unit_files) {
  UnitProxySettings out;
  for (const auto& [path, text] : unit_files) {
    bool service = false, used = false;
    std::string_view rest(text);
    while (!rest.empty()) {
      const size_t nl = rest.find('\n');
      std::string_view line = TrimSpace(rest.substr(0, nl));
      rest.remove_prefix(nl == std::string_view::npos ? rest.size() : nl + 1);
      if (line.empty() || line[0] == '#' || line[0] == ';') continue;
      if (line[0] == '[') {
        service = line == "[Service]";
        continue;
      }
      const size_t eq = line.find('=');
      if (!service || eq == std::string_view::npos) continue;
      const std::string_view key = TrimSpace(line.substr(0, eq));
      const std::string_view value = TrimSpace(line.substr(eq + 1));
      if (key == "Environment") {
        if (value.empty() && !out.vars.empty()) {
          out.vars.clear();
          used = true;
        }
        for (const std::string& w : UnitWords(value)) {
          const size_t e = w.find('=');
          if (e == std::string::npos || !IsProxyVar(w.substr(0, e))) continue;
          out.vars[w.substr(0, e)] = w.substr(e + 1);
          used = true;
        }
      } else if (key == "EnvironmentFile") {
        if (value.empty()) {
          used = used || !out.files.empty();
          out.files.clear();
        } else {
          out.files.emplace_back(value);
          used = true;
        }
      }
    }
    if (used) out.sources.push_back(path);
  }
  return out;
}

std::string ProxyDropIn(const UnitProxySettings& s) {
  if (s.vars.empty() && s.files.empty()) return "";
  std::string out =
      "# Written by `registry-proxy node install`: containerd's proxy settings, so that the\n"
      "# mirror probe goes where containerd goes. From:\n";
  for (const std::string& src : s.sources) out += "#   " + src + "\n";
  out +=
      "# Rewritten (or removed) by each install; `systemctl edit registry-proxy` overrides it.\n"
      "[Service]\n";
  for (const auto& [name, value] : s.vars)
    out += "Environment=" + UnitQuote(name + "=" + value) + "\n";
  for (const std::string& f : s.files) out += "EnvironmentFile=" + f + "\n";
  return out;
}

}  // namespace registry_proxy
