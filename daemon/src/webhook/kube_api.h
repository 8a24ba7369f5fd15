// The smallest client of the Kubernetes API the webhook needs: one request at a time, JSON in
// and out, from inside a pod (the service account's token and CA, the API server from
// KUBERNETES_SERVICE_HOST and _PORT). Used only to keep the webhook's own certificate
// (webhook_tls.h); never on the admission path.
#pragma once

#include <memory>
#include <string>

#include "base/status.h"

namespace registry_proxy {

struct KubeResponse {
  int status = 0;    // HTTP status; 0 when no answer came (then `error` says why)
  std::string body;  // the answer as it came (JSON: an object or a Status)
  std::string error;

  bool ok() const { return status >= 200 && status < 300; }
  // "HTTP 409: <the Status's message>" or the transport error, for logs.
  std::string Describe() const;
};

class KubeApi {
 public:
  virtual ~KubeApi() = default;
  // METHOD PATH (e.g. "GET", "/api/v1/namespaces/ns/secrets/name"); a body goes with its
  // content type (application/json, application/json-patch+json).
  virtual KubeResponse Call(const std::string& method, const std::string& path,
                            const std::string& body, const std::string& content_type) = 0;
};

// The API server as seen from a pod. `sa_dir` holds token, ca.crt and namespace (normally
// /var/run/secrets/kubernetes.io/serviceaccount). The token is re-read for every request
// (kubelet rotates projected tokens). Fails when the environment or ca.crt is missing.
Result<std::unique_ptr<KubeApi>> InClusterKubeApi(const std::string& sa_dir);

// The pod's namespace: sa_dir/namespace.
Result<std::string> InClusterNamespace(const std::string& sa_dir);

}  // namespace registry_proxy
