#include "pull/mirror_health.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <utility>

namespace registry_proxy {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int64_t Ms(SteadyClock::duration d) { return std::chrono::duration_cast<milliseconds>(d).count(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// The checker

struct MirrorHealthChecker::Probe {
  std::string host;
  ProbeTarget target;
  SteadyClock::time_point started, deadline;
  std::chrono::milliseconds cooldown{0};
  std::atomic<bool> stop{false};
  // Guarded by the checker's mu_:
  bool done = false;
  bool reported = false;
  bool opened = false, closed = false;
  ProbeResult result;
  std::chrono::nanoseconds duration{0};
  bool thread_done = false;  // the probe thread (if any) has finished
  int waiters = 0;           // callers waiting for it; with none, Finish logs the answer
};

MirrorHealthChecker::MirrorHealthChecker() : MirrorHealthChecker(Options{}) {}

MirrorHealthChecker::MirrorHealthChecker(Options options) : options_(std::move(options)) {
  if (!options_.prober) options_.prober = HttpProbe;
  if (!options_.now) options_.now = [] { return SteadyClock::now(); };
}

MirrorHealthChecker::~MirrorHealthChecker() {
  std::list<Runner> runners;
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
    runners.swap(runners_);
    for (Runner& r : runners) r.probe->stop = true;
  }
  for (Runner& r : runners) r.thread.join();
}

void MirrorHealthChecker::ReapThreads() {
  for (auto it = runners_.begin(); it != runners_.end();) {
    if (it->probe->thread_done) {
      it->thread.join();  // it has returned from its function: immediate
      it = runners_.erase(it);
    } else {
      ++it;
    }
  }
}

bool MirrorHealthChecker::IsOpen(const std::string& host) {
  std::lock_guard lock(mu_);
  auto it = states_.find(host);
  return it != states_.end() && it->second.open && Now() < it->second.open_until;
}

bool MirrorHealthChecker::NeedsProbe(const std::string& host, const HealthSettings& settings) {
  State& st = states_[host];
  const auto now = Now();
  if (st.open && settings.cooldown.count() > 0 && now < st.open_until) return false;
  if (!settings.probe) return false;
  return st.open || now >= st.alive_until;
}

bool MirrorHealthChecker::KnownAlive(const std::string& host) {
  auto it = states_.find(host);
  return it != states_.end() && !it->second.open && Now() < it->second.alive_until;
}

std::shared_ptr<MirrorHealthChecker::Probe> MirrorHealthChecker::StartProbe(
    const std::string& host, const HealthSettings& settings, std::unique_lock<std::mutex>& lock) {
  State& st = states_[host];
  if (st.probe) return st.probe;
  auto p = std::make_shared<Probe>();
  p->host = host;
  std::string problem;
  p->target = ResolveProbeTarget(host, settings.hosts_dir, &problem);
  if (!problem.empty() && logged_problems_.insert(host + "\n" + problem).second) {
    spdlog::warn("mirror {}: {}", host, problem);
  }
  p->started = Now();
  p->deadline = p->started + settings.probe_timeout;
  p->cooldown = settings.cooldown;
  st.probe = p;
  if (options_.probe_thread && !stopping_) {
    // The prober's own deadline is real time (it polls sockets).
    const auto real_deadline = SteadyClock::now() + settings.probe_timeout;
    Runner runner;
    runner.probe = p;
    try {
      runner.thread = std::thread([this, p, real_deadline] {
        ProbeResult r = options_.prober(p->target, real_deadline, p->stop);
        std::lock_guard l(mu_);
        Finish(p, std::move(r));
        p->thread_done = true;
      });
      runners_.push_back(std::move(runner));
    } catch (const std::system_error& e) {  // no thread to be had: the mirror gets the doubt
      Finish(p, ProbeResult{true, 0, std::string("not probed: ") + e.what()});
    }
  } else {
    ++p->waiters;  // the caller: Finish must leave the report to it
    lock.unlock();
    ProbeResult r =
        options_.prober(p->target, SteadyClock::now() + settings.probe_timeout, p->stop);
    lock.lock();
    Finish(p, std::move(r));
    --p->waiters;
  }
  return p;
}

bool MirrorHealthChecker::ProbeInFlight(const std::string& host) {
  std::lock_guard lock(mu_);
  auto it = states_.find(host);
  return it != states_.end() && it->second.probe != nullptr;
}

HealthVerdict MirrorHealthChecker::Check(const std::string& host,
                                         const std::vector<std::string>& later,
                                         const HealthSettings& settings, const CallOptions& opts) {
  HealthVerdict v;
  std::unique_lock lock(mu_);
  ReapThreads();
  {
    State& st = states_[host];
    const auto now = Now();
    if (st.open && settings.cooldown.count() > 0 && now < st.open_until) {
      v.action = HealthVerdict::Action::kCooldown;
      v.cooldown_left = std::chrono::ceil<milliseconds>(st.open_until - now);
      return v;
    }
  }
  if (!NeedsProbe(host, settings)) return v;  // probing off, half-open unprobed, or alive

  std::shared_ptr<Probe> p = StartProbe(host, settings, lock);
  // This one needs a probe, so the later ones may soon be needed: probe them now, in parallel
  // (inline probing would run them one after another: not then).
  const bool hedging = settings.hedge_delay.count() > 0 && options_.probe_thread;
  if (hedging) {
    for (const std::string& h : later) {
      if (h != host && NeedsProbe(h, settings)) StartProbe(h, settings, lock);
    }
  }
  // Wait for the probe (ours or the one in flight). Waiters give up on it a little after its
  // deadline even if the prober has not returned (a name lookup cannot be interrupted): it
  // then counts as timed out, and its late answer is dropped.
  ++p->waiters;
  while (!p->done) {
    if (opts.cancellation && opts.cancellation->cancelled()) {
      v.action = HealthVerdict::Action::kCancelled;
      break;
    }
    if (std::chrono::system_clock::now() >= opts.deadline) {
      v.action = HealthVerdict::Action::kNoTime;
      break;
    }
    const auto now = Now();
    if (now >= p->deadline + milliseconds(100)) {
      Finish(p, ProbeResult{
                    false, 0,
                    "no answer within " + std::to_string(Ms(p->deadline - p->started)) + "ms"});
      break;
    }
    if (hedging && now >= p->started + settings.hedge_delay) {
      for (const std::string& h : later) {
        if (h != host && KnownAlive(h)) {
          v.action = HealthVerdict::Action::kSlow;
          v.waited = std::chrono::floor<milliseconds>(now - p->started);
          v.alive_instead = h;
          v.target = p->target.Url();
          break;
        }
      }
      if (v.action == HealthVerdict::Action::kSlow) break;
    }
    finished_.wait_for(lock, milliseconds(20));
  }
  --p->waiters;
  if (!p->done) return v;  // cancelled, no time or slow: the probe runs on
  v.probed = true;
  v.probe = p->result;
  v.probe_duration = p->duration;
  v.target = p->target.Url();
  if (!p->reported) {
    p->reported = true;
    v.ran_probe = true;
    v.breaker_opened = p->opened;
    v.breaker_closed = p->closed;
  }
  v.action = p->result.alive ? HealthVerdict::Action::kTry : HealthVerdict::Action::kDead;
  return v;
}

void MirrorHealthChecker::Finish(const std::shared_ptr<Probe>& p, ProbeResult result) {
  if (p->done) return;
  const auto end = Now();
  p->done = true;
  p->result = std::move(result);
  p->duration = end - p->started;
  State& s = states_[p->host];
  if (s.probe == p) s.probe.reset();
  if (p->result.alive) {
    s.alive_until = end + options_.alive_ttl;
    if (s.open) p->closed = true;
    s.open = false;
  } else {
    s.alive_until = {};
    if (p->cooldown.count() > 0) {
      if (!s.open) p->opened = true;
      s.open = true;
      s.open_until = end + p->cooldown;
    }
  }
  if (p->waiters == 0 && !stopping_) {
    // Nobody will report it (a mirror a pull hedged past, or one probed ahead and not needed).
    p->reported = true;
    spdlog::log(p->result.alive ? spdlog::level::info : spdlog::level::warn,
                "mirror {}: probe {} {} in {}ms: {}", p->host, p->target.Url(),
                p->result.alive ? "alive" : "DEAD", Ms(p->duration), p->result.detail);
    if (p->opened) {
      spdlog::warn("mirror {}: circuit breaker open for {}ms: probe failed", p->host,
                   p->cooldown.count());
    }
    if (p->closed) spdlog::info("mirror {}: circuit breaker closed: probe alive", p->host);
    if (options_.on_unclaimed_probe) {
      options_.on_unclaimed_probe(p->host, p->result, p->duration,
                                  p->opened   ? 1
                                  : p->closed ? -1
                                              : 0);
    }
  }
  finished_.notify_all();
}

int MirrorHealthChecker::Report(const std::string& host, bool ok, bool down,
                                const HealthSettings& settings) {
  std::lock_guard lock(mu_);
  State& st = states_[host];
  const auto now = Now();
  if (ok) {
    st.alive_until = now + options_.alive_ttl;
    if (st.open) {
      st.open = false;
      return -1;
    }
    return 0;
  }
  if (!down || settings.cooldown.count() <= 0) return 0;
  st.alive_until = {};
  const bool was_open = st.open;
  st.open = true;
  st.open_until = now + settings.cooldown;
  return was_open ? 0 : 1;
}

}  // namespace registry_proxy
