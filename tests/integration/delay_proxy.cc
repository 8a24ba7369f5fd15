#include "delay_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace rp_testbed {

using registry_proxy::Status;
using Clock = std::chrono::steady_clock;

namespace {

bool SendAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

DelayProxy::DelayProxy(std::string backend_host, std::chrono::milliseconds delay)
    : backend_(std::move(backend_host)), delay_(delay) {}

DelayProxy::~DelayProxy() {
  stopping_ = true;
  listener_.Stop();
}

Status DelayProxy::Start() {
  return listener_.Start([this](int fd) { Relay(fd); }, "delay proxy");
}

void DelayProxy::Relay(int client) {
  const size_t colon = backend_.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(backend_.substr(colon + 1))));
  inet_pton(AF_INET, backend_.substr(0, colon).c_str(), &addr.sin_addr);
  int server = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (server >= 0 && connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    listener_.Track(server);
    const int one = 1;
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    // A request chunk arms the delay; the first answer bytes after it wait for it to pass.
    bool armed = false;
    Clock::time_point asked{};
    char buf[64 * 1024];
    while (!stopping_) {
      pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
      if (poll(fds, 2, 200) < 0 && errno != EINTR) break;
      if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t n = recv(client, buf, sizeof(buf), 0);
        if (n <= 0 || !SendAll(server, buf, static_cast<size_t>(n))) break;
        if (!armed) {
          armed = true;
          asked = Clock::now();
          ++requests_;
        }
      }
      if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
        if (armed) {
          // Hold the answer back, in small steps so that the destructor is not kept waiting.
          while (!stopping_ && Clock::now() < asked + delay_) {
            std::this_thread::sleep_for(std::min<Clock::duration>(asked + delay_ - Clock::now(),
                                                                  std::chrono::milliseconds(20)));
          }
          armed = false;
        }
        ssize_t n = recv(server, buf, sizeof(buf), 0);
        if (n <= 0 || !SendAll(client, buf, static_cast<size_t>(n))) break;
      }
    }
  }
  if (server >= 0) {
    listener_.Untrack(server);
    close(server);
  }
}

}  // namespace rp_testbed
