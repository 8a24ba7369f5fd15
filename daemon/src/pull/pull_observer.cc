#include "pull/pull_observer.h"

namespace registry_proxy {

std::string_view PullOutcomeName(PullOutcome o) {
  switch (o) {
    case PullOutcome::kMirror:
      return "mirror";
    case PullOutcome::kFallback:
      return "fallback";
    case PullOutcome::kFailed:
      return "failed";
    case PullOutcome::kCancelled:
      return "cancelled";
    case PullOutcome::kStale:
      return "stale";
    case PullOutcome::kPassthrough:
      return "passthrough";
  }
  return "unknown";
}

std::string_view SkipReasonName(SkipReason r) {
  switch (r) {
    case SkipReason::kCooldown:
      return "cooldown";
    case SkipReason::kProbeFailed:
      return "probe_failed";
    case SkipReason::kNoTime:
      return "no_time";
    case SkipReason::kSlow:
      return "slow";
  }
  return "unknown";
}

}  // namespace registry_proxy
