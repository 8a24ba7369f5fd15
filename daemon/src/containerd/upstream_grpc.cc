// The upstream interfaces over RpcChannel.
//
// The CRI calls go by method path, which follows the caller's CRI version, while the message
// types stay runtime.v1 (the same on the wire for every field the daemon reads or writes).
#include "containerd/upstream_grpc.h"

#include <utility>
#include <vector>

#include "github.com/containerd/containerd/api/services/images/v1/images.pb.h"

namespace registry_proxy {
namespace {

namespace images = containerd::services::images::v1;

constexpr char kPullV1[] = "/runtime.v1.ImageService/PullImage";
constexpr char kPullV1alpha2[] = "/runtime.v1alpha2.ImageService/PullImage";
constexpr char kStatusV1[] = "/runtime.v1.ImageService/ImageStatus";
constexpr char kStatusV1alpha2[] = "/runtime.v1alpha2.ImageService/ImageStatus";

constexpr char kImagesList[] = "/containerd.services.images.v1.Images/List";
constexpr char kImagesGet[] = "/containerd.services.images.v1.Images/Get";
constexpr char kImagesCreate[] = "/containerd.services.images.v1.Images/Create";
constexpr char kImagesUpdate[] = "/containerd.services.images.v1.Images/Update";
constexpr char kImagesDelete[] = "/containerd.services.images.v1.Images/Delete";

constexpr char kNamespaceHeader[] = "containerd-namespace";

const char* PullMethod(CriVersion v) { return v == CriVersion::kV1 ? kPullV1 : kPullV1alpha2; }
const char* StatusMethod(CriVersion v) {
  return v == CriVersion::kV1 ? kStatusV1 : kStatusV1alpha2;
}

// One call with the downstream caller's deadline and metadata, stopped by its Cancellation.
template <class Request, class Response>
RpcStatus Unary(RpcChannel& channel, const char* method, const CallOptions& opts,
                const Request& request, Response* response) {
  RpcCallHandle handle;
  Cancellation::Scope scope(opts.cancellation, &handle);
  RpcCallOptions call;
  call.deadline = opts.deadline;
  call.metadata = opts.metadata;
  call.handle = &handle;
  return channel.Call(method, request, response, call);
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

std::shared_ptr<RpcChannel> MakeContainerdChannel(const std::string& endpoint,
                                                  int max_message_bytes) {
  RpcChannelOptions o;
  o.endpoint = endpoint;
  o.max_message_bytes = static_cast<size_t>(max_message_bytes);
  return std::make_shared<RpcChannel>(std::move(o));
}

GrpcCriImageBackend::GrpcCriImageBackend(std::shared_ptr<RpcChannel> channel)
    : channel_(std::move(channel)) {}

GrpcCriImageBackend::~GrpcCriImageBackend() = default;

RpcStatus GrpcCriImageBackend::PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                                         const CallOptions& opts,
                                         runtime::v1::PullImageResponse* resp) {
  return Unary(*channel_, PullMethod(v), opts, req, resp);
}

RpcStatus GrpcCriImageBackend::PullImageRaw(CriVersion v, const std::string& request,
                                            const CallOptions& opts, std::string* response) {
  response->clear();
  return Unary(*channel_, PullMethod(v), opts, std::string_view(request), response);
}

RpcStatus GrpcCriImageBackend::ImageStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                                           const CallOptions& opts,
                                           runtime::v1::ImageStatusResponse* resp) {
  return Unary(*channel_, StatusMethod(v), opts, req, resp);
}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel,
                                           std::string containerd_namespace)
    : GrpcImageRecordStore(std::move(channel), std::move(containerd_namespace), Options{}) {}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel,
                                           std::string containerd_namespace, Options options)
    : GrpcImageRecordStore(
          std::move(channel), [ns = std::move(containerd_namespace)] { return ns; }, options) {}

GrpcImageRecordStore::GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel,
                                           std::function<std::string()> containerd_namespace,
                                           Options options)
    : channel_(std::move(channel)),
      namespace_(std::move(containerd_namespace)),
      options_(options) {}

GrpcImageRecordStore::~GrpcImageRecordStore() = default;

RpcCallOptions GrpcImageRecordStore::Prepare() const {
  RpcCallOptions call;
  call.metadata = {{kNamespaceHeader, namespace_()}};
  if (options_.timeout.count() > 0) {
    call.deadline = std::chrono::system_clock::now() + options_.timeout;
  }
  return call;
}

RpcStatus GrpcImageRecordStore::GetMany(const std::vector<std::string>& names,
                                        std::vector<ImageRecord>* found) {
  found->clear();
  if (names.empty()) return RpcStatus::OK;
  images::ListImagesRequest req;
  for (const std::string& name : names) {
    req.add_filters("name==" + ContainerdFilterValue(name));  // filters are OR'ed
  }
  images::ListImagesResponse resp;
  RpcStatus s = channel_->Call(kImagesList, req, &resp, Prepare());
  if (!s.ok()) return s;
  for (const images::Image& image : resp.images()) found->push_back(FromProto(image));
  return s;
}

RpcStatus GrpcImageRecordStore::Get(const std::string& name, ImageRecord* out) {
  images::GetImageRequest req;
  req.set_name(name);
  images::GetImageResponse resp;
  RpcStatus s = channel_->Call(kImagesGet, req, &resp, Prepare());
  if (s.ok()) *out = FromProto(resp.image());
  return s;
}

RpcStatus GrpcImageRecordStore::Put(const ImageRecord& record) {
  // Create, else Update. A concurrent Delete between the two (another pull removing a name)
  // makes the Update miss; then Create again. Three rounds settle any realistic interleaving.
  RpcStatus s;
  for (int round = 0; round < 3; ++round) {
    {
      images::CreateImageRequest req;
      ToProto(record, req.mutable_image());
      images::CreateImageResponse resp;
      s = channel_->Call(kImagesCreate, req, &resp, Prepare());
      if (s.error_code() != RpcCode::ALREADY_EXISTS) return s;
    }
    images::UpdateImageRequest req;
    ToProto(record, req.mutable_image());
    req.mutable_update_mask()->add_paths("target");
    req.mutable_update_mask()->add_paths("labels");
    images::UpdateImageResponse resp;
    s = channel_->Call(kImagesUpdate, req, &resp, Prepare());
    if (s.error_code() != RpcCode::NOT_FOUND) return s;
  }
  return s;
}

RpcStatus GrpcImageRecordStore::Delete(const std::string& name) {
  images::DeleteImageRequest req;
  req.set_name(name);
  // sync=false: the content stays referenced by the other names; no GC wait is needed.
  google::protobuf::Empty resp;
  RpcStatus s = channel_->Call(kImagesDelete, req, &resp, Prepare());
  if (s.error_code() == RpcCode::NOT_FOUND) return RpcStatus::OK;
  return s;
}

}  // namespace registry_proxy
