// ChannelKeeper (channel_keeper.h): poked, a channel connects and reconnects without any call;
// unpoked, it is left alone (no work while healthy); without one a channel stays idle.
#include "containerd/channel_keeper.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.grpc.pb.h"
#include "containerd/upstream_grpc.h"  // MakeUpstreamChannel: the daemon's channel settings

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

class ChannelKeeperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/rp-keeper-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/s.sock";
  }
  void TearDown() override {
    StopServer();
    fs::remove_all(dir_);
  }
  void StartServer() {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix://" + path_, grpc::InsecureServerCredentials());
    b.RegisterService(&service_);  // any service: every method answers UNIMPLEMENTED
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void StopServer() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
  }
  // Waits (bounded, as a failure guard only) for the channel to be READY without asking it to
  // connect.
  static bool BecomesReady(grpc::Channel& ch, std::chrono::seconds within) {
    const auto end = std::chrono::system_clock::now() + within;
    for (;;) {
      auto s = ch.GetState(false);
      if (s == GRPC_CHANNEL_READY) return true;
      if (!ch.WaitForStateChange(s, end)) return false;
    }
  }

  std::string dir_, path_;
  runtime::v1::ImageService::Service service_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(ChannelKeeperTest, WithoutAKeeperAChannelStaysIdle) {
  StartServer();
  auto ch = MakeUpstreamChannel(path_, 1 << 20);
  EXPECT_FALSE(BecomesReady(*ch, 2s)) << "a fresh channel connects only when asked";
}

TEST_F(ChannelKeeperTest, UnpokedItLeavesTheChannelAlone) {
  StartServer();
  auto ch = MakeUpstreamChannel(path_, 1 << 20);
  ChannelKeeper keeper(ch, 20ms);
  EXPECT_FALSE(BecomesReady(*ch, 2s)) << "the keeper connected without being asked";
}

TEST_F(ChannelKeeperTest, PokedItConnectsAndReconnectsWithoutCalls) {
  auto ch = MakeUpstreamChannel(path_, 1 << 20);
  ChannelKeeper keeper(ch, 20ms);
  keeper.Poke();  // before the server exists: its first attempts fail, it keeps at it
  StartServer();
  ASSERT_TRUE(BecomesReady(*ch, 30s));
  // The server goes away and comes back (a containerd restart): connected again, no call made.
  StopServer();
  unlink(path_.c_str());
  ASSERT_TRUE(ch->WaitForStateChange(GRPC_CHANNEL_READY, std::chrono::system_clock::now() + 30s))
      << "the channel never noticed the server going away";
  keeper.Poke();  // as the proxy does when a call fails UNAVAILABLE
  keeper.Poke();  // repeated pokes are harmless
  StartServer();
  EXPECT_TRUE(BecomesReady(*ch, 30s));
}

}  // namespace
}  // namespace registry_proxy
