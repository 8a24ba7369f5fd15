// The mirror probe (libcurl) against small servers on loopback, and through a real proxy
// (tinyproxy, started here on a free loopback port with its own config, stopped by PID).
#include "pull/probe.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "pull/curl_lib.h"

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using testing::HasSubstr;

// Accepts connections on 127.0.0.1 and runs `serve(fd)` on each (then closes it), on its own
// thread; joined in the destructor.
class LoopbackServer {
 public:
  explicit LoopbackServer(std::function<void(int)> serve) : serve_(std::move(serve)) {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    EXPECT_EQ(bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(fd_, 16), 0);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        int c = accept(fd_, nullptr, nullptr);
        if (c < 0 || stop_) {
          if (c >= 0) close(c);
          return;
        }
        serve_(c);
        close(c);
      }
    });
  }
  ~LoopbackServer() {
    stop_ = true;
    shutdown(fd_, SHUT_RDWR);
    thread_.join();
    close(fd_);
  }
  int port() const { return port_; }
  ProbeTarget Target(const std::string& scheme = "http") const {
    return ProbeTarget{scheme, "127.0.0.1:" + std::to_string(port_), "/v2/", "test"};
  }

 private:
  std::function<void(int)> serve_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

std::string ReadRequest(int fd) {
  std::string got;
  char buf[1024];
  while (got.find("\r\n\r\n") == std::string::npos) {
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  return got;
}

void Answer(int fd, const std::string& status_line) {
  std::string answer = status_line + "\r\nContent-Length: 0\r\n\r\n";
  send(fd, answer.data(), answer.size(), MSG_NOSIGNAL);
}

ProbeResult ProbeFor(const ProbeTarget& t, milliseconds timeout, const ProxyEnv& env = {}) {
  std::atomic<bool> stop{false};
  return ProbeWithProxyEnv(t, env, std::chrono::steady_clock::now() + timeout, stop);
}

int FreeLoopbackPort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

bool Connects(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

// A child process (argv), stopped with SIGTERM and reaped in the destructor.
class Child {
 public:
  explicit Child(std::vector<std::string> argv) {
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> args;
      for (std::string& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      execvp(args[0], args.data());
      _exit(127);
    }
  }
  ~Child() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
  }
  bool Exited() {
    int status = 0;
    return waitpid(pid_, &status, WNOHANG) == pid_ && (pid_ = -1, true);
  }

 private:
  pid_t pid_ = -1;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// Answers

bool MapsLibcurl() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (line.find("/libcurl.so") != std::string::npos) return true;
  }
  return false;
}

// First in this file: ctest runs each case in a process of its own, so nothing has probed yet.
TEST(ProbeTest, LibcurlIsLoadedByTheFirstProbeNotAtStart) {
  ASSERT_FALSE(MapsLibcurl()) << "libcurl was in the process before any probe";
  EXPECT_FALSE(CurlLoaded());
  LoopbackServer server([](int fd) {
    ReadRequest(fd);
    Answer(fd, "HTTP/1.1 200 OK");
  });
  ProbeResult r = ProbeFor(server.Target(), milliseconds(2000));
  EXPECT_TRUE(r.alive) << r.detail;
  EXPECT_TRUE(CurlLoaded());
  EXPECT_TRUE(MapsLibcurl());
}

TEST(ProbeTest, AnswersBelow500AreAliveFromThe500sDead) {
  std::string seen;
  for (const char* line : {"HTTP/1.1 200 OK", "HTTP/1.1 401 Unauthorized", "HTTP/1.0 404 Nope",
                           "HTTP/1.1 302 Found"}) {
    LoopbackServer server([&](int fd) {
      seen = ReadRequest(fd);
      Answer(fd, line);
    });
    ProbeResult r = ProbeFor(server.Target(), milliseconds(5000));
    EXPECT_TRUE(r.alive) << line << ": " << r.detail;
    EXPECT_EQ(r.proxy, "");
  }
  EXPECT_THAT(seen, HasSubstr("GET /v2/ HTTP/1.1\r\n"));
  EXPECT_THAT(seen, HasSubstr("Host: 127.0.0.1:"));
  EXPECT_THAT(seen, HasSubstr("User-Agent: registry-proxy-probe\r\n"));
  EXPECT_THAT(seen, testing::Not(HasSubstr("Authorization")));
  LoopbackServer failing([](int fd) {
    ReadRequest(fd);
    Answer(fd, "HTTP/1.1 503 Service Unavailable");
  });
  ProbeResult r = ProbeFor(failing.Target(), milliseconds(5000));
  EXPECT_FALSE(r.alive);
  EXPECT_EQ(r.http_status, 503);
  EXPECT_EQ(r.detail, "HTTP 503");
  // A body is not read to its end: the status line is enough.
  LoopbackServer big([](int fd) {
    ReadRequest(fd);
    std::string answer =
        "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + std::string(65536, 'x');
    send(fd, answer.data(), answer.size(), MSG_NOSIGNAL);
  });
  r = ProbeFor(big.Target(), milliseconds(5000));
  EXPECT_TRUE(r.alive) << r.detail;
  EXPECT_EQ(r.detail, "HTTP 200");
}

TEST(ProbeTest, RefusedResetSilentAndNonHttpAreDead) {
  {
    ProbeTarget t{"http", "127.0.0.1:" + std::to_string(FreeLoopbackPort()), "/v2/", "test"};
    ProbeResult r = ProbeFor(t, milliseconds(5000));
    EXPECT_FALSE(r.alive);
    EXPECT_THAT(r.detail, HasSubstr("connection refused"));
  }
  {
    LoopbackServer reset([](int fd) {
      ReadRequest(fd);
      linger l{1, 0};  // close with RST
      setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    });
    ProbeResult r = ProbeFor(reset.Target(), milliseconds(5000));
    EXPECT_FALSE(r.alive);
    EXPECT_THAT(r.detail, testing::AnyOf(HasSubstr("reset"), HasSubstr("closed")));
  }
  {
    std::promise<void> done;
    std::shared_future<void> finished = done.get_future().share();
    LoopbackServer silent([&](int) { finished.wait(); });  // accepts, never answers
    ProbeResult r = ProbeFor(silent.Target(), milliseconds(200));
    done.set_value();
    EXPECT_FALSE(r.alive);
    EXPECT_EQ(r.detail, "no answer within 200ms");
  }
  {
    LoopbackServer garbage([](int fd) {
      ReadRequest(fd);
      send(fd, "SSH-2.0-OpenSSH\r\n", 17, MSG_NOSIGNAL);
    });
    ProbeResult r = ProbeFor(garbage.Target(), milliseconds(5000));
    EXPECT_FALSE(r.alive);
    EXPECT_EQ(r.detail, "not an HTTP answer");
  }
  {
    // https to a plain HTTP server: the TLS handshake fails.
    LoopbackServer plain([](int fd) { Answer(fd, "HTTP/1.1 400 Bad Request"); });
    ProbeResult r = ProbeFor(plain.Target("https"), milliseconds(5000));
    EXPECT_FALSE(r.alive);
    EXPECT_THAT(r.detail, HasSubstr("tls handshake failed"));
  }
}

TEST(ProbeTest, StopEndsAProbeEarly) {
  std::promise<void> done;
  std::shared_future<void> finished = done.get_future().share();
  LoopbackServer silent([&](int) { finished.wait(); });
  std::atomic<bool> stop{false};
  auto result = std::async(std::launch::async, [&] {
    return HttpProbe(silent.Target(), std::chrono::steady_clock::now() + std::chrono::hours(1),
                     stop);
  });
  std::this_thread::sleep_for(milliseconds(100));
  stop = true;
  // Long before the hour: a hang guard, not a speed test.
  ASSERT_EQ(result.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  done.set_value();
  ProbeResult r = result.get();
  EXPECT_FALSE(r.alive);
  EXPECT_EQ(r.detail, "probe stopped");
}

// ---------------------------------------------------------------------------------------------
// Through a real proxy

// tinyproxy on a free loopback port, in its own directory, logging every request.
class ProxyTest : public testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/rp-probe-proxy.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    port_ = FreeLoopbackPort();
    std::ofstream(dir_ + "/tinyproxy.conf")
        << "Port " << port_ << "\nListen 127.0.0.1\nTimeout 30\nMaxClients 16\n"
        << "LogFile \"" << dir_ << "/tinyproxy.log\"\nLogLevel Info\n"
        << "ViaProxyName \"rp-test-proxy\"\n";
    // -d: in the foreground, so the PID is ours to stop.
    proxy_ = std::make_unique<Child>(
        std::vector<std::string>{"tinyproxy", "-d", "-c", dir_ + "/tinyproxy.conf"});
    for (int i = 0; i < 1000 && !Connects(port_); ++i) {
      ASSERT_FALSE(proxy_->Exited()) << "tinyproxy did not start (installed? scripts/deps.sh "
                                        "test installs it): "
                                     << ReadFile(dir_ + "/tinyproxy.log");
      std::this_thread::sleep_for(milliseconds(10));
    }
    ASSERT_TRUE(Connects(port_)) << "tinyproxy not listening on " << port_;
  }
  void TearDown() override {
    proxy_.reset();
    fs::remove_all(dir_);
  }
  std::string ProxyUrl() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string Log() const { return ReadFile(dir_ + "/tinyproxy.log"); }

  std::string dir_;
  int port_ = 0;
  std::unique_ptr<Child> proxy_;
};

// A mirror that is alive only to requests that came through the proxy (tinyproxy adds
// "Via: 1.1 rp-test-proxy"): direct requests get 503, i.e. "dead".
class ProxiedOnlyMirror {
 public:
  ProxiedOnlyMirror()
      : server_([this](int fd) {
          const std::string req = ReadRequest(fd);
          const bool via = req.find("rp-test-proxy") != std::string::npos;
          {
            std::lock_guard l(mu_);
            (via ? proxied_ : direct_)++;
          }
          Answer(fd, via ? "HTTP/1.1 401 Unauthorized" : "HTTP/1.1 503 Service Unavailable");
        }) {}
  // "127.1": a name, not an IP literal (Go and we proxy it; a literal 127.0.0.1 never is), that
  // the system resolver turns into 127.0.0.1, for the proxy as for a direct connection.
  ProbeTarget Target() const {
    return ProbeTarget{"http", "127.1:" + std::to_string(server_.port()), "/v2/", "test"};
  }
  int proxied() {
    std::lock_guard l(mu_);
    return proxied_;
  }
  int direct() {
    std::lock_guard l(mu_);
    return direct_;
  }

 private:
  std::mutex mu_;
  int proxied_ = 0, direct_ = 0;
  LoopbackServer server_;
};

TEST_F(ProxyTest, HttpMirrorIsProbedThroughHttpProxy) {
  ProxiedOnlyMirror mirror;
  ProbeResult r = ProbeFor(mirror.Target(), milliseconds(10000), ProxyEnv{ProxyUrl(), "", ""});
  EXPECT_TRUE(r.alive) << r.detail;
  EXPECT_EQ(r.http_status, 401);
  EXPECT_EQ(r.proxy, "http://" + ProxyUrl());
  EXPECT_THAT(r.detail, HasSubstr("via proxy http://" + ProxyUrl()));
  EXPECT_EQ(mirror.proxied(), 1);
  EXPECT_EQ(mirror.direct(), 0);
  EXPECT_THAT(Log(), HasSubstr("GET http://127.0.0.1:"));
  // Without the proxy the same mirror is dead.
  r = ProbeFor(mirror.Target(), milliseconds(10000));
  EXPECT_FALSE(r.alive);
  EXPECT_EQ(r.proxy, "");
  EXPECT_EQ(mirror.direct(), 1);
}

TEST_F(ProxyTest, NoProxyAndLoopbackLiteralsGoDirect) {
  ProxiedOnlyMirror mirror;
  for (const std::string& no_proxy :
       {std::string("127.1"), std::string("*"), "other.example, " + mirror.Target().host}) {
    ProbeResult r =
        ProbeFor(mirror.Target(), milliseconds(10000), ProxyEnv{ProxyUrl(), "", no_proxy});
    EXPECT_FALSE(r.alive) << no_proxy << ": " << r.detail;
    EXPECT_EQ(r.proxy, "") << no_proxy;
  }
  EXPECT_EQ(mirror.proxied(), 0);
  EXPECT_EQ(mirror.direct(), 3);
  // A loopback literal is never proxied, NO_PROXY or not.
  ProbeTarget literal = mirror.Target();
  literal.host = "127.0.0.1" + literal.host.substr(5);
  ProbeResult r = ProbeFor(literal, milliseconds(10000), ProxyEnv{ProxyUrl(), "", ""});
  EXPECT_EQ(r.proxy, "");
  EXPECT_EQ(mirror.direct(), 4);
  EXPECT_THAT(Log(), testing::Not(HasSubstr("GET http://")));
}

TEST_F(ProxyTest, HttpsMirrorIsProbedThroughAConnectTunnel) {
  // A real TLS server: openssl s_server with a throwaway self-signed certificate.
  const std::string key = dir_ + "/key.pem", cert = dir_ + "/cert.pem";
  const std::string gen =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=mirror "
      "-keyout " +
      key + " -out " + cert + " >/dev/null 2>&1";
  ASSERT_EQ(system(gen.c_str()), 0);
  const int tls_port = FreeLoopbackPort();
  Child server({"openssl", "s_server", "-quiet", "-www", "-accept",
                "127.0.0.1:" + std::to_string(tls_port), "-cert", cert, "-key", key});
  for (int i = 0; i < 1000 && !Connects(tls_port); ++i) {
    ASSERT_FALSE(server.Exited()) << "openssl s_server did not start";
    std::this_thread::sleep_for(milliseconds(10));
  }
  ProbeTarget t{"https", "127.1:" + std::to_string(tls_port), "/v2/", "test"};
  ProbeResult r = ProbeFor(t, milliseconds(10000), ProxyEnv{"", ProxyUrl(), ""});
  EXPECT_TRUE(r.alive) << r.detail;  // s_server -www answers 200, certificate not verified
  EXPECT_EQ(r.proxy, "http://" + ProxyUrl());
  EXPECT_THAT(Log(), HasSubstr("CONNECT 127.0.0.1:" + std::to_string(tls_port)));
  // HTTP_PROXY is for http:// only.
  r = ProbeFor(t, milliseconds(10000), ProxyEnv{ProxyUrl(), "", ""});
  EXPECT_EQ(r.proxy, "");
  // A proxy that is not there: dead, whatever the mirror.
  r = ProbeFor(t, milliseconds(10000),
               ProxyEnv{"", "127.0.0.1:" + std::to_string(FreeLoopbackPort()), ""});
  EXPECT_FALSE(r.alive);
  EXPECT_THAT(r.detail, HasSubstr("via proxy"));
}

TEST_F(ProxyTest, LibcurlsOwnReadingOfTheEnvironmentIsOff) {
  ProxiedOnlyMirror mirror;
  // libcurl would bypass the proxy for NO_PROXY=* and use http_proxy on its own; the choice is
  // ours (ProbeWithProxyEnv's env), not libcurl's.
  setenv("NO_PROXY", "*", 1);
  setenv("no_proxy", "*", 1);
  ProbeResult r = ProbeFor(mirror.Target(), milliseconds(10000), ProxyEnv{ProxyUrl(), "", ""});
  EXPECT_TRUE(r.alive) << r.detail;
  EXPECT_EQ(mirror.proxied(), 1);
  unsetenv("NO_PROXY");
  unsetenv("no_proxy");
  setenv("http_proxy", ("127.0.0.1:" + std::to_string(FreeLoopbackPort())).c_str(), 1);
  r = ProbeFor(mirror.Target(), milliseconds(10000), ProxyEnv{});
  unsetenv("http_proxy");
  EXPECT_EQ(r.detail, "HTTP 503");  // the mirror answered directly, not a dead proxy
  EXPECT_EQ(mirror.direct(), 1);
}

TEST_F(ProxyTest, HttpProbeReadsTheProxyFromTheEnvironment) {
  ProxiedOnlyMirror mirror;
  for (const char* n : {"HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY"}) {
    unsetenv(n);
  }
  setenv("http_proxy", ProxyUrl().c_str(), 1);
  std::atomic<bool> stop{false};
  ProbeResult r =
      HttpProbe(mirror.Target(), std::chrono::steady_clock::now() + milliseconds(10000), stop);
  unsetenv("http_proxy");
  EXPECT_TRUE(r.alive) << r.detail;
  EXPECT_EQ(mirror.proxied(), 1);
}

}  // namespace
}  // namespace registry_proxy
