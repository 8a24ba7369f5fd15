// Keeps a client channel connected: a thread that watches its connectivity state and asks it to
// connect whenever it is not READY.
//
// Why: with GRPC_POLL_STRATEGY=poll (serve.cc sets it for latency), gRPC 1.51 makes progress on
// a connection attempt only while some thread polls a pollset linked to the channel. Calls that
// fail fast (the channel is in TRANSIENT_FAILURE after containerd went away) are never queued on
// it, so under a steady load of such calls every new attempt timed out "before receiving SETTINGS
// frame" and the daemon stayed cut off from a restarted containerd (measured in
// tests/integration/fault_test.cc: still failing 3 s after containerd was back, recovering only
// once the load stopped). The keeper's thread waits on the channel's state (WaitForStateChange
// polls the channel's pollset_set), so attempts complete and the back-off (<= 1 s,
// MakeUpstreamChannel) is the only delay. It also reconnects right after a restart without
// waiting for a call. While the channel is READY it only looks every `check` (no polling).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

namespace registry_proxy {

class ChannelKeeper {
 public:
  // `check` bounds each wait, and so how long the destructor may take.
  explicit ChannelKeeper(std::shared_ptr<grpc::Channel> channel,
                         std::chrono::milliseconds check = std::chrono::milliseconds(200));
  ~ChannelKeeper();
  ChannelKeeper(const ChannelKeeper&) = delete;
  ChannelKeeper& operator=(const ChannelKeeper&) = delete;

 private:
  std::shared_ptr<grpc::Channel> channel_;
  const std::chrono::milliseconds check_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace registry_proxy
