// An open-loop HTTPS load generator for the webhook: a fixed request rate over keep-alive TLS
// connections, latency measured from when each request was *due* (so a stalled server shows up
// as latency, not as a politely lower rate: no coordinated omission). wrk (Debian's is wrk 4)
// only does closed loops; the goal here is "p99 at 1,000 requests/s".
//
//   webhook_load --port P --body FILE [--host 127.0.0.1] [--rate 1000] [--seconds 10]
//                [--connections 4] [--path /mutate]
//
// Loopback only by design (the host must be a 127.x address). Bounded: it stops after
// --seconds (at most 120) and rate*seconds requests. Certificates are not verified (the
// numbers are about the server's cost, not trust); the handshake is still full TLS.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string path = "/mutate";
  std::string body_file;
  double rate = 1000;
  int seconds = 10;
  int connections = 4;
};

struct Shared {
  std::mutex mu;
  std::vector<double> latencies_us;
  std::atomic<long> errors{0};
  std::atomic<long> non_200{0};
};

int Connect(const Options& o) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(o.port));
  inet_pton(AF_INET, o.host.c_str(), &a.sin_addr);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads one HTTP/1.1 response with a Content-Length; returns the status or -1. Sets *close
// when the server announced it closes the connection.
int ReadResponse(SSL* ssl, std::string& buf, bool* close) {
  buf.clear();
  size_t header_end;
  char tmp[16384];
  while ((header_end = buf.find("\r\n\r\n")) == std::string::npos) {
    int n = SSL_read(ssl, tmp, sizeof tmp);
    if (n <= 0) return -1;
    buf.append(tmp, size_t(n));
  }
  int status = std::atoi(buf.c_str() + 9);
  size_t cl = 0;
  std::string headers = buf.substr(0, header_end);
  std::transform(headers.begin(), headers.end(), headers.begin(), ::tolower);
  *close = headers.find("connection: close") != std::string::npos;
  if (size_t p = headers.find("content-length:"); p != std::string::npos) {
    cl = std::strtoul(headers.c_str() + p + 15, nullptr, 10);
  }
  while (buf.size() < header_end + 4 + cl) {
    int n = SSL_read(ssl, tmp, sizeof tmp);
    if (n <= 0) return -1;
    buf.append(tmp, size_t(n));
  }
  return status;
}

void Worker(const Options& o, const std::string& request, double rate, Clock::time_point start,
            Clock::time_point end, Shared* shared) {
  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, nullptr);
  std::vector<double> lat;
  lat.reserve(size_t(rate * o.seconds) + 16);
  SSL* ssl = nullptr;
  int fd = -1;
  auto reconnect = [&]() -> bool {
    if (ssl) SSL_free(ssl);
    if (fd >= 0) close(fd);
    ssl = nullptr;
    fd = Connect(o);
    if (fd < 0) return false;
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    return SSL_connect(ssl) == 1;
  };
  bool connected = reconnect();
  const auto interval = std::chrono::duration<double>(1.0 / rate);
  std::string buf;
  for (long i = 0;; ++i) {
    const auto due = start + std::chrono::duration_cast<Clock::duration>(interval * double(i));
    if (due >= end) break;
    std::this_thread::sleep_until(due);
    if (!connected && !(connected = reconnect())) {
      shared->errors++;
      continue;
    }
    int status = -1;
    bool close_after = false;
    // A kept-alive connection the server has just closed fails at once: reconnect and send
    // again, as every HTTP client does (the time spent counts as latency).
    for (int attempt = 0; attempt < 2 && status < 0; ++attempt) {
      if (attempt && !reconnect()) break;
      if (SSL_write(ssl, request.data(), int(request.size())) == int(request.size())) {
        status = ReadResponse(ssl, buf, &close_after);
      }
    }
    const auto done = Clock::now();
    if (close_after) connected = false;
    if (status < 0) {
      shared->errors++;
      connected = false;
      continue;
    }
    if (status != 200) shared->non_200++;
    lat.push_back(std::chrono::duration<double, std::micro>(done - due).count());
  }
  if (ssl) SSL_free(ssl);
  if (fd >= 0) close(fd);
  SSL_CTX_free(ctx);
  std::lock_guard<std::mutex> l(shared->mu);
  shared->latencies_us.insert(shared->latencies_us.end(), lat.begin(), lat.end());
}

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t i = std::min(sorted.size() - 1, size_t(p / 100.0 * double(sorted.size())));
  return sorted[i];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--host")
      o.host = v;
    else if (k == "--port")
      o.port = std::atoi(v.c_str());
    else if (k == "--path")
      o.path = v;
    else if (k == "--body")
      o.body_file = v;
    else if (k == "--rate")
      o.rate = std::atof(v.c_str());
    else if (k == "--seconds")
      o.seconds = std::atoi(v.c_str());
    else if (k == "--connections")
      o.connections = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (o.port <= 0 || o.body_file.empty() || o.rate <= 0 || o.rate > 100000 || o.seconds < 1 ||
      o.seconds > 120 || o.connections < 1 || o.connections > 256 || o.host.rfind("127.", 0) != 0) {
    std::fprintf(stderr,
                 "usage: webhook_load --port P --body FILE [--host 127.x.y.z] [--rate R<=100000] "
                 "[--seconds 1..120] [--connections 1..256] [--path /mutate]\n");
    return 2;
  }
  std::ifstream in(o.body_file, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string body = ss.str();
  if (body.empty()) {
    std::fprintf(stderr, "empty body file %s\n", o.body_file.c_str());
    return 2;
  }
  const std::string request =
      "POST " + o.path + " HTTP/1.1\r\nHost: localhost\r\n" +
      "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\n\r\n" + body;

  Shared shared;
  const auto start = Clock::now() + std::chrono::milliseconds(200);  // after the handshakes
  const auto end = start + std::chrono::seconds(o.seconds);
  std::vector<std::thread> threads;
  for (int c = 0; c < o.connections; ++c) {
    // Stagger the connections' schedules so requests are evenly spaced overall.
    const auto offset = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(double(c) / o.rate));
    threads.emplace_back(Worker, std::cref(o), std::cref(request), o.rate / o.connections,
                         start + offset, end, &shared);
  }
  for (auto& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double>& l = shared.latencies_us;
  std::sort(l.begin(), l.end());
  std::printf(
      "target %.0f req/s over %d connections for %d s: %zu ok (%.0f req/s), %ld non-200, %ld "
      "errors\nlatency from due time (us): p50 %.0f  p90 %.0f  p99 %.0f  p99.9 %.0f  max %.0f\n",
      o.rate, o.connections, o.seconds, l.size(),
      double(l.size()) / std::min(wall, double(o.seconds)), shared.non_200.load(),
      shared.errors.load(), Percentile(l, 50), Percentile(l, 90), Percentile(l, 99),
      Percentile(l, 99.9), l.empty() ? 0 : l.back());
  return shared.errors.load() == 0 && shared.non_200.load() == 0 ? 0 : 1;
}
