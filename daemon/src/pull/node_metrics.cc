#include "pull/node_metrics.h"

#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.pb.h"

namespace registry_proxy {
namespace {

using metrics::Registry;

double Seconds(std::chrono::nanoseconds d) { return std::chrono::duration<double>(d).count(); }

// 100 us .. 10 min: a forwarded ImageStatus takes ~0.3 ms, a pull of a large image minutes.
std::vector<double> CallBuckets() {
  return {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
          0.5,    1,       2.5,    5,     10,     30,    60,   120,   300,  600};
}
std::vector<double> PullBuckets() { return {0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}; }
std::vector<double> ProbeBuckets() { return {0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5}; }

std::string_view CodeLabel(RpcCode code) { return RpcCodeName(code); }

}  // namespace

NodeMetrics::NodeMetrics(Registry* r, Options options)
    : options_(options),
      calls_(r->AddCounter("registry_proxy_cri_calls_total",
                           "CRI calls served, by gRPC method and status code.",
                           {"method", "code"})),
      call_seconds_(r->AddHistogram("registry_proxy_cri_call_duration_seconds",
                                    "Time from a CRI call's arrival to its end, by method.",
                                    {"method"}, CallBuckets())),
      pulls_(r->AddCounter(
          "registry_proxy_pulls_total",
          "PullImage calls by rule (its match; \"\" when not rewritten), the mirror that served "
          "it (\"\" otherwise) and outcome (mirror, fallback, failed, cancelled, passthrough).",
          {"rule", "mirror", "outcome"})),
      pull_seconds_(r->AddHistogram("registry_proxy_pull_duration_seconds",
                                    "Duration of whole PullImage calls, by outcome.", {"outcome"},
                                    PullBuckets())),
      attempts_(r->AddCounter("registry_proxy_pull_attempts_total",
                              "Pulls handed to containerd, by rule, target (a mirror host or "
                              "\"upstream\") and status code.",
                              {"rule", "target", "code"})),
      attempt_seconds_(r->AddHistogram("registry_proxy_pull_attempt_duration_seconds",
                                       "Duration of pulls handed to containerd, by target.",
                                       {"target"}, PullBuckets())),
      skipped_(r->AddCounter(
          "registry_proxy_mirror_skipped_total",
          "Mirror candidates not handed to containerd, by mirror and reason (cooldown: its "
          "circuit breaker is open; probe_failed; no_time: the pull's deadline ran out; slow: no "
          "probe answer within the hedge delay while a later mirror was alive).",
          {"mirror", "reason"})),
      probes_(r->AddCounter("registry_proxy_mirror_probes_total",
                            "Mirror liveness probes, by mirror and result (alive, dead).",
                            {"mirror", "result"})),
      probe_seconds_(r->AddHistogram("registry_proxy_mirror_probe_duration_seconds",
                                     "Duration of mirror liveness probes.", {"mirror"},
                                     ProbeBuckets())),
      breaker_open_(r->AddGauge("registry_proxy_mirror_breaker_open",
                                "1 while the mirror's circuit breaker is open (the mirror is "
                                "skipped), 0 once it closed again.",
                                {"mirror"})),
      pulls_in_flight_(
          r->AddGauge("registry_proxy_pulls_in_flight", "PullImage calls being served now.")
              .Get()) {}

NodeMetrics::MethodChildren& NodeMetrics::Method(std::string_view method) {
  if (auto it = methods_.find(method); it != methods_.end()) return it->second;
  if (methods_.size() >= options_.max_methods) {
    if (!other_.duration) other_.duration = &call_seconds_.With({"other"});
    return other_;
  }
  const std::string_view label = method.substr(method.starts_with('/') ? 1 : 0);
  auto [it, inserted] = methods_.try_emplace(std::string(method));
  it->second.duration = &call_seconds_.With({label});
  return it->second;
}

void NodeMetrics::OnCallDone(std::string_view method, RpcCode code,
                             std::chrono::nanoseconds duration) {
  const size_t c = static_cast<size_t>(code);
  metrics::Counter* counter;
  metrics::Histogram* histogram;
  {
    std::lock_guard<std::mutex> lock(methods_mu_);
    MethodChildren& m = Method(method);
    histogram = m.duration;
    if (c < m.by_code.size()) {
      if (!m.by_code[c]) {
        const std::string_view label =
            &m == &other_ ? "other" : method.substr(method.starts_with('/') ? 1 : 0);
        m.by_code[c] = &calls_.With({label, CodeLabel(code)});
      }
      counter = m.by_code[c];
    } else {
      counter = nullptr;
    }
  }
  if (!counter) {  // not a gRPC code (never happens): counted, at the cost of a lookup
    counter = &calls_.With({"other", std::to_string(static_cast<int>(code))});
  }
  counter->Inc();
  histogram->Observe(Seconds(duration));
}

void NodeMetrics::OnPull(const PullReport& report) {
  const std::string_view outcome = PullOutcomeName(report.outcome);
  pulls_.With({report.rule, report.mirror, outcome}).Inc();
  pull_seconds_.With({outcome}).Observe(Seconds(report.duration));
}

void NodeMetrics::OnAttempt(std::string_view rule, std::string_view target, RpcCode code,
                            std::chrono::nanoseconds duration) {
  attempts_.With({rule, target, CodeLabel(code)}).Inc();
  attempt_seconds_.With({target}).Observe(Seconds(duration));
}

void NodeMetrics::OnMirrorSkipped(std::string_view mirror, SkipReason reason) {
  skipped_.With({mirror, SkipReasonName(reason)}).Inc();
}

void NodeMetrics::OnProbe(std::string_view mirror, bool alive, std::chrono::nanoseconds duration) {
  probes_.With({mirror, alive ? "alive" : "dead"}).Inc();
  probe_seconds_.With({mirror}).Observe(Seconds(duration));
}

void NodeMetrics::OnBreaker(std::string_view mirror, bool open) {
  breaker_open_.With({mirror}).Set(open ? 1 : 0);
}

// ---------------------------------------------------------------------------------------------

InterceptResult InFlightPulls::PullImage(CriVersion v, const std::string& request,
                                         const CallOptions& opts) {
  struct Count {
    metrics::Gauge* g;
    explicit Count(metrics::Gauge* gauge) : g(gauge) { g->Inc(); }
    ~Count() { g->Dec(); }
  } count(in_flight_);
  return inner_->PullImage(v, request, opts);
}

// ---------------------------------------------------------------------------------------------

void AddUpstreamStateMetric(Registry* registry, std::shared_ptr<RpcChannel> channel) {
  static constexpr const char* kStates[] = {"idle", "connecting", "ready", "transient_failure",
                                            "shutdown"};
  auto& family = registry->AddGauge(
      "registry_proxy_upstream_connection_state",
      "1 for the state the gRPC channel to the upstream CRI (containerd) is in now.", {"state"});
  std::vector<metrics::Gauge*> gauges;
  for (const char* name : kStates) gauges.push_back(&family.With({name}));
  registry->AddScrapeHook([channel = std::move(channel), gauges] {
    const RpcChannel::State now = channel->state();
    const std::string_view name = now == RpcChannel::State::kReady ? "ready"
                                  : now == RpcChannel::State::kTransientFailure
                                      ? "transient_failure"
                                      : "idle";
    for (size_t i = 0; i < gauges.size(); ++i) gauges[i]->Set(kStates[i] == name ? 1 : 0);
  });
}

UpstreamCheck::UpstreamCheck(std::shared_ptr<RpcChannel> channel, std::chrono::milliseconds timeout,
                             std::chrono::milliseconds cache_for)
    : channel_(std::move(channel)), timeout_(timeout), cache_for_(cache_for) {}

Readiness UpstreamCheck::Check() {
  std::lock_guard<std::mutex> lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  if (have_ && now - checked_ < cache_for_) return last_;
  RpcCallOptions call;
  call.deadline = std::chrono::system_clock::now() + timeout_;
  runtime::v1::VersionRequest req;
  runtime::v1::VersionResponse resp;
  const RpcStatus s = channel_->Call("/runtime.v1.RuntimeService/Version", req, &resp, call);
  calls_.fetch_add(1);
  last_.ready = s.ok();
  last_.reason = s.ok() ? "" : "upstream CRI does not answer Version: " + RpcStatusText(s);
  checked_ = std::chrono::steady_clock::now();
  have_ = true;
  return last_;
}

}  // namespace registry_proxy
