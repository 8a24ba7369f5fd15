// Mirror hedging end to end (issue 14 item 5): the real daemon in front of a real containerd,
// default failover settings except where a test says. A pull probes the rule's mirrors at once
// and passes over a mirror whose probe has not answered within node.mirrorHedgeDelay (400 ms)
// while a later mirror is known alive; a mirror answering within the delay is still used; the
// passed-over mirror is not called dead until its own probe times out.
//
// No timing is asserted beyond "sooner than the probe timeout" (the behaviour: the pull did not
// wait for the black hole's probe); bench/failover_bench measures the failover times.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <regex>
#include <string>

#include "delay_proxy.h"
#include "grpc_cri_client.h"
#include "grpc_status.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

using registry_proxy::GrpcStatusText;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// GET /v2/ as a docker-registry logged it, but for the testbed's own skopeo: the daemon's
// probes (containerd does not ask for the API root when it pulls).
size_t ProbesLogged(const Registry& r) {
  size_t n = 0;
  for (const auto& q : r.Requests()) {
    if (q.method == "GET" && q.path == "/v2/" && q.user_agent.rfind("skopeo", 0) != 0) ++n;
  }
  return n;
}

// The body of GET http://127.0.0.1:port/metrics (HTTP/1.0: the server closes after one
// answer); "" when there is no answer. 5 s timeouts.
std::string Metrics(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return "";
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a = LoopbackAddress(port);
  std::string all;
  const std::string req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      send(fd, req.data(), req.size(), MSG_NOSIGNAL) == ssize_t(req.size())) {
    char buf[16384];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, 0)) > 0) all.append(buf, size_t(n));
  }
  close(fd);
  const size_t body = all.find("\r\n\r\n");
  return body == std::string::npos ? "" : all.substr(body + 4);
}

class HedgeTest : public ShimTest {
 protected:
  // The defaults but for the metrics port (daemons must not fight over it), the testbed's
  // hosts dir, a known cooldown, and the probe timeout.
  std::string Node(const std::string& probe_timeout = "2s", int metrics_port = 0) {
    const std::string metrics =
        metrics_port ? "127.0.0.1:" + std::to_string(metrics_port) : std::string("\"\"");
    return "node:\n  metricsAddress: " + metrics +
           "\n  containerdHostsDir: " + bed->ctrd->certs_dir() +
           "\n  mirrorProbeTimeout: " + probe_timeout + "\n  mirrorCooldown: 60s\n";
  }
  std::pair<grpc::Status, double> TimedPull(const std::string& image) {
    runtime::v1::PullImageRequest req;
    req.mutable_image()->set_image(image);
    req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
    runtime::v1::PullImageResponse resp;
    auto t0 = Clock::now();
    grpc::Status s = client_->PullImage(req, &resp, 60s);
    return {s, SecondsSince(t0)};
  }
};

TEST_F(HedgeTest, BlackHoledFirstMirrorIsPassedOverAndCalledDeadOnlyByItsOwnProbe) {
  auto hole = bed->tb->AddBlackHole();
  ASSERT_TRUE(hole.ok()) << hole.error();
  const std::string h = (*hole)->host();
  const std::string repo = Repo({bed->mirror1});
  auto port = PickFreePort();
  ASSERT_TRUE(port.ok());
  // A long probe timeout, so "passed over before it" and "dead after it" are far apart.
  StartDaemon(MirrorConfig({h, bed->mirror1->host()}, Node("5s", *port)));

  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_GE((*hole)->accepted(), 1u) << "the black hole was never probed";
  EXPECT_LT(secs, 4.0) << "the pull waited for the black hole's probe\n" << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("config.yaml:3): skipped: slow: probe http://" + h +
                             "/v2/ has not answered in "));
  EXPECT_THAT(log, HasSubstr("ms and mirror " + bed->mirror1->host() + " is alive"));
  // Slow, not dead: no verdict on it yet.
  EXPECT_THAT(log, Not(HasSubstr("probe http://" + h + "/v2/ DEAD")));
  EXPECT_THAT(log, Not(HasSubstr("mirror " + h + ": circuit breaker open")));

  // Its probe runs on to its timeout; that answer (and only that) opens its breaker.
  const std::string dead_line = "mirror " + h + ": probe http://" + h + "/v2/ DEAD in ";
  ASSERT_TRUE(WaitFor([&] { return DaemonLog().find(dead_line) != std::string::npos; }, 15s))
      << DaemonLog();
  const std::string after = DaemonLog();
  std::smatch m;
  ASSERT_TRUE(std::regex_search(after, m, std::regex("/v2/ DEAD in ([0-9]+)ms")));
  EXPECT_GE(std::stoi(m[1]), 4900) << "called dead before its probe timed out\n" << after;
  EXPECT_THAT(after, HasSubstr("mirror " + h + ": circuit breaker open for 60000ms"));
  // The metrics count that answer too, though no pull waited for it.
  const std::string metrics = Metrics(*port);
  const std::string label = "{mirror=\"" + h + "\"";
  EXPECT_THAT(metrics,
              HasSubstr("registry_proxy_mirror_skipped_total" + label + ",reason=\"slow\"} 1"));
  EXPECT_THAT(metrics,
              HasSubstr("registry_proxy_mirror_probes_total" + label + ",result=\"dead\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("registry_proxy_mirror_breaker_open" + label + "} 1"));
  EXPECT_THAT(metrics, HasSubstr("registry_proxy_mirror_probes_total{mirror=\"" +
                                 bed->mirror1->host() + "\",result=\"alive\"} 1"));

  // The next pull skips it without a probe or a connection.
  const size_t accepted = (*hole)->accepted();
  (void)bed->ctrd->cri().RemoveImage("docker.io/" + repo + ":latest");
  auto [s2, secs2] = TimedPull(repo);
  ASSERT_TRUE(s2.ok()) << GrpcStatusText(s2) << "\n" << DaemonLog();
  EXPECT_EQ((*hole)->accepted(), accepted);
  EXPECT_THAT(DaemonLog(), HasSubstr("skipped: circuit breaker open ("));
}

TEST_F(HedgeTest, MirrorAnsweringAfter300msIsUsedNotPassedOver) {
  // mirror2 behind a relay that holds every answer 300 ms; mirror1 (fast) has the image too.
  DelayProxy slow(bed->mirror2->host(), 300ms);
  ASSERT_TRUE(slow.Start().ok());
  const std::string repo = Repo({bed->mirror2, bed->mirror1});
  StartDaemon(MirrorConfig({slow.host(), bed->mirror1->host()}, Node()));

  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->mirror2->ManifestRequests(repo), 1u) << "the 300 ms mirror did not serve";
  EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u) << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("probe http://" + slow.host() + "/v2/ alive in "));
  EXPECT_THAT(log, Not(HasSubstr("skipped")));
  EXPECT_THAT(log, HasSubstr("attempt 1/3 " + slow.host() + "/" + repo));
  // mirror1 was probed ahead (at the same moment), once, and not pulled from.
  EXPECT_TRUE(WaitFor([&] { return ProbesLogged(*bed->mirror1) == 1; }, 5s)) << DaemonLog();
  std::cout << "[ hedge ] 300 ms mirror served the pull in " << secs << " s\n";
}

TEST_F(HedgeTest, RefusedFirstMirrorIsDeadAtOnceAndTheSecondServes) {
  const std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({Dead(), bed->mirror1->host()}, Node()));
  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("probe http://" + Dead() + "/v2/ DEAD in "));
  EXPECT_THAT(log, HasSubstr("skipped: probe http://" + Dead() + "/v2/ failed"));
  EXPECT_THAT(log, HasSubstr("mirror " + Dead() + ": circuit breaker open for 60000ms"));
}

}  // namespace
}  // namespace rp_testbed
