// The outcome of a remote call, as gRPC defines it on the wire (a code, a message and the
// serialized google.rpc.Status details of `grpc-status-details-bin`), without gRPC's library:
// the relay, the pull service and the containerd clients speak it, so `serve` never loads
// gRPC. The API mirrors grpc::Status, so code that knew one reads the other.
#pragma once

#include <string>
#include <string_view>
#include <utility>

namespace registry_proxy {

// gRPC's status codes, with gRPC's numbers (they are on the wire as `grpc-status`).
enum class RpcCode : int {
  OK = 0,
  CANCELLED = 1,
  UNKNOWN = 2,
  INVALID_ARGUMENT = 3,
  DEADLINE_EXCEEDED = 4,
  NOT_FOUND = 5,
  ALREADY_EXISTS = 6,
  PERMISSION_DENIED = 7,
  RESOURCE_EXHAUSTED = 8,
  FAILED_PRECONDITION = 9,
  ABORTED = 10,
  OUT_OF_RANGE = 11,
  UNIMPLEMENTED = 12,
  INTERNAL = 13,
  UNAVAILABLE = 14,
  DATA_LOSS = 15,
  UNAUTHENTICATED = 16,
};
inline constexpr int kRpcCodeCount = 17;

class RpcStatus {
 public:
  RpcStatus() = default;
  RpcStatus(RpcCode code, std::string message, std::string details = {})
      : code_(code), message_(std::move(message)), details_(std::move(details)) {}

  static const RpcStatus OK;

  bool ok() const { return code_ == RpcCode::OK; }
  RpcCode error_code() const { return code_; }
  const std::string& error_message() const { return message_; }
  // The serialized google.rpc.Status of `grpc-status-details-bin` (binary), or empty.
  const std::string& error_details() const { return details_; }

 private:
  RpcCode code_ = RpcCode::OK;
  std::string message_;
  std::string details_;
};

inline const RpcStatus RpcStatus::OK;

// "NOT_FOUND", "UNAVAILABLE", ... as gRPC spells them; "UNKNOWN_CODE" outside 0..16.
std::string_view RpcCodeName(RpcCode code);

// "UNAVAILABLE: message" (the message unchanged), or the code name alone when there is no
// message.
std::string RpcStatusText(const RpcStatus& s);

// A wire value of `grpc-status` as a code: values outside 0..16 are UNKNOWN, as gRPC reads them.
RpcCode RpcCodeFromWire(int value);

}  // namespace registry_proxy
