// The rule engine: (image, pull context) -> decision. Pure: no I/O, no clocks, no globals.
//
// A Policy is immutable once built and safe to share between threads. The config loader
// builds one from YAML; the shim and the webhook ask it the same question, so what the
// webhook annotates is what the node does.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/status.h"
#include "rules/reference.h"

namespace registry_proxy {

// A namespace pattern: lowercase letters, digits, '-', and the wildcards '*' (any run) and
// '?' (one character). "*" matches every namespace.
class Glob {
 public:
  // Errors for characters a namespace cannot contain, or an empty pattern.
  static Result<Glob> Parse(std::string_view pattern);
  bool Matches(std::string_view name) const;
  const std::string& pattern() const { return pattern_; }

 private:
  explicit Glob(std::string pattern) : pattern_(std::move(pattern)) {}
  std::string pattern_;
};

// include/exclude lists as the earlier tool had them: exclude wins; an empty include list
// means "every namespace".
struct NamespaceFilter {
  std::vector<Glob> include;
  std::vector<Glob> exclude;

  // Which glob excluded `ns`, or nullptr if it is not excluded.
  const Glob* ExcludedBy(std::string_view ns) const;
  bool Included(std::string_view ns) const;
  bool Accepts(std::string_view ns) const { return !ExcludedBy(ns) && Included(ns); }
};

struct Mirror {
  // As written: "docker.ketches.cn", "harbor.corp:8443/proxy". Validated by Mirror::Parse.
  std::string host;
  std::string domain;       // "harbor.corp:8443"
  std::string path_prefix;  // "proxy" or ""
  // docker.io official images are "library/x"; some mirrors serve them as "x".
  bool drop_library = false;
  // Name of an entry in the credentials file (used by the shim); "" for anonymous pulls.
  std::string credentials;

  static Result<Mirror> Parse(std::string_view host);

  // The reference to pull from this mirror for `original` (whose domain the rule matched).
  // The digest is always kept; with a digest the tag is dropped (containerd drops it too).
  std::string Rewrite(const Reference& original) const;
  // Length of the repository name (without tag or digest) Rewrite() would produce.
  size_t RewrittenNameLength(const Reference& original) const;

 private:
  std::string_view MirrorPath(const Reference& original) const;
};

// What a pull that carries credentials (kubelet's, chosen for the original registry: a pull
// secret, a credential provider) does where a rule would rewrite it.
enum class CredentialedPulls {
  kMirror,    // the mirrors first, without the caller's credentials; then upstream with them
  kUpstream,  // straight to the original registry, with them, as if no rule matched
};

struct Rule {
  // Normalised repository prefix, matched on whole path components:
  // "docker.io", "docker.io/bitnami", "registry.k8s.io/ingress-nginx".
  std::string match;
  std::vector<Mirror> mirrors;
  NamespaceFilter namespaces;  // per rule; empty include = every namespace
  bool fallback = true;        // try the original reference after every mirror failed
  bool digest_only = false;    // only rewrite references pinned by digest
  // Overrides PolicyOptions::credentialed_pulls for this rule's pulls.
  std::optional<CredentialedPulls> credentialed_pulls;
  // Overrides PolicyOptions::stale_if_error for this rule's pulls.
  std::optional<bool> stale_if_error;
  // Where it came from, for reasons and `resolve`: "rules[2] (config.yaml:14)".
  std::string origin;
};

enum class NoNamespacePolicy {
  kRewrite,      // apply rules; namespace filters do not apply (crictl, kubeadm, static pods)
  kPassthrough,  // never rewrite a pull that carries no pod namespace
  kAsNamespace,  // decide as if the pull came from a fixed namespace
};

// What the engine knows about the pull besides the image.
struct PullContext {
  // The pod's namespace, if the request carried pod sandbox metadata.
  std::optional<std::string_view> namespace_name;
  // The pod's labels, if known (used by podSelector); nullptr = unknown.
  const std::map<std::string, std::string>* pod_labels = nullptr;
  // Decide by the registry rules alone, as if every namespace filter and the pod selector
  // accepted the pull. For questions about the node's shared image store, which no single
  // namespace owns (e.g. "could a mirror-named copy of this image exist?").
  bool any_namespace = false;
  // The pull carries credentials for the original registry (PullImageRequest.auth).
  bool with_credentials = false;
};

enum class DecisionReason {
  kRewritten,             // mirrors first (and upstream if fallback)
  kDisabled,              // enabled: false
  kImageId,               // ids pass through
  kInvalidReference,      // containerd will report its own error
  kNoRule,                // no rule matches the repository
  kNamespaceExcluded,     // excludeNamespaces (global) matched
  kNamespaceNotIncluded,  // includeNamespaces (global) did not match
  kRuleNamespace,         // every matching rule's namespace filter rejected the namespace
  kPodSelector,           // podSelector did not match the pod's labels
  kNoNamespace,           // no pod namespace and the policy is passthrough
  kDigestOnly,            // the matching rule is digestOnly and the reference has no digest
  kCredentials,           // the pull carries credentials and credentialedPulls is upstream
};

std::string_view ReasonName(DecisionReason r);  // stable snake_case, for JSON and metrics

struct Candidate {
  std::string image;  // what to hand containerd
  bool upstream = false;
  const Mirror* mirror = nullptr;  // null for upstream; points into the Policy
};

// A Decision points into the Policy that made it (rule, mirrors): use it while you hold that
// Policy (callers hold a config snapshot for the whole of their work anyway).
struct Decision {
  // Never empty: at least one candidate. When not rewritten, exactly one: the input
  // unchanged.
  std::vector<Candidate> candidates;
  DecisionReason reason = DecisionReason::kNoRule;
  const Rule* rule = nullptr;  // the rule that decided, if any; points into the Policy
  std::string detail;          // one human sentence: why
  // Normalised original (set when the input parsed as a name).
  std::optional<Reference> original;
  // staleIfError in force for this pull (rewritten decisions only).
  bool stale_if_error = false;

  bool rewritten() const { return reason == DecisionReason::kRewritten; }
};

struct PolicyOptions {
  bool enabled = true;
  NamespaceFilter namespaces;                       // global (the earlier tool's keys)
  std::map<std::string, std::string> pod_selector;  // all pairs must be in the pod's labels
  NoNamespacePolicy no_namespace = NoNamespacePolicy::kRewrite;
  std::string no_namespace_as;  // with kAsNamespace
  CredentialedPulls credentialed_pulls = CredentialedPulls::kMirror;
  // When every candidate of a rewritten pull is down (unreachable or broken: refused, reset,
  // timeout, TLS, 5xx) and the image is on the node, answer with it (HTTP's stale-if-error).
  bool stale_if_error = false;
};

class Policy {
 public:
  // Rules are tried longest match first; among equal matches, in the given order.
  // Fails if a rule's match is not a normalised prefix (the loader validates first).
  static Result<std::shared_ptr<const Policy>> Create(PolicyOptions options,
                                                      std::vector<Rule> rules);
  // A policy that rewrites nothing (used when no good config was ever loaded).
  static std::shared_ptr<const Policy> Passthrough();

  Decision Decide(std::string_view image, const PullContext& ctx) const;

  const PolicyOptions& options() const { return options_; }
  const std::vector<Rule>& rules() const { return rules_; }

 private:
  Policy() = default;
  PolicyOptions options_;
  std::vector<Rule> rules_;
  // match -> indexes into rules_, in config order. Lookup walks the repository's prefixes
  // from longest to shortest, so a decision costs O(path depth), not O(rules).
  struct StringHash {
    using is_transparent = void;  // lets find() take a string_view without allocating
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, std::vector<size_t>, StringHash, std::equal_to<>> by_match_;
};

// Normalises a rule's `match`: "index.docker.io/foo" -> "docker.io/foo", a trailing '/' is
// dropped. A match is a prefix, not a reference: "docker.io/bitnami" means the bitnami
// organisation (no "library/" is added; official images are "docker.io/library/..."). A match
// must start with a registry host, so "bitnami" alone is an error that says so.
Result<std::string> NormalizeMatch(std::string_view match);

}  // namespace registry_proxy
