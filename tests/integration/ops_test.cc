// The daemon's operations endpoint end to end: the real `registry-proxy serve` in front of the
// testbed's containerd, with node.metricsAddress on a free loopback port. Pulls served by a
// mirror, falling back to upstream and failing are counted; /readyz follows containerd going
// away and coming back; config reloads are counted; JSON logs are one valid object per line;
// planted secrets (a mirror's password, a caller's pull credentials) appear neither in the
// log at trace level nor in /metrics. Fixture and testbed: shim_fixture.h.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "fault_server.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

struct HttpReply {
  int status = 0;  // 0: no answer
  std::string body;
};

// GET over a plain TCP connection to 127.0.0.1:port (HTTP/1.0: the server closes after one
// answer). 5 s timeouts.
HttpReply HttpGet(int port, const std::string& path) {
  HttpReply r;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return r;
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a = LoopbackAddress(port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return r;
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != ssize_t(req.size())) {
    close(fd);
    return r;
  }
  std::string all;
  char buf[16384];
  ssize_t n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) all.append(buf, size_t(n));
  close(fd);
  std::smatch m;
  static const std::regex kStatus(R"(^HTTP/1\.[01] (\d{3}) )");
  if (!std::regex_search(all, m, kStatus)) return r;
  r.status = std::stoi(m[1]);
  const size_t body = all.find("\r\n\r\n");
  if (body != std::string::npos) r.body = all.substr(body + 4);
  return r;
}

// Every sample line of an exposition ("name{labels}" -> value); lines that are neither
// comments nor samples go to `bad`.
std::map<std::string, double> ParseMetrics(const std::string& text,
                                           std::vector<std::string>* bad = nullptr) {
  static const std::regex kSample(
      R"(^([a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?) )"
      R"(([-+]?[0-9.eE+-]+|\+Inf|-Inf|NaN)$)");
  static const std::regex kComment(R"(^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .*$)");
  std::map<std::string, double> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    std::smatch m;
    if (std::regex_match(line, m, kSample)) {
      out[m[1]] = std::stod(m[5]);
    } else if (!std::regex_match(line, kComment) && bad) {
      bad->push_back(line);
    }
  }
  return out;
}

double Value(const std::map<std::string, double>& m, const std::string& series) {
  auto it = m.find(series);
  return it == m.end() ? -1 : it->second;
}

// Sum of the series whose text contains every one of `parts`.
double Sum(const std::map<std::string, double>& m, const std::vector<std::string>& parts) {
  double s = 0;
  for (const auto& [k, v] : m) {
    bool all = true;
    for (const auto& p : parts) all = all && k.find(p) != std::string::npos;
    if (all) s += v;
  }
  return s;
}

std::string Unique(const std::string& prefix) {
  std::random_device rd;
  std::ostringstream s;
  s << prefix << std::hex << rd() << rd();
  return s.str();
}

class OpsTest : public ShimTest {
 protected:
  void SetUp() override {
    ShimTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    auto p = PickFreePort();
    ASSERT_TRUE(p.ok());
    port_ = *p;
  }

  std::string NodeSection(const std::string& extra = "") const {
    return "node:\n  metricsAddress: 127.0.0.1:" + std::to_string(port_) + "\n" + extra;
  }

  void StartWithMetrics(const std::string& yaml) {
    StartDaemon(yaml);
    if (HasFatalFailure()) return;
    ASSERT_TRUE(WaitFor([&] { return HttpGet(port_, "/healthz").status == 200; }, 10s, 50ms))
        << DaemonLog();
  }

  std::map<std::string, double> Scrape() {
    HttpReply r = HttpGet(port_, "/metrics");
    EXPECT_EQ(r.status, 200) << DaemonLog();
    std::vector<std::string> bad;
    auto m = ParseMetrics(r.body, &bad);
    EXPECT_THAT(bad, ::testing::IsEmpty()) << "lines that are not the text format";
    last_scrape_ = r.body;
    return m;
  }

  int port_ = 0;
  std::string last_scrape_;
};

TEST_F(OpsTest, PullsAreCountedByOutcome) {
  const std::string served = "rp/ops-served", fallback = "rp/ops-fallback";
  ASSERT_TRUE(bed->tb->PushTestImage(bed->mirror1, served).ok());
  ASSERT_TRUE(bed->tb->PushTestImage(bed->upstream, fallback).ok());
  const std::string m1 = bed->mirror1->host(), dead = Dead();
  StartWithMetrics(
      "excludeNamespaces: [kube-system]\nrules:\n"
      "  - match: docker.io/rp/ops-served\n    mirrors:\n      - " +
      m1 +
      "\n"
      "  - match: docker.io\n    mirrors:\n      - " +
      dead + "\n" + NodeSection());
  ASSERT_TRUE(Pull(served, "default").ok()) << DaemonLog();
  ASSERT_TRUE(Pull(fallback, "default").ok()) << DaemonLog();
  ASSERT_FALSE(Pull("rp/ops-missing", "default").ok());

  auto m = Scrape();
  const std::string pull = "method=\"runtime.v1.ImageService/PullImage\"";
  EXPECT_EQ(Value(m, "registry_proxy_cri_calls_total{" + pull + ",code=\"OK\"}"), 2)
      << last_scrape_;
  EXPECT_EQ(Sum(m, {"registry_proxy_cri_calls_total{" + pull}), 3);
  EXPECT_EQ(Value(m, "registry_proxy_cri_call_duration_seconds_count{" + pull + "}"), 3);
  EXPECT_GE(Sum(m, {"registry_proxy_cri_calls_total{method=\"runtime.v1.RuntimeService/Version\""}),
            1)
      << "the fixture's Version calls";

  EXPECT_EQ(Value(m, "registry_proxy_pulls_total{rule=\"docker.io/rp/ops-served\",mirror=\"" + m1 +
                         "\",outcome=\"mirror\"}"),
            1)
      << last_scrape_ << DaemonLog();
  EXPECT_EQ(Value(m,
                  "registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"\",outcome="
                  "\"fallback\"}"),
            1);
  EXPECT_EQ(Value(m,
                  "registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"\",outcome="
                  "\"failed\"}"),
            1);
  EXPECT_EQ(Value(m, "registry_proxy_pull_duration_seconds_count{outcome=\"mirror\"}"), 1);
  EXPECT_EQ(Value(m,
                  "registry_proxy_pull_attempts_total{rule=\"docker.io/rp/ops-served\","
                  "target=\"" +
                      m1 + "\",code=\"OK\"}"),
            1);
  EXPECT_EQ(Value(m,
                  "registry_proxy_pull_attempts_total{rule=\"docker.io\",target=\"upstream\","
                  "code=\"OK\"}"),
            1);
  EXPECT_EQ(Sum(m, {"registry_proxy_pull_attempts_total{rule=\"docker.io\",target=\"upstream\""}),
            2)
      << "the fallback and the failing pull both reached upstream";
  // The dead mirror: tried, or skipped once its breaker is open; either way once per pull.
  EXPECT_EQ(Sum(m, {"registry_proxy_pull_attempts_total{", "target=\"" + dead + "\""}) +
                Sum(m, {"registry_proxy_mirror_skipped_total{mirror=\"" + dead + "\""}),
            2);
  EXPECT_EQ(Value(m, "registry_proxy_pulls_in_flight"), 0);
  EXPECT_EQ(Value(m, "registry_proxy_upstream_connection_state{state=\"ready\"}"), 1);
  EXPECT_EQ(Sum(m, {"registry_proxy_upstream_connection_state{"}), 1);
  EXPECT_EQ(Value(m, "registry_proxy_config_generation"), 1);
  EXPECT_EQ(Value(m, "registry_proxy_config_last_reload_success"), 1);
  EXPECT_EQ(Sum(m, {"registry_proxy_build_info{version="}), 1);
  EXPECT_GT(Value(m, "process_resident_memory_bytes"), 1 << 20);
  EXPECT_GT(Value(m, "process_open_fds"), 3);
  EXPECT_GT(Value(m, "process_threads"), 3);
}

// A mirror answering 500 to everything: its probe fails, its breaker opens, the pull falls back
// to upstream, and the next pull skips it for the cooldown. All of it shows in the metrics.
TEST_F(OpsTest, BrokenMirrorShowsInProbeBreakerAndSkipMetrics) {
  using Behavior = FaultServer::Behavior;
  FaultServer bad(Behavior::k500, Behavior::k500, 60s);
  ASSERT_TRUE(bad.Start().ok());
  const std::string repo = Repo({bed->upstream});
  StartWithMetrics(
      MirrorConfig({bad.host()}, NodeSection("  containerdHostsDir: " + bed->ctrd->certs_dir() +
                                             "\n  mirrorCooldown: 60s\n")));
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  auto m = Scrape();
  const std::string mirror = "mirror=\"" + bad.host() + "\"";
  EXPECT_EQ(Value(m, "registry_proxy_mirror_probes_total{" + mirror + ",result=\"dead\"}"), 1)
      << last_scrape_;
  EXPECT_EQ(Value(m, "registry_proxy_mirror_breaker_open{" + mirror + "}"), 1);
  EXPECT_EQ(Value(m, "registry_proxy_mirror_skipped_total{" + mirror + ",reason=\"probe_failed\"}"),
            1);
  EXPECT_EQ(Value(m,
                  "registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"\",outcome="
                  "\"fallback\"}"),
            1);
  EXPECT_EQ(bad.PullRequests(), 0u) << "a dead mirror was handed to containerd";

  // Within the cooldown: skipped without a probe.
  ASSERT_TRUE(bed->ctrd->cri().RemoveImage("docker.io/" + repo + ":latest").ok());
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  m = Scrape();
  EXPECT_EQ(Value(m, "registry_proxy_mirror_skipped_total{" + mirror + ",reason=\"cooldown\"}"), 1)
      << last_scrape_;
  EXPECT_EQ(Sum(m, {"registry_proxy_mirror_probes_total{" + mirror}), 1);
  EXPECT_EQ(bad.ProbeRequests(), 1u);
  EXPECT_EQ(Value(m,
                  "registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"\",outcome="
                  "\"fallback\"}"),
            2);
}

TEST_F(OpsTest, ReadyzFollowsContainerd) {
  StartWithMetrics(MirrorConfig({bed->mirror1->host()}, NodeSection()));
  HttpReply r = HttpGet(port_, "/readyz");
  EXPECT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.body, "ok\n");

  bed->ctrd->Stop();
  // Restored whatever happens below: the rest of the suite needs containerd.
  struct Restore {
    ~Restore() {
      if (!bed->ctrd->running()) {
        Status s = bed->ctrd->Start();
        EXPECT_TRUE(s.ok()) << s.message();
      }
    }
  } restore;
  EXPECT_TRUE(WaitFor([&] { return (r = HttpGet(port_, "/readyz")).status == 503; }, 15s, 100ms))
      << r.status << " " << r.body;
  EXPECT_THAT(r.body, HasSubstr("upstream CRI does not answer Version"));
  EXPECT_EQ(HttpGet(port_, "/healthz").status, 200) << "alive, only not ready";
  auto m = Scrape();
  EXPECT_EQ(Value(m, "registry_proxy_upstream_connection_state{state=\"ready\"}"), 0)
      << last_scrape_;

  Status s = bed->ctrd->Start();
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_TRUE(WaitFor([&] { return (r = HttpGet(port_, "/readyz")).status == 200; }, 15s, 100ms))
      << r.status << " " << r.body << DaemonLog();
  ASSERT_TRUE(Pull(Repo({bed->mirror1}), "default").ok()) << "serves again" << DaemonLog();
}

TEST_F(OpsTest, ConfigReloadsAreCounted) {
  const std::string good = MirrorConfig({bed->mirror1->host()}, NodeSection());
  StartWithMetrics(good);
  auto m = Scrape();
  EXPECT_EQ(Value(m, "registry_proxy_config_reloads_total{result=\"applied\"}"), 1);
  EXPECT_EQ(Value(m, "registry_proxy_config_reloads_total{result=\"rejected\"}"), 0);
  EXPECT_EQ(Value(m, "registry_proxy_config_generation"), 1);
  const double applied_at = Value(m, "registry_proxy_config_applied_timestamp_seconds");
  EXPECT_GT(applied_at, 1.7e9);

  WriteConfig("rules: [\n");  // broken YAML
  ASSERT_TRUE(WaitFor(
      [&] {
        m = Scrape();
        return Value(m, "registry_proxy_config_reloads_total{result=\"rejected\"}") == 1;
      },
      10s, 100ms))
      << last_scrape_ << DaemonLog();
  EXPECT_EQ(Value(m, "registry_proxy_config_generation"), 1) << "the good config stays";
  EXPECT_EQ(Value(m, "registry_proxy_config_last_reload_success"), 0);
  EXPECT_EQ(Value(m, "registry_proxy_config_applied_timestamp_seconds"), applied_at);
  EXPECT_EQ(HttpGet(port_, "/readyz").status, 200) << "a good config is still in force";

  WriteConfig(good + "pullsWithoutNamespace:\n  policy: passthrough\n");
  ASSERT_TRUE(WaitFor(
      [&] {
        m = Scrape();
        return Value(m, "registry_proxy_config_generation") == 2;
      },
      10s, 100ms))
      << last_scrape_ << DaemonLog();
  EXPECT_EQ(Value(m, "registry_proxy_config_reloads_total{result=\"applied\"}"), 2);
  EXPECT_EQ(Value(m, "registry_proxy_config_last_reload_success"), 1);
}

TEST_F(OpsTest, PlantedSecretsAreNeverLoggedOrExported) {
  const std::string mirror_password = Unique("mirrorpw-");
  const std::string caller_password = Unique("callerpw-");
  const std::string caller_user = Unique("calleruser-");
  {
    std::ofstream creds(dir_ + "/credentials.yaml");
    creds << "credentials:\n  corp:\n    username: robot\n    password: " << mirror_password
          << "\n";
  }
  const std::string repo = Repo({bed->mirror1, bed->upstream});
  daemon_args_ = {"--log-level", "trace", "--log-format", "json"};
  StartWithMetrics("rules:\n  - match: docker.io\n    mirrors:\n      - host: " +
                   bed->mirror1->host() + "\n        credentials: corp\n" +
                   NodeSection("  credentialsFile: " + dir_ + "/credentials.yaml\n"));
  // Through the mirror, with the mirror's credentials.
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  // With the caller's own credentials: forwarded to upstream as it came.
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(repo);
  req.mutable_auth()->set_username(caller_user);
  req.mutable_auth()->set_password(caller_password);
  req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
  runtime::v1::PullImageResponse resp;
  grpc::Status s = client_->PullImage(req, &resp, 60s);
  EXPECT_TRUE(s.ok()) << registry_proxy::GrpcStatusText(s);

  const std::string metrics = HttpGet(port_, "/metrics").body;
  ASSERT_THAT(metrics, HasSubstr("registry_proxy_pulls_total"));
  StopDaemon();  // every line flushed
  std::ifstream in(dir_ + "/daemon.log");
  const std::string log((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_THAT(log, HasSubstr("\"level\":\"debug\"")) << "logged at trace (and debug) level";
  ASSERT_THAT(log, HasSubstr("auth=yes")) << "the credentialed pull was logged";
  ASSERT_THAT(log, HasSubstr("\"auth\":\"yes\"")) << "with its fields";
  for (const std::string& secret : {mirror_password, caller_password}) {
    EXPECT_THAT(log, Not(HasSubstr(secret))) << "in the daemon log";
    EXPECT_THAT(metrics, Not(HasSubstr(secret))) << "in /metrics";
  }
  // Every line of the log is one JSON object with time, level and msg.
  std::istringstream lines(log);
  int n = 0;
  for (std::string line; std::getline(lines, line); ++n) {
    ASSERT_TRUE(nlohmann::json::accept(line)) << "not JSON: " << line;
    auto j = nlohmann::json::parse(line);
    EXPECT_TRUE(j.contains("time") && j.contains("level") && j.contains("msg")) << line;
  }
  EXPECT_GT(n, 5);
}

}  // namespace
}  // namespace rp_testbed
