// gRPC implementations of the upstream interfaces.
//
// The CRI calls use grpc::internal::BlockingUnaryCall with our own RpcMethod, exactly what a
// generated stub does, because the method path must follow the caller's CRI version while the
// message types stay runtime.v1. It is gRPC's internal API, but it is the one generated code
// compiles against, so it is as stable as the generated code of this gRPC version.
#include "containerd/upstream_grpc.h"

#include "containerd/grpc_status.h"

#include <grpcpp/impl/client_unary_call.h>
#include <grpcpp/impl/rpc_method.h>

#include <utility>
#include <vector>

namespace registry_proxy {
namespace {

namespace images = containerd::services::images::v1;
using grpc::internal::RpcMethod;

constexpr char kPullV1[] = "/runtime.v1.ImageService/PullImage";
constexpr char kPullV1alpha2[] = "/runtime.v1alpha2.ImageService/PullImage";
constexpr char kStatusV1[] = "/runtime.v1.ImageService/ImageStatus";
constexpr char kStatusV1alpha2[] = "/runtime.v1alpha2.ImageService/ImageStatus";

constexpr char kNamespaceHeader[] = "containerd-namespace";

void ApplyCallOptions(const CallOptions& opts, grpc::ClientContext* ctx) {
  if (opts.deadline != std::chrono::system_clock::time_point::max()) {
    ctx->set_deadline(opts.deadline);
  }
  for (const auto& [key, value] : opts.metadata) ctx->AddMetadata(key, value);
}

// A grpc::ClientContext as a call the caller's Cancellation can stop.
class CancellableContext final : public Cancellable {
 public:
  explicit CancellableContext(grpc::ClientContext* ctx) : ctx_(ctx) {}
  void Cancel() override { ctx_->TryCancel(); }

 private:
  grpc::ClientContext* ctx_;
};

template <class Request, class Response>
RpcStatus Unary(grpc::ChannelInterface* channel, const RpcMethod& method,
                   const CallOptions& opts, const Request& request, Response* response) {
  grpc::ClientContext ctx;
  ApplyCallOptions(opts, &ctx);
  CancellableContext cancellable(&ctx);
  Cancellation::Scope scope(opts.cancellation, &cancellable);
  return FromGrpc(grpc::internal::BlockingUnaryCall<Request, Response>(channel, method, &ctx,
                                                                       request, response));
}

ImageRecord FromProto(const images::Image& image) {
  ImageRecord r;
  r.name = image.name();
  r.labels.insert(image.labels().begin(), image.labels().end());
  r.target_media_type = image.target().media_type();
  r.target_digest = image.target().digest();
  r.target_size = image.target().size();
  return r;
}

void ToProto(const ImageRecord& r, images::Image* image) {
  image->set_name(r.name);
  image->mutable_labels()->insert(r.labels.begin(), r.labels.end());
  image->mutable_target()->set_media_type(r.target_media_type);
  image->mutable_target()->set_digest(r.target_digest);
  image->mutable_target()->set_size(r.target_size);
}

}  // namespace

std::string ContainerdFilterValue(std::string_view value) {
  std::string out = "\"";
  for (char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    out += c;
  }
  return out + "\"";
}

std::shared_ptr<grpc::Channel> MakeUpstreamChannel(const std::string& endpoint,
                                                   int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  // containerd restarts take seconds; come back within one of it being up again.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Also gRPC's minimum connect timeout (the time an attempt has to receive the peer's SETTINGS
  // frame): at 100 ms a containerd slow to answer (starting, busy) failed pulls with "connection
  // attempt timed out before receiving SETTINGS frame". Calls keep their own deadlines.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 20000);
  // No retry machinery: it buffers every call's send ops in case it must replay them, and the
  // proxy must not replay anyway (the caller, kubelet, decides that).
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  std::string target = endpoint.rfind("unix:", 0) == 0 ? endpoint : "unix://" + endpoint;
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

struct GrpcCriImageBackend::Methods {
  explicit Methods(const std::shared_ptr<grpc::Channel>& channel)
      : pull_v1(kPullV1, RpcMethod::NORMAL_RPC, channel),
        pull_v1alpha2(kPullV1alpha2, RpcMethod::NORMAL_RPC, channel),
        status_v1(kStatusV1, RpcMethod::NORMAL_RPC, channel),
        status_v1alpha2(kStatusV1alpha2, RpcMethod::NORMAL_RPC, channel) {}

  const RpcMethod& Pull(CriVersion v) const {
    return v == CriVersion::kV1 ? pull_v1 : pull_v1alpha2;
  }
  const RpcMethod& Status(CriVersion v) const {
    return v == CriVersion::kV1 ? status_v1 : status_v1alpha2;
  }

  RpcMethod pull_v1, pull_v1alpha2, status_v1, status_v1alpha2;
};

GrpcCriImageBackend::GrpcCriImageBackend(std::shared_ptr<grpc::Channel> channel)
    : channel_(std::move(channel)), methods_(std::make_unique<const Methods>(channel_)) {}

GrpcCriImageBackend::~GrpcCriImageBackend() = default;

RpcStatus GrpcCriImageBackend::PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                                            const CallOptions& opts,
                                            runtime::v1::PullImageResponse* resp) {
  return Unary(channel_.get(), methods_->Pull(v), opts, req, resp);
}

RpcStatus GrpcCriImageBackend::PullImageRaw(CriVersion v, const std::string& request,
                                               const CallOptions& opts, std::string* response) {
  grpc::Slice slice(request);
  grpc::ByteBuffer in(&slice, 1);
  grpc::ByteBuffer out;
  RpcStatus status = Unary(channel_.get(), methods_->Pull(v), opts, in, &out);
  response->clear();
  if (status.ok()) {
    std::vector<grpc::Slice> slices;
    if (!out.Dump(&slices).ok()) {
      return RpcStatus(RpcCode::INTERNAL, "cannot read the PullImage response");
    }
    for (const grpc::Slice& s : slices) {
      response->append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  return status;
}

RpcStatus GrpcCriImageBackend::ImageStatus(CriVersion v,
                                              const runtime::v1::ImageStatusRequest& req,
                                              const CallOptions& opts,
                                              runtime::v1::ImageStatusResponse* resp) {
  return Unary(channel_.get(), methods_->Status(v), opts, req, resp);
}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel,
                                           std::string containerd_namespace)
    : GrpcImageRecordStore(std::move(channel), std::move(containerd_namespace), Options{}) {}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel,
                                           std::string containerd_namespace, Options options)
    : GrpcImageRecordStore(
          std::move(channel), [ns = std::move(containerd_namespace)] { return ns; }, options) {}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel,
                                           std::function<std::string()> containerd_namespace,
                                           Options options)
    : stub_(images::Images::NewStub(std::move(channel))),
      namespace_(std::move(containerd_namespace)),
      options_(options) {}

GrpcImageRecordStore::~GrpcImageRecordStore() = default;

void GrpcImageRecordStore::Prepare(grpc::ClientContext* ctx) const {
  ctx->AddMetadata(kNamespaceHeader, namespace_());
  if (options_.timeout.count() > 0) {
    ctx->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  }
}

RpcStatus GrpcImageRecordStore::GetMany(const std::vector<std::string>& names,
                                           std::vector<ImageRecord>* found) {
  found->clear();
  if (names.empty()) return RpcStatus::OK;
  grpc::ClientContext ctx;
  Prepare(&ctx);
  images::ListImagesRequest req;
  for (const std::string& name : names) {
    req.add_filters("name==" + ContainerdFilterValue(name));  // filters are OR'ed
  }
  images::ListImagesResponse resp;
  RpcStatus s = FromGrpc(stub_->List(&ctx, req, &resp));
  if (!s.ok()) return s;
  for (const images::Image& image : resp.images()) found->push_back(FromProto(image));
  return s;
}

RpcStatus GrpcImageRecordStore::Get(const std::string& name, ImageRecord* out) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  images::GetImageRequest req;
  req.set_name(name);
  images::GetImageResponse resp;
  RpcStatus s = FromGrpc(stub_->Get(&ctx, req, &resp));
  if (s.ok()) *out = FromProto(resp.image());
  return s;
}

RpcStatus GrpcImageRecordStore::Put(const ImageRecord& record) {
  // Create, else Update. A concurrent Delete between the two (another pull removing a name)
  // makes the Update miss; then Create again. Three rounds settle any realistic interleaving.
  RpcStatus s;
  for (int round = 0; round < 3; ++round) {
    {
      grpc::ClientContext ctx;
      Prepare(&ctx);
      images::CreateImageRequest req;
      ToProto(record, req.mutable_image());
      images::CreateImageResponse resp;
      s = FromGrpc(stub_->Create(&ctx, req, &resp));
      if (s.error_code() != RpcCode::ALREADY_EXISTS) return s;
    }
    grpc::ClientContext ctx;
    Prepare(&ctx);
    images::UpdateImageRequest req;
    ToProto(record, req.mutable_image());
    req.mutable_update_mask()->add_paths("target");
    req.mutable_update_mask()->add_paths("labels");
    images::UpdateImageResponse resp;
    s = FromGrpc(stub_->Update(&ctx, req, &resp));
    if (s.error_code() != RpcCode::NOT_FOUND) return s;
  }
  return s;
}

RpcStatus GrpcImageRecordStore::Delete(const std::string& name) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  images::DeleteImageRequest req;
  req.set_name(name);
  // sync=false: the content stays referenced by the other names; no GC wait is needed.
  google::protobuf::Empty resp;
  RpcStatus s = FromGrpc(stub_->Delete(&ctx, req, &resp));
  if (s.error_code() == RpcCode::NOT_FOUND) return RpcStatus::OK;
  return s;
}

}  // namespace registry_proxy
