// A small fault-injecting HTTP/1.1 server on loopback, for mirror failover tests: it behaves
// like a registry that is broken in one chosen way. `GET /v2/` (the API root, what a liveness
// probe asks) and every other path (manifests, blobs: what a pull asks) each get one of:
//   kOk     200 with Docker-Distribution-API-Version (for /v2/); 404 elsewhere
//   k500    500 Internal Server Error
//   kReset  the connection is reset (RST) right after the request was read
//   kStall  nothing is answered until `stall` passes (or the server stops); then it closes
//   kUnauthorized  401 with a Basic challenge: a client that has credentials sends them next
// A TLS handshake gets what a plain HTTP server answers it (400, then close; not logged), so
// containerd 2.x, which tries HTTPS first, falls back to HTTP as with a real registry.
// Every request is logged (method, path, User-Agent) before it is answered. Connections are
// kept alive as clients expect. All threads are joined in the destructor.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "loopback_listener.h"

namespace rp_testbed {

class FaultServer {
 public:
  enum class Behavior { kOk, k500, kReset, kStall, kUnauthorized };
  struct Request {
    std::string method, path, user_agent;
    std::string head;  // the request line and headers as they came
  };

  FaultServer(Behavior api_root, Behavior other,
              std::chrono::milliseconds stall = std::chrono::seconds(60));
  ~FaultServer();
  FaultServer(const FaultServer&) = delete;
  FaultServer& operator=(const FaultServer&) = delete;

  registry_proxy::Status Start();
  std::string host() const { return "127.0.0.1:" + std::to_string(listener_.port()); }

  std::vector<Request> Requests() const;
  // Requests whose path starts with `prefix` ("/v2/" alone matches only the API root).
  size_t Count(const std::string& method, const std::string& prefix) const;
  size_t ProbeRequests() const;  // GET /v2/ by registry-proxy's probe
  size_t PullRequests() const;   // anything but the API root (manifests, blobs)
  size_t connections() const { return listener_.connections(); }

 private:
  void Serve(int fd);
  bool Wait(std::chrono::milliseconds d);  // false when stopping

  Behavior api_root_, other_;
  std::chrono::milliseconds stall_;
  std::atomic<bool> stopping_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Request> requests_;  // guarded by mu_
  LoopbackListener listener_;      // stopped first, in the destructor
};

}  // namespace rp_testbed
