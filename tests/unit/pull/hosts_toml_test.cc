// The hosts.toml reader and what the probe targets, against containerd's rules (hosts_toml.h).
#include "pull/hosts_toml.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using testing::HasSubstr;

std::vector<std::string> Urls(const HostsToml& h) {
  std::vector<std::string> out;
  for (const HostsTomlHost& e : h.hosts) out.push_back(e.url);
  return out;
}

TEST(HostsTomlTest, ReadsServerAndHostTablesInFileOrder) {
  auto h = ParseHostsToml(R"(# mirrors for docker.io
server = "https://registry-1.docker.io"   # the origin

[host."https://z-mirror.example/v2/proxy"]
  capabilities = ["pull",
                  "Resolve"]   # spans lines; any case
  skip_verify = true
  ca = '/etc/certs/ca.pem'
  [host."https://z-mirror.example/v2/proxy".header]
    x-custom = ["a", "b"]

[host.'http://a-mirror.example:5000']
  capabilities = ["push"]
  ca = ["a.pem", "b.pem"]
  override_path = false
  dial_timeout = "1s"
)");
  ASSERT_TRUE(h.ok()) << h.error();
  EXPECT_EQ(h->server, "https://registry-1.docker.io");
  // File order, not key order.
  EXPECT_THAT(Urls(*h), testing::ElementsAre("https://z-mirror.example/v2/proxy",
                                             "http://a-mirror.example:5000"));
  const HostsTomlHost& z = h->hosts[0];
  EXPECT_TRUE(z.pull && z.resolve && !z.push);
  EXPECT_EQ(z.skip_verify, std::optional<bool>(true));
  EXPECT_THAT(z.ca, testing::ElementsAre("/etc/certs/ca.pem"));
  const HostsTomlHost& a = h->hosts[1];
  EXPECT_TRUE(!a.pull && !a.resolve && a.push);
  EXPECT_EQ(a.skip_verify, std::nullopt);
  EXPECT_THAT(a.ca, testing::ElementsAre("a.pem", "b.pem"));
  // The top level: all capabilities when none are given.
  EXPECT_EQ(h->top.url, "https://registry-1.docker.io");
  EXPECT_TRUE(h->top.pull && h->top.resolve && h->top.push);
}

TEST(HostsTomlTest, EmptyFileHasNothing) {
  auto h = ParseHostsToml("\n# nothing\n");
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->server, "");
  EXPECT_TRUE(h->hosts.empty());
}

TEST(HostsTomlTest, WhatContainerdRejectsSaysWhereAndWhy) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"server = \"https://x\n", "line 1:"},
      {"server = https://x\n", "line 1:"},
      {"server = \"a\"\nserver = \"b\"\n", "line 2:"},
      {"\n\nthis is not toml\n", "line 3:"},
      {"[host.\"https://x\"\n", "line 1:"},
      {"server = 5\n", "line 1: server: expected a string"},
      {"[host.\"https://x\"]\ncapabilities = [\"pull\", \"fetch\"]\n",
       "line 2: unknown capability 'fetch' (in [host.'https://x'])"},
      {"[host.\"https://x\"]\ncapabilities = \"pull\"\n", "capabilities: expected strings"},
      {"[host.\"https://x\"]\nskip_verify = \"yes\"\n", "skip_verify: expected true or false"},
      {"[host.\"https://x\"]\nca = 1\n", "ca: expected a string or strings"},
      {"[host.\"https://x\"]\nca = [\"a\", 1]\n", "ca: expected strings"},
      {"host = \"https://x\"\n", "host: expected [host.\"URL\"] tables"},
      {"skip_verify = 1\n", "skip_verify: expected true or false"},
  };
  for (const Case& c : cases) {
    auto h = ParseHostsToml(c.text);
    ASSERT_FALSE(h.ok()) << c.text;
    EXPECT_THAT(h.error(), HasSubstr(c.want)) << c.text;
  }
  EXPECT_FALSE(ParseHostsToml(std::string(70000, '#')).ok());
}

// ---------------------------------------------------------------------------------------------
// What is probed

class ProbeTargetTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/rp-hosts-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  void Write(const std::string& host_dir, const std::string& text) {
    fs::create_directories(dir_ + "/" + host_dir);
    std::ofstream(dir_ + "/" + host_dir + "/hosts.toml") << text;
  }
  ProbeTarget Resolve(const std::string& host, std::string* problem = nullptr) {
    std::string p;
    ProbeTarget t = ResolveProbeTarget(host, dir_, &p);
    if (problem) *problem = p;
    return t;
  }
  std::string dir_;
};

TEST_F(ProbeTargetTest, WithoutHostsTomlContainerdsDefaults) {
  EXPECT_EQ(Resolve("mirror.example").Url(), "https://mirror.example/v2/");
  EXPECT_EQ(Resolve("mirror.example:8443").Url(), "https://mirror.example:8443/v2/");
  // containerd 1.6 talks plain HTTP to loopback and localhost hosts.
  EXPECT_EQ(Resolve("127.0.0.1:5000").Url(), "http://127.0.0.1:5000/v2/");
  EXPECT_EQ(Resolve("127.9.9.9:5000").Url(), "http://127.9.9.9:5000/v2/");
  EXPECT_EQ(Resolve("localhost:5000").Url(), "http://localhost:5000/v2/");
  EXPECT_EQ(Resolve("[::1]:5000").Url(), "http://[::1]:5000/v2/");
  EXPECT_EQ(Resolve("10.0.0.1:5000").Url(), "https://10.0.0.1:5000/v2/");
  EXPECT_EQ(Resolve("docker.io").Url(), "https://registry-1.docker.io/v2/");
  EXPECT_EQ(Resolve("mirror.example").source, "default");
  // No config dir at all: the same defaults.
  EXPECT_EQ(ResolveProbeTarget("127.0.0.1:5000", "", nullptr).Url(), "http://127.0.0.1:5000/v2/");
}

TEST_F(ProbeTargetTest, FirstHostWithPullCapabilityWins) {
  Write("mirror.example",
        "server = \"https://origin.example\"\n"
        "[host.\"https://resolve-only.example\"]\n  capabilities = [\"resolve\"]\n"
        "[host.\"http://cache.example:8080/prefix//\"]\n  capabilities = [\"pull\"]\n"
        "[host.\"https://second.example\"]\n");
  ProbeTarget t = Resolve("mirror.example");
  EXPECT_EQ(t.Url(), "http://cache.example:8080/prefix/v2/");
  EXPECT_THAT(t.source, HasSubstr("mirror.example/hosts.toml [host.\"http://cache.example"));
  // A URL without a scheme is https (containerd adds it); one ending in /v2 keeps it;
  // override_path keeps the path as written.
  Write("a.example", "[host.\"cache-a.example/v2\"]\n");
  EXPECT_EQ(Resolve("a.example").Url(), "https://cache-a.example/v2/");
  Write("b.example", "[host.\"https://cache-b.example/api/x/./\"]\noverride_path = true\n");
  EXPECT_EQ(Resolve("b.example").Url(), "https://cache-b.example/api/x/");
}

TEST_F(ProbeTargetTest, NoHostWithPullMeansTheServer) {
  Write("m.example",
        "server = \"https://origin.example:444\"\n"
        "[host.\"https://push-only.example\"]\n  capabilities = [\"push\"]\n");
  ProbeTarget t = Resolve("m.example");
  EXPECT_EQ(t.Url(), "https://origin.example:444/v2/");
  EXPECT_THAT(t.source, HasSubstr("hosts.toml server"));
  // No server either: containerd's default for the host.
  Write("n.example", "[host.\"https://push-only.example\"]\n  capabilities = [\"push\"]\n");
  EXPECT_EQ(Resolve("n.example").Url(), "https://n.example/v2/");
}

TEST_F(ProbeTargetTest, ServerOnlyFileProbesTheServerAsContainerd2Does) {
  std::string problem;
  Write("only-server.example", "server = \"https://elsewhere.example\"\n");
  EXPECT_EQ(Resolve("only-server.example", &problem).Url(), "https://elsewhere.example/v2/");
  EXPECT_EQ(problem, "");
}

TEST_F(ProbeTargetTest, PortDirectoryFirstThenPlainThenDefaultDirThenNextRoot) {
  Write("m.example_5000_", "[host.\"https://by-port.example\"]\n");
  Write("m.example:5000", "[host.\"https://by-colon.example\"]\n");
  EXPECT_EQ(Resolve("m.example:5000").host, "by-port.example");
  fs::remove_all(dir_ + "/m.example_5000_");
  EXPECT_EQ(Resolve("m.example:5000").host, "by-colon.example");
  Write("_default", "[host.\"https://fallback.example\"]\n");
  EXPECT_EQ(Resolve("other.example").host, "fallback.example");
  // A host directory without hosts.toml (certificates only), or with an empty one, is
  // containerd's choice too: the default host, not _default.
  fs::create_directories(dir_ + "/certs-only.example");
  EXPECT_EQ(Resolve("certs-only.example").Url(), "https://certs-only.example/v2/");
  Write("empty.example", "");
  EXPECT_EQ(Resolve("empty.example").Url(), "https://empty.example/v2/");
  // config_path with several roots: the first root with a directory for the host.
  const std::string second = dir_ + "/second-root";
  fs::create_directories(second + "/x.example");
  std::ofstream(second + "/x.example/hosts.toml") << "[host.\"https://x-mirror.example\"]\n";
  EXPECT_EQ(ResolveProbeTarget("x.example", dir_ + "/missing:" + second, nullptr).host,
            "x-mirror.example");
}

TEST_F(ProbeTargetTest, UnreadableFileProbesTheDefaultAndSaysWhy) {
  std::string problem;
  Write("broken.example", "[host.\"https://x\"\n");
  EXPECT_EQ(Resolve("broken.example", &problem).Url(), "https://broken.example/v2/");
  EXPECT_THAT(problem, HasSubstr("broken.example/hosts.toml: line 1:"));
  EXPECT_THAT(problem, HasSubstr("probing the default"));
  Write("caps.example", "[host.\"https://x\"]\ncapabilities = [\"pul\"]\n");
  EXPECT_EQ(Resolve("caps.example", &problem).Url(), "https://caps.example/v2/");
  EXPECT_THAT(problem, HasSubstr("unknown capability 'pul'"));
  Write("ftp.example", "[host.\"ftp://x\"]\n");
  EXPECT_EQ(Resolve("ftp.example", &problem).Url(), "https://ftp.example/v2/");
  EXPECT_THAT(problem, HasSubstr("scheme must be http or https"));
  Resolve("127.0.0.1:1", &problem);
  EXPECT_EQ(problem, "");
}

}  // namespace
}  // namespace registry_proxy
