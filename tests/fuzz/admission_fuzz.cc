// libFuzzer target for the admission handler (Admit), the webhook's whole request handling
// after the bytes arrive.
//
// Each input is tried twice: as the raw request body, and as the pod object inside a valid
// AdmissionReview envelope (so mutations explore pod shapes, not just JSON syntax). Beyond "no
// crash, no hang, no exception", it checks what the API server relies on:
//  - the status is 200 (an AdmissionReview) or a 4xx with a one-line printable message; never
//    500 (that would be a bug caught by the handler's last-resort catch),
//  - a 200 answer echoes the uid, always allows, and its patch (base64 JSON Patch) applies to
//    the request's object and changes nothing but metadata.annotations,
//  - answering is deterministic.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "rules/config.h"
#include "webhook/admission.h"

namespace {

using json = nlohmann::json;
using registry_proxy::AdmissionOutcome;
using registry_proxy::Admit;
using registry_proxy::BuiltinConfig;

[[noreturn]] void Violation(const char* what, const std::string& detail) {
  std::fprintf(stderr, "admission_fuzz: %s: %s\n", what, detail.substr(0, 2000).c_str());
  std::abort();
}

std::string Base64Decode(const std::string& in) {
  std::string out;
  int bits = 0;
  uint32_t acc = 0;
  for (char c : in) {
    int v = c >= 'A' && c <= 'Z'   ? c - 'A'
            : c >= 'a' && c <= 'z' ? c - 'a' + 26
            : c >= '0' && c <= '9' ? c - '0' + 52
            : c == '+'             ? 62
            : c == '/'             ? 63
            : c == '='             ? -2
                                   : -1;
    if (v == -2) break;
    if (v < 0) Violation("bad base64", in);
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xff);
    }
  }
  return out;
}

json WithoutAnnotations(json pod) {
  // A null metadata may become a map holding only annotations: the same pod.
  if (pod.is_object() && pod.contains("metadata") && pod["metadata"].is_null()) {
    pod.erase("metadata");
  }
  if (pod.is_object() && pod.contains("metadata") && pod["metadata"].is_object()) {
    pod["metadata"].erase("annotations");
    if (pod["metadata"].empty()) pod.erase("metadata");
  }
  return pod;
}

void Check(std::string_view body) {
  const AdmissionOutcome o = Admit(body, *BuiltinConfig());
  if (o.http_status == 500) Violation("internal error", o.body);
  if (o.http_status != 200) {
    if (o.http_status < 400 || o.http_status > 499)
      Violation("status", std::to_string(o.http_status));
    if (o.body.empty() || o.body.back() != '\n' || o.body.find('\n') != o.body.size() - 1)
      Violation("message not one line", o.body);
    for (char c : o.message)
      if (c < 0x20 || c >= 0x7f) Violation("unprintable message", o.message);
    return;
  }
  // 200: the input was a JSON AdmissionReview with a request and a uid.
  const json request = json::parse(body);
  const json answer = json::parse(o.body);
  const json& response = answer.at("response");
  if (response.at("uid") != request.at("request").at("uid")) Violation("uid", o.body);
  if (response.at("allowed") != true) Violation("not allowed", o.body);
  if (response.contains("patch")) {
    if (response.at("patchType") != "JSONPatch") Violation("patchType", o.body);
    const json patch = json::parse(Base64Decode(response.at("patch").get<std::string>()));
    const json& object = request.at("request").at("object");
    json patched;
    try {
      patched = object.patch(patch);
    } catch (const json::exception& e) {
      Violation("patch does not apply", std::string(e.what()) + " patch=" + patch.dump());
    }
    if (WithoutAnnotations(patched) != WithoutAnnotations(object))
      Violation("patch changed more than annotations", patch.dump());
  }
  if (Admit(body, *BuiltinConfig()).body != o.body) Violation("nondeterministic", o.body);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    Check(input);
    // The input as the pod: the envelope is what the API server always sends.
    std::string review =
        R"({"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u",)"
        R"("kind":{"group":"","version":"v1","kind":"Pod"},"namespace":"default",)"
        R"("operation":"CREATE","object":)";
    review.append(input);
    review += "}}";
    Check(review);
  } catch (const json::exception& e) {
    // Only the checks above parse with exceptions, and only what Admit accepted.
    Violation("checker could not read an accepted answer", e.what());
  }
  return 0;
}
