// The config loader: the shipped default, the earlier tool's files, every extension key, and
// bad input, each error pinned to its line, column and field.
#include "rules/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::StartsWith;

const std::string kDataDir = std::string(RP_SOURCE_DIR) + "/tests/data/config/";

ConfigLoad Parse(std::string_view yaml) { return ParseConfig(yaml, "test.yaml"); }

std::string Dump(const ConfigLoad& load) {
  return load.ok() ? std::string("(loaded without errors)") : load.ErrorText();
}

// An error at line:column on `field` whose message contains `text`.
::testing::AssertionResult HasError(const ConfigLoad& load, int line, int column,
                                    std::string_view field, std::string_view text) {
  if (load.ok()) return ::testing::AssertionFailure() << "config loaded; expected an error";
  for (const ConfigError& e : load.errors) {
    if (e.line == line && e.column == column && e.field == field &&
        e.message.find(text) != std::string::npos) {
      return ::testing::AssertionSuccess();
    }
  }
  return ::testing::AssertionFailure() << "no error " << line << ":" << column << " " << field
                                       << ": ...'" << text << "'... among:\n"
                                       << Dump(load);
}

// As HasError, and it is the only error.
::testing::AssertionResult OnlyError(const ConfigLoad& load, int line, int column,
                                     std::string_view field, std::string_view text) {
  auto r = HasError(load, line, column, field, text);
  if (!r) return r;
  if (load.errors.size() != 1) {
    return ::testing::AssertionFailure() << "expected one error, got:\n" << Dump(load);
  }
  return ::testing::AssertionSuccess();
}

std::vector<std::string> Matches(const Policy& p) {
  std::vector<std::string> out;
  for (const Rule& r : p.rules()) out.push_back(r.match);
  return out;
}

std::vector<std::string> Hosts(const Rule& r) {
  std::vector<std::string> out;
  for (const Mirror& m : r.mirrors) out.push_back(m.host);
  return out;
}

std::vector<std::string> Patterns(const std::vector<Glob>& globs) {
  std::vector<std::string> out;
  for (const Glob& g : globs) out.push_back(g.pattern());
  return out;
}

std::vector<std::string> Candidates(const Policy& p, std::string_view image,
                                    std::optional<std::string_view> ns) {
  PullContext ctx;
  ctx.namespace_name = ns;
  std::vector<std::string> out;
  for (const Candidate& c : p.Decide(image, ctx).candidates) out.push_back(c.image);
  return out;
}

// A scratch directory, removed afterwards.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "config_test.XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string Write(const std::string& name, std::string_view content) const {
    const std::string p = path_ + "/" + name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// ---------------------------------------------------------------------------------------------
// The shipped default

TEST(CredentialedPullsConfig, TopLevelAndPerRule) {
  ConfigLoad load = Parse(R"(credentialedPulls: upstream
rules:
  - match: docker.io
    mirrors: [hub.example]
    credentialedPulls: mirror
  - match: quay.io
    mirrors: [q.example]
)");
  ASSERT_TRUE(load.ok()) << Dump(load);
  PullContext with;
  with.namespace_name = "x";
  with.with_credentials = true;
  EXPECT_TRUE(load.config->policy->Decide("nginx", with).rewritten());
  EXPECT_EQ(load.config->policy->Decide("quay.io/a/b", with).reason, DecisionReason::kCredentials);
  // The default is mirror.
  ConfigLoad plain = Parse("proxies:\n  docker.io: hub.example\n");
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(plain.config->policy->Decide("nginx", with).rewritten());
}

TEST(CredentialedPullsConfig, BadValuesSayWhereAndWhat) {
  EXPECT_TRUE(OnlyError(Parse("credentialedPulls: upstrem\n"), 1, 20, "credentialedPulls",
                        "credentialedPulls 'upstrem' is not one of mirror, upstream; did you mean "
                        "'upstream'?"));
  EXPECT_TRUE(OnlyError(Parse(R"(rules:
  - match: docker.io
    mirrors: [hub.example]
    credentialedPulls: true
)"),
                        4, 24, "rules[0].credentialedPulls",
                        "must be a string, got the boolean true"));
}

TEST(StaleIfErrorConfig, TopLevelAndPerRule) {
  ConfigLoad load = Parse(R"(staleIfError: true
rules:
  - match: docker.io
    mirrors: [hub.example]
  - match: quay.io
    mirrors: [q.example]
    staleIfError: false
)");
  ASSERT_TRUE(load.ok()) << Dump(load);
  PullContext ctx;
  ctx.namespace_name = "x";
  EXPECT_TRUE(load.config->policy->Decide("nginx", ctx).stale_if_error);
  EXPECT_FALSE(load.config->policy->Decide("quay.io/a/b", ctx).stale_if_error);
  EXPECT_FALSE(Parse("proxies:\n  docker.io: h.example\n")
                   .config->policy->Decide("nginx", ctx)
                   .stale_if_error)
      << "off by default";
  EXPECT_TRUE(OnlyError(Parse("staleIfError: sometimes\n"), 1, 15, "staleIfError",
                        "must be true or false, got 'sometimes'"));
}

TEST(BuiltinConfig, LoadsCleanly) {
  ConfigLoad load = ParseConfig(BuiltinConfigYaml(), "<builtin>");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  auto config = BuiltinConfig();
  ASSERT_NE(config, nullptr);
  ASSERT_NE(config->policy, nullptr);
  EXPECT_EQ(config, BuiltinConfig());  // built once
  EXPECT_EQ(config->source, "<builtin>");
  EXPECT_EQ(config->content_sha256, load.config->content_sha256);
}

TEST(BuiltinConfig, IsTheEarlierToolsDefault) {
  const Policy& p = *BuiltinConfig()->policy;
  EXPECT_TRUE(p.options().enabled);
  EXPECT_THAT(Matches(p), ElementsAre("docker.io", "registry.k8s.io", "quay.io", "ghcr.io",
                                      "gcr.io", "k8s.gcr.io", "docker.cloudsmith.io"));
  ASSERT_EQ(p.rules().size(), 7u);
  const std::vector<std::string> mirrors = {
      "docker.ketches.cn", "k8s.ketches.cn",     "quay.ketches.cn",      "ghcr.ketches.cn",
      "gcr.ketches.cn",    "k8s-gcr.ketches.cn", "cloudsmith.ketches.cn"};
  for (size_t i = 0; i < p.rules().size(); ++i) {
    const Rule& r = p.rules()[i];
    EXPECT_THAT(Hosts(r), ElementsAre(mirrors[i])) << r.match;
    EXPECT_TRUE(r.fallback);
    EXPECT_FALSE(r.digest_only);
    EXPECT_FALSE(r.mirrors[0].drop_library);
    EXPECT_TRUE(r.namespaces.include.empty());
    EXPECT_TRUE(r.namespaces.exclude.empty());
  }
  EXPECT_EQ(p.rules()[0].origin, "proxies.docker.io (<builtin>:9)");
  EXPECT_THAT(Patterns(p.options().namespaces.exclude),
              ElementsAre("kube-system", "kube-public", "kube-node-lease", "registry-proxy"));
  EXPECT_THAT(Patterns(p.options().namespaces.include), ElementsAre("*"));
  EXPECT_TRUE(p.options().pod_selector.empty());
  EXPECT_EQ(p.options().no_namespace, NoNamespacePolicy::kRewrite);

  const NodeSettings defaults;
  const NodeSettings& node = BuiltinConfig()->node;
  EXPECT_EQ(node.listen, defaults.listen);
  EXPECT_EQ(node.upstream, defaults.upstream);
  EXPECT_EQ(node.containerd_namespace, "k8s.io");
  EXPECT_EQ(node.metrics_address, defaults.metrics_address);
  EXPECT_EQ(node.credentials_file, "");
  EXPECT_FALSE(node.keep_mirror_names);
}

TEST(BuiltinConfig, Decides) {
  const Policy& p = *BuiltinConfig()->policy;
  EXPECT_THAT(Candidates(p, "nginx", "default"),
              ElementsAre("docker.ketches.cn/library/nginx:latest", "nginx"));
  EXPECT_THAT(Candidates(p, "registry.k8s.io/pause:3.9", "default"),
              ElementsAre("k8s.ketches.cn/pause:3.9", "registry.k8s.io/pause:3.9"));
  EXPECT_THAT(Candidates(p, "nginx", "kube-system"), ElementsAre("nginx"));
  EXPECT_THAT(Candidates(p, "example.com/app:1", "default"), ElementsAre("example.com/app:1"));
}

TEST(BuiltinConfig, MatchesTheShippedFile) {
  ConfigLoad load = LoadConfigFile(std::string(RP_SOURCE_DIR) + "/config/config.yaml");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_EQ(load.config->content_sha256, BuiltinConfig()->content_sha256);
  EXPECT_EQ(Matches(*load.config->policy), Matches(*BuiltinConfig()->policy));
}

// ---------------------------------------------------------------------------------------------
// The earlier tool's files load unchanged

TEST(SeedConfig, FirstFormWithoutEnabled) {
  ConfigLoad load = LoadConfigFile(kDataDir + "seed_v1.yaml");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const Policy& p = *load.config->policy;
  EXPECT_TRUE(p.options().enabled);  // absent = true
  EXPECT_THAT(Matches(p), ElementsAre("docker.io", "registry.k8s.io", "quay.io"));
  EXPECT_THAT(Patterns(p.options().namespaces.include), ElementsAre("dev", "staging"));
  EXPECT_THAT(Patterns(p.options().namespaces.exclude),
              ElementsAre("kube-system", "kube-public", "kube-node-lease"));
  EXPECT_THAT(Candidates(p, "nginx:1.25", "dev"),
              ElementsAre("docker.m.daocloud.io/library/nginx:1.25", "nginx:1.25"));
  EXPECT_THAT(Candidates(p, "nginx:1.25", "prod"), ElementsAre("nginx:1.25"));
}

TEST(SeedConfig, LaterFormWithSelectors) {
  ConfigLoad load = LoadConfigFile(kDataDir + "seed_v2.yaml");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const Policy& p = *load.config->policy;
  EXPECT_TRUE(p.options().enabled);
  EXPECT_EQ(p.rules().size(), 6u);
  EXPECT_TRUE(p.options().pod_selector.empty());
  EXPECT_THAT(Patterns(p.options().namespaces.include), ElementsAre("*"));
  EXPECT_EQ(p.options().namespaces.exclude.size(), 4u);
  EXPECT_EQ(p.rules()[5].origin, "proxies.k8s.gcr.io (" + kDataDir + "seed_v2.yaml:9)");
}

TEST(SeedConfig, EnabledFalse) {
  ConfigLoad load = Parse("enabled: false\nproxies:\n  docker.io: docker.ketches.cn\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_FALSE(load.config->policy->options().enabled);
  EXPECT_THAT(Candidates(*load.config->policy, "nginx", "default"), ElementsAre("nginx"));
}

TEST(SeedConfig, BooleanSpellings) {
  for (const char* yes : {"true", "True", "TRUE", "!!bool true"}) {
    ConfigLoad load = Parse(std::string("enabled: ") + yes + "\n");
    ASSERT_TRUE(load.ok()) << yes << ": " << load.ErrorText();
    EXPECT_TRUE(load.config->policy->options().enabled) << yes;
  }
  for (const char* no : {"false", "False", "FALSE"}) {
    ConfigLoad load = Parse(std::string("enabled: ") + no + "\n");
    ASSERT_TRUE(load.ok()) << no << ": " << load.ErrorText();
    EXPECT_FALSE(load.config->policy->options().enabled) << no;
  }
}

TEST(SeedConfig, EmptyValuesMeanEmptyCollections) {
  // `key:` with nothing after it: an empty map or list, as the earlier tool's decoder read it.
  ConfigLoad load = Parse(
      "proxies:\nexcludeNamespaces:\npodSelector:\nnamespaceSelector:\nrules:\nnode:\n"
      "pullsWithoutNamespace:\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_TRUE(load.config->policy->rules().empty());
  EXPECT_TRUE(load.config->policy->options().namespaces.include.empty());  // every namespace
}

TEST(SeedConfig, PodSelector) {
  ConfigLoad load = Parse(
      "proxies: {docker.io: m.example.com}\n"
      "podSelector:\n  app.kubernetes.io/part-of: shop\n  tier: \"1\"\n  empty: \"\"\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const auto& sel = load.config->policy->options().pod_selector;
  EXPECT_EQ(sel.size(), 3u);
  EXPECT_EQ(sel.at("app.kubernetes.io/part-of"), "shop");
  EXPECT_EQ(sel.at("tier"), "1");
  EXPECT_EQ(sel.at("empty"), "");
}

TEST(SeedConfig, NumbersAreTakenAsWritten) {
  ConfigLoad load = Parse("podSelector: {version: 1.10}\nexcludeNamespaces: [2024]\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_EQ(load.config->policy->options().pod_selector.at("version"), "1.10");
  EXPECT_THAT(Patterns(load.config->policy->options().namespaces.exclude), ElementsAre("2024"));
}

TEST(SeedConfig, LegacyDockerHubNameAndMirrorPrefix) {
  ConfigLoad load = Parse("proxies:\n  index.docker.io: harbor.corp:8443/dockerhub/\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const Rule& r = load.config->policy->rules().at(0);
  EXPECT_EQ(r.match, "docker.io");
  EXPECT_EQ(r.origin, "proxies.index.docker.io (test.yaml:2)");
  EXPECT_EQ(r.mirrors.at(0).domain, "harbor.corp:8443");
  EXPECT_EQ(r.mirrors.at(0).path_prefix, "dockerhub");
  EXPECT_THAT(Candidates(*load.config->policy, "redis", "default"),
              ElementsAre("harbor.corp:8443/dockerhub/library/redis:latest", "redis"));
}

// ---------------------------------------------------------------------------------------------
// Extensions

TEST(Extensions, EveryKey) {
  ConfigLoad load = LoadConfigFile(kDataDir + "extended.yaml");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const Config& c = *load.config;
  const Policy& p = *c.policy;
  // Explicit rules first, then proxies.
  EXPECT_THAT(Matches(p), ElementsAre("docker.io/bitnami", "docker.io", "docker.io", "quay.io"));

  const Rule& bitnami = p.rules()[0];
  EXPECT_THAT(Hosts(bitnami), ElementsAre("harbor.corp:8443/bitnami-proxy", "mirror.gcr.io"));
  EXPECT_FALSE(bitnami.mirrors[0].drop_library);
  EXPECT_EQ(bitnami.mirrors[0].credentials, "");
  EXPECT_TRUE(bitnami.mirrors[1].drop_library);
  EXPECT_EQ(bitnami.mirrors[1].credentials, "gcr-mirror");
  EXPECT_THAT(Patterns(bitnami.namespaces.include), ElementsAre("team-*"));
  EXPECT_THAT(Patterns(bitnami.namespaces.exclude), ElementsAre("team-legacy"));
  EXPECT_FALSE(bitnami.fallback);
  EXPECT_TRUE(bitnami.digest_only);
  EXPECT_EQ(bitnami.origin, "rules[0] (" + kDataDir + "extended.yaml:4)");

  const Rule& hub = p.rules()[1];
  EXPECT_EQ(hub.match, "docker.io");  // index.docker.io/ normalised
  EXPECT_THAT(Hosts(hub), ElementsAre("docker.internal"));
  EXPECT_TRUE(hub.fallback);
  EXPECT_FALSE(hub.digest_only);
  EXPECT_TRUE(hub.namespaces.include.empty());
  EXPECT_EQ(hub.origin, "rules[1] (" + kDataDir + "extended.yaml:14)");
  EXPECT_THAT(p.rules()[2].origin, StartsWith("proxies.docker.io ("));

  EXPECT_THAT(Patterns(p.options().namespaces.exclude), ElementsAre("kube-system"));
  EXPECT_TRUE(p.options().namespaces.include.empty());
  EXPECT_EQ(p.options().pod_selector.at("registry-proxy.io/enabled"), "true");
  EXPECT_EQ(p.options().no_namespace, NoNamespacePolicy::kAsNamespace);
  EXPECT_EQ(p.options().no_namespace_as, "kube-system");

  EXPECT_EQ(c.node.listen, "unix:///run/rp/rp.sock");  // a bare path gets unix://
  EXPECT_EQ(c.node.upstream, "unix:///run/k3s/containerd/containerd.sock");
  EXPECT_EQ(c.node.containerd_namespace, "k8s.io");
  EXPECT_EQ(c.node.metrics_address, "[::1]:9100");
  EXPECT_EQ(c.node.credentials_file, "/etc/registry-proxy/credentials.yaml");
  EXPECT_TRUE(c.node.keep_mirror_names);
  EXPECT_EQ(c.source, kDataDir + "extended.yaml");
}

TEST(Extensions, ExplicitRulesWinTies) {
  ConfigLoad load = Parse(
      "proxies:\n  docker.io: docker.ketches.cn\n"
      "rules:\n  - match: docker.io\n    mirrors: [hub.corp.example]\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_THAT(Candidates(*load.config->policy, "nginx", "default"),
              ElementsAre("hub.corp.example/library/nginx:latest", "nginx"));
}

TEST(Extensions, PerNamespaceMirrors) {
  ConfigLoad load = Parse(R"(rules:
  - match: docker.io
    mirrors: [eu.mirror.example]
    includeNamespaces: [eu-*]
  - match: docker.io
    mirrors: [us.mirror.example]
    fallback: false
)");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const Policy& p = *load.config->policy;
  EXPECT_THAT(Candidates(p, "nginx", "eu-shop"),
              ElementsAre("eu.mirror.example/library/nginx:latest", "nginx"));
  EXPECT_THAT(Candidates(p, "nginx", "us-shop"),
              ElementsAre("us.mirror.example/library/nginx:latest"));
}

TEST(Extensions, PullsWithoutNamespacePolicies) {
  struct Case {
    const char* yaml;
    NoNamespacePolicy want;
  } cases[] = {
      {"pullsWithoutNamespace: {}\n", NoNamespacePolicy::kRewrite},
      {"pullsWithoutNamespace: {policy: rewrite}\n", NoNamespacePolicy::kRewrite},
      {"pullsWithoutNamespace: {policy: passthrough}\n", NoNamespacePolicy::kPassthrough},
      {"pullsWithoutNamespace: {policy: asNamespace, namespace: default}\n",
       NoNamespacePolicy::kAsNamespace},
  };
  for (const Case& c : cases) {
    ConfigLoad load = Parse(c.yaml);
    ASSERT_TRUE(load.ok()) << c.yaml << load.ErrorText();
    EXPECT_EQ(load.config->policy->options().no_namespace, c.want) << c.yaml;
  }
}

TEST(Extensions, AliasesMayShareAMirrorList) {
  ConfigLoad load = Parse(R"(rules:
  - match: docker.io
    mirrors: &shared [a.mirror.example, b.mirror.example]
  - match: quay.io
    mirrors: *shared
)");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_THAT(Hosts(load.config->policy->rules()[1]),
              ElementsAre("a.mirror.example", "b.mirror.example"));
}

TEST(Extensions, ExplicitStandardTagsAreAccepted) {
  ConfigLoad load = Parse("proxies: !!map\n  docker.io: !!str m.example.com\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
}

TEST(Extensions, MirrorOnTheSameRegistryOutsideTheMatchIsNoLoop) {
  // docker.io/bitnami/x -> docker.io/mirror/bitnami/x, which the rule does not match again.
  ConfigLoad load = Parse("rules:\n- match: docker.io/bitnami\n  mirrors: [docker.io/mirror]\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
}

TEST(Extensions, HashOfTheBytes) {
  // printf 'enabled: true\n' | sha256sum
  ConfigLoad load = Parse("enabled: true\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_EQ(load.config->content_sha256,
            "58b2e0c9e66599dd94f77b2ab49ca64f0b6841d32f4b0874c4c4b8fd5b9fb862");
  EXPECT_NE(Parse("enabled: true \n").config->content_sha256, load.config->content_sha256);
  EXPECT_EQ(load.config->source, "test.yaml");
  EXPECT_EQ(ParseConfig("enabled: true\n", "").config->source, "<string>");
}

// ---------------------------------------------------------------------------------------------
// Errors: keys

TEST(ConfigErrors, UnknownTopLevelKeyWithHint) {
  EXPECT_TRUE(OnlyError(Parse("enabled: true\nexcludeNamespace: [a]\n"), 2, 1, "excludeNamespace",
                        "unknown key 'excludeNamespace'; did you mean 'excludeNamespaces'?"));
  EXPECT_TRUE(OnlyError(Parse("exclude_namespaces: [a]\n"), 1, 1, "exclude_namespaces",
                        "did you mean 'excludeNamespaces'?"));
  EXPECT_TRUE(OnlyError(Parse("Enabled: true\n"), 1, 1, "Enabled", "did you mean 'enabled'?"));
}

TEST(ConfigErrors, UnknownTopLevelKeyWithoutHint) {
  EXPECT_TRUE(OnlyError(Parse("foo: 1\n"), 1, 1, "foo",
                        "unknown key 'foo'; known keys are enabled, proxies,"));
  EXPECT_TRUE(
      OnlyError(Parse("listen: /run/x.sock\n"), 1, 1, "listen", "it belongs under 'node:'"));
  EXPECT_TRUE(OnlyError(Parse("includeRegistries: [docker.io]\n"), 1, 1, "includeRegistries",
                        "registries are the keys of proxies"));
}

TEST(ConfigErrors, UnknownNestedKeys) {
  ConfigLoad load = Parse(R"(rules:
  - match: docker.io
    mirorrs: [m.example.com]
    mirrors:
      - host: n.example.com
        droplibrary: true
node:
  listenn: /run/x.sock
pullsWithoutNamespace: {policy: rewrite, ns: x}
)");
  EXPECT_TRUE(HasError(load, 3, 5, "rules[0].mirorrs", "did you mean 'mirrors'?"));
  EXPECT_TRUE(
      HasError(load, 6, 9, "rules[0].mirrors[0].droplibrary", "did you mean 'dropLibrary'?"));
  EXPECT_TRUE(HasError(load, 8, 3, "node.listenn", "did you mean 'listen'?"));
  EXPECT_TRUE(HasError(load, 9, 42, "pullsWithoutNamespace.ns", "unknown key 'ns'"));
  EXPECT_EQ(load.errors.size(), 4u) << load.ErrorText();
}

TEST(ConfigErrors, DuplicateKeys) {
  EXPECT_TRUE(OnlyError(Parse("enabled: true\nproxies: {}\nenabled: false\n"), 3, 1, "enabled",
                        "duplicate key 'enabled' (first at line 1)"));
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  quay.io: a.example.com\n  quay.io: b.example.com\n"), 3,
                        3, "proxies.quay.io", "duplicate key 'quay.io' (first at line 2)"));
  EXPECT_TRUE(OnlyError(Parse("podSelector: {app: a, app: b}\n"), 1, 23, "podSelector.app",
                        "duplicate key 'app'"));
  // The same registry under two names.
  EXPECT_TRUE(
      OnlyError(Parse("proxies:\n  docker.io: a.example.com\n  index.docker.io: b.example.com\n"),
                3, 3, "proxies.index.docker.io", "is docker.io, already mapped at line 2"));
}

TEST(ConfigErrors, NonStringKeys) {
  EXPECT_TRUE(OnlyError(Parse("? [a]\n: b\n"), 1, 3, "", "keys must be strings, got a list"));
}

TEST(ConfigErrors, MergeKeysAreNotSupported) {
  EXPECT_TRUE(
      OnlyError(Parse("<<: {enabled: true}\n"), 1, 1, "<<", "merge keys ('<<') are not supported"));
}

// ---------------------------------------------------------------------------------------------
// Errors: types

TEST(ConfigErrors, QuotedBoolean) {
  EXPECT_TRUE(OnlyError(Parse("enabled: \"yes\"\n"), 1, 10, "enabled",
                        "must be true or false, got the string 'yes'"));
  EXPECT_TRUE(OnlyError(Parse("enabled: 'true'\n"), 1, 10, "enabled",
                        "write true or false without quotes"));
}

TEST(ConfigErrors, Yaml11Boolean) {
  for (const char* word : {"yes", "no", "on", "off", "y", "N"}) {
    EXPECT_TRUE(OnlyError(Parse(std::string("enabled: ") + word + "\n"), 1, 10, "enabled",
                          "only true and false are booleans (YAML 1.2)"))
        << word;
  }
}

TEST(ConfigErrors, WrongTypes) {
  EXPECT_TRUE(OnlyError(Parse("enabled: 1\n"), 1, 10, "enabled",
                        "must be true or false, got the number 1"));
  EXPECT_TRUE(OnlyError(Parse("enabled:\n"), 1, 1, "enabled", "got no value"));
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  - docker.io\n"), 2, 3, "proxies",
                        "must be a map (key: value), got a list"));
  EXPECT_TRUE(OnlyError(Parse("excludeNamespaces: kube-system\n"), 1, 20, "excludeNamespaces",
                        "must be a list, got 'kube-system'"));
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  docker.io: [a.example.com]\n"), 2, 14,
                        "proxies.docker.io", "must be a string, got a list"));
  EXPECT_TRUE(
      OnlyError(Parse("rules: {match: docker.io}\n"), 1, 8, "rules", "must be a list, got a map"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - docker.io\n"), 2, 5, "rules[0]",
                        "a rule must be a map with match and mirrors, got 'docker.io'"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: docker.io\n    mirrors: m.example.com\n"), 3, 14,
                        "rules[0].mirrors", "must be a list, got 'm.example.com'"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: docker.io\n    mirrors: [[a.example.com]]\n"), 3,
                        15, "rules[0].mirrors[0]", "must be a mirror host, or a map with host"));
  EXPECT_TRUE(OnlyError(Parse("podSelector: {app: true}\n"), 1, 20, "podSelector.app",
                        "got the boolean true; quote it (\"true\")"));
  EXPECT_TRUE(OnlyError(Parse("node: {keepMirrorNames: \"false\"}\n"), 1, 25,
                        "node.keepMirrorNames", "without quotes"));
  EXPECT_TRUE(OnlyError(Parse("node: []\n"), 1, 7, "node", "must be a map"));
  EXPECT_TRUE(OnlyError(Parse("proxies: {docker.io: !!binary aGVsbG8=}\n"), 1, 22,
                        "proxies.docker.io", "unexpected tag 'tag:yaml.org,2002:binary'"));
}

TEST(ConfigErrors, NotAMap) {
  EXPECT_TRUE(OnlyError(Parse("- docker.io\n- quay.io\n"), 1, 1, "",
                        "config must be a map of keys (enabled, proxies, rules, ...), got a list"));
  EXPECT_TRUE(OnlyError(Parse("just some text\n"), 1, 1, "", "got 'just some text'"));
}

TEST(ConfigErrors, Empty) {
  for (const char* empty : {"", "\n\n", "# only a comment\n# and another\n", "---\n", "~\n"}) {
    ConfigLoad load = Parse(empty);
    ASSERT_FALSE(load.ok()) << "'" << empty << "'";
    ASSERT_EQ(load.errors.size(), 1u);
    EXPECT_EQ(load.errors[0].line, 0);
    EXPECT_THAT(load.errors[0].message, HasSubstr("config is empty"));
    EXPECT_EQ(load.errors[0].ToString(),
              "test.yaml: config is empty: it has no keys (write enabled: false to turn "
              "rewriting off)");
  }
  // An explicit empty map is a deliberate choice: all defaults, no rules.
  ConfigLoad load = Parse("{}\n");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_TRUE(load.config->policy->rules().empty());
}

// ---------------------------------------------------------------------------------------------
// Errors: values

TEST(ConfigErrors, BadGlob) {
  EXPECT_TRUE(OnlyError(Parse("excludeNamespaces:\n  - kube-system\n  - Kube_*\n"), 3, 5,
                        "excludeNamespaces[1]", "bad namespace pattern 'Kube_*'"));
  EXPECT_TRUE(OnlyError(Parse("includeNamespaces: [\"\"]\n"), 1, 21, "includeNamespaces[0]",
                        "empty namespace pattern"));
  EXPECT_TRUE(OnlyError(
      Parse("rules:\n- match: quay.io\n  mirrors: [q.example]\n  excludeNamespaces: [a/b]\n"), 4,
      23, "rules[0].excludeNamespaces[0]", "bad namespace pattern 'a/b'"));
}

TEST(ConfigErrors, EmptyIncludeNamespaces) {
  EXPECT_TRUE(OnlyError(Parse("includeNamespaces: []\n"), 1, 20, "includeNamespaces",
                        "includeNamespaces is empty, so no namespace would be rewritten"));
  EXPECT_TRUE(
      OnlyError(Parse("includeNamespaces:\n"), 1, 1, "includeNamespaces", "use enabled: false"));
  EXPECT_TRUE(OnlyError(
      Parse("rules:\n- match: quay.io\n  mirrors: [q.example]\n  includeNamespaces: []\n"), 4, 22,
      "rules[0].includeNamespaces", "the rule would apply to no namespace"));
}

TEST(ConfigErrors, BadMirrorHosts) {
  ConfigLoad load = Parse(R"(proxies:
  docker.io: Docker.Mirror.example
  quay.io: quay mirror.example
  ghcr.io: https://ghcr.mirror.example
  gcr.io: ""
  k8s.gcr.io: mirror
)");
  EXPECT_TRUE(HasError(load, 2, 14, "proxies.docker.io",
                       "mirror host 'Docker.Mirror.example' must be lowercase"));
  EXPECT_TRUE(HasError(load, 3, 12, "proxies.quay.io",
                       "mirror host 'quay mirror.example' must not contain spaces"));
  EXPECT_TRUE(HasError(load, 4, 12, "proxies.ghcr.io",
                       "must not have a scheme ('https://'): schemes are not allowed; write the "
                       "host only, e.g. 'ghcr.mirror.example'"));
  EXPECT_TRUE(HasError(load, 5, 11, "proxies.gcr.io", "mirror host is empty"));
  EXPECT_TRUE(HasError(load, 6, 15, "proxies.k8s.gcr.io", "does not start with a registry host"));
  EXPECT_EQ(load.errors.size(), 5u) << load.ErrorText();
}

TEST(ConfigErrors, BadMirrorInARule) {
  ConfigLoad load = Parse(R"(rules:
  - match: docker.io
    mirrors:
      - host: Harbor.corp
      - host: harbor.corp
        dropLibrary: "true"
      - dropLibrary: true
)");
  EXPECT_TRUE(HasError(load, 4, 15, "rules[0].mirrors[0].host",
                       "mirror host 'Harbor.corp' must be lowercase"));
  EXPECT_TRUE(HasError(load, 6, 22, "rules[0].mirrors[1].dropLibrary", "without quotes"));
  EXPECT_TRUE(HasError(load, 7, 9, "rules[0].mirrors[2].host", "is required"));
  EXPECT_EQ(load.errors.size(), 3u) << load.ErrorText();
  EXPECT_EQ(load.errors[0].ToString(),
            "test.yaml:4:15: rules[0].mirrors[0].host: mirror host 'Harbor.corp' must be "
            "lowercase");
}

TEST(ConfigErrors, BadMatch) {
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: bitnami\n    mirrors: [m.example.com]\n"), 2, 12,
                        "rules[0].match",
                        "match 'bitnami' must start with a registry host (a name with a '.' or "
                        "':port', or 'localhost'), e.g. 'docker.io/bitnami'"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: https://quay.io\n    mirrors: [m.example]\n"), 2,
                        12, "rules[0].match", "must not have a scheme"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: Quay.io/x\n    mirrors: [m.example]\n"), 2, 12,
                        "rules[0].match", "must be lowercase"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: quay.io/A_\n    mirrors: [m.example]\n"), 2, 12,
                        "rules[0].match", "must be lowercase"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n  - match: quay.io/a__-b\n    mirrors: [m.example]\n"), 2,
                        12, "rules[0].match", "quay.io/a__-b"));
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  docker.io/bitnami: m.example.com\n"), 2, 3,
                        "proxies.docker.io/bitnami", "has a path: proxies maps whole registries"));
}

TEST(ConfigErrors, RuleNeedsMatchAndMirrors) {
  ConfigLoad load = Parse("rules:\n  - fallback: true\n  - match: quay.io\n    mirrors: []\n");
  EXPECT_TRUE(HasError(load, 2, 5, "rules[0].match", "is required"));
  EXPECT_TRUE(HasError(load, 2, 5, "rules[0].mirrors", "is required"));
  EXPECT_TRUE(HasError(load, 4, 14, "rules[1].mirrors", "a rule needs at least one mirror"));
  EXPECT_EQ(load.errors.size(), 3u) << load.ErrorText();
  EXPECT_TRUE(OnlyError(Parse("rules:\n  -\n  - {match: quay.io, mirrors: [q.example]}\n"), 2, 3,
                        "rules[0]", "got no value"));
}

TEST(ConfigErrors, MirrorThatLoops) {
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  docker.io: index.docker.io\n"), 2, 14,
                        "proxies.docker.io", "is the registry itself (docker.io)"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n- match: docker.io\n  mirrors: [docker.io/cache]\n"), 3, 13,
                        "rules[0].mirrors[0]", "would match the rule again and loop"));
  EXPECT_TRUE(OnlyError(Parse("rules:\n- match: quay.io/a\n  mirrors:\n  - host: quay.io/a/b\n"), 4,
                        11, "rules[0].mirrors[0].host", "would match the rule again and loop"));
}

TEST(ConfigErrors, NamespaceSelectorMustBeEmpty) {
  EXPECT_TRUE(OnlyError(
      Parse("namespaceSelector:\n  team: shop\n"), 2, 3, "namespaceSelector",
      "must be empty: namespace labels reach neither the node nor the webhook's view of a pod"));
  EXPECT_TRUE(OnlyError(Parse("namespaceSelector: {a: b}\n"), 1, 20, "namespaceSelector",
                        "select namespaces by name with includeNamespaces/excludeNamespaces"));
}

TEST(ConfigErrors, BadPodSelector) {
  ConfigLoad load = Parse("podSelector:\n  bad key: x\n  app: \"not ok\"\n  a/b/c: x\n");
  EXPECT_TRUE(HasError(load, 2, 3, "podSelector.bad key", "label key 'bad key' is invalid"));
  EXPECT_TRUE(HasError(load, 3, 8, "podSelector.app", "label value 'not ok' is invalid"));
  EXPECT_TRUE(HasError(load, 4, 3, "podSelector.a/b/c", "label key 'a/b/c' is invalid"));
  EXPECT_EQ(load.errors.size(), 3u) << load.ErrorText();
}

TEST(ConfigErrors, BadPullsWithoutNamespace) {
  EXPECT_TRUE(OnlyError(Parse("pullsWithoutNamespace:\n  policy: AsNamespace\n"), 2, 11,
                        "pullsWithoutNamespace.policy",
                        "policy 'AsNamespace' is not one of rewrite, passthrough, asNamespace; "
                        "did you mean 'asNamespace'?"));
  EXPECT_TRUE(OnlyError(Parse("pullsWithoutNamespace:\n  policy: asNamespace\n"), 2, 11,
                        "pullsWithoutNamespace.namespace", "policy asNamespace needs a namespace"));
  EXPECT_TRUE(OnlyError(Parse("pullsWithoutNamespace:\n  namespace: default\n"), 2, 14,
                        "pullsWithoutNamespace.namespace",
                        "namespace is only used with policy: asNamespace"));
  EXPECT_TRUE(OnlyError(
      Parse("pullsWithoutNamespace:\n  policy: asNamespace\n  namespace: Kube_System\n"), 3, 14,
      "pullsWithoutNamespace.namespace", "'Kube_System' is not a valid namespace name"));
}

TEST(ConfigErrors, BadNodeSettings) {
  ConfigLoad load = Parse(R"(node:
  listen: unix://run/rp.sock
  upstream: tcp://127.0.0.1:10010
  containerdNamespace: "k8s..io"
  metricsAddress: "localhost"
  credentialsFile: creds.yaml
  keepMirrorNames: yes
)");
  EXPECT_TRUE(HasError(load, 2, 11, "node.listen", "must be an absolute socket path"));
  EXPECT_TRUE(HasError(load, 3, 13, "node.upstream", "is not a unix socket"));
  EXPECT_TRUE(HasError(load, 4, 24, "node.containerdNamespace",
                       "containerd namespace 'k8s..io' is invalid"));
  EXPECT_TRUE(HasError(load, 5, 19, "node.metricsAddress", "address 'localhost' has no port"));
  EXPECT_TRUE(HasError(load, 6, 20, "node.credentialsFile", "must be an absolute path"));
  EXPECT_TRUE(HasError(load, 7, 20, "node.keepMirrorNames", "YAML 1.2"));
  EXPECT_EQ(load.errors.size(), 6u) << load.ErrorText();

  for (const char* bad : {"\":0\"", "\"1.2.3.4:65536\"", "\"::1:80\"", "\"[::1]\"", "\"host:port\"",
                          "\"a b:80\"", "\"0.0.0.0:+80\""}) {
    EXPECT_TRUE(HasError(Parse(std::string("node:\n  metricsAddress: ") + bad + "\n"), 2, 19,
                         "node.metricsAddress", "address"))
        << bad;
  }
  for (const char* good : {"\"\"", "0.0.0.0:9464", "\"[::]:1\"", "my-host.local:65535"}) {
    ConfigLoad ok = Parse(std::string("node:\n  metricsAddress: ") + good + "\n");
    EXPECT_TRUE(ok.ok()) << good << ": " << ok.ErrorText();
  }
  const std::string long_path = "/" + std::string(107, 'x');
  EXPECT_TRUE(OnlyError(Parse("node: {listen: \"" + long_path + "\"}\n"), 1, 16, "node.listen",
                        "is longer than 107 bytes"));
  EXPECT_TRUE(OnlyError(Parse("node: {containerdNamespace: \"\"}\n"), 1, 29,
                        "node.containerdNamespace", "is invalid"));
}

TEST(ConfigNode, FailoverSettingsDefaultsAndDurations) {
  ConfigLoad def = Parse("enabled: true\n");
  ASSERT_TRUE(def.ok()) << def.ErrorText();
  const NodeSettings& d = def.config->node;
  EXPECT_TRUE(d.mirror_probe);
  EXPECT_EQ(d.mirror_probe_timeout, std::chrono::milliseconds(2000));
  EXPECT_EQ(d.mirror_cooldown, std::chrono::milliseconds(30000));
  EXPECT_EQ(d.mirror_hedge_delay, std::chrono::milliseconds(400));
  EXPECT_EQ(d.containerd_hosts_dir, "/etc/containerd/certs.d");
  EXPECT_EQ(d.pull_attempt_timeout, std::chrono::milliseconds(0));
  EXPECT_EQ(d.pull_timeout, std::chrono::milliseconds(0));

  ConfigLoad load = Parse(R"(node:
  mirrorProbe: false
  mirrorProbeTimeout: 500ms
  mirrorCooldown: 1m30s
  mirrorHedgeDelay: 250ms
  containerdHostsDir: /run/containerd/certs.d
  pullAttemptTimeout: 5m
  pullTimeout: "1h"
)");
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  const NodeSettings& n = load.config->node;
  EXPECT_FALSE(n.mirror_probe);
  EXPECT_EQ(n.mirror_probe_timeout, std::chrono::milliseconds(500));
  EXPECT_EQ(n.mirror_cooldown, std::chrono::milliseconds(90000));
  EXPECT_EQ(n.mirror_hedge_delay, std::chrono::milliseconds(250));
  EXPECT_EQ(n.containerd_hosts_dir, "/run/containerd/certs.d");
  EXPECT_EQ(n.pull_attempt_timeout, std::chrono::minutes(5));
  EXPECT_EQ(n.pull_timeout, std::chrono::hours(1));
  ConfigLoad zero = Parse(
      "node:\n  mirrorCooldown: 0\n  pullTimeout: \"0\"\n  containerdHostsDir: \"\"\n"
      "  mirrorHedgeDelay: 0\n");
  ASSERT_TRUE(zero.ok()) << zero.ErrorText();
  EXPECT_EQ(zero.config->node.mirror_cooldown, std::chrono::milliseconds(0));
  EXPECT_EQ(zero.config->node.mirror_hedge_delay, std::chrono::milliseconds(0));
  EXPECT_EQ(zero.config->node.containerd_hosts_dir, "");
}

TEST(ConfigErrors, BadFailoverSettings) {
  ConfigLoad load = Parse(R"(node:
  mirrorProbe: "yes"
  mirrorProbeTimeout: 0
  mirrorCooldown: 30
  pullAttemptTimeout: 5 min
  pullTimeout: 25h
  containerdHostsDir: certs.d
)");
  EXPECT_TRUE(HasError(load, 2, 16, "node.mirrorProbe", "without quotes"));
  EXPECT_TRUE(HasError(load, 3, 23, "node.mirrorProbeTimeout", "turn probing off with"));
  EXPECT_TRUE(HasError(load, 4, 19, "node.mirrorCooldown", "duration '30' has no unit"));
  EXPECT_TRUE(HasError(load, 5, 23, "node.pullAttemptTimeout", "unknown unit"));
  EXPECT_TRUE(HasError(load, 6, 16, "node.pullTimeout", "too long (at most 24h)"));
  EXPECT_TRUE(HasError(load, 7, 23, "node.containerdHostsDir", "must be an absolute path"));
  EXPECT_EQ(load.errors.size(), 6u) << load.ErrorText();
  for (const char* bad : {"\"\"", "s", "-1s", "1.5s", "2S", "10us", "1s2", "99999999999h"}) {
    EXPECT_TRUE(HasError(Parse(std::string("node:\n  pullTimeout: ") + bad + "\n"), 2, 16,
                         "node.pullTimeout", "duration"))
        << bad;
  }
  EXPECT_TRUE(HasError(Parse("node:\n  mirrorHedgeDelay: 400\n"), 2, 21, "node.mirrorHedgeDelay",
                       "duration '400' has no unit"));
  EXPECT_TRUE(HasError(Parse("node: {mirrorProbeTimout: 1s}\n"), 1, 8, "node.mirrorProbeTimout",
                       "did you mean 'mirrorProbeTimeout'"));
}

TEST(ConfigErrors, ListenEqualsUpstream) {
  EXPECT_TRUE(OnlyError(Parse("node:\n  listen: /run/x.sock\n  upstream: unix:///run/x.sock\n"), 2,
                        11, "node.listen", "listen and upstream are the same socket"));
  EXPECT_TRUE(OnlyError(Parse("node:\n  upstream: /run/registry-proxy/registry-proxy.sock\n"), 2,
                        13, "node.upstream", "the daemon would forward to itself"));
}

// ---------------------------------------------------------------------------------------------
// Errors: the document

TEST(ConfigErrors, YamlSyntax) {
  EXPECT_TRUE(OnlyError(Parse("proxies:\n  docker.io: [a.example.com\nenabled: true\n"), 3, 8, "",
                        "invalid YAML: "));
  EXPECT_TRUE(
      OnlyError(Parse("enabled: true\n  proxies: {}\n"), 2, 10, "", "invalid YAML: illegal map"));
  EXPECT_TRUE(OnlyError(Parse("proxies:\n\t docker.io: x.example\n"), 2, 12, "", "invalid YAML"));
  EXPECT_TRUE(OnlyError(Parse("proxies: *nothing\n"), 1, 10, "", "invalid YAML"));
  // yaml-cpp returns empty documents forever here; the loader notices it is stuck.
  EXPECT_TRUE(OnlyError(Parse(",\nenabled: true\n"), 1, 1, "", "invalid YAML"));
}

TEST(ConfigErrors, MoreThanOneDocument) {
  EXPECT_TRUE(OnlyError(Parse("enabled: true\n---\nenabled: false\n"), 2, 1, "",
                        "more than one YAML document"));
  EXPECT_TRUE(OnlyError(Parse("---\nenabled: true\n---\n---\n# end\n---\n[]\n"), 6, 1, "",
                        "more than one YAML document"));
  // Document markers around one document, and empty documents after it, are fine.
  EXPECT_TRUE(Parse("---\nenabled: true\n...\n").ok());
  EXPECT_TRUE(Parse("enabled: true\n---\n").ok());
}

TEST(ConfigErrors, HugeFile) {
  std::string yaml = "excludeNamespaces:\n";
  while (yaml.size() <= (1u << 20)) yaml += "  - some-namespace\n";
  ConfigLoad load = Parse(yaml);
  ASSERT_EQ(load.errors.size(), 1u) << load.ErrorText();
  EXPECT_THAT(load.errors[0].message, HasSubstr("bytes; the limit is 1048576 bytes (1 MiB)"));
  EXPECT_EQ(load.errors[0].line, 0);
  // Just under the limit is fine (and quick).
  yaml.resize(yaml.rfind("  - ", (1u << 20) - 1));
  EXPECT_TRUE(Parse(yaml).ok());
}

TEST(ConfigErrors, DeepNesting) {
  // Block nesting: key n sits at line n+1, column n+1; the 64th map is the limit.
  std::string yaml = "a:\n";
  for (int i = 1; i < 200; ++i) yaml += std::string(i, ' ') + "b:\n";
  EXPECT_TRUE(OnlyError(Parse(yaml), 65, 65, "", "nesting is deeper than 64 levels"));
  // Flow nesting stops long before yaml-cpp's own recursion does.
  ConfigLoad flow = Parse("a: " + std::string(100000, '[') + "\n");
  ASSERT_EQ(flow.errors.size(), 1u) << flow.ErrorText();
  EXPECT_EQ(flow.errors[0].line, 1);
  EXPECT_THAT(flow.errors[0].message, HasSubstr("nesting is deeper than 64 levels"));
  // 63 levels below the top-level map are fine as far as nesting goes.
  ConfigLoad ok = Parse("a: " + std::string(63, '[') + std::string(63, ']') + "\n");
  EXPECT_TRUE(OnlyError(ok, 1, 1, "a", "unknown key 'a'"));
}

TEST(ConfigErrors, AliasBombAndRecursiveAlias) {
  std::string bomb = "x0: &a0 [m, m, m, m, m, m, m, m, m, m]\n";
  for (int i = 1; i < 9; ++i) {
    bomb += "x" + std::to_string(i) + ": &a" + std::to_string(i) + " [";
    for (int j = 0; j < 10; ++j) bomb += (j ? ", *a" : "*a") + std::to_string(i - 1);
    bomb += "]\n";
  }
  EXPECT_TRUE(OnlyError(Parse(bomb), 1, 1, "", "aliases expand the config"));
  EXPECT_TRUE(OnlyError(Parse("rules: &r [*r]\n"), 1, 12, "", "recursive alias"));
}

TEST(ConfigErrors, Encoding) {
  EXPECT_TRUE(
      OnlyError(Parse("enabled: true\nproxies: {a: \"\xff\"}\n"), 2, 15, "", "not valid UTF-8"));
  EXPECT_TRUE(OnlyError(Parse(std::string_view("enabled: true\n\0", 15)), 2, 1, "",
                        "control character U+0000 is not allowed"));
  EXPECT_TRUE(OnlyError(Parse("\xff\xfe"
                              "e\0n\0"),
                        1, 1, "", "UTF-16"));
  // UTF-8 text, with or without a byte order mark, is fine.
  EXPECT_TRUE(Parse("\xef\xbb\xbf# caf\xc3\xa9\nenabled: true\n").ok());
}

TEST(ConfigErrors, ManyErrorsAtOnce) {
  ConfigLoad load = LoadConfigFile(kDataDir + "bad_many.yaml");
  ASSERT_FALSE(load.ok());
  EXPECT_EQ(load.config, nullptr);
  const std::string f = kDataDir + "bad_many.yaml";
  EXPECT_THAT(
      load.ErrorText(),
      ::testing::Eq(
          f +
          ":1:10: enabled: must be true or false, got the string 'yes'; write true or "
          "false without quotes\n" +
          f +
          ":3:14: proxies.docker.io: mirror 'https://mirror.example.com' must not "
          "have a scheme ('https://'): schemes are not allowed; write the host only, "
          "e.g. 'mirror.example.com' (HTTP or HTTPS is containerd's registry config, "
          "hosts.toml)\n" +
          f + ":4:3: proxies.Quay.io: registry 'Quay.io' must be lowercase\n" + f +
          ":6:12: rules[0].match: match 'bitnami' must start with a registry host (a "
          "name with a '.' or ':port', or 'localhost'), e.g. 'docker.io/bitnami'\n" +
          f + ":7:15: rules[0].mirrors[0]: mirror host 'Harbor.corp' must be lowercase\n" + f +
          ":8:5: rules[0].fallbak: unknown key 'fallbak'; did you mean 'fallback'?\n" + f +
          ":9:21: excludeNamespaces[0]: bad namespace pattern 'kube_system': use "
          "lowercase letters, digits, '-', and the wildcards '*' (any run of "
          "characters) and '?' (one character)\n"));
}

TEST(ConfigErrors, OneLinePerErrorWhateverTheInput) {
  ConfigLoad load = Parse("excludeNamespaces: [\"a\\nb\"]\n\"x\\ny\": 1\n");
  ASSERT_EQ(load.errors.size(), 2u) << load.ErrorText();
  EXPECT_THAT(load.errors[0].message, HasSubstr("'a\\nb'"));
  EXPECT_EQ(load.errors[1].field, "x\\ny");
  const std::string text = load.ErrorText();
  EXPECT_EQ(std::count(text.begin(), text.end(), '\n'), 2);
  // Long values are cut on a character boundary: messages stay UTF-8.
  const std::string long_key(79, 'k');
  load = Parse(long_key + "\xc3\xa9: 1\n");
  ASSERT_EQ(load.errors.size(), 1u);
  EXPECT_EQ(load.errors[0].field, long_key + "...");
}

TEST(ConfigErrors, ErrorCountIsCapped) {
  std::string yaml = "excludeNamespaces:\n";
  for (int i = 0; i < 300; ++i) yaml += "  - BAD\n";
  ConfigLoad load = Parse(yaml);
  ASSERT_EQ(load.errors.size(), 101u);
  EXPECT_EQ(load.errors.back().message, "... and 200 more errors");
}

TEST(ConfigErrors, GarbageNeverThrows) {
  // The fuzz target does this at scale; here a deterministic sample runs with every build.
  std::mt19937 rng(42);
  const std::string alphabet = "ab: -[]{},&*!|>'\"#\n\t?%@`~.1\\";
  for (int i = 0; i < 2000; ++i) {
    std::string s(rng() % 64, ' ');
    for (char& c : s) c = alphabet[rng() % alphabet.size()];
    ConfigLoad load = Parse(s);
    EXPECT_NE(load.ok(), !load.errors.empty()) << s;
    if (load.ok()) {
      EXPECT_NE(load.config->policy, nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Error text

TEST(ConfigError, ToString) {
  EXPECT_EQ((ConfigError{"c.yaml", 14, 7, "rules[2].mirrors[0].host", "bad"}).ToString(),
            "c.yaml:14:7: rules[2].mirrors[0].host: bad");
  EXPECT_EQ((ConfigError{"c.yaml", 14, 0, "enabled", "bad"}).ToString(), "c.yaml:14: enabled: bad");
  EXPECT_EQ((ConfigError{"c.yaml", 0, 0, "", "bad"}).ToString(), "c.yaml: bad");
  EXPECT_EQ((ConfigError{"", 3, 1, "", "bad"}).ToString(), "3:1: bad");
  EXPECT_EQ((ConfigError{"", 0, 0, "node", "bad"}).ToString(), "node: bad");
}

TEST(ConfigError, ErrorTextHasOneLinePerError) {
  ConfigLoad load = Parse("enabled: 1\nfoo: 2\n");
  ASSERT_EQ(load.errors.size(), 2u);
  EXPECT_EQ(load.ErrorText(), load.errors[0].ToString() + "\n" + load.errors[1].ToString() + "\n");
}

// ---------------------------------------------------------------------------------------------
// Files

TEST(LoadConfigFile, MissingFile) {
  TempDir dir;
  const std::string path = dir.path() + "/nope.yaml";
  ConfigLoad load = LoadConfigFile(path);
  ASSERT_EQ(load.errors.size(), 1u);
  EXPECT_EQ(load.errors[0].file, path);
  EXPECT_THAT(load.errors[0].message, HasSubstr("cannot open config file"));
  EXPECT_THAT(load.errors[0].message, HasSubstr("No such file or directory"));
}

TEST(LoadConfigFile, ThroughConfigMapSymlinks) {
  // A ConfigMap volume: config.yaml -> ..data/config.yaml, ..data -> ..2024_01_01/.
  TempDir dir;
  fs::create_directory(dir.path() + "/..2024_01_01");
  dir.Write("..2024_01_01/config.yaml", "proxies:\n  quay.io: quay.example.com\n");
  fs::create_directory_symlink("..2024_01_01", dir.path() + "/..data");
  fs::create_symlink("..data/config.yaml", dir.path() + "/config.yaml");
  const std::string path = dir.path() + "/config.yaml";
  ConfigLoad load = LoadConfigFile(path);
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_EQ(load.config->source, path);
  EXPECT_THAT(Matches(*load.config->policy), ElementsAre("quay.io"));
  EXPECT_EQ(load.config->policy->rules()[0].origin, "proxies.quay.io (" + path + ":2)");

  // Errors name the path as given, not the symlink's target.
  dir.Write("..2024_01_01/config.yaml", "enabled: maybe\n");
  ConfigLoad bad = LoadConfigFile(path);
  EXPECT_TRUE(OnlyError(bad, 1, 10, "enabled", "must be true or false"));
  EXPECT_EQ(bad.errors[0].file, path);

  // A dangling symlink is a missing file.
  fs::remove(dir.path() + "/..data");
  EXPECT_THAT(LoadConfigFile(path).ErrorText(), HasSubstr("No such file or directory"));
}

TEST(LoadConfigFile, NotARegularFile) {
  TempDir dir;
  EXPECT_THAT(LoadConfigFile(dir.path()).ErrorText(), HasSubstr("is a directory"));
  const std::string fifo = dir.path() + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_THAT(LoadConfigFile(fifo).ErrorText(), HasSubstr("not a regular file"));  // no hang
}

TEST(LoadConfigFile, TooBig) {
  TempDir dir;
  const std::string path = dir.Write("big.yaml", "");
  fs::resize_file(path, 5u << 20);
  ConfigLoad load = LoadConfigFile(path);
  ASSERT_EQ(load.errors.size(), 1u);
  EXPECT_EQ(load.errors[0].message, "config is 5242880 bytes; the limit is 1048576 bytes (1 MiB)");
}

TEST(LoadConfigFile, SameBytesSameHash) {
  TempDir dir;
  const std::string a = dir.Write("a.yaml", BuiltinConfigYaml());
  ConfigLoad load = LoadConfigFile(a);
  ASSERT_TRUE(load.ok()) << load.ErrorText();
  EXPECT_EQ(load.config->content_sha256, BuiltinConfig()->content_sha256);
  EXPECT_EQ(load.config->content_sha256.size(), 64u);
}

}  // namespace
}  // namespace registry_proxy
