// Cancellation: ties the upstream calls of one downstream call to that call's life.
#include "cri/call.h"

#include <algorithm>

namespace registry_proxy {

void Cancellation::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_.store(true, std::memory_order_release);
  // Under mu_, so a Scope cannot finish (and its call die) while we cancel it.
  for (Cancellable* call : active_) call->Cancel();
}

Cancellation::Scope::Scope(Cancellation* c, Cancellable* call) : c_(c), call_(call) {
  if (!c_) return;
  std::lock_guard lock(c_->mu_);
  // A call cancelled before it starts must stop as soon as it starts: the implementation
  // remembers a Cancel that came first (gRPC's ClientContext does), so a late registration
  // still stops.
  if (c_->cancelled_.load(std::memory_order_acquire)) call_->Cancel();
  c_->active_.push_back(call_);
}

Cancellation::Scope::~Scope() {
  if (!c_) return;
  std::lock_guard lock(c_->mu_);
  auto it = std::find(c_->active_.begin(), c_->active_.end(), call_);
  if (it != c_->active_.end()) c_->active_.erase(it);
}

}  // namespace registry_proxy
