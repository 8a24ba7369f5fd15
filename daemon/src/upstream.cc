// Cancellation: ties the upstream calls of one downstream call to that call's life.
#include "upstream.h"

#include <algorithm>

namespace registry_proxy {

void Cancellation::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_.store(true, std::memory_order_release);
  // Under mu_, so a Scope cannot finish (and its context die) while we cancel it.
  for (grpc::ClientContext* ctx : active_) ctx->TryCancel();
}

Cancellation::Scope::Scope(Cancellation* c, grpc::ClientContext* ctx) : c_(c), ctx_(ctx) {
  if (!c_) return;
  std::lock_guard lock(c_->mu_);
  // A context cancelled before its call starts cancels the call as soon as it starts (gRPC
  // remembers TryCancel on a context without a call), so a late registration still stops.
  if (c_->cancelled_.load(std::memory_order_acquire)) ctx_->TryCancel();
  c_->active_.push_back(ctx_);
}

Cancellation::Scope::~Scope() {
  if (!c_) return;
  std::lock_guard lock(c_->mu_);
  auto it = std::find(c_->active_.begin(), c_->active_.end(), ctx_);
  if (it != c_->active_.end()) c_->active_.erase(it);
}

}  // namespace registry_proxy
