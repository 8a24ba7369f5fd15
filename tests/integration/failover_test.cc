// Mirror failover end to end (issue #6 "Fail over fast"): the real daemon in front of a real
// containerd, with mirrors that are broken in the ways mirrors break: a black hole (accepts TCP,
// never answers), HTTP 500, reset connections, a mirror that answers /v2/ but stalls manifests.
// Each test checks the fallback taken, the daemon's log lines, that the breaker opens and the
// next pull skips the bad mirror without probing it (daemon log and the servers' access logs),
// and that a caller who goes away stops everything.
//
// Time bounds are generous and only where the issue sets a goal (failing over within the probe
// timeout); containerd's own behaviour with a black hole is measured and printed next to ours.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "fault_server.h"
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
using Behavior = FaultServer::Behavior;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// What a FaultServer was asked, one request a line (for failure messages).
std::string Asked(const FaultServer& f) {
  std::string out;
  for (const auto& r : f.Requests()) out += r.method + " " + r.path + " (" + r.user_agent + ")\n";
  return out.empty() ? "(nothing)" : out;
}

size_t CountOf(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
  return n;
}

// GET /v2/ by the daemon's probe, as a docker-registry logged it.
size_t ProbesLogged(const Registry& r) {
  size_t n = 0;
  for (const auto& q : r.Requests()) {
    if (q.path == "/v2/" && q.user_agent.rfind("registry-proxy-probe", 0) == 0) ++n;
  }
  return n;
}

class FailoverTest : public ShimTest {
 protected:
  // Node settings for every test: no metrics endpoint (daemons must not fight over a port),
  // the testbed's containerd hosts dir (so the probe sees what containerd sees).
  std::string Node(const std::string& extra = "", const std::string& probe_timeout = "2s") {
    return "node:\n  metricsAddress: \"\"\n  containerdHostsDir: " + bed->ctrd->certs_dir() +
           "\n  mirrorProbeTimeout: " + probe_timeout + "\n  mirrorCooldown: 60s\n" + extra;
  }
  std::unique_ptr<FaultServer> Fault(Behavior root, Behavior other,
                                     std::chrono::milliseconds stall = 60s) {
    auto f = std::make_unique<FaultServer>(root, other, stall);
    EXPECT_TRUE(f->Start().ok());
    return f;
  }
  // A pull through the daemon with its own deadline; returns the status and the seconds taken.
  std::pair<grpc::Status, double> TimedPull(const std::string& image,
                                            std::chrono::milliseconds deadline = 60s) {
    runtime::v1::PullImageRequest req;
    req.mutable_image()->set_image(image);
    req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
    runtime::v1::PullImageResponse resp;
    auto t0 = Clock::now();
    grpc::Status s = client_->PullImage(req, &resp, deadline);
    return {s, SecondsSince(t0)};
  }
  void RemoveImage(const std::string& image) {
    // So that the next pull really goes to a registry (names only; the content may stay).
    (void)bed->ctrd->cri().RemoveImage(image);
  }
};

TEST_F(FailoverTest, BlackHoledFirstMirrorFailsOverWithinTheProbeTimeout) {
  auto hole = bed->tb->AddBlackHole();
  ASSERT_TRUE(hole.ok()) << hole.error();
  const std::string repo = Repo({bed->mirror1});
  // Hedging off: this is the probe timeout's bound (hedge_test has the hedged pass-over).
  StartDaemon(
      MirrorConfig({(*hole)->host(), bed->mirror1->host()}, Node("  mirrorHedgeDelay: 0s\n")));

  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_GE((*hole)->accepted(), 1u) << "the probe never reached the black hole";
  // The goal: the probe timeout (2 s) plus a margin, not the caller's deadline.
  EXPECT_LT(secs, 2.0 + 6.0) << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("mirror " + (*hole)->host() + ": probe http://" + (*hole)->host() +
                             "/v2/ DEAD in "));
  EXPECT_THAT(log, HasSubstr("no answer within "));
  EXPECT_THAT(log, HasSubstr("mirror " + (*hole)->host() + ": circuit breaker open for 60000ms"));
  EXPECT_THAT(
      log, HasSubstr("config.yaml:3): skipped: probe http://" + (*hole)->host() + "/v2/ failed"));

  // The next pull skips it at once: no probe, no connection.
  const size_t accepted = (*hole)->accepted();
  RemoveImage("docker.io/" + repo + ":latest");
  auto [s2, secs2] = TimedPull(repo);
  ASSERT_TRUE(s2.ok()) << GrpcStatusText(s2) << "\n" << DaemonLog();
  EXPECT_EQ((*hole)->accepted(), accepted);
  EXPECT_LT(secs2, 5.0);
  EXPECT_THAT(DaemonLog(), HasSubstr("skipped: circuit breaker open ("));
  EXPECT_EQ(CountOf(DaemonLog(), "/v2/ DEAD in "), 1u);

  // containerd alone, pulling from the black hole directly (a short client deadline as the cap;
  // kubelet sets none, so on a node it would wait as long as containerd lets it).
  constexpr auto kCap = 30s;
  runtime::v1::PullImageRequest direct;
  direct.mutable_image()->set_image((*hole)->host() + "/" + repo + ":latest");
  runtime::v1::PullImageResponse direct_resp;
  auto t0 = Clock::now();
  grpc::Status ds = bed->ctrd->cri().PullImage(direct, &direct_resp, kCap);
  const double alone = SecondsSince(t0);
  const bool capped = ds.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
  std::cout << "[ failover ] through the daemon: black-holed first mirror, served by the second in "
            << secs << " s (probe timeout 2 s); next pull " << secs2 << " s\n"
            << "[ failover ] containerd alone: " << (capped ? "hit the cap" : "gave up")
            << " after " << alone << " s (cap " << std::chrono::seconds(kCap).count()
            << " s): " << GrpcStatusText(ds) << "\n";
  EXPECT_FALSE(ds.ok());
  EXPECT_GT(alone, secs);
}

TEST_F(FailoverTest, MirrorAnswering500IsSkippedAndUpstreamServes) {
  auto bad = Fault(Behavior::k500, Behavior::k500);
  const std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({bad->host()}, Node()));
  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
  EXPECT_EQ(bad->ProbeRequests(), 1u);
  EXPECT_EQ(bad->PullRequests(), 0u);  // never handed to containerd
  EXPECT_THAT(DaemonLog(), HasSubstr("probe http://" + bad->host() + "/v2/ DEAD in "));
  EXPECT_THAT(DaemonLog(), HasSubstr(": HTTP 500"));
  EXPECT_THAT(DaemonLog(), HasSubstr("attempt 2/2 " + repo + " (upstream)"));

  RemoveImage("docker.io/" + repo + ":latest");
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_EQ(bad->Requests().size(), 1u) << "the open breaker still let a request through";
  EXPECT_THAT(DaemonLog(), HasSubstr("skipped: circuit breaker open ("));
}

TEST_F(FailoverTest, ManifestsAnswering500OpenTheBreakerFromTheAttempt) {
  // /v2/ is fine, so the probe passes; containerd's attempt then fails with the 500.
  auto bad = Fault(Behavior::kOk, Behavior::k500);
  const std::string repo = Repo({bed->mirror2});
  StartDaemon(MirrorConfig({bad->host(), bed->mirror2->host()}, Node()));
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_GE(bad->PullRequests(), 1u);
  EXPECT_GE(bed->mirror2->ManifestRequests(repo), 1u);
  EXPECT_EQ(ProbesLogged(*bed->mirror2), 1u);  // the good mirror was probed once, too
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("probe http://" + bad->host() + "/v2/ alive in "));
  EXPECT_THAT(log, HasSubstr("500 Internal Server Error"));
  EXPECT_THAT(log,
              HasSubstr("mirror " + bad->host() + ": circuit breaker open for 60000ms: UNKNOWN"));

  const size_t before = bad->Requests().size();
  RemoveImage("docker.io/" + repo + ":latest");
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_EQ(bad->Requests().size(), before);
  EXPECT_EQ(ProbesLogged(*bed->mirror2), 1u);  // alive a moment ago: reused, not probed again
}

TEST_F(FailoverTest, ResetConnectionsAreDeadAtProbeOrAttempt) {
  auto reset_all = Fault(Behavior::kReset, Behavior::kReset);
  auto reset_pulls = Fault(Behavior::kOk, Behavior::kReset);
  const std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({reset_all->host(), reset_pulls->host()}, Node()));
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
  EXPECT_EQ(reset_all->PullRequests(), 0u);
  EXPECT_GE(reset_pulls->PullRequests(), 1u);
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("probe http://" + reset_all->host() + "/v2/ DEAD in "));
  EXPECT_THAT(log, HasSubstr("connection reset by peer"));  // containerd's words, attempt 2
  EXPECT_THAT(log, HasSubstr("mirror " + reset_pulls->host() + ": circuit breaker open"));

  const size_t a = reset_all->Requests().size(), b = reset_pulls->Requests().size();
  RemoveImage("docker.io/" + repo + ":latest");
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_EQ(reset_all->Requests().size(), a);
  EXPECT_EQ(reset_pulls->Requests().size(), b);
  EXPECT_EQ(CountOf(DaemonLog(), "skipped: circuit breaker open ("), 2u);
}

TEST_F(FailoverTest, StalledManifestsHitTheAttemptTimeoutAndTheNextMirrorServes) {
  auto slow = Fault(Behavior::kOk, Behavior::kStall, 60s);
  const std::string repo = Repo({bed->mirror1});
  StartDaemon(
      MirrorConfig({slow->host(), bed->mirror1->host()}, Node("  pullAttemptTimeout: 3s\n")));
  auto [s, secs] = TimedPull(repo);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(slow->PullRequests(), 1u)
      << Asked(*slow) << DaemonLog() << TailFile(bed->ctrd->log_path(), 60);
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_GE(secs, 2.9);  // it did wait for the attempt deadline
  EXPECT_LT(secs, 3.0 + 10.0);
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("DEADLINE_EXCEEDED"));
  EXPECT_THAT(log, HasSubstr("(node.pullAttemptTimeout 3000ms hit)"));
  EXPECT_THAT(log, HasSubstr("mirror " + slow->host() + ": circuit breaker open for 60000ms"));

  const size_t before = slow->Requests().size();
  RemoveImage("docker.io/" + repo + ":latest");
  auto [s2, secs2] = TimedPull(repo);
  ASSERT_TRUE(s2.ok()) << DaemonLog();
  EXPECT_LT(secs2, 3.0);
  EXPECT_EQ(slow->Requests().size(), before);
}

TEST_F(FailoverTest, CallerCancellingMidProbeStopsThePull) {
  auto hole = bed->tb->AddBlackHole();
  ASSERT_TRUE(hole.ok()) << hole.error();
  const std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({(*hole)->host()}, Node("", "10s")));
  auto [s, secs] = TimedPull(repo, 1s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << GrpcStatusText(s);
  EXPECT_TRUE(WaitFor([&] { return (*hole)->accepted() >= 1; }, 5s)) << "no probe was made";
  // Long enough for a probe that kept going to time out and an attempt to start.
  std::this_thread::sleep_for(3s);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u) << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, Not(HasSubstr(" auth=no ")));  // no attempt was handed to containerd
  EXPECT_THAT(log, Not(HasSubstr("attempt 2/2")));
}

// The pull's deadline (here node.pullTimeout, so the answer is ours, not the client's own
// timer) passing while a mirror is probed: DEADLINE_EXCEEDED, as containerd answers a pull
// whose deadline passed (critest checks the code); it was UNAVAILABLE.
TEST_F(FailoverTest, DeadlinePassingWhileProbingIsDeadlineExceeded) {
  auto hole = bed->tb->AddBlackHole();
  ASSERT_TRUE(hole.ok()) << hole.error();
  const std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({(*hole)->host()}, Node("  pullTimeout: 1s\n", "20s")));
  auto [s, secs] = TimedPull(repo, 30s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << GrpcStatusText(s);
  EXPECT_THAT(s.error_message(), HasSubstr("the deadline passed while probing it"));
  EXPECT_LT(secs, 15.0);  // well before the probe's own 20 s
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u) << DaemonLog();
}

TEST_F(FailoverTest, CallerCancellingMidAttemptStopsThePullAndBlamesNoMirror) {
  auto slow = Fault(Behavior::kOk, Behavior::kStall, 60s);
  const std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({slow->host()}, Node()));
  auto [s, secs] = TimedPull(repo, 2s);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << GrpcStatusText(s);
  EXPECT_GE(slow->PullRequests(), 1u);
  std::this_thread::sleep_for(2s);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u) << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, Not(HasSubstr("attempt 2/2")));
  EXPECT_THAT(log, Not(HasSubstr("circuit breaker open")));  // the caller left; not its fault
}

// Attempt errors classified by meaning, in every containerd's words: a mirror that resets
// pulls is down (its breaker opens), one that lacks the image is not; the caller gets
// upstream's code, and its message whole after what happened at each mirror.
TEST_F(FailoverTest, AttemptErrorsAreClassifiedAndNamedPerCandidate) {
  auto reset_pulls = Fault(Behavior::kOk, Behavior::kReset);
  const std::string repo = "rp/nowhere-" + std::to_string(getpid());  // on no registry at all
  StartDaemon(MirrorConfig({reset_pulls->host(), bed->mirror1->host()}, Node()));
  auto [s, secs] = TimedPull(repo);
  ASSERT_FALSE(s.ok());
  // What containerd says about upstream on its own, for the same reference.
  runtime::v1::PullImageRequest direct_req;
  direct_req.mutable_image()->set_image("docker.io/" + repo + ":latest");
  runtime::v1::PullImageResponse direct_resp;
  const grpc::Status direct = bed->ctrd->cri().PullImage(direct_req, &direct_resp, 60s);
  ASSERT_FALSE(direct.ok());
  EXPECT_EQ(s.error_code(), direct.error_code()) << GrpcStatusText(s);
  EXPECT_EQ(s.error_message(), "mirror " + reset_pulls->host() + ": down (connection reset); " +
                                   "mirror " + bed->mirror1->host() + ": not found; " +
                                   "upstream docker.io: " + direct.error_message())
      << DaemonLog();
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("mirror " + reset_pulls->host() + ": circuit breaker open"));
  EXPECT_THAT(log, Not(HasSubstr("mirror " + bed->mirror1->host() + ": circuit breaker open")));
  // containerd's words per version, for the record (attempt_error_test.cc quotes them).
  std::stringstream lines(log);
  for (std::string line; std::getline(lines, line);) {
    if (line.find(" auth=no ") != std::string::npos) std::cout << "[ classify ] " << line << "\n";
  }
  std::cout << "[ classify ] containerd " << ContainerdUnderTest().version << ": "
            << GrpcStatusText(s) << "\n";
}

// containerd itself failing (here: not running) stops the walk: no other candidate is tried,
// no mirror is blamed, and containerd's error comes back as it came.
TEST_F(FailoverTest, ContainerdDownStopsTheWalkAndBlamesNoMirror) {
  const std::string repo = Repo({bed->mirror1, bed->mirror2});
  StartDaemon(MirrorConfig({bed->mirror1->host(), bed->mirror2->host()}, Node()));
  bed->ctrd->Stop();
  auto [s, secs] = TimedPull(repo, 20s);
  ASSERT_TRUE(bed->ctrd->Start().ok());  // the testbed is shared: containerd back first
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << GrpcStatusText(s);
  EXPECT_THAT(s.error_message(), Not(HasSubstr("mirror ")));  // one step: unchanged
  const std::string log = DaemonLog();
  EXPECT_THAT(log, HasSubstr("containerd itself failed (containerd unavailable)"));
  EXPECT_THAT(log, Not(HasSubstr("attempt 2/3")));
  EXPECT_THAT(log, Not(HasSubstr("circuit breaker open")));
  EXPECT_EQ(bed->mirror2->ManifestRequests(repo), 0u);
  // And once the daemon's channel has reconnected (gRPC's back-off), the next pull is served by
  // the first mirror: it was not blamed.
  grpc::Status s2;
  EXPECT_TRUE(WaitFor([&] { return (s2 = TimedPull(repo, 5s).first).ok(); }, 20s, 200ms))
      << GrpcStatusText(s2) << "\n"
      << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->mirror2->ManifestRequests(repo), 0u);
}

TEST_F(FailoverTest, ProbeGoesWhereContainerdsHostsTomlPoints) {
  // "mirror.rp-test" does not resolve; containerd reaches it through certs.d/<host>/hosts.toml
  // (pointing at mirror1), and so must the probe, or it would call the mirror dead.
  ASSERT_TRUE(bed->ctrd->MapHost("mirror.rp-test", bed->mirror1->host()).ok());
  const std::string repo = Repo({bed->mirror1});
  StartDaemon("rules:\n  - match: docker.io\n    mirrors: [mirror.rp-test]\n    fallback: false\n" +
              Node());
  ASSERT_TRUE(TimedPull(repo).first.ok()) << DaemonLog();
  EXPECT_EQ(ProbesLogged(*bed->mirror1), 1u);
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_THAT(DaemonLog(), HasSubstr("probe http://" + bed->mirror1->host() + "/v2/ alive in "));
}

}  // namespace
}  // namespace rp_testbed
