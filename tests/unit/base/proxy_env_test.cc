// ProxyFor against the rules of Go's httpproxy (what containerd follows), one test per rule.
#include "base/proxy_env.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <string>

namespace registry_proxy {
namespace {

using testing::HasSubstr;

const char kP[] = "http://proxy.corp:3128";

// The proxy an https:// request to `host` takes with HTTPS_PROXY=kP and NO_PROXY=no_proxy.
std::string Https(const std::string& no_proxy, const std::string& host) {
  return ProxyFor(ProxyEnv{"", kP, no_proxy}, "https", host);
}
std::string Http(const std::string& no_proxy, const std::string& host) {
  return ProxyFor(ProxyEnv{kP, "", no_proxy}, "http", host);
}

TEST(ProxyEnvTest, SchemePicksTheVariableNoneSetIsDirect) {
  const ProxyEnv env{"http://h:1", "http://s:2", ""};
  EXPECT_EQ(ProxyFor(env, "https", "m.example"), "http://s:2");
  EXPECT_EQ(ProxyFor(env, "http", "m.example"), "http://h:1");
  EXPECT_EQ(ProxyFor(ProxyEnv{"http://h:1", "", ""}, "https", "m.example"), "");
  EXPECT_EQ(ProxyFor(ProxyEnv{"", "http://s:2", ""}, "http", "m.example"), "");
  EXPECT_EQ(ProxyFor(ProxyEnv{}, "https", "m.example"), "");
}

TEST(ProxyEnvTest, ValueWithoutAKnownSchemeGetsHttp) {
  auto via = [](const std::string& value) {
    return ProxyFor(ProxyEnv{"", value, ""}, "https", "m.example");
  };
  EXPECT_EQ(via("proxy.corp:3128"), "http://proxy.corp:3128");
  EXPECT_EQ(via("10.0.0.1:3128"), "http://10.0.0.1:3128");
  EXPECT_EQ(via("HTTPS://proxy.corp"), "https://proxy.corp");
  EXPECT_EQ(via("http://user:pw@proxy.corp:3128"), "http://user:pw@proxy.corp:3128");
  // Go's SOCKS5 dialer hands the name to the proxy: libcurl's socks5h.
  EXPECT_EQ(via("socks5://proxy.corp:1080"), "socks5h://proxy.corp:1080");
  EXPECT_EQ(via("ftp://proxy.corp"), "http://ftp://proxy.corp");  // as Go: bogus stays bogus
}

TEST(ProxyEnvTest, LocalhostAndLoopbackLiteralsAreNeverProxied) {
  EXPECT_EQ(Https("", "localhost:5000"), "");
  EXPECT_EQ(Https("", "localhost"), "");
  EXPECT_EQ(Https("", "127.0.0.1:5000"), "");
  EXPECT_EQ(Https("", "127.9.9.9"), "");
  EXPECT_EQ(Https("", "[::1]:5000"), "");
  EXPECT_EQ(Https("", "[::ffff:127.0.0.1]:5000"), "");
  // A name is only a name, even one that resolves to loopback; and the check is before
  // lower-casing, as in Go.
  EXPECT_EQ(Https("", "localhost.localdomain"), kP);
  EXPECT_EQ(Https("", "LOCALHOST"), kP);
  EXPECT_EQ(Https("", "128.0.0.1"), kP);
}

TEST(ProxyEnvTest, StarDisablesTheProxy) {
  EXPECT_EQ(Https("*", "m.example"), "");
  EXPECT_EQ(Https("a.example, *", "10.1.2.3:5000"), "");
  EXPECT_EQ(Https("*.example", "m.other"), kP);  // "*" only alone
}

TEST(ProxyEnvTest, DomainMatchesItselfAndSubdomains) {
  EXPECT_EQ(Https("example.com", "example.com"), "");
  EXPECT_EQ(Https("example.com", "m.example.com:5000"), "");
  EXPECT_EQ(Https("example.com", "a.b.example.com"), "");
  EXPECT_EQ(Https("example.com", "badexample.com"), kP);
  EXPECT_EQ(Https("example.com", "example.com.evil"), kP);
}

TEST(ProxyEnvTest, LeadingDotOrStarDotMatchesSubdomainsOnly) {
  EXPECT_EQ(Https(".example.com", "m.example.com"), "");
  EXPECT_EQ(Https(".example.com", "example.com"), kP);
  EXPECT_EQ(Https("*.example.com", "m.example.com"), "");
  EXPECT_EQ(Https("*.example.com", "example.com"), kP);
}

TEST(ProxyEnvTest, EntriesAreTrimmedLowerCasedEmptyOnesIgnored) {
  EXPECT_EQ(Https(" , Example.COM ,", "M.example.com"), "");
  EXPECT_EQ(Https(",,", "m.example.com"), kP);
  EXPECT_EQ(Https(":5000", "m.example.com:5000"), kP);  // no host: ignored
}

TEST(ProxyEnvTest, DomainWithPortMatchesThatPortOnlyDefaultPortsCount) {
  EXPECT_EQ(Https("example.com:5000", "m.example.com:5000"), "");
  EXPECT_EQ(Https("example.com:5000", "m.example.com:5001"), kP);
  EXPECT_EQ(Https("example.com:443", "m.example.com"), "");
  EXPECT_EQ(Http("example.com:80", "m.example.com"), "");
  EXPECT_EQ(Https("example.com:80", "m.example.com"), kP);
}

TEST(ProxyEnvTest, IpEntriesMatchIpLiteralsOptionallyWithPort) {
  EXPECT_EQ(Https("10.1.2.3", "10.1.2.3:5000"), "");
  EXPECT_EQ(Https("10.1.2.3", "10.1.2.4:5000"), kP);
  EXPECT_EQ(Https("10.1.2.3:5000", "10.1.2.3:5000"), "");
  EXPECT_EQ(Https("10.1.2.3:5000", "10.1.2.3:5001"), kP);
  EXPECT_EQ(Https("fd00::1", "[fd00::1]:5000"), "");
  EXPECT_EQ(Https("[fd00::1]:5000", "[fd00::1]:5000"), "");
  EXPECT_EQ(Https("[fd00::1]:5000", "[fd00::1]:443"), kP);
  EXPECT_EQ(Https("10.1.2.3", "[::ffff:10.1.2.3]:5000"), "");  // the same address
  // An IP entry does not match a name that resolves to it: no lookups.
  EXPECT_EQ(Https("10.1.2.3", "m.example"), kP);
}

TEST(ProxyEnvTest, CidrMatchesIpLiteralsInside) {
  EXPECT_EQ(Https("10.0.0.0/8", "10.200.0.1:5000"), "");
  EXPECT_EQ(Https("10.0.0.0/8", "11.0.0.1:5000"), kP);
  EXPECT_EQ(Https("192.168.1.128/25", "192.168.1.200"), "");
  EXPECT_EQ(Https("192.168.1.128/25", "192.168.1.100"), kP);
  EXPECT_EQ(Https("fd00::/8", "[fd12::5]:5000"), "");
  EXPECT_EQ(Https("fd00::/8", "[fe80::1]:5000"), kP);
  EXPECT_EQ(Https("0.0.0.0/0", "8.8.8.8"), "");
  EXPECT_EQ(Https("10.0.0.0/8", "ten.example"), kP);  // names are not looked up
  EXPECT_EQ(Https("10.0.0.0/33", "10.0.0.1"), kP);    // not a CIDR, not a name that matches
}

TEST(ProxyEnvTest, FromEnvironmentUpperCaseFirstEmptyMeansUnset) {
  for (const char* n :
       {"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"}) {
    unsetenv(n);
  }
  setenv("http_proxy", "http://lower:1", 1);
  setenv("HTTPS_PROXY", "http://upper:2", 1);
  setenv("https_proxy", "http://lower:2", 1);
  setenv("NO_PROXY", "", 1);
  setenv("no_proxy", "example.com", 1);
  const ProxyEnv env = ProxyEnvFromEnvironment();
  EXPECT_EQ(env.http_proxy, "http://lower:1");
  EXPECT_EQ(env.https_proxy, "http://upper:2");
  EXPECT_EQ(env.no_proxy, "example.com");
}

// ---------------------------------------------------------------------------------------------
// containerd's unit -> our drop-in

TEST(UnitProxySettingsTest, ProxyVariablesOfServiceSectionsLaterWinsEmptyResets) {
  const UnitProxySettings s = ProxySettingsOfUnit({
      {"/lib/systemd/system/containerd.service",
       "[Unit]\nEnvironment=HTTP_PROXY=http://not-service:1\n"
       "[Service]\nEnvironment=\"HTTP_PROXY=http://old:1\" GOMAXPROCS=2\nExecStart=/x\n"},
      {"/etc/systemd/system/containerd.service.d/http-proxy.conf",
       "# proxies\n[Service]\n"
       "Environment=\"HTTP_PROXY=http://p.corp:3128\" 'HTTPS_PROXY=http://p.corp:3128'\n"
       "Environment=NO_PROXY=localhost,10.0.0.0/8,.svc no_proxy=\"a b\"\n"
       "EnvironmentFile=-/etc/default/containerd\n"},
      {"/etc/systemd/system/containerd.service.d/override.conf",
       "[Service]\nLimitNOFILE=1048576\n"},
  });
  EXPECT_THAT(s.vars, testing::ElementsAre(testing::Pair("HTTPS_PROXY", "http://p.corp:3128"),
                                           testing::Pair("HTTP_PROXY", "http://p.corp:3128"),
                                           testing::Pair("NO_PROXY", "localhost,10.0.0.0/8,.svc"),
                                           testing::Pair("no_proxy", "a b")));
  EXPECT_THAT(s.files, testing::ElementsAre("-/etc/default/containerd"));
  EXPECT_THAT(s.sources,
              testing::ElementsAre("/lib/systemd/system/containerd.service",
                                   "/etc/systemd/system/containerd.service.d/http-proxy.conf"));
  // An empty Environment= drops what came before (systemd's rule); so does EnvironmentFile=.
  const UnitProxySettings reset = ProxySettingsOfUnit({
      {"a.conf", "[Service]\nEnvironment=HTTPS_PROXY=http://p:1\nEnvironmentFile=/e\n"},
      {"b.conf", "[Service]\nEnvironment=\nEnvironmentFile=\n"},
  });
  EXPECT_TRUE(reset.vars.empty());
  EXPECT_TRUE(reset.files.empty());
}

TEST(UnitProxySettingsTest, DropInQuotesAndEscapesSpecifiersNothingMeansNoFile) {
  UnitProxySettings s;
  s.vars["HTTPS_PROXY"] = "http://user:p%40ss\"w@p.corp:3128";
  s.files = {"-/etc/default/containerd"};
  s.sources = {"/etc/systemd/system/containerd.service.d/http-proxy.conf"};
  const std::string d = ProxyDropIn(s);
  EXPECT_THAT(d, HasSubstr("\n[Service]\n"));
  EXPECT_THAT(d, HasSubstr("\nEnvironment=\"HTTPS_PROXY=http://user:p%%40ss\\\"w@p.corp:3128\"\n"));
  EXPECT_THAT(d, HasSubstr("\nEnvironmentFile=-/etc/default/containerd\n"));
  EXPECT_THAT(d, HasSubstr("#   /etc/systemd/system/containerd.service.d/http-proxy.conf\n"));
  // Read back as systemd would, the value is what containerd had (modulo %%).
  const UnitProxySettings back = ProxySettingsOfUnit({{"x", d}});
  EXPECT_EQ(back.vars.at("HTTPS_PROXY"), "http://user:p%%40ss\"w@p.corp:3128");
  EXPECT_EQ(ProxyDropIn(UnitProxySettings{}), "");
}

}  // namespace
}  // namespace registry_proxy
