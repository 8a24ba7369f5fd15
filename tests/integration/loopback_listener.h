// A TCP listener on 127.0.0.1 (a free port) that runs a handler on a thread of its own for each
// connection: what the testbed's fake servers (FaultServer, DelayProxy) share. Stop() (and the
// destructor) shuts every tracked socket down, which wakes handlers blocked on it, and joins
// every thread. A connection's socket is closed after its handler returns.
#pragma once

#include <atomic>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"

namespace rp_testbed {

class LoopbackListener {
 public:
  LoopbackListener() = default;
  ~LoopbackListener() { Stop(); }
  LoopbackListener(const LoopbackListener&) = delete;
  LoopbackListener& operator=(const LoopbackListener&) = delete;

  // Binds and starts accepting; `what` names it in errors.
  registry_proxy::Status Start(std::function<void(int fd)> handler, const std::string& what);
  void Stop();  // idempotent

  // Another socket a handler opened (a backend connection) that Stop must shut down too.
  // Untrack before closing it.
  void Track(int fd);
  void Untrack(int fd);

  int port() const { return port_; }
  size_t connections() const { return connections_.load(); }

 private:
  void AcceptLoop();

  std::function<void(int)> handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<size_t> connections_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::list<std::thread> workers_;  // guarded by mu_
  std::vector<int> open_fds_;       // guarded by mu_
};

}  // namespace rp_testbed
