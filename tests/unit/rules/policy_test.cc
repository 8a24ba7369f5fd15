// The rule engine, built directly (no YAML): decisions, reasons and candidates.
#include "rules/policy.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace registry_proxy {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const char kDigest[] = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

Mirror M(std::string_view host, bool drop_library = false) {
  auto m = Mirror::Parse(host);
  EXPECT_TRUE(m.ok()) << m.error();
  Mirror out = m.ok() ? m.value() : Mirror{};
  out.drop_library = drop_library;
  return out;
}

std::vector<Glob> Globs(std::vector<std::string> patterns) {
  std::vector<Glob> out;
  for (const auto& p : patterns) {
    auto g = Glob::Parse(p);
    EXPECT_TRUE(g.ok()) << g.error();
    if (g.ok()) out.push_back(g.value());
  }
  return out;
}

Rule R(std::string match, std::vector<Mirror> mirrors, std::string origin = "") {
  Rule r;
  r.match = std::move(match);
  r.mirrors = std::move(mirrors);
  r.origin = origin.empty() ? "rule " + r.match : origin;
  return r;
}

std::shared_ptr<const Policy> Make(std::vector<Rule> rules, PolicyOptions opts = {}) {
  auto p = Policy::Create(std::move(opts), std::move(rules));
  EXPECT_TRUE(p.ok()) << p.error();
  return p.ok() ? p.value() : Policy::Passthrough();
}

// The earlier tool's default config, built by hand.
std::shared_ptr<const Policy> SeedDefault() {
  PolicyOptions o;
  o.namespaces.exclude = Globs({"kube-system", "kube-public", "kube-node-lease", "registry-proxy"});
  o.namespaces.include = Globs({"*"});
  return Make(
      {R("docker.io", {M("docker.ketches.cn")}), R("registry.k8s.io", {M("k8s.ketches.cn")}),
       R("quay.io", {M("quay.ketches.cn")}), R("ghcr.io", {M("ghcr.ketches.cn")}),
       R("gcr.io", {M("gcr.ketches.cn")}), R("k8s.gcr.io", {M("k8s-gcr.ketches.cn")}),
       R("docker.cloudsmith.io", {M("cloudsmith.ketches.cn")})},
      std::move(o));
}

PullContext Ns(std::string_view ns) {
  PullContext c;
  c.namespace_name = ns;
  return c;
}

std::vector<std::string> Images(const Decision& d) {
  std::vector<std::string> out;
  for (const auto& c : d.candidates) out.push_back(c.image);
  return out;
}

// --- The earlier tool's behaviour ------------------------------------------------------------

struct SeedCase {
  std::string image;
  std::string ns;
  std::string first;  // the first candidate
  DecisionReason reason;
};

class SeedDefaultTest : public ::testing::TestWithParam<SeedCase> {};

TEST_P(SeedDefaultTest, FirstCandidate) {
  const SeedCase& c = GetParam();
  auto policy = SeedDefault();  // a Decision points into its Policy: keep it alive
  Decision d = policy->Decide(c.image, Ns(c.ns));
  EXPECT_EQ(d.reason, c.reason) << ReasonName(d.reason) << ": " << d.detail;
  ASSERT_FALSE(d.candidates.empty());
  EXPECT_EQ(d.candidates.front().image, c.first);
  // Every decision ends with the original, unchanged, as the last resort (fallback default on).
  EXPECT_EQ(d.candidates.back().image, c.image);
  EXPECT_TRUE(d.candidates.back().upstream);
}

INSTANTIATE_TEST_SUITE_P(
    Seed, SeedDefaultTest,
    ::testing::Values(
        // The earlier tool's README example.
        SeedCase{"nginx", "default", "docker.ketches.cn/library/nginx:latest",
                 DecisionReason::kRewritten},
        SeedCase{"nginx:1.25", "default", "docker.ketches.cn/library/nginx:1.25",
                 DecisionReason::kRewritten},
        SeedCase{"docker.io/library/nginx:1.25", "dev", "docker.ketches.cn/library/nginx:1.25",
                 DecisionReason::kRewritten},
        SeedCase{"index.docker.io/library/nginx", "dev", "docker.ketches.cn/library/nginx:latest",
                 DecisionReason::kRewritten},
        SeedCase{"stilleshan/frpc:latest", "default", "docker.ketches.cn/stilleshan/frpc:latest",
                 DecisionReason::kRewritten},
        SeedCase{"registry.k8s.io/coredns/coredns:v1.11.1", "default",
                 "k8s.ketches.cn/coredns/coredns:v1.11.1", DecisionReason::kRewritten},
        SeedCase{"k8s.gcr.io/pause:3.2", "default", "k8s-gcr.ketches.cn/pause:3.2",
                 DecisionReason::kRewritten},
        SeedCase{"gcr.io/distroless/static", "default", "gcr.ketches.cn/distroless/static:latest",
                 DecisionReason::kRewritten},
        SeedCase{"ghcr.io/owner/app:v1", "default", "ghcr.ketches.cn/owner/app:v1",
                 DecisionReason::kRewritten},
        SeedCase{"quay.io/prometheus/node-exporter", "monitoring",
                 "quay.ketches.cn/prometheus/node-exporter:latest", DecisionReason::kRewritten},
        SeedCase{std::string("nginx@") + kDigest, "default",
                 std::string("docker.ketches.cn/library/nginx@") + kDigest,
                 DecisionReason::kRewritten},
        // Tag and digest: the digest decides (containerd drops the tag as well).
        SeedCase{std::string("nginx:1.25@") + kDigest, "default",
                 std::string("docker.ketches.cn/library/nginx@") + kDigest,
                 DecisionReason::kRewritten},
        // Excluded namespaces pull from upstream as before.
        SeedCase{"nginx", "kube-system", "nginx", DecisionReason::kNamespaceExcluded},
        SeedCase{"registry.k8s.io/pause:3.9", "kube-system", "registry.k8s.io/pause:3.9",
                 DecisionReason::kNamespaceExcluded},
        SeedCase{"nginx", "registry-proxy", "nginx", DecisionReason::kNamespaceExcluded},
        // Registries with no entry are untouched.
        SeedCase{"mcr.microsoft.com/dotnet/runtime:8.0", "default",
                 "mcr.microsoft.com/dotnet/runtime:8.0", DecisionReason::kNoRule},
        SeedCase{"localhost:5000/app", "default", "localhost:5000/app", DecisionReason::kNoRule},
        // gcr.io must not match k8s.gcr.io or anything merely ending in it.
        SeedCase{"evilgcr.io/x", "default", "evilgcr.io/x", DecisionReason::kNoRule},
        SeedCase{"docker.io.evil.com/x", "default", "docker.io.evil.com/x",
                 DecisionReason::kNoRule},
        // Ids are never rewritten.
        SeedCase{kDigest, "default", kDigest, DecisionReason::kImageId},
        SeedCase{std::string(kDigest).substr(7), "default", std::string(kDigest).substr(7),
                 DecisionReason::kImageId},
        SeedCase{"0123456789ab", "default", "0123456789ab", DecisionReason::kImageId},
        // Invalid references pass through for containerd to report.
        SeedCase{"Nginx", "default", "Nginx", DecisionReason::kInvalidReference},
        SeedCase{"", "default", "", DecisionReason::kInvalidReference},
        SeedCase{"nginx:", "default", "nginx:", DecisionReason::kInvalidReference}));

TEST(PolicyTest, RewrittenDecisionHasMirrorThenUpstream) {
  auto policy = SeedDefault();
  Decision d = policy->Decide("nginx", Ns("default"));
  ASSERT_TRUE(d.rewritten());
  EXPECT_THAT(Images(d), ElementsAre("docker.ketches.cn/library/nginx:latest", "nginx"));
  EXPECT_FALSE(d.candidates[0].upstream);
  ASSERT_NE(d.candidates[0].mirror, nullptr);
  EXPECT_EQ(d.candidates[0].mirror->host, "docker.ketches.cn");
  ASSERT_NE(d.rule, nullptr);
  EXPECT_EQ(d.rule->match, "docker.io");
  ASSERT_TRUE(d.original.has_value());
  EXPECT_EQ(d.original->NormalizedString(), "docker.io/library/nginx:latest");
  EXPECT_THAT(d.detail, HasSubstr("1 mirror, then upstream"));
}

TEST(PolicyTest, ExcludedNamespaceNamesTheGlob) {
  PolicyOptions o;
  o.namespaces.exclude = Globs({"kube-*"});
  auto p = Make({R("docker.io", {M("m.example")})}, std::move(o));
  Decision d = p->Decide("nginx", Ns("kube-flannel"));
  EXPECT_EQ(d.reason, DecisionReason::kNamespaceExcluded);
  EXPECT_THAT(d.detail, HasSubstr("kube-*"));
  EXPECT_THAT(Images(d), ElementsAre("nginx"));
}

TEST(PolicyTest, IncludeListLimitsNamespaces) {
  PolicyOptions o;
  o.namespaces.include = Globs({"dev", "staging"});
  auto p = Make({R("docker.io", {M("m.example")})}, std::move(o));
  EXPECT_TRUE(p->Decide("nginx", Ns("dev")).rewritten());
  EXPECT_TRUE(p->Decide("nginx", Ns("staging")).rewritten());
  EXPECT_EQ(p->Decide("nginx", Ns("prod")).reason, DecisionReason::kNamespaceNotIncluded);
}

TEST(PolicyTest, ExcludeWinsOverInclude) {
  PolicyOptions o;
  o.namespaces.include = Globs({"*"});
  o.namespaces.exclude = Globs({"dev"});
  auto p = Make({R("docker.io", {M("m.example")})}, std::move(o));
  EXPECT_EQ(p->Decide("nginx", Ns("dev")).reason, DecisionReason::kNamespaceExcluded);
}

TEST(PolicyTest, LongestPrefixWinsOnWholeComponents) {
  auto p = Make(
      {R("docker.io", {M("hub.example")}), R("docker.io/bitnami", {M("bitnami.example/proxy")})});
  EXPECT_EQ(p->Decide("bitnami/redis:7", Ns("a")).candidates[0].image,
            "bitnami.example/proxy/bitnami/redis:7");
  // "docker.io/bitnami" must not match the "bitnamilabs" organisation.
  EXPECT_EQ(p->Decide("bitnamilabs/x", Ns("a")).candidates[0].image,
            "hub.example/bitnamilabs/x:latest");
  EXPECT_EQ(p->Decide("nginx", Ns("a")).candidates[0].image, "hub.example/library/nginx:latest");
}

TEST(PolicyTest, LongestPrefixWinsRegardlessOfOrder) {
  auto p = Make({R("docker.io/bitnami", {M("b.example")}), R("docker.io", {M("hub.example")})});
  EXPECT_EQ(p->Decide("bitnami/redis", Ns("a")).candidates[0].image,
            "b.example/bitnami/redis:latest");
  auto q = Make({R("docker.io", {M("hub.example")}), R("docker.io/bitnami", {M("b.example")})});
  EXPECT_EQ(q->Decide("bitnami/redis", Ns("a")).candidates[0].image,
            "b.example/bitnami/redis:latest");
}

TEST(PolicyTest, FullRepositoryMatch) {
  auto p = Make(
      {R("docker.io", {M("hub.example")}), R("docker.io/library/nginx", {M("nginx.example")})});
  EXPECT_EQ(p->Decide("nginx:1", Ns("a")).candidates[0].image, "nginx.example/library/nginx:1");
  EXPECT_EQ(p->Decide("nginx-unprivileged", Ns("a")).candidates[0].image,
            "hub.example/library/nginx-unprivileged:latest");
}

TEST(PolicyTest, PerNamespaceMirrors) {
  Rule team_a = R("docker.io", {M("team-a.example")}, "rules[0]");
  team_a.namespaces.include = Globs({"team-a", "team-a-*"});
  Rule rest = R("docker.io", {M("shared.example")}, "rules[1]");
  auto p = Make({team_a, rest});
  EXPECT_EQ(p->Decide("nginx", Ns("team-a")).candidates[0].image,
            "team-a.example/library/nginx:latest");
  EXPECT_EQ(p->Decide("nginx", Ns("team-a-dev")).candidates[0].image,
            "team-a.example/library/nginx:latest");
  EXPECT_EQ(p->Decide("nginx", Ns("team-b")).candidates[0].image,
            "shared.example/library/nginx:latest");
  EXPECT_EQ(p->Decide("nginx", Ns("team-b")).rule->origin, "rules[1]");
}

TEST(PolicyTest, RuleNamespaceFilterFallsToShorterPrefix) {
  Rule bitnami = R("docker.io/bitnami", {M("b.example")});
  bitnami.namespaces.exclude = Globs({"legacy"});
  auto p = Make({bitnami, R("docker.io", {M("hub.example")})});
  EXPECT_EQ(p->Decide("bitnami/redis", Ns("legacy")).candidates[0].image,
            "hub.example/bitnami/redis:latest");
  EXPECT_EQ(p->Decide("bitnami/redis", Ns("new")).candidates[0].image,
            "b.example/bitnami/redis:latest");
}

TEST(PolicyTest, EveryMatchingRuleRejectsNamespace) {
  Rule r = R("docker.io", {M("hub.example")}, "rules[0]");
  r.namespaces.exclude = Globs({"secret-*"});
  auto p = Make({r});
  Decision d = p->Decide("nginx", Ns("secret-1"));
  EXPECT_EQ(d.reason, DecisionReason::kRuleNamespace);
  ASSERT_NE(d.rule, nullptr);
  EXPECT_EQ(d.rule->origin, "rules[0]");
  EXPECT_THAT(d.detail, HasSubstr("rules[0]"));
  EXPECT_THAT(Images(d), ElementsAre("nginx"));
}

TEST(PolicyTest, MirrorsInOrderThenUpstream) {
  auto p = Make({R("quay.io", {M("q1.example"), M("q2.example:5000"), M("[::1]:5000/quay")})});
  EXPECT_THAT(Images(p->Decide("quay.io/a/b:1", Ns("x"))),
              ElementsAre("q1.example/a/b:1", "q2.example:5000/a/b:1", "[::1]:5000/quay/a/b:1",
                          "quay.io/a/b:1"));
}

TEST(PolicyTest, NoFallback) {
  Rule r = R("quay.io", {M("q1.example"), M("q2.example")});
  r.fallback = false;
  auto p = Make({r});
  Decision d = p->Decide("quay.io/a/b", Ns("x"));
  EXPECT_THAT(Images(d), ElementsAre("q1.example/a/b:latest", "q2.example/a/b:latest"));
  EXPECT_THAT(d.detail, HasSubstr("no fallback"));
}

TEST(PolicyTest, DigestOnly) {
  Rule r = R("docker.io", {M("hub.example")});
  r.digest_only = true;
  auto p = Make({r});
  Decision tag = p->Decide("nginx:1.25", Ns("x"));
  EXPECT_EQ(tag.reason, DecisionReason::kDigestOnly);
  EXPECT_THAT(Images(tag), ElementsAre("nginx:1.25"));
  Decision dig = p->Decide(std::string("nginx@") + kDigest, Ns("x"));
  EXPECT_TRUE(dig.rewritten());
  EXPECT_EQ(dig.candidates[0].image, std::string("hub.example/library/nginx@") + kDigest);
}

// credentialedPulls: a pull with credentials is mirrored (the default) or left to upstream,
// by the top-level setting or the rule's own.
TEST(PolicyTest, CredentialedPulls) {
  PullContext with = Ns("x");
  with.with_credentials = true;
  auto mirror = Make({R("docker.io", {M("hub.example")})});
  EXPECT_TRUE(mirror->Decide("nginx", with).rewritten());
  PolicyOptions o;
  o.credentialed_pulls = CredentialedPulls::kUpstream;
  auto upstream = Make({R("docker.io", {M("hub.example")})}, o);
  Decision d = upstream->Decide("nginx", with);
  EXPECT_EQ(d.reason, DecisionReason::kCredentials);
  EXPECT_EQ(ReasonName(d.reason), "credentials");
  EXPECT_THAT(Images(d), ElementsAre("nginx"));
  EXPECT_THAT(d.detail, HasSubstr("carries credentials for docker.io"));
  EXPECT_TRUE(upstream->Decide("nginx", Ns("x")).rewritten()) << "no credentials: mirrored";
  // A rule's own setting wins, either way.
  Rule up = R("quay.io", {M("q.example")}, "rules[0] (c.yaml:3)");
  up.credentialed_pulls = CredentialedPulls::kUpstream;
  Rule mir = R("ghcr.io", {M("g.example")});
  mir.credentialed_pulls = CredentialedPulls::kMirror;
  auto mixed = Make({up, mir}, o);
  Decision q = mixed->Decide("quay.io/a/b", with);
  EXPECT_EQ(q.reason, DecisionReason::kCredentials);
  EXPECT_THAT(q.detail, HasSubstr("(rules[0] (c.yaml:3))"));
  EXPECT_TRUE(mixed->Decide("ghcr.io/a/b", with).rewritten());
  auto mixed_default = Make({up, mir});
  EXPECT_EQ(mixed_default->Decide("quay.io/a/b", with).reason, DecisionReason::kCredentials);
}

TEST(PolicyTest, PathPrefixAndLibraryHandling) {
  auto keep = Make({R("docker.io", {M("harbor.corp/proxy")})});
  EXPECT_EQ(keep->Decide("nginx", Ns("x")).candidates[0].image,
            "harbor.corp/proxy/library/nginx:latest");
  auto drop = Make({R("docker.io", {M("harbor.corp/proxy", /*drop_library=*/true)})});
  EXPECT_EQ(drop->Decide("nginx", Ns("x")).candidates[0].image, "harbor.corp/proxy/nginx:latest");
  // Only official images lose "library/"; organisations keep their path.
  EXPECT_EQ(drop->Decide("bitnami/redis", Ns("x")).candidates[0].image,
            "harbor.corp/proxy/bitnami/redis:latest");
  // dropLibrary means nothing outside docker.io.
  auto q = Make({R("quay.io", {M("q.example", true)})});
  EXPECT_EQ(q->Decide("quay.io/library/x", Ns("x")).candidates[0].image,
            "q.example/library/x:latest");
}

TEST(PolicyTest, UpstreamCandidateIsTheInputUnchanged) {
  auto p = SeedDefault();
  // containerd and kubelet see exactly what they sent; normalisation is the mirror's business.
  EXPECT_EQ(p->Decide("nginx", Ns("x")).candidates.back().image, "nginx");
  EXPECT_EQ(p->Decide("index.docker.io/library/nginx", Ns("x")).candidates.back().image,
            "index.docker.io/library/nginx");
}

TEST(PolicyTest, NoNamespacePolicies) {
  Rule r = R("docker.io", {M("hub.example")});
  r.namespaces.include = Globs({"team-*"});
  PolicyOptions base;
  base.namespaces.exclude = Globs({"kube-system"});

  // rewrite: namespace filters (global and per rule) do not apply.
  auto rewrite = Make({r}, base);
  Decision d = rewrite->Decide("nginx", PullContext{});
  EXPECT_TRUE(d.rewritten()) << d.detail;
  // An empty namespace is no namespace.
  EXPECT_TRUE(rewrite->Decide("nginx", Ns("")).rewritten());

  PolicyOptions pass = base;
  pass.no_namespace = NoNamespacePolicy::kPassthrough;
  auto pass_policy = Make({r}, pass);
  Decision pd = pass_policy->Decide("nginx", PullContext{});
  EXPECT_EQ(pd.reason, DecisionReason::kNoNamespace);
  EXPECT_THAT(Images(pd), ElementsAre("nginx"));

  PolicyOptions as = base;
  as.no_namespace = NoNamespacePolicy::kAsNamespace;
  as.no_namespace_as = "kube-system";
  EXPECT_EQ(Make({r}, as)->Decide("nginx", PullContext{}).reason,
            DecisionReason::kNamespaceExcluded);
  as.no_namespace_as = "team-x";
  EXPECT_TRUE(Make({r}, as)->Decide("nginx", PullContext{}).rewritten());
}

TEST(PolicyTest, AnyNamespaceIgnoresEveryNamespaceFilter) {
  Rule r = R("docker.io", {M("hub.example")});
  r.namespaces.include = Globs({"team-*"});
  PolicyOptions o;
  o.namespaces.exclude = Globs({"kube-system"});
  o.no_namespace = NoNamespacePolicy::kPassthrough;
  o.pod_selector = {{"a", "b"}};
  auto p = Make({r}, o);
  std::map<std::string, std::string> labels;
  PullContext c = Ns("kube-system");
  c.pod_labels = &labels;
  c.any_namespace = true;
  Decision d = p->Decide("nginx", c);
  EXPECT_TRUE(d.rewritten()) << d.detail;
  EXPECT_EQ(d.candidates[0].image, "hub.example/library/nginx:latest");
  c.any_namespace = false;
  EXPECT_EQ(p->Decide("nginx", c).reason, DecisionReason::kNamespaceExcluded);
}

TEST(PolicyTest, AsNamespaceNeedsANamespace) {
  PolicyOptions o;
  o.no_namespace = NoNamespacePolicy::kAsNamespace;
  EXPECT_FALSE(Policy::Create(o, {}).ok());
}

TEST(PolicyTest, PodSelector) {
  PolicyOptions o;
  o.pod_selector = {{"registry-proxy", "on"}};
  auto p = Make({R("docker.io", {M("hub.example")})}, std::move(o));
  std::map<std::string, std::string> on = {{"registry-proxy", "on"}, {"app", "x"}};
  std::map<std::string, std::string> off = {{"app", "x"}};
  PullContext c = Ns("default");
  c.pod_labels = &on;
  EXPECT_TRUE(p->Decide("nginx", c).rewritten());
  c.pod_labels = &off;
  EXPECT_EQ(p->Decide("nginx", c).reason, DecisionReason::kPodSelector);
  // Labels unknown (no pod metadata): the selector cannot be judged and is not applied.
  c.pod_labels = nullptr;
  EXPECT_TRUE(p->Decide("nginx", c).rewritten());
}

TEST(PolicyTest, Disabled) {
  PolicyOptions o;
  o.enabled = false;
  auto p = Make({R("docker.io", {M("hub.example")})}, std::move(o));
  Decision d = p->Decide("nginx", Ns("default"));
  EXPECT_EQ(d.reason, DecisionReason::kDisabled);
  EXPECT_THAT(Images(d), ElementsAre("nginx"));
}

TEST(PolicyTest, PassthroughPolicyRewritesNothing) {
  auto p = Policy::Passthrough();
  for (const char* image : {"nginx", "quay.io/a/b", kDigest}) {
    Decision d = p->Decide(image, Ns("default"));
    EXPECT_FALSE(d.rewritten());
    EXPECT_THAT(Images(d), ElementsAre(image));
  }
}

TEST(PolicyTest, MirrorNameTooLongIsSkipped) {
  std::string long_prefix(200, 'a');
  auto p = Make({R("docker.io", {M("long.example/" + long_prefix), M("short.example")})});
  std::string repo = "org/" + std::string(60, 'b');
  Decision d = p->Decide(repo, Ns("x"));
  EXPECT_TRUE(d.rewritten());
  EXPECT_THAT(Images(d), ElementsAre("short.example/" + repo + ":latest", repo));
  EXPECT_THAT(d.detail, HasSubstr("skipped"));

  auto only_long = Make({R("docker.io", {M("long.example/" + long_prefix)})});
  Decision e = only_long->Decide(repo, Ns("x"));
  EXPECT_FALSE(e.rewritten());
  EXPECT_THAT(Images(e), ElementsAre(repo));
}

TEST(PolicyTest, CreateRejectsBadRules) {
  EXPECT_FALSE(Policy::Create({}, {R("index.docker.io", {M("m.example")})}).ok());
  EXPECT_FALSE(Policy::Create({}, {R("docker.io/", {M("m.example")})}).ok());
  EXPECT_FALSE(Policy::Create({}, {R("bitnami", {M("m.example")})}).ok());
  auto no_mirrors = Policy::Create({}, {R("docker.io", {})});
  ASSERT_FALSE(no_mirrors.ok());
  EXPECT_THAT(no_mirrors.error(), HasSubstr("at least one mirror"));
}

TEST(PolicyTest, ReasonNamesAreStable) {
  EXPECT_EQ(ReasonName(DecisionReason::kRewritten), "rewritten");
  EXPECT_EQ(ReasonName(DecisionReason::kNamespaceExcluded), "namespace_excluded");
  EXPECT_EQ(ReasonName(DecisionReason::kDigestOnly), "digest_only");
}

// --- Glob ------------------------------------------------------------------------------------

TEST(GlobTest, Matches) {
  struct Case {
    std::string pattern, name;
    bool match;
  };
  for (const Case& c : std::vector<Case>{{"*", "anything", true},
                                         {"*", "", true},
                                         {"kube-system", "kube-system", true},
                                         {"kube-system", "kube-systems", false},
                                         {"kube-*", "kube-public", true},
                                         {"kube-*", "kube-", true},
                                         {"kube-*", "kub", false},
                                         {"*-dev", "team-a-dev", true},
                                         {"*-dev", "team-a-devx", false},
                                         {"team-?", "team-a", true},
                                         {"team-?", "team-ab", false},
                                         {"a*b*c", "aXXbYYc", true},
                                         {"a*b*c", "aXXbYY", false},
                                         {"a**", "a", true},
                                         {"*a*a*a*a*b", std::string(100, 'a'), false}}) {
    auto g = Glob::Parse(c.pattern);
    ASSERT_TRUE(g.ok()) << c.pattern;
    EXPECT_EQ(g->Matches(c.name), c.match) << c.pattern << " vs " << c.name;
  }
}

TEST(GlobTest, RejectsWhatNoNamespaceContains) {
  for (const char* bad : {"", "Kube-*", "kube_system", "a b", "team/[ab]", "ns.x", "[a-z]*"}) {
    auto g = Glob::Parse(bad);
    EXPECT_FALSE(g.ok()) << bad;
  }
  EXPECT_THAT(Glob::Parse("Kube-*").error(), HasSubstr("'Kube-*'"));
}

// --- Mirror and match parsing ----------------------------------------------------------------

TEST(MirrorTest, Parse) {
  auto m = Mirror::Parse("harbor.corp:8443/proxy/hub/");
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_EQ(m->domain, "harbor.corp:8443");
  EXPECT_EQ(m->path_prefix, "proxy/hub");
  EXPECT_EQ(m->host, "harbor.corp:8443/proxy/hub");
  EXPECT_TRUE(Mirror::Parse("localhost:5000").ok());
  EXPECT_TRUE(Mirror::Parse("localhost").ok());
  EXPECT_TRUE(Mirror::Parse("127.0.0.1:5000").ok());
  EXPECT_TRUE(Mirror::Parse("[::1]:5000").ok());
}

TEST(MirrorTest, ParseErrorsSayWhy) {
  struct Case {
    std::string host, message;
  };
  for (const Case& c : std::vector<Case>{
           {"", "empty"},
           {"https://mirror.example", "scheme"},
           {"mymirror", "registry host"},
           {"mymirror/proxy", "registry host"},
           {"mirror.example/Proxy", "path prefix"},
           {"mirror..example", "mirror..example"},
           {"mirror.example:port", "mirror.example:port"},
       }) {
    auto m = Mirror::Parse(c.host);
    ASSERT_FALSE(m.ok()) << c.host;
    EXPECT_THAT(m.error(), HasSubstr(c.message)) << c.host;
  }
}

TEST(MatchTest, Normalize) {
  EXPECT_EQ(NormalizeMatch("docker.io").value(), "docker.io");
  EXPECT_EQ(NormalizeMatch("index.docker.io").value(), "docker.io");
  EXPECT_EQ(NormalizeMatch("index.docker.io/bitnami").value(), "docker.io/bitnami");
  EXPECT_EQ(NormalizeMatch("docker.io/bitnami/").value(), "docker.io/bitnami");
  EXPECT_EQ(NormalizeMatch("localhost:5000/a").value(), "localhost:5000/a");
  auto bare = NormalizeMatch("bitnami");
  ASSERT_FALSE(bare.ok());
  EXPECT_THAT(bare.error(), HasSubstr("docker.io/bitnami"));
  EXPECT_FALSE(NormalizeMatch("docker.io/Bitnami").ok());
  EXPECT_FALSE(NormalizeMatch("").ok());
}

}  // namespace
}  // namespace registry_proxy
