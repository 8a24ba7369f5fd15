// `registry-proxy node install|uninstall`: puts the daemon on a host under the host's systemd
// (never in a pod: kubelet's image endpoint served from a pod deadlocks a rebooted node), and
// takes it off again, leaving the host as it was.
//
// Host layout (everything below --host-root; "/" on the host itself, the host's / mounted
// somewhere in the installer pod):
//   /opt/registry-proxy/bin/registry-proxy       the running binary (/proc/self/exe)
//   /opt/registry-proxy/lib/*                    its libraries, when it runs from a bundle
//   /opt/registry-proxy/install-manifest         what we created, for uninstall
//   /etc/systemd/system/registry-proxy.{service,socket}  the units (compiled into the binary;
//                                                the socket unit holds the CRI socket across
//                                                daemon restarts)
//   /etc/registry-proxy/config.yaml              --config-from, else the host's, else built-in
// Every file is written atomically (temp file + rename) and only when its bytes or mode
// differ, so a second install changes nothing and restarts nothing. A file that existed
// before and is replaced is kept as FILE.registry-proxy.bak and restored by uninstall;
// kubelet's config and crictl.yaml are edited as text (one line: comments, order and every
// other byte survive), with the same backup.
//
// Order: config validated (nothing is written for a bad one) -> files -> systemctl
// daemon-reload, enable --now (restart when an installed binary or unit changed) -> wait until
// the daemon answers CRI Version on its socket -> only then kubelet's imageServiceEndpoint and
// `systemctl restart kubelet`, and crictl.yaml's image-endpoint. Uninstall runs it backwards:
// kubelet first.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"

namespace registry_proxy {

// The unit files, compiled in from systemd/registry-proxy.{service,socket}.
std::string_view BuiltinServiceUnit();
std::string_view BuiltinSocketUnit();

// Runs `systemctl ARGS...` on the host. Replaced by a recorder in tests.
class Systemctl {
 public:
  virtual ~Systemctl() = default;
  // Whether systemctl can be run at all; checked before anything is written.
  virtual Status Reachable() { return Status::Ok(); }
  // args without "systemctl", e.g. {"enable", "--now", "registry-proxy.service"}.
  virtual Status Run(const std::vector<std::string>& args) = 0;
};

// The real one: execs systemctl (argv vector, no shell). With host_root "/" it runs the
// local systemctl; otherwise the process must be in a pod with hostPID (PID 1 is the host's
// systemd, in another mount namespace) and it runs `nsenter -t 1 -m -u -i -n -p -- systemctl`.
// Reachable() checks that (install and uninstall call it after validating their input); its
// errors name `pod` ("installer", "uninstaller"). Our stdout, stderr and spdlog are flushed
// before systemctl runs, so a pod's log keeps the order in which things happened.
std::unique_ptr<Systemctl> MakeHostSystemctl(std::string host_root, std::string pod = "installer");

// What Reachable() looks at from inside a pod, and what it concludes (pure, for tests).
struct HostSystemdFacts {
  std::string host_root;   // not "/"
  std::string pid1_comm;   // /proc/1/comm as this process sees it
  bool host_runs_systemd;  // HOST_ROOT/run/systemd/system is a directory (sd_booted)
  // This process is in the host's PID namespace (/proc/self/ns/pid is HOST_ROOT/proc/1's);
  // nullopt when that cannot be told (HOST_ROOT/proc not readable).
  std::optional<bool> in_host_pid_namespace;
  bool shares_pid1_mount_namespace;  // /proc/self/ns/mnt is /proc/1/ns/mnt
};
Status DiagnoseHostSystemd(const HostSystemdFacts& facts, std::string_view pod);

// Waits until the daemon answers on a socket. Replaced in tests.
class DaemonProbe {
 public:
  virtual ~DaemonProbe() = default;
  // `socket_path` is the path as this process sees it (under --host-root).
  virtual Status WaitServing(const std::string& socket_path, std::chrono::seconds timeout) = 0;
};

// The real one: CRI Version over the socket, retried until it answers or the time is up.
std::unique_ptr<DaemonProbe> MakeCriVersionProbe();

struct NodeInstallOptions {
  std::string host_root = "/";
  std::optional<std::string> config_from;  // a file in this process's filesystem
  bool configure_kubelet = false;
  std::string kubelet_config = "/var/lib/kubelet/config.yaml";  // a host path
  bool configure_crictl = false;
  std::string crictl_config = "/etc/crictl.yaml";  // a host path
  // The binary to install; when it sits in a bundle (DIR/bin/registry-proxy next to DIR/lib),
  // DIR/lib's files are installed too.
  std::string source_binary = "/proc/self/exe";
  std::chrono::seconds wait_timeout{60};
};

// Installs (or brings up to date) and starts the daemon; see the top of this file. Progress
// goes to `log`, one line per action.
Status NodeInstall(const NodeInstallOptions& options, Systemctl* systemctl, DaemonProbe* probe,
                   std::ostream& log);

struct NodeUninstallOptions {
  std::string host_root = "/";
  // Used when the install manifest does not name the kubelet config it edited (no manifest).
  std::string kubelet_config = "/var/lib/kubelet/config.yaml";
  std::string crictl_config = "/etc/crictl.yaml";
};

// Reverts kubelet's config (and restarts kubelet if it changed), crictl.yaml, stops and
// disables the unit, removes every file and directory the installs created and restores the
// files they replaced. A host where nothing of ours is left (no manifest, unit, binary or
// backup) is success at once, without systemctl: a node that never had it, or a rerun.
Status NodeUninstall(const NodeUninstallOptions& options, Systemctl* systemctl, std::ostream& log);

// Keeps the host's config equal to `--config-from` (a ConfigMap volume) after an install:
// watches its directory, copies every version that validates (atomically, as install does)
// and never one that does not. The daemon follows its config file itself (inotify on its
// directory), so nothing else is needed: no systemctl, no signal.
class NodeConfigSync {
 public:
  struct Stats {
    uint64_t copied = 0;    // host config rewritten
    uint64_t rejected = 0;  // a bad version was seen and not copied
    std::string last_error;
  };
  // `node install --watch`: writes HOST_ROOT/etc/registry-proxy/config.yaml and records it in
  // the install manifest.
  explicit NodeConfigSync(const NodeInstallOptions& options, std::ostream* log);
  // `node sync-config`: writes `host_config` only (0644; a temp file in its directory, then a
  // rename), the host's /etc/registry-proxy being all this process can see. An install wrote
  // that file first and recorded it, so uninstall removes it either way.
  NodeConfigSync(std::string config_from, std::string host_config, std::ostream* log);
  ~NodeConfigSync();
  NodeConfigSync(const NodeConfigSync&) = delete;
  NodeConfigSync& operator=(const NodeConfigSync&) = delete;

  Status Start();
  void TriggerSync();  // as if the source changed (SIGHUP)
  void Stop();
  Stats stats() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Text edit of a top-level key in a YAML mapping (kubelet's config, crictl.yaml): replaces the
// key's line (and the indented lines that continue its value) with `key: value`, or appends
// that line; every other byte stays. The result is checked by parsing it: the document must be
// a mapping with key == value. Errors name `where` (and line:column for YAML errors).
Result<std::string> SetYamlKeyText(std::string_view text, std::string_view key,
                                   std::string_view value, std::string_view where);

// `registry-proxy node ...` (cli.cc).
int CmdNode(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err);

}  // namespace registry_proxy
