#include "containerd/image_index.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <utility>

#include "containerd/upstream_grpc.h"
#include "github.com/containerd/containerd/api/events/image.pb.h"
#include "github.com/containerd/containerd/api/services/events/v1/events.pb.h"
#include "github.com/containerd/containerd/api/services/images/v1/images.pb.h"

namespace registry_proxy {
namespace {

namespace events = containerd::services::events::v1;
namespace images = containerd::services::images::v1;

constexpr char kNamespaceHeader[] = "containerd-namespace";
constexpr char kSubscribe[] = "/containerd.services.events.v1.Events/Subscribe";
constexpr char kList[] = "/containerd.services.images.v1.Images/List";
constexpr std::chrono::seconds kRetry{1};  // after the stream or the list failed
constexpr std::chrono::seconds kListTimeout{30};

}  // namespace

ContainerdImageIndex::ContainerdImageIndex(std::shared_ptr<RpcChannel> channel,
                                           std::function<std::string()> containerd_namespace)
    : channel_(std::move(channel)), namespace_(std::move(containerd_namespace)) {}

ContainerdImageIndex::~ContainerdImageIndex() { Stop(); }

void ContainerdImageIndex::Start() {
  std::lock_guard lock(mu_);
  if (thread_.joinable() || stopping_) return;
  thread_ = std::thread([this] { Run(); });
}

void ContainerdImageIndex::Stop() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    if (stream_call_) stream_call_->Cancel();
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void ContainerdImageIndex::Resync() {
  std::lock_guard lock(mu_);
  resync_ = true;
  if (stream_call_) stream_call_->Cancel();
}

std::optional<bool> ContainerdImageIndex::ContainsAny(std::string_view ns,
                                                      const std::vector<std::string>& names) const {
  std::lock_guard lock(mu_);
  if (synced_ns_.empty()) return std::nullopt;
  if (synced_ns_ != ns) {  // node.containerdNamespace changed: follow the new one
    resync_ = true;
    if (stream_call_) stream_call_->Cancel();
    return std::nullopt;
  }
  for (const std::string& n : names) {
    if (names_.count(n)) return true;
  }
  return false;
}

bool ContainerdImageIndex::synced() const {
  std::lock_guard lock(mu_);
  return !synced_ns_.empty();
}

size_t ContainerdImageIndex::size() const {
  std::lock_guard lock(mu_);
  return names_.size();
}

void ContainerdImageIndex::Run() {
  for (;;) {
    const std::string ns = namespace_();
    FollowOnce(ns);
    std::unique_lock lock(mu_);
    synced_ns_.clear();
    names_.clear();
    if (resync_) {
      resync_ = false;
      continue;
    }
    cv_.wait_for(lock, kRetry, [this] { return stopping_; });
    if (stopping_) return;
  }
}

void ContainerdImageIndex::FollowOnce(const std::string& ns) {
  RpcCallHandle call;
  {
    std::lock_guard lock(mu_);
    if (stopping_ || resync_) return;
    stream_call_ = &call;
  }
  events::SubscribeRequest sreq;
  sreq.add_filters("namespace==" + ContainerdFilterValue(ns) + ",topic~=\"^/images/\"");
  RpcCallOptions sopts;
  sopts.handle = &call;
  auto stream = channel_->Stream(kSubscribe, sreq, sopts);

  // Then the names already there (see the header on the order).
  images::ListImagesRequest lreq;
  images::ListImagesResponse lresp;
  RpcCallOptions lopts;
  lopts.metadata = {{kNamespaceHeader, ns}};
  lopts.deadline = std::chrono::system_clock::now() + kListTimeout;
  RpcStatus s = channel_->Call(kList, lreq, &lresp, lopts);
  if (s.ok()) {
    std::lock_guard lock(mu_);
    names_.clear();
    for (const images::Image& img : lresp.images()) names_.insert(img.name());
    synced_ns_ = ns;
    spdlog::debug("image index: following namespace {}: {} image names", ns, names_.size());
  } else {
    spdlog::debug("image index: cannot list the images of {}: {} (retrying)", ns,
                  s.error_message());
    stream->Cancel();
  }

  events::Envelope env;
  containerd::events::ImageDelete event;  // every image event has the name as field 1
  while (s.ok() && stream->Read(&env)) {
    if (env.namespace_() != ns || !event.ParseFromString(env.event().value())) continue;
    Apply(env.topic(), event.name());
  }
  RpcStatus end = stream->Finish();
  std::lock_guard lock(mu_);
  stream_call_ = nullptr;
  if (s.ok() && !stopping_ && !resync_) {
    spdlog::debug("image index: the event stream ended ({}); resyncing", end.error_message());
  }
}

void ContainerdImageIndex::Apply(std::string_view topic, const std::string& name) {
  std::lock_guard lock(mu_);
  if (topic == "/images/delete") {
    names_.erase(name);
  } else if (topic == "/images/create" || topic == "/images/update") {
    names_.insert(name);
  }
}

}  // namespace registry_proxy
