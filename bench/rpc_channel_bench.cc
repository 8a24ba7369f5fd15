// A unary call's cost through RpcChannel and through gRPC C++'s synchronous client (what
// upstream_grpc.cc uses), against the same in-process gRPC echo server on a unix socket, or
// against a real server when RP_BENCH_ENDPOINT is set (e.g. a containerd: the method is
// RP_BENCH_METHOD, default CRI's RuntimeService/Version, with an empty request).
//   rpc_channel_bench --benchmark_min_time=2
// cpu_us: the whole process's CPU per call (client, and the in-process server if any).
#include <benchmark/benchmark.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/client_unary_call.h>
#include <grpcpp/impl/rpc_method.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

#include "containerd/rpc_channel.h"

namespace registry_proxy {
namespace {

// Answers every call with its request.
class Echo final : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext*) override {
    return new Reactor();
  }
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    Reactor() { StartRead(&buf_); }
    void OnReadDone(bool ok) override {
      if (!ok) return Finish(grpc::Status(grpc::StatusCode::INTERNAL, "no request"));
      StartWriteAndFinish(&buf_, grpc::WriteOptions(), grpc::Status::OK);
    }
    void OnDone() override { delete this; }

   private:
    grpc::ByteBuffer buf_;
  };
};

// One server for the whole run, in a temp dir removed at exit.
struct Fixture {
  Fixture() {
    char tmpl[] = "/tmp/rpc_channel_bench.XXXXXX";
    dir = mkdtemp(tmpl);
    socket = dir + "/echo.sock";
    if (const char* e = getenv("RP_BENCH_ENDPOINT")) {
      socket = std::string(e).substr(std::string(e).rfind("unix://", 0) == 0 ? 7 : 0);
      const char* m = getenv("RP_BENCH_METHOD");
      method = m ? m : "/runtime.v1.RuntimeService/Version";
      request.clear();
    } else {
      grpc::ServerBuilder b;
      b.AddListeningPort("unix://" + socket, grpc::InsecureServerCredentials());
      b.RegisterCallbackGenericService(&echo);
      server = b.BuildAndStart();
    }
    RpcChannelOptions o;
    o.endpoint = "unix://" + socket;
    channel = std::make_unique<RpcChannel>(o);
    grpc_channel = grpc::CreateChannel("unix://" + socket, grpc::InsecureChannelCredentials());
  }
  ~Fixture() {
    channel.reset();
    grpc_channel.reset();
    if (server) server->Shutdown();
    std::filesystem::remove_all(dir);
  }
  std::string dir, socket;
  std::string method = "/bench.Echo/Call";
  std::string request = std::string(120, 'r');  // about an ImageStatus request's size
  Echo echo;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<RpcChannel> channel;
  std::shared_ptr<grpc::Channel> grpc_channel;
};

Fixture& F() {
  // Lives until exit (gRPC must not be torn down by static destructors); only its temp dir is
  // removed then.
  static Fixture* f = [] {
    auto* fixture = new Fixture();
    std::atexit([] { std::filesystem::remove_all(F().dir); });
    return fixture;
  }();
  return *f;
}

double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Process CPU per call over the run (thread 0 reports it for all threads).
class CpuPerCall {
 public:
  explicit CpuPerCall(benchmark::State& state) : state_(state) {
    if (state_.thread_index() == 0) start_ = ProcessCpuSeconds();
  }
  ~CpuPerCall() {
    if (state_.thread_index() != 0) return;
    const double calls = static_cast<double>(state_.iterations()) * state_.threads();
    state_.counters["cpu_us"] = (ProcessCpuSeconds() - start_) * 1e6 / calls;
  }

 private:
  benchmark::State& state_;
  double start_ = 0;
};

void BM_RpcChannelUnary(benchmark::State& state) {
  RpcChannel& channel = *F().channel;
  const std::string& method = F().method;
  const std::string& request = F().request;
  std::string response;
  CpuPerCall cpu(state);
  for (auto _ : state) {
    RpcStatus s = channel.Call(method, request, &response);
    if (!s.ok()) state.SkipWithError(RpcStatusText(s).c_str());
  }
}
BENCHMARK(BM_RpcChannelUnary)->UseRealTime()->Threads(1)->Threads(8);

void BM_GrpcSyncUnary(benchmark::State& state) {
  auto& channel = F().grpc_channel;
  grpc::internal::RpcMethod method(F().method.c_str(), grpc::internal::RpcMethod::NORMAL_RPC,
                                   channel);
  grpc::Slice slice(F().request);
  grpc::ByteBuffer request(&slice, 1);
  CpuPerCall cpu(state);
  for (auto _ : state) {
    grpc::ClientContext ctx;
    grpc::ByteBuffer response;
    grpc::Status s = grpc::internal::BlockingUnaryCall<grpc::ByteBuffer, grpc::ByteBuffer>(
        channel.get(), method, &ctx, request, &response);
    if (!s.ok()) state.SkipWithError(s.error_message().c_str());
  }
}
BENCHMARK(BM_GrpcSyncUnary)->UseRealTime()->Threads(1)->Threads(8);

}  // namespace
}  // namespace registry_proxy

BENCHMARK_MAIN();
