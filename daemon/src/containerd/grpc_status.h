// gRPC status codes and statuses as text, for messages and logs.
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

// For a process that uses gRPC's client: gRPC's own log lines (gpr_log: errors by default, more
// with GRPC_VERBOSITY) go through spdlog, so they take our format (JSON lines too); and abseil's
// mutex deadlock detector is turned off. Debian's abseil is built without NDEBUG, so every
// absl::Mutex gRPC locks also runs that detector (a lock graph under a global lock): about 8%
// of the CPU on a busy path (perf). gRPC's locking is not ours to verify; TSan builds still
// check ours. Process-wide, idempotent.
void SetUpGrpcClientProcess();

}  // namespace registry_proxy
