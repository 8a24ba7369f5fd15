// The webhook's own certificates: the pure renewal rules, and TlsProvisioner against a fake of
// our KubeApi interface that keeps a Secret and a MutatingWebhookConfiguration with the API
// server's optimistic concurrency (resourceVersion; 409 on a stale PUT, JSON patch with test).
#include "webhook/webhook_tls.h"

#include <gtest/gtest.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/string_util.h"

namespace registry_proxy {
namespace {

using Json = nlohmann::json;
using std::chrono::hours;

const SystemTime kNow = std::chrono::system_clock::from_time_t(1796000000);  // 2026-11

TlsPolicy Policy() {
  TlsPolicy p;
  p.dns_names = {"registry-proxy-webhook.rp.svc", "registry-proxy-webhook.rp.svc.cluster.local",
                 "registry-proxy-webhook.rp", "registry-proxy-webhook"};
  return p;
}

// Verifies `cert` against the CAs of `bundle` at `when` for `host`, as the API server does.
bool Verifies(const std::string& bundle, const std::string& cert, const std::string& host,
              SystemTime when) {
  X509_STORE* store = X509_STORE_new();
  BIO* b = BIO_new_mem_buf(bundle.data(), static_cast<int>(bundle.size()));
  while (X509* ca = PEM_read_bio_X509(b, nullptr, nullptr, nullptr)) {
    X509_STORE_add_cert(store, ca);
    X509_free(ca);
  }
  BIO_free(b);
  b = BIO_new_mem_buf(cert.data(), static_cast<int>(cert.size()));
  X509* leaf = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  X509_STORE_CTX* ctx = X509_STORE_CTX_new();
  X509_STORE_CTX_init(ctx, store, leaf, nullptr);
  X509_STORE_CTX_set_time(ctx, 0, std::chrono::system_clock::to_time_t(when));
  X509_VERIFY_PARAM_set1_host(X509_STORE_CTX_get0_param(ctx), host.c_str(), host.size());
  X509_VERIFY_PARAM_set_purpose(X509_STORE_CTX_get0_param(ctx), X509_PURPOSE_SSL_SERVER);
  const bool ok = X509_verify_cert(ctx) == 1;
  X509_STORE_CTX_free(ctx);
  X509_free(leaf);
  X509_STORE_free(store);
  return ok;
}

TEST(WebhookTlsTest, EmptyMaterialIsRenewedIntoAVerifyingPair) {
  const TlsPolicy p = Policy();
  EXPECT_EQ(WhyRenew({}, p, kNow), "no certificate yet");
  auto m = RenewTls({}, p, kNow);
  ASSERT_TRUE(m.ok()) << m.error();
  EXPECT_EQ(WhyRenew(*m, p, kNow), std::nullopt);
  for (const auto& name : p.dns_names) EXPECT_TRUE(Verifies(m->ca_bundle, m->cert, name, kNow));
  EXPECT_FALSE(Verifies(m->ca_bundle, m->cert, "other.rp.svc", kNow));
  EXPECT_EQ(BundleSubjects(m->ca_bundle),
            std::vector<std::string>{"/CN=registry-proxy-webhook-ca"});
  // Clocks in a cluster disagree a little: valid from an hour before it was made.
  EXPECT_TRUE(
      Verifies(m->ca_bundle, m->cert, p.dns_names[0], kNow - hours(1) + std::chrono::minutes(1)));
}

TEST(WebhookTlsTest, TheServingCertificateIsRenewedNinetyDaysAheadWithTheSameCa) {
  const TlsPolicy p = Policy();
  auto m = RenewTls({}, p, kNow).value();
  EXPECT_EQ(WhyRenew(m, p, kNow + hours(24 * 270)), std::nullopt);
  const SystemTime later = kNow + hours(24 * 280);
  auto why = WhyRenew(m, p, later);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("the serving certificate expires in 8"), std::string::npos) << *why;
  auto renewed = RenewTls(m, p, later).value();
  EXPECT_EQ(renewed.ca_key, m.ca_key);
  EXPECT_EQ(renewed.ca_bundle, m.ca_bundle);
  EXPECT_NE(renewed.cert, m.cert);
  EXPECT_NE(renewed.key, m.key);
  EXPECT_EQ(WhyRenew(renewed, p, later), std::nullopt);
}

TEST(WebhookTlsTest, ANewCaKeepsTheOldOneInTheBundleUntilItExpires) {
  const TlsPolicy p = Policy();
  auto m = RenewTls({}, p, kNow).value();
  const SystemTime late = kNow + hours(24 * (365 * 9 + 100));  // under a year of CA left
  auto why = WhyRenew(m, p, late);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("the CA expires in"), std::string::npos) << *why;
  auto next = RenewTls(m, p, late).value();
  EXPECT_NE(next.ca_key, m.ca_key);
  EXPECT_EQ(BundleSubjects(next.ca_bundle).size(), 2u);
  // Replicas still serving the old certificate stay trusted by the new bundle.
  EXPECT_TRUE(Verifies(next.ca_bundle, next.cert, p.dns_names[0], late));
  // Once the old CA has expired, the next renewal drops it.
  const SystemTime later = kNow + hours(24 * (365 * 10 + 30));
  auto after = RenewTls(next, p, later).value();
  EXPECT_EQ(BundleSubjects(after.ca_bundle).size(), 1u);
  EXPECT_EQ(after.ca_key, next.ca_key);
}

TEST(WebhookTlsTest, OtherNamesABrokenKeyOrAForeignCaAreRenewed) {
  TlsPolicy p = Policy();
  auto m = RenewTls({}, p, kNow).value();
  TlsPolicy renamed = p;
  renamed.dns_names = {"x.other.svc"};
  EXPECT_EQ(WhyRenew(m, renamed, kNow), "the serving certificate names other DNS names");
  TlsMaterial broken = m;
  broken.key = RenewTls({}, p, kNow).value().key;
  EXPECT_EQ(WhyRenew(broken, p, kNow), "the serving key is missing or does not match");
  TlsMaterial foreign = m;
  auto other = RenewTls({}, p, kNow).value();
  foreign.ca_bundle = other.ca_bundle;
  foreign.ca_key = other.ca_key;
  EXPECT_EQ(WhyRenew(foreign, p, kNow), "the serving certificate is not signed by the current CA");
  TlsMaterial garbage{"not pem", "x", "y", "z"};
  EXPECT_EQ(WhyRenew(garbage, p, kNow), "no CA certificate");
  auto fresh = RenewTls(garbage, p, kNow);
  ASSERT_TRUE(fresh.ok());
  EXPECT_EQ(WhyRenew(*fresh, p, kNow), std::nullopt);
}

// ---------------------------------------------------------------------------------------------
// A fake API server behind our KubeApi interface.

class FakeKube : public KubeApi {
 public:
  FakeKube() {
    secret = {{"apiVersion", "v1"},
              {"kind", "Secret"},
              {"metadata", {{"name", "tls"}, {"namespace", "rp"}, {"resourceVersion", "1"}}},
              {"type", "Opaque"}};
    mwc = {{"metadata", {{"name", "registry-proxy"}, {"resourceVersion", "7"}}},
           {"webhooks",
            {{{"name", "other.example.io"},
              {"clientConfig", {{"service", {{"name", "someone-else"}, {"namespace", "rp"}}}}}},
             {{"name", "images.registry-proxy.io"},
              {"clientConfig",
               {{"service", {{"name", "registry-proxy-webhook"}, {"namespace", "rp"}}}}}}}}};
  }

  KubeResponse Call(const std::string& method, const std::string& path, const std::string& body,
                    const std::string& content_type) override {
    calls.push_back(method + " " + path);
    if (before_call) before_call(method, path);
    const bool is_secret = path == "/api/v1/namespaces/rp/secrets/tls";
    const bool is_mwc =
        path ==
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/registry-proxy";
    if (!is_secret && !is_mwc) return {404, R"({"message":"not found"})", ""};
    Json& obj = is_secret ? secret : mwc;
    if (method == "GET") {
      if (is_secret && secret_missing)
        return {404, R"({"message":"secrets \"tls\" not found"})", ""};
      return {200, obj.dump(), ""};
    }
    if (method == "PUT" && is_secret && content_type == "application/json") {
      Json in = Json::parse(body);
      if (in["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]) {
        return {409, R"({"message":"the object has been modified"})", ""};
      }
      in["metadata"]["resourceVersion"] = Bump(obj);
      obj = in;
      ++secret_writes;
      return {200, obj.dump(), ""};
    }
    if (method == "PATCH" && is_mwc && content_type == "application/json-patch+json") {
      try {
        obj = obj.patch(Json::parse(body));
      } catch (const std::exception& e) {
        return {422, Json{{"message", e.what()}}.dump(), ""};
      }
      obj["metadata"]["resourceVersion"] = Bump(obj);
      ++mwc_patches;
      return {200, obj.dump(), ""};
    }
    return {405, R"({"message":"method not allowed"})", ""};
  }

  static std::string Bump(const Json& obj) {
    return std::to_string(std::stoi(obj["metadata"]["resourceVersion"].get<std::string>()) + 1);
  }
  // Another replica's write, between our GET and our PUT.
  void WriteAsAnotherReplica(const TlsMaterial& m) {
    secret["data"] = {{"ca.crt", Base64Encode(m.ca_bundle)},
                      {"ca.key", Base64Encode(m.ca_key)},
                      {"tls.crt", Base64Encode(m.cert)},
                      {"tls.key", Base64Encode(m.key)}};
    secret["metadata"]["resourceVersion"] = Bump(secret);
  }

  Json secret, mwc;
  bool secret_missing = false;
  int secret_writes = 0, mwc_patches = 0;
  std::vector<std::string> calls;
  std::function<void(const std::string&, const std::string&)> before_call;
};

class ProvisionerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("rp-webhook-tls-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
    options_.ns = "rp";
    options_.secret = "tls";
    options_.webhook_config = "registry-proxy";
    options_.service = "registry-proxy-webhook";
    options_.cert_file = (dir_ / "tls.crt").string();
    options_.key_file = (dir_ / "tls.key").string();
    options_.policy = Policy();
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static std::string Read(const std::filesystem::path& p) {
    std::ifstream f(p);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
  static std::string Field(const Json& secret, const char* key) {
    return secret["data"][key].get<std::string>();
  }

  std::filesystem::path dir_;
  TlsProvisionerOptions options_;
  FakeKube kube_;
};

TEST_F(ProvisionerTest, AnEmptySecretIsFilledTheFilesWrittenAndOurCaBundleSet) {
  TlsProvisioner prov(&kube_, options_);
  auto r = prov.Sync(kNow);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_TRUE(r->renewed);
  EXPECT_EQ(r->renew_reason, "no certificate yet");
  EXPECT_TRUE(r->files_written);
  EXPECT_EQ(r->ca_bundles_patched, 1);
  EXPECT_EQ(kube_.secret_writes, 1);
  const std::string cert = Read(dir_ / "tls.crt");
  EXPECT_EQ(Base64Encode(cert), Field(kube_.secret, "tls.crt"));
  EXPECT_EQ(Base64Encode(Read(dir_ / "tls.key")), Field(kube_.secret, "tls.key"));
  EXPECT_EQ((std::filesystem::status(dir_ / "tls.key").permissions() &
             std::filesystem::perms::others_read),
            std::filesystem::perms::none);
  // Our webhook got the CA; the entry for someone else's Service did not.
  EXPECT_EQ(kube_.mwc["webhooks"][1]["clientConfig"]["caBundle"], Field(kube_.secret, "ca.crt"));
  EXPECT_FALSE(kube_.mwc["webhooks"][0]["clientConfig"].contains("caBundle"));
}

TEST_F(ProvisionerTest, ASecondSyncChangesNothing) {
  TlsProvisioner prov(&kube_, options_);
  ASSERT_TRUE(prov.Sync(kNow).ok());
  const auto writes = kube_.secret_writes;
  const auto patches = kube_.mwc_patches;
  auto r = prov.Sync(kNow + hours(24));
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_FALSE(r->renewed);
  EXPECT_FALSE(r->files_written);
  EXPECT_EQ(r->ca_bundles_patched, 0);
  EXPECT_EQ(kube_.secret_writes, writes);
  EXPECT_EQ(kube_.mwc_patches, patches);
}

TEST_F(ProvisionerTest, AReplicaThatLosesTheRaceServesTheWinnersCertificate) {
  auto theirs = RenewTls({}, options_.policy, kNow).value();
  bool raced = false;
  kube_.before_call = [&](const std::string& method, const std::string&) {
    if (method == "PUT" && !raced) {
      raced = true;
      kube_.WriteAsAnotherReplica(theirs);
    }
  };
  TlsProvisioner prov(&kube_, options_);
  auto r = prov.Sync(kNow);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_FALSE(r->renewed);
  EXPECT_EQ(kube_.secret_writes, 0);  // ours was refused with 409
  EXPECT_EQ(Read(dir_ / "tls.crt"), theirs.cert);
  EXPECT_EQ(Read(dir_ / "tls.key"), theirs.key);
  EXPECT_EQ(kube_.mwc["webhooks"][1]["clientConfig"]["caBundle"], Base64Encode(theirs.ca_bundle));
}

TEST_F(ProvisionerTest, ARenewalByAnotherReplicaReachesTheFilesAndTheCaBundleIsKept) {
  TlsProvisioner prov(&kube_, options_);
  ASSERT_TRUE(prov.Sync(kNow).ok());
  // Someone re-applies the manifests and the caBundle is gone: the next sync puts it back.
  kube_.mwc["webhooks"][1]["clientConfig"].erase("caBundle");
  auto theirs = RenewTls({}, options_.policy, kNow).value();
  kube_.WriteAsAnotherReplica(theirs);
  auto r = prov.Sync(kNow + hours(1));
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_FALSE(r->renewed);
  EXPECT_TRUE(r->files_written);
  EXPECT_EQ(r->ca_bundles_patched, 1);
  EXPECT_EQ(Read(dir_ / "tls.crt"), theirs.cert);
}

TEST_F(ProvisionerTest, AMissingSecretOrAConcurrentWebhookChangeIsAnErrorThatSaysWhat) {
  kube_.secret_missing = true;
  TlsProvisioner prov(&kube_, options_);
  auto r = prov.Sync(kNow);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("cannot read Secret rp/tls: HTTP 404"), std::string::npos) << r.error();
  EXPECT_NE(r.error().find("kubectl apply -k daemonset/"), std::string::npos) << r.error();
  EXPECT_FALSE(std::filesystem::exists(dir_ / "tls.crt"));

  kube_.secret_missing = false;
  kube_.before_call = [&](const std::string& method, const std::string& path) {
    if (method == "PATCH") kube_.mwc["metadata"]["resourceVersion"] = "99";  // changed meanwhile
    (void)path;
  };
  r = prov.Sync(kNow);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(
      r.error().find("cannot set the caBundle of MutatingWebhookConfiguration registry-proxy"),
      std::string::npos)
      << r.error();
  kube_.before_call = nullptr;
  r = prov.Sync(kNow);  // the next round succeeds
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->ca_bundles_patched, 1);
}

}  // namespace
}  // namespace registry_proxy
