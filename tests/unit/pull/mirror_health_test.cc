// Mirror health: how attempt errors are read, the breaker's states (fake prober, fake clock),
// single flight, cancellation. (The hosts.toml reader: hosts_toml_test; the probe: probe_test.)
#include "pull/mirror_health.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using testing::HasSubstr;
using Action = HealthVerdict::Action;

// ---------------------------------------------------------------------------------------------
// The checker, with a fake prober and a fake clock (probes inline: deterministic)

class CheckerTest : public testing::Test {
 protected:
  CheckerTest() {
    settings_.probe_timeout = milliseconds(2000);
    settings_.cooldown = milliseconds(30000);
    settings_.hosts_dir = "";
  }
  MirrorHealthChecker& Checker() {
    if (!checker_) {
      MirrorHealthChecker::Options o;
      o.prober = [this](const ProbeTarget& t, std::chrono::steady_clock::time_point,
                        const std::atomic<bool>&) {
        targets_.push_back(t.Url());
        return next_;
      };
      o.now = [this] { return std::chrono::steady_clock::time_point(now_); };
      o.alive_ttl = milliseconds(10000);
      o.probe_thread = false;
      checker_ = std::make_unique<MirrorHealthChecker>(std::move(o));
    }
    return *checker_;
  }
  HealthVerdict Check(const std::string& host = "m.example") {
    return Checker().Check(host, {}, settings_, {});
  }
  void Advance(milliseconds d) { now_ += d; }

  HealthSettings settings_;
  ProbeResult next_{true, 401, "HTTP 401"};
  std::vector<std::string> targets_;
  std::chrono::steady_clock::duration now_{std::chrono::hours(1)};
  std::unique_ptr<MirrorHealthChecker> checker_;
};

TEST_F(CheckerTest, AliveIsReusedForAWhileThenProbedAgain) {
  HealthVerdict v = Check();
  EXPECT_EQ(v.action, Action::kTry);
  EXPECT_TRUE(v.probed);
  EXPECT_TRUE(v.ran_probe);
  EXPECT_EQ(v.target, "https://m.example/v2/");
  EXPECT_EQ(v.probe.http_status, 401);
  EXPECT_EQ(targets_.size(), 1u);
  Advance(milliseconds(9000));
  v = Check();
  EXPECT_EQ(v.action, Action::kTry);
  EXPECT_FALSE(v.probed);  // reused
  EXPECT_EQ(targets_.size(), 1u);
  EXPECT_EQ(Check("other.example").action, Action::kTry);  // per mirror
  EXPECT_EQ(targets_.size(), 2u);
  Advance(milliseconds(2000));
  EXPECT_TRUE(Check().probed);
  EXPECT_EQ(targets_.size(), 3u);
}

TEST_F(CheckerTest, DeadProbeOpensTheBreakerUntilTheCooldownThenHalfOpenProbes) {
  next_ = {false, 0, "connect: connection refused"};
  HealthVerdict v = Check();
  EXPECT_EQ(v.action, Action::kDead);
  EXPECT_TRUE(v.breaker_opened);
  EXPECT_EQ(v.probe.detail, "connect: connection refused");
  EXPECT_TRUE(Checker().IsOpen("m.example"));
  // Open: skipped without probing.
  Advance(milliseconds(29000));
  v = Check();
  EXPECT_EQ(v.action, Action::kCooldown);
  EXPECT_FALSE(v.probed);
  EXPECT_EQ(v.cooldown_left, milliseconds(1000));
  EXPECT_EQ(targets_.size(), 1u);
  // Half-open: probed again; still dead -> open again, not "opened" again.
  Advance(milliseconds(1000));
  v = Check();
  EXPECT_EQ(v.action, Action::kDead);
  EXPECT_FALSE(v.breaker_opened);
  EXPECT_EQ(targets_.size(), 2u);
  EXPECT_EQ(Check().action, Action::kCooldown);
  // Half-open, alive: closed.
  Advance(milliseconds(30000));
  next_ = {true, 200, "HTTP 200"};
  v = Check();
  EXPECT_EQ(v.action, Action::kTry);
  EXPECT_TRUE(v.breaker_closed);
  EXPECT_FALSE(Checker().IsOpen("m.example"));
  EXPECT_EQ(targets_.size(), 3u);
}

TEST_F(CheckerTest, FailedAttemptsThatSayDownOpenItSuccessClosesIt) {
  EXPECT_EQ(Check().action, Action::kTry);
  EXPECT_EQ(Checker().Report("m.example", false, /*down=*/false, settings_), 0);  // NOT_FOUND
  EXPECT_EQ(Check().action, Action::kTry);
  EXPECT_EQ(Checker().Report("m.example", false, /*down=*/true, settings_), 1);
  EXPECT_EQ(Checker().Report("m.example", false, /*down=*/true, settings_), 0);  // already open
  HealthVerdict v = Check();
  EXPECT_EQ(v.action, Action::kCooldown);
  EXPECT_EQ(targets_.size(), 1u);
  // After the cooldown a probe decides; an attempt that succeeds closes it too.
  Advance(milliseconds(30000));
  settings_.probe = false;
  EXPECT_EQ(Check().action, Action::kTry);  // half-open without a probe: just try it
  EXPECT_EQ(targets_.size(), 1u);
  EXPECT_EQ(Checker().Report("m.example", true, false, settings_), -1);
  EXPECT_FALSE(Checker().IsOpen("m.example"));
}

TEST_F(CheckerTest, ProbingOffAndNoCooldown) {
  settings_.probe = false;
  next_ = {false, 0, "dead"};
  EXPECT_EQ(Check().action, Action::kTry);
  EXPECT_TRUE(targets_.empty());
  settings_.probe = true;
  settings_.cooldown = milliseconds(0);  // no breaker: every pull probes (cached when alive)
  EXPECT_EQ(Check().action, Action::kDead);
  EXPECT_FALSE(Checker().IsOpen("m.example"));
  EXPECT_EQ(Check().action, Action::kDead);
  EXPECT_EQ(targets_.size(), 2u);
  EXPECT_EQ(Checker().Report("m.example", false, true, settings_), 0);
}

TEST_F(CheckerTest, ProbeTargetFollowsTheHostsDirOfTheSettings) {
  char tmpl[] = "/tmp/rp-health-test.XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  fs::create_directories(dir + "/m.example");
  std::ofstream(dir + "/m.example/hosts.toml") << "[host.\"http://cache.example:81\"]\n";
  settings_.hosts_dir = dir;
  EXPECT_EQ(Check().target, "http://cache.example:81/v2/");
  fs::remove_all(dir);
}

// Real threads from here on: the real clock, probes on their own threads.

TEST(CheckerThreadsTest, ConcurrentChecksShareOneProbe) {
  std::atomic<int> probes{0};
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  MirrorHealthChecker::Options o;
  o.prober = [&](const ProbeTarget&, std::chrono::steady_clock::time_point,
                 const std::atomic<bool>&) {
    ++probes;
    released.wait();
    return ProbeResult{true, 200, "HTTP 200"};
  };
  MirrorHealthChecker checker(std::move(o));
  HealthSettings s;
  s.hosts_dir = "";
  s.probe_timeout = milliseconds(60000);
  std::vector<std::future<HealthVerdict>> calls;
  for (int i = 0; i < 8; ++i) {
    calls.push_back(
        std::async(std::launch::async, [&] { return checker.Check("m.example", {}, s, {}); }));
  }
  while (probes.load() == 0) std::this_thread::sleep_for(milliseconds(1));
  std::this_thread::sleep_for(milliseconds(50));  // let the others queue up behind it
  release.set_value();
  int reported = 0;
  for (auto& c : calls) {
    HealthVerdict v = c.get();
    EXPECT_EQ(v.action, Action::kTry);
    reported += v.ran_probe ? 1 : 0;
  }
  EXPECT_EQ(probes.load(), 1);
  EXPECT_EQ(reported, 1);  // the probe is reported once, not per waiter
}

TEST(CheckerThreadsTest, CancellingTheCallerStopsWaitingForTheProbe) {
  std::atomic<bool> in_probe{false};
  MirrorHealthChecker::Options o;
  o.prober = [&](const ProbeTarget&, std::chrono::steady_clock::time_point,
                 const std::atomic<bool>& stop) {
    in_probe = true;
    while (!stop.load()) std::this_thread::sleep_for(milliseconds(1));  // a black hole
    return ProbeResult{false, 0, "probe stopped"};
  };
  auto checker = std::make_unique<MirrorHealthChecker>(std::move(o));
  HealthSettings s;
  s.hosts_dir = "";
  s.probe_timeout = milliseconds(600000);
  Cancellation cancel;
  CallOptions opts;
  opts.cancellation = &cancel;
  auto call =
      std::async(std::launch::async, [&] { return checker->Check("m.example", {}, s, opts); });
  while (!in_probe.load()) std::this_thread::sleep_for(milliseconds(1));
  cancel.Cancel();
  EXPECT_EQ(call.get().action, Action::kCancelled);
  // A caller whose deadline has passed does not wait either.
  CallOptions late;
  late.deadline = std::chrono::system_clock::now();
  EXPECT_EQ(checker->Check("m.example", {}, s, late).action, Action::kNoTime);
  checker.reset();  // stops the probe and joins its thread
}

TEST(CheckerThreadsTest, AProbeThatOverrunsItsTimeoutCountsAsDead) {
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  MirrorHealthChecker::Options o;
  // Ignores its deadline, as a name lookup would.
  o.prober = [&](const ProbeTarget&, std::chrono::steady_clock::time_point,
                 const std::atomic<bool>&) {
    released.wait();
    return ProbeResult{true, 200, "HTTP 200 (too late)"};
  };
  MirrorHealthChecker checker(std::move(o));
  HealthSettings s;
  s.hosts_dir = "";
  s.probe_timeout = milliseconds(50);
  HealthVerdict v = checker.Check("m.example", {}, s, {});
  release.set_value();
  EXPECT_EQ(v.action, Action::kDead);
  EXPECT_THAT(v.probe.detail, HasSubstr("no answer within 50ms"));
  EXPECT_TRUE(checker.IsOpen("m.example"));
}

// ---------------------------------------------------------------------------------------------
// Hedging: probes on their own threads, answered when the test says so; a fake clock decides
// when the hedge delay has passed. Nothing here depends on how fast the machine is: a call
// that must not return yet is checked not to have returned while the fake clock stands still.

class HedgeTest : public testing::Test {
 protected:
  HedgeTest() {
    settings_.probe_timeout = milliseconds(2000);
    settings_.cooldown = milliseconds(30000);
    settings_.hedge_delay = milliseconds(400);
    settings_.hosts_dir = "";
    MirrorHealthChecker::Options o;
    o.prober = [this](const ProbeTarget& t, std::chrono::steady_clock::time_point,
                      const std::atomic<bool>& stop) {
      std::unique_lock l(mu_);
      started_.push_back(t.host);
      cv_.notify_all();
      while (!answers_.count(t.host) && !stop.load()) cv_.wait_for(l, milliseconds(5));
      if (!answers_.count(t.host)) return ProbeResult{false, 0, "stopped"};
      ProbeResult r = answers_[t.host];
      answers_.erase(t.host);
      return r;
    };
    o.now = [this] {
      return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(now_.load()));
    };
    o.alive_ttl = milliseconds(10000);
    o.on_unclaimed_probe = [this](const std::string& host, const ProbeResult& r,
                                  std::chrono::nanoseconds, int breaker_change) {
      std::lock_guard l(unclaimed_mu_);
      unclaimed_.push_back(host + (r.alive ? " alive " : " dead ") +
                           std::to_string(breaker_change));
    };
    checker_ = std::make_unique<MirrorHealthChecker>(std::move(o));
  }
  ~HedgeTest() override { checker_.reset(); }  // stops the probes still waiting

  std::future<HealthVerdict> CheckAsync(std::string host, std::vector<std::string> later) {
    return std::async(std::launch::async,
                      [this, host, later] { return checker_->Check(host, later, settings_, {}); });
  }
  // Waits (real time, generously) until host's probe has started; false if it never does.
  bool Started(const std::string& host) {
    std::unique_lock l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(10), [&] {
      return std::find(started_.begin(), started_.end(), host) != started_.end();
    });
  }
  std::vector<std::string> StartedProbes() {
    std::lock_guard l(mu_);
    return started_;
  }
  void Answer(const std::string& host, bool alive) {
    std::lock_guard l(mu_);
    answers_[host] = alive ? ProbeResult{true, 200, "HTTP 200"}
                           : ProbeResult{false, 0, "no answer within 2000ms"};
    cv_.notify_all();
  }
  // Waits (real time, generously) until the checker has recorded host's answer.
  bool Recorded(const std::string& host) {
    for (int i = 0; i < 2000; ++i) {
      if (!checker_->ProbeInFlight(host)) return true;
      std::this_thread::sleep_for(milliseconds(5));
    }
    return false;
  }
  std::vector<std::string> Unclaimed() {
    std::lock_guard l(unclaimed_mu_);
    return unclaimed_;
  }
  void Advance(milliseconds d) { now_ += std::chrono::nanoseconds(d).count(); }
  static bool Pending(std::future<HealthVerdict>& f) {
    return f.wait_for(milliseconds(100)) == std::future_status::timeout;
  }

  HealthSettings settings_;
  std::atomic<int64_t> now_{std::chrono::nanoseconds(std::chrono::hours(1)).count()};  // ns
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> started_;            // probes started, in order
  std::map<std::string, ProbeResult> answers_;  // given and not yet taken
  std::mutex unclaimed_mu_;
  std::vector<std::string> unclaimed_;  // what on_unclaimed_probe was told, in order
  std::unique_ptr<MirrorHealthChecker> checker_;
};

TEST_F(HedgeTest, ABlackHoledMirrorIsPassedOverOnceALaterOneIsAliveAndTheDelayHasPassed) {
  auto call = CheckAsync("m1.example", {"m2.example", "m3.example"});
  // Every mirror of the pull is probed at once.
  ASSERT_TRUE(Started("m1.example"));
  ASSERT_TRUE(Started("m2.example"));
  ASSERT_TRUE(Started("m3.example"));
  Answer("m3.example", true);
  Answer("m2.example", true);
  ASSERT_TRUE(Recorded("m2.example"));
  ASSERT_TRUE(Recorded("m3.example"));
  EXPECT_TRUE(Pending(call)) << "passed over before the hedge delay";
  Advance(milliseconds(399));
  EXPECT_TRUE(Pending(call)) << "passed over before the hedge delay";
  Advance(milliseconds(1));
  HealthVerdict v = call.get();
  EXPECT_EQ(v.action, Action::kSlow);
  EXPECT_EQ(v.alive_instead, "m2.example");  // the first alive in order
  EXPECT_EQ(v.waited, milliseconds(400));
  EXPECT_EQ(v.target, "https://m1.example/v2/");
  EXPECT_FALSE(v.probed);
  // Slow is not dead: no breaker; the next candidate is tried without another probe.
  EXPECT_FALSE(checker_->IsOpen("m1.example"));
  HealthVerdict next = checker_->Check("m2.example", {"m3.example"}, settings_, {});
  EXPECT_EQ(next.action, Action::kTry);
  EXPECT_FALSE(next.probed);
  // m1's probe ran on; only its own answer (a timeout) opens its breaker.
  Advance(milliseconds(1500));
  EXPECT_FALSE(checker_->IsOpen("m1.example"));
  Answer("m1.example", false);
  ASSERT_TRUE(Recorded("m1.example"));
  EXPECT_TRUE(checker_->IsOpen("m1.example"));
  EXPECT_EQ(checker_->Check("m1.example", {"m2.example"}, settings_, {}).action, Action::kCooldown);
  EXPECT_EQ(StartedProbes().size(), 3u);
  // Nobody waited for any of these answers: each was handed to on_unclaimed_probe (the
  // daemon's metrics), m1's with the breaker it opened.
  std::vector<std::string> told = Unclaimed();
  std::sort(told.begin(), told.begin() + 2);  // m2 and m3 answered in either order
  EXPECT_EQ(told, (std::vector<std::string>{"m2.example alive 0", "m3.example alive 0",
                                            "m1.example dead 1"}));
}

TEST_F(HedgeTest, TheFirstMirrorAnsweringWithinTheDelayIsTriedEvenIfALaterOneWasFaster) {
  auto call = CheckAsync("m1.example", {"m2.example"});
  ASSERT_TRUE(Started("m2.example"));
  Answer("m2.example", true);
  ASSERT_TRUE(Recorded("m2.example"));
  Advance(milliseconds(300));
  EXPECT_TRUE(Pending(call));
  Answer("m1.example", true);  // 300 ms: slow, alive, and first in order
  HealthVerdict v = call.get();
  EXPECT_EQ(v.action, Action::kTry);
  EXPECT_TRUE(v.probed);
  EXPECT_TRUE(v.ran_probe);  // reported by this caller, once
  EXPECT_EQ(v.probe_duration, milliseconds(300));
  EXPECT_EQ(Unclaimed(), std::vector<std::string>{"m2.example alive 0"});  // not m1: claimed
}

TEST_F(HedgeTest, ASlowMirrorThatAnswersAliveAfterBeingPassedOverStaysInService) {
  auto call = CheckAsync("m1.example", {"m2.example"});
  ASSERT_TRUE(Started("m2.example"));
  Answer("m2.example", true);
  ASSERT_TRUE(Recorded("m2.example"));
  Advance(milliseconds(450));
  EXPECT_EQ(call.get().action, Action::kSlow);
  Advance(milliseconds(800));
  Answer("m1.example", true);  // alive after 1.25 s: slow, not dead
  ASSERT_TRUE(Recorded("m1.example"));
  EXPECT_FALSE(checker_->IsOpen("m1.example"));
  // The next pull uses it first, on the strength of that answer, without probing again.
  HealthVerdict v = checker_->Check("m1.example", {"m2.example"}, settings_, {});
  EXPECT_EQ(v.action, Action::kTry);
  EXPECT_FALSE(v.probed);
  EXPECT_EQ(StartedProbes().size(), 2u);
}

TEST_F(HedgeTest, WithoutALaterMirrorAliveTheProbeIsWaitedFor) {
  auto call = CheckAsync("m1.example", {"m2.example"});
  ASSERT_TRUE(Started("m2.example"));
  Answer("m2.example", false);  // dead: no better choice
  ASSERT_TRUE(Recorded("m2.example"));
  EXPECT_TRUE(checker_->IsOpen("m2.example"));
  Advance(milliseconds(1500));
  EXPECT_TRUE(Pending(call));
  Answer("m1.example", true);
  EXPECT_EQ(call.get().action, Action::kTry);

  // The same for a mirror with no later mirrors at all: its probe decides, after any time.
  auto last = CheckAsync("m3.example", {});
  ASSERT_TRUE(Started("m3.example"));
  Advance(milliseconds(1000));
  EXPECT_TRUE(Pending(last));
  Answer("m3.example", true);
  EXPECT_EQ(last.get().action, Action::kTry);
}

TEST_F(HedgeTest, ALaterMirrorTurningAliveAfterTheDelayEndsTheWait) {
  auto call = CheckAsync("m1.example", {"m2.example"});
  ASSERT_TRUE(Started("m2.example"));
  Advance(milliseconds(1000));
  EXPECT_TRUE(Pending(call));  // past the delay, but nothing better known yet
  Answer("m2.example", true);  // m2 is slow too, and answers first
  HealthVerdict v = call.get();
  EXPECT_EQ(v.action, Action::kSlow);
  EXPECT_EQ(v.alive_instead, "m2.example");
  EXPECT_FALSE(checker_->IsOpen("m1.example"));
}

TEST_F(HedgeTest, FreshOrCoolingMirrorsCostNoProbesAndCoolingOnesDoNotCountAsAlive) {
  // m1 alive a moment ago: tried at once, and no later mirror is probed for it.
  EXPECT_EQ(checker_->Report("m1.example", true, false, settings_), 0);
  EXPECT_EQ(checker_->Check("m1.example", {"m2.example"}, settings_, {}).action, Action::kTry);
  EXPECT_TRUE(StartedProbes().empty());
  // m3's breaker is open: not probed ahead, and no reason to pass over m4.
  EXPECT_EQ(checker_->Report("m3.example", false, true, settings_), 1);
  auto call = CheckAsync("m4.example", {"m3.example"});
  ASSERT_TRUE(Started("m4.example"));
  Advance(milliseconds(1000));
  EXPECT_TRUE(Pending(call));
  Answer("m4.example", true);
  EXPECT_EQ(call.get().action, Action::kTry);
  EXPECT_EQ(StartedProbes(), std::vector<std::string>{"m4.example"});
}

TEST_F(HedgeTest, HedgeDelayZeroWaitsForTheProbeAndProbesNothingAhead) {
  settings_.hedge_delay = milliseconds(0);
  EXPECT_EQ(checker_->Report("m2.example", true, false, settings_), 0);  // m2 known alive
  auto call = CheckAsync("m1.example", {"m2.example", "m3.example"});
  ASSERT_TRUE(Started("m1.example"));
  Advance(milliseconds(1500));
  EXPECT_TRUE(Pending(call));
  Answer("m1.example", true);
  EXPECT_EQ(call.get().action, Action::kTry);
  EXPECT_EQ(StartedProbes(), std::vector<std::string>{"m1.example"});
}

TEST_F(HedgeTest, APassedOverProbeStillInFlightIsPassedOverAtOnceByTheNextPull) {
  auto first = CheckAsync("m1.example", {"m2.example"});
  ASSERT_TRUE(Started("m2.example"));
  Answer("m2.example", true);
  ASSERT_TRUE(Recorded("m2.example"));
  Advance(milliseconds(400));
  EXPECT_EQ(first.get().action, Action::kSlow);
  // Another pull: the same probe (single flight), already past the delay.
  Advance(milliseconds(100));
  HealthVerdict v = checker_->Check("m1.example", {"m2.example"}, settings_, {});
  EXPECT_EQ(v.action, Action::kSlow);
  EXPECT_EQ(v.waited, milliseconds(500));
  EXPECT_EQ(StartedProbes().size(), 2u);
}

}  // namespace
}  // namespace registry_proxy
