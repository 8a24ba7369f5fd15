// The names of the image records in containerd, kept current from containerd's event stream, so
// that the relay can tell on its event loop, without a call, that no mirror-named copy of an
// image is on the node: the ImageStatus miss kubelet asks before every first pull then costs
// what a hit costs (pull_service.cc, StatusNeedsRecovery).
//
// How it stays current: subscribe to containerd's events (topics /images/*), then list every
// image name of the namespace, then apply each create/update/delete in order. Events that
// raced the list are applied again, harmlessly (a create of a listed name, a delete of an
// unlisted one). One gap remains: containerd registers the subscription when its handler runs,
// which the client cannot observe, so a record made in the moment between subscribing and the
// handler running may be missed. What that costs is bounded: the ImageStatus of such an image is
// answered as the miss it is, and kubelet's next step, a PullImage, finds and names the image.
//
// While not in sync (starting, containerd restarting, another namespace asked) Contains answers
// "unknown" and the caller asks containerd, as without an index.
//
// Thread safety: every method may be called from any thread.
#pragma once

#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_set>
#include <vector>

#include "containerd/rpc_channel.h"

namespace registry_proxy {

// The seam the pull service uses (tests use a fake).
class ImageNameIndex {
 public:
  virtual ~ImageNameIndex() = default;
  // Whether any of `names` is an image record in containerd namespace `ns`; nullopt when the
  // index cannot tell (not in sync, or following another namespace). Cheap: no I/O.
  virtual std::optional<bool> ContainsAny(std::string_view ns,
                                          const std::vector<std::string>& names) const = 0;
};

class ContainerdImageIndex final : public ImageNameIndex {
 public:
  // `containerd_namespace` is asked at each (re)subscription. When ContainsAny is asked about
  // another namespace (a reload changed node.containerdNamespace) the index resyncs and answers
  // nullopt meanwhile.
  ContainerdImageIndex(std::shared_ptr<RpcChannel> channel,
                       std::function<std::string()> containerd_namespace);
  ~ContainerdImageIndex() override;  // Stop()
  ContainerdImageIndex(const ContainerdImageIndex&) = delete;
  ContainerdImageIndex& operator=(const ContainerdImageIndex&) = delete;

  void Start();  // the thread that subscribes, lists and follows
  void Stop();   // cancels the stream, joins; idempotent

  // Drops the subscription and starts over (after a config reload changed the namespace).
  void Resync();

  std::optional<bool> ContainsAny(std::string_view ns,
                                  const std::vector<std::string>& names) const override;

  // For tests and logs: whether the index is in sync now, and with how many names.
  bool synced() const;
  size_t size() const;

 private:
  void Run();
  // One subscription: list, then follow until the stream ends. Returns when it ends.
  void FollowOnce(const std::string& ns);
  void Apply(std::string_view topic, const std::string& name);

  std::shared_ptr<RpcChannel> channel_;
  std::function<std::string()> namespace_;
  mutable std::mutex mu_;
  std::condition_variable cv_;             // wakes the back-off sleep on Stop
  std::unordered_set<std::string> names_;  // guarded by mu_
  std::string synced_ns_;                  // guarded by mu_; "" = not in sync
  RpcCallHandle* stream_call_ = nullptr;   // guarded by mu_: the stream to cancel
  bool stopping_ = false;                  // guarded by mu_
  mutable bool resync_ = false;            // guarded by mu_: start over at once
  std::thread thread_;
};

}  // namespace registry_proxy
