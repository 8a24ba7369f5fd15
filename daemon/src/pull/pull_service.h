// The pull service: the ImageInterceptor that rewrites PullImage to mirrors.
//
// PullImage: decide with the config snapshot in force (taken once per call), then try the
// candidates in order through containerd's CRI until one succeeds. When a mirror served the
// image, alias it under its original names through containerd's Images API (so kubelet's
// ImageStatus(original) hits, `crictl images` and pod status show upstream names) and answer
// only once CRI sees the original name. Requests the service leaves alone (not rewritten, or
// carrying credentials for the original registry, or not parseable here) are forwarded as the
// caller's bytes, so containerd sees exactly what it would without the daemon.
//
// ImageStatus recovery: a miss for an image a mirror could have served (e.g. a pull finished
// but the daemon died before aliasing, or aliasing failed) is repaired on the spot when a
// mirror-named copy is on the node.
//
// Logs: one line per pull attempt (original, candidate, namespace, rule, auth yes/no, duration,
// outcome); never a credential.
//
// Thread safety: every public method may be called concurrently from any number of threads.
// The service holds no per-call state; aliasing of one original name is serialised (striped
// mutexes) so concurrent pulls and status recoveries of the same image do not remove each
// other's records halfway. StatusNeedsRecovery never blocks beyond the config store's short
// snapshot mutex.
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "base/worker_threads.h"
#include "containerd/image_index.h"
#include "containerd/upstream.h"
#include "cri/interceptor.h"
#include "pull/credentials.h"
#include "pull/mirror_health.h"
#include "pull/miss_cache.h"
#include "pull/pull_observer.h"
#include "rules/config.h"

namespace registry_proxy {

class ConfigStore;

// Labels the service puts on the original-named records it creates.
inline constexpr char kCriManagedLabel[] = "io.cri-containerd.image";  // CRI's own label
inline constexpr char kCriManagedValue[] = "managed";
inline constexpr char kSourceLabel[] = "io.registry-proxy.source";  // the mirror reference

struct PullServiceOptions {
  // How long to wait after aliasing for CRI's ImageStatus to see the original name (it learns
  // of new records through events: median 0.5 ms, at most ~10 ms measured). Polls back off
  // 1, 2, 4, ... ms. When it runs out the pull still succeeds (see pull_service.cc).
  std::chrono::milliseconds alias_wait{2000};

  // After a re-pull of a present image, containerd's new mirror names stay this long after
  // the last pull that made them before they are dropped. containerd's pull of a name that
  // exists with the same target writes nothing; one that must create it writes its database
  // (two synced commits per name). So a burst of re-pulls (a rollout, a scale-up, kubelet's
  // credential re-checks) costs containerd the writes once, not per pull; meanwhile `crictl
  // images` also shows the mirror names. 0: dropped at once, after the answer.
  std::chrono::milliseconds mirror_name_linger{3000};

  // Seams for tests. Defaults: std::chrono::steady_clock::now, std::this_thread::sleep_for.
  std::function<std::chrono::steady_clock::time_point()> now;
  std::function<void(std::chrono::milliseconds)> sleep;

  // Where per-mirror credentials come from, given node.credentialsFile. Default: the file,
  // read through a CredentialsCache (re-read when it changes; see credentials.h).
  std::function<Result<std::shared_ptr<const Credentials>>(const std::string& path)> credentials;

  // Told about every pull, attempt, probe and breaker change (metrics). Not owned; may be null.
  PullObserver* observer = nullptr;

  // Mirror liveness probes and circuit breakers (MirrorHealthChecker in the daemon), asked
  // before every mirror attempt and told how it went. Not owned; null = every mirror is tried.
  MirrorHealth* health = nullptr;

  // The image names in containerd (ContainerdImageIndex in the daemon): an ImageStatus miss of a
  // rewritten image is repaired only when a mirror copy may be there. Not owned; null = always
  // look.
  const ImageNameIndex* image_index = nullptr;
};

class PullService final : public ImageInterceptor {
 public:
  using ConfigSource = std::function<std::shared_ptr<const Config>()>;
  using Options = PullServiceOptions;

  // `store`, `cri` and `records` must outlive the service. `records` works in the containerd
  // namespace CRI uses (node.containerdNamespace; see GrpcImageRecordStore).
  PullService(ConfigStore* store, CriImageBackend* cri, ImageRecordStore* records, Options options);
  // `config` must never return null (ConfigStore::Current() never does).
  PullService(ConfigSource config, CriImageBackend* cri, ImageRecordStore* records,
              Options options);
  ~PullService() override;  // waits for the mirror names still being dropped

  InterceptResult PullImage(CriVersion v, const std::string& request,
                            const CallOptions& opts) override;
  bool StatusNeedsRecovery(CriVersion v, const std::string& request,
                           const std::string& response) override;
  InterceptResult RecoverStatus(CriVersion v, const std::string& request,
                                const std::string& response, const CallOptions& opts) override;

 private:
  // What one PullImage call reports to the observer when it ends.
  struct PullTally {
    std::string rule, mirror;
    PullOutcome outcome = PullOutcome::kFailed;
    int attempts = 0;
  };
  InterceptResult DoPullImage(CriVersion v, const std::string& request, const CallOptions& opts,
                              PullTally* tally);
  class PullRun;  // one rewritten PullImage call: its candidates and attempts (.cc)
  InterceptResult DoRecoverStatus(CriVersion v, const std::string& request,
                                  const std::string& response, const CallOptions& opts);

  // Names the image `mirror_image` (a mirror reference a pull or status found on the node)
  // by `original`'s names too, and (unless keep_mirror_names) drops the mirror names.
  // kFailed: the original names may not point at it; kWritten: they do now (CRI shows them
  // after it has applied the change); kAlreadyNamed: they already did, nothing was written
  // (a re-pull of a present image: no record writes, nothing to wait for).
  enum class AliasResult { kFailed, kWritten, kAlreadyNamed };
  static std::vector<std::string> MirrorCopies(const Config& config, const Decision& d);
  AliasResult Alias(const Config& config, const Reference& original,
                    const std::string& mirror_image);
  // Polls ImageStatus(req) until it returns an image (with id `want_id`, unless empty) or
  // alias_wait runs out. `out` holds the last answer.
  bool WaitForStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                     const std::string& want_id, const CallOptions& opts,
                     runtime::v1::ImageStatusResponse* out);

  std::optional<InterceptResult> ServeStale(CriVersion v, const std::string& image,
                                            const std::string& what_failed,
                                            const CallOptions& opts);

  std::chrono::steady_clock::time_point Now() const { return options_.now(); }
  std::mutex& AliasLock(const std::string& name);

  ConfigSource config_;
  CriImageBackend* const cri_;
  ImageRecordStore* const records_;
  Options options_;
  std::shared_ptr<CredentialsCache> credentials_cache_;  // when options_.credentials is unset
  std::array<std::mutex, 64> alias_locks_;
  StatusMissCache miss_cache_;  // StatusNeedsRecovery: the rules' answer per name and snapshot

  // Pulls of each mirror record name that containerd is still running. Several pulls of one
  // image (kubelet with serializeImagePulls off, or several pods) go to containerd at once;
  // each ends by creating or updating the mirror-named record. Deleting that record while
  // another pull is still in containerd makes the other's update fail (NOT_FOUND, seen with
  // 100 concurrent pulls). So mirror names are dropped only by the last pull of a name to
  // leave: the others leave the names to drop in `pending_drop`.
  struct MirrorPulls {
    int in_flight = 0;
    std::vector<std::string> pending_drop;
  };
  class MirrorPullScope;
  void DropMirrorNames(const std::string& mirror_name, std::vector<std::string> names);
  void DeleteRecord(const std::string& name);
  std::mutex mirror_pulls_mu_;  // held while dropping names, so no pull starts meanwhile
  std::unordered_map<std::string, MirrorPulls> mirror_pulls_;  // guarded by mirror_pulls_mu_
  // A re-pull of a present image answers before containerd's new mirror names are dropped
  // (each delete is a containerd database write): they linger (options_.mirror_name_linger)
  // and one worker on late_drops_ drops them when their time is up.
  struct Lingering {
    std::chrono::steady_clock::time_point due;
    std::vector<std::string> names;
  };
  void DropLater(const std::string& mirror_name, std::vector<std::string> names);
  void DropWhenDue();  // the worker: runs until nothing lingers
  std::mutex linger_mu_;
  std::condition_variable linger_cv_;
  std::map<std::string, Lingering> lingering_;  // guarded by linger_mu_
  bool linger_worker_ = false;                  // guarded by linger_mu_
  bool stopping_ = false;                       // guarded by linger_mu_: drop all now
  WorkerThreads late_drops_{8};
};

}  // namespace registry_proxy
