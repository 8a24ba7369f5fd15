// rp-testbed: the integration testbed as a command, for demos and manual testing on a machine
// without a containerd of its own. `rp-testbed up` starts a private containerd, an "upstream"
// registry (reachable as docker.io through containerd's hosts.toml) and a "mirror" registry,
// both holding library/busybox:latest, prints one JSON line describing them, and stays up
// until SIGINT or SIGTERM; then it stops everything and removes its dir.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/signals.h"
#include "testbed.h"

namespace {

constexpr char kUsage[] =
    R"(Usage: rp-testbed up [--dir DIR] [--mirror-only] [--upstream-host HOST] [--keep] [--env FILE]

Starts, on loopback: a private containerd (CRI on DIR/containerd/containerd.sock), an
"upstream" registry that containerd reaches as HOST (default docker.io), and a "mirror"
registry. Pushes the busybox test image as library/busybox:latest to both (only to the
mirror with --mirror-only). Every other public registry host is pinned to 127.0.0.1:9.
Prints one JSON line (sockets, hosts, logs, digests) and stays up until SIGINT/SIGTERM,
then stops everything and removes DIR (kept with --keep).

  --dir DIR            where to put it all (absent or empty; default: a new dir in /tmp)
  --mirror-only        upstream stays empty: pulls by the public name fail unless mirrored
  --upstream-host HOST the public name the upstream registry answers to (default docker.io)
  --keep               keep DIR (logs, data) after stopping
  --env FILE           also write the same facts as shell assignments (RP_TB_*) to FILE,
                       once everything is up (for scripts without a JSON parser)
)";

int Up(const std::vector<std::string>& args) {
  rp_testbed::TestbedOptions opts;
  bool mirror_only = false;
  std::string upstream_host = "docker.io";
  std::string env_file;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= args.size()) return false;
      *out = args[++i];
      return true;
    };
    if (a == "--dir") {
      if (!value(&opts.dir)) return std::cerr << "--dir needs a value\n", 2;
    } else if (a == "--upstream-host") {
      if (!value(&upstream_host)) return std::cerr << "--upstream-host needs a value\n", 2;
    } else if (a == "--env") {
      if (!value(&env_file)) return std::cerr << "--env needs a value\n", 2;
    } else if (a == "--mirror-only") {
      mirror_only = true;
    } else if (a == "--keep") {
      opts.keep = true;
    } else if (a == "--help" || a == "-h") {
      return std::cout << kUsage, 0;
    } else {
      return std::cerr << "unknown argument '" << a << "'\n\n" << kUsage, 2;
    }
  }
  if (std::string why = rp_testbed::SkipReason(); !why.empty()) {
    std::cerr << "rp-testbed: cannot run here: " << why << "\n";
    return 1;
  }

  // A shell starts background jobs with SIGINT ignored, and an ignored signal never reaches
  // sigwait: restore the defaults, then block them before any thread (gRPC's) starts.
  // Children get them unblocked and at their defaults (Process::Spawn).
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  // Blocked for the rest of the process, not only while `signals` lives (it restores the mask
  // it found, this one): the test image's dir is removed by a static destructor after Up()
  // returns, and a second signal (Ctrl-C to the group, then run.sh's SIGTERM) must not kill us
  // before that. Signals still pending at exit are dropped.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  registry_proxy::SignalWaiter signals({SIGINT, SIGTERM});
  auto start = std::chrono::steady_clock::now();
  auto fail = [](const std::string& what, const std::string& msg) {
    std::cerr << "rp-testbed: " << what << ": " << msg << "\n";
    return 1;
  };

  auto tb = rp_testbed::Testbed::Create(opts);
  if (!tb.ok()) return fail("create", tb.error());
  rp_testbed::Testbed& bed = **tb;
  auto upstream = bed.AddRegistry("upstream");
  if (!upstream.ok()) return fail("upstream registry", upstream.error());
  auto mirror = bed.AddRegistry("mirror");
  if (!mirror.ok()) return fail("mirror registry", mirror.error());
  auto digest = bed.PushTestImage(*mirror, "library/busybox", "latest");
  if (!digest.ok()) return fail("push to mirror", digest.error());
  if (!mirror_only) {
    auto d = bed.PushTestImage(*upstream, "library/busybox", "latest");
    if (!d.ok()) return fail("push to upstream", d.error());
  }
  rp_testbed::ContainerdOptions copts;
  copts.host_map[upstream_host] = (*upstream)->host();
  auto cd = bed.StartContainerd(copts);
  if (!cd.ok()) return fail("containerd", cd.error());
  auto img = rp_testbed::TestImage::Get();
  if (!img.ok()) return fail("test image", img.error());
  double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  auto registry_json = [](rp_testbed::Registry* r) {
    return nlohmann::json{{"host", r->host()}, {"log", r->log_path()}, {"pid", r->pid()}};
  };
  nlohmann::json j;
  j["dir"] = bed.dir();
  j["containerd"] = {{"endpoint", (*cd)->endpoint()},
                     {"socket", (*cd)->socket_path()},
                     {"log", (*cd)->log_path()},
                     {"certsDir", (*cd)->certs_dir()},
                     {"pid", (*cd)->pid()}};
  j["upstream"] = registry_json(*upstream);
  j["upstream"]["as"] = upstream_host;
  j["mirror"] = registry_json(*mirror);
  j["image"] = {{"repo", "library/busybox"},  {"tag", "latest"},
                {"manifestDigest", *digest},  {"id", (*img)->ImageId()},
                {"onUpstream", !mirror_only}, {"onMirror", true}};
  j["deadHost"] = rp_testbed::kDeadHost;
  j["startupSeconds"] = took;
  std::cout << j.dump() << std::endl;
  if (!env_file.empty()) {
    // Values are paths, hosts and digests from this program; single quotes keep them inert.
    auto q = [](const std::string& v) {
      std::string out = "'";
      for (char c : v) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
      return out + "'";
    };
    std::string tmp = env_file + ".tmp";
    {
      std::ofstream env(tmp);
      env << "RP_TB_DIR=" << q(bed.dir()) << "\n"
          << "RP_TB_CONTAINERD=" << q((*cd)->endpoint()) << "\n"
          << "RP_TB_UPSTREAM=" << q((*upstream)->host()) << "\n"
          << "RP_TB_UPSTREAM_AS=" << q(upstream_host) << "\n"
          << "RP_TB_UPSTREAM_LOG=" << q((*upstream)->log_path()) << "\n"
          << "RP_TB_MIRROR=" << q((*mirror)->host()) << "\n"
          << "RP_TB_MIRROR_LOG=" << q((*mirror)->log_path()) << "\n"
          << "RP_TB_IMAGE_DIGEST=" << q(*digest) << "\n";
    }
    std::rename(tmp.c_str(), env_file.c_str());  // appears complete or not at all
  }

  int sig = signals.Wait();
  std::cerr << "rp-testbed: signal " << sig << ", stopping\n";
  tb.value().reset();  // stops everything, unmounts, removes the dir
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + std::min(argc, 1), argv + argc);
  if (args.empty()) return std::cerr << kUsage, 2;
  if (args[0] == "--help" || args[0] == "-h" || args[0] == "help") return std::cout << kUsage, 0;
  if (args[0] != "up") return std::cerr << "unknown command '" << args[0] << "'\n\n" << kUsage, 2;
  return Up({args.begin() + 1, args.end()});
}
