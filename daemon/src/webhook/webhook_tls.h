// The webhook's own certificates (`registry-proxy webhook --tls-secret`): a CA and a serving
// certificate it makes for itself, so `kubectl apply -k daemonset/` needs no cert-manager and
// no manual step (README.md "Webhook", "Install on a cluster").
//
// Two parts:
//  - pure functions over PEM material: is it still good for these DNS names at this time, and
//    the renewal (a new serving certificate; a new CA only when the old one nears its end, and
//    the old CA stays in the bundle until it expires, so the API server never sees a
//    certificate it cannot verify);
//  - TlsProvisioner, which keeps that material in one Secret (so every replica serves a
//    certificate from the same CA), writes the pair this replica serves to files (the
//    server's CertificateHolder follows them), and keeps the CA bundle in the caBundle of the
//    MutatingWebhookConfiguration entries that point at our Service.
//
// Concurrency between replicas is the API server's: every write carries the resourceVersion
// it was based on, and a replica that loses the race takes the winner's material.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "base/status.h"
#include "webhook/kube_api.h"

namespace registry_proxy {

using SystemTime = std::chrono::system_clock::time_point;

// PEM, as kept in the Secret under ca.crt, ca.key, tls.crt, tls.key.
struct TlsMaterial {
  std::string ca_bundle;  // the current CA first, then older CAs that have not expired
  std::string ca_key;     // the current CA's key
  std::string cert;       // the serving certificate
  std::string key;        // its key
  bool operator==(const TlsMaterial&) const = default;
};

struct TlsPolicy {
  std::vector<std::string> dns_names;  // the serving certificate's subjectAltNames
  std::chrono::hours ca_validity{24 * 365 * 10};
  std::chrono::hours ca_renew_before{24 * 365};
  std::chrono::hours cert_validity{24 * 365};
  std::chrono::hours cert_renew_before{24 * 90};
};

// Why `m` must be renewed at `now` ("no serving certificate", "the serving certificate
// expires in 20 days", "the DNS names differ", ...), or nullopt if it serves as it is.
std::optional<std::string> WhyRenew(const TlsMaterial& m, const TlsPolicy& policy, SystemTime now);

// New material from `old` (which may be empty or broken): old's CA is kept when it is sound
// and has more than ca_renew_before left; otherwise a new CA is made and old's CAs that are
// still valid stay in the bundle after it. The serving certificate is always new.
Result<TlsMaterial> RenewTls(const TlsMaterial& old, const TlsPolicy& policy, SystemTime now);

// The subject of each certificate in a PEM bundle, in order ("CN=..."; logs and tests).
std::vector<std::string> BundleSubjects(const std::string& pem_bundle);

struct TlsProvisionerOptions {
  std::string ns;              // the Secret's namespace (the pod's)
  std::string secret;          // e.g. registry-proxy-webhook-tls
  std::string webhook_config;  // MutatingWebhookConfiguration name; "" = do not touch one
  std::string service;         // the Service the webhook entries name (caBundle is set there)
  std::string cert_file;       // where this replica's serving pair is written
  std::string key_file;
  std::string service_account_dir;  // the API client's token, ca.crt (webhook_cmd.cc)
  TlsPolicy policy;
};

// What one Sync() did, for logs and tests.
struct TlsSyncResult {
  bool renewed = false;        // this replica wrote new material to the Secret
  bool files_written = false;  // the serving pair on disk changed
  int ca_bundles_patched = 0;  // webhook entries whose caBundle was set
  std::string renew_reason;    // why, when renewed
};

class TlsProvisioner {
 public:
  TlsProvisioner(KubeApi* api, TlsProvisionerOptions options);

  // One round: read the Secret; renew and store when needed (a lost race re-reads and takes
  // the winner's); write the serving pair to the files if it differs from what is there; set
  // the caBundle of our entries in the webhook configuration if it differs. Safe to repeat.
  Result<TlsSyncResult> Sync(SystemTime now);

 private:
  Result<TlsMaterial> EnsureSecret(SystemTime now, TlsSyncResult* result);
  Status WriteFiles(const TlsMaterial& m, TlsSyncResult* result);
  Status EnsureCaBundle(const std::string& ca_bundle, TlsSyncResult* result);

  KubeApi* api_;
  const TlsProvisionerOptions options_;
};

}  // namespace registry_proxy
