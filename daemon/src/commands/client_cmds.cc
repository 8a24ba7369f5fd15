#include "commands/client_cmds.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <tuple>
#include <utility>

#include "base/cli_args.h"
#include "containerd/cri_client.h"

namespace registry_proxy {
namespace {

using std::chrono::milliseconds;

constexpr milliseconds kDefaultPullTimeout = std::chrono::minutes(10);
constexpr milliseconds kDefaultCallTimeout = std::chrono::seconds(30);
constexpr char kDefaultPodName[] = "registry-proxy-pull";

constexpr char kEndpointHelp[] =
    "      --endpoint EP   the CRI socket (default "
    "unix:///run/registry-proxy/registry-proxy.sock;\n"
    "                      containerd's is unix:///run/containerd/containerd.sock)\n"
    "      --timeout D     give up after D, e.g. 90s or 5m (default 30s; pull: 10m)\n"
    "      --json          machine-readable output\n";

std::string Help(std::string_view command) {
  std::string h;
  if (command == "pull") {
    h = "Usage: registry-proxy pull IMAGE [--namespace NS] [--pod-name NAME] [--pod-uid UID]\n"
        "                           [--creds USER:PASS] [--endpoint EP] [--timeout D] [--json]\n\n"
        "Pulls IMAGE through the CRI ImageService, as kubelet does, and prints the image id.\n\n"
        "  -n, --namespace NS    send pod metadata with this namespace (the daemon decides per\n"
        "                        namespace); without it no sandbox config is sent, as crictl\n"
        "                        does without --pod-config\n"
        "      --pod-name NAME   the pod name in that metadata (default registry-proxy-pull)\n"
        "      --pod-uid UID     the pod uid in that metadata (default: random)\n"
        "      --creds U:P       registry credentials for IMAGE's own registry\n";
    h += kEndpointHelp;
  } else if (command == "images") {
    h = "Usage: registry-proxy images [--endpoint EP] [--timeout D] [--json]\n\n"
        "Lists the images the runtime knows: id, repo tags, repo digests, size.\n\n";
    h += kEndpointHelp;
  } else if (command == "status") {
    h = "Usage: registry-proxy status IMAGE [--verbose] [--endpoint EP] [--timeout D] [--json]\n\n"
        "Shows the runtime's ImageStatus for IMAGE (a reference or an id). Exit 1 when the\n"
        "runtime does not have it.\n\n"
        "  -v, --verbose         also print the runtime's verbose info\n";
    h += kEndpointHelp;
  } else {
    h = "Usage: registry-proxy remove IMAGE [--endpoint EP] [--timeout D] [--json]\n\n"
        "Removes IMAGE (a reference or an id) from the runtime. Removing by id removes every\n"
        "name of the image. Removing an absent image succeeds, as in the CRI.\n\n";
    h += kEndpointHelp;
  }
  return h;
}

std::vector<FlagSpec> FlagsFor(std::string_view command) {
  std::vector<FlagSpec> f = {
      {"--endpoint", ""}, {"--timeout", ""}, {"--json", "", false}, {"--help", "-h", false}};
  if (command == "pull") {
    f.push_back({"--namespace", "-n"});
    f.push_back({"--pod-name", ""});
    f.push_back({"--pod-uid", ""});
    f.push_back({"--creds", ""});
  } else if (command == "status") {
    f.push_back({"--verbose", "-v", false});
  }
  return f;
}

std::string RandomUid() {
  // A v4-style UUID: only needs to look like a pod uid and be unique enough.
  std::random_device rd;
  std::uniform_int_distribution<int> hex(0, 15);
  const char* digits = "0123456789abcdef";
  std::string u = "xxxxxxxx-xxxx-4xxx-8xxx-xxxxxxxxxxxx";
  for (char& c : u) {
    if (c == 'x') c = digits[hex(rd)];
  }
  return u;
}

nlohmann::json ImageJson(const runtime::v1::Image& img) {
  nlohmann::json j;
  j["id"] = img.id();
  j["repoTags"] = std::vector<std::string>(img.repo_tags().begin(), img.repo_tags().end());
  j["repoDigests"] = std::vector<std::string>(img.repo_digests().begin(), img.repo_digests().end());
  j["size"] = img.size();
  j["uid"] = img.has_uid() ? nlohmann::json(img.uid().value()) : nlohmann::json(nullptr);
  j["username"] = img.username();
  j["pinned"] = img.pinned();
  return j;
}

// "sha256:0123456789abcdef..." -> "0123456789ab", as crictl and docker show ids.
std::string ShortId(const std::string& id) {
  std::string_view v = id;
  if (size_t colon = v.find(':'); colon != std::string_view::npos) v.remove_prefix(colon + 1);
  return std::string(v.substr(0, 12));
}

std::unique_ptr<CriClient> Dial(const ClientArgs& a, std::string_view cmd, std::ostream& err) {
  auto client = CriClient::Connect(a.endpoint);
  if (!client.ok()) {
    err << cmd << ": " << client.error() << "\n";
    return nullptr;
  }
  return std::move(client).value();
}

// Parses; on a usage error prints it with the help and returns nullopt with *code = 2;
// on --help prints the help and returns nullopt with *code = 0.
std::optional<ClientArgs> ParseOrUsage(std::string_view cmd, const std::vector<std::string>& args,
                                       size_t positionals, std::ostream& out, std::ostream& err,
                                       int* code) {
  auto a = ParseClientArgs(cmd, args);
  if (!a.ok()) {
    err << cmd << ": " << a.error() << "\n\n" << Help(cmd);
    *code = 2;
    return std::nullopt;
  }
  if (a->help) {
    out << Help(cmd);
    *code = 0;
    return std::nullopt;
  }
  if (a->positional.size() != positionals) {
    err << cmd << ": "
        << (positionals == 0 ? "takes no arguments"
                             : (a->positional.empty() ? "no image given" : "one image at a time"))
        << "\n\n"
        << Help(cmd);
    *code = 2;
    return std::nullopt;
  }
  return std::move(a).value();
}

}  // namespace

std::optional<milliseconds> ParseDuration(std::string_view text) {
  if (text.empty()) return std::nullopt;
  double value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data() || !std::isfinite(value) || value < 0) {
    return std::nullopt;
  }
  std::string_view unit(end, text.data() + text.size() - end);
  double ms;
  if (unit.empty() || unit == "s") {
    ms = value * 1000;
  } else if (unit == "ms") {
    ms = value;
  } else if (unit == "m") {
    ms = value * 60'000;
  } else if (unit == "h") {
    ms = value * 3'600'000;
  } else {
    return std::nullopt;
  }
  if (ms > 7 * 24 * 3'600'000.0) return std::nullopt;  // a week: surely a typo
  return milliseconds(static_cast<int64_t>(std::llround(ms)));
}

std::string HumanSize(uint64_t bytes) {
  static const char* kUnits[] = {"B", "kB", "MB", "GB", "TB", "PB", "EB"};
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1000 && u + 1 < std::size(kUnits)) {
    v /= 1000;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g%s", v, kUnits[u]);
  return buf;
}

Result<ClientArgs> ParseClientArgs(std::string_view command, const std::vector<std::string>& args) {
  std::ostringstream parse_err;
  auto parsed = ParseArgs(args, FlagsFor(command), parse_err);
  if (!parsed) {
    std::string msg = parse_err.str();
    while (!msg.empty() && msg.back() == '\n') msg.pop_back();
    return Status::Error(msg);
  }
  ClientArgs out;
  out.positional = parsed->positional;
  out.endpoint = kDefaultCriEndpoint;
  out.timeout = command == "pull" ? kDefaultPullTimeout : kDefaultCallTimeout;
  out.json = parsed->Has("--json");
  out.help = parsed->Has("--help");
  out.verbose = parsed->Has("--verbose");
  out.namespace_name = parsed->Get("--namespace");
  if (out.namespace_name && out.namespace_name->empty()) {
    return Status::Error("--namespace must not be empty");
  }
  const auto endpoint = parsed->Get("--endpoint");
  const auto timeout = parsed->Get("--timeout");
  const auto creds = parsed->Get("--creds");
  const auto pod_name = parsed->Get("--pod-name");
  const auto pod_uid = parsed->Get("--pod-uid");
  if (endpoint) {
    auto e = NormalizeCriEndpoint(*endpoint);
    if (!e.ok()) return e.status();
    out.endpoint = *e;
  }
  if (timeout) {
    auto d = ParseDuration(*timeout);
    if (!d || d->count() == 0) {
      return Status::Error("--timeout wants a duration such as 30s or 5m, got '" + *timeout + "'");
    }
    out.timeout = *d;
  }
  if ((pod_name || pod_uid) && !out.namespace_name) {
    return Status::Error("--pod-name and --pod-uid need --namespace (pod metadata)");
  }
  if (pod_name && pod_name->empty()) return Status::Error("--pod-name must not be empty");
  out.pod_name = pod_name.value_or(kDefaultPodName);
  out.pod_uid = pod_uid && !pod_uid->empty() ? *pod_uid : RandomUid();
  if (creds) {
    size_t colon = creds->find(':');
    if (colon == std::string::npos || colon == 0) {
      return Status::Error("--creds wants USER:PASSWORD");
    }
    out.username = creds->substr(0, colon);
    out.password = creds->substr(colon + 1);
  }
  return out;
}

runtime::v1::PullImageRequest BuildPullRequest(const ClientArgs& a) {
  runtime::v1::PullImageRequest req;
  if (!a.positional.empty()) req.mutable_image()->set_image(a.positional[0]);
  if (a.username) {
    req.mutable_auth()->set_username(*a.username);
    req.mutable_auth()->set_password(a.password.value_or(""));
  }
  if (a.namespace_name) {
    auto* md = req.mutable_sandbox_config()->mutable_metadata();
    md->set_name(a.pod_name);
    md->set_uid(a.pod_uid);
    md->set_namespace_(*a.namespace_name);
  }
  return req;
}

int CmdPull(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = 0;
  auto a = ParseOrUsage("pull", args, 1, out, err, &code);
  if (!a) return code;
  auto client = Dial(*a, "pull", err);
  if (!client) return 1;
  runtime::v1::PullImageRequest req = BuildPullRequest(*a);
  runtime::v1::PullImageResponse resp;
  auto start = std::chrono::steady_clock::now();
  RpcStatus s = client->PullImage(req, &resp, a->timeout);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!s.ok()) {
    err << "pull: " << RpcStatusText(s) << "\n";
    return 1;
  }
  if (a->json) {
    nlohmann::json j{{"image", a->positional[0]},
                     {"imageRef", resp.image_ref()},
                     {"seconds", seconds},
                     {"endpoint", a->endpoint}};
    if (a->namespace_name) {
      j["pod"] = {{"namespace", *a->namespace_name}, {"name", a->pod_name}, {"uid", a->pod_uid}};
    } else {
      j["pod"] = nullptr;
    }
    out << j.dump() << "\n";
    return 0;
  }
  char took[32];
  std::snprintf(took, sizeof(took), "%.3f s", seconds);
  out << "pulled:   " << a->positional[0] << "\n"
      << "image id: " << resp.image_ref() << "\n"
      << "took:     " << took << "\n";
  return 0;
}

int CmdImages(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = 0;
  auto a = ParseOrUsage("images", args, 0, out, err, &code);
  if (!a) return code;
  auto client = Dial(*a, "images", err);
  if (!client) return 1;
  runtime::v1::ListImagesResponse resp;
  if (RpcStatus s = client->ListImages(&resp, a->timeout); !s.ok()) {
    err << "images: " << RpcStatusText(s) << "\n";
    return 1;
  }
  std::vector<const runtime::v1::Image*> images;
  for (const auto& img : resp.images()) images.push_back(&img);
  // Stable output: by first tag (untagged last), then id.
  std::sort(images.begin(), images.end(), [](const auto* x, const auto* y) {
    auto key = [](const runtime::v1::Image* i) {
      return std::make_tuple(i->repo_tags().empty(),
                             i->repo_tags().empty() ? std::string() : i->repo_tags(0), i->id());
    };
    return key(x) < key(y);
  });
  if (a->json) {
    nlohmann::json all = nlohmann::json::array();
    for (const auto* img : images) all.push_back(ImageJson(*img));
    out << all.dump(2) << "\n";
    return 0;
  }
  // One row per tag/digest pair; id and size only on an image's first row.
  std::vector<std::array<std::string, 4>> rows = {
      {"IMAGE ID", "SIZE", "REPO TAGS", "REPO DIGESTS"}};
  for (const auto* img : images) {
    int n = std::max({img->repo_tags_size(), img->repo_digests_size(), 1});
    for (int i = 0; i < n; ++i) {
      rows.push_back({i == 0 ? ShortId(img->id()) : "", i == 0 ? HumanSize(img->size()) : "",
                      i < img->repo_tags_size() ? img->repo_tags(i) : (i == 0 ? "<none>" : ""),
                      i < img->repo_digests_size() ? img->repo_digests(i) : ""});
    }
  }
  std::array<size_t, 4> width{};
  for (const auto& r : rows) {
    for (size_t c = 0; c < 4; ++c) width[c] = std::max(width[c], r[c].size());
  }
  for (const auto& r : rows) {
    std::string line;
    for (size_t c = 0; c < 4; ++c) {
      line += r[c];
      if (c + 1 < 4) line += std::string(width[c] - r[c].size() + 3, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out << line << "\n";
  }
  return 0;
}

int CmdStatus(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = 0;
  auto a = ParseOrUsage("status", args, 1, out, err, &code);
  if (!a) return code;
  auto client = Dial(*a, "status", err);
  if (!client) return 1;
  const std::string& image = a->positional[0];
  runtime::v1::ImageStatusResponse resp;
  if (RpcStatus s = client->ImageStatus(image, a->verbose, &resp, a->timeout); !s.ok()) {
    err << "status: " << RpcStatusText(s) << "\n";
    return 1;
  }
  if (a->json) {
    nlohmann::json j{
        {"image", resp.has_image() ? ImageJson(resp.image()) : nlohmann::json(nullptr)}};
    nlohmann::json info = nlohmann::json::object();
    for (const auto& [k, v] : resp.info()) info[k] = v;
    j["info"] = std::move(info);
    out << j.dump(2) << "\n";
    return resp.has_image() ? 0 : 1;
  }
  if (!resp.has_image()) {
    err << "status: image not found: " << image << "\n";
    return 1;
  }
  const runtime::v1::Image& img = resp.image();
  out << "id:       " << img.id() << "\n";
  for (const auto& t : img.repo_tags()) out << "tag:      " << t << "\n";
  for (const auto& d : img.repo_digests()) out << "digest:   " << d << "\n";
  out << "size:     " << HumanSize(img.size()) << " (" << img.size() << " bytes)\n";
  if (img.has_uid()) out << "uid:      " << img.uid().value() << "\n";
  if (!img.username().empty()) out << "username: " << img.username() << "\n";
  if (img.pinned()) out << "pinned:   true\n";
  for (const auto& [k, v] : resp.info()) out << "info." << k << ": " << v << "\n";
  return 0;
}

int CmdRemove(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
  int code = 0;
  auto a = ParseOrUsage("remove", args, 1, out, err, &code);
  if (!a) return code;
  auto client = Dial(*a, "remove", err);
  if (!client) return 1;
  const std::string& image = a->positional[0];
  // Status first, only to tell the user which names go with it.
  runtime::v1::ImageStatusResponse st;
  if (RpcStatus s = client->ImageStatus(image, false, &st, a->timeout); !s.ok()) {
    err << "remove: " << RpcStatusText(s) << "\n";
    return 1;
  }
  if (RpcStatus s = client->RemoveImage(image, a->timeout); !s.ok()) {
    err << "remove: " << RpcStatusText(s) << "\n";
    return 1;
  }
  std::vector<std::string> names;
  if (st.has_image()) {
    names.assign(st.image().repo_tags().begin(), st.image().repo_tags().end());
    names.insert(names.end(), st.image().repo_digests().begin(), st.image().repo_digests().end());
  }
  if (a->json) {
    out << nlohmann::json{{"image", image},
                          {"present", st.has_image()},
                          {"id", st.has_image() ? st.image().id() : ""},
                          {"names", names}}
               .dump()
        << "\n";
    return 0;
  }
  if (!st.has_image()) {
    out << "not present: " << image << " (nothing to remove)\n";
    return 0;
  }
  out << "removed:  " << st.image().id() << "\n";
  for (const auto& n : names) out << "  name:   " << n << "\n";
  return 0;
}

}  // namespace registry_proxy
