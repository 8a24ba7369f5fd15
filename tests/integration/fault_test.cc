// Faults with real processes: containerd killed and restarted under load, the daemon restarted
// under load, the config file broken in every way a node can break it, SIGTERM while pulls are in
// flight (one held by a hung mirror), and hostile clients of the admission webhook (TLS garbage,
// slowloris, oversized bodies). Each test says what must hold: the daemon stays up, clients see
// errors only while something is really down and never hang, the last good config stays in
// force, and resources (fds, threads, RSS from /proc) come back.
//
// The shim tests use the shared fixture (ShimTest, shim_fixture.h): one testbed (containerd and
// three registries) for the binary, one daemon per test. The webhook tests need no containerd.
// Where metrics would make an assertion nicer (upstream errors, reloads rejected), the tests read
// the daemon's log and /proc instead, so they do not depend on a metrics endpoint.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <iostream>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "grpc_cri_client.h"
#include "shim_fixture.h"
#include "testbed.h"

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using registry_proxy::GrpcCodeName;
using registry_proxy::GrpcCriClient;
using registry_proxy::GrpcStatusText;
using ::testing::HasSubstr;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Time bounds stretch under the sanitizers (the daemon is built with the same one): TSan slows
// gRPC several times over, ASan about twice.
#if defined(__SANITIZE_THREAD__)
constexpr double kScale = 4;
#elif defined(__SANITIZE_ADDRESS__)
constexpr double kScale = 2;
#else
constexpr double kScale = 1;
#endif
constexpr double Bound(double ms) { return ms * kScale; }

double MsSince(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool InPath(const std::string& name) {
  std::stringstream path(getenv("PATH") ? getenv("PATH") : "");
  std::string dir;
  while (std::getline(path, dir, ':')) {
    if (access((fs::path(dir) / name).c_str(), X_OK) == 0) return true;
  }
  return false;
}

// `s` as a regular expression that matches exactly it.
std::string RegexQuote(const std::string& s) {
  static const std::regex kSpecial(R"([.^$|()\[\]{}*+?\\])");
  return std::regex_replace(s, kSpecial, R"(\$&)");
}

// ---------------------------------------------------------------------------------------------
// What /proc says about a process.

int CountEntries(const std::string& dir) {
  std::error_code ec;
  int n = 0;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) ++n;
  return ec ? -1 : n;
}
int CountFds(pid_t pid) { return CountEntries("/proc/" + std::to_string(pid) + "/fd"); }
int CountThreads(pid_t pid) { return CountEntries("/proc/" + std::to_string(pid) + "/task"); }
// VmRSS in KiB (-1 if unreadable).
long RssKb(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

struct Resources {
  int fds = 0, threads = 0;
  long rss_kb = 0;
  std::string Text() const {
    return "fds=" + std::to_string(fds) + " threads=" + std::to_string(threads) +
           " rss=" + std::to_string(rss_kb / 1024) + "MiB";
  }
};
Resources ResourcesOf(pid_t pid) { return {CountFds(pid), CountThreads(pid), RssKb(pid)}; }

// What each fd of a process is ("socket:[123]", "anon_inode:[eventfd]", a path), sorted.
std::multiset<std::string> FdTargets(pid_t pid) {
  std::multiset<std::string> out;
  std::error_code ec;
  for (fs::directory_iterator it("/proc/" + std::to_string(pid) + "/fd", ec), end; !ec && it != end;
       it.increment(ec)) {
    std::string t = fs::read_symlink(it->path(), ec).string();
    if (t.rfind("socket:", 0) == 0) t = "socket";  // inode numbers differ across reconnects
    out.insert(t);
  }
  return out;
}

// "+socket -anon_inode:[eventfd]": how two fd sets differ.
std::string FdDiff(const std::multiset<std::string>& before,
                   const std::multiset<std::string>& after) {
  std::vector<std::string> plus, minus;
  std::set_difference(after.begin(), after.end(), before.begin(), before.end(),
                      std::back_inserter(plus));
  std::set_difference(before.begin(), before.end(), after.begin(), after.end(),
                      std::back_inserter(minus));
  std::string out;
  for (auto& p : plus) out += " +" + p;
  for (auto& m : minus) out += " -" + m;
  return out.empty() ? " (same)" : out;
}

// Waits (up to `timeout`) until fds and threads are back within `tolerance` of `base`; returns
// the last reading.
Resources Settle(pid_t pid, const Resources& base, int fd_tolerance, int thread_tolerance,
                 std::chrono::milliseconds timeout) {
  Resources now;
  WaitFor(
      [&] {
        now = ResourcesOf(pid);
        return now.fds <= base.fds + fd_tolerance && now.threads <= base.threads + thread_tolerance;
      },
      timeout, 200ms);
  return now;
}

// ---------------------------------------------------------------------------------------------
// A bounded steady load of cheap CRI calls (Version, ImageStatus of a present image) through one
// endpoint, from `threads` threads, each with its own client (its own connection). Every call
// is recorded with its start and end (ms since the load began) and status.

struct Call {
  double start_ms = 0, end_ms = 0;
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;
  std::string method;
};

class Load {
 public:
  Load(const std::string& endpoint, int threads, std::string image,
       std::chrono::milliseconds call_timeout = std::chrono::milliseconds(int(Bound(2000))))
      : t0_(Clock::now()) {
    for (int i = 0; i < threads; ++i) {
      auto c = GrpcCriClient::Connect(endpoint);
      if (!c.ok()) continue;
      threads_.emplace_back([this, client = std::shared_ptr<GrpcCriClient>(std::move(c).value()),
                             image, call_timeout, i] {
        for (int n = 0; !stop_.load(); ++n) {
          Call call;
          call.start_ms = MsSince(t0_);
          grpc::Status s;
          if ((n + i) % 2 == 0) {
            runtime::v1::VersionResponse v;
            call.method = "Version";
            s = client->Version(&v, call_timeout);
          } else {
            runtime::v1::ImageStatusResponse r;
            call.method = "ImageStatus";
            s = client->ImageStatus(image, false, &r, call_timeout);
            if (s.ok() && !r.has_image()) {
              s = grpc::Status(grpc::StatusCode::NOT_FOUND, "(test) present image not found");
            }
          }
          call.end_ms = MsSince(t0_);
          call.code = s.error_code();
          call.message = s.error_message();
          {
            std::lock_guard lock(mu_);
            calls_.push_back(std::move(call));
          }
          std::this_thread::sleep_for(5ms);  // steady, not flat out: 2 shared cores
        }
      });
    }
  }
  ~Load() { Stop(); }

  double Now() const { return MsSince(t0_); }
  void Stop() {
    stop_ = true;
    for (auto& t : threads_) {
      if (t.joinable()) t.join();
    }
  }
  std::vector<Call> calls() {
    std::lock_guard lock(mu_);
    return calls_;
  }
  size_t started_threads() const { return threads_.size(); }

 private:
  Clock::time_point t0_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::vector<Call> calls_;
};

// "UNAVAILABLE: <message> x12" per distinct (code, message), for the report and failures.
std::string ErrorSummary(const std::vector<Call>& calls) {
  std::map<std::string, int> n;
  for (const Call& c : calls) {
    if (c.code != grpc::StatusCode::OK) {
      n[std::string(GrpcCodeName(c.code)) + ": " + c.message.substr(0, 160)]++;
    }
  }
  std::string out;
  for (auto& [k, v] : n) out += "    " + k + "  x" + std::to_string(v) + "\n";
  return out.empty() ? "    (none)\n" : out;
}

// The load-time checks shared by the two restart tests: errors only inside [down_ms, up_ms +
// recover_ms], of the `allowed` codes only; OK calls before and after; and no call took longer
// than `max_call_ms` (nothing hangs).
void CheckOutage(const std::vector<Call>& calls, double down_ms, double up_ms, double recover_ms,
                 double max_call_ms, const std::string& what,
                 const std::set<grpc::StatusCode>& allowed = {grpc::StatusCode::UNAVAILABLE}) {
  size_t ok_before = 0, ok_after = 0, errors = 0;
  double first_ok_after_up = -1, last_error_start = -1, slowest = 0;
  for (const Call& c : calls) {
    slowest = std::max(slowest, c.end_ms - c.start_ms);
    EXPECT_LE(c.end_ms - c.start_ms, max_call_ms)
        << what << ": a call hung: " << c.method << " " << GrpcCodeName(c.code) << " " << c.message;
    if (c.code == grpc::StatusCode::OK) {
      if (c.end_ms < down_ms) ++ok_before;
      if (c.start_ms > up_ms) {
        ++ok_after;
        if (first_ok_after_up < 0 || c.end_ms < first_ok_after_up) first_ok_after_up = c.end_ms;
      }
      continue;
    }
    ++errors;
    last_error_start = std::max(last_error_start, c.start_ms);
    // containerd answers while its CRI plugin is still starting: its own error, passed on.
    const bool ctrd_starting = c.code == grpc::StatusCode::UNKNOWN &&
                               c.message.find("server is not initialized yet") != std::string::npos;
    EXPECT_TRUE(allowed.count(c.code) || ctrd_starting)
        << what << ": " << c.method << " at " << c.start_ms << " ms: " << GrpcCodeName(c.code)
        << " " << c.message;
    EXPECT_GE(c.end_ms, down_ms) << what << ": an error before the outage: " << c.method << " "
                                 << GrpcCodeName(c.code) << " " << c.message;
    EXPECT_LE(c.start_ms, up_ms + recover_ms)
        << what << ": still failing " << (c.start_ms - up_ms)
        << " ms after the restart: " << c.method << " " << GrpcCodeName(c.code) << " " << c.message;
  }
  std::cout << "[ fault ] " << what << ": " << calls.size() << " calls, " << errors
            << " errors; down at " << down_ms << " ms, up at " << up_ms
            << " ms; first OK after up at +" << (first_ok_after_up - up_ms)
            << " ms; last failing call started at +" << (last_error_start - up_ms)
            << " ms; slowest call " << slowest << " ms\n"
            << "[ fault ] errors by code and message:\n"
            << ErrorSummary(calls);
  EXPECT_GT(ok_before, 0u) << what;
  EXPECT_GT(ok_after, 0u) << what << ": no call succeeded after the restart";
  ASSERT_GE(first_ok_after_up, 0) << what;
  EXPECT_LE(first_ok_after_up - up_ms, recover_ms) << what;
}

// ---------------------------------------------------------------------------------------------
// The shim under faults.

class FaultTest : public ShimTest {
 protected:
  // After every fault the daemon must still stop cleanly on SIGTERM (and, in sanitizer builds,
  // exit 0 means no sanitizer report).
  void TearDown() override {
    if (daemon_.pid() > 0 && daemon_.Running()) {
      EXPECT_TRUE(daemon_.Stop(10s)) << "needed SIGKILL";
      EXPECT_EQ(daemon_.ExitDescription(), "exit 0") << DaemonLog();
    }
    ShimTest::TearDown();
  }

  // ImageStatus of this answers with an image (pulled through the daemon from mirror1).
  std::string PresentImage() {
    const std::string repo = Repo({bed->mirror1});
    StartDaemon(MirrorConfig({bed->mirror1->host()}));
    EXPECT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
    return repo;
  }

  size_t CountInLog(const std::string& needle) {
    const std::string log = ReadAll(dir_ + "/daemon.log");
    size_t n = 0;
    for (size_t p = log.find(needle); p != std::string::npos; p = log.find(needle, p + 1)) ++n;
    return n;
  }
};

TEST_F(FaultTest, ContainerdKilledAndRestartedUnderLoad) {
  const std::string image = PresentImage();
  const pid_t daemon = daemon_.pid();
  const std::string endpoint = "unix://" + socket_;

  // Baseline after a warm-up with the same shape of load (gRPC creates its threads and the
  // clients' connections on first use), then a short settle.
  {
    Load warm(endpoint, 4, image);
    std::this_thread::sleep_for(1s);
  }
  std::this_thread::sleep_for(1s);
  const Resources base = ResourcesOf(daemon);
  const auto base_fds = FdTargets(daemon);

  // Two outages under one load: a leak per restart would show twice.
  Load load(endpoint, 4, image);
  std::vector<std::pair<double, double>> outages;  // (down, up) in load time
  for (int round = 0; round < 2; ++round) {
    std::this_thread::sleep_for(1500ms);
    const double down_ms = load.Now();
    ASSERT_EQ(kill(bed->ctrd->pid(), SIGKILL), 0);
    bed->ctrd->Stop();                    // reaps it
    std::this_thread::sleep_for(1500ms);  // calls fail meanwhile
    Status s = bed->ctrd->Start();        // returns once containerd answers CRI Version
    outages.emplace_back(down_ms, load.Now());
    ASSERT_TRUE(s.ok()) << s.message();
    // The recovery bound below, and 1.5 s of calls.
    std::this_thread::sleep_for(std::chrono::milliseconds(int(Bound(2000)) + 1500));
  }
  load.Stop();

  EXPECT_TRUE(daemon_.Running()) << "the daemon died\n" << DaemonLog();
  // The relay and the pull service's channel both reconnect on the next call after containerd
  // is back (no back-off: a unix socket connects or fails at once): allow 2 s.
  const std::vector<Call> calls = load.calls();
  for (size_t i = 0; i < outages.size(); ++i) {
    // Each outage's share of the calls: from 1 s before it (the first: from the beginning; by
    // then the previous outage is over by the bound) to 1 s before the next one.
    const double from = i == 0 ? 0 : outages[i].first - 1000;
    const double to = i + 1 < outages.size() ? outages[i + 1].first - 1000 : 1e12;
    std::vector<Call> mine;
    for (const Call& c : calls) {
      if (c.start_ms >= from && c.start_ms < to) mine.push_back(c);
    }
    CheckOutage(mine, outages[i].first, outages[i].second, Bound(2000), Bound(2500),
                "containerd SIGKILL + restart #" + std::to_string(i + 1));
  }
  {
    // If it did not recover under load, say whether it does at all (for the report).
    const auto t0 = Clock::now();
    grpc::Status last;
    const bool ok = WaitFor(
        [&] {
          runtime::v1::VersionResponse v;
          last = client_->Version(&v, 1s);
          return last.ok();
        },
        30s, 100ms);
    std::cout << "[ fault ] after the load: Version " << (ok ? "OK" : "still failing") << " after "
              << MsSince(t0) << " ms" << (ok ? "" : ": " + GrpcStatusText(last)) << "\n";
  }

  // No leaked threads or fds once the load is gone (the Load's clients are closed by now): the
  // daemon's connections to containerd are one per client (the relay's, the pull service's
  // RpcChannel), remade after each restart, so the counts come back exactly.
  const Resources after = Settle(daemon, base, 0, 0, 10s);
  std::cout << "[ fault ] daemon before: " << base.Text() << "  after: " << after.Text()
            << "  fds:" << FdDiff(base_fds, FdTargets(daemon)) << "\n";
  EXPECT_LE(after.fds, base.fds);
  EXPECT_LE(after.threads, base.threads);
  // And it still works end to end.
  runtime::v1::ImageStatusResponse r;
  ASSERT_TRUE(client_->ImageStatus(image, false, &r, 5s).ok());
  EXPECT_TRUE(r.has_image());
}

TEST_F(FaultTest, DaemonRestartedUnderLoad) {
  const std::string image = PresentImage();
  const std::string config = ReadAll(dir_ + "/config.yaml");
  Load load("unix://" + socket_, 4, image);
  std::this_thread::sleep_for(1500ms);
  const double down_ms = load.Now();
  ASSERT_TRUE(daemon_.Stop(10s)) << "needed SIGKILL";
  EXPECT_EQ(daemon_.ExitDescription(), "exit 0") << DaemonLog();
  EXPECT_FALSE(fs::exists(socket_)) << "socket left behind";
  StartDaemon(config);  // returns once the new daemon answers Version
  const double up_ms = load.Now();
  std::this_thread::sleep_for(3s);
  load.Stop();
  // Clients reconnect with at most ~1 s back-off (GrpcCriClient::Connect): allow 2 s. Besides
  // UNAVAILABLE (no socket), a call that reaches the old daemon in the instant between its drain
  // and gRPC's server shutdown is CANCELLED by that shutdown (seen: 1 in ~2900 calls).
  CheckOutage(load.calls(), down_ms, up_ms, Bound(2000), Bound(2500), "daemon SIGTERM + start",
              {grpc::StatusCode::UNAVAILABLE, grpc::StatusCode::CANCELLED});
  EXPECT_TRUE(daemon_.Running()) << DaemonLog();
}

TEST_F(FaultTest, BrokenConfigKeepsTheLastGoodOne) {
  const std::string repo = Repo({bed->mirror1, bed->mirror2});
  StartDaemon(MirrorConfig({bed->mirror1->host()}));
  const std::string path = dir_ + "/config.yaml";

  // A pull is rewritten to mirror1 (it goes there, and upstream never sees it).
  auto pulled_from_mirror1 = [&](const std::string& when) {
    bed->mirror1->ResetRequests();
    bed->upstream->ResetRequests();
    ASSERT_TRUE(Pull(repo, "default").ok()) << when << "\n" << DaemonLog();
    EXPECT_GE(bed->mirror1->ManifestRequests(repo), 1u) << when;
    EXPECT_EQ(bed->upstream->ManifestRequests(repo), 0u) << when;
  };
  pulled_from_mirror1("good config");

  // Every way a node breaks the file; each must be rejected with the file and the reason, and
  // the last good config must stay in force. Root reads through chmod 000 (CAP_DAC_OVERRIDE),
  // so "unreadable" is a path that no one can read: a unix socket (open() fails with ENXIO),
  // a FIFO (not a regular file; opened non-blocking, so it cannot hang the reload), a dangling
  // symlink (ENOENT through the link), a directory.
  int unix_fd = -1;
  struct Breakage {
    std::string name;
    std::function<void()> apply;
    std::string reason;  // in the REJECTED error line
  };
  auto replace = [&](const std::function<void(const std::string&)>& make) {
    const std::string tmp = dir_ + "/config.yaml.new";
    fs::remove_all(tmp);
    make(tmp);
    fs::remove_all(path);  // rename cannot replace a directory by a file and vice versa
    fs::rename(tmp, path);
  };
  std::vector<Breakage> breakages = {
      {"garbage YAML", [&] { WriteConfig("rules: [ {match: docker.io, mirrors: [\n\t- :::\n"); },
       "invalid YAML"},
      {"control bytes", [&] { WriteConfig(std::string("\x00\xff\xfe garbage", 11)); },
       "control character"},
      {"empty", [&] { WriteConfig(""); }, "config is empty"},
      {"unknown key", [&] { WriteConfig("rulez: []\n"); }, "rulez"},
      {"deleted", [&] { fs::remove(path); }, "No such file or directory"},
      {"directory", [&] { replace([](const std::string& t) { fs::create_directory(t); }); },
       "is a directory"},
      {"dangling symlink",
       [&] {
         replace([&](const std::string& t) { fs::create_symlink(dir_ + "/nowhere.yaml", t); });
       },
       "No such file or directory"},
      {"FIFO",
       [&] { replace([](const std::string& t) { ASSERT_EQ(mkfifo(t.c_str(), 0600), 0); }); },
       "not a regular file"},
      {"unix socket (unreadable even for root)",
       [&] {
         replace([&](const std::string& t) {
           unix_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
           sockaddr_un a{};
           a.sun_family = AF_UNIX;
           std::snprintf(a.sun_path, sizeof a.sun_path, "%s", t.c_str());
           ASSERT_EQ(bind(unix_fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0) << t;
         });
       },
       "No such device or address"},
      {"2 MiB", [&] { WriteConfig(std::string(2 << 20, '#')); }, "limit"},
  };
  for (const Breakage& b : breakages) {
    SCOPED_TRACE(b.name);
    const size_t log_offset = ReadAll(dir_ + "/daemon.log").size();
    b.apply();
    // What this breakage logs: an error line with the reason, then a summary naming the file and
    // the config kept (the first, good one). (Replacing the file takes two steps, so an extra
    // "No such file" rejection may come first.)
    const std::regex why("config rejected: [^\n]*" + RegexQuote(b.reason) + "[\\s\\S]*config " +
                         RegexQuote(path) + " REJECTED \\([0-9]+ error\\(s\\)\\); " +
                         "keeping generation 1 ");
    std::string log;
    EXPECT_TRUE(WaitFor(
        [&] {
          log = ReadAll(dir_ + "/daemon.log").substr(log_offset);
          return std::regex_search(log, why);
        },
        10s))
        << "reason '" << b.reason << "' with the file and the config kept not logged\n"
        << log;
    EXPECT_TRUE(daemon_.Running()) << DaemonLog();
    pulled_from_mirror1("after: " + b.name);
    if (unix_fd >= 0) close(unix_fd), unix_fd = -1;
  }

  // A good config again (a different one: mirror2) is applied and followed.
  fs::remove_all(path);
  WriteConfig(MirrorConfig({bed->mirror2->host()}));
  ASSERT_TRUE(WaitFor([&] { return CountInLog("applied: generation 2") > 0; }, 10s)) << DaemonLog();
  bed->mirror1->ResetRequests();
  bed->mirror2->ResetRequests();
  ASSERT_TRUE(Pull(repo, "default").ok()) << DaemonLog();
  EXPECT_GE(bed->mirror2->ManifestRequests(repo), 1u);
  EXPECT_EQ(bed->mirror1->ManifestRequests(repo), 0u);
}

TEST_F(FaultTest, SigtermDuringInFlightPulls) {
  auto hole = bed->tb->AddBlackHole();
  ASSERT_TRUE(hole.ok()) << hole.error();
  const std::string repo = Repo({bed->mirror1});
  const std::string hung = "rp/sigterm-hung";  // only the black hole "has" it
  // A grace shorter than anything that could end the hung pull by itself (a mirror probe gives
  // up after 2 s): the pull must be cancelled when the grace runs out.
  daemon_args_ = {"--grace", "1"};
  StartDaemon("rules:\n  - match: docker.io/" + hung + "\n    mirrors: [" + (*hole)->host() +
              "]\n    fallback: false\n" + "  - match: docker.io\n    mirrors: [" +
              bed->mirror1->host() + "]\n");
  const size_t accepted = (*hole)->accepted();
  auto pull = [&](const std::string& image) {
    return std::async(std::launch::async, [this, image] {
      auto t0 = Clock::now();
      grpc::Status s = Pull(image, "default");
      return std::make_pair(s, MsSince(t0));
    });
  };
  auto hung_pull = pull(hung);
  ASSERT_TRUE(WaitFor([&] { return (*hole)->accepted() > accepted; }, 10s))
      << "the pull never reached the hung mirror\n"
      << DaemonLog();
  auto normal_pull = pull(repo);
  std::this_thread::sleep_for(20ms);  // let it start: in flight, or already done

  const auto t0 = Clock::now();
  ASSERT_EQ(kill(daemon_.pid(), SIGTERM), 0);
  auto exit_status = daemon_.Wait(10s);
  const double exit_ms = MsSince(t0);
  ASSERT_TRUE(exit_status.has_value()) << "the daemon did not exit within 10 s\n" << DaemonLog();
  EXPECT_TRUE(WIFEXITED(*exit_status) && WEXITSTATUS(*exit_status) == 0)
      << daemon_.ExitDescription() << "\n"
      << DaemonLog();
  EXPECT_LT(exit_ms, 1000 + Bound(3000)) << "grace 1 s + margin";
  EXPECT_FALSE(fs::exists(socket_)) << "socket left behind";

  // Both calls end with a status, none hangs (the client's own deadline is 60 s).
  ASSERT_EQ(hung_pull.wait_for(10s), std::future_status::ready) << "the hung pull hangs";
  ASSERT_EQ(normal_pull.wait_for(10s), std::future_status::ready) << "the normal pull hangs";
  auto [hs, hms] = hung_pull.get();
  auto [ns, nms] = normal_pull.get();
  std::cout << "[ fault ] SIGTERM: exit after " << exit_ms
            << " ms; hung pull: " << GrpcStatusText(hs) << " after " << hms
            << " ms; normal pull: " << GrpcStatusText(ns) << " after " << nms << " ms\n";
  EXPECT_FALSE(hs.ok());
  EXPECT_NE(hs.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << GrpcStatusText(hs);
  EXPECT_LT(hms, 1000 + Bound(3000)) << "the hung pull outlived the grace";
  EXPECT_LT(nms, 1000 + Bound(3000));
  // It was still in flight when the grace ran out, and was cancelled then.
  EXPECT_THAT(DaemonLog(), HasSubstr("still in flight after 1000 ms; cancelling them"));
  EXPECT_THAT(DaemonLog(), HasSubstr("stopped"));
}

// ---------------------------------------------------------------------------------------------
// The admission webhook under hostile clients.

class WebhookFaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"openssl", "curl"}) {
      if (InPath(tool)) continue;
      if (IntegrationRequired()) FAIL() << tool << " is required";
      GTEST_SKIP() << "needs the " << tool << " command";
    }
    char tmpl[] = "/tmp/rp-webhook-fault-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    // A throwaway CA and a serving certificate for 127.0.0.1, with the openssl CLI.
    const std::string d = dir_.string();
    std::ofstream(d + "/ext.cnf") << "subjectAltName=IP:127.0.0.1\n";
    for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
             {"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", d + "/ca.key", "-out", d + "/ca.crt", "-subj", "/CN=fault test CA",
              "-days", "1"},
             {"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
              d + "/tls.key", "-out", d + "/tls.csr", "-subj", "/CN=webhook"},
             {"x509", "-req", "-in", d + "/tls.csr", "-CA", d + "/ca.crt", "-CAkey", d + "/ca.key",
              "-CAcreateserial", "-out", d + "/tls.crt", "-days", "1", "-extfile",
              d + "/ext.cnf"}}) {
      std::vector<std::string> argv = {"openssl"};
      argv.insert(argv.end(), args.begin(), args.end());
      Status s = RunCommand(argv, d + "/openssl.log", 30s);
      ASSERT_TRUE(s.ok()) << s.message();
    }
    std::ofstream(d + "/config.yaml") << "rules:\n  - match: docker.io\n    mirrors: [m.example]\n";
    std::ofstream(d + "/review.json")
        << R"({"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{)"
        << R"("uid":"u-1","kind":{"group":"","version":"v1","kind":"Pod"},)"
        << R"("namespace":"default","operation":"CREATE","object":{"apiVersion":"v1",)"
        << R"("kind":"Pod","metadata":{"name":"p"},"spec":{"containers":[{"name":"c",)"
        << R"("image":"nginx"}]}}}})";
  }

  void TearDown() override {
    if (webhook_.pid() > 0) {
      EXPECT_TRUE(webhook_.Stop(10s)) << "needed SIGKILL";
      EXPECT_EQ(webhook_.ExitDescription(), "exit 0") << Log();
    }
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  void Start() {
    log_ = (dir_ / "webhook.log").string();
    ASSERT_TRUE(webhook_
                    .Spawn({RP_BINARY, "webhook", "--listen", "127.0.0.1:0", "--tls-cert",
                            (dir_ / "tls.crt").string(), "--tls-key", (dir_ / "tls.key").string(),
                            "--config", (dir_ / "config.yaml").string()},
                           log_)
                    .ok());
    static const std::regex kServing(R"(serving https://127\.0\.0\.1:(\d+))");
    ASSERT_TRUE(WaitFor(
        [&] {
          std::smatch m;
          const std::string log = ReadAll(log_);
          if (!std::regex_search(log, m, kServing)) return false;
          port_ = std::stoi(m[1]);
          return true;
        },
        10s))
        << Log();
  }

  std::string Log() const { return TailFile(log_, 60); }

  // One AdmissionReview with curl (as the API server would: HTTPS, verified, JSON); returns
  // the HTTP status (0: none) and the time it took.
  std::pair<int, double> Review(int n) {
    const std::string out = (dir_ / ("curl" + std::to_string(n) + ".out")).string();
    auto t0 = Clock::now();
    RunCommand(
        {"curl", "-sS", "--max-time", "10", "--cacert", (dir_ / "ca.crt").string(), "-H",
         "Content-Type: application/json", "--data-binary", "@" + (dir_ / "review.json").string(),
         "-o", "/dev/null", "-w", "HTTP_STATUS=%{http_code}\n",
         "https://127.0.0.1:" + std::to_string(port_) + "/mutate"},
        out, 20s);
    const double ms = MsSince(t0);
    std::smatch m;
    const std::string text = ReadAll(out);
    static const std::regex kStatus(R"(HTTP_STATUS=(\d+))");
    return {std::regex_search(text, m, kStatus) ? std::stoi(m[1]) : 0, ms};
  }

  int Connect() {
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a = LoopbackAddress(port_);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }

  fs::path dir_;
  std::string log_;
  Process webhook_;
  int port_ = 0;
};

// Reads until the peer closes (true) or `timeout` passes (false).
bool ClosedByPeer(int fd, std::chrono::milliseconds timeout) {
  timeval tv{static_cast<time_t>(timeout.count() / 1000),
             static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[4096];
  for (;;) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return true;
    if (n < 0) return false;  // timeout
  }
}

TEST_F(WebhookFaultTest, TlsGarbageIsDroppedAndLeavesNothingBehind) {
  Start();
  const pid_t pid = webhook_.pid();
  ASSERT_EQ(Review(0).first, 200) << Log();
  const Resources base = ResourcesOf(pid);
  std::mt19937 rng(42);
  int closed = 0;
  constexpr int kConnections = 50;
  for (int i = 0; i < kConnections; ++i) {
    const int fd = Connect();
    ASSERT_GE(fd, 0);
    std::string junk(size_t(1 + rng() % 4096), '\0');
    for (char& c : junk) c = char(rng());
    if (i % 5 == 0) junk[0] = 0x16;  // looks like a TLS handshake record, then is not
    [[maybe_unused]] ssize_t n = send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    if (ClosedByPeer(fd, 10s)) ++closed;
    close(fd);
  }
  EXPECT_EQ(closed, kConnections) << "the server must close garbage connections itself";
  const auto [status, ms] = Review(1);
  EXPECT_EQ(status, 200) << Log();
  const Resources after = Settle(pid, base, 0, 0, 10s);
  std::cout << "[ fault ] webhook TLS garbage x" << kConnections << ": before " << base.Text()
            << "  after " << after.Text() << "\n";
  EXPECT_LE(after.fds, base.fds);
  EXPECT_LE(after.threads, base.threads);
  EXPECT_TRUE(webhook_.Running());
}

TEST_F(WebhookFaultTest, OversizedBodiesAreRefusedWithoutBeingRead) {
  Start();
  const pid_t pid = webhook_.pid();
  ASSERT_EQ(Review(0).first, 200) << Log();
  const Resources base = ResourcesOf(pid);
  // 64 MiB, announced by Content-Length and sent chunked (no length up front), through curl
  // over TLS. The server must refuse it (or close) without holding the body in memory.
  const std::string big = (dir_ / "big.json").string();
  {
    std::ofstream out(big, std::ios::binary);
    std::string mib(1 << 20, ' ');
    for (int i = 0; i < 64; ++i) out << mib;
  }
  std::vector<std::string> results;
  for (bool chunked : {false, true}) {
    const long before_kb = RssKb(pid);
    std::atomic<long> peak_kb{before_kb};
    std::atomic<bool> done{false};
    std::thread sampler([&] {
      while (!done) {
        peak_kb = std::max(peak_kb.load(), RssKb(pid));
        std::this_thread::sleep_for(5ms);
      }
    });
    const std::string out = (dir_ / (chunked ? "big-chunked.out" : "big.out")).string();
    std::vector<std::string> argv = {"curl",
                                     "-sS",
                                     "--max-time",
                                     "20",
                                     "--cacert",
                                     (dir_ / "ca.crt").string(),
                                     "-H",
                                     "Content-Type: application/json",
                                     "--data-binary",
                                     "@" + big,
                                     "-o",
                                     "/dev/null",
                                     "-w",
                                     "HTTP_STATUS=%{http_code}\n"};
    if (chunked) argv.insert(argv.end(), {"-H", "Transfer-Encoding: chunked"});
    argv.push_back("https://127.0.0.1:" + std::to_string(port_) + "/mutate");
    auto t0 = Clock::now();
    RunCommand(argv, out, 30s);
    const std::string text = ReadAll(out);
    const double took = MsSince(t0);
    done = true;
    sampler.join();
    results.push_back(std::string(chunked ? "chunked" : "content-length") + ": " +
                      text.substr(text.find('\n') + 1) + "  in " + std::to_string(int(took)) +
                      " ms, RSS +" + std::to_string((peak_kb - before_kb) / 1024) + " MiB\n");
    std::smatch m;
    static const std::regex kStatus(R"(HTTP_STATUS=(\d+))");
    const int status = std::regex_search(text, m, kStatus) ? std::stoi(m[1]) : 0;
    // 413 (too long) or 411 (chunked: no length up front), or the connection closed before
    // curl got an answer (it was still sending).
    EXPECT_TRUE(status == (chunked ? 411 : 413) || status == 0) << text;
    // The limit is 3 MiB; holding a 64 MiB body would add far more than 32 MiB.
    EXPECT_LT(peak_kb - before_kb, 32 * 1024) << "the body was buffered: " << results.back();
  }
  for (auto& r : results) std::cout << "[ fault ] webhook 64 MiB body, " << r;
  EXPECT_EQ(Review(1).first, 200) << Log();
  const Resources after = Settle(pid, base, 0, 0, 10s);
  std::cout << "[ fault ] webhook oversized: before " << base.Text() << "  after " << after.Text()
            << "\n";
  EXPECT_LE(after.fds, base.fds);
  EXPECT_LE(after.threads, base.threads);
}

// Many TLS clients that complete the handshake and then send a request header one byte per
// second, never finishing it (slowloris), all driven from one thread with non-blocking sockets.
class Slowloris {
 public:
  Slowloris(int port, int connections) : port_(port), n_(connections) {
    ctx_ = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx_, SSL_VERIFY_NONE, nullptr);  // the attacker does not care
  }
  ~Slowloris() {
    Stop();
    SSL_CTX_free(ctx_);
  }
  void Start(std::chrono::seconds duration) {
    thread_ = std::thread([this, duration] { Run(duration); });
  }
  void Stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int handshaken() const { return handshaken_.load(); }
  int closed_by_server() const { return closed_.load(); }
  int peak_trickling() const { return peak_trickling_.load(); }

 private:
  struct Conn {
    int fd = -1;
    SSL* ssl = nullptr;
    bool up = false, dead = false;
    size_t sent = 0;
  };

  void Run(std::chrono::seconds duration) {
    std::vector<Conn> conns(static_cast<size_t>(n_));
    for (Conn& c : conns) {
      c.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      sockaddr_in a = LoopbackAddress(port_);
      connect(c.fd, reinterpret_cast<sockaddr*>(&a), sizeof a);  // EINPROGRESS
      c.ssl = SSL_new(ctx_);
      SSL_set_fd(c.ssl, c.fd);
      SSL_set_connect_state(c.ssl);
    }
    static const std::string kHead =
        "POST /mutate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "X-Slow: " +
        std::string(4096, 'a');
    const auto end = Clock::now() + duration;
    auto next_trickle = Clock::now();
    while (!stop_ && Clock::now() < end) {
      const bool trickle = Clock::now() >= next_trickle;
      if (trickle) next_trickle += 1s;
      int trickling = 0;
      for (Conn& c : conns) {
        if (c.dead) continue;
        if (!c.up) {
          ERR_clear_error();
          int r = SSL_do_handshake(c.ssl);
          if (r == 1) {
            c.up = true;
            ++handshaken_;
          } else {
            int e = SSL_get_error(c.ssl, r);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) Kill(c);
          }
          continue;
        }
        ++trickling;
        char b;
        ERR_clear_error();
        int r = SSL_read(c.ssl, &b, 1);  // anything from the server: a close or an answer
        if (r <= 0) {
          int e = SSL_get_error(c.ssl, r);
          if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            Kill(c);
            continue;
          }
        }
        if (trickle && c.sent < kHead.size()) {
          ERR_clear_error();
          if (SSL_write(c.ssl, kHead.data() + c.sent, 1) == 1) ++c.sent;
        }
      }
      peak_trickling_ = std::max(peak_trickling_.load(), trickling);
      std::this_thread::sleep_for(20ms);
    }
    for (Conn& c : conns) {
      if (c.ssl) SSL_free(c.ssl);
      if (c.fd >= 0) close(c.fd);
    }
  }
  void Kill(Conn& c) {
    c.dead = true;
    ++closed_;
  }

  int port_, n_;
  SSL_CTX* ctx_ = nullptr;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<int> handshaken_{0}, closed_{0}, peak_trickling_{0};
};

TEST_F(WebhookFaultTest, SlowlorisDoesNotStarveRealReviews) {
  Start();
  const pid_t pid = webhook_.pid();
  ASSERT_EQ(Review(0).first, 200) << Log();
  const Resources base = ResourcesOf(pid);
  constexpr int kConnections = 200;
  Slowloris attack(port_, kConnections);
  attack.Start(10s);
  std::this_thread::sleep_for(2s);  // every worker is taken by now
  // Real reviews while it runs: each must be answered, promptly.
  Resources during = ResourcesOf(pid);
  std::vector<double> ms;
  for (int i = 1; i <= 3; ++i) {
    auto [status, took] = Review(i);
    EXPECT_EQ(status, 200) << "review " << i << " during the slowloris\n" << Log();
    ms.push_back(took);
    Resources now = ResourcesOf(pid);
    during.fds = std::max(during.fds, now.fds);
    during.threads = std::max(during.threads, now.threads);
    during.rss_kb = std::max(during.rss_kb, now.rss_kb);
    std::this_thread::sleep_for(1s);
  }
  attack.Stop();
  const Resources after = Settle(pid, base, 0, 0, 15s);
  std::cout << "[ fault ] slowloris x" << kConnections << ": handshakes completed "
            << attack.handshaken() << ", closed by the server " << attack.closed_by_server()
            << ", peak trickling " << attack.peak_trickling() << "\n[ fault ] reviews during it:";
  for (double m : ms) std::cout << " " << int(m) << " ms";
  std::cout << "\n[ fault ] webhook before " << base.Text() << "  during (max) " << during.Text()
            << "  after " << after.Text() << "\n";
  // The attack really held every worker at once (else the reviews prove nothing). Not all 200
  // connect at once: the listen backlog (5, cpp-httplib's) drops SYNs, which the kernel retries.
  EXPECT_GE(attack.peak_trickling(), 32);
  for (double m : ms) EXPECT_LT(m, Bound(3000)) << "a review waited behind the slowloris";
  // Bounded: a fixed pool of workers (32); one fd per open connection, plus the pool's dup of
  // each connection a worker serves (webhook_pool.h), plus a few (the ops endpoint's clients).
  constexpr int kWorkers = 32;
  EXPECT_LE(during.threads, base.threads + 2);
  EXPECT_LE(during.fds, base.fds + kConnections + kWorkers + 8);
  EXPECT_LT(during.rss_kb - base.rss_kb, Bound(64 * 1024));
  EXPECT_LE(after.fds, base.fds);
  EXPECT_LE(after.threads, base.threads);
  EXPECT_TRUE(webhook_.Running());
}

}  // namespace
}  // namespace rp_testbed
