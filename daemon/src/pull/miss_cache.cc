#include "pull/miss_cache.h"

#include <algorithm>
#include <utility>

namespace registry_proxy {

StatusMissCache::StatusMissCache(size_t max_entries)
    : max_entries_(std::max<size_t>(1, max_entries)) {}

std::shared_ptr<const StatusMissCache::Entry> StatusMissCache::Get(
    const std::shared_ptr<const Config>& config, const std::string& image, const Compute& compute) {
  {
    std::lock_guard lock(mu_);
    if (snapshot_ == config) {
      auto it = entries_.find(image);
      if (it != entries_.end()) return it->second;
    }
  }
  auto entry = std::make_shared<const Entry>(compute(*config, image));
  std::lock_guard lock(mu_);
  ++computed_;
  if (snapshot_ != config) {
    // Another snapshot (a reload, or a call that took the previous one just before it): the
    // entries always belong to the snapshot held, so what is remembered is never stale.
    entries_.clear();
    snapshot_ = config;
  }
  if (entries_.size() >= max_entries_) entries_.clear();
  entries_.emplace(image, entry);
  return entry;
}

size_t StatusMissCache::size() const {
  std::lock_guard lock(mu_);
  return entries_.size();
}

size_t StatusMissCache::computed() const {
  std::lock_guard lock(mu_);
  return computed_;
}

}  // namespace registry_proxy
