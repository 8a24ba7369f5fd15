// CRI client subcommands: pull, images, status, remove. They talk to any CRI ImageService
// (the daemon's socket by default, or containerd's with --endpoint), so an operator can pull
// "as kubelet would" through registry-proxy, and tests can drive both ends.
//
// Exit codes as for every subcommand: 0 success, 1 the call failed (or the image is not
// there, for status), 2 usage error.
#pragma once

#include <chrono>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.pb.h"

namespace registry_proxy {

int CmdPull(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int CmdImages(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int CmdStatus(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int CmdRemove(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

// The parsed command line of one client subcommand (exposed for unit tests).
struct ClientArgs {
  std::vector<std::string> positional;
  std::string endpoint;  // normalised: unix:///path
  bool json = false;
  bool help = false;
  bool verbose = false;  // status: ask for the runtime's verbose info
  std::chrono::milliseconds timeout{0};
  // pull only:
  std::optional<std::string> namespace_name;
  std::string pod_name;
  std::string pod_uid;
  std::optional<std::string> username;
  std::optional<std::string> password;
};

// `command` is "pull", "images", "status" or "remove"; each accepts only its own flags.
// A usage error comes back as the error Status (its message says what is wrong).
Result<ClientArgs> ParseClientArgs(std::string_view command, const std::vector<std::string>& args);

// The PullImage request the pull subcommand sends: a sandbox config with pod metadata
// only when a namespace was given (like crictl without --pod-config otherwise).
runtime::v1::PullImageRequest BuildPullRequest(const ClientArgs& args);

// "30s", "5m", "1h", "250ms" or a bare number of seconds.
std::optional<std::chrono::milliseconds> ParseDuration(std::string_view text);

// Decimal units as crictl prints them: 512B, 795kB, 1.08MB.
std::string HumanSize(uint64_t bytes);

}  // namespace registry_proxy
