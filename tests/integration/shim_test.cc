// The shim end to end: the real `registry-proxy serve` binary between a CRI client and a real
// containerd, with real registries as "upstream" (reachable as docker.io) and mirrors.
#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "base/string_util.h"
#include "fault_server.h"
#include "grpc_cri_client.h"
#include "rules/config.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using registry_proxy::GrpcCriClient;
using rp_testbed::ContainerdUnderTest;
using rp_testbed::FaultServer;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;
using namespace std::chrono_literals;

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
  for (GrpcCriClient* c : {client_.get(), &bed->ctrd->cri()}) {
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

// kubelet re-pulls present images (imagePullPolicy: Always): the second pull finds the upstream
// names already pointing at the image, writes none, and drops containerd's new mirror names
// after they lingered (PullServiceOptions::mirror_name_linger).
TEST_F(ShimTest, RePullOfAPresentImageKeepsItsNamesAndDropsTheMirrorNames) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  runtime::v1::PullImageResponse first, second;
  ASSERT_TRUE(Pull(repo, "default", &first).ok()) << DaemonLog();
  ASSERT_TRUE(Pull(repo, "default", &second).ok()) << DaemonLog();
  EXPECT_EQ(second.image_ref(), first.image_ref());
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 2u) << "containerd asked the mirror again";
  runtime::v1::Image img = ImageOf(*client_, repo);
  EXPECT_EQ(img.id(), first.image_ref());
  EXPECT_THAT(img.repo_tags(), Contains("docker.io/" + repo + ":latest"));
  auto mirror_names = [&] {
    int n = 0;
    for (const std::string& name : AllNames())
      n += name.find(bed->mirror1->host()) != std::string::npos;
    return n;
  };
  const auto until = std::chrono::steady_clock::now() + 15s;  // they linger 3 s
  while (mirror_names() > 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(mirror_names(), 0) << DaemonLog();
}

// The shipped default points at third-party mirrors: serve says so once at start, naming where
// pulls go; with a config of the operator's own it says nothing of the kind.
TEST_F(ShimTest, TheBuiltInDefaultConfigIsAnnouncedWithWherePullsGo) {
  StartDaemon(std::string(registry_proxy::BuiltinConfigYaml()));
  EXPECT_THAT(DaemonLog(), HasSubstr("is the built-in default: pulls go to third-party mirrors "
                                     "(docker.io -> docker.ketches.cn"));
  StopDaemon();
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  const std::string log = DaemonLog();  // both runs: look at the second
  EXPECT_THAT(log.substr(log.rfind("applied: generation 1")), Not(HasSubstr("built-in default")));
}

// staleIfError with real registries stopped mid-test: the image pulled earlier keeps the pod
// starting (imagePullPolicy: Always); without it, containerd's error comes back.
TEST_F(ShimTest, StaleIfErrorServesThePresentImageWhileEveryRegistryIsDown) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}, "staleIfError: true\n"));
  runtime::v1::PullImageResponse first;
  ASSERT_TRUE(Pull(repo, "default", &first).ok()) << DaemonLog();
  bed->mirror1->Stop();
  bed->upstream->Stop();
  runtime::v1::PullImageResponse stale;
  grpc::Status s = Pull(repo, "default", &stale);
  const std::string log = DaemonLog();
  StopDaemon();
  StartDaemon(MirrorConfig({bed->mirror1->host()}));  // staleIfError off
  grpc::Status off = Pull(repo, "default");
  ASSERT_TRUE(bed->mirror1->Start().ok());
  ASSERT_TRUE(bed->upstream->Start().ok());
  ASSERT_TRUE(s.ok()) << log;
  EXPECT_EQ(stale.image_ref(), first.image_ref());
  EXPECT_THAT(log, HasSubstr("staleIfError: answering with the image on the node"));
  EXPECT_FALSE(off.ok());
  EXPECT_THAT(off.error_message(), HasSubstr("connection refused"));
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

// The caller gets upstream's code, and its message whole after what happened at each mirror.
TEST_F(ShimTest, EverythingDeadReturnsUpstreamErrorAfterWhatHappenedAtEachMirror) {
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
  EXPECT_THAT(via.error_message(), ::testing::StartsWith("mirror " + Dead() + ": skipped (probe "));
  EXPECT_THAT(via.error_message(),
              ::testing::EndsWith("; upstream quay.io: " + direct.error_message()));
  EXPECT_THAT(DaemonLog(), HasSubstr(Dead()));  // the mirror was tried first
}

// credentialedPulls: mirror (the default): a pull with kubelet's credentials is served by the
// mirror, anonymously.
TEST_F(ShimTest, CredentialedPullsAreMirrored) {
  std::string repo = Repo({bed->upstream, bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  ASSERT_TRUE(Pull(repo, "default", nullptr, /*with_auth=*/true).ok()) << DaemonLog();
  EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u);
  EXPECT_THAT(DaemonLog(), Not(HasSubstr("s3cret-planted")));
}

// On the wire: a mirror that demands credentials (401 with a Basic challenge, to which
// containerd answers with any it has) gets none of the caller's; the pull then goes upstream
// with them. The planted secret appears in no byte the mirror received, plain or base64.
TEST_F(ShimTest, TheCallersCredentialsNeverReachAMirrorOnTheWire) {
  std::string repo = Repo({bed->upstream});
  FaultServer challenging(FaultServer::Behavior::kOk, FaultServer::Behavior::kUnauthorized);
  ASSERT_TRUE(challenging.Start().ok());
  StartDaemon(MirrorConfig({challenging.host()}));
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(Pull(repo, "default", &resp, /*with_auth=*/true).ok()) << DaemonLog();
  EXPECT_GE(bed->upstream->ManifestRequests(repo), 1u) << "served upstream, with them";
  ASSERT_GE(challenging.PullRequests(), 1u) << "the mirror was asked (and challenged)";
  const std::string basic = registry_proxy::Base64Encode("alice:s3cret-planted");
  for (const auto& r : challenging.Requests()) {
    EXPECT_THAT(r.head, Not(HasSubstr("s3cret-planted"))) << r.head;
    EXPECT_THAT(r.head, Not(HasSubstr(basic))) << r.head;
    EXPECT_THAT(r.head, Not(HasSubstr("alice"))) << r.head;
  }
  EXPECT_THAT(DaemonLog(), Not(HasSubstr("s3cret-planted")));
  // The same challenge, with the credentials upstream only: credentialedPulls upstream sends
  // such a pull nowhere else.
  StopDaemon();
  const size_t asked = challenging.PullRequests();
  StartDaemon(MirrorConfig({challenging.host()}, "credentialedPulls: upstream\n"));
  ASSERT_TRUE(Pull(repo, "default", nullptr, /*with_auth=*/true).ok()) << DaemonLog();
  EXPECT_EQ(challenging.PullRequests(), asked);
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

// The ImageStatus miss kubelet asks before every first pull: with the daemon's image index in
// sync (containerd's events), a rewritten image with no mirror copy on the node is answered as
// the miss it is without looking for copies; a copy that appears later (pulled straight through
// containerd: an event) is found and named.
TEST_F(ShimTest, StatusMissAsksForNoCopyUnlessTheIndexHasOne) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  auto wait_for = [&](auto done) {
    for (auto until = std::chrono::steady_clock::now() + 10s; !done();) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(20ms);
    }
    return true;
  };
  ASSERT_TRUE(wait_for([&] {
    return DaemonLog().find("image index: following") != std::string::npos;
  })) << DaemonLog();
  EXPECT_TRUE(ImageOf(*client_, repo).id().empty()) << "not on the node";
  EXPECT_EQ(DaemonLog().find("looking for a mirror copy"), std::string::npos) << DaemonLog();

  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(bed->mirror1->host() + "/" + repo + ":latest");
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(bed->ctrd->cri().PullImage(req, &resp, 60s).ok());
  // The create event reaches the index a moment later.
  EXPECT_TRUE(wait_for([&] { return ImageOf(*client_, repo).id() == resp.image_ref(); }))
      << DaemonLog();
  EXPECT_NE(DaemonLog().find("looking for a mirror copy"), std::string::npos) << DaemonLog();
  EXPECT_THAT(ImageOf(*client_, repo).repo_tags(), Contains("docker.io/" + repo + ":latest"));
}

// containerd 1.6 and 1.7 serve CRI v1alpha2 (kubelet 1.20-1.25); 2.x dropped it and answers
// UNIMPLEMENTED, which must reach the caller unchanged.
TEST_F(ShimTest, V1alpha2PullIsRewrittenToo) {
  std::string repo = Repo({bed->mirror1});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  // The v1alpha2 messages carry the same field numbers: encode a v1 message, call v1alpha2.
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(repo);
  req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
  const std::string bytes = req.SerializeAsString();
  auto call = [&](const std::string& socket) {
    auto channel = grpc::CreateChannel("unix://" + socket, grpc::InsecureChannelCredentials());
    grpc::GenericStub stub(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 60s);
    grpc::Slice slice(bytes);
    grpc::ByteBuffer in(&slice, 1), out;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, "/runtime.v1alpha2.ImageService/PullImage", grpc::StubOptions(), &in, &out,
                   [&](grpc::Status s) { done.set_value(s); });
    return done.get_future().get();
  };
  grpc::Status s = call(socket_);
  if (ContainerdUnderTest().major() >= 2) {
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNIMPLEMENTED) << registry_proxy::GrpcStatusText(s);
    const grpc::Status direct = call(bed->ctrd->socket_path());
    EXPECT_EQ(direct.error_code(), grpc::StatusCode::UNIMPLEMENTED)
        << registry_proxy::GrpcStatusText(direct);
    EXPECT_EQ(s.error_message(), direct.error_message());
    EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u);
    return;
  }
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
