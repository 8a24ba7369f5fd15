// The CRI server (H2Relay: HTTP/2 frames) against a scripted upstream gRPC server on a unix
// socket: every shape of call, metadata, deadlines, status details, cancellation,
// interception, upstream restarts. (The end-to-end tests against a real containerd are in
// tests/integration.)
#include "cri/h2_relay.h"

#include <gmock/gmock.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

std::string ToString(const grpc::ByteBuffer& bb) {
  std::vector<grpc::Slice> slices;
  std::string out;
  EXPECT_TRUE(bb.Dump(&slices).ok());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer Bytes(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

std::string Md(const std::multimap<grpc::string_ref, grpc::string_ref>& md, const std::string& k) {
  auto it = md.find(k);
  return it == md.end() ? "" : std::string(it->second.data(), it->second.size());
}

// The upstream: behaviour chosen by method name.
//   /test.Echo/Unary, /runtime.v1.RuntimeService/Version: echo one message; copies x-in to the
//     x-out initial header and x-trailer trailer; x-fail makes it fail with that code.
//   /runtime.v1.RuntimeService/GetContainerEvents: reads one message, sends "ev0".."evN-1"
//     (N = the request's text), then OK.
//   /test.Echo/Bidi: echoes every message with a "re:" prefix until half-close.
//   /test.Echo/Hang: never answers; records cancellation.
//   /test.Echo/Deadline: answers with the remaining deadline in ms.
//   /test.Echo/Flood: sends 64 messages of 256 KiB ("f0...", "f1...", ...), then OK.
class FakeUpstream {
 public:
  explicit FakeUpstream(std::string path, int max_message = -2)
      : path_(std::move(path)), max_message_(max_message) {
    Start();
  }
  ~FakeUpstream() { Stop(); }

  void Start() {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix://" + path_, grpc::InsecureServerCredentials());
    if (max_message_ != -2) b.SetMaxReceiveMessageSize(max_message_);
    // A service object serves one server in its life: a restart needs a new one.
    service_ = std::make_unique<Service>(this);
    b.RegisterCallbackGenericService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void Stop() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    server_.reset();
  }

  std::atomic<int> calls{0};
  std::atomic<int> cancelled{0};

 private:
  class Reactor : public grpc::ServerGenericBidiReactor {
   public:
    Reactor(FakeUpstream* up, grpc::GenericCallbackServerContext* ctx) : up_(up), ctx_(ctx) {
      up_->calls++;
      method_ = ctx->method();
      if (method_ == "/test.Echo/Hang") {
        StartRead(&in_);
        return;
      }
      if (method_ == "/test.Echo/Flood") {
        NextFlood();
        return;
      }
      if (method_ == "/test.Echo/Deadline") {
        auto left = ctx->deadline() - std::chrono::system_clock::now();
        bool none = ctx->deadline() == std::chrono::system_clock::time_point::max();
        out_ =
            Bytes(none ? "none"
                       : std::to_string(
                             std::chrono::duration_cast<std::chrono::milliseconds>(left).count()));
        StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
        return;
      }
      StartRead(&in_);
    }
    void OnReadDone(bool ok) override {
      if (method_ == "/test.Echo/Hang") return;  // wait for cancellation
      if (method_ == "/test.Echo/Bidi") {
        if (!ok) {
          Finish(grpc::Status::OK);
          return;
        }
        out_ = Bytes("re:" + ToString(in_));
        StartWrite(&out_);
        return;
      }
      if (method_ == "/runtime.v1.RuntimeService/GetContainerEvents") {
        if (!ok) return Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request"));
        events_ = std::stoi(ToString(in_));
        NextEvent();
        return;
      }
      // Unary echo.
      if (!ok) return Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request"));
      const auto& md = ctx_->client_metadata();
      std::string in = Md(md, "x-in");
      if (!in.empty()) ctx_->AddInitialMetadata("x-out", in);
      ctx_->AddTrailingMetadata("x-trailer", "t-" + in);
      std::string fail = Md(md, "x-fail");
      if (!fail.empty()) {
        Finish(grpc::Status(static_cast<grpc::StatusCode>(std::stoi(fail)),
                            "upstream says no: " + in, "details-bytes"));
        return;
      }
      out_ = in_;
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    }
    void NextEvent() {
      if (sent_ == events_) return Finish(grpc::Status::OK);
      out_ = Bytes("ev" + std::to_string(sent_++));
      StartWrite(&out_);
    }
    void NextFlood() {
      if (sent_ == 64) return Finish(grpc::Status::OK);
      std::string m = "f" + std::to_string(sent_++);
      m.resize(256 << 10, 'x');
      out_ = Bytes(m);
      StartWrite(&out_);
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return;
      if (method_ == "/test.Echo/Flood") return NextFlood();
      if (method_ == "/test.Echo/Bidi") {
        StartRead(&in_);
      } else if (method_ == "/runtime.v1.RuntimeService/GetContainerEvents") {
        NextEvent();
      }
    }
    void OnCancel() override {
      up_->cancelled++;
      if (method_ == "/test.Echo/Hang") Finish(grpc::Status::CANCELLED);
    }
    void OnDone() override { delete this; }

   private:
    FakeUpstream* up_;
    grpc::GenericCallbackServerContext* ctx_;
    std::string method_;
    grpc::ByteBuffer in_, out_;
    int events_ = 0, sent_ = 0;
  };

  class Service : public grpc::CallbackGenericService {
   public:
    explicit Service(FakeUpstream* up) : up_(up) {}
    grpc::ServerGenericBidiReactor* CreateReactor(
        grpc::GenericCallbackServerContext* ctx) override {
      return new Reactor(up_, ctx);
    }

   private:
    FakeUpstream* up_;
  };

  std::string path_;
  int max_message_;
  std::unique_ptr<Service> service_;
  std::unique_ptr<grpc::Server> server_;
};

// Every finished call, as the metrics see them.
class RecordingObserver : public CallObserver {
 public:
  void OnCallDone(std::string_view method, RpcCode code, std::chrono::nanoseconds) override {
    std::lock_guard<std::mutex> lock(mu);
    calls.emplace_back(std::string(method), code);
  }
  std::vector<std::pair<std::string, RpcCode>> Calls() {
    std::lock_guard<std::mutex> lock(mu);
    return calls;
  }
  std::mutex mu;
  std::vector<std::pair<std::string, RpcCode>> calls;
};

// Intercepts pulls and status misses, scripted by the test.
class FakeInterceptor : public ImageInterceptor {
 public:
  InterceptResult PullImage(CriVersion v, const std::string& request,
                            const CallOptions& opts) override {
    pulls++;
    std::string fail;
    {
      std::lock_guard<std::mutex> lock(mu);
      last_version = v;
      last_request = request;
      last_metadata = opts.metadata;
      fail = pull_error;
    }
    if (!fail.empty()) return {RpcStatus(RpcCode::NOT_FOUND, fail), ""};
    if (block_pulls) {
      // Like a pull that takes minutes: only the caller's cancellation ends it.
      while (!opts.cancellation->cancelled()) std::this_thread::sleep_for(1ms);
      pull_saw_cancel++;
      return {RpcStatus(RpcCode::CANCELLED, "cancelled"), ""};
    }
    return {RpcStatus::OK, "pulled:" + request};
  }
  bool StatusNeedsRecovery(CriVersion, const std::string&, const std::string& response) override {
    status_checks++;
    return response == "miss";
  }
  InterceptResult RecoverStatus(CriVersion, const std::string& request, const std::string&,
                                const CallOptions&) override {
    recovered++;
    return {RpcStatus::OK, "recovered:" + request};
  }

  std::atomic<int> pulls{0}, recovered{0}, pull_saw_cancel{0}, status_checks{0};
  std::atomic<bool> block_pulls{false};
  CriVersion Version() {
    std::lock_guard<std::mutex> lock(mu);
    return last_version;
  }

  // Written on the proxy's worker threads; read by the test after the call returned.
  std::mutex mu;
  CriVersion last_version = CriVersion::kV1;
  std::string last_request;
  std::vector<std::pair<std::string, std::string>> last_metadata;
  std::string pull_error;  // set: pulls fail NOT_FOUND with this message
};

std::unique_ptr<CriServer> MakeServer(const ProxyOptions& o, ImageInterceptor* icpt,
                                      CallObserver* observer = nullptr) {
  return std::make_unique<H2Relay>(o, icpt, observer);
}

class RelayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "rp-proxy-XXXXXX").string();
    dir_ = mkdtemp(tmpl.data());
    upstream_path_ = (dir_ / "upstream.sock").string();
    listen_path_ = (dir_ / "run" / "proxy.sock").string();
    upstream_ = std::make_unique<FakeUpstream>(upstream_path_);
  }
  void TearDown() override {
    proxy_.reset();
    upstream_.reset();
    fs::remove_all(dir_);
  }

  void StartProxy(ImageInterceptor* interceptor = nullptr, int max_message_bytes = 64 << 20) {
    ProxyOptions o;
    o.max_message_bytes = max_message_bytes;
    o.listen = "unix://" + listen_path_;
    o.upstream = "unix://" + upstream_path_;
    proxy_ = MakeServer(o, interceptor, &observer_);
    Status s = proxy_->Start();
    ASSERT_TRUE(s.ok()) << s.message();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);  // as kubelet raises it (to 16 MiB)
    channel_ = grpc::CreateCustomChannel("unix://" + listen_path_,
                                         grpc::InsecureChannelCredentials(), args);
  }

  struct Reply {
    grpc::Status status;
    std::string body;
    std::multimap<grpc::string_ref, grpc::string_ref> initial, trailing;
    std::string out_header, trailer;
  };

  Reply Unary(const std::string& method, const std::string& body,
              std::vector<std::pair<std::string, std::string>> md = {},
              std::chrono::milliseconds timeout = 10s) {
    grpc::GenericStub stub(channel_);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + timeout);
    for (auto& [k, v] : md) ctx.AddMetadata(k, v);
    grpc::ByteBuffer in = Bytes(body), out;
    std::promise<grpc::Status> done;
    stub.UnaryCall(&ctx, method, grpc::StubOptions(), &in, &out,
                   [&](grpc::Status s) { done.set_value(s); });
    Reply r;
    r.status = done.get_future().get();
    if (r.status.ok()) r.body = ToString(out);
    r.out_header = Md(ctx.GetServerInitialMetadata(), "x-out");
    r.trailer = Md(ctx.GetServerTrailingMetadata(), "x-trailer");
    return r;
  }

  fs::path dir_;
  std::string upstream_path_, listen_path_;
  std::unique_ptr<FakeUpstream> upstream_;
  FakeInterceptor icpt_;        // declared before proxy_: it must outlive the proxy
  RecordingObserver observer_;  // declared before proxy_: it must outlive the proxy
  std::unique_ptr<CriServer> proxy_;
  std::shared_ptr<grpc::Channel> channel_;
};

TEST_F(RelayTest, UnaryPassthroughKeepsBytesAndMetadata) {
  StartProxy();
  for (const char* method : {"/runtime.v1.RuntimeService/Version", "/test.Echo/Unary"}) {
    std::string body(
        "\x0a\x03"
        "abc\xff\x00tail",
        10);
    Reply r = Unary(method, body, {{"x-in", "hello"}});
    ASSERT_TRUE(r.status.ok()) << method << ": " << r.status.error_message();
    EXPECT_EQ(r.body, body) << method;
    EXPECT_EQ(r.out_header, "hello") << method;
    EXPECT_EQ(r.trailer, "t-hello") << method;
  }
}

TEST_F(RelayTest, ErrorsPassUnchanged) {
  StartProxy();
  for (const char* method : {"/runtime.v1.RuntimeService/Version", "/test.Echo/Unary"}) {
    Reply r = Unary(method, "x", {{"x-in", "v"}, {"x-fail", "5"}});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::NOT_FOUND) << method;
    EXPECT_EQ(r.status.error_message(), "upstream says no: v") << method;
    EXPECT_EQ(r.status.error_details(), "details-bytes") << method;
    EXPECT_EQ(r.trailer, "t-v") << method;
  }
}

TEST_F(RelayTest, DeadlinePropagates) {
  StartProxy();
  Reply r = Unary("/test.Echo/Deadline", "", {}, 5s);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  int left = std::stoi(r.body);
  EXPECT_GT(left, 3000);
  EXPECT_LE(left, 5100);  // grpc-timeout rounds up to its unit
}

TEST_F(RelayTest, ServerStreamingPassthrough) {
  StartProxy();
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/runtime.v1.RuntimeService/GetContainerEvents", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer req = Bytes("50");
  call->Write(req, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  call->WritesDone(reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<std::string> got;
  while (true) {
    grpc::ByteBuffer msg;
    call->Read(&msg, reinterpret_cast<void*>(4));
    ASSERT_TRUE(cq.Next(&tag, &ok));
    if (!ok) break;
    got.push_back(ToString(msg));
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(got.size(), 50u);
  EXPECT_EQ(got.front(), "ev0");
  EXPECT_EQ(got.back(), "ev49");
}

TEST_F(RelayTest, UnknownMethodIsPumpedBothWays) {
  StartProxy();
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/test.Echo/Bidi", &cq);
  void* tag;
  bool ok;
  call->StartCall(nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  for (int i = 0; i < 20; ++i) {
    grpc::ByteBuffer out = Bytes("m" + std::to_string(i)), in;
    call->Write(out, nullptr);
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    call->Read(&in, nullptr);
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
    EXPECT_EQ(ToString(in), "re:m" + std::to_string(i));
  }
  call->WritesDone(nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer last;
  call->Read(&last, nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_FALSE(ok);
  grpc::Status status;
  call->Finish(&status, nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(RelayTest, CancellationReachesUpstream) {
  StartProxy();
  for (const char* method : {"/test.Echo/Hang"}) {
    Reply r = Unary(method, "x", {}, 300ms);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // The upstream saw its call cancelled (deadline propagated or cancellation forwarded).
  for (int i = 0; i < 200 && upstream_->cancelled.load() == 0; ++i)
    std::this_thread::sleep_for(10ms);
  EXPECT_GE(upstream_->cancelled.load(), 1);
}

TEST_F(RelayTest, PullIsInterceptedAndNeverBlocksOtherCalls) {
  FakeInterceptor& icpt = icpt_;
  icpt.block_pulls = true;
  StartProxy(&icpt);
  // A pull that never ends by itself, on a background thread.
  auto pull = std::async(std::launch::async, [&] {
    return Unary("/runtime.v1.ImageService/PullImage", "req", {{"x-in", "md"}}, 2s);
  });
  for (int i = 0; i < 500 && icpt.pulls.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  ASSERT_EQ(icpt.pulls.load(), 1);
  // Meanwhile other calls go through at once.
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) {
    ASSERT_TRUE(Unary("/runtime.v1.RuntimeService/Version", "v").status.ok());
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1500ms);
  // The caller's deadline cancels the pull.
  Reply r = pull.get();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  for (int i = 0; i < 500 && icpt.pull_saw_cancel.load() == 0; ++i)
    std::this_thread::sleep_for(2ms);
  EXPECT_EQ(icpt.pull_saw_cancel.load(), 1);
  bool saw_md = false;
  std::lock_guard<std::mutex> lock(icpt.mu);
  for (auto& [k, v] : icpt.last_metadata) saw_md |= (k == "x-in" && v == "md");
  EXPECT_TRUE(saw_md);
}

TEST_F(RelayTest, PullResultAndVersions) {
  FakeInterceptor& icpt = icpt_;
  StartProxy(&icpt);
  Reply r = Unary("/runtime.v1alpha2.ImageService/PullImage", "abc");
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.body, "pulled:abc");
  EXPECT_EQ(icpt.Version(), CriVersion::kV1alpha2);
  Reply v1 = Unary("/runtime.v1.ImageService/PullImage", "xyz");
  EXPECT_EQ(v1.body, "pulled:xyz");
  EXPECT_EQ(icpt.Version(), CriVersion::kV1);
}

TEST_F(RelayTest, StatusMissIsRecoveredHitPassesThrough) {
  FakeInterceptor& icpt = icpt_;
  StartProxy(&icpt);
  // The fake upstream echoes the request: "miss" comes back as the response.
  Reply miss = Unary("/runtime.v1.ImageService/ImageStatus", "miss");
  EXPECT_EQ(miss.body, "recovered:miss");
  Reply hit = Unary("/runtime.v1.ImageService/ImageStatus", "hit");
  EXPECT_EQ(hit.body, "hit");
  EXPECT_EQ(icpt.recovered.load(), 1);
}

TEST_F(RelayTest, StatusWithAnImageIsAHitTheInterceptorIsNotAsked) {
  StartProxy(&icpt_);
  // ImageStatusResponse{image: {id: "abc"}}: field 1 present, a hit. The proxy sees that on
  // the wire and forwards it without copying and parsing it for the interceptor.
  const std::string hit("\x0a\x05\x0a\x03\x61\x62\x63", 7);  // "abc"
  Reply r = Unary("/runtime.v1.ImageService/ImageStatus", hit);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.body, hit);
  EXPECT_EQ(icpt_.status_checks.load(), 0);
  // ImageStatusResponse{info: {"": ""}}: no image, a miss: the interceptor decides.
  const std::string miss("\x12\x04\x0a\x00\x12\x00", 6);
  r = Unary("/runtime.v1.ImageService/ImageStatus", miss);
  EXPECT_EQ(r.body, miss);
  EXPECT_EQ(icpt_.status_checks.load(), 1);
  // Not protobuf at all: the interceptor decides too (it would not recover it).
  r = Unary("/runtime.v1.ImageService/ImageStatus", "hit");
  EXPECT_EQ(r.body, "hit");
  EXPECT_EQ(icpt_.status_checks.load(), 2);
  EXPECT_EQ(icpt_.recovered.load(), 0);
}

TEST_F(RelayTest, WithoutInterceptorPullIsForwarded) {
  StartProxy(nullptr);
  Reply r = Unary("/runtime.v1.ImageService/PullImage", "abc");
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.body, "abc");
}

TEST_F(RelayTest, UpstreamDownFailsFastAndRecovers) {
  StartProxy();
  ASSERT_TRUE(Unary("/test.Echo/Unary", "a").status.ok());
  upstream_->Stop();
  auto start = std::chrono::steady_clock::now();
  Reply down = Unary("/test.Echo/Unary", "a", {}, 10s);
  EXPECT_EQ(down.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  upstream_->Start();
  grpc::Status last;
  for (int i = 0; i < 100; ++i) {
    last = Unary("/test.Echo/Unary", "b", {}, 2s).status;
    if (last.ok()) break;
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(last.ok()) << last.error_message();
}

TEST_F(RelayTest, ConcurrentCallsFromManyThreads) {
  StartProxy();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        std::string body = std::to_string(t) + ":" + std::to_string(i);
        Reply r = Unary("/runtime.v1.RuntimeService/Version", body);
        if (r.status.ok() && r.body == body) ok++;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok.load(), 16 * 50);
}

TEST_F(RelayTest, LargeMessages) {
  upstream_->Stop();
  upstream_ = std::make_unique<FakeUpstream>(upstream_path_, 64 << 20);
  StartProxy();
  // Over gRPC's 4 MiB default and over containerd's 16 MiB: the proxy is never the limit.
  std::string big(20 << 20, 'x');
  big[12345] = 'y';
  Reply r = Unary("/test.Echo/Unary", big);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.body, big);
}

TEST_F(RelayTest, UpstreamLimitErrorComesBackUnchanged) {
  StartProxy();  // the fake upstream keeps gRPC's default 4 MiB limit
  Reply r = Unary("/test.Echo/Unary", std::string(6 << 20, 'x'), {}, 5s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(r.status.error_message(), HasSubstr("larger than max"));
}

TEST_F(RelayTest, SocketModesAndStaleSocket) {
  StartProxy();
  struct stat st {};
  ASSERT_EQ(stat(listen_path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  ASSERT_EQ(stat(fs::path(listen_path_).parent_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);

  // A second proxy on the same socket refuses: somebody answers there.
  ProxyOptions o;
  o.listen = listen_path_;
  o.upstream = upstream_path_;
  auto second = MakeServer(o, nullptr);
  Status s = second->Start();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("in use"));

  // After the first stops, a stale socket file is replaced.
  proxy_->Shutdown(0ms);
  proxy_.reset();
  // Leave a stale socket behind, as a crashed daemon does: bound, closed, never unlinked.
  {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, listen_path_.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    close(fd);
    ASSERT_TRUE(fs::exists(listen_path_));
  }
  StartProxy();
  EXPECT_TRUE(Unary("/test.Echo/Unary", "again").status.ok());
}

TEST_F(RelayTest, RefusesToReplaceANonSocket) {
  fs::create_directories(fs::path(listen_path_).parent_path());
  { std::ofstream(listen_path_) << "precious"; }
  ProxyOptions o;
  o.listen = listen_path_;
  o.upstream = upstream_path_;
  auto p = MakeServer(o, nullptr);
  Status s = p->Start();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("not a socket"));
}

TEST_F(RelayTest, GracefulShutdownLetsInFlightCallsFinish) {
  FakeInterceptor& icpt = icpt_;
  icpt.block_pulls = true;
  StartProxy(&icpt);
  auto pull = std::async(std::launch::async, [&] {
    return Unary("/runtime.v1.ImageService/PullImage", "req", {}, 20s);
  });
  for (int i = 0; i < 500 && icpt.pulls.load() == 0; ++i) std::this_thread::sleep_for(2ms);
  auto start = std::chrono::steady_clock::now();
  proxy_->Shutdown(200ms);  // the pull does not finish in time: it is cancelled
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  Reply r = pull.get();
  EXPECT_FALSE(r.status.ok());
  EXPECT_EQ(icpt.pull_saw_cancel.load(), 1);
  EXPECT_FALSE(fs::exists(listen_path_));
}

TEST_F(RelayTest, IdleConnectionsDoNotHoldUpShutdown) {
  StartProxy();
  ASSERT_TRUE(Unary("/test.Echo/Unary", "x").status.ok());  // channel_ stays connected
  auto start = std::chrono::steady_clock::now();
  proxy_->Shutdown(10s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1s);
}

// A caller that stops reading a big server stream holds back that call only: containerd's
// connection (shared by every call) keeps moving, and the stream resumes where it stopped.
TEST_F(RelayTest, SlowReaderHoldsBackOnlyItsOwnCall) {
  StartProxy();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Its own connection, so only the proxy's windows stand between the flood and the reader.
  auto flood_channel =
      grpc::CreateCustomChannel("unix://" + listen_path_, grpc::InsecureChannelCredentials(), args);
  grpc::GenericStub stub(flood_channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  auto call = stub.PrepareCall(&ctx, "/test.Echo/Flood", &cq);
  void* tag;
  bool ok;
  call->StartCall(nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer req = Bytes("go");
  call->Write(req, nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  call->WritesDone(nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  // 16 MiB are waiting for a reader that doesn't read; meanwhile other calls go through.
  std::this_thread::sleep_for(300ms);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) {
    Reply r = Unary("/test.Echo/Unary", "u" + std::to_string(i), {}, 5s);
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  // Then the reader reads: every message arrives, in order, whole.
  for (int i = 0; i < 64; ++i) {
    grpc::ByteBuffer msg;
    call->Read(&msg, nullptr);
    ASSERT_TRUE(cq.Next(&tag, &ok) && ok) << "message " << i;
    std::string m = ToString(msg);
    ASSERT_EQ(m.size(), 256u << 10);
    EXPECT_EQ(m.substr(0, m.find('x')), "f" + std::to_string(i));
  }
  grpc::ByteBuffer last;
  call->Read(&last, nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_FALSE(ok);
  grpc::Status status;
  call->Finish(&status, nullptr);
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(RelayTest, ObserverSeesEveryCallWithItsCode) {
  StartProxy(&icpt_);
  ASSERT_TRUE(Unary("/test.Echo/Unary", "a").status.ok());
  EXPECT_EQ(Unary("/test.Echo/Unary", "a", {{"x-fail", "5"}}).status.error_code(),
            grpc::StatusCode::NOT_FOUND);
  ASSERT_TRUE(Unary("/runtime.v1.ImageService/PullImage", "p").status.ok());
  ASSERT_TRUE(Unary("/runtime.v1.ImageService/ImageStatus", "miss").status.ok());
  std::vector<std::pair<std::string, RpcCode>> want = {
      {"/test.Echo/Unary", RpcCode::OK},
      {"/test.Echo/Unary", RpcCode::NOT_FOUND},
      {"/runtime.v1.ImageService/PullImage", RpcCode::OK},
      {"/runtime.v1.ImageService/ImageStatus", RpcCode::OK}};
  // The observer hears of a call when the proxy is done with it, which may be a moment after
  // the caller has its answer.
  for (int i = 0; i < 200 && observer_.Calls().size() < want.size(); ++i)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(observer_.Calls(), want);
}

// Bytes that are not HTTP/2 close that connection and nothing else.
TEST_F(RelayTest, GarbageOnTheSocketHurtsNobody) {
  StartProxy(&icpt_);
  ASSERT_TRUE(Unary("/test.Echo/Unary", "before").status.ok());
  for (std::string garbage :
       {std::string("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), std::string(4096, '\xff'),
        std::string("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") + std::string(64, '\x00')}) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, listen_path_.c_str(), sizeof(addr.sun_path) - 1);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    ASSERT_EQ(write(fd, garbage.data(), garbage.size()), static_cast<ssize_t>(garbage.size()));
    timeval tv{5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[4096];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
    }
    EXPECT_EQ(n, 0) << "the proxy closes a connection that does not speak HTTP/2";
    close(fd);
    EXPECT_TRUE(Unary("/test.Echo/Unary", "after").status.ok());
  }
}

TEST_F(RelayTest, InterceptedRequestOverTheLimitIsRefused) {
  // Over the limit, but within what gRPC's client sends before any window update (64 KiB): a
  // client whose send is refused half-way at times ends its call only at the deadline, with
  // either engine.
  StartProxy(&icpt_, 16 << 10);
  Reply r = Unary("/runtime.v1.ImageService/PullImage", std::string(40 << 10, 'p'), {}, 5s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(icpt_.pulls.load(), 0);
  EXPECT_EQ(Unary("/runtime.v1.ImageService/PullImage", "small").body, "pulled:small");
}

// The relay decodes only plain messages: a compressed PullImage (kubelet and crictl never
// compress) goes to containerd as the caller's bytes, never half-understood.
TEST_F(RelayTest, CompressedPullIsForwardedUnchangedByTheRelay) {
  StartProxy(&icpt_);
  grpc::GenericStub stub(channel_);
  grpc::ClientContext ctx;
  ctx.set_compression_algorithm(GRPC_COMPRESS_GZIP);
  grpc::ByteBuffer in = Bytes(std::string(1000, 'z')), out;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/runtime.v1.ImageService/PullImage", grpc::StubOptions(), &in, &out,
                 [&](grpc::Status s) { done.set_value(s); });
  grpc::Status s = done.get_future().get();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(ToString(out), std::string(1000, 'z'));  // the upstream's echo
  EXPECT_EQ(icpt_.pulls.load(), 0);
}

// Metadata far over any limit (HPACK lets a small frame decode to a lot): that call fails, the
// proxy stays up and the connection's other calls go on.
TEST_F(RelayTest, OversizedHeadersFailOnlyTheirCall) {
  StartProxy(&icpt_);
  Reply big = Unary("/test.Echo/Unary", "x", {{"x-big", std::string(300 << 10, 'h')}}, 5s);
  EXPECT_FALSE(big.status.ok());
  // The relay resets only that call.
  EXPECT_TRUE(Unary("/test.Echo/Unary", "after").status.ok());
  EXPECT_EQ(Unary("/runtime.v1.ImageService/PullImage", "p").body, "pulled:p");
}

// Our own answer never outgrows what HTTP/2 can carry: a huge error message is cut, and the
// call ends with its code rather than hanging.
TEST_F(RelayTest, HugeErrorMessageIsCutNotLost) {
  {
    std::lock_guard<std::mutex> lock(icpt_.mu);
    icpt_.pull_error = "no such image: " + std::string(200 << 10, 'n');
  }
  StartProxy(&icpt_);
  Reply r = Unary("/runtime.v1.ImageService/PullImage", "p", {}, 5s);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(r.status.error_message().rfind("no such image: nnn", 0), 0u);
  EXPECT_LE(r.status.error_message().size(), 4u << 10);
}

TEST(UnixSocketPathTest, Parse) {
  EXPECT_EQ(UnixSocketPath("unix:///run/x.sock").value(), "/run/x.sock");
  EXPECT_EQ(UnixSocketPath("/run/x.sock").value(), "/run/x.sock");
  EXPECT_FALSE(UnixSocketPath("unix://relative").ok());
  EXPECT_FALSE(UnixSocketPath("tcp://1.2.3.4:5").ok());
  EXPECT_FALSE(UnixSocketPath("/" + std::string(200, 'a')).ok());
}

}  // namespace
}  // namespace registry_proxy
