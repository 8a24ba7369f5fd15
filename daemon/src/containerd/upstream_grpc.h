// The real upstream clients: containerd's CRI ImageService and its Images API, over gRPC
// on the upstream channel (containerd serves both on its one socket).
//
// Thread safety: both classes are immutable after construction and every method may be called
// concurrently from any thread (each call has its own ClientContext; the channel is shared).
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "github.com/containerd/containerd/api/services/images/v1/images.grpc.pb.h"
#include "containerd/upstream.h"

namespace registry_proxy {

// `value` as a quoted value in containerd's filter syntax (`name==<this>`): `\` and `"` escaped.
std::string ContainerdFilterValue(std::string_view value);

// A channel to the upstream CRI socket, tuned for a local peer that restarts: reconnect
// within a second, not gRPC's default two minutes.
std::shared_ptr<grpc::Channel> MakeUpstreamChannel(const std::string& endpoint,
                                                   int max_message_bytes);

// CRI ImageService calls by method name, so one client serves runtime.v1 and
// runtime.v1alpha2 alike: the messages are the same on the wire, only the method path
// ("/runtime.v1alpha2.ImageService/PullImage") differs.
class GrpcCriImageBackend final : public CriImageBackend {
 public:
  explicit GrpcCriImageBackend(std::shared_ptr<grpc::Channel> channel);
  ~GrpcCriImageBackend() override;

  RpcStatus PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                         const CallOptions& opts, runtime::v1::PullImageResponse* resp) override;
  RpcStatus PullImageRaw(CriVersion v, const std::string& request, const CallOptions& opts,
                            std::string* response) override;
  RpcStatus ImageStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                           const CallOptions& opts,
                           runtime::v1::ImageStatusResponse* resp) override;

 private:
  struct Methods;  // grpc::internal::RpcMethod, kept out of this header
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<const Methods> methods_;
};

// containerd's Images API in one containerd namespace (sent as the "containerd-namespace"
// metadata on every call).
//
// Put = Create, and on ALREADY_EXISTS an Update with the field mask ["target", "labels"]. In
// containerd 1.6 (metadata/images.go, imageStore.Update) the path "labels" replaces the whole
// label map (only "labels.<key>" paths merge), so after a Put the record carries exactly the
// labels given: callers that want to keep labels pass them in (the pull service merges the
// mirror record's labels with its own). The target is replaced as a unit (media type, digest,
// size; its annotations are not modelled and end up empty).
class GrpcImageRecordStore final : public ImageRecordStore {
 public:
  struct Options {
    // Bound on each call: these are local metadata writes (bolt), normally well under 10 ms;
    // the bound only keeps a wedged containerd from holding a pull worker forever.
    std::chrono::milliseconds timeout{10000};
  };

  GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel, std::string containerd_namespace);
  GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel, std::string containerd_namespace,
                       Options options);
  // The namespace is asked for on every call, so a config reload that changes
  // node.containerdNamespace takes effect without a new store.
  GrpcImageRecordStore(std::shared_ptr<grpc::Channel> channel,
                       std::function<std::string()> containerd_namespace, Options options);
  ~GrpcImageRecordStore() override;

  RpcStatus Get(const std::string& name, ImageRecord* out) override;
  RpcStatus Put(const ImageRecord& record) override;
  RpcStatus Delete(const std::string& name) override;
  RpcStatus GetMany(const std::vector<std::string>& names,
                       std::vector<ImageRecord>* found) override;  // one List call

 private:
  void Prepare(grpc::ClientContext* ctx) const;

  std::unique_ptr<containerd::services::images::v1::Images::Stub> stub_;
  std::function<std::string()> namespace_;
  Options options_;
};

}  // namespace registry_proxy
