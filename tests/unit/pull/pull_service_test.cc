// PullService against a fake containerd: CRI pulls and status over a small image store, and
// the Images API over the same records, so aliasing is observable the way CRI would see it.
// The real thing is exercised by the integration tests (tests/integration).
#include "pull/pull_service.h"

#include <google/protobuf/unknown_field_set.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <future>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "pull/credentials.h"
#include "pull/mirror_health.h"
#include "pull/pull_observer.h"
#include "rules/config.h"
#include "rules/reference.h"

namespace registry_proxy {
namespace {

using std::chrono::milliseconds;

bool EndsWith(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

const std::string kDigest = "sha256:" + std::string(64, 'd');
const std::string kDigest2 = "sha256:" + std::string(64, 'e');
const std::string kId = "sha256:" + std::string(64, '1');
const std::string kId2 = "sha256:" + std::string(64, '2');
constexpr char kManifestType[] = "application/vnd.oci.image.manifest.v1+json";

// What a registry holds: normalised reference (name:tag or name@digest) -> manifest digest
// and image id. A pull of name@digest succeeds if any tag of that name has that digest.
struct Served {
  std::string digest;
  std::string id;
};

// containerd in miniature. Thread-safe (pulls run concurrently in one test).
class FakeContainerd final : public CriImageBackend, public ImageRecordStore {
 public:
  struct PullCall {
    CriVersion v;
    bool raw = false;
    std::string bytes;                     // what reached "containerd", serialized
    runtime::v1::PullImageRequest parsed;  // empty when the bytes did not parse
    std::chrono::system_clock::time_point deadline;
    std::vector<std::pair<std::string, std::string>> metadata;
  };

  // Registries.
  void Serve(const std::string& ref, std::string digest, std::string id) {
    std::lock_guard l(mu_);
    served_[Normalize(ref)] = Served{std::move(digest), std::move(id)};
  }
  void Fail(const std::string& ref, RpcStatus s) {
    std::lock_guard l(mu_);
    failures_[Normalize(ref)] = std::move(s);
  }

  // Fault injection and observation.
  std::function<void(const PullCall&)> on_pull;  // runs inside the pull, before it answers
  int status_delay_calls = 0;  // ImageStatus misses this many times before seeing a record
  bool status_never_sees = false;
  // After a Put replaces a record, ImageStatus shows the old one this many more times.
  int stale_status_calls = 0;
  bool fail_put = false;
  std::atomic<int> status_calls{0};
  std::atomic<int> puts{0};

  std::vector<PullCall> pulls() {
    std::lock_guard l(mu_);
    return pulls_;
  }
  std::vector<std::string> pulled_images() {
    std::vector<std::string> out;
    for (const auto& p : pulls()) out.push_back(p.parsed.image().image());
    return out;
  }
  bool HasRecord(const std::string& name) {
    std::lock_guard l(mu_);
    return records_.count(name) != 0;
  }
  ImageRecord Record(const std::string& name) {
    std::lock_guard l(mu_);
    return records_.at(name);
  }
  std::set<std::string> RecordNames() {
    std::lock_guard l(mu_);
    std::set<std::string> out;
    for (const auto& [k, v] : records_) out.insert(k);
    return out;
  }
  std::vector<std::string> deletes() {
    std::lock_guard l(mu_);
    return deletes_;
  }

  // CriImageBackend
  RpcStatus PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                      const CallOptions& opts, runtime::v1::PullImageResponse* resp) override {
    std::string bytes = req.SerializeAsString();
    std::string out;
    RpcStatus s = Pull(v, false, bytes, opts, &out);
    if (s.ok()) resp->ParseFromString(out);
    return s;
  }
  RpcStatus PullImageRaw(CriVersion v, const std::string& request, const CallOptions& opts,
                         std::string* response) override {
    return Pull(v, true, request, opts, response);
  }
  RpcStatus ImageStatus(CriVersion, const runtime::v1::ImageStatusRequest& req, const CallOptions&,
                        runtime::v1::ImageStatusResponse* resp) override {
    ++status_calls;
    std::lock_guard l(mu_);
    auto parsed = ParseImage(req.image().image());
    if (!parsed.ok() || parsed->kind != ReferenceKind::kNamed) return RpcStatus::OK;
    auto it = records_.find(parsed->ref.NormalizedString());
    if (it == records_.end()) return RpcStatus::OK;
    if (auto st = stale_.find(it->first); st != stale_.end() && st->second.second > 0) {
      --st->second.second;
      resp->mutable_image()->set_id(ids_.at(st->second.first.target_digest));
      return RpcStatus::OK;
    }
    if (status_never_sees) return RpcStatus::OK;
    if (status_delay_calls > 0) {
      --status_delay_calls;
      return RpcStatus::OK;
    }
    // CRI's view: every record with the same target is one image.
    const std::string id = ids_.at(it->second.target_digest);
    runtime::v1::Image* image = resp->mutable_image();
    image->set_id(id);
    image->set_size(1234);
    for (const auto& [name, rec] : records_) {
      if (rec.target_digest != it->second.target_digest || IsImageIdDigest(name)) continue;
      (name.find('@') != std::string::npos ? image->add_repo_digests(name)
                                           : image->add_repo_tags(name));
    }
    return RpcStatus::OK;
  }

  // ImageRecordStore
  RpcStatus Get(const std::string& name, ImageRecord* out) override {
    std::lock_guard l(mu_);
    auto it = records_.find(name);
    if (it == records_.end()) return RpcStatus(RpcCode::NOT_FOUND, "not found");
    *out = it->second;
    return RpcStatus::OK;
  }
  RpcStatus Put(const ImageRecord& record) override {
    std::lock_guard l(mu_);
    if (fail_put) return RpcStatus(RpcCode::UNAVAILABLE, "containerd is away");
    ++puts;
    if (auto it = records_.find(record.name); it != records_.end()) {
      stale_[record.name] = {it->second, stale_status_calls};
    }
    records_[record.name] = record;
    return RpcStatus::OK;
  }
  RpcStatus Delete(const std::string& name) override {
    std::lock_guard l(mu_);
    deletes_.push_back(name);
    records_.erase(name);
    return RpcStatus::OK;
  }

  // What CRI writes after a pull: name (tag or digest), name@digest, and the id.
  void AddImage(const std::string& ref, const std::string& digest, const std::string& id) {
    std::lock_guard l(mu_);
    AddImageLocked(ParseNamedReference(ref).value(), digest, id);
  }

 private:
  static std::string Normalize(const std::string& ref) {
    return ParseNamedReference(ref).value().NormalizedString();
  }

  void AddImageLocked(const Reference& ref, const std::string& digest, const std::string& id) {
    ImageRecord rec;
    rec.labels = {{"io.cri-containerd.image", "managed"}, {"test.kept", "yes"}};
    rec.target_media_type = kManifestType;
    rec.target_digest = digest;
    rec.target_size = 500;
    for (const std::string& name : {ref.NormalizedString(), ref.Name() + "@" + digest, id}) {
      rec.name = name;
      records_[name] = rec;
    }
    ids_[digest] = id;
  }

  RpcStatus Pull(CriVersion v, bool raw, const std::string& bytes, const CallOptions& opts,
                 std::string* response) {
    PullCall call;
    call.v = v;
    call.raw = raw;
    call.bytes = bytes;
    call.deadline = opts.deadline;
    call.metadata = opts.metadata;
    const bool parsed = call.parsed.ParseFromString(bytes);
    {
      std::lock_guard l(mu_);
      pulls_.push_back(call);
    }
    if (on_pull) on_pull(call);
    if (opts.cancellation && opts.cancellation->cancelled()) {
      return RpcStatus(RpcCode::CANCELLED, "context canceled");
    }
    if (!parsed) {
      return RpcStatus(RpcCode::INTERNAL, "grpc: error unmarshalling request");
    }
    auto ref = ParseNamedReference(call.parsed.image().image());
    if (!ref.ok()) {
      return RpcStatus(RpcCode::UNKNOWN, "failed to parse image reference");
    }
    std::lock_guard l(mu_);
    const std::string key = ref->NormalizedString();
    if (auto f = failures_.find(key); f != failures_.end()) return f->second;
    const Served* hit = nullptr;
    if (auto it = served_.find(key); it != served_.end()) hit = &it->second;
    if (!hit && !ref->digest.empty()) {
      for (const auto& [k, s] : served_) {
        if (s.digest == ref->digest && ParseNamedReference(k)->Name() == ref->Name()) hit = &s;
      }
    }
    if (!hit) {
      return RpcStatus(RpcCode::NOT_FOUND,
                       "failed to pull and unpack image \"" + key + "\": not found");
    }
    AddImageLocked(*ref, hit->digest, hit->id);
    runtime::v1::PullImageResponse resp;
    resp.set_image_ref(hit->id);
    *response = resp.SerializeAsString();
    return RpcStatus::OK;
  }

  std::mutex mu_;
  std::map<std::string, Served> served_;
  std::map<std::string, RpcStatus> failures_;
  std::map<std::string, ImageRecord> records_;
  std::map<std::string, std::string> ids_;                    // digest -> id
  std::map<std::string, std::pair<ImageRecord, int>> stale_;  // name -> (old record, calls left)
  std::vector<PullCall> pulls_;
  std::vector<std::string> deletes_;
};

constexpr char kConfig[] = R"(
proxies:
  docker.io: m1.example
rules:
  - match: docker.io/library
    mirrors: [m1.example, m2.example]
  - match: quay.io
    mirrors:
      - host: q1.example
        credentials: corp
      - q2.example
    fallback: false
  - match: ghcr.io
    mirrors:
      - host: g1.example
        credentials: missing
  - match: registry.k8s.io
    mirrors: [k-a.example]
    includeNamespaces: [team-a]
  - match: registry.k8s.io
    mirrors: [k-b.example]
    includeNamespaces: [team-b]
excludeNamespaces: [kube-system]
node:
  credentialsFile: /etc/rp/credentials.yaml
)";

constexpr char kCredentials[] = R"(credentials:
  corp:
    username: robot
    password: TOPSECRET-PASSWORD
  missing-not:
    auth: dTpw
)";

std::shared_ptr<const Config> MustConfig(const std::string& yaml) {
  ConfigLoad load = ParseConfig(yaml, "test.yaml");
  EXPECT_TRUE(load.ok()) << load.ErrorText();
  return load.config;
}

// Captures the log so tests can check what is (and is never) written.
class LogCapture {
 public:
  LogCapture() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    auto logger = std::make_shared<spdlog::logger>("capture", sink);
    logger->set_level(spdlog::level::debug);
    spdlog::set_default_logger(logger);
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

runtime::v1::PullImageRequest Request(const std::string& image,
                                      std::optional<std::string> ns = std::nullopt) {
  runtime::v1::PullImageRequest req;
  req.mutable_image()->set_image(image);
  if (ns) {
    auto* sc = req.mutable_sandbox_config();
    sc->mutable_metadata()->set_name("pod");
    sc->mutable_metadata()->set_namespace_(*ns);
    (*sc->mutable_labels())["app"] = "web";
  }
  return req;
}

class PullServiceTest : public testing::Test {
 protected:
  PullServiceTest() { SetConfig(kConfig); }

  milliseconds linger_{0};                 // PullServiceOptions::mirror_name_linger (real time)
  const ImageNameIndex* index_ = nullptr;  // PullServiceOptions::image_index

  void SetConfig(const std::string& yaml) {
    std::lock_guard l(config_mu_);
    config_ = MustConfig(yaml);
  }

  PullService& Service() {
    if (!service_) {
      PullServiceOptions o;
      o.alias_wait = milliseconds(2000);
      o.mirror_name_linger = linger_;
      o.image_index = index_;
      o.now = [this] { return std::chrono::steady_clock::time_point(fake_time_.load()); };
      o.sleep = [this](milliseconds d) {
        std::lock_guard l(sleep_mu_);
        sleeps_.push_back(d);
        fake_time_.store(fake_time_.load() + d);  // under sleep_mu_
      };
      o.credentials =
          [this](const std::string& path) -> Result<std::shared_ptr<const Credentials>> {
        credential_paths_.push_back(path);
        return Credentials::Parse(credentials_yaml_, path);
      };
      service_ = std::make_unique<PullService>(
          [this] {
            std::lock_guard l(config_mu_);
            return config_;
          },
          &fake_, &fake_, std::move(o));
    }
    return *service_;
  }

  InterceptResult Pull(const runtime::v1::PullImageRequest& req, CallOptions opts = {},
                       CriVersion v = CriVersion::kV1) {
    return Service().PullImage(v, req.SerializeAsString(), opts);
  }

  static std::string ImageRef(const InterceptResult& r) {
    runtime::v1::PullImageResponse resp;
    EXPECT_TRUE(resp.ParseFromString(r.response));
    return resp.image_ref();
  }

  LogCapture quiet_;  // the service logs a lot; tests that read it capture their own
  FakeContainerd fake_;
  std::mutex config_mu_;
  std::shared_ptr<const Config> config_;
  std::string credentials_yaml_ = kCredentials;
  std::vector<std::string> credential_paths_;
  std::atomic<std::chrono::steady_clock::duration> fake_time_{
      std::chrono::steady_clock::duration::zero()};
  std::mutex sleep_mu_;
  std::vector<milliseconds> sleeps_;
  std::unique_ptr<PullService> service_;
};

// ---------------------------------------------------------------------------------------------
// PullImage

TEST_F(PullServiceTest, MirrorServesAndTheNodeLooksAsIfUpstreamHad) {
  LogCapture log;
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  InterceptResult r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(ImageRef(r), kId);

  ASSERT_EQ(fake_.pulls().size(), 1u);
  const auto call = fake_.pulls()[0];
  EXPECT_FALSE(call.raw);
  EXPECT_EQ(call.parsed.image().image(), "m1.example/library/nginx:latest");
  EXPECT_FALSE(call.parsed.has_auth());
  // The pod context travels with it (containerd uses it for runtime handlers and such).
  EXPECT_EQ(call.parsed.sandbox_config().metadata().namespace_(), "default");

  // Upstream names, with the mirror's target and labels, plus the source.
  const std::string tag_name = "docker.io/library/nginx:latest";
  const std::string digest_name = "docker.io/library/nginx@" + kDigest;
  for (const std::string& name : {tag_name, digest_name}) {
    ASSERT_TRUE(fake_.HasRecord(name)) << name;
    ImageRecord rec = fake_.Record(name);
    EXPECT_EQ(rec.target_digest, kDigest);
    EXPECT_EQ(rec.target_media_type, kManifestType);
    EXPECT_EQ(rec.target_size, 500);
    EXPECT_EQ(rec.labels["io.cri-containerd.image"], "managed");
    EXPECT_EQ(rec.labels["io.registry-proxy.source"], "m1.example/library/nginx:latest");
    EXPECT_EQ(rec.labels["test.kept"], "yes");
  }
  // Mirror names gone; the id stays.
  EXPECT_EQ(fake_.RecordNames(), (std::set<std::string>{tag_name, digest_name, kId}));
  for (const std::string& d : fake_.deletes()) EXPECT_FALSE(IsImageIdDigest(d)) << d;
  // Answered only after CRI saw the original name.
  EXPECT_GE(fake_.status_calls.load(), 1);

  const std::string text = log.text();
  EXPECT_NE(text.find("attempt 1/3 m1.example/library/nginx:latest (mirror) namespace=default "
                      "rule=rules[0] (test.yaml:5) auth=no"),
            std::string::npos)
      << text;
}

// kubelet re-pulls present images (imagePullPolicy: Always, KEP-2535): when the original names
// already point at the image just pulled, nothing is written and nothing waited for.
TEST_F(PullServiceTest, RePullOfAPresentImageWritesNoRecordAndWaitsForNothing) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  ASSERT_TRUE(Pull(Request("nginx", "default")).status.ok());
  const int puts = fake_.puts.load(), polls = fake_.status_calls.load();
  EXPECT_EQ(puts, 2);  // the tag and the digest name
  const size_t deletes = fake_.deletes().size();

  InterceptResult r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(ImageRef(r), kId);
  EXPECT_EQ(fake_.puts.load(), puts) << "no record written";
  EXPECT_EQ(fake_.status_calls.load(), polls) << "no visibility wait";
  // containerd named the mirror copy again in its pull: those names still go, a moment after
  // the answer.
  const std::set<std::string> upstream_names = {"docker.io/library/nginx:latest",
                                                "docker.io/library/nginx@" + kDigest, kId};
  for (int i = 0; i < 200 && fake_.RecordNames() != upstream_names; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_GT(fake_.deletes().size(), deletes);
  EXPECT_EQ(fake_.RecordNames(), upstream_names);

  // A moved tag is written and waited for as a first pull is.
  const std::string new_digest = "sha256:" + std::string(64, 'c');
  const std::string new_id = "sha256:" + std::string(64, 'e');
  fake_.Serve("m1.example/library/nginx:latest", new_digest, new_id);
  r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(ImageRef(r), new_id);
  EXPECT_EQ(fake_.puts.load(), puts + 2);
  EXPECT_GT(fake_.status_calls.load(), polls);
  EXPECT_EQ(fake_.Record("docker.io/library/nginx:latest").target_digest, new_digest);
}

// Back-to-back re-pulls (a rollout): containerd's mirror names linger, so the later pulls find
// them in place (containerd writes nothing for them) and they are dropped once, after the last.
TEST_F(PullServiceTest, MirrorNamesLingerAcrossABurstOfRePullsAndAreDroppedOnce) {
  linger_ = milliseconds(800);
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  ASSERT_TRUE(Pull(Request("nginx", "default")).status.ok());
  const std::set<std::string> upstream_names = {"docker.io/library/nginx:latest",
                                                "docker.io/library/nginx@" + kDigest, kId};
  ASSERT_EQ(fake_.RecordNames(), upstream_names);  // a first pull drops them before answering
  const size_t deletes = fake_.deletes().size();
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(Pull(Request("nginx", "default")).status.ok());
  EXPECT_TRUE(fake_.RecordNames().count("m1.example/library/nginx:latest"))
      << "dropped before the linger ran out";
  for (int i = 0; i < 300 && fake_.RecordNames() != upstream_names; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(fake_.RecordNames(), upstream_names);
  EXPECT_EQ(fake_.deletes().size(), deletes + 2) << "the tag and the digest name, once";
}

// staleIfError: every candidate down (refused, reset, 5xx, timeout) and the image on the node:
// kubelet gets the present image (imagePullPolicy: Always keeps pods starting). Never for "not
// found", an authorization failure, a pull with credentials, or when it is off (the default).
TEST_F(PullServiceTest, StaleIfErrorAnswersWithThePresentImageOnlyWhenEveryCandidateIsDown) {
  const RpcStatus refused(RpcCode::UNKNOWN,
                          "failed to resolve reference: dial tcp 127.0.0.1:9: connect: "
                          "connection refused");
  const RpcStatus broken(RpcCode::UNKNOWN,
                         "unexpected status code [manifests latest]: 503 Service Unavailable");
  auto all_fail = [&](const RpcStatus& m1, const RpcStatus& m2, const RpcStatus& up) {
    fake_.Fail("m1.example/library/nginx:latest", m1);
    fake_.Fail("m2.example/library/nginx:latest", m2);
    fake_.Fail("docker.io/library/nginx:latest", up);
  };
  fake_.AddImage("docker.io/library/nginx:latest", kDigest, kId);
  all_fail(refused, broken, refused);

  // Off by default: the last error's code, and its message whole after the other candidates.
  InterceptResult r = Pull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_message(),
            "mirror m1.example: down (connection refused); mirror m2.example: down (503 Service "
            "Unavailable); upstream docker.io: " +
                refused.error_message());

  SetConfig(std::string(kConfig) + "staleIfError: true\n");
  {
    LogCapture log;
    r = Pull(Request("nginx", "default"));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(ImageRef(r), kId);
    const std::string text = log.text();
    EXPECT_NE(text.find("every candidate was down (m1.example: "), std::string::npos) << text;
    EXPECT_NE(text.find("m2.example: UNKNOWN: unexpected status code [manifests latest]: 503"),
              std::string::npos)
        << text;
    EXPECT_NE(text.find("staleIfError: answering with the image on the node, " + kId),
              std::string::npos)
        << text;
  }
  // "Not found" somewhere: the registries answered; the error goes back.
  all_fail(refused, RpcStatus(RpcCode::NOT_FOUND, "m2: not found"), refused);
  EXPECT_FALSE(Pull(Request("nginx", "default")).status.ok());
  // An authorization failure upstream is an answer too.
  const RpcStatus denied(RpcCode::UNKNOWN,
                         "pull access denied, repository does not exist or may require "
                         "authorization: 401 Unauthorized");
  all_fail(refused, refused, denied);
  EXPECT_TRUE(EndsWith(Pull(Request("nginx", "default")).status.error_message(),
                       "; upstream docker.io: " + denied.error_message()));
  // A pull with credentials must reach its registry (KEP-2535 relies on it).
  all_fail(refused, refused, refused);
  runtime::v1::PullImageRequest with = Request("nginx", "default");
  with.mutable_auth()->set_username("u");
  EXPECT_FALSE(Pull(with).status.ok());
  // Not on the node: the last error.
  all_fail(refused, refused, refused);
  EXPECT_TRUE(Pull(Request("nginx", "default")).status.ok()) << "still present";
  for (const char* ref : {"m1.example/library/busybox:latest", "m2.example/library/busybox:latest",
                          "docker.io/library/busybox:latest"}) {
    fake_.Fail(ref, refused);
  }
  EXPECT_TRUE(EndsWith(Pull(Request("busybox", "default")).status.error_message(),
                       "; upstream docker.io: " + refused.error_message()));
}

TEST_F(PullServiceTest, KeepMirrorNamesKeepsThem) {
  SetConfig(std::string(kConfig) + "  keepMirrorNames: true\n");
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  ASSERT_TRUE(Pull(Request("nginx", "default")).status.ok());
  EXPECT_TRUE(fake_.HasRecord("m1.example/library/nginx:latest"));
  EXPECT_TRUE(fake_.HasRecord("m1.example/library/nginx@" + kDigest));
  EXPECT_TRUE(fake_.HasRecord("docker.io/library/nginx:latest"));
  EXPECT_TRUE(fake_.deletes().empty());
}

TEST_F(PullServiceTest, FirstMirrorFailsSecondServes) {
  fake_.Fail("m1.example/library/nginx:1.25",
             RpcStatus(RpcCode::UNKNOWN, "m1: connection refused"));
  fake_.Serve("m2.example/library/nginx:1.25", kDigest, kId);
  InterceptResult r = Pull(Request("nginx:1.25", "default"));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(fake_.pulled_images(), (std::vector<std::string>{"m1.example/library/nginx:1.25",
                                                             "m2.example/library/nginx:1.25"}));
  EXPECT_EQ(fake_.Record("docker.io/library/nginx:1.25").labels["io.registry-proxy.source"],
            "m2.example/library/nginx:1.25");
  EXPECT_FALSE(fake_.HasRecord("m2.example/library/nginx:1.25"));
}

TEST_F(PullServiceTest, AllMirrorsFailThenUpstreamWithTheCallersBytes) {
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  const std::string bytes = req.SerializeAsString();
  InterceptResult r = Service().PullImage(CriVersion::kV1, bytes, {});
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(ImageRef(r), kId);
  const auto pulls = fake_.pulls();
  ASSERT_EQ(pulls.size(), 3u);
  EXPECT_TRUE(pulls[2].raw);
  EXPECT_EQ(pulls[2].bytes, bytes);
  // Upstream served it under its own names: nothing to alias, nothing deleted.
  EXPECT_TRUE(fake_.deletes().empty());
  EXPECT_EQ(fake_.Record("docker.io/library/nginx:latest").labels.count("io.registry-proxy.source"),
            0u);
}

TEST_F(PullServiceTest, EverythingFailsReturnsTheLastErrorWithWhatHappenedAtEachCandidate) {
  fake_.Fail("m1.example/library/nginx:latest",
             RpcStatus(RpcCode::UNKNOWN, "m1: read: connection reset by peer"));
  fake_.Fail("m2.example/library/nginx:latest",
             RpcStatus(RpcCode::NOT_FOUND, "m2.example/library/nginx: not found"));
  const std::string upstream_msg =
      "failed to pull and unpack image \"docker.io/library/nginx:latest\": failed to resolve "
      "reference: pull access denied, repository does not exist or may require authorization";
  fake_.Fail("nginx", RpcStatus(RpcCode::NOT_FOUND, upstream_msg));
  InterceptResult r = Pull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::NOT_FOUND);
  EXPECT_EQ(r.status.error_message(),
            "mirror m1.example: down (connection reset); mirror m2.example: not found; upstream "
            "docker.io: " +
                upstream_msg);
  EXPECT_TRUE(r.response.empty());
  EXPECT_EQ(fake_.pulls().size(), 3u);
}

TEST_F(PullServiceTest, ContainerdsOwnFailureStopsTheWalkAndBlamesNoMirror) {
  const std::string disk =
      "failed to pull and unpack image \"m1.example/library/nginx:latest\": failed to extract "
      "layer sha256:abc: write /var/lib/containerd/x: no space left on device: unknown";
  fake_.Fail("m1.example/library/nginx:latest", RpcStatus(RpcCode::UNKNOWN, disk));
  fake_.Serve("m2.example/library/nginx:latest", kDigest, kId);  // never asked
  InterceptResult r = Pull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::UNKNOWN);
  EXPECT_EQ(r.status.error_message(), disk);
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m1.example/library/nginx:latest"});
  // containerd unreachable: the same.
  fake_.Fail("m1.example/library/nginx:latest",
             RpcStatus(RpcCode::UNAVAILABLE, "failed to connect to all addresses"));
  r = Pull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_EQ(fake_.pulled_images().size(), 2u);
}

TEST_F(PullServiceTest, FallbackOffReturnsTheLastMirrorsError) {
  fake_.Fail("q1.example/org/app:v1", RpcStatus(RpcCode::UNKNOWN, "q1 says no"));
  fake_.Fail("q2.example/org/app:v1",
             RpcStatus(RpcCode::UNAVAILABLE, "q2: dial tcp: connection refused"));
  fake_.Serve("quay.io/org/app:v1", kDigest, kId);  // never asked
  InterceptResult r = Pull(Request("quay.io/org/app:v1", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(),
            "mirror q1.example: failed; mirror q2.example: q2: dial tcp: connection refused");
  EXPECT_EQ(fake_.pulled_images(),
            (std::vector<std::string>{"q1.example/org/app:v1", "q2.example/org/app:v1"}));
}

TEST_F(PullServiceTest, ExcludedNamespaceForwardsTheRequestAsItCame) {
  LogCapture log;
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  const std::string bytes = Request("nginx", "kube-system").SerializeAsString();
  InterceptResult r = Service().PullImage(CriVersion::kV1, bytes, {});
  ASSERT_TRUE(r.status.ok());
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_TRUE(fake_.pulls()[0].raw);
  EXPECT_EQ(fake_.pulls()[0].bytes, bytes);
  EXPECT_NE(log.text().find("namespace_excluded"), std::string::npos) << log.text();
}

TEST_F(PullServiceTest, CallerTextCannotForgeLogLines) {
  LogCapture log;
  Pull(Request("nginx\n[info] pull x: attempt 1/1 forged", "default"));
  const std::string text = log.text();
  EXPECT_EQ(text.find("\n[info] pull x"), std::string::npos) << text;
  EXPECT_NE(text.find("nginx\\x0a[info]"), std::string::npos) << text;
}

TEST_F(PullServiceTest, NoSandboxConfigFollowsThePolicy) {
  fake_.Serve("m1.example/library/busybox:latest", kDigest, kId);
  ASSERT_TRUE(Pull(Request("busybox")).status.ok());  // default: rewrite
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m1.example/library/busybox:latest"});

  SetConfig(std::string(kConfig) + "pullsWithoutNamespace: {policy: passthrough}\n");
  service_.reset();
  fake_.Serve("docker.io/library/alpine:latest", kDigest2, kId2);
  ASSERT_TRUE(Pull(Request("alpine")).status.ok());
  EXPECT_TRUE(fake_.pulls().back().raw);
}

// credentialedPulls: mirror (the default, the earlier tool's behaviour): a pull with kubelet's
// credentials is mirrored, without them; only upstream gets them, as the caller's own bytes.
TEST_F(PullServiceTest, CredentialedPullsAreMirroredWithoutTheCallersCredentials) {
  LogCapture log;
  fake_.Fail("m1.example/library/nginx:latest", RpcStatus(RpcCode::NOT_FOUND, "m1: not found"));
  fake_.Serve("m2.example/library/nginx:latest", kDigest, kId);
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  req.mutable_auth()->set_username("kubelet-user");
  req.mutable_auth()->set_password("KUBELET-SECRET");
  InterceptResult r = Service().PullImage(CriVersion::kV1, req.SerializeAsString(), {});
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(fake_.pulled_images(), (std::vector<std::string>{"m1.example/library/nginx:latest",
                                                             "m2.example/library/nginx:latest"}));
  for (const auto& p : fake_.pulls()) {
    EXPECT_FALSE(p.raw);
    EXPECT_FALSE(p.parsed.has_auth());
    EXPECT_EQ(p.bytes.find("KUBELET-SECRET"), std::string::npos);
    EXPECT_EQ(p.bytes.find("kubelet-user"), std::string::npos);
  }
  const std::string text = log.text();
  EXPECT_EQ(text.find("KUBELET-SECRET"), std::string::npos) << text;
  EXPECT_EQ(text.find("kubelet-user"), std::string::npos) << text;
}

TEST_F(PullServiceTest, CredentialedPullsGoUpstreamWithTheCallersBytesLast) {
  fake_.Fail("m1.example/library/nginx:latest", RpcStatus(RpcCode::UNKNOWN, "down"));
  fake_.Fail("m2.example/library/nginx:latest", RpcStatus(RpcCode::UNKNOWN, "down"));
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  req.mutable_auth()->set_username("kubelet-user");
  req.mutable_auth()->set_password("KUBELET-SECRET");
  const std::string bytes = req.SerializeAsString();
  InterceptResult r = Service().PullImage(CriVersion::kV1, bytes, {});
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(fake_.pulls().size(), 3u);
  EXPECT_TRUE(fake_.pulls()[2].raw);
  EXPECT_EQ(fake_.pulls()[2].bytes, bytes);  // the original registry gets the credentials
}

// credentialedPulls: upstream (top level or per rule): such a pull is not rewritten at all.
TEST_F(PullServiceTest, CredentialedPullsUpstreamForwardsTheRequestUntouched) {
  LogCapture log;
  SetConfig(std::string(kConfig) + "credentialedPulls: upstream\n");
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  req.mutable_auth()->set_username("kubelet-user");
  req.mutable_auth()->set_password("KUBELET-SECRET");
  const std::string bytes = req.SerializeAsString();
  InterceptResult r = Service().PullImage(CriVersion::kV1, bytes, {});
  ASSERT_TRUE(r.status.ok());
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_TRUE(fake_.pulls()[0].raw);
  EXPECT_EQ(fake_.pulls()[0].bytes, bytes);
  const std::string text = log.text();
  EXPECT_NE(text.find("not rewritten (credentials: the pull carries credentials for docker.io "
                      "and credentialedPulls is upstream)"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("auth=yes"), std::string::npos) << text;
  EXPECT_EQ(text.find("KUBELET-SECRET"), std::string::npos) << text;
  // The same pull without credentials is mirrored.
  Pull(Request("nginx", "default"));
  EXPECT_EQ(fake_.pulls().back().parsed.image().image(), "m1.example/library/nginx:latest");
}

TEST_F(PullServiceTest, AnyAuthFieldCounts) {
  SetConfig(std::string(kConfig) + "credentialedPulls: upstream\n");
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  for (int field = 0; field < 6; ++field) {
    runtime::v1::PullImageRequest req = Request("nginx", "default");
    auto* a = req.mutable_auth();
    switch (field) {
      case 0:
        a->set_username("x");
        break;
      case 1:
        a->set_password("x");
        break;
      case 2:
        a->set_auth("eDp5");
        break;
      case 3:
        a->set_server_address("https://index.docker.io/v1/");
        break;
      case 4:
        a->set_identity_token("x");
        break;
      case 5:
        a->set_registry_token("x");
        break;
    }
    Pull(req);
    ASSERT_FALSE(fake_.pulls().empty());
    EXPECT_TRUE(fake_.pulls().back().raw) << "field " << field;
  }
  // An empty AuthConfig is no credentials.
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  req.mutable_auth();
  Pull(req);
  EXPECT_FALSE(fake_.pulls()[6].raw);
}

TEST_F(PullServiceTest, MirrorCredentialsGoOnlyToTheirMirror) {
  LogCapture log;
  fake_.Fail("q1.example/org/app:v1", RpcStatus(RpcCode::UNKNOWN, "q1 busy"));
  fake_.Serve("q2.example/org/app:v1", kDigest, kId);
  ASSERT_TRUE(Pull(Request("quay.io/org/app:v1", "default")).status.ok());
  const auto pulls = fake_.pulls();
  ASSERT_EQ(pulls.size(), 2u);
  EXPECT_EQ(pulls[0].parsed.auth().username(), "robot");
  EXPECT_EQ(pulls[0].parsed.auth().password(), "TOPSECRET-PASSWORD");
  EXPECT_EQ(pulls[0].parsed.auth().server_address(), "");
  EXPECT_FALSE(pulls[1].parsed.has_auth());
  EXPECT_EQ(credential_paths_, std::vector<std::string>{"/etc/rp/credentials.yaml"});
  const std::string text = log.text();
  EXPECT_EQ(text.find("TOPSECRET"), std::string::npos) << text;
  EXPECT_NE(text.find("q1.example/org/app:v1 (mirror) namespace=default rule=rules[1] "
                      "(test.yaml:7) auth=yes"),
            std::string::npos)
      << text;
}

TEST_F(PullServiceTest, MissingMirrorCredentialsSkipTheMirrorWithAClearError) {
  fake_.Serve("g1.example/org/app:v1", kDigest, kId);
  fake_.Fail("ghcr.io/org/app:v1", RpcStatus(RpcCode::UNKNOWN, "upstream down"));
  InterceptResult r = Pull(Request("ghcr.io/org/app:v1", "default"));
  // Never pulled anonymously from g1; upstream was the last attempt.
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"ghcr.io/org/app:v1"});
  EXPECT_EQ(r.status.error_message(),
            "mirror g1.example: needs credentials; upstream ghcr.io: upstream down");

  // Without fallback, the skip is the last word.
  SetConfig(
      "rules:\n  - match: ghcr.io\n    mirrors: [{host: g1.example, credentials: nope}]\n"
      "    fallback: false\n");
  service_.reset();
  r = Pull(Request("ghcr.io/org/app:v1", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::FAILED_PRECONDITION);
  EXPECT_NE(r.status.error_message().find("node.credentialsFile is not set"), std::string::npos)
      << r.status.error_message();
}

TEST_F(PullServiceTest, DigestPullAliasesOnlyTheDigestName) {
  fake_.Serve("m1.example/library/nginx:1.25", kDigest, kId);
  InterceptResult r = Pull(Request("nginx@" + kDigest, "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m1.example/library/nginx@" + kDigest});
  EXPECT_EQ(fake_.RecordNames(),
            (std::set<std::string>{"docker.io/library/nginx@" + kDigest, kId}));
}

TEST_F(PullServiceTest, TagAndDigestPullDropsTheTagLikeContainerd) {
  fake_.Serve("m1.example/library/nginx:1.25", kDigest, kId);
  InterceptResult r = Pull(Request("nginx:1.25@" + kDigest, "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m1.example/library/nginx@" + kDigest});
  EXPECT_EQ(fake_.RecordNames(),
            (std::set<std::string>{"docker.io/library/nginx@" + kDigest, kId}));
}

TEST_F(PullServiceTest, UnknownFieldsReachContainerd) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  // Fields a newer kubelet may send that this daemon does not declare.
  req.GetReflection()->MutableUnknownFields(&req)->AddLengthDelimited(99, "from-the-future");
  auto* spec = req.mutable_image();
  spec->GetReflection()->MutableUnknownFields(spec)->AddVarint(77, 12345);
  (*spec->mutable_annotations())["k"] = "v";
  std::string bytes = req.SerializeAsString();
  // And one as raw wire bytes: field 100, length-delimited "raw".
  bytes += std::string(
      "\xa2\x06\x03"
      "raw",
      6);

  ASSERT_TRUE(Service().PullImage(CriVersion::kV1, bytes, {}).status.ok());
  const auto pulls = fake_.pulls();
  ASSERT_EQ(pulls.size(), 1u);
  const runtime::v1::PullImageRequest& got = pulls[0].parsed;
  EXPECT_EQ(got.image().image(), "m1.example/library/nginx:latest");
  const auto& unknown = got.GetReflection()->GetUnknownFields(got);
  ASSERT_EQ(unknown.field_count(), 2);
  EXPECT_EQ(unknown.field(0).number(), 99);
  EXPECT_EQ(unknown.field(0).length_delimited(), "from-the-future");
  EXPECT_EQ(unknown.field(1).number(), 100);
  EXPECT_EQ(unknown.field(1).length_delimited(), "raw");
  const auto& spec_unknown = got.image().GetReflection()->GetUnknownFields(got.image());
  ASSERT_EQ(spec_unknown.field_count(), 1);
  EXPECT_EQ(spec_unknown.field(0).number(), 77);
  EXPECT_EQ(spec_unknown.field(0).varint(), 12345u);
  EXPECT_EQ(got.image().annotations().at("k"), "v");
}

TEST_F(PullServiceTest, CancellationStopsFurtherAttempts) {
  Cancellation cancel;
  fake_.on_pull = [&](const FakeContainerd::PullCall&) { cancel.Cancel(); };
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  CallOptions opts;
  opts.cancellation = &cancel;
  InterceptResult r = Pull(Request("nginx", "default"), opts);
  EXPECT_EQ(r.status.error_code(), RpcCode::CANCELLED);
  EXPECT_EQ(fake_.pulls().size(), 1u);

  // Cancelled before it started: containerd is not even asked.
  InterceptResult again = Pull(Request("nginx", "default"), opts);
  EXPECT_EQ(again.status.error_code(), RpcCode::CANCELLED);
  EXPECT_EQ(fake_.pulls().size(), 1u);
}

TEST_F(PullServiceTest, CallOptionsAndVersionReachContainerd) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  CallOptions opts;
  opts.deadline = std::chrono::system_clock::now() + std::chrono::hours(1);
  opts.metadata = {{"x-trace", "abc"}};
  ASSERT_TRUE(Pull(Request("nginx", "default"), opts, CriVersion::kV1alpha2).status.ok());
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_EQ(fake_.pulls()[0].v, CriVersion::kV1alpha2);
  EXPECT_EQ(fake_.pulls()[0].deadline, opts.deadline);
  EXPECT_EQ(fake_.pulls()[0].metadata, opts.metadata);
}

TEST_F(PullServiceTest, GarbageRequestIsForwardedAsItCame) {
  const std::string garbage("\x0a\xff\xff\xff\xff\x0f", 6);  // a length past the end
  InterceptResult r = Service().PullImage(CriVersion::kV1, garbage, {});
  EXPECT_EQ(r.status.error_code(), RpcCode::INTERNAL);  // containerd's answer
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_TRUE(fake_.pulls()[0].raw);
  EXPECT_EQ(fake_.pulls()[0].bytes, garbage);

  // Invalid UTF-8 in a string field: protobuf C++ refuses it, containerd's Go code takes it.
  runtime::v1::PullImageRequest req = Request("nginx", "default");
  req.mutable_auth()->set_password("caf\xe9");
  const std::string latin1 = req.SerializeAsString();
  Service().PullImage(CriVersion::kV1, latin1, {});
  EXPECT_TRUE(fake_.pulls().back().raw);
  EXPECT_EQ(fake_.pulls().back().bytes, latin1);
}

TEST_F(PullServiceTest, RandomBytesNeverCrash) {
  LogCapture quiet;
  std::mt19937 rng(42);
  const std::string seed = Request("nginx:1.25", "default").SerializeAsString();
  for (int i = 0; i < 2000; ++i) {
    std::string b = seed;
    const int flips = 1 + int(rng() % 4);
    for (int k = 0; k < flips; ++k) b[rng() % b.size()] = static_cast<char>(rng());
    if (i % 3 == 0) b.resize(rng() % b.size());
    Service().PullImage(CriVersion::kV1, b, {});
    Service().StatusNeedsRecovery(CriVersion::kV1, b, b);
    Service().RecoverStatus(CriVersion::kV1, b, "", {});
  }
}

TEST_F(PullServiceTest, AliasWaitEndsCleanlyWhenCriNeverSeesIt) {
  LogCapture log;
  fake_.status_never_sees = true;
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  InterceptResult r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(ImageRef(r), kId);
  // 1, 2, 4, ... ms, never past the 2 s budget.
  ASSERT_GE(sleeps_.size(), 5u);
  EXPECT_EQ(sleeps_[0], milliseconds(1));
  EXPECT_EQ(sleeps_[1], milliseconds(2));
  EXPECT_EQ(sleeps_[2], milliseconds(4));
  milliseconds total{0};
  for (auto s : sleeps_) total += s;
  EXPECT_EQ(total, milliseconds(2000));
  EXPECT_NE(log.text().find("did not show it within 2000ms"), std::string::npos) << log.text();
}

TEST_F(PullServiceTest, AliasWaitPollsUntilCriSeesIt) {
  fake_.status_delay_calls = 3;
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  ASSERT_TRUE(Pull(Request("nginx", "default")).status.ok());
  EXPECT_EQ(sleeps_,
            (std::vector<milliseconds>{milliseconds(1), milliseconds(2), milliseconds(4)}));
  EXPECT_EQ(fake_.status_calls.load(), 4);
}

TEST_F(PullServiceTest, AMovedTagIsAnsweredOnlyOnceCriShowsTheNewImage) {
  // The node has an older nginx:latest; the mirror serves a newer one.
  fake_.AddImage("docker.io/library/nginx:latest", kDigest2, kId2);
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  fake_.stale_status_calls = 2;
  InterceptResult r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(ImageRef(r), kId);
  EXPECT_EQ(sleeps_, (std::vector<milliseconds>{milliseconds(1), milliseconds(2)}));
  EXPECT_EQ(fake_.Record("docker.io/library/nginx:latest").target_digest, kDigest);
}

TEST_F(PullServiceTest, AliasFailureStillAnswersWithTheImage) {
  LogCapture log;
  fake_.fail_put = true;
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  InterceptResult r = Pull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(ImageRef(r), kId);
  // The mirror names are all the node has: they stay.
  EXPECT_TRUE(fake_.HasRecord("m1.example/library/nginx:latest"));
  EXPECT_TRUE(fake_.deletes().empty());
  EXPECT_NE(log.text().find("the image is on the node under the mirror name only"),
            std::string::npos);
}

TEST_F(PullServiceTest, ConcurrentPullsOfOneImage) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  Service();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      InterceptResult r = Pull(Request("nginx", "default"));
      if (r.status.ok() && ImageRef(r) == kId) ++ok;
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 8);
  // Pulls that found the image already named answered first and drop the mirror names a
  // moment later.
  const std::set<std::string> upstream_names = {"docker.io/library/nginx:latest",
                                                "docker.io/library/nginx@" + kDigest, kId};
  for (int i = 0; i < 200 && fake_.RecordNames() != upstream_names; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(fake_.RecordNames(), upstream_names);
}

// Two pulls of one image go to containerd together; the first to finish aliases it. The mirror
// names must stay until the second has left containerd: it ends by updating the mirror-named
// record, and a record deleted under it fails that pull (seen with 100 concurrent real pulls).
TEST_F(PullServiceTest, MirrorNamesStayWhileAnotherPullOfThemIsInContainerd) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  Service();
  std::promise<void> first_inside, second_done;
  std::shared_future<void> second_done_f = second_done.get_future().share();
  std::atomic<int> calls{0};
  fake_.on_pull = [&](const FakeContainerd::PullCall&) {
    if (calls++ == 0) {  // the first pull stays in "containerd" until the second has finished
      first_inside.set_value();
      second_done_f.wait();
    }
  };
  InterceptResult first_result;
  std::thread first([&] { first_result = Pull(Request("nginx", "default")); });
  first_inside.get_future().wait();

  InterceptResult second = Pull(Request("nginx", "default"));
  ASSERT_TRUE(second.status.ok()) << second.status.error_message();
  EXPECT_TRUE(fake_.HasRecord("docker.io/library/nginx:latest"));
  EXPECT_TRUE(fake_.HasRecord("m1.example/library/nginx:latest"));  // still needed
  EXPECT_TRUE(fake_.deletes().empty());

  second_done.set_value();
  first.join();
  EXPECT_TRUE(first_result.status.ok()) << first_result.status.error_message();
  // The last pull to leave dropped the mirror names.
  EXPECT_EQ(fake_.RecordNames(),
            (std::set<std::string>{"docker.io/library/nginx:latest",
                                   "docker.io/library/nginx@" + kDigest, kId}));
}

// ---------------------------------------------------------------------------------------------
// ImageStatus recovery

std::string StatusRequest(const std::string& image) {
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image(image);
  return req.SerializeAsString();
}

std::string Miss() { return runtime::v1::ImageStatusResponse().SerializeAsString(); }

TEST_F(PullServiceTest, StatusNeedsRecovery) {
  runtime::v1::ImageStatusResponse hit;
  hit.mutable_image()->set_id(kId);
  auto& s = Service();
  EXPECT_FALSE(
      s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), hit.SerializeAsString()));
  EXPECT_TRUE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  // Namespace filters do not apply: the image store is the node's.
  EXPECT_TRUE(s.StatusNeedsRecovery(CriVersion::kV1alpha2,
                                    StatusRequest("registry.k8s.io/pause:3.9"), Miss()));
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("example.com/x:1"), Miss()));
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest(kId), Miss()));
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("Not A Ref"), Miss()));
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, "\xff\xff", Miss()));
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), "\xff\xff"));
  SetConfig("enabled: false\n");
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
}

// The image index answers the common miss: no mirror copy known, no recovery; unknown (not in
// sync, another namespace), recovery as without an index. It is asked about the copies where a
// recovery would look, in the config's containerd namespace.
TEST_F(PullServiceTest, StatusNeedsRecoveryAsksTheIndexWhenItKnows) {
  struct Index final : ImageNameIndex {
    std::optional<bool> ContainsAny(std::string_view ns,
                                    const std::vector<std::string>& names) const override {
      asked_ns = std::string(ns);
      asked = names;
      return answer;
    }
    std::optional<bool> answer;
    mutable std::string asked_ns;
    mutable std::vector<std::string> asked;
  } index;
  index_ = &index;
  auto& s = Service();
  EXPECT_TRUE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  EXPECT_EQ(index.asked_ns, "k8s.io");
  EXPECT_NE(std::find(index.asked.begin(), index.asked.end(), "m1.example/library/nginx:latest"),
            index.asked.end());
  index.answer = false;
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  index.answer = true;
  EXPECT_TRUE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  // The copies' names are remembered per config snapshot (miss_cache.h): a reload that moves the
  // image to another mirror is asked about at once.
  SetConfig("rules:\n  - match: docker.io\n    mirrors: [m9.example]\n");
  index.asked.clear();
  EXPECT_TRUE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  EXPECT_EQ(index.asked, std::vector<std::string>{"m9.example/library/nginx:latest"});
  SetConfig("rules:\n  - match: quay.io\n    mirrors: [q2.example]\n");
  index.asked.clear();
  EXPECT_FALSE(s.StatusNeedsRecovery(CriVersion::kV1, StatusRequest("nginx"), Miss()));
  EXPECT_TRUE(index.asked.empty());  // no rule rewrites it now: the index is not asked
}

TEST_F(PullServiceTest, RecoverStatusAliasesAMirrorCopy) {
  // A pull from m2 whose aliasing never happened (say the daemon restarted mid-way).
  fake_.AddImage("m2.example/library/nginx:latest", kDigest, kId);
  runtime::v1::ImageStatusRequest req;
  req.mutable_image()->set_image("nginx");
  req.set_verbose(true);
  req.GetReflection()->MutableUnknownFields(&req)->AddVarint(42, 1);
  InterceptResult r = Service().RecoverStatus(CriVersion::kV1, req.SerializeAsString(), Miss(), {});
  ASSERT_TRUE(r.status.ok());
  runtime::v1::ImageStatusResponse resp;
  ASSERT_TRUE(resp.ParseFromString(r.response));
  ASSERT_TRUE(resp.has_image());
  EXPECT_EQ(resp.image().id(), kId);
  EXPECT_EQ(fake_.RecordNames(),
            (std::set<std::string>{"docker.io/library/nginx:latest",
                                   "docker.io/library/nginx@" + kDigest, kId}));
  EXPECT_EQ(fake_.Record("docker.io/library/nginx:latest").labels["io.registry-proxy.source"],
            "m2.example/library/nginx:latest");
}

TEST_F(PullServiceTest, RecoverStatusLooksAtEveryRuleForTheRepository) {
  // team-b's rule sent it to k-b; the decision for "any namespace" names k-a first.
  fake_.AddImage("k-b.example/pause:3.9", kDigest, kId);
  InterceptResult r = Service().RecoverStatus(
      CriVersion::kV1, StatusRequest("registry.k8s.io/pause:3.9"), Miss(), {});
  runtime::v1::ImageStatusResponse resp;
  ASSERT_TRUE(resp.ParseFromString(r.response));
  EXPECT_EQ(resp.image().id(), kId);
  EXPECT_TRUE(fake_.HasRecord("registry.k8s.io/pause:3.9"));
}

TEST_F(PullServiceTest, RecoverStatusWithoutACopyAnswersTheMiss) {
  const std::string miss = Miss();
  InterceptResult r = Service().RecoverStatus(CriVersion::kV1, StatusRequest("nginx"), miss, {});
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.response, miss);
  EXPECT_TRUE(fake_.RecordNames().empty());
}

TEST_F(PullServiceTest, RecoverStatusWhenCriNeverSeesTheAliasAnswersTheMiss) {
  fake_.AddImage("m1.example/library/nginx:latest", kDigest, kId);
  const std::string miss = Miss();
  // CRI sees the mirror copy (the first status call) but never the alias.
  struct HideAfterFirst : CriImageBackend {
    FakeContainerd* inner;
    int calls = 0;
    RpcStatus PullImage(CriVersion v, const runtime::v1::PullImageRequest& q, const CallOptions& o,
                        runtime::v1::PullImageResponse* p) override {
      return inner->PullImage(v, q, o, p);
    }
    RpcStatus PullImageRaw(CriVersion v, const std::string& q, const CallOptions& o,
                           std::string* p) override {
      return inner->PullImageRaw(v, q, o, p);
    }
    RpcStatus ImageStatus(CriVersion v, const runtime::v1::ImageStatusRequest& q,
                          const CallOptions& o, runtime::v1::ImageStatusResponse* p) override {
      if (calls++ == 0) return inner->ImageStatus(v, q, o, p);
      return RpcStatus::OK;
    }
  } cri;
  cri.inner = &fake_;
  PullServiceOptions o;
  o.alias_wait = milliseconds(5);
  PullService service([this] { return config_; }, &cri, &fake_, o);
  InterceptResult r = service.RecoverStatus(CriVersion::kV1, StatusRequest("nginx"), miss, {});
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.response, miss);
  EXPECT_TRUE(fake_.HasRecord("docker.io/library/nginx:latest"));  // aliased all the same
}

// ---------------------------------------------------------------------------------------------
// Failover: mirror health (fake), deadlines, and what the observer is told

// Records every observer call as a line, in order.
class RecordingObserver final : public PullObserver {
 public:
  void OnPull(const PullReport& r) override {
    Add("pull outcome=" + std::string(PullOutcomeName(r.outcome)) + " rule=" + std::string(r.rule) +
        " mirror=" + std::string(r.mirror) + " code=" + std::to_string(static_cast<int>(r.code)) +
        " attempts=" + std::to_string(r.attempts));
  }
  void OnAttempt(std::string_view rule, std::string_view target, RpcCode code,
                 std::chrono::nanoseconds) override {
    Add("attempt rule=" + std::string(rule) + " target=" + std::string(target) +
        " code=" + std::to_string(static_cast<int>(code)));
  }
  void OnMirrorSkipped(std::string_view mirror, SkipReason reason) override {
    Add("skipped " + std::string(mirror) + " " + std::string(SkipReasonName(reason)));
  }
  void OnProbe(std::string_view mirror, bool alive, std::chrono::nanoseconds) override {
    Add("probe " + std::string(mirror) + (alive ? " alive" : " dead"));
  }
  void OnBreaker(std::string_view mirror, bool open) override {
    Add("breaker " + std::string(mirror) + (open ? " open" : " closed"));
  }
  std::vector<std::string> calls() {
    std::lock_guard l(mu_);
    return calls_;
  }

 private:
  void Add(std::string s) {
    std::lock_guard l(mu_);
    calls_.push_back(std::move(s));
  }
  std::mutex mu_;
  std::vector<std::string> calls_;
};

// Answers Check from a script per host and records Check/Report calls.
class FakeHealth final : public MirrorHealth {
 public:
  std::map<std::string, HealthVerdict> verdicts;  // host -> answer (default: try)
  std::vector<std::string> checks, reports;
  std::vector<std::vector<std::string>> laters;  // the `later` list of each Check
  HealthSettings last_settings;
  CallOptions last_opts;
  std::function<void()> during_check;
  int report_answer = 0;

  HealthVerdict Check(const std::string& host, const std::vector<std::string>& later,
                      const HealthSettings& s, const CallOptions& opts) override {
    checks.push_back(host);
    laters.push_back(later);
    last_settings = s;
    last_opts = opts;
    if (during_check) during_check();
    auto it = verdicts.find(host);
    return it == verdicts.end() ? HealthVerdict{} : it->second;
  }
  int Report(const std::string& host, bool ok, bool down, const HealthSettings&) override {
    reports.push_back(host + (ok ? " ok" : down ? " down" : " failed"));
    return report_answer;
  }
};

HealthVerdict DeadProbe() {
  HealthVerdict v;
  v.action = HealthVerdict::Action::kDead;
  v.probed = v.ran_probe = true;
  v.probe = ProbeResult{false, 0, "connect: connection refused"};
  v.target = "https://m1.example/v2/";
  v.breaker_opened = true;
  return v;
}

class FailoverTest : public PullServiceTest {
 protected:
  PullService& Failover() {
    if (!failover_) {
      PullServiceOptions o;
      o.alias_wait = milliseconds(50);
      o.health = &health_;
      o.observer = &observer_;
      failover_ = std::make_unique<PullService>(
          [this] {
            std::lock_guard l(config_mu_);
            return config_;
          },
          &fake_, &fake_, std::move(o));
    }
    return *failover_;
  }
  InterceptResult FPull(const runtime::v1::PullImageRequest& req, CallOptions opts = {}) {
    return Failover().PullImage(CriVersion::kV1, req.SerializeAsString(), opts);
  }
  FakeHealth health_;
  RecordingObserver observer_;
  std::unique_ptr<PullService> failover_;
};

TEST_F(FailoverTest, MirrorServesHealthAskedAndToldObserverSeesOnePull) {
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  InterceptResult r = FPull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(health_.checks, std::vector<std::string>{"m1.example"});
  EXPECT_EQ(health_.reports, std::vector<std::string>{"m1.example ok"});
  // Node settings reach the checker: the defaults here.
  EXPECT_TRUE(health_.last_settings.probe);
  EXPECT_EQ(health_.last_settings.probe_timeout, milliseconds(2000));
  EXPECT_EQ(health_.last_settings.cooldown, milliseconds(30000));
  EXPECT_EQ(health_.last_settings.hosts_dir, "/etc/containerd/certs.d");
  EXPECT_EQ(observer_.calls(),
            (std::vector<std::string>{
                "attempt rule=docker.io/library target=m1.example code=0",
                "pull outcome=mirror rule=docker.io/library mirror=m1.example code=0 attempts=1"}));
}

TEST_F(FailoverTest, DeadMirrorIsSkippedWithoutAnAttemptAndTheNextServes) {
  LogCapture log;
  health_.verdicts["m1.example"] = DeadProbe();
  fake_.Serve("m2.example/library/nginx:latest", kDigest, kId);
  InterceptResult r = FPull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m2.example/library/nginx:latest"});
  EXPECT_EQ(health_.reports, std::vector<std::string>{"m2.example ok"});
  EXPECT_EQ(
      observer_.calls(),
      (std::vector<std::string>{
          "probe m1.example dead", "breaker m1.example open", "skipped m1.example probe_failed",
          "attempt rule=docker.io/library target=m2.example code=0",
          "pull outcome=mirror rule=docker.io/library mirror=m2.example code=0 attempts=1"}));
  const std::string text = log.text();
  EXPECT_NE(text.find("mirror m1.example: probe https://m1.example/v2/ DEAD in 0ms: connect: "
                      "connection refused"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("mirror m1.example: circuit breaker open for 30000ms: probe failed"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("attempt 1/3 m1.example/library/nginx:latest (mirror) namespace=default "
                      "rule=rules[0] (test.yaml:5): skipped: probe https://m1.example/v2/ failed: "
                      "connect: connection refused"),
            std::string::npos)
      << text;
}

TEST_F(FailoverTest, SlowMirrorIsPassedOverForThisPullWithoutBlame) {
  HealthVerdict slow;
  slow.action = HealthVerdict::Action::kSlow;
  slow.target = "https://m1.example/v2/";
  slow.waited = milliseconds(400);
  slow.alive_instead = "m2.example";
  health_.verdicts["m1.example"] = slow;
  fake_.Serve("m2.example/library/nginx:latest", kDigest, kId);
  LogCapture log;
  InterceptResult r = FPull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(fake_.pulled_images(), std::vector<std::string>{"m2.example/library/nginx:latest"});
  // Each Check names the mirrors after it, in order (upstream is not one).
  EXPECT_EQ(health_.checks, (std::vector<std::string>{"m1.example", "m2.example"}));
  EXPECT_EQ(health_.laters, (std::vector<std::vector<std::string>>{{"m2.example"}, {}}));
  EXPECT_EQ(health_.last_settings.hedge_delay, milliseconds(400));  // the default
  // Slow is not down: nothing is reported for m1, its breaker stays as its probe leaves it.
  EXPECT_EQ(health_.reports, std::vector<std::string>{"m2.example ok"});
  EXPECT_EQ(
      observer_.calls(),
      (std::vector<std::string>{
          "skipped m1.example slow", "attempt rule=docker.io/library target=m2.example code=0",
          "pull outcome=mirror rule=docker.io/library mirror=m2.example code=0 attempts=1"}));
  EXPECT_NE(log.text().find("attempt 1/3 m1.example/library/nginx:latest (mirror) "
                            "namespace=default rule=rules[0] (test.yaml:5): skipped: slow: probe "
                            "https://m1.example/v2/ has not answered in 400ms and mirror "
                            "m2.example is alive (for this pull only; the probe goes on)"),
            std::string::npos)
      << log.text();
}

TEST_F(FailoverTest, OpenBreakersFallBackToUpstreamWithoutProbing) {
  HealthVerdict cool;
  cool.action = HealthVerdict::Action::kCooldown;
  cool.cooldown_left = milliseconds(12000);
  health_.verdicts["m1.example"] = cool;
  health_.verdicts["m2.example"] = cool;
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  LogCapture log;
  InterceptResult r = FPull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_TRUE(fake_.pulls()[0].raw);     // the caller's bytes, to upstream
  EXPECT_TRUE(health_.reports.empty());  // upstream has no breaker
  EXPECT_EQ(observer_.calls(),
            (std::vector<std::string>{
                "skipped m1.example cooldown", "skipped m2.example cooldown",
                "attempt rule=docker.io/library target=upstream code=0",
                "pull outcome=fallback rule=docker.io/library mirror= code=0 attempts=1"}));
  EXPECT_NE(log.text().find("skipped: circuit breaker open (12000ms of cooldown left)"),
            std::string::npos)
      << log.text();
}

TEST_F(FailoverTest, OnlyASkippedMirrorAndNoFallbackSaysWhy) {
  SetConfig("rules:\n  - match: quay.io\n    mirrors: [q2.example]\n    fallback: false\n");
  health_.verdicts["q2.example"] = DeadProbe();
  InterceptResult r = FPull(Request("quay.io/a/b:1", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::UNAVAILABLE);
  EXPECT_EQ(r.status.error_message(),
            "registry-proxy: mirror q2.example skipped: probe https://m1.example/v2/ failed: "
            "connect: connection refused");
  EXPECT_TRUE(fake_.pulls().empty());
  EXPECT_EQ(observer_.calls().back(),
            "pull outcome=failed rule=quay.io mirror= code=14 attempts=0");
}

TEST_F(FailoverTest, AttemptErrorsAreReportedDownOnlyWhenTheyMeanTheMirrorIsDown) {
  const std::string refused =
      "failed to pull and unpack image \"m1.example/library/nginx:latest\": failed to resolve "
      "reference: failed to do request: dial tcp 10.0.0.1:443: connect: connection refused";
  fake_.Fail("m1.example/library/nginx:latest", RpcStatus(RpcCode::UNKNOWN, refused));
  // m2 lacks the image (NOT_FOUND); upstream is down too: the last error comes back unchanged.
  fake_.Fail("docker.io/library/nginx:latest",
             RpcStatus(RpcCode::UNKNOWN, "upstream: connection refused"));
  health_.report_answer = 1;
  InterceptResult r = FPull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::UNKNOWN);
  EXPECT_EQ(r.status.error_message(),
            "mirror m1.example: down (connection refused); mirror m2.example: not found; "
            "upstream docker.io: upstream: connection refused");
  EXPECT_EQ(health_.reports, (std::vector<std::string>{"m1.example down", "m2.example failed"}));
  EXPECT_EQ(
      observer_.calls(),
      (std::vector<std::string>{
          "attempt rule=docker.io/library target=m1.example code=2", "breaker m1.example open",
          "attempt rule=docker.io/library target=m2.example code=5",
          "breaker m2.example open",  // (the fake says every report opened it)
          "attempt rule=docker.io/library target=upstream code=2",
          "pull outcome=failed rule=docker.io/library mirror= code=2 attempts=3"}));
}

TEST_F(FailoverTest, AttemptTimeoutBoundsEachAttemptAndTheNextCandidateIsTried) {
  SetConfig(std::string(kConfig) + "  pullAttemptTimeout: 5ms\n");
  fake_.Serve("m2.example/library/nginx:latest", kDigest, kId);
  // m1 hangs until its deadline, as a stalled mirror does.
  fake_.on_pull = [](const FakeContainerd::PullCall& c) {
    if (c.parsed.image().image().rfind("m1.example/", 0) == 0) {
      std::this_thread::sleep_until(c.deadline + milliseconds(1));
    }
  };
  fake_.Fail("m1.example/library/nginx:latest",
             RpcStatus(RpcCode::DEADLINE_EXCEEDED, "Deadline Exceeded"));
  LogCapture log;
  const auto before = std::chrono::system_clock::now();
  InterceptResult r = FPull(Request("nginx", "default"));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const auto pulls = fake_.pulls();
  ASSERT_EQ(pulls.size(), 2u);
  for (const auto& p : pulls) {
    EXPECT_NE(p.deadline, std::chrono::system_clock::time_point::max());
    EXPECT_GE(p.deadline, before + milliseconds(5));
  }
  EXPECT_EQ(health_.reports, (std::vector<std::string>{"m1.example down", "m2.example ok"}));
  EXPECT_NE(log.text().find("DEADLINE_EXCEEDED: Deadline Exceeded (node.pullAttemptTimeout 5ms "
                            "hit)"),
            std::string::npos)
      << log.text();
}

TEST_F(FailoverTest, TheCallersShorterDeadlineWinsAndIsNotTheMirrorsFault) {
  SetConfig(std::string(kConfig) + "  pullAttemptTimeout: 10m\n  pullTimeout: 20m\n");
  const auto caller = std::chrono::system_clock::now() + milliseconds(3);
  fake_.on_pull = [](const FakeContainerd::PullCall& c) {
    std::this_thread::sleep_until(c.deadline + milliseconds(1));
  };
  fake_.Fail("m1.example/library/nginx:latest",
             RpcStatus(RpcCode::DEADLINE_EXCEEDED, "Deadline Exceeded"));
  CallOptions opts;
  opts.deadline = caller;
  InterceptResult r = FPull(Request("nginx", "default"), opts);
  EXPECT_EQ(r.status.error_code(), RpcCode::DEADLINE_EXCEEDED);
  ASSERT_EQ(fake_.pulls().size(), 1u);  // nothing after the caller's deadline
  EXPECT_EQ(fake_.pulls()[0].deadline, caller);
  EXPECT_EQ(health_.reports, std::vector<std::string>{"m1.example failed"});
  EXPECT_EQ(
      observer_.calls(),
      (std::vector<std::string>{
          "attempt rule=docker.io/library target=m1.example code=4", "skipped m2.example no_time",
          "pull outcome=failed rule=docker.io/library mirror= code=4 attempts=1"}));
}

TEST_F(FailoverTest, PullTimeoutBoundsTheWholeCall) {
  SetConfig(std::string(kConfig) + "  pullTimeout: 5ms\n");
  fake_.on_pull = [](const FakeContainerd::PullCall& c) {
    std::this_thread::sleep_until(c.deadline + milliseconds(1));
  };
  fake_.Fail("m1.example/library/nginx:latest",
             RpcStatus(RpcCode::DEADLINE_EXCEEDED, "Deadline Exceeded"));
  const auto before = std::chrono::system_clock::now();
  LogCapture log;
  InterceptResult r = FPull(Request("nginx", "default"));
  EXPECT_EQ(r.status.error_code(), RpcCode::DEADLINE_EXCEEDED);
  ASSERT_EQ(fake_.pulls().size(), 1u);
  EXPECT_LE(fake_.pulls()[0].deadline, before + milliseconds(5) + std::chrono::seconds(60));
  EXPECT_NE(fake_.pulls()[0].deadline, std::chrono::system_clock::time_point::max());
  EXPECT_NE(log.text().find("node.pullTimeout's deadline passed; 2 candidate(s) not tried"),
            std::string::npos)
      << log.text();
  EXPECT_EQ(health_.reports, std::vector<std::string>{"m1.example down"});
}

TEST_F(FailoverTest, CancelledDuringAProbeStopsEverything) {
  Cancellation cancel;
  HealthVerdict v;
  v.action = HealthVerdict::Action::kCancelled;
  health_.verdicts["m1.example"] = v;
  health_.during_check = [&] { cancel.Cancel(); };
  CallOptions opts;
  opts.cancellation = &cancel;
  InterceptResult r = FPull(Request("nginx", "default"), opts);
  EXPECT_EQ(r.status.error_code(), RpcCode::CANCELLED);
  EXPECT_TRUE(fake_.pulls().empty());
  EXPECT_EQ(health_.checks.size(), 1u);
  EXPECT_EQ(health_.last_opts.cancellation, &cancel);
  EXPECT_EQ(observer_.calls(),
            (std::vector<std::string>{
                "pull outcome=cancelled rule=docker.io/library mirror= code=1 attempts=0"}));
}

// The caller's deadline passing while the first mirror is probed: DEADLINE_EXCEEDED, as
// containerd answers a pull whose deadline passed (critest checks the code), not UNAVAILABLE.
TEST_F(FailoverTest, DeadlinePassingWhileProbingIsDeadlineExceeded) {
  CallOptions opts;
  opts.deadline = std::chrono::system_clock::now() + milliseconds(30);
  HealthVerdict late;
  late.action = HealthVerdict::Action::kNoTime;
  health_.verdicts["m1.example"] = late;
  health_.during_check = [&] { std::this_thread::sleep_until(opts.deadline + milliseconds(5)); };
  InterceptResult r = FPull(Request("nginx", "default"), opts);
  EXPECT_EQ(r.status.error_code(), RpcCode::DEADLINE_EXCEEDED);
  EXPECT_NE(r.status.error_message().find("the deadline passed while probing it"),
            std::string::npos)
      << r.status.error_message();
  EXPECT_TRUE(fake_.pulls().empty());
}

TEST_F(FailoverTest, CancelledDuringAnAttemptIsNotTheMirrorsFault) {
  Cancellation cancel;
  fake_.on_pull = [&](const FakeContainerd::PullCall&) { cancel.Cancel(); };
  CallOptions opts;
  opts.cancellation = &cancel;
  InterceptResult r = FPull(Request("nginx", "default"), opts);
  EXPECT_EQ(r.status.error_code(), RpcCode::CANCELLED);
  EXPECT_EQ(fake_.pulls().size(), 1u);
  EXPECT_TRUE(health_.reports.empty());
  EXPECT_EQ(observer_.calls().back(),
            "pull outcome=cancelled rule=docker.io/library mirror= code=1 attempts=1");
}

TEST_F(FailoverTest, PassthroughIsOneAttemptUpstream) {
  fake_.Serve("docker.io/library/nginx:latest", kDigest, kId);
  InterceptResult r = FPull(Request("nginx", "kube-system"));
  ASSERT_TRUE(r.status.ok());
  EXPECT_TRUE(health_.checks.empty());
  EXPECT_EQ(observer_.calls(),
            (std::vector<std::string>{"attempt rule= target=upstream code=0",
                                      "pull outcome=passthrough rule= mirror= code=0 attempts=1"}));
}

TEST_F(FailoverTest, SettingsComeFromTheConfigInForce) {
  SetConfig(std::string(kConfig) +
            "  mirrorProbe: false\n  mirrorProbeTimeout: 500ms\n  mirrorCooldown: 1m\n"
            "  containerdHostsDir: /run/ctrd/certs.d\n");
  fake_.Serve("m1.example/library/nginx:latest", kDigest, kId);
  ASSERT_TRUE(FPull(Request("nginx", "default")).status.ok());
  EXPECT_FALSE(health_.last_settings.probe);
  EXPECT_EQ(health_.last_settings.probe_timeout, milliseconds(500));
  EXPECT_EQ(health_.last_settings.cooldown, milliseconds(60000));
  EXPECT_EQ(health_.last_settings.hosts_dir, "/run/ctrd/certs.d");
}

}  // namespace
}  // namespace registry_proxy
