#include "ops/ops_server.h"

#include <dirent.h>
#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "version.h"

namespace registry_proxy {
namespace {

// A fixed set of workers and a bounded queue: enqueue() (called by httplib's accept loop, one
// accepted connection per call) waits while the queue is full, so a flood of connections
// neither starts threads nor piles up sockets in user space.
class BoundedPool final : public httplib::TaskQueue {
 public:
  BoundedPool(size_t threads, size_t max_queued) : max_queued_(max_queued) {
    for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { Work(); });
  }
  ~BoundedPool() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::unique_lock<std::mutex> lock(mu_);
    space_.wait(lock, [&] { return jobs_.size() < max_queued_ || done_; });
    jobs_.push_back(std::move(fn));
    work_.notify_one();
  }

  // Runs what was queued, then joins (httplib calls it when the accept loop ends).
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      done_ = true;
    }
    work_.notify_all();
    space_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void Work() {
    for (;;) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(lock, [&] { return !jobs_.empty() || done_; });
        if (jobs_.empty()) return;  // done_ and drained
        fn = std::move(jobs_.front());
        jobs_.pop_front();
        space_.notify_one();
      }
      fn();
    }
  }

  const size_t max_queued_;
  std::mutex mu_;
  std::condition_variable work_, space_;
  std::deque<std::function<void()>> jobs_;  // guarded by mu_
  bool done_ = false;                       // guarded by mu_
  std::vector<std::thread> workers_;
};

void Text(httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  res.set_content(message + "\n", "text/plain; charset=utf-8");
}

// Fields of /proc/self/stat after the command name (which may hold spaces and parentheses):
// fields[0] is field 3 (state).
std::vector<std::string> ProcSelfStat() {
  std::ifstream in("/proc/self/stat");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> fields;
  const size_t close = all.rfind(')');
  if (close == std::string::npos) return fields;
  std::istringstream rest(all.substr(close + 1));
  for (std::string f; rest >> f;) fields.push_back(f);
  return fields;
}

double OpenFds() {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  double n = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] != '.') ++n;
  }
  closedir(d);
  return n - 1;  // the directory stream's own fd
}

double BootTimeSeconds() {
  std::ifstream in("/proc/stat");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("btime ", 0) == 0) return std::stod(line.substr(6));
  }
  return 0;
}

}  // namespace

void AddBuildInfo(metrics::Registry* registry) {
  registry
      ->AddGauge("registry_proxy_build_info", "Always 1; the version is in the label.", {"version"})
      .With({REGISTRY_PROXY_VERSION})
      .Set(1);
}

void AddProcessMetrics(metrics::Registry* registry) {
  auto& rss =
      registry->AddGauge("process_resident_memory_bytes", "Resident memory size in bytes.").Get();
  auto& fds = registry->AddGauge("process_open_fds", "Number of open file descriptors.").Get();
  auto& threads = registry->AddGauge("process_threads", "Number of OS threads.").Get();
  auto& cpu = registry
                  ->AddCounter("process_cpu_seconds_total",
                               "Total user and system CPU time spent in seconds.")
                  .Get();
  auto& start = registry
                    ->AddGauge("process_start_time_seconds",
                               "Start time of the process since unix epoch in seconds.")
                    .Get();
  const double ticks = double(sysconf(_SC_CLK_TCK));
  const double page = double(sysconf(_SC_PAGESIZE));
  const double boot = BootTimeSeconds();
  registry->AddScrapeHook([&rss, &fds, &threads, &cpu, &start, ticks, page, boot] {
    const std::vector<std::string> f = ProcSelfStat();
    // stat(5): utime 14, stime 15, num_threads 20, starttime 22, rss 24 (fields[n - 3]).
    if (f.size() > 21) {
      cpu.Set((std::stod(f[11]) + std::stod(f[12])) / ticks);
      threads.Set(std::stod(f[17]));
      start.Set(boot + std::stod(f[19]) / ticks);
      rss.Set(std::stod(f[21]) * page);
    }
    fds.Set(OpenFds());
  });
}

void AddConfigMetrics(metrics::Registry* registry, const ConfigStore* store) {
  auto& reloads = registry->AddCounter(
      "registry_proxy_config_reloads_total",
      "Config loads by result: applied (a new config is in force), unchanged (same bytes), "
      "rejected (bad or unreadable file; the previous config stays).",
      {"result"});
  auto& applied = reloads.With({"applied"});
  auto& unchanged = reloads.With({"unchanged"});
  auto& rejected = reloads.With({"rejected"});
  auto& generation = registry
                         ->AddGauge("registry_proxy_config_generation",
                                    "Bumps with every applied config; 0 = none was ever loaded "
                                    "(everything passes through unchanged).")
                         .Get();
  auto& applied_at = registry
                         ->AddGauge("registry_proxy_config_applied_timestamp_seconds",
                                    "When the config in force was applied (unix time); 0 = never.")
                         .Get();
  auto& success = registry
                      ->AddGauge("registry_proxy_config_last_reload_success",
                                 "1 if the last config load succeeded (applied or unchanged), 0 "
                                 "if the file was rejected.")
                      .Get();
  registry->AddScrapeHook(
      [store, &applied, &unchanged, &rejected, &generation, &applied_at, &success] {
        const ReloadStats s = store->Stats();
        applied.Set(double(s.applied));
        unchanged.Set(double(s.unchanged));
        rejected.Set(double(s.rejected));
        generation.Set(double(s.generation));
        applied_at.Set(double(s.applied_unix_ms) / 1000.0);
        success.Set(s.last_error.empty() && (s.applied + s.unchanged + s.rejected) > 0 ? 1 : 0);
      });
}

Status ParseHostPort(std::string_view address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos) {
    return Status::Error("'" + std::string(address) + "': want HOST:PORT, e.g. 127.0.0.1:9464");
  }
  std::string h(address.substr(0, colon));
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  if (h.empty() || h.find_first_of("[]") != std::string::npos ||
      (h.find(':') != std::string::npos && address.front() != '[')) {
    return Status::Error("'" + std::string(address) +
                         "': bad host (want 127.0.0.1, 0.0.0.0, [::1], a name)");
  }
  const std::string_view p = address.substr(colon + 1);
  int v = 0;
  if (p.empty() || p.size() > 5) {
    return Status::Error("'" + std::string(address) + "': bad port (want 0..65535)");
  }
  for (char c : p) {
    if (c < '0' || c > '9') {
      return Status::Error("'" + std::string(address) + "': bad port (want 0..65535)");
    }
    v = v * 10 + (c - '0');
  }
  if (v > 65535) return Status::Error("'" + std::string(address) + "': bad port (want 0..65535)");
  *host = std::move(h);
  *port = v;
  return Status::Ok();
}

struct OpsServer::Impl {
  OpsServerOptions options;
  const metrics::Registry* registry;
  std::function<Readiness()> ready;
  std::unique_ptr<httplib::Server> server;
  std::thread thread;
  int port = -1;
  std::atomic<bool> stopped{false};
  std::atomic<bool> listen_returned{false};
};

OpsServer::OpsServer(OpsServerOptions options, const metrics::Registry* registry,
                     std::function<Readiness()> ready)
    : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  impl_->registry = registry;
  impl_->ready = std::move(ready);
}

OpsServer::~OpsServer() { Stop(); }

Status OpsServer::Start() {
  Impl& m = *impl_;
  if (m.server) return Status::Error("already started");
  m.server = std::make_unique<httplib::Server>();
  httplib::Server& s = *m.server;
  const size_t threads = size_t(std::max(1, m.options.threads));
  const size_t queue = std::max<size_t>(1, m.options.queue);
  s.new_task_queue = [threads, queue] { return new BoundedPool(threads, queue); };
  s.set_read_timeout(m.options.read_timeout);
  s.set_write_timeout(m.options.write_timeout);
  s.set_keep_alive_timeout(m.options.keep_alive_timeout.count());
  s.set_payload_max_length(m.options.max_body_bytes);
  // httplib's default sets SO_REUSEPORT: a second daemon would then share the port and answer
  // every other scrape. SO_REUSEADDR only (a restart may rebind while old connections linger).
  s.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });

  s.Get("/metrics", [&m](const httplib::Request&, httplib::Response& res) {
    res.status = 200;
    res.set_content(m.registry->Render(), metrics::Registry::kContentType);
  });
  s.Get("/healthz", [](const httplib::Request&, httplib::Response& res) { Text(res, 200, "ok"); });
  s.Get("/readyz", [&m](const httplib::Request&, httplib::Response& res) {
    if (!m.ready) return Text(res, 200, "ok");
    Readiness r = m.ready();
    if (r.ready) return Text(res, 200, "ok");
    Text(res, 503, r.reason.empty() ? "not ready" : r.reason);
  });
  s.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    switch (res.status) {
      case 404:
        if (req.path == "/metrics" || req.path == "/healthz" || req.path == "/readyz") {
          return Text(res, 405, "method " + req.method + " not allowed on " + req.path);
        }
        return Text(res, 404, "not found: GET /metrics, /healthz, /readyz");
      case 413:
        return Text(res, 413, "request body too large");
      default:
        return Text(res, res.status, "bad request");
    }
  });

  if (m.options.port == 0) {
    m.port = s.bind_to_any_port(m.options.host);
  } else {
    m.port = s.bind_to_port(m.options.host, m.options.port) ? m.options.port : -1;
  }
  if (m.port <= 0) {
    const int e = errno;
    return Status::Error("cannot listen on " + m.options.host + ":" +
                         std::to_string(m.options.port) + ": " +
                         (e ? std::strerror(e) : "bind failed"));
  }
  m.thread = std::thread([&m] {
    if (!m.server->listen_after_bind() && !m.stopped.load()) {
      spdlog::error("ops endpoint {}:{}: the listening socket failed", m.options.host, m.port);
    }
    m.listen_returned.store(true);
  });
  return Status::Ok();
}

int OpsServer::port() const { return impl_->port; }

void OpsServer::Stop() {
  Impl& m = *impl_;
  if (!m.server || m.stopped.exchange(true)) return;
  if (!m.thread.joinable()) return;  // Start() failed before listening
  // httplib's stop() does nothing until the accept loop runs: wait for it to start (or end).
  while (!m.server->is_running() && !m.listen_returned.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  m.server->stop();
  if (m.thread.joinable()) m.thread.join();
}

}  // namespace registry_proxy

namespace registry_proxy {

Readiness ConfigReadiness(const ConfigStore& store, bool stopping) {
  if (stopping) return {false, "shutting down"};
  if (!store.HasGoodConfig()) {
    return {false, "no good config loaded from " + store.path() + ": " + store.Stats().last_error};
  }
  return {true, ""};
}

std::unique_ptr<OpsServer> StartOpsServerOrLog(const OpsServerOptions& options,
                                               const metrics::Registry* registry,
                                               std::function<Readiness()> ready) {
  auto ops = std::make_unique<OpsServer>(options, registry, std::move(ready));
  if (Status s = ops->Start(); !s.ok()) {
    spdlog::error("no metrics endpoint: {}", s.message());
    return nullptr;
  }
  spdlog::info("metrics and probes on http://{}:{} (/metrics, /healthz, /readyz)", options.host,
               ops->port());
  return ops;
}

}  // namespace registry_proxy
