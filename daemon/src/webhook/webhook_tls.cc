#include "webhook/webhook_tls.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <variant>

#include "base/file_util.h"
#include "base/string_util.h"

namespace registry_proxy {
namespace {

using Json = nlohmann::json;

// OpenSSL objects with their free functions.
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, PkeyFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;

std::vector<X509Ptr> ParseCerts(const std::string& pem) {
  std::vector<X509Ptr> out;
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  while (X509* x = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) out.emplace_back(x);
  return out;
}

PkeyPtr ParseKey(const std::string& pem) {
  BioPtr bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return PkeyPtr(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
}

std::string CertPem(X509* x) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_X509(bio.get(), x);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::string KeyPem(EVP_PKEY* k) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), k, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// Seconds from `now` until the certificate's notAfter (negative once expired).
int64_t SecondsLeft(X509* x, SystemTime now) {
  const time_t t = std::chrono::system_clock::to_time_t(now);
  ASN1_TIME* at = ASN1_TIME_set(nullptr, t);
  int days = 0, secs = 0;
  ASN1_TIME_diff(&days, &secs, at, X509_get0_notAfter(x));
  ASN1_TIME_free(at);
  return int64_t{days} * 86400 + secs;
}

bool NotYetValid(X509* x, SystemTime now) {
  const time_t t = std::chrono::system_clock::to_time_t(now);
  return X509_cmp_time(X509_get0_notBefore(x), const_cast<time_t*>(&t)) > 0;
}

std::string Subject(X509* x) {
  char buf[256];
  X509_NAME_oneline(X509_get_subject_name(x), buf, sizeof buf);
  return buf;
}

std::set<std::string> DnsNames(X509* x) {
  std::set<std::string> out;
  auto* names =
      static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(x, NID_subject_alt_name, nullptr, nullptr));
  if (!names) return out;
  for (int i = 0; i < sk_GENERAL_NAME_num(names); ++i) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    if (n->type != GEN_DNS) continue;
    const auto* s = n->d.dNSName;
    out.emplace(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), ASN1_STRING_length(s));
  }
  GENERAL_NAMES_free(names);
  return out;
}

std::string Days(int64_t secs) { return std::to_string(secs / 86400) + " days"; }

PkeyPtr NewKey() { return PkeyPtr(EVP_EC_gen("P-256")); }

bool AddExt(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (!ext) return false;
  const bool ok = X509_add_ext(cert, ext, -1) == 1;
  X509_EXTENSION_free(ext);
  return ok;
}

// A certificate for `key` named `cn`, issued by (issuer, issuer_key), or self-signed when
// issuer is null. Valid from an hour before `now` (clocks in a cluster disagree a little).
Result<X509Ptr> MakeCert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                         std::chrono::hours validity, SystemTime now, bool is_ca,
                         const std::vector<std::string>& dns_names) {
  X509Ptr x(X509_new());
  X509_set_version(x.get(), 2);
  unsigned char serial[16];
  RAND_bytes(serial, sizeof serial);
  serial[0] &= 0x7f;  // positive
  BIGNUM* bn = BN_bin2bn(serial, sizeof serial, nullptr);
  BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x.get()));
  BN_free(bn);
  const time_t t = std::chrono::system_clock::to_time_t(now);
  ASN1_TIME_set(X509_getm_notBefore(x.get()), t - 3600);
  ASN1_TIME_set(X509_getm_notAfter(x.get()),
                t + std::chrono::duration_cast<std::chrono::seconds>(validity).count());
  X509_NAME* name = X509_get_subject_name(x.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(x.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509_set_pubkey(x.get(), key);
  X509* iss = issuer ? issuer : x.get();
  bool ok = AddExt(x.get(), iss, NID_subject_key_identifier, "hash") &&
            AddExt(x.get(), iss, NID_authority_key_identifier, "keyid:always");
  if (is_ca) {
    ok = ok && AddExt(x.get(), iss, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") &&
         AddExt(x.get(), iss, NID_key_usage, "critical,keyCertSign,cRLSign");
  } else {
    std::string san;
    for (const auto& d : dns_names) san += (san.empty() ? "DNS:" : ",DNS:") + d;
    ok = ok && AddExt(x.get(), iss, NID_basic_constraints, "critical,CA:FALSE") &&
         AddExt(x.get(), iss, NID_key_usage, "critical,digitalSignature") &&
         AddExt(x.get(), iss, NID_ext_key_usage, "serverAuth") &&
         (san.empty() || AddExt(x.get(), iss, NID_subject_alt_name, san.c_str()));
  }
  if (!ok) return Status::Error("cannot add the certificate's extensions");
  if (X509_sign(x.get(), issuer_key ? issuer_key : key, EVP_sha256()) <= 0) {
    return Status::Error("cannot sign the certificate");
  }
  return x;
}

// Why the CA part (first certificate of the bundle and ca.key) cannot issue, or "".
std::string CaProblem(const TlsMaterial& m, const TlsPolicy& p, SystemTime now) {
  auto cas = ParseCerts(m.ca_bundle);
  if (cas.empty()) return "no CA certificate";
  PkeyPtr key = ParseKey(m.ca_key);
  if (!key) return "no CA key";
  if (X509_check_private_key(cas[0].get(), key.get()) != 1) return "the CA key does not match";
  if (X509_check_ca(cas[0].get()) == 0) return "the CA certificate is not a CA";
  const int64_t left = SecondsLeft(cas[0].get(), now);
  if (left <= std::chrono::duration_cast<std::chrono::seconds>(p.ca_renew_before).count()) {
    return "the CA expires in " + Days(left);
  }
  return "";
}

}  // namespace

std::optional<std::string> WhyRenew(const TlsMaterial& m, const TlsPolicy& p, SystemTime now) {
  if (m.cert.empty() && m.key.empty() && m.ca_bundle.empty()) return "no certificate yet";
  if (std::string ca = CaProblem(m, p, now); !ca.empty()) return ca;
  auto certs = ParseCerts(m.cert);
  if (certs.empty()) return "no serving certificate";
  X509* cert = certs[0].get();
  PkeyPtr key = ParseKey(m.key);
  if (!key || X509_check_private_key(cert, key.get()) != 1) {
    return "the serving key is missing or does not match";
  }
  auto cas = ParseCerts(m.ca_bundle);
  EVP_PKEY* ca_pub = X509_get0_pubkey(cas[0].get());
  if (!ca_pub || X509_verify(cert, ca_pub) != 1) {
    return "the serving certificate is not signed by the current CA";
  }
  if (NotYetValid(cert, now)) return "the serving certificate is not valid yet";
  const int64_t left = SecondsLeft(cert, now);
  if (left <= std::chrono::duration_cast<std::chrono::seconds>(p.cert_renew_before).count()) {
    return "the serving certificate expires in " + Days(left);
  }
  const std::set<std::string> want(p.dns_names.begin(), p.dns_names.end());
  if (DnsNames(cert) != want) return "the serving certificate names other DNS names";
  return std::nullopt;
}

Result<TlsMaterial> RenewTls(const TlsMaterial& old, const TlsPolicy& p, SystemTime now) {
  if (p.dns_names.empty()) return Status::Error("no DNS names for the serving certificate");
  TlsMaterial out;
  X509Ptr ca;
  PkeyPtr ca_key;
  if (CaProblem(old, p, now).empty()) {
    auto cas = ParseCerts(old.ca_bundle);
    ca = std::move(cas[0]);
    ca_key = ParseKey(old.ca_key);
    out.ca_key = old.ca_key;
  } else {
    ca_key = NewKey();
    if (!ca_key) return Status::Error("cannot make a key");
    auto made = MakeCert(ca_key.get(), "registry-proxy-webhook-ca", nullptr, nullptr, p.ca_validity,
                         now, true, {});
    if (!made.ok()) return made.status();
    ca = std::move(made).value();
    out.ca_key = KeyPem(ca_key.get());
  }
  // The bundle: the CA in force, then every other CA of the old bundle that is still valid
  // (the API server must trust replicas that still serve a certificate from it).
  out.ca_bundle = CertPem(ca.get());
  for (auto& c : ParseCerts(old.ca_bundle)) {
    if (X509_cmp(c.get(), ca.get()) != 0 && SecondsLeft(c.get(), now) > 0) {
      out.ca_bundle += CertPem(c.get());
    }
  }
  PkeyPtr key = NewKey();
  if (!key) return Status::Error("cannot make a key");
  auto cert = MakeCert(key.get(), p.dns_names[0], ca.get(), ca_key.get(), p.cert_validity, now,
                       false, p.dns_names);
  if (!cert.ok()) return cert.status();
  out.cert = CertPem(cert->get());
  out.key = KeyPem(key.get());
  return out;
}

std::vector<std::string> BundleSubjects(const std::string& pem_bundle) {
  std::vector<std::string> out;
  for (auto& c : ParseCerts(pem_bundle)) out.push_back(Subject(c.get()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// TlsProvisioner

namespace {

constexpr char kCaCrt[] = "ca.crt";
constexpr char kCaKey[] = "ca.key";
constexpr char kTlsCrt[] = "tls.crt";
constexpr char kTlsKey[] = "tls.key";

std::string DataField(const Json& secret, const char* key) {
  const Json* data = secret.contains("data") ? &secret["data"] : nullptr;
  if (!data || !data->is_object() || !data->contains(key) || !(*data)[key].is_string()) return "";
  std::string decoded;
  return Base64Decode((*data)[key].get<std::string>(), &decoded) ? decoded : "";
}

// Writes `content` to `path` through a temporary file and rename(2): a reader sees the old
// file or the new one, never half of one.
Status WriteAtomically(const std::string& path, const std::string& content, mode_t mode) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Status::Error(StrCat({"cannot write ", tmp, ": ", strerror(errno)}));
  size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::write(fd, content.data() + done, content.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return Status::Error(StrCat({"cannot write ", tmp, ": ", strerror(e)}));
    }
    done += static_cast<size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    return Status::Error(StrCat({"cannot rename ", tmp, " to ", path, ": ", strerror(e)}));
  }
  return Status::Ok();
}

std::string ReadSmall(const std::string& path) {
  auto r = ReadRegularFile(path, 1 << 20);
  if (auto* c = std::get_if<FileContents>(&r)) return c->data;
  return "";
}

}  // namespace

TlsProvisioner::TlsProvisioner(KubeApi* api, TlsProvisionerOptions options)
    : api_(api), options_(std::move(options)) {}

Result<TlsSyncResult> TlsProvisioner::Sync(SystemTime now) {
  TlsSyncResult result;
  auto material = EnsureSecret(now, &result);
  if (!material.ok()) return material.status();
  if (Status s = WriteFiles(*material, &result); !s.ok()) return s;
  if (!options_.webhook_config.empty()) {
    if (Status s = EnsureCaBundle(material->ca_bundle, &result); !s.ok()) return s;
  }
  return result;
}

Result<TlsMaterial> TlsProvisioner::EnsureSecret(SystemTime now, TlsSyncResult* result) {
  const std::string path =
      StrCat({"/api/v1/namespaces/", options_.ns, "/secrets/", options_.secret});
  const std::string where = StrCat({"Secret ", options_.ns, "/", options_.secret});
  // Two tries: when another replica wrote first (409), its material is read and used.
  for (int attempt = 0; attempt < 2; ++attempt) {
    KubeResponse got = api_->Call("GET", path, "", "");
    if (!got.ok()) {
      std::string hint;
      if (got.status == 404) hint = " (the manifests create it empty: kubectl apply -k daemonset/)";
      if (got.status == 403) hint = " (the webhook's Role must allow get and update on it)";
      return Status::Error(StrCat({"cannot read ", where, ": ", got.Describe(), hint}));
    }
    Json secret = Json::parse(got.body, nullptr, false);
    if (!secret.is_object()) return Status::Error(where + ": the answer is not a JSON object");
    TlsMaterial have{DataField(secret, kCaCrt), DataField(secret, kCaKey),
                     DataField(secret, kTlsCrt), DataField(secret, kTlsKey)};
    auto why = WhyRenew(have, options_.policy, now);
    if (!why) return have;
    auto fresh = RenewTls(have, options_.policy, now);
    if (!fresh.ok()) return fresh.status();
    // PUT with the resourceVersion we read: the API server refuses it (409) if anyone wrote in
    // between. Other keys and the metadata are kept as they were.
    if (!secret.contains("data") || !secret["data"].is_object()) secret["data"] = Json::object();
    secret["data"][kCaCrt] = Base64Encode(fresh->ca_bundle);
    secret["data"][kCaKey] = Base64Encode(fresh->ca_key);
    secret["data"][kTlsCrt] = Base64Encode(fresh->cert);
    secret["data"][kTlsKey] = Base64Encode(fresh->key);
    KubeResponse put = api_->Call("PUT", path, secret.dump(), "application/json");
    if (put.status == 409) {
      spdlog::info("{}: another replica renewed it first; using theirs", where);
      continue;
    }
    if (!put.ok()) return Status::Error(StrCat({"cannot write ", where, ": ", put.Describe()}));
    spdlog::info("{}: new serving certificate for {} ({})", where, options_.policy.dns_names[0],
                 *why);
    result->renewed = true;
    result->renew_reason = *why;
    return fresh;
  }
  return Status::Error(where + ": changed twice while renewing it; trying again later");
}

Status TlsProvisioner::WriteFiles(const TlsMaterial& m, TlsSyncResult* result) {
  // The chain the server sends: the serving certificate alone (the CA is in caBundle).
  if (ReadSmall(options_.cert_file) == m.cert && ReadSmall(options_.key_file) == m.key) {
    return Status::Ok();
  }
  // Key first: the server reloads when either file changes and refuses a mismatched pair,
  // so a handshake in between keeps the old pair and the next check takes the new one.
  if (Status s = WriteAtomically(options_.key_file, m.key, 0600); !s.ok()) return s;
  if (Status s = WriteAtomically(options_.cert_file, m.cert, 0644); !s.ok()) return s;
  result->files_written = true;
  return Status::Ok();
}

Status TlsProvisioner::EnsureCaBundle(const std::string& ca_bundle, TlsSyncResult* result) {
  const std::string path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/" +
                           options_.webhook_config;
  const std::string where = "MutatingWebhookConfiguration " + options_.webhook_config;
  KubeResponse got = api_->Call("GET", path, "", "");
  if (!got.ok()) return Status::Error(StrCat({"cannot read ", where, ": ", got.Describe()}));
  Json mwc = Json::parse(got.body, nullptr, false);
  if (!mwc.is_object()) return Status::Error(where + ": the answer is not a JSON object");
  const std::string want = Base64Encode(ca_bundle);
  // A JSON patch that first tests the resourceVersion it was computed from, so a concurrent
  // change (a re-apply, another replica) fails it instead of being overwritten by index.
  Json patch = Json::array();
  patch.push_back({{"op", "test"},
                   {"path", "/metadata/resourceVersion"},
                   {"value", mwc["metadata"].value("resourceVersion", "")}});
  const Json& hooks = mwc.contains("webhooks") ? mwc["webhooks"] : Json::array();
  int ours = 0;
  for (size_t i = 0; hooks.is_array() && i < hooks.size(); ++i) {
    const Json& cc = hooks[i].value("clientConfig", Json::object());
    const Json& svc = cc.value("service", Json::object());
    if (svc.value("name", "") != options_.service || svc.value("namespace", "") != options_.ns) {
      continue;
    }
    ++ours;
    if (cc.value("caBundle", "") == want) continue;
    patch.push_back({{"op", "add"},
                     {"path", "/webhooks/" + std::to_string(i) + "/clientConfig/caBundle"},
                     {"value", want}});
  }
  if (ours == 0) {
    spdlog::warn("{} has no webhook that calls Service {}/{}: no caBundle set", where, options_.ns,
                 options_.service);
  }
  if (patch.size() == 1) return Status::Ok();
  KubeResponse put = api_->Call("PATCH", path, patch.dump(), "application/json-patch+json");
  if (!put.ok())
    return Status::Error(StrCat({"cannot set the caBundle of ", where, ": ", put.Describe()}));
  result->ca_bundles_patched = static_cast<int>(patch.size()) - 1;
  spdlog::info("{}: caBundle set on {} webhook(s)", where, result->ca_bundles_patched);
  return Status::Ok();
}

}  // namespace registry_proxy
