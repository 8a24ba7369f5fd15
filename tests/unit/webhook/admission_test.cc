// The admission handler, pure: AdmissionReview bodies as the API server sends them
// (tests/data/admission/, written from the Kubernetes API reference), answers checked by
// applying the returned JSON Patch with nlohmann's RFC 6902 implementation.
#include "webhook/admission.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "rules/config.h"

namespace registry_proxy {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

const std::string kDataDir = std::string(RP_SOURCE_DIR) + "/tests/data/admission/";

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_TRUE(in.good() || in.eof()) << path;
  return ss.str();
}

json Review(const std::string& name) { return json::parse(ReadFile(kDataDir + name)); }

std::string Base64Decode(const std::string& in) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  int bits = 0;
  uint32_t acc = 0;
  for (char c : in) {
    if (c == '=') break;
    int v = val(c);
    if (v < 0) ADD_FAILURE() << "bad base64 character " << c;
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xff);
    }
  }
  return out;
}

std::shared_ptr<const Config> Cfg(const std::string& yaml) {
  ConfigLoad load = ParseConfig(yaml, "test.yaml");
  EXPECT_TRUE(load.ok()) << load.ErrorText();
  return load.config;
}

// The answer, checked for what every 200 answer must be.
struct Answered {
  AdmissionOutcome outcome;
  json review;    // the whole answer
  json response;  // review["response"]
  json patch;     // decoded JSON Patch, or null
};

Answered Answer(const json& request, const Config& config = *BuiltinConfig()) {
  Answered a;
  a.outcome = Admit(request.dump(), config);
  EXPECT_EQ(a.outcome.http_status, 200) << a.outcome.body;
  EXPECT_EQ(a.outcome.content_type, "application/json");
  a.review = json::parse(a.outcome.body);
  EXPECT_EQ(a.review["apiVersion"], "admission.k8s.io/v1");
  EXPECT_EQ(a.review["kind"], "AdmissionReview");
  a.response = a.review["response"];
  EXPECT_EQ(a.response["uid"], request["request"]["uid"]);
  EXPECT_EQ(a.response["allowed"], true);
  EXPECT_FALSE(a.response.contains("status")) << "never a refusal";
  if (a.response.contains("patch")) {
    EXPECT_EQ(a.response["patchType"], "JSONPatch");
    a.patch = json::parse(Base64Decode(a.response["patch"].get<std::string>()));
    EXPECT_TRUE(a.patch.is_array());
    EXPECT_TRUE(a.outcome.patched);
  } else {
    EXPECT_FALSE(a.response.contains("patchType"));
    EXPECT_FALSE(a.outcome.patched);
  }
  return a;
}

// The pod after the API server applied our patch.
json Patched(const json& request, const Answered& a) {
  json pod = request["request"]["object"];
  if (a.patch.is_null()) return pod;
  json out = pod.patch(a.patch);
  // The webhook never changes anything but metadata.annotations.
  json before = pod, after = out;
  if (before.contains("metadata")) before["metadata"].erase("annotations");
  if (after.contains("metadata")) after["metadata"].erase("annotations");
  if (before.contains("metadata") && before["metadata"].empty()) before.erase("metadata");
  if (after.contains("metadata") && after["metadata"].empty()) after.erase("metadata");
  EXPECT_EQ(before, after) << "patch touched more than annotations: " << a.patch.dump();
  return out;
}

json ImagesOf(const json& pod) {
  return json::parse(pod["metadata"]["annotations"][kImagesAnnotation].get<std::string>());
}

std::string ConfigAnnotation(const Config& c = *BuiltinConfig()) {
  return "sha256:" + c.content_sha256.substr(0, 12);
}

TEST(Admission, PodWithoutAnnotationsGetsTheWholeMap) {
  json req = Review("pod_create_no_annotations.json");
  Answered a = Answer(req);
  ASSERT_TRUE(a.outcome.patched) << a.outcome.body;
  ASSERT_EQ(a.patch.size(), 1u);
  EXPECT_EQ(a.patch[0]["op"], "add");
  EXPECT_EQ(a.patch[0]["path"], "/metadata/annotations");
  EXPECT_FALSE(a.response.contains("warnings"));
  json pod = Patched(req, a);
  EXPECT_EQ(ImagesOf(pod), json::parse(R"({
    "wait-for-db": "docker.ketches.cn/library/busybox:1.36",
    "web": "docker.ketches.cn/library/nginx:1.25",
    "exporter": "quay.ketches.cn/prometheus/node-exporter:v1.6.1"})"));
  EXPECT_EQ(pod["metadata"]["annotations"][kConfigAnnotation], ConfigAnnotation());
  EXPECT_EQ(pod["metadata"]["annotations"].size(), 2u);
  EXPECT_EQ(a.outcome.uid, "0df28fbd-5f5f-11e8-9a4e-42010a800002");
  EXPECT_EQ(a.outcome.pod, "shop/web-7d4b9c8f6d-*");
}

// What the node does with a pull that carries credentials is what the annotation says: the
// mirrors (credentialedPulls: mirror, the default) or upstream (credentialedPulls: upstream),
// for a pod with pull secrets.
TEST(Admission, PodWithPullSecretsIsAnnotatedAsCredentialedPullsSays) {
  json req = Review("pod_create_no_annotations.json");
  req["request"]["object"]["spec"]["imagePullSecrets"] = json::parse(R"([{"name": "hub"}])");
  json mirrored = ImagesOf(Patched(req, Answer(req)));
  EXPECT_EQ(mirrored["web"], "docker.ketches.cn/library/nginx:1.25");
  auto upstream = Cfg("credentialedPulls: upstream\nproxies:\n  docker.io: hub.example\n");
  Answered a = Answer(req, *upstream);
  EXPECT_FALSE(a.outcome.patched) << "nothing rewritten, nothing to annotate";
  req["request"]["object"]["spec"].erase("imagePullSecrets");
  json without = ImagesOf(Patched(req, Answer(req, *upstream)));
  EXPECT_EQ(without["web"], "hub.example/library/nginx:1.25");
}

TEST(Admission, PodWithAnnotationsKeepsThemAndDigestsSurvive) {
  json req = Review("pod_create_with_annotations.json");
  Answered a = Answer(req);
  ASSERT_TRUE(a.outcome.patched);
  for (const json& op : a.patch) {
    EXPECT_EQ(op["op"], "add");
    EXPECT_THAT(op["path"].get<std::string>(),
                HasSubstr("/metadata/annotations/registry-proxy.io~1"));
  }
  json pod = Patched(req, a);
  const json& ann = pod["metadata"]["annotations"];
  EXPECT_EQ(ann["kubectl.kubernetes.io/restartedAt"], "2024-05-14T09:00:00Z");
  EXPECT_EQ(ann["prometheus.io/scrape"], "true");
  EXPECT_EQ(ann["prometheus.io/port"], "9121");
  EXPECT_EQ(ann.size(), 5u);
  EXPECT_EQ(ImagesOf(pod), json::parse(R"({
    "redis": "docker.ketches.cn/library/redis@sha256:e422889e156ebea83856b6ff973bfe0c86bce867d80def228044eeecf925592b",
    "metrics": "registry.corp.example/platform/redis-exporter:1.58",
    "pause": "k8s.ketches.cn/pause@sha256:7031c1b283388d2c2e09b57badb803c05ebed362dc88d84b480cc47f72a21097"})"))
      << "every container listed; an untouched one shows its own image";
}

TEST(Admission, ExcludedNamespaceGetsNoPatch) {
  Answered a = Answer(Review("pod_create_kube_system.json"));
  EXPECT_FALSE(a.outcome.patched);
  EXPECT_FALSE(a.response.contains("warnings"));
  EXPECT_EQ(a.outcome.message, "no image rewritten");
}

TEST(Admission, ImagesNoRuleTouchesGetNoPatchDryRunToo) {
  Answered a = Answer(Review("pod_create_private_only.json"));
  EXPECT_FALSE(a.outcome.patched);
}

TEST(Admission, EphemeralContainerUpdateAddsItAndRefreshesConfig) {
  json req = Review("pod_update_ephemeral.json");
  Answered a = Answer(req);
  ASSERT_TRUE(a.outcome.patched);
  EXPECT_EQ(a.patch.size(), 2u) << a.patch.dump();  // both annotations exist but are stale
  json pod = Patched(req, a);
  EXPECT_EQ(ImagesOf(pod), json::parse(R"({
    "web": "docker.ketches.cn/library/nginx:1.25",
    "debugger-8xk2p": "docker.ketches.cn/library/busybox:1.36"})"));
  EXPECT_EQ(pod["metadata"]["annotations"][kConfigAnnotation], ConfigAnnotation());
}

TEST(Admission, ReinvocationOfAnAnnotatedPodIsANoOp) {
  for (const char* file : {"pod_create_no_annotations.json", "pod_create_with_annotations.json",
                           "pod_update_ephemeral.json"}) {
    json req = Review(file);
    json pod = Patched(req, Answer(req));
    req["request"]["object"] = pod;
    Answered again = Answer(req);
    EXPECT_FALSE(again.outcome.patched) << file << ": " << again.patch.dump();
  }
}

TEST(Admission, ImagesChangedOnReinvocationReplaceTheAnnotation) {
  json req = Review("pod_create_no_annotations.json");
  json pod = Patched(req, Answer(req));
  pod["spec"]["containers"][0]["image"] = "ghcr.io/example/web:2";  // another webhook did this
  req["request"]["object"] = pod;
  Answered a = Answer(req);
  ASSERT_EQ(a.patch.size(), 1u) << a.patch.dump();
  EXPECT_EQ(ImagesOf(Patched(req, a))["web"], "ghcr.ketches.cn/example/web:2");
}

TEST(Admission, StaleAnnotationsAreRemovedWhenNothingIsRewritten) {
  json req = Review("pod_create_with_annotations.json");
  json pod = Patched(req, Answer(req));
  req["request"]["object"] = pod;
  req["request"]["namespace"] = "kube-system";  // copied into an excluded namespace
  Answered a = Answer(req);
  ASSERT_EQ(a.patch.size(), 2u) << a.patch.dump();
  for (const json& op : a.patch) EXPECT_EQ(op["op"], "remove");
  json after = Patched(req, a);
  EXPECT_FALSE(after["metadata"]["annotations"].contains(kImagesAnnotation));
  EXPECT_FALSE(after["metadata"]["annotations"].contains(kConfigAnnotation));
  EXPECT_EQ(after["metadata"]["annotations"].size(), 3u);
}

TEST(Admission, NamespaceComesFromTheRequest) {
  json req = Review("pod_create_no_annotations.json");
  req["request"]["object"]["metadata"].erase("namespace");
  EXPECT_TRUE(Answer(req).outcome.patched);
  req["request"]["namespace"] = "kube-public";
  EXPECT_FALSE(Answer(req).outcome.patched);
}

TEST(Admission, PodSelectorUsesThePodsLabels) {
  auto cfg = Cfg("proxies: {docker.io: m.example}\npodSelector: {mirror: \"yes\"}\n");
  json req = Review("pod_create_no_annotations.json");
  EXPECT_FALSE(Answer(req, *cfg).outcome.patched);
  req["request"]["object"]["metadata"]["labels"]["mirror"] = "yes";
  Answered a = Answer(req, *cfg);
  ASSERT_TRUE(a.outcome.patched);
  EXPECT_EQ(ImagesOf(Patched(req, a))["web"], "m.example/library/nginx:1.25");
  EXPECT_EQ(Patched(req, a)["metadata"]["annotations"][kConfigAnnotation], ConfigAnnotation(*cfg));
}

TEST(Admission, PerNamespaceRulesAndDisabledConfig) {
  auto cfg =
      Cfg("rules:\n"
          "  - match: docker.io\n"
          "    mirrors: [team.example]\n"
          "    includeNamespaces: [team-*]\n"
          "  - match: docker.io\n"
          "    mirrors: [other.example]\n");
  json req = Review("pod_create_with_annotations.json");  // team-a
  EXPECT_EQ(ImagesOf(Patched(req, Answer(req, *cfg)))["redis"],
            "team.example/library/redis@sha256:"
            "e422889e156ebea83856b6ff973bfe0c86bce867d80def228044eeecf925592b");
  req["request"]["namespace"] = "shop";
  EXPECT_THAT(ImagesOf(Patched(req, Answer(req, *cfg)))["redis"].get<std::string>(),
              HasSubstr("other.example/"));
  auto off = Cfg("enabled: false\nproxies: {docker.io: m.example}\n");
  EXPECT_FALSE(Answer(req, *off).outcome.patched);
  Config passthrough{Policy::Passthrough(), {}, "<none>", ""};
  EXPECT_FALSE(Answer(req, passthrough).outcome.patched);
}

TEST(Admission, NonPodIsAllowedWithAWarning) {
  Answered a = Answer(Review("deployment_create.json"));
  EXPECT_FALSE(a.outcome.patched);
  ASSERT_TRUE(a.response.contains("warnings"));
  EXPECT_THAT(a.response["warnings"][0].get<std::string>(), HasSubstr("apps/Deployment"));
}

TEST(Admission, DeleteAndConnectAreAllowedUntouched) {
  json req = Review("pod_create_no_annotations.json");
  for (const char* op : {"DELETE", "CONNECT"}) {
    req["request"]["operation"] = op;
    Answered a = Answer(req);
    EXPECT_FALSE(a.outcome.patched);
    EXPECT_FALSE(a.response.contains("warnings"));
  }
}

TEST(Admission, MalformedPodsAreAllowedWithWarnings) {
  json req = Review("pod_create_no_annotations.json");
  json r = req;
  r["request"].erase("object");
  EXPECT_THAT(Answer(r).response["warnings"][0].get<std::string>(), HasSubstr("no pod object"));

  r = req;
  r["request"]["object"]["spec"]["containers"] = "nginx";
  Answered a = Answer(r);
  EXPECT_THAT(a.response["warnings"][0].get<std::string>(), HasSubstr("spec.containers"));
  EXPECT_TRUE(a.outcome.patched) << "the init container is still annotated";

  r = req;
  r["request"]["object"]["spec"]["containers"][0].erase("image");
  r["request"]["object"]["spec"]["containers"][1]["name"] = 7;
  a = Answer(r);
  EXPECT_THAT(a.response["warnings"][0].get<std::string>(), HasSubstr("skipped"));
  EXPECT_EQ(ImagesOf(Patched(r, a)).size(), 1u);

  r = req;
  r["request"]["object"]["metadata"]["annotations"] = json::array();
  a = Answer(r);
  EXPECT_FALSE(a.outcome.patched);
  EXPECT_THAT(a.response["warnings"][0].get<std::string>(), HasSubstr("not a map"));

  r = req;
  r["request"]["object"]["metadata"]["annotations"] = nullptr;
  a = Answer(r);
  ASSERT_EQ(a.patch.size(), 1u);
  EXPECT_EQ(a.patch[0]["path"], "/metadata/annotations");
  EXPECT_EQ(ImagesOf(Patched(r, a)).size(), 3u);

  r = req;
  r["request"]["object"]["metadata"] = "pod";
  a = Answer(r);
  EXPECT_FALSE(a.outcome.patched);
  EXPECT_THAT(a.response["warnings"][0].get<std::string>(), HasSubstr("metadata is not a map"));

  r = req;
  r["request"]["object"].erase("metadata");
  a = Answer(r);
  ASSERT_EQ(a.patch.size(), 1u);
  EXPECT_EQ(a.patch[0]["path"], "/metadata");
  EXPECT_EQ(ImagesOf(Patched(r, a)).size(), 3u);
}

TEST(Admission, KeysWithSlashesAndTildesAreEscaped) {
  EXPECT_EQ(EscapeJsonPointer("registry-proxy.io/images"), "registry-proxy.io~1images");
  EXPECT_EQ(EscapeJsonPointer("a~/b"), "a~0~1b");
  EXPECT_EQ(EscapeJsonPointer(""), "");
}

TEST(Admission, Base64) {
  EXPECT_EQ(Base64Encode(""), "");
  EXPECT_EQ(Base64Encode("f"), "Zg==");
  EXPECT_EQ(Base64Encode("fo"), "Zm8=");
  EXPECT_EQ(Base64Encode("foo"), "Zm9v");
  EXPECT_EQ(Base64Encode("foob"), "Zm9vYg==");
  EXPECT_EQ(Base64Encode("foobar"), "Zm9vYmFy");
  EXPECT_EQ(Base64Encode(std::string("\xff\xfe\x00", 3)), "//4A");
}

TEST(Admission, JsonDepth) {
  EXPECT_EQ(JsonDepth("", 64), 0);
  EXPECT_EQ(JsonDepth("1", 64), 0);
  EXPECT_EQ(JsonDepth(R"({"a":[1,{"b":[]}]})", 64), 4);
  EXPECT_EQ(JsonDepth(R"({"a":"[[[[{{{{\"[[["})", 64), 1) << "brackets in strings don't count";
  EXPECT_EQ(JsonDepth(std::string(100, '['), 64), 65) << "stops past the limit";
  EXPECT_EQ(JsonDepth("]]]}}}[", 64), 1);
}

// Bad input: a clear 4xx with a one-line message, never an exception.
struct Bad {
  std::string body;
  int status;
  std::string message;
};

TEST(Admission, BadInputIsRefusedClearly) {
  json good = Review("pod_create_no_annotations.json");
  json no_request = good;
  no_request.erase("request");
  json no_uid = good;
  no_uid["request"].erase("uid");
  json null_request = good;
  null_request["request"] = nullptr;
  json v1beta1 = good;
  v1beta1["apiVersion"] = "admission.k8s.io/v1beta1";
  json wrong_kind = good;
  wrong_kind["kind"] = "TokenReview";
  std::string deep = std::string(65, '[') + std::string(65, ']');
  std::string big(AdmissionLimits{}.max_body_bytes + 1, ' ');
  const Bad cases[] = {
      {"", 400, "empty request body"},
      {"not json", 400, "not JSON"},
      {"{\"kind\":", 400, "not JSON"},
      {"\xff\xfe{}", 400, "not JSON"},
      {good.dump() + "garbage", 400, "not JSON"},
      {"[]", 400, "not a JSON object"},
      {"{\"a\":1E999999}", 400, "number overflow"},
      {"\"AdmissionReview\"", 400, "not a JSON object"},
      {"{}", 400, "expected apiVersion admission.k8s.io/v1"},
      {v1beta1.dump(), 400, "admission.k8s.io/v1beta1"},
      {wrong_kind.dump(), 400, "TokenReview"},
      {no_request.dump(), 400, "no request"},
      {null_request.dump(), 400, "no request"},
      {no_uid.dump(), 400, "no uid"},
      {deep, 400, "nested deeper than 64"},
      {big, 413, "exceeds the limit"},
  };
  for (const Bad& c : cases) {
    AdmissionOutcome o = Admit(c.body, *BuiltinConfig());
    EXPECT_EQ(o.http_status, c.status) << c.body.substr(0, 80);
    EXPECT_THAT(o.message, HasSubstr(c.message)) << c.body.substr(0, 80);
    EXPECT_EQ(o.body, o.message + "\n");
    EXPECT_EQ(o.body.find('\n'), o.body.size() - 1) << "one line";
    for (char ch : o.message) EXPECT_TRUE(ch >= 0x20 && ch < 0x7f) << o.message;
    EXPECT_THAT(o.content_type, HasSubstr("text/plain"));
  }
}

TEST(Admission, DeepButLegalNestingInsideThePodIsFine) {
  json req = Review("pod_create_no_annotations.json");
  json nested = "leaf";
  for (int i = 0; i < 40; ++i) nested = json::array({nested});
  req["request"]["object"]["metadata"]["managedFields"][0]["fieldsV1"]["f:x"] = nested;
  EXPECT_TRUE(Answer(req).outcome.patched);
  for (int i = 0; i < 30; ++i) nested = json::array({nested});
  req["request"]["object"]["metadata"]["managedFields"][0]["fieldsV1"]["f:x"] = nested;
  EXPECT_EQ(Admit(req.dump(), *BuiltinConfig()).http_status, 400);
}

TEST(Admission, AnswerIsCompactAndSmall) {
  AdmissionOutcome o =
      Admit(ReadFile(kDataDir + "pod_create_no_annotations.json"), *BuiltinConfig());
  EXPECT_LT(o.body.size(), 1024u);
  EXPECT_EQ(o.body.find('\n'), std::string::npos);
}

}  // namespace
}  // namespace registry_proxy
