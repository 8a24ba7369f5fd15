// The config loader: bytes -> checked YAML tree -> schema walk -> Policy.
//
// yaml-cpp's YAML::Load hides what a strict loader needs (it keeps only the first of duplicate
// keys on lookup, cannot say whether a node came from an alias, and recurses as deep as the
// input nests), so the loader builds its own small tree from yaml-cpp's parser events. The
// event handler stops the parser at a nesting limit, rejects recursive aliases, and counts
// how far aliases expand the document, before the schema walk looks at anything.
//
// The walk collects every error it can find (with line, column and field path) and only
// builds a Config when there are none.
#include "rules/config.h"

#include <openssl/evp.h>
#include <spdlog/spdlog.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/exceptions.h>
#include <yaml-cpp/mark.h>
#include <yaml-cpp/parser.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <new>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <utility>
#include <variant>

#include "base/file_util.h"
#include "base/string_util.h"

namespace registry_proxy {
namespace {

// A ConfigMap holds at most 1 MiB; nothing legitimate comes close.
constexpr size_t kMaxConfigBytes = size_t{1} << 20;
// The schema nests about six levels; yaml-cpp recurses once (or more) per level.
constexpr size_t kMaxDepth = 64;
// Aliases may share a mirror list between rules, but not multiply the document (alias bombs).
constexpr uint64_t kMaxAliasNodes = 100000;
// A megabyte of nonsense should not produce a megabyte of errors.
constexpr size_t kMaxErrors = 100;
// sizeof(sockaddr_un::sun_path) on Linux, minus the terminating NUL.
constexpr size_t kMaxUnixPath = 107;

constexpr std::string_view kTagStr = "tag:yaml.org,2002:str";
constexpr std::string_view kTagBool = "tag:yaml.org,2002:bool";
constexpr std::string_view kTagInt = "tag:yaml.org,2002:int";
constexpr std::string_view kTagFloat = "tag:yaml.org,2002:float";
constexpr std::string_view kTagSeq = "tag:yaml.org,2002:seq";
constexpr std::string_view kTagMap = "tag:yaml.org,2002:map";

struct Pos {
  int line = 0;  // 1-based; 0 = unknown
  int column = 0;
};

Pos ToPos(const YAML::Mark& m) {
  if (m.is_null() || m.line < 0) return {};
  return {m.line + 1, m.column < 0 ? 0 : m.column + 1};
}

// Text on one line: newlines as \n, other control characters hex-escaped. Messages from other
// modules may quote input raw; ErrorText is one line per error.
std::string OneLine(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    } else {
      out.push_back(ch);
    }
  }
  return out;
}

// Text from the file, on one line (control characters escaped) and capped at 80 bytes, so a
// megabyte of garbage yields a short error.
constexpr size_t kMaxQuoted = 80;
std::string Escape(std::string_view s) {
  // Cut on a character boundary: the input is UTF-8 and messages must stay UTF-8 (JSON).
  size_t n = std::min(s.size(), kMaxQuoted);
  while (n < s.size() && n > 0 && (static_cast<unsigned char>(s[n]) & 0xc0) == 0x80) --n;
  return OneLine(s.substr(0, n));
}

// A value for a message: 'value', or 'value...'...(N bytes) when long.
std::string Quote(std::string_view s) {
  std::string out = "'" + Escape(s) + "'";
  if (s.size() > kMaxQuoted) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

bool IsLower(char c) { return c >= 'a' && c <= 'z'; }
bool IsUpper(char c) { return c >= 'A' && c <= 'Z'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }
bool IsAlnum(char c) { return IsLower(c) || IsUpper(c) || IsDigit(c); }
bool HasUpper(std::string_view s) { return std::any_of(s.begin(), s.end(), IsUpper); }
bool HasSpace(std::string_view s) { return s.find_first_of(" \t\r\n") != std::string_view::npos; }

char ToLower(char c) { return IsUpper(c) ? static_cast<char>(c - 'A' + 'a') : c; }

// Optimal string alignment distance (Levenshtein plus adjacent transpositions), ignoring
// case, so "excludenamespaces", "exclude_namespaces" and "enabeld" all find their key.
size_t EditDistance(std::string_view a, std::string_view b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i) {
    for (size_t j = 1; j <= m; ++j) {
      const size_t cost = ToLower(a[i - 1]) == ToLower(b[j - 1]) ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && ToLower(a[i - 1]) == ToLower(b[j - 2]) &&
          ToLower(a[i - 2]) == ToLower(b[j - 1])) {
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[n][m];
}

// The closest of `known` within distance 2, or "".
std::string_view Suggest(std::string_view word, const std::vector<std::string_view>& known) {
  // Keys are short; a long word is not a typo of one (and would make the table large).
  if (word.size() > 64) return {};
  std::string_view best;
  size_t best_d = 3;
  for (std::string_view k : known) {
    const size_t d = EditDistance(word, k);
    if (d < best_d) best_d = d, best = k;
  }
  return best;
}

// Puts "what 'value'" in front of a message from another module unless it already names it.
std::string About(std::string_view what, std::string_view value, const std::string& msg) {
  if (!value.empty() && msg.find(value) != std::string::npos) return msg;
  return StrCat({what, " ", Quote(value), ": ", msg});
}

// ---------------------------------------------------------------------------------------------
// Text checks before YAML: size and encoding.

struct TextProblem {
  Pos pos;
  std::string message;
};

std::string TooBig(size_t size) {
  return "config is " + std::to_string(size) + " bytes; the limit is " +
         std::to_string(kMaxConfigBytes) + " bytes (1 MiB)";
}

// yaml-cpp guesses encodings and quietly replaces bad bytes; a config must be UTF-8 text.
std::optional<TextProblem> CheckText(std::string_view s) {
  if (s.size() >= 2 && ((s[0] == '\xfe' && s[1] == '\xff') || (s[0] == '\xff' && s[1] == '\xfe'))) {
    return TextProblem{{1, 1},
                       "config is UTF-16 (it starts with a byte order mark); save it as "
                       "UTF-8"};
  }
  int line = 1, col = 1;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\n') {
      ++line, col = 1, ++i;
      continue;
    }
    if (c < 0x80) {
      if ((c < 0x20 && c != '\t' && c != '\r') || c == 0x7f) {
        static constexpr char kHex[] = "0123456789ABCDEF";
        std::string code = "U+00";
        code.push_back(kHex[c >> 4]);
        code.push_back(kHex[c & 0xf]);
        return TextProblem{{line, col}, "control character " + code + " is not allowed"};
      }
      ++i, ++col;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0;
    if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07;
    }
    bool ok = len != 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xc0) == 0x80;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8 either.
    if (ok) {
      ok = !((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
             (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff));
    }
    if (!ok) return TextProblem{{line, col}, "config is not valid UTF-8"};
    i += len, ++col;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// The YAML tree.

struct Node {
  enum class Kind { kNull, kScalar, kSequence, kMap };
  Kind kind = Kind::kNull;
  Pos pos;
  std::string tag;    // "?" plain scalar or untagged collection, "!" quoted scalar, or a tag
  std::string value;  // scalars
  // Sequence items; for a map, keys and values alternating. Aliases share nodes.
  std::vector<const Node*> children;
  bool open = false;      // a collection still being parsed
  uint64_t expanded = 1;  // nodes in this subtree with every alias expanded (saturating)
};

// Thrown from the event handler to stop yaml-cpp; no yaml-cpp frame catches it.
struct StopParsing {
  Pos pos;
  std::string message;
};

class TreeBuilder final : public YAML::EventHandler {
 public:
  const Node* root() const { return root_; }
  size_t node_count() const { return nodes_.size(); }
  Pos document_pos() const { return document_pos_; }

  void OnDocumentStart(const YAML::Mark& mark) override { document_pos_ = ToPos(mark); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    Finish(New(Node::Kind::kNull, mark, ""), anchor);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    auto it = anchors_.find(anchor);
    if (it == anchors_.end()) throw StopParsing{ToPos(mark), "alias to an unknown anchor"};
    if (it->second->open) {
      throw StopParsing{ToPos(mark), "recursive alias: it refers to a collection that contains it"};
    }
    Attach(it->second);
  }
  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                const std::string& value) override {
    Node* n = New(Node::Kind::kScalar, mark, tag);
    n->value = value;
    Finish(n, anchor);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value /*style*/) override {
    Open(Node::Kind::kSequence, mark, tag, anchor);
  }
  void OnSequenceEnd() override { Close(); }
  void OnMapStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                  YAML::EmitterStyle::value /*style*/) override {
    Open(Node::Kind::kMap, mark, tag, anchor);
  }
  void OnMapEnd() override { Close(); }

 private:
  static constexpr uint64_t kSaturated = uint64_t{1} << 62;

  Node* New(Node::Kind kind, const YAML::Mark& mark, const std::string& tag) {
    Node& n = nodes_.emplace_back();
    n.kind = kind;
    n.pos = ToPos(mark);
    n.tag = tag;
    return &n;
  }
  void Register(YAML::anchor_t anchor, Node* n) {
    if (anchor != YAML::NullAnchor) anchors_[anchor] = n;
  }
  void Finish(Node* n, YAML::anchor_t anchor) {
    Register(anchor, n);
    Attach(n);
  }
  // The depth check runs before yaml-cpp descends further, so its recursion stays shallow.
  void Open(Node::Kind kind, const YAML::Mark& mark, const std::string& tag,
            YAML::anchor_t anchor) {
    if (stack_.size() >= kMaxDepth) {
      throw StopParsing{ToPos(mark), "nesting is deeper than " + std::to_string(kMaxDepth) +
                                         " levels; a registry-proxy config needs fewer than 10"};
    }
    Node* n = New(kind, mark, tag);
    n->open = true;
    Register(anchor, n);
    stack_.push_back(n);
  }
  void Close() {
    if (stack_.empty()) return;
    Node* n = stack_.back();
    stack_.pop_back();
    n->open = false;
    Attach(n);
  }
  void Attach(const Node* n) {
    if (stack_.empty()) {
      if (!root_) root_ = n;
      return;
    }
    Node* parent = stack_.back();
    parent->children.push_back(n);
    parent->expanded = std::min(kSaturated, parent->expanded + n->expanded);
  }

  std::deque<Node> nodes_;  // stable addresses
  std::vector<Node*> stack_;
  std::unordered_map<YAML::anchor_t, Node*> anchors_;
  const Node* root_ = nullptr;
  Pos document_pos_;
};

// YAML 1.2 core schema resolution of plain scalars (yaml-cpp reports nulls separately).
bool IsCoreBool(std::string_view v) {
  return v == "true" || v == "True" || v == "TRUE" || v == "false" || v == "False" || v == "FALSE";
}
bool IsTrue(std::string_view v) { return v == "true" || v == "True" || v == "TRUE"; }
// YAML 1.1 booleans: plain strings in YAML 1.2, a classic source of surprises.
bool IsYaml11Bool(std::string_view v) {
  static constexpr std::string_view kWords[] = {"y",  "Y",   "yes", "Yes", "YES", "n",
                                                "N",  "no",  "No",  "NO",  "on",  "On",
                                                "ON", "off", "Off", "OFF"};
  return std::find(std::begin(kWords), std::end(kWords), v) != std::end(kWords);
}
bool IsCoreNumber(std::string_view v) {
  if (v == ".inf" || v == ".Inf" || v == ".INF" || v == "-.inf" || v == "-.Inf" || v == "-.INF" ||
      v == "+.inf" || v == "+.Inf" || v == "+.INF" || v == ".nan" || v == ".NaN" || v == ".NAN") {
    return true;
  }
  if (v.size() > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'o')) {
    const bool hex = v[1] == 'x';
    return std::all_of(v.begin() + 2, v.end(), [&](char c) {
      return hex ? (IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
                 : (c >= '0' && c <= '7');
    });
  }
  size_t i = 0;
  if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
  size_t digits = 0;
  while (i < v.size() && IsDigit(v[i])) ++i, ++digits;
  if (i < v.size() && v[i] == '.') {
    ++i;
    while (i < v.size() && IsDigit(v[i])) ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < v.size() && (v[i] == 'e' || v[i] == 'E')) {
    ++i;
    if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
    size_t exp = 0;
    while (i < v.size() && IsDigit(v[i])) ++i, ++exp;
    if (exp == 0) return false;
  }
  return i == v.size();
}

bool IsPlain(const Node& n) { return n.tag == "?"; }

// "a list", "the string 'x'", ...: what the file has where something else was expected.
std::string Describe(const Node& n) {
  switch (n.kind) {
    case Node::Kind::kNull:
      return "no value";
    case Node::Kind::kSequence:
      return "a list";
    case Node::Kind::kMap:
      return "a map";
    case Node::Kind::kScalar:
      break;
  }
  if (!IsPlain(n)) return "the string " + Quote(n.value);
  if (IsCoreBool(n.value)) return "the boolean " + n.value;
  if (IsCoreNumber(n.value)) return "the number " + n.value;
  return Quote(n.value);
}

// ---------------------------------------------------------------------------------------------
// Field-level validators for the `node:` settings.

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

std::string Sha256Hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1) return "";
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(len * 2);
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 0xf]);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The schema walk.

// A value in the document, where to point at it, and its field path.
struct Item {
  const Node* node = nullptr;
  // The value's position. yaml-cpp places an empty value at the next token, often on the next
  // line, so an empty map value points at its key and an empty list item at the list.
  Pos pos;
  std::string field;
};

struct Entry {
  std::string key;
  Pos key_pos;
  Item value;
};

// Keys come from the file: a quoted key may hold a newline, and ErrorText is one line per error.
std::string Child(const std::string& field, std::string_view key) {
  std::string k = Escape(key);
  if (key.size() > kMaxQuoted) k += "...";
  return field.empty() ? k : StrCat({field, ".", k});
}
std::string Index(const std::string& field, size_t i) {
  return field + "[" + std::to_string(i) + "]";
}

const std::vector<std::string_view> kTopKeys = {"enabled",
                                                "proxies",
                                                "excludeNamespaces",
                                                "includeNamespaces",
                                                "podSelector",
                                                "namespaceSelector",
                                                "rules",
                                                "pullsWithoutNamespace",
                                                "credentialedPulls",
                                                "staleIfError",
                                                "node"};
const std::vector<std::string_view> kRuleKeys = {
    "match",    "mirrors",    "includeNamespaces", "excludeNamespaces",
    "fallback", "digestOnly", "credentialedPulls", "staleIfError"};
const std::vector<std::string_view> kMirrorKeys = {"host", "dropLibrary", "credentials"};
const std::vector<std::string_view> kNoNamespaceKeys = {"policy", "namespace"};
const std::vector<std::string_view> kNodeKeys = {
    "listen",          "upstream",           "containerdNamespace", "metricsAddress",
    "credentialsFile", "keepMirrorNames",    "mirrorProbe",         "mirrorProbeTimeout",
    "mirrorCooldown",  "containerdHostsDir", "pullAttemptTimeout",  "pullTimeout",
    "mirrorHedgeDelay"};

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
const std::vector<std::string_view> kNoNamespacePolicies = {"rewrite", "passthrough",
                                                            "asNamespace"};
const std::vector<std::string_view> kCredentialedPulls = {"mirror", "upstream"};

class Loader {
 public:
  explicit Loader(std::string source) : source_(std::move(source)) {}

  ConfigLoad Run(std::string_view yaml);

 private:
  void Error(Pos pos, std::string field, std::string message) {
    if (errors_.size() >= kMaxErrors) {
      ++dropped_;
      return;
    }
    errors_.push_back(
        ConfigError{source_, pos.line, pos.column, std::move(field), OneLine(message)});
  }
  ConfigLoad Fail() {
    // The walk visits a map's keys before its values, and cross-checks come last; the file's
    // order is easier to work through. Errors without a position (the whole file) go first.
    std::stable_sort(errors_.begin(), errors_.end(),
                     [](const ConfigError& a, const ConfigError& b) {
                       return std::pair(a.line, a.column) < std::pair(b.line, b.column);
                     });
    if (dropped_) {
      errors_.push_back(
          ConfigError{source_, 0, 0, "", "... and " + std::to_string(dropped_) + " more errors"});
    }
    ConfigLoad load;
    load.errors = std::move(errors_);
    return load;
  }

  const Node* ParseYaml(std::string_view yaml, TreeBuilder& tree);

  // Typed access. Each reports its own errors and returns nullopt on one.
  bool CheckTag(const Item& it, std::string_view core_tag);
  std::optional<std::vector<Entry>> Map(const Item& it, const std::vector<std::string_view>* known);
  std::optional<std::vector<Item>> List(const Item& it);
  std::optional<bool> Bool(const Item& it);
  std::optional<std::string> String(const Item& it);
  void Missing(const Item& map, std::string_view key) {
    Error(map.pos, Child(map.field, key), "is required");
  }

  // Schema pieces.
  enum class GlobList { kExclude, kInclude, kRuleInclude };
  std::optional<std::vector<Glob>> Globs(const Item& it, GlobList which);
  std::optional<Mirror> ParseMirror(std::string_view host, const Pos& pos,
                                    const std::string& field);
  std::optional<std::string> ParseMatch(const Item& it, std::string_view what);
  void Proxies(const Item& it, std::vector<Rule>& rules);
  void Rules(const Item& it, std::vector<Rule>& rules);
  std::optional<Rule> OneRule(const Item& it, size_t index);
  std::optional<Mirror> RuleMirror(const Item& it, std::string_view match);
  void PodSelector(const Item& it, std::map<std::string, std::string>& out);
  void NamespaceSelector(const Item& it);
  void PullsWithoutNamespace(const Item& it, PolicyOptions& options);
  std::optional<CredentialedPulls> CredentialedPullsValue(const Item& it);
  void NodeSection(const Item& it, NodeSettings& node, Pos& listen_pos, Pos& upstream_pos);

  std::string Origin(std::string_view what, Pos pos) const {
    return StrCat({what, " (", source_, ":", std::to_string(pos.line), ")"});
  }

  std::string source_;
  std::vector<ConfigError> errors_;
  size_t dropped_ = 0;
};

const Node* Loader::ParseYaml(std::string_view yaml, TreeBuilder& tree) {
  try {
    std::istringstream in{std::string(yaml)};
    YAML::Parser parser(in);
    if (!parser.HandleNextDocument(tree)) {
      Error({}, "", "config is empty: it has no keys (write enabled: false to turn rewriting off)");
      return nullptr;
    }
    // A second document would be ignored silently by most tools; say so instead. Empty ones
    // (a trailing '---', as generated files often have) are harmless.
    Pos last = tree.document_pos();
    while (true) {
      TreeBuilder rest;
      if (!parser.HandleNextDocument(rest)) break;
      // yaml-cpp can get stuck on junk (a leading ',') and return empty documents forever
      // without consuming anything.
      if (rest.document_pos().line == last.line && rest.document_pos().column == last.column) {
        Error(last, "", "invalid YAML: cannot parse the text here");
        return nullptr;
      }
      last = rest.document_pos();
      if (rest.root() && rest.root()->kind != Node::Kind::kNull) {
        Error(rest.document_pos(), "",
              "config has more than one YAML document (a '---' separator); keep one");
        return nullptr;
      }
    }
  } catch (const StopParsing& e) {
    Error(e.pos, "", e.message);
    return nullptr;
  } catch (const YAML::Exception& e) {
    Error(ToPos(e.mark), "", "invalid YAML: " + e.msg);
    return nullptr;
  }
  const Node* root = tree.root();
  if (!root || root->kind == Node::Kind::kNull) {
    Error({}, "", "config is empty: it has no keys (write enabled: false to turn rewriting off)");
    return nullptr;
  }
  if (root->expanded > tree.node_count() + kMaxAliasNodes) {
    Error(root->pos, "",
          "aliases expand the config to more than " + std::to_string(kMaxAliasNodes) +
              " extra nodes; write it out instead");
    return nullptr;
  }
  return root;
}

// Explicit tags are accepted only when they say what is expected anyway ("!!str" on a
// string); anything else ("!!binary", "!custom") is a mistake or an attack on a parser.
bool Loader::CheckTag(const Item& it, std::string_view core_tag) {
  const std::string& tag = it.node->tag;
  if (tag.empty() || tag == "?" || tag == "!" || tag == core_tag) return true;
  Error(it.pos, it.field, "unexpected tag " + Quote(tag));
  return false;
}

std::optional<std::vector<Entry>> Loader::Map(const Item& it,
                                              const std::vector<std::string_view>* known) {
  const Node& n = *it.node;
  if (n.kind == Node::Kind::kNull) return std::vector<Entry>{};  // "key:" = empty map
  if (n.kind != Node::Kind::kMap) {
    Error(it.pos, it.field, "must be a map (key: value), got " + Describe(n));
    return std::nullopt;
  }
  if (!CheckTag(it, kTagMap)) return std::nullopt;
  std::vector<Entry> out;
  std::unordered_map<std::string, Pos> seen;
  for (size_t i = 0; i + 1 < n.children.size(); i += 2) {
    const Node& k = *n.children[i];
    const Node& v = *n.children[i + 1];
    if (k.kind != Node::Kind::kScalar) {
      Error(k.pos, it.field, "keys must be strings, got " + Describe(k));
      continue;
    }
    const std::string field = Child(it.field, k.value);
    if (auto [prev, fresh] = seen.emplace(k.value, k.pos); !fresh) {
      // yaml-cpp keeps both; other tools would silently take the first or the last.
      Error(k.pos, field,
            "duplicate key " + Quote(k.value) + " (first at line " +
                std::to_string(prev->second.line) + ")");
      continue;
    }
    if (known && std::find(known->begin(), known->end(), k.value) == known->end()) {
      std::string msg = "unknown key " + Quote(k.value);
      if (std::string_view s = Suggest(k.value, *known); !s.empty()) {
        msg += StrCat({"; did you mean '", s, "'?"});
      } else if (known == &kTopKeys &&
                 std::find(kNodeKeys.begin(), kNodeKeys.end(), k.value) != kNodeKeys.end()) {
        msg += StrCat({"; it belongs under 'node:'"});
      } else if (known == &kTopKeys && k.value == "includeRegistries") {
        // In the earlier tool's README but never read by it: registries come from proxies.
        msg += "; registries are the keys of proxies (and the match of rules)";
      } else if (k.value == "<<") {
        msg = "merge keys ('<<') are not supported; repeat the keys or use an alias for the value";
      } else {
        msg += "; known keys are ";
        for (size_t j = 0; j < known->size(); ++j) msg += StrCat({j ? ", " : "", (*known)[j]});
      }
      Error(k.pos, field, std::move(msg));
      continue;
    }
    Pos pos = v.kind == Node::Kind::kNull ? k.pos : v.pos;
    if (pos.line == 0) pos = k.pos;
    out.push_back(Entry{k.value, k.pos, Item{&v, pos, field}});
  }
  return out;
}

std::optional<std::vector<Item>> Loader::List(const Item& it) {
  const Node& n = *it.node;
  if (n.kind == Node::Kind::kNull) return std::vector<Item>{};  // "key:" = empty list
  if (n.kind != Node::Kind::kSequence) {
    Error(it.pos, it.field, "must be a list, got " + Describe(n));
    return std::nullopt;
  }
  if (!CheckTag(it, kTagSeq)) return std::nullopt;
  std::vector<Item> out;
  out.reserve(n.children.size());
  for (size_t i = 0; i < n.children.size(); ++i) {
    const Node* c = n.children[i];
    // An empty item ("-" alone) is placed at the next token; the list is a better pointer.
    const bool empty = c->kind == Node::Kind::kNull || c->pos.line == 0;
    out.push_back(Item{c, empty ? it.pos : c->pos, Index(it.field, i)});
  }
  return out;
}

std::optional<bool> Loader::Bool(const Item& it) {
  const Node& n = *it.node;
  if (n.kind == Node::Kind::kScalar && IsCoreBool(n.value) && (IsPlain(n) || n.tag == kTagBool)) {
    return IsTrue(n.value);
  }
  std::string msg = "must be true or false, got " + Describe(n);
  if (n.kind == Node::Kind::kScalar && !IsPlain(n) && n.tag != kTagBool) {
    msg += "; write true or false without quotes";
  } else if (n.kind == Node::Kind::kScalar && IsYaml11Bool(n.value)) {
    msg += "; only true and false are booleans (YAML 1.2), so write true or false";
  }
  Error(it.pos, it.field, std::move(msg));
  return std::nullopt;
}

std::optional<std::string> Loader::String(const Item& it) {
  const Node& n = *it.node;
  if (n.kind != Node::Kind::kScalar) {
    Error(it.pos, it.field, "must be a string, got " + Describe(n));
    return std::nullopt;
  }
  // Numbers are taken as written ("1.10" stays "1.10"); a bare true/false is almost always a
  // slip, and quoting says what was meant.
  if (IsPlain(n) && IsCoreBool(n.value)) {
    Error(it.pos, it.field,
          "must be a string, got the boolean " + n.value + "; quote it (\"" + n.value +
              "\") if you mean the string");
    return std::nullopt;
  }
  if (n.tag != "?" && n.tag != "!" && n.tag != kTagStr && n.tag != kTagInt && n.tag != kTagFloat) {
    Error(it.pos, it.field, "unexpected tag " + Quote(n.tag) + " on a string");
    return std::nullopt;
  }
  return n.value;
}

std::optional<std::vector<Glob>> Loader::Globs(const Item& it, GlobList which) {
  auto items = List(it);
  if (!items) return std::nullopt;
  // The PolicyOptions contract reads an empty include list as "every namespace", but whoever
  // writes an explicit empty list (or a key with no value) means something, and neither
  // reading is safe to guess: refuse it.
  if (which == GlobList::kInclude && items->empty()) {
    Error(it.pos, it.field,
          "includeNamespaces is empty, so no namespace would be rewritten; remove the key to "
          "include every namespace, or use enabled: false to turn rewriting off");
    return std::nullopt;
  }
  if (which == GlobList::kRuleInclude && items->empty()) {
    Error(it.pos, it.field,
          "includeNamespaces is empty, so the rule would apply to no namespace; remove the key "
          "to apply it to every namespace, or remove the rule");
    return std::nullopt;
  }
  std::vector<Glob> out;
  bool ok = true;
  for (const Item& item : *items) {
    auto s = String(item);
    if (!s) {
      ok = false;
      continue;
    }
    auto g = Glob::Parse(*s);
    if (!g.ok()) {
      Error(item.pos, item.field, About("namespace pattern", *s, g.error()));
      ok = false;
      continue;
    }
    out.push_back(std::move(g).value());
  }
  if (!ok) return std::nullopt;
  return out;
}

// A mirror host string, checked here for the mistakes people make before Mirror::Parse checks
// the grammar.
std::optional<Mirror> Loader::ParseMirror(std::string_view host, const Pos& pos,
                                          const std::string& field) {
  std::string msg;
  if (host.empty()) {
    msg = "mirror host is empty";
  } else if (const size_t scheme = host.find("://"); scheme != std::string_view::npos) {
    msg = StrCat({"mirror ", Quote(host), " must not have a scheme ('", host.substr(0, scheme + 3),
                  "'): schemes are not allowed; write the host only, e.g. ",
                  Quote(host.substr(scheme + 3)),
                  " (HTTP or HTTPS is containerd's registry config, hosts.toml)"});
  } else if (HasSpace(host)) {
    msg = "mirror host " + Quote(host) + " must not contain spaces";
  } else if (HasUpper(host)) {
    // The reference grammar allows upper case in a domain, but containerd and registries
    // treat names as lowercase; an upper-case mirror is a typo.
    msg = "mirror host " + Quote(host) + " must be lowercase";
  } else {
    auto m = Mirror::Parse(host);
    if (m.ok()) return std::move(m).value();
    msg = About("mirror", host, m.error());
  }
  Error(pos, field, std::move(msg));
  return std::nullopt;
}

std::optional<std::string> Loader::ParseMatch(const Item& it, std::string_view what) {
  auto s = String(it);
  if (!s) return std::nullopt;
  std::string msg;
  const std::string_view first = std::string_view(*s).substr(0, s->find('/'));
  if (s->find("://") != std::string::npos) {
    msg = StrCat({what, " ", Quote(*s), " must not have a scheme: write the registry host, e.g. ",
                  Quote(s->substr(s->find("://") + 3))});
  } else if (HasSpace(*s)) {
    msg = StrCat({what, " ", Quote(*s), " must not contain spaces"});
  } else if (HasUpper(*s)) {
    // Image names never carry upper case after normalisation, so this would never match.
    msg = StrCat({what, " ", Quote(*s), " must be lowercase"});
  } else if (!s->empty() && !LooksLikeHost(first)) {
    msg = StrCat({what, " ", Quote(*s), " must start with a registry host (a name with a '.' or ",
                  "':port', or 'localhost'), e.g. 'docker.io/", *s, "'"});
  } else {
    auto m = NormalizeMatch(*s);
    if (m.ok()) return std::move(m).value();
    msg = About(what, *s, m.error());
  }
  Error(it.pos, it.field, std::move(msg));
  return std::nullopt;
}

// proxies: registry -> mirror, the earlier tool's form. Each entry is a plain rule.
void Loader::Proxies(const Item& it, std::vector<Rule>& rules) {
  auto entries = Map(it, nullptr);
  if (!entries) return;
  std::unordered_map<std::string, Pos> registries;  // normalised -> where
  for (Entry& e : *entries) {
    Item key{nullptr, e.key_pos, e.value.field};
    Node key_node;
    key_node.kind = Node::Kind::kScalar;
    key_node.tag = "!";
    key_node.value = e.key;
    key.node = &key_node;
    auto match = ParseMatch(key, "registry");
    if (match && match->find('/') != std::string::npos) {
      Error(e.key_pos, e.value.field,
            "registry " + Quote(e.key) +
                " has a path: proxies maps whole registries; for a repository prefix write a "
                "rule (rules: - match: " +
                *match + ")");
      match.reset();
    }
    if (match) {
      if (auto [prev, fresh] = registries.emplace(*match, e.key_pos); !fresh) {
        Error(e.key_pos, e.value.field,
              "registry " + Quote(e.key) + " is " + *match + ", already mapped at line " +
                  std::to_string(prev->second.line));
        match.reset();
      }
    }
    auto host = String(e.value);
    std::optional<Mirror> mirror;
    if (host) mirror = ParseMirror(*host, e.value.pos, e.value.field);
    if (!match || !mirror) continue;
    if (MirrorLoops(*mirror, *match)) {
      Error(e.value.pos, e.value.field,
            "mirror " + Quote(mirror->host) + " is the registry itself (" + *match +
                "): rewritten pulls would match again and loop");
      continue;
    }
    Rule r;
    r.match = std::move(*match);
    r.mirrors.push_back(std::move(*mirror));
    r.fallback = true;
    r.origin = Origin("proxies." + e.key, e.key_pos);
    rules.push_back(std::move(r));
  }
}

std::optional<Mirror> Loader::RuleMirror(const Item& it, std::string_view match) {
  const Node& n = *it.node;
  std::optional<Mirror> mirror;
  Pos host_pos = it.pos;
  std::string host_field = it.field;
  if (n.kind == Node::Kind::kScalar) {
    auto host = String(it);
    if (!host) return std::nullopt;
    mirror = ParseMirror(*host, it.pos, it.field);
  } else if (n.kind == Node::Kind::kMap) {
    auto entries = Map(it, &kMirrorKeys);
    if (!entries) return std::nullopt;
    bool ok = true, has_host = false;
    bool drop_library = false;
    std::string credentials;
    for (const Entry& e : *entries) {
      if (e.key == "host") {
        has_host = true;
        host_pos = e.value.pos;
        host_field = e.value.field;
        auto host = String(e.value);
        if (host) mirror = ParseMirror(*host, e.value.pos, e.value.field);
        ok = ok && mirror.has_value();
      } else if (e.key == "dropLibrary") {
        auto b = Bool(e.value);
        ok = ok && b;
        drop_library = b.value_or(false);
      } else if (e.key == "credentials") {
        auto s = String(e.value);
        ok = ok && s;
        credentials = s.value_or("");
      }
    }
    if (!has_host) {
      Missing(it, "host");
      ok = false;
    }
    if (!ok || !mirror) return std::nullopt;
    mirror->drop_library = drop_library;
    mirror->credentials = std::move(credentials);
  } else {
    Error(it.pos, it.field,
          "must be a mirror host, or a map with host (and dropLibrary, credentials), got " +
              Describe(n));
    return std::nullopt;
  }
  if (!mirror) return std::nullopt;
  if (!match.empty() && MirrorLoops(*mirror, match)) {
    Error(host_pos, host_field,
          "mirror " + Quote(mirror->host) + " is on the registry this rule matches (" +
              std::string(match) + "): rewritten pulls would match the rule again and loop");
    return std::nullopt;
  }
  return mirror;
}

std::optional<Rule> Loader::OneRule(const Item& it, size_t index) {
  if (it.node->kind != Node::Kind::kMap) {
    Error(it.pos, it.field,
          "a rule must be a map with match and mirrors, got " + Describe(*it.node));
    return std::nullopt;
  }
  auto entries = Map(it, &kRuleKeys);
  if (!entries) return std::nullopt;
  Rule rule;
  bool ok = true;
  // match first: the mirrors' loop check needs it, wherever the keys are in the map.
  std::string match;
  bool has_match = false, has_mirrors = false;
  for (const Entry& e : *entries) {
    if (e.key != "match") continue;
    has_match = true;
    auto m = ParseMatch(e.value, "match");
    ok = ok && m;
    if (m) match = *m;
  }
  for (const Entry& e : *entries) {
    if (e.key == "mirrors") {
      has_mirrors = true;
      auto items = List(e.value);
      if (!items) {
        ok = false;
        continue;
      }
      if (items->empty()) {
        Error(e.value.pos, e.value.field, "mirrors is empty: a rule needs at least one mirror");
        ok = false;
      }
      for (const Item& item : *items) {
        auto m = RuleMirror(item, match);
        ok = ok && m;
        if (m) rule.mirrors.push_back(std::move(*m));
      }
    } else if (e.key == "includeNamespaces" || e.key == "excludeNamespaces") {
      const bool include = e.key == "includeNamespaces";
      auto g = Globs(e.value, include ? GlobList::kRuleInclude : GlobList::kExclude);
      ok = ok && g;
      if (g) (include ? rule.namespaces.include : rule.namespaces.exclude) = std::move(*g);
    } else if (e.key == "fallback") {
      auto b = Bool(e.value);
      ok = ok && b;
      rule.fallback = b.value_or(true);
    } else if (e.key == "digestOnly") {
      auto b = Bool(e.value);
      ok = ok && b;
      rule.digest_only = b.value_or(false);
    } else if (e.key == "credentialedPulls") {
      rule.credentialed_pulls = CredentialedPullsValue(e.value);
      ok = ok && rule.credentialed_pulls;
    } else if (e.key == "staleIfError") {
      rule.stale_if_error = Bool(e.value);
      ok = ok && rule.stale_if_error;
    }
  }
  if (!has_match) Missing(it, "match");
  if (!has_mirrors) Missing(it, "mirrors");
  if (!ok || !has_match || !has_mirrors) return std::nullopt;
  rule.match = std::move(match);
  rule.origin = Origin("rules[" + std::to_string(index) + "]", it.pos);
  return rule;
}

void Loader::Rules(const Item& it, std::vector<Rule>& rules) {
  auto items = List(it);
  if (!items) return;
  for (size_t i = 0; i < items->size(); ++i) {
    auto r = OneRule((*items)[i], i);
    if (r) rules.push_back(std::move(*r));
  }
}

void Loader::PodSelector(const Item& it, std::map<std::string, std::string>& out) {
  auto entries = Map(it, nullptr);
  if (!entries) return;
  for (const Entry& e : *entries) {
    if (Status s = LabelKey(e.key); !s.ok()) {
      Error(e.key_pos, e.value.field, s.message());
      continue;
    }
    auto v = String(e.value);
    if (!v) continue;
    if (Status s = LabelValue(*v); !s.ok()) {
      Error(e.value.pos, e.value.field, s.message());
      continue;
    }
    out.emplace(e.key, std::move(*v));
  }
}

void Loader::NamespaceSelector(const Item& it) {
  auto entries = Map(it, nullptr);
  if (!entries || entries->empty()) return;
  Error(it.pos, it.field,
        "must be empty: namespace labels reach neither the node nor the "
        "webhook's view of a pod, so it cannot be honoured; select namespaces by name with "
        "includeNamespaces/excludeNamespaces instead");
}

// "mirror" or "upstream".
std::optional<CredentialedPulls> Loader::CredentialedPullsValue(const Item& it) {
  auto v = String(it);
  if (!v) return std::nullopt;
  if (*v == "mirror") return CredentialedPulls::kMirror;
  if (*v == "upstream") return CredentialedPulls::kUpstream;
  std::string msg = "credentialedPulls " + Quote(*v) + " is not one of mirror, upstream";
  if (std::string_view s = Suggest(*v, kCredentialedPulls); !s.empty()) {
    msg += StrCat({"; did you mean '", s, "'?"});
  }
  Error(it.pos, it.field, std::move(msg));
  return std::nullopt;
}

void Loader::PullsWithoutNamespace(const Item& it, PolicyOptions& options) {
  auto entries = Map(it, &kNoNamespaceKeys);
  if (!entries) return;
  std::optional<std::string> policy, ns;
  Pos policy_pos = it.pos, ns_pos = it.pos;
  std::string ns_field = Child(it.field, "namespace");
  bool ok = true;
  for (const Entry& e : *entries) {
    if (e.key == "policy") {
      policy = String(e.value);
      policy_pos = e.value.pos;
      if (policy && std::find(kNoNamespacePolicies.begin(), kNoNamespacePolicies.end(), *policy) ==
                        kNoNamespacePolicies.end()) {
        std::string msg =
            "policy " + Quote(*policy) + " is not one of rewrite, passthrough, asNamespace";
        if (std::string_view s = Suggest(*policy, kNoNamespacePolicies); !s.empty()) {
          msg += StrCat({"; did you mean '", s, "'?"});
        }
        Error(e.value.pos, e.value.field, std::move(msg));
        policy.reset();
      }
      ok = ok && policy;
    } else if (e.key == "namespace") {
      ns = String(e.value);
      ns_pos = e.value.pos;
      if (ns) {
        if (Status s = NamespaceName(*ns); !s.ok()) {
          Error(e.value.pos, e.value.field, s.message());
          ns.reset();
        }
      }
      ok = ok && ns;
    }
  }
  if (!ok) return;
  const std::string p = policy.value_or("rewrite");
  if (p == "asNamespace") {
    if (!ns) {
      Error(policy_pos, ns_field, "policy asNamespace needs a namespace to decide as");
      return;
    }
    options.no_namespace = NoNamespacePolicy::kAsNamespace;
    options.no_namespace_as = *ns;
  } else {
    if (ns) {
      Error(ns_pos, ns_field, "namespace is only used with policy: asNamespace");
      return;
    }
    options.no_namespace =
        p == "passthrough" ? NoNamespacePolicy::kPassthrough : NoNamespacePolicy::kRewrite;
  }
}

void Loader::NodeSection(const Item& it, NodeSettings& node, Pos& listen_pos, Pos& upstream_pos) {
  auto entries = Map(it, &kNodeKeys);
  if (!entries) return;
  for (const Entry& e : *entries) {
    if (e.key == "keepMirrorNames") {
      if (auto b = Bool(e.value)) node.keep_mirror_names = *b;
      continue;
    }
    if (e.key == "mirrorProbe") {
      if (auto b = Bool(e.value)) node.mirror_probe = *b;
      continue;
    }
    auto s = String(e.value);
    if (!s) continue;
    Status status;
    if (e.key == "listen" || e.key == "upstream") {
      auto addr = SocketAddress(*s);
      if (addr.ok()) {
        (e.key == "listen" ? node.listen : node.upstream) = *addr;
        (e.key == "listen" ? listen_pos : upstream_pos) = e.value.pos;
      } else {
        status = addr.status();
      }
    } else if (e.key == "containerdNamespace") {
      status = ContainerdNamespace(*s);
      if (status.ok()) node.containerd_namespace = *s;
    } else if (e.key == "metricsAddress") {
      status = ListenAddress(*s);
      if (status.ok()) node.metrics_address = *s;
    } else if (e.key == "mirrorProbeTimeout" || e.key == "mirrorCooldown" ||
               e.key == "mirrorHedgeDelay" || e.key == "pullAttemptTimeout" ||
               e.key == "pullTimeout") {
      auto d = ParseDuration(*s);
      if (!d.ok()) {
        status = d.status();
      } else if (e.key == "mirrorProbeTimeout" && d->count() == 0) {
        status = Status::Error(
            "the probe needs a timeout (e.g. 2s); turn probing off with "
            "mirrorProbe: false");
      } else {
        (e.key == "mirrorProbeTimeout"   ? node.mirror_probe_timeout
         : e.key == "mirrorCooldown"     ? node.mirror_cooldown
         : e.key == "mirrorHedgeDelay"   ? node.mirror_hedge_delay
         : e.key == "pullAttemptTimeout" ? node.pull_attempt_timeout
                                         : node.pull_timeout) = *d;
      }
    } else if (e.key == "containerdHostsDir") {
      if (!s->empty() && (*s)[0] != '/') {
        status = Status::Error("containerd hosts dir " + Quote(*s) +
                               " must be an absolute path (or '' for none: probe the default)");
      } else {
        node.containerd_hosts_dir = *s;
      }
    } else if (e.key == "credentialsFile") {
      if (!s->empty() && (*s)[0] != '/') {
        status = Status::Error("credentials file " + Quote(*s) +
                               " must be an absolute path (or '' for none)");
      } else {
        node.credentials_file = *s;
      }
    }
    if (!status.ok()) Error(e.value.pos, e.value.field, status.message());
  }
}

ConfigLoad Loader::Run(std::string_view yaml) {
  if (yaml.size() > kMaxConfigBytes) {
    Error({}, "", TooBig(yaml.size()));
    return Fail();
  }
  if (auto p = CheckText(yaml)) {
    Error(p->pos, "", p->message);
    return Fail();
  }
  TreeBuilder tree;
  const Node* root = ParseYaml(yaml, tree);
  if (!root) return Fail();
  if (root->kind != Node::Kind::kMap) {
    Error(root->pos, "",
          "config must be a map of keys (enabled, proxies, rules, ...), got " + Describe(*root));
    return Fail();
  }

  PolicyOptions options;
  NodeSettings node;
  std::vector<Rule> explicit_rules, proxy_rules;
  Pos listen_pos, upstream_pos;
  if (auto entries = Map(Item{root, root->pos, ""}, &kTopKeys)) {
    for (const Entry& e : *entries) {
      const Item& v = e.value;
      if (e.key == "enabled") {
        if (auto b = Bool(v)) options.enabled = *b;
      } else if (e.key == "proxies") {
        Proxies(v, proxy_rules);
      } else if (e.key == "excludeNamespaces") {
        if (auto g = Globs(v, GlobList::kExclude)) options.namespaces.exclude = std::move(*g);
      } else if (e.key == "includeNamespaces") {
        if (auto g = Globs(v, GlobList::kInclude)) options.namespaces.include = std::move(*g);
      } else if (e.key == "podSelector") {
        PodSelector(v, options.pod_selector);
      } else if (e.key == "namespaceSelector") {
        NamespaceSelector(v);
      } else if (e.key == "rules") {
        Rules(v, explicit_rules);
      } else if (e.key == "pullsWithoutNamespace") {
        PullsWithoutNamespace(v, options);
      } else if (e.key == "credentialedPulls") {
        if (auto c = CredentialedPullsValue(v)) options.credentialed_pulls = *c;
      } else if (e.key == "staleIfError") {
        if (auto b = Bool(v)) options.stale_if_error = *b;
      } else if (e.key == "node") {
        NodeSection(v, node, listen_pos, upstream_pos);
      }
    }
  }
  if (node.listen == node.upstream) {
    const bool at_listen = listen_pos.line != 0;
    Error(at_listen ? listen_pos : upstream_pos, at_listen ? "node.listen" : "node.upstream",
          "listen and upstream are the same socket (" + node.listen +
              "): the daemon would forward to itself");
  }
  if (!errors_.empty()) return Fail();

  // Explicit rules first: among equal matches the engine keeps the given order.
  std::vector<Rule> rules = std::move(explicit_rules);
  rules.insert(rules.end(), std::make_move_iterator(proxy_rules.begin()),
               std::make_move_iterator(proxy_rules.end()));
  auto policy = Policy::Create(std::move(options), std::move(rules));
  if (!policy.ok()) {
    // The walk validates everything Create checks; this is a bug, reported rather than hidden.
    Error({}, "", "internal error building the policy: " + policy.error());
    return Fail();
  }
  auto config = std::make_shared<Config>();
  config->policy = std::move(policy).value();
  config->node = std::move(node);
  config->source = source_;
  config->content_sha256 = Sha256Hex(yaml);
  ConfigLoad load;
  load.config = std::move(config);
  return load;
}

ConfigLoad OneError(const std::string& file, std::string message) {
  ConfigLoad load;
  load.errors.push_back(ConfigError{file, 0, 0, "", std::move(message)});
  return load;
}

}  // namespace

std::string ConfigError::ToString() const {
  std::string out = file;
  if (line > 0) {
    if (!out.empty()) out += ':';
    out += std::to_string(line);
    if (column > 0) out += ":" + std::to_string(column);
  }
  if (!out.empty()) out += ": ";
  if (!field.empty()) out += field + ": ";
  out += message;
  return out;
}

std::string ConfigLoad::ErrorText() const {
  std::string out;
  for (const ConfigError& e : errors) out += e.ToString() + "\n";
  return out;
}

ConfigLoad ParseConfig(std::string_view yaml, std::string_view source) {
  std::string name = source.empty() ? "<string>" : std::string(source);
  try {
    return Loader(name).Run(yaml);
  } catch (const std::bad_alloc&) {
    return OneError(name, "out of memory while loading the config");
  } catch (const std::exception& e) {
    return OneError(name, std::string("internal error while loading the config: ") + e.what());
  } catch (...) {
    return OneError(name, "internal error while loading the config");
  }
}

ConfigLoad LoadConfigFile(const std::string& path) {
  try {
    auto file = ReadRegularFile(path, kMaxConfigBytes);
    if (const auto* e = std::get_if<FileError>(&file)) {
      if (e->kind == FileError::Kind::kTooBig) {
        return OneError(path, TooBig(static_cast<size_t>(e->size)));
      }
      return OneError(path, e->Message("config file"));
    }
    return ParseConfig(std::get<FileContents>(file).data, path);
  } catch (const std::exception& e) {
    return OneError(path, std::string("internal error while loading the config: ") + e.what());
  } catch (...) {
    return OneError(path, "internal error while loading the config");
  }
}

std::shared_ptr<const Config> BuiltinConfig() {
  static const std::shared_ptr<const Config> kConfig = [] {
    ConfigLoad load = ParseConfig(BuiltinConfigYaml(), "<builtin>");
    if (load.ok()) return load.config;
    // A test guards this; should it ever happen, rewrite nothing rather than crash.
    spdlog::critical("built-in config does not load: {}", load.ErrorText());
    auto config = std::make_shared<Config>();
    config->policy = Policy::Passthrough();
    config->source = "<builtin>";
    return std::shared_ptr<const Config>(std::move(config));
  }();
  return kConfig;
}

}  // namespace registry_proxy
