// The fixture of the shim's end-to-end tests: the real `registry-proxy serve` binary between a
// CRI client and a real containerd, with real registries as "upstream" (reachable as docker.io)
// and mirrors. Shared by every shim test binary; each binary starts ONE testbed for its suite
// (containerd and three registries take seconds to start) and one daemon per test.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "grpc_cri_client.h"
#include "testbed.h"

namespace rp_testbed {

// The suite's testbed, created by ShimTest::SetUpTestSuite (null when the testbed cannot run).
struct Bed {
  std::unique_ptr<Testbed> tb;
  Registry* upstream = nullptr;  // serves as docker.io
  Registry* mirror1 = nullptr;
  Registry* mirror2 = nullptr;
  Containerd* ctrd = nullptr;
  int dead_port = 0;  // refuses connections
};
extern Bed* bed;

class ShimTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite();
  static void TearDownTestSuite();

  // Skips (or fails, with RP_REQUIRE_INTEGRATION=1) without a testbed; gives the test its own
  // dir under the testbed's and forgets earlier registry requests.
  void SetUp() override;
  void TearDown() override { StopDaemon(); }

  std::string Dead() const { return "127.0.0.1:" + std::to_string(bed->dead_port); }

  // A unique repository per test ("rp/<test name>"), pushed to the given registries; digest_
  // is its manifest digest.
  std::string Repo(std::vector<Registry*> to);

  void WriteConfig(const std::string& yaml);

  // docker.io -> the given mirrors; kube-system excluded.
  std::string MirrorConfig(std::vector<std::string> mirrors, const std::string& extra = "");

  // Starts the daemon on <dir_>/rp.sock in front of the testbed's containerd and connects
  // client_ once it answers Version.
  void StartDaemon(const std::string& config_yaml);
  void StopDaemon();

  // PullImage through the daemon (60 s), with pod metadata for namespace `ns` unless empty.
  grpc::Status Pull(const std::string& image, const std::string& ns,
                    runtime::v1::PullImageResponse* out = nullptr, bool with_auth = false);

  runtime::v1::Image ImageOf(registry_proxy::GrpcCriClient& c, const std::string& image);

  // Every repo tag and repo digest containerd knows (asked directly, not through the daemon).
  std::vector<std::string> AllNames();

  std::string DaemonLog() { return TailFile(dir_ + "/daemon.log", 200); }

  // More `serve` flags for StartDaemon, after the fixture's own (so they win).
  std::vector<std::string> daemon_args_;
  std::string dir_, socket_, digest_, daemon_log_tail_;
  Process daemon_;
  std::unique_ptr<registry_proxy::GrpcCriClient> client_;
};

}  // namespace rp_testbed
