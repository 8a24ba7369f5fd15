// The CRI proxy core: serves a unix socket and forwards every call to the upstream CRI
// endpoint (containerd) as raw bytes, with the gRPC generic API.
//
// - Every method is forwarded, known or not, unary or streaming: the daemon never has to
//   be rebuilt when the CRI grows. Metadata, deadlines, cancellation, status code, message
//   and details pass through unchanged.
// - Only PullImage and ImageStatus (runtime.v1 and runtime.v1alpha2) are handed to the
//   ImageInterceptor; the core itself decodes nothing, except that it tells an ImageStatus hit
//   (response field 1, `image`, present) from the wire bytes and forwards it without asking.
// - One completion-queue thread drives every call (on these machines each thread hop costs
//   ~15 us, so the forwarding path has none); work that blocks (a pull, a status repair) runs
//   on a worker thread of its own and never delays another call.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>

#include "cri_server.h"
#include "interceptor.h"
#include "status.h"
#include "worker_threads.h"

namespace registry_proxy {

// A channel to the upstream CRI socket, tuned for a local peer that restarts: reconnect
// within a second, not gRPC's default two minutes.
std::shared_ptr<grpc::Channel> MakeUpstreamChannel(const std::string& endpoint,
                                                   int max_message_bytes);

class CriProxy final : public CriServer {
 public:
  // `interceptor` and `observer` may be null (then everything is forwarded untouched).
  // Neither is owned; both must outlive the proxy.
  CriProxy(ProxyOptions options, std::shared_ptr<grpc::Channel> upstream,
           ImageInterceptor* interceptor, CallObserver* observer);
  ~CriProxy() override;  // Shutdown() with no grace
  CriProxy(const CriProxy&) = delete;
  CriProxy& operator=(const CriProxy&) = delete;

  Status Start() override;
  void Shutdown(std::chrono::milliseconds grace) override;

  const std::string& socket_path() const override { return socket_path_; }
  int in_flight() const override { return active_calls_.load(); }

 private:
  class Call;
  friend class Call;
  void Loop();
  void RequestNewCall();
  void AcceptLoop();  // listen_fd only

  const ProxyOptions options_;
  std::shared_ptr<grpc::Channel> upstream_;
  grpc::GenericStub stub_;
  ImageInterceptor* const interceptor_;
  CallObserver* const observer_;

  std::string socket_path_;
  grpc::AsyncGenericService service_;
  std::unique_ptr<grpc::ServerCompletionQueue> cq_;
  std::unique_ptr<grpc::Server> server_;
  std::thread loop_;
  std::thread accept_;       // listen_fd only
  int accept_wake_fd_ = -1;  // eventfd that stops accept_
  std::atomic<bool> shutting_down_{false};
  std::atomic<bool> refusing_{false};  // after the drain: new calls get UNAVAILABLE
  std::atomic<int> live_calls_{0};     // Call objects, idle request slots included
  std::atomic<int> active_calls_{0};   // calls that arrived and have not ended

  WorkerThreads workers_{options_.max_workers};
  std::once_flag shutdown_once_;
};

}  // namespace registry_proxy
