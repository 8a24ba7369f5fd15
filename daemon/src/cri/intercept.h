// The interception of PullImage and ImageStatus, apart from the HTTP/2 frame relay (h2_relay.cc,
// the codec), as envoy keeps its HTTP/2 codec apart from the filters. The relay knows frames,
// streams, flow control and gRPC framing; this knows the two methods' messages, the
// ImageInterceptor, the worker threads it runs on and their results, and nothing of frames.
// Internal to cri/: the relay is its only user.
//
// The relay gives it a call's request message (PullImage) or containerd's answer (ImageStatus),
// gets back the work to run for it, starts it here on a worker, and on its loop thread takes the
// results (TakeCompletions) to answer the calls with.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/worker_threads.h"
#include "cri/call.h"
#include "cri/interceptor.h"

namespace registry_proxy {

// What a worker needs of an intercepted call.
struct InterceptedCall {
  uint64_t serial = 0;  // the relay's id of the call: its result comes back under it
  std::string timeout;  // grpc-timeout as the caller sent it ("" = none)
  std::vector<std::pair<std::string, std::string>> metadata;  // the caller's, worth passing on
  std::shared_ptr<Cancellation> cancellation;  // the relay fires it when the caller goes away
};

class CallInterception {
 public:
  // What a worker runs for a call.
  using Work = std::function<InterceptResult(const CallOptions&)>;
  // A worker's result, for the call the relay knows as `serial`.
  struct Completion {
    uint64_t serial;
    InterceptResult result;
  };

  // `interceptor` (not owned; may be null: nothing is intercepted) must outlive this.
  // `wake` is called on the worker's thread when a result waits for TakeCompletions.
  CallInterception(ImageInterceptor* interceptor, int max_workers, std::function<void()> wake);

  bool enabled() const { return interceptor_ != nullptr; }

  // PullImage with `request` (the caller's message): the pull.
  Work Pull(CriVersion v, std::string request);
  // ImageStatus: containerd answered OK with `response` (one message) to `request`. Called on
  // the relay's loop thread (cheap, never blocks). A miss the interceptor may repair: the
  // repair; else empty (a hit, or nothing to repair: containerd's answer stands).
  Work RepairIfMiss(CriVersion v, const std::string& request, std::string_view response);

  // Runs `work` for `call` on a worker of its own. False when no worker can be had (at
  // max_workers, or after CloseAndWait).
  bool Start(InterceptedCall call, Work work);
  // The relay's loop thread: the results that came in since the last call.
  std::vector<Completion> TakeCompletions();
  // No worker starts from now on; waits for the running ones (their calls cancelled first).
  void CloseAndWait() { workers_.CloseAndWait(); }

 private:
  ImageInterceptor* const interceptor_;
  const std::function<void()> wake_;
  std::mutex completions_mu_;
  std::vector<Completion> completions_;  // guarded by completions_mu_
  WorkerThreads workers_;
};

}  // namespace registry_proxy
