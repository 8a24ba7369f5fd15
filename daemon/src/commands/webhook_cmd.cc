// `registry-proxy webhook`: its whole life is the list of steps in CmdWebhook, as for serve.
#include "commands/webhook_cmd.h"

#include <spdlog/spdlog.h>

#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/cli_args.h"
#include "base/sd_notify.h"
#include "base/signals.h"
#include "ops/logging.h"
#include "ops/ops_server.h"
#include "rules/config_store.h"
#include "webhook/webhook_metrics.h"
#include "webhook/webhook_server.h"
#include "webhook/webhook_tls.h"

namespace registry_proxy {
namespace {

constexpr char kWebhookHelp[] =
    R"(Usage: registry-proxy webhook --tls-cert FILE --tls-key FILE [--config FILE]
                              [--tls-secret NAME [--webhook-configuration NAME]
                               [--service NAME] [--namespace NS]]
                              [--listen [HOST]:PORT] [--threads N] [--shutdown-delay SECONDS]
                              [--metrics-address HOST:PORT] [--log-level LEVEL]
                              [--log-format text|json]

The annotating admission webhook. Serves HTTPS (TLS 1.2+): POST /mutate takes an
admission.k8s.io/v1 AdmissionReview for a Pod and answers with a JSON Patch that adds the
annotation registry-proxy.io/images (container name -> the reference the node will pull
first, decided by the same rule engine and config as the node daemon) and
registry-proxy.io/config (the config's sha256). It never changes spec and always allows.
GET /healthz and GET /readyz (ready once a good config is loaded) are for probes.

      --tls-cert FILE   serving certificate (PEM; intermediates may follow the leaf)
      --tls-key FILE    its private key (PEM). Both are re-read when they change (checked at
                        most once a second, on new connections) and on SIGHUP; a bad new
                        pair keeps the old one
      --tls-secret NAME  make and keep the certificate ourselves (in a pod): the CA and the
                        serving certificate live in this Secret of the pod's namespace, shared
                        by every replica (made when empty, renewed 90 days before the serving
                        certificate expires, a new CA a year before the CA does); this
                        replica's pair is written to --tls-cert and --tls-key. Needs get and
                        update on the Secret
      --webhook-configuration NAME
                        with --tls-secret: keep the CA bundle in the caBundle of this
                        MutatingWebhookConfiguration's webhooks that call --service (needs get
                        and patch on it)
      --service NAME    the webhook's Service (default registry-proxy-webhook); the serving
                        certificate names NAME.NS.svc, NAME.NS.svc.cluster.local, NAME.NS, NAME
      --namespace NS    the Secret's and Service's namespace (default: the pod's, from the
                        service account)
      --tls-sync-interval SECONDS
                        how often the Secret and caBundle are checked again (default 600)
      --service-account-dir DIR
                        the pod's service account (token, ca.crt, namespace) for the API
                        server at $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (default
                        /var/run/secrets/kubernetes.io/serviceaccount)
  -c, --config FILE     config file (default /etc/registry-proxy/config.yaml), reloaded when
                        it changes and on SIGHUP; the last good config stays in force
      --listen ADDR     [HOST]:PORT to serve (default :8443, every address); PORT 0 picks one
      --threads N       connection workers (default 32; an open keep-alive connection holds one)
      --shutdown-delay S  on SIGTERM, answer /readyz 503 and keep serving S seconds before
                        stopping, so endpoints drop this replica first (default 0)
      --metrics-address HOST:PORT
                        plain HTTP GET /metrics (Prometheus), /healthz, /readyz (default
                        127.0.0.1:9465; "" turns it off). In a pod, use 0.0.0.0:9465 so
                        Prometheus (and, if wanted, kubelet's probes) can reach it
      --log-level L     trace, debug (one line per review), info (default), warn, error
      --log-format F    text (default) or json (one JSON object per line)
)";

constexpr char kDefaultConfigPath[] = "/etc/registry-proxy/config.yaml";

bool ParseInt(const std::string& s, long lo, long hi, long* v) {
  char* end = nullptr;
  *v = std::strtol(s.c_str(), &end, 10);
  return !s.empty() && *end == '\0' && *v >= lo && *v <= hi;
}

// ":8443" -> ("", 8443); "127.0.0.1:0"; "[::1]:8443" -> ("::1", 8443).
bool ParseListen(const std::string& s, std::string* host, int* port) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos) return false;
  std::string h = s.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  if (h.find_first_of("[]") != std::string::npos) return false;
  long p;
  if (!ParseInt(s.substr(colon + 1), 0, 65535, &p)) return false;
  *host = h;
  *port = static_cast<int>(p);
  return true;
}

constexpr char kServiceAccountDir[] = "/var/run/secrets/kubernetes.io/serviceaccount";

// --tls-secret and its companions; nullopt in *out without --tls-secret. An error message, or
// nullopt when the flags are good.
std::optional<std::string> ParseTlsFlags(const ParsedArgs& args, const WebhookServerOptions& opts,
                                         std::optional<TlsProvisionerOptions>* out,
                                         std::chrono::seconds* interval) {
  const auto secret = args.Get("--tls-secret");
  if (!secret) {
    for (const char* f : {"--webhook-configuration", "--service", "--namespace",
                          "--tls-sync-interval", "--service-account-dir"}) {
      if (args.Has(f)) return std::string(f) + " needs --tls-secret";
    }
    return std::nullopt;
  }
  TlsProvisionerOptions o;
  o.secret = *secret;
  o.service_account_dir = args.Get("--service-account-dir").value_or(kServiceAccountDir);
  o.webhook_config = args.Get("--webhook-configuration").value_or("");
  o.service = args.Get("--service").value_or("registry-proxy-webhook");
  if (auto ns = args.Get("--namespace")) {
    o.ns = *ns;
  } else {
    auto pod_ns = InClusterNamespace(o.service_account_dir);
    if (!pod_ns.ok()) return "--tls-secret: no --namespace and " + pod_ns.error();
    o.ns = *pod_ns;
  }
  if (o.secret.empty() || o.service.empty() || o.ns.empty()) {
    return std::string("--tls-secret, --service and --namespace must not be empty");
  }
  o.policy.dns_names = {o.service + "." + o.ns + ".svc",
                        o.service + "." + o.ns + ".svc.cluster.local", o.service + "." + o.ns,
                        o.service};
  o.cert_file = opts.cert_file;
  o.key_file = opts.key_file;
  if (auto i = args.Get("--tls-sync-interval")) {
    long v;
    if (!ParseInt(*i, 1, 86400, &v))
      return "--tls-sync-interval wants 1..86400 seconds, got '" + *i + "'";
    *interval = std::chrono::seconds(v);
  }
  *out = std::move(o);
  return std::nullopt;
}

// The certificate kept by TlsProvisioner: one sync before serving (retried for up to a minute:
// the API server may be a moment away), then one every interval on a thread of its own.
class TlsKeeper {
 public:
  // Null (and no error) when one of `signals` came first: the caller stops.
  static Result<std::unique_ptr<TlsKeeper>> Start(const TlsProvisionerOptions& options,
                                                  std::chrono::seconds interval,
                                                  SignalWaiter* signals) {
    auto api = InClusterKubeApi(options.service_account_dir);
    if (!api.ok()) return Status::Error("--tls-secret: " + api.error());
    auto keeper =
        std::unique_ptr<TlsKeeper>(new TlsKeeper(std::move(api).value(), options, interval));
    Status last;
    auto delay = std::chrono::seconds(1);
    for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);;) {
      auto r = keeper->provisioner_.Sync(std::chrono::system_clock::now());
      if (r.ok()) break;
      last = r.status();
      if (std::chrono::steady_clock::now() + delay > deadline) return last;
      spdlog::warn("certificate: {}; trying again in {} s", last.message(), delay.count());
      if (int sig = signals->WaitFor(delay)) {
        spdlog::info("signal {} while getting a certificate: stopping", sig);
        return std::unique_ptr<TlsKeeper>();
      }
      delay = std::min(delay * 2, std::chrono::seconds(15));
    }
    keeper->thread_ = std::thread([k = keeper.get()] { k->Run(); });
    return keeper;
  }

  ~TlsKeeper() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  TlsKeeper(std::unique_ptr<KubeApi> api, const TlsProvisionerOptions& options,
            std::chrono::seconds interval)
      : api_(std::move(api)), provisioner_(api_.get(), options), interval_(interval) {}

  void Run() {
    auto wait = interval_;
    std::unique_lock<std::mutex> lock(mu_);
    while (!cv_.wait_for(lock, wait, [this] { return stop_; })) {
      lock.unlock();
      auto r = provisioner_.Sync(std::chrono::system_clock::now());
      lock.lock();
      if (!r.ok()) spdlog::warn("certificate: {}; trying again in 30 s", r.error());
      wait = r.ok() ? interval_ : std::min(interval_, std::chrono::seconds(30));
    }
  }

  std::unique_ptr<KubeApi> api_;
  TlsProvisioner provisioner_;
  const std::chrono::seconds interval_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace

int CmdWebhook(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args = ParseArgs(argv,
                        {{"--config", "-c"},
                         {"--tls-cert", ""},
                         {"--tls-key", ""},
                         {"--tls-secret", ""},
                         {"--webhook-configuration", ""},
                         {"--service", ""},
                         {"--namespace", ""},
                         {"--tls-sync-interval", ""},
                         {"--service-account-dir", ""},
                         {"--listen", ""},
                         {"--threads", ""},
                         {"--shutdown-delay", ""},
                         {"--metrics-address", ""},
                         {"--log-level", ""},
                         {"--log-format", ""},
                         {"--help", "-h", false}},
                        err);
  if (!args) return err << kWebhookHelp, 2;
  if (args->Has("--help")) return out << kWebhookHelp, 0;
  if (!args->positional.empty()) return err << kWebhookHelp, 2;
  WebhookServerOptions opts;
  if (!args->Has("--tls-cert") || !args->Has("--tls-key")) {
    return err << "webhook: --tls-cert and --tls-key are required (HTTPS only)\n", 2;
  }
  opts.cert_file = *args->Get("--tls-cert");
  opts.key_file = *args->Get("--tls-key");
  const std::string listen = args->Get("--listen").value_or(":8443");
  if (!ParseListen(listen, &opts.host, &opts.port)) {
    return err << "--listen wants [HOST]:PORT, e.g. :8443 or 127.0.0.1:8443, got '" << listen
               << "'\n",
           2;
  }
  long v;
  if (auto t = args->Get("--threads")) {
    if (!ParseInt(*t, 1, 1024, &v))
      return err << "--threads wants 1..1024, got '" << *t << "'\n", 2;
    opts.threads = static_cast<int>(v);
  }
  int shutdown_delay_s = 0;
  if (auto d = args->Get("--shutdown-delay")) {
    if (!ParseInt(*d, 0, 600, &v)) {
      return err << "--shutdown-delay wants seconds (0..600), got '" << *d << "'\n", 2;
    }
    shutdown_delay_s = static_cast<int>(v);
  }
  OpsServerOptions ops_options;
  const std::string metrics_address = args->Get("--metrics-address").value_or("127.0.0.1:9465");
  if (!metrics_address.empty()) {
    if (Status s = ParseHostPort(metrics_address, &ops_options.host, &ops_options.port); !s.ok()) {
      return err << "--metrics-address " << s.message() << "\n", 2;
    }
  }
  std::optional<TlsProvisionerOptions> tls_options;
  std::chrono::seconds tls_sync_interval{600};
  if (auto e = ParseTlsFlags(*args, opts, &tls_options, &tls_sync_interval)) {
    return err << *e << "\n", 2;
  }
  LogOptions log_options;
  if (auto e = ParseLogFlags(*args, &log_options)) return err << *e << "\n", 2;
  SetUpLogging(log_options);
  // A client that goes away mid-write (an API server, a prober) costs an EPIPE, never the
  // process.
  std::signal(SIGPIPE, SIG_IGN);

  // 1. Signals are blocked before any thread exists, so only the main thread sees them.
  SignalWaiter signals({SIGHUP, SIGINT, SIGTERM});

  // 2. Config, exactly as the node daemon keeps it: the last good one is always in force;
  // with none, nothing is annotated (and /readyz says why).
  ConfigStore store(args->Get("--config").value_or(kDefaultConfigPath));
  if (store.Reload() == ReloadResult::kRejected) {
    spdlog::error("no usable config at start ({}); annotating nothing until a good one appears",
                  store.path());
  }

  // 3. The certificate, when we keep it ourselves: a usable pair on disk before serving.
  std::unique_ptr<TlsKeeper> tls_keeper;
  if (tls_options) {
    auto keeper = TlsKeeper::Start(*tls_options, tls_sync_interval, &signals);
    if (!keeper.ok()) {
      spdlog::critical("webhook has no certificate to serve: {}", keeper.error());
      return 1;
    }
    if (!*keeper) return 0;  // told to stop before it could serve
    tls_keeper = std::move(keeper).value();
  }

  // 4. Serve. Without a usable certificate there is nothing to serve: exit so it shows.
  metrics::Registry registry;  // see webhook_metrics.h and ops_server.h
  WebhookMetrics webhook_metrics(&registry);
  opts.on_review = [&webhook_metrics](int status, bool patched, std::chrono::nanoseconds d) {
    webhook_metrics.OnReview(status, patched, d);
  };
  WebhookServer server(&store, opts);
  if (Status s = server.Start(); !s.ok()) {
    spdlog::critical("webhook cannot serve: {}", s.message());
    return 1;
  }

  // 5. Follow the config.
  ConfigWatcher watcher(&store, {});
  if (Status s = watcher.Start(); !s.ok()) {
    spdlog::warn("config changes will not be seen until SIGHUP: {}", s.message());
  }
  // Metrics and probes: never a reason not to serve reviews (a taken port is logged).
  AddBuildInfo(&registry);
  AddProcessMetrics(&registry);
  AddConfigMetrics(&registry, &store);
  webhook_metrics.WatchCertificates(&server);
  std::atomic<bool> stopping{false};
  std::unique_ptr<OpsServer> ops;
  if (!metrics_address.empty()) {
    // Ready also means serving TLS: the server started, or we would have exited.
    ops = StartOpsServerOrLog(ops_options, &registry,
                              [&] { return ConfigReadiness(store, stopping.load()); });
  }
  spdlog::info("registry-proxy webhook serving https://{}:{} (config {}, {})",
               opts.host.empty() ? "*" : opts.host, server.port(), store.path(),
               store.HasGoodConfig() ? "loaded" : "none: annotating nothing");
  SdNotify("READY=1\nSTATUS=serving the admission webhook");

  // 6. Run until told to stop; SIGHUP reloads the config and the certificate.
  int sig;
  while ((sig = signals.Wait()) == SIGHUP) {
    spdlog::info("SIGHUP: reloading {} and the serving certificate", store.path());
    watcher.TriggerReload();
    server.ReloadCertificate();
  }
  spdlog::info("{}: stopping{}", sig == SIGTERM ? "SIGTERM" : "SIGINT",
               shutdown_delay_s ? " after " + std::to_string(shutdown_delay_s) + " s" : "");

  // 7. Teardown, in reverse.
  SdNotify("STOPPING=1");
  stopping.store(true);
  server.BeginDrain();
  if (shutdown_delay_s) std::this_thread::sleep_for(std::chrono::seconds(shutdown_delay_s));
  if (ops) ops->Stop();  // its scrape hooks read the server
  server.Stop();
  tls_keeper.reset();
  watcher.Stop();
  spdlog::info("stopped");
  return 0;
}

}  // namespace registry_proxy
