#include "rules/config_store.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <filesystem>
#include <system_error>
#include <utility>

#include "spdlog/spdlog.h"

namespace registry_proxy {

namespace {

// Any change of a directory entry counts: ConfigMap updates rename a `..data` symlink, editors
// rename a temp file over the config, `cp`/`>` rewrite it in place. The *_SELF events tell us
// the directory itself went away.
constexpr uint32_t kWatchMask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE |
                                IN_DELETE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR;

// A burst of events that never pauses for `settle` still reloads after this many settles, so a
// process that rewrites the file constantly cannot hold off every reload.
constexpr int kMaxSettles = 10;

std::string ShortSha(const std::string& sha) { return sha.substr(0, 12); }

std::string ErrnoText(int err) { return std::error_code(err, std::generic_category()).message(); }

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::shared_ptr<const Config> PassthroughConfig(const std::string& path) {
  auto config = std::make_shared<Config>();
  config->policy = Policy::Passthrough();
  config->source = path;
  return config;
}

}  // namespace

std::string_view ReloadResultName(ReloadResult r) {
  switch (r) {
    case ReloadResult::kApplied:
      return "applied";
    case ReloadResult::kUnchanged:
      return "unchanged";
    case ReloadResult::kRejected:
      return "rejected";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------
// ConfigStore

// Snapshot publication: readers copy a shared_ptr under mu_ (a few ns, never contended for
// long: nothing but pointer and counter updates happen under it). std::atomic<shared_ptr>
// exists in g++ 12 but is a lock-bit spin inside libstdc++ that TSan does not model; a mutex is
// as cheap here and plainly correct.
ConfigStore::ConfigStore(std::string path)
    : path_(std::move(path)), current_(PassthroughConfig(path_)) {}

ReloadResult ConfigStore::Reload() {
  std::lock_guard<std::mutex> reload_lock(reload_mu_);
  // File I/O and parsing happen outside mu_: readers never wait for them.
  ConfigLoad load = LoadConfigFile(path_);

  ReloadResult result;
  ReloadStats stats;
  Listener listener;
  std::string in_force;                // what stays in force after a rejection, for the log
  std::shared_ptr<const Config> prev;  // the replaced snapshot, released outside mu_
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!load.ok()) {
      result = ReloadResult::kRejected;
      ++stats_.rejected;
      stats_.last_error = load.ErrorText();
      if (stats_.last_error.empty()) stats_.last_error = path_ + ": config could not be loaded";
      in_force = has_good_ ? "generation " + std::to_string(stats_.generation) + " (sha256 " +
                                 ShortSha(current_->content_sha256) + ")"
                           : std::string("passthrough (no good config was ever loaded)");
    } else if (has_good_ && load.config->content_sha256 == current_->content_sha256) {
      result = ReloadResult::kUnchanged;
      ++stats_.unchanged;
      // The file is good again (e.g. a broken edit was reverted): the old error is stale.
      stats_.last_error.clear();
    } else {
      result = ReloadResult::kApplied;
      prev = std::exchange(current_, load.config);
      has_good_ = true;
      ++stats_.applied;
      ++stats_.generation;
      stats_.applied_unix_ms = NowUnixMs();
      stats_.last_error.clear();
    }
    stats = stats_;
    listener = listener_;
  }

  switch (result) {
    case ReloadResult::kRejected:
      // Loud and greppable: one line per error (file:line:col: field: message), then a summary.
      for (const ConfigError& e : load.errors) spdlog::error("config rejected: {}", e.ToString());
      spdlog::error("config {} REJECTED ({} error(s)); keeping {}", path_,
                    std::max<size_t>(load.errors.size(), 1), in_force);
      break;
    case ReloadResult::kUnchanged:
      spdlog::info("config {} unchanged (generation {}, sha256 {})", path_, stats.generation,
                   ShortSha(load.config->content_sha256));
      break;
    case ReloadResult::kApplied:
      spdlog::info("config {} applied: generation {}, {} rule(s), sha256 {}", path_,
                   stats.generation, load.config->policy->rules().size(),
                   ShortSha(load.config->content_sha256));
      break;
  }
  prev.reset();
  // Still under reload_mu_: listener calls are ordered and never concurrent.
  if (listener) listener(result, stats);
  return result;
}

std::shared_ptr<const Config> ConfigStore::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

bool ConfigStore::HasGoodConfig() const {
  std::lock_guard<std::mutex> lock(mu_);
  return has_good_;
}

ReloadStats ConfigStore::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void ConfigStore::SetListener(Listener listener) {
  std::lock_guard<std::mutex> lock(mu_);
  listener_ = std::move(listener);
}

// ---------------------------------------------------------------------------------------------
// ConfigWatcher

ConfigWatcher::ConfigWatcher(ConfigStore* store, Options options)
    : store_(store), options_(options) {
  // The directory as the path is written, not as its symlinks resolve: in a ConfigMap volume
  // config.yaml -> ..data/config.yaml and ..data is replaced on every update.
  std::filesystem::path parent = std::filesystem::path(store_->path()).parent_path();
  dir_ = parent.empty() ? "." : parent.string();
  // Created here, closed in the destructor: TriggerReload() is then valid for the whole life of
  // the object, even before Start() or after Stop(). A failure is reported by Start().
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

ConfigWatcher::~ConfigWatcher() {
  Stop();
  if (wake_fd_ >= 0) close(wake_fd_);
  wake_fd_ = -1;
}

Status ConfigWatcher::AddWatch() {
  int wd = inotify_add_watch(inotify_fd_, dir_.c_str(), kWatchMask);
  if (wd < 0) {
    return Status::Error("cannot watch config directory '" + dir_ + "': " + ErrnoText(errno));
  }
  watch_wd_ = wd;
  return Status::Ok();
}

Status ConfigWatcher::Start() {
  if (thread_.joinable()) return Status::Error("config watcher already started");
  if (wake_fd_ < 0) return Status::Error("config watcher: eventfd could not be created");
  inotify_fd_ = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (inotify_fd_ < 0) return Status::Error("inotify_init1: " + ErrnoText(errno));
  if (Status s = AddWatch(); !s.ok()) {
    close(inotify_fd_);
    inotify_fd_ = -1;
    return s;
  }
  stopping_.store(false);
  thread_ = std::thread([this] { Run(); });
  spdlog::info("watching {} for changes to {} (settle {} ms)", dir_, store_->path(),
               options_.settle.count());
  return Status::Ok();
}

void ConfigWatcher::TriggerReload() {
  // Async-signal-safe: one write(2), errno preserved for the interrupted code.
  int saved_errno = errno;
  uint64_t one = 1;
  if (wake_fd_ >= 0) {
    ssize_t n = write(wake_fd_, &one, sizeof(one));
    (void)n;  // only fails if the counter is near 2^64: a wake-up is pending anyway
  }
  errno = saved_errno;
}

void ConfigWatcher::Stop() {
  if (thread_.joinable()) {
    stopping_.store(true);
    uint64_t one = 1;
    ssize_t n = write(wake_fd_, &one, sizeof(one));
    (void)n;
    thread_.join();
    // Drop the wake-up we just wrote (and any trigger nobody will serve now) so that a later
    // Start() does not begin with a spurious reload.
    uint64_t drained;
    n = read(wake_fd_, &drained, sizeof(drained));
    (void)n;
  }
  if (inotify_fd_ >= 0) close(inotify_fd_);  // also drops the watch
  inotify_fd_ = -1;
  watch_wd_ = -1;
  stopping_.store(false);
}

void ConfigWatcher::Run() {
  using Clock = std::chrono::steady_clock;
  const auto settle = std::max(options_.settle, std::chrono::milliseconds(0));
  // Never spin while the directory is gone, whatever the options say.
  const auto rewatch = std::max(options_.rewatch_interval, std::chrono::milliseconds(10));
  constexpr Clock::time_point kNever = Clock::time_point::max();
  Clock::time_point due = kNever;  // when to reload; kNever = nothing pending
  Clock::time_point burst_start;   // first event since the last reload
  Clock::time_point next_rewatch;  // while the directory is not watched

  // Debounce: each event pushes the reload to `settle` after it, capped for endless bursts.
  auto schedule = [&](Clock::time_point now) {
    if (due == kNever) burst_start = now;
    due = std::min(now + settle, burst_start + kMaxSettles * settle);
  };

  alignas(struct inotify_event) char buf[8192];
  while (!stopping_.load()) {
    Clock::time_point now = Clock::now();
    if (watch_wd_ < 0 && now >= next_rewatch) {
      if (AddWatch().ok()) {
        spdlog::info("config directory {} is back; watching it again", dir_);
        schedule(now);  // the file may have changed while nobody watched
      } else {
        next_rewatch = now + rewatch;
      }
    }
    if (due != kNever && now >= due) {
      due = kNever;
      store_->Reload();  // logs and notifies the listener itself
      continue;
    }

    // Sleep in poll(): forever when idle (no CPU at all), else until the next deadline.
    Clock::time_point wake_at = due;
    if (watch_wd_ < 0) wake_at = std::min(wake_at, next_rewatch);
    int timeout_ms = -1;
    if (wake_at != kNever) {
      auto ms = std::chrono::ceil<std::chrono::milliseconds>(wake_at - now).count();
      timeout_ms = static_cast<int>(std::clamp<int64_t>(ms, 0, INT_MAX));
    }
    pollfd fds[2] = {{inotify_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    int ready = poll(fds, 2, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) continue;
      spdlog::error("config watcher: poll failed ({}); no more live reloads", ErrnoText(errno));
      return;
    }
    if (stopping_.load()) break;
    if ((fds[0].revents | fds[1].revents) & (POLLERR | POLLNVAL)) {
      // Cannot happen with a healthy inotify fd and eventfd; never spin on it.
      spdlog::error("config watcher: descriptor error; no more live reloads");
      return;
    }
    now = Clock::now();

    if (fds[1].revents & POLLIN) {
      uint64_t count;
      if (read(wake_fd_, &count, sizeof(count)) == static_cast<ssize_t>(sizeof(count))) {
        schedule(now);
      }
    }
    if (fds[0].revents & POLLIN) {
      // Drain everything queued; the content hash decides later whether anything changed.
      bool any = false;
      bool lost = false;
      for (;;) {
        ssize_t len = read(inotify_fd_, buf, sizeof(buf));
        if (len <= 0) break;  // EAGAIN: drained
        for (char* p = buf; p < buf + len;) {
          auto* ev = reinterpret_cast<struct inotify_event*>(p);
          p += sizeof(struct inotify_event) + ev->len;
          if (ev->mask & IN_Q_OVERFLOW) {  // events were lost: reload to be sure
            any = true;
            continue;
          }
          if (watch_wd_ < 0 || ev->wd != watch_wd_) continue;  // from a watch we dropped
          any = true;
          if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED)) {
            // The watch follows the inode, but we care about the path: drop the watch (a
            // moved directory would otherwise keep reporting from its new place) and re-add
            // it by name, now and then every rewatch_interval until the path is back.
            inotify_rm_watch(inotify_fd_, watch_wd_);
            watch_wd_ = -1;
            lost = true;
          }
        }
      }
      if (lost) {
        spdlog::warn(
            "config directory {} disappeared; keeping the config in force, watching for it "
            "to come back",
            dir_);
        next_rewatch = now;  // try at once: it may already have been replaced
      }
      if (any) schedule(now);
    }
  }
}

}  // namespace registry_proxy
