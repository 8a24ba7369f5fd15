// Fuzzes the CRI relay (h2_relay) with what a caller can send on its socket: HTTP/2 traffic
// built from the input with nghttp2's client (requests to intercepted, known and unknown
// methods; odd headers, deadlines and gRPC frames; resets, pings, window updates, settings),
// followed by raw bytes from the input. One relay serves every input, in front of an
// in-process gRPC echo server standing for containerd, with an interceptor that answers at
// once. Invariants: no crash or sanitizer report, and the relay still answers a well-formed
// call after every 64 inputs.
#include <fuzzer/FuzzedDataProvider.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cri/h2_relay.h"

namespace {

using namespace registry_proxy;

// containerd's stand-in: echoes one message back, or fails with the code in x-fail.
class Echo : public grpc::CallbackGenericService {
  class Reactor : public grpc::ServerGenericBidiReactor {
   public:
    explicit Reactor(grpc::GenericCallbackServerContext* ctx) : ctx_(ctx) { StartRead(&in_); }
    void OnReadDone(bool ok) override {
      if (!ok) return Finish(grpc::Status::OK);
      auto it = ctx_->client_metadata().find("x-fail");
      if (it != ctx_->client_metadata().end()) {
        return Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "upstream says no "));
      }
      StartWriteAndFinish(&in_, grpc::WriteOptions(), grpc::Status::OK);
    }
    void OnWriteDone(bool) override {}
    void OnDone() override { delete this; }

   private:
    grpc::GenericCallbackServerContext* ctx_;
    grpc::ByteBuffer in_;
  };

 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(ctx);
  }
};

class QuickInterceptor : public ImageInterceptor {
 public:
  InterceptResult PullImage(CriVersion, const std::string& request, const CallOptions&) override {
    if (!request.empty() && request[0] == 'e') {
      return {RpcStatus(RpcCode::UNAVAILABLE, request, request), ""};
    }
    return {RpcStatus::OK, request};
  }
  bool StatusNeedsRecovery(CriVersion, const std::string&, const std::string& response) override {
    return !response.empty() && response[0] == 'm';
  }
  InterceptResult RecoverStatus(CriVersion, const std::string& request, const std::string&,
                                const CallOptions&) override {
    return {RpcStatus::OK, "recovered:" + request};
  }
};

struct World {
  std::string dir, listen, upstream;
  Echo echo;
  std::unique_ptr<grpc::Server> server;
  QuickInterceptor interceptor;
  std::unique_ptr<H2Relay> relay;
  std::shared_ptr<grpc::Channel> channel;
};

World* world = nullptr;

int Connect() {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, world->listen.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    std::perror("connect to the relay");
    abort();
  }
  return fd;
}

// Reads what the relay sends for up to `ms` of quiet, or until it closes.
void Drain(int fd, int ms) {
  char buf[16384];
  pollfd p{fd, POLLIN, 0};
  while (poll(&p, 1, ms) > 0) {
    if (read(fd, buf, sizeof buf) <= 0) return;
  }
}

std::string GrpcFrame(FuzzedDataProvider& in) {
  std::string msg = in.ConsumeRandomLengthString(256);
  std::string out(5, '\0');
  out[0] = static_cast<char>(in.ConsumeIntegralInRange<int>(0, 2));
  uint32_t n =
      in.ConsumeBool() ? static_cast<uint32_t>(msg.size()) : in.ConsumeIntegral<uint32_t>();
  for (int i = 0; i < 4; ++i) out[1 + i] = static_cast<char>(n >> (24 - 8 * i));
  return out + msg;
}

ssize_t ReadBody(nghttp2_session*, int32_t, uint8_t* buf, size_t length, uint32_t* flags,
                 nghttp2_data_source* source, void*) {
  auto* body = static_cast<std::string*>(source->ptr);
  size_t n = std::min(length, body->size());
  std::memcpy(buf, body->data(), n);
  body->erase(0, n);
  if (body->empty()) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return static_cast<ssize_t>(n);
}

// HTTP/2 client bytes built from the input.
std::string Traffic(FuzzedDataProvider& in, std::vector<std::string>* bodies) {
  static nghttp2_session_callbacks* cb = [] {
    nghttp2_session_callbacks* c;
    nghttp2_session_callbacks_new(&c);
    return c;
  }();
  nghttp2_session* s;
  nghttp2_session_client_new(&s, cb, nullptr);
  nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, nullptr, 0);
  static const char* kPaths[] = {"/runtime.v1.ImageService/PullImage",
                                 "/runtime.v1alpha2.ImageService/PullImage",
                                 "/runtime.v1.ImageService/ImageStatus",
                                 "/runtime.v1.RuntimeService/Version",
                                 "/test.Echo/Unary",
                                 "/runtime.v1.RuntimeService/GetContainerEvents"};
  const int requests = in.ConsumeIntegralInRange<int>(0, 4);
  bodies->reserve(requests);
  for (int r = 0; r < requests; ++r) {
    std::vector<std::pair<std::string, std::string>> h = {
        {":method", "POST"}, {":scheme", "http"}, {":authority", "localhost"}};
    h.push_back({":path", in.ConsumeBool() ? kPaths[in.ConsumeIntegralInRange<int>(0, 5)]
                                           : in.ConsumeRandomLengthString(40)});
    h.push_back({"content-type", "application/grpc"});
    h.push_back({"te", "trailers"});
    if (in.ConsumeBool()) h.push_back({"grpc-timeout", in.ConsumeRandomLengthString(10)});
    if (in.ConsumeBool()) h.push_back({"x-fail", "1"});
    if (in.ConsumeBool()) {
      h.push_back({in.ConsumeRandomLengthString(16), in.ConsumeRandomLengthString(64)});
    }
    std::vector<nghttp2_nv> nv;
    for (auto& [k, v] : h) {
      nv.push_back({reinterpret_cast<uint8_t*>(k.data()), reinterpret_cast<uint8_t*>(v.data()),
                    k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
    }
    bodies->push_back(in.ConsumeBool() ? GrpcFrame(in) : "");
    nghttp2_data_provider prd{};
    prd.source.ptr = &bodies->back();
    prd.read_callback = ReadBody;
    int32_t id = nghttp2_submit_request(s, nullptr, nv.data(), nv.size(),
                                        bodies->back().empty() ? nullptr : &prd, nullptr);
    if (id > 0 && in.ConsumeIntegralInRange<int>(0, 7) == 0) {
      nghttp2_submit_rst_stream(s, NGHTTP2_FLAG_NONE, id,
                                in.ConsumeIntegralInRange<uint32_t>(0, 13));
    }
  }
  switch (in.ConsumeIntegralInRange<int>(0, 4)) {
    case 0:
      nghttp2_submit_ping(s, NGHTTP2_FLAG_NONE, nullptr);
      break;
    case 1:
      nghttp2_submit_window_update(s, NGHTTP2_FLAG_NONE, in.ConsumeIntegralInRange<int32_t>(0, 9),
                                   in.ConsumeIntegralInRange<int32_t>(1, 1 << 20));
      break;
    case 2: {
      nghttp2_settings_entry e{in.ConsumeIntegralInRange<int32_t>(1, 8),
                               in.ConsumeIntegral<uint32_t>()};
      nghttp2_submit_settings(s, NGHTTP2_FLAG_NONE, &e, 1);
      break;
    }
    case 3:
      nghttp2_submit_goaway(s, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, nullptr, 0);
      break;
    default:
      break;
  }
  std::string out;
  const uint8_t* data;
  ssize_t n;
  while ((n = nghttp2_session_mem_send(s, &data)) > 0)
    out.append(reinterpret_cast<const char*>(data), n);
  nghttp2_session_del(s);
  return out;
}

grpc::Status VersionCall() {
  grpc::GenericStub stub(world->channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  grpc::Slice slice(std::string("alive"));
  grpc::ByteBuffer req(&slice, 1), resp;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, "/runtime.v1.RuntimeService/Version", grpc::StubOptions(), &req, &resp,
                 [&](grpc::Status s) { done.set_value(s); });
  return done.get_future().get();
}

// An input may make the echo server drop the relay's upstream connection (the next call opens
// a new one), so a failure is retried before it counts.
void CheckAlive() {
  grpc::Status s = VersionCall();
  for (int i = 0; i < 3 && !s.ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    s = VersionCall();
  }
  if (!s.ok()) {
    std::fprintf(stderr, "relay stopped answering: %d %s\n", s.error_code(),
                 s.error_message().c_str());
    abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  world = new World();
  char tmpl[] = "/tmp/rp-relay-fuzz-XXXXXX";
  if (!mkdtemp(tmpl)) {
    std::perror("mkdtemp");
    abort();
  }
  world->dir = tmpl;
  world->listen = world->dir + "/relay.sock";
  world->upstream = world->dir + "/upstream.sock";
  grpc::ServerBuilder b;
  b.AddListeningPort("unix://" + world->upstream, grpc::InsecureServerCredentials());
  b.RegisterCallbackGenericService(&world->echo);
  world->server = b.BuildAndStart();
  ProxyOptions o;
  o.listen = world->listen;
  o.upstream = world->upstream;
  o.max_message_bytes = 1 << 20;
  world->relay = std::make_unique<H2Relay>(o, &world->interceptor, nullptr);
  if (Status s = world->relay->Start(); !s.ok()) {
    std::fprintf(stderr, "relay: %s\n", s.message().c_str());
    abort();
  }
  world->channel =
      grpc::CreateChannel("unix://" + world->listen, grpc::InsecureChannelCredentials());
  CheckAlive();
  // At the end of -max_total_time libFuzzer calls exit(): stop the relay and the server before
  // static destructors run, then remove the sockets' directory. (spdlog's registry, which the
  // relay's thread logs through, is made first, so that it is destroyed after this runs.)
  spdlog::default_logger();
  std::atexit([] {
    world->relay->Shutdown(std::chrono::milliseconds(0));
    world->server->Shutdown(std::chrono::system_clock::now());
    std::filesystem::remove_all(world->dir);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static int runs = 0;
  FuzzedDataProvider in(data, size);
  const bool preface = in.ConsumeBool();
  std::vector<std::string> bodies;
  std::string bytes = preface ? Traffic(in, &bodies) : "";
  bytes += in.ConsumeRemainingBytesAsString();
  int fd = Connect();
  if (!bytes.empty() && send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) < 0) {
    // The relay may already have closed a connection it found bad: fine.
  }
  Drain(fd, 3);  // let answers (relayed, intercepted, refused) come back
  shutdown(fd, SHUT_WR);
  Drain(fd, 200);
  close(fd);
  if (++runs % 64 == 0) CheckAlive();
  return 0;
}
