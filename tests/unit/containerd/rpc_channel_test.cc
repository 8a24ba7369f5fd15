// RpcChannel against a real gRPC C++ server on a unix socket (what containerd speaks, from
// another implementation), and against a scripted HTTP/2 peer for the wire cases a gRPC server
// does not produce on demand (HTTP errors, resets, compressed or oversized messages, garbage).
#include "containerd/rpc_channel.h"

#include <google/protobuf/wrappers.pb.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

// Under TSan: the system's gRPC, protobuf and abseil are not instrumented, so TSan cannot see
// their synchronisation and reports hand-offs between gRPC's threads and ours (the test
// server's) as races. Suppress reports with such a library in the stack; the channel itself
// uses none of them and is checked in full.
#if defined(__SANITIZE_THREAD__)
#define RP_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define RP_TSAN 1
#endif
#endif
#ifdef RP_TSAN
extern "C" const char* __tsan_default_suppressions() {
  return "race:libgrpc.so\nrace:libgrpc++.so\nrace:libgpr.so\nrace:libabsl_\n";
}
#endif

namespace registry_proxy {
namespace {

using std::chrono::milliseconds;
using std::chrono::system_clock;

std::string ToString(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// What every test's error call answers: a message with non-ASCII, '%' and a newline (all
// percent-encoded on the wire) and binary details (base64 on the wire).
const std::string kErrorMessage = "no such image: \"dockér.io/x\" 100% 🚢\nline two ";
const std::string kErrorDetails = std::string("\x00\x01\xfe\xff details", 12);

// 8 MiB that are not all alike (2 MiB under TSan, where the gRPC server crawls).
std::string BigMessage() {
#ifdef RP_TSAN
  std::string big(2 << 20, '\0');
#else
  std::string big(8 << 20, '\0');
#endif
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7 + (i >> 13));
  return big;
}

// A gRPC server with a generic service whose methods are test behaviours:
//   /t/Echo        the request back, and the metadata recorded
//   /t/Error       NOT_FOUND with kErrorMessage and kErrorDetails, no message (Trailers-Only)
//   /t/Hang        no answer until the client cancels (counted)
//   /t/Big         an 8 MiB message
//   /t/Invalid     bytes that are no protobuf message
//   /t/Stream      request "N" or "NxSIZE": N messages ("m0", "m1", ... or SIZE bytes each)
//   /t/StreamHang  one message "first", then nothing until the client cancels
class TestService final : public grpc::CallbackGenericService {
 public:
  struct Seen {
    std::string method;
    std::multimap<std::string, std::string> metadata;
    system_clock::time_point deadline;
  };

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(this, ctx);
  }

  // Waits until `n` calls have arrived / been cancelled by the client.
  bool WaitStarted(int n) {
    return WaitFor([&] { return static_cast<int>(seen_.size()) >= n; });
  }
  bool WaitCancelled(int n) {
    return WaitFor([&] { return cancelled_ >= n; });
  }
  std::vector<Seen> seen() {
    std::lock_guard l(mu_);
    return seen_;
  }
  int cancelled() {
    std::lock_guard l(mu_);
    return cancelled_;
  }

 private:
  template <class Pred>
  bool WaitFor(Pred pred) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(10), pred);
  }

  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    Reactor(TestService* svc, grpc::GenericCallbackServerContext* ctx) : svc_(svc), ctx_(ctx) {
      StartRead(&request_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) return FinishOnce(grpc::Status(grpc::StatusCode::INTERNAL, "no request"));
      const std::string method = ctx_->method();
      const std::string req = ToString(request_);
      Record(method);
      if (method == "/t/Echo") return WriteLast(req);
      if (method == "/t/Error") {
        return FinishOnce(grpc::Status(grpc::StatusCode::NOT_FOUND, kErrorMessage, kErrorDetails));
      }
      if (method == "/t/Big") return WriteLast(BigMessage());
      if (method == "/t/Invalid") return WriteLast("\x0a\xff");
      if (method == "/t/Hang") return;  // OnCancel finishes it
      if (method == "/t/StreamHang") return WriteNext("first");
      if (method == "/t/Stream") {
        size_t x = req.find('x');
        remaining_ = std::stoi(req.substr(0, x));
        size_ = x == std::string::npos ? 0 : std::stoul(req.substr(x + 1));
        return WriteStream();
      }
      FinishOnce(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no such test method"));
    }
    void OnWriteDone(bool ok) override {
      if (!ok) return;  // cancelled: OnCancel finishes
      if (ctx_->method() == "/t/Stream") WriteStream();
    }
    void OnCancel() override {
      {
        std::lock_guard l(svc_->mu_);
        ++svc_->cancelled_;
      }
      svc_->cv_.notify_all();
      FinishOnce(grpc::Status::CANCELLED);
    }
    void OnDone() override { delete this; }

   private:
    void Record(const std::string& method) {
      Seen seen{method, {}, ctx_->deadline()};
      for (const auto& [k, v] : ctx_->client_metadata()) {
        seen.metadata.emplace(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
      }
      {
        std::lock_guard l(svc_->mu_);
        svc_->seen_.push_back(std::move(seen));
      }
      svc_->cv_.notify_all();
    }
    void WriteStream() {
      if (remaining_ == 0) return FinishOnce(grpc::Status::OK);
      --remaining_;
      const int i = sent_++;  // before the write: OnWriteDone may run before it returns
      WriteNext(size_ ? std::string(size_, static_cast<char>('a' + i % 26))
                      : "m" + std::to_string(i));
    }
    void WriteNext(const std::string& m) {
      std::lock_guard l(mu_);
      if (finished_) return;
      grpc::Slice slice(m);
      response_ = grpc::ByteBuffer(&slice, 1);
      StartWrite(&response_);
    }
    void WriteLast(const std::string& m) {
      std::lock_guard l(mu_);
      if (finished_) return;
      finished_ = true;
      grpc::Slice slice(m);
      response_ = grpc::ByteBuffer(&slice, 1);
      StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
    }
    // OnCancel may run concurrently with the other reactions; Finish must happen once.
    void FinishOnce(const grpc::Status& s) {
      std::lock_guard l(mu_);
      if (finished_) return;
      finished_ = true;
      Finish(s);
    }

    TestService* svc_;
    grpc::GenericCallbackServerContext* ctx_;
    grpc::ByteBuffer request_, response_;
    int remaining_ = 0, sent_ = 0;
    size_t size_ = 0;
    std::mutex mu_;
    bool finished_ = false;
  };

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Seen> seen_;
  int cancelled_ = 0;
};

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/rpc_channel_test.XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class GrpcServer {
 public:
  explicit GrpcServer(const std::string& socket) {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix://" + socket, grpc::InsecureServerCredentials());
    b.RegisterCallbackGenericService(&service_);
    server_ = b.BuildAndStart();
  }
  ~GrpcServer() { Stop(); }
  void Stop() {
    if (server_) server_->Shutdown(system_clock::now());
    server_.reset();
  }
  bool running() const { return server_ != nullptr; }
  TestService& service() { return service_; }

 private:
  TestService service_;
  std::unique_ptr<grpc::Server> server_;
};

class RpcChannelTest : public ::testing::Test {
 protected:
  std::string socket() const { return dir_.path() + "/grpc.sock"; }
  RpcChannelOptions Options() const {
    RpcChannelOptions o;
    o.endpoint = "unix://" + socket();
    return o;
  }

  TempDir dir_;
};

TEST_F(RpcChannelTest, UnaryCallReturnsTheResponse) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  std::string response;
  RpcStatus s = channel.Call("/t/Echo", std::string("hello\0world", 11), &response);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(response, std::string("hello\0world", 11));
  // An empty message is a message too.
  s = channel.Call("/t/Echo", "", &response);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(response, "");
  EXPECT_EQ(channel.connections_opened(), 1);
}

TEST_F(RpcChannelTest, TypedCallSerializesAndParses) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  google::protobuf::StringValue req, resp;
  req.set_value("docker.io/library/busybox:latest");
  RpcStatus s = channel.Call("/t/Echo", req, &resp);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(resp.value(), req.value());
}

TEST_F(RpcChannelTest, ResponseThatDoesNotParseIsInternal) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  google::protobuf::StringValue req, resp;
  RpcStatus s = channel.Call("/t/Invalid", req, &resp);
  EXPECT_EQ(s.error_code(), RpcCode::INTERNAL);
  EXPECT_NE(s.error_message().find("/t/Invalid"), std::string::npos) << s.error_message();
}

TEST_F(RpcChannelTest, ErrorCodeMessageAndDetailsComeThroughUnchanged) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  std::string response = "untouched";
  RpcStatus s = channel.Call("/t/Error", "x", &response);
  EXPECT_EQ(s.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), kErrorMessage);
  EXPECT_EQ(s.error_details(), kErrorDetails);
  EXPECT_EQ(response, "untouched");
  EXPECT_EQ(RpcStatusText(s), "NOT_FOUND: " + kErrorMessage);
  // The gRPC server answered an unknown method itself (Trailers-Only).
  s = channel.Call("/t/NoSuchMethod", "x", &response);
  EXPECT_EQ(s.error_code(), RpcCode::UNIMPLEMENTED) << RpcStatusText(s);
}

TEST_F(RpcChannelTest, MetadataReachesTheServer) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  RpcCallOptions opts;
  opts.metadata = {{"containerd-namespace", "k8s.io"},
                   {"x-trace-bin", std::string("\x00\xff\x10", 3)},
                   {"x-two", "a"},
                   {"x-two", "b"}};
  opts.deadline = system_clock::now() + std::chrono::seconds(30);
  std::string response;
  ASSERT_TRUE(channel.Call("/t/Echo", "x", &response, opts).ok());
  auto seen = server.service().seen();
  ASSERT_EQ(seen.size(), 1u);
  const auto& md = seen[0].metadata;
  EXPECT_EQ(seen[0].method, "/t/Echo");
  ASSERT_EQ(md.count("containerd-namespace"), 1u);
  EXPECT_EQ(md.find("containerd-namespace")->second, "k8s.io");
  ASSERT_EQ(md.count("x-trace-bin"), 1u);
  EXPECT_EQ(md.find("x-trace-bin")->second, std::string("\x00\xff\x10", 3));
  EXPECT_EQ(md.count("x-two"), 2u);
  // grpc-timeout carried the deadline (within what the call took).
  const auto left = seen[0].deadline - system_clock::now();
  EXPECT_GT(left, std::chrono::seconds(25));
  EXPECT_LE(left, std::chrono::seconds(30));
}

TEST_F(RpcChannelTest, InvalidMetadataFailsWithoutACall) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  std::string response;
  RpcCallOptions opts;
  opts.metadata = {{"Upper-Case", "x"}};
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::INTERNAL);
  opts.metadata = {{"x-text", "new\nline"}};
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::INTERNAL);
  EXPECT_TRUE(server.service().seen().empty());
}

TEST_F(RpcChannelTest, DeadlineExceeded) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  RpcCallOptions opts;
  opts.deadline = system_clock::now() + milliseconds(100);
  std::string response;
  const auto start = std::chrono::steady_clock::now();
  RpcStatus s = channel.Call("/t/Hang", "x", &response, opts);
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(s.error_code(), RpcCode::DEADLINE_EXCEEDED) << RpcStatusText(s);
  EXPECT_GE(took, milliseconds(95));
  EXPECT_LT(took, milliseconds(2000));
  EXPECT_TRUE(server.service().WaitCancelled(1));  // the server's call ended too
  // A deadline already past fails without a call.
  opts.deadline = system_clock::now() - milliseconds(1);
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(server.service().seen().size(), 1u);
}

TEST_F(RpcChannelTest, CancelFromAnotherThread) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  RpcCallHandle handle;
  RpcCallOptions opts;
  opts.handle = &handle;
  std::thread canceller([&] {
    ASSERT_TRUE(server.service().WaitStarted(1));
    handle.Cancel();
  });
  std::string response;
  RpcStatus s = channel.Call("/t/Hang", "x", &response, opts);
  canceller.join();
  EXPECT_EQ(s.error_code(), RpcCode::CANCELLED) << RpcStatusText(s);
  EXPECT_TRUE(handle.cancelled());
  EXPECT_TRUE(server.service().WaitCancelled(1));  // RST_STREAM reached the server
  // A cancelled handle fails a call at once, without sending it.
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::CANCELLED);
  EXPECT_EQ(server.service().seen().size(), 1u);
  // The connection is still good for other calls.
  EXPECT_TRUE(channel.Call("/t/Echo", "x", &response).ok());
  EXPECT_EQ(channel.connections_opened(), 1);
}

TEST_F(RpcChannelTest, DownstreamCancellationCancelsTheCall) {
  // How the pull service uses it: the handle registered with the caller's Cancellation.
  GrpcServer server(socket());
  RpcChannel channel(Options());
  Cancellation cancellation;
  std::thread canceller([&] {
    ASSERT_TRUE(server.service().WaitStarted(1));
    cancellation.Cancel();
  });
  RpcCallHandle handle;
  RpcCallOptions opts;
  opts.handle = &handle;
  std::string response;
  RpcStatus s;
  {
    Cancellation::Scope scope(&cancellation, &handle);
    s = channel.Call("/t/Hang", "x", &response, opts);
  }
  canceller.join();
  EXPECT_EQ(s.error_code(), RpcCode::CANCELLED) << RpcStatusText(s);
  EXPECT_TRUE(server.service().WaitCancelled(1));
}

TEST_F(RpcChannelTest, ManyConcurrentCallsShareOneConnection) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  constexpr int kThreads = 16;
#ifdef RP_TSAN
  constexpr int kCalls = 20;  // TSan makes the (uninstrumented) gRPC server very slow
#else
  constexpr int kCalls = 200;
#endif
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        const std::string req = std::to_string(t) + ":" + std::to_string(i) +
                                std::string(static_cast<size_t>(i * 37 % 5000), 'p');
        std::string resp;
        RpcStatus s = channel.Call("/t/Echo", req, &resp);
        if (s.ok() && resp == req) ok.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kThreads * kCalls);
  EXPECT_EQ(channel.connections_opened(), 1);
}

TEST_F(RpcChannelTest, ASlowCallDoesNotHoldUpOthers) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  RpcCallHandle handle;
  std::thread slow([&] {
    RpcCallOptions opts;
    opts.handle = &handle;
    std::string r;
    EXPECT_EQ(channel.Call("/t/Hang", "x", &r, opts).error_code(), RpcCode::CANCELLED);
  });
  ASSERT_TRUE(server.service().WaitStarted(1));
  std::string r;
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(channel.Call("/t/Echo", "x", &r).ok());
  handle.Cancel();
  slow.join();
}

TEST_F(RpcChannelTest, ServerRestartFailsUnavailableThenReconnects) {
  auto server = std::make_unique<GrpcServer>(socket());
  RpcChannel channel(Options());
  EXPECT_EQ(channel.state(), RpcChannel::State::kIdle);
  std::string response;
  ASSERT_TRUE(channel.Call("/t/Echo", "x", &response).ok());
  EXPECT_EQ(channel.state(), RpcChannel::State::kReady);
  server.reset();
  RpcStatus s = channel.Call("/t/Echo", "x", &response);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE) << RpcStatusText(s);
  // kTransientFailure when the call found the socket gone, kIdle if it was sent on the old
  // connection before the server's close reached us.
  EXPECT_NE(channel.state(), RpcChannel::State::kReady);
  server = std::make_unique<GrpcServer>(socket());
  s = channel.Call("/t/Echo", "again", &response);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(channel.state(), RpcChannel::State::kReady);
  EXPECT_EQ(response, "again");
  EXPECT_EQ(channel.connections_opened(), 2);
}

TEST_F(RpcChannelTest, FailFastWhenNobodyListens) {
  RpcChannel channel(Options());
  std::string response;
  const auto start = std::chrono::steady_clock::now();
  RpcStatus s = channel.Call("/t/Echo", "x", &response);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_NE(s.error_message().find(socket()), std::string::npos) << s.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, milliseconds(500));
}

TEST_F(RpcChannelTest, WaitForReadyWaitsForALateServer) {
  RpcChannel channel(Options());
  std::unique_ptr<GrpcServer> server;
  std::thread late([&] {
    std::this_thread::sleep_for(milliseconds(300));  // the scenario: a server 300 ms late
    server = std::make_unique<GrpcServer>(socket());
  });
  RpcCallOptions opts;
  opts.wait_for_ready = true;
  opts.deadline = system_clock::now() + std::chrono::seconds(10);
  std::string response;
  const auto start = std::chrono::steady_clock::now();
  RpcStatus s = channel.Call("/t/Echo", "late", &response, opts);
  const auto took = std::chrono::steady_clock::now() - start;
  late.join();
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(response, "late");
  EXPECT_GE(took, milliseconds(250));
  EXPECT_LT(took, milliseconds(3000));  // back-off is at most 1 s
}

TEST_F(RpcChannelTest, WaitForReadyEndsAtTheDeadlineOrACancel) {
  RpcChannel channel(Options());
  RpcCallOptions opts;
  opts.wait_for_ready = true;
  opts.deadline = system_clock::now() + milliseconds(200);
  std::string response;
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::DEADLINE_EXCEEDED);
  RpcCallHandle handle;
  opts.deadline = system_clock::time_point::max();
  opts.handle = &handle;
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(100));  // the scenario: a cancel while it waits
    handle.Cancel();
  });
  EXPECT_EQ(channel.Call("/t/Echo", "x", &response, opts).error_code(), RpcCode::CANCELLED);
  canceller.join();
}

TEST_F(RpcChannelTest, StreamReadsEveryMessageThenFinishes) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  auto stream = channel.Stream("/t/Stream", "5");
  std::string m;
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(stream->Read(&m)) << i;
    EXPECT_EQ(m, "m" + std::to_string(i));
  }
  EXPECT_FALSE(stream->Read(&m));
  RpcStatus s = stream->Finish();
  EXPECT_TRUE(s.ok()) << RpcStatusText(s);
}

TEST_F(RpcChannelTest, StreamWithASlowReaderGetsEverything) {
  // 40 MiB through a stream that buffers at most a few MiB for its reader: the window is held
  // back while the reader lags and opened again as it reads.
  GrpcServer server(socket());
  RpcChannel channel(Options());
#ifdef RP_TSAN
  constexpr int kMessages = 128;  // 8 MiB: still twice what the channel buffers
#else
  constexpr int kMessages = 640;
#endif
  auto stream = channel.Stream("/t/Stream", std::to_string(kMessages) + "x65536");
  // Let the server fill what the window allows before reading anything.
  std::this_thread::sleep_for(milliseconds(100));
  std::string m;
  int n = 0;
  while (stream->Read(&m)) {
    // Compared as a bool: a failure must not print 64 KiB.
    ASSERT_TRUE(m == std::string(65536, static_cast<char>('a' + n % 26)))
        << "message " << n << ": " << m.size() << " bytes of '" << m.substr(0, 1) << "'";
    ++n;
  }
  EXPECT_EQ(n, kMessages);
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(RpcChannelTest, StreamCancelUnblocksRead) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  auto stream = channel.Stream("/t/StreamHang", "x");
  std::string m;
  ASSERT_TRUE(stream->Read(&m));
  EXPECT_EQ(m, "first");
  std::thread canceller([&] {
    std::this_thread::sleep_for(milliseconds(50));  // the scenario: Read is blocked by then
    stream->Cancel();
  });
  EXPECT_FALSE(stream->Read(&m));
  canceller.join();
  EXPECT_EQ(stream->Finish().error_code(), RpcCode::CANCELLED);
  EXPECT_TRUE(server.service().WaitCancelled(1));
}

TEST_F(RpcChannelTest, StreamErrorAndHandleCancel) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  RpcCallHandle handle;  // outlives the streams it is given to (declared before them)
  auto stream = channel.Stream("/t/Error", "x");
  std::string m;
  EXPECT_FALSE(stream->Read(&m));
  RpcStatus s = stream->Finish();
  EXPECT_EQ(s.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), kErrorMessage);

  RpcCallOptions opts;
  opts.handle = &handle;
  stream = channel.Stream("/t/StreamHang", "x", opts);
  ASSERT_TRUE(stream->Read(&m));
  handle.Cancel();
  EXPECT_FALSE(stream->Read(&m));
  EXPECT_EQ(stream->Finish().error_code(), RpcCode::CANCELLED);
}

TEST_F(RpcChannelTest, DestroyingAStreamCancelsIt) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  auto stream = channel.Stream("/t/StreamHang", "x");
  std::string m;
  ASSERT_TRUE(stream->Read(&m));
  stream.reset();
  EXPECT_TRUE(server.service().WaitCancelled(1));
}

TEST_F(RpcChannelTest, LargeResponse) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  std::string response;
  RpcStatus s = channel.Call("/t/Big", "x", &response);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_TRUE(response == BigMessage());

  RpcChannelOptions small = Options();
  small.max_message_bytes = 1 << 20;
  RpcChannel limited(small);
  s = limited.Call("/t/Big", "x", &response);
  EXPECT_EQ(s.error_code(), RpcCode::RESOURCE_EXHAUSTED) << RpcStatusText(s);
  // ... and the connection carries on.
  EXPECT_TRUE(limited.Call("/t/Echo", "x", &response).ok());
  EXPECT_EQ(limited.connections_opened(), 1);
  s = limited.Call("/t/Echo", std::string((1 << 20) + 1, 'x'), &response);
  EXPECT_EQ(s.error_code(), RpcCode::RESOURCE_EXHAUSTED) << RpcStatusText(s);
}

TEST_F(RpcChannelTest, DestructorCancelsCallsInFlight) {
  GrpcServer server(socket());
  auto channel = std::make_unique<RpcChannel>(Options());
  RpcChannel* in_flight = channel.get();  // the caller must not read `channel` while it resets
  RpcStatus s;
  std::thread caller([&s, in_flight] {
    std::string r;
    s = in_flight->Call("/t/Hang", "x", &r);
  });
  ASSERT_TRUE(server.service().WaitStarted(1));
  channel.reset();
  caller.join();
  EXPECT_EQ(s.error_code(), RpcCode::CANCELLED) << RpcStatusText(s);
}

// The loop thread's context switches, from /proc (the channel's thread is named "rpc-channel").
long LoopThreadSwitches() {
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(e.path() / "comm");
    std::string name;
    std::getline(comm, name);
    if (name != "rpc-channel") continue;
    std::ifstream status(e.path() / "status");
    std::string line;
    long total = 0;
    while (std::getline(status, line)) {
      if (line.find("ctxt_switches:") != std::string::npos) {
        total += std::stol(line.substr(line.find(':') + 1));
      }
    }
    return total;
  }
  return -1;
}

TEST_F(RpcChannelTest, IdleChannelNeverWakes) {
  GrpcServer server(socket());
  RpcChannel channel(Options());
  std::string r;
  RpcCallOptions opts;
  opts.deadline = system_clock::now() + milliseconds(1000);  // armed the timer once
  ASSERT_TRUE(channel.Call("/t/Echo", "x", &r, opts).ok());
  // The loop may still be finishing the call when it returns (on a busy machine): wait until it
  // is back in epoll_wait, well before the call's deadline passes.
  long before = LoopThreadSwitches();
  ASSERT_GE(before, 0);
  for (int i = 0; i < 20; ++i) {
    std::this_thread::sleep_for(milliseconds(20));
    const long now = LoopThreadSwitches();
    if (now == before) break;
    before = now;
  }
  // The measurement window: past the deadline, so a timer left armed would wake the loop.
  std::this_thread::sleep_for(milliseconds(1300));
  EXPECT_EQ(LoopThreadSwitches(), before);
}

// ---------------------------------------------------------------------------------------------
// A scripted HTTP/2 peer: answers every request as told, with frames a gRPC server would not
// send on demand. One connection at a time, on its own thread.

struct Script {
  std::vector<std::pair<std::string, std::string>> headers = {{":status", "200"},
                                                              {"content-type", "application/grpc"}};
  std::string body;  // DATA (framed by the test)
  std::vector<std::pair<std::string, std::string>> trailers;
  // Set: no response, RST_STREAM with this code.
  std::optional<uint32_t> reset;
  bool close = false;    // close the connection once the request arrived
  bool garbage = false;  // no HTTP/2 at all: bytes that are not a SETTINGS frame
  bool goaway = false;   // GOAWAY (last stream 0) once the request arrived
};

std::string Framed(std::string_view m, uint8_t flags = 0) {
  std::string out(5, '\0');
  out[0] = static_cast<char>(flags);
  out[1] = static_cast<char>(m.size() >> 24);
  out[2] = static_cast<char>(m.size() >> 16);
  out[3] = static_cast<char>(m.size() >> 8);
  out[4] = static_cast<char>(m.size());
  return out.append(m);
}

class ScriptedPeer {
 public:
  ScriptedPeer(const std::string& path, Script script) : script_(std::move(script)) {
    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    EXPECT_EQ(bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(listen(listen_fd_, 16), 0);
    thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~ScriptedPeer() {
    stop_ = true;
    shutdown(listen_fd_, SHUT_RDWR);
    int fd = conn_fd_.load();
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
    thread_.join();
    close(listen_fd_);
  }
  int connections() const { return connections_.load(); }

 private:
  void AcceptLoop() {
    while (!stop_) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) return;
      connections_.fetch_add(1);
      conn_fd_ = fd;
      if (!stop_) Serve(fd);
      conn_fd_ = -1;
      close(fd);
    }
  }

  struct Conn {
    ScriptedPeer* peer;
    nghttp2_session* ng = nullptr;
    size_t body_off = 0;
    bool close = false;
  };

  static ssize_t ReadBody(nghttp2_session* ng, int32_t id, uint8_t* buf, size_t len,
                          uint32_t* flags, nghttp2_data_source*, void* user) {
    auto* c = static_cast<Conn*>(user);
    const Script& s = c->peer->script_;
    const size_t n = std::min(len, s.body.size() - c->body_off);
    std::memcpy(buf, s.body.data() + c->body_off, n);
    c->body_off += n;
    if (c->body_off == s.body.size()) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      if (!s.trailers.empty()) {
        *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        auto nv = Nvs(s.trailers);
        nghttp2_submit_trailer(ng, id, nv.data(), nv.size());
      }
    }
    return static_cast<ssize_t>(n);
  }

  static std::vector<nghttp2_nv> Nvs(const std::vector<std::pair<std::string, std::string>>& h) {
    std::vector<nghttp2_nv> nv;
    for (const auto& [k, v] : h) {
      nv.push_back(
          {(uint8_t*)k.data(), (uint8_t*)v.data(), k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
    }
    return nv;
  }

  static int OnFrame(nghttp2_session* ng, const nghttp2_frame* f, void* user) {
    auto* c = static_cast<Conn*>(user);
    const Script& s = c->peer->script_;
    if (!(f->hd.flags & NGHTTP2_FLAG_END_STREAM) ||
        (f->hd.type != NGHTTP2_DATA && f->hd.type != NGHTTP2_HEADERS)) {
      return 0;
    }
    const int32_t id = f->hd.stream_id;
    if (s.close) {
      c->close = true;
    } else if (s.goaway) {
      nghttp2_submit_goaway(ng, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, nullptr, 0);
    } else if (s.reset) {
      nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, id, *s.reset);
    } else {
      auto nv = Nvs(s.headers);
      c->body_off = 0;
      nghttp2_data_provider prd{};
      prd.read_callback = ReadBody;
      const bool has_body = !s.body.empty() || !s.trailers.empty();
      nghttp2_submit_response(ng, id, nv.data(), nv.size(), has_body ? &prd : nullptr);
    }
    return 0;
  }

  void Serve(int fd) {
    if (script_.garbage) {
      const std::string junk = "HTTP/1.1 400 Bad Request\r\n\r\n\x00\x01\x02 garbage";
      (void)!write(fd, junk.data(), junk.size());
      char buf[4096];
      while (read(fd, buf, sizeof buf) > 0) {
      }
      return;
    }
    nghttp2_session_callbacks* cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, OnFrame);
    Conn c{this};
    nghttp2_session_server_new(&c.ng, cb, &c);
    nghttp2_session_callbacks_del(cb);
    nghttp2_submit_settings(c.ng, NGHTTP2_FLAG_NONE, nullptr, 0);
    char buf[16384];
    while (!c.close) {
      const uint8_t* out;
      ssize_t n;
      while ((n = nghttp2_session_mem_send(c.ng, &out)) > 0) {
        if (write(fd, out, static_cast<size_t>(n)) != n) c.close = true;
      }
      if (c.close) break;
      n = read(fd, buf, sizeof buf);
      if (n <= 0) break;
      if (nghttp2_session_mem_recv(c.ng, reinterpret_cast<uint8_t*>(buf), n) < 0) break;
    }
    nghttp2_session_del(c.ng);
  }

  Script script_;
  int listen_fd_ = -1;
  std::atomic<int> conn_fd_{-1};
  std::atomic<bool> stop_{false};
  std::atomic<int> connections_{0};
  std::thread thread_;
};

class RpcChannelWireTest : public RpcChannelTest {
 protected:
  // One unary call against a peer that answers with `script`.
  RpcStatus CallScripted(Script script, std::string* response = nullptr) {
    ScriptedPeer peer(socket(), std::move(script));
    RpcChannel channel(Options());
    std::string r;
    RpcStatus s = channel.Call("/t/Echo", "x", response ? response : &r);
    unlink(socket().c_str());
    return s;
  }
};

TEST_F(RpcChannelWireTest, TrailersOnlyWithUnpaddedDetails) {
  Script script;
  script.headers.push_back({"grpc-status", "5"});
  script.headers.push_back({"grpc-message", "gone%20%F0%9F%9A%A2 100%"});  // "100%": malformed
  script.headers.push_back({"grpc-status-details-bin", "AAH+/w"});         // 00 01 fe ff
  RpcStatus s = CallScripted(script);
  EXPECT_EQ(s.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "gone 🚢 100%");
  EXPECT_EQ(s.error_details(), std::string("\x00\x01\xfe\xff", 4));
}

TEST_F(RpcChannelWireTest, MessageAndTrailers) {
  Script script;
  script.body = Framed("answer");
  script.trailers = {{"grpc-status", "0"}};
  std::string response;
  RpcStatus s = CallScripted(script, &response);
  ASSERT_TRUE(s.ok()) << RpcStatusText(s);
  EXPECT_EQ(response, "answer");
}

TEST_F(RpcChannelWireTest, UnknownStatusCodeIsUnknown) {
  Script script;
  script.headers.push_back({"grpc-status", "99"});
  EXPECT_EQ(CallScripted(script).error_code(), RpcCode::UNKNOWN);
}

TEST_F(RpcChannelWireTest, HttpStatusWithoutGrpcStatus) {
  const std::pair<const char*, RpcCode> cases[] = {{"400", RpcCode::INTERNAL},
                                                   {"401", RpcCode::UNAUTHENTICATED},
                                                   {"403", RpcCode::PERMISSION_DENIED},
                                                   {"404", RpcCode::UNIMPLEMENTED},
                                                   {"429", RpcCode::UNAVAILABLE},
                                                   {"502", RpcCode::UNAVAILABLE},
                                                   {"503", RpcCode::UNAVAILABLE},
                                                   {"504", RpcCode::UNAVAILABLE},
                                                   {"500", RpcCode::UNKNOWN}};
  for (const auto& [status, code] : cases) {
    Script script;
    script.headers = {{":status", status}};
    RpcStatus s = CallScripted(script);
    EXPECT_EQ(s.error_code(), code) << status << ": " << RpcStatusText(s);
  }
}

TEST_F(RpcChannelWireTest, MissingGrpcStatusIsUnknown) {
  Script script;
  script.body = Framed("answer");
  EXPECT_EQ(CallScripted(script).error_code(), RpcCode::UNKNOWN);
}

TEST_F(RpcChannelWireTest, TruncatedMessageIsInternal) {
  Script script;
  script.body = Framed("answer").substr(0, 8);
  script.trailers = {{"grpc-status", "0"}};
  EXPECT_EQ(CallScripted(script).error_code(), RpcCode::INTERNAL);
}

TEST_F(RpcChannelWireTest, CompressedMessageIsInternal) {
  Script script;
  script.body = Framed("answer", /*flags=*/1);
  script.trailers = {{"grpc-status", "0"}};
  RpcStatus s = CallScripted(script);
  EXPECT_EQ(s.error_code(), RpcCode::INTERNAL);
  EXPECT_NE(s.error_message().find("compress"), std::string::npos) << s.error_message();
}

TEST_F(RpcChannelWireTest, TwoMessagesInAUnaryResponseIsInternal) {
  Script script;
  script.body = Framed("one") + Framed("two");
  script.trailers = {{"grpc-status", "0"}};
  EXPECT_EQ(CallScripted(script).error_code(), RpcCode::INTERNAL);
}

TEST_F(RpcChannelWireTest, OversizedLengthPrefixIsResourceExhausted) {
  Script script;
  script.body = std::string("\x00\x7f\xff\xff\xff", 5);  // 2 GiB announced, nothing sent
  script.trailers = {{"grpc-status", "0"}};
  EXPECT_EQ(CallScripted(script).error_code(), RpcCode::RESOURCE_EXHAUSTED);
}

TEST_F(RpcChannelWireTest, ResetStreamCodes) {
  const std::pair<uint32_t, RpcCode> cases[] = {{NGHTTP2_CANCEL, RpcCode::CANCELLED},
                                                {NGHTTP2_REFUSED_STREAM, RpcCode::UNAVAILABLE},
                                                {NGHTTP2_PROTOCOL_ERROR, RpcCode::INTERNAL}};
  for (const auto& [error, code] : cases) {
    Script script;
    script.reset = error;
    RpcStatus s = CallScripted(script);
    EXPECT_EQ(s.error_code(), code) << error << ": " << RpcStatusText(s);
  }
}

TEST_F(RpcChannelWireTest, GoawayRefusesTheCallAndTheNextOneReconnects) {
  Script script;
  script.goaway = true;
  ScriptedPeer peer(socket(), script);
  RpcChannel channel(Options());
  std::string r;
  RpcStatus s = channel.Call("/t/Echo", "x", &r);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE) << RpcStatusText(s);
  s = channel.Call("/t/Echo", "x", &r);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE) << RpcStatusText(s);
  EXPECT_EQ(channel.connections_opened(), 2);
}

TEST_F(RpcChannelWireTest, ConnectionClosedMidCallIsUnavailable) {
  Script script;
  script.close = true;
  RpcStatus s = CallScripted(script);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("lost"), std::string::npos) << s.error_message();
}

TEST_F(RpcChannelWireTest, GarbageFromThePeerIsAnErrorNotACrash) {
  Script script;
  script.garbage = true;
  RpcStatus s = CallScripted(script);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE) << RpcStatusText(s);
}

TEST(RpcChannelEndpointTest, NotAUnixSocket) {
  RpcChannelOptions o;
  o.endpoint = "tcp://127.0.0.1:1";
  RpcChannel channel(o);
  std::string r;
  RpcStatus s = channel.Call("/t/Echo", "x", &r);
  EXPECT_EQ(s.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_NE(s.error_message().find("tcp://"), std::string::npos) << s.error_message();
}

TEST(RpcStatusTest, NamesAndWireCodes) {
  EXPECT_EQ(RpcCodeName(RpcCode::OK), "OK");
  EXPECT_EQ(RpcCodeName(RpcCode::UNAUTHENTICATED), "UNAUTHENTICATED");
  EXPECT_EQ(RpcCodeName(static_cast<RpcCode>(17)), "UNKNOWN_CODE");
  EXPECT_EQ(RpcCodeFromWire(14), RpcCode::UNAVAILABLE);
  EXPECT_EQ(RpcCodeFromWire(17), RpcCode::UNKNOWN);
  EXPECT_EQ(RpcCodeFromWire(-1), RpcCode::UNKNOWN);
  EXPECT_EQ(RpcStatusText(RpcStatus(RpcCode::ABORTED, "")), "ABORTED");
  EXPECT_EQ(RpcStatusText(RpcStatus(RpcCode::ABORTED, "why")), "ABORTED: why");
  // Same numbers as gRPC's.
  EXPECT_EQ(static_cast<int>(RpcCode::DATA_LOSS), static_cast<int>(grpc::StatusCode::DATA_LOSS));
}

}  // namespace
}  // namespace registry_proxy
