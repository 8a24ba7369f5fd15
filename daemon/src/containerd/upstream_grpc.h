// The real upstream clients: containerd's CRI ImageService and its Images API, over gRPC
// (RpcChannel, our own client: no gRPC library) on the upstream channel (containerd serves both
// on its one socket).
//
// Thread safety: both classes are immutable after construction and every method may be called
// concurrently from any thread (each call is its own stream; the channel is shared).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "containerd/rpc_channel.h"
#include "containerd/upstream.h"

namespace registry_proxy {

// `value` as a quoted value in containerd's filter syntax (`name==<this>`): `\` and `"` escaped.
std::string ContainerdFilterValue(std::string_view value);

// The daemon's channel to containerd ("unix:///path" or "/path"): RpcChannel connects on first
// use and again on the first call after containerd went away, so a restart costs the calls in
// flight and nothing more.
std::shared_ptr<RpcChannel> MakeContainerdChannel(const std::string& endpoint,
                                                  int max_message_bytes);

// CRI ImageService calls by method name, so one client serves runtime.v1 and
// runtime.v1alpha2 alike: the messages are the same on the wire, only the method path
// ("/runtime.v1alpha2.ImageService/PullImage") differs.
class GrpcCriImageBackend final : public CriImageBackend {
 public:
  explicit GrpcCriImageBackend(std::shared_ptr<RpcChannel> channel);
  ~GrpcCriImageBackend() override;

  RpcStatus PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                      const CallOptions& opts, runtime::v1::PullImageResponse* resp) override;
  RpcStatus PullImageRaw(CriVersion v, const std::string& request, const CallOptions& opts,
                         std::string* response) override;
  RpcStatus ImageStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                        const CallOptions& opts, runtime::v1::ImageStatusResponse* resp) override;

 private:
  std::shared_ptr<RpcChannel> channel_;
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

  GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel, std::string containerd_namespace);
  GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel, std::string containerd_namespace,
                       Options options);
  // The namespace is asked for on every call, so a config reload that changes
  // node.containerdNamespace takes effect without a new store.
  GrpcImageRecordStore(std::shared_ptr<RpcChannel> channel,
                       std::function<std::string()> containerd_namespace, Options options);
  ~GrpcImageRecordStore() override;

  RpcStatus Get(const std::string& name, ImageRecord* out) override;
  RpcStatus Put(const ImageRecord& record) override;
  RpcStatus Delete(const std::string& name) override;
  RpcStatus GetMany(const std::vector<std::string>& names,
                    std::vector<ImageRecord>* found) override;  // one List call

 private:
  // The namespace header and the deadline of one call.
  RpcCallOptions Prepare() const;

  std::shared_ptr<RpcChannel> channel_;
  std::function<std::string()> namespace_;
  Options options_;
};

}  // namespace registry_proxy
