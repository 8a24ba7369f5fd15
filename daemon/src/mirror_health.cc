#include "mirror_health.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

namespace registry_proxy {
namespace {

bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// The status code of an HTTP/1.x status line at the start of `s` ("HTTP/1.1 401 ..."), or -1.
int HttpStatusCode(const std::string& s) {
  if (s.compare(0, 5, "HTTP/") != 0) return -1;
  size_t i = 5;
  if (i >= s.size() || !IsDigit(s[i])) return -1;
  ++i;
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (i >= s.size() || !IsDigit(s[i])) return -1;
    ++i;
  }
  // " ddd" and then a space or CR.
  if (i + 4 >= s.size() || s[i] != ' ') return -1;
  if (!IsDigit(s[i + 1]) || !IsDigit(s[i + 2]) || !IsDigit(s[i + 3])) return -1;
  if (s[i + 4] != ' ' && s[i + 4] != '\r') return -1;
  return (s[i + 1] - '0') * 100 + (s[i + 2] - '0') * 10 + (s[i + 3] - '0');
}

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr size_t kMaxHostsTomlBytes = 64 * 1024;

int64_t Ms(SteadyClock::duration d) { return std::chrono::duration_cast<milliseconds>(d).count(); }

// ---------------------------------------------------------------------------------------------
// hosts.toml

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

// Reads a TOML basic ("...") or literal ('...') string at the start of `s`; advances `s` past
// it. Escapes in basic strings: \" \\ \/ \b \t \n \f \r only (no \u: URLs need none).
std::optional<std::string> ReadString(std::string_view& s, std::string* why) {
  if (s.empty() || (s[0] != '"' && s[0] != '\'')) {
    *why = "expected a quoted string";
    return std::nullopt;
  }
  const char q = s[0];
  std::string out;
  for (size_t i = 1; i < s.size(); ++i) {
    char c = s[i];
    if (c == q) {
      s.remove_prefix(i + 1);
      return out;
    }
    if (q == '"' && c == '\\') {
      if (++i >= s.size()) break;
      switch (s[i]) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 't':
          out += '\t';
          break;
        case 'n':
          out += '\n';
          break;
        case 'f':
          out += '\f';
          break;
        case 'r':
          out += '\r';
          break;
        default:
          *why = std::string("unsupported escape \\") + s[i];
          return std::nullopt;
      }
      continue;
    }
    out += c;
  }
  *why = "unterminated string";
  return std::nullopt;
}

// Skips a value we do not need (string, array possibly over several lines, inline table,
// bool, number) starting at `s`; may consume further lines. Returns false on a syntax error.
bool SkipValue(std::string_view& s, const std::vector<std::string_view>& lines, size_t& line,
               std::string* why) {
  int depth = 0;
  for (;;) {
    while (!s.empty()) {
      char c = s[0];
      if (c == '"' || c == '\'') {
        if (!ReadString(s, why)) return false;
        continue;
      }
      if (c == '#') {
        s = {};
        break;
      }
      if (c == '[' || c == '{') ++depth;
      if (c == ']' || c == '}') {
        if (--depth < 0) {
          *why = std::string("unbalanced '") + c + "'";
          return false;
        }
      }
      s.remove_prefix(1);
    }
    if (depth == 0) return true;
    if (line + 1 >= lines.size()) {
      *why = "unterminated array or inline table";
      return false;
    }
    s = lines[++line];
  }
}

std::string Quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

}  // namespace

Result<HostsToml> ParseHostsToml(std::string_view text) {
  if (text.size() > kMaxHostsTomlBytes) return Status::Error("file too large");
  std::vector<std::string_view> lines;
  for (size_t start = 0; start <= text.size();) {
    size_t nl = text.find('\n', start);
    if (nl == std::string_view::npos) nl = text.size();
    lines.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
  HostsToml out;
  bool top_level = true;
  bool have_server = false;
  for (size_t i = 0; i < lines.size(); ++i) {
    const size_t lineno = i + 1;
    auto fail = [&](const std::string& why) {
      return Status::Error("line " + std::to_string(lineno) + ": " + why);
    };
    std::string_view s = Trim(lines[i]);
    if (s.empty() || s[0] == '#') continue;
    std::string why;
    if (s[0] == '[') {
      if (s.size() > 1 && s[1] == '[') return fail("arrays of tables are not expected here");
      s.remove_prefix(1);
      // Dotted key: bare or quoted parts.
      std::vector<std::string> parts;
      for (;;) {
        s = Trim(s);
        if (s.empty()) return fail("unterminated table header");
        if (s[0] == '"' || s[0] == '\'') {
          auto part = ReadString(s, &why);
          if (!part) return fail(why);
          parts.push_back(*part);
        } else {
          size_t n = 0;
          while (n < s.size() &&
                 (std::isalnum(static_cast<unsigned char>(s[n])) || s[n] == '_' || s[n] == '-')) {
            ++n;
          }
          if (n == 0) return fail("bad table header");
          parts.emplace_back(s.substr(0, n));
          s.remove_prefix(n);
        }
        s = Trim(s);
        if (!s.empty() && s[0] == '.') {
          s.remove_prefix(1);
          continue;
        }
        if (!s.empty() && s[0] == ']') {
          s.remove_prefix(1);
          break;
        }
        return fail("bad table header");
      }
      s = Trim(s);
      if (!s.empty() && s[0] != '#') return fail("text after a table header");
      top_level = false;
      if (parts[0] == "host") {
        if (parts.size() < 2) return fail("[host] needs a URL: [host.\"https://...\"]");
        if (std::find(out.hosts.begin(), out.hosts.end(), parts[1]) == out.hosts.end()) {
          out.hosts.push_back(parts[1]);
        }
      }
      continue;
    }
    // key = value
    // A key: bare or quoted parts joined by dots.
    std::string key;
    for (;;) {
      if (!s.empty() && (s[0] == '"' || s[0] == '\'')) {
        auto part = ReadString(s, &why);
        if (!part) return fail(why);
        key += *part;
      } else {
        size_t n = 0;
        while (n < s.size() &&
               (std::isalnum(static_cast<unsigned char>(s[n])) || s[n] == '_' || s[n] == '-')) {
          ++n;
        }
        if (n == 0) return fail("expected key = value or a [table]");
        key += s.substr(0, n);
        s.remove_prefix(n);
      }
      s = Trim(s);
      if (s.empty() || s[0] != '.') break;
      key += '.';
      s = Trim(s.substr(1));
    }
    if (s.empty() || s[0] != '=') return fail("expected '=' after " + Quoted(key));
    s = Trim(s.substr(1));
    if (s.empty()) return fail("missing value for " + Quoted(key));
    if (top_level && key.rfind("host.", 0) == 0) {
      return fail("dotted host keys are not supported here; use [host.\"URL\"] tables");
    }
    if (top_level && key == "server") {
      if (have_server) return fail("duplicate key 'server'");
      auto v = ReadString(s, &why);
      if (!v) return fail("server: " + why);
      s = Trim(s);
      if (!s.empty() && s[0] != '#') return fail("text after the value of 'server'");
      out.server = *v;
      have_server = true;
      continue;
    }
    if (!SkipValue(s, lines, i, &why)) return fail(key + ": " + why);
  }
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

// "URL" from hosts.toml -> target, as containerd's parseHostConfig reads it.
Result<ProbeTarget> TargetFromUrl(std::string url) {
  if (url.rfind("http", 0) != 0) {
    if (url.find("://") != std::string::npos) {
      return Status::Error("URL " + Quoted(url) + ": scheme must be http or https");
    }
    url = "https://" + url;
  }
  size_t sep = url.find("://");
  if (sep == std::string::npos) return Status::Error("URL " + Quoted(url) + " has no scheme");
  ProbeTarget t;
  t.scheme = url.substr(0, sep);
  if (t.scheme != "http" && t.scheme != "https") {
    return Status::Error("URL " + Quoted(url) + ": scheme must be http or https");
  }
  std::string rest = url.substr(sep + 3);
  size_t slash = rest.find('/');
  t.host = rest.substr(0, slash);
  if (t.host.empty() || t.host.find_first_of(" \t@?#") != std::string::npos) {
    return Status::Error("URL " + Quoted(url) + ": bad host");
  }
  std::string path = slash == std::string::npos ? "" : rest.substr(slash);
  if (size_t q = path.find_first_of("?#"); q != std::string::npos) path.resize(q);
  // path.Clean, then the API root: <path>/v2 unless it already ends in /v2.
  std::string clean;
  for (size_t i = 0; i < path.size(); ++i) {
    if (path[i] == '/' && !clean.empty() && clean.back() == '/') continue;
    clean += path[i];
  }
  while (!clean.empty() && clean.back() == '/') clean.pop_back();
  if (clean.size() < 3 || clean.compare(clean.size() - 3, 3, "/v2") != 0) clean += "/v2";
  t.path = clean + "/";
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

bool IsDir(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace

ProbeTarget ResolveProbeTarget(const std::string& host, const std::string& hosts_dir,
                               std::string* problem) {
  if (problem) problem->clear();
  if (hosts_dir.empty()) return DefaultTarget(host);
  std::vector<std::string> dirs;
  if (size_t c = host.rfind(':'); c != std::string::npos && c > 0) {
    dirs.push_back(hosts_dir + "/" + host.substr(0, c) + "_" + host.substr(c + 1) + "_");
  }
  dirs.push_back(hosts_dir + "/" + host);
  dirs.push_back(hosts_dir + "/_default");
  for (const std::string& d : dirs) {
    if (!IsDir(d)) continue;
    // The first directory that exists is the one containerd uses, hosts.toml or not.
    const std::string file = d + "/hosts.toml";
    std::ifstream in(file, std::ios::binary);
    if (!in) return DefaultTarget(host);  // no hosts.toml: certificate files only
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto parsed = ParseHostsToml(text);
    std::string why;
    if (!parsed.ok()) {
      why = parsed.error();
    } else if (parsed->hosts.empty()) {
      // containerd 1.6 rejects such a file ("invalid `host` tree") and uses the default.
      why = "no [host.\"URL\"] table (containerd 1.6 then ignores the file)";
    } else {
      auto t = TargetFromUrl(parsed->hosts.front());
      if (t.ok()) {
        ProbeTarget out = *t;
        out.source = file + " [host.\"" + parsed->hosts.front() + "\"]";
        return out;
      }
      why = t.error();
    }
    if (problem) *problem = file + ": " + why + "; probing the default";
    return DefaultTarget(host);
  }
  return DefaultTarget(host);
}

// ---------------------------------------------------------------------------------------------
// The probe

namespace {

// A socket closed on scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) close(fd);
  }
};

struct SslDeleter {
  void operator()(SSL* s) const { SSL_free(s); }
};

SSL_CTX* ProbeSslContext() {
  // Created once, never freed (lives for the process). No verification: see the header.
  static SSL_CTX* ctx = [] {
    SSL_CTX* c = SSL_CTX_new(TLS_client_method());
    if (c) {
      SSL_CTX_set_verify(c, SSL_VERIFY_NONE, nullptr);
      SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    }
    return c;
  }();
  return ctx;
}

std::string SslErrors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out;
}

// Waits until fd is ready for `events`, the deadline passes, or stop is set. 1 ready, 0 timed
// out, -1 stopped.
int WaitFd(int fd, short events, SteadyClock::time_point deadline, const std::atomic<bool>& stop) {
  for (;;) {
    if (stop.load()) return -1;
    auto left = deadline - SteadyClock::now();
    if (left <= SteadyClock::duration::zero()) return 0;
    int ms = static_cast<int>(std::min<int64_t>(Ms(left) + 1, 50));
    pollfd p{fd, events, 0};
    int r = poll(&p, 1, ms);
    if (r > 0) return 1;
    if (r < 0 && errno != EINTR) return 1;  // let the next call report the error
  }
}

std::pair<std::string, std::string> SplitHostPort(const std::string& hostport,
                                                  const std::string& scheme) {
  std::string host = hostport, port = scheme == "https" ? "443" : "80";
  if (!host.empty() && host[0] == '[') {
    size_t close = host.find(']');
    std::string inner = host.substr(1, close - 1);
    if (close + 1 < host.size() && host[close + 1] == ':') port = host.substr(close + 2);
    return {inner, port};
  }
  if (size_t c = host.rfind(':'); c != std::string::npos && host.find(':') == c) {
    port = host.substr(c + 1);
    host.resize(c);
  }
  return {host, port};
}

}  // namespace

ProbeResult HttpProbe(const ProbeTarget& target, SteadyClock::time_point deadline,
                      const std::atomic<bool>& stop) {
  ProbeResult r;
  const auto start = SteadyClock::now();
  auto timed_out = [&](const char* during) {
    r.detail = "no answer within " +
               std::to_string(std::chrono::ceil<milliseconds>(deadline - start).count()) + "ms (" +
               during + ")";
    return r;
  };
  auto stopped = [&] {
    r.detail = "probe stopped";
    return r;
  };
  auto [host, port] = SplitHostPort(target.host, target.scheme);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_family = AF_UNSPEC;
  addrinfo* res = nullptr;
  if (int e = getaddrinfo(host.c_str(), port.c_str(), &hints, &res); e != 0) {
    r.detail = "cannot resolve " + host + ": " + gai_strerror(e);
    return r;
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> addrs(res, freeaddrinfo);
  if (SteadyClock::now() >= deadline) return timed_out("resolving the name");

  Fd sock;
  std::string connect_error = "no address";
  for (addrinfo* a = res; a; a = a->ai_next) {
    Fd s;
    s.fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (s.fd < 0) continue;
    if (connect(s.fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
      connect_error = std::strerror(errno);
      continue;
    }
    int w = WaitFd(s.fd, POLLOUT, deadline, stop);
    if (w < 0) return stopped();
    if (w == 0) return timed_out("connecting");
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      connect_error = std::strerror(err);
      continue;
    }
    std::swap(sock.fd, s.fd);
    break;
  }
  if (sock.fd < 0) {
    r.detail = "connect: " + connect_error;
    for (char& c : r.detail) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return r;
  }

  std::unique_ptr<SSL, SslDeleter> ssl;
  if (target.scheme == "https") {
    SSL_CTX* ctx = ProbeSslContext();
    if (!ctx) {
      r.detail = "TLS unavailable: " + SslErrors();
      return r;
    }
    ssl.reset(SSL_new(ctx));
    if (!ssl || SSL_set_fd(ssl.get(), sock.fd) != 1) {
      r.detail = "TLS setup failed: " + SslErrors();
      return r;
    }
    in_addr a4{};
    in6_addr a6{};
    if (inet_pton(AF_INET, host.c_str(), &a4) != 1 && inet_pton(AF_INET6, host.c_str(), &a6) != 1) {
      SSL_set_tlsext_host_name(ssl.get(), host.c_str());
    }
    ERR_clear_error();
    for (;;) {
      int rc = SSL_connect(ssl.get());
      if (rc == 1) break;
      int e = SSL_get_error(ssl.get(), rc);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        int w = WaitFd(sock.fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, deadline, stop);
        if (w < 0) return stopped();
        if (w == 0) return timed_out("TLS handshake");
        continue;
      }
      std::string why = SslErrors();
      if (why.empty())
        why = e == SSL_ERROR_SYSCALL && errno ? std::strerror(errno) : "connection closed";
      r.detail = "TLS handshake failed: " + why;
      return r;
    }
  }

  auto io = [&](bool write, char* buf, size_t n) -> ssize_t {
    if (ssl) {
      ERR_clear_error();
      int rc = write ? SSL_write(ssl.get(), buf, static_cast<int>(n))
                     : SSL_read(ssl.get(), buf, static_cast<int>(n));
      if (rc > 0) return rc;
      int e = SSL_get_error(ssl.get(), rc);
      if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
      }
      if (e == SSL_ERROR_ZERO_RETURN) return 0;
      if (e == SSL_ERROR_SYSCALL && errno == 0) return 0;
      if (e != SSL_ERROR_SYSCALL) errno = EPROTO;
      return -1;
    }
    return write ? send(sock.fd, buf, n, MSG_NOSIGNAL) : recv(sock.fd, buf, n, 0);
  };

  std::string req = "GET " + target.path + " HTTP/1.1\r\nHost: " + target.host +
                    "\r\nUser-Agent: registry-proxy-probe\r\nAccept: */*\r\n"
                    "Connection: close\r\n\r\n";
  size_t sent = 0;
  while (sent < req.size()) {
    ssize_t n = io(true, req.data() + sent, req.size() - sent);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      int w = WaitFd(sock.fd, POLLOUT, deadline, stop);
      if (w < 0) return stopped();
      if (w == 0) return timed_out("sending the request");
      continue;
    }
    r.detail = std::string("send: ") + (n == 0 ? "connection closed" : std::strerror(errno));
    return r;
  }

  std::string got;
  char buf[512];
  while (got.find("\r\n") == std::string::npos && got.size() < 1024) {
    ssize_t n = io(false, buf, sizeof(buf));
    if (n > 0) {
      got.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      // With TLS, buffered bytes may be pending without the socket being readable.
      if (ssl && SSL_pending(ssl.get()) > 0) continue;
      int w = WaitFd(sock.fd, POLLIN, deadline, stop);
      if (w < 0) return stopped();
      if (w == 0) return timed_out("waiting for the answer");
      continue;
    }
    if (n == 0) {
      r.detail = "connection closed before an HTTP answer";
    } else {
      r.detail = std::string("receive: ") + std::strerror(errno);
    }
    for (char& c : r.detail) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return r;
  }
  // "HTTP/1.1 401 Unauthorized"
  const int status = HttpStatusCode(got);
  if (status < 0) {
    r.detail = "not an HTTP answer";
    return r;
  }
  r.http_status = status;
  r.alive = r.http_status < 500;
  r.detail = "HTTP " + std::to_string(r.http_status);
  return r;
}

bool AttemptSaysDown(const grpc::Status& s, bool attempt_deadline_hit) {
  if (s.ok()) return false;
  if (attempt_deadline_hit) return true;
  // containerd's CRI reports registry failures as UNKNOWN with Go's error text (NOT_FOUND when
  // the mirror answered "manifest unknown": it is up, it just lacks the image). UNAVAILABLE
  // and other codes come from the channel to containerd itself, not from the mirror.
  if (s.error_code() != grpc::StatusCode::UNKNOWN) return false;
  static const char* const kDown[] = {
      "connect: connection refused",
      "connection reset by peer",
      "i/o timeout",
      "no such host",
      "network is unreachable",
      "no route to host",
      "connection timed out",
      "tls handshake timeout",
      "server misbehaving",
      ": EOF",
      "broken pipe",
  };
  const std::string& msg = s.error_message();
  for (const char* k : kDown) {
    if (msg.find(k) != std::string::npos) return true;
  }
  // "... failed with status code [manifests latest]: 503 Service Unavailable"
  for (size_t at = msg.find("status code"); at != std::string::npos;
       at = msg.find("status code", at + 1)) {
    const size_t colon = msg.find(':', at);
    if (colon == std::string::npos) break;
    // ": 5xx "
    if (colon + 6 <= msg.size() && msg[colon + 1] == ' ' && msg[colon + 2] == '5' &&
        IsDigit(msg[colon + 3]) && IsDigit(msg[colon + 4]) && msg[colon + 5] == ' ') {
      return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// The checker

struct MirrorHealthChecker::Probe {
  std::string host;
  ProbeTarget target;
  SteadyClock::time_point started, deadline;
  std::chrono::milliseconds cooldown{0};
  std::atomic<bool> stop{false};
  // Guarded by the checker's mu_:
  bool done = false;
  bool reported = false;
  bool opened = false, closed = false;
  ProbeResult result;
  std::chrono::nanoseconds duration{0};
  bool thread_done = false;  // the probe thread (if any) has finished
  int waiters = 0;           // callers waiting for it; with none, Finish logs the answer
};

MirrorHealthChecker::MirrorHealthChecker() : MirrorHealthChecker(Options{}) {}

MirrorHealthChecker::MirrorHealthChecker(Options options) : options_(std::move(options)) {
  if (!options_.prober) options_.prober = HttpProbe;
  if (!options_.now) options_.now = [] { return SteadyClock::now(); };
}

MirrorHealthChecker::~MirrorHealthChecker() {
  std::list<Runner> runners;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    runners.swap(runners_);
    for (Runner& r : runners) r.probe->stop = true;
  }
  for (Runner& r : runners) r.thread.join();
}

void MirrorHealthChecker::ReapThreads() {
  for (auto it = runners_.begin(); it != runners_.end();) {
    if (it->probe->thread_done) {
      it->thread.join();  // it has returned from its function: immediate
      it = runners_.erase(it);
    } else {
      ++it;
    }
  }
}

bool MirrorHealthChecker::IsOpen(const std::string& host) {
  std::lock_guard lock(mu_);
  auto it = states_.find(host);
  return it != states_.end() && it->second.open && Now() < it->second.open_until;
}

bool MirrorHealthChecker::NeedsProbe(const std::string& host, const HealthSettings& settings) {
  State& st = states_[host];
  const auto now = Now();
  if (st.open && settings.cooldown.count() > 0 && now < st.open_until) return false;
  if (!settings.probe) return false;
  return st.open || now >= st.alive_until;
}

bool MirrorHealthChecker::KnownAlive(const std::string& host) {
  auto it = states_.find(host);
  return it != states_.end() && !it->second.open && Now() < it->second.alive_until;
}

std::shared_ptr<MirrorHealthChecker::Probe> MirrorHealthChecker::StartProbe(
    const std::string& host, const HealthSettings& settings, std::unique_lock<std::mutex>& lock) {
  State& st = states_[host];
  if (st.probe) return st.probe;
  auto p = std::make_shared<Probe>();
  p->host = host;
  std::string problem;
  p->target = ResolveProbeTarget(host, settings.hosts_dir, &problem);
  if (!problem.empty() && logged_problems_.insert(host + "\n" + problem).second) {
    spdlog::warn("mirror {}: {}", host, problem);
  }
  p->started = Now();
  p->deadline = p->started + settings.probe_timeout;
  p->cooldown = settings.cooldown;
  st.probe = p;
  if (options_.probe_thread && !stopping_) {
    // The prober's own deadline is real time (it polls sockets).
    const auto real_deadline = SteadyClock::now() + settings.probe_timeout;
    Runner runner;
    runner.probe = p;
    try {
      runner.thread = std::thread([this, p, real_deadline] {
        ProbeResult r = options_.prober(p->target, real_deadline, p->stop);
        std::lock_guard l(mu_);
        Finish(p, std::move(r));
        p->thread_done = true;
      });
      runners_.push_back(std::move(runner));
    } catch (const std::system_error& e) {  // no thread to be had: the mirror gets the doubt
      Finish(p, ProbeResult{true, 0, std::string("not probed: ") + e.what()});
    }
  } else {
    ++p->waiters;  // the caller: Finish must leave the report to it
    lock.unlock();
    ProbeResult r =
        options_.prober(p->target, SteadyClock::now() + settings.probe_timeout, p->stop);
    lock.lock();
    Finish(p, std::move(r));
    --p->waiters;
  }
  return p;
}

bool MirrorHealthChecker::ProbeInFlight(const std::string& host) {
  std::lock_guard lock(mu_);
  auto it = states_.find(host);
  return it != states_.end() && it->second.probe != nullptr;
}

HealthVerdict MirrorHealthChecker::Check(const std::string& host,
                                         const std::vector<std::string>& later,
                                         const HealthSettings& settings, const CallOptions& opts) {
  HealthVerdict v;
  std::unique_lock lock(mu_);
  ReapThreads();
  {
    State& st = states_[host];
    const auto now = Now();
    if (st.open && settings.cooldown.count() > 0 && now < st.open_until) {
      v.action = HealthVerdict::Action::kCooldown;
      v.cooldown_left = std::chrono::ceil<milliseconds>(st.open_until - now);
      return v;
    }
  }
  if (!NeedsProbe(host, settings)) return v;  // probing off, half-open unprobed, or alive

  std::shared_ptr<Probe> p = StartProbe(host, settings, lock);
  // This one needs a probe, so the later ones may soon be needed: probe them now, in parallel
  // (inline probing would run them one after another: not then).
  const bool hedging = settings.hedge_delay.count() > 0 && options_.probe_thread;
  if (hedging) {
    for (const std::string& h : later) {
      if (h != host && NeedsProbe(h, settings)) StartProbe(h, settings, lock);
    }
  }
  // Wait for the probe (ours or the one in flight). Waiters give up on it a little after its
  // deadline even if the prober has not returned (a name lookup cannot be interrupted): it
  // then counts as timed out, and its late answer is dropped.
  ++p->waiters;
  while (!p->done) {
    if (opts.cancellation && opts.cancellation->cancelled()) {
      v.action = HealthVerdict::Action::kCancelled;
      break;
    }
    if (std::chrono::system_clock::now() >= opts.deadline) {
      v.action = HealthVerdict::Action::kNoTime;
      break;
    }
    const auto now = Now();
    if (now >= p->deadline + milliseconds(100)) {
      Finish(p, ProbeResult{
                    false, 0,
                    "no answer within " + std::to_string(Ms(p->deadline - p->started)) + "ms"});
      break;
    }
    if (hedging && now >= p->started + settings.hedge_delay) {
      for (const std::string& h : later) {
        if (h != host && KnownAlive(h)) {
          v.action = HealthVerdict::Action::kSlow;
          v.waited = std::chrono::floor<milliseconds>(now - p->started);
          v.alive_instead = h;
          v.target = p->target.Url();
          break;
        }
      }
      if (v.action == HealthVerdict::Action::kSlow) break;
    }
    finished_.wait_for(lock, milliseconds(20));
  }
  --p->waiters;
  if (!p->done) return v;  // cancelled, no time or slow: the probe runs on
  v.probed = true;
  v.probe = p->result;
  v.probe_duration = p->duration;
  v.target = p->target.Url();
  if (!p->reported) {
    p->reported = true;
    v.ran_probe = true;
    v.breaker_opened = p->opened;
    v.breaker_closed = p->closed;
  }
  v.action = p->result.alive ? HealthVerdict::Action::kTry : HealthVerdict::Action::kDead;
  return v;
}

void MirrorHealthChecker::Finish(const std::shared_ptr<Probe>& p, ProbeResult result) {
  if (p->done) return;
  const auto end = Now();
  p->done = true;
  p->result = std::move(result);
  p->duration = end - p->started;
  State& s = states_[p->host];
  if (s.probe == p) s.probe.reset();
  if (p->result.alive) {
    s.alive_until = end + options_.alive_ttl;
    if (s.open) p->closed = true;
    s.open = false;
  } else {
    s.alive_until = {};
    if (p->cooldown.count() > 0) {
      if (!s.open) p->opened = true;
      s.open = true;
      s.open_until = end + p->cooldown;
    }
  }
  if (p->waiters == 0 && !stopping_) {
    // Nobody will report it (a mirror a pull hedged past, or one probed ahead and not needed).
    p->reported = true;
    spdlog::log(p->result.alive ? spdlog::level::info : spdlog::level::warn,
                "mirror {}: probe {} {} in {}ms: {}", p->host, p->target.Url(),
                p->result.alive ? "alive" : "DEAD", Ms(p->duration), p->result.detail);
    if (p->opened) {
      spdlog::warn("mirror {}: circuit breaker open for {}ms: probe failed", p->host,
                   p->cooldown.count());
    }
    if (p->closed) spdlog::info("mirror {}: circuit breaker closed: probe alive", p->host);
  }
  finished_.notify_all();
}

int MirrorHealthChecker::Report(const std::string& host, bool ok, bool down,
                                const HealthSettings& settings) {
  std::lock_guard lock(mu_);
  State& st = states_[host];
  const auto now = Now();
  if (ok) {
    st.alive_until = now + options_.alive_ttl;
    if (st.open) {
      st.open = false;
      return -1;
    }
    return 0;
  }
  if (!down || settings.cooldown.count() <= 0) return 0;
  st.alive_until = {};
  const bool was_open = st.open;
  st.open = true;
  st.open_until = now + settings.cooldown;
  return was_open ? 0 : 1;
}

}  // namespace registry_proxy
