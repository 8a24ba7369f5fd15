// The webhook's own metrics (prefix registry_proxy_webhook_); the ops endpoint serves them with
// the common ones (ops_server.h: build, process, config reloads).
//
//   webhook_reviews_total{result}            POST /mutate answers: patched, unpatched (allowed
//                                            without a patch), rejected (4xx: bad input)
//   webhook_review_duration_seconds          time to answer one review
//   webhook_certificate_reloads_total{result} serving certificate loads: success, failure
#pragma once

#include <chrono>

#include "ops/metrics.h"
#include "webhook/webhook_server.h"

namespace registry_proxy {

class WebhookMetrics {
 public:
  explicit WebhookMetrics(metrics::Registry* registry);
  // WebhookServerOptions::on_review. Thread-safe, no allocation.
  void OnReview(int http_status, bool patched, std::chrono::nanoseconds duration);
  // Reads the server's certificate load counters at scrape time. `server` must outlive the
  // registry's scrapes (stop the ops endpoint first).
  void WatchCertificates(const WebhookServer* server);

 private:
  metrics::Registry* registry_;
  metrics::CounterFamily& reviews_;
  metrics::Counter &patched_, &unpatched_, &rejected_;
  metrics::Histogram& seconds_;
  metrics::CounterFamily& cert_reloads_;
};

}  // namespace registry_proxy
