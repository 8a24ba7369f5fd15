// What the proxy needs to know of a CRI call before it forwards it: which methods it
// intercepts, which are known to be unary, which metadata it may copy, and whether an
// ImageStatus response is a hit. Used by the relay (h2_relay); no I/O.
#pragma once

#include <string_view>

#include "base/rpc_status.h"
#include "cri/call.h"

namespace registry_proxy {

// How the proxy treats a method.
enum class CallKind {
  kUnary,   // a CRI method known to be unary: one request, one response
  kStream,  // anything else, known streaming or unknown: pumped both ways, message by message
  kPull,    // PullImage: handed to the interceptor on a worker
  kStatus,  // ImageStatus: forwarded; a miss may be handed to the interceptor
};

struct MethodInfo {
  CallKind kind;
  CriVersion version;
};

// `path` is the HTTP/2 :path ("/runtime.v1.ImageService/PullImage"). Without an interceptor
// (`intercept` false) PullImage and ImageStatus are plain unary calls.
MethodInfo ClassifyMethod(std::string_view path, bool intercept);

// Whether a caller's header is metadata worth passing on: not a pseudo-header, not one of
// gRPC's own (grpc-*, content-type, te, user-agent, host).
bool ForwardableMetadata(std::string_view key);

// Whether a serialized message has top-level field 1, length-delimited: 1 = yes, 0 = no,
// -1 = cannot tell (not well-formed protobuf). For an ImageStatusResponse, field 1 is `image`:
// present means a hit, which is never recovered.
int HasLengthDelimitedField1(std::string_view message);

}  // namespace registry_proxy
