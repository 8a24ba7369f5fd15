#include "commands/cli.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <csignal>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "base/cli_args.h"
#include "base/signals.h"
#include "commands/client_cmds.h"
#include "commands/serve.h"
#include "commands/webhook_cmd.h"
#include "node/node_install.h"
#include "rules/config.h"
#include "rules/config_store.h"
#include "version.h"

namespace registry_proxy {
namespace {

constexpr char kDefaultConfigPath[] = "/etc/registry-proxy/config.yaml";

// ---------------------------------------------------------------------------------------------
// Config selection shared by the subcommands that decide: --config FILE, else the node's
// file if there is one, else the built-in default (config/config.yaml).

struct LoadedConfig {
  std::shared_ptr<const Config> config;
  std::string origin;  // what the user should be told about where it came from
};

std::optional<LoadedConfig> SelectConfig(const ParsedArgs& args, std::ostream& err) {
  std::string path;
  if (auto c = args.Get("--config")) {
    path = *c;
  } else if (access(kDefaultConfigPath, F_OK) == 0) {
    path = kDefaultConfigPath;
  } else {
    return LoadedConfig{BuiltinConfig(), "built-in default (config/config.yaml)"};
  }
  ConfigLoad load = LoadConfigFile(path);
  if (!load.ok()) {
    err << load.ErrorText();
    return std::nullopt;
  }
  return LoadedConfig{load.config, path};
}

std::string_view CandidateSource(const Candidate& c) { return c.upstream ? "upstream" : "mirror"; }

nlohmann::json DecisionJson(std::string_view image, const std::optional<std::string>& ns,
                            const Decision& d, const LoadedConfig& cfg) {
  nlohmann::json j;
  j["image"] = image;
  j["namespace"] = ns ? nlohmann::json(*ns) : nlohmann::json(nullptr);
  j["normalized"] =
      d.original ? nlohmann::json(d.original->NormalizedString()) : nlohmann::json(nullptr);
  j["rewritten"] = d.rewritten();
  j["reason"] = ReasonName(d.reason);
  j["detail"] = d.detail;
  j["rule"] = d.rule ? nlohmann::json{{"match", d.rule->match}, {"origin", d.rule->origin}}
                     : nlohmann::json(nullptr);
  j["pullFrom"] = d.candidates.front().image;
  auto& cands = j["candidates"] = nlohmann::json::array();
  for (const Candidate& c : d.candidates) {
    nlohmann::json cj{{"image", c.image}, {"source", CandidateSource(c)}};
    if (c.mirror) cj["mirror"] = c.mirror->host;
    cands.push_back(std::move(cj));
  }
  j["staleIfError"] = d.stale_if_error;
  j["config"] = {{"source", cfg.origin}, {"sha256", cfg.config->content_sha256}};
  return j;
}

void PrintDecision(std::ostream& out, std::string_view image, const std::optional<std::string>& ns,
                   const Decision& d, const LoadedConfig& cfg) {
  out << "image:      " << image << "\n";
  if (d.original) out << "normalized: " << d.original->NormalizedString() << "\n";
  out << "namespace:  " << (ns ? *ns : "(none: pullsWithoutNamespace policy applies)") << "\n";
  out << "decision:   " << ReasonName(d.reason) << ": " << d.detail << "\n";
  out << "pull from:\n";
  for (size_t i = 0; i < d.candidates.size(); ++i) {
    const Candidate& c = d.candidates[i];
    out << "  " << i + 1 << ". " << c.image << "  (" << CandidateSource(c);
    if (c.mirror) out << " " << c.mirror->host;
    out << ")\n";
  }
  if (d.stale_if_error) {
    out << "  then, when every one above was down (refused, reset, timeout, TLS, 5xx) and the\n"
           "  image is on the node: that image (staleIfError: kubelet re-pulls present images\n"
           "  with imagePullPolicy: Always, so pods keep starting while the registries are "
           "down)\n";
  }
  out << "config:     " << cfg.origin << "\n";
}

// ---------------------------------------------------------------------------------------------
// Subcommands

constexpr char kResolveHelp[] =
    R"(Usage: registry-proxy resolve IMAGE... [--namespace NS] [--with-credentials] [--config FILE]
                                [--json]

Explains where the node will pull IMAGE from: the decision of the same rule engine the node
daemon and the webhook use, with its reason and the ordered candidates (mirrors, then
upstream if fallback is on).

  -n, --namespace NS  the pod's namespace; without it, the config's pullsWithoutNamespace
                      policy applies (as for crictl, kubeadm and static pods)
      --with-credentials  decide for a pull that carries credentials (a pull secret or a
                      credential provider's, for the original registry): with
                      credentialedPulls: upstream it is not rewritten; with mirror (the
                      default) the mirrors get it without them, upstream with them
  -c, --config FILE   the config file (default: /etc/registry-proxy/config.yaml if it exists,
                      else the built-in default, config/config.yaml)
      --json          one JSON object per image (a JSON array when several images)
)";

int Resolve(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args = ParseArgs(argv,
                        {{"--namespace", "-n"},
                         {"--config", "-c"},
                         {"--with-credentials", "", false},
                         {"--json", "", false},
                         {"--help", "-h", false}},
                        err);
  if (!args) return err << kResolveHelp, 2;
  if (args->Has("--help")) return out << kResolveHelp, 0;
  if (args->positional.empty()) return err << "resolve: no image given\n" << kResolveHelp, 2;
  auto cfg = SelectConfig(*args, err);
  if (!cfg) return 1;

  std::optional<std::string> ns = args->Get("--namespace");
  PullContext ctx;
  if (ns) ctx.namespace_name = *ns;
  ctx.with_credentials = args->Has("--with-credentials");
  const bool json = args->Has("--json");
  nlohmann::json all = nlohmann::json::array();
  for (size_t i = 0; i < args->positional.size(); ++i) {
    const std::string& image = args->positional[i];
    Decision d = cfg->config->policy->Decide(image, ctx);
    if (json) {
      all.push_back(DecisionJson(image, ns, d, *cfg));
    } else {
      if (i) out << "\n";
      PrintDecision(out, image, ns, d, *cfg);
    }
  }
  if (json) out << (all.size() == 1 ? all[0] : all).dump(2) << "\n";
  return 0;
}

constexpr char kCheckConfigHelp[] =
    R"(Usage: registry-proxy check-config FILE [--json]

Validates a config file as the daemon would load it. Exit 0 when valid; otherwise every
error, each as FILE:LINE:COLUMN: FIELD: MESSAGE, and exit 1.
)";

int CheckConfig(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args = ParseArgs(argv, {{"--json", "", false}, {"--help", "-h", false}}, err);
  if (!args) return err << kCheckConfigHelp, 2;
  if (args->Has("--help")) return out << kCheckConfigHelp, 0;
  if (args->positional.size() != 1) return err << kCheckConfigHelp, 2;
  const std::string& path = args->positional[0];
  ConfigLoad load = LoadConfigFile(path);
  if (args->Has("--json")) {
    nlohmann::json j{{"file", path}, {"valid", load.ok()}};
    auto& errors = j["errors"] = nlohmann::json::array();
    for (const ConfigError& e : load.errors) {
      errors.push_back({{"file", e.file},
                        {"line", e.line},
                        {"column", e.column},
                        {"field", e.field},
                        {"message", e.message}});
    }
    if (load.ok()) {
      j["rules"] = load.config->policy->rules().size();
      j["sha256"] = load.config->content_sha256;
    }
    out << j.dump(2) << "\n";
    return load.ok() ? 0 : 1;
  }
  if (!load.ok()) {
    err << load.ErrorText();
    return 1;
  }
  const Policy& p = *load.config->policy;
  out << path << ": ok: " << p.rules().size() << (p.rules().size() == 1 ? " rule" : " rules")
      << (p.options().enabled ? "" : " (rewriting disabled)") << ", sha256 "
      << load.config->content_sha256.substr(0, 12) << "\n";
  for (const Rule& r : p.rules()) {
    out << "  " << r.match << " -> ";
    for (size_t i = 0; i < r.mirrors.size(); ++i) out << (i ? ", " : "") << r.mirrors[i].host;
    out << (r.fallback ? ", upstream" : "") << (r.digest_only ? "  [digests only]" : "") << "  ("
        << r.origin << ")\n";
  }
  return 0;
}

constexpr char kWatchConfigHelp[] =
    R"(Usage: registry-proxy watch-config FILE [--settle MS]

Loads FILE and keeps it loaded exactly as the node daemon does: it watches the file's
directory (a Kubernetes ConfigMap volume swaps a ..data symlink), reloads on change and on
SIGHUP, keeps the last good config when a new one is bad, and prints one line per reload.
Stops on SIGINT or SIGTERM.
)";

int WatchConfig(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args = ParseArgs(argv, {{"--settle", ""}, {"--help", "-h", false}}, err);
  if (!args) return err << kWatchConfigHelp, 2;
  if (args->Has("--help")) return out << kWatchConfigHelp, 0;
  if (args->positional.size() != 1) return err << kWatchConfigHelp, 2;
  ConfigWatcher::Options opts;
  if (auto s = args->Get("--settle")) {
    char* end = nullptr;
    long ms = std::strtol(s->c_str(), &end, 10);
    if (s->empty() || *end != '\0' || ms < 0 || ms > 60000) {
      return err << "--settle wants milliseconds (0..60000), got '" << *s << "'\n", 2;
    }
    opts.settle = std::chrono::milliseconds(ms);
  }

  // Block the signals before any thread starts, so only Wait() below receives them.
  SignalWaiter signals({SIGHUP, SIGINT, SIGTERM});
  ConfigStore store(args->positional[0]);
  std::mutex out_mu;
  store.SetListener([&](ReloadResult r, const ReloadStats& s) {
    std::lock_guard<std::mutex> lock(out_mu);
    out << "reload " << ReloadResultName(r) << " generation=" << s.generation
        << " applied=" << s.applied << " rejected=" << s.rejected;
    if (r == ReloadResult::kRejected) out << " error=" << nlohmann::json(s.last_error).dump();
    out << std::endl;
  });
  store.Reload();
  ConfigWatcher watcher(&store, opts);
  if (Status s = watcher.Start(); !s.ok()) {
    err << "watch-config: " << s.message() << "\n";
    return 1;
  }
  {
    std::lock_guard<std::mutex> lock(out_mu);
    out << "watching " << store.path() << std::endl;
  }
  while (true) {
    int sig = signals.Wait();
    if (sig == SIGHUP) {
      watcher.TriggerReload();
      continue;
    }
    break;
  }
  watcher.Stop();
  return 0;
}

constexpr char kMainHelp[] =
    R"(registry-proxy: pull public container images through mirrors, transparently.

Usage: registry-proxy COMMAND [ARGS...]

Commands:
  serve                 the node daemon: the CRI shim between kubelet and containerd
  webhook               the admission webhook: annotates pods with where images come from
  resolve IMAGE...      explain where IMAGE will be pulled from, and why
  check-config FILE     validate a config file (errors with line and column)
  watch-config FILE     load a config and follow its changes as the daemon does
  node install|uninstall  put the daemon on a host under systemd, or take it off
  pull IMAGE            pull through a CRI socket as kubelet does (-n NS for pod metadata)
  images                list the images a CRI runtime knows
  status IMAGE          show a CRI runtime's status of IMAGE (exit 1 if absent)
  remove IMAGE          remove IMAGE (by id: every name) from a CRI runtime
  version               print the version

Run 'registry-proxy COMMAND --help' for a command's flags.
)";

}  // namespace

int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err) {
  // Library log lines (config reloads, errors) go to the process's stderr, as the daemon's
  // will; `out`/`err` carry the command's own output.
  static std::once_flag log_once;
  std::call_once(log_once, [] {
    auto l = spdlog::stderr_color_mt("registry-proxy");
    l->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
    spdlog::set_default_logger(l);
  });

  std::vector<std::string> args(argv + std::min(argc, 1), argv + argc);
  if (args.empty()) return err << kMainHelp, 2;
  const std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "--help" || cmd == "-h" || cmd == "help") return out << kMainHelp, 0;
  if (cmd == "--version" || cmd == "version") {
    return out << "registry-proxy " << REGISTRY_PROXY_VERSION << "\n", 0;
  }
  using Command = std::function<int(const std::vector<std::string>&, std::ostream&, std::ostream&)>;
  static const std::map<std::string, Command> kCommands = {
      {"serve", CmdServe},
      {"resolve", Resolve},
      {"check-config", CheckConfig},
      {"watch-config", WatchConfig},
      {"pull", CmdPull},
      {"images", CmdImages},
      {"status", CmdStatus},
      {"remove", CmdRemove},
      {"webhook", CmdWebhook},
      {"node", CmdNode},
  };
  auto it = kCommands.find(cmd);
  if (it == kCommands.end()) {
    err << "unknown command '" << cmd << "'\n\n" << kMainHelp;
    return 2;
  }
  return it->second(args, out, err);
}

}  // namespace registry_proxy
