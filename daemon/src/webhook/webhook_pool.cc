#include "webhook/webhook_pool.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

namespace registry_proxy {

using Clock = std::chrono::steady_clock;

// One worker's connection, as the watchdog sees it. Guarded by mu.
struct ConnectionWorkerPool::Slot {
  std::mutex mu;
  bool serving = false;     // a connection is on this worker
  bool handling = false;    // between RequestStarted and RequestDone
  int fd = -1;              // our dup of the connection's socket (-1: not known yet)
  Clock::time_point since;  // picked up, or last response written
};

namespace {
thread_local ConnectionWorkerPool::Slot* t_slot = nullptr;
thread_local bool t_noted = false;  // NoteSocket ran for this connection
}  // namespace

ConnectionWorkerPool::ConnectionWorkerPool(WorkerPoolOptions options) : options_(options) {
  const size_t n = std::max<size_t>(1, options_.threads);
  for (size_t i = 0; i < n; ++i) slots_.push_back(std::make_unique<Slot>());
  for (size_t i = 0; i < n; ++i) workers_.emplace_back([this, s = slots_[i].get()] { Work(s); });
  watchdog_ = std::thread([this] { Watch(); });
}

ConnectionWorkerPool::~ConnectionWorkerPool() { shutdown(); }

void ConnectionWorkerPool::enqueue(std::function<void()> fn) {
  {
    std::lock_guard lock(mu_);
    jobs_.push_back(std::move(fn));
  }
  jobs_cv_.notify_one();
}

void ConnectionWorkerPool::shutdown() {
  std::call_once(shutdown_once_, [this] {
    {
      std::lock_guard lock(mu_);
      shutdown_ = true;
    }
    jobs_cv_.notify_all();
    watch_cv_.notify_all();
    for (auto& t : workers_) t.join();  // the watchdog keeps closing idle connections meanwhile
    {
      std::lock_guard lock(mu_);
      watch_stop_ = true;
    }
    watch_cv_.notify_all();
    watchdog_.join();
  });
}

void ConnectionWorkerPool::Work(Slot* slot) {
  t_slot = slot;
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock lock(mu_);
      jobs_cv_.wait(lock, [this] { return shutdown_ || !jobs_.empty(); });
      if (jobs_.empty()) return;     // shutting down, nothing left
      fn = std::move(jobs_.back());  // newest first
      jobs_.pop_back();
    }
    {
      std::lock_guard lock(slot->mu);
      slot->serving = true;
      slot->handling = false;
      slot->since = Clock::now();
    }
    t_noted = false;
    fn();  // serves the connection until it closes
    std::lock_guard lock(slot->mu);
    slot->serving = false;
    if (slot->fd >= 0) ::close(slot->fd);
    slot->fd = -1;
  }
}

void ConnectionWorkerPool::NoteSocket(int fd) {
  if (t_slot == nullptr || t_noted || fd < 0) return;
  t_noted = true;
  const int dup = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) return;  // out of descriptors: this connection just cannot be evicted
  std::lock_guard lock(t_slot->mu);
  if (t_slot->fd >= 0) ::close(t_slot->fd);
  t_slot->fd = dup;
}

void ConnectionWorkerPool::RequestStarted() {
  if (t_slot == nullptr) return;
  std::lock_guard lock(t_slot->mu);
  t_slot->handling = true;
}

void ConnectionWorkerPool::RequestDone() {
  if (t_slot == nullptr) return;
  std::lock_guard lock(t_slot->mu);
  t_slot->handling = false;
  t_slot->since = Clock::now();
}

void ConnectionWorkerPool::Watch() {
  Clock::time_point last_report{};
  uint64_t reported = 0;
  for (;;) {
    size_t waiting;
    bool stopping;
    {
      std::unique_lock lock(mu_);
      watch_cv_.wait_for(lock, options_.check_interval);
      if (watch_stop_) return;
      waiting = jobs_.size();
      stopping = shutdown_;
    }
    if (stopping) {
      // Queued and idle connections must not hold up the shutdown: close every connection
      // not in the middle of a request, until the workers are gone.
      for (auto& s : slots_) {
        std::lock_guard lock(s->mu);
        if (s->serving && !s->handling && s->fd >= 0) ::shutdown(s->fd, SHUT_RDWR);
      }
      continue;
    }
    if (waiting == 0) continue;

    // Pressure: free one worker per waiting connection, from the connections that have gone
    // longest without a complete request.
    const auto now = Clock::now();
    std::vector<std::pair<Clock::time_point, Slot*>> idle;
    for (auto& s : slots_) {
      std::lock_guard lock(s->mu);
      if (s->serving && !s->handling && s->fd >= 0 && now - s->since >= options_.evict_after) {
        idle.emplace_back(s->since, s.get());
      }
    }
    std::sort(idle.begin(), idle.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    size_t closed = 0;
    for (auto& [since, s] : idle) {
      if (closed == waiting) break;
      std::lock_guard lock(s->mu);
      // Still the same state? (The connection may have finished or started a request since.)
      if (!s->serving || s->handling || s->fd < 0 || s->since != since) continue;
      // Counted before the worker can see it: whoever its freed worker serves next may read it.
      evicted_.fetch_add(1);
      ::shutdown(s->fd, SHUT_RDWR);         // the worker's next read fails; it closes and moves on
      s->since = Clock::time_point::max();  // once
      ++closed;
    }
    if (closed > 0) {
      if (now - last_report >= std::chrono::seconds(10)) {
        spdlog::warn(
            "webhook: {} connection(s) waiting for a worker; closed {} connection(s) that held "
            "one for over {} ms without a complete request (slow or idle clients)",
            waiting, evicted_.load() - reported, options_.evict_after.count());
        reported = evicted_.load();
        last_report = now;
      }
    }
  }
}

}  // namespace registry_proxy
