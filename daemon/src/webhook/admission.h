// The admission webhook's decision: AdmissionReview (admission.k8s.io/v1) JSON text in,
// AdmissionReview JSON text out. Pure: no I/O, no clocks, no globals; the HTTPS adapter
// (webhook_server.h) only moves bytes.
//
// For a Pod (CREATE, or UPDATE such as the ephemeralcontainers subresource) it asks the rule
// engine, with the request's namespace and the pod's labels, where each container, init
// container and ephemeral container will be pulled from first, and answers with a JSON Patch
// that sets two annotations:
//
//   registry-proxy.io/images: {"app":"docker.ketches.cn/library/nginx:1.25","init":"busybox"}
//   registry-proxy.io/config: sha256:0123456789ab   (the config's content digest, 12 hex)
//
// Every container is listed (the value is the spec's image when no rule rewrites it) as soon
// as one of them is rewritten, so the annotation alone says where each image comes from. A
// pod none of whose images is rewritten gets no patch; if it carries stale annotations of
// ours (copied from another pod), they are removed. `spec` is never touched. The answer is
// always allowed: the webhook must never block pod creation.
//
// Never throws (nlohmann's exceptions are caught inside); bad input gets a 4xx status with a
// one-line message, or, when the request is a well-formed AdmissionReview the API server sent
// about something we cannot read, an allowing answer with a warning.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/string_util.h"
#include "rules/config.h"

namespace registry_proxy {

inline constexpr char kImagesAnnotation[] = "registry-proxy.io/images";
inline constexpr char kConfigAnnotation[] = "registry-proxy.io/config";

struct AdmissionLimits {
  // Larger bodies are refused before parsing (the API server caps objects at ~1.5 MiB; a
  // review carries the object twice on UPDATE).
  size_t max_body_bytes = 3 * 1024 * 1024;
  // Deeper JSON nesting is refused before parsing (a pod is ~10 levels deep; the cap keeps
  // the recursive destructor and any recursion in the parser far from the stack's end).
  int max_depth = 64;
};

struct AdmissionOutcome {
  // 200 with an AdmissionReview; 4xx with a one-line text/plain message.
  int http_status = 200;
  std::string body;
  std::string content_type;  // "application/json" or "text/plain; charset=utf-8"

  // For logs and tests.
  std::string uid;
  std::string pod;       // "namespace/name" (or generateName + "*")
  bool patched = false;  // the answer carries a JSON Patch
  std::string message;   // the 4xx message, or the warning, or a one-line summary
};

// Answers one AdmissionReview with the config in force. Thread-safe (pure).
AdmissionOutcome Admit(std::string_view body, const Config& config,
                       const AdmissionLimits& limits = {});

// Nesting depth of JSON text (arrays and objects; brackets in strings ignored), stopping as
// soon as `limit` is exceeded (then returns limit + 1). O(n), no allocation.
int JsonDepth(std::string_view text, int limit);

// RFC 6901: "~" -> "~0", "/" -> "~1".
std::string EscapeJsonPointer(std::string_view token);

}  // namespace registry_proxy
