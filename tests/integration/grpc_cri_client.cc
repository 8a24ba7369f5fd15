#include "grpc_cri_client.h"

#include <utility>

namespace registry_proxy {

Result<std::unique_ptr<GrpcCriClient>> GrpcCriClient::Connect(std::string_view endpoint) {
  auto target = NormalizeCriEndpoint(endpoint);
  if (!target.ok()) return target.status();
  grpc::ChannelArguments args;
  // kubelet allows 16 MiB; ListImages on a busy node outgrows gRPC's 4 MiB default.
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // In gRPC this is also the minimum time a connection attempt gets to complete its handshake
  // (the server's SETTINGS frame). At 100 ms a daemon that is starting (socket activation: the
  // socket accepts at once, the daemon answers once it is up) failed every call with
  // "connection attempt timed out before receiving SETTINGS frame". Calls are bounded by their
  // own deadlines anyway.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, kConnectTimeoutMs);
  auto channel = grpc::CreateCustomChannel(*target, grpc::InsecureChannelCredentials(), args);
  return std::unique_ptr<GrpcCriClient>(new GrpcCriClient(*target, std::move(channel)));
}

GrpcCriClient::GrpcCriClient(std::string endpoint, std::shared_ptr<grpc::Channel> channel)
    : endpoint_(std::move(endpoint)),
      channel_(std::move(channel)),
      runtime_(runtime::v1::RuntimeService::NewStub(channel_)),
      images_(runtime::v1::ImageService::NewStub(channel_)) {}

void GrpcCriClient::SetTimeout(grpc::ClientContext* ctx, Duration timeout) {
  if (timeout.count() > 0) ctx->set_deadline(std::chrono::system_clock::now() + timeout);
  // Wait for a connection (a daemon restarting, a socket not there yet) up to the deadline, as
  // crictl does, instead of failing at once while the channel is between attempts.
  ctx->set_wait_for_ready(true);
}

grpc::Status GrpcCriClient::Finish(grpc::Status s, Duration timeout) const {
  if (s.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) return s;
  // The deadline passed before there was any connection: say so, as UNAVAILABLE (what a
  // fail-fast call says), rather than a bare "Deadline Exceeded".
  const grpc_connectivity_state state = channel_->GetState(false);
  if (state == GRPC_CHANNEL_READY) return s;
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      "no connection to " + endpoint_ + " within " +
                          std::to_string(timeout.count()) + " ms (" +
                          (state == GRPC_CHANNEL_CONNECTING ? "connecting" : "not answering") +
                          "; is the daemon running?)");
}

grpc::Status GrpcCriClient::Version(runtime::v1::VersionResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::VersionRequest req;
  req.set_version("v1");
  return Finish(runtime_->Version(&ctx, req, out), timeout);
}

grpc::Status GrpcCriClient::PullImage(const runtime::v1::PullImageRequest& req,
                                      runtime::v1::PullImageResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  return Finish(images_->PullImage(&ctx, req, out), timeout);
}

grpc::Status GrpcCriClient::ImageStatus(const std::string& image, bool verbose,
                                        runtime::v1::ImageStatusResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image(image);
  req.set_verbose(verbose);
  return Finish(images_->ImageStatus(&ctx, req, out), timeout);
}

grpc::Status GrpcCriClient::ListImages(runtime::v1::ListImagesResponse* out, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  return Finish(images_->ListImages(&ctx, runtime::v1::ListImagesRequest(), out), timeout);
}

grpc::Status GrpcCriClient::RemoveImage(const std::string& image, Duration timeout) {
  grpc::ClientContext ctx;
  SetTimeout(&ctx, timeout);
  runtime::v1::RemoveImageRequest req;
  req.mutable_image()->set_image(image);
  runtime::v1::RemoveImageResponse resp;
  return Finish(images_->RemoveImage(&ctx, req, &resp), timeout);
}

}  // namespace registry_proxy
