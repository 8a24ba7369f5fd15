// libFuzzer target for the pull service's request decoding: arbitrary bytes as the serialized
// PullImageRequest that kubelet sends (PullService::PullImage), and as the ImageStatusRequest of a
// miss (StatusNeedsRecovery, RecoverStatus), with an in-memory containerd behind it and a config
// with rules, namespace filters, a mirror with credentials and a rule without fallback.
//
// Each input runs twice: once with a containerd on which every pull fails (every candidate is
// tried) and once with one on which every pull succeeds (the first candidate wins, then the
// aliasing and the wait for CRI to see the original name run). Beyond "no crash, no hang, no
// exception", it checks what kubelet and the mirrors rely on:
//  - a request forwarded as bytes is the caller's bytes exactly (PullImageRaw),
//  - a request that does not parse is forwarded as it came and nothing else is sent,
//  - a rewritten request parses, names one of the decision's mirror images, equals the caller's
//    request in every other field (unknown fields included), and never carries the caller's
//    credentials: a mirror gets no auth at all, or exactly its own entry of the credentials file,
//  - a request with credentials is never rewritten,
//  - a failed pull answers the last attempt's error; a successful one a response that parses,
//  - status recovery never fails a call, and with nothing to repair answers containerd's bytes.
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/message_differencer.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "containerd/upstream.h"
#include "pull/credentials.h"
#include "pull/pull_service.h"
#include "rules/config.h"
#include "rules/reference.h"

namespace {

using namespace registry_proxy;
using google::protobuf::util::MessageDifferencer;

[[noreturn]] void Violation(const char* what, const std::string& detail) {
  std::fprintf(stderr, "pull_fuzz: %s: %s\n", what, detail.substr(0, 2000).c_str());
  std::abort();
}

constexpr char kConfig[] = R"(excludeNamespaces: [kube-system]
rules:
  - match: docker.io
    mirrors:
      - mirror.example.com
      - host: hub.example.com/proxy
        dropLibrary: true
  - match: docker.io/private
    mirrors: [private-mirror.example.com]
    includeNamespaces: [team-*]
    fallback: false
  - match: quay.io
    mirrors:
      - host: secure.example.com
        credentials: corp
      - host: nocreds.example.com
        credentials: missing
  - match: ghcr.io
    mirrors: [ghcr.example.com]
    digestOnly: true
    credentialedPulls: upstream
pullsWithoutNamespace:
  policy: asNamespace
  namespace: default
node:
  credentialsFile: /fuzz/credentials.yaml
)";

constexpr char kCredentials[] = R"(credentials:
  corp:
    username: robot
    password: mirror-secret
)";

constexpr char kImageId[] =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
constexpr char kManifest[] =
    "sha256:2222222222222222222222222222222222222222222222222222222222222222";

const Config& TheConfig() {
  static const std::shared_ptr<const Config> config = [] {
    ConfigLoad load = ParseConfig(kConfig, "<pull_fuzz>");
    if (!load.ok()) Violation("fuzz config does not load", load.ErrorText());
    return load.config;
  }();
  return *config;
}

const Credentials& TheCredentials() {
  static const std::shared_ptr<const Credentials> creds = [] {
    auto c = Credentials::Parse(kCredentials, "<pull_fuzz creds>");
    if (!c.ok()) Violation("fuzz credentials do not load", c.error());
    return std::move(c).value();
  }();
  return *creds;
}

// containerd in memory: CRI pulls (all fail or all succeed) and image records.
class FakeContainerd final : public CriImageBackend, public ImageRecordStore {
 public:
  explicit FakeContainerd(bool pulls_succeed) : succeed_(pulls_succeed) {}

  std::vector<std::string> raw_pulls;                       // PullImageRaw requests
  std::vector<runtime::v1::PullImageRequest> mirror_pulls;  // PullImage requests
  RpcStatus last_status;

  RpcStatus PullImageRaw(CriVersion, const std::string& request, const CallOptions&,
                         std::string* response) override {
    raw_pulls.push_back(request);
    if (!succeed_) return last_status = Fail("upstream", raw_pulls.size());
    runtime::v1::PullImageResponse resp;
    resp.set_image_ref(kImageId);
    *response = resp.SerializeAsString();
    return last_status = RpcStatus::OK;
  }

  RpcStatus PullImage(CriVersion, const runtime::v1::PullImageRequest& req, const CallOptions&,
                      runtime::v1::PullImageResponse* resp) override {
    mirror_pulls.push_back(req);
    if (!succeed_) return last_status = Fail(req.image().image(), mirror_pulls.size());
    // As containerd does: a record under the (normalized) name pulled.
    auto ref = ParseNamedReference(req.image().image());
    if (ref.ok()) {
      ImageRecord rec;
      rec.name = ref->NormalizedString();
      rec.target_digest = kManifest;
      rec.target_media_type = "application/vnd.oci.image.manifest.v1+json";
      rec.target_size = 500;
      records_[rec.name] = rec;
    }
    resp->set_image_ref(kImageId);
    return last_status = RpcStatus::OK;
  }

  RpcStatus ImageStatus(CriVersion, const runtime::v1::ImageStatusRequest& req, const CallOptions&,
                        runtime::v1::ImageStatusResponse* resp) override {
    // An image is on the node when a record names it (mirror-named copies included).
    auto ref = ParseNamedReference(req.image().image());
    if (ref.ok() && records_.count(ref->NormalizedString())) {
      resp->mutable_image()->set_id(kImageId);
      resp->mutable_image()->add_repo_tags(ref->NormalizedString());
    }
    return RpcStatus::OK;
  }

  RpcStatus Get(const std::string& name, ImageRecord* out) override {
    auto it = records_.find(name);
    if (it == records_.end()) return RpcStatus(RpcCode::NOT_FOUND, "no " + name);
    *out = it->second;
    return RpcStatus::OK;
  }
  RpcStatus Put(const ImageRecord& record) override {
    if (IsImageIdDigest(record.name)) Violation("an id record was written", record.name);
    if (record.name.empty()) Violation("a record without a name", "");
    records_[record.name] = record;
    return RpcStatus::OK;
  }
  RpcStatus Delete(const std::string& name) override {
    if (IsImageIdDigest(name)) Violation("an id record was deleted", name);
    records_.erase(name);
    return RpcStatus::OK;
  }

  // Puts a mirror-named copy on the node (for status recovery).
  void Have(const std::string& image) {
    auto ref = ParseNamedReference(image);
    if (!ref.ok()) return;
    ImageRecord rec;
    rec.name = ref->NormalizedString();
    rec.target_digest = kManifest;
    records_[rec.name] = rec;
  }

 private:
  static RpcStatus Fail(const std::string& what, size_t n) {
    return RpcStatus(RpcCode::UNAVAILABLE,
                     "fake pull " + std::to_string(n) + " of " + what + " failed");
  }
  bool succeed_;
  std::map<std::string, ImageRecord> records_;
};

PullServiceOptions Options() {
  PullServiceOptions o;
  // A clock that only the service's own sleeps advance: the alias wait ends without waiting.
  auto now = std::make_shared<std::chrono::steady_clock::time_point>();
  o.now = [now] { return *now; };
  o.sleep = [now](std::chrono::milliseconds d) { *now += d; };
  o.credentials = [](const std::string& path) -> Result<std::shared_ptr<const Credentials>> {
    if (path != "/fuzz/credentials.yaml") Violation("credentials from an unexpected file", path);
    static const std::shared_ptr<const Credentials> creds(&TheCredentials(),
                                                          [](const Credentials*) {});
    return creds;
  };
  return o;
}

bool HasAuth(const runtime::v1::PullImageRequest& req) {
  const auto& a = req.auth();
  return req.has_auth() && (!a.username().empty() || !a.password().empty() || !a.auth().empty() ||
                            !a.server_address().empty() || !a.identity_token().empty() ||
                            !a.registry_token().empty());
}

// RP_PULL_FUZZ_TRACE=1: one line per pull on stderr (to see what the seeds exercise).
const bool kTrace = std::getenv("RP_PULL_FUZZ_TRACE") != nullptr;

void CheckPull(const std::string& input, bool succeed) {
  FakeContainerd ctrd(succeed);
  const Config& config = TheConfig();
  PullService service([&config] { return std::shared_ptr<const Config>(&config, [](auto*) {}); },
                      &ctrd, &ctrd, Options());
  const InterceptResult r = service.PullImage(CriVersion::kV1, input, CallOptions{});
  if (kTrace) {
    std::string mirrors;
    for (const auto& m : ctrd.mirror_pulls) {
      mirrors +=
          " " + m.image().image() + (m.has_auth() ? "(auth " + m.auth().username() + ")" : "");
    }
    std::fprintf(stderr, "pull_fuzz: %s: %zu raw, mirrors:%s -> %d %s\n",
                 succeed ? "succeed" : "fail", ctrd.raw_pulls.size(), mirrors.c_str(),
                 int(r.status.error_code()), r.status.error_message().substr(0, 120).c_str());
  }

  for (const std::string& raw : ctrd.raw_pulls) {
    if (raw != input) Violation("forwarded bytes differ from the caller's", raw);
  }
  runtime::v1::PullImageRequest req;
  if (!req.ParseFromString(input)) {
    if (ctrd.raw_pulls.size() != 1 || !ctrd.mirror_pulls.empty()) {
      Violation("an unparsed request was not forwarded exactly once, alone", input);
    }
  } else {
    // The decision the service made, made again: every mirror pull must be one of its images
    // (a pull with credentials is mirrored under credentialedPulls: mirror, the default; never
    // with those credentials: below, a mirror request carries no auth but its own entry).
    PullContext ctx;
    ctx.with_credentials = HasAuth(req);
    std::map<std::string, std::string> labels;
    if (req.has_sandbox_config()) {
      ctx.namespace_name = req.sandbox_config().metadata().namespace_();
      labels.insert(req.sandbox_config().labels().begin(), req.sandbox_config().labels().end());
      ctx.pod_labels = &labels;
    }
    const Decision d = config.policy->Decide(req.image().image(), ctx);
    if (!ctrd.mirror_pulls.empty() && !d.rewritten()) Violation("pulled a mirror unasked", "");
    for (const runtime::v1::PullImageRequest& m : ctrd.mirror_pulls) {
      // It went over the wire: it must survive a round trip.
      runtime::v1::PullImageRequest wire;
      if (!wire.ParseFromString(m.SerializeAsString())) Violation("rewritten does not parse", "");
      const Candidate* c = nullptr;
      for (const Candidate& k : d.candidates) {
        if (!k.upstream && k.image == m.image().image()) c = &k;
      }
      if (c == nullptr) Violation("a mirror image not in the decision", m.image().image());
      // The caller's request with only the image and the auth changed.
      runtime::v1::PullImageRequest expect = req;
      expect.mutable_image()->set_image(m.image().image());
      expect.clear_auth();
      runtime::v1::PullImageRequest got = m;
      if (got.has_auth()) {
        const RegistryAuth* own = c->mirror->credentials.empty()
                                      ? nullptr
                                      : TheCredentials().Find(c->mirror->credentials);
        if (own == nullptr) Violation("auth sent to a mirror without credentials", c->image);
        const auto& a = got.auth();
        if (a.username() != own->username || a.password() != own->password ||
            a.auth() != own->auth || a.identity_token() != own->identity_token ||
            !a.server_address().empty() || !a.registry_token().empty()) {
          Violation("a mirror got auth other than its own entry", c->image);
        }
        got.clear_auth();
      }
      if (!MessageDifferencer::Equals(got, expect)) {
        Violation("rewritten request differs beyond image and auth", got.DebugString());
      }
    }
  }

  if (succeed) {
    if (!r.status.ok()) {
      // Only the mirror with missing credentials fails without a pull, and a fallback-less
      // rule whose every mirror is skipped.
      if (r.status.error_code() != RpcCode::FAILED_PRECONDITION) {
        Violation("a pull failed although containerd succeeds", r.status.error_message());
      }
    } else {
      runtime::v1::PullImageResponse resp;
      if (!resp.ParseFromString(r.response) || resp.image_ref() != kImageId) {
        Violation("bad response", r.response);
      }
    }
  } else {
    if (r.status.ok()) Violation("a pull succeeded although containerd fails", "");
    if (r.status.error_code() != RpcCode::FAILED_PRECONDITION &&
        (r.status.error_code() != ctrd.last_status.error_code() ||
         r.status.error_message() != ctrd.last_status.error_message())) {
      Violation("not the last attempt's error", r.status.error_message());
    }
    if (!r.response.empty()) Violation("a response with an error", "");
  }
}

void CheckStatus(const std::string& input, bool copy_on_node) {
  FakeContainerd ctrd(true);
  const Config& config = TheConfig();
  PullService service([&config] { return std::shared_ptr<const Config>(&config, [](auto*) {}); },
                      &ctrd, &ctrd, Options());
  const std::string miss = runtime::v1::ImageStatusResponse().SerializeAsString();
  runtime::v1::ImageStatusRequest req;
  const bool parses = req.ParseFromString(input);
  if (copy_on_node && parses) {
    PullContext ctx;
    ctx.any_namespace = true;
    for (const Candidate& c : config.policy->Decide(req.image().image(), ctx).candidates) {
      if (!c.upstream) ctrd.Have(c.image);
    }
  }
  const bool needs = service.StatusNeedsRecovery(CriVersion::kV1, input, miss);
  if (needs && !parses) Violation("recovery for a request that does not parse", input);
  // A hit is never touched.
  runtime::v1::ImageStatusResponse hit;
  hit.mutable_image()->set_id(kImageId);
  if (service.StatusNeedsRecovery(CriVersion::kV1, input, hit.SerializeAsString())) {
    Violation("recovery asked for a hit", input);
  }
  if (!needs) return;
  const InterceptResult r = service.RecoverStatus(CriVersion::kV1, input, miss, CallOptions{});
  if (!r.status.ok()) Violation("status recovery failed a call", r.status.error_message());
  runtime::v1::ImageStatusResponse out;
  if (!out.ParseFromString(r.response)) Violation("recovered response does not parse", "");
  if (!copy_on_node && r.response != miss) Violation("nothing to repair, but changed", "");
  if (out.has_image() && out.image().id() != kImageId) Violation("wrong id", out.image().id());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Every log line is still formatted (the level stays at trace: LogSafe and the format
  // strings run on fuzzed text), then dropped.
  auto logger =
      std::make_shared<spdlog::logger>("fuzz", std::make_shared<spdlog::sinks::null_sink_mt>());
  logger->set_level(spdlog::level::trace);
  spdlog::set_default_logger(logger);
  // protobuf logs every string with invalid UTF-8 it refuses: expected here, and slow.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  for (bool succeed : {false, true}) CheckPull(input, succeed);
  for (bool copy : {false, true}) CheckStatus(input, copy);
  return 0;
}
