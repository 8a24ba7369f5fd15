// Load benchmark of the CRI hop (issue #7): the same workload, in interleaved rounds, against
//   (a) direct  - containerd's socket,
//   (b) daemon  - `registry-proxy serve` in front of the same containerd,
//   (c) socat   - `socat UNIX-LISTEN:...,fork UNIX-CONNECT:...` in front of it (a byte relay),
// all started here on a private testbed (tests/integration/testbed.h: containerd, an
// "upstream" registry served as docker.io and a "mirror" registry, on loopback). Per target it
// prints calls/s, p50/p90/p99/max, the ratios to (a), and the CPU per call of the process in
// front (utime+stime from /proc/PID/stat over its rounds, socat's per-connection children
// included), and containerd's and this client's CPU per call (a hop changes how well they
// batch, and on two cores their CPU is the throughput); the daemon's RSS idle and at peak; and
// the daemon's CPU ticks and per-thread context switches over ~3 s idle (which thread wakes).
//
// The client is one completion-queue thread with `c` unary calls outstanding (generic stub,
// requests serialized once), one channel (one connection) per target for the whole run, as
// kubelet has. Rounds go a b c a b c ..., so a neighbour's compile slows every target alike;
// the ratios are the meaningful numbers.
//
//   cri_load [--smoke] [--rounds N] [--round-seconds S] [--max-calls N] [--concurrency 1,16,64]
//            [--pulls N] [--daemon PATH] [--max-seconds S] [--only Version,ListImages-10,...]
//            [--baseline PATH]   a second daemon binary, as target "base" (before/after)
//            [--daemon-args "ARGS"] extra serve flags for "daemon"
//            [--baseline-args "ARGS"]  extra serve flags for "base"
//            [--wrap "CMD ARGS"] run the daemon under CMD (e.g. valgrind --tool=callgrind)
//
// Bounded: every round stops after --round-seconds or --max-calls, every call has a deadline,
// and the whole run stops adding cells after --max-seconds. Loopback and unix sockets only.
// Needs root (the testbed's containerd). Exit status: 0 when every call succeeded, 1 when any
// failed (the smoke mode is a working proof, not a speed test), 2 on bad arguments, 3 when the
// testbed cannot run. Without root or socat it prints why and exits 0, like the integration
// tests skip, unless RP_REQUIRE_INTEGRATION=1.
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "containerd/upstream_grpc.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.pb.h"
#include "testbed.h"

#ifndef RP_BINARY
#define RP_BINARY "registry-proxy"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;
using registry_proxy::Status;
using rp_testbed::Process;

struct Options {
  bool smoke = false;
  int rounds = 3;
  double round_seconds = 1.0;
  long max_calls = 200000;
  std::vector<int> concurrency = {1, 16, 64};
  int pulls = 3;  // per target per round
  std::string daemon = RP_BINARY;
  std::string baseline;  // a second registry-proxy binary to compare with (before/after)
  std::vector<std::string> baseline_args;  // extra serve flags for it
  std::vector<std::string> daemon_args;    // extra serve flags for the daemon
  std::vector<std::string> wrap;  // a command the daemon runs under (valgrind --tool=callgrind)
  double max_seconds = 280;
  std::vector<std::string> only;  // workload names to run (prefixes); empty = all
};

bool Selected(const Options& o, const std::string& name) {
  if (o.only.empty()) return true;
  for (const auto& p : o.only) {
    if (name.rfind(p, 0) == 0) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// /proc

// utime+stime of pid, plus those of its children (socat forks one per connection), in ticks.
long long CpuTicks(pid_t pid, bool with_children) {
  auto one = [](pid_t p) -> long long {
    std::ifstream f("/proc/" + std::to_string(p) + "/stat");
    std::string s((std::istreambuf_iterator<char>(f)), {});
    auto close = s.rfind(')');
    if (close == std::string::npos) return 0;
    std::istringstream rest(s.substr(close + 2));
    std::string field;
    long long utime = 0, stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
      if (i == 14) utime = std::stoll(field);
      if (i == 15) stime = std::stoll(field);
    }
    return utime + stime;
  };
  long long total = one(pid);
  if (with_children) {
    std::ifstream c("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
    pid_t child;
    while (c >> child) total += one(child);
  }
  return total;
}

// A /proc/PID/status field in KiB (VmRSS, VmHWM), -1 if unreadable.
long StatusKiB(pid_t pid, const std::string& key) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0)
      return std::strtol(line.c_str() + key.size() + 1, nullptr, 10);
  }
  return -1;
}

// Per thread: name and context switches so far (each is a wake-up or a preemption).
std::map<std::string, std::pair<std::string, long>> ThreadWakeups(pid_t pid) {
  std::map<std::string, std::pair<std::string, long>> out;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream f(e.path() / "status");
    std::string line, name;
    long switches = 0;
    while (std::getline(f, line)) {
      if (line.rfind("Name:", 0) == 0) name = line.substr(line.find_first_not_of(" \t", 5));
      if (line.find("ctxt_switches:") != std::string::npos) {
        switches += std::strtol(line.c_str() + line.find(':') + 1, nullptr, 10);
      }
    }
    out[e.path().filename().string()] = {name, switches};
  }
  return out;
}

std::vector<pid_t> Children(pid_t pid) {
  std::vector<pid_t> out;
  std::ifstream c("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  pid_t child;
  while (c >> child) out.push_back(child);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The client

struct Target {
  std::string name;
  std::string endpoint;
  pid_t pid = 0;  // the process in front of containerd (0 for direct)
  bool children = false;
  bool rewrites = false;  // a registry-proxy: pulls go to it by the name it rewrites
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::GenericStub> stub;
};

struct Workload {
  std::string name;
  std::string method;
  std::string request;  // serialized
  std::chrono::milliseconds deadline = 30s;
};

struct RoundResult {
  long calls = 0;
  long errors = 0;
  double seconds = 0;
  std::vector<double> latencies_us;
  std::string first_error;
  size_t response_bytes = 0;
};

// Keeps `conc` calls outstanding on one completion-queue thread until `seconds` or `max_calls`.
RoundResult RunRound(Target& t, const Workload& w, int conc, double seconds, long max_calls) {
  struct Slot {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::GenericClientAsyncResponseReader> rpc;
    grpc::ByteBuffer response;
    grpc::Status status;
    Clock::time_point start;
  };
  RoundResult r;
  grpc::CompletionQueue cq;
  grpc::Slice slice(w.request);
  const grpc::ByteBuffer request(&slice, 1);
  const auto t0 = Clock::now();
  const auto stop =
      t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  long started = 0;
  int outstanding = 0;
  auto start_one = [&] {
    auto* s = new Slot;
    s->ctx.set_deadline(std::chrono::system_clock::now() + w.deadline);
    s->start = Clock::now();
    s->rpc = t.stub->PrepareUnaryCall(&s->ctx, w.method, request, &cq);
    s->rpc->StartCall();
    s->rpc->Finish(&s->response, &s->status, s);
    ++started;
    ++outstanding;
  };
  for (int i = 0; i < conc && started < max_calls; ++i) start_one();
  void* tag;
  bool ok;
  while (outstanding > 0 && cq.Next(&tag, &ok)) {
    std::unique_ptr<Slot> s(static_cast<Slot*>(tag));
    --outstanding;
    const auto now = Clock::now();
    ++r.calls;
    r.latencies_us.push_back(std::chrono::duration<double, std::micro>(now - s->start).count());
    if (!ok || !s->status.ok()) {
      ++r.errors;
      if (r.first_error.empty()) {
        r.first_error = std::to_string(s->status.error_code()) + " " + s->status.error_message();
      }
    } else {
      r.response_bytes = s->response.Length();
    }
    if (now < stop && started < max_calls) start_one();
  }
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return r;
}

double Pct(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  size_t i = static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return v[std::min(i, v.size() - 1)];
}

struct Cell {
  long calls = 0, errors = 0;
  double seconds = 0;
  long long ticks = 0, ctrd_ticks = 0, self_ticks = 0;
  std::vector<double> lat;
  std::string first_error;
  size_t response_bytes = 0;
};

bool g_failed = false;
pid_t g_containerd = 0;  // its CPU per call is printed too: the hop changes everyone's cost

// Runs one (workload, concurrency) cell: warm-up, then rounds a b c a b c ..., then one line
// per target.
void RunCell(std::vector<Target*>& targets, const Workload& w, int conc, const Options& o,
             double round_seconds, long max_calls) {
  for (Target* t : targets) RunRound(*t, w, conc, std::min(0.1, round_seconds), 20);  // warm-up
  std::vector<Cell> cells(targets.size());
  for (int round = 0; round < o.rounds; ++round) {
    for (size_t i = 0; i < targets.size(); ++i) {
      Target& t = *targets[i];
      long long before = t.pid ? CpuTicks(t.pid, t.children) : 0;
      long long ctrd_before = CpuTicks(g_containerd, false),
                self_before = CpuTicks(getpid(), false);
      RoundResult r = RunRound(t, w, conc, round_seconds, max_calls);
      long long after = t.pid ? CpuTicks(t.pid, t.children) : 0;
      Cell& c = cells[i];
      c.ctrd_ticks += CpuTicks(g_containerd, false) - ctrd_before;
      c.self_ticks += CpuTicks(getpid(), false) - self_before;
      c.calls += r.calls;
      c.errors += r.errors;
      c.seconds += r.seconds;
      c.ticks += after - before;
      c.lat.insert(c.lat.end(), r.latencies_us.begin(), r.latencies_us.end());
      if (c.first_error.empty()) c.first_error = r.first_error;
      if (r.response_bytes) c.response_bytes = r.response_bytes;
    }
  }
  const double tick_us = 1e6 / static_cast<double>(sysconf(_SC_CLK_TCK));
  double direct_rate = 0, direct_p50 = 0, direct_p99 = 0;
  for (size_t i = 0; i < targets.size(); ++i) {
    Cell& c = cells[i];
    std::sort(c.lat.begin(), c.lat.end());
    double rate = c.seconds > 0 ? static_cast<double>(c.calls) / c.seconds : 0;
    double p50 = Pct(c.lat, 0.5), p90 = Pct(c.lat, 0.9), p99 = Pct(c.lat, 0.99);
    double mx = c.lat.empty() ? 0 : c.lat.back();
    if (i == 0) direct_rate = rate, direct_p50 = p50, direct_p99 = p99;
    char cpu[32] = "-";
    auto per_call = [&](long long ticks) {
      return c.calls ? static_cast<double>(ticks) * tick_us / static_cast<double>(c.calls) : 0.0;
    };
    if (targets[i]->pid && c.calls > 0) std::snprintf(cpu, sizeof cpu, "%.1f", per_call(c.ticks));
    char ratio[64] = "";
    if (i > 0 && direct_rate > 0) {
      std::snprintf(ratio, sizeof ratio, "%5.2f %+7.0f %+7.0f", rate / direct_rate,
                    p50 - direct_p50, p99 - direct_p99);
    } else {
      std::snprintf(ratio, sizeof ratio, "%5s %7s %7s", "1", "", "");
    }
    std::printf("%-16s %3d %-7s %9.0f %s %7.0f %7.0f %7.0f %8.0f %8s %6.0f %6.0f %7zu %ld%s%s\n",
                w.name.c_str(), conc, targets[i]->name.c_str(), rate, ratio, p50, p90, p99, mx, cpu,
                per_call(c.ctrd_ticks), per_call(c.self_ticks), c.response_bytes, c.errors,
                c.errors ? " first: " : "", c.first_error.c_str());
    if (c.errors) g_failed = true;
  }
  std::fflush(stdout);
}

void PrintHeader() {
  std::printf("%-16s %3s %-7s %9s %5s %7s %7s %7s %7s %7s %8s %8s %6s %6s %7s %s\n", "workload",
              "c", "target", "calls/s", "ratio", "+p50", "+p99", "p50", "p90", "p99", "max", "hop",
              "ctrd", "client", "resp_B", "errors");
  std::printf("%-16s %3s %-7s %9s %5s %7s %7s %7s %7s %7s %8s %8s %6s %6s\n", "", "", "", "",
              "vs a", "us", "us", "us", "us", "us", "us", "cpu/call", "cpu/c", "cpu/c");
}

bool WaitAnswers(Target& t, std::chrono::seconds timeout) {
  runtime::v1::VersionRequest vr;
  Workload w{"version", "/runtime.v1.RuntimeService/Version", vr.SerializeAsString(), 1s};
  auto until = Clock::now() + timeout;
  while (Clock::now() < until) {
    if (RunRound(t, w, 1, 0, 1).errors == 0) return true;
    std::this_thread::sleep_for(50ms);
  }
  return false;
}

std::vector<int> ParseList(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    int v = std::atoi(item.c_str());
    if (v < 1 || v > 1024) return {};
    out.push_back(v);
  }
  return out;
}

int Usage(const std::string& why) {
  std::cerr
      << "cri_load: " << why
      << "\nusage: cri_load [--smoke] [--rounds N] [--round-seconds S] [--max-calls N]\n"
         "                [--concurrency 1,16,64] [--pulls N] [--daemon PATH] "
         "[--max-seconds S]\n                [--baseline PATH] [--baseline-args \"ARGS\"]\n        "
         "        [--daemon-args \"ARGS\"] [--wrap "
         "\"CMD ARGS\"]\n             "
         "   [--only WORKLOAD,...]  (Version, ImageStatus-hit, "
         "ImageStatus-miss, ImageStatus-miss-rewritten, pump-ctrdVersion,\n                "
         "ListImages-10, ListImages-500, "
         "PullImage; a prefix selects several)\n";
  return 2;
}

std::string StatusText(const grpc::Status& s) {
  return std::to_string(s.error_code()) +
         (s.error_message().empty() ? "" : " " + s.error_message());
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines show as they come, also into a file
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--smoke") {
      o.smoke = true;
      o.rounds = 1;
      o.round_seconds = 0.2;
      o.max_calls = 50;
      o.concurrency = {1, 4};
      o.pulls = 1;
    } else if (a == "--rounds") {
      o.rounds = std::atoi(next().c_str());
      if (o.rounds < 1 || o.rounds > 50) return Usage("--rounds wants 1..50");
    } else if (a == "--round-seconds") {
      o.round_seconds = std::atof(next().c_str());
      if (o.round_seconds <= 0 || o.round_seconds > 30)
        return Usage("--round-seconds wants (0, 30]");
    } else if (a == "--max-calls") {
      o.max_calls = std::atol(next().c_str());
      if (o.max_calls < 1 || o.max_calls > 10000000) return Usage("--max-calls wants 1..1e7");
    } else if (a == "--concurrency") {
      o.concurrency = ParseList(next());
      if (o.concurrency.empty()) return Usage("--concurrency wants a list like 1,16,64 (1..1024)");
    } else if (a == "--pulls") {
      o.pulls = std::atoi(next().c_str());
      if (o.pulls < 0 || o.pulls > 100) return Usage("--pulls wants 0..100");
    } else if (a == "--only") {
      std::stringstream ss(next());
      for (std::string item; std::getline(ss, item, ',');) o.only.push_back(item);
      if (o.only.empty()) return Usage("--only wants workload names, e.g. Version,ImageStatus");
    } else if (a == "--daemon-args") {
      std::istringstream words(next());
      for (std::string w; words >> w;) o.daemon_args.push_back(w);
    } else if (a == "--baseline-args") {
      std::istringstream words(next());
      for (std::string w; words >> w;) o.baseline_args.push_back(w);
    } else if (a == "--baseline") {
      o.baseline = next();
      if (access(o.baseline.c_str(), X_OK) != 0) return Usage("--baseline: no program there");
    } else if (a == "--wrap") {
      std::stringstream ss(next());
      for (std::string w; ss >> w;) o.wrap.push_back(w);
    } else if (a == "--daemon") {
      o.daemon = next();
    } else if (a == "--max-seconds") {
      o.max_seconds = std::atof(next().c_str());
      if (o.max_seconds <= 0 || o.max_seconds > 3600) return Usage("--max-seconds wants (0, 3600]");
    } else {
      return Usage("unknown argument '" + a + "'");
    }
  }
  // Like the integration tests: skipped with the reason, unless RP_REQUIRE_INTEGRATION=1.
  std::string why = rp_testbed::SkipReason();
  if (why.empty() && access("/usr/bin/socat", X_OK) != 0) {
    why = "socat is not installed (scripts/deps.sh installs it)";
  }
  if (!why.empty()) {
    std::cerr << "cri_load: " << (rp_testbed::IntegrationRequired() ? "cannot run: " : "skipped: ")
              << why << "\n";
    return rp_testbed::IntegrationRequired() ? 3 : 0;
  }
  const auto run_start = Clock::now();

  // --- the testbed: containerd, docker.io = "upstream", and a mirror --------------------------
  auto tb_r = rp_testbed::Testbed::Create();
  if (!tb_r.ok()) return std::cerr << "testbed: " << tb_r.error() << "\n", 3;
  auto tb = std::move(tb_r).value();
  auto up = tb->AddRegistry("upstream");
  auto mirror = tb->AddRegistry("mirror");
  if (!up.ok() || !mirror.ok()) return std::cerr << "registries failed to start\n", 3;
  const std::string repo = "rp/bench";
  for (auto* r : {*up, *mirror}) {
    auto d = tb->PushTestImage(r, repo);
    if (!d.ok()) return std::cerr << "push: " << d.error() << "\n", 3;
  }
  rp_testbed::ContainerdOptions copts;
  copts.host_map["docker.io"] = (*up)->host();
  auto ctrd_r = tb->StartContainerd(copts);
  if (!ctrd_r.ok()) return std::cerr << "containerd: " << ctrd_r.error() << "\n", 3;
  rp_testbed::Containerd* ctrd = *ctrd_r;
  g_containerd = ctrd->pid();
  const std::string mirror_ref = (*mirror)->host() + "/" + repo + ":latest";
  const std::string docker_ref = "docker.io/" + repo + ":latest";
  {
    runtime::v1::PullImageRequest pr;
    pr.mutable_image()->set_image(mirror_ref);
    runtime::v1::PullImageResponse resp;
    grpc::Status s = ctrd->cri().PullImage(pr, &resp, 120s);
    if (!s.ok()) return std::cerr << "pull " << mirror_ref << ": " << StatusText(s) << "\n", 3;
  }

  // --- the daemon and socat -------------------------------------------------------------------
  const std::string dir = tb->dir() + "/bench";
  std::filesystem::create_directories(dir);
  {
    std::ofstream cfg(dir + "/config.yaml");
    cfg << "rules:\n  - match: docker.io\n    mirrors:\n      - " << (*mirror)->host() << "\n";
  }
  Process daemon, base, socat;
  const std::string daemon_sock = dir + "/rp.sock", socat_sock = dir + "/socat.sock";
  const std::string base_sock = dir + "/rp-base.sock";
  for (auto [proc, bin, sock, log] : {std::tuple{&daemon, o.daemon, daemon_sock, "/daemon.log"},
                                      std::tuple{&base, o.baseline, base_sock, "/base.log"}}) {
    if (bin.empty()) continue;
    std::vector<std::string> argv;
    if (proc == &daemon) argv = o.wrap;
    for (const std::string& a :
         {bin, std::string("serve"), std::string("--config"), dir + "/config.yaml",
          std::string("--listen"), "unix://" + sock, std::string("--upstream"), ctrd->endpoint(),
          std::string("--log-level"), std::string("info"), std::string("--grace"),
          std::string("1")}) {
      argv.push_back(a);
    }
    if (proc == &base) argv.insert(argv.end(), o.baseline_args.begin(), o.baseline_args.end());
    if (proc == &daemon) argv.insert(argv.end(), o.daemon_args.begin(), o.daemon_args.end());
    if (Status s = proc->Spawn(argv, dir + log); !s.ok()) {
      return std::cerr << bin << ": " << s.message() << "\n", 3;
    }
  }
  if (Status s = socat.Spawn({"socat", "UNIX-LISTEN:" + socat_sock + ",fork,unlink-early",
                              "UNIX-CONNECT:" + ctrd->socket_path()},
                             dir + "/socat.log");
      !s.ok()) {
    return std::cerr << "socat: " << s.message() << "\n", 3;
  }
  rp_testbed::WaitFor(
      [&] {
        return std::filesystem::exists(daemon_sock) && std::filesystem::exists(socat_sock) &&
               (o.baseline.empty() || std::filesystem::exists(base_sock));
      },
      15s, 10ms);
  grpc::ChannelArguments cargs;
  cargs.SetMaxReceiveMessageSize(64 << 20);
  auto make_target = [&](const std::string& name, const std::string& path, pid_t pid,
                         bool children) {
    auto t = std::make_unique<Target>();
    t->name = name;
    t->endpoint = "unix://" + path;
    t->pid = pid;
    t->children = children;
    t->channel = grpc::CreateCustomChannel(t->endpoint, grpc::InsecureChannelCredentials(), cargs);
    t->stub = std::make_unique<grpc::GenericStub>(t->channel);
    return t;
  };
  auto direct = make_target("direct", ctrd->socket_path(), 0, false);
  auto proxied = make_target("daemon", daemon_sock, daemon.pid(), false);
  auto relayed = make_target("socat", socat_sock, socat.pid(), true);
  proxied->rewrites = true;
  std::vector<Target*> targets = {direct.get(), proxied.get()};
  std::unique_ptr<Target> baseline;
  if (!o.baseline.empty()) {
    baseline = make_target("base", base_sock, base.pid(), false);
    baseline->rewrites = true;
    targets.push_back(baseline.get());
  }
  targets.push_back(relayed.get());
  for (Target* t : targets) {
    if (!WaitAnswers(*t, o.wrap.empty() ? 15s : 120s)) {
      std::cerr << t->name << " does not answer Version\n"
                << rp_testbed::TailFile(dir + "/daemon.log");
      return 3;
    }
  }

  // --- facts ----------------------------------------------------------------------------------
  std::printf("== cri_load: containerd %s (pid %d), registry-proxy pid %d, socat pid %d\n",
              ctrd->endpoint().c_str(), ctrd->pid(), daemon.pid(), socat.pid());
  if (!o.baseline.empty()) {
    std::string extra;
    for (const auto& a : o.baseline_args) extra += " " + a;
    std::printf("   base = %s%s (pid %d), daemon = %s\n", o.baseline.c_str(), extra.c_str(),
                base.pid(), o.daemon.c_str());
  }
  std::printf(
      "   %d round(s) of %.2f s (at most %ld calls) per target per cell, interleaved a b c; "
      "latencies in us\n",
      o.rounds, o.round_seconds, o.max_calls);
  auto idle_ticks = [&](const char* when) {
    long long before = CpuTicks(daemon.pid(), false);
    auto wakeups_before = ThreadWakeups(daemon.pid());
    std::this_thread::sleep_for(3s);
    long long ticks = CpuTicks(daemon.pid(), false) - before;
    std::string woke;
    for (const auto& [tid, w] : ThreadWakeups(daemon.pid())) {
      auto it = wakeups_before.find(tid);
      long delta = w.second - (it == wakeups_before.end() ? 0 : it->second.second);
      if (delta > 0) woke += " " + w.first + "/" + tid + "=" + std::to_string(delta);
    }
    std::printf(
        "-- idle check (%s): daemon CPU over 3 s idle = %lld tick(s) %s; threads that ran:%s\n",
        when, ticks, ticks == 0 ? "(zero: ok)" : "(NOT ZERO)",
        woke.empty() ? " none" : woke.c_str());
  };
  std::this_thread::sleep_for(1s);
  const long idle_rss = StatusKiB(daemon.pid(), "VmRSS");
  std::printf("-- daemon RSS idle after start: %.1f MiB\n", static_cast<double>(idle_rss) / 1024);
  if (!o.smoke) idle_ticks("after start");

  // GetContainerEvents (server streaming in runtime.v1): does this containerd have it?
  for (Target* t : {direct.get(), proxied.get()}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + 500ms);
    grpc::CompletionQueue cq;
    auto call = t->stub->PrepareCall(&ctx, "/runtime.v1.RuntimeService/GetContainerEvents", &cq);
    void* tag;
    bool ok;
    call->StartCall(reinterpret_cast<void*>(1));
    cq.Next(&tag, &ok);
    grpc::Slice empty("");
    grpc::ByteBuffer req(&empty, 1);
    call->WriteLast(req, grpc::WriteOptions(), reinterpret_cast<void*>(2));
    cq.Next(&tag, &ok);
    grpc::Status st;
    call->Finish(&st, reinterpret_cast<void*>(3));
    while (cq.Next(&tag, &ok) && tag != reinterpret_cast<void*>(3)) {
    }
    if (st.error_code() == grpc::StatusCode::UNIMPLEMENTED) {
      // containerd 1.6 (Debian 12's) has no container events; 1.7 has. Not an error.
      std::printf("-- GetContainerEvents via %s: not in this containerd (fine: 1.6 lacks it)\n",
                  t->name.c_str());
    } else {
      std::printf("-- GetContainerEvents via %s: %s\n", t->name.c_str(), StatusText(st).c_str());
    }
    cq.Shutdown();
    while (cq.Next(&tag, &ok)) {
    }
  }

  // --- workloads ------------------------------------------------------------------------------
  std::vector<Workload> workloads;
  {
    runtime::v1::VersionRequest v;
    workloads.push_back({"Version", "/runtime.v1.RuntimeService/Version", v.SerializeAsString()});
    runtime::v1::ImageStatusRequest hit;
    hit.mutable_image()->set_image(mirror_ref);
    workloads.push_back(
        {"ImageStatus-hit", "/runtime.v1.ImageService/ImageStatus", hit.SerializeAsString()});
    runtime::v1::ImageStatusRequest miss;
    miss.mutable_image()->set_image("bench.local/absent:latest");  // no rule: forwarded only
    workloads.push_back(
        {"ImageStatus-miss", "/runtime.v1.ImageService/ImageStatus", miss.SerializeAsString()});
    // What kubelet asks before every first pull: a name a rule rewrites, not on the node. The
    // daemon answers it from its image index (no mirror copy either), as a hit.
    runtime::v1::ImageStatusRequest miss_rw;
    miss_rw.mutable_image()->set_image("docker.io/rp/absent:latest");
    workloads.push_back({"ImageStatus-miss-rewritten", "/runtime.v1.ImageService/ImageStatus",
                         miss_rw.SerializeAsString()});
    // containerd's own Version service on the same socket: a method the daemon does not know,
    // so it takes the generic streaming pump (StartCall, Read/Write both ways, Finish).
    workloads.push_back(
        {"pump-ctrdVersion", "/containerd.services.version.v1.Version/Version", ""});
  }
  runtime::v1::ListImagesRequest list_req;
  const Workload list{"ListImages", "/runtime.v1.ImageService/ListImages",
                      list_req.SerializeAsString()};

  if (o.smoke) {
    std::printf(
        "-- smoke run: a few calls per cell, to prove that every path works; the numbers and\n"
        "   ratios below are noise, not a measurement (the full run: ninja bench-cri, "
        "BENCHMARKS.md)\n");
  }
  PrintHeader();
  bool out_of_time = false;
  auto time_left = [&] {
    if (std::chrono::duration<double>(Clock::now() - run_start).count() < o.max_seconds) {
      return true;
    }
    if (!out_of_time) std::printf("-- --max-seconds reached: remaining cells skipped\n");
    out_of_time = true;
    return false;
  };
  long peak_rss = 0;
  auto sample_rss = [&] { peak_rss = std::max(peak_rss, StatusKiB(daemon.pid(), "VmRSS")); };
  for (const Workload& w : workloads) {
    if (!Selected(o, w.name)) continue;
    for (int c : o.concurrency) {
      if (!time_left()) break;
      RunCell(targets, w, c, o, o.round_seconds, o.max_calls);
      sample_rss();
    }
  }

  // ListImages with 10 and 500 images: records in containerd's Images API pointing at the
  // pulled image's target (no pulls). containerd's CRI lists one image per image id, so these
  // show as repo tags of one image: the response grows with the names, ~45 bytes each.
  registry_proxy::GrpcImageRecordStore records(
      registry_proxy::MakeContainerdChannel(ctrd->endpoint(), 64 << 20), "k8s.io");
  registry_proxy::ImageRecord record0;
  if (registry_proxy::RpcStatus s = records.Get(mirror_ref, &record0);
      !s.ok() && Selected(o, "ListImages")) {
    std::cerr << "image record " << mirror_ref << ": " << registry_proxy::RpcStatusText(s) << "\n";
    return 1;
  }
  int have = 1;
  for (int want : {10, 500}) {
    if (!Selected(o, "ListImages-" + std::to_string(want))) continue;
    for (; have < want; ++have) {
      registry_proxy::ImageRecord r = record0;
      char name[64];
      std::snprintf(name, sizeof name, "bench.local/list/img-%03d:latest", have);
      r.name = name;
      if (registry_proxy::RpcStatus s = records.Put(r); !s.ok()) {
        std::cerr << "image record " << name << ": " << registry_proxy::RpcStatusText(s) << "\n";
        return 1;
      }
    }
    // The CRI plugin learns of new records from containerd's events: wait until it lists them.
    rp_testbed::WaitFor(
        [&] {
          runtime::v1::ListImagesResponse lr;
          if (!ctrd->cri().ListImages(&lr).ok()) return false;
          int names = 0;
          for (const auto& img : lr.images()) names += img.repo_tags_size();
          return names >= want;
        },
        10s, 50ms);
    Workload w = list;
    w.name = "ListImages-" + std::to_string(want);
    for (int c : o.concurrency) {
      if (!time_left()) break;
      RunCell(targets, w, c, o, o.round_seconds, o.max_calls);
      sample_rss();
    }
  }

  // --- PullImage of a present image, by a name the daemon rewrites ----------------------------
  // (a) and (c) pull the mirror's name (what containerd is asked for once the daemon has
  // rewritten docker.io/rp/bench to the mirror); (b) pulls docker.io/rp/bench, rewritten.
  if (o.pulls > 0 && Selected(o, "PullImage") && time_left()) {
    runtime::v1::PullImageRequest pr;
    pr.mutable_image()->set_image(mirror_ref);
    pr.mutable_sandbox_config()->mutable_metadata()->set_namespace_("default");
    pr.mutable_sandbox_config()->mutable_metadata()->set_name("bench");
    pr.mutable_sandbox_config()->mutable_metadata()->set_uid("bench-uid");
    Workload direct_pull{"PullImage", "/runtime.v1.ImageService/PullImage", pr.SerializeAsString(),
                         120s};
    pr.mutable_image()->set_image(docker_ref);
    Workload rewritten_pull = direct_pull;
    rewritten_pull.request = pr.SerializeAsString();
    // Per target its own request: the daemon gets the docker.io name.
    std::vector<Cell> cells(targets.size());
    for (Target* t : targets)
      RunRound(*t, t->rewrites ? rewritten_pull : direct_pull, 1, 60,
               1);  // the first rewritten pull names the image
    for (int round = 0; round < o.rounds; ++round) {
      for (size_t i = 0; i < targets.size(); ++i) {
        Target& t = *targets[i];
        long long before = t.pid ? CpuTicks(t.pid, t.children) : 0;
        RoundResult r = RunRound(t, t.rewrites ? rewritten_pull : direct_pull, 1, 60, o.pulls);
        cells[i].ticks += (t.pid ? CpuTicks(t.pid, t.children) : 0) - before;
        cells[i].calls += r.calls;
        cells[i].errors += r.errors;
        cells[i].seconds += r.seconds;
        cells[i].lat.insert(cells[i].lat.end(), r.latencies_us.begin(), r.latencies_us.end());
        if (cells[i].first_error.empty()) cells[i].first_error = r.first_error;
      }
    }
    std::printf(
        "-- PullImage of a present image (c=1; daemon: %s rewritten to %s; direct and "
        "socat: %s)\n",
        docker_ref.c_str(), mirror_ref.c_str(), mirror_ref.c_str());
    double direct_p50 = 0;
    const double tick_us = 1e6 / static_cast<double>(sysconf(_SC_CLK_TCK));
    for (size_t i = 0; i < targets.size(); ++i) {
      Cell& c = cells[i];
      std::sort(c.lat.begin(), c.lat.end());
      double p50 = Pct(c.lat, 0.5);
      if (i == 0) direct_p50 = p50;
      char cpu[32] = "-";
      if (targets[i]->pid && c.calls > 0) {
        std::snprintf(cpu, sizeof cpu, "%.0f us",
                      static_cast<double>(c.ticks) * tick_us / static_cast<double>(c.calls));
      }
      std::printf(
          "   %-7s pulls %ld  p50 %.2f ms  max %.2f ms  (%+.2f ms vs direct)  cpu/pull %s  "
          "errors %ld %s\n",
          targets[i]->name.c_str(), c.calls, p50 / 1000, c.lat.empty() ? 0 : c.lat.back() / 1000,
          (p50 - direct_p50) / 1000, cpu, c.errors, c.first_error.c_str());
      if (c.errors) g_failed = true;
    }
    // The split: the daemon logs how long containerd took for each attempt ("pull IMAGE:
    // attempt 1/2 MIRROR_IMAGE (mirror) ... 5ms: OK"); the rest of a pull is the daemon's
    // (decision, naming the image under its original name, waiting until CRI shows it).
    std::ifstream log(dir + "/daemon.log");
    std::vector<double> attempt_ms;
    const std::string marker = "pull " + docker_ref + ": attempt 1/";
    for (std::string line; std::getline(log, line);) {
      auto at = line.find(marker);
      auto ms = line.rfind("ms: OK");
      if (at == std::string::npos || ms == std::string::npos) continue;
      auto sp = line.rfind(' ', ms);
      attempt_ms.push_back(std::atof(line.c_str() + sp + 1));
    }
    // The first is the warm-up pull (not in the latencies above).
    if (!attempt_ms.empty()) attempt_ms.erase(attempt_ms.begin());
    std::sort(attempt_ms.begin(), attempt_ms.end());
    if (!attempt_ms.empty()) {
      double total = Pct(cells[1].lat, 0.5) / 1000, ctrd_ms = Pct(attempt_ms, 0.5);
      std::printf(
          "   split of the daemon's pull (p50, %zu pulls, ms resolution): containerd pulling the "
          "mirror name %.0f ms, the rest (decision, naming, waiting for CRI to show the name) "
          "%.1f ms, of %.1f ms\n",
          attempt_ms.size(), ctrd_ms, total - ctrd_ms, total);
    }
  }

  sample_rss();
  std::printf(
      "-- daemon RSS: idle after start %.1f MiB, highest sampled %.1f MiB, VmHWM %.1f MiB; "
      "now %.1f MiB, of which anonymous %.1f MiB, file-backed %.1f MiB\n",
      static_cast<double>(idle_rss) / 1024, static_cast<double>(peak_rss) / 1024,
      static_cast<double>(StatusKiB(daemon.pid(), "VmHWM")) / 1024,
      static_cast<double>(StatusKiB(daemon.pid(), "VmRSS")) / 1024,
      static_cast<double>(StatusKiB(daemon.pid(), "RssAnon")) / 1024,
      static_cast<double>(StatusKiB(daemon.pid(), "RssFile")) / 1024);
  std::this_thread::sleep_for(1s);
  idle_ticks("after load");

  // --- teardown: channels first (socat's children end with their connections) ----------------
  for (Target* t : targets) {
    t->stub.reset();
    t->channel.reset();
  }
  std::vector<pid_t> socat_children = Children(socat.pid());
  socat.Stop();
  for (pid_t p : socat_children) kill(p, SIGTERM);
  if (!daemon.Stop()) std::printf("-- daemon needed SIGKILL to stop\n");
  base.Stop();
  std::printf("== cri_load done in %.0f s: %s\n",
              std::chrono::duration<double>(Clock::now() - run_start).count(),
              g_failed  ? "SOME CALLS FAILED"
              : o.smoke ? "every call succeeded (smoke run: it works; no numbers to read)"
                        : "every call succeeded");
  return g_failed ? 1 : 0;
}
