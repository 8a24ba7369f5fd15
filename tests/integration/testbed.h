// The integration testbed: a private containerd and real registries on loopback, in a fresh
// temp dir, with a test image built without the internet. Used by the integration tests and
// by `rp-testbed up` (the README's demo on machines without containerd).
//
// Everything is started with posix_spawn (no shell), logs to files in the temp dir, and is
// stopped by PID in destructors (SIGTERM, then SIGKILL); mounts left under the temp dir are
// detached and the dir removed, so a failing test leaves nothing behind. Nothing here throws;
// failures come back as Status/Result with the tail of the relevant log.
//
// No traffic leaves loopback: every public registry host is pinned in containerd's hosts.toml
// to a closed port (127.0.0.1:9), unless a test maps it to one of its local registries.
#pragma once

#include <netinet/in.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/status.h"
#include "grpc_cri_client.h"

namespace rp_testbed {

using registry_proxy::Result;
using registry_proxy::Status;

// Why the testbed cannot run on this machine ("" when it can): not root, or a binary missing.
// Tests GTEST_SKIP with it, unless RP_REQUIRE_INTEGRATION=1 (then they fail: CI installs it all).
std::string SkipReason();
bool IntegrationRequired();

// The containerd under test. By default the one on PATH (Debian 12: 1.6). The test matrix
// sets RP_CONTAINERD_VERSION (e.g. "1.7", "2.1"): the binaries then come from
// $RP_CONTAINERD_DIR_1_7 (a dir holding containerd and containerd-shim-runc-v2) or, without
// it, from scripts/fetch-deb.sh's cache ($RP_CACHE_DIR, else ~/.cache/registry-proxy:
// deb/containerd_<version>*/usr/bin, the newest). Not found: SkipReason says so.
struct ContainerdBuild {
  std::string bin_dir;  // "" for PATH
  std::string version;  // major.minor of `containerd --version`, e.g. "2.1"; "" when unknown
  std::string problem;  // why it cannot be used ("" when it can)
  int major() const { return version.empty() ? 0 : std::stoi(version); }
};
const ContainerdBuild& ContainerdUnderTest();

// The unix socket of the shim serving a task bundle dir ("" if none): containerd 1.x writes it
// to <bundle>/address, 2.x to <bundle>/bootstrap.json.
std::string ShimSocket(const std::string& bundle);

// The public registries tests must never reach: pinned to kDeadHost in every containerd.
const std::vector<std::string>& PublicRegistryHosts();
// Nothing listens on the discard port: connections are refused at once.
inline constexpr char kDeadHost[] = "127.0.0.1:9";

// Polls pred every `poll` until it holds or timeout passes; returns its last value. Registries
// log a request only after answering it, so tests poll for log lines.
bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout,
             std::chrono::milliseconds poll = std::chrono::milliseconds(20));

// A free loopback TCP port right now (bind to 0, read it, close): a dead endpoint that
// refuses connections, until someone else takes it.
Result<int> PickFreePort();

// 127.0.0.1:port, for connect(2).
sockaddr_in LoopbackAddress(int port);

// ---------------------------------------------------------------------------------------------

// A child process with stdout+stderr appended to a log file, stopped by PID.
class Process {
 public:
  Process() = default;
  ~Process() { Stop(); }
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  // argv[0] is looked up in PATH; the child runs in `cwd` ("" = ours). Signal mask and
  // dispositions are reset in the child (a parent waiting in sigwait blocks SIGTERM, and the
  // child must not inherit that). The child gets its own process group, so a terminal's
  // Ctrl-C reaches only the parent, which then stops children in order.
  // If this process dies without running destructors (a sanitizer abort, SIGKILL from a test
  // timeout), the child gets SIGKILL (PR_SET_PDEATHSIG, set by util-linux setpriv before it
  // execs the program). Note: that fires when the *thread* that spawned it exits, so spawn
  // long-lived children from a thread that outlives them (the main thread).
  Status Spawn(const std::vector<std::string>& argv, const std::string& log_path,
               const std::string& cwd = "");
  // SIGTERM, wait up to `grace`, then SIGKILL and reap. Returns false if SIGKILL was needed.
  bool Stop(std::chrono::milliseconds grace = std::chrono::seconds(5));
  // Reaps without blocking; false once the process has exited.
  bool Running();
  // Waits for exit (up to timeout); returns the exit status (as waitpid's) or nullopt.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  pid_t pid() const { return pid_; }
  // What the last exit was, for messages ("exit 1", "signal 9").
  std::string ExitDescription() const;

 private:
  pid_t pid_ = -1;
  int wait_status_ = 0;
  bool exited_ = false;
};

// Runs argv to completion (bounded by timeout; killed after), output to log_path.
// Error on a non-zero exit, with the log's tail.
Status RunCommand(const std::vector<std::string>& argv, const std::string& log_path,
                  std::chrono::milliseconds timeout = std::chrono::seconds(60),
                  const std::string& cwd = "");

// The last `lines` lines of a file ("" if unreadable).
std::string TailFile(const std::string& path, size_t lines = 30);

// ---------------------------------------------------------------------------------------------

// The busybox test image as an OCI layout, built once per process (umoci records timestamps,
// so every build has new digests: build once, push the same layout under every name).
// Tags: "latest" (entrypoint /bin/sh) and "pause" (sleeps forever: a sandbox image).
class TestImage {
 public:
  // Builds on first use; thread-safe. The layout lives in its own temp dir, removed at exit.
  static Result<const TestImage*> Get();

  const std::string& layout() const { return layout_; }
  // The manifest digest ("sha256:...") of a tag: what a registry serves and repo digests show.
  std::string ManifestDigest(const std::string& tag = "latest") const;
  // The config digest: the image id containerd reports (PullImage's image_ref).
  std::string ImageId(const std::string& tag = "latest") const;

 private:
  struct Tag {
    std::string manifest_digest, config_digest;
  };
  std::string layout_;
  std::map<std::string, Tag> tags_;
  friend struct TestImageBuilder;
};

// ---------------------------------------------------------------------------------------------

// One request a registry logged (its access log).
struct RegistryRequest {
  std::string method;  // GET, HEAD, PUT, ...
  // /v2/library/busybox/manifests/latest, with any query: containerd adds ?ns=docker.io
  // when it pulls docker.io through a hosts.toml host.
  std::string path;
  int status = 0;          // HTTP status
  std::string user_agent;  // containerd/1.6.20~ds1, skopeo/1.9.3, ...
};

// A docker-registry (CNCF distribution 2.8) on 127.0.0.1:<port>, storage in its own dir.
class Registry {
 public:
  // `dir` is created; the port is picked on the first Start() and kept across restarts
  // (containerd's hosts.toml may point at it).
  Registry(std::string name, std::string dir);
  ~Registry() { Stop(); }

  Status Start();  // waits (10 s max) until it logs that it listens
  void Stop();     // a dead mirror: connections are refused until Start()
  bool running() { return proc_.Running(); }

  const std::string& name() const { return name_; }
  int port() const { return port_; }
  std::string host() const;  // "127.0.0.1:PORT"
  const std::string& log_path() const { return log_path_; }
  pid_t pid() const { return proc_.pid(); }

  // Pushes a tag of the test image as host()/repo:tag (skopeo, plain HTTP).
  Status Push(const TestImage& image, const std::string& repo, const std::string& tag,
              const std::string& image_tag = "latest");

  // Requests logged since the last ResetRequests() (all, from the first start, at first).
  std::vector<RegistryRequest> Requests() const;
  // "GET /v2/library/busybox/manifests/latest", in order.
  std::vector<std::string> RequestedPaths() const;
  // GET/HEAD of /v2/<repo>/manifests/... by anyone but the testbed's own skopeo: the pulls.
  size_t ManifestRequests(const std::string& repo) const;
  // GET of /v2/<repo>/blobs/... by anyone but skopeo.
  size_t BlobRequests(const std::string& repo) const;
  // Later Requests() see only what comes after now.
  void ResetRequests();

 private:
  std::string name_, dir_, log_path_;
  int port_ = 0;
  size_t log_offset_ = 0;
  Process proc_;
};

// A listening socket that accepts every connection and never answers (a hung mirror).
class BlackHole {
 public:
  BlackHole() = default;
  ~BlackHole();
  BlackHole(const BlackHole&) = delete;
  BlackHole& operator=(const BlackHole&) = delete;

  Status Start();
  std::string host() const;  // "127.0.0.1:PORT"
  int port() const { return port_; }
  size_t accepted() const { return accepted_.load(); }

 private:
  void Loop();
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};
  int port_ = 0;
  std::atomic<size_t> accepted_{0};
  std::thread thread_;
};

// ---------------------------------------------------------------------------------------------

struct ContainerdOptions {
  // What RunPodSandbox pulls; Testbed::StartContainerd fills it in from a registry.
  std::string sandbox_image;
  // Host names to pin dead besides PublicRegistryHosts().
  std::vector<std::string> extra_dead_hosts;
  // Registry host name -> "127.0.0.1:PORT": e.g. docker.io served by a local "upstream".
  std::map<std::string, std::string> host_map;
  std::chrono::milliseconds start_timeout = std::chrono::seconds(30);
};

// A private containerd (ContainerdUnderTest()) with its CRI plugin, everything under `dir`.
class Containerd {
 public:
  Containerd(std::string dir, ContainerdOptions options);
  ~Containerd();

  // Writes the config and hosts.toml files, spawns, and waits for the socket and
  // a CRI Version (options.start_timeout). Restarting keeps root/state: images survive.
  Status Start();
  // Stops containerd (SIGTERM, then SIGKILL). Containers keep running, as with a real restart.
  void Stop();
  // Stops it and everything it started: containers (runc delete --force), shims (processes
  // running in our dir), shim sockets; then unmounts everything under dir. Used on teardown.
  void Shutdown();
  bool running() { return proc_.Running(); }

  // Rewrites <dir>/certs.d/<host>/hosts.toml now; containerd reads it on every pull.
  Status MapHost(const std::string& host, const std::string& target);  // target 127.0.0.1:PORT
  Status PinDead(const std::string& host);

  const std::string& dir() const { return dir_; }
  std::string socket_path() const { return dir_ + "/containerd.sock"; }
  std::string endpoint() const { return "unix://" + socket_path(); }
  std::string log_path() const { return dir_ + "/containerd.log"; }
  std::string certs_dir() const { return dir_ + "/certs.d"; }
  pid_t pid() const { return proc_.pid(); }
  // A client on the socket (lazily connecting, so valid across restarts).
  registry_proxy::GrpcCriClient& cri() { return *client_; }

 private:
  Status WriteConfig();
  std::string ConfigV3() const;
  Status WriteHostsToml(const std::string& host, const std::string& target);
  void KillLeftovers();

  std::string dir_;
  ContainerdOptions options_;
  Process proc_;
  std::unique_ptr<registry_proxy::GrpcCriClient> client_;
};

// Cleans up testbed dirs (rp-testbed.*, rp-testimage.*) under `parent` whose owner process
// is gone; returns how many it removed. Testbed::Create calls it for $TMPDIR (or /tmp).
size_t ReapStaleTestbeds(const std::string& parent);

// Processes whose working directory is at or under dir (containerd's shims run in their
// bundle dirs), except this one.
std::vector<pid_t> ProcessesInDir(const std::string& dir);

// Mount points at or under dir, deepest first (from /proc/self/mountinfo).
std::vector<std::string> MountsUnder(const std::string& dir);
// Detaches them all (MNT_DETACH, deepest first); error if any remain.
Status UnmountAllUnder(const std::string& dir);

// ---------------------------------------------------------------------------------------------

struct TestbedOptions {
  // Where to build it; "" = a fresh mkdtemp under $TMPDIR (or /tmp). An explicit dir must be
  // absent or empty; it is removed with everything in it at the end, unless keep.
  std::string dir;
  // Keep the dir (logs, data) after teardown, for debugging. Also RP_TESTBED_KEEP=1.
  bool keep = false;
};

// Owns the temp dir and everything in it. Destruction stops containerd (and its containers),
// the registries and black holes, unmounts, and removes the dir.
//
// Every process the testbed starts runs with its cwd in the dir (containerd's shims run in
// their bundle dirs there too), and the dir records its owner (pid and start time). A process
// that died without destructors leaves its dir behind; the next Create() in the same temp dir
// reaps it: kills the processes running in it, deletes its containers, unmounts, removes it.
class Testbed {
 public:
  static Result<std::unique_ptr<Testbed>> Create(TestbedOptions options = {});
  ~Testbed();
  Testbed(const Testbed&) = delete;
  Testbed& operator=(const Testbed&) = delete;

  const std::string& dir() const { return dir_; }

  // A started registry named `name` (its dir is <dir>/registry-<name>).
  Result<Registry*> AddRegistry(const std::string& name);
  // A started black hole.
  Result<BlackHole*> AddBlackHole();
  // Pushes the test image to `registry` as repo:tag; returns the manifest digest.
  Result<std::string> PushTestImage(Registry* registry, const std::string& repo,
                                    const std::string& tag = "latest");

  // Starts containerd in <dir>/containerd. Without options.sandbox_image, the test image's
  // "pause" tag is pushed to the first registry as pause:3.9 and used (one is added if none).
  Result<Containerd*> StartContainerd(ContainerdOptions options = {});
  Containerd* containerd() { return containerd_.get(); }

  // Every process the testbed started and still knows of (for leak checks).
  std::vector<pid_t> Pids() const;

 private:
  Testbed() = default;
  std::string dir_;
  bool keep_ = false;
  std::vector<std::unique_ptr<Registry>> registries_;
  std::vector<std::unique_ptr<BlackHole>> black_holes_;
  std::unique_ptr<Containerd> containerd_;
};

}  // namespace rp_testbed
