// The daemon's mirror probe behind an HTTP proxy, end to end (issue 14 item 3): a real tinyproxy
// on loopback (its own config and log in the test's dir, stopped by PID), the real daemon with
// HTTP_PROXY / NO_PROXY in its environment, a real containerd and registry.
//
// The mirror is "0.0.0.0:PORT" (through containerd's hosts.toml): not a loopback literal, so Go
// (containerd) and the daemon send it through the proxy, while on Linux a connection to 0.0.0.0
// reaches this host, so the proxy and containerd both find the registry there.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <fstream>
#include <iterator>
#include <string>

#include "grpc_status.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

using registry_proxy::GrpcStatusText;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

size_t ProbesLogged(const Registry& r) {
  size_t n = 0;
  for (const auto& q : r.Requests()) {
    if (q.path == "/v2/" && q.user_agent.rfind("registry-proxy-probe", 0) == 0) ++n;
  }
  return n;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

class ProxyTest : public ShimTest {
 protected:
  void SetUp() override {
    ShimTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    auto port = PickFreePort();
    ASSERT_TRUE(port.ok()) << port.error();
    proxy_port_ = *port;
    std::ofstream(dir_ + "/tinyproxy.conf")
        << "Port " << proxy_port_ << "\nListen 127.0.0.1\nTimeout 30\nMaxClients 16\n"
        << "LogFile \"" << dir_ << "/tinyproxy.log\"\nLogLevel Info\n";
    Status s =
        proxy_.Spawn({"tinyproxy", "-d", "-c", dir_ + "/tinyproxy.conf"}, dir_ + "/tinyproxy.out");
    ASSERT_TRUE(s.ok()) << s.message() << " (scripts/deps.sh test installs tinyproxy)";
    ASSERT_TRUE(WaitFor([&] { return Connects(proxy_port_); }, 15s))
        << "tinyproxy did not listen: " << TailFile(dir_ + "/tinyproxy.out");
    mirror_ = "0.0.0.0:" + std::to_string(bed->mirror1->port());
    ASSERT_TRUE(bed->ctrd->MapHost("proxied.rp-test", mirror_).ok());
  }
  void TearDown() override {
    ShimTest::TearDown();
    proxy_.Stop();
    unsetenv("HTTP_PROXY");
    unsetenv("NO_PROXY");
  }
  static bool Connects(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = LoopbackAddress(port);
    const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    close(fd);
    return ok;
  }
  std::string ProxyUrl() const { return "127.0.0.1:" + std::to_string(proxy_port_); }
  std::string Config(bool fallback) const {
    return std::string("rules:\n  - match: docker.io\n    mirrors: [proxied.rp-test]\n") +
           (fallback ? "" : "    fallback: false\n") +
           "node:\n  metricsAddress: \"\"\n  containerdHostsDir: " + bed->ctrd->certs_dir() +
           "\n  mirrorProbeTimeout: 5s\n  mirrorCooldown: 60s\n";
  }
  std::string ProxyLog() const { return TailFile(dir_ + "/tinyproxy.log", 200); }

  Process proxy_;
  int proxy_port_ = 0;
  std::string mirror_;
};

TEST_F(ProxyTest, ProbeGoesThroughTheNodesProxyLikeContainerd) {
  const std::string repo = Repo({bed->mirror1});
  setenv("HTTP_PROXY", ProxyUrl().c_str(), 1);
  StartDaemon(Config(/*fallback=*/false));
  grpc::Status s = Pull(repo, "default");
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("probe http://" + mirror_ + "/v2/ alive in "));
  EXPECT_THAT(log, HasSubstr("(via proxy http://" + ProxyUrl() + ")"));
  EXPECT_EQ(ProbesLogged(*bed->mirror1), 1u);
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  // The proxy saw the probe (and only the probe: containerd has no proxy here).
  EXPECT_THAT(ProxyLog(), HasSubstr("GET http://" + mirror_ + "/v2/"));
  EXPECT_THAT(ProxyLog(), Not(HasSubstr("/manifests/")));
}

TEST_F(ProxyTest, AnUnreachableProxyMakesTheMirrorDeadNoProxyGoesDirect) {
  const std::string repo = Repo({bed->mirror1, bed->upstream});
  auto dead = PickFreePort();
  ASSERT_TRUE(dead.ok());
  setenv("HTTP_PROXY", ("127.0.0.1:" + std::to_string(*dead)).c_str(), 1);
  StartDaemon(Config(/*fallback=*/true));
  grpc::Status s = Pull(repo, "default");
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_THAT(DaemonLog(), HasSubstr("probe http://" + mirror_ + "/v2/ DEAD in "));
  EXPECT_THAT(DaemonLog(), HasSubstr("(via proxy http://127.0.0.1:" + std::to_string(*dead)));
  EXPECT_EQ(ProbesLogged(*bed->mirror1), 0u);
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
  StopDaemon();
  const size_t first_daemon = ReadAll(dir_ + "/daemon.log").size();
  // NO_PROXY naming the mirror's address: straight to it, alive.
  setenv("NO_PROXY", "localhost, 0.0.0.0", 1);
  StartDaemon(Config(/*fallback=*/true));
  s = Pull(repo, "default");
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  const std::string second = ReadAll(dir_ + "/daemon.log").substr(first_daemon);
  EXPECT_THAT(second, HasSubstr("probe http://" + mirror_ + "/v2/ alive in "));
  EXPECT_THAT(second, Not(HasSubstr("via proxy")));
  EXPECT_EQ(ProbesLogged(*bed->mirror1), 1u);
}

}  // namespace
}  // namespace rp_testbed
