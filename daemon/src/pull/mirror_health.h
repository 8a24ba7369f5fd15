// Mirror health: a cheap liveness probe and a circuit breaker per mirror, so that a dead or
// black-holed mirror costs a pull at most one probe timeout instead of the caller's whole
// deadline (kubelet sets none on PullImage).
//
// Probe: HTTP `GET /v2/` of what containerd will actually contact for the mirror host (the
// first host with pull capability of its hosts.toml in node.containerdHostsDir, else containerd's
// default; see hosts_toml.h), through the proxy containerd would use (HTTP_PROXY, HTTPS_PROXY,
// NO_PROXY with Go's rules; see proxy_env.h). Any HTTP answer below 500 = alive; a 5xx, a
// refused or reset connection, a TLS failure, or no answer within the timeout = dead; the
// certificate is not verified (see probe.h).
//
// Probes are single-flight per mirror (concurrent pulls wait for the probe in progress) and an
// "alive" answer is reused for `alive_ttl` (a burst of pulls costs one probe).
//
// Hedging (settings.hedge_delay, node.mirrorHedgeDelay, default 400 ms; 0 = off). A pull asks
// Check for its mirrors in order, passing each time the mirrors after this one (`later`):
//  - When this mirror needs a probe, the probes of every `later` mirror that needs one start at
//    the same moment (single-flight: a fresh answer or a probe in flight costs nothing more).
//    A mirror that is fresh-alive or in cooldown starts no probes.
//  - Check waits for this mirror's probe. If it has not answered by hedge_delay after it
//    started while some later mirror is known alive (its breaker closed and an alive answer
//    within alive_ttl), the verdict is kSlow: skip it for THIS pull. Until then, and as long as
//    no later mirror is known alive, it keeps waiting (up to the probe timeout, as without
//    hedging). So the first mirror in order whose probe answers alive within hedge_delay is the
//    one tried; a mirror answering after 300 ms with the default 400 ms is still used.
//  - "Slow" is not "dead": the skipped mirror's probe keeps running to its own timeout and only
//    its answer moves its breaker (alive: reused for the next pulls; dead: breaker opens).
//  - A probe whose answer no caller is waiting for (a hedged-past mirror, or a later mirror's
//    probe that the pull never needed) is logged by the checker itself when it ends, as the
//    pull service logs the others ("mirror H: probe URL alive|DEAD in Nms: detail").
// Upstream is never probed, so it never counts as "known alive": with one mirror and upstream
// behind it, a black-holed mirror still costs the probe timeout (upstream is the last resort).
// So a black-holed first mirror costs a pull about hedge_delay when a later mirror answers its
// probe within that time (else the wait ends when one does, or at the probe timeout). A mirror
// that is alive but needs longer than hedge_delay to answer /v2/ (a far one over TLS) is passed
// over whenever a later one is alive: raise the delay for such mirrors. At or above
// probe_timeout it never passes over.
//
// Breaker: a failed probe, or an attempt that failed in a way that says the mirror is down
// (ClassifyAttempt, attempt_error.h), opens the mirror's breaker for `cooldown`: while open the
// mirror is skipped without probing. After the cooldown the next pull probes again (half-open):
// alive closes it, dead opens it for another cooldown.
//
// Thread safety: every public method may be called from any number of threads.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/status.h"
#include "containerd/upstream.h"
#include "pull/hosts_toml.h"
#include "pull/probe.h"

namespace registry_proxy {

// The node settings the health checker follows (from the config snapshot of each pull, so a
// reload applies to the next pull).
struct HealthSettings {
  bool probe = true;                                  // node.mirrorProbe
  std::chrono::milliseconds probe_timeout{2000};      // node.mirrorProbeTimeout
  std::chrono::milliseconds cooldown{30000};          // node.mirrorCooldown; 0 = no breaker
  std::string hosts_dir = "/etc/containerd/certs.d";  // node.containerdHostsDir
  // node.mirrorHedgeDelay: how long a pull waits for a mirror's probe before passing over it
  // to a later mirror already known alive (see "Hedging" above); 0 = never pass over.
  std::chrono::milliseconds hedge_delay{400};
};

// What the pull service must do with a mirror, and what happened on the way (for the log
// and the PullObserver).
struct HealthVerdict {
  enum class Action {
    kTry,        // hand it to containerd
    kCooldown,   // skip: breaker open
    kDead,       // skip: the probe (this one, or the one waited for) said dead
    kSlow,       // skip for this pull: no probe answer within hedge_delay, a later one alive
    kCancelled,  // the caller went away while waiting for a probe
    kNoTime,     // the caller's deadline passed while waiting for a probe
  };
  Action action = Action::kTry;
  bool probed = false;     // this call ran (or waited for) a fresh probe
  bool ran_probe = false;  // report this probe: true for exactly one caller per probe
  ProbeResult probe;
  std::chrono::nanoseconds probe_duration{0};
  std::string target;                          // the probe URL, when probed
  std::chrono::milliseconds cooldown_left{0};  // with kCooldown
  std::chrono::milliseconds waited{0};         // with kSlow: since its probe started
  std::string alive_instead;                   // with kSlow: the later mirror known alive
  bool breaker_opened = false;                 // this call opened the breaker (a failed probe)
  bool breaker_closed = false;                 // this call closed it (half-open probe alive)
};

// The seam the pull service uses (tests use a fake).
class MirrorHealth {
 public:
  virtual ~MirrorHealth() = default;
  // Before an attempt at mirror `host` (host[:port]); `later`: the pull's mirrors after it, in
  // order (see "Hedging"). Blocks at most for one probe (bounded by settings.probe_timeout),
  // less when the caller's deadline passes, it cancels, or a later mirror wins the hedge.
  virtual HealthVerdict Check(const std::string& host, const std::vector<std::string>& later,
                              const HealthSettings& settings, const CallOptions& opts) = 0;
  // After an attempt at `host`: ok, or failed and `down` (ClassifyAttempt), or failed for
  // another reason. Returns +1 when this opened the breaker, -1 when it closed it, else 0.
  virtual int Report(const std::string& host, bool ok, bool down,
                     const HealthSettings& settings) = 0;
};

class MirrorHealthChecker final : public MirrorHealth {
 public:
  struct Options {
    Prober prober;                                               // default HttpProbe
    std::function<std::chrono::steady_clock::time_point()> now;  // default steady_clock
    std::chrono::milliseconds alive_ttl{10000};  // how long an alive answer is reused
    // Run probes on their own thread (default), so a caller that cancels or runs out of time
    // stops waiting at once. Tests set false to run them inline, deterministically.
    bool probe_thread = true;
    // Told of each probe whose answer no caller waited for (see "Hedging"): the mirror, the
    // answer, how long it took, and +1 when it opened the breaker, -1 when it closed it, else
    // 0. The daemon counts these in its metrics as the pull service counts the others. Called
    // on the probe's thread with the checker's lock held: it must not call the checker.
    std::function<void(const std::string& host, const ProbeResult& result,
                       std::chrono::nanoseconds duration, int breaker_change)>
        on_unclaimed_probe;
  };
  MirrorHealthChecker();
  explicit MirrorHealthChecker(Options options);
  ~MirrorHealthChecker() override;  // stops and joins running probes
  MirrorHealthChecker(const MirrorHealthChecker&) = delete;
  MirrorHealthChecker& operator=(const MirrorHealthChecker&) = delete;

  HealthVerdict Check(const std::string& host, const std::vector<std::string>& later,
                      const HealthSettings& settings, const CallOptions& opts) override;
  int Report(const std::string& host, bool ok, bool down, const HealthSettings& settings) override;

  // For tests and logs: whether host's breaker is open now.
  bool IsOpen(const std::string& host);
  // For tests: whether a probe of host is running (its answer not yet recorded).
  bool ProbeInFlight(const std::string& host);

 private:
  struct Probe;  // one probe in flight, shared by its waiters
  struct State {
    bool open = false;
    std::chrono::steady_clock::time_point open_until{};
    std::chrono::steady_clock::time_point alive_until{};  // alive answer reusable until
    std::shared_ptr<Probe> probe;                         // in flight, or null
  };
  std::chrono::steady_clock::time_point Now() const { return options_.now(); }
  // host's probe in flight, or a new one started now (on its thread, or inline when
  // !options_.probe_thread: then it has finished on return). mu_ held (released inline).
  std::shared_ptr<Probe> StartProbe(const std::string& host, const HealthSettings& settings,
                                    std::unique_lock<std::mutex>& lock);
  // Whether host needs a probe before it is tried: probing on, breaker not open in cooldown,
  // no alive answer within alive_ttl. mu_ held.
  bool NeedsProbe(const std::string& host, const HealthSettings& settings);
  // Breaker closed and an alive answer within alive_ttl. mu_ held.
  bool KnownAlive(const std::string& host);
  void ReapThreads();  // joins finished probe threads; mu_ held
  // Records a probe's answer (once; a late one is dropped), moves the breaker, wakes the
  // waiters. mu_ held.
  void Finish(const std::shared_ptr<Probe>& p, ProbeResult result);

  Options options_;
  std::mutex mu_;
  std::map<std::string, State> states_;  // guarded by mu_
  std::condition_variable finished_;     // notified (with mu_) whenever a probe finishes
  struct Runner {
    std::thread thread;
    std::shared_ptr<Probe> probe;
  };
  std::list<Runner> runners_;  // guarded by mu_
  std::atomic<bool> stopping_{false};
  std::set<std::string> logged_problems_;  // hosts.toml problems already logged; mu_
};

}  // namespace registry_proxy
