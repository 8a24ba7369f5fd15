#include "pull/hosts_toml.h"

#include <arpa/inet.h>
#include <sys/stat.h>
#include <toml++/toml.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <sstream>

namespace registry_proxy {
namespace {

constexpr size_t kMaxHostsTomlBytes = 64 * 1024;

std::string Quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string Where(const toml::node& n) {
  return "line " + std::to_string(n.source().begin.line) + ": ";
}

// A string or an array of strings (containerd's `ca`, and `client`).
Result<std::vector<std::string>> Strings(const toml::node& n, const std::string& key) {
  std::vector<std::string> out;
  if (auto s = n.value<std::string>()) return std::vector<std::string>{*s};
  const toml::array* a = n.as_array();
  if (a == nullptr) return Status::Error(Where(n) + key + ": expected a string or strings");
  for (const toml::node& e : *a) {
    auto s = e.value<std::string>();
    if (!s) return Status::Error(Where(e) + key + ": expected strings");
    out.push_back(*s);
  }
  return out;
}

// The keys of one host (a [host."URL"] table or the top level) that containerd checks.
Status ReadHost(const toml::table& t, HostsTomlHost* h) {
  if (const toml::node* caps = t.get("capabilities")) {
    const toml::array* a = caps->as_array();
    if (a == nullptr) return Status::Error(Where(*caps) + "capabilities: expected strings");
    if (!a->empty()) h->pull = h->resolve = h->push = false;
    for (const toml::node& e : *a) {
      auto s = e.value<std::string>();
      if (!s) return Status::Error(Where(e) + "capabilities: expected strings");
      const std::string c = Lower(*s);
      if (c == "pull") {
        h->pull = true;
      } else if (c == "resolve") {
        h->resolve = true;
      } else if (c == "push") {
        h->push = true;
      } else {
        return Status::Error(Where(e) + "unknown capability " + Quoted(*s));
      }
    }
  }
  if (const toml::node* v = t.get("skip_verify")) {
    if (!v->is_boolean()) return Status::Error(Where(*v) + "skip_verify: expected true or false");
    h->skip_verify = v->value<bool>();
  }
  if (const toml::node* v = t.get("override_path")) {
    if (!v->is_boolean()) return Status::Error(Where(*v) + "override_path: expected a boolean");
    h->override_path = *v->value<bool>();
  }
  if (const toml::node* v = t.get("ca")) {
    auto ca = Strings(*v, "ca");
    if (!ca.ok()) return Status::Error(ca.error());
    h->ca = *ca;
  }
  if (const toml::node* v = t.get("client")) {
    if (!v->is_string() && !v->is_array()) {
      return Status::Error(Where(*v) + "client: expected a string or an array");
    }
  }
  return Status::Ok();
}

// The [host."URL"] tables in file order (toml++ keeps a table's keys sorted).
Result<std::vector<std::pair<std::string, const toml::table*>>> HostTables(
    const toml::table& root) {
  std::vector<std::pair<std::string, const toml::table*>> out;
  const toml::node* host = root.get("host");
  if (host == nullptr) return out;
  const toml::table* t = host->as_table();
  if (t == nullptr) return Status::Error(Where(*host) + "host: expected [host.\"URL\"] tables");
  for (const auto& [key, node] : *t) {
    const toml::table* h = node.as_table();
    if (h == nullptr)
      return Status::Error(Where(node) + "host." + Quoted(key.str()) + ": not a table");
    out.emplace_back(std::string(key.str()), h);
  }
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    const auto& pa = a.second->source().begin;
    const auto& pb = b.second->source().begin;
    return pa.line != pb.line ? pa.line < pb.line : pa.column < pb.column;
  });
  return out;
}

}  // namespace

Result<HostsToml> ParseHostsToml(std::string_view text) {
  if (text.size() > kMaxHostsTomlBytes) {
    return Status::Error("larger than " + std::to_string(kMaxHostsTomlBytes) + " bytes");
  }
  toml::table root;
  try {
    root = toml::parse(text);
  } catch (const toml::parse_error& e) {
    return Status::Error("line " + std::to_string(e.source().begin.line) + ": " +
                         std::string(e.description()));
  }
  HostsToml out;
  if (const toml::node* s = root.get("server")) {
    if (!s->is_string()) return Status::Error(Where(*s) + "server: expected a string");
    out.server = *s->value<std::string>();
  }
  auto tables = HostTables(root);
  if (!tables.ok()) return Status::Error(tables.error());
  for (const auto& [url, table] : *tables) {
    HostsTomlHost h;
    h.url = url;
    if (Status st = ReadHost(*table, &h); !st.ok()) {
      return Status::Error(st.message() + " (in [host." + Quoted(url) + "])");
    }
    out.hosts.push_back(std::move(h));
  }
  out.top.url = out.server;
  if (Status st = ReadHost(root, &out.top); !st.ok()) return Status::Error(st.message());
  return out;
}

namespace {

bool IsLoopbackOrLocalhost(const std::string& hostport) {
  std::string h = hostport;
  if (!h.empty() && h[0] == '[') {
    size_t close = h.find(']');
    h = h.substr(1, close == std::string::npos ? std::string::npos : close - 1);
  } else if (size_t c = h.rfind(':'); c != std::string::npos && h.find(':') == c) {
    h = h.substr(0, c);
  }
  if (h == "localhost") return true;
  in_addr a4{};
  if (inet_pton(AF_INET, h.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  in6_addr a6{};
  if (inet_pton(AF_INET6, h.c_str(), &a6) == 1) return IN6_IS_ADDR_LOOPBACK(&a6);
  return false;
}

// path.Clean of a URL path ("" stays "").
std::string CleanPath(const std::string& path) {
  if (path.empty()) return "";
  std::vector<std::string> parts;
  std::stringstream in(path);
  for (std::string p; std::getline(in, p, '/');) {
    if (p.empty() || p == ".") continue;
    if (p == "..") {
      if (!parts.empty()) parts.pop_back();
      continue;
    }
    parts.push_back(p);
  }
  std::string out;
  for (const std::string& p : parts) out += "/" + p;
  return out.empty() ? "/" : out;
}

// A hosts.toml host URL -> target, as containerd's parseHostConfig reads it.
Result<ProbeTarget> TargetFromUrl(std::string url, bool override_path) {
  if (url.rfind("http", 0) != 0) {
    if (url.find("://") != std::string::npos) {
      return Status::Error("URL " + Quoted(url) + ": scheme must be http or https");
    }
    url = "https://" + url;
  }
  const size_t sep = url.find("://");
  if (sep == std::string::npos) return Status::Error("URL " + Quoted(url) + " has no scheme");
  ProbeTarget t;
  t.scheme = Lower(url.substr(0, sep));
  if (t.scheme != "http" && t.scheme != "https") {
    return Status::Error("URL " + Quoted(url) + ": scheme must be http or https");
  }
  const std::string rest = url.substr(sep + 3);
  const size_t slash = rest.find_first_of("/?#");
  t.host = rest.substr(0, slash);
  if (t.host.empty() || t.host.find_first_of(" \t@") != std::string::npos) {
    return Status::Error("URL " + Quoted(url) + ": bad host");
  }
  std::string path = slash == std::string::npos ? "" : rest.substr(slash);
  if (size_t q = path.find_first_of("?#"); q != std::string::npos) path.resize(q);
  path = CleanPath(path);
  if (path == "/") path.clear();
  const bool ends_v2 = path.size() >= 3 && path.compare(path.size() - 3, 3, "/v2") == 0;
  if (!override_path && !ends_v2) path += "/v2";
  t.path = path + "/";
  return t;
}

ProbeTarget DefaultTarget(const std::string& host) {
  ProbeTarget t;
  if (host == "docker.io") {
    t.scheme = "https";
    t.host = "registry-1.docker.io";
  } else {
    t.scheme = IsLoopbackOrLocalhost(host) ? "http" : "https";
    t.host = host;
  }
  t.path = "/v2/";
  t.source = "default";
  return t;
}

bool Exists(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0;
}

// containerd's hostPaths over every root of config_path: the directory used, or "".
std::string HostDir(const std::string& host, const std::string& hosts_dir) {
  std::stringstream roots(hosts_dir);
  for (std::string root; std::getline(roots, root, ':');) {
    if (root.empty()) continue;
    std::vector<std::string> dirs;
    if (size_t c = host.rfind(':'); c != std::string::npos && c > 0) {
      dirs.push_back(root + "/" + host.substr(0, c) + "_" + host.substr(c + 1) + "_");
    }
    dirs.push_back(root + "/" + host);
    dirs.push_back(root + "/_default");
    for (const std::string& d : dirs) {
      if (Exists(d)) return d;
    }
  }
  return "";
}

// The target from a parsed file: the first host with "pull", else the top level.
Result<ProbeTarget> TargetFromFile(const HostsToml& h, const std::string& host,
                                   const std::string& file) {
  for (const HostsTomlHost& e : h.hosts) {
    if (!e.pull) continue;
    auto t = TargetFromUrl(e.url, e.override_path);
    if (!t.ok()) return t;
    ProbeTarget out = t.value();
    out.source = file + " [host.\"" + e.url + "\"]";
    return out;
  }
  if (h.server.empty()) {
    ProbeTarget t = DefaultTarget(host);
    t.source = file + ": no host with pull capability and no server: default";
    return t;
  }
  auto t = TargetFromUrl(h.server, h.top.override_path);
  if (!t.ok()) return t;
  ProbeTarget out = t.value();
  out.source = file + " server";
  return out;
}

}  // namespace

ProbeTarget ResolveProbeTarget(const std::string& host, const std::string& hosts_dir,
                               std::string* problem) {
  if (problem) problem->clear();
  const std::string dir = HostDir(host, hosts_dir);
  if (dir.empty()) return DefaultTarget(host);
  // The first directory that exists is the one containerd uses, hosts.toml or not.
  const std::string file = dir + "/hosts.toml";
  std::ifstream in(file, std::ios::binary);
  std::string text;
  if (in) text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (text.empty()) return DefaultTarget(host);  // certificate files only
  auto parsed = ParseHostsToml(text);
  std::string why;
  if (parsed.ok()) {
    auto t = TargetFromFile(*parsed, host, file);
    if (t.ok()) return *t;
    why = t.error();
  } else {
    why = parsed.error();
  }
  if (problem) *problem = file + ": " + why + "; probing the default";
  return DefaultTarget(host);
}

}  // namespace registry_proxy
