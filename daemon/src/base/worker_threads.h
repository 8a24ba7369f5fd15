// Threads for work that blocks (a pull, a status repair), one per job and at most `max` at
// once, so that no such job ever waits behind another (the relay's intercepted calls, the pull
// service's late work).
#pragma once

#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

namespace registry_proxy {

class WorkerThreads {
 public:
  explicit WorkerThreads(int max) : max_(max) {}

  // Runs `fn` on a new detached thread; false (and `fn` dropped) when `max` already run, after
  // Close(), or when the system has no thread to give.
  bool Start(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_ || running_ >= max_) return false;
      ++running_;
    }
    try {
      std::thread([this, fn = std::move(fn)] {
        fn();
        Done();
      }).detach();
    } catch (...) {  // std::system_error (EAGAIN: pids limit), std::bad_alloc
      Done();
      return false;
    }
    return true;
  }

  // No job starts from now on; blocks until none runs. The owner must call this before it (or
  // anything its jobs use) is destroyed.
  void CloseAndWait() {
    std::unique_lock<std::mutex> lock(mu_);
    closed_ = true;
    idle_.wait(lock, [this] { return running_ == 0; });
  }

 private:
  void Done() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--running_ == 0) idle_.notify_all();
  }

  const int max_;
  std::mutex mu_;
  std::condition_variable idle_;
  int running_ = 0;      // guarded by mu_
  bool closed_ = false;  // guarded by mu_
};

}  // namespace registry_proxy
