// gRPC status codes and statuses as text, for messages and logs.
#pragma once

#include <grpcpp/support/status.h>

#include <string>
#include <string_view>

namespace registry_proxy {

// "NOT_FOUND", "UNAVAILABLE", ... as gRPC spells them.
std::string_view GrpcCodeName(grpc::StatusCode code);

// "UNAVAILABLE: message" (the message unchanged), or the code name alone when there is no
// message.
std::string GrpcStatusText(const grpc::Status& s);

}  // namespace registry_proxy
