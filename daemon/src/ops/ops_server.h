// The operations endpoint of `serve` and `webhook`: plain HTTP on host:port (loopback by
// default), for Prometheus and probes.
//
//   GET /metrics  the registry in the Prometheus text format 0.0.4
//   GET /healthz  200 "ok" while the process serves
//   GET /readyz   200 "ok" when the readiness check passes, else 503 with its reason
//
// Bounded: a fixed pool of `threads` workers (2 by default) and at most `queue` accepted
// connections waiting for one; beyond that the accept loop waits (new connections then queue
// in the kernel's backlog) instead of starting threads. Every read and write has a timeout,
// keep-alive connections are closed after `keep_alive_timeout`, request bodies are refused over
// `max_body_bytes` (no route takes a body), and headers are capped by cpp-httplib (8 KiB).
// Only GET (and HEAD) are served; everything else is 404/405 with a one-line reason.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "base/status.h"
#include "ops/metrics.h"
#include "rules/config_store.h"

namespace registry_proxy {

struct Readiness {
  bool ready = false;
  std::string reason;  // why not ready ("" when ready)
};

struct OpsServerOptions {
  std::string host = "127.0.0.1";  // "0.0.0.0" or "::" for every address
  int port = 9464;                 // 0 = any free port (tests); see OpsServer::port()
  int threads = 2;
  size_t queue = 16;
  std::chrono::seconds read_timeout{5};
  std::chrono::seconds write_timeout{5};
  std::chrono::seconds keep_alive_timeout{5};
  size_t max_body_bytes = 1024;
};

// "127.0.0.1:9464", "0.0.0.0:9465", "[::1]:9464", "localhost:9464" -> host and port (0..65535).
// The host is required (no implicit "every address"). Error text names the bad part.
Status ParseHostPort(std::string_view address, std::string* host, int* port);

// What both commands export besides their own metrics:
// registry_proxy_build_info{version} (always 1);
// process_resident_memory_bytes, process_open_fds, process_threads, process_cpu_seconds_total,
// process_start_time_seconds (read from /proc/self at scrape time);
// registry_proxy_config_reloads_total{result} (applied, unchanged, rejected; the load at start
// included), registry_proxy_config_generation (0 = no good config ever loaded),
// registry_proxy_config_applied_timestamp_seconds, registry_proxy_config_last_reload_success
// (0 after a rejected file until a good one is read): from `store`'s counters at scrape time.
void AddBuildInfo(metrics::Registry* registry);
void AddProcessMetrics(metrics::Registry* registry);
void AddConfigMetrics(metrics::Registry* registry, const ConfigStore* store);

// What both commands' /readyz require first: not stopping, and a good config loaded.
Readiness ConfigReadiness(const ConfigStore& store, bool stopping);

class OpsServer;
// Starts an OpsServer on `options`; on failure logs why and returns null (metrics are never a
// reason not to serve).
std::unique_ptr<OpsServer> StartOpsServerOrLog(const OpsServerOptions& options,
                                               const metrics::Registry* registry,
                                               std::function<Readiness()> ready);

class OpsServer {
 public:
  // `registry` must outlive the server. `ready` is called on a worker thread for every
  // /readyz (it should be cheap or cache its answer); null means always ready.
  OpsServer(OpsServerOptions options, const metrics::Registry* registry,
            std::function<Readiness()> ready);
  ~OpsServer();  // Stop()s
  OpsServer(const OpsServer&) = delete;
  OpsServer& operator=(const OpsServer&) = delete;

  // Binds and starts serving; an error says which address could not be bound and why.
  Status Start();
  int port() const;  // the bound port, after Start()
  // Stops accepting, finishes the requests in progress (bounded by the timeouts), joins.
  // Idempotent.
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace registry_proxy
