// Image reference parsing: a hand-written, single-pass scanner for the docker/distribution
// reference grammar (github.com/distribution/reference, as used by containerd).
//
// No regex engine: std::regex backtracks, allocates and can overflow the stack on long input;
// every routine here walks its input a bounded number of times, so a parse is O(n) for any
// bytes, and a successful parse allocates only for the strings it returns.
//
// Where this deliberately differs from upstream (all are stricter, none accepts more):
//  - A first component that is taken as a domain (it contains '.' or ':', is "localhost" or
//    has uppercase letters) but is not a valid host, such as "foo_bar.com/x", is an error.
//    Upstream quietly falls back to an empty domain with the whole name as path; a Reference
//    always has a domain, and containerd would dial "foo_bar.com" for it anyway.
//  - ParseNamedReference rejects "<algorithm>:<hex>" digests (image ids) instead of reading
//    "sha256:<hex>" as the repository docker.io/library/sha256 with a 64-character tag.
#include "rules/reference.h"

#include <cstddef>
#include <string>
#include <string_view>

namespace registry_proxy {
namespace {

constexpr bool IsDigit(char c) { return c >= '0' && c <= '9'; }
constexpr bool IsLower(char c) { return c >= 'a' && c <= 'z'; }
constexpr bool IsUpper(char c) { return c >= 'A' && c <= 'Z'; }
constexpr bool IsAlpha(char c) { return IsLower(c) || IsUpper(c); }
constexpr bool IsAlnum(char c) { return IsAlpha(c) || IsDigit(c); }
constexpr bool IsLowerAlnum(char c) { return IsLower(c) || IsDigit(c); }
constexpr bool IsLowerHex(char c) { return IsDigit(c) || (c >= 'a' && c <= 'f'); }
constexpr bool IsHex(char c) { return IsLowerHex(c) || (c >= 'A' && c <= 'F'); }
constexpr bool IsWord(char c) { return IsAlnum(c) || c == '_'; }  // Go's ASCII \w

bool AllOf(std::string_view s, bool (*pred)(char)) {
  for (char c : s) {
    if (!pred(c)) return false;
  }
  return true;
}

bool HasUpper(std::string_view s) {
  for (char c : s) {
    if (IsUpper(c)) return true;
  }
  return false;
}

// Upstream's anchored identifier: exactly 64 lowercase hex digits.
bool IsFullHexId(std::string_view s) { return s.size() == 64 && AllOf(s, IsLowerHex); }

// A prefix of an id as `crictl images` prints it; 64 digits is a full id, not a short one.
bool IsShortHexId(std::string_view s) {
  return s.size() >= kShortIdMinLength && s.size() < 64 && AllOf(s, IsLowerHex);
}

// What went wrong in a piece of input: a fixed explanation and the offending sub-part.
// Kept allocation-free so that validating good input costs nothing.
struct Problem {
  const char* why = nullptr;
  std::string_view part;
  explicit operator bool() const { return why != nullptr; }
};

// Renders untrusted input for an error message: single-quoted, on one line (control and
// non-ASCII bytes are hex-escaped) and capped, so a megabyte of garbage yields a short error.
std::string Quote(std::string_view s) {
  constexpr size_t kMaxQuoted = 160;  // output characters, escapes included
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve((s.size() < kMaxQuoted ? s.size() : kMaxQuoted) + 32);
  out.push_back('\'');
  size_t i = 0;
  for (; i < s.size() && out.size() <= kMaxQuoted; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\' || c == '\'') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c < 0x20 || c >= 0x7f) {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  out.push_back('\'');
  if (i < s.size()) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

// "<what> '<part>' in '<input>': <why>"; the " in ..." is dropped when part is the whole input.
Status Fail(std::string_view what, std::string_view part, std::string_view input,
            std::string_view why) {
  std::string msg(what);
  msg += ' ';
  msg += Quote(part);
  if (part.data() != input.data() || part.size() != input.size()) {
    msg += " in ";
    msg += Quote(input);
  }
  if (!why.empty()) {
    msg += ": ";
    msg += why;
  }
  return Status::Error(std::move(msg));
}

constexpr char kDomainComponentRule[] =
    "host name components are letters, digits and '-', starting and ending with a letter or "
    "digit";

// domain-name component: [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
bool IsDomainComponent(std::string_view c) {
  if (c.empty() || !IsAlnum(c.front()) || !IsAlnum(c.back())) return false;
  for (char ch : c) {
    if (!IsAlnum(ch) && ch != '-') return false;
  }
  return true;
}

// domain := host [":" port]; host := domain-name | IPv4 | "[" IPv6 "]". IPv4 needs no case of
// its own: dotted decimal is a valid domain-name.
Problem CheckDomain(std::string_view d) {
  if (d.empty()) return {"empty domain", d};
  std::string_view host = d;
  std::string_view port;
  bool has_port = false;
  if (d.front() == '[') {
    const size_t close = d.find(']');
    if (close == std::string_view::npos) return {"'[' without a closing ']'", d};
    host = d.substr(0, close + 1);
    const std::string_view inner = d.substr(1, close - 1);
    if (inner.empty()) return {"empty IPv6 address between '[' and ']'", host};
    for (char c : inner) {
      if (!IsHex(c) && c != ':') {
        return {"an IPv6 address between '[' and ']' is hex digits and ':' only (no zone)", host};
      }
    }
    const std::string_view rest = d.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return {"only ':<port>' may follow ']'", rest};
      has_port = true;
      port = rest.substr(1);
    }
  } else {
    const size_t colon = d.find(':');
    if (colon != std::string_view::npos) {
      host = d.substr(0, colon);
      port = d.substr(colon + 1);
      has_port = true;
    }
    if (host.empty()) return {"empty host name", d};
    size_t start = 0;
    while (true) {
      const size_t dot = host.find('.', start);
      const std::string_view comp =
          host.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
      if (!IsDomainComponent(comp)) return {kDomainComponentRule, comp};
      if (dot == std::string_view::npos) break;
      start = dot + 1;
    }
  }
  if (has_port && (port.empty() || !AllOf(port, IsDigit))) {
    return {"the port after ':' must be decimal digits", port.empty() ? d : port};
  }
  return {};
}

constexpr char kPathComponentRule[] =
    "path components are lowercase letters and digits, joined by '.', '_', '__' or dashes, "
    "starting and ending with a letter or digit";

// path-component := [a-z0-9]+ (separator [a-z0-9]+)*; separator := [_.] | "__" | "-"+
bool IsPathComponent(std::string_view c) {
  const size_t n = c.size();
  if (n == 0 || !IsLowerAlnum(c[0])) return false;
  size_t i = 1;
  while (i < n) {
    const char ch = c[i];
    if (IsLowerAlnum(ch)) {
      ++i;
      continue;
    }
    // A separator, which must be followed by an alphanumeric.
    if (ch == '.') {
      ++i;
    } else if (ch == '_') {
      ++i;
      if (i < n && c[i] == '_') ++i;
    } else if (ch == '-') {
      while (i < n && c[i] == '-') ++i;
    } else {
      return false;
    }
    if (i >= n || !IsLowerAlnum(c[i])) return false;
  }
  return true;
}

// Grammar only; uppercase is reported separately (upstream's dedicated message) by callers.
Problem CheckPathGrammar(std::string_view path) {
  if (path.empty()) return {"empty repository path", path};
  size_t start = 0;
  while (true) {
    const size_t slash = path.find('/', start);
    const std::string_view comp = path.substr(
        start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
    if (comp.empty()) return {"empty path component (leading, trailing or doubled '/')", path};
    if (!IsPathComponent(comp)) return {kPathComponentRule, comp};
    if (slash == std::string_view::npos) break;
    start = slash + 1;
  }
  return {};
}

constexpr char kTagRule[] =
    "tags are letters, digits, '_', '.', '-' (at most 128, not starting with '.' or '-')";

bool IsValidTag(std::string_view t) {
  if (t.empty() || t.size() > kTagLengthMax || !IsWord(t[0])) return false;
  for (char c : t) {
    if (!IsWord(c) && c != '.' && c != '-') return false;
  }
  return true;
}

// The hex length go-digest requires for an algorithm it supports, or 0.
size_t DigestHexLength(std::string_view algorithm) {
  if (algorithm == "sha256") return 64;
  if (algorithm == "sha384") return 96;
  if (algorithm == "sha512") return 128;
  return 0;
}

// digest := algorithm ":" hex, algorithm := component ([+._-] component)*, component :=
// [A-Za-z][A-Za-z0-9]*, hex := [0-9a-fA-F]{32,}; then go-digest's checks, which reject what
// a registry could never serve: unknown algorithms, wrong lengths and uppercase hex.
Status CheckDigest(std::string_view dg, std::string_view input) {
  const size_t colon = dg.find(':');
  const std::string_view algorithm = dg.substr(0, colon);
  bool algorithm_ok = !algorithm.empty() && IsAlpha(algorithm[0]);
  for (size_t i = 1; algorithm_ok && i < algorithm.size(); ++i) {
    const char c = algorithm[i];
    if (c == '+' || c == '.' || c == '_' || c == '-') {
      algorithm_ok = i + 1 < algorithm.size() && IsAlpha(algorithm[i + 1]);
    } else {
      algorithm_ok = IsAlnum(c);
    }
  }
  if (colon == std::string_view::npos || !algorithm_ok) {
    return Fail("invalid digest", dg, input, "expected <algorithm>:<hex>, e.g. sha256:<64 hex>");
  }
  const std::string_view hex = dg.substr(colon + 1);
  if (hex.empty() || !AllOf(hex, IsHex)) {
    return Fail("invalid digest", dg, input, "the part after ':' must be hex digits");
  }
  const size_t want = DigestHexLength(algorithm);
  if (want == 0) {
    return Fail("unsupported digest algorithm", algorithm, input,
                "only sha256, sha384 and sha512 are supported");
  }
  if (hex.size() != want) {
    std::string why(algorithm);
    why += " needs " + std::to_string(want) + " hex digits, got " + std::to_string(hex.size());
    return Fail("invalid digest length", dg, input, why);
  }
  if (!AllOf(hex, IsLowerHex)) {
    return Fail("invalid digest", dg, input, "hex digits must be lowercase");
  }
  return Status::Ok();
}

// A digest go-digest accepts whole (what ParseAnyReference treats as an image id).
bool IsValidDigest(std::string_view s) {
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos) return false;
  const size_t want = DigestHexLength(s.substr(0, colon));
  const std::string_view hex = s.substr(colon + 1);
  return want != 0 && hex.size() == want && AllOf(hex, IsLowerHex);
}

// ParseNormalizedNamed without the 64-hex check: splits, normalises and validates `input`.
Status ParseNamedInto(std::string_view input, Reference* out) {
  if (input.empty()) {
    return Status::Error("invalid reference '': repository name must have at least one component");
  }

  // No part of a reference but the separator may contain '@': the first one starts the digest.
  std::string_view rest = input;
  std::string_view digest;
  bool has_digest = false;
  if (const size_t at = input.find('@'); at != std::string_view::npos) {
    rest = input.substr(0, at);
    digest = input.substr(at + 1);
    has_digest = true;
  }
  // A tag cannot contain '/' or ':', and the only ':' a name may hold is a port's, which is
  // always followed by a '/'; so a ':' after the last '/' starts the tag.
  std::string_view name = rest;
  std::string_view tag;
  bool has_tag = false;
  if (const size_t colon = rest.rfind(':'); colon != std::string_view::npos) {
    const size_t slash = rest.rfind('/');
    if (slash == std::string_view::npos || colon > slash) {
      name = rest.substr(0, colon);
      tag = rest.substr(colon + 1);
      has_tag = true;
    }
  }
  if (name.empty()) {
    return Fail("invalid reference", input, input, "no repository name before ':' or '@'");
  }

  // splitDockerDomain: the first component is a domain when it has '.' or ':', is localhost,
  // or has uppercase letters (which a path may not, so the user cannot have meant a path).
  std::string_view domain = kDefaultDomain;
  std::string_view remote = name;  // the path as written, before "library/" is added
  if (const size_t slash = name.find('/'); slash != std::string_view::npos) {
    const std::string_view first = name.substr(0, slash);
    if (first.find_first_of(".:") != std::string_view::npos || first == "localhost" ||
        HasUpper(first)) {
      if (Problem p = CheckDomain(first)) {
        std::string why = p.why;
        if (p.part != first) why = Quote(p.part) + ": " + why;
        return Fail("invalid domain", first, input, why);
      }
      domain = first == kLegacyDefaultDomain ? kDefaultDomain : first;
      remote = name.substr(slash + 1);
    }
  }

  if (HasUpper(remote)) {
    std::string msg = "repository name must be lowercase: " + Quote(remote);
    if (remote.size() != input.size()) msg += " in " + Quote(input);
    return Status::Error(std::move(msg));
  }
  if (Problem p = CheckPathGrammar(remote)) {
    std::string why = p.why;
    if (p.part != remote) why = Quote(p.part) + ": " + why;
    return Fail("invalid repository name", remote, input, why);
  }
  const bool official = domain == kDefaultDomain && remote.find('/') == std::string_view::npos;
  // distribution/reference >= v0.6.0 limits the normalised path (including an added
  // "library/", excluding the domain); older releases counted domain + "/" + path.
  const size_t path_length = remote.size() + (official ? kOfficialRepoPrefix.size() : 0);
  if (path_length > kNameTotalLengthMax) {
    std::string msg = "repository name must not be more than 255 characters: path ";
    msg += official ? Quote(std::string(kOfficialRepoPrefix) + std::string(remote)) : Quote(remote);
    msg += " has " + std::to_string(path_length) + " in " + Quote(input);
    return Status::Error(std::move(msg));
  }

  if (has_tag && !IsValidTag(tag)) return Fail("invalid tag", tag, input, kTagRule);
  if (has_digest) {
    if (Status s = CheckDigest(digest, input); !s.ok()) return s;
  }

  out->domain.assign(domain);
  if (official) {
    out->path.reserve(path_length);
    out->path.assign(kOfficialRepoPrefix);
    out->path.append(remote);
  } else {
    out->path.assign(remote);
  }
  out->tag.assign(tag);
  out->digest.assign(digest);
  return Status::Ok();
}

}  // namespace

std::string Reference::Name() const {
  std::string s;
  s.reserve(domain.size() + 1 + path.size());
  s.append(domain).append(1, '/').append(path);
  return s;
}

std::string Reference::String() const {
  std::string s;
  s.reserve(domain.size() + path.size() + tag.size() + digest.size() + 3);
  s.append(domain).append(1, '/').append(path);
  if (!tag.empty()) s.append(1, ':').append(tag);
  if (!digest.empty()) s.append(1, '@').append(digest);
  return s;
}

std::string Reference::NormalizedString() const {
  std::string s;
  s.reserve(domain.size() + path.size() + tag.size() + digest.size() + 9);
  s.append(domain).append(1, '/').append(path);
  if (!digest.empty()) {
    s.append(1, '@').append(digest);
  } else {
    s.append(1, ':').append(tag.empty() ? kDefaultTag : std::string_view(tag));
  }
  return s;
}

std::string Reference::FamiliarName() const {
  if (domain != kDefaultDomain) return Name();
  // Only "library/<one component>" shortens: "library/a/b" must keep its prefix, or it would
  // read back as the different repository docker.io/a/b.
  std::string_view p = path;
  if (p.substr(0, kOfficialRepoPrefix.size()) == kOfficialRepoPrefix &&
      p.find('/', kOfficialRepoPrefix.size()) == std::string_view::npos) {
    p.remove_prefix(kOfficialRepoPrefix.size());
  }
  return std::string(p);
}

Result<ParsedReference> ParseImage(std::string_view input) {
  ParsedReference parsed;
  // ParseAnyReference's order: a bare id, then a whole digest, then a name. Short ids are
  // ours: the CRI hands back whatever `crictl` users typed.
  if (IsFullHexId(input) || IsShortHexId(input) || IsValidDigest(input)) {
    parsed.kind = ReferenceKind::kId;
    parsed.id.assign(input);
    return parsed;
  }
  if (Status s = ParseNamedInto(input, &parsed.ref); !s.ok()) return s;
  return parsed;
}

Result<Reference> ParseNamedReference(std::string_view input) {
  if (IsFullHexId(input)) {
    return Fail("invalid repository name", input, input,
                "cannot specify 64-byte hexadecimal strings");
  }
  if (IsValidDigest(input)) {
    return Fail("invalid repository name", input, input, "this is an image id, not a name");
  }
  Reference ref;
  if (Status s = ParseNamedInto(input, &ref); !s.ok()) return s;
  return ref;
}

bool IsImageIdDigest(std::string_view s) {
  return s.size() == 71 && s.substr(0, 7) == "sha256:" && AllOf(s.substr(7), IsLowerHex);
}

Status ValidateDomain(std::string_view domain) {
  if (Problem p = CheckDomain(domain)) {
    std::string why = p.why;
    if (p.part != domain) why = Quote(p.part) + ": " + why;
    return Fail("invalid domain", domain, domain, why);
  }
  return Status::Ok();
}

Status ValidatePath(std::string_view path) {
  if (HasUpper(path)) return Status::Error("repository name must be lowercase: " + Quote(path));
  if (Problem p = CheckPathGrammar(path)) {
    std::string why = p.why;
    if (p.part != path) why = Quote(p.part) + ": " + why;
    return Fail("invalid repository path", path, path, why);
  }
  if (path.size() > kNameTotalLengthMax) {
    return Status::Error("repository name must not be more than 255 characters: path " +
                         Quote(path) + " has " + std::to_string(path.size()));
  }
  return Status::Ok();
}

}  // namespace registry_proxy
