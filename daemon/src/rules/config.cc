// The config loader: bytes -> checked YAML tree (yaml_tree.h) -> schema walk (here) -> Policy;
// the walk checks values with the validators (config_validators.h).
//
// The walk collects every error it can find (with line, column and field path) and only
// builds a Config when there are none.
#include "rules/config.h"

#include <openssl/evp.h>
#include <spdlog/spdlog.h>

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
#include "rules/config_text.h"
#include "rules/config_validators.h"
#include "rules/yaml_tree.h"

namespace registry_proxy {
namespace config_internal {
namespace {

// A megabyte of nonsense should not produce a megabyte of errors.
constexpr size_t kMaxErrors = 100;

constexpr std::string_view kTagStr = "tag:yaml.org,2002:str";
constexpr std::string_view kTagBool = "tag:yaml.org,2002:bool";
constexpr std::string_view kTagInt = "tag:yaml.org,2002:int";
constexpr std::string_view kTagFloat = "tag:yaml.org,2002:float";
constexpr std::string_view kTagSeq = "tag:yaml.org,2002:seq";
constexpr std::string_view kTagMap = "tag:yaml.org,2002:map";

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

  const Node* ParseYaml(std::string_view yaml, TreeBuilder& tree) {
    TextProblem problem;
    const Node* root = ParseYamlDocument(yaml, tree, &problem);
    if (!root) Error(problem.pos, "", problem.message);
    return root;
  }

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

  // What the top-level keys give, before they are put together.
  struct Sections {
    PolicyOptions options;
    NodeSettings node;
    std::vector<Rule> explicit_rules, proxy_rules;
    Pos listen_pos, upstream_pos;
  };
  void TopLevel(const Node* root, Sections& out);
  ConfigLoad Build(std::string_view yaml, Sections sections);

  std::string Origin(std::string_view what, Pos pos) const {
    return StrCat({what, " (", source_, ":", std::to_string(pos.line), ")"});
  }

  std::string source_;
  std::vector<ConfigError> errors_;
  size_t dropped_ = 0;
};

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

  Sections s;
  TopLevel(root, s);
  if (s.node.listen == s.node.upstream) {
    const bool at_listen = s.listen_pos.line != 0;
    Error(at_listen ? s.listen_pos : s.upstream_pos, at_listen ? "node.listen" : "node.upstream",
          "listen and upstream are the same socket (" + s.node.listen +
              "): the daemon would forward to itself");
  }
  if (!errors_.empty()) return Fail();
  return Build(yaml, std::move(s));
}

void Loader::TopLevel(const Node* root, Sections& out) {
  if (auto entries = Map(Item{root, root->pos, ""}, &kTopKeys)) {
    for (const Entry& e : *entries) {
      const Item& v = e.value;
      if (e.key == "enabled") {
        if (auto b = Bool(v)) out.options.enabled = *b;
      } else if (e.key == "proxies") {
        Proxies(v, out.proxy_rules);
      } else if (e.key == "excludeNamespaces") {
        if (auto g = Globs(v, GlobList::kExclude)) out.options.namespaces.exclude = std::move(*g);
      } else if (e.key == "includeNamespaces") {
        if (auto g = Globs(v, GlobList::kInclude)) out.options.namespaces.include = std::move(*g);
      } else if (e.key == "podSelector") {
        PodSelector(v, out.options.pod_selector);
      } else if (e.key == "namespaceSelector") {
        NamespaceSelector(v);
      } else if (e.key == "rules") {
        Rules(v, out.explicit_rules);
      } else if (e.key == "pullsWithoutNamespace") {
        PullsWithoutNamespace(v, out.options);
      } else if (e.key == "credentialedPulls") {
        if (auto c = CredentialedPullsValue(v)) out.options.credentialed_pulls = *c;
      } else if (e.key == "staleIfError") {
        if (auto b = Bool(v)) out.options.stale_if_error = *b;
      } else if (e.key == "node") {
        NodeSection(v, out.node, out.listen_pos, out.upstream_pos);
      }
    }
  }
}

ConfigLoad Loader::Build(std::string_view yaml, Sections sections) {
  // Explicit rules first: among equal matches the engine keeps the given order.
  std::vector<Rule> rules = std::move(sections.explicit_rules);
  rules.insert(rules.end(), std::make_move_iterator(sections.proxy_rules.begin()),
               std::make_move_iterator(sections.proxy_rules.end()));
  auto policy = Policy::Create(std::move(sections.options), std::move(rules));
  if (!policy.ok()) {
    // The walk validates everything Create checks; this is a bug, reported rather than hidden.
    Error({}, "", "internal error building the policy: " + policy.error());
    return Fail();
  }
  auto config = std::make_shared<Config>();
  config->policy = std::move(policy).value();
  config->node = std::move(sections.node);
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
}  // namespace config_internal

using config_internal::kMaxConfigBytes;
using config_internal::Loader;
using config_internal::OneError;
using config_internal::TooBig;

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
