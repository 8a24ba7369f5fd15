// What the pull service tells the rest of the daemon (metrics) about pulls, attempts, mirror
// probes and circuit breakers. The pull service calls these on its worker threads; an
// implementation must be thread-safe, cheap and must not block.
//
// Label values are bounded by the config: a rule is named by its `match`, a mirror by its
// host as written in the config.
#pragma once

#include <chrono>
#include <string_view>

#include "base/rpc_status.h"

namespace registry_proxy {

enum class PullOutcome {
  kMirror,       // a mirror served it
  kFallback,     // every mirror failed or was skipped; upstream served it
  kFailed,       // nothing served it; the caller got the last error
  kCancelled,    // the caller went away
  kPassthrough,  // not rewritten (no rule, excluded namespace, credentials...): forwarded
  kStale,        // every candidate was down; the image on the node answered (staleIfError)
};

std::string_view PullOutcomeName(PullOutcome o);  // "mirror", "fallback", ...

struct PullReport {
  std::string_view rule;    // the rule's match ("docker.io"); "" when not rewritten
  std::string_view mirror;  // the mirror host that served it; "" otherwise
  PullOutcome outcome = PullOutcome::kPassthrough;
  RpcCode code = RpcCode::OK;            // what the caller got
  std::chrono::nanoseconds duration{0};  // the whole PullImage call
  int attempts = 0;                      // pulls handed to containerd
};

// Why a mirror was not handed to containerd.
enum class SkipReason {
  kCooldown,     // its circuit breaker is open (it failed recently)
  kProbeFailed,  // the liveness probe just failed
  kNoTime,       // the overall pull deadline left no time for it
  kSlow,         // its probe had not answered within the hedge delay, a later mirror alive
};

std::string_view SkipReasonName(SkipReason r);  // "cooldown", "probe_failed", "no_time", "slow"

class PullObserver {
 public:
  virtual ~PullObserver() = default;
  // Once per PullImage call, when it ends.
  virtual void OnPull(const PullReport& report) = 0;
  // Once per pull handed to containerd. `target` is the mirror host, or "upstream".
  virtual void OnAttempt(std::string_view rule, std::string_view target, RpcCode code,
                         std::chrono::nanoseconds duration) = 0;
  virtual void OnMirrorSkipped(std::string_view mirror, SkipReason reason) = 0;
  // A liveness probe of a mirror finished.
  virtual void OnProbe(std::string_view mirror, bool alive, std::chrono::nanoseconds duration) = 0;
  // A mirror's circuit breaker opened (true) or closed again (false).
  virtual void OnBreaker(std::string_view mirror, bool open) = 0;
};

}  // namespace registry_proxy
