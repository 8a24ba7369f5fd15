#include "channel_keeper.h"

namespace registry_proxy {

ChannelKeeper::ChannelKeeper(std::shared_ptr<grpc::Channel> channel,
                             std::chrono::milliseconds check)
    : channel_(std::move(channel)), check_(check) {
  thread_ = std::thread([this] {
    while (!stop_.load()) {
      // try_to_connect: from IDLE (and after a failure) start an attempt now.
      const grpc_connectivity_state state = channel_->GetState(/*try_to_connect=*/true);
      if (state == GRPC_CHANNEL_READY) {
        // Connected: stay out of the way. Waiting on the channel would poll its connection from
        // this thread too, and wake it on every read (what the poll strategy is there to avoid).
        std::this_thread::sleep_for(check_);
        continue;
      }
      // Returns on a change or after check_; meanwhile this thread polls the attempt.
      channel_->WaitForStateChange(state, std::chrono::system_clock::now() + check_);
    }
  });
}

ChannelKeeper::~ChannelKeeper() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

}  // namespace registry_proxy
