// What a failed pull attempt means, from containerd's answer (code and Go error text), in
// words that hold for containerd 1.6, 1.7 and 2.x alike: the mirror is down, it lacks the
// image, the caller went away, or containerd itself failed. Pure: no I/O, no clock.
//
// PullService walks its candidates with it: a down mirror is blamed (its circuit breaker),
// a missing image is not; a containerd failure stops the walk (no other candidate can do
// better, and no mirror is to blame); a caller that went away ends the call.
#pragma once

#include <string>
#include <string_view>

#include "base/rpc_status.h"

namespace registry_proxy {

enum class AttemptClass {
  kOk,
  kMirrorDown,        // refused, reset, unreachable, TLS failure, 5xx, our attempt timeout
  kNotFound,          // the registry answered: no such image (or tag)
  kCallerGone,        // the caller cancelled, or its own deadline passed
  kContainerdFailed,  // containerd unavailable, out of space, unpack/snapshot/content errors,
                      // the API not served (UNIMPLEMENTED: containerd 2.x and CRI v1alpha2)
  kOther,             // anything else (401/403, a bad reference, ...): the registry is up
};

struct AttemptVerdict {
  AttemptClass cls = AttemptClass::kOk;
  std::string detail;  // the evidence, short: "connection refused", "500 Internal Server Error"
};

// s: containerd's answer. own_deadline_hit: the attempt ran into the deadline we set for it
// (node.pullAttemptTimeout/pullTimeout), not the caller's. caller_gone: the caller cancelled.
AttemptVerdict ClassifyAttempt(const RpcStatus& s, bool own_deadline_hit, bool caller_gone);

// "down", "not found", "caller went away", "containerd failed", "failed"; "ok".
std::string_view AttemptClassName(AttemptClass c);

// "down (connection refused)", "not found", ...: for the per-candidate summary.
std::string DescribeAttempt(const AttemptVerdict& v);

}  // namespace registry_proxy
