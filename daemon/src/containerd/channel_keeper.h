// Gets a client channel connected again after its peer went away, when asked.
//
// Why: with GRPC_POLL_STRATEGY=poll (serve.cc sets it for latency), gRPC 1.51 makes progress on
// a connection attempt only while some thread polls a pollset linked to the channel. Calls that
// fail fast (the channel is in TRANSIENT_FAILURE after containerd went away) are never queued on
// it, so under a steady load of such calls every new attempt timed out "before receiving SETTINGS
// frame" and the daemon stayed cut off from a restarted containerd (measured in
// tests/integration/fault_test.cc: still failing 3 s after containerd was back, recovering only
// once the load stopped). When poked (a call through the channel failed UNAVAILABLE), the
// keeper's thread asks the channel to connect and waits on its state (WaitForStateChange polls
// the channel's pollset_set) until it is READY, so attempts complete and the back-off (<= 1 s,
// MakeUpstreamChannel) is the only delay. Then it sleeps on a condition variable until the next
// poke: no wake-up at all while the channel is healthy (the daemon's idle CPU is zero).
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace registry_proxy {

class ChannelKeeper {
 public:
  // `check` bounds each wait while reconnecting, and so how long the destructor may take.
  explicit ChannelKeeper(std::shared_ptr<grpc::Channel> channel,
                         std::chrono::milliseconds check = std::chrono::milliseconds(200));
  ~ChannelKeeper();
  ChannelKeeper(const ChannelKeeper&) = delete;
  ChannelKeeper& operator=(const ChannelKeeper&) = delete;

  // A call through the channel failed as if the peer were gone: drive the channel until it is
  // READY again. Cheap and non-blocking (a flag test while the keeper is already at work), so it
  // may be called on the relay's event-loop thread for every failed call. Thread-safe.
  void Poke();

 private:
  void Run();

  std::shared_ptr<grpc::Channel> channel_;
  const std::chrono::milliseconds check_;
  std::atomic<bool> wanted_{false};  // poked and not READY yet
  std::atomic<bool> stop_{false};
  std::mutex mu_;  // with cv_: the keeper's sleep between pokes
  std::condition_variable cv_;
  std::thread thread_;
};

}  // namespace registry_proxy
