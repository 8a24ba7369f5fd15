// The node daemon's metrics (prefix registry_proxy_) and readiness.
//
// NodeMetrics is the proxy's CallObserver and the pull service's PullObserver:
//   cri_calls_total{method,code}, cri_call_duration_seconds{method}      every CRI call
//   pulls_total{rule,mirror,outcome}, pull_duration_seconds{outcome}     every PullImage
//   pull_attempts_total{rule,target,code},
//     pull_attempt_duration_seconds{target}                              every pull handed to
//                                                                        containerd
//   mirror_skipped_total{mirror,reason}, mirror_probes_total{mirror,result},
//   mirror_breaker_open{mirror}                                          mirror health
//   pulls_in_flight                                                      PullImage calls now
//                                                                        (InFlightPulls)
// `method` is the gRPC method without the leading slash ("runtime.v1.ImageService/PullImage").
// The first `max_methods` distinct methods get their own label; later ones (any client can
// send any method name) are counted as method="other", so memory stays bounded.
//
// AddUpstreamStateMetric: upstream_connection_state{state}, read from the channel at scrape
// time. UpstreamCheck: the node's readiness (containerd answers a CRI Version), cached.
//
// Thread safety: every method may be called from any thread. OnCallDone (the relay's
// event-loop thread) is a short uncontended mutex, a hash lookup without allocation and
// a few atomic adds once a method was seen.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

#include "containerd/rpc_channel.h"
#include "cri/cri_server.h"
#include "cri/interceptor.h"
#include "ops/metrics.h"
#include "ops/ops_server.h"
#include "pull/pull_observer.h"

namespace registry_proxy {

class NodeMetrics final : public CallObserver, public PullObserver {
 public:
  struct Options {
    size_t max_methods = 128;  // distinct CRI method labels; the rest are "other"
  };
  // Registers the families on `registry` (which must outlive this).
  NodeMetrics(metrics::Registry* registry, Options options);
  explicit NodeMetrics(metrics::Registry* registry) : NodeMetrics(registry, Options{}) {}

  // CallObserver
  void OnCallDone(std::string_view method, RpcCode code,
                  std::chrono::nanoseconds duration) override;
  // PullObserver
  void OnPull(const PullReport& report) override;
  void OnAttempt(std::string_view rule, std::string_view target, RpcCode code,
                 std::chrono::nanoseconds duration) override;
  void OnMirrorSkipped(std::string_view mirror, SkipReason reason) override;
  void OnProbe(std::string_view mirror, bool alive, std::chrono::nanoseconds duration) override;
  void OnBreaker(std::string_view mirror, bool open) override;

  metrics::Gauge& pulls_in_flight() { return pulls_in_flight_; }

 private:
  struct MethodChildren {
    metrics::Histogram* duration = nullptr;
    std::array<metrics::Counter*, 17> by_code{};  // RpcCode 0..16, made on first use
  };
  MethodChildren& Method(std::string_view method);  // under methods_mu_

  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };

  const Options options_;
  metrics::CounterFamily& calls_;
  metrics::HistogramFamily& call_seconds_;
  metrics::CounterFamily& pulls_;
  metrics::HistogramFamily& pull_seconds_;
  metrics::CounterFamily& attempts_;
  metrics::HistogramFamily& attempt_seconds_;
  metrics::CounterFamily& skipped_;
  metrics::CounterFamily& probes_;
  metrics::HistogramFamily& probe_seconds_;
  metrics::GaugeFamily& breaker_open_;
  metrics::Gauge& pulls_in_flight_;

  std::mutex methods_mu_;
  std::unordered_map<std::string, MethodChildren, StringHash, std::equal_to<>> methods_;
  MethodChildren other_;
};

// Wraps the pull service to count PullImage calls in flight (the PullObserver hears of a pull
// only when it ends; CriServer::in_flight() counts every call). Everything else is delegated.
class InFlightPulls final : public ImageInterceptor {
 public:
  InFlightPulls(ImageInterceptor* inner, metrics::Gauge* in_flight)
      : inner_(inner), in_flight_(in_flight) {}
  InterceptResult PullImage(CriVersion v, const std::string& request,
                            const CallOptions& opts) override;
  bool StatusNeedsRecovery(CriVersion v, const std::string& request,
                           const std::string& response) override {
    return inner_->StatusNeedsRecovery(v, request, response);
  }
  InterceptResult RecoverStatus(CriVersion v, const std::string& request,
                                const std::string& response, const CallOptions& opts) override {
    return inner_->RecoverStatus(v, request, response, opts);
  }

 private:
  ImageInterceptor* const inner_;
  metrics::Gauge* const in_flight_;
};

// registry_proxy_upstream_connection_state{state}: 1 for the channel's state now, 0 for the
// others (idle, connecting, ready, transient_failure, shutdown: gRPC's five, kept for dashboards;
// RpcChannel is never "connecting" or "shutdown"). Read at scrape time.
void AddUpstreamStateMetric(metrics::Registry* registry, std::shared_ptr<RpcChannel> channel);

// Whether the upstream CRI answers: runtime.v1 RuntimeService/Version within `timeout`. The
// answer is cached for `cache_for`, and concurrent callers share one call, so probes and
// scrapes never hammer containerd.
class UpstreamCheck {
 public:
  UpstreamCheck(std::shared_ptr<RpcChannel> channel,
                std::chrono::milliseconds timeout = std::chrono::seconds(1),
                std::chrono::milliseconds cache_for = std::chrono::seconds(1));
  Readiness Check();
  uint64_t calls() const { return calls_.load(); }  // Version calls made (tests)

 private:
  std::shared_ptr<RpcChannel> channel_;
  const std::chrono::milliseconds timeout_, cache_for_;
  std::mutex mu_;  // held during the call: concurrent callers wait for its answer
  std::chrono::steady_clock::time_point checked_{};
  bool have_ = false;
  Readiness last_;
  std::atomic<uint64_t> calls_{0};
};

}  // namespace registry_proxy
