#include "webhook/webhook_metrics.h"

namespace registry_proxy {

WebhookMetrics::WebhookMetrics(metrics::Registry* registry)
    : registry_(registry),
      reviews_(registry->AddCounter(
          "registry_proxy_webhook_reviews_total",
          "AdmissionReviews answered, by result: patched, unpatched (allowed without a patch), "
          "rejected (4xx: the request was not a usable review).",
          {"result"})),
      patched_(reviews_.With({"patched"})),
      unpatched_(reviews_.With({"unpatched"})),
      rejected_(reviews_.With({"rejected"})),
      seconds_(registry
                   ->AddHistogram("registry_proxy_webhook_review_duration_seconds",
                                  "Time to answer one AdmissionReview (all results).", {},
                                  {0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                   0.025, 0.05, 0.1, 0.25, 0.5, 1})
                   .Get()),
      cert_reloads_(registry->AddCounter(
          "registry_proxy_webhook_certificate_reloads_total",
          "Serving certificate loads (at start, on change, on SIGHUP), by result: success, "
          "failure (the previous certificate stays in force).",
          {"result"})) {}

void WebhookMetrics::OnReview(int http_status, bool patched, std::chrono::nanoseconds duration) {
  if (http_status != 200) {
    rejected_.Inc();
  } else if (patched) {
    patched_.Inc();
  } else {
    unpatched_.Inc();
  }
  seconds_.Observe(std::chrono::duration<double>(duration).count());
}

void WebhookMetrics::WatchCertificates(const WebhookServer* server) {
  metrics::Counter& ok = cert_reloads_.With({"success"});
  metrics::Counter& failed = cert_reloads_.With({"failure"});
  registry_->AddScrapeHook([server, &ok, &failed] {
    ok.Set(double(server->certificate_loads()));
    failed.Set(double(server->certificate_load_failures()));
  });
}

}  // namespace registry_proxy
