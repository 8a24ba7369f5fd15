// The admission webhook end to end: the real binary over real TLS, a throwaway CA and serving
// certificate made here with the openssl CLI, and curl as the client (as an API server would
// be: HTTPS, keep-alive, Content-Type application/json). Covers the probes, real
// AdmissionReview bodies, bad input on the wire, a certificate rotation while a connection is
// open, config reload, and shutdown. Needs no root; skips without openssl or curl unless
// RP_REQUIRE_INTEGRATION=1.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "testbed.h"
#include "webhook/webhook_tls.h"

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using rp_testbed::Process;
using rp_testbed::RunCommand;
using rp_testbed::WaitFor;
using ::testing::HasSubstr;
using namespace std::chrono_literals;

const std::string kData = std::string(RP_SOURCE_DIR) + "/tests/data/admission/";

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteFile(const fs::path& p, const std::string& content) {
  fs::path tmp = p;
  tmp += ".tmp";
  std::ofstream(tmp, std::ios::binary) << content;
  fs::rename(tmp, p);  // atomic, like kubelet's volume updates
}

bool InPath(const std::string& name) {
  const char* path = getenv("PATH");
  std::stringstream ss(path ? path : "");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (access((fs::path(dir) / name).c_str(), X_OK) == 0) return true;
  }
  return false;
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
                                   : -1;
    if (v < 0) break;
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xff);
    }
  }
  return out;
}

struct Reply {
  int status = 0;  // 0: no HTTP answer
  std::string body;
  std::string trace;  // curl's -v output
};

class WebhookTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::string tmpl = (fs::temp_directory_path() / "rp-webhook-XXXXXX").string();
    dir_ = mkdtemp(tmpl.data());
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  void SetUp() override {
    if (!InPath("openssl") || !InPath("curl")) {
      if (getenv("RP_REQUIRE_INTEGRATION") && std::string(getenv("RP_REQUIRE_INTEGRATION")) == "1")
        FAIL() << "openssl and curl are required (scripts/deps.sh installs them)";
      GTEST_SKIP() << "needs the openssl and curl commands";
    }
    work_ = fs::path(dir_) / ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::create_directories(work_ / "tls");
    fs::create_directories(work_ / "config");
    MakeCa();
    ASSERT_TRUE(MakeServingCert("webhook-1", work_ / "tls")) << "openssl failed";
    WriteFile(work_ / "config" / "config.yaml",
              ReadFile(std::string(RP_SOURCE_DIR) + "/config/config.yaml"));
  }

  void TearDown() override {
    if (webhook_.pid() > 0) {
      EXPECT_TRUE(webhook_.Stop(10s)) << "needed SIGKILL";
      // A clean exit also means no sanitizer report (leaks are reported at exit).
      if (started_) {
        EXPECT_EQ(webhook_.ExitDescription(), "exit 0") << Log();
      }
    }
  }

  // openssl, spawned without a shell. Output goes to a log in the work dir.
  bool Openssl(const std::vector<std::string>& args) {
    std::vector<std::string> argv = {"openssl"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto s = RunCommand(argv, (work_ / "openssl.log").string(), 30s);
    EXPECT_TRUE(s.ok()) << s.message();
    return s.ok();
  }

  void MakeCa() {
    ASSERT_TRUE(
        Openssl({"req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", (work_ / "ca.key").string(), "-out", (work_ / "ca.crt").string(),
                 "-subj", "/CN=registry-proxy test CA", "-days", "2"}));
  }

  // A serving cert for localhost/127.0.0.1 signed by the CA, written into dir as tls.crt and
  // tls.key (the names a kubernetes.io/tls Secret volume has).
  bool MakeServingCert(const std::string& cn, const fs::path& dir) {
    const fs::path ext = work_ / "ext.cnf";
    WriteFile(ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
    const fs::path key = work_ / (cn + ".key"), csr = work_ / (cn + ".csr"),
                   crt = work_ / (cn + ".crt");
    if (!Openssl({"req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                  "-keyout", key.string(), "-out", csr.string(), "-subj", "/CN=" + cn}) ||
        !Openssl({"x509", "-req", "-in", csr.string(), "-CA", (work_ / "ca.crt").string(), "-CAkey",
                  (work_ / "ca.key").string(), "-CAcreateserial", "-out", crt.string(), "-days",
                  "2", "-extfile", ext.string()})) {
      return false;
    }
    // Key first, then cert: the half-written state must not break anything either.
    WriteFile(dir / "tls.key", ReadFile(key));
    WriteFile(dir / "tls.crt", ReadFile(crt));
    return true;
  }

  // Starts the webhook on a free loopback port and waits until it serves.
  void Start(const std::vector<std::string>& extra = {}) {
    std::vector<std::string> argv = {RP_BINARY,     "webhook",
                                     "--listen",    "127.0.0.1:0",
                                     "--tls-cert",  (work_ / "tls" / "tls.crt").string(),
                                     "--tls-key",   (work_ / "tls" / "tls.key").string(),
                                     "--config",    (work_ / "config" / "config.yaml").string(),
                                     "--log-level", "debug"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    log_ = (work_ / "webhook.log").string();
    ASSERT_TRUE(webhook_.Spawn(argv, log_).ok());
    started_ = true;
    ASSERT_TRUE(WaitForPort(log_, &port_)) << Log();
  }

  // Waits (10 s) until a webhook's log says where it serves; its port in *port.
  static bool WaitForPort(const std::string& log_path, int* port) {
    static const std::regex kServing(R"(serving https://127\.0\.0\.1:(\d+))");
    return WaitFor(
        [&] {
          std::smatch m;
          const std::string log = ReadFile(log_path);
          if (!std::regex_search(log, m, kServing)) return false;
          *port = std::stoi(m[1]);
          return true;
        },
        10s);
  }

  std::string Log() const { return ReadFile(log_); }
  std::string Url(const std::string& path) const {
    return "https://127.0.0.1:" + std::to_string(port_) + path;
  }

  // One curl run: -v for the trace, the body to a file, the status via -w.
  Reply Curl(std::vector<std::string> args) {
    const std::string n = std::to_string(++curl_runs_);
    const fs::path body = work_ / ("curl" + n + ".body"), out = work_ / ("curl" + n + ".out");
    std::vector<std::string> argv = {"curl",        "-sS", "-v",
                                     "--max-time",  "10",  "-o",
                                     body.string(), "-w",  "\nHTTP_STATUS=%{http_code}\n"};
    argv.insert(argv.end(), args.begin(), args.end());
    RunCommand(argv, out.string(), 20s);  // a failed transfer still leaves its trace
    Reply r;
    r.trace = ReadFile(out);
    r.body = ReadFile(body);
    std::smatch m;
    static const std::regex kStatus(R"(HTTP_STATUS=(\d+))");
    if (std::regex_search(r.trace, m, kStatus)) r.status = std::stoi(m[1]);
    return r;
  }

  Reply Get(const std::string& path) { return Curl({"--cacert", Ca(), Url(path)}); }

  Reply Post(const std::string& body_file, const std::string& content_type = "application/json",
             std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        "--cacert", Ca(), "-H", "Content-Type: " + content_type, "--data-binary", "@" + body_file};
    args.insert(args.end(), extra.begin(), extra.end());
    args.push_back(Url("/mutate"));
    return Curl(args);
  }

  // The pod the API server would store: the request's object with our patch applied.
  json PatchedPod(const std::string& request_file, const Reply& r) {
    json review = json::parse(r.body);
    json req = json::parse(ReadFile(request_file));
    EXPECT_EQ(review["response"]["uid"], req["request"]["uid"]);
    EXPECT_EQ(review["response"]["allowed"], true);
    json pod = req["request"]["object"];
    if (!review["response"].contains("patch")) return pod;
    json patch = json::parse(Base64Decode(review["response"]["patch"].get<std::string>()));
    return pod.patch(patch);
  }

  std::string Ca() const { return (work_ / "ca.crt").string(); }

  static std::string dir_;
  fs::path work_;
  Process webhook_;
  std::string log_;
  int port_ = 0;
  int curl_runs_ = 0;
  bool started_ = false;  // by Start(): expected to exit 0 on SIGTERM
};

std::string WebhookTest::dir_;

TEST_F(WebhookTest, ProbesAnswer) {
  Start();
  Reply h = Get("/healthz");
  EXPECT_EQ(h.status, 200) << h.trace;
  EXPECT_EQ(h.body, "ok\n");
  Reply r = Get("/readyz");
  EXPECT_EQ(r.status, 200) << r.trace;
  EXPECT_THAT(h.trace, HasSubstr("subject: CN=webhook-1"));
  EXPECT_THAT(h.trace, ::testing::ContainsRegex("SSL connection using TLSv1\\.[23]"));
}

TEST_F(WebhookTest, AnnotatesRealReviewsOverTls) {
  Start();
  const std::string create = kData + "pod_create_no_annotations.json";
  Reply r = Post(create);
  ASSERT_EQ(r.status, 200) << r.trace << Log();
  EXPECT_THAT(r.trace, ::testing::ContainsRegex("[Cc]ontent-[Tt]ype: application/json"));
  json pod = PatchedPod(create, r);
  json images =
      json::parse(pod["metadata"]["annotations"]["registry-proxy.io/images"].get<std::string>());
  EXPECT_EQ(images["web"], "docker.ketches.cn/library/nginx:1.25");
  EXPECT_EQ(images["wait-for-db"], "docker.ketches.cn/library/busybox:1.36");
  EXPECT_EQ(images["exporter"], "quay.ketches.cn/prometheus/node-exporter:v1.6.1");
  EXPECT_EQ(pod["spec"], json::parse(ReadFile(create))["request"]["object"]["spec"]);

  const std::string annotated = kData + "pod_create_with_annotations.json";
  r = Post(annotated);
  ASSERT_EQ(r.status, 200) << r.trace;
  pod = PatchedPod(annotated, r);
  EXPECT_EQ(pod["metadata"]["annotations"].size(), 5u);
  EXPECT_THAT(pod["metadata"]["annotations"]["registry-proxy.io/images"].get<std::string>(),
              HasSubstr("docker.ketches.cn/library/redis@sha256:e422889e"));

  const std::string ephemeral = kData + "pod_update_ephemeral.json";
  r = Post(ephemeral);
  ASSERT_EQ(r.status, 200) << r.trace;
  EXPECT_THAT(PatchedPod(ephemeral, r)["metadata"]["annotations"]["registry-proxy.io/images"]
                  .get<std::string>(),
              HasSubstr("\"debugger-8xk2p\":\"docker.ketches.cn/library/busybox:1.36\""));

  r = Post(kData + "pod_create_kube_system.json");
  ASSERT_EQ(r.status, 200) << r.trace;
  EXPECT_FALSE(json::parse(r.body)["response"].contains("patch")) << r.body;

  r = Post(kData + "deployment_create.json");
  ASSERT_EQ(r.status, 200) << r.trace;
  EXPECT_TRUE(json::parse(r.body)["response"].contains("warnings")) << r.body;
  EXPECT_THAT(Log(), HasSubstr("admission uid=0df28fbd-5f5f-11e8-9a4e-42010a800002 pod=shop/"
                               "web-7d4b9c8f6d-* patched=true"));
}

TEST_F(WebhookTest, BadInputOnTheWireGetsClear4xx) {
  Start();
  const fs::path junk = work_ / "junk.txt";
  WriteFile(junk, "this is not json");
  const fs::path deep = work_ / "deep.json";
  WriteFile(deep, std::string(100000, '[') + std::string(100000, ']'));
  const fs::path big = work_ / "big.json";
  WriteFile(big, "{\"a\":\"" + std::string(4 << 20, 'x') + "\"}");
  const fs::path v1beta1 = work_ / "v1beta1.json";
  json review = json::parse(ReadFile(kData + "pod_create_no_annotations.json"));
  review["apiVersion"] = "admission.k8s.io/v1beta1";
  WriteFile(v1beta1, review.dump());
  const std::string good = kData + "pod_create_no_annotations.json";

  struct Case {
    Reply reply;
    int status;
    std::string message;
  };
  std::vector<Case> cases;
  cases.push_back({Post(junk.string()), 400, "not JSON"});
  cases.push_back({Post(deep.string()), 400, "nested deeper than 64"});
  cases.push_back({Post(big.string()), 413, "exceeds the limit"});
  cases.push_back({Post(v1beta1.string()), 400, "admission.k8s.io/v1beta1"});
  cases.push_back({Post(good, "text/plain"), 415, "Content-Type must be application/json"});
  cases.push_back(
      {Post(good, "application/json", {"-H", "Content-Encoding: gzip"}), 415, "Content-Encoding"});
  cases.push_back({Get("/mutate"), 405, "not allowed"});
  cases.push_back({Get("/metrics"), 404, "not found"});
  for (const Case& c : cases) {
    EXPECT_EQ(c.reply.status, c.status) << c.reply.trace;
    EXPECT_THAT(c.reply.body, HasSubstr(c.message)) << c.reply.trace;
  }
  // The content type check ignores case and parameters, as HTTP says.
  EXPECT_EQ(Post(good, "Application/JSON; charset=utf-8").status, 200);
  EXPECT_EQ(Get("/healthz").status, 200) << "still serving after all that\n" << Log();
}

TEST_F(WebhookTest, PlainHttpOnTheTlsPortIsToldSo) {
  Start();
  Reply r = Curl({"http://127.0.0.1:" + std::to_string(port_) + "/healthz"});
  EXPECT_EQ(r.status, 400) << r.trace;
  EXPECT_THAT(r.body, HasSubstr("HTTP request to an HTTPS server"));
  r = Curl({"-H", "Content-Type: application/json", "--data-binary",
            "@" + kData + "pod_create_no_annotations.json",
            "http://127.0.0.1:" + std::to_string(port_) + "/mutate"});
  EXPECT_EQ(r.status, 400) << r.trace;
  // TLS 1.1 and below are refused.
  r = Curl({"--cacert", Ca(), "--tls-max", "1.1", Url("/healthz")});
  EXPECT_EQ(r.status, 0) << r.trace;
  EXPECT_EQ(Get("/healthz").status, 200);
}

TEST_F(WebhookTest, SilentAndSlowClientsNeitherHangNorBlockOthers) {
  Start({"--threads", "2"});
  // Connections that never complete a handshake (a slowloris) occupy workers only until the
  // read timeout; meanwhile the listening socket keeps accepting.
  int fds[3];
  for (int& fd : fds) {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a = rp_testbed::LoopbackAddress(port_);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  const auto start = std::chrono::steady_clock::now();
  // With both workers held, this request waits for a worker, bounded by the read timeout.
  Reply r = Get("/healthz");
  EXPECT_EQ(r.status, 200) << r.trace;
  EXPECT_LT(std::chrono::steady_clock::now() - start, 9s);
  // The server closes the silent connections itself.
  for (int fd : fds) {
    timeval tv{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char c;
    EXPECT_LE(recv(fd, &c, 1, 0), 0) << "closed by the server, not by our timeout";
    close(fd);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, 20s);
}

TEST_F(WebhookTest, CertificateRotationWhileServing) {
  Start();
  // A client that keeps one connection open across the rotation: three requests, 2 s apart.
  const fs::path kept_out = work_ / "kept.out";
  Process kept;
  ASSERT_TRUE(kept.Spawn({"curl", "-sS", "-v", "--max-time", "20", "--cacert", Ca(), "--rate",
                          "30/m", Url("/healthz"), Url("/healthz"), Url("/healthz")},
                         kept_out.string())
                  .ok());
  ASSERT_TRUE(WaitFor([&] { return ReadFile(kept_out).find("ok") != std::string::npos; }, 10s));

  ASSERT_TRUE(MakeServingCert("webhook-2", work_ / "tls"));
  // The files are checked at most once a second, on a new handshake.
  EXPECT_TRUE(WaitFor(
      [&] { return Get("/healthz").trace.find("CN=webhook-2") != std::string::npos; }, 10s, 300ms))
      << Log();
  EXPECT_THAT(Log(), HasSubstr("subject CN = webhook-2"));

  // The old connection was never dropped: curl reused it for every request.
  auto status = kept.Wait(20s);
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0) << ReadFile(kept_out);
  const std::string trace = ReadFile(kept_out);
  size_t oks = 0;
  for (size_t p = trace.find("ok\n"); p != std::string::npos; p = trace.find("ok\n", p + 1)) ++oks;
  EXPECT_EQ(oks, 3u) << trace;
  EXPECT_THAT(trace, HasSubstr("Re-using existing connection"));
  EXPECT_THAT(trace, ::testing::Not(HasSubstr("CN=webhook-2")));

  // A broken rotation (garbage certificate) keeps the good pair in force, loudly.
  auto refusals = [&] {
    const std::string log = Log();
    size_t n = 0;
    for (size_t p = log.find("NOT (re)loaded"); p != std::string::npos;
         p = log.find("NOT (re)loaded", p + 1))
      ++n;
    return n;
  };
  const size_t refused_before = refusals();  // a handshake may have seen the key alone
  WriteFile(work_ / "tls" / "tls.crt", "-----BEGIN CERTIFICATE-----\nbroken\n");
  EXPECT_TRUE(WaitFor(
      [&] {
        const bool ok = Get("/healthz").status == 200;  // a handshake checks the files
        return ok && refusals() > refused_before;
      },
      10s, 300ms))
      << Log();
  Reply r = Get("/healthz");
  EXPECT_EQ(r.status, 200);
  EXPECT_THAT(r.trace, HasSubstr("CN=webhook-2"));

  // SIGHUP re-reads at once.
  ASSERT_TRUE(MakeServingCert("webhook-3", work_ / "tls"));
  kill(webhook_.pid(), SIGHUP);
  EXPECT_TRUE(
      WaitFor([&] { return Log().find("subject CN = webhook-3") != std::string::npos; }, 5s));
  EXPECT_THAT(Get("/healthz").trace, HasSubstr("CN=webhook-3"));
}

// The certificate the webhook makes for itself (--tls-secret, webhook_tls.h): served for the
// Service's DNS name, it verifies against the CA bundle (what the API server gets as caBundle)
// with a real client; a renewal under the same CA is served from the next handshake on.
TEST_F(WebhookTest, ItsOwnCertificateVerifiesForTheServiceAndARenewalIsServed) {
  using registry_proxy::RenewTls;
  using registry_proxy::TlsPolicy;
  const fs::path out = work_ / "tls";
  TlsPolicy policy;
  policy.dns_names = {"registry-proxy-webhook.registry-proxy.svc",
                      "registry-proxy-webhook.registry-proxy.svc.cluster.local",
                      "registry-proxy-webhook.registry-proxy", "registry-proxy-webhook"};
  const auto now = std::chrono::system_clock::now();
  auto first = RenewTls({}, policy, now);
  ASSERT_TRUE(first.ok()) << first.error();
  WriteFile(out / "tls.crt", first->cert);
  WriteFile(out / "tls.key", first->key);
  WriteFile(work_ / "ca.crt", first->ca_bundle);
  Start();
  const std::string host = "registry-proxy-webhook.registry-proxy.svc";
  auto get = [&](const std::string& name) {
    return Curl({"--cacert", (work_ / "ca.crt").string(), "--resolve",
                 name + ":" + std::to_string(port_) + ":127.0.0.1",
                 "https://" + name + ":" + std::to_string(port_) + "/healthz"});
  };
  EXPECT_EQ(get(host).status, 200);
  EXPECT_EQ(get("registry-proxy-webhook.registry-proxy.svc.cluster.local").status, 200);
  EXPECT_NE(get("elsewhere.registry-proxy.svc").status, 200) << "a name it was not made for";

  // A renewal (as 90 days before expiry, made now so that it is valid now): same CA, new pair.
  auto renewed = RenewTls(*first, policy, now);
  ASSERT_TRUE(renewed.ok()) << renewed.error();
  ASSERT_EQ(renewed->ca_bundle, first->ca_bundle);
  WriteFile(out / "tls.key", renewed->key);
  WriteFile(out / "tls.crt", renewed->cert);
  EXPECT_TRUE(WaitFor(
      [&] {
        get(host);
        const std::string log = Log();
        size_t loads = 0;
        for (size_t p = log.find("serving certificate loaded"); p != std::string::npos;
             p = log.find("serving certificate loaded", p + 1))
          ++loads;
        return loads >= 2;
      },
      10s, 300ms))
      << Log();
  EXPECT_EQ(get(host).status, 200) << "the renewed certificate verifies against the same CA";
}

// A stand-in for the two API objects `webhook --tls-secret` uses, over TLS with a bearer token,
// keeping the API server's rules for them: a PUT must carry the current resourceVersion (409
// otherwise), a JSON patch applies whole or not at all (422), a wrong token gets 401. (No
// kube-apiserver is packaged for these machines; this checks our side of the wire: TLS
// verification against ca.crt, the token, the paths, the calls and their order.)
class FakeApiServer {
 public:
  FakeApiServer(const fs::path& cert, const fs::path& key, std::string token)
      : server_(cert.c_str(), key.c_str()), token_(std::move(token)) {
    secret_ = {{"apiVersion", "v1"},
               {"kind", "Secret"},
               {"metadata",
                {{"name", "registry-proxy-webhook-tls"},
                 {"namespace", "registry-proxy"},
                 {"resourceVersion", "1"}}},
               {"type", "Opaque"}};
    mwc_ = {{"metadata", {{"name", "registry-proxy"}, {"resourceVersion", "1"}}},
            {"webhooks",
             {{{"name", "images.registry-proxy.io"},
               {"clientConfig",
                {{"service",
                  {{"name", "registry-proxy-webhook"}, {"namespace", "registry-proxy"}}}}}}}}};
    const std::string secret_path =
        "/api/v1/namespaces/registry-proxy/secrets/registry-proxy-webhook-tls";
    const std::string mwc_path =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/registry-proxy";
    server_.Get(secret_path, [this](const auto& req, auto& res) { Serve(req, res, secret_); });
    server_.Get(mwc_path, [this](const auto& req, auto& res) { Serve(req, res, mwc_); });
    server_.Put(secret_path, [this](const httplib::Request& req, httplib::Response& res) {
      if (!Authorized(req, res)) return;
      std::lock_guard<std::mutex> lock(mu_);
      json in = json::parse(req.body);
      if (in["metadata"]["resourceVersion"] != secret_["metadata"]["resourceVersion"]) {
        return Answer(res, 409, {{"message", "the object has been modified"}});
      }
      in["metadata"]["resourceVersion"] = std::to_string(++version_);
      secret_ = in;
      ++secret_writes_;
      Answer(res, 200, secret_);
    });
    server_.Patch(mwc_path, [this](const httplib::Request& req, httplib::Response& res) {
      if (!Authorized(req, res)) return;
      std::lock_guard<std::mutex> lock(mu_);
      if (req.get_header_value("Content-Type") != "application/json-patch+json") {
        return Answer(res, 415, {{"message", "unsupported patch type"}});
      }
      try {
        mwc_ = mwc_.patch(json::parse(req.body));
      } catch (const std::exception& e) {
        return Answer(res, 422, {{"message", e.what()}});
      }
      mwc_["metadata"]["resourceVersion"] = std::to_string(++version_);
      Answer(res, 200, mwc_);
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ~FakeApiServer() {
    server_.stop();
    thread_.join();
  }
  int port() const { return port_; }
  json Secret() {
    std::lock_guard<std::mutex> lock(mu_);
    return secret_;
  }
  json Mwc() {
    std::lock_guard<std::mutex> lock(mu_);
    return mwc_;
  }
  int secret_writes() {
    std::lock_guard<std::mutex> lock(mu_);
    return secret_writes_;
  }
  int unauthorized() {
    std::lock_guard<std::mutex> lock(mu_);
    return unauthorized_;
  }

 private:
  bool Authorized(const httplib::Request& req, httplib::Response& res) {
    if (req.get_header_value("Authorization") == "Bearer " + token_) return true;
    std::lock_guard<std::mutex> lock(mu_);
    ++unauthorized_;
    Answer(res, 401, {{"message", "Unauthorized"}});
    return false;
  }
  void Serve(const httplib::Request& req, httplib::Response& res, const json& obj) {
    if (!Authorized(req, res)) return;
    std::lock_guard<std::mutex> lock(mu_);
    Answer(res, 200, obj);
  }
  static void Answer(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump(), "application/json");
  }

  httplib::SSLServer server_;
  const std::string token_;
  std::thread thread_;
  int port_ = 0;
  std::mutex mu_;
  json secret_, mwc_;
  int version_ = 1;
  int secret_writes_ = 0;
  int unauthorized_ = 0;
};

// `webhook --tls-secret` as a pod runs it: two replicas against one API server. The first fills
// the empty Secret and sets the caBundle; the second takes the same certificate; both serve
// it for the Service's name, verified against the CA that went into the caBundle.
TEST_F(WebhookTest, TwoReplicasKeepingTheirOwnCertificateServeOneCaForTheService) {
  const fs::path sa = work_ / "serviceaccount";
  fs::create_directories(sa);
  fs::create_directories(work_ / "api");
  ASSERT_TRUE(MakeServingCert("apiserver", work_ / "api"));
  WriteFile(sa / "ca.crt", ReadFile(Ca()));
  WriteFile(sa / "token", "t0k3n\n");
  WriteFile(sa / "namespace", "registry-proxy");
  FakeApiServer api(work_ / "api" / "tls.crt", work_ / "api" / "tls.key", "t0k3n");
  setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1", 1);
  setenv("KUBERNETES_SERVICE_PORT", std::to_string(api.port()).c_str(), 1);
  auto own_flags = [&](const std::string& dir) {
    fs::create_directories(work_ / dir);
    return std::vector<std::string>{"--tls-cert",
                                    (work_ / dir / "tls.crt").string(),
                                    "--tls-key",
                                    (work_ / dir / "tls.key").string(),
                                    "--tls-secret",
                                    "registry-proxy-webhook-tls",
                                    "--webhook-configuration",
                                    "registry-proxy",
                                    "--service-account-dir",
                                    sa.string()};
  };
  Start(own_flags("own1"));  // the later --tls-cert/--tls-key win over the fixture's
  EXPECT_EQ(api.secret_writes(), 1);
  EXPECT_EQ(api.unauthorized(), 0);
  const json secret = api.Secret();
  const std::string ca_bundle = Base64Decode(secret["data"]["ca.crt"].get<std::string>());
  EXPECT_EQ(api.Mwc()["webhooks"][0]["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
  EXPECT_EQ(ReadFile(work_ / "own1" / "tls.crt"),
            Base64Decode(secret["data"]["tls.crt"].get<std::string>()));
  WriteFile(work_ / "bundle.crt", ca_bundle);
  const std::string host = "registry-proxy-webhook.registry-proxy.svc";
  auto get = [&](int port) {
    return Curl({"--cacert", (work_ / "bundle.crt").string(), "--resolve",
                 host + ":" + std::to_string(port) + ":127.0.0.1",
                 "https://" + host + ":" + std::to_string(port) + "/healthz"});
  };
  EXPECT_EQ(get(port_).status, 200) << Log();

  // The second replica: no new certificate, the same pair, served the same way.
  Process second;
  std::vector<std::string> argv = {RP_BINARY,  "webhook",
                                   "--listen", "127.0.0.1:0",
                                   "--config", (work_ / "config" / "config.yaml").string()};
  for (const auto& f : own_flags("own2")) argv.push_back(f);
  const std::string log2 = (work_ / "webhook2.log").string();
  ASSERT_TRUE(second.Spawn(argv, log2).ok());
  int port2 = 0;
  ASSERT_TRUE(WaitForPort(log2, &port2)) << ReadFile(log2);
  EXPECT_EQ(get(port2).status, 200) << ReadFile(log2);
  EXPECT_EQ(api.secret_writes(), 1) << "the second replica took the first one's certificate";
  EXPECT_EQ(ReadFile(work_ / "own2" / "tls.crt"), ReadFile(work_ / "own1" / "tls.crt"));
  EXPECT_TRUE(second.Stop(10s));
  EXPECT_EQ(second.ExitDescription(), "exit 0") << ReadFile(log2);
  unsetenv("KUBERNETES_SERVICE_HOST");
  unsetenv("KUBERNETES_SERVICE_PORT");
}

// A token the API server refuses: the webhook says so and exits instead of serving nothing.
TEST_F(WebhookTest, OwnCertificateWithARefusedTokenExitsWithTheApiServersAnswer) {
  const fs::path sa = work_ / "serviceaccount";
  fs::create_directories(sa);
  fs::create_directories(work_ / "api");
  ASSERT_TRUE(MakeServingCert("apiserver", work_ / "api"));
  WriteFile(sa / "ca.crt", ReadFile(Ca()));
  WriteFile(sa / "token", "wrong");
  FakeApiServer api(work_ / "api" / "tls.crt", work_ / "api" / "tls.key", "t0k3n");
  setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1", 1);
  setenv("KUBERNETES_SERVICE_PORT", std::to_string(api.port()).c_str(), 1);
  Process p;
  const std::string log = (work_ / "refused.log").string();
  ASSERT_TRUE(p.Spawn({RP_BINARY, "webhook", "--listen", "127.0.0.1:0", "--tls-cert",
                       (work_ / "x.crt").string(), "--tls-key", (work_ / "x.key").string(),
                       "--tls-secret", "registry-proxy-webhook-tls", "--namespace",
                       "registry-proxy", "--service-account-dir", sa.string()},
                      log)
                  .ok());
  // It retries for a minute (the API server may be a moment away): wait for the first refusal.
  EXPECT_TRUE(WaitFor(
      [&] {
        return ReadFile(log).find(
                   "cannot read Secret registry-proxy/registry-proxy-webhook-tls: "
                   "HTTP 401: Unauthorized") != std::string::npos;
      },
      10s))
      << ReadFile(log);
  EXPECT_GE(api.unauthorized(), 1);
  EXPECT_FALSE(fs::exists(work_ / "x.crt"));
  EXPECT_TRUE(p.Stop(10s));
  unsetenv("KUBERNETES_SERVICE_HOST");
  unsetenv("KUBERNETES_SERVICE_PORT");
}

TEST_F(WebhookTest, ConfigReloadsLiveAndABadOneIsNotTaken) {
  Start();
  const std::string create = kData + "pod_create_no_annotations.json";
  WriteFile(work_ / "config" / "config.yaml", "proxies:\n  docker.io: mirror.example:5000\n");
  ASSERT_TRUE(WaitFor([&] { return Log().find("generation 2") != std::string::npos; }, 10s))
      << Log();
  Reply r = Post(create);
  ASSERT_EQ(r.status, 200);
  json pod = PatchedPod(create, r);
  json images =
      json::parse(pod["metadata"]["annotations"]["registry-proxy.io/images"].get<std::string>());
  EXPECT_EQ(images["web"], "mirror.example:5000/library/nginx:1.25");
  EXPECT_EQ(images["exporter"], "quay.io/prometheus/node-exporter:v1.6.1") << "no rule: as is";

  WriteFile(work_ / "config" / "config.yaml", "proxies:\n  docker.io: HTTPS://bad\n");
  ASSERT_TRUE(WaitFor(
      [&] {
        return Log().find("rejected") != std::string::npos ||
               Log().find("keeping") != std::string::npos;
      },
      10s))
      << Log();
  r = Post(create);
  EXPECT_THAT(PatchedPod(create, r)["metadata"]["annotations"]["registry-proxy.io/images"]
                  .get<std::string>(),
              HasSubstr("mirror.example:5000"))
      << "the last good config stays";
  EXPECT_EQ(Get("/readyz").status, 200);
}

TEST_F(WebhookTest, WithoutConfigItAnnotatesNothingAndIsNotReady) {
  fs::remove(work_ / "config" / "config.yaml");
  Start();
  Reply r = Get("/readyz");
  EXPECT_EQ(r.status, 503) << r.trace;
  EXPECT_THAT(r.body, HasSubstr("no good config"));
  r = Post(kData + "pod_create_no_annotations.json");
  ASSERT_EQ(r.status, 200);
  EXPECT_FALSE(json::parse(r.body)["response"].contains("patch"));
  WriteFile(work_ / "config" / "config.yaml", "proxies:\n  docker.io: m.example\n");
  EXPECT_TRUE(WaitFor([&] { return Get("/readyz").status == 200; }, 10s, 200ms)) << Log();
}

TEST_F(WebhookTest, StopsPromptlyOnSigterm) {
  Start();
  ASSERT_EQ(Get("/healthz").status, 200);
  const auto start = std::chrono::steady_clock::now();
  kill(webhook_.pid(), SIGTERM);
  auto status = webhook_.Wait(10s);
  ASSERT_TRUE(status.has_value()) << Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << webhook_.ExitDescription();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
  EXPECT_THAT(Log(), HasSubstr("stopped"));
}

TEST_F(WebhookTest, RefusesToStartWithoutAUsableCertificate) {
  WriteFile(work_ / "tls" / "tls.key", ReadFile(work_ / "ca.key"));  // does not match
  log_ = (work_ / "webhook.log").string();
  ASSERT_TRUE(webhook_
                  .Spawn({RP_BINARY, "webhook", "--listen", "127.0.0.1:0", "--tls-cert",
                          (work_ / "tls" / "tls.crt").string(), "--tls-key",
                          (work_ / "tls" / "tls.key").string(), "--config",
                          (work_ / "config" / "config.yaml").string()},
                         log_)
                  .ok());
  auto status = webhook_.Wait(10s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 1) << webhook_.ExitDescription();
  EXPECT_THAT(Log(), HasSubstr("does not match"));
}

// The ops endpoint (--metrics-address): plain HTTP /healthz, /readyz and /metrics counting
// reviews, certificate loads and config reloads.
TEST_F(WebhookTest, OpsEndpointServesMetricsAndProbes) {
  auto port = rp_testbed::PickFreePort();
  ASSERT_TRUE(port.ok());
  Start({"--metrics-address", "127.0.0.1:" + std::to_string(*port), "--log-format", "json"});
  const std::string ops = "http://127.0.0.1:" + std::to_string(*port);
  ASSERT_TRUE(
      WaitFor([&] { return Log().find("metrics and probes on") != std::string::npos; }, 10s))
      << Log();
  Reply h = Curl({ops + "/healthz"});
  EXPECT_EQ(h.status, 200) << h.trace;
  EXPECT_EQ(h.body, "ok\n");
  EXPECT_EQ(Curl({ops + "/readyz"}).status, 200);

  ASSERT_EQ(Post(kData + "pod_create_no_annotations.json").status, 200);
  ASSERT_EQ(Post(kData + "pod_create_kube_system.json").status, 200);
  ASSERT_EQ(Post(kData + "pod_create_no_annotations.json", "text/plain").status, 415);
  Reply m = Curl({ops + "/metrics"});
  ASSERT_EQ(m.status, 200) << m.trace;
  EXPECT_THAT(m.trace, HasSubstr("text/plain; version=0.0.4"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_webhook_reviews_total{result=\"patched\"} 1\n"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_webhook_reviews_total{result=\"unpatched\"} 1\n"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_webhook_reviews_total{result=\"rejected\"} 1\n"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_webhook_review_duration_seconds_count 3\n"));
  EXPECT_THAT(
      m.body,
      HasSubstr("registry_proxy_webhook_certificate_reloads_total{result=\"success\"} 1\n"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_config_reloads_total{result=\"applied\"} 1\n"));
  EXPECT_THAT(m.body, HasSubstr("registry_proxy_config_generation 1\n"));
  EXPECT_THAT(m.body,
              ::testing::ContainsRegex("registry_proxy_build_info\\{version=\"[^\"]+\"\\} 1"));

  // Logs are JSON lines.
  std::istringstream lines(Log());
  for (std::string line; std::getline(lines, line);) {
    EXPECT_TRUE(json::accept(line)) << "not JSON: " << line;
  }

  // SIGTERM: not ready any more while it drains.
  kill(webhook_.pid(), SIGTERM);
  auto status = webhook_.Wait(10s);
  ASSERT_TRUE(status.has_value()) << Log();
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << webhook_.ExitDescription();
}

TEST_F(WebhookTest, OpsEndpointCanBeTurnedOff) {
  Start({"--metrics-address", ""});
  EXPECT_EQ(Get("/healthz").status, 200);
  EXPECT_THAT(Log(), ::testing::Not(HasSubstr("metrics and probes on")));
}

TEST_F(WebhookTest, BadMetricsAddressIsAUsageError) {
  log_ = (work_ / "webhook.log").string();
  ASSERT_TRUE(webhook_
                  .Spawn({RP_BINARY, "webhook", "--listen", "127.0.0.1:0", "--tls-cert",
                          (work_ / "tls" / "tls.crt").string(), "--tls-key",
                          (work_ / "tls" / "tls.key").string(), "--metrics-address", "9465"},
                         log_)
                  .ok());
  auto status = webhook_.Wait(10s);
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 2) << webhook_.ExitDescription();
  EXPECT_THAT(Log(), HasSubstr("--metrics-address '9465': want HOST:PORT"));
}

}  // namespace
