#include "webhook/admission.h"

#include <algorithm>
#include <exception>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rules/policy.h"

namespace registry_proxy {
namespace {

using json = nlohmann::json;

constexpr char kReviewApiVersion[] = "admission.k8s.io/v1";
constexpr char kReviewKind[] = "AdmissionReview";
// Containers of every kind, in the order a reader of the pod meets them.
constexpr const char* kContainerFields[] = {"initContainers", "containers", "ephemeralContainers"};

// Messages can quote input (parser errors do): keep them one printable ASCII line of bounded
// size, safe in a text/plain body, a log line and a Kubernetes warning.
std::string Printable(std::string_view s, size_t max = 300) {
  std::string out;
  out.reserve(std::min(s.size(), max));
  for (char c : s) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  return out;
}

AdmissionOutcome Refuse(int status, std::string message) {
  AdmissionOutcome o;
  o.http_status = status;
  o.content_type = "text/plain; charset=utf-8";
  o.message = Printable(message);
  o.body = o.message + "\n";
  return o;
}

const json* Member(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

std::string StringMember(const json& obj, const char* key) {
  const json* v = Member(obj, key);
  return v && v->is_string() ? v->get<std::string>() : std::string();
}

std::string Dump(const json& j) {
  // Inputs were validated UTF-8 by the parser; `replace` only guards against a future bug
  // turning into an exception.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// Builds the allowing AdmissionReview answer.
class Answer {
 public:
  explicit Answer(std::string uid) : uid_(std::move(uid)) {}
  void Warn(std::string w) { warnings_.push_back(Printable(w, 250)); }
  void SetPatch(const json& ops) { patch_ = Dump(ops); }

  AdmissionOutcome Finish(std::string pod, std::string summary) const {
    json response = {{"uid", uid_}, {"allowed", true}};
    if (!patch_.empty()) {
      response["patchType"] = "JSONPatch";
      response["patch"] = Base64Encode(patch_);
    }
    if (!warnings_.empty()) response["warnings"] = warnings_;
    json review = {
        {"apiVersion", kReviewApiVersion}, {"kind", kReviewKind}, {"response", response}};
    AdmissionOutcome o;
    o.http_status = 200;
    o.content_type = "application/json";
    o.body = Dump(review);
    o.uid = uid_;
    o.pod = std::move(pod);
    o.patched = !patch_.empty();
    o.message = warnings_.empty() ? std::move(summary) : warnings_.front();
    return o;
  }

 private:
  std::string uid_;
  std::vector<std::string> warnings_;
  std::string patch_;
};

std::string PodName(const json& object, const std::string& ns) {
  const json* meta = Member(object, "metadata");
  std::string name = meta ? StringMember(*meta, "name") : "";
  if (name.empty() && meta) {
    name = StringMember(*meta, "generateName");
    if (!name.empty()) name += "*";
  }
  return (ns.empty() ? "" : ns + "/") + (name.empty() ? "(unnamed)" : name);
}

AdmissionOutcome AdmitParsed(const json& review, const Config& config) {
  if (!review.is_object()) return Refuse(400, "request body is not a JSON object");
  const std::string api_version = StringMember(review, "apiVersion");
  const std::string kind = StringMember(review, "kind");
  if (api_version != kReviewApiVersion || kind != kReviewKind) {
    return Refuse(400, "expected apiVersion " + std::string(kReviewApiVersion) + " kind " +
                           kReviewKind + ", got apiVersion '" + api_version + "' kind '" + kind +
                           "' (set admissionReviewVersions: [v1])");
  }
  const json* request = Member(review, "request");
  if (!request || !request->is_object()) {
    return Refuse(400, "AdmissionReview has no request object");
  }
  std::string uid = StringMember(*request, "uid");
  if (uid.empty()) return Refuse(400, "AdmissionReview request has no uid");

  // From here on the API server can read our answer: every outcome allows.
  Answer answer(uid);
  const json* req_kind = Member(*request, "kind");
  const std::string group = req_kind ? StringMember(*req_kind, "group") : "";
  const std::string obj_kind = req_kind ? StringMember(*req_kind, "kind") : "";
  std::string ns = StringMember(*request, "namespace");
  if (!group.empty() || obj_kind != "Pod") {
    // Only a misconfigured webhook rule sends these: say so where someone will see it.
    answer.Warn("registry-proxy: not a Pod (" + (group.empty() ? "" : group + "/") + obj_kind +
                "): nothing to annotate; check the webhook's rules");
    return answer.Finish(ns, "not a pod");
  }
  const std::string operation = StringMember(*request, "operation");
  if (operation != "CREATE" && operation != "UPDATE") return answer.Finish(ns, "not a write");
  const json* object = Member(*request, "object");
  if (!object || !object->is_object()) {
    answer.Warn("registry-proxy: the request carries no pod object; nothing annotated");
    return answer.Finish(ns, "no object");
  }
  const json* meta = Member(*object, "metadata");
  if (ns.empty() && meta) ns = StringMember(*meta, "namespace");
  std::string pod = PodName(*object, ns);

  // The pull context the node will have: the pod's namespace and labels.
  std::map<std::string, std::string> labels;
  if (const json* l = meta ? Member(*meta, "labels") : nullptr; l && l->is_object()) {
    for (const auto& [k, v] : l->items()) {
      if (v.is_string()) labels.emplace(k, v.get<std::string>());
    }
  }
  PullContext ctx;
  if (!ns.empty()) ctx.namespace_name = ns;
  ctx.pod_labels = &labels;

  json images = json::object();
  bool rewritten = false;
  bool skipped = false;
  const json* spec = Member(*object, "spec");
  // kubelet sends a pull the pod's pull secrets (the ServiceAccount's are in spec by now) that
  // match the image's registry; which ones match needs the Secrets, which we do not read: a
  // pod with any is taken as pulling with credentials (it matters for credentialedPulls:
  // upstream only).
  if (const json* secrets = spec ? Member(*spec, "imagePullSecrets") : nullptr) {
    ctx.with_credentials = secrets->is_array() && !secrets->empty();
  }
  for (const char* field : kContainerFields) {
    const json* list = spec ? Member(*spec, field) : nullptr;
    if (!list || list->is_null()) continue;
    if (!list->is_array()) {
      answer.Warn(std::string("registry-proxy: spec.") + field + " is not a list; ignored");
      continue;
    }
    for (const json& c : *list) {
      const std::string name = StringMember(c, "name");
      const std::string image = StringMember(c, "image");
      if (name.empty() || image.empty()) {
        skipped = true;
        continue;
      }
      const Decision d = config.policy->Decide(image, ctx);
      rewritten |= d.rewritten();
      images[name] = d.candidates.front().image;
    }
  }
  if (skipped) answer.Warn("registry-proxy: containers without a name or an image were skipped");

  // The patch touches metadata.annotations only.
  if (meta && !meta->is_null() && !meta->is_object()) {
    answer.Warn("registry-proxy: metadata is not a map; nothing annotated");
    return answer.Finish(pod, "bad metadata");
  }
  const json* annotations = meta ? Member(*meta, "annotations") : nullptr;
  if (annotations && !annotations->is_null() && !annotations->is_object()) {
    answer.Warn("registry-proxy: metadata.annotations is not a map; nothing annotated");
    return answer.Finish(pod, "bad annotations");
  }
  const bool has_annotations = annotations && annotations->is_object();
  json ops = json::array();
  if (rewritten) {
    const std::map<std::string, std::string> want = {
        {kImagesAnnotation, Dump(images)},
        {kConfigAnnotation, "sha256:" + config.content_sha256.substr(0, 12)}};
    if (!has_annotations) {
      // "add" on /metadata/annotations/x fails when the map is absent: add the whole map.
      json value(want);
      if (meta && meta->is_object()) {
        ops.push_back({{"op", "add"}, {"path", "/metadata/annotations"}, {"value", value}});
      } else {
        ops.push_back({{"op", "add"}, {"path", "/metadata"}, {"value", {{"annotations", value}}}});
      }
    } else {
      for (const auto& [key, value] : want) {
        const json* have = Member(*annotations, key.c_str());
        if (have && have->is_string() && have->get<std::string>() == value) continue;
        // "add" replaces an existing member (RFC 6902 4.1): right on reinvocation too.
        ops.push_back({{"op", "add"},
                       {"path", "/metadata/annotations/" + EscapeJsonPointer(key)},
                       {"value", value}});
      }
    }
  } else if (has_annotations) {
    // Nothing is rewritten: annotations of ours (copied from another pod, or images changed
    // by a later webhook) would now lie.
    for (const char* key : {kImagesAnnotation, kConfigAnnotation}) {
      if (Member(*annotations, key)) {
        ops.push_back(
            {{"op", "remove"}, {"path", "/metadata/annotations/" + EscapeJsonPointer(key)}});
      }
    }
  }
  if (!ops.empty()) answer.SetPatch(ops);
  return answer.Finish(pod, rewritten
                                ? "annotated " + std::to_string(images.size()) + " container(s)"
                                : "no image rewritten");
}

}  // namespace

int JsonDepth(std::string_view text, int limit) {
  int depth = 0;
  int max = 0;
  bool in_string = false;
  bool escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > max) {
          max = depth;
          if (max > limit) return limit + 1;
        }
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default:
        break;
    }
  }
  return max;
}

std::string EscapeJsonPointer(std::string_view token) {
  std::string out;
  out.reserve(token.size() + 2);
  for (char c : token) {
    if (c == '~') {
      out += "~0";
    } else if (c == '/') {
      out += "~1";
    } else {
      out += c;
    }
  }
  return out;
}

AdmissionOutcome Admit(std::string_view body, const Config& config, const AdmissionLimits& limits) {
  if (body.size() > limits.max_body_bytes) {
    return Refuse(413, "request body of " + std::to_string(body.size()) +
                           " bytes exceeds the limit of " + std::to_string(limits.max_body_bytes) +
                           " bytes");
  }
  if (body.empty()) return Refuse(400, "empty request body: expected an AdmissionReview");
  if (JsonDepth(body, limits.max_depth) > limits.max_depth) {
    return Refuse(400, "JSON nested deeper than " + std::to_string(limits.max_depth) + " levels");
  }
  try {
    json review;
    try {
      review = json::parse(body);
    } catch (const json::exception& e) {
      // parse_error, and out_of_range for numbers beyond a double ("1E99999").
      return Refuse(400, std::string("request body is not JSON: ") + e.what());
    }
    return AdmitParsed(review, config);
  } catch (const std::exception& e) {
    // A bug (or memory exhaustion), not the caller's fault; still never an exception out.
    return Refuse(500, std::string("internal error: ") + e.what());
  }
}

}  // namespace registry_proxy
