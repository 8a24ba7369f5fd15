#include "pull/node_metrics.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>  // the fake containerd
#include <gtest/gtest.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <future>
#include <mutex>
#include <thread>

#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.grpc.pb.h"

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kPull[] = "/runtime.v1.ImageService/PullImage";
constexpr char kStatus[] = "/runtime.v1.ImageService/ImageStatus";

TEST(NodeMetricsTest, CallsByMethodAndCode) {
  metrics::Registry r;
  NodeMetrics m(&r);
  m.OnCallDone(kPull, RpcCode::OK, 2s);
  m.OnCallDone(kPull, RpcCode::OK, 50ms);
  m.OnCallDone(kPull, RpcCode::UNAVAILABLE, 1ms);
  m.OnCallDone(kStatus, RpcCode::OK, 300us);
  const std::string t = r.Render();
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_calls_total{method=\"runtime.v1.ImageService/"
                           "PullImage\",code=\"OK\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_calls_total{method=\"runtime.v1.ImageService/"
                           "PullImage\",code=\"UNAVAILABLE\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_calls_total{method=\"runtime.v1.ImageService/"
                           "ImageStatus\",code=\"OK\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_call_duration_seconds_count{method=\"runtime.v1."
                           "ImageService/PullImage\"} 3\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_call_duration_seconds_bucket{method=\"runtime.v1."
                           "ImageService/ImageStatus\",le=\"0.0005\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_call_duration_seconds_bucket{method=\"runtime.v1."
                           "ImageService/ImageStatus\",le=\"0.00025\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_cri_call_duration_seconds_bucket{method=\"runtime.v1."
                           "ImageService/PullImage\",le=\"600\"} 3\n"));
  EXPECT_THAT(t, Not(HasSubstr("method=\"other\""))) << "nothing capped yet";
}

TEST(NodeMetricsTest, DistinctMethodsAreCapped) {
  metrics::Registry r;
  NodeMetrics m(&r, {.max_methods = 3});
  for (int i = 0; i < 1000; ++i) {
    m.OnCallDone("/x.Svc/M" + std::to_string(i), RpcCode::UNIMPLEMENTED, 1ms);
  }
  m.OnCallDone("/x.Svc/M1", RpcCode::UNIMPLEMENTED, 1ms);  // one of the first three
  const std::string t = r.Render();
  EXPECT_THAT(t, HasSubstr("{method=\"x.Svc/M0\",code=\"UNIMPLEMENTED\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("{method=\"x.Svc/M1\",code=\"UNIMPLEMENTED\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("{method=\"x.Svc/M2\",code=\"UNIMPLEMENTED\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("{method=\"other\",code=\"UNIMPLEMENTED\"} 997\n"));
  EXPECT_THAT(t, Not(HasSubstr("x.Svc/M3")));
  EXPECT_LT(t.size(), 20000u) << "the text stays small however many methods were seen";
}

TEST(NodeMetricsTest, PullsAttemptsProbesAndBreakers) {
  metrics::Registry r;
  NodeMetrics m(&r);
  PullReport mirror{"docker.io", "m1.example", PullOutcome::kMirror, RpcCode::OK, 3s, 1};
  m.OnPull(mirror);
  m.OnPull(mirror);
  m.OnPull({"docker.io", "", PullOutcome::kFallback, RpcCode::OK, 20s, 2});
  m.OnPull({"", "", PullOutcome::kPassthrough, RpcCode::NOT_FOUND, 1s, 1});
  m.OnAttempt("docker.io", "m1.example", RpcCode::UNAVAILABLE, 1s);
  m.OnAttempt("docker.io", "upstream", RpcCode::OK, 19s);
  m.OnMirrorSkipped("m2.example", SkipReason::kCooldown);
  m.OnProbe("m2.example", false, 2s);
  m.OnProbe("m1.example", true, 3ms);
  m.OnBreaker("m2.example", true);
  m.OnBreaker("m1.example", true);
  m.OnBreaker("m1.example", false);
  const std::string t = r.Render();
  EXPECT_THAT(t, HasSubstr("registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"m1.example\","
                           "outcome=\"mirror\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pulls_total{rule=\"docker.io\",mirror=\"\","
                           "outcome=\"fallback\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pulls_total{rule=\"\",mirror=\"\","
                           "outcome=\"passthrough\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pull_duration_seconds_count{outcome=\"mirror\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pull_duration_seconds_sum{outcome=\"mirror\"} 6\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pull_attempts_total{rule=\"docker.io\",target=\"m1."
                           "example\",code=\"UNAVAILABLE\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_pull_attempts_total{rule=\"docker.io\",target="
                           "\"upstream\",code=\"OK\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_mirror_skipped_total{mirror=\"m2.example\",reason="
                           "\"cooldown\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_mirror_probes_total{mirror=\"m2.example\",result="
                           "\"dead\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_mirror_probes_total{mirror=\"m1.example\",result="
                           "\"alive\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_mirror_breaker_open{mirror=\"m2.example\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_mirror_breaker_open{mirror=\"m1.example\"} 0\n"));
}

// An interceptor whose PullImage waits until released.
class BlockingPulls final : public ImageInterceptor {
 public:
  InterceptResult PullImage(CriVersion, const std::string&, const CallOptions&) override {
    std::unique_lock<std::mutex> l(mu_);
    ++entered_;
    cv_.notify_all();
    cv_.wait(l, [&] { return released_; });
    return {RpcStatus::OK, "resp"};
  }
  bool StatusNeedsRecovery(CriVersion, const std::string&, const std::string& r) override {
    return r == "miss";
  }
  InterceptResult RecoverStatus(CriVersion, const std::string&, const std::string&,
                                const CallOptions&) override {
    return {RpcStatus::OK, "repaired"};
  }
  void WaitEntered(int n) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return entered_ >= n; });
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu_);
    released_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int entered_ = 0;
  bool released_ = false;
};

TEST(InFlightPullsTest, CountsPullsWhileTheyRun) {
  metrics::Registry r;
  NodeMetrics m(&r);
  BlockingPulls inner;
  InFlightPulls counted(&inner, &m.pulls_in_flight());
  auto a = std::async(std::launch::async, [&] { return counted.PullImage({}, "", {}); });
  auto b = std::async(std::launch::async, [&] { return counted.PullImage({}, "", {}); });
  inner.WaitEntered(2);
  EXPECT_THAT(r.Render(), HasSubstr("registry_proxy_pulls_in_flight 2\n"));
  inner.Release();
  EXPECT_EQ(a.get().response, "resp");
  EXPECT_EQ(b.get().response, "resp");
  EXPECT_THAT(r.Render(), HasSubstr("registry_proxy_pulls_in_flight 0\n"));
  EXPECT_TRUE(counted.StatusNeedsRecovery({}, "", "miss")) << "delegated";
  EXPECT_EQ(counted.RecoverStatus({}, "", "", {}).response, "repaired");
}

// A CRI RuntimeService that answers Version and counts the calls.
class FakeRuntime final : public runtime::v1::RuntimeService::Service {
 public:
  grpc::Status Version(grpc::ServerContext*, const runtime::v1::VersionRequest*,
                       runtime::v1::VersionResponse* out) override {
    ++calls;
    out->set_runtime_name("fake");
    return grpc::Status::OK;
  }
  std::atomic<int> calls{0};
};

class UpstreamCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "rp-nodemetrics-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    endpoint_ = "unix://" + dir_ + "/cri.sock";
  }
  void StartServer() {
    grpc::ServerBuilder b;
    b.AddListeningPort(endpoint_, grpc::InsecureServerCredentials());
    b.RegisterService(&fake_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + 2s);
    fs::remove_all(dir_);
  }
  std::string dir_, endpoint_;
  FakeRuntime fake_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(UpstreamCheckTest, ReadyWhenVersionAnswersAndCached) {
  StartServer();
  auto channel = std::make_shared<RpcChannel>(RpcChannelOptions{.endpoint = endpoint_});
  UpstreamCheck cached(channel, 1s, std::chrono::hours(1));
  EXPECT_TRUE(cached.Check().ready);
  EXPECT_TRUE(cached.Check().ready);
  EXPECT_EQ(fake_.calls.load(), 1) << "the second answer came from the cache";
  UpstreamCheck uncached(channel, 1s, 0ms);
  EXPECT_TRUE(uncached.Check().ready);
  EXPECT_TRUE(uncached.Check().ready);
  EXPECT_EQ(fake_.calls.load(), 3);
}

TEST_F(UpstreamCheckTest, NotReadyWithTheReasonWhenNothingAnswers) {
  auto channel = std::make_shared<RpcChannel>(RpcChannelOptions{.endpoint = endpoint_});
  UpstreamCheck check(channel, 1s, 0ms);
  Readiness r = check.Check();
  EXPECT_FALSE(r.ready);
  EXPECT_THAT(r.reason, HasSubstr("upstream CRI does not answer Version"));
  EXPECT_THAT(r.reason, ::testing::AnyOf(HasSubstr("UNAVAILABLE"), HasSubstr("DEADLINE")));
}

TEST_F(UpstreamCheckTest, ConnectionStateAfterAFailedConnect) {
  auto channel = std::make_shared<RpcChannel>(RpcChannelOptions{.endpoint = endpoint_});
  metrics::Registry r;
  AddUpstreamStateMetric(&r, channel);
  EXPECT_FALSE(UpstreamCheck(channel).Check().ready);  // nothing listens
  EXPECT_THAT(r.Render(), HasSubstr("{state=\"transient_failure\"} 1\n"));
}

TEST_F(UpstreamCheckTest, ConnectionStateIsOneOfFive) {
  StartServer();
  auto channel = std::make_shared<RpcChannel>(RpcChannelOptions{.endpoint = endpoint_});
  metrics::Registry r;
  AddUpstreamStateMetric(&r, channel);
  EXPECT_THAT(r.Render(),
              HasSubstr("registry_proxy_upstream_connection_state{state=\"idle\"} 1\n"));
  ASSERT_TRUE(UpstreamCheck(channel).Check().ready);  // connects
  const std::string t = r.Render();
  EXPECT_THAT(t, HasSubstr("registry_proxy_upstream_connection_state{state=\"ready\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_upstream_connection_state{state=\"idle\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("registry_proxy_upstream_connection_state{state=\"connecting\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("{state=\"transient_failure\"} 0\n"));
  EXPECT_THAT(t, HasSubstr("{state=\"shutdown\"} 0\n"));
}

}  // namespace
}  // namespace registry_proxy
