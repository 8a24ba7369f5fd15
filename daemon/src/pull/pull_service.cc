#include "pull/pull_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "pull/attempt_error.h"
#include "rules/config_store.h"
#include "containerd/grpc_status.h"
#include "rules/policy.h"
#include "rules/reference.h"
#include "base/string_util.h"

namespace registry_proxy {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;

std::string Outcome(const RpcStatus& s) {
  if (s.ok()) return "OK";
  return std::string(RpcCodeName(s.error_code())) + ": " + s.error_message();
}

// Caller-supplied text for a log line: control characters escaped (no forged lines), long
// strings cut.
std::string LogSafe(std::string_view s) {
  constexpr size_t kMax = 512;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > kMax) out += "...(" + std::to_string(s.size()) + " bytes)";
  return out;
}

bool HasAuth(const runtime::v1::PullImageRequest& req) {
  if (!req.has_auth()) return false;
  const runtime::v1::AuthConfig& a = req.auth();
  return !a.username().empty() || !a.password().empty() || !a.auth().empty() ||
         !a.server_address().empty() || !a.identity_token().empty() || !a.registry_token().empty();
}

// What happened at each candidate of a pull, for the caller's message.
class CandidateSteps {
 public:
  // brief: "down (connection refused)"; is_last: this step's error is now the call's (shown
  // whole, unless brief_is_whole: a skip's brief says all).
  void Add(std::string where, std::string brief, bool is_last, bool brief_is_whole = false) {
    if (is_last) {
      last_ = steps_.size();
      last_brief_ = brief_is_whole;
    }
    steps_.push_back({std::move(where), std::move(brief)});
  }
  // One step: its error unchanged. More: "mirror m1: down (...); upstream docker.io: <error>".
  std::string Message(const std::string& last_error) const {
    if (steps_.size() <= 1 || last_ >= steps_.size()) return last_error;
    std::string out;
    for (size_t i = 0; i < steps_.size(); ++i) {
      out += StrCat({i ? "; " : "", steps_[i].first, ": ",
                     i == last_ && !last_brief_ ? std::string_view(last_error)
                                                : std::string_view(steps_[i].second)});
    }
    return out;
  }

 private:
  std::vector<std::pair<std::string, std::string>> steps_;
  size_t last_ = SIZE_MAX;
  bool last_brief_ = false;
};

bool Cancelled(const CallOptions& opts) {
  return opts.cancellation != nullptr && opts.cancellation->cancelled();
}

RpcStatus CancelledStatus() {
  return RpcStatus(RpcCode::CANCELLED, "registry-proxy: the caller cancelled the pull");
}

int64_t Ms(SteadyClock::duration d) { return std::chrono::duration_cast<milliseconds>(d).count(); }

// A rule's match covers `name` on whole path components.
bool MatchCovers(std::string_view match, std::string_view name) {
  return name.size() >= match.size() && name.substr(0, match.size()) == match &&
         (name.size() == match.size() || name[match.size()] == '/');
}

// Logging context of one PullImage call.
struct PullLog {
  std::string image;
  std::string ns;  // "-" when the request had none
  std::string rule;
};

}  // namespace

PullService::PullService(ConfigStore* store, CriImageBackend* cri, ImageRecordStore* records,
                         Options options)
    : PullService([store] { return store->Current(); }, cri, records, std::move(options)) {}

PullService::PullService(ConfigSource config, CriImageBackend* cri, ImageRecordStore* records,
                         Options options)
    : config_(std::move(config)), cri_(cri), records_(records), options_(std::move(options)) {
  if (!options_.now) options_.now = [] { return SteadyClock::now(); };
  if (!options_.sleep) options_.sleep = [](milliseconds d) { std::this_thread::sleep_for(d); };
  if (!options_.credentials) {
    credentials_cache_ = std::make_shared<CredentialsCache>();
    options_.credentials = [cache = credentials_cache_](const std::string& path) {
      return cache->Get(path);
    };
  }
}

// Counts one pull of a mirror name as in containerd for its lifetime; the last pull to
// leave drops the names an alias left pending.
class PullService::MirrorPullScope {
 public:
  MirrorPullScope(PullService* s, std::string name) : s_(s), name_(std::move(name)) {
    std::lock_guard lock(s_->mirror_pulls_mu_);
    ++s_->mirror_pulls_[name_].in_flight;
  }
  ~MirrorPullScope() {
    std::lock_guard lock(s_->mirror_pulls_mu_);
    auto it = s_->mirror_pulls_.find(name_);
    if (--it->second.in_flight > 0) return;
    std::vector<std::string> drop = std::move(it->second.pending_drop);
    s_->mirror_pulls_.erase(it);
    for (const std::string& n : drop) s_->DeleteRecord(n);
  }
  MirrorPullScope(const MirrorPullScope&) = delete;
  MirrorPullScope& operator=(const MirrorPullScope&) = delete;

 private:
  PullService* s_;
  std::string name_;
};

void PullService::DropMirrorNames(const std::string& mirror_name, std::vector<std::string> names) {
  std::lock_guard lock(mirror_pulls_mu_);
  if (auto it = mirror_pulls_.find(mirror_name); it != mirror_pulls_.end()) {
    auto& pending = it->second.pending_drop;
    for (auto& n : names) {
      if (std::find(pending.begin(), pending.end(), n) == pending.end()) pending.push_back(n);
    }
    return;  // another pull of this name is still in containerd; the last one drops them
  }
  for (const std::string& n : names) DeleteRecord(n);
}

void PullService::DeleteRecord(const std::string& name) {
  RpcStatus ds = records_->Delete(name);
  if (!ds.ok() && ds.error_code() != RpcCode::NOT_FOUND) {  // gone already: fine
    // Harmless for pulls (the original names exist); the mirror name just stays visible.
    spdlog::warn("cannot remove the mirror record {}: {}", name, Outcome(ds));
  }
}

PullService::~PullService() {
  {
    std::lock_guard lock(linger_mu_);
    stopping_ = true;  // what still lingers is dropped now, not left behind
  }
  linger_cv_.notify_all();
  late_drops_.CloseAndWait();
}

void PullService::DropLater(const std::string& mirror_name, std::vector<std::string> names) {
  {
    std::lock_guard lock(linger_mu_);
    Lingering& l = lingering_[mirror_name];
    l.due = std::chrono::steady_clock::now() + options_.mirror_name_linger;
    for (std::string& n : names) {
      if (std::find(l.names.begin(), l.names.end(), n) == l.names.end()) l.names.push_back(n);
    }
    if (linger_worker_) return;  // it sees the new entry when it next wakes
    linger_worker_ = late_drops_.Start([this] { DropWhenDue(); });
    if (linger_worker_) return;
    names = std::move(l.names);  // no thread to be had: drop now
    lingering_.erase(mirror_name);
  }
  DropMirrorNames(mirror_name, std::move(names));
}

void PullService::DropWhenDue() {
  std::unique_lock lock(linger_mu_);
  while (!lingering_.empty()) {
    auto next = std::min_element(lingering_.begin(), lingering_.end(),
                                 [](auto& a, auto& b) { return a.second.due < b.second.due; });
    if (!stopping_ && std::chrono::steady_clock::now() < next->second.due) {
      linger_cv_.wait_until(lock, next->second.due);
      continue;  // an entry may have moved or come
    }
    std::string mirror_name = next->first;
    std::vector<std::string> names = std::move(next->second.names);
    lingering_.erase(next);
    lock.unlock();
    DropMirrorNames(mirror_name, std::move(names));
    lock.lock();
  }
  linger_worker_ = false;
}

std::mutex& PullService::AliasLock(const std::string& name) {
  return alias_locks_[std::hash<std::string>{}(name) % alias_locks_.size()];
}

// Nothing may escape an interceptor (the proxy core runs it on a worker thread): the only
// exceptions possible here are allocation failures and bugs, answered as INTERNAL.
InterceptResult PullService::PullImage(CriVersion v, const std::string& request,
                                       const CallOptions& opts) {
  const auto start = Now();
  PullTally tally;
  InterceptResult r;
  try {
    r = DoPullImage(v, request, opts, &tally);
  } catch (const std::exception& e) {
    spdlog::error("pull: internal error: {}", e.what());
    r = {RpcStatus(RpcCode::INTERNAL,
                      std::string("registry-proxy: internal error: ") + e.what()),
         ""};
    tally.outcome = PullOutcome::kFailed;
  } catch (...) {
    spdlog::error("pull: internal error");
    r = {RpcStatus(RpcCode::INTERNAL, "registry-proxy: internal error"), ""};
    tally.outcome = PullOutcome::kFailed;
  }
  if (options_.observer) {
    PullReport report;
    report.rule = tally.rule;
    report.mirror = tally.mirror;
    report.outcome = tally.outcome;
    report.code = r.status.error_code();
    report.duration = Now() - start;
    report.attempts = tally.attempts;
    options_.observer->OnPull(report);
  }
  return r;
}

InterceptResult PullService::DoPullImage(CriVersion v, const std::string& request,
                                         const CallOptions& opts, PullTally* tally) {
  PullObserver* const obs = options_.observer;
  // Forwards the caller's own bytes: containerd sees exactly the request kubelet sent.
  auto forward = [&](std::string_view image, std::string_view ns, std::string_view why, bool auth) {
    const auto start = Now();
    InterceptResult r;
    r.status = cri_->PullImageRaw(v, request, opts, &r.response);
    spdlog::info("pull {}: {}; forwarded unchanged; namespace={} auth={} {}ms: {}", LogSafe(image),
                 LogSafe(why), LogSafe(ns), auth ? "yes" : "no", Ms(Now() - start),
                 Outcome(r.status));
    if (obs) obs->OnAttempt("", "upstream", r.status.error_code(), Now() - start);
    tally->attempts = 1;
    tally->outcome = PullOutcome::kPassthrough;
    if (!r.status.ok()) r.response.clear();
    return r;
  };

  // A request that does not parse as our (subset) PullImageRequest goes to containerd as it
  // came, rather than answered by us: containerd's Go decoder may accept what ours rejects
  // (protobuf C++ refuses invalid UTF-8 in proto3 strings; gogo-generated CRI code does not
  // check), and where it rejects it too, its error is the one the node gives without us.
  runtime::v1::PullImageRequest req;
  if (!req.ParseFromString(request)) {
    return forward("(unparsed)", "-",
                   "request (" + std::to_string(request.size()) + " bytes) does not parse", false);
  }
  const std::string& image = req.image().image();

  // One snapshot for the whole call: the Decision points into its Policy.
  const std::shared_ptr<const Config> config = config_();
  PullContext ctx;
  std::map<std::string, std::string> labels;
  std::string ns = "-";
  if (req.has_sandbox_config()) {
    const auto& sc = req.sandbox_config();
    ctx.namespace_name = sc.metadata().namespace_();
    labels.insert(sc.labels().begin(), sc.labels().end());
    ctx.pod_labels = &labels;
    if (!sc.metadata().namespace_().empty()) ns = sc.metadata().namespace_();
  }
  // kubelet chose any credentials for the original registry; a mirror is a third party: with
  // credentialedPulls mirror the mirrors are asked without them (or with their own), and only
  // the upstream candidate, the caller's own bytes, carries them.
  const bool auth = HasAuth(req);
  ctx.with_credentials = auth;
  const Decision d = config->policy->Decide(image, ctx);
  if (!d.rewritten()) {
    return forward(image, ns,
                   "not rewritten (" + std::string(ReasonName(d.reason)) + ": " + d.detail + ")",
                   auth);
  }

  const PullLog log{LogSafe(image), LogSafe(ns), d.rule ? d.rule->origin : "-"};
  tally->rule = d.rule ? d.rule->match : "";
  const NodeSettings& node = config->node;
  const HealthSettings health{node.mirror_probe, node.mirror_probe_timeout, node.mirror_cooldown,
                              node.containerd_hosts_dir, node.mirror_hedge_delay};
  // The whole call's deadline: the caller's, or node.pullTimeout from now when sooner.
  using SysClock = std::chrono::system_clock;
  const SysClock::time_point none = SysClock::time_point::max();
  SysClock::time_point overall = opts.deadline;
  if (node.pull_timeout.count() > 0)
    overall = std::min(overall, SysClock::now() + node.pull_timeout);
  auto cancelled = [&] {
    tally->outcome = PullOutcome::kCancelled;
    return InterceptResult{CancelledStatus(), ""};
  };

  const size_t n = d.candidates.size();
  RpcStatus last(RpcCode::UNKNOWN, "registry-proxy: no candidate was tried");
  bool attempted = false;  // whether `last` is an attempt's error
  // For staleIfError: whether every candidate was down (unreachable or broken), and what
  // happened at each, briefly.
  bool all_down = true;
  std::string what_failed;
  auto failed_at = [&](std::string_view where, std::string_view why, bool down) {
    all_down = all_down && down;
    what_failed += StrCat({what_failed.empty() ? "" : "; ", where, ": ", why});
  };
  // For the caller's message: what happened at each candidate, briefly ("mirror m1: down
  // (connection refused)"); the step whose error is `last` gets that error's whole message.
  CandidateSteps steps;
  for (size_t i = 0; i < n; ++i) {
    const Candidate& c = d.candidates[i];
    if (Cancelled(opts)) return cancelled();
    if (overall != none && SysClock::now() >= overall && i > 0) {
      // Every further attempt would fail at once with DEADLINE_EXCEEDED.
      for (size_t j = i; j < n; ++j) {
        if (d.candidates[j].upstream) continue;
        if (obs) obs->OnMirrorSkipped(d.candidates[j].mirror->host, SkipReason::kNoTime);
      }
      spdlog::warn("pull {}: {} deadline passed; {} candidate(s) not tried", log.image,
                   opts.deadline <= overall ? "the caller's" : "node.pullTimeout's", n - i);
      all_down = false;
      break;
    }
    const auto start = Now();
    // This attempt's deadline: the call's, or node.pullAttemptTimeout from now when sooner.
    CallOptions aopts = opts;
    aopts.deadline = overall;
    if (node.pull_attempt_timeout.count() > 0) {
      aopts.deadline = std::min(aopts.deadline, SysClock::now() + node.pull_attempt_timeout);
    }
    // Whether a DEADLINE_EXCEEDED came from our own attempt deadline, not the caller's.
    auto own_deadline_hit = [&](const RpcStatus& s) {
      return s.error_code() == RpcCode::DEADLINE_EXCEEDED &&
             aopts.deadline < opts.deadline && SysClock::now() >= aopts.deadline;
    };
    const std::string_view target = c.upstream ? std::string_view("upstream") : c.mirror->host;
    auto log_attempt = [&](const RpcStatus& s, bool with_auth) {
      auto level = s.ok() ? spdlog::level::info : spdlog::level::warn;
      std::string note;
      if (own_deadline_hit(s)) {
        note = aopts.deadline < overall || overall == opts.deadline
                   ? " (node.pullAttemptTimeout " +
                         std::to_string(node.pull_attempt_timeout.count()) + "ms hit)"
                   : " (node.pullTimeout " + std::to_string(node.pull_timeout.count()) + "ms hit)";
      }
      spdlog::log(level, "pull {}: attempt {}/{} {} ({}) namespace={} rule={} auth={} {}ms: {}{}",
                  log.image, i + 1, n, c.image, c.upstream ? "upstream" : "mirror", log.ns,
                  log.rule, with_auth ? "yes" : "no", Ms(Now() - start), Outcome(s), note);
    };
    auto count_attempt = [&](const RpcStatus& s) {
      ++tally->attempts;
      attempted = true;
      if (obs) obs->OnAttempt(tally->rule, target, s.error_code(), Now() - start);
    };

    if (c.upstream) {
      // The upstream candidate is the caller's image unchanged, with the caller's credentials
      // if any: forward the caller's bytes.
      InterceptResult r;
      r.status = cri_->PullImageRaw(v, request, aopts, &r.response);
      log_attempt(r.status, auth);
      count_attempt(r.status);
      if (r.status.ok()) {
        tally->outcome = PullOutcome::kFallback;  // every mirror failed or was skipped
        return r;
      }
      const AttemptVerdict verdict =
          ClassifyAttempt(r.status, own_deadline_hit(r.status), Cancelled(opts));
      failed_at("upstream", Outcome(r.status), verdict.cls == AttemptClass::kMirrorDown);
      last = r.status;
      if (Cancelled(opts)) return cancelled();
      steps.Add("upstream " + d.original->domain, DescribeAttempt(verdict), true);
      continue;
    }

    // A mirror: the caller's request (unknown fields included), another image, no auth but
    // the mirror's own.
    runtime::v1::PullImageRequest mreq = req;
    mreq.mutable_image()->set_image(c.image);
    mreq.clear_auth();
    bool with_auth = false;
    if (!c.mirror->credentials.empty()) {
      const std::string& name = c.mirror->credentials;
      const std::string& path = config->node.credentials_file;
      std::string problem;
      if (path.empty()) {
        problem = "node.credentialsFile is not set";
      } else if (auto creds = options_.credentials(path); !creds.ok()) {
        problem = "the credentials file cannot be used: " + creds.error();
      } else if (const RegistryAuth* a = (*creds)->Find(name); a == nullptr) {
        problem = "the credentials file " + path + " has no entry '" + name + "'";
      } else {
        runtime::v1::AuthConfig* out = mreq.mutable_auth();
        out->set_username(a->username);
        out->set_password(a->password);
        out->set_auth(a->auth);
        out->set_identity_token(a->identity_token);
        with_auth = true;
      }
      if (!problem.empty()) {
        // Pulling anonymously would only earn a 401 and a misleading error; say why instead.
        last = RpcStatus(RpcCode::FAILED_PRECONDITION,
                            "registry-proxy: mirror " + c.mirror->host + " needs credentials '" +
                                name + "': " + problem);
        attempted = true;
        log_attempt(last, false);
        failed_at(c.mirror->host, "needs credentials", false);
        steps.Add("mirror " + c.mirror->host, "needs credentials", true);
        continue;
      }
    }

    // Is the mirror worth handing to containerd? (Cheap unless a probe is due.)
    if (options_.health) {
      const std::string& key = c.mirror->domain;
      std::vector<std::string> later;  // for hedging: the mirrors after this one, in order
      for (size_t j = i + 1; j < n; ++j) {
        if (!d.candidates[j].upstream) later.push_back(d.candidates[j].mirror->domain);
      }
      HealthVerdict hv = options_.health->Check(key, later, health, aopts);
      if (hv.ran_probe) {
        spdlog::log(hv.probe.alive ? spdlog::level::info : spdlog::level::warn,
                    "mirror {}: probe {} {} in {}ms: {}", c.mirror->host, hv.target,
                    hv.probe.alive ? "alive" : "DEAD", Ms(hv.probe_duration), hv.probe.detail);
        if (obs) obs->OnProbe(c.mirror->host, hv.probe.alive, hv.probe_duration);
        if (hv.breaker_opened) {
          spdlog::warn("mirror {}: circuit breaker open for {}ms: probe failed", c.mirror->host,
                       health.cooldown.count());
          if (obs) obs->OnBreaker(c.mirror->host, true);
        }
        if (hv.breaker_closed) {
          spdlog::info("mirror {}: circuit breaker closed: probe alive", c.mirror->host);
          if (obs) obs->OnBreaker(c.mirror->host, false);
        }
      }
      std::string skip;
      SkipReason reason = SkipReason::kProbeFailed;
      switch (hv.action) {
        case HealthVerdict::Action::kTry:
          break;
        case HealthVerdict::Action::kCancelled:
          return cancelled();
        case HealthVerdict::Action::kCooldown:
          reason = SkipReason::kCooldown;
          skip = "circuit breaker open (" + std::to_string(hv.cooldown_left.count()) +
                 "ms of cooldown left)";
          break;
        case HealthVerdict::Action::kDead:
          reason = SkipReason::kProbeFailed;
          skip = "probe " + hv.target + " failed: " + hv.probe.detail;
          break;
        case HealthVerdict::Action::kSlow:
          reason = SkipReason::kSlow;
          skip = "slow: probe " + hv.target + " has not answered in " +
                 std::to_string(hv.waited.count()) + "ms and mirror " + hv.alive_instead +
                 " is alive (for this pull only; the probe goes on)";
          break;
        case HealthVerdict::Action::kNoTime:
          reason = SkipReason::kNoTime;
          skip = "the deadline passed while probing it";
          break;
      }
      if (!skip.empty()) {
        spdlog::warn("pull {}: attempt {}/{} {} (mirror) namespace={} rule={}: skipped: {}",
                     log.image, i + 1, n, c.image, log.ns, log.rule, skip);
        if (obs) obs->OnMirrorSkipped(c.mirror->host, reason);
        failed_at(c.mirror->host, "skipped: " + skip, reason != SkipReason::kNoTime);
        // Out of time: what containerd answers a pull whose deadline passed (critest checks it).
        const bool no_time = reason == SkipReason::kNoTime;
        if (!attempted || no_time) {
          last = RpcStatus(
              no_time ? RpcCode::DEADLINE_EXCEEDED : RpcCode::UNAVAILABLE,
              "registry-proxy: mirror " + c.mirror->host + " skipped: " + skip);
        }
        steps.Add("mirror " + c.mirror->host, "skipped (" + skip + ")", !attempted || no_time,
                  true);
        continue;
      }
    }

    runtime::v1::PullImageResponse resp;
    RpcStatus s;
    {
      auto mref = ParseNamedReference(c.image);
      std::optional<MirrorPullScope> in_containerd;
      if (mref.ok()) in_containerd.emplace(this, mref->NormalizedString());
      s = cri_->PullImage(v, mreq, aopts, &resp);
    }
    log_attempt(s, with_auth);
    count_attempt(s);
    const AttemptVerdict verdict = ClassifyAttempt(s, own_deadline_hit(s), Cancelled(opts));
    // containerd's own failure, or a caller gone: nothing to say about the mirror.
    if (options_.health && !(Cancelled(opts) && !s.ok()) &&
        verdict.cls != AttemptClass::kContainerdFailed) {
      const bool down = verdict.cls == AttemptClass::kMirrorDown;
      const int change = options_.health->Report(c.mirror->domain, s.ok(), down, health);
      if (change > 0) {
        spdlog::warn("mirror {}: circuit breaker open for {}ms: {}", c.mirror->host,
                     health.cooldown.count(), Outcome(s));
      } else if (change < 0) {
        spdlog::info("mirror {}: circuit breaker closed: it served {}", c.mirror->host, c.image);
      }
      if (change != 0 && obs) obs->OnBreaker(c.mirror->host, change > 0);
    }
    if (!s.ok()) {
      last = s;
      if (Cancelled(opts)) return cancelled();
      failed_at(c.mirror->host, Outcome(s), verdict.cls == AttemptClass::kMirrorDown);
      steps.Add("mirror " + c.mirror->host, DescribeAttempt(verdict), true);
      if (verdict.cls == AttemptClass::kContainerdFailed) {
        // No other candidate can do better, and none is to blame: stop here.
        spdlog::warn("pull {}: containerd itself failed ({}); no further candidate tried",
                     log.image, verdict.detail);
        break;
      }
      continue;
    }
    tally->outcome = PullOutcome::kMirror;
    tally->mirror = c.mirror->host;

    // A mirror served it. If aliasing fails, the pull still succeeds: the image IS on the
    // node (under the mirror name) and image_ref (its id) is what kubelet creates the
    // container from. Failing would make kubelet retry the whole pull with back-off and leave
    // the pod waiting although its image is here; the next ImageStatus(original) miss is
    // repaired by RecoverStatus, which retries the aliasing.
    const std::string& image_ref = resp.image_ref();
    const auto alias_start = Now();
    const AliasResult aliased = Alias(*config, *d.original, c.image);
    if (aliased == AliasResult::kFailed) {
      spdlog::error(
          "pull {}: served by mirror {} as {}, but naming it {} failed (see above); the image "
          "is on the node under the mirror name only",
          image, c.image, image_ref, d.original->NormalizedString());
    } else if (aliased == AliasResult::kWritten) {
      runtime::v1::ImageStatusRequest sreq;
      sreq.mutable_image()->set_image(image);
      runtime::v1::ImageStatusResponse sresp;
      if (!WaitForStatus(v, sreq, image_ref, opts, &sresp)) {
        if (sresp.has_image()) {
          spdlog::warn(
              "pull {}: aliased, but after {}ms CRI still shows image {} under the original name, "
              "not the pulled {}; answering anyway",
              image, options_.alias_wait.count(), sresp.image().id(), image_ref);
        } else {
          spdlog::warn(
              "pull {}: aliased, but CRI did not show it within {}ms; answering anyway (image {})",
              image, options_.alias_wait.count(), image_ref);
        }
      } else {
        spdlog::debug("pull {}: aliased and visible after {}ms", image, Ms(Now() - alias_start));
      }
    }
    return {RpcStatus::OK, resp.SerializeAsString()};
  }
  if (d.stale_if_error && all_down && !auth && !Cancelled(opts)) {
    if (auto stale = ServeStale(v, image, what_failed, opts)) {
      tally->outcome = PullOutcome::kStale;
      return *stale;
    }
  }
  // The last failure's code; its message whole, after what happened at the other candidates.
  tally->outcome = PullOutcome::kFailed;
  return {
      RpcStatus(last.error_code(), steps.Message(last.error_message()), last.error_details()),
      ""};
}

// staleIfError: every candidate was down; if the requested reference is on the node, answer
// with it as containerd answers a pull of a present image (image_ref = its id).
std::optional<InterceptResult> PullService::ServeStale(CriVersion v, const std::string& image,
                                                       const std::string& what_failed,
                                                       const CallOptions& opts) {
  runtime::v1::ImageStatusRequest sreq;
  sreq.mutable_image()->set_image(image);
  runtime::v1::ImageStatusResponse sresp;
  RpcStatus s = cri_->ImageStatus(v, sreq, opts, &sresp);
  if (!s.ok() || !sresp.has_image() || sresp.image().id().empty()) {
    spdlog::info(
        "pull {}: staleIfError: every candidate was down, but the image is not on the "
        "node",
        LogSafe(image));
    return std::nullopt;
  }
  spdlog::warn(
      "pull {}: every candidate was down ({}); staleIfError: answering with the image on the "
      "node, {}",
      LogSafe(image), what_failed, sresp.image().id());
  runtime::v1::PullImageResponse resp;
  resp.set_image_ref(sresp.image().id());
  return InterceptResult{RpcStatus::OK, resp.SerializeAsString()};
}

PullService::AliasResult PullService::Alias(const Config& config, const Reference& original,
                                            const std::string& mirror_image) {
  constexpr AliasResult kFailed = AliasResult::kFailed;
  auto mref = ParseNamedReference(mirror_image);
  if (!mref.ok()) {
    spdlog::error("alias {}: mirror reference {} does not parse: {}", original.String(),
                  mirror_image, mref.error());
    return kFailed;
  }
  const std::string mirror_name = mref->NormalizedString();
  const std::string original_name = original.NormalizedString();

  std::lock_guard lock(AliasLock(original.Name()));
  // The mirror's record and the original's, in one call to containerd.
  std::vector<ImageRecord> found;
  if (RpcStatus s = records_->GetMany({mirror_name, original_name}, &found); !s.ok()) {
    spdlog::error("alias {}: cannot read the records of {}: {}", original_name, mirror_name,
                  Outcome(s));
    return kFailed;
  }
  const auto record_of = [&](const std::string& name) -> const ImageRecord* {
    auto it = std::find_if(found.begin(), found.end(),
                           [&](const ImageRecord& r) { return r.name == name; });
    return it == found.end() ? nullptr : &*it;
  };
  const ImageRecord* mirror_rec = record_of(mirror_name);
  const ImageRecord* original_rec = record_of(original_name);
  if (!mirror_rec) {
    // Another pull or recovery of this image got here first, aliased it and dropped the mirror
    // names (under this lock, so it finished). The original record says so.
    if (original_rec) return AliasResult::kWritten;
    spdlog::error("alias {}: the record of {} is gone", original_name, mirror_name);
    return kFailed;
  }
  const ImageRecord rec = *mirror_rec;
  if (rec.target_digest.empty()) {
    spdlog::error("alias {}: the record of {} has no target digest", original_name, mirror_name);
    return kFailed;
  }

  // What containerd's CRI names a pulled image: name:tag (absent for a pull by digest; with
  // tag and digest, containerd drops the tag) and name@<manifest digest>. The id record
  // (sha256:<config digest>) already exists: ids are never written or removed here.
  std::vector<std::string> names = {original_name};
  if (std::string by_digest = original.Name() + "@" + rec.target_digest;
      by_digest != original_name) {
    names.push_back(std::move(by_digest));
  }
  ImageRecord alias = rec;
  alias.labels[kCriManagedLabel] = kCriManagedValue;  // CRI picks it up fastest with this
  alias.labels[kSourceLabel] = mirror_image;
  // A re-pull of a present image: the names already say all this (reads cost no disk write).
  // A name@digest record always targets that digest; the image index tells whether it is
  // there, else containerd is asked.
  const auto same = [&](const ImageRecord& cur) {
    return cur.target_digest == alias.target_digest &&
           cur.target_media_type == alias.target_media_type && cur.labels == alias.labels;
  };
  const bool already =
      original_rec && same(*original_rec) &&
      std::all_of(names.begin() + 1, names.end(), [&](const std::string& name) {
        if (options_.image_index &&
            options_.image_index->ContainsAny(config.node.containerd_namespace, {name}) == true) {
          return true;
        }
        ImageRecord cur;
        return records_->Get(name, &cur).ok() && same(cur);
      });
  for (const std::string& name : already ? std::vector<std::string>{} : names) {
    alias.name = name;
    if (RpcStatus ps = records_->Put(alias); !ps.ok()) {
      spdlog::error("alias {}: cannot write the record {}: {}", original_name, name, Outcome(ps));
      return kFailed;  // the mirror names stay: they are all the node has
    }
  }
  if (already) {
    spdlog::debug("alias {}: already names {} ({})", original_name, rec.target_digest, mirror_name);
  } else {
    spdlog::info("alias {}: {} -> {} ({})", original_name, mirror_name, rec.target_digest,
                 names.size() == 1 ? names[0] : names[0] + ", " + names[1]);
  }
  const AliasResult done = already ? AliasResult::kAlreadyNamed : AliasResult::kWritten;

  if (config.node.keep_mirror_names) return done;
  std::vector<std::string> drop;
  for (std::string name : {mirror_name, mref->Name() + "@" + rec.target_digest}) {
    // Never an id, never a name just written (a mirror that maps onto the original itself).
    if (IsImageIdDigest(name) || std::find(names.begin(), names.end(), name) != names.end() ||
        std::find(drop.begin(), drop.end(), name) != drop.end()) {
      continue;
    }
    drop.push_back(std::move(name));
  }
  if (already) {
    // Nothing else to wait for: answer now, drop containerd's new mirror names later.
    DropLater(mirror_name, std::move(drop));
    return done;
  }
  DropMirrorNames(mirror_name, std::move(drop));
  return done;
}

bool PullService::WaitForStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                                const std::string& want_id, const CallOptions& opts,
                                runtime::v1::ImageStatusResponse* out) {
  const auto deadline = Now() + options_.alias_wait;
  // Each status call is bounded too (real time: gRPC deadlines are wall-clock).
  CallOptions poll = opts;
  poll.deadline = std::min(
      opts.deadline, std::chrono::system_clock::now() + options_.alias_wait + milliseconds(100));
  milliseconds delay{1};
  for (;;) {
    out->Clear();
    RpcStatus s = cri_->ImageStatus(v, req, poll, out);
    // An original name that pointed at an older image (a moved tag) answers at once with the
    // old id until CRI has applied the update: wait for the image just pulled.
    if (s.ok() && out->has_image() && (want_id.empty() || out->image().id() == want_id)) {
      return true;
    }
    if (!s.ok()) spdlog::debug("status {}: {}", req.image().image(), Outcome(s));
    if (Cancelled(opts)) return false;
    const auto left = deadline - Now();
    if (left <= SteadyClock::duration::zero()) return false;
    options_.sleep(std::min(delay, std::chrono::ceil<milliseconds>(left)));
    delay *= 2;
  }
}

bool PullService::StatusNeedsRecovery(CriVersion /*v*/, const std::string& request,
                                      const std::string& response) {
  try {
    runtime::v1::ImageStatusResponse resp;
    if (!resp.ParseFromString(response) || resp.has_image()) return false;
    runtime::v1::ImageStatusRequest req;
    if (!req.ParseFromString(request)) return false;
    const std::shared_ptr<const Config> config = config_();
    // The decision and the copies' names depend only on the name and the snapshot: computed
    // once per both (miss_cache.h), so the common miss is a hash lookup, as a hit is.
    const std::shared_ptr<const StatusMissCache::Entry> miss = miss_cache_.Get(
        config, req.image().image(), [](const Config& c, const std::string& image) {
          PullContext ctx;
          ctx.any_namespace = true;  // the image store is the node's, not one namespace's
          const Decision d = c.policy->Decide(image, ctx);
          StatusMissCache::Entry e;
          e.rewritten = d.rewritten();
          if (e.rewritten) e.copies = MirrorCopies(c, d);
          return e;
        });
    if (!miss->rewritten) return false;
    // The common miss, an image not on the node at all (kubelet asks before every first pull):
    // when the index knows that no mirror copy is there either, nothing is asked.
    if (options_.image_index) {
      const std::optional<bool> any =
          options_.image_index->ContainsAny(config->node.containerd_namespace, miss->copies);
      if (any.has_value()) return *any;
    }
    return true;
  } catch (...) {
    return false;  // the response goes to the caller as containerd gave it
  }
}

// Where a mirror-named copy of a rewritten image could be: the decision's mirrors, then those of
// every other rule covering the repository (rules for other namespaces may have sent it
// elsewhere).
std::vector<std::string> PullService::MirrorCopies(const Config& config, const Decision& d) {
  std::vector<std::string> names;
  auto add = [&](std::string name) {
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      names.push_back(std::move(name));
    }
  };
  for (const Candidate& c : d.candidates) {
    if (!c.upstream) add(c.image);
  }
  const std::string repo = d.original->Name();
  for (const Rule& r : config.policy->rules()) {
    if (&r == d.rule || !MatchCovers(r.match, repo)) continue;
    if (r.digest_only && d.original->digest.empty()) continue;
    for (const Mirror& m : r.mirrors) {
      if (m.RewrittenNameLength(*d.original) <= kNameTotalLengthMax) add(m.Rewrite(*d.original));
    }
  }
  return names;
}

InterceptResult PullService::RecoverStatus(CriVersion v, const std::string& request,
                                           const std::string& response, const CallOptions& opts) {
  try {
    return DoRecoverStatus(v, request, response, opts);
  } catch (const std::exception& e) {
    spdlog::error("status recovery: internal error: {}", e.what());
  } catch (...) {
    spdlog::error("status recovery: internal error");
  }
  return {RpcStatus::OK, response};
}

InterceptResult PullService::DoRecoverStatus(CriVersion v, const std::string& request,
                                             const std::string& response, const CallOptions& opts) {
  const InterceptResult unchanged{RpcStatus::OK, response};
  runtime::v1::ImageStatusRequest req;
  if (!req.ParseFromString(request)) return unchanged;
  const std::string& image = req.image().image();
  const std::shared_ptr<const Config> config = config_();
  PullContext ctx;
  ctx.any_namespace = true;
  const Decision d = config->policy->Decide(image, ctx);
  if (!d.rewritten()) return unchanged;

  const std::vector<std::string> copies = MirrorCopies(*config, d);
  spdlog::debug("status {}: missing; looking for a mirror copy ({} name(s))", image, copies.size());
  for (const std::string& candidate : copies) {
    if (Cancelled(opts)) return unchanged;
    runtime::v1::ImageStatusRequest mreq;
    mreq.mutable_image()->set_image(candidate);
    runtime::v1::ImageStatusResponse mresp;
    RpcStatus s = cri_->ImageStatus(v, mreq, opts, &mresp);
    if (!s.ok()) {
      spdlog::debug("status {}: looking for {}: {}", image, candidate, Outcome(s));
      continue;
    }
    if (!mresp.has_image()) continue;
    spdlog::info("status {}: missing, but mirror copy {} ({}) is on the node; aliasing", image,
                 candidate, mresp.image().id());
    if (Alias(*config, *d.original, candidate) == AliasResult::kFailed) return unchanged;
    runtime::v1::ImageStatusResponse out;
    if (!WaitForStatus(v, req, mresp.image().id(), opts, &out)) {
      spdlog::warn("status {}: aliased, but CRI did not show it within {}ms", image,
                   options_.alias_wait.count());
      return unchanged;
    }
    return {RpcStatus::OK, out.SerializeAsString()};
  }
  return unchanged;
}

}  // namespace registry_proxy
