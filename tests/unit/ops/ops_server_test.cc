// The ops endpoint over real HTTP on 127.0.0.1 (a free port), with cpp-httplib's client.
#include "ops/ops_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::MatchesRegex;

int Threads() {
  int n = 0;
  DIR* d = opendir("/proc/self/task");
  while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

class OpsServerTest : public ::testing::Test {
 protected:
  void StartServer(OpsServerOptions o = {}) {
    o.host = "127.0.0.1";
    o.port = 0;
    server_ = std::make_unique<OpsServer>(o, &registry_, [this] {
      std::lock_guard<std::mutex> l(mu_);
      return ready_;
    });
    Status s = server_->Start();
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_GT(server_->port(), 0);
    client_ = std::make_unique<httplib::Client>("127.0.0.1", server_->port());
    client_->set_read_timeout(10, 0);
  }
  void SetReady(bool ready, std::string reason) {
    std::lock_guard<std::mutex> l(mu_);
    ready_ = {ready, std::move(reason)};
  }

  metrics::Registry registry_;
  std::mutex mu_;
  Readiness ready_{true, ""};
  std::unique_ptr<OpsServer> server_;
  std::unique_ptr<httplib::Client> client_;
};

TEST_F(OpsServerTest, ServesMetricsHealthAndReadiness) {
  registry_.AddCounter("rp_test_total", "Test.", {"k"}).With({"v"}).Inc(7);
  StartServer();
  auto m = client_->Get("/metrics");
  ASSERT_TRUE(m) << httplib::to_string(m.error());
  EXPECT_EQ(m->status, 200);
  EXPECT_EQ(m->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(m->body, registry_.Render());
  EXPECT_THAT(m->body, HasSubstr("rp_test_total{k=\"v\"} 7\n"));

  auto h = client_->Get("/healthz");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(h->body, "ok\n");

  auto r = client_->Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  SetReady(false, "upstream CRI does not answer Version: UNAVAILABLE: down");
  r = client_->Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(r->body, "upstream CRI does not answer Version: UNAVAILABLE: down\n");
  SetReady(true, "");
  r = client_->Get("/readyz");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
}

TEST_F(OpsServerTest, WrongMethodsPathsAndBodiesGetClearAnswers) {
  StartServer();
  auto p = client_->Post("/metrics", "x", "text/plain");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->status, 405);
  EXPECT_THAT(p->body, HasSubstr("method POST not allowed on /metrics"));
  auto n = client_->Get("/nope");
  ASSERT_TRUE(n);
  EXPECT_EQ(n->status, 404);
  EXPECT_THAT(n->body, HasSubstr("GET /metrics"));
  auto big = client_->Post("/metrics", std::string(64 * 1024, 'x'), "text/plain");
  ASSERT_TRUE(big);
  EXPECT_EQ(big->status, 413);
}

// Many idle connections neither start threads nor block the endpoint for good: they wait in
// the bounded queue, time out (read timeout), and the request behind them is answered.
TEST_F(OpsServerTest, IdleConnectionsDoNotGrowThreads) {
  OpsServerOptions o;
  o.threads = 2;
  o.queue = 4;
  o.read_timeout = std::chrono::seconds(1);
  o.keep_alive_timeout = std::chrono::seconds(1);
  // A sanitizer runtime may start a thread of its own with the first thread anyone creates
  // (TSan's background thread): have that happen before counting.
  std::thread([] {}).join();
  const int before = Threads();
  StartServer(o);
  ASSERT_TRUE(client_->Get("/healthz"));  // the accept loop made its pool by now
  const int started = Threads();
  EXPECT_EQ(started - before, 3) << "2 workers and the accept loop";
  std::vector<int> idle;
  for (int i = 0; i < 10; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(uint16_t(server_->port()));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    idle.push_back(fd);
  }
  client_->set_read_timeout(60, 0);
  auto h = client_->Get("/healthz");  // queued behind the idle ones; served once they time out
  ASSERT_TRUE(h) << httplib::to_string(h.error());
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(Threads(), started);
  for (int fd : idle) close(fd);
}

TEST_F(OpsServerTest, StartFailsClearlyOnATakenPortAndStopIsIdempotent) {
  StartServer();
  OpsServerOptions o;
  o.host = "127.0.0.1";
  o.port = server_->port();
  OpsServer second(o, &registry_, nullptr);
  Status s = second.Start();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.message(), HasSubstr("cannot listen on 127.0.0.1:" + std::to_string(o.port)));
  server_->Stop();
  server_->Stop();
  auto after = client_->Get("/healthz");
  EXPECT_FALSE(after) << "stopped: nothing answers, got " << after->status << " " << after->body;
}

TEST(ParseHostPortTest, Forms) {
  std::string host;
  int port = -1;
  EXPECT_TRUE(ParseHostPort("127.0.0.1:9464", &host, &port).ok());
  EXPECT_EQ(host, "127.0.0.1");
  EXPECT_EQ(port, 9464);
  EXPECT_TRUE(ParseHostPort("[::1]:0", &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 0);
  EXPECT_TRUE(ParseHostPort("0.0.0.0:9465", &host, &port).ok());
  EXPECT_TRUE(ParseHostPort("localhost:1", &host, &port).ok());
  for (const char* bad :
       {"9464", ":9464", "host:", "host:x1", "host:65536", "::1:80", "[::1:80", "h:123456"}) {
    Status s = ParseHostPort(bad, &host, &port);
    EXPECT_FALSE(s.ok()) << bad;
    EXPECT_THAT(s.message(), HasSubstr(bad));
  }
}

TEST(CommonMetricsTest, ConfigCountersFollowTheStore) {
  const fs::path dir = fs::temp_directory_path() / ("rp-ops-test-" + std::to_string(getpid()));
  fs::create_directories(dir);
  const std::string path = (dir / "config.yaml").string();
  std::ofstream(path) << "proxies:\n  docker.io: m.example\n";
  ConfigStore store(path);
  metrics::Registry r;
  AddConfigMetrics(&r, &store);
  std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_generation 0\n"));
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_last_reload_success 0\n"));

  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  text = r.Render();
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_reloads_total{result=\"applied\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_generation 1\n"));
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_last_reload_success 1\n"));
  EXPECT_THAT(text, MatchesRegex("(.|\n)*registry_proxy_config_applied_timestamp_seconds "
                                 "1[0-9]{9}(\\.[0-9]+)?\n(.|\n)*"));

  std::ofstream(path) << "proxies: [\n";
  ASSERT_EQ(store.Reload(), ReloadResult::kRejected);
  text = r.Render();
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_reloads_total{result=\"rejected\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_generation 1\n"));
  EXPECT_THAT(text, HasSubstr("registry_proxy_config_last_reload_success 0\n"));
  fs::remove_all(dir);
}

TEST(CommonMetricsTest, ProcessAndBuildInfo) {
  metrics::Registry r;
  AddBuildInfo(&r);
  AddProcessMetrics(&r);
  const std::string text = r.Render();
  EXPECT_THAT(text,
              MatchesRegex("(.|\n)*registry_proxy_build_info\\{version=\"[^\"]+\"\\} 1\n(.|\n)*"));
  auto value = [&](const std::string& name) {
    const size_t p = text.find("\n" + name + " ");
    EXPECT_NE(p, std::string::npos) << name;
    return p == std::string::npos ? -1.0 : std::stod(text.substr(p + name.size() + 2));
  };
  EXPECT_GT(value("process_resident_memory_bytes"), 1 << 20);
  EXPECT_GE(value("process_threads"), 1);
  EXPECT_GE(value("process_open_fds"), 3);
  EXPECT_GT(value("process_start_time_seconds"), 1e9);
  EXPECT_GE(value("process_cpu_seconds_total"), 0);
  // A new fd shows at the next scrape.
  const double fds = value("process_open_fds");
  int fd = dup(0);
  const std::string again = r.Render();
  const size_t p = again.find("\nprocess_open_fds ");
  ASSERT_NE(p, std::string::npos);
  EXPECT_EQ(std::stod(again.substr(p + 18)), fds + 1);
  close(fd);
}

}  // namespace
}  // namespace registry_proxy
