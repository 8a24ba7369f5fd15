#include "containerd/grpc_status.h"

#include <absl/synchronization/mutex.h>
#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

namespace registry_proxy {
namespace {

void GrpcLogToSpdlog(gpr_log_func_args* a) {
  const auto level = a->severity == GPR_LOG_SEVERITY_ERROR  ? spdlog::level::err
                     : a->severity == GPR_LOG_SEVERITY_INFO ? spdlog::level::info
                                                            : spdlog::level::debug;
  spdlog::log(level, "grpc {}:{}: {}", a->file ? a->file : "?", a->line,
              a->message ? a->message : "");
}

}  // namespace

void SetUpGrpcClientProcess() {
  gpr_set_log_function(GrpcLogToSpdlog);
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

std::string_view GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN_CODE";
  }
}

std::string GrpcStatusText(const grpc::Status& s) {
  std::string out(GrpcCodeName(s.error_code()));
  if (!s.error_message().empty()) out += ": " + s.error_message();
  return out;
}

}  // namespace registry_proxy
