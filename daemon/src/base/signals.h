// Process signals for long-running subcommands, handled synchronously: the signals are
// blocked in every thread (construct this before starting any) and one thread waits for them.
#pragma once

#include <chrono>
#include <csignal>
#include <initializer_list>

namespace registry_proxy {

class SignalWaiter {
 public:
  // Blocks `signals` in the calling thread; threads created afterwards inherit the mask.
  explicit SignalWaiter(std::initializer_list<int> signals);
  ~SignalWaiter();  // restores the previous mask
  SignalWaiter(const SignalWaiter&) = delete;
  SignalWaiter& operator=(const SignalWaiter&) = delete;

  // Waits for one of the signals and returns its number.
  int Wait();
  // Waits at most `timeout`; 0 when none of the signals came.
  int WaitFor(std::chrono::milliseconds timeout);

 private:
  sigset_t set_;
  sigset_t old_;
};

}  // namespace registry_proxy
