// Holds the config in force and reloads it from its file.
//
// ConfigStore: the current immutable snapshot (shared_ptr<const Config>), swapped atomically.
// Readers take a snapshot and keep it for the whole of their work; a reload never changes a
// snapshot someone holds. A bad file never replaces a good config.
//
// ConfigWatcher: watches the config file's *directory* with inotify (Kubernetes ConfigMap
// volumes swap a `..data` symlink, which changes nothing about the file's own inode watch),
// waits for the changes to settle, then asks the store to reload.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "config.h"

namespace registry_proxy {

enum class ReloadResult {
  kApplied,    // a new config is in force
  kUnchanged,  // the file's bytes are the same as the config in force
  kRejected,   // the file is bad (or unreadable); the previous config stays
};

std::string_view ReloadResultName(ReloadResult r);

struct ReloadStats {
  uint64_t applied = 0;
  uint64_t unchanged = 0;
  uint64_t rejected = 0;
  uint64_t generation = 0;       // bumps on every applied config; 0 = none ever loaded
  int64_t applied_unix_ms = 0;   // when the config in force was applied; 0 = never
  std::string last_error;        // why the last rejected load failed; "" after a success
};

class ConfigStore {
 public:
  // `path` is the config file. Nothing is loaded until Reload() is called.
  // Until a good config is loaded, Current() is a passthrough config: a node must still pull.
  explicit ConfigStore(std::string path);

  // Reads, validates and (if good and different) swaps in the file's config. Thread-safe;
  // concurrent reloads are serialised. Logs the outcome.
  ReloadResult Reload();

  // The config in force. Never null. Cheap; safe from any thread.
  std::shared_ptr<const Config> Current() const;
  bool HasGoodConfig() const;
  ReloadStats Stats() const;
  const std::string& path() const { return path_; }

  // Called after every reload attempt (from the reloading thread).
  using Listener = std::function<void(ReloadResult, const ReloadStats&)>;
  void SetListener(Listener listener);

 private:
  const std::string path_;
  std::mutex reload_mu_;  // serialises Reload()
  mutable std::mutex mu_;  // guards the fields below
  std::shared_ptr<const Config> current_;
  bool has_good_ = false;
  ReloadStats stats_;
  Listener listener_;
};

class ConfigWatcher {
 public:
  struct Options {
    // Wait this long after the last change before reloading (ConfigMap updates and editors
    // write in several steps).
    std::chrono::milliseconds settle{200};
  };

  ConfigWatcher(ConfigStore* store, Options options);
  ~ConfigWatcher();  // Stop()s
  ConfigWatcher(const ConfigWatcher&) = delete;
  ConfigWatcher& operator=(const ConfigWatcher&) = delete;

  // Starts the watch thread. Fails if the directory cannot be watched.
  Status Start();
  // Asks for a reload as if the file changed (SIGHUP). Async-signal-safe: only writes to an
  // eventfd.
  void TriggerReload();
  void Stop();

 private:
  void Run();

  ConfigStore* store_;
  Options options_;
  int inotify_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: 1 = reload, large value = stop
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace registry_proxy
