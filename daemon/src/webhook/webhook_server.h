// The admission webhook's HTTPS adapter: moves bytes between the API server and Admit()
// (admission.h), which does all the deciding.
//
//   POST /mutate   AdmissionReview in, AdmissionReview out (Content-Type application/json)
//   GET  /healthz  200 while the process serves
//   GET  /readyz   200 once a good config is loaded and until shutdown begins, else 503
//
// TLS 1.2 minimum (OpenSSL, through cpp-httplib's SSLServer). The serving certificate is not
// fixed in the SSL_CTX: a certificate callback hands each new handshake the current pair from
// a CertificateHolder, which re-reads the files when they change. So a rotated certificate
// (cert-manager, a Secret volume's ..data swap, a script) is served from the next handshake on,
// and established connections are never dropped. A bad new pair keeps the old one, loudly.
//
// Hostile input is bounded: bodies over the limit are refused with 413 (the length is checked
// before reading), compressed bodies with 415 (no decompression bombs), every read and write
// has a timeout (slowloris), connections are served by a fixed pool of threads, and plain HTTP
// on the TLS port gets a 400 that says so instead of a silent close.
#pragma once

#include <openssl/ssl.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "base/status.h"
#include "rules/config_store.h"
#include "webhook/admission.h"

namespace registry_proxy {

// The serving certificate and key, swapped atomically when their files change.
//
// Thread safety: every method may be called from any thread. Current() is a short mutex and a
// shared_ptr copy; MaybeReload() costs two stat() calls at most once per check interval (one
// caller does the check, the others return at once).
class CertificateHolder {
 public:
  struct Pair {
    Pair() = default;
    Pair(const Pair&) = delete;
    Pair& operator=(const Pair&) = delete;
    ~Pair();
    X509* cert = nullptr;
    EVP_PKEY* key = nullptr;
    STACK_OF(X509) * chain = nullptr;  // intermediates that followed the leaf in the file
    std::string subject;               // for logs: "CN=registry-proxy-webhook..."
    std::string not_after;             // for logs
  };

  CertificateHolder(std::string cert_file, std::string key_file,
                    std::chrono::milliseconds check_interval);

  // Reads both files now. On success the new pair is in force; on failure the previous pair
  // (if any) stays and the error says why. Logs either way.
  Status Reload();
  // Reloads if either file changed since the last attempt, at most once per check interval.
  // Called on every handshake, so rotation needs no thread and no inotify.
  void MaybeReload();
  // Null until a pair was loaded.
  std::shared_ptr<const Pair> Current() const;
  uint64_t loads() const { return loads_.load(); }
  uint64_t load_failures() const { return load_failures_.load(); }

 private:
  // Which file a path names now, and its version (a rotation replaces the file or rewrites it).
  struct FileId {
    dev_t dev;
    ino_t ino;
    off_t size;
    int64_t mtime_ns;
    bool operator==(const FileId&) const = default;
  };
  static FileId Identify(const std::string& path);

  const std::string cert_file_;
  const std::string key_file_;
  const std::chrono::milliseconds check_interval_;
  std::mutex reload_mu_;                // serialises Reload(); guards last_ids_
  std::pair<FileId, FileId> last_ids_;  // the files as of the last attempt
  std::atomic<int64_t> next_check_ns_{0};
  std::atomic<uint64_t> loads_{0};
  std::atomic<uint64_t> load_failures_{0};
  mutable std::mutex mu_;  // guards current_
  std::shared_ptr<const Pair> current_;
};

struct WebhookServerOptions {
  std::string host;  // "" = every address (IPv6 and IPv4; IPv4 only if IPv6 is off)
  int port = 8443;   // 0 = any free port (tests); see WebhookServer::port()
  std::string cert_file;
  std::string key_file;
  int threads = 32;  // connection workers: a keep-alive connection holds one while it is open
  std::chrono::seconds read_timeout{5};
  std::chrono::seconds write_timeout{5};
  std::chrono::seconds keep_alive_timeout{5};
  size_t keep_alive_max_requests = 1000;  // then the connection is closed (clients rebalance)
  std::chrono::milliseconds cert_check_interval{1000};
  AdmissionLimits limits;
  // Told about every answer to POST /mutate (metrics): HTTP status, whether it carries a patch,
  // time taken. Runs on the connection's worker; must be cheap. May be empty.
  std::function<void(int http_status, bool patched, std::chrono::nanoseconds)> on_review;
};

class WebhookServer {
 public:
  WebhookServer(ConfigStore* store, WebhookServerOptions options);
  ~WebhookServer();  // Stop()s
  WebhookServer(const WebhookServer&) = delete;
  WebhookServer& operator=(const WebhookServer&) = delete;

  // Loads the certificate (fails if it is unusable), binds and starts serving.
  Status Start();
  // The bound port (after Start()).
  int port() const;
  // Re-reads the certificate files now (SIGHUP).
  Status ReloadCertificate();
  // Certificate loads that succeeded / failed so far (the one at Start() included).
  uint64_t certificate_loads() const;
  uint64_t certificate_load_failures() const;
  // /readyz answers 503 from now on, so endpoints drop this replica before it stops.
  void BeginDrain();
  // Stops accepting, lets the workers finish, joins. Idempotent.
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace registry_proxy
