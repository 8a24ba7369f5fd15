// One CRI call as the daemon sees it: which CRI version it came in on, what the caller said
// besides its message (deadline, metadata), and the hook that cancels the upstream calls made
// on its behalf when the caller goes away.
#pragma once

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace registry_proxy {

// Which CRI version a call came in on. Both carry the same field numbers for every field the
// daemon reads or writes, so the runtime.v1 messages parse either.
enum class CriVersion { kV1, kV1alpha2 };

// An upstream call in flight that can be told to stop (from any thread).
class Cancellable {
 public:
  virtual ~Cancellable() = default;
  virtual void Cancel() = 0;
};

// Cancels the upstream calls of one downstream call when the caller goes away. Thread-safe.
class Cancellation {
 public:
  // Cancels every registered call now and any registered later.
  void Cancel();
  bool cancelled() const { return cancelled_.load(std::memory_order_acquire); }

  // Registers `call` for the scope of one upstream call. `c` may be null (nothing to do).
  class Scope {
   public:
    Scope(Cancellation* c, Cancellable* call);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Cancellation* c_;
    Cancellable* call_;
  };

 private:
  std::atomic<bool> cancelled_{false};
  std::mutex mu_;
  std::vector<Cancellable*> active_;  // guarded by mu_
};

// What the downstream call said besides its message.
struct CallOptions {
  // The caller's deadline (time_point::max() = none; kubelet sets none on PullImage).
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  // The caller's metadata worth passing on (no pseudo-headers, no grpc- internals).
  std::vector<std::pair<std::string, std::string>> metadata;
  Cancellation* cancellation = nullptr;  // may be null
};

}  // namespace registry_proxy
