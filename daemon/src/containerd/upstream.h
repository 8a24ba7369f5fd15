// Narrow interfaces to containerd, owned by the code that uses them (the pull service).
// One real implementation each talks to containerd's socket (upstream_grpc.cc); unit tests use
// fakes.
//
// All calls are blocking and run on pull worker threads, never on the relay's
// event-loop thread.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "base/rpc_status.h"
#include "cri/call.h"
#include "k8s.io/cri-api/pkg/apis/runtime/v1/api.pb.h"

namespace registry_proxy {

// containerd's CRI ImageService.
class CriImageBackend {
 public:
  virtual ~CriImageBackend() = default;
  virtual RpcStatus PullImage(CriVersion v, const runtime::v1::PullImageRequest& req,
                              const CallOptions& opts, runtime::v1::PullImageResponse* resp) = 0;
  // The same call with the request and response as bytes, forwarded as they are: for pulls the
  // daemon leaves alone (and requests that do not parse here), so containerd sees exactly what
  // the caller sent and answers exactly as it would without the daemon.
  virtual RpcStatus PullImageRaw(CriVersion v, const std::string& request, const CallOptions& opts,
                                 std::string* response) = 0;
  virtual RpcStatus ImageStatus(CriVersion v, const runtime::v1::ImageStatusRequest& req,
                                const CallOptions& opts,
                                runtime::v1::ImageStatusResponse* resp) = 0;
};

// containerd's Images API (image records: name -> target), in one containerd namespace.
struct ImageRecord {
  std::string name;
  std::map<std::string, std::string> labels;
  std::string target_media_type;
  std::string target_digest;
  int64_t target_size = 0;
};

class ImageRecordStore {
 public:
  virtual ~ImageRecordStore() = default;
  // NOT_FOUND when there is no such record.
  virtual RpcStatus Get(const std::string& name, ImageRecord* out) = 0;
  // Creates the record, or updates target and labels if it exists.
  virtual RpcStatus Put(const ImageRecord& record) = 0;
  // OK when it did not exist.
  virtual RpcStatus Delete(const std::string& name) = 0;
  // The records of those of `names` that exist (in no particular order). The daemon's store
  // asks containerd once; this default asks Get for each.
  virtual RpcStatus GetMany(const std::vector<std::string>& names,
                            std::vector<ImageRecord>* found) {
    found->clear();
    for (const std::string& name : names) {
      ImageRecord r;
      RpcStatus s = Get(name, &r);
      if (s.error_code() == RpcCode::NOT_FOUND) continue;
      if (!s.ok()) return s;
      found->push_back(std::move(r));
    }
    return RpcStatus::OK;
  }
};

}  // namespace registry_proxy
