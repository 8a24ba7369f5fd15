#include "rules/policy.h"

#include <algorithm>
#include <utility>

#include "base/string_util.h"

namespace registry_proxy {
namespace {

bool IsNamespaceChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
}

// Is the first path component of `s` (up to '/') a registry host by the reference grammar?
bool LooksLikeHost(std::string_view first) {
  return first.find_first_of(".:") != std::string_view::npos || first == "localhost";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Glob

Result<Glob> Glob::Parse(std::string_view pattern) {
  if (pattern.empty()) return Status::Error("empty namespace pattern");
  if (pattern.size() > 253) {
    return Status::Error("namespace pattern is longer than 253 characters");
  }
  for (char c : pattern) {
    if (!IsNamespaceChar(c) && c != '*' && c != '?') {
      return Status::Error(StrCat({"bad namespace pattern '", pattern,
                                   "': use lowercase letters, digits, '-', and the wildcards '*' "
                                   "(any run of characters) and '?' (one character)"}));
    }
  }
  return Glob(std::string(pattern));
}

bool Glob::Matches(std::string_view name) const {
  // Iterative wildcard match: on a mismatch, retry from the last '*' with one more character
  // swallowed. Linear in practice, O(n*m) at worst, and n, m are at most 253.
  const std::string& p = pattern_;
  size_t pi = 0, ni = 0;
  size_t star = std::string::npos, star_ni = 0;
  while (ni < name.size()) {
    if (pi < p.size() && (p[pi] == '?' || p[pi] == name[ni])) {
      ++pi;
      ++ni;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      star_ni = ni;
    } else if (star != std::string::npos) {
      pi = star + 1;
      ni = ++star_ni;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

// ---------------------------------------------------------------------------------------------
// NamespaceFilter

const Glob* NamespaceFilter::ExcludedBy(std::string_view ns) const {
  for (const Glob& g : exclude) {
    if (g.Matches(ns)) return &g;
  }
  return nullptr;
}

bool NamespaceFilter::Included(std::string_view ns) const {
  if (include.empty()) return true;
  return std::any_of(include.begin(), include.end(), [&](const Glob& g) { return g.Matches(ns); });
}

// ---------------------------------------------------------------------------------------------
// Mirror

Result<Mirror> Mirror::Parse(std::string_view host) {
  if (host.empty()) return Status::Error("mirror host is empty");
  if (host.find("://") != std::string_view::npos) {
    return Status::Error(StrCat({"mirror '", host,
                                 "' has a scheme: write the registry host only (e.g. "
                                 "'mirror.example.com' or 'harbor.corp/proxy'); whether it speaks "
                                 "HTTP or HTTPS is containerd's registry config (hosts.toml)"}));
  }
  Mirror m;
  m.host = std::string(host);
  size_t slash = host.find('/');
  std::string_view domain = host.substr(0, slash);
  if (!LooksLikeHost(domain)) {
    return Status::Error(
        StrCat({"mirror '", host, "' does not start with a registry host: '", domain,
                "' would be read as a Docker Hub repository; a host needs a '.', "
                "a ':port', or to be 'localhost'"}));
  }
  if (Status s = ValidateDomain(domain); !s.ok()) {
    return Status::Error(StrCat({"mirror '", host, "': ", s.message()}));
  }
  m.domain = std::string(domain);
  if (slash != std::string_view::npos) {
    std::string_view prefix = host.substr(slash + 1);
    while (!prefix.empty() && prefix.back() == '/') prefix.remove_suffix(1);
    if (prefix.empty()) {
      m.host = m.domain;
    } else {
      if (Status s = ValidatePath(prefix); !s.ok()) {
        return Status::Error(StrCat({"mirror '", host, "' has a bad path prefix: ", s.message()}));
      }
      m.path_prefix = std::string(prefix);
      m.host = StrCat({m.domain, "/", m.path_prefix});
    }
  }
  return m;
}

std::string_view Mirror::MirrorPath(const Reference& original) const {
  std::string_view path = original.path;
  if (drop_library && original.domain == kDefaultDomain &&
      path.substr(0, kOfficialRepoPrefix.size()) == kOfficialRepoPrefix) {
    path.remove_prefix(kOfficialRepoPrefix.size());
  }
  return path;
}

size_t Mirror::RewrittenNameLength(const Reference& original) const {
  return domain.size() + (path_prefix.empty() ? 0 : path_prefix.size() + 1) + 1 +
         MirrorPath(original).size();
}

std::string Mirror::Rewrite(const Reference& original) const {
  std::string_view path = MirrorPath(original);
  std::string out;
  out.reserve(domain.size() + path_prefix.size() + path.size() + original.tag.size() +
              original.digest.size() + 10);
  out.append(domain);
  if (!path_prefix.empty()) out.append("/").append(path_prefix);
  out.append("/").append(path);
  if (!original.digest.empty()) {
    out.append("@").append(original.digest);
  } else {
    out.append(":").append(original.tag.empty() ? kDefaultTag : std::string_view(original.tag));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Policy

Result<std::string> NormalizeMatch(std::string_view match) {
  while (!match.empty() && match.back() == '/') match.remove_suffix(1);
  if (match.empty()) return Status::Error("match is empty");
  size_t slash = match.find('/');
  std::string_view domain = match.substr(0, slash);
  std::string_view rest =
      slash == std::string_view::npos ? std::string_view() : match.substr(slash + 1);
  if (!LooksLikeHost(domain)) {
    return Status::Error(
        StrCat({"match '", match, "' does not start with a registry host; write 'docker.io/", match,
                "' for a Docker Hub organisation or 'docker.io/library/", match,
                "' for an official image"}));
  }
  if (Status s = ValidateDomain(domain); !s.ok()) {
    return Status::Error(StrCat({"match '", match, "': ", s.message()}));
  }
  if (!rest.empty()) {
    if (Status s = ValidatePath(rest); !s.ok()) {
      return Status::Error(StrCat({"match '", match, "': ", s.message()}));
    }
  }
  if (domain == kLegacyDefaultDomain) domain = kDefaultDomain;
  if (rest.empty()) return std::string(domain);
  return StrCat({domain, "/", rest});
}

Result<std::shared_ptr<const Policy>> Policy::Create(PolicyOptions options,
                                                     std::vector<Rule> rules) {
  if (options.no_namespace == NoNamespacePolicy::kAsNamespace && options.no_namespace_as.empty()) {
    return Status::Error("pullsWithoutNamespace: policy asNamespace needs a namespace");
  }
  for (size_t i = 0; i < rules.size(); ++i) {
    const Rule& r = rules[i];
    auto normalized = NormalizeMatch(r.match);
    if (!normalized.ok()) return Status::Error(r.origin + ": " + normalized.error());
    if (*normalized != r.match) {
      return Status::Error(r.origin + ": match '" + r.match + "' is not normalised (want '" +
                           *normalized + "')");
    }
    if (r.mirrors.empty()) return Status::Error(r.origin + ": a rule needs at least one mirror");
  }
  std::shared_ptr<Policy> p(new Policy());
  p->options_ = std::move(options);
  p->rules_ = std::move(rules);
  // Keys view into rules_, which never changes after this point.
  for (size_t i = 0; i < p->rules_.size(); ++i) p->by_match_[p->rules_[i].match].push_back(i);
  return std::shared_ptr<const Policy>(std::move(p));
}

std::shared_ptr<const Policy> Policy::Passthrough() {
  static const std::shared_ptr<const Policy> kPassthrough = [] {
    std::shared_ptr<Policy> p(new Policy());
    p->options_.enabled = false;
    return std::shared_ptr<const Policy>(std::move(p));
  }();
  return kPassthrough;
}

std::string_view ReasonName(DecisionReason r) {
  switch (r) {
    case DecisionReason::kRewritten:
      return "rewritten";
    case DecisionReason::kDisabled:
      return "disabled";
    case DecisionReason::kImageId:
      return "image_id";
    case DecisionReason::kInvalidReference:
      return "invalid_reference";
    case DecisionReason::kNoRule:
      return "no_rule";
    case DecisionReason::kNamespaceExcluded:
      return "namespace_excluded";
    case DecisionReason::kNamespaceNotIncluded:
      return "namespace_not_included";
    case DecisionReason::kRuleNamespace:
      return "rule_namespace";
    case DecisionReason::kPodSelector:
      return "pod_selector";
    case DecisionReason::kNoNamespace:
      return "no_namespace";
    case DecisionReason::kCredentials:
      return "credentials";
    case DecisionReason::kDigestOnly:
      return "digest_only";
  }
  return "unknown";
}

namespace {

Decision Unchanged(std::string_view image, DecisionReason reason, std::string detail) {
  Decision d;
  d.candidates.push_back(Candidate{std::string(image), /*upstream=*/true, nullptr});
  d.reason = reason;
  d.detail = std::move(detail);
  return d;
}

}  // namespace

Decision Policy::Decide(std::string_view image, const PullContext& ctx) const {
  if (!options_.enabled) {
    return Unchanged(image, DecisionReason::kDisabled, "rewriting is disabled (enabled: false)");
  }
  Result<ParsedReference> parsed = ParseImage(image);
  if (!parsed.ok()) {
    return Unchanged(image, DecisionReason::kInvalidReference,
                     "not a valid image reference (" + parsed.error() +
                         "); passed through for containerd to report");
  }
  if (parsed->kind == ReferenceKind::kId) {
    return Unchanged(image, DecisionReason::kImageId, "an image id is never rewritten");
  }
  const Reference& ref = parsed->ref;

  // Which namespace to judge by, if any. An empty namespace is no namespace.
  std::optional<std::string_view> ns;
  if (ctx.any_namespace) {
    // No namespace to judge by, and no policy for its absence either.
  } else if (ctx.namespace_name && !ctx.namespace_name->empty()) {
    ns = *ctx.namespace_name;
  } else if (options_.no_namespace == NoNamespacePolicy::kPassthrough) {
    Decision d = Unchanged(image, DecisionReason::kNoNamespace,
                           "the pull carries no pod namespace and pullsWithoutNamespace is "
                           "passthrough");
    d.original = ref;
    return d;
  } else if (options_.no_namespace == NoNamespacePolicy::kAsNamespace) {
    ns = options_.no_namespace_as;
  }

  auto unchanged = [&](DecisionReason reason, std::string detail, const Rule* rule = nullptr) {
    Decision d = Unchanged(image, reason, std::move(detail));
    d.original = ref;
    d.rule = rule;
    return d;
  };

  if (ns) {
    if (const Glob* g = options_.namespaces.ExcludedBy(*ns)) {
      return unchanged(
          DecisionReason::kNamespaceExcluded,
          StrCat({"namespace '", *ns, "' is excluded (excludeNamespaces: '", g->pattern(), "')"}));
    }
    if (!options_.namespaces.Included(*ns)) {
      return unchanged(DecisionReason::kNamespaceNotIncluded,
                       StrCat({"namespace '", *ns, "' is not in includeNamespaces"}));
    }
  }
  if (ctx.pod_labels && !ctx.any_namespace && !options_.pod_selector.empty()) {
    for (const auto& [k, v] : options_.pod_selector) {
      auto it = ctx.pod_labels->find(k);
      if (it == ctx.pod_labels->end() || it->second != v) {
        return unchanged(DecisionReason::kPodSelector,
                         StrCat({"the pod's labels do not match podSelector (", k, "=", v, ")"}));
      }
    }
  }

  // Longest matching prefix first: "docker.io/bitnami/redis", "docker.io/bitnami", "docker.io".
  std::string name = StrCat({ref.domain, "/", ref.path});
  const Rule* rule = nullptr;
  const Rule* rejected_by_namespace = nullptr;
  std::string_view prefix = name;
  while (!rule) {
    if (auto it = by_match_.find(prefix); it != by_match_.end()) {
      for (size_t i : it->second) {
        const Rule& r = rules_[i];
        if (ns && !r.namespaces.Accepts(*ns)) {
          if (!rejected_by_namespace) rejected_by_namespace = &r;
          continue;
        }
        rule = &r;
        break;
      }
    }
    size_t slash = prefix.rfind('/');
    if (slash == std::string_view::npos) break;
    prefix = prefix.substr(0, slash);
  }
  if (!rule) {
    if (rejected_by_namespace) {
      return unchanged(
          DecisionReason::kRuleNamespace,
          StrCat({"namespace '", *ns, "' is not selected by ", rejected_by_namespace->origin,
                  " (match ", rejected_by_namespace->match, ")"}),
          rejected_by_namespace);
    }
    return unchanged(DecisionReason::kNoRule, StrCat({"no rule matches ", name}));
  }
  if (rule->digest_only && ref.digest.empty()) {
    return unchanged(DecisionReason::kDigestOnly,
                     StrCat({rule->origin, " is digestOnly and the reference has no digest"}),
                     rule);
  }

  if (ctx.with_credentials && rule->credentialed_pulls.value_or(options_.credentialed_pulls) ==
                                  CredentialedPulls::kUpstream) {
    return unchanged(DecisionReason::kCredentials,
                     StrCat({"the pull carries credentials for ", ref.domain,
                             " and credentialedPulls is upstream",
                             rule->credentialed_pulls ? StrCat({" (", rule->origin, ")"}) : ""}),
                     rule);
  }

  Decision d;
  d.reason = DecisionReason::kRewritten;
  d.rule = rule;
  d.stale_if_error = rule->stale_if_error.value_or(options_.stale_if_error);
  d.original = ref;
  d.candidates.reserve(rule->mirrors.size() + 1);
  size_t skipped = 0;
  for (const Mirror& m : rule->mirrors) {
    // A mirror with a long path prefix can push the name past the grammar's limit; containerd
    // would refuse it, so it is not a candidate.
    if (m.RewrittenNameLength(ref) > kNameTotalLengthMax) {
      ++skipped;
      continue;
    }
    d.candidates.push_back(Candidate{m.Rewrite(ref), false, &m});
  }
  const size_t mirrors = d.candidates.size();
  if (mirrors == 0) {
    return unchanged(DecisionReason::kNoRule,
                     StrCat({rule->origin,
                             ": every mirror name would be longer than 255 "
                             "characters; passed through"}),
                     rule);
  }
  if (rule->fallback) d.candidates.push_back(Candidate{std::string(image), true, nullptr});
  d.detail = StrCat({"matched ", rule->origin, " (match ", rule->match,
                     "): ", std::to_string(mirrors), mirrors == 1 ? " mirror" : " mirrors",
                     rule->fallback ? ", then upstream" : ", no fallback to upstream"});
  if (skipped) {
    d.detail += StrCat({"; ", std::to_string(skipped), " skipped (name longer than 255)"});
  }
  return d;
}

}  // namespace registry_proxy
