// A small synchronous CRI client over a unix socket (RpcChannel, no gRPC library): the `pull`,
// `images`, `status` and `remove` subcommands and `node install`'s readiness check use it to
// talk to containerd or to the daemon. Every call is bounded by a timeout; errors come back as
// the server's status, unchanged (kubelet parses messages, so callers must see exactly what
// containerd said).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "base/rpc_status.h"
#include "base/status.h"
#include "containerd/rpc_channel.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.pb.h"

namespace registry_proxy {

// Where registry-proxy serves the CRI on a node.
inline constexpr char kDefaultCriEndpoint[] = "unix:///run/registry-proxy/registry-proxy.sock";

// "unix:///path", "unix:/path" or "/path" -> "unix:///path"; anything else is an error
// (the CRI is only ever served on a local socket here).
Result<std::string> NormalizeCriEndpoint(std::string_view endpoint);

class CriClient {
 public:
  using Duration = std::chrono::milliseconds;
  static constexpr Duration kDefaultTimeout = std::chrono::seconds(30);

  // Connects lazily, so this never fails on a missing socket. Calls wait for a connection up
  // to their timeout (wait-for-ready, as crictl does: a daemon that is restarting or
  // socket-activated answers once up); without one by then they fail UNAVAILABLE.
  static Result<std::unique_ptr<CriClient>> Connect(std::string_view endpoint);

  const std::string& endpoint() const { return endpoint_; }

  RpcStatus Version(runtime::v1::VersionResponse* out, Duration timeout = kDefaultTimeout);
  RpcStatus PullImage(const runtime::v1::PullImageRequest& req, runtime::v1::PullImageResponse* out,
                      Duration timeout);
  // A miss is OK with no `image` in `out` (CRI semantics), not NOT_FOUND.
  RpcStatus ImageStatus(const std::string& image, bool verbose,
                        runtime::v1::ImageStatusResponse* out, Duration timeout = kDefaultTimeout);
  RpcStatus ListImages(runtime::v1::ListImagesResponse* out, Duration timeout = kDefaultTimeout);
  RpcStatus RemoveImage(const std::string& image, Duration timeout = kDefaultTimeout);

 private:
  explicit CriClient(std::string endpoint);
  RpcStatus Call(std::string_view method, const google::protobuf::MessageLite& req,
                 google::protobuf::MessageLite* resp, Duration timeout);

  std::string endpoint_;
  RpcChannel channel_;
};

}  // namespace registry_proxy
