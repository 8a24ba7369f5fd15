#include "webhook/kube_api.h"

#include <httplib.h>

#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <variant>

#include "base/file_util.h"
#include "base/string_util.h"

namespace registry_proxy {
namespace {

constexpr size_t kMaxSaFile = 64 * 1024;

Result<std::string> ReadSaFile(const std::string& path) {
  auto r = ReadRegularFile(path, kMaxSaFile);
  if (auto* e = std::get_if<FileError>(&r)) return Status::Error(e->Message(path));
  std::string s = std::get<FileContents>(r).data;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

class InCluster final : public KubeApi {
 public:
  InCluster(std::string host, int port, std::string sa_dir)
      : client_(host, port), sa_dir_(std::move(sa_dir)) {
    client_.set_ca_cert_path((sa_dir_ + "/ca.crt").c_str());
    client_.enable_server_certificate_verification(true);
    client_.set_connection_timeout(std::chrono::seconds(5));
    client_.set_read_timeout(std::chrono::seconds(15));
    client_.set_write_timeout(std::chrono::seconds(15));
  }

  KubeResponse Call(const std::string& method, const std::string& path, const std::string& body,
                    const std::string& content_type) override {
    KubeResponse out;
    auto token = ReadSaFile(sa_dir_ + "/token");
    if (!token.ok()) return out.error = token.error(), out;
    std::lock_guard<std::mutex> lock(mu_);
    client_.set_bearer_token_auth(token->c_str());
    httplib::Headers headers{{"Accept", "application/json"}};
    auto send = [&]() -> httplib::Result {
      if (method == "GET") return client_.Get(path.c_str(), headers);
      if (method == "PUT") return client_.Put(path.c_str(), headers, body, content_type.c_str());
      if (method == "PATCH")
        return client_.Patch(path.c_str(), headers, body, content_type.c_str());
      return client_.Post(path.c_str(), headers, body, content_type.c_str());
    };
    if (method != "GET" && method != "PUT" && method != "PATCH" && method != "POST") {
      return out.error = "unsupported method " + method, out;
    }
    httplib::Result r = send();
    if (!r) {
      out.error = StrCat({"no answer from the API server: ", httplib::to_string(r.error())});
      if (r.error() == httplib::Error::SSLServerVerification) {
        out.error += " (its certificate does not verify against ca.crt)";
      }
      return out;
    }
    out.status = r->status;
    out.body = r->body;
    return out;
  }

 private:
  std::mutex mu_;  // httplib's client keeps one connection; one request at a time
  httplib::SSLClient client_;
  const std::string sa_dir_;
};

}  // namespace

std::string KubeResponse::Describe() const {
  if (status == 0) return error;
  std::string message;
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (j.is_object() && j.contains("message") && j["message"].is_string()) {
    message = j["message"].get<std::string>();
  } else {
    message = body.substr(0, 200);
  }
  return StrCat({"HTTP ", std::to_string(status), ": ", message});
}

Result<std::unique_ptr<KubeApi>> InClusterKubeApi(const std::string& sa_dir) {
  const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
  const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
  if (!host || !*host || !port || !*port) {
    return Status::Error(
        "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (not in a pod?)");
  }
  char* end = nullptr;
  const long p = std::strtol(port, &end, 10);
  if (*end != '\0' || p < 1 || p > 65535) {
    return Status::Error(StrCat({"KUBERNETES_SERVICE_PORT is not a port: '", port, "'"}));
  }
  if (auto ca = ReadSaFile(sa_dir + "/ca.crt"); !ca.ok()) return ca.status();
  std::string h = host;
  if (h.size() > 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  return std::unique_ptr<KubeApi>(std::make_unique<InCluster>(h, static_cast<int>(p), sa_dir));
}

Result<std::string> InClusterNamespace(const std::string& sa_dir) {
  auto ns = ReadSaFile(sa_dir + "/namespace");
  if (!ns.ok()) return ns.status();
  if (ns->empty()) return Status::Error(sa_dir + "/namespace is empty");
  return ns;
}

}  // namespace registry_proxy
