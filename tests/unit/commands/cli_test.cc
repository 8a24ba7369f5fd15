// The command line, in-process (RunCli) and as the real binary (watch-config with signals).
#include "commands/cli.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

const std::string kRepoConfig = std::string(RP_SOURCE_DIR) + "/config/config.yaml";
const char kDigest[] = "sha256:7031c1b283388d2c2e09b57badb803c05ebed362dc88d84b480cc47f72a21097";

struct CliResult {
  int code;
  std::string out, err;
};

CliResult Cli(std::vector<std::string> args) {
  args.insert(args.begin(), "registry-proxy");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::ostringstream out, err;
  int code = RunCli(static_cast<int>(args.size()), argv.data(), out, err);
  return {code, out.str(), err.str()};
}

nlohmann::json ResolveJson(std::vector<std::string> args) {
  args.insert(args.begin(), {"resolve", "--json"});
  CliResult r = Cli(args);
  EXPECT_EQ(r.code, 0) << r.err;
  return nlohmann::json::parse(r.out);
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "rp-cli-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() { fs::remove_all(path_); }
  fs::path Write(const std::string& name, const std::string& content) const {
    fs::path p = path_ / name;
    std::ofstream(p) << content;
    return p;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// --- resolve ---------------------------------------------------------------------------------

TEST(ResolveTest, SeedReadmeExample) {
  // The earlier tool's README: nginx in a default namespace -> the mirror's library/nginx.
  auto j = ResolveJson({"nginx", "--namespace", "default", "--config", kRepoConfig});
  EXPECT_EQ(j["pullFrom"], "docker.ketches.cn/library/nginx:latest");
  EXPECT_EQ(j["reason"], "rewritten");
  EXPECT_EQ(j["rewritten"], true);
  EXPECT_EQ(j["normalized"], "docker.io/library/nginx:latest");
  ASSERT_EQ(j["candidates"].size(), 2u);
  EXPECT_EQ(j["candidates"][0]["source"], "mirror");
  EXPECT_EQ(j["candidates"][0]["mirror"], "docker.ketches.cn");
  EXPECT_EQ(j["candidates"][1]["image"], "nginx");
  EXPECT_EQ(j["candidates"][1]["source"], "upstream");
  EXPECT_EQ(j["rule"]["match"], "docker.io");
  EXPECT_EQ(j["config"]["source"], kRepoConfig);
}

TEST(ResolveTest, CredentialsAndStaleIfErrorAreExplained) {
  TempDir dir;
  auto cfg = dir.Write("c.yaml",
                       "credentialedPulls: upstream\nstaleIfError: true\n"
                       "proxies:\n  docker.io: hub.example\n")
                 .string();
  auto j = ResolveJson({"nginx", "-n", "default", "-c", cfg});
  EXPECT_EQ(j["pullFrom"], "hub.example/library/nginx:latest");
  EXPECT_EQ(j["staleIfError"], true);
  j = ResolveJson({"nginx", "-n", "default", "--with-credentials", "-c", cfg});
  EXPECT_EQ(j["reason"], "credentials");
  EXPECT_EQ(j["pullFrom"], "nginx");
  EXPECT_EQ(j["staleIfError"], false);
  CliResult r = Cli({"resolve", "nginx", "-n", "default", "-c", cfg});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("image is on the node: that image (staleIfError"));
  EXPECT_THAT(r.out, HasSubstr("imagePullPolicy: Always"));
}

TEST(ResolveTest, BuiltinDefaultMatchesRepoConfig) {
  if (fs::exists("/etc/registry-proxy/config.yaml")) GTEST_SKIP() << "this host has a config";
  auto j = ResolveJson({"nginx", "-n", "default"});
  EXPECT_EQ(j["pullFrom"], "docker.ketches.cn/library/nginx:latest");
  EXPECT_THAT(j["config"]["source"].get<std::string>(), HasSubstr("built-in"));
}

TEST(ResolveTest, ExcludedNamespace) {
  auto j = ResolveJson({"nginx", "-n", "kube-system", "-c", kRepoConfig});
  EXPECT_EQ(j["pullFrom"], "nginx");
  EXPECT_EQ(j["reason"], "namespace_excluded");
  EXPECT_EQ(j["rewritten"], false);
  EXPECT_THAT(j["detail"].get<std::string>(), HasSubstr("kube-system"));
}

TEST(ResolveTest, DigestIsKept) {
  auto j = ResolveJson(
      {std::string("registry.k8s.io/pause:3.9@") + kDigest, "-n", "default", "-c", kRepoConfig});
  EXPECT_EQ(j["pullFrom"], std::string("k8s.ketches.cn/pause@") + kDigest);
}

TEST(ResolveTest, IdsPassThrough) {
  for (std::string id :
       {std::string(kDigest), std::string(kDigest).substr(7), std::string(kDigest).substr(7, 12)}) {
    auto j = ResolveJson({id, "-n", "default", "-c", kRepoConfig});
    EXPECT_EQ(j["pullFrom"], id);
    EXPECT_EQ(j["reason"], "image_id");
  }
}

TEST(ResolveTest, PathPrefixRules) {
  TempDir dir;
  fs::path cfg = dir.Write("config.yaml", R"(proxies:
  docker.io: docker.ketches.cn
rules:
  - match: docker.io/bitnami
    mirrors:
      - harbor.corp/proxy
      - host: hub-mirror.corp/cache
        dropLibrary: true
    includeNamespaces: [team-*]
  - match: docker.io
    mirrors:
      - host: hub-mirror.corp/cache
        dropLibrary: true
    fallback: false
)");
  auto j = ResolveJson({"bitnami/redis:7.2", "-n", "team-a", "-c", cfg.string()});
  ASSERT_EQ(j["candidates"].size(), 3u);
  EXPECT_EQ(j["candidates"][0]["image"], "harbor.corp/proxy/bitnami/redis:7.2");
  EXPECT_EQ(j["candidates"][1]["image"], "hub-mirror.corp/cache/bitnami/redis:7.2");
  EXPECT_EQ(j["candidates"][2]["image"], "bitnami/redis:7.2");
  // Outside team-*: the docker.io rule, library/ dropped, no fallback.
  auto k = ResolveJson({"nginx", "-n", "prod", "-c", cfg.string()});
  ASSERT_EQ(k["candidates"].size(), 1u);
  EXPECT_EQ(k["pullFrom"], "hub-mirror.corp/cache/nginx:latest");
}

TEST(ResolveTest, HumanOutputAndSeveralImages) {
  CliResult r = Cli({"resolve", "nginx", "quay.io/a/b", "-n", "default", "-c", kRepoConfig});
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("1. docker.ketches.cn/library/nginx:latest  (mirror"));
  EXPECT_THAT(r.out, HasSubstr("2. nginx  (upstream)"));
  EXPECT_THAT(r.out, HasSubstr("1. quay.ketches.cn/a/b:latest"));
  CliResult j = Cli({"resolve", "--json", "nginx", "quay.io/a/b", "-c", kRepoConfig});
  auto arr = nlohmann::json::parse(j.out);
  ASSERT_TRUE(arr.is_array());
  EXPECT_EQ(arr.size(), 2u);
  EXPECT_EQ(arr[0]["namespace"], nullptr);
}

TEST(ResolveTest, BadConfigIsAnError) {
  TempDir dir;
  fs::path cfg = dir.Write("bad.yaml", "proxies:\n  docker.io: docker.ketches.cn\nbogus: 1\n");
  CliResult r = Cli({"resolve", "nginx", "-c", cfg.string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("bad.yaml:3:1"));
}

TEST(ResolveTest, UsageErrors) {
  EXPECT_EQ(Cli({"resolve"}).code, 2);
  EXPECT_EQ(Cli({"resolve", "nginx", "--bogus"}).code, 2);
  EXPECT_EQ(Cli({"resolve", "nginx", "--namespace"}).code, 2);
  CliResult h = Cli({"resolve", "--help"});
  EXPECT_EQ(h.code, 0);
  EXPECT_THAT(h.out, HasSubstr("--namespace"));
}

// --- check-config ----------------------------------------------------------------------------

TEST(CheckConfigTest, RepoDefaultIsValid) {
  CliResult r = Cli({"check-config", kRepoConfig});
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("ok: 7 rules"));
  EXPECT_THAT(r.out, HasSubstr("docker.io -> docker.ketches.cn, upstream"));
}

TEST(CheckConfigTest, ErrorsHaveLineAndColumn) {
  TempDir dir;
  fs::path cfg = dir.Write("c.yaml", "enabled: true\nproxies:\n  docker.io: https://m.example\n");
  CliResult r = Cli({"check-config", cfg.string()});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr(cfg.string() + ":3:14"));
  EXPECT_THAT(r.err, HasSubstr("scheme"));
  CliResult j = Cli({"check-config", "--json", cfg.string()});
  EXPECT_EQ(j.code, 1);
  auto js = nlohmann::json::parse(j.out);
  EXPECT_EQ(js["valid"], false);
  ASSERT_GE(js["errors"].size(), 1u);
  EXPECT_EQ(js["errors"][0]["line"], 3);
  EXPECT_EQ(js["errors"][0]["column"], 14);
}

TEST(CheckConfigTest, MissingFile) {
  CliResult r = Cli({"check-config", "/nonexistent/registry-proxy.yaml"});
  EXPECT_EQ(r.code, 1);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/registry-proxy.yaml"));
}

TEST(CliTest, HelpVersionUnknown) {
  EXPECT_EQ(Cli({"--help"}).code, 0);
  EXPECT_THAT(Cli({"--version"}).out, HasSubstr("registry-proxy "));
  CliResult u = Cli({"frobnicate"});
  EXPECT_EQ(u.code, 2);
  EXPECT_THAT(u.err, HasSubstr("unknown command 'frobnicate'"));
  EXPECT_EQ(Cli({}).code, 2);
  for (const char* cmd : {"resolve", "check-config", "watch-config"}) {
    EXPECT_EQ(Cli({cmd, "--help"}).code, 0) << cmd;
  }
}

// --- the real binary: watch-config follows changes and SIGHUP --------------------------------

class Child {
 public:
  // `with_stderr`: stderr goes to the same pipe (serve logs there).
  explicit Child(const std::vector<std::string>& args, bool with_stderr = false) {
    int fds[2];
    EXPECT_EQ(pipe2(fds, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    if (with_stderr) posix_spawn_file_actions_adddup2(&fa, fds[1], 2);
    std::vector<std::string> a = args;
    std::vector<char*> argv;
    for (auto& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    EXPECT_EQ(posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    out_fd_ = fds[0];
  }
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_fd_ >= 0) close(out_fd_);
  }

  // Waits up to `timeout` for a line containing `needle`; returns it or "".
  std::string WaitForLine(const std::string& needle,
                          std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      size_t nl;
      while ((nl = buf_.find('\n')) != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        seen_ += line + "\n";
        if (line.find(needle) != std::string::npos) return line;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return "";
      pollfd p{out_fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[4096];
      ssize_t n = read(out_fd_, chunk, sizeof chunk);
      if (n <= 0) return "";
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }
  void Signal(int sig) { kill(pid_, sig); }
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  const std::string& seen() const { return seen_; }

 private:
  pid_t pid_ = -1;
  int out_fd_ = -1;
  std::string buf_, seen_;
};

TEST(WatchConfigBinaryTest, FollowsEditsRejectsBadFilesAndReloadsOnSighup) {
  TempDir dir;
  fs::path cfg = dir.Write("config.yaml", "proxies:\n  docker.io: a.example\n");
  Child child({RP_BINARY, "watch-config", cfg.string(), "--settle", "50"});
  ASSERT_NE(child.WaitForLine("reload applied generation=1"), "") << child.seen();
  ASSERT_NE(child.WaitForLine("watching"), "") << child.seen();

  dir.Write("config.yaml", "proxies:\n  docker.io: b.example\n");
  ASSERT_NE(child.WaitForLine("reload applied generation=2"), "") << child.seen();

  dir.Write("config.yaml", "proxies:\n  docker.io: b.example\nbogus: true\n");
  std::string rejected = child.WaitForLine("reload rejected");
  ASSERT_NE(rejected, "") << child.seen();
  EXPECT_THAT(rejected, HasSubstr("generation=2"));  // the good config stays in force
  EXPECT_THAT(rejected, HasSubstr("config.yaml:3:1"));

  // SIGHUP reloads although nothing changed since: the file is still bad, so rejected again.
  child.Signal(SIGHUP);
  std::string again = child.WaitForLine("reload rejected");
  ASSERT_NE(again, "") << child.seen();
  EXPECT_THAT(again, HasSubstr("rejected=2"));

  dir.Write("config.yaml", "proxies:\n  docker.io: c.example\n");
  ASSERT_NE(child.WaitForLine("reload applied generation=3"), "") << child.seen();
  child.Signal(SIGHUP);
  ASSERT_NE(child.WaitForLine("reload unchanged generation=3"), "") << child.seen();

  child.Signal(SIGTERM);
  EXPECT_EQ(child.Wait(), 0);
}

// --- the real binary: serve's flags, reloads and signals --------------------------------------

// serve without containerd: the relay dials containerd only when a call comes, so starting,
// reloading and stopping need none.
std::vector<std::string> ServeArgs(const TempDir& dir, const fs::path& cfg) {
  return {RP_BINARY,           "serve",    "--config",
          cfg.string(),        "--listen", "unix://" + (dir.path() / "rp.sock").string(),
          "--metrics-address", ""};
}

// A unit written for the retired gRPC engine keeps the node serving; a reload that leaves the
// sockets alone says nothing about them (the flag sets listen, the config never changed
// upstream); SIGPIPE (a peer gone mid-write) does not kill the daemon.
TEST(ServeBinaryTest, RetiredEngineFlagReloadAndSigpipe) {
  TempDir dir;
  fs::path cfg = dir.Write("config.yaml", "node:\n  upstream: unix:///nonexistent/a.sock\n");
  std::vector<std::string> args = ServeArgs(dir, cfg);
  args.insert(args.end(), {"--engine", "grpc"});
  Child child(args, /*with_stderr=*/true);
  ASSERT_NE(child.WaitForLine("--engine grpc is ignored"), "") << child.seen();
  ASSERT_NE(child.WaitForLine("registry-proxy serving"), "") << child.seen();

  dir.Write("config.yaml", "node:\n  upstream: unix:///nonexistent/a.sock\nproxies: {}\n");
  ASSERT_NE(child.WaitForLine("applied: generation 2"), "") << child.seen();
  child.Signal(SIGHUP);  // serialised after the reload above, its listener included
  ASSERT_NE(child.WaitForLine("unchanged (generation 2"), "") << child.seen();
  EXPECT_THAT(child.seen(), Not(HasSubstr("take effect on restart")));

  child.Signal(SIGPIPE);
  // A changed upstream, chosen by the config (no --upstream flag), does wait for a restart.
  dir.Write("config.yaml", "node:\n  upstream: unix:///nonexistent/b.sock\n");
  ASSERT_NE(child.WaitForLine("take effect on restart"), "") << child.seen();
  child.Signal(SIGTERM);
  EXPECT_EQ(child.Wait(), 0) << child.seen();  // 128+13 if SIGPIPE had killed it
}

}  // namespace
}  // namespace registry_proxy
