// Socket activation: the relay (H2Relay) serving a listening socket it was given
// (ProxyOptions::listen_fd, as systemd's registry-proxy.socket passes it), and SdListenFd's checks
// of the environment. The upstream is a small real gRPC server on a unix socket answering
// RuntimeService.Version.
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <string>
#include <thread>

#include "base/sd_listen.h"
#include "cri/h2_relay.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.grpc.pb.h"

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class FakeRuntime final : public runtime::v1::RuntimeService::Service {
 public:
  grpc::Status Version(grpc::ServerContext*, const runtime::v1::VersionRequest*,
                       runtime::v1::VersionResponse* resp) override {
    resp->set_runtime_name("fake-containerd");
    return grpc::Status::OK;
  }
};

int ListenUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  EXPECT_GE(fd, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0) << strerror(errno);
  EXPECT_EQ(listen(fd, 128), 0);
  return fd;
}

class SocketActivationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/rp-sockact-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    grpc::ServerBuilder b;
    b.AddListeningPort("unix://" + (dir_ / "up.sock").string(), grpc::InsecureServerCredentials());
    b.RegisterService(&runtime_);
    upstream_ = b.BuildAndStart();
    ASSERT_NE(upstream_, nullptr);
    listen_fd_ = ListenUnix((dir_ / "rp.sock").string());
  }
  void TearDown() override {
    if (listen_fd_ >= 0) close(listen_fd_);
    if (upstream_) upstream_->Shutdown();
    fs::remove_all(dir_);
  }

  std::unique_ptr<H2Relay> NewProxy() {
    ProxyOptions o;
    o.listen = "unix://" + (dir_ / "ignored.sock").string();  // the inherited fd wins
    o.upstream = "unix://" + (dir_ / "up.sock").string();
    o.listen_fd = listen_fd_;
    return std::make_unique<H2Relay>(o, nullptr, nullptr);
  }

  // Version through the proxy's socket on a fresh connection. Default channel arguments: a
  // connection attempt may take 20 s (the handshake waits for whoever accepts), and the call
  // fails at once if the socket refuses the connection (no wait_for_ready).
  grpc::Status Version(runtime::v1::VersionResponse* resp) {
    grpc::ChannelArguments args;
    args.SetInt("grpc.use_local_subchannel_pool", 1);  // a connection of its own
    auto ch = grpc::CreateCustomChannel("unix://" + (dir_ / "rp.sock").string(),
                                        grpc::InsecureChannelCredentials(), args);
    auto stub = runtime::v1::RuntimeService::NewStub(ch);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    return stub->Version(&ctx, runtime::v1::VersionRequest(), resp);
  }

  fs::path dir_;
  FakeRuntime runtime_;
  std::unique_ptr<grpc::Server> upstream_;
  int listen_fd_ = -1;
};

TEST_F(SocketActivationTest, ServesTheInheritedSocket) {
  auto proxy = NewProxy();
  ASSERT_TRUE(proxy->Start().ok());
  EXPECT_EQ(proxy->socket_path(), (dir_ / "rp.sock").string());
  EXPECT_FALSE(fs::exists(dir_ / "ignored.sock"));
  runtime::v1::VersionResponse v;
  grpc::Status s = Version(&v);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(v.runtime_name(), "fake-containerd");
  proxy->Shutdown(std::chrono::milliseconds(0));
  // systemd's socket: neither unlinked nor closed by the daemon.
  EXPECT_TRUE(fs::exists(dir_ / "rp.sock"));
  int type = 0;
  socklen_t len = sizeof type;
  EXPECT_EQ(getsockopt(listen_fd_, SOL_SOCKET, SO_TYPE, &type, &len), 0);
}

// The point of socket activation: a connection made while no daemon runs (a restart) waits
// in the socket's backlog and is served by the next daemon, instead of being refused.
TEST_F(SocketActivationTest, ACallMadeDuringARestartIsServedByTheNextDaemon) {
  auto first = NewProxy();
  ASSERT_TRUE(first->Start().ok());
  runtime::v1::VersionResponse v;
  ASSERT_TRUE(Version(&v).ok());
  first->Shutdown(std::chrono::milliseconds(0));
  first.reset();

  // No daemon now. The call connects (the kernel queues it) and waits for the handshake.
  auto call = std::async(std::launch::async, [&] {
    runtime::v1::VersionResponse resp;
    grpc::Status s = Version(&resp);
    return std::make_pair(s, resp.runtime_name());
  });
  // Give the call a moment to be queued before the next daemon exists (ordering only: the
  // assertion below holds however long this takes).
  EXPECT_EQ(call.wait_for(std::chrono::milliseconds(300)), std::future_status::timeout)
      << "the call ended while no daemon was serving";
  auto second = NewProxy();
  ASSERT_TRUE(second->Start().ok());
  auto [status, name] = call.get();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(name, "fake-containerd");
  second->Shutdown(std::chrono::milliseconds(0));
}

// Without an inherited socket the daemon binds its own and removes it on shutdown: a call
// made after that is refused at once (what socket activation avoids).
TEST_F(SocketActivationTest, WithoutItACallDuringARestartFails) {
  close(listen_fd_);
  listen_fd_ = -1;
  fs::remove(dir_ / "rp.sock");
  ProxyOptions o;
  o.listen = "unix://" + (dir_ / "rp.sock").string();
  o.upstream = "unix://" + (dir_ / "up.sock").string();
  H2Relay proxy(o, nullptr, nullptr);
  ASSERT_TRUE(proxy.Start().ok());
  proxy.Shutdown(std::chrono::milliseconds(0));
  runtime::v1::VersionResponse v;
  grpc::Status s = Version(&v);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(SdListenFdTest, EnvironmentChecks) {
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  auto r = SdListenFd();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, -1);

  // Meant for another process (e.g. our parent): ignored, and not passed on.
  setenv("LISTEN_PID", "1", 1);
  setenv("LISTEN_FDS", "1", 1);
  r = SdListenFd();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, -1);
  EXPECT_EQ(getenv("LISTEN_PID"), nullptr);
  EXPECT_EQ(getenv("LISTEN_FDS"), nullptr);

  setenv("LISTEN_PID", std::to_string(getpid()).c_str(), 1);
  setenv("LISTEN_FDS", "2", 1);
  r = SdListenFd();
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error(), HasSubstr("LISTEN_FDS=2"));
}

}  // namespace
}  // namespace registry_proxy
