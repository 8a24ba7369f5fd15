#include "containerd/cri_client.h"

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
  return std::unique_ptr<CriClient>(new CriClient(*target));
}

CriClient::CriClient(std::string endpoint)
    : endpoint_(std::move(endpoint)), channel_([this] {
        RpcChannelOptions o;
        o.endpoint = endpoint_;
        o.user_agent = "registry-proxy-cli";
        return o;
      }()) {}

RpcStatus CriClient::Call(std::string_view method, const google::protobuf::MessageLite& req,
                          google::protobuf::MessageLite* resp, Duration timeout) {
  RpcCallOptions o;
  if (timeout.count() > 0) o.deadline = std::chrono::system_clock::now() + timeout;
  // Wait for a connection (a daemon restarting, a socket not there yet) up to the deadline, as
  // crictl does, instead of failing at once.
  o.wait_for_ready = true;
  RpcStatus s = channel_.Call(method, req, resp, o);
  if (s.error_code() != RpcCode::DEADLINE_EXCEEDED ||
      channel_.state() == RpcChannel::State::kReady) {
    return s;
  }
  // The deadline passed before there was any connection: say so, as UNAVAILABLE (what a
  // fail-fast call says), rather than a bare "deadline exceeded".
  return RpcStatus(RpcCode::UNAVAILABLE, "no connection to " + endpoint_ + " within " +
                                             std::to_string(timeout.count()) +
                                             " ms (not answering; is the daemon running?)");
}

RpcStatus CriClient::Version(runtime::v1::VersionResponse* out, Duration timeout) {
  runtime::v1::VersionRequest req;
  req.set_version("v1");
  return Call("/runtime.v1.RuntimeService/Version", req, out, timeout);
}

RpcStatus CriClient::PullImage(const runtime::v1::PullImageRequest& req,
                               runtime::v1::PullImageResponse* out, Duration timeout) {
  return Call("/runtime.v1.ImageService/PullImage", req, out, timeout);
}

RpcStatus CriClient::ImageStatus(const std::string& image, bool verbose,
                                 runtime::v1::ImageStatusResponse* out, Duration timeout) {
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image(image);
  req.set_verbose(verbose);
  return Call("/runtime.v1.ImageService/ImageStatus", req, out, timeout);
}

RpcStatus CriClient::ListImages(runtime::v1::ListImagesResponse* out, Duration timeout) {
  return Call("/runtime.v1.ImageService/ListImages", runtime::v1::ListImagesRequest(), out,
              timeout);
}

RpcStatus CriClient::RemoveImage(const std::string& image, Duration timeout) {
  runtime::v1::RemoveImageRequest req;
  req.mutable_image()->set_image(image);
  runtime::v1::RemoveImageResponse resp;
  return Call("/runtime.v1.ImageService/RemoveImage", req, &resp, timeout);
}

}  // namespace registry_proxy
