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

#include "interceptor.h"
#include "status.h"

namespace registry_proxy {

// Told about every finished call (metrics, logs). Called on the completion-queue thread:
// must be cheap and must not block.
class CallObserver {
 public:
  virtual ~CallObserver() = default;
  virtual void OnCallDone(std::string_view method, grpc::StatusCode code,
                          std::chrono::nanoseconds duration) = 0;
};

struct ProxyOptions {
  // "unix:///run/registry-proxy/registry-proxy.sock" (or an absolute path).
  std::string listen;
  // "unix:///run/containerd/containerd.sock" (or an absolute path).
  std::string upstream;
  // Largest message accepted in either direction. containerd and kubelet use 16 MiB; ours is
  // larger so that the limits users meet are theirs, never the proxy's.
  int max_message_bytes = 64 << 20;
  // Calls the server keeps requested at once (how many new calls can arrive between two
  // turns of the completion-queue loop).
  int request_slots = 64;
  // Pull and status-repair workers at once; beyond this a call gets RESOURCE_EXHAUSTED.
  int max_workers = 512;
  // A listening unix socket inherited from systemd (socket activation: registry-proxy.socket)
  // to serve instead of binding `listen`. Connections are accepted on it and handed to gRPC.
  // Not owned, never closed or unlinked: connections made while the daemon restarts wait in
  // its backlog for the next daemon. -1: bind `listen`.
  int listen_fd = -1;
};

// Parses "unix:///abs/path" or "/abs/path" into the path; error otherwise.
Result<std::string> UnixSocketPath(std::string_view endpoint);

// A channel to the upstream CRI socket, tuned for a local peer that restarts: reconnect
// within a second, not gRPC's default two minutes.
std::shared_ptr<grpc::Channel> MakeUpstreamChannel(const std::string& endpoint,
                                                   int max_message_bytes);

class CriProxy {
 public:
  // `interceptor` and `observer` may be null (then everything is forwarded untouched).
  // Neither is owned; both must outlive the proxy.
  CriProxy(ProxyOptions options, std::shared_ptr<grpc::Channel> upstream,
           ImageInterceptor* interceptor, CallObserver* observer);
  ~CriProxy();  // Shutdown() with no grace
  CriProxy(const CriProxy&) = delete;
  CriProxy& operator=(const CriProxy&) = delete;

  // Prepares the socket (directory 0700 if created, socket 0660; a stale socket is replaced
  // only if nobody answers on it), binds and starts serving.
  Status Start();

  // Removes the socket (no new connections), lets the calls in flight finish until `grace`
  // has passed (idle connections do not hold it up), cancels the rest, and waits for every
  // call and worker to end. Idempotent.
  void Shutdown(std::chrono::milliseconds grace);

  const std::string& socket_path() const { return socket_path_; }
  int in_flight() const { return active_calls_.load(); }

 private:
  class Call;
  friend class Call;
  void Loop();
  void RequestNewCall();
  void AcceptLoop();                           // listen_fd only
  bool StartWorker(std::function<void()> fn);  // false when at max_workers
  void WorkerDone();

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

  std::mutex workers_mu_;
  std::condition_variable workers_cv_;
  int workers_ = 0;  // guarded by workers_mu_
  std::once_flag shutdown_once_;
};

}  // namespace registry_proxy
