#include "grpc_status.h"

namespace registry_proxy {

std::string_view GrpcCodeName(grpc::StatusCode code) {
  return RpcCodeName(static_cast<RpcCode>(code));  // the same numbers on the wire
}

std::string GrpcStatusText(const grpc::Status& s) { return RpcStatusText(FromGrpc(s)); }

}  // namespace registry_proxy
