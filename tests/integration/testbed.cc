#include "testbed.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

extern char** environ;

namespace rp_testbed {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr char kRunc[] = "/usr/sbin/runc";
constexpr char kBusybox[] = "/bin/busybox";
// Unix socket paths are limited to 108 bytes including the NUL.
constexpr size_t kMaxSocketPath = 107;

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

std::optional<std::string> FindInDirs(const std::string& name, const std::string& dirs) {
  if (name.find('/') != std::string::npos) {
    if (access(name.c_str(), X_OK) == 0) return name;
    return std::nullopt;
  }
  std::stringstream ss(dirs);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    std::string p = dir + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return std::nullopt;
}

std::string PlainPath() {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/local/bin:/usr/bin:/bin";
  return dirs + ":/usr/sbin:/sbin";  // root tools, in case PATH lacks them
}

// PATH with the containerd under test first (its shim is found through PATH too).
std::optional<std::string> FindInPath(const std::string& name) {
  const std::string& bin_dir = ContainerdUnderTest().bin_dir;
  return FindInDirs(name, (bin_dir.empty() ? "" : bin_dir + ":") + PlainPath());
}

// "2.1" from "containerd github.com/containerd/containerd/v2 2.1.9+unknown ..." ("" if none).
std::string ContainerdVersionOf(const std::string& binary) {
  std::string out;
  if (FILE* f = popen(("'" + binary + "' --version 2>/dev/null").c_str(), "r")) {
    char buf[256];
    while (fgets(buf, sizeof buf, f)) out += buf;
    pclose(f);
  }
  std::stringstream ss(out);
  std::string word, version;
  for (int i = 0; i < 3 && ss >> word; ++i) version = word;
  const size_t dot = version.find('.');
  if (dot == std::string::npos) return "";
  return version.substr(0, version.find_first_not_of("0123456789", dot + 1));
}

// deb/containerd_<version>*/usr/bin in fetch-deb.sh's cache, the newest; "" when none.
std::string FetchedContainerd(const std::string& version) {
  const char* c = std::getenv("RP_CACHE_DIR");
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  const std::string cache = c     ? c
                            : xdg ? std::string(xdg) + "/registry-proxy"
                                  : std::string(home ? home : "/tmp") + "/.cache/registry-proxy";
  std::vector<std::string> found;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(cache + "/deb", ec)) {
    const std::string name = e.path().filename();
    const std::string prefix = "containerd_" + version + ".";
    if (name.rfind(prefix, 0) == 0 && fs::exists(e.path() / ".unpacked") &&
        fs::exists(e.path() / "usr/bin/containerd")) {
      found.push_back(e.path() / "usr/bin");
    }
  }
  std::sort(found.begin(), found.end());  // same major.minor: a plain sort is enough
  return found.empty() ? "" : found.back();
}

ContainerdBuild FindContainerdUnderTest() {
  ContainerdBuild b;
  const char* want = std::getenv("RP_CONTAINERD_VERSION");
  if (want == nullptr || *want == '\0') {
    if (auto bin = FindInDirs("containerd", PlainPath())) b.version = ContainerdVersionOf(*bin);
    return b;
  }
  std::string var = std::string("RP_CONTAINERD_DIR_") + want;
  std::replace(var.begin(), var.end(), '.', '_');
  const char* dir = std::getenv(var.c_str());
  b.bin_dir = dir && *dir ? dir : FetchedContainerd(want);
  if (b.bin_dir.empty()) {
    const char* err = std::getenv("RP_CONTAINERD_FETCH_ERROR");  // set by test.sh
    b.problem = std::string("containerd ") + want +
                " not fetched (scripts/fetch-deb.sh containerd " + want +
                (err && *err ? "; test.sh's fetch: " + std::string(err) : "") + ")";
    return b;
  }
  b.version = ContainerdVersionOf(b.bin_dir + "/containerd");
  if (b.version != want) {
    b.problem = "RP_CONTAINERD_VERSION=" + std::string(want) + " but " + b.bin_dir +
                "/containerd is version '" + b.version + "'";
  }
  return b;
}

Status WriteFile(const std::string& path, const std::string& content) {
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  std::ofstream f(path, std::ios::trunc);
  f << content;
  f.close();
  if (!f) return Status::Error("cannot write " + path);
  return Status::Ok();
}

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::nullopt;
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// The child's environment: ours, with a PATH that finds containerd's shim and runc.
std::vector<std::string> ChildEnv() {
  std::vector<std::string> env;
  bool has_path = false;
  const std::string& bin_dir = ContainerdUnderTest().bin_dir;
  for (char** e = environ; e && *e; ++e) {
    std::string kv = *e;
    if (kv.rfind("PATH=", 0) == 0) {
      if (!bin_dir.empty()) kv.insert(5, bin_dir + ":");
      kv += ":/usr/sbin:/usr/bin:/sbin:/bin";
      has_path = true;
    }
    env.push_back(std::move(kv));
  }
  if (!has_path) {
    env.push_back("PATH=" + (bin_dir.empty() ? "" : bin_dir + ":") +
                  "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  }
  return env;
}

// Whether a pid (not our child) is still alive: a zombie counts as gone.
bool Alive(pid_t pid) {
  if (pid <= 0 || kill(pid, 0) != 0) return false;
  auto stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  size_t paren = stat->rfind(')');
  return paren == std::string::npos || paren + 2 >= stat->size() || (*stat)[paren + 2] != 'Z';
}

std::string Trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// "<pid> <start time>" (from /proc/<pid>/stat), "" when gone or a zombie: a pid alone could
// have been reused.
std::string ProcessIdentity(pid_t pid) {
  auto stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return "";
  size_t paren = stat->rfind(')');
  if (paren == std::string::npos) return "";
  std::istringstream ss(stat->substr(paren + 1));
  std::vector<std::string> f;  // f[0] is field 3 (state), f[19] field 22 (start time)
  for (std::string x; ss >> x;) f.push_back(x);
  if (f.size() < 20 || f[0] == "Z") return "";
  return std::to_string(pid) + " " + f[19];
}

constexpr char kOwnerFile[] = "/owner";

Status WriteOwner(const std::string& dir) {
  return WriteFile(dir + kOwnerFile, ProcessIdentity(getpid()) + "\n");
}

// False only when the dir records an owner that is gone (no owner file: cannot tell).
bool OwnerAlive(const std::string& dir) {
  auto owner = ReadFile(dir + kOwnerFile);
  if (!owner) return true;
  std::string id = Trim(*owner);
  pid_t pid = std::atoi(id.c_str());
  return pid > 0 && ProcessIdentity(pid) == id;
}

// Kills what a containerd in `containerd_dir` left running (containers through runc, shims
// by their cwd) plus every other process running under `scan_dir`; removes shim sockets.
void KillProcessesOf(const std::string& containerd_dir, const std::string& scan_dir,
                     const std::string& log) {
  std::error_code ec;
  // Containers: runc's own state (per containerd namespace) under our runc root. runc also
  // removes their cgroups.
  const fs::path runc_root = containerd_dir + "/runc-root";
  if (fs::is_directory(runc_root, ec)) {
    for (const auto& ns : fs::directory_iterator(runc_root, ec)) {
      if (!ns.is_directory()) continue;
      for (const auto& c : fs::directory_iterator(ns.path(), ec)) {
        if (!c.is_directory()) continue;
        (void)RunCommand({kRunc, "--root", ns.path().string(), "delete", "--force",
                          c.path().filename().string()},
                         log, std::chrono::seconds(10));
      }
    }
  }
  // Container processes runc did not get (their pid files), and the shims: they daemonize
  // (not our children), outlive containerd, and containerd 1.6 writes no pid file for them,
  // but each runs in its bundle dir, under ours.
  const fs::path tasks = containerd_dir + "/state/io.containerd.runtime.v2.task";
  std::vector<pid_t> pids = ProcessesInDir(scan_dir);
  std::vector<std::string> sockets;
  if (fs::is_directory(tasks, ec)) {
    for (const auto& ns : fs::directory_iterator(tasks, ec)) {
      if (!ns.is_directory()) continue;
      for (const auto& b : fs::directory_iterator(ns.path(), ec)) {
        if (auto text = ReadFile((b.path() / "init.pid").string())) {
          pid_t pid = std::atoi(Trim(*text).c_str());
          if (pid > 1) pids.push_back(pid);
        }
        if (std::string a = ShimSocket(b.path().string()); !a.empty()) sockets.push_back(a);
      }
    }
  }
  for (pid_t pid : pids) {
    if (Alive(pid)) kill(pid, SIGKILL);
  }
  WaitFor([&] { return std::none_of(pids.begin(), pids.end(), [](pid_t p) { return Alive(p); }); },
          std::chrono::seconds(5));
  for (const auto& sock : sockets) {
    if (sock.rfind("/run/containerd/s/", 0) == 0) unlink(sock.c_str());
  }
}

std::string HostsToml(const std::string& target) {
  // containerd 1.6 rejects a file with only `server` ("invalid `host` tree") and then
  // silently uses the real registry, so the host entry is required.
  return "server = \"http://" + target + "\"\n[host.\"http://" + target +
         "\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
}

}  // namespace

// ---------------------------------------------------------------------------------------------

std::string SkipReason() {
  if (geteuid() != 0) return "the integration testbed needs root (containerd, mounts)";
  if (const std::string& p = ContainerdUnderTest().problem; !p.empty()) return p;
  std::vector<std::string> missing;
  for (const char* bin : {"containerd", "containerd-shim-runc-v2", kRunc, "docker-registry",
                          "umoci", "skopeo", kBusybox}) {
    if (!FindInPath(bin)) missing.push_back(bin);
  }
  if (missing.empty()) return "";
  std::string r = "missing:";
  for (const auto& m : missing) r += " " + m;
  return r + " (Debian: containerd runc docker-registry umoci skopeo busybox-static)";
}

const ContainerdBuild& ContainerdUnderTest() {
  static const ContainerdBuild* const b = new ContainerdBuild(FindContainerdUnderTest());
  return *b;
}

std::string ShimSocket(const std::string& bundle) {
  std::string a;
  if (auto addr = ReadFile(bundle + "/address")) {
    a = Trim(*addr);  // containerd 1.x
  } else if (auto boot = ReadFile(bundle + "/bootstrap.json")) {
    // containerd 2.x: {"version":2,"address":"unix:///run/containerd/s/...","protocol":"ttrpc"}
    auto j = nlohmann::json::parse(*boot, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("address") && j["address"].is_string()) a = j["address"];
  }
  return a.rfind("unix://", 0) == 0 ? a.substr(7) : "";
}

bool IntegrationRequired() {
  const char* v = std::getenv("RP_REQUIRE_INTEGRATION");
  return v && std::string(v) == "1";
}

const std::vector<std::string>& PublicRegistryHosts() {
  static const std::vector<std::string> kHosts = {"docker.io",       "registry-1.docker.io",
                                                  "index.docker.io", "registry.k8s.io",
                                                  "k8s.gcr.io",      "gcr.io",
                                                  "ghcr.io",         "quay.io"};
  return kHosts;
}

bool WaitFor(const std::function<bool()>& pred, milliseconds timeout, milliseconds poll) {
  auto deadline = Clock::now() + timeout;
  while (true) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(poll);
  }
}

sockaddr_in LoopbackAddress(int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

Result<int> PickFreePort() {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::Error(Errno("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    Status s = Status::Error(Errno("bind 127.0.0.1:0"));
    close(fd);
    return s;
  }
  close(fd);
  return static_cast<int>(ntohs(addr.sin_port));
}

std::string TailFile(const std::string& path, size_t lines) {
  auto content = ReadFile(path);
  if (!content) return "";
  size_t pos = content->size();
  if (pos && (*content)[pos - 1] == '\n') --pos;
  for (size_t n = 0; n < lines && pos != std::string::npos && pos > 0; ++n) {
    pos = content->rfind('\n', pos - 1);
  }
  return pos == std::string::npos ? *content : content->substr(pos + 1);
}

// ---------------------------------------------------------------------------------------------
// Process

Status Process::Spawn(const std::vector<std::string>& argv, const std::string& log_path,
                      const std::string& cwd) {
  if (pid_ > 0 && !exited_) return Status::Error("process already running");
  if (argv.empty()) return Status::Error("empty argv");
  auto exe = FindInPath(argv[0]);
  if (!exe) return Status::Error(argv[0] + ": not found in PATH");

  int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return Status::Error(Errno("open " + log_path));

  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, log_fd, 1);
  posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());

  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int s : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2}) {
    sigaddset(&defaults, s);
  }
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &defaults);
  posix_spawnattr_setpgroup(&attr, 0);
  posix_spawnattr_setflags(&attr,
                           POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP);

  std::vector<std::string> full;
  static const std::optional<std::string> setpriv = FindInPath("setpriv");
  if (setpriv) full = {*setpriv, "--pdeathsig", "KILL", "--"};
  full.push_back(*exe);
  full.insert(full.end(), argv.begin() + 1, argv.end());
  std::vector<char*> cargv;
  for (const auto& a : full) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  std::vector<std::string> env = ChildEnv();
  std::vector<char*> cenv;
  for (auto& e : env) cenv.push_back(e.data());
  cenv.push_back(nullptr);

  pid_t pid = -1;
  int rc = posix_spawn(&pid, full[0].c_str(), &fa, &attr, cargv.data(), cenv.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(log_fd);
  if (rc != 0) return Status::Error("posix_spawn " + full[0] + ": " + std::strerror(rc));
  pid_ = pid;
  exited_ = false;
  wait_status_ = 0;
  return Status::Ok();
}

bool Process::Running() {
  if (pid_ <= 0 || exited_) return false;
  int st = 0;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_ || (r < 0 && errno == ECHILD)) {
    exited_ = true;
    wait_status_ = st;
    return false;
  }
  return true;
}

std::optional<int> Process::Wait(milliseconds timeout) {
  if (WaitFor([this] { return !Running(); }, timeout, milliseconds(5))) return wait_status_;
  return std::nullopt;
}

bool Process::Stop(milliseconds grace) {
  if (!Running()) return true;
  kill(pid_, SIGTERM);
  if (Wait(grace)) return true;
  kill(pid_, SIGKILL);
  if (!Wait(std::chrono::seconds(10))) {
    // Unkillable (D state): report and leave it rather than hang the test run.
    std::cerr << "rp_testbed: pid " << pid_ << " survived SIGKILL for 10 s\n";
  }
  return false;
}

std::string Process::ExitDescription() const {
  if (!exited_) return "running";
  if (WIFEXITED(wait_status_)) return "exit " + std::to_string(WEXITSTATUS(wait_status_));
  if (WIFSIGNALED(wait_status_)) return "signal " + std::to_string(WTERMSIG(wait_status_));
  return "status " + std::to_string(wait_status_);
}

Status RunCommand(const std::vector<std::string>& argv, const std::string& log_path,
                  milliseconds timeout, const std::string& cwd) {
  {
    std::ofstream log(log_path, std::ios::app);
    log << "$";
    for (const auto& a : argv) log << " " << a;
    log << "\n";
  }
  Process p;
  if (Status s = p.Spawn(argv, log_path, cwd); !s.ok()) return s;
  auto st = p.Wait(timeout);
  if (!st) {
    p.Stop(milliseconds(500));
    return Status::Error(argv[0] + " timed out after " + std::to_string(timeout.count()) +
                         " ms:\n" + TailFile(log_path, 20));
  }
  if (!WIFEXITED(*st) || WEXITSTATUS(*st) != 0) {
    return Status::Error(argv[0] + " failed (" + p.ExitDescription() + "):\n" +
                         TailFile(log_path, 20));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// TestImage

struct TestImageBuilder {
  // The layout's dir, removed when the process exits.
  struct Holder {
    std::string dir;
    std::unique_ptr<TestImage> image;
    std::optional<Status> error;
    ~Holder() {
      std::error_code ec;
      if (!dir.empty()) fs::remove_all(dir, ec);
    }
  };

  static Status Build(TestImage* img, const std::string& dir) {
    const std::string log = dir + "/build.log";
    const std::string layout = dir + "/layout";
    const std::string bundle = dir + "/bundle";
    const std::string ref = layout + ":latest";
    for (const auto& argv : std::vector<std::vector<std::string>>{
             {"umoci", "init", "--layout", layout},
             {"umoci", "new", "--image", ref},
             {"umoci", "unpack", "--rootless", "--image", ref, bundle}}) {
      if (Status s = RunCommand(argv, log, std::chrono::seconds(60), dir); !s.ok()) return s;
    }
    std::error_code ec;
    const fs::path bin = fs::path(bundle) / "rootfs" / "bin";
    fs::create_directories(bin, ec);
    fs::copy_file(kBusybox, bin / "busybox", fs::copy_options::overwrite_existing, ec);
    if (ec) return Status::Error("copy " + std::string(kBusybox) + ": " + ec.message());
    fs::permissions(bin / "busybox", fs::perms(0755), ec);
    for (const char* applet : {"sh", "ls", "cat", "echo", "sleep", "true", "false", "id", "env",
                               "ps", "mkdir", "rm", "test", "uname", "hostname", "wget"}) {
      fs::create_symlink("busybox", bin / applet, ec);
      if (ec) return Status::Error(std::string("symlink ") + applet + ": " + ec.message());
    }
    for (const auto& argv : std::vector<std::vector<std::string>>{
             {"umoci", "repack", "--image", ref, bundle},
             {"umoci", "config", "--image", ref, "--config.entrypoint", "/bin/sh", "--config.env",
              "PATH=/bin"},
             // The sandbox image must keep running: a pod's containers join its namespaces.
             {"umoci", "config", "--image", ref, "--tag", "pause", "--config.entrypoint",
              "/bin/sleep", "--config.cmd", "infinity", "--config.env", "PATH=/bin"}}) {
      if (Status s = RunCommand(argv, log, std::chrono::seconds(60), dir); !s.ok()) return s;
    }
    fs::remove_all(bundle, ec);
    img->layout_ = layout;

    // Digests straight from the layout: skopeo copies it byte for byte, so the registry
    // serves the same manifest digest.
    auto index_text = ReadFile(layout + "/index.json");
    if (!index_text) return Status::Error("no index.json in " + layout);
    auto index = nlohmann::json::parse(*index_text, nullptr, false);
    if (index.is_discarded()) return Status::Error("bad index.json in " + layout);
    for (const auto& m : index.value("manifests", nlohmann::json::array())) {
      std::string tag = m.value("annotations", nlohmann::json::object())
                            .value("org.opencontainers.image.ref.name", "");
      std::string digest = m.value("digest", "");
      if (tag.empty() || digest.rfind("sha256:", 0) != 0) continue;
      auto manifest_text = ReadFile(layout + "/blobs/sha256/" + digest.substr(7));
      if (!manifest_text) return Status::Error("missing blob " + digest);
      auto manifest = nlohmann::json::parse(*manifest_text, nullptr, false);
      if (manifest.is_discarded()) return Status::Error("bad manifest " + digest);
      img->tags_[tag] = {digest,
                         manifest.value("config", nlohmann::json::object()).value("digest", "")};
    }
    for (const char* tag : {"latest", "pause"}) {
      if (!img->tags_.count(tag)) return Status::Error(std::string("layout lacks tag ") + tag);
    }
    return Status::Ok();
  }
};

Result<const TestImage*> TestImage::Get() {
  static std::mutex mu;
  static TestImageBuilder::Holder holder;
  std::lock_guard<std::mutex> lock(mu);
  if (holder.image) return static_cast<const TestImage*>(holder.image.get());
  if (holder.error) return *holder.error;
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/rp-testimage.XXXXXX";
  if (!mkdtemp(tmpl.data())) {
    holder.error = Status::Error(Errno("mkdtemp " + tmpl));
    return *holder.error;
  }
  holder.dir = tmpl;
  (void)WriteOwner(holder.dir);
  auto img = std::unique_ptr<TestImage>(new TestImage());
  if (Status s = TestImageBuilder::Build(img.get(), holder.dir); !s.ok()) {
    holder.error = Status::Error("building the test image: " + s.message());
    return *holder.error;
  }
  holder.image = std::move(img);
  return static_cast<const TestImage*>(holder.image.get());
}

std::string TestImage::ManifestDigest(const std::string& tag) const {
  auto it = tags_.find(tag);
  return it == tags_.end() ? "" : it->second.manifest_digest;
}

std::string TestImage::ImageId(const std::string& tag) const {
  auto it = tags_.find(tag);
  return it == tags_.end() ? "" : it->second.config_digest;
}

// ---------------------------------------------------------------------------------------------
// Registry

Registry::Registry(std::string name, std::string dir)
    : name_(std::move(name)), dir_(std::move(dir)), log_path_(dir_ + "/registry.log") {}

std::string Registry::host() const { return "127.0.0.1:" + std::to_string(port_); }

Status Registry::Start() {
  if (running()) return Status::Ok();
  std::error_code ec;
  fs::create_directories(dir_ + "/data", ec);
  const bool first = port_ == 0;
  // A picked port can be taken before the registry binds it; on a first start, pick again.
  for (int attempt = 0; attempt < 3; ++attempt) {
    if (first) {
      auto port = PickFreePort();
      if (!port.ok()) return port.status();
      port_ = *port;
    }
    std::string config =
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  accesslog:\n"
        "    disabled: false\n"
        "storage:\n"
        "  filesystem:\n"
        "    rootdirectory: " +
        dir_ +
        "/data\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        "  addr: " +
        host() + "\n";
    if (Status s = WriteFile(dir_ + "/config.yml", config); !s.ok()) return s;
    const size_t log_start = fs::exists(log_path_, ec) ? fs::file_size(log_path_, ec) : 0;
    if (Status s = proc_.Spawn({"docker-registry", "serve", dir_ + "/config.yml"}, log_path_, dir_);
        !s.ok()) {
      return s;
    }
    const std::string listening = "listening on " + host();
    bool up = WaitFor(
        [&] {
          if (!proc_.Running()) return true;
          auto log = ReadFile(log_path_);
          return log && log->size() > log_start &&
                 log->find(listening, log_start) != std::string::npos;
        },
        std::chrono::seconds(10));
    if (up && proc_.Running()) return Status::Ok();
    std::string tail = TailFile(log_path_, 15);
    proc_.Stop(milliseconds(500));
    if (first && tail.find("address already in use") != std::string::npos) continue;
    return Status::Error("registry " + name_ + " did not start on " + host() + " (" +
                         proc_.ExitDescription() + "):\n" + tail);
  }
  return Status::Error("registry " + name_ + ": no free port after 3 attempts");
}

void Registry::Stop() { proc_.Stop(std::chrono::seconds(5)); }

Status Registry::Push(const TestImage& image, const std::string& repo, const std::string& tag,
                      const std::string& image_tag) {
  // --insecure-policy: no dependence on the host's /etc/containers/policy.json.
  return RunCommand(
      {"skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
       "oci:" + image.layout() + ":" + image_tag, "docker://" + host() + "/" + repo + ":" + tag},
      dir_ + "/push.log", std::chrono::seconds(120), dir_);
}

std::vector<RegistryRequest> Registry::Requests() const {
  std::vector<RegistryRequest> out;
  std::ifstream f(log_path_);
  if (!f) return out;
  f.seekg(static_cast<std::streamoff>(log_offset_));
  std::string line;
  // The access log is Apache combined format:
  // 127.0.0.1 - - [date] "GET /v2/x/manifests/latest HTTP/1.1" 200 349 "" "containerd/1.6.20"
  while (std::getline(f, line)) {
    if (line.rfind("time=", 0) == 0) continue;  // logrus lines
    size_t q = line.find("] \"");
    if (q == std::string::npos) continue;
    size_t start = q + 3;
    size_t end = line.find('"', start);
    if (end == std::string::npos) continue;
    std::istringstream req(line.substr(start, end - start));
    RegistryRequest r;
    req >> r.method >> r.path;
    if (r.method.empty() || r.path.empty()) continue;
    std::istringstream rest(line.substr(end + 1));
    rest >> r.status;
    if (size_t ua_end = line.rfind('"'); ua_end != std::string::npos && ua_end > end + 1) {
      size_t ua_start = line.rfind('"', ua_end - 1);
      if (ua_start != std::string::npos && ua_start > end) {
        r.user_agent = line.substr(ua_start + 1, ua_end - ua_start - 1);
      }
    }
    out.push_back(std::move(r));
  }
  return out;
}

std::vector<std::string> Registry::RequestedPaths() const {
  std::vector<std::string> out;
  for (const auto& r : Requests()) out.push_back(r.method + " " + r.path);
  return out;
}

size_t Registry::ManifestRequests(const std::string& repo) const {
  const std::string prefix = "/v2/" + repo + "/manifests/";
  size_t n = 0;
  for (const auto& r : Requests()) {
    if ((r.method == "GET" || r.method == "HEAD") && r.path.rfind(prefix, 0) == 0 &&
        r.user_agent.rfind("skopeo/", 0) != 0) {
      ++n;
    }
  }
  return n;
}

size_t Registry::BlobRequests(const std::string& repo) const {
  const std::string prefix = "/v2/" + repo + "/blobs/";
  size_t n = 0;
  for (const auto& r : Requests()) {
    if (r.method == "GET" && r.path.rfind(prefix, 0) == 0 &&
        r.user_agent.rfind("skopeo/", 0) != 0) {
      ++n;
    }
  }
  return n;
}

void Registry::ResetRequests() {
  std::error_code ec;
  auto size = fs::file_size(log_path_, ec);
  log_offset_ = ec ? 0 : static_cast<size_t>(size);
}

// ---------------------------------------------------------------------------------------------
// BlackHole

BlackHole::~BlackHole() {
  if (thread_.joinable()) {
    char c = 0;
    (void)!write(wake_[1], &c, 1);
    thread_.join();
  }
  for (int fd : {listen_fd_, wake_[0], wake_[1]}) {
    if (fd >= 0) close(fd);
  }
}

Status BlackHole::Start() {
  if (listen_fd_ >= 0) return Status::Ok();
  listen_fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status::Error(Errno("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listen_fd_, 128) != 0 ||
      getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return Status::Error(Errno("black hole listen"));
  }
  port_ = ntohs(addr.sin_port);
  if (pipe2(wake_, O_CLOEXEC) != 0) return Status::Error(Errno("pipe2"));
  thread_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

std::string BlackHole::host() const { return "127.0.0.1:" + std::to_string(port_); }

void BlackHole::Loop() {
  std::vector<int> held;  // accepted and never answered; closed at the end
  while (true) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_[0], POLLIN, 0}};
    // No timeout needed: the destructor always wakes us through the pipe.
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents) break;
    if (fds[0].revents & POLLIN) {
      int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) {
        held.push_back(fd);
        accepted_.fetch_add(1);
      }
    }
  }
  for (int fd : held) close(fd);
}

std::vector<pid_t> ProcessesInDir(const std::string& dir) {
  std::vector<pid_t> out;
  std::error_code ec;
  const pid_t self = getpid();
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() ||
        !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    pid_t pid = std::atoi(name.c_str());
    if (pid == self) continue;
    std::error_code lec;
    std::string cwd = fs::read_symlink(e.path() / "cwd", lec).string();
    if (lec) continue;
    if (cwd == dir || cwd.rfind(dir + "/", 0) == 0) out.push_back(pid);
  }
  return out;
}

size_t ReapStaleTestbeds(const std::string& parent) {
  size_t reaped = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("rp-testbed.", 0) != 0 && name.rfind("rp-testimage.", 0) != 0) continue;
    std::error_code dec;
    if (!e.is_directory(dec) || e.is_symlink(dec)) continue;
    const std::string dir = fs::canonical(e.path(), dec).string();
    if (dec || OwnerAlive(dir)) continue;
    KillProcessesOf(dir + "/containerd", dir, "/dev/null");
    if (!UnmountAllUnder(dir).ok()) continue;  // never remove_all across a mount
    fs::remove_all(dir, dec);
    if (!dec) ++reaped;
  }
  return reaped;
}

// ---------------------------------------------------------------------------------------------
// Mounts

std::vector<std::string> MountsUnder(const std::string& dir) {
  std::vector<std::string> out;
  std::ifstream f("/proc/self/mountinfo");
  std::string line;
  while (std::getline(f, line)) {
    // Fields: id parent major:minor root mount-point options ...; octal escapes for spaces.
    std::istringstream ss(line);
    std::string id, parent, dev, root, mp;
    if (!(ss >> id >> parent >> dev >> root >> mp)) continue;
    std::string decoded;
    for (size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded += static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8));
        i += 3;
      } else {
        decoded += mp[i];
      }
    }
    if (decoded == dir || decoded.rfind(dir + "/", 0) == 0) out.push_back(decoded);
  }
  std::sort(out.begin(), out.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Status UnmountAllUnder(const std::string& dir) {
  for (int pass = 0; pass < 5; ++pass) {
    auto mounts = MountsUnder(dir);
    if (mounts.empty()) return Status::Ok();
    for (const auto& m : mounts) umount2(m.c_str(), MNT_DETACH);
  }
  auto left = MountsUnder(dir);
  if (left.empty()) return Status::Ok();
  std::string msg = "mounts left under " + dir + ":";
  for (const auto& m : left) msg += " " + m;
  return Status::Error(msg);
}

// ---------------------------------------------------------------------------------------------
// Containerd

Containerd::Containerd(std::string dir, ContainerdOptions options)
    : dir_(std::move(dir)), options_(std::move(options)) {
  // The endpoint is a path we control, so Connect cannot fail.
  client_ = std::move(registry_proxy::GrpcCriClient::Connect(endpoint())).value();
}

Containerd::~Containerd() { Shutdown(); }

// containerd 2.x: config version 3, the CRI plugin split into images and runtime.
std::string Containerd::ConfigV3() const {
  const std::string& d = dir_;
  const std::string img = "[plugins.\"io.containerd.cri.v1.images\"]\n";
  const std::string rt = "[plugins.\"io.containerd.cri.v1.runtime\"";
  return "version = 3\nroot = \"" + d + "/root\"\nstate = \"" + d + "/state\"\n" +
         "[grpc]\n  address = \"" + socket_path() + "\"\n" + "[ttrpc]\n  address = \"" +
         socket_path() + ".ttrpc\"\n" + "[debug]\n  address = \"" + d + "/debug.sock\"\n" +
         "[metrics]\n  address = \"\"\n" +
         "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"" + d + "/opt\"\n" + img +
         "  snapshotter = \"overlayfs\"\n" +
         "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"" +
         options_.sandbox_image + "\"\n" +
         "[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"" + certs_dir() +
         "\"\n" + rt + "]\n  disable_apparmor = true\n" + "  restrict_oom_score_adj = true\n" + rt +
         ".containerd]\n" + "  default_runtime_name = \"runc\"\n" + rt +
         ".containerd.runtimes.runc]\n" + "  runtime_type = \"io.containerd.runc.v2\"\n" + rt +
         ".containerd.runtimes.runc.options]\n  BinaryName = \"" + std::string(kRunc) + "\"\n" +
         "  Root = \"" + d + "/runc-root\"\n  SystemdCgroup = false\n" + rt + ".cni]\n" +
         "  bin_dirs = [\"/usr/lib/cni\"]\n  conf_dir = \"" + d + "/cni/net.d\"\n";
}

Status Containerd::WriteConfig() {
  const std::string& d = dir_;
  std::error_code ec;
  fs::create_directories(d + "/cni/net.d", ec);
  if (ContainerdUnderTest().major() >= 2) return WriteFile(d + "/config.toml", ConfigV3());
  std::string c =
      "version = 2\n"
      "root = \"" +
      d +
      "/root\"\n"
      "state = \"" +
      d +
      "/state\"\n"
      "[grpc]\n"
      "  address = \"" +
      socket_path() +
      "\"\n"
      "[ttrpc]\n"
      "  address = \"" +
      socket_path() +
      ".ttrpc\"\n"
      "[debug]\n"
      "  address = \"" +
      d +
      "/debug.sock\"\n"
      "[metrics]\n"
      "  address = \"\"\n"
      "[plugins.\"io.containerd.internal.v1.opt\"]\n"
      "  path = \"" +
      d +
      "/opt\"\n"
      "[plugins.\"io.containerd.grpc.v1.cri\"]\n"
      "  sandbox_image = \"" +
      options_.sandbox_image +
      "\"\n"
      "  disable_apparmor = true\n"
      "  restrict_oom_score_adj = true\n"
      "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n"
      "    snapshotter = \"overlayfs\"\n"
      "    default_runtime_name = \"runc\"\n"
      "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n"
      "      runtime_type = \"io.containerd.runc.v2\"\n"
      "      [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n"
      "        BinaryName = \"" +
      std::string(kRunc) +
      "\"\n"
      "        Root = \"" +
      d +
      "/runc-root\"\n"
      "        SystemdCgroup = false\n"
      "  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n"
      "    bin_dir = \"/usr/lib/cni\"\n"
      "    conf_dir = \"" +
      d +
      "/cni/net.d\"\n"
      "  [plugins.\"io.containerd.grpc.v1.cri\".registry]\n"
      "    config_path = \"" +
      certs_dir() + "\"\n";
  return WriteFile(d + "/config.toml", c);
}

Status Containerd::WriteHostsToml(const std::string& host, const std::string& target) {
  return WriteFile(certs_dir() + "/" + host + "/hosts.toml", HostsToml(target));
}

Status Containerd::MapHost(const std::string& host, const std::string& target) {
  options_.host_map[host] = target;
  return WriteHostsToml(host, target);
}

Status Containerd::PinDead(const std::string& host) {
  options_.host_map.erase(host);
  return WriteHostsToml(host, kDeadHost);
}

Status Containerd::Start() {
  if (running()) return Status::Ok();
  if ((socket_path() + ".ttrpc").size() > kMaxSocketPath) {
    return Status::Error("containerd dir too long for unix sockets: " + dir_);
  }
  if (Status s = WriteConfig(); !s.ok()) return s;
  std::vector<std::string> dead = PublicRegistryHosts();
  dead.insert(dead.end(), options_.extra_dead_hosts.begin(), options_.extra_dead_hosts.end());
  for (const auto& h : dead) {
    if (options_.host_map.count(h)) continue;
    if (Status s = WriteHostsToml(h, kDeadHost); !s.ok()) return s;
  }
  for (const auto& [h, target] : options_.host_map) {
    if (Status s = WriteHostsToml(h, target); !s.ok()) return s;
  }
  unlink(socket_path().c_str());  // a stale socket would pass the wait below
  if (Status s = proc_.Spawn({"containerd", "--config", dir_ + "/config.toml"}, log_path(), dir_);
      !s.ok()) {
    return s;
  }
  grpc::Status last;
  bool up = WaitFor(
      [&] {
        if (!proc_.Running()) return true;
        if (access(socket_path().c_str(), F_OK) != 0) return false;
        runtime::v1::VersionResponse v;
        last = client_->Version(&v, std::chrono::seconds(1));
        return last.ok();
      },
      options_.start_timeout, milliseconds(20));
  if (up && proc_.Running()) return Status::Ok();
  std::string why =
      !proc_.Running() ? "exited (" + proc_.ExitDescription() + ")"
                       : "no CRI Version within " + std::to_string(options_.start_timeout.count()) +
                             " ms (last: " + registry_proxy::GrpcStatusText(last) + ")";
  proc_.Stop(std::chrono::seconds(2));
  return Status::Error("containerd " + why + "; log " + log_path() + ":\n" +
                       TailFile(log_path(), 30));
}

void Containerd::Stop() { proc_.Stop(std::chrono::seconds(10)); }

void Containerd::KillLeftovers() { KillProcessesOf(dir_, dir_, dir_ + "/teardown.log"); }

void Containerd::Shutdown() {
  Stop();
  KillLeftovers();
  (void)UnmountAllUnder(dir_);
}

// ---------------------------------------------------------------------------------------------
// Testbed

Result<std::unique_ptr<Testbed>> Testbed::Create(TestbedOptions options) {
  std::unique_ptr<Testbed> tb(new Testbed());
  const char* keep = std::getenv("RP_TESTBED_KEEP");
  tb->keep_ = options.keep || (keep && std::string(keep) == "1");
  std::error_code ec;
  const char* tmp = std::getenv("TMPDIR");
  const std::string tmp_dir = tmp && *tmp ? tmp : "/tmp";
  if (size_t n = ReapStaleTestbeds(tmp_dir)) {
    std::cerr << "rp_testbed: cleaned up " << n << " testbed dir(s) left by dead processes\n";
  }
  if (options.dir.empty()) {
    std::string tmpl = tmp_dir + "/rp-testbed.XXXXXX";
    if (!mkdtemp(tmpl.data())) return Status::Error(Errno("mkdtemp " + tmpl));
    tb->dir_ = tmpl;
  } else {
    if (fs::exists(options.dir, ec) && !fs::is_empty(options.dir, ec)) {
      return Status::Error(options.dir + " exists and is not empty");
    }
    fs::create_directories(options.dir, ec);
    if (ec) return Status::Error("cannot create " + options.dir + ": " + ec.message());
    tb->dir_ = options.dir;
  }
  // Mount points in /proc/self/mountinfo are canonical paths.
  tb->dir_ = fs::canonical(tb->dir_, ec).string();
  if (ec) return Status::Error("canonical " + tb->dir_ + ": " + ec.message());
  if ((tb->dir_ + "/containerd/containerd.sock.ttrpc").size() > kMaxSocketPath) {
    return Status::Error("testbed dir too long for unix sockets: " + tb->dir_);
  }
  if (Status s = WriteOwner(tb->dir_); !s.ok()) return s;
  return tb;
}

Testbed::~Testbed() {
  if (containerd_) containerd_->Shutdown();
  for (auto& r : registries_) r->Stop();
  black_holes_.clear();
  if (dir_.empty()) return;
  Status s = UnmountAllUnder(dir_);
  if (!s.ok()) {
    // Never remove_all across a mount: it would delete whatever is mounted there.
    std::cerr << "rp_testbed: " << s.message() << "; leaving " << dir_ << "\n";
    return;
  }
  if (keep_) {
    std::cerr << "rp_testbed: kept " << dir_ << "\n";
    return;
  }
  std::error_code ec;
  fs::remove_all(dir_, ec);
  if (ec) std::cerr << "rp_testbed: removing " << dir_ << ": " << ec.message() << "\n";
}

Result<Registry*> Testbed::AddRegistry(const std::string& name) {
  for (const auto& r : registries_) {
    if (r->name() == name) return Status::Error("registry " + name + " exists");
  }
  auto reg = std::make_unique<Registry>(name, dir_ + "/registry-" + name);
  Registry* raw = reg.get();
  registries_.push_back(std::move(reg));  // owned before Start: a failed start still cleans up
  if (Status s = raw->Start(); !s.ok()) return s;
  return raw;
}

Result<BlackHole*> Testbed::AddBlackHole() {
  black_holes_.push_back(std::make_unique<BlackHole>());
  BlackHole* bh = black_holes_.back().get();
  if (Status s = bh->Start(); !s.ok()) return s;
  return bh;
}

Result<std::string> Testbed::PushTestImage(Registry* registry, const std::string& repo,
                                           const std::string& tag) {
  auto img = TestImage::Get();
  if (!img.ok()) return img.status();
  if (Status s = registry->Push(**img, repo, tag); !s.ok()) return s;
  return (*img)->ManifestDigest("latest");
}

Result<Containerd*> Testbed::StartContainerd(ContainerdOptions options) {
  if (containerd_) return Status::Error("containerd already started");
  if (options.sandbox_image.empty()) {
    if (registries_.empty()) {
      auto r = AddRegistry("sandbox");
      if (!r.ok()) return r.status();
    }
    auto img = TestImage::Get();
    if (!img.ok()) return img.status();
    Registry* reg = registries_.front().get();
    if (Status s = reg->Push(**img, "pause", "3.9", "pause"); !s.ok()) return s;
    options.sandbox_image = reg->host() + "/pause:3.9";
  }
  containerd_ = std::make_unique<Containerd>(dir_ + "/containerd", std::move(options));
  if (Status s = containerd_->Start(); !s.ok()) return s;
  return containerd_.get();
}

std::vector<pid_t> Testbed::Pids() const {
  std::vector<pid_t> out;
  if (containerd_ && containerd_->pid() > 0) out.push_back(containerd_->pid());
  for (const auto& r : registries_) {
    if (r->pid() > 0) out.push_back(r->pid());
  }
  return out;
}

}  // namespace rp_testbed
