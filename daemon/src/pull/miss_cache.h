// What an ImageStatus miss needs from the rules, remembered per image name and config snapshot.
//
// kubelet asks ImageStatus before every first pull, and most such calls are misses. For each miss
// the pull service decides (rules/policy: Decide) whether a rule rewrites the name and, if one
// does, which mirror-named copies of it could be on the node (PullService::MirrorCopies), then
// asks the image index whether any of them is. The index answer changes with every pull; the
// decision and the names do not: they are a pure function of the image name and the config
// snapshot. So they are computed once per (snapshot, name) and the common miss is a hash lookup
// on the relay's event loop, as a hit is (BENCHMARKS.md, "ImageStatus miss cache").
//
// Invalidation: snapshots are immutable (rules/config_store.h) and a reload installs a new one,
// so an entry is valid exactly while the snapshot it was computed with is the one in force. The
// cache keeps that snapshot (a shared_ptr: its address cannot be reused while held) and clears
// everything when asked with another. Bound: at most `max_entries` names; the cache is cleared
// when full (names kubelet asks about are the node's images: few; a flood of distinct names
// costs what it cost without the cache).
//
// Thread safety: every method may be called from any thread. The lock is held for the lookup and
// the insert only; the computation runs outside it (two threads missing the same new name may
// both compute it: the same answer).
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "rules/config.h"

namespace registry_proxy {

class StatusMissCache {
 public:
  struct Entry {
    bool rewritten = false;           // a rule rewrites the name
    std::vector<std::string> copies;  // where a mirror-named copy could be (when rewritten)
  };
  using Compute = std::function<Entry(const Config& config, const std::string& image)>;

  static constexpr size_t kDefaultMaxEntries = 4096;
  explicit StatusMissCache(size_t max_entries = kDefaultMaxEntries);

  // The entry for `image` under `config` (never null), computed with `compute` when not known.
  // An exception from `compute` propagates and nothing is stored.
  std::shared_ptr<const Entry> Get(const std::shared_ptr<const Config>& config,
                                   const std::string& image, const Compute& compute);

  // For tests: how many names are remembered, and how many times `compute` ran.
  size_t size() const;
  size_t computed() const;

 private:
  const size_t max_entries_;
  mutable std::mutex mu_;
  std::shared_ptr<const Config> snapshot_;  // guarded by mu_: what the entries were computed with
  std::unordered_map<std::string, std::shared_ptr<const Entry>> entries_;  // guarded by mu_
  size_t computed_ = 0;                                                    // guarded by mu_
};

}  // namespace registry_proxy
