// `registry-proxy serve`: the node daemon. Its whole life is the list of steps in CmdServe.
#include "commands/serve.h"

#include <spdlog/spdlog.h>
#include <stdlib.h>

#include <atomic>
#include <csignal>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "base/cli_args.h"
#include "base/sd_listen.h"
#include "base/sd_notify.h"
#include "base/signals.h"
#include "containerd/upstream_grpc.h"
#include "cri/h2_relay.h"
#include "ops/logging.h"
#include "ops/ops_server.h"
#include "pull/node_metrics.h"
#include "pull/pull_service.h"
#include "rules/config_store.h"

namespace registry_proxy {
namespace {

constexpr char kServeHelp[] =
    R"(Usage: registry-proxy serve [--config FILE] [--listen ENDPOINT] [--upstream ENDPOINT]
                            [--grace SECONDS] [--metrics-address HOST:PORT]
                            [--log-level LEVEL] [--log-format text|json]

Serves the CRI (runtime.v1 and runtime.v1alpha2, ImageService and RuntimeService) on a unix
socket and forwards every call to containerd unchanged, except that PullImage is rewritten to
mirrors as the config says, with fallback to upstream, and the pulled image is then named as
if upstream had served it.

  -c, --config FILE     config file (default /etc/registry-proxy/config.yaml). Missing or
                        bad at start: nothing is rewritten until a good one appears; it is
                        reloaded when it changes and on SIGHUP
      --listen EP       socket to serve (default: node.listen, unix:///run/registry-proxy/registry-proxy.sock)
      --upstream EP     containerd's CRI socket (default: node.upstream, unix:///run/containerd/containerd.sock)
      --grace SECONDS   on SIGTERM/SIGINT, how long in-flight calls may finish (default 10)
      --metrics-address HOST:PORT
                        plain HTTP GET /metrics (Prometheus), /healthz, /readyz (default:
                        node.metricsAddress, 127.0.0.1:9464; "" turns it off)
      --log-level L     trace, debug, info (default), warn, error, critical, off
      --log-format F    text (default) or json (one JSON object per line)

Point kubelet at it with imageServiceEndpoint: unix:///run/registry-proxy/registry-proxy.sock
and crictl with --image-endpoint (or /etc/crictl.yaml image-endpoint).
)";

constexpr char kDefaultConfigPath[] = "/etc/registry-proxy/config.yaml";

// Every finished call, at debug level (the level check comes first: free when off), after
// `next` (the metrics) saw it.
class LogCalls final : public CallObserver {
 public:
  explicit LogCalls(CallObserver* next) : next_(next) {}
  void OnCallDone(std::string_view method, RpcCode code,
                  std::chrono::nanoseconds duration) override {
    next_->OnCallDone(method, code, duration);
    if (!spdlog::should_log(spdlog::level::debug)) return;
    spdlog::debug("call {} code={} {:.3f} ms", method, RpcCodeName(code),
                  std::chrono::duration<double, std::milli>(duration).count());
  }

 private:
  CallObserver* const next_;
};

// The shipped default sends tag pulls of public registries to third-party mirrors, which then
// serve them under upstream's names (SECURITY.md "What a mirror can do"): say so once, with
// where pulls go, when that is the config in force.
void LogWhenBuiltinDefault(const Config& config) {
  if (config.content_sha256 != BuiltinConfig()->content_sha256) return;
  std::string where;
  for (const Rule& r : config.policy->rules()) {
    for (const Mirror& m : r.mirrors)
      where += (where.empty() ? "" : ", ") + r.match + " -> " + m.host;
  }
  spdlog::warn(
      "the config in force ({}) is the built-in default: pulls go to third-party mirrors ({}), "
      "which can serve any content under a tag and are named as upstream's on this node; set "
      "your own mirrors (README.md \"Configuration\", SECURITY.md)",
      config.source, where.empty() ? "none" : where);
}

}  // namespace

int CmdServe(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args = ParseArgs(argv,
                        {{"--config", "-c"},
                         {"--listen", ""},
                         {"--upstream", ""},
                         {"--grace", ""},
                         {"--metrics-address", ""},
                         {"--engine", ""},
                         {"--log-level", ""},
                         {"--log-format", ""},
                         {"--help", "-h", false}},
                        err);
  if (!args) return err << kServeHelp, 2;
  if (args->Has("--help")) return out << kServeHelp, 0;
  if (!args->positional.empty()) return err << kServeHelp, 2;
  int grace_s = 10;
  if (auto g = args->Get("--grace")) {
    char* end = nullptr;
    long v = std::strtol(g->c_str(), &end, 10);
    if (g->empty() || *end || v < 0 || v > 3600) {
      return err << "--grace wants seconds (0..3600), got '" << *g << "'\n", 2;
    }
    grace_s = static_cast<int>(v);
  }
  if (auto a = args->Get("--metrics-address"); a && !a->empty()) {
    std::string host;
    int port;
    if (Status s = ParseHostPort(*a, &host, &port); !s.ok()) {
      return err << "--metrics-address " << s.message() << "\n", 2;
    }
  }
  LogOptions log_options;
  if (auto e = ParseLogFlags(*args, &log_options)) return err << *e << "\n", 2;
  SetUpLogging(log_options);
  // --engine chose between the frame relay and a retired gRPC engine; the relay is the only
  // one now. A unit that still passes the flag must keep the node pulling, so it is only noted.
  if (auto e = args->Get("--engine")) {
    spdlog::warn("--engine {} is ignored: the HTTP/2 frame relay is the only engine", *e);
  }
  // A peer that goes away mid-write (a mirror during a probe, a scraper of /metrics) must cost
  // an EPIPE on that write, never the process.
  std::signal(SIGPIPE, SIG_IGN);

  // 1. Signals are blocked before any thread exists, so only the main thread sees them.
  SignalWaiter signals({SIGHUP, SIGINT, SIGTERM});

  // 2. Config: the last good one is always in force; with none, everything passes through.
  ConfigStore store(args->Get("--config").value_or(kDefaultConfigPath));
  if (store.Reload() == ReloadResult::kRejected) {
    spdlog::error(
        "no usable config at start ({}); forwarding every pull unchanged until a good "
        "config appears",
        store.path());
  }
  LogWhenBuiltinDefault(*store.Current());
  const NodeSettings node = store.Current()->node;  // socket settings are read once
  ProxyOptions popts;
  popts.listen = args->Get("--listen").value_or(node.listen);
  popts.upstream = args->Get("--upstream").value_or(node.upstream);
  // Socket activation (registry-proxy.socket): serve systemd's socket, which outlives us, so
  // connections made while the daemon restarts wait instead of failing.
  if (auto fd = SdListenFd(); !fd.ok()) {
    return err << fd.error() << "\n", 1;
  } else if (*fd >= 0) {
    popts.listen_fd = *fd;
    spdlog::info("socket-activated: serving the socket systemd passed (fd {})", *fd);
  }
  // The sockets are read once. A reload that changes one the config chose (not a flag) says
  // it waits for a restart; a setting a flag overrides does not matter.
  const bool listen_from_config = !args->Has("--listen");
  const bool upstream_from_config = !args->Has("--upstream");
  store.SetListener([&store, node, popts, listen_from_config, upstream_from_config](
                        ReloadResult r, const ReloadStats&) {
    if (r != ReloadResult::kApplied) return;
    const NodeSettings& now = store.Current()->node;
    if ((listen_from_config && now.listen != node.listen) ||
        (upstream_from_config && now.upstream != node.upstream)) {
      spdlog::warn(
          "node.listen/node.upstream changed in the config; they take effect on restart "
          "(serving {} -> {})",
          popts.listen, popts.upstream);
    }
  });

  // 3. Upstream: one channel for forwarding, pulls and image records.
  if (auto up = UnixSocketPath(popts.upstream); !up.ok()) {
    return err << "upstream: " << up.error() << "\n", 1;
  }
  // Our own gRPC client (rpc_channel.h): connects on first use, and again on the first call
  // after containerd went away (no keeper, no back-off: a unix socket connects or fails at once).
  auto containerd = MakeContainerdChannel(popts.upstream, popts.max_message_bytes);
  GrpcCriImageBackend cri(containerd);
  GrpcImageRecordStore records(containerd,
                               [&store] { return store.Current()->node.containerd_namespace; }, {});
  metrics::Registry registry;  // metrics: see node_metrics.h and ops_server.h
  NodeMetrics node_metrics(&registry);
  // Probes and circuit breakers (mirror_health.h); the probe answers no pull waited for (hedging)
  // are counted here, the others by the pull service.
  MirrorHealthChecker::Options health_options;
  health_options.on_unclaimed_probe = [&node_metrics](const std::string& host, const ProbeResult& r,
                                                      std::chrono::nanoseconds took, int change) {
    node_metrics.OnProbe(host, r.alive, took);
    if (change != 0) node_metrics.OnBreaker(host, change > 0);
  };
  MirrorHealthChecker mirror_health(std::move(health_options));
  // The image names in containerd, followed through its events (image_index.h).
  ContainerdImageIndex image_index(containerd,
                                   [&store] { return store.Current()->node.containerd_namespace; });
  image_index.Start();
  PullServiceOptions pull_options;
  pull_options.observer = &node_metrics;
  pull_options.health = &mirror_health;
  pull_options.image_index = &image_index;
  PullService pulls(&store, &cri, &records, pull_options);

  // 4. Serve.
  LogCalls log_calls(&node_metrics);
  InFlightPulls counted_pulls(&pulls, &node_metrics.pulls_in_flight());
  auto proxy = std::make_unique<H2Relay>(popts, &counted_pulls, &log_calls);
  if (Status s = proxy->Start(); !s.ok()) {
    spdlog::critical("cannot serve: {}", s.message());
    return 1;
  }
  // 5. Follow the config.
  ConfigWatcher watcher(&store, {});
  if (Status s = watcher.Start(); !s.ok()) {
    spdlog::warn("config changes will not be seen until SIGHUP: {}", s.message());
  }
  // Then metrics and probes (the address is read once, like the sockets). Never a reason not to
  // serve the CRI: a node must still pull, so a bad or taken address is logged and we go on.
  AddBuildInfo(&registry);
  AddProcessMetrics(&registry);
  AddConfigMetrics(&registry, &store);
  AddUpstreamStateMetric(&registry, containerd);
  UpstreamCheck upstream_check(containerd);
  std::atomic<bool> stopping{false};
  OpsServerOptions ops_options;
  const std::string metrics_address = args->Get("--metrics-address").value_or(node.metrics_address);
  std::unique_ptr<OpsServer> ops;
  if (!metrics_address.empty()) {
    if (Status s = ParseHostPort(metrics_address, &ops_options.host, &ops_options.port); !s.ok()) {
      spdlog::error("metrics address {}; no metrics endpoint", s.message());
    } else {
      ops = StartOpsServerOrLog(ops_options, &registry, [&] {
        Readiness r = ConfigReadiness(store, stopping.load());
        if (!r.ready) return r;
        return upstream_check.Check();
      });
    }
  }
  spdlog::info("registry-proxy serving {} -> {} (config {}, {})", proxy->socket_path(),
               popts.upstream, store.path(),
               store.HasGoodConfig() ? "loaded" : "none: passthrough");
  SdNotify("READY=1\nSTATUS=serving " + proxy->socket_path());

  // 6. Run until told to stop; SIGHUP reloads.
  int sig;
  while ((sig = signals.Wait()) == SIGHUP) {
    spdlog::info("SIGHUP: reloading {}", store.path());
    watcher.TriggerReload();
  }
  spdlog::info("{}: stopping; in-flight calls have {} s", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               grace_s);

  // 7. Teardown, in reverse.
  SdNotify("STOPPING=1");
  stopping.store(true);
  watcher.Stop();
  proxy->Shutdown(std::chrono::seconds(grace_s));
  if (ops) ops->Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace registry_proxy
