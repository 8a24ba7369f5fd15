// The testbed itself, against a real containerd (1.6, or the matrix's RP_CONTAINERD_VERSION)
// and real registries: what later integration tests rely on (pulls, pinning, host mapping,
// restarts, fault helpers, cleanup), and the CRI client subcommands against the real containerd.
#include "testbed.h"

#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "commands/cli.h"

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using ::testing::AnyOf;
using ::testing::Contains;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

#define REQUIRE_TESTBED()                                                       \
  do {                                                                          \
    if (std::string why = SkipReason(); !why.empty()) {                         \
      if (IntegrationRequired()) FAIL() << "RP_REQUIRE_INTEGRATION=1: " << why; \
      GTEST_SKIP() << why;                                                      \
    }                                                                           \
  } while (0)

#define ASSERT_OK(expr)                                          \
  do {                                                           \
    const auto& _s = (expr);                                     \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s.error_message(); \
  } while (0)

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::unique_ptr<Testbed> NewTestbed() {
  auto tb = Testbed::Create();
  EXPECT_TRUE(tb.ok()) << tb.error();
  return tb.ok() ? std::move(tb).value() : nullptr;
}

template <typename T>
T* Must(Result<T*> r, const char* what) {
  EXPECT_TRUE(r.ok()) << what << ": " << r.error();
  return r.ok() ? *r : nullptr;
}

grpc::Status Pull(Containerd* cd, const std::string& image, std::string* image_ref = nullptr,
                  milliseconds timeout = seconds(60)) {
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(image);
  runtime::v1::PullImageResponse resp;
  grpc::Status s = cd->cri().PullImage(req, &resp, timeout);
  if (image_ref) *image_ref = resp.image_ref();
  return s;
}

std::optional<runtime::v1::Image> StatusOf(Containerd* cd, const std::string& image) {
  runtime::v1::ImageStatusResponse resp;
  grpc::Status s = cd->cri().ImageStatus(image, false, &resp);
  EXPECT_TRUE(s.ok()) << s.error_message();
  if (!resp.has_image()) return std::nullopt;
  return resp.image();
}

std::vector<std::string> Tags(const runtime::v1::Image& img) {
  return {img.repo_tags().begin(), img.repo_tags().end()};
}
std::vector<std::string> Digests(const runtime::v1::Image& img) {
  return {img.repo_digests().begin(), img.repo_digests().end()};
}

bool ConnectRefused(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr = rp_testbed::LoopbackAddress(port);
  int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(fd);
  return rc != 0 && err == ECONNREFUSED;
}

// A pid is gone when it no longer exists or is a zombie nobody reaped yet.
bool Gone(pid_t pid) {
  if (kill(pid, 0) != 0) return true;
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

grpc::Status RunHostNetworkPod(Containerd* cd, const std::string& name, std::string* id) {
  runtime::v1::RunPodSandboxRequest req;
  auto* md = req.mutable_config()->mutable_metadata();
  md->set_name(name);
  md->set_uid(name + "-uid");
  md->set_namespace_("default");
  // No CNI here: only host-network pods run, and they must leave hostname empty.
  req.mutable_config()
      ->mutable_linux()
      ->mutable_security_context()
      ->mutable_namespace_options()
      ->set_network(runtime::v1::NODE);
  runtime::v1::RunPodSandboxResponse resp;
  grpc::ClientContext ctx;
  registry_proxy::GrpcCriClient::SetTimeout(&ctx, seconds(60));
  grpc::Status s = cd->cri().runtime().RunPodSandbox(&ctx, req, &resp);
  *id = resp.pod_sandbox_id();
  return s;
}

// ---------------------------------------------------------------------------------------------

TEST(Testbed, ContainerdStartsAndAnswersCriVersion) {
  REQUIRE_TESTBED();
  auto t0 = Clock::now();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  std::cout << "[ timing ] testbed with containerd up in " << Since(t0) << " s\n";
  runtime::v1::VersionResponse v;
  ASSERT_OK(cd->cri().Version(&v));
  EXPECT_EQ(v.runtime_name(), "containerd");
  EXPECT_EQ(v.runtime_api_version(), "v1");
  // The system's 1.6 (Debian 12), or the matrix's version: the binary under test answers.
  const char* want = std::getenv("RP_CONTAINERD_VERSION");
  const std::string version = want && *want ? want : "1.6";
  EXPECT_EQ(ContainerdUnderTest().version, version);
  EXPECT_THAT(v.runtime_version(), ::testing::StartsWith(version + ".")) << v.runtime_version();
  EXPECT_TRUE(fs::exists(cd->socket_path()));
  EXPECT_THAT(cd->socket_path(), ::testing::StartsWith(tb->dir()));
  // Every public host is pinned dead.
  for (const auto& h : PublicRegistryHosts()) {
    std::ifstream f(cd->certs_dir() + "/" + h + "/hosts.toml");
    std::string toml((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    EXPECT_THAT(toml, HasSubstr("server = \"http://127.0.0.1:9\"")) << h;
    EXPECT_THAT(toml, HasSubstr("[host.\"http://127.0.0.1:9\"]")) << h;
  }
}

TEST(Testbed, ContainerdStartFailureSaysWhyWithTheLogTail) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  // A file where containerd wants its root dir.
  fs::create_directories(tb->dir() + "/containerd");
  std::ofstream(tb->dir() + "/containerd/root") << "not a dir";
  ContainerdOptions opts;
  opts.sandbox_image = "127.0.0.1:9/pause:3.9";  // no registry needed
  auto t0 = Clock::now();
  auto cd = tb->StartContainerd(opts);
  ASSERT_FALSE(cd.ok());
  EXPECT_LT(Since(t0), 10.0);
  EXPECT_THAT(cd.error(), HasSubstr("containerd exited"));
  EXPECT_THAT(cd.error(), HasSubstr("containerd.log"));
  EXPECT_THAT(cd.error(), HasSubstr("/containerd/root"));  // from containerd's own log
  std::cout << "[ info   ] " << cd.error().substr(0, 400) << "\n";
}

TEST(Testbed, PullFromLocalRegistryIsLoggedByTheRegistry) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* reg = Must(tb->AddRegistry("upstream"), "registry");
  ASSERT_TRUE(reg);
  auto digest = tb->PushTestImage(reg, "library/busybox", "latest");
  ASSERT_TRUE(digest.ok()) << digest.error();
  auto img = TestImage::Get();
  ASSERT_TRUE(img.ok());
  EXPECT_EQ(*digest, (*img)->ManifestDigest());
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  EXPECT_EQ(reg->ManifestRequests("library/busybox"), 0u) << "pushes do not count";

  const std::string ref = reg->host() + "/library/busybox:latest";
  std::string image_ref;
  auto t0 = Clock::now();
  ASSERT_OK(Pull(cd, ref, &image_ref));
  std::cout << "[ timing ] pull from a local registry " << Since(t0) << " s\n";
  EXPECT_EQ(image_ref, (*img)->ImageId());
  EXPECT_TRUE(WaitFor([&] { return reg->ManifestRequests("library/busybox") >= 1; }, seconds(5)));
  EXPECT_GE(reg->BlobRequests("library/busybox"), 1u);
  auto paths = reg->RequestedPaths();
  EXPECT_THAT(paths, Contains(AnyOf("HEAD /v2/library/busybox/manifests/latest",
                                    "GET /v2/library/busybox/manifests/latest")));
  for (const auto& r : reg->Requests()) {
    if (r.path.rfind("/v2/library/busybox/manifests/", 0) == 0 &&
        r.user_agent.find("skopeo") == std::string::npos) {
      EXPECT_THAT(r.user_agent, HasSubstr("containerd"));
      EXPECT_EQ(r.status, 200);
    }
  }
  auto st = StatusOf(cd, ref);
  ASSERT_TRUE(st);
  EXPECT_EQ(st->id(), (*img)->ImageId());
  EXPECT_THAT(Tags(*st), Contains(ref));
  EXPECT_THAT(Digests(*st), Contains(reg->host() + "/library/busybox@" + *digest));

  reg->ResetRequests();
  EXPECT_EQ(reg->ManifestRequests("library/busybox"), 0u);
  ASSERT_OK(Pull(cd, ref));
  EXPECT_TRUE(WaitFor([&] { return reg->ManifestRequests("library/busybox") >= 1; }, seconds(5)))
      << "containerd resolves the tag again on every pull";
}

TEST(Testbed, PinnedPublicHostsFailFastWithConnectionRefused) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  ContainerdOptions opts;
  opts.extra_dead_hosts = {"docker.cloudsmith.io"};
  Containerd* cd = Must(tb->StartContainerd(opts), "containerd");
  ASSERT_TRUE(cd);
  for (const std::string image :
       {"busybox", "docker.io/library/busybox:latest", "registry.k8s.io/pause:3.9",
        "quay.io/coreos/etcd:v3.5.0", "ghcr.io/a/b:c", "gcr.io/x/y:1", "k8s.gcr.io/pause:3.2",
        "docker.cloudsmith.io/org/repo/img:1"}) {
    auto t0 = Clock::now();
    grpc::Status s = Pull(cd, image, nullptr, seconds(30));
    double took = Since(t0);
    EXPECT_FALSE(s.ok()) << image;
    EXPECT_LT(took, 5.0) << image << " took " << took << " s";
    EXPECT_THAT(s.error_message(), HasSubstr("127.0.0.1:9")) << image;
    EXPECT_THAT(s.error_message(), HasSubstr("connection refused")) << image;
    if (image == "busybox") {
      std::cout << "[ info   ] pinned pull: " << registry_proxy::GrpcStatusText(s) << "\n";
    }
  }
}

TEST(Testbed, DockerIoMappedToALocalUpstream) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* upstream = Must(tb->AddRegistry("upstream"), "upstream");
  ASSERT_TRUE(upstream);
  ASSERT_TRUE(tb->PushTestImage(upstream, "library/busybox").ok());
  ContainerdOptions opts;
  opts.host_map["docker.io"] = upstream->host();
  Containerd* cd = Must(tb->StartContainerd(opts), "containerd");
  ASSERT_TRUE(cd);
  auto img = TestImage::Get();
  ASSERT_TRUE(img.ok());

  std::string image_ref;
  ASSERT_OK(Pull(cd, "busybox", &image_ref));
  EXPECT_EQ(image_ref, (*img)->ImageId());
  EXPECT_TRUE(
      WaitFor([&] { return upstream->ManifestRequests("library/busybox") >= 1; }, seconds(5)));
  auto st = StatusOf(cd, "docker.io/library/busybox:latest");
  ASSERT_TRUE(st);
  EXPECT_THAT(Tags(*st), Contains("docker.io/library/busybox:latest"));
  EXPECT_THAT(Digests(*st), Contains("docker.io/library/busybox@" + (*img)->ManifestDigest()));

  // hosts.toml is read on every pull: re-pinning and re-mapping need no restart.
  ASSERT_TRUE(cd->PinDead("docker.io").ok());
  grpc::Status dead = Pull(cd, "busybox", nullptr, seconds(30));
  EXPECT_FALSE(dead.ok());
  EXPECT_THAT(dead.error_message(), HasSubstr("connection refused"));
  ASSERT_TRUE(cd->MapHost("docker.io", upstream->host()).ok());
  ASSERT_OK(Pull(cd, "busybox"));
}

TEST(Testbed, SameDigestOnUpstreamAndMirror) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* upstream = Must(tb->AddRegistry("upstream"), "upstream");
  Registry* mirror = Must(tb->AddRegistry("mirror"), "mirror");
  ASSERT_TRUE(upstream && mirror);
  EXPECT_NE(upstream->port(), mirror->port());
  auto d1 = tb->PushTestImage(upstream, "library/busybox");
  auto d2 = tb->PushTestImage(mirror, "library/busybox");
  ASSERT_TRUE(d1.ok() && d2.ok());
  EXPECT_EQ(*d1, *d2);
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  std::string from_mirror;
  ASSERT_OK(Pull(cd, mirror->host() + "/library/busybox:latest", &from_mirror));
  EXPECT_TRUE(
      WaitFor([&] { return mirror->ManifestRequests("library/busybox") >= 1; }, seconds(5)));
  EXPECT_EQ(upstream->ManifestRequests("library/busybox"), 0u);
  auto st = StatusOf(cd, from_mirror);
  ASSERT_TRUE(st);
  EXPECT_THAT(Digests(*st), Contains(mirror->host() + "/library/busybox@" + *d1));
}

TEST(Testbed, ContainerdRestartKeepsImages) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* reg = Must(tb->AddRegistry("r"), "registry");
  ASSERT_TRUE(reg);
  ASSERT_TRUE(tb->PushTestImage(reg, "library/busybox").ok());
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  const std::string ref = reg->host() + "/library/busybox:latest";
  std::string id;
  ASSERT_OK(Pull(cd, ref, &id));
  const pid_t old_pid = cd->pid();

  cd->Stop();
  EXPECT_FALSE(cd->running());
  runtime::v1::VersionResponse v;
  EXPECT_EQ(cd->cri().Version(&v, seconds(2)).error_code(), grpc::StatusCode::UNAVAILABLE);
  auto t0 = Clock::now();
  ASSERT_TRUE(cd->Start().ok());
  std::cout << "[ timing ] containerd restart " << Since(t0) << " s\n";
  EXPECT_NE(cd->pid(), old_pid);
  // The same client reconnects by itself.
  ASSERT_OK(cd->cri().Version(&v));
  auto st = StatusOf(cd, ref);
  ASSERT_TRUE(st) << "image lost across restart";
  EXPECT_EQ(st->id(), id);
}

TEST(Testbed, RegistryStopStartSimulatesADeadMirror) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* mirror = Must(tb->AddRegistry("mirror"), "registry");
  ASSERT_TRUE(mirror);
  ASSERT_TRUE(tb->PushTestImage(mirror, "library/busybox").ok());
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  const std::string ref = mirror->host() + "/library/busybox:latest";
  const int port = mirror->port();

  mirror->Stop();
  EXPECT_TRUE(ConnectRefused(port));
  grpc::Status s = Pull(cd, ref, nullptr, seconds(30));
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(s.error_message(), HasSubstr("connection refused"));

  ASSERT_TRUE(mirror->Start().ok());
  EXPECT_EQ(mirror->port(), port);
  ASSERT_OK(Pull(cd, ref));  // data survived the restart
}

TEST(Testbed, DeadPortAndBlackHole) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  auto port = PickFreePort();
  ASSERT_TRUE(port.ok());
  EXPECT_TRUE(ConnectRefused(*port));
  EXPECT_TRUE(ConnectRefused(9));

  BlackHole* hole = Must(tb->AddBlackHole(), "black hole");
  ASSERT_TRUE(hole);
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  // A hung registry hangs containerd's pull until the caller's deadline.
  auto t0 = Clock::now();
  grpc::Status s = Pull(cd, hole->host() + "/library/busybox:latest", nullptr, seconds(2));
  double took = Since(t0);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << s.error_message();
  EXPECT_GE(took, 1.9);
  EXPECT_LT(took, 10.0);
  EXPECT_GE(hole->accepted(), 1u);
}

TEST(Testbed, SandboxImageRunsAHostNetworkPod) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  std::string id;
  auto t0 = Clock::now();
  ASSERT_OK(RunHostNetworkPod(cd, "pod-a", &id));
  std::cout << "[ timing ] RunPodSandbox " << Since(t0) << " s\n";
  EXPECT_FALSE(id.empty());
  EXPECT_FALSE(MountsUnder(tb->dir()).empty()) << "a running pod has mounts under the dir";
  for (auto stop : {true, false}) {
    grpc::ClientContext ctx;
    registry_proxy::GrpcCriClient::SetTimeout(&ctx, seconds(30));
    grpc::Status s;
    if (stop) {
      runtime::v1::StopPodSandboxRequest req;
      req.set_pod_sandbox_id(id);
      runtime::v1::StopPodSandboxResponse resp;
      s = cd->cri().runtime().StopPodSandbox(&ctx, req, &resp);
    } else {
      runtime::v1::RemovePodSandboxRequest req;
      req.set_pod_sandbox_id(id);
      runtime::v1::RemovePodSandboxResponse resp;
      s = cd->cri().runtime().RemovePodSandbox(&ctx, req, &resp);
    }
    ASSERT_OK(s);
  }
}

// The destructor cleans up even when a test leaves a pod running and fails midway.
TEST(Testbed, TeardownLeavesNoProcessNoMountNoDir) {
  REQUIRE_TESTBED();
  std::string dir, shim_socket, pod_id;
  std::vector<pid_t> pids;
  {
    auto tb = NewTestbed();
    ASSERT_TRUE(tb);
    dir = tb->dir();
    Registry* reg = Must(tb->AddRegistry("r"), "registry");
    ASSERT_TRUE(reg);
    ASSERT_TRUE(tb->AddBlackHole().ok());
    Containerd* cd = Must(tb->StartContainerd(), "containerd");
    ASSERT_TRUE(cd);
    std::string id;
    ASSERT_OK(RunHostNetworkPod(cd, "left-running", &id));
    pod_id = id;
    pids = tb->Pids();
    // The pod's shim and its sandbox process are not our children.
    const fs::path bundle = cd->dir() + "/state/io.containerd.runtime.v2.task/k8s.io/" + id;
    std::ifstream in(bundle / "init.pid");
    pid_t pause = 0;
    ASSERT_TRUE(in >> pause) << "no init.pid in " << bundle;
    pids.push_back(pause);
    std::vector<pid_t> shims = ProcessesInDir(bundle.string());  // it runs in its bundle
    ASSERT_EQ(shims.size(), 1u);
    pids.push_back(shims[0]);
    shim_socket = ShimSocket(bundle.string());
    ASSERT_FALSE(shim_socket.empty()) << "no address or bootstrap.json in " << bundle;
    EXPECT_TRUE(fs::exists(shim_socket));
    EXPECT_FALSE(MountsUnder(dir).empty());
    for (pid_t p : pids) EXPECT_FALSE(Gone(p)) << p;
  }                            // ~Testbed, with the pod still running
  EXPECT_EQ(pids.size(), 4u);  // containerd, registry, shim, pause
  for (pid_t p : pids) {
    EXPECT_TRUE(WaitFor([&] { return Gone(p); }, seconds(5))) << "pid " << p << " survived";
  }
  EXPECT_THAT(ProcessesInDir(dir), ::testing::IsEmpty());
  EXPECT_THAT(MountsUnder(dir), ::testing::IsEmpty());
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(shim_socket));
  // runc delete --force also removed the pod's cgroups (cgroup v1 or v2).
  std::error_code ec;
  for (const auto& controller : fs::directory_iterator("/sys/fs/cgroup", ec)) {
    EXPECT_FALSE(fs::exists(controller.path() / "k8s.io" / pod_id)) << controller.path();
  }
}

// A test process that dies without destructors (sanitizer abort, SIGKILL on timeout): its
// children die with it, and the next testbed removes what is left.
TEST(Testbed, ADeadOwnersLeftoversAreReaped) {
  REQUIRE_TESTBED();
  std::string tmpl = (fs::temp_directory_path() / "rp-reap-test.XXXXXX").string();
  ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
  const std::string log = tmpl + "/rp-testbed.out";
  Process up;
  ASSERT_TRUE(up.Spawn({RP_TESTBED_BINARY, "up"}, log).ok());
  nlohmann::json info;
  bool started = WaitFor(
      [&] {
        std::ifstream f(log);
        for (std::string line; std::getline(f, line);) {
          if (line.rfind("{", 0) == 0) {
            info = nlohmann::json::parse(line, nullptr, false);
            return !info.is_discarded();
          }
        }
        return !up.Running();
      },
      seconds(60));
  ASSERT_TRUE(started && up.Running()) << TailFile(log);
  const std::string dir = info["dir"];
  std::vector<pid_t> children = {info["containerd"]["pid"], info["upstream"]["pid"],
                                 info["mirror"]["pid"]};
  EXPECT_TRUE(fs::exists(dir + "/owner"));

  kill(up.pid(), SIGKILL);
  ASSERT_TRUE(up.Wait(seconds(5)));
  for (pid_t p : children) {
    EXPECT_TRUE(WaitFor([&] { return Gone(p); }, seconds(5))) << "pid " << p << " outlived it";
  }
  EXPECT_TRUE(fs::exists(dir)) << "nobody cleaned up yet";

  auto tb = Testbed::Create();  // reaps dirs whose owner is dead
  ASSERT_TRUE(tb.ok()) << tb.error();
  EXPECT_FALSE(fs::exists(dir));
  fs::remove_all(tmpl);
}

// ---------------------------------------------------------------------------------------------
// The CRI client subcommands against the real containerd.

struct CliOut {
  int code;
  std::string out, err;
};

CliOut Cli(std::vector<std::string> args) {
  args.insert(args.begin(), "registry-proxy");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  std::ostringstream out, err;
  int code = registry_proxy::RunCli(static_cast<int>(argv.size()), argv.data(), out, err);
  return {code, out.str(), err.str()};
}

TEST(ClientCommands, PullImagesStatusRemoveAgainstContainerd) {
  REQUIRE_TESTBED();
  auto tb = NewTestbed();
  ASSERT_TRUE(tb);
  Registry* reg = Must(tb->AddRegistry("r"), "registry");
  ASSERT_TRUE(reg);
  ASSERT_TRUE(tb->PushTestImage(reg, "library/busybox", "latest").ok());
  ASSERT_TRUE(tb->PushTestImage(reg, "other/busybox", "v1").ok());
  Containerd* cd = Must(tb->StartContainerd(), "containerd");
  ASSERT_TRUE(cd);
  auto img = TestImage::Get();
  ASSERT_TRUE(img.ok());
  const std::string ep = "--endpoint=" + cd->endpoint();
  const std::string a = reg->host() + "/library/busybox:latest";
  const std::string b = reg->host() + "/other/busybox:v1";

  CliOut pull = Cli({"pull", a, ep, "--json"});
  ASSERT_EQ(pull.code, 0) << pull.err;
  EXPECT_EQ(nlohmann::json::parse(pull.out)["imageRef"], (*img)->ImageId());
  // With pod metadata (containerd ignores it; the daemon decides by it).
  CliOut pull_ns = Cli({"pull", b, ep, "-n", "team-a", "--pod-name", "web"});
  ASSERT_EQ(pull_ns.code, 0) << pull_ns.err;
  EXPECT_THAT(pull_ns.out, HasSubstr("image id: " + (*img)->ImageId()));

  CliOut images = Cli({"images", ep, "--json"});
  ASSERT_EQ(images.code, 0) << images.err;
  bool found = false;
  for (const auto& i : nlohmann::json::parse(images.out)) {
    if (i["id"] != (*img)->ImageId()) continue;
    found = true;
    EXPECT_THAT(i["repoTags"].get<std::vector<std::string>>(), Contains(a));
    EXPECT_THAT(i["repoTags"].get<std::vector<std::string>>(), Contains(b));
    EXPECT_GT(i["size"].get<uint64_t>(), 0u);
  }
  EXPECT_TRUE(found) << images.out;
  CliOut table = Cli({"images", ep});
  ASSERT_EQ(table.code, 0);
  EXPECT_THAT(table.out, HasSubstr((*img)->ImageId().substr(7, 12)));
  std::cout << table.out;

  CliOut status = Cli({"status", a, ep});
  ASSERT_EQ(status.code, 0) << status.err;
  EXPECT_THAT(status.out, HasSubstr("id:       " + (*img)->ImageId()));
  EXPECT_THAT(status.out, HasSubstr("digest:   " + reg->host() + "/library/busybox@" +
                                    (*img)->ManifestDigest()));

  // Removing by id removes every name.
  CliOut rm = Cli({"remove", (*img)->ImageId(), ep});
  ASSERT_EQ(rm.code, 0) << rm.err;
  EXPECT_THAT(rm.out, HasSubstr(a));
  EXPECT_THAT(rm.out, HasSubstr(b));
  for (const auto& name : {a, b, (*img)->ImageId()}) {
    CliOut gone = Cli({"status", name, ep});
    EXPECT_EQ(gone.code, 1) << name << ": " << gone.out;
    EXPECT_THAT(gone.err, HasSubstr("image not found"));
  }
  CliOut again = Cli({"remove", a, ep});
  EXPECT_EQ(again.code, 0);
  EXPECT_THAT(again.out, HasSubstr("not present"));

  // containerd's error comes through unchanged, with its code name.
  CliOut dead = Cli({"pull", "busybox", ep, "--timeout", "30s"});
  EXPECT_EQ(dead.code, 1);
  EXPECT_THAT(dead.err, ::testing::StartsWith("pull: "));
  EXPECT_THAT(dead.err, HasSubstr("connection refused"));
  std::cout << "[ info   ] " << dead.err;
}

}  // namespace
}  // namespace rp_testbed
