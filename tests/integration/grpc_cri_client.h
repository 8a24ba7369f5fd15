// The tests' CRI client, on gRPC's own library (an independent implementation of the wire,
// beside the daemon's RpcChannel): the integration tests and benchmarks talk to containerd and
// to the daemon with it. Every call is bounded by a timeout; errors come back as the server's
// grpc::Status, unchanged (kubelet parses messages, so callers must see exactly what containerd
// said).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "containerd/cri_client.h"  // NormalizeCriEndpoint, kDefaultCriEndpoint
#include "grpc_status.h"            // re-exported: GrpcCodeName, GrpcStatusText
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.grpc.pb.h"

namespace registry_proxy {

class GrpcCriClient {
 public:
  using Duration = std::chrono::milliseconds;
  static constexpr Duration kDefaultTimeout = std::chrono::seconds(30);

  // A connection attempt gets this long to complete its handshake (gRPC's minimum connect
  // timeout): a starting daemon answers once it is up.
  static constexpr int kConnectTimeoutMs = 20000;

  // The channel connects lazily, so this never fails on a missing socket. Calls wait for a
  // connection up to their timeout (wait-for-ready, as crictl does: a daemon that is restarting
  // or socket-activated answers once up); without one by then they fail UNAVAILABLE. Reconnects
  // back off for at most ~1 s: the peer is local, and tests restart containerd under a live
  // client.
  static Result<std::unique_ptr<GrpcCriClient>> Connect(std::string_view endpoint);

  const std::string& endpoint() const { return endpoint_; }

  grpc::Status Version(runtime::v1::VersionResponse* out, Duration timeout = kDefaultTimeout);
  grpc::Status PullImage(const runtime::v1::PullImageRequest& req,
                         runtime::v1::PullImageResponse* out, Duration timeout);
  // A miss is OK with no `image` in `out` (CRI semantics), not NOT_FOUND.
  grpc::Status ImageStatus(const std::string& image, bool verbose,
                           runtime::v1::ImageStatusResponse* out,
                           Duration timeout = kDefaultTimeout);
  grpc::Status ListImages(runtime::v1::ListImagesResponse* out, Duration timeout = kDefaultTimeout);
  grpc::Status RemoveImage(const std::string& image, Duration timeout = kDefaultTimeout);

  // The raw stubs, for calls the helpers above do not cover (tests).
  runtime::v1::RuntimeService::Stub& runtime() { return *runtime_; }
  runtime::v1::ImageService::Stub& images() { return *images_; }

  // A context with the given timeout (none when timeout is zero or negative), wait-for-ready.
  static void SetTimeout(grpc::ClientContext* ctx, Duration timeout);

 private:
  GrpcCriClient(std::string endpoint, std::shared_ptr<grpc::Channel> channel);
  // A call's status; DEADLINE_EXCEEDED without a connection becomes UNAVAILABLE, saying so.
  grpc::Status Finish(grpc::Status s, Duration timeout) const;

  std::string endpoint_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<runtime::v1::RuntimeService::Stub> runtime_;
  std::unique_ptr<runtime::v1::ImageService::Stub> images_;
};

}  // namespace registry_proxy
