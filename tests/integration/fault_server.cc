#include "fault_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace rp_testbed {

using registry_proxy::Status;

FaultServer::FaultServer(Behavior api_root, Behavior other, std::chrono::milliseconds stall)
    : api_root_(api_root), other_(other), stall_(stall) {}

FaultServer::~FaultServer() {
  stopping_ = true;
  cv_.notify_all();
  listener_.Stop();
}

Status FaultServer::Start() {
  return listener_.Start([this](int fd) { Serve(fd); }, "fault server");
}

bool FaultServer::Wait(std::chrono::milliseconds d) {
  std::unique_lock lock(mu_);
  return !cv_.wait_for(lock, d, [this] { return stopping_.load(); });
}

void FaultServer::Serve(int fd) {
  std::string buf;
  char chunk[4096];
  bool open = true;
  while (open && !stopping_) {
    size_t end;
    while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
      ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
      if (n <= 0) {
        open = false;
        break;
      }
      buf.append(chunk, static_cast<size_t>(n));
      // A TLS ClientHello (a handshake record, 0x16 0x03): containerd 2.x tries HTTPS first on
      // a host without hosts.toml, even on loopback. Answer as a plain HTTP server does (Go's
      // net/http: 400 and close), so the client falls back to HTTP as it would with a registry.
      if (buf.size() >= 2 && buf[0] == '\x16' && buf[1] == '\x03') {
        static constexpr char k400[] =
            "HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";
        (void)send(fd, k400, sizeof(k400) - 1, MSG_NOSIGNAL);
        open = false;
        break;
      }
    }
    if (!open) break;
    const std::string head = buf.substr(0, end);
    buf.erase(0, end + 4);  // pulls send no bodies
    Request req;
    req.head = head;
    const size_t sp1 = head.find(' ');
    const size_t sp2 = head.find(' ', sp1 + 1);
    req.method = head.substr(0, sp1);
    req.path = head.substr(sp1 + 1, sp2 - sp1 - 1);
    for (size_t pos = head.find("\r\n"); pos != std::string::npos;
         pos = head.find("\r\n", pos + 2)) {
      std::string line = head.substr(pos + 2, head.find("\r\n", pos + 2) - pos - 2);
      std::string lower = line;
      std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
      if (lower.rfind("user-agent:", 0) == 0) {
        req.user_agent = line.substr(11);
        req.user_agent.erase(0, req.user_agent.find_first_not_of(' '));
      }
    }
    const bool root = req.path == "/v2/" || req.path == "/v2";
    {
      std::lock_guard lock(mu_);
      requests_.push_back(req);
    }
    std::string answer;
    switch (root ? api_root_ : other_) {
      case Behavior::kOk:
        answer = root ? "HTTP/1.1 200 OK\r\nDocker-Distribution-API-Version: registry/2.0\r\n"
                        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                      : "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                        "Content-Length: 0\r\n\r\n";
        break;
      case Behavior::k500:
        answer = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";
        break;
      case Behavior::kUnauthorized:
        answer =
            "HTTP/1.1 401 Unauthorized\r\nDocker-Distribution-API-Version: registry/2.0\r\n"
            "WWW-Authenticate: Basic realm=\"registry-proxy-test\"\r\n"
            "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        break;
      case Behavior::kReset: {
        linger l{1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
        open = false;
        break;
      }
      case Behavior::kStall:
        Wait(stall_);
        open = false;
        break;
    }
    if (req.method == "HEAD" && answer.size() > 2 && answer.substr(answer.size() - 2) == "{}") {
      answer.resize(answer.size() - 2);
    }
    if (!answer.empty() && send(fd, answer.data(), answer.size(), MSG_NOSIGNAL) < 0) open = false;
  }
}

std::vector<FaultServer::Request> FaultServer::Requests() const {
  std::lock_guard lock(mu_);
  return requests_;
}

size_t FaultServer::Count(const std::string& method, const std::string& prefix) const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(
      std::count_if(requests_.begin(), requests_.end(), [&](const Request& r) {
        return r.method == method &&
               (prefix == "/v2/" ? r.path == "/v2/" : r.path.rfind(prefix, 0) == 0);
      }));
}

size_t FaultServer::ProbeRequests() const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(
      std::count_if(requests_.begin(), requests_.end(), [](const Request& r) {
        return r.path == "/v2/" && r.user_agent.rfind("registry-proxy-probe", 0) == 0;
      }));
}

size_t FaultServer::PullRequests() const {
  std::lock_guard lock(mu_);
  return static_cast<size_t>(
      std::count_if(requests_.begin(), requests_.end(),
                    [](const Request& r) { return r.path != "/v2/" && r.path != "/v2"; }));
}

}  // namespace rp_testbed
