// The webhook's connection workers (a cpp-httplib TaskQueue): a fixed pool of threads, each
// serving one connection at a time, that slow or idle clients cannot monopolise.
//
// httplib serves a connection on one worker from the TLS handshake to the close, and its read
// timeout is per read: a client that sends one header byte every second (a slowloris) holds a
// worker for as long as it likes, and with every worker held, new connections wait in the queue
// behind the attacker's (measured: a review waited 8 s behind 200 such clients with 32 workers).
// Two rules keep the webhook answering:
//  - Newest first: a free worker takes the connection that arrived last. Under a flood of
//    connections, the API server's new connection is served next, not after the flood.
//  - Eviction under pressure: while a connection waits for a worker, the connections that have
//    held theirs for `evict_after` without delivering a complete request (handshake, headers,
//    body; or idle between keep-alive requests) are closed, oldest first, one per waiting
//    connection. A request being handled or answered is never cut. Without pressure nothing is
//    evicted: the read and keep-alive timeouts alone apply.
//
// The worker knows its connection's socket from the TLS layer (NoteSocket, called from the SSL
// info callback during the handshake); it keeps a dup of it, so the watchdog can shut the
// connection down from another thread without racing a close and a reuse of the number.
#pragma once

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace registry_proxy {

struct WorkerPoolOptions {
  size_t threads = 32;
  std::chrono::milliseconds evict_after{1000};
  std::chrono::milliseconds check_interval{100};
};

class ConnectionWorkerPool final : public httplib::TaskQueue {
 public:
  explicit ConnectionWorkerPool(WorkerPoolOptions options);
  ~ConnectionWorkerPool() override;
  ConnectionWorkerPool(const ConnectionWorkerPool&) = delete;
  ConnectionWorkerPool& operator=(const ConnectionWorkerPool&) = delete;

  void enqueue(std::function<void()> fn) override;
  // Runs what is queued (idle connections are closed at once now), then joins. Idempotent.
  void shutdown() override;

  // On a worker thread of any pool (no-ops elsewhere):
  // The socket of the connection this worker serves (the first call per connection counts).
  static void NoteSocket(int fd);
  // A complete request is being handled: the connection is not evicted until RequestDone().
  static void RequestStarted();
  // Its response is written; the connection may now wait for its next request.
  static void RequestDone();

  uint64_t evicted() const { return evicted_.load(); }

  struct Slot;

 private:
  void Work(Slot* slot);
  void Watch();

  const WorkerPoolOptions options_;
  std::mutex mu_;  // guards jobs_, shutdown_, watch_stop_
  std::condition_variable jobs_cv_;
  std::condition_variable watch_cv_;
  std::deque<std::function<void()>> jobs_;
  bool shutdown_ = false;
  bool watch_stop_ = false;  // set once the workers are gone
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<std::thread> workers_;
  std::thread watchdog_;
  std::atomic<uint64_t> evicted_{0};
  std::once_flag shutdown_once_;
};

}  // namespace registry_proxy
