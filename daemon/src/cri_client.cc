#include "cri_client.h"

#include <utility>

namespace registry_proxy {

Result<std::string> NormalizeCriEndpoint(std::string_view endpoint) {
  std::string_view path = endpoint;
  if (path.rfind("unix://", 0) == 0) {
    path.remove_prefix(7);
  } else if (path.rfind("unix:", 0) == 0) {
    path.remove_prefix(5);
  }
  if (path.empty() || path[0] != '/') {
    return Status::Error("endpoint '" + std::string(endpoint) +
                         "' is not a unix socket (want unix:///path or /path)");
  }
  return "unix://" + std::string(path);
}

Result<std::unique_ptr<CriClient>> CriClient::Connect(std::string_view endpoint) {
  auto target = NormalizeCriEndpoint(endpoint);
  if (!target.ok()) return target.status();
  grpc::ChannelArguments args;
  // kubelet allows 16 MiB; ListImages on a busy node outgrows gRPC's 4 MiB default.
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  auto channel = grpc::CreateCustomChannel(*target, grpc::InsecureChannelCredentials(), args);
  return std::unique_ptr<CriClient>(new CriClient(*target, std::move(channel)));
}

CriClient::CriClient(std::string endpoint, std::shared_ptr<grpc::Channel> channel)
    : endpoint_(std::move(endpoint)),
      channel_(std::move(channel)),
      runtime_(runtime::v1::RuntimeService::NewStub(channel_)),
      images_(runtime::v1::ImageService::NewStub(channel_)) {}

void CriClient::SetTimeout(grpc::ClientContext* ctx, Duration timeout) {
  if (timeout.count() > 0) ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

grpc::Status CriClient::Version(runtime::v1::VersionResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::VersionRequest req;
  req.set_version("v1");
  return runtime_->Version(&ctx, req, out);
}

grpc::Status CriClient::PullImage(const runtime::v1::PullImageRequest& req,
                                  runtime::v1::PullImageResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  return images_->PullImage(&ctx, req, out);
}

grpc::Status CriClient::ImageStatus(const std::string& image, bool verbose,
                                    runtime::v1::ImageStatusResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image(image);
  req.set_verbose(verbose);
  return images_->ImageStatus(&ctx, req, out);
}

grpc::Status CriClient::ListImages(runtime::v1::ListImagesResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  return images_->ListImages(&ctx, runtime::v1::ListImagesRequest(), out);
}

grpc::Status CriClient::RemoveImage(const std::string& image, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::RemoveImageRequest req;
  req.mutable_image()->set_image(image);
  runtime::v1::RemoveImageResponse resp;
  return images_->RemoveImage(&ctx, req, &resp);
}

}  // namespace registry_proxy
