#include "webhook/webhook_server.h"

#include <httplib.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "webhook/webhook_pool.h"

namespace registry_proxy {
namespace {

// Mozilla's "intermediate" TLS 1.2 suites (forward secrecy, AEAD only); TLS 1.3 suites are
// OpenSSL's defaults, all good.
constexpr char kTls12Ciphers[] =
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305";

constexpr char kPlainHttpAnswer[] =
    "HTTP/1.1 400 Bad Request\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Connection: close\r\n"
    "Content-Length: 48\r\n"
    "\r\n"
    "Client sent an HTTP request to an HTTPS server.\n";
static_assert(sizeof("Client sent an HTTP request to an HTTPS server.\n") - 1 == 48);

// Drains OpenSSL's thread-local error queue into one line (and leaves it empty, so a later
// unrelated call on this thread does not see stale errors).
std::string OpenSslErrors() {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown OpenSSL error" : out;
}

std::string NameLine(const X509_NAME* name) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return "";
  X509_NAME_print_ex(bio, name, 0, XN_FLAG_ONELINE & ~ASN1_STRFLGS_ESC_MSB);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  std::string s(data ? data : "", n > 0 ? size_t(n) : 0);
  BIO_free(bio);
  return s;
}

std::string TimeLine(const ASN1_TIME* t) {
  BIO* bio = BIO_new(BIO_s_mem());
  if (!bio) return "";
  ASN1_TIME_print(bio, t);
  char* data = nullptr;
  long n = BIO_get_mem_data(bio, &data);
  std::string s(data ? data : "", n > 0 ? size_t(n) : 0);
  BIO_free(bio);
  return s;
}

int64_t SteadyNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Result<std::shared_ptr<CertificateHolder::Pair>> ReadPair(const std::string& cert_file,
                                                          const std::string& key_file) {
  ERR_clear_error();
  auto pair = std::make_shared<CertificateHolder::Pair>();
  BIO* bio = BIO_new_file(cert_file.c_str(), "r");
  if (!bio) return Status::Error(cert_file + ": cannot open: " + OpenSslErrors());
  pair->cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
  if (pair->cert) {
    pair->chain = sk_X509_new_null();
    while (X509* extra = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
      sk_X509_push(pair->chain, extra);
    }
    ERR_clear_error();  // the loop ends on "no start line": expected
  }
  BIO_free(bio);
  if (!pair->cert) return Status::Error(cert_file + ": no PEM certificate: " + OpenSslErrors());

  bio = BIO_new_file(key_file.c_str(), "r");
  if (!bio) return Status::Error(key_file + ": cannot open: " + OpenSslErrors());
  pair->key = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
  BIO_free(bio);
  if (!pair->key) return Status::Error(key_file + ": no PEM private key: " + OpenSslErrors());
  if (X509_check_private_key(pair->cert, pair->key) != 1) {
    return Status::Error(key_file + " does not match " + cert_file + " (" + OpenSslErrors() +
                         "); a rotation may be half written");
  }
  pair->subject = NameLine(X509_get_subject_name(pair->cert));
  pair->not_after = TimeLine(X509_get0_notAfter(pair->cert));
  return pair;
}

// Per handshake: hand the SSL the current pair (after a cheap check for rotated files).
int CertCallback(SSL* ssl, void* arg) {
  auto* holder = static_cast<CertificateHolder*>(arg);
  holder->MaybeReload();
  std::shared_ptr<const CertificateHolder::Pair> pair = holder->Current();
  if (!pair) return 0;  // fails the handshake; Start() refuses to serve without a pair anyway
  if (SSL_use_certificate(ssl, pair->cert) != 1 || SSL_use_PrivateKey(ssl, pair->key) != 1 ||
      SSL_set1_chain(ssl, pair->chain) != 1) {
    spdlog::error("TLS: cannot use the serving certificate: {}", OpenSslErrors());
    return 0;
  }
  return 1;
}

// OpenSSL recognises an HTTP request where a TLS record should be (SSL_R_HTTP_REQUEST) and
// fails the handshake without an alert. Tell the client in its own protocol, as Go and nginx
// do, instead of closing silently. Runs inside SSL_accept, on the connection's worker.
void InfoCallback(const SSL* ssl, int where, int ret) {
  // The first call of a handshake comes before any byte is read: the worker now knows its
  // connection, and can lose it to a waiting one if it never sends a request (webhook_pool.h).
  ConnectionWorkerPool::NoteSocket(SSL_get_fd(ssl));
  if (!(where & SSL_CB_ACCEPT_EXIT) || ret > 0) return;
  const unsigned long e = ERR_peek_error();
  if (ERR_GET_LIB(e) != ERR_LIB_SSL || ERR_GET_REASON(e) != SSL_R_HTTP_REQUEST) return;
  // Consumed here, so that a later handshake on this worker thread cannot mistake a stale
  // entry for its own.
  ERR_clear_error();
  const int fd = SSL_get_fd(ssl);
  if (fd < 0) return;
  // Read what the client already sent (its headers, a small body) so that closing does not
  // turn into a reset that destroys our answer before the client reads it. Bounded in bytes
  // and time.
  char buf[4096];
  size_t total = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (total < 64 * 1024 && std::chrono::steady_clock::now() < deadline) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 20) <= 0) break;
    ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0) break;
    total += size_t(n);
  }
  [[maybe_unused]] ssize_t sent =
      send(fd, kPlainHttpAnswer, sizeof(kPlainHttpAnswer) - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  shutdown(fd, SHUT_WR);
  spdlog::warn("plain HTTP request on the TLS port answered with 400");
}

bool IsJsonContentType(std::string_view ct) {
  // "application/json", optionally with parameters ("; charset=utf-8").
  std::string_view base = ct.substr(0, ct.find(';'));
  while (!base.empty() && base.back() == ' ') base.remove_suffix(1);
  if (base.size() != 16) return false;
  for (size_t i = 0; i < base.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(base[i])) != "application/json"[i]) return false;
  }
  return true;
}

void Text(httplib::Response& res, int status, const std::string& message) {
  res.status = status;
  res.set_content(message + "\n", "text/plain; charset=utf-8");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CertificateHolder

CertificateHolder::Pair::~Pair() {
  if (chain) sk_X509_pop_free(chain, X509_free);
  X509_free(cert);
  EVP_PKEY_free(key);
}

CertificateHolder::CertificateHolder(std::string cert_file, std::string key_file,
                                     std::chrono::milliseconds check_interval)
    : cert_file_(std::move(cert_file)),
      key_file_(std::move(key_file)),
      check_interval_(check_interval),
      last_ids_{FileId{0, 0, -1, 0}, FileId{0, 0, -1, 0}} {}

CertificateHolder::FileId CertificateHolder::Identify(const std::string& path) {
  struct stat st;
  FileId id{0, 0, -1, 0};
  if (stat(path.c_str(), &st) != 0) return id;  // missing: differs from any real file
  id.dev = st.st_dev;
  id.ino = st.st_ino;
  id.size = st.st_size;
  id.mtime_ns = int64_t(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return id;
}

Status CertificateHolder::Reload() {
  std::lock_guard<std::mutex> lock(reload_mu_);
  // Identify before reading: a change during the read is then seen by the next check.
  last_ids_ = {Identify(cert_file_), Identify(key_file_)};
  auto pair = ReadPair(cert_file_, key_file_);
  if (!pair.ok()) {
    load_failures_.fetch_add(1);
    spdlog::error("TLS: serving certificate NOT (re)loaded, {}: {}",
                  Current() ? "keeping the previous one" : "none in force", pair.error());
    return pair.status();
  }
  spdlog::info("TLS: serving certificate loaded from {}: subject {}, valid until {}", cert_file_,
               pair.value()->subject, pair.value()->not_after);
  {
    std::lock_guard<std::mutex> l(mu_);
    current_ = std::move(pair).value();
  }
  loads_.fetch_add(1);
  return Status::Ok();
}

void CertificateHolder::MaybeReload() {
  const int64_t now = SteadyNs();
  if (now < next_check_ns_.load(std::memory_order_relaxed)) return;
  std::unique_lock<std::mutex> lock(reload_mu_, std::try_to_lock);
  if (!lock.owns_lock()) return;  // another handshake is checking
  next_check_ns_.store(
      now + std::chrono::duration_cast<std::chrono::nanoseconds>(check_interval_).count(),
      std::memory_order_relaxed);
  const std::pair<FileId, FileId> ids{Identify(cert_file_), Identify(key_file_)};
  if (ids == last_ids_) return;
  lock.unlock();
  Reload();
}

std::shared_ptr<const CertificateHolder::Pair> CertificateHolder::Current() const {
  std::lock_guard<std::mutex> l(mu_);
  return current_;
}

// ---------------------------------------------------------------------------------------------
// WebhookServer

struct WebhookServer::Impl {
  Impl(ConfigStore* s, WebhookServerOptions o)
      : store(s),
        options(std::move(o)),
        certs(options.cert_file, options.key_file, options.cert_check_interval) {}

  void Handle(const httplib::Request& req, httplib::Response& res);
  void Routes();

  ConfigStore* store;
  WebhookServerOptions options;
  CertificateHolder certs;
  std::unique_ptr<httplib::SSLServer> server;
  std::thread thread;
  int port = -1;
  std::atomic<bool> draining{false};
  std::atomic<bool> stopped{false};
};

void WebhookServer::Impl::Handle(const httplib::Request& req, httplib::Response& res) {
  const auto start = std::chrono::steady_clock::now();
  bool patched = false;
  struct Report {  // every way out of here is one review answered
    const WebhookServerOptions& o;
    const httplib::Response& res;
    const bool& patched;
    const std::chrono::steady_clock::time_point start;
    ~Report() {
      if (o.on_review) o.on_review(res.status, patched, std::chrono::steady_clock::now() - start);
    }
  } report{options, res, patched, start};
  if (!IsJsonContentType(req.get_header_value("Content-Type"))) {
    Text(res, 415,
         "Content-Type must be application/json, got '" + req.get_header_value("Content-Type") +
             "'");
    spdlog::warn("POST /mutate from {}: 415 wrong content type", req.remote_addr);
    return;
  }
  // The snapshot is held for the whole decision: a reload never changes it midway.
  std::shared_ptr<const Config> config = store->Current();
  AdmissionOutcome o = Admit(req.body, *config, options.limits);
  res.status = o.http_status;
  res.set_content(std::move(o.body), o.content_type);
  patched = o.patched;
  if (o.http_status != 200) {
    spdlog::warn("POST /mutate from {}: {} {}", req.remote_addr, o.http_status, o.message);
    return;
  }
  if (spdlog::should_log(spdlog::level::debug)) {
    spdlog::debug(
        "admission uid={} pod={} patched={} {} ({:.3f} ms)", o.uid, o.pod, o.patched, o.message,
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
            .count());
  }
}

void WebhookServer::Impl::Routes() {
  httplib::SSLServer& s = *server;
  // Before the body is read: a compressed body could inflate past every limit.
  s.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    const std::string enc = req.get_header_value("Content-Encoding");
    if (!enc.empty() && enc != "identity") {
      Text(res, 415, "Content-Encoding '" + enc + "' is not accepted; send the body uncompressed");
      res.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    }
    // cpp-httplib 0.11 checks the body limit only against Content-Length: a chunked body is
    // read whole first (64 MiB measured). The API server always sends a Content-Length.
    const std::string te = req.get_header_value("Transfer-Encoding");
    if (!te.empty() && te != "identity") {
      Text(res, 411,
           "Transfer-Encoding '" + te + "' is not accepted; send the body with a Content-Length");
      res.set_header("Connection", "close");
      return httplib::Server::HandlerResponse::Handled;
    }
    return httplib::Server::HandlerResponse::Unhandled;
  });
  s.Post("/mutate", [this](const httplib::Request& req, httplib::Response& res) {
    ConnectionWorkerPool::RequestStarted();  // complete: never evicted while it is answered
    Handle(req, res);
  });
  s.Get("/healthz", [](const httplib::Request&, httplib::Response& res) { Text(res, 200, "ok"); });
  s.Get("/readyz", [this](const httplib::Request&, httplib::Response& res) {
    if (draining.load()) return Text(res, 503, "shutting down");
    if (!store->HasGoodConfig()) {
      return Text(res, 503,
                  "no good config loaded from " + store->path() + ": " + store->Stats().last_error);
    }
    Text(res, 200, "ok");
  });
  // httplib answers unknown routes and oversized bodies with an empty body: say what it was.
  s.set_error_handler(
      [limit = options.limits.max_body_bytes](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return;
        switch (res.status) {
          case 404:
            if (req.path == "/mutate" || req.path == "/healthz" || req.path == "/readyz") {
              return Text(res, 405, "method " + req.method + " not allowed on " + req.path);
            }
            return Text(res, 404, "not found: POST /mutate, GET /healthz, GET /readyz");
          case 413:
            return Text(res, 413,
                        "request body exceeds the limit of " + std::to_string(limit) + " bytes");
          default:
            return Text(res, res.status, "bad request");
        }
      });
}

WebhookServer::WebhookServer(ConfigStore* store, WebhookServerOptions options)
    : impl_(std::make_unique<Impl>(store, std::move(options))) {}

WebhookServer::~WebhookServer() { Stop(); }

Status WebhookServer::Start() {
  Impl& m = *impl_;
  if (m.server) return Status::Error("already started");
  if (Status s = m.certs.Reload(); !s.ok()) return s;
  m.server = std::make_unique<httplib::SSLServer>([&m](SSL_CTX& ctx) {
    SSL_CTX_set_min_proto_version(&ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(
        &ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_set_cipher_list(&ctx, kTls12Ciphers) != 1) return false;
    SSL_CTX_set_cert_cb(&ctx, CertCallback, &m.certs);
    SSL_CTX_set_info_callback(&ctx, InfoCallback);
    return true;
  });
  if (!m.server->is_valid()) return Status::Error("TLS setup failed: " + OpenSslErrors());
  const int threads = std::max(1, m.options.threads);
  // Newest connection first, and slow or idle ones evicted while others wait (slowloris).
  m.server->new_task_queue = [threads] {
    return new ConnectionWorkerPool({.threads = size_t(threads)});
  };
  // Called once a response is written: the connection now waits for its next request. The
  // pool relies on it: chain to it rather than replace it.
  m.server->set_logger([](const httplib::Request&, const httplib::Response&) {
    ConnectionWorkerPool::RequestDone();
  });
  m.server->set_read_timeout(m.options.read_timeout);
  m.server->set_write_timeout(m.options.write_timeout);
  m.server->set_keep_alive_timeout(m.options.keep_alive_timeout.count());
  // httplib closes a connection after 5 requests by default: a TLS handshake every 5 reviews.
  m.server->set_keep_alive_max_count(m.options.keep_alive_max_requests);
  m.server->set_payload_max_length(m.options.limits.max_body_bytes);
  m.server->set_tcp_nodelay(true);
  // httplib's default sets SO_REUSEPORT: a second webhook could then bind the same port and take
  // half the reviews. SO_REUSEADDR only (a restart may rebind while old connections linger).
  m.server->set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  m.Routes();

  std::string host = m.options.host;
  bool bound = false;
  for (const std::string& h :
       host.empty() ? std::vector<std::string>{"::", "0.0.0.0"} : std::vector<std::string>{host}) {
    if (m.options.port == 0) {
      m.port = m.server->bind_to_any_port(h);
      bound = m.port > 0;
    } else {
      bound = m.server->bind_to_port(h, m.options.port);
      m.port = m.options.port;
    }
    if (bound) break;
  }
  if (!bound) {
    return Status::Error("cannot listen on " + (host.empty() ? "*" : host) + ":" +
                         std::to_string(m.options.port) + ": " + std::strerror(errno));
  }
  m.thread = std::thread([&m] {
    if (!m.server->listen_after_bind() && !m.stopped.load()) {
      spdlog::critical("webhook: the listening socket failed");
    }
  });
  return Status::Ok();
}

int WebhookServer::port() const { return impl_->port; }

Status WebhookServer::ReloadCertificate() { return impl_->certs.Reload(); }

uint64_t WebhookServer::certificate_loads() const { return impl_->certs.loads(); }

uint64_t WebhookServer::certificate_load_failures() const { return impl_->certs.load_failures(); }

void WebhookServer::BeginDrain() { impl_->draining.store(true); }

void WebhookServer::Stop() {
  Impl& m = *impl_;
  if (!m.server || m.stopped.exchange(true)) return;
  m.draining.store(true);
  m.server->stop();
  if (m.thread.joinable()) m.thread.join();
}

}  // namespace registry_proxy
