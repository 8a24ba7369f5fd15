// The CRI client subcommands: argument handling, the requests they send and their output,
// against an in-process fake ImageService on a unix socket.
#include "commands/client_cmds.h"

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands/cli.h"
#include "containerd/cri_client.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.grpc.pb.h"

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using ::testing::Not;

const char kId[] = "sha256:1c765e240381d499ea40ac121054c39019fc619ceb103f70359299e1a4d5e404";
const char kDigest[] =
    "docker.io/library/"
    "busybox@sha256:844025b6f63a6fd2ad7537c64f7be901587122b98e1dafc03db1d18359fb79b8";

TEST(ParseDuration, UnitsAndErrors) {
  EXPECT_EQ(ParseDuration("30s"), milliseconds(30'000));
  EXPECT_EQ(ParseDuration("5m"), milliseconds(300'000));
  EXPECT_EQ(ParseDuration("1h"), milliseconds(3'600'000));
  EXPECT_EQ(ParseDuration("250ms"), milliseconds(250));
  EXPECT_EQ(ParseDuration("1.5"), milliseconds(1'500));
  for (const char* bad : {"", "s", "-1s", "10x", "1e9h", "nan", "5 m"}) {
    EXPECT_EQ(ParseDuration(bad), std::nullopt) << bad;
  }
}

TEST(HumanSize, DecimalUnitsLikeCrictl) {
  EXPECT_EQ(HumanSize(0), "0B");
  EXPECT_EQ(HumanSize(512), "512B");
  EXPECT_EQ(HumanSize(795'000), "795kB");
  EXPECT_EQ(HumanSize(1'084'042), "1.08MB");
  EXPECT_EQ(HumanSize(3'000'000'000ULL), "3GB");
}

TEST(NormalizeCriEndpoint, UnixOnly) {
  EXPECT_EQ(NormalizeCriEndpoint("/run/x.sock").value(), "unix:///run/x.sock");
  EXPECT_EQ(NormalizeCriEndpoint("unix:///run/x.sock").value(), "unix:///run/x.sock");
  EXPECT_EQ(NormalizeCriEndpoint("unix:/run/x.sock").value(), "unix:///run/x.sock");
  EXPECT_FALSE(NormalizeCriEndpoint("tcp://127.0.0.1:1").ok());
  EXPECT_FALSE(NormalizeCriEndpoint("run/x.sock").ok());
  EXPECT_FALSE(NormalizeCriEndpoint("").ok());
}

TEST(RpcStatusText, CodeNameThenMessageUnchanged) {
  EXPECT_EQ(RpcStatusText(RpcStatus(RpcCode::NOT_FOUND, "no such: x")), "NOT_FOUND: no such: x");
  EXPECT_EQ(RpcStatusText(RpcStatus(RpcCode::DEADLINE_EXCEEDED, "")), "DEADLINE_EXCEEDED");
  EXPECT_EQ(RpcCodeName(static_cast<RpcCode>(17)), "UNKNOWN_CODE");
}

TEST(ParseClientArgs, Defaults) {
  auto a = ParseClientArgs("pull", {"nginx"});
  ASSERT_TRUE(a.ok()) << a.error();
  EXPECT_EQ(a->endpoint, kDefaultCriEndpoint);
  EXPECT_EQ(a->positional, std::vector<std::string>{"nginx"});
  EXPECT_EQ(a->timeout, std::chrono::minutes(10));
  EXPECT_FALSE(a->namespace_name);
  EXPECT_FALSE(a->json);
  auto s = ParseClientArgs("status", {"nginx"});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->timeout, std::chrono::seconds(30));
}

TEST(ParseClientArgs, FlagForms) {
  auto a = ParseClientArgs("pull", {"-n", "team-a", "--endpoint=/tmp/c.sock", "--pod-name", "web",
                                    "--pod-uid=u-1", "--json", "--timeout", "90s", "x"});
  ASSERT_TRUE(a.ok()) << a.error();
  EXPECT_EQ(a->namespace_name, "team-a");
  EXPECT_EQ(a->endpoint, "unix:///tmp/c.sock");
  EXPECT_EQ(a->pod_name, "web");
  EXPECT_EQ(a->pod_uid, "u-1");
  EXPECT_TRUE(a->json);
  EXPECT_EQ(a->timeout, std::chrono::seconds(90));
  EXPECT_EQ(a->positional, std::vector<std::string>{"x"});
}

TEST(ParseClientArgs, UsageErrors) {
  struct Case {
    const char* cmd;
    std::vector<std::string> args;
    const char* says;
  };
  for (const Case& c : std::vector<Case>{
           {"pull", {"x", "--bogus"}, "unknown flag '--bogus'"},
           {"pull", {"x", "--namespace"}, "needs a value"},
           {"pull", {"x", "--json=yes"}, "takes no value"},
           {"pull", {"x", "--pod-name", "p"}, "need --namespace"},
           {"pull", {"x", "--namespace", ""}, "must not be empty"},
           {"pull", {"x", "--creds", "nopassword"}, "USER:PASSWORD"},
           {"pull", {"x", "--creds", ":pw"}, "USER:PASSWORD"},
           {"pull", {"x", "--timeout", "soon"}, "duration"},
           {"pull", {"x", "--timeout", "0s"}, "duration"},
           {"pull", {"x", "--endpoint", "tcp://1.2.3.4:5"}, "not a unix socket"},
           {"images", {"-n", "x"}, "unknown flag '-n'"},
           {"status", {"x", "--creds", "a:b"}, "unknown flag"},
           {"remove", {"x", "--verbose"}, "unknown flag"},
       }) {
    auto a = ParseClientArgs(c.cmd, c.args);
    ASSERT_FALSE(a.ok()) << c.cmd << " " << testing::PrintToString(c.args);
    EXPECT_THAT(a.error(), HasSubstr(c.says));
  }
}

TEST(ParseClientArgs, DashDashEndsFlags) {
  auto a = ParseClientArgs("status", {"--", "-weird"});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->positional, std::vector<std::string>{"-weird"});
}

TEST(BuildPullRequest, NoSandboxConfigWithoutNamespace) {
  auto a = ParseClientArgs("pull", {"nginx"});
  ASSERT_TRUE(a.ok());
  runtime::v1::PullImageRequest req = BuildPullRequest(*a);
  EXPECT_EQ(req.image().image(), "nginx");
  EXPECT_FALSE(req.has_sandbox_config());
  EXPECT_FALSE(req.has_auth());
}

TEST(BuildPullRequest, PodMetadataAndCreds) {
  auto a = ParseClientArgs("pull", {"nginx", "-n", "team-a", "--creds", "me:p:w"});
  ASSERT_TRUE(a.ok());
  runtime::v1::PullImageRequest req = BuildPullRequest(*a);
  ASSERT_TRUE(req.has_sandbox_config());
  const auto& md = req.sandbox_config().metadata();
  EXPECT_EQ(md.namespace_(), "team-a");
  EXPECT_EQ(md.name(), "registry-proxy-pull");
  EXPECT_EQ(md.uid().size(), 36u);  // a random UUID
  EXPECT_EQ(req.auth().username(), "me");
  EXPECT_EQ(req.auth().password(), "p:w");  // split at the first colon only
  // Two pulls get different uids.
  EXPECT_NE(BuildPullRequest(*ParseClientArgs("pull", {"x", "-n", "a"}))
                .sandbox_config()
                .metadata()
                .uid(),
            md.uid());
}

// ---------------------------------------------------------------------------------------------
// Against a fake ImageService.

class FakeImages final : public runtime::v1::ImageService::Service {
 public:
  grpc::Status PullImage(grpc::ServerContext*, const runtime::v1::PullImageRequest* req,
                         runtime::v1::PullImageResponse* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    last_pull = *req;
    if (!pull_error.ok()) return pull_error;
    resp->set_image_ref(kId);
    return grpc::Status::OK;
  }
  grpc::Status ImageStatus(grpc::ServerContext*, const runtime::v1::ImageStatusRequest* req,
                           runtime::v1::ImageStatusResponse* resp) override {
    std::lock_guard<std::mutex> lock(mu);
    last_status = *req;
    if (req->image().image() == "busybox" || req->image().image() == kId) {
      *resp->mutable_image() = Busybox();
      if (req->verbose()) (*resp->mutable_info())["info"] = "{\"x\":1}";
    }
    return grpc::Status::OK;
  }
  grpc::Status ListImages(grpc::ServerContext*, const runtime::v1::ListImagesRequest*,
                          runtime::v1::ListImagesResponse* resp) override {
    *resp->add_images() = Busybox();
    auto* untagged = resp->add_images();
    untagged->set_id("sha256:ffffffffffff0000000000000000000000000000000000000000000000000000");
    untagged->set_size(512);
    return grpc::Status::OK;
  }
  grpc::Status RemoveImage(grpc::ServerContext*, const runtime::v1::RemoveImageRequest* req,
                           runtime::v1::RemoveImageResponse*) override {
    std::lock_guard<std::mutex> lock(mu);
    removed.push_back(req->image().image());
    return grpc::Status::OK;
  }

  static runtime::v1::Image Busybox() {
    runtime::v1::Image img;
    img.set_id(kId);
    img.add_repo_tags("docker.io/library/busybox:latest");
    img.add_repo_tags("docker.io/library/busybox:1.35");
    img.add_repo_digests(kDigest);
    img.set_size(1'084'042);
    img.mutable_uid()->set_value(0);
    return img;
  }

  std::mutex mu;
  runtime::v1::PullImageRequest last_pull;
  runtime::v1::ImageStatusRequest last_status;
  std::vector<std::string> removed;
  grpc::Status pull_error = grpc::Status::OK;
};

class ClientCmdsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "rp-client-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    endpoint_ = "unix://" + dir_ + "/cri.sock";
    grpc::ServerBuilder b;
    b.AddListeningPort(endpoint_, grpc::InsecureServerCredentials());
    b.RegisterService(&fake_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    fs::remove_all(dir_);
  }

  struct Out {
    int code;
    std::string out, err;
  };
  Out Cli(std::vector<std::string> args, bool with_endpoint = true) {
    args.insert(args.begin(), "registry-proxy");
    if (with_endpoint) args.push_back("--endpoint=" + endpoint_);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    std::ostringstream out, err;
    int code = RunCli(static_cast<int>(argv.size()), argv.data(), out, err);
    return {code, out.str(), err.str()};
  }

  std::string dir_, endpoint_;
  FakeImages fake_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(ClientCmdsTest, PullWithoutNamespaceSendsNoSandboxConfig) {
  Out r = Cli({"pull", "busybox"});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(std::string("image id: ") + kId));
  EXPECT_THAT(r.out, HasSubstr("took:"));
  std::lock_guard<std::mutex> lock(fake_.mu);
  EXPECT_EQ(fake_.last_pull.image().image(), "busybox");
  EXPECT_FALSE(fake_.last_pull.has_sandbox_config());
}

TEST_F(ClientCmdsTest, PullWithNamespaceSendsPodMetadata) {
  Out r = Cli(
      {"pull", "busybox", "-n", "team-a", "--pod-name", "web-0", "--pod-uid", "uid-1", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["imageRef"], kId);
  EXPECT_EQ(j["pod"]["namespace"], "team-a");
  EXPECT_GE(j["seconds"].get<double>(), 0.0);
  std::lock_guard<std::mutex> lock(fake_.mu);
  const auto& md = fake_.last_pull.sandbox_config().metadata();
  EXPECT_EQ(md.namespace_(), "team-a");
  EXPECT_EQ(md.name(), "web-0");
  EXPECT_EQ(md.uid(), "uid-1");
}

TEST_F(ClientCmdsTest, PullErrorIsPrintedUnchanged) {
  {
    std::lock_guard<std::mutex> lock(fake_.mu);
    fake_.pull_error = grpc::Status(grpc::StatusCode::NOT_FOUND,
                                    "failed to resolve reference \"x\": x: not found");
  }
  Out r = Cli({"pull", "x"});
  EXPECT_EQ(r.code, 1);
  EXPECT_EQ(r.err, "pull: NOT_FOUND: failed to resolve reference \"x\": x: not found\n");
  EXPECT_EQ(r.out, "");
}

TEST_F(ClientCmdsTest, ImagesTable) {
  Out r = Cli({"images"});
  ASSERT_EQ(r.code, 0) << r.err;
  std::istringstream lines(r.out);
  std::string header, first, second, third;
  std::getline(lines, header);
  std::getline(lines, first);
  std::getline(lines, second);
  std::getline(lines, third);
  EXPECT_THAT(header, HasSubstr("IMAGE ID"));
  EXPECT_THAT(header, HasSubstr("REPO DIGESTS"));
  EXPECT_THAT(first, HasSubstr("1c765e240381"));
  EXPECT_THAT(first, Not(HasSubstr("1c765e240381d")));  // short ids
  EXPECT_THAT(first, HasSubstr("1.08MB"));
  EXPECT_THAT(first, HasSubstr("docker.io/library/busybox:latest"));  // the runtime's order
  EXPECT_THAT(first, HasSubstr(kDigest));
  EXPECT_THAT(second, HasSubstr("docker.io/library/busybox:1.35"));
  EXPECT_THAT(second, Not(HasSubstr("1c765e240381")));
  EXPECT_THAT(third, HasSubstr("ffffffffffff"));
  EXPECT_THAT(third, HasSubstr("<none>"));
}

TEST_F(ClientCmdsTest, ImagesJson) {
  Out r = Cli({"images", "--json"});
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["id"], kId);
  EXPECT_EQ(j[0]["repoDigests"][0], kDigest);
  EXPECT_EQ(j[0]["size"], 1'084'042);
  EXPECT_EQ(j[0]["uid"], 0);
  EXPECT_TRUE(j[1]["uid"].is_null());
}

TEST_F(ClientCmdsTest, StatusFoundAndMissing) {
  Out hit = Cli({"status", "busybox"});
  ASSERT_EQ(hit.code, 0) << hit.err;
  EXPECT_THAT(hit.out, HasSubstr(std::string("id:       ") + kId));
  EXPECT_THAT(hit.out, HasSubstr("tag:      docker.io/library/busybox:latest"));
  EXPECT_THAT(hit.out, HasSubstr("uid:      0"));

  Out miss = Cli({"status", "nginx"});
  EXPECT_EQ(miss.code, 1);
  EXPECT_THAT(miss.err, HasSubstr("image not found: nginx"));

  Out jmiss = Cli({"status", "nginx", "--json"});
  EXPECT_EQ(jmiss.code, 1);
  EXPECT_TRUE(nlohmann::json::parse(jmiss.out)["image"].is_null());

  Out verbose = Cli({"status", "busybox", "-v", "--json"});
  ASSERT_EQ(verbose.code, 0);
  EXPECT_EQ(nlohmann::json::parse(verbose.out)["info"]["info"], "{\"x\":1}");
  std::lock_guard<std::mutex> lock(fake_.mu);
  EXPECT_TRUE(fake_.last_status.verbose());
}

TEST_F(ClientCmdsTest, RemoveReportsNames) {
  Out r = Cli({"remove", kId});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr(std::string("removed:  ") + kId));
  EXPECT_THAT(r.out, HasSubstr("docker.io/library/busybox:latest"));
  Out absent = Cli({"remove", "nginx"});
  EXPECT_EQ(absent.code, 0);
  EXPECT_THAT(absent.out, HasSubstr("not present"));
  std::lock_guard<std::mutex> lock(fake_.mu);
  EXPECT_EQ(fake_.removed, (std::vector<std::string>{kId, "nginx"}));
}

TEST_F(ClientCmdsTest, UsageErrorsExit2) {
  EXPECT_EQ(Cli({"pull"}).code, 2);
  EXPECT_EQ(Cli({"pull", "a", "b"}).code, 2);
  EXPECT_EQ(Cli({"images", "extra"}).code, 2);
  Out r = Cli({"status", "x", "--nope"});
  EXPECT_EQ(r.code, 2);
  EXPECT_THAT(r.err, HasSubstr("unknown flag '--nope'"));
  EXPECT_THAT(r.err, HasSubstr("Usage: registry-proxy status"));
  Out h = Cli({"pull", "--help"}, false);
  EXPECT_EQ(h.code, 0);
  EXPECT_THAT(h.out, HasSubstr("--namespace"));
}

TEST_F(ClientCmdsTest, UnreachableEndpointIsUnavailable) {
  Out r = Cli({"images", "--endpoint", dir_ + "/nothing.sock", "--timeout", "1s"}, false);
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("images: UNAVAILABLE"));
}

}  // namespace
}  // namespace registry_proxy
