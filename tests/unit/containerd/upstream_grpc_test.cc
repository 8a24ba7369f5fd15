// The gRPC upstream clients against an in-process server: method paths per CRI version, bytes
// on the wire, call options, cancellation, and the Images API contract (namespace header,
// Create-then-Update, Delete of a missing record). Real containerd is the integration tests'
// job; this pins down what the clients send.
#include "containerd/upstream_grpc.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>  // the fake containerd
#include <gtest/gtest.h>
#include <stdlib.h>

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

#include "github.com/containerd/containerd/api/services/images/v1/images.grpc.pb.h"

// Under TSan: the system's gRPC, protobuf and abseil are not instrumented, so TSan cannot see
// their synchronisation and reports every hand-off between gRPC's threads and ours as a race.
// Suppress reports with such a library in the stack; our own code is still checked wherever
// it does not run inside a gRPC callback.
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

namespace images = containerd::services::images::v1;
using std::chrono::milliseconds;

std::string ToString(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  (void)b.Dump(&slices);
  std::string out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// A CRI endpoint that records every call (method, metadata, bytes) and answers as told.
class FakeCri final : public grpc::CallbackGenericService {
 public:
  struct Call {
    std::string method;
    std::string request;
    std::multimap<std::string, std::string> metadata;
    std::chrono::system_clock::time_point deadline;
  };

  grpc::Status reply_status = grpc::Status::OK;
  std::string reply;  // raw response bytes
  bool hang = false;  // never answer; finish only when the client cancels

  std::vector<Call> calls() {
    std::lock_guard l(mu_);
    return calls_;
  }
  // Waits until `n` calls have arrived.
  bool WaitCalls(size_t n) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(5), [&] { return calls_.size() >= n; });
  }

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(this, ctx);
  }

 private:
  class Reactor final : public grpc::ServerGenericBidiReactor {
   public:
    Reactor(FakeCri* cri, grpc::GenericCallbackServerContext* ctx) : cri_(cri), ctx_(ctx) {
      StartRead(&request_);
    }
    void OnReadDone(bool ok) override {
      if (!ok) {
        FinishOnce(grpc::Status(grpc::StatusCode::INTERNAL, "no request"));
        return;
      }
      Call call;
      call.method = ctx_->method();
      call.request = ToString(request_);
      for (const auto& [k, v] : ctx_->client_metadata()) {
        call.metadata.emplace(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
      }
      call.deadline = ctx_->deadline();
      {
        std::lock_guard l(cri_->mu_);
        cri_->calls_.push_back(std::move(call));
      }
      cri_->cv_.notify_all();
      if (cri_->hang) return;  // OnCancel finishes it
      if (!cri_->reply_status.ok()) {
        FinishOnce(cri_->reply_status);
        return;
      }
      std::lock_guard l(mu_);
      if (finished_) return;
      finished_ = true;
      grpc::Slice slice(cri_->reply);
      response_ = grpc::ByteBuffer(&slice, 1);
      StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
    }
    // OnCancel may run concurrently with the other reactions; Finish must happen once.
    void OnCancel() override { FinishOnce(grpc::Status::CANCELLED); }
    void OnDone() override { delete this; }

   private:
    void FinishOnce(const grpc::Status& s) {
      std::lock_guard l(mu_);
      if (finished_) return;
      finished_ = true;
      Finish(s);
    }

    std::mutex mu_;
    bool finished_ = false;
    FakeCri* cri_;
    grpc::GenericCallbackServerContext* ctx_;
    grpc::ByteBuffer request_, response_;
  };

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call> calls_;
};

// containerd's Images service over a map, with its 1.6 semantics for what the client uses.
class FakeImages final : public images::Images::Service {
 public:
  std::vector<std::string> namespaces;  // the header of every call
  std::vector<std::string> ops;
  std::map<std::string, images::Image> store;
  std::vector<std::string> update_paths;

  grpc::Status Get(grpc::ServerContext* ctx, const images::GetImageRequest* req,
                   images::GetImageResponse* resp) override {
    Note(ctx, "get");
    auto it = store.find(req->name());
    if (it == store.end()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "image \"" + req->name() + "\": not found");
    }
    *resp->mutable_image() = it->second;
    return grpc::Status::OK;
  }
  grpc::Status Create(grpc::ServerContext* ctx, const images::CreateImageRequest* req,
                      images::CreateImageResponse* resp) override {
    Note(ctx, "create");
    if (store.count(req->image().name())) {
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "image already exists");
    }
    store[req->image().name()] = req->image();
    *resp->mutable_image() = req->image();
    return grpc::Status::OK;
  }
  grpc::Status Update(grpc::ServerContext* ctx, const images::UpdateImageRequest* req,
                      images::UpdateImageResponse* resp) override {
    Note(ctx, "update");
    auto it = store.find(req->image().name());
    if (it == store.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "not found");
    update_paths.assign(req->update_mask().paths().begin(), req->update_mask().paths().end());
    for (const std::string& p : update_paths) {
      if (p == "labels") {
        *it->second.mutable_labels() = req->image().labels();  // replaces the whole map
      } else if (p == "target") {
        *it->second.mutable_target() = req->image().target();
      } else {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "cannot update " + p);
      }
    }
    *resp->mutable_image() = it->second;
    return grpc::Status::OK;
  }
  grpc::Status Delete(grpc::ServerContext* ctx, const images::DeleteImageRequest* req,
                      google::protobuf::Empty*) override {
    Note(ctx, "delete");
    if (req->sync()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no sync here");
    if (!store.erase(req->name())) return grpc::Status(grpc::StatusCode::NOT_FOUND, "not found");
    return grpc::Status::OK;
  }

 private:
  void Note(grpc::ServerContext* ctx, const std::string& op) {
    ops.push_back(op);
    auto it = ctx->client_metadata().find("containerd-namespace");
    namespaces.push_back(it == ctx->client_metadata().end()
                             ? "<none>"
                             : std::string(it->second.data(), it->second.size()));
  }
};

class UpstreamGrpcTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/upstream_grpc_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    grpc::ServerBuilder b;
    b.AddListeningPort("unix://" + dir_ + "/containerd.sock", grpc::InsecureServerCredentials());
    b.RegisterService(&images_);
    b.RegisterCallbackGenericService(&cri_);
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    channel_ = MakeContainerdChannel("unix://" + dir_ + "/containerd.sock", 16 << 20);
  }
  void TearDown() override {
    channel_.reset();
    server_->Shutdown(std::chrono::system_clock::now());
    std::filesystem::remove_all(dir_);
  }

  std::string dir_;
  FakeCri cri_;
  FakeImages images_;
  std::unique_ptr<grpc::Server> server_;
  std::shared_ptr<RpcChannel> channel_;
};

TEST_F(UpstreamGrpcTest, PullImageUsesTheCallersVersionAndOptions) {
  runtime::v1::PullImageResponse reply;
  reply.set_image_ref("sha256:abc");
  cri_.reply = reply.SerializeAsString();
  GrpcCriImageBackend backend(channel_);

  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image("m.example/library/nginx:latest");
  CallOptions opts;
  opts.deadline = std::chrono::system_clock::now() + std::chrono::hours(1);
  opts.metadata = {{"x-trace", "t1"}};
  runtime::v1::PullImageResponse resp;
  ASSERT_TRUE(backend.PullImage(CriVersion::kV1, req, opts, &resp).ok());
  EXPECT_EQ(resp.image_ref(), "sha256:abc");
  ASSERT_TRUE(backend.PullImage(CriVersion::kV1alpha2, req, {}, &resp).ok());

  const auto calls = cri_.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].method, "/runtime.v1.ImageService/PullImage");
  EXPECT_EQ(calls[1].method, "/runtime.v1alpha2.ImageService/PullImage");
  EXPECT_EQ(calls[0].request, req.SerializeAsString());
  EXPECT_EQ(calls[0].metadata.find("x-trace")->second, "t1");
  EXPECT_LE(std::chrono::abs(calls[0].deadline - opts.deadline), std::chrono::seconds(1));
  EXPECT_EQ(calls[1].metadata.count("x-trace"), 0u);
  EXPECT_GT(calls[1].deadline, std::chrono::system_clock::now() + std::chrono::hours(24 * 365));
}

TEST_F(UpstreamGrpcTest, ImageStatusPaths) {
  GrpcCriImageBackend backend(channel_);
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image("nginx");
  runtime::v1::ImageStatusResponse resp;
  ASSERT_TRUE(backend.ImageStatus(CriVersion::kV1, req, {}, &resp).ok());
  ASSERT_TRUE(backend.ImageStatus(CriVersion::kV1alpha2, req, {}, &resp).ok());
  const auto calls = cri_.calls();
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].method, "/runtime.v1.ImageService/ImageStatus");
  EXPECT_EQ(calls[1].method, "/runtime.v1alpha2.ImageService/ImageStatus");
}

TEST_F(UpstreamGrpcTest, RawPullIsByteExactBothWays) {
  const std::string garbage("\x0a\xff\xff\xff\xff\x0f\x00\x01", 8);
  cri_.reply = std::string(
      "\x0a\x03"
      "abc\xfa\x06\x01z",
      8);  // with an unknown field
  GrpcCriImageBackend backend(channel_);
  std::string out;
  ASSERT_TRUE(backend.PullImageRaw(CriVersion::kV1, garbage, {}, &out).ok());
  EXPECT_EQ(out, cri_.reply);
  ASSERT_EQ(cri_.calls().size(), 1u);
  EXPECT_EQ(cri_.calls()[0].request, garbage);
}

TEST_F(UpstreamGrpcTest, ErrorsComeBackUnchanged) {
  cri_.reply_status = grpc::Status(grpc::StatusCode::NOT_FOUND, "failed to pull: \"x\" not found");
  GrpcCriImageBackend backend(channel_);
  runtime::v1::PullImageRequest req;
  runtime::v1::PullImageResponse resp;
  RpcStatus s = backend.PullImage(CriVersion::kV1, req, {}, &resp);
  EXPECT_EQ(s.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(s.error_message(), "failed to pull: \"x\" not found");
  std::string out = "stale";
  s = backend.PullImageRaw(CriVersion::kV1, "", {}, &out);
  EXPECT_EQ(s.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(out, "");
}

TEST_F(UpstreamGrpcTest, CancellationStopsARunningCall) {
  cri_.hang = true;
  GrpcCriImageBackend backend(channel_);
  Cancellation cancel;
  CallOptions opts;
  opts.cancellation = &cancel;
  std::thread t([&] {
    ASSERT_TRUE(cri_.WaitCalls(1));
    cancel.Cancel();
  });
  runtime::v1::PullImageRequest req;
  runtime::v1::PullImageResponse resp;
  const auto start = std::chrono::steady_clock::now();
  RpcStatus s = backend.PullImage(CriVersion::kV1, req, opts, &resp);
  t.join();
  EXPECT_EQ(s.error_code(), RpcCode::CANCELLED);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));

  // Cancelled before the call: it never runs long.
  RpcStatus again = backend.PullImage(CriVersion::kV1, req, opts, &resp);
  EXPECT_EQ(again.error_code(), RpcCode::CANCELLED);
}

TEST_F(UpstreamGrpcTest, DeadlineBoundsACall) {
  cri_.hang = true;
  GrpcCriImageBackend backend(channel_);
  CallOptions opts;
  opts.deadline = std::chrono::system_clock::now() + milliseconds(100);
  runtime::v1::PullImageRequest req;
  runtime::v1::PullImageResponse resp;
  EXPECT_EQ(backend.PullImage(CriVersion::kV1, req, opts, &resp).error_code(),
            RpcCode::DEADLINE_EXCEEDED);
}

TEST_F(UpstreamGrpcTest, RecordStoreContract) {
  GrpcImageRecordStore store(channel_, "k8s.io");
  ImageRecord r;
  r.name = "docker.io/library/nginx:latest";
  r.labels = {{"io.cri-containerd.image", "managed"}, {"a", "1"}};
  r.target_media_type = "application/vnd.oci.image.index.v1+json";
  r.target_digest = "sha256:" + std::string(64, 'a');
  r.target_size = 1234;
  ASSERT_TRUE(store.Put(r).ok());

  ImageRecord got;
  ASSERT_TRUE(store.Get(r.name, &got).ok());
  EXPECT_EQ(got.name, r.name);
  EXPECT_EQ(got.labels, r.labels);
  EXPECT_EQ(got.target_media_type, r.target_media_type);
  EXPECT_EQ(got.target_digest, r.target_digest);
  EXPECT_EQ(got.target_size, 1234);

  // Put on an existing record: Update with target and labels; labels end up exactly as given.
  r.labels = {{"b", "2"}};
  r.target_digest = "sha256:" + std::string(64, 'b');
  ASSERT_TRUE(store.Put(r).ok());
  EXPECT_EQ(images_.update_paths, (std::vector<std::string>{"target", "labels"}));
  ASSERT_TRUE(store.Get(r.name, &got).ok());
  EXPECT_EQ(got.labels, r.labels);
  EXPECT_EQ(got.target_digest, r.target_digest);

  EXPECT_EQ(store.Get("nope", &got).error_code(), RpcCode::NOT_FOUND);
  EXPECT_TRUE(store.Delete(r.name).ok());
  EXPECT_TRUE(store.Delete(r.name).ok());  // already gone: OK
  EXPECT_EQ(images_.ops, (std::vector<std::string>{"create", "get", "create", "update", "get",
                                                   "get", "delete", "delete"}));
  for (const std::string& ns : images_.namespaces) EXPECT_EQ(ns, "k8s.io");
}

TEST_F(UpstreamGrpcTest, RecordStoreAsksForTheNamespaceOnEveryCall) {
  std::string ns = "k8s.io";
  GrpcImageRecordStore store(
      channel_, [&ns] { return ns; }, GrpcImageRecordStore::Options{});
  ImageRecord got;
  store.Get("a", &got);
  ns = "other";
  store.Get("a", &got);
  EXPECT_EQ(images_.namespaces, (std::vector<std::string>{"k8s.io", "other"}));
}

}  // namespace
}  // namespace registry_proxy
