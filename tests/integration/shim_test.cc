// The shim end to end: the real `registry-proxy serve` binary between a CRI client and a real
// containerd, with real registries as "upstream" (reachable as docker.io) and mirrors.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "cri_client.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using registry_proxy::CriClient;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

// One testbed for the suite: containerd and registries take seconds to start.
struct Bed {
  std::unique_ptr<Testbed> tb;
  Registry* upstream = nullptr;  // serves as docker.io
  Registry* mirror1 = nullptr;
  Registry* mirror2 = nullptr;
  Containerd* ctrd = nullptr;
  int dead_port = 0;  // refuses connections
};
Bed* bed = nullptr;

class ShimTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!SkipReason().empty()) return;
    auto tb = Testbed::Create();
    ASSERT_TRUE(tb.ok()) << tb.error();
    bed = new Bed;
    bed->tb = std::move(tb).value();
    auto up = bed->tb->AddRegistry("upstream");
    auto m1 = bed->tb->AddRegistry("mirror1");
    auto m2 = bed->tb->AddRegistry("mirror2");
    ASSERT_TRUE(up.ok() && m1.ok() && m2.ok());
    bed->upstream = *up;
    bed->mirror1 = *m1;
    bed->mirror2 = *m2;
    ContainerdOptions o;
    o.host_map["docker.io"] = bed->upstream->host();
    auto c = bed->tb->StartContainerd(o);
    ASSERT_TRUE(c.ok()) << c.error();
    bed->ctrd = *c;
    auto port = PickFreePort();
    ASSERT_TRUE(port.ok());
    bed->dead_port = *port;
  }
  static void TearDownTestSuite() {
    delete bed;
    bed = nullptr;
  }

  void SetUp() override {
    std::string why = SkipReason();
    if (!why.empty()) {
      if (IntegrationRequired()) FAIL() << why;
      GTEST_SKIP() << why;
    }
    ASSERT_NE(bed, nullptr);
    ASSERT_NE(bed->ctrd, nullptr);
    dir_ = bed->tb->dir() + "/" + ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::create_directories(dir_);
    for (Registry* r : {bed->upstream, bed->mirror1, bed->mirror2}) r->ResetRequests();
  }
  void TearDown() override { StopDaemon(); }

  std::string Dead() const { return "127.0.0.1:" + std::to_string(bed->dead_port); }

  // A unique repository per test, pushed to the given registries.
  std::string Repo(std::vector<Registry*> to) {
    std::string repo =
        "rp/" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name());
    for (char& c : repo) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (Registry* r : to) {
      auto d = bed->tb->PushTestImage(r, repo);
      EXPECT_TRUE(d.ok()) << d.error();
      if (d.ok()) digest_ = *d;
    }
    for (Registry* r : {bed->upstream, bed->mirror1, bed->mirror2}) r->ResetRequests();
    return repo;
  }

  void WriteConfig(const std::string& yaml) {
    std::ofstream(dir_ + "/config.yaml.tmp") << yaml;
    fs::rename(dir_ + "/config.yaml.tmp", dir_ + "/config.yaml");
  }

  // docker.io -> the given mirrors; kube-system excluded.
  std::string MirrorConfig(std::vector<std::string> mirrors, const std::string& extra = "") {
    std::string y =
        "excludeNamespaces: [kube-system]\nrules:\n  - match: docker.io\n    mirrors:\n";
    for (auto& m : mirrors) y += "      - " + m + "\n";
    return y + extra;
  }

  void StartDaemon(const std::string& config_yaml) {
    WriteConfig(config_yaml);
    socket_ = dir_ + "/rp.sock";
    Status s = daemon_.Spawn(
        {RP_BINARY, "serve", "--config", dir_ + "/config.yaml", "--listen", "unix://" + socket_,
         "--upstream", bed->ctrd->endpoint(), "--log-level", "debug", "--grace", "2"},
        dir_ + "/daemon.log");
    ASSERT_TRUE(s.ok()) << s.message();
    // Connect once the socket exists: a channel that found no socket backs off before retrying.
    ASSERT_TRUE(WaitFor([&] { return fs::exists(socket_); }, 15s, 10ms))
        << TailFile(dir_ + "/daemon.log");
    auto c = CriClient::Connect("unix://" + socket_);
    ASSERT_TRUE(c.ok());
    client_ = std::move(c).value();
    bool up = WaitFor(
        [&] {
          runtime::v1::VersionResponse v;
          return client_->Version(&v, 1s).ok();
        },
        15s, 50ms);
    ASSERT_TRUE(up) << "daemon did not answer\n" << TailFile(dir_ + "/daemon.log");
  }
  void StopDaemon() {
    if (daemon_.pid() > 0) {
      daemon_.Stop();
      auto st = daemon_.ExitDescription();
      daemon_log_tail_ = TailFile(dir_ + "/daemon.log", 40);
    }
  }

  grpc::Status Pull(const std::string& image, const std::string& ns,
                    runtime::v1::PullImageResponse* out = nullptr, bool with_auth = false) {
    runtime::v1::PullImageRequest req;
    req.mutable_image()->set_image(image);
    if (!ns.empty()) {
      auto* md = req.mutable_sandbox_config()->mutable_metadata();
      md->set_name("pod-" + ns);
      md->set_uid("uid-1");
      md->set_namespace_(ns);
    }
    if (with_auth) {
      req.mutable_auth()->set_username("alice");
      req.mutable_auth()->set_password("s3cret-planted");
    }
    runtime::v1::PullImageResponse resp;
    grpc::Status s = client_->PullImage(req, out ? out : &resp, 60s);
    if (!s.ok()) std::cerr << "pull " << image << ": " << registry_proxy::GrpcStatusText(s) << "\n";
    return s;
  }

  runtime::v1::Image ImageOf(CriClient& c, const std::string& image) {
    runtime::v1::ImageStatusResponse r;
    grpc::Status s = c.ImageStatus(image, false, &r);
    EXPECT_TRUE(s.ok()) << registry_proxy::GrpcStatusText(s);
    return r.image();
  }

  std::vector<std::string> AllNames() {
    runtime::v1::ListImagesResponse r;
    EXPECT_TRUE(bed->ctrd->cri().ListImages(&r).ok());
    std::vector<std::string> names;
    for (const auto& img : r.images()) {
      for (const auto& t : img.repo_tags()) names.push_back(t);
      for (const auto& d : img.repo_digests()) names.push_back(d);
    }
    return names;
  }

  std::string DaemonLog() { return TailFile(dir_ + "/daemon.log", 200); }

  std::string dir_, socket_, digest_, daemon_log_tail_;
  Process daemon_;
  std::unique_ptr<CriClient> client_;
};

TEST_F(ShimTest, MirrorServesAndNodeLooksAsIfUpstreamHad) {
  std::string repo = Repo({bed->mirror1});  // only the mirror has it
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(Pull(repo, "default", &resp).ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);

  std::string original = "docker.io/" + repo + ":latest";
  // Through the daemon and straight from containerd: found by the original name, with only
  // upstream names (so pod status equals spec, and kubelet does not pull again).
  for (CriClient* c : {client_.get(), &bed->ctrd->cri()}) {
    runtime::v1::Image img = ImageOf(*c, repo);
    ASSERT_FALSE(img.id().empty()) << c->endpoint();
    EXPECT_EQ(img.id(), resp.image_ref());
    // Every test pushes the same image under its own name, so the id carries other tests'
    // names too: look at this test's.
    EXPECT_THAT(img.repo_tags(), Contains(original));
    EXPECT_THAT(img.repo_digests(), Contains("docker.io/" + repo + "@" + digest_));
  }
  for (const std::string& name : AllNames()) {
    EXPECT_THAT(name, Not(HasSubstr(bed->mirror1->host()))) << name;
  }
}

TEST_F(ShimTest, ExcludedNamespacePullsUpstream) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  ASSERT_TRUE(Pull(repo, "kube-system").ok()) << DaemonLog();
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u);
}

TEST_F(ShimTest, DisabledThenEnabledWhileRunning) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon("enabled: false\n" + MirrorConfig({bed->mirror1->host()}));
  ASSERT_TRUE(Pull(repo + ":latest", "default").ok()) << DaemonLog();
  EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u);
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);

  // The config changes under the running daemon; the next pull follows it.
  ASSERT_TRUE(bed->ctrd->cri().RemoveImage("docker.io/" + repo + ":latest").ok());
  WriteConfig("enabled: true\n" + MirrorConfig({bed->mirror1->host()}));
  ASSERT_TRUE(WaitFor([&] { return DaemonLog().find("generation 2") != std::string::npos; }, 10s))
      << DaemonLog();
  bed->upstream->ResetRequests();
  ASSERT_TRUE(Pull(repo + ":latest", "default").ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
}

TEST_F(ShimTest, PullByDigestKeepsTheDigest) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  std::string by_digest = repo + "@" + digest_;
  ASSERT_TRUE(Pull(by_digest, "default").ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  runtime::v1::Image img = ImageOf(*client_, by_digest);
  ASSERT_FALSE(img.id().empty());
  EXPECT_THAT(img.repo_digests(), Contains("docker.io/" + repo + "@" + digest_));
  // A digest pull names no tag, as upstream's would.
  for (const auto& t : img.repo_tags()) EXPECT_THAT(t, Not(HasSubstr(repo))) << t;
}

TEST_F(ShimTest, PullWithoutSandboxConfigFollowsPolicy) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));  // default policy: rewrite
  ASSERT_TRUE(Pull(repo, "").ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
}

TEST_F(ShimTest, PassthroughPolicyForPullsWithoutNamespace) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(
      MirrorConfig({bed->mirror1->host()}, "pullsWithoutNamespace:\n  policy: passthrough\n"));
  ASSERT_TRUE(Pull(repo, "").ok()) << DaemonLog();
  EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u);
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
}

TEST_F(ShimTest, FirstMirrorDeadSecondServes) {
  std::string repo = Repo({bed->mirror2});
  StartDaemon(MirrorConfig({Dead(), bed->mirror2->host()}));
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  EXPECT_GE(bed->mirror2->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
  EXPECT_THAT(ImageOf(*client_, repo).repo_tags(), Contains("docker.io/" + repo + ":latest"));
}

TEST_F(ShimTest, AllMirrorsDeadUpstreamServes) {
  std::string repo = Repo({bed->upstream});
  StartDaemon(MirrorConfig({Dead(), "127.0.0.1:9"}));
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
}

TEST_F(ShimTest, EverythingDeadReturnsUpstreamErrorUnchanged) {
  // quay.io is pinned to a closed port; its mirror is dead too.
  StartDaemon("rules:\n  - match: quay.io\n    mirrors: [" + Dead() + "]\n");
  std::string image = "quay.io/rp/nowhere:1";
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(image);
  runtime::v1::PullImageResponse resp;
  grpc::Status direct = bed->ctrd->cri().PullImage(req, &resp, 60s);
  grpc::Status via = Pull(image, "default");
  ASSERT_FALSE(direct.ok());
  EXPECT_EQ(via.error_code(), direct.error_code());
  EXPECT_EQ(via.error_message(), direct.error_message());
  EXPECT_THAT(DaemonLog(), HasSubstr(Dead()));  // the mirror was tried first
}

TEST_F(ShimTest, CredentialsAreNeverSentToAMirror) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  ASSERT_TRUE(Pull(repo, "default", nullptr, /*with_auth=*/true).ok()) << DaemonLog();
  EXPECT_EQ(bed->mirror1->Requests().size(), 0u);
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u);
  EXPECT_THAT(DaemonLog(), Not(HasSubstr("s3cret-planted")));
}

TEST_F(ShimTest, RemoveByIdRemovesEveryName) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}, "node:\n  keepMirrorNames: true\n"));
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(Pull(repo, "default", &resp).ok()) << DaemonLog();
  runtime::v1::Image img = ImageOf(*client_, repo);
  // With keepMirrorNames the mirror's names stay next to the upstream ones.
  EXPECT_THAT(img.repo_tags(), Contains("docker.io/" + repo + ":latest"));
  EXPECT_THAT(img.repo_tags(), Contains(bed->mirror1->host() + "/" + repo + ":latest"));
  ASSERT_TRUE(client_->RemoveImage(resp.image_ref()).ok());
  for (const std::string& name : AllNames()) EXPECT_THAT(name, Not(HasSubstr(repo)));
}

TEST_F(ShimTest, StatusRepairsAMirrorNamedImage) {
  // A mirror-named image already on the node (pulled before the daemon was installed).
  std::string repo = Repo({bed->mirror1});
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(bed->mirror1->host() + "/" + repo + ":latest");
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(bed->ctrd->cri().PullImage(req, &resp, 60s).ok());
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::Image img = ImageOf(*client_, repo);
  EXPECT_EQ(img.id(), resp.image_ref()) << DaemonLog();
  EXPECT_THAT(img.repo_tags(), Contains("docker.io/" + repo + ":latest"));
}

TEST_F(ShimTest, V1alpha2PullIsRewrittenToo) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  // The v1alpha2 messages carry the same field numbers: encode a v1 message, call v1alpha2.
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(repo);
  req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
  std::string bytes = req.SerializeAsString();
  auto channel = grpc::CreateChannel("unix://" + socket_, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + 60s);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer in(&slice, 1), out;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/runtime.v1alpha2.ImageService/PullImage", grpc::StubOptions(), &in, &out,
                 [&](grpc::Status s) { done.set_value(s); });
  grpc::Status s = done.get_future().get();
  ASSERT_TRUE(s.ok()) << registry_proxy::GrpcStatusText(s) << "\n" << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_THAT(ImageOf(*client_, repo).repo_tags(), Contains("docker.io/" + repo + ":latest"));
}

TEST_F(ShimTest, UnaryAndStreamingCallsPassThroughUnchanged) {
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::VersionResponse via, direct;
  ASSERT_TRUE(client_->Version(&via).ok());
  ASSERT_TRUE(bed->ctrd->cri().Version(&direct).ok());
  EXPECT_EQ(via.SerializeAsString(), direct.SerializeAsString());
  // GetContainerEvents (server-streaming): whatever containerd answers, the daemon answers.
  auto stream_status = [](const std::string& endpoint) {
    auto channel = grpc::CreateChannel(endpoint, grpc::InsecureChannelCredentials());
    grpc::GenericStub stub(channel);
    grpc::CompletionQueue cq;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 2s);
    auto call = stub.PrepareCall(&ctx, "/runtime.v1.RuntimeService/GetContainerEvents", &cq);
    void* tag;
    bool ok;
    call->StartCall(nullptr);
    cq.Next(&tag, &ok);
    grpc::Slice empty("");
    grpc::ByteBuffer req(&empty, 1);
    call->WriteLast(req, grpc::WriteOptions(), nullptr);
    cq.Next(&tag, &ok);
    grpc::ByteBuffer msg;
    call->Read(&msg, nullptr);
    cq.Next(&tag, &ok);
    grpc::Status s;
    call->Finish(&s, nullptr);
    cq.Next(&tag, &ok);
    return s;
  };
  grpc::Status d = stream_status(bed->ctrd->endpoint());
  grpc::Status v = stream_status("unix://" + socket_);
  EXPECT_EQ(v.error_code(), d.error_code());
  EXPECT_EQ(v.error_message(), d.error_message());
}

TEST_F(ShimTest, ContainerdRestartsUnderTheDaemon) {
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::VersionResponse v;
  ASSERT_TRUE(client_->Version(&v).ok());
  bed->ctrd->Stop();
  grpc::Status down = client_->Version(&v, 5s);
  EXPECT_EQ(down.error_code(), grpc::StatusCode::UNAVAILABLE) << down.error_message();
  ASSERT_TRUE(bed->ctrd->Start().ok());
  EXPECT_TRUE(WaitFor([&] { return client_->Version(&v, 1s).ok(); }, 10s, 50ms));
  EXPECT_TRUE(daemon_.Running());
}

TEST_F(ShimTest, SigtermStopsCleanly) {
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  kill(daemon_.pid(), SIGTERM);
  auto st = daemon_.Wait(10s);
  ASSERT_TRUE(st.has_value());
  EXPECT_TRUE(WIFEXITED(*st) && WEXITSTATUS(*st) == 0) << daemon_.ExitDescription();
  EXPECT_FALSE(fs::exists(socket_));
}

}  // namespace
}  // namespace rp_testbed
