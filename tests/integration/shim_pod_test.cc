// The shim end to end, beyond single pulls: a pod whose container runs an image a mirror served
// (the daemon's socket as runtime and image endpoint, as one-socket tools use it), pulls and
// status calls under concurrent load, a hung mirror, and requests carrying fields the daemon
// does not know. Fixture and testbed: shim_fixture.h.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <future>
#include <iostream>
#include <latch>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "grpc_cri_client.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using registry_proxy::GrpcCriClient;
using registry_proxy::GrpcStatusText;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// "p50 1.23 p90 ... max ... ms (n=...)" for a report line.
std::string Percentiles(std::vector<double> ms) {
  if (ms.empty()) return "(no samples)";
  std::sort(ms.begin(), ms.end());
  auto at = [&](double q) {
    return ms[static_cast<size_t>(q * static_cast<double>(ms.size() - 1))];
  };
  char buf[160];
  std::snprintf(buf, sizeof buf, "p50 %.2f  p90 %.2f  p99 %.2f  max %.2f ms (n=%zu)", at(0.5),
                at(0.9), at(0.99), ms.back(), ms.size());
  return buf;
}

// The first few lines of a list, for failure messages that stay readable.
std::string Summary(const std::vector<std::string>& lines, size_t max = 5) {
  std::string out;
  for (size_t i = 0; i < lines.size() && i < max; ++i) out += "  " + lines[i] + "\n";
  if (lines.size() > max) out += "  ... and " + std::to_string(lines.size() - max) + " more\n";
  return out;
}

// A host-network pod (the testbed has no CNI) run through `cri`, with its containers. The
// destructor stops and removes them all, so a test that fails midway leaves no pod behind for
// the next one (the testbed's teardown would clean up too, but only at the end of the suite).
class Pod {
 public:
  Pod(GrpcCriClient* cri, std::string log_dir) : cri_(cri) {
    fs::create_directories(log_dir);
    auto* md = config_.mutable_metadata();
    md->set_name("pod");
    md->set_uid("pod-uid-1");
    md->set_namespace_("default");
    config_.set_log_directory(std::move(log_dir));
    // A host-network pod must leave hostname empty.
    config_.mutable_linux()->mutable_security_context()->mutable_namespace_options()->set_network(
        runtime::v1::NODE);
  }
  ~Pod() {
    for (const std::string& id : containers_) {
      runtime::v1::StopContainerRequest stop;
      stop.set_container_id(id);
      runtime::v1::StopContainerResponse stopped;
      Call(&runtime::v1::RuntimeService::Stub::StopContainer, stop, &stopped);
      runtime::v1::RemoveContainerRequest rm;
      rm.set_container_id(id);
      runtime::v1::RemoveContainerResponse removed;
      Call(&runtime::v1::RuntimeService::Stub::RemoveContainer, rm, &removed);
    }
    if (id_.empty()) return;
    runtime::v1::StopPodSandboxRequest stop;
    stop.set_pod_sandbox_id(id_);
    runtime::v1::StopPodSandboxResponse stopped;
    grpc::Status s = Call(&runtime::v1::RuntimeService::Stub::StopPodSandbox, stop, &stopped);
    EXPECT_TRUE(s.ok()) << GrpcStatusText(s);
    runtime::v1::RemovePodSandboxRequest rm;
    rm.set_pod_sandbox_id(id_);
    runtime::v1::RemovePodSandboxResponse removed;
    s = Call(&runtime::v1::RuntimeService::Stub::RemovePodSandbox, rm, &removed);
    EXPECT_TRUE(s.ok()) << GrpcStatusText(s);
  }
  Pod(const Pod&) = delete;
  Pod& operator=(const Pod&) = delete;

  grpc::Status Run() {
    runtime::v1::RunPodSandboxRequest req;
    *req.mutable_config() = config_;
    runtime::v1::RunPodSandboxResponse resp;
    grpc::Status s = Call(&runtime::v1::RuntimeService::Stub::RunPodSandbox, req, &resp);
    id_ = resp.pod_sandbox_id();
    return s;
  }

  // Creates and starts a container as kubelet does: ImageSpec.image is the image id (what
  // PullImage answered), user_specified_image the pod spec's image. Logs go to <name>.log.
  grpc::Status Start(const std::string& name, const std::string& image_id,
                     const std::string& spec_image, const std::vector<std::string>& command,
                     std::string* id) {
    runtime::v1::CreateContainerRequest req;
    req.set_pod_sandbox_id(id_);
    *req.mutable_sandbox_config() = config_;
    auto* c = req.mutable_config();
    c->mutable_metadata()->set_name(name);
    c->mutable_image()->set_image(image_id);
    c->mutable_image()->set_user_specified_image(spec_image);
    for (const auto& arg : command) c->add_command(arg);
    c->set_log_path(name + ".log");
    runtime::v1::CreateContainerResponse created;
    grpc::Status s = Call(&runtime::v1::RuntimeService::Stub::CreateContainer, req, &created);
    if (!s.ok()) return s;
    *id = created.container_id();
    containers_.push_back(*id);
    runtime::v1::StartContainerRequest start;
    start.set_container_id(*id);
    runtime::v1::StartContainerResponse started;
    return Call(&runtime::v1::RuntimeService::Stub::StartContainer, start, &started);
  }

  grpc::Status GetStatus(const std::string& id, runtime::v1::ContainerStatus* out) {
    runtime::v1::ContainerStatusRequest req;
    req.set_container_id(id);
    runtime::v1::ContainerStatusResponse resp;
    grpc::Status s = Call(&runtime::v1::RuntimeService::Stub::ContainerStatus, req, &resp);
    *out = resp.status();
    return s;
  }

  grpc::Status Exec(const std::string& id, const std::vector<std::string>& cmd,
                    runtime::v1::ExecSyncResponse* out) {
    runtime::v1::ExecSyncRequest req;
    req.set_container_id(id);
    for (const auto& arg : cmd) req.add_cmd(arg);
    req.set_timeout(10);
    return Call(&runtime::v1::RuntimeService::Stub::ExecSync, req, out);
  }

  const std::string& log_directory() const { return config_.log_directory(); }

 private:
  template <typename Req, typename Resp>
  grpc::Status Call(grpc::Status (runtime::v1::RuntimeService::Stub::*method)(grpc::ClientContext*,
                                                                              const Req&, Resp*),
                    const Req& req, Resp* resp) {
    grpc::ClientContext ctx;
    GrpcCriClient::SetTimeout(&ctx, 60s);
    return (cri_->runtime().*method)(&ctx, req, resp);
  }

  GrpcCriClient* cri_;
  runtime::v1::PodSandboxConfig config_;
  std::string id_;
  std::vector<std::string> containers_;
};

// docker.io -> the given mirror only: a pull that succeeds was served by the mirror.
std::string MirrorOnlyConfig(const std::string& mirror) {
  return "rules:\n  - match: docker.io\n    mirrors: [" + mirror + "]\n    fallback: false\n";
}

// Runs a unary call by method name with the request's bytes as given (generic stub).
grpc::Status RawUnary(const std::string& endpoint, const std::string& method,
                      const std::string& request, std::string* response,
                      std::chrono::milliseconds timeout) {
  auto channel = grpc::CreateChannel(endpoint, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + timeout);
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1), out;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &in, &out,
                 [&](grpc::Status s) { done.set_value(s); });
  grpc::Status s = done.get_future().get();
  std::vector<grpc::Slice> slices;
  response->clear();
  if (s.ok() && out.Dump(&slices).ok()) {
    for (const auto& sl : slices)
      response->append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  }
  return s;
}

// Protobuf wire format by hand, for fields our own declarations do not have.
std::string Varint(uint64_t v) {
  std::string out;
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
  return out;
}
std::string LengthDelimited(uint32_t field, const std::string& payload) {
  return Varint((uint64_t{field} << 3) | 2) + Varint(payload.size()) + payload;
}
std::string VarintField(uint32_t field, uint64_t value) {
  return Varint(uint64_t{field} << 3) + Varint(value);
}

// ---------------------------------------------------------------------------------------------

TEST_F(ShimTest, PodRunsAContainerFromAMirroredImage) {
  std::string repo = Repo({bed->mirror1});  // the upstream registry does not have it
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::PullImageResponse pulled;
  ASSERT_TRUE(Pull(repo, "default", &pulled).ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
  const std::string original = "docker.io/" + repo + ":latest";
  runtime::v1::Image img = ImageOf(*client_, repo);
  ASSERT_EQ(img.id(), pulled.image_ref());

  // The daemon's socket is the runtime endpoint too: every RuntimeService call is forwarded.
  Pod pod(client_.get(), dir_ + "/pod-logs");
  ASSERT_TRUE(pod.Run().ok()) << DaemonLog();

  std::string long_id;
  grpc::Status s = pod.Start("long", pulled.image_ref(), repo,
                             {"/bin/sh", "-c", "echo hello; exec sleep 600"}, &long_id);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << TailFile(bed->ctrd->log_path());
  runtime::v1::ExecSyncResponse exec;
  s = pod.Exec(long_id, {"echo", "ok"}, &exec);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s);
  EXPECT_EQ(exec.exit_code(), 0) << exec.stderr();
  EXPECT_EQ(exec.stdout(), "ok\n");
  // The container's own output reached its CRI log ("<time> stdout F hello").
  const std::string log = pod.log_directory() + "/long.log";
  EXPECT_TRUE(
      WaitFor([&] { return TailFile(log).find("stdout F hello") != std::string::npos; }, 10s))
      << TailFile(log);

  // kubelet reports status.containerStatuses[].image from status.image and .imageID from
  // image_ref: upstream names, never the mirror's. Other tests' names share the image id (every
  // test pushes the same image), so check against the names the image has, not one string.
  runtime::v1::ContainerStatus st;
  s = pod.GetStatus(long_id, &st);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s);
  std::cout << "[ status ] image=" << st.image().image() << " image_ref=" << st.image_ref()
            << " image_id=" << st.image_id() << "\n";
  EXPECT_EQ(st.state(), runtime::v1::CONTAINER_RUNNING);
  img = ImageOf(*client_, pulled.image_ref());
  EXPECT_THAT(img.repo_tags(), Contains(original));
  EXPECT_THAT(st.image().image(), StartsWith("docker.io/"));
  EXPECT_THAT(img.repo_tags(), Contains(st.image().image()));
  EXPECT_THAT(st.image_ref(), StartsWith("docker.io/"));
  EXPECT_THAT(img.repo_digests(), Contains(st.image_ref()));
  for (const std::string& name : {st.image().image(), st.image_ref()}) {
    EXPECT_THAT(name, Not(HasSubstr(bed->mirror1->host())));
  }
  // Newer CRI only (containerd 1.6 leaves it empty); when present it is the pulled id.
  if (!st.image_id().empty()) {
    EXPECT_EQ(st.image_id(), pulled.image_ref());
  }

  // A container that runs to completion: exits 0, its output in its log.
  std::string once_id;
  s = pod.Start("once", pulled.image_ref(), repo, {"/bin/sh", "-c", "echo once > /dev/stdout"},
                &once_id);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s);
  runtime::v1::ContainerStatus done;
  EXPECT_TRUE(WaitFor(
      [&] {
        return pod.GetStatus(once_id, &done).ok() && done.state() == runtime::v1::CONTAINER_EXITED;
      },
      20s, 50ms))
      << done.DebugString();
  EXPECT_EQ(done.exit_code(), 0) << done.DebugString();
  EXPECT_THAT(done.image().image(), StartsWith("docker.io/"));
  EXPECT_TRUE(WaitFor(
      [&] {
        return TailFile(pod.log_directory() + "/once.log").find("stdout F once") !=
               std::string::npos;
      },
      10s));
}

// 20 pulls of each image at once (kubelet with serializeImagePulls: false, or many pods of one
// image on a node) must all succeed: while one pull aliases the image and drops its mirror
// names, containerd may still be pulling the same mirror reference for another.
TEST_F(ShimTest, ConcurrentPullsAndStatusCallsAllSucceed) {
  constexpr int kImages = 5, kPulls = 100, kStatusThreads = 32, kStatusCalls = 3000;
  // Only mirror1 has these images, and fallback is off: every successful pull is the mirror's.
  const std::string base = Repo({});
  std::vector<std::string> repos;
  for (int i = 0; i < kImages; ++i) {
    repos.push_back(base + "-" + std::to_string(i));
    ASSERT_TRUE(bed->tb->PushTestImage(bed->mirror1, repos.back()).ok());
  }
  const std::string hit = base + "-hit";  // on the node before the load starts
  ASSERT_TRUE(bed->tb->PushTestImage(bed->mirror1, hit).ok());
  StartDaemon(MirrorOnlyConfig(bed->mirror1->host()));
  runtime::v1::PullImageResponse first;
  ASSERT_TRUE(Pull(hit, "default", &first).ok()) << DaemonLog();
  const std::string image_id = first.image_ref();
  for (Registry* r : {bed->upstream, bed->mirror1, bed->mirror2}) r->ResetRequests();

  struct PullResult {
    grpc::Status status;
    std::string image_ref;
    double ms = 0;
  };
  std::vector<PullResult> pulls(kPulls);
  // Per status thread: latencies and failures ("image: what went wrong"), merged after join.
  struct StatusLog {
    std::vector<double> ms;
    std::vector<std::string> failures;
  };
  std::vector<StatusLog> status_logs(kStatusThreads);
  std::atomic<int> next_status{0};
  std::latch go(kPulls + kStatusThreads + 1);  // all threads start together

  std::vector<std::thread> threads;
  for (int i = 0; i < kPulls; ++i) {
    threads.emplace_back([&, i] {
      runtime::v1::PullImageRequest req;
      req.mutable_image()->set_image(repos[static_cast<size_t>(i % kImages)]);
      auto* md = req.mutable_sandbox_config()->mutable_metadata();
      md->set_name("load-" + std::to_string(i));
      md->set_uid("uid-load-" + std::to_string(i));
      md->set_namespace_("default");
      runtime::v1::PullImageResponse resp;
      go.arrive_and_wait();
      auto t0 = Clock::now();
      PullResult& r = pulls[static_cast<size_t>(i)];
      r.status = client_->PullImage(req, &resp, 120s);
      r.ms = MsSince(t0);
      r.image_ref = resp.image_ref();
    });
  }
  for (int t = 0; t < kStatusThreads; ++t) {
    threads.emplace_back([&, t] {
      StatusLog& log = status_logs[static_cast<size_t>(t)];
      go.arrive_and_wait();
      for (int i = next_status.fetch_add(1); i < kStatusCalls; i = next_status.fetch_add(1)) {
        // A third each: a hit, a miss (a docker.io name: the daemon checks for a mirror-named
        // copy first), and an image being pulled right now (either answer is fine).
        const int kind = i % 3;
        std::string image = kind == 0   ? hit
                            : kind == 1 ? base + "-absent-" + std::to_string(i)
                                        : repos[static_cast<size_t>(i % kImages)];
        runtime::v1::ImageStatusResponse resp;
        auto t0 = Clock::now();
        grpc::Status s = client_->ImageStatus(image, false, &resp, 30s);
        log.ms.push_back(MsSince(t0));
        std::string bad;
        if (!s.ok()) {
          bad = GrpcStatusText(s);
        } else if (kind == 0 && resp.image().id() != image_id) {
          bad = "hit missed";
        } else if (kind == 1 && resp.has_image()) {
          bad = "miss found " + resp.image().id();
        } else if (kind == 2 && resp.has_image() && resp.image().id() != image_id) {
          bad = "wrong id " + resp.image().id();
        }
        if (!bad.empty()) log.failures.push_back(image + ": " + bad);
      }
    });
  }
  go.arrive_and_wait();
  const auto t0 = Clock::now();
  for (auto& th : threads) th.join();
  const double wall_ms = MsSince(t0);

  std::vector<double> pull_ms, status_ms;
  std::vector<std::string> failures;
  for (const auto& r : pulls) {
    pull_ms.push_back(r.ms);
    if (!r.status.ok()) {
      failures.push_back("pull: " + GrpcStatusText(r.status));
    } else if (r.image_ref != image_id) {
      failures.push_back("pull: image_ref " + r.image_ref);
    }
  }
  for (const auto& l : status_logs) {
    status_ms.insert(status_ms.end(), l.ms.begin(), l.ms.end());
    failures.insert(failures.end(), l.failures.begin(), l.failures.end());
  }
  std::cout << "[ load ] " << kPulls << " PullImage (" << kImages << " images) + " << kStatusCalls
            << " ImageStatus (" << kStatusThreads << " threads) through the daemon: wall "
            << wall_ms / 1000 << " s\n"
            << "[ load ] PullImage   " << Percentiles(pull_ms) << "\n"
            << "[ load ] ImageStatus " << Percentiles(status_ms) << "\n";
  EXPECT_EQ(status_ms.size(), static_cast<size_t>(kStatusCalls));
  EXPECT_TRUE(failures.empty()) << failures.size() << " calls failed, e.g.\n" << Summary(failures);

  // Served by the mirror, and the node names each image as upstream would: no mirror name is
  // left behind by pulls that aliased the same image concurrently (those of pulls that found
  // the image already named linger 3 s first: PullServiceOptions::mirror_name_linger).
  std::vector<std::string> mirror_names;
  for (auto until = std::chrono::steady_clock::now() + 15s;;) {
    mirror_names.clear();
    for (const std::string& name : AllNames()) {
      if (name.starts_with(bed->mirror1->host() + "/" + base)) mirror_names.push_back(name);
    }
    if (mirror_names.empty() || std::chrono::steady_clock::now() > until) break;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(mirror_names.empty()) << Summary(mirror_names);
  for (const std::string& repo : repos) {
    EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u) << repo;
    EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u) << repo;
    EXPECT_THAT(ImageOf(*client_, repo).repo_tags(), Contains("docker.io/" + repo + ":latest"));
  }
}

TEST_F(ShimTest, HungMirrorDelaysNoOtherCall) {
  auto hole = bed->tb->AddBlackHole();  // accepts connections, never answers
  ASSERT_TRUE(hole.ok()) << hole.error();
  // A hit that involves no rule: the mirror-named copy of an image, pulled straight from
  // containerd (ImageStatus of a name no rule matches passes through).
  const std::string repo = Repo({bed->mirror1});
  const std::string present = bed->mirror1->host() + "/" + repo + ":latest";
  runtime::v1::PullImageRequest direct;
  direct.mutable_image()->set_image(present);
  runtime::v1::PullImageResponse direct_resp;
  ASSERT_TRUE(bed->ctrd->cri().PullImage(direct, &direct_resp, 60s).ok());
  StartDaemon(MirrorOnlyConfig((*hole)->host()));

  auto pull = std::async(std::launch::async, [&] {
    runtime::v1::PullImageRequest req;
    req.mutable_image()->set_image(repo);
    req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
    runtime::v1::PullImageResponse resp;
    auto t0 = Clock::now();
    grpc::Status s = client_->PullImage(req, &resp, 3s);
    return std::make_pair(s, MsSince(t0));
  });
  // Calls made while the pull hangs: each must be answered promptly.
  std::vector<double> version_ms, hit_ms, miss_ms;
  std::vector<std::string> failures;
  while (pull.wait_for(50ms) != std::future_status::ready) {
    runtime::v1::VersionResponse v;
    auto t0 = Clock::now();
    grpc::Status s = client_->Version(&v, 5s);
    version_ms.push_back(MsSince(t0));
    if (!s.ok()) failures.push_back("Version: " + GrpcStatusText(s));
    for (bool want_hit : {true, false}) {
      runtime::v1::ImageStatusResponse r;
      t0 = Clock::now();
      s = client_->ImageStatus(want_hit ? present : "rp/absent-during-hang", false, &r, 5s);
      (want_hit ? hit_ms : miss_ms).push_back(MsSince(t0));
      if (!s.ok()) failures.push_back("ImageStatus: " + GrpcStatusText(s));
      if (s.ok() && r.has_image() != want_hit) failures.push_back("ImageStatus: wrong answer");
    }
  }
  auto [status, pull_ms] = pull.get();
  std::cout << "[ hang ] pull ended after " << pull_ms << " ms: " << GrpcStatusText(status)
            << "\n[ hang ] Version during it          " << Percentiles(version_ms)
            << "\n[ hang ] ImageStatus hit during it  " << Percentiles(hit_ms)
            << "\n[ hang ] ImageStatus miss during it " << Percentiles(miss_ms) << "\n";
  // The liveness probe (node.mirrorProbeTimeout, 2 s by default) finds the mirror dead before
  // the caller's 3 s run out; with no fallback the pull fails at once with why, instead of
  // hanging until the caller's deadline.
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << GrpcStatusText(status);
  EXPECT_THAT(status.error_message(),
              HasSubstr("mirror " + (*hole)->host() + " skipped: probe http://" + (*hole)->host() +
                        "/v2/ failed: no answer within "));
  EXPECT_GE(pull_ms, 1900);
  EXPECT_LT(pull_ms, 5000);  // the 2 s probe timeout, plus a loaded (sanitizer) machine
  EXPECT_GE((*hole)->accepted(), 1u) << "the probe never reached the hung mirror\n" << DaemonLog();
  EXPECT_THAT(failures, ::testing::IsEmpty());
  EXPECT_GE(version_ms.size(), 10u);  // the calls did overlap the hang
  for (const auto* v : {&version_ms, &hit_ms, &miss_ms}) {
    ASSERT_FALSE(v->empty());
    EXPECT_LT(*std::max_element(v->begin(), v->end()), 1000.0);
  }
}

TEST_F(ShimTest, UnknownFieldsDoNotBreakARewrittenPull) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::PodSandboxConfig sandbox;
  sandbox.mutable_metadata()->set_namespace_("default");
  // ImageSpec{image, 99: "from-the-future", 98: 7} and PullImageRequest{..., 99: "..."}:
  // numbers the CRI does not use, as a newer kubelet's fields would look to the daemon.
  const std::string spec =
      LengthDelimited(1, repo) + LengthDelimited(99, "from-the-future") + VarintField(98, 7);
  const std::string request = LengthDelimited(1, spec) +
                              LengthDelimited(3, sandbox.SerializeAsString()) +
                              LengthDelimited(99, "top-level-unknown");
  runtime::v1::PullImageRequest parsed;  // the encoding is what it should be
  ASSERT_TRUE(parsed.ParseFromString(request));
  ASSERT_EQ(parsed.image().image(), repo);
  ASSERT_EQ(parsed.image().GetReflection()->GetUnknownFields(parsed.image()).field_count(), 2);

  std::string response;
  grpc::Status s =
      RawUnary("unix://" + socket_, "/runtime.v1.ImageService/PullImage", request, &response, 60s);
  ASSERT_TRUE(s.ok()) << GrpcStatusText(s) << "\n" << DaemonLog();
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(resp.ParseFromString(response));
  EXPECT_FALSE(resp.image_ref().empty());
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
  runtime::v1::Image img = ImageOf(*client_, repo);
  EXPECT_EQ(img.id(), resp.image_ref());
  EXPECT_THAT(img.repo_tags(), Contains("docker.io/" + repo + ":latest"));
}

}  // namespace
}  // namespace rp_testbed
