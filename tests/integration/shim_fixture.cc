#include "shim_fixture.h"

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

namespace rp_testbed {

namespace fs = std::filesystem;
using registry_proxy::GrpcCriClient;
using namespace std::chrono_literals;

Bed* bed = nullptr;

void ShimTest::SetUpTestSuite() {
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

void ShimTest::TearDownTestSuite() {
  delete bed;
  bed = nullptr;
}

void ShimTest::SetUp() {
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

std::string ShimTest::Repo(std::vector<Registry*> to) {
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

void ShimTest::WriteConfig(const std::string& yaml) {
  // Write then rename: the daemon watches the dir and must never read half a file.
  std::ofstream(dir_ + "/config.yaml.tmp") << yaml;
  fs::rename(dir_ + "/config.yaml.tmp", dir_ + "/config.yaml");
}

std::string ShimTest::MirrorConfig(std::vector<std::string> mirrors, const std::string& extra) {
  std::string y = "excludeNamespaces: [kube-system]\nrules:\n  - match: docker.io\n    mirrors:\n";
  for (auto& m : mirrors) y += "      - " + m + "\n";
  return y + extra;
}

void ShimTest::StartDaemon(const std::string& config_yaml) {
  WriteConfig(config_yaml);
  socket_ = dir_ + "/rp.sock";
  std::vector<std::string> argv = {RP_BINARY,     "serve",
                                   "--config",    dir_ + "/config.yaml",
                                   "--listen",    "unix://" + socket_,
                                   "--upstream",  bed->ctrd->endpoint(),
                                   "--log-level", "debug",
                                   "--grace",     "2"};
  argv.insert(argv.end(), daemon_args_.begin(), daemon_args_.end());  // later flags win
  Status s = daemon_.Spawn(argv, dir_ + "/daemon.log");
  ASSERT_TRUE(s.ok()) << s.message();
  // Connect once the socket exists: a channel that found no socket backs off before retrying.
  ASSERT_TRUE(WaitFor([&] { return fs::exists(socket_); }, 15s, 10ms))
      << TailFile(dir_ + "/daemon.log");
  auto c = GrpcCriClient::Connect("unix://" + socket_);
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

void ShimTest::StopDaemon() {
  if (daemon_.pid() > 0) {
    daemon_.Stop();
    daemon_log_tail_ = TailFile(dir_ + "/daemon.log", 40);
  }
}

grpc::Status ShimTest::Pull(const std::string& image, const std::string& ns,
                            runtime::v1::PullImageResponse* out, bool with_auth) {
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

runtime::v1::Image ShimTest::ImageOf(GrpcCriClient& c, const std::string& image) {
  runtime::v1::ImageStatusResponse r;
  grpc::Status s = c.ImageStatus(image, false, &r);
  EXPECT_TRUE(s.ok()) << registry_proxy::GrpcStatusText(s);
  return r.image();
}

std::vector<std::string> ShimTest::AllNames() {
  runtime::v1::ListImagesResponse r;
  EXPECT_TRUE(bed->ctrd->cri().ListImages(&r).ok());
  std::vector<std::string> names;
  for (const auto& img : r.images()) {
    for (const auto& t : img.repo_tags()) names.push_back(t);
    for (const auto& d : img.repo_digests()) names.push_back(d);
  }
  return names;
}

}  // namespace rp_testbed
