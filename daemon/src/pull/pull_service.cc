#include "pull/pull_service.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "base/string_util.h"
#include "pull/attempt_error.h"
#include "rules/config_store.h"
#include "rules/policy.h"
#include "rules/reference.h"

namespace registry_proxy {
namespace {

using std::chrono::milliseconds;
using SteadyClock = std::chrono::steady_clock;
using SysClock = std::chrono::system_clock;

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

// Why a health verdict skips the mirror, for the log, the observer and the caller's message.
std::pair<SkipReason, std::string> SkipOf(const HealthVerdict& hv) {
  switch (hv.action) {
    case HealthVerdict::Action::kCooldown:
      return {SkipReason::kCooldown, "circuit breaker open (" +
                                         std::to_string(hv.cooldown_left.count()) +
                                         "ms of cooldown left)"};
    case HealthVerdict::Action::kSlow:
      return {SkipReason::kSlow, "slow: probe " + hv.target + " has not answered in " +
                                     std::to_string(hv.waited.count()) + "ms and mirror " +
                                     hv.alive_instead +
                                     " is alive (for this pull only; the probe goes on)"};
    case HealthVerdict::Action::kNoTime:
      return {SkipReason::kNoTime, "the deadline passed while probing it"};
    default:  // kDead (kTry and kCancelled skip nothing)
      return {SkipReason::kProbeFailed, "probe " + hv.target + " failed: " + hv.probe.detail};
  }
}

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
    r = {RpcStatus(RpcCode::INTERNAL, std::string("registry-proxy: internal error: ") + e.what()),
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

// One rewritten PullImage call walking its plan: the Decision's candidates in order (mirrors as
// the rule lists them, then upstream). Each candidate gets one turn (TryMirror, TryUpstream)
// that either answers the call or records why the candidate failed or was skipped. Whether a
// mirror is skipped is decided at its turn, not ahead: its credentials and its probe matter only
// if every earlier candidate failed, and a probe spends the pull's deadline.
class PullService::PullRun {
 public:
  // The call as the caller made it.
  struct Call {
    CriVersion v;
    const std::string& request;  // the caller's bytes
    const CallOptions& opts;
    PullTally* tally;
  };

  // Forwards the caller's own bytes: containerd sees exactly the request kubelet sent.
  static InterceptResult Forward(PullService* s, const Call& call, std::string_view image,
                                 std::string_view ns, std::string_view why, bool auth);

  // `config` and `d` (which points into it) must outlive the run.
  PullRun(PullService* s, const Call& call, const runtime::v1::PullImageRequest& req,
          const Config& config, const Decision& d, std::string_view ns, bool auth);

  InterceptResult Run();

 private:
  // One candidate's turn.
  struct Turn {
    size_t i;  // its index in the plan
    const Candidate& c;
    std::string_view target;  // the mirror host, or "upstream"
    SteadyClock::time_point start;
    CallOptions opts;  // the attempt's deadline
  };
  enum class Gate { kTry, kSkip, kCancelled };

  bool OutOfTime() const;
  void GiveUp(size_t i);
  Turn StartTurn(size_t i) const;
  std::optional<InterceptResult> TryUpstream(const Turn& t);
  std::optional<InterceptResult> TryMirror(const Turn& t);
  std::string AddMirrorCredentials(const Candidate& c, runtime::v1::PullImageRequest* mreq,
                                   bool* with_auth) const;
  Gate CheckHealth(const Turn& t);
  RpcStatus PullFromMirror(const Turn& t, const runtime::v1::PullImageRequest& mreq,
                           runtime::v1::PullImageResponse* resp);
  InterceptResult Served(const Turn& t, const runtime::v1::PullImageResponse& resp);
  InterceptResult Unserved();
  InterceptResult CallerCancelled();

  // What happened, for the logs, the observer and the caller's message.
  bool OwnDeadlineHit(const Turn& t, const RpcStatus& s) const;
  void LogAttempt(const Turn& t, const RpcStatus& s, bool with_auth) const;
  void CountAttempt(const Turn& t, const RpcStatus& s);
  void RecordNoCredentials(const Turn& t, const std::string& problem);
  void RecordSkip(const Turn& t, SkipReason reason, const std::string& skip);
  void ReportProbe(const std::string& host, const HealthVerdict& hv) const;
  void ReportToBreaker(const Turn& t, const RpcStatus& s, const AttemptVerdict& verdict) const;
  void FailedAt(std::string_view where, std::string_view why, bool down);

  PullService* const s_;
  const Call call_;
  const runtime::v1::PullImageRequest& req_;
  const Config& config_;
  const Decision& d_;
  const size_t n_;   // candidates
  const bool auth_;  // the caller sent credentials (for the original registry)
  const PullLog log_;
  const HealthSettings health_;
  PullObserver* const obs_;
  // The whole call's deadline: the caller's, or node.pullTimeout from now when sooner.
  SysClock::time_point overall_;

  RpcStatus last_{RpcCode::UNKNOWN, "registry-proxy: no candidate was tried"};
  bool attempted_ = false;  // whether `last_` is an attempt's error
  bool stop_ = false;       // no further candidate is to be tried
  // For staleIfError: whether every candidate was down (unreachable or broken), and what
  // happened at each, briefly.
  bool all_down_ = true;
  std::string what_failed_;
  // For the caller's message: what happened at each candidate, briefly ("mirror m1: down
  // (connection refused)"); the step whose error is `last_` gets that error's whole message.
  CandidateSteps steps_;
};

InterceptResult PullService::PullRun::Forward(PullService* s, const Call& call,
                                              std::string_view image, std::string_view ns,
                                              std::string_view why, bool auth) {
  const auto start = s->Now();
  InterceptResult r;
  r.status = s->cri_->PullImageRaw(call.v, call.request, call.opts, &r.response);
  spdlog::info("pull {}: {}; forwarded unchanged; namespace={} auth={} {}ms: {}", LogSafe(image),
               LogSafe(why), LogSafe(ns), auth ? "yes" : "no", Ms(s->Now() - start),
               Outcome(r.status));
  if (PullObserver* obs = s->options_.observer) {
    obs->OnAttempt("", "upstream", r.status.error_code(), s->Now() - start);
  }
  call.tally->attempts = 1;
  call.tally->outcome = PullOutcome::kPassthrough;
  if (!r.status.ok()) r.response.clear();
  return r;
}

PullService::PullRun::PullRun(PullService* s, const Call& call,
                              const runtime::v1::PullImageRequest& req, const Config& config,
                              const Decision& d, std::string_view ns, bool auth)
    : s_(s),
      call_(call),
      req_(req),
      config_(config),
      d_(d),
      n_(d.candidates.size()),
      auth_(auth),
      log_{LogSafe(req.image().image()), LogSafe(ns), d.rule ? d.rule->origin : "-"},
      health_{config.node.mirror_probe, config.node.mirror_probe_timeout,
              config.node.mirror_cooldown, config.node.containerd_hosts_dir,
              config.node.mirror_hedge_delay},
      obs_(s->options_.observer),
      overall_(call.opts.deadline) {
  call_.tally->rule = d.rule ? d.rule->match : "";
  if (config.node.pull_timeout.count() > 0) {
    overall_ = std::min(overall_, SysClock::now() + config.node.pull_timeout);
  }
}

InterceptResult PullService::PullRun::Run() {
  for (size_t i = 0; i < n_; ++i) {
    if (Cancelled(call_.opts)) return CallerCancelled();
    if (i > 0 && OutOfTime()) {
      GiveUp(i);
      break;
    }
    const Turn t = StartTurn(i);
    std::optional<InterceptResult> answer = t.c.upstream ? TryUpstream(t) : TryMirror(t);
    if (answer) return *std::move(answer);
    if (stop_) break;
  }
  return Unserved();
}

bool PullService::PullRun::OutOfTime() const {
  return overall_ != SysClock::time_point::max() && SysClock::now() >= overall_;
}

// Every further attempt would fail at once with DEADLINE_EXCEEDED: the rest are not tried.
void PullService::PullRun::GiveUp(size_t i) {
  for (size_t j = i; j < n_; ++j) {
    if (d_.candidates[j].upstream) continue;
    if (obs_) obs_->OnMirrorSkipped(d_.candidates[j].mirror->host, SkipReason::kNoTime);
  }
  spdlog::warn("pull {}: {} deadline passed; {} candidate(s) not tried", log_.image,
               call_.opts.deadline <= overall_ ? "the caller's" : "node.pullTimeout's", n_ - i);
  all_down_ = false;
}

PullService::PullRun::Turn PullService::PullRun::StartTurn(size_t i) const {
  const Candidate& c = d_.candidates[i];
  Turn t{i, c, c.upstream ? std::string_view("upstream") : c.mirror->host, s_->Now(), call_.opts};
  // This attempt's deadline: the call's, or node.pullAttemptTimeout from now when sooner.
  t.opts.deadline = overall_;
  if (config_.node.pull_attempt_timeout.count() > 0) {
    t.opts.deadline =
        std::min(t.opts.deadline, SysClock::now() + config_.node.pull_attempt_timeout);
  }
  return t;
}

// The upstream candidate is the caller's image unchanged, with the caller's credentials if any:
// forward the caller's bytes.
std::optional<InterceptResult> PullService::PullRun::TryUpstream(const Turn& t) {
  InterceptResult r;
  r.status = s_->cri_->PullImageRaw(call_.v, call_.request, t.opts, &r.response);
  LogAttempt(t, r.status, auth_);
  CountAttempt(t, r.status);
  if (r.status.ok()) {
    call_.tally->outcome = PullOutcome::kFallback;  // every mirror failed or was skipped
    return r;
  }
  const AttemptVerdict verdict =
      ClassifyAttempt(r.status, OwnDeadlineHit(t, r.status), Cancelled(call_.opts));
  FailedAt("upstream", Outcome(r.status), verdict.cls == AttemptClass::kMirrorDown);
  last_ = r.status;
  if (Cancelled(call_.opts)) return CallerCancelled();
  steps_.Add("upstream " + d_.original->domain, DescribeAttempt(verdict), true);
  return std::nullopt;
}

// A mirror: the caller's request (unknown fields included), another image, no auth but the
// mirror's own.
std::optional<InterceptResult> PullService::PullRun::TryMirror(const Turn& t) {
  runtime::v1::PullImageRequest mreq = req_;
  mreq.mutable_image()->set_image(t.c.image);
  mreq.clear_auth();
  bool with_auth = false;
  if (std::string problem = AddMirrorCredentials(t.c, &mreq, &with_auth); !problem.empty()) {
    RecordNoCredentials(t, problem);
    return std::nullopt;
  }
  switch (CheckHealth(t)) {
    case Gate::kTry:
      break;
    case Gate::kSkip:
      return std::nullopt;
    case Gate::kCancelled:
      return CallerCancelled();
  }
  runtime::v1::PullImageResponse resp;
  const RpcStatus s = PullFromMirror(t, mreq, &resp);
  LogAttempt(t, s, with_auth);
  CountAttempt(t, s);
  const AttemptVerdict verdict = ClassifyAttempt(s, OwnDeadlineHit(t, s), Cancelled(call_.opts));
  ReportToBreaker(t, s, verdict);
  if (s.ok()) return Served(t, resp);
  last_ = s;
  if (Cancelled(call_.opts)) return CallerCancelled();
  FailedAt(t.c.mirror->host, Outcome(s), verdict.cls == AttemptClass::kMirrorDown);
  steps_.Add("mirror " + t.c.mirror->host, DescribeAttempt(verdict), true);
  if (verdict.cls == AttemptClass::kContainerdFailed) {
    // No other candidate can do better, and none is to blame: stop here.
    spdlog::warn("pull {}: containerd itself failed ({}); no further candidate tried", log_.image,
                 verdict.detail);
    stop_ = true;
  }
  return std::nullopt;
}

// Puts the mirror's own credentials (node.credentialsFile) into `mreq`. Returns "" when it
// needs none or they were found; else why they cannot be had.
std::string PullService::PullRun::AddMirrorCredentials(const Candidate& c,
                                                       runtime::v1::PullImageRequest* mreq,
                                                       bool* with_auth) const {
  if (c.mirror->credentials.empty()) return "";
  const std::string& name = c.mirror->credentials;
  const std::string& path = config_.node.credentials_file;
  if (path.empty()) return "node.credentialsFile is not set";
  auto creds = s_->options_.credentials(path);
  if (!creds.ok()) return "the credentials file cannot be used: " + creds.error();
  const RegistryAuth* a = (*creds)->Find(name);
  if (a == nullptr) return "the credentials file " + path + " has no entry '" + name + "'";
  runtime::v1::AuthConfig* out = mreq->mutable_auth();
  out->set_username(a->username);
  out->set_password(a->password);
  out->set_auth(a->auth);
  out->set_identity_token(a->identity_token);
  *with_auth = true;
  return "";
}

// Is the mirror worth handing to containerd? (Cheap unless a probe is due.)
PullService::PullRun::Gate PullService::PullRun::CheckHealth(const Turn& t) {
  if (!s_->options_.health) return Gate::kTry;
  std::vector<std::string> later;  // for hedging: the mirrors after this one, in order
  for (size_t j = t.i + 1; j < n_; ++j) {
    if (!d_.candidates[j].upstream) later.push_back(d_.candidates[j].mirror->domain);
  }
  const HealthVerdict hv = s_->options_.health->Check(t.c.mirror->domain, later, health_, t.opts);
  if (hv.ran_probe) ReportProbe(t.c.mirror->host, hv);
  if (hv.action == HealthVerdict::Action::kTry) return Gate::kTry;
  if (hv.action == HealthVerdict::Action::kCancelled) return Gate::kCancelled;
  const auto [reason, skip] = SkipOf(hv);
  RecordSkip(t, reason, skip);
  return Gate::kSkip;
}

// Counts the mirror name as in containerd while containerd pulls it (see MirrorPullScope).
RpcStatus PullService::PullRun::PullFromMirror(const Turn& t,
                                               const runtime::v1::PullImageRequest& mreq,
                                               runtime::v1::PullImageResponse* resp) {
  auto mref = ParseNamedReference(t.c.image);
  std::optional<MirrorPullScope> in_containerd;
  if (mref.ok()) in_containerd.emplace(s_, mref->NormalizedString());
  return s_->cri_->PullImage(call_.v, mreq, t.opts, resp);
}

// A mirror served it. If aliasing fails, the pull still succeeds: the image IS on the node
// (under the mirror name) and image_ref (its id) is what kubelet creates the container from.
// Failing would make kubelet retry the whole pull with back-off and leave the pod waiting
// although its image is here; the next ImageStatus(original) miss is repaired by
// RecoverStatus, which retries the aliasing.
InterceptResult PullService::PullRun::Served(const Turn& t,
                                             const runtime::v1::PullImageResponse& resp) {
  call_.tally->outcome = PullOutcome::kMirror;
  call_.tally->mirror = t.c.mirror->host;
  const std::string& image = req_.image().image();
  const std::string& image_ref = resp.image_ref();
  const auto alias_start = s_->Now();
  const AliasResult aliased = s_->Alias(config_, *d_.original, t.c.image);
  if (aliased == AliasResult::kFailed) {
    spdlog::error(
        "pull {}: served by mirror {} as {}, but naming it {} failed (see above); the image "
        "is on the node under the mirror name only",
        image, t.c.image, image_ref, d_.original->NormalizedString());
  } else if (aliased == AliasResult::kWritten) {
    runtime::v1::ImageStatusRequest sreq;
    sreq.mutable_image()->set_image(image);
    runtime::v1::ImageStatusResponse sresp;
    const auto wait = s_->options_.alias_wait.count();
    if (s_->WaitForStatus(call_.v, sreq, image_ref, call_.opts, &sresp)) {
      spdlog::debug("pull {}: aliased and visible after {}ms", image, Ms(s_->Now() - alias_start));
    } else if (sresp.has_image()) {
      spdlog::warn(
          "pull {}: aliased, but after {}ms CRI still shows image {} under the original name, "
          "not the pulled {}; answering anyway",
          image, wait, sresp.image().id(), image_ref);
    } else {
      spdlog::warn(
          "pull {}: aliased, but CRI did not show it within {}ms; answering anyway (image {})",
          image, wait, image_ref);
    }
  }
  return {RpcStatus::OK, resp.SerializeAsString()};
}

// Nothing served it: staleIfError's copy on the node if every candidate was down, else the last
// failure's code with its message whole, after what happened at the other candidates.
InterceptResult PullService::PullRun::Unserved() {
  if (d_.stale_if_error && all_down_ && !auth_ && !Cancelled(call_.opts)) {
    if (auto stale = s_->ServeStale(call_.v, req_.image().image(), what_failed_, call_.opts)) {
      call_.tally->outcome = PullOutcome::kStale;
      return *stale;
    }
  }
  call_.tally->outcome = PullOutcome::kFailed;
  return {
      RpcStatus(last_.error_code(), steps_.Message(last_.error_message()), last_.error_details()),
      ""};
}

InterceptResult PullService::PullRun::CallerCancelled() {
  call_.tally->outcome = PullOutcome::kCancelled;
  return InterceptResult{CancelledStatus(), ""};
}

// Whether a DEADLINE_EXCEEDED came from our own attempt deadline, not the caller's.
bool PullService::PullRun::OwnDeadlineHit(const Turn& t, const RpcStatus& s) const {
  return s.error_code() == RpcCode::DEADLINE_EXCEEDED && t.opts.deadline < call_.opts.deadline &&
         SysClock::now() >= t.opts.deadline;
}

void PullService::PullRun::LogAttempt(const Turn& t, const RpcStatus& s, bool with_auth) const {
  const NodeSettings& node = config_.node;
  std::string note;
  if (OwnDeadlineHit(t, s)) {
    note = t.opts.deadline < overall_ || overall_ == call_.opts.deadline
               ? " (node.pullAttemptTimeout " + std::to_string(node.pull_attempt_timeout.count()) +
                     "ms hit)"
               : " (node.pullTimeout " + std::to_string(node.pull_timeout.count()) + "ms hit)";
  }
  spdlog::log(s.ok() ? spdlog::level::info : spdlog::level::warn,
              "pull {}: attempt {}/{} {} ({}) namespace={} rule={} auth={} {}ms: {}{}", log_.image,
              t.i + 1, n_, t.c.image, t.c.upstream ? "upstream" : "mirror", log_.ns, log_.rule,
              with_auth ? "yes" : "no", Ms(s_->Now() - t.start), Outcome(s), note);
}

void PullService::PullRun::CountAttempt(const Turn& t, const RpcStatus& s) {
  ++call_.tally->attempts;
  attempted_ = true;
  if (obs_) obs_->OnAttempt(call_.tally->rule, t.target, s.error_code(), s_->Now() - t.start);
}

// Pulling anonymously would only earn a 401 and a misleading error; say why instead.
void PullService::PullRun::RecordNoCredentials(const Turn& t, const std::string& problem) {
  const std::string& host = t.c.mirror->host;
  last_ = RpcStatus(RpcCode::FAILED_PRECONDITION, "registry-proxy: mirror " + host +
                                                      " needs credentials '" +
                                                      t.c.mirror->credentials + "': " + problem);
  attempted_ = true;
  LogAttempt(t, last_, false);
  FailedAt(host, "needs credentials", false);
  steps_.Add("mirror " + host, "needs credentials", true);
}

void PullService::PullRun::RecordSkip(const Turn& t, SkipReason reason, const std::string& skip) {
  const std::string& host = t.c.mirror->host;
  spdlog::warn("pull {}: attempt {}/{} {} (mirror) namespace={} rule={}: skipped: {}", log_.image,
               t.i + 1, n_, t.c.image, log_.ns, log_.rule, skip);
  if (obs_) obs_->OnMirrorSkipped(host, reason);
  FailedAt(host, "skipped: " + skip, reason != SkipReason::kNoTime);
  // Out of time: what containerd answers a pull whose deadline passed (critest checks it).
  const bool no_time = reason == SkipReason::kNoTime;
  if (!attempted_ || no_time) {
    last_ = RpcStatus(no_time ? RpcCode::DEADLINE_EXCEEDED : RpcCode::UNAVAILABLE,
                      "registry-proxy: mirror " + host + " skipped: " + skip);
  }
  steps_.Add("mirror " + host, "skipped (" + skip + ")", !attempted_ || no_time, true);
}

void PullService::PullRun::ReportProbe(const std::string& host, const HealthVerdict& hv) const {
  spdlog::log(hv.probe.alive ? spdlog::level::info : spdlog::level::warn,
              "mirror {}: probe {} {} in {}ms: {}", host, hv.target,
              hv.probe.alive ? "alive" : "DEAD", Ms(hv.probe_duration), hv.probe.detail);
  if (obs_) obs_->OnProbe(host, hv.probe.alive, hv.probe_duration);
  if (hv.breaker_opened) {
    spdlog::warn("mirror {}: circuit breaker open for {}ms: probe failed", host,
                 health_.cooldown.count());
    if (obs_) obs_->OnBreaker(host, true);
  }
  if (hv.breaker_closed) {
    spdlog::info("mirror {}: circuit breaker closed: probe alive", host);
    if (obs_) obs_->OnBreaker(host, false);
  }
}

// Tells the mirror's breaker how the attempt went. containerd's own failure, or a caller gone:
// nothing to say about the mirror.
void PullService::PullRun::ReportToBreaker(const Turn& t, const RpcStatus& s,
                                           const AttemptVerdict& verdict) const {
  if (!s_->options_.health || (Cancelled(call_.opts) && !s.ok()) ||
      verdict.cls == AttemptClass::kContainerdFailed) {
    return;
  }
  const std::string& host = t.c.mirror->host;
  const bool down = verdict.cls == AttemptClass::kMirrorDown;
  const int change = s_->options_.health->Report(t.c.mirror->domain, s.ok(), down, health_);
  if (change > 0) {
    spdlog::warn("mirror {}: circuit breaker open for {}ms: {}", host, health_.cooldown.count(),
                 Outcome(s));
  } else if (change < 0) {
    spdlog::info("mirror {}: circuit breaker closed: it served {}", host, t.c.image);
  }
  if (change != 0 && obs_) obs_->OnBreaker(host, change > 0);
}

void PullService::PullRun::FailedAt(std::string_view where, std::string_view why, bool down) {
  all_down_ = all_down_ && down;
  what_failed_ += StrCat({what_failed_.empty() ? "" : "; ", where, ": ", why});
}

InterceptResult PullService::DoPullImage(CriVersion v, const std::string& request,
                                         const CallOptions& opts, PullTally* tally) {
  const PullRun::Call call{v, request, opts, tally};
  // A request that does not parse as our (subset) PullImageRequest goes to containerd as it
  // came, rather than answered by us: containerd's Go decoder may accept what ours rejects
  // (protobuf C++ refuses invalid UTF-8 in proto3 strings; gogo-generated CRI code does not
  // check), and where it rejects it too, its error is the one the node gives without us.
  runtime::v1::PullImageRequest req;
  if (!req.ParseFromString(request)) {
    return PullRun::Forward(this, call, "(unparsed)", "-",
                            "request (" + std::to_string(request.size()) + " bytes) does not parse",
                            false);
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
    return PullRun::Forward(
        this, call, image, ns,
        "not rewritten (" + std::string(ReasonName(d.reason)) + ": " + d.detail + ")", auth);
  }
  return PullRun(this, call, req, *config, d, ns, auth).Run();
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
    const std::shared_ptr<const StatusMissCache::Entry> miss =
        miss_cache_.Get(config, req.image().image(), [](const Config& c, const std::string& image) {
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
