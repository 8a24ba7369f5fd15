#include "cri/cri_methods.h"

#include <cstdint>
#include <string>
#include <unordered_map>

namespace registry_proxy {
namespace {

struct Hash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>()(s); }
};

using MethodMap = std::unordered_map<std::string, MethodInfo, Hash, std::equal_to<>>;

// CRI methods with one request and one response, in runtime.v1 and runtime.v1alpha2.
// A method missing here (a future one, or a streaming one such as GetContainerEvents) is
// pumped as a stream, which is correct for every shape, just a little slower.
const MethodMap& Methods() {
  static const auto* kMethods = [] {
    auto* m = new MethodMap();
    const char* runtime_unary[] = {"Version",
                                   "RunPodSandbox",
                                   "StopPodSandbox",
                                   "RemovePodSandbox",
                                   "PodSandboxStatus",
                                   "ListPodSandbox",
                                   "CreateContainer",
                                   "StartContainer",
                                   "StopContainer",
                                   "RemoveContainer",
                                   "ListContainers",
                                   "ContainerStatus",
                                   "UpdateContainerResources",
                                   "ReopenContainerLog",
                                   "ExecSync",
                                   "Exec",
                                   "Attach",
                                   "PortForward",
                                   "ContainerStats",
                                   "ListContainerStats",
                                   "PodSandboxStats",
                                   "ListPodSandboxStats",
                                   "UpdateRuntimeConfig",
                                   "Status",
                                   "CheckpointContainer",
                                   "ListMetricDescriptors",
                                   "ListPodSandboxMetrics",
                                   "RuntimeConfig",
                                   "UpdatePodSandboxResources"};
    const char* image_unary[] = {"ListImages", "RemoveImage", "ImageFsInfo"};
    for (auto [pkg, version] : {std::pair{"runtime.v1", CriVersion::kV1},
                                std::pair{"runtime.v1alpha2", CriVersion::kV1alpha2}}) {
      std::string runtime = std::string("/") + pkg + ".RuntimeService/";
      std::string image = std::string("/") + pkg + ".ImageService/";
      for (const char* name : runtime_unary) (*m)[runtime + name] = {CallKind::kUnary, version};
      for (const char* name : image_unary) (*m)[image + name] = {CallKind::kUnary, version};
      (*m)[image + "PullImage"] = {CallKind::kPull, version};
      (*m)[image + "ImageStatus"] = {CallKind::kStatus, version};
    }
    return m;
  }();
  return *kMethods;
}

}  // namespace

MethodInfo ClassifyMethod(std::string_view path, bool intercept) {
  auto it = Methods().find(path);
  if (it == Methods().end()) return {CallKind::kStream, CriVersion::kV1};
  MethodInfo info = it->second;
  if (!intercept && (info.kind == CallKind::kPull || info.kind == CallKind::kStatus)) {
    info.kind = CallKind::kUnary;
  }
  return info;
}

bool ForwardableMetadata(std::string_view k) {
  if (k.empty() || k[0] == ':') return false;
  if (k.substr(0, 5) == "grpc-") return false;
  return k != "content-type" && k != "te" && k != "user-agent" && k != "host";
}

int HasLengthDelimitedField1(std::string_view message) {
  auto p = reinterpret_cast<const uint8_t*>(message.data());
  const uint8_t* end = p + message.size();
  auto varint = [&](uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64 && p < end; shift += 7) {
      uint8_t b = *p++;
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return false;
  };
  while (p < end) {
    uint64_t key, v;
    if (!varint(&key) || (key >> 3) == 0) return -1;
    switch (key & 7) {
      case 0:  // varint
        if (!varint(&v)) return -1;
        break;
      case 1:  // fixed64
        if (end - p < 8) return -1;
        p += 8;
        break;
      case 2:  // length-delimited
        if (!varint(&v) || v > static_cast<uint64_t>(end - p)) return -1;
        if ((key >> 3) == 1) return 1;
        p += v;
        break;
      case 5:  // fixed32
        if (end - p < 4) return -1;
        p += 4;
        break;
      default:  // groups (unused by the CRI) and invalid wire types
        return -1;
    }
  }
  return 0;
}

}  // namespace registry_proxy
