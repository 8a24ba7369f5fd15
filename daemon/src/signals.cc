#include "signals.h"

#include <pthread.h>

namespace registry_proxy {

SignalWaiter::SignalWaiter(std::initializer_list<int> signals) {
  sigemptyset(&set_);
  for (int s : signals) sigaddset(&set_, s);
  pthread_sigmask(SIG_BLOCK, &set_, &old_);
}

SignalWaiter::~SignalWaiter() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }

int SignalWaiter::Wait() {
  int sig = 0;
  while (sigwait(&set_, &sig) != 0) {
  }
  return sig;
}

}  // namespace registry_proxy
