// A slow but alive mirror: a TCP relay on loopback in front of a real registry that holds back
// the answer to every request by `delay` (the first bytes of each answer leave no sooner than
// `delay` after the request that asked for them arrived; the rest flows at once). A mirror far
// away, or overloaded, looks like this: every request costs the delay, the probe's `GET /v2/`
// included, and everything it answers is right. HTTP/1.1 without pipelining (Go's client, the
// probe), no TLS. All threads are joined in the destructor.
#pragma once

#include <atomic>
#include <chrono>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "loopback_listener.h"

namespace rp_testbed {

class DelayProxy {
 public:
  DelayProxy(std::string backend_host, std::chrono::milliseconds delay);  // "127.0.0.1:PORT"
  ~DelayProxy();
  DelayProxy(const DelayProxy&) = delete;
  DelayProxy& operator=(const DelayProxy&) = delete;

  registry_proxy::Status Start();
  std::string host() const { return "127.0.0.1:" + std::to_string(listener_.port()); }
  size_t connections() const { return listener_.connections(); }
  size_t requests() const { return requests_.load(); }  // request chunks relayed (approx.)

 private:
  void Relay(int client);

  std::string backend_;
  std::chrono::milliseconds delay_;
  std::atomic<bool> stopping_{false};
  std::atomic<size_t> requests_{0};
  LoopbackListener listener_;  // stopped first, in the destructor
};

}  // namespace rp_testbed
