#include "cri/intercept.h"

#include <chrono>

#include "cri/cri_methods.h"

namespace registry_proxy {
namespace {

// "<1-8 digits><unit>" (gRPC's grpc-timeout); max() when absent or malformed.
std::chrono::system_clock::time_point DeadlineFrom(const std::string& timeout) {
  if (timeout.size() < 2 || timeout.size() > 9) return std::chrono::system_clock::time_point::max();
  uint64_t v = 0;
  for (size_t i = 0; i + 1 < timeout.size(); ++i) {
    if (timeout[i] < '0' || timeout[i] > '9') return std::chrono::system_clock::time_point::max();
    v = v * 10 + (timeout[i] - '0');
  }
  if (v > 100000000) return std::chrono::system_clock::time_point::max();
  std::chrono::duration<double> d;
  switch (timeout.back()) {
    case 'H':
      d = std::chrono::hours(v);
      break;
    case 'M':
      d = std::chrono::minutes(v);
      break;
    case 'S':
      d = std::chrono::seconds(v);
      break;
    case 'm':
      d = std::chrono::milliseconds(v);
      break;
    case 'u':
      d = std::chrono::microseconds(v);
      break;
    case 'n':
      d = std::chrono::nanoseconds(v);
      break;
    default:
      return std::chrono::system_clock::time_point::max();
  }
  if (d > std::chrono::hours(24 * 365 * 10)) return std::chrono::system_clock::time_point::max();
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(d);
}

}  // namespace

CallInterception::CallInterception(ImageInterceptor* interceptor, int max_workers,
                                   std::function<void()> wake)
    : interceptor_(interceptor), wake_(std::move(wake)), workers_(max_workers) {}

CallInterception::Work CallInterception::Pull(CriVersion v, std::string request) {
  return [this, v, request = std::move(request)](const CallOptions& opts) {
    return interceptor_->PullImage(v, request, opts);
  };
}

CallInterception::Work CallInterception::RepairIfMiss(CriVersion v, const std::string& request,
                                                      std::string_view response) {
  if (HasLengthDelimitedField1(response) == 1) return nullptr;  // a hit
  std::string answer(response);
  if (!interceptor_->StatusNeedsRecovery(v, request, answer)) return nullptr;
  return [this, v, request, answer = std::move(answer)](const CallOptions& opts) {
    return interceptor_->RecoverStatus(v, request, answer, opts);
  };
}

bool CallInterception::Start(InterceptedCall call, Work work) {
  CallOptions opts;
  opts.deadline = DeadlineFrom(call.timeout);
  opts.metadata = std::move(call.metadata);
  opts.cancellation = call.cancellation.get();
  return workers_.Start([this, serial = call.serial, cancellation = std::move(call.cancellation),
                         opts = std::move(opts), work = std::move(work)] {
    InterceptResult r = work(opts);
    {
      std::lock_guard<std::mutex> lock(completions_mu_);
      completions_.push_back({serial, std::move(r)});
    }
    wake_();
  });
}

std::vector<CallInterception::Completion> CallInterception::TakeCompletions() {
  std::vector<Completion> done;
  std::lock_guard<std::mutex> lock(completions_mu_);
  done.swap(completions_);
  return done;
}

}  // namespace registry_proxy
