// Holds the config in force and reloads it from its file.
//
// ConfigStore: the current immutable snapshot (shared_ptr<const Config>), swapped atomically.
// Readers take a snapshot and keep it for the whole of their work; a reload never changes a
// snapshot someone holds. A bad file never replaces a good config.
//
// ConfigWatcher: watches the config file's *directory* with inotify (Kubernetes ConfigMap
// volumes swap a `..data` symlink, which changes nothing about the file's own inode watch),
// waits for the changes to settle, then asks the store to reload.
//
// Thread safety:
// - ConfigStore: every public method may be called from any thread at any time. Current(),
//   HasGoodConfig() and Stats() take a short internal mutex (a shared_ptr copy; no I/O is ever
//   done under it), so readers never wait for a reload's file read or parse. Reload() calls
//   are serialised among themselves.
// - The listener runs on the thread that called Reload(), after the swap, outside the reader
//   mutex but still inside the Reload() serialisation: listener calls are therefore never
//   concurrent and arrive in reload order. A listener must not call Reload() (deadlock); it may
//   call Current()/Stats().
// - ConfigWatcher: Start()/Stop()/the destructor belong to one owning thread and must not be
//   called from the listener (Stop() joins the watch thread). TriggerReload() may be called
//   from any thread, and from a signal handler, at any time between construction and
//   destruction (before Start() it is remembered and served once the thread runs).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "rules/config.h"

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
  uint64_t generation = 0;      // bumps on every applied config; 0 = none ever loaded
  int64_t applied_unix_ms = 0;  // when the config in force was applied; 0 = never
  std::string last_error;       // why the last rejected load failed; "" after a success
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
  std::mutex reload_mu_;   // serialises Reload()
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
    // If the watched directory disappears (unmounted, deleted), try to watch it again this
    // often until it is back. Only then does the idle thread wake up without an event.
    std::chrono::milliseconds rewatch_interval{1000};
  };

  ConfigWatcher(ConfigStore* store, Options options);
  ~ConfigWatcher();  // Stop()s
  ConfigWatcher(const ConfigWatcher&) = delete;
  ConfigWatcher& operator=(const ConfigWatcher&) = delete;

  // Starts the watch thread. Fails if the directory cannot be watched (or if already started).
  // Start() after Stop() works.
  Status Start();
  // Asks for a reload as if the file changed (SIGHUP): it is debounced like a file event.
  // Async-signal-safe: only writes to an eventfd.
  void TriggerReload();
  // Stops and joins the watch thread (a pending debounced reload is dropped). Idempotent.
  void Stop();

 private:
  void Run();

  Status AddWatch();  // (re)watches dir_ into watch_wd_

  ConfigStore* store_;
  Options options_;
  std::string dir_;      // the directory of store_->path() as given (symlinks not resolved)
  int inotify_fd_ = -1;  // open while started
  int watch_wd_ = -1;    // -1 while the directory is not watched; owned by the watch thread
  // eventfd, open for the watcher's whole life (so a late TriggerReload() never writes to a
  // reused fd number). Every write wakes the thread: it reloads, or exits if stopping_.
  int wake_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace registry_proxy
