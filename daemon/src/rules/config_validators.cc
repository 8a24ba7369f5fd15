#include "rules/config_validators.h"

#include <algorithm>
#include <cstdint>

#include "base/string_util.h"
#include "rules/config_text.h"

namespace registry_proxy {
namespace config_internal {
namespace {

// sizeof(sockaddr_un::sun_path) on Linux, minus the terminating NUL.
constexpr size_t kMaxUnixPath = 107;

}  // namespace

// "unix:///run/x.sock" or "/run/x.sock" -> "unix:///run/x.sock".
Result<std::string> SocketAddress(std::string_view s) {
  constexpr std::string_view kUnix = "unix://";
  std::string_view path = s;
  if (s.substr(0, kUnix.size()) == kUnix) {
    path = s.substr(kUnix.size());
  } else if (s.find("://") != std::string_view::npos) {
    return Status::Error(Quote(s) +
                         " is not a unix socket; write unix:///path/to.sock or an "
                         "absolute path");
  }
  if (path.empty() || path[0] != '/') {
    return Status::Error(Quote(s) +
                         " must be an absolute socket path: unix:///path/to.sock "
                         "(three slashes) or /path/to.sock");
  }
  if (path.size() > kMaxUnixPath) {
    return Status::Error("socket path " + Quote(path) + " is longer than " +
                         std::to_string(kMaxUnixPath) + " bytes, the limit for unix sockets");
  }
  return StrCat({kUnix, path});
}

// containerd's identifier rule: alphanumeric runs joined by single '.', '_' or '-'; <= 76.
Status ContainerdNamespace(std::string_view s) {
  bool ok = !s.empty() && s.size() <= 76 && IsAlnum(s.front()) && IsAlnum(s.back());
  for (size_t i = 0; ok && i < s.size(); ++i) {
    const char c = s[i];
    const bool sep = c == '.' || c == '_' || c == '-';
    ok = IsAlnum(c) || (sep && IsAlnum(s[i + 1]));
  }
  if (ok) return Status::Ok();
  return Status::Error("containerd namespace " + Quote(s) +
                       " is invalid: use letters, digits and single '.', '_' or '-' between "
                       "them, at most 76 characters (the one CRI uses is 'k8s.io')");
}

// "" or host:port, with a numeric port 1..65535; IPv6 hosts in brackets.
Status ListenAddress(std::string_view s) {
  if (s.empty()) return Status::Ok();
  auto fail = [&](std::string_view why) {
    return Status::Error(StrCat({"address ", Quote(s), " ", why,
                                 " (write host:port, e.g. '127.0.0.1:9464' or '[::1]:9464', or '' "
                                 "to turn metrics off)"}));
  };
  std::string_view host, port;
  if (s.front() == '[') {
    const size_t close = s.find(']');
    if (close == std::string_view::npos || close + 1 >= s.size() || s[close + 1] != ':') {
      return fail("has a bracketed host without ]:port");
    }
    host = s.substr(1, close - 1);
    port = s.substr(close + 2);
    const bool ok = !host.empty() && std::all_of(host.begin(), host.end(), [](char c) {
      return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' || c == '.';
    });
    if (!ok) return fail("has a bad IPv6 address");
  } else {
    const size_t colon = s.rfind(':');
    if (colon == std::string_view::npos) return fail("has no port");
    host = s.substr(0, colon);
    port = s.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return fail("has an IPv6 host without brackets");
    if (host.empty()) return fail("has no host (0.0.0.0 listens on every interface)");
    const bool ok = std::all_of(host.begin(), host.end(),
                                [](char c) { return IsAlnum(c) || c == '.' || c == '-'; });
    if (!ok) return fail("has a bad host");
  }
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), IsDigit)) {
    return fail("needs a numeric port");
  }
  const int p = std::stoi(std::string(port));
  if (p < 1 || p > 65535) return fail("has a port outside 1..65535");
  return Status::Ok();
}

// A Kubernetes namespace name: a DNS-1123 label.
Status NamespaceName(std::string_view s) {
  bool ok = !s.empty() && s.size() <= 63 && (IsLower(s.front()) || IsDigit(s.front())) &&
            (IsLower(s.back()) || IsDigit(s.back()));
  ok = ok &&
       std::all_of(s.begin(), s.end(), [](char c) { return IsLower(c) || IsDigit(c) || c == '-'; });
  if (ok) return Status::Ok();
  return Status::Error("namespace " + Quote(s) +
                       " is not a valid namespace name: lowercase letters, digits and '-', "
                       "starting and ending with a letter or digit, at most 63 characters");
}

// Kubernetes label name/value: [A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?, <= 63.
bool IsLabelName(std::string_view s) {
  if (s.empty() || s.size() > 63 || !IsAlnum(s.front()) || !IsAlnum(s.back())) return false;
  return std::all_of(s.begin(), s.end(),
                     [](char c) { return IsAlnum(c) || c == '-' || c == '_' || c == '.'; });
}

// A DNS-1123 subdomain (label key prefix).
bool IsDnsSubdomain(std::string_view s) {
  if (s.empty() || s.size() > 253) return false;
  size_t start = 0;
  while (true) {
    const size_t dot = s.find('.', start);
    std::string_view part = s.substr(start, dot == std::string_view::npos ? s.npos : dot - start);
    if (part.empty() || part.size() > 63 || !(IsLower(part.front()) || IsDigit(part.front())) ||
        !(IsLower(part.back()) || IsDigit(part.back())) ||
        !std::all_of(part.begin(), part.end(),
                     [](char c) { return IsLower(c) || IsDigit(c) || c == '-'; })) {
      return false;
    }
    if (dot == std::string_view::npos) return true;
    start = dot + 1;
  }
}

Status LabelKey(std::string_view key) {
  const size_t slash = key.find('/');
  bool ok = slash == std::string_view::npos
                ? IsLabelName(key)
                : IsDnsSubdomain(key.substr(0, slash)) && IsLabelName(key.substr(slash + 1));
  if (ok) return Status::Ok();
  return Status::Error("label key " + Quote(key) +
                       " is invalid: an optional DNS prefix and '/', then at most 63 letters, "
                       "digits, '-', '_' or '.', starting and ending with a letter or digit");
}

Status LabelValue(std::string_view value) {
  if (value.empty() || IsLabelName(value)) return Status::Ok();
  return Status::Error("label value " + Quote(value) +
                       " is invalid: at most 63 letters, digits, '-', '_' or '.', starting and "
                       "ending with a letter or digit");
}

// A registry host by the reference grammar's rule for the first path component.
bool LooksLikeHost(std::string_view first) {
  return first.find_first_of(".:") != std::string_view::npos || first == "localhost";
}

// Would pulls rewritten to `m` be matched by the same rule again? True when the mirror lives
// on the rule's own registry and the rewritten repository falls under the rule's prefix.
bool MirrorLoops(const Mirror& m, std::string_view match) {
  const size_t slash = match.find('/');
  std::string_view domain = match.substr(0, slash);
  std::string_view path =
      slash == std::string_view::npos ? std::string_view() : match.substr(slash + 1);
  auto mirror_domain = NormalizeMatch(m.domain);
  if (!mirror_domain.ok() || *mirror_domain != domain) return false;
  if (path.empty()) return true;
  // Any repository under `path` becomes prefix/path/...; check it still starts with `path`.
  const std::string rewritten =
      m.path_prefix.empty() ? std::string(path) : StrCat({m.path_prefix, "/", path});
  return rewritten.compare(0, path.size(), path) == 0 &&
         (rewritten.size() == path.size() || rewritten[path.size()] == '/');
}

// "2s", "500ms", "5m", "1h30m", "0": whole numbers with a unit each (ms, s, m, h); "0" alone
// needs none. At most 24h.
Result<std::chrono::milliseconds> ParseDuration(std::string_view s) {
  const std::string what = "duration '" + std::string(s) + "'";
  if (s == "0") return std::chrono::milliseconds(0);
  if (s.empty()) return Status::Error("empty duration; write e.g. 2s, 500ms, 5m, or 0 for none");
  int64_t total_ms = 0;
  size_t i = 0;
  while (i < s.size()) {
    size_t start = i;
    int64_t n = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
      n = n * 10 + (s[i] - '0');
      if (n > 100000000) return Status::Error(what + " is too long (at most 24h)");
      ++i;
    }
    if (i == start) {
      return Status::Error(what + ": expected a number at '" + std::string(s.substr(i)) +
                           "'; write e.g. 2s, 500ms, 5m, or 0 for none");
    }
    size_t ustart = i;
    while (i < s.size() && !(s[i] >= '0' && s[i] <= '9')) ++i;
    std::string_view unit = s.substr(ustart, i - ustart);
    int64_t mult = 0;
    if (unit == "ms")
      mult = 1;
    else if (unit == "s")
      mult = 1000;
    else if (unit == "m")
      mult = 60 * 1000;
    else if (unit == "h")
      mult = 3600 * 1000;
    if (mult == 0) {
      return Status::Error(
          what +
          (unit.empty() ? " has no unit" : " has an unknown unit '" + std::string(unit) + "'") +
          "; units are ms, s, m, h (e.g. 2s, 500ms, 5m), or write 0 for none");
    }
    total_ms += n * mult;
    if (total_ms > 24LL * 3600 * 1000) return Status::Error(what + " is too long (at most 24h)");
  }
  return std::chrono::milliseconds(total_ms);
}

}  // namespace config_internal
}  // namespace registry_proxy
