#include "containerd/channel_keeper.h"

namespace registry_proxy {

ChannelKeeper::ChannelKeeper(std::shared_ptr<grpc::Channel> channel,
                             std::chrono::milliseconds check)
    : channel_(std::move(channel)), check_(check) {
  thread_ = std::thread([this] { Run(); });
}

ChannelKeeper::~ChannelKeeper() {
  {
    std::lock_guard lock(mu_);
    stop_.store(true);
  }
  cv_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void ChannelKeeper::Poke() {
  if (wanted_.exchange(true)) return;  // already at work (or about to be)
  {
    std::lock_guard lock(mu_);  // so the keeper cannot miss it between its check and its wait
  }
  cv_.notify_one();
}

void ChannelKeeper::Run() {
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [this] { return stop_.load() || wanted_.load(); });
      if (stop_.load()) return;
    }
    while (!stop_.load()) {
      // try_to_connect: from IDLE (and after a failure) start an attempt now.
      const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/true);
      if (state == GRPC_CHANNEL_READY) break;
      // Returns on a change or after check_; meanwhile this thread polls the attempt.
      channel_->WaitForStateChange(state, std::chrono::system_clock::now() + check_);
    }
    // A call that fails after this (the connection broke again) pokes again.
    wanted_.store(false);
  }
}

}  // namespace registry_proxy
