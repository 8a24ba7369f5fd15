// Mirror failover times (issue 14 item 5): how long a pull takes when a rule's first mirror is
// broken and the second, a real docker-registry with the image, is fine. Three faults:
//   black hole  listens and accepts, never answers (tests/integration testbed's BlackHole)
//   300 ms      alive but slow: a relay in front of a real registry holding every answer 300 ms
//               (tests/integration/delay_proxy.h); it has the image, so it should serve
//   refused     nothing listens on the port
// plus "none": the good mirror alone, the baseline. Each through the daemon (a fresh
// `registry-proxy serve` per sample with default failover settings, so no probe answer or
// breaker is remembered from an earlier sample: the first pull after the fault) and through
// containerd alone, with the same mirrors in the same order in its hosts.toml (its own mirror
// failover), pulled on containerd's CRI socket. Between samples the image is removed.
//
//   failover_bench [--samples N] [--cap-seconds S] [--smoke] [--daemon PATH]
//                  [--hedge-delay D]   the daemon's node.mirrorHedgeDelay (0: no hedging)
//
// Prints per case and path the median, min and max, what served the pull, the daemon's time
// over the baseline, and the ratio daemon / containerd alone. Bounded: every pull has a deadline
// (the cap; containerd alone never gives up on a black hole, so one capped sample ends its cell),
// --samples per cell (default 5; --smoke: 1). Loopback only. Needs root (the testbed's
// containerd); without it prints why and exits 0, unless RP_REQUIRE_INTEGRATION=1 (exit 3).
// Exit 1 when a pull that should succeed failed.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "delay_proxy.h"
#include "grpc_cri_client.h"
#include "grpc_status.h"
#include "testbed.h"

#ifndef RP_BINARY
#define RP_BINARY "registry-proxy"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using registry_proxy::GrpcCriClient;
using registry_proxy::GrpcStatusText;
using registry_proxy::Status;
using rp_testbed::Process;

constexpr char kRegistry[] = "bench.rp-test";  // the registry the rule (and hosts.toml) mirror
constexpr char kRepo[] = "rp/bench";

struct Options {
  int samples = 5;
  double cap_seconds = 10;
  std::string daemon = RP_BINARY;
  std::string hedge_delay;  // node.mirrorHedgeDelay for the daemon; "" = the default
};

struct Sample {
  double seconds = 0;
  bool ok = false, capped = false;
  std::string served_by, error;
};

struct Cell {
  std::vector<Sample> samples;
  double Median() const {
    std::vector<double> v;
    for (const Sample& s : samples) v.push_back(s.seconds);
    std::sort(v.begin(), v.end());
    return v.empty() ? 0 : v[v.size() / 2];
  }
  double Min() const {
    double m = 1e9;
    for (const Sample& s : samples) m = std::min(m, s.seconds);
    return m;
  }
  double Max() const {
    double m = 0;
    for (const Sample& s : samples) m = std::max(m, s.seconds);
    return m;
  }
  bool AllOk() const {
    for (const Sample& s : samples) {
      if (!s.ok) return false;
    }
    return !samples.empty();
  }
  bool AnyCapped() const {
    for (const Sample& s : samples) {
      if (s.capped) return true;
    }
    return false;
  }
};

std::string HostsToml(const std::vector<std::string>& mirrors) {
  // server: a closed port, so containerd never goes past the mirrors to a real registry.
  std::string t = std::string("server = \"http://") + rp_testbed::kDeadHost + "\"\n";
  for (const std::string& m : mirrors) {
    t += "[host.\"http://" + m + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
  }
  return t;
}

class Bench {
 public:
  Bench(Options o, rp_testbed::Testbed* tb, rp_testbed::Containerd* ctrd,
        std::map<std::string, rp_testbed::Registry*> registries)
      : o_(std::move(o)), tb_(tb), ctrd_(ctrd), registries_(std::move(registries)) {
    dir_ = tb_->dir() + "/failover-bench";
    std::filesystem::create_directories(dir_);
  }

  // The image as the caller names it; removed (every name it may carry) before each sample.
  std::string Image() const { return std::string(kRegistry) + "/" + kRepo + ":latest"; }
  void RemoveImages(const std::vector<std::string>& mirrors) {
    (void)ctrd_->cri().RemoveImage(Image());
    for (const std::string& m : mirrors) {
      (void)ctrd_->cri().RemoveImage(m + "/" + std::string(kRepo) + ":latest");
    }
  }
  // Which registry's access log shows a manifest request since the last reset.
  std::string ServedBy() {
    std::string who;
    for (auto& [name, r] : registries_) {
      if (r->ManifestRequests(kRepo) > 0) who += (who.empty() ? "" : "+") + name;
    }
    return who.empty() ? "-" : who;
  }
  void ResetLogs() {
    for (auto& [name, r] : registries_) r->ResetRequests();
  }

  Sample PullVia(GrpcCriClient& client) {
    runtime::v1::PullImageRequest req;
    req.mutable_image()->set_image(Image());
    req.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
    runtime::v1::PullImageResponse resp;
    const auto cap = std::chrono::milliseconds(static_cast<long>(o_.cap_seconds * 1000));
    const auto t0 = Clock::now();
    grpc::Status s = client.PullImage(req, &resp, cap);
    Sample out;
    out.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    out.ok = s.ok();
    out.capped = s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
    if (!s.ok()) out.error = GrpcStatusText(s);
    return out;
  }

  // containerd alone: hosts.toml lists the mirrors in order.
  Cell Containerd(const std::vector<std::string>& mirrors) {
    Cell c;
    std::filesystem::create_directories(ctrd_->certs_dir() + "/" + kRegistry);
    std::ofstream(ctrd_->certs_dir() + "/" + kRegistry + "/hosts.toml") << HostsToml(mirrors);
    for (int i = 0; i < o_.samples; ++i) {
      RemoveImages(mirrors);
      ResetLogs();
      Sample s = PullVia(ctrd_->cri());
      s.served_by = ServedBy();
      c.samples.push_back(s);
      if (s.capped) break;  // it would only wait out the cap again
    }
    RemoveImages(mirrors);
    return c;
  }

  // Through the daemon: a fresh one per sample, the mirrors in the rule in order.
  Cell Daemon(const std::vector<std::string>& mirrors) {
    Cell c;
    std::filesystem::create_directories(ctrd_->certs_dir() + "/" + kRegistry);
    // containerd's own entry for the registry: dead (the daemon pulls the mirror names).
    std::ofstream(ctrd_->certs_dir() + "/" + kRegistry + "/hosts.toml") << HostsToml({});
    {
      std::ofstream cfg(dir_ + "/config.yaml");
      cfg << "rules:\n  - match: " << kRegistry << "\n    fallback: false\n    mirrors:\n";
      for (const std::string& m : mirrors) cfg << "      - " << m << "\n";
      cfg << "node:\n  metricsAddress: \"\"\n  containerdHostsDir: " << ctrd_->certs_dir() << "\n";
      if (!o_.hedge_delay.empty()) cfg << "  mirrorHedgeDelay: " << o_.hedge_delay << "\n";
    }
    for (int i = 0; i < o_.samples; ++i) {
      RemoveImages(mirrors);
      ResetLogs();
      Process daemon;
      const std::string sock = dir_ + "/rp.sock";
      std::filesystem::remove(sock);
      Status st = daemon.Spawn(
          {o_.daemon, "serve", "--config", dir_ + "/config.yaml", "--listen", "unix://" + sock,
           "--upstream", ctrd_->endpoint(), "--log-level", "info", "--grace", "1"},
          dir_ + "/daemon.log");
      Sample s;
      if (!st.ok()) {
        s.error = st.message();
        c.samples.push_back(s);
        break;
      }
      auto client = GrpcCriClient::Connect("unix://" + sock);
      const bool up = client.ok() && rp_testbed::WaitFor(
                                         [&] {
                                           runtime::v1::VersionResponse v;
                                           return std::filesystem::exists(sock) &&
                                                  (*client)->Version(&v, 1s).ok();
                                         },
                                         15s, 10ms);
      if (!up) {
        s.error = "the daemon did not answer: " + rp_testbed::TailFile(dir_ + "/daemon.log", 10);
        c.samples.push_back(s);
        break;
      }
      s = PullVia(**client);
      s.served_by = ServedBy();
      c.samples.push_back(s);
      daemon.Stop();
      if (s.capped) break;
    }
    RemoveImages(mirrors);
    return c;
  }

 private:
  Options o_;
  rp_testbed::Testbed* tb_;
  rp_testbed::Containerd* ctrd_;
  std::map<std::string, rp_testbed::Registry*> registries_;
  std::string dir_;
};

std::string Cap(const Cell& c, double cap) {
  char b[64];
  if (c.AnyCapped()) {
    std::snprintf(b, sizeof(b), ">= %.1f s (cap)", cap);
  } else {
    std::snprintf(b, sizeof(b), "%.3f s", c.Median());
  }
  return b;
}

std::string Range(const Cell& c) {
  char b[64];
  std::snprintf(b, sizeof(b), "%.3f-%.3f", c.Min(), c.Max());
  return b;
}

int Usage() {
  std::cerr << "usage: failover_bench [--samples N] [--cap-seconds S] [--smoke] [--daemon PATH] "
               "[--hedge-delay D]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
    if (a == "--smoke") {
      o.samples = 1;
      o.cap_seconds = 5;
    } else if (a == "--samples") {
      const char* v = next();
      if (!v || (o.samples = std::atoi(v)) < 1 || o.samples > 100) return Usage();
    } else if (a == "--cap-seconds") {
      const char* v = next();
      if (!v || (o.cap_seconds = std::atof(v)) < 1 || o.cap_seconds > 120) return Usage();
    } else if (a == "--hedge-delay") {
      const char* v = next();
      if (!v) return Usage();
      o.hedge_delay = v;
    } else if (a == "--daemon") {
      const char* v = next();
      if (!v) return Usage();
      o.daemon = v;
    } else {
      return Usage();
    }
  }
  if (std::string why = rp_testbed::SkipReason(); !why.empty()) {
    const bool required = rp_testbed::IntegrationRequired();
    std::cerr << "failover_bench: " << (required ? "cannot run: " : "skipped: ") << why << "\n";
    return required ? 3 : 0;
  }
  const auto run_start = Clock::now();

  // --- the testbed: containerd, the good second mirror, the slow mirror's registry ----------
  auto tb_r = rp_testbed::Testbed::Create();
  if (!tb_r.ok()) return std::cerr << "testbed: " << tb_r.error() << "\n", 3;
  auto tb = std::move(tb_r).value();
  auto good = tb->AddRegistry("mirror2");
  auto slow_backend = tb->AddRegistry("slow");
  if (!good.ok() || !slow_backend.ok()) return std::cerr << "registries failed to start\n", 3;
  for (auto* r : {*good, *slow_backend}) {
    auto d = tb->PushTestImage(r, kRepo);
    if (!d.ok()) return std::cerr << "push: " << d.error() << "\n", 3;
  }
  auto ctrd_r = tb->StartContainerd();
  if (!ctrd_r.ok()) return std::cerr << "containerd: " << ctrd_r.error() << "\n", 3;
  rp_testbed::Containerd* ctrd = *ctrd_r;

  // --- the faults ------------------------------------------------------------------------------
  auto hole = tb->AddBlackHole();
  if (!hole.ok()) return std::cerr << "black hole: " << hole.error() << "\n", 3;
  rp_testbed::DelayProxy slow((*slow_backend)->host(), 300ms);
  if (Status s = slow.Start(); !s.ok())
    return std::cerr << "delay proxy: " << s.message() << "\n", 3;
  auto refused_port = rp_testbed::PickFreePort();
  if (!refused_port.ok()) return std::cerr << "port: " << refused_port.error() << "\n", 3;
  const std::string refused = "127.0.0.1:" + std::to_string(*refused_port);
  const std::string m2 = (*good)->host();

  Bench bench(o, tb.get(), ctrd, {{"mirror2", *good}, {"slow", *slow_backend}});
  // A first pull warms containerd up (its first pull after start is slower); not counted.
  {
    Options warm = o;
    warm.samples = 1;
    Bench(warm, tb.get(), ctrd, {{"mirror2", *good}}).Containerd({m2});
  }

  struct Case {
    std::string name;
    std::vector<std::string> mirrors;
    bool expect_ok;
  };
  const std::vector<Case> cases = {
      {"none (mirror2 alone)", {m2}, true},
      {"black hole", {(*hole)->host(), m2}, true},
      {"answers after 300 ms", {slow.host(), m2}, true},
      {"refused", {refused, m2}, true},
  };
  struct Row {
    Cell daemon, alone;
  };
  std::vector<Row> rows;
  bool failed = false;
  for (const Case& c : cases) {
    Row r;
    r.daemon = bench.Daemon(c.mirrors);
    r.alone = bench.Containerd(c.mirrors);
    if (c.expect_ok && !r.daemon.AllOk()) {
      failed = true;
      for (const Sample& s : r.daemon.samples) {
        if (!s.ok) std::cerr << "daemon, " << c.name << ": " << s.error << "\n";
      }
    }
    rows.push_back(r);
  }

  // --- the table -------------------------------------------------------------------------------
  const double base = rows[0].daemon.Median();
  std::printf(
      "\nfailover_bench: first mirror broken, second (%s) a docker-registry with the image;\n"
      "%d sample(s) per cell, fresh daemon per sample (mirrorProbeTimeout 2s, mirrorHedgeDelay\n"
      "%s), containerd alone with the same mirrors in hosts.toml;\n"
      "median (min-max) seconds of one PullImage, busybox test image, loopback\n\n",
      m2.c_str(), o.samples, o.hedge_delay.empty() ? "400ms" : o.hedge_delay.c_str());
  std::printf("%-22s | %-16s %-13s %-8s %-9s | %-18s %-13s %-8s | %s\n", "first mirror", "daemon",
              "(min-max)", "served", "over base", "containerd alone", "(min-max)", "served",
              "daemon/alone");
  std::printf("%s\n", std::string(132, '-').c_str());
  for (size_t i = 0; i < cases.size(); ++i) {
    const Row& r = rows[i];
    const Sample& ld = r.daemon.samples.back();
    const Sample& la = r.alone.samples.back();
    char over[32], ratio[32];
    std::snprintf(over, sizeof(over), "%+.3f s", r.daemon.Median() - base);
    if (r.alone.AnyCapped()) {
      std::snprintf(ratio, sizeof(ratio), "<= %.2f", r.daemon.Median() / o.cap_seconds);
    } else {
      std::snprintf(ratio, sizeof(ratio), "%.2f", r.daemon.Median() / r.alone.Median());
    }
    std::printf("%-22s | %-16s %-13s %-8s %-9s | %-18s %-13s %-8s | %s\n", cases[i].name.c_str(),
                Cap(r.daemon, o.cap_seconds).c_str(), Range(r.daemon).c_str(),
                (ld.ok ? ld.served_by : "FAILED").c_str(), over,
                Cap(r.alone, o.cap_seconds).c_str(), Range(r.alone).c_str(),
                (la.ok       ? la.served_by
                 : la.capped ? "(capped)"
                             : "FAILED")
                    .c_str(),
                ratio);
  }
  std::printf(
      "\n\"over base\": the daemon's median minus its own median with mirror2 alone "
      "(the failover's cost).\n");
  std::printf("failover_bench: %.1f s in all\n",
              std::chrono::duration<double>(Clock::now() - run_start).count());
  return failed ? 1 : 0;
}
