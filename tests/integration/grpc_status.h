// gRPC status codes and statuses as text, for the tests' messages (gRPC's library: tests only).
#pragma once

#include <grpcpp/support/status.h>

#include <string>
#include <string_view>

#include "base/rpc_status.h"

namespace registry_proxy {

// "NOT_FOUND", "UNAVAILABLE", ... as gRPC spells them.
std::string_view GrpcCodeName(grpc::StatusCode code);

// "UNAVAILABLE: message" (the message unchanged), or the code name alone when there is no
// message.
std::string GrpcStatusText(const grpc::Status& s);

// The same status in our own type (code, message and details unchanged).
inline RpcStatus FromGrpc(const grpc::Status& s) {
  return RpcStatus(static_cast<RpcCode>(s.error_code()), s.error_message(), s.error_details());
}

}  // namespace registry_proxy
