#include "base/rpc_status.h"

namespace registry_proxy {

std::string_view RpcCodeName(RpcCode code) {
  // Indexed by the code's number (gRPC's numbering, contiguous 0..16).
  static constexpr std::string_view kNames[kRpcCodeCount] = {
      "OK",
      "CANCELLED",
      "UNKNOWN",
      "INVALID_ARGUMENT",
      "DEADLINE_EXCEEDED",
      "NOT_FOUND",
      "ALREADY_EXISTS",
      "PERMISSION_DENIED",
      "RESOURCE_EXHAUSTED",
      "FAILED_PRECONDITION",
      "ABORTED",
      "OUT_OF_RANGE",
      "UNIMPLEMENTED",
      "INTERNAL",
      "UNAVAILABLE",
      "DATA_LOSS",
      "UNAUTHENTICATED",
  };
  const int n = static_cast<int>(code);
  if (n < 0 || n >= kRpcCodeCount) return "UNKNOWN_CODE";
  return kNames[n];
}

std::string RpcStatusText(const RpcStatus& s) {
  std::string out(RpcCodeName(s.error_code()));
  if (!s.error_message().empty()) out += ": " + s.error_message();
  return out;
}

RpcCode RpcCodeFromWire(int value) {
  if (value < 0 || value >= kRpcCodeCount) return RpcCode::UNKNOWN;
  return static_cast<RpcCode>(value);
}

}  // namespace registry_proxy
