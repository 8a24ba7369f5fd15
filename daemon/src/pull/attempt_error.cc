#include "pull/attempt_error.h"

#include <cctype>

namespace registry_proxy {
namespace {

struct Marker {
  const char* text;    // as Go, containerd or gRPC write it (case matters)
  const char* detail;  // what the summary says
};

// containerd itself failed: the node, not the registry. Checked first: a full disk shows up
// inside download and unpack errors alike.
constexpr Marker kContainerdMarkers[] = {
    {"no space left on device", "no space left on device"},
    {"read-only file system", "read-only file system"},
    {"failed to extract layer", "unpacking failed"},
    {"failed to unpack", "unpacking failed"},
    {"apply layer error", "unpacking failed"},
    {"failed to prepare extraction snapshot", "snapshot failed"},
    {"failed to commit snapshot", "snapshot failed"},
    {"failed to create snapshot", "snapshot failed"},
    {"snapshotter not loaded", "snapshot failed"},
    {"failed to open writer", "content store failed"},
    {"transfer service not available", "containerd unavailable"},
};

// Go's net, net/http and crypto/tls texts for a registry that cannot be talked to.
constexpr Marker kDownMarkers[] = {
    {"connect: connection refused", "connection refused"},
    {"connection reset by peer", "connection reset"},
    {"broken pipe", "connection reset"},
    {"i/o timeout", "timeout"},
    {"connection timed out", "timeout"},
    {"TLS handshake timeout", "TLS handshake timeout"},
    {"tls handshake timeout", "TLS handshake timeout"},
    {"x509: ", "TLS certificate rejected"},
    {"tls: ", "TLS failure"},
    {"server gave HTTP response to HTTPS client", "TLS failure (plain HTTP)"},
    {"no such host", "no such host"},
    {"server misbehaving", "DNS failure"},
    {"network is unreachable", "unreachable"},
    {"no route to host", "unreachable"},
    {"unexpected EOF", "connection closed"},
    {": EOF", "connection closed"},
};

bool Has(std::string_view msg, std::string_view text) {
  return msg.find(text) != std::string_view::npos;
}

const char* FindMarker(std::string_view msg, const Marker* begin, const Marker* end) {
  for (const Marker* m = begin; m != end; ++m) {
    if (Has(msg, m->text)) return m->detail;
  }
  return nullptr;
}

bool Digit(char c) { return std::isdigit(static_cast<unsigned char>(c)) != 0; }

// An HTTP status in an "unexpected status" error, e.g. ": 503 Service Unavailable" after
// "status code [manifests latest]" (1.6, 1.7) or "status from HEAD request to URL" (2.x);
// "" when none. first: the status's first digit to look for.
std::string HttpStatus(std::string_view msg, char first) {
  const size_t at = msg.find("status");
  if (at == std::string_view::npos) return "";
  for (size_t i = msg.find(": ", at); i != std::string_view::npos; i = msg.find(": ", i + 1)) {
    const size_t d = i + 2;
    if (d + 4 <= msg.size() && msg[d] == first && Digit(msg[d + 1]) && Digit(msg[d + 2]) &&
        (d + 3 == msg.size() || msg[d + 3] == ' ')) {
      size_t e = msg.find_first_of(",;\n", d);
      if (e == std::string_view::npos) e = msg.size();
      return std::string(msg.substr(d, std::min<size_t>(e - d, 40)));
    }
  }
  return "";
}

bool SaysNotFound(std::string_view msg) {
  return Has(msg, "manifest unknown") || Has(msg, "404 Not Found") ||
         (msg.size() >= 11 && msg.substr(msg.size() - 11) == ": not found");
}

}  // namespace

AttemptVerdict ClassifyAttempt(const RpcStatus& s, bool own_deadline_hit, bool caller_gone) {
  using C = RpcCode;
  if (s.ok()) return {AttemptClass::kOk, ""};
  const C code = s.error_code();
  const std::string& msg = s.error_message();
  if (code == C::DEADLINE_EXCEEDED && own_deadline_hit && !caller_gone) {
    return {AttemptClass::kMirrorDown, "attempt timeout"};
  }
  if (caller_gone || code == C::CANCELLED) return {AttemptClass::kCallerGone, "cancelled"};
  if (code == C::DEADLINE_EXCEEDED) return {AttemptClass::kCallerGone, "the caller's deadline"};
  if (const char* d =
          FindMarker(msg, std::begin(kContainerdMarkers), std::end(kContainerdMarkers))) {
    return {AttemptClass::kContainerdFailed, d};
  }
  // UNAVAILABLE: the channel to containerd (not running, restarting, socket gone), whatever the
  // text (gRPC's own "Connection refused" is containerd's socket, not a registry). containerd
  // reports registry errors as UNKNOWN or NOT_FOUND.
  if (code == C::UNAVAILABLE) return {AttemptClass::kContainerdFailed, "containerd unavailable"};
  // The API itself is not served (containerd 2.x has no CRI v1alpha2): no candidate can do
  // better, and the caller must see containerd's answer as it is.
  if (code == C::UNIMPLEMENTED) return {AttemptClass::kContainerdFailed, "not served"};
  if (const char* d = FindMarker(msg, std::begin(kDownMarkers), std::end(kDownMarkers))) {
    return {AttemptClass::kMirrorDown, d};
  }
  if (std::string st = HttpStatus(msg, '5'); !st.empty()) {
    return {AttemptClass::kMirrorDown, st};
  }
  if (code == C::NOT_FOUND || SaysNotFound(msg)) return {AttemptClass::kNotFound, "not found"};
  if (std::string st = HttpStatus(msg, '4'); !st.empty()) return {AttemptClass::kOther, st};
  return {AttemptClass::kOther, ""};
}

std::string_view AttemptClassName(AttemptClass c) {
  switch (c) {
    case AttemptClass::kOk:
      return "ok";
    case AttemptClass::kMirrorDown:
      return "down";
    case AttemptClass::kNotFound:
      return "not found";
    case AttemptClass::kCallerGone:
      return "caller went away";
    case AttemptClass::kContainerdFailed:
      return "containerd failed";
    case AttemptClass::kOther:
      break;
  }
  return "failed";
}

std::string DescribeAttempt(const AttemptVerdict& v) {
  std::string out(AttemptClassName(v.cls));
  if (!v.detail.empty() && v.cls != AttemptClass::kNotFound) out += " (" + v.detail + ")";
  return out;
}

}  // namespace registry_proxy
