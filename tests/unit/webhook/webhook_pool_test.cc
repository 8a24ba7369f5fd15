// ConnectionWorkerPool (webhook_pool.h): newest connection first, eviction only under pressure
// and only of connections without a request in hand, shutdown that idle connections cannot hold
// up. "Connections" here are socketpairs whose far end the test holds; a job plays the worker's
// part of httplib (NoteSocket, then reading until the socket fails).
#include "webhook/webhook_pool.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace registry_proxy {
namespace {

using namespace std::chrono_literals;

// A one-shot gate.
class Gate {
 public:
  void Open() {
    std::lock_guard l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock l(mu_);
    cv_.wait(l, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

struct Pair {
  int ours = -1, theirs = -1;  // theirs: the server side, handed to the worker
  Pair() {
    int fds[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    ours = fds[0];
    theirs = fds[1];
  }
  ~Pair() {
    if (ours >= 0) close(ours);
    if (theirs >= 0) close(theirs);
  }
};

// Blocks reading `fd` until it fails or the peer closes (a worker serving a silent client).
void ServeSilentClient(int fd) {
  ConnectionWorkerPool::NoteSocket(fd);
  char c;
  while (read(fd, &c, 1) > 0) {
  }
}

TEST(WebhookPoolTest, RunsJobsNewestFirst) {
  std::vector<int> order;
  std::mutex mu;
  Gate release;
  std::atomic<bool> blocker_running{false};
  {
    ConnectionWorkerPool pool({.threads = 1});
    pool.enqueue([&] {
      blocker_running = true;
      release.Wait();
    });
    while (!blocker_running) std::this_thread::sleep_for(1ms);
    for (int i = 0; i < 5; ++i) {
      pool.enqueue([&, i] {
        std::lock_guard l(mu);
        order.push_back(i);
      });
    }
    release.Open();
  }  // the destructor runs what is queued, then joins
  EXPECT_EQ(order, (std::vector<int>{4, 3, 2, 1, 0}));
}

TEST(WebhookPoolTest, WithoutPressureNothingIsEvicted) {
  Pair p;
  ConnectionWorkerPool pool({.threads = 2, .evict_after = 1ms, .check_interval = 1ms});
  std::atomic<bool> done{false};
  pool.enqueue([&] {
    ServeSilentClient(p.theirs);
    done = true;
  });
  // Long past evict_after, but nobody waits for a worker: the connection stays.
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(done.load());
  EXPECT_EQ(pool.evicted(), 0u);
  shutdown(p.ours, SHUT_RDWR);  // the client leaves; the worker finishes
}

TEST(WebhookPoolTest, UnderPressureTheSilentConnectionMakesRoom) {
  Pair silent;
  ConnectionWorkerPool pool({.threads = 1, .evict_after = 10ms, .check_interval = 5ms});
  std::atomic<bool> silent_done{false}, silent_serving{false};
  Gate second_ran;
  pool.enqueue([&] {
    silent_serving = true;
    ServeSilentClient(silent.theirs);
    silent_done = true;
  });
  while (!silent_serving) std::this_thread::sleep_for(1ms);  // it holds the worker
  // A second connection waits for the only worker: the silent one must make room (if it did
  // not, this would block until the test's timeout).
  pool.enqueue([&] { second_ran.Open(); });
  second_ran.Wait();
  EXPECT_TRUE(silent_done.load());
  EXPECT_EQ(pool.evicted(), 1u);
  // The client sees its connection closed by the server.
  char c;
  EXPECT_EQ(read(silent.ours, &c, 1), 0);
}

TEST(WebhookPoolTest, ARequestInHandIsNeverEvicted) {
  Pair busy;
  ConnectionWorkerPool pool({.threads = 1, .evict_after = 1ms, .check_interval = 1ms});
  Gate handler_may_finish, second_ran;
  std::atomic<bool> in_handler{false};
  std::atomic<bool> socket_failed{false};
  pool.enqueue([&] {
    ConnectionWorkerPool::NoteSocket(busy.theirs);
    ConnectionWorkerPool::RequestStarted();
    in_handler = true;
    handler_may_finish.Wait();
    // Answering still works: the socket was not shut down meanwhile.
    socket_failed = write(busy.theirs, "x", 1) != 1;
    ConnectionWorkerPool::RequestDone();
  });
  while (!in_handler) std::this_thread::sleep_for(1ms);
  pool.enqueue([&] { second_ran.Open(); });  // pressure
  std::this_thread::sleep_for(100ms);        // many checks long past evict_after
  EXPECT_EQ(pool.evicted(), 0u);
  handler_may_finish.Open();
  second_ran.Wait();
  EXPECT_FALSE(socket_failed.load());
}

TEST(WebhookPoolTest, ShutdownClosesIdleConnections) {
  Pair a, b;
  auto pool = std::make_unique<ConnectionWorkerPool>(
      WorkerPoolOptions{.threads = 1, .evict_after = 1h, .check_interval = 5ms});
  std::atomic<int> served{0};
  for (Pair* p : {&a, &b}) {
    pool->enqueue([&, p] {
      ServeSilentClient(p->theirs);
      ++served;
    });
  }
  // One silent connection holds the only worker, one waits; neither would ever end by itself
  // (evict_after is an hour). Shutdown must still finish, serving both.
  pool->shutdown();
  EXPECT_EQ(served.load(), 2);
}

}  // namespace
}  // namespace registry_proxy
