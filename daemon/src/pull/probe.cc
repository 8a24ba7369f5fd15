#include "pull/probe.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>

#include "pull/curl_lib.h"

namespace registry_proxy {
namespace {

using SteadyClock = std::chrono::steady_clock;
using std::chrono::milliseconds;

struct EasyDeleter {
  const CurlLib* lib;
  void operator()(CURL* c) const { lib->easy_cleanup(c); }
};
struct MultiDeleter {
  const CurlLib* lib;
  void operator()(CURLM* m) const { lib->multi_cleanup(m); }
};

// The body is not needed: the first byte of it ends the transfer (the status is known by then).
size_t DiscardBody(char*, size_t, size_t, void*) { return 0; }

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Why a transfer that got no HTTP answer failed, in a few words.
std::string Describe(const CurlLib& curl, CURLcode rc, const char* errbuf, long os_errno) {
  const std::string err = *errbuf != '\0' ? errbuf : curl.easy_strerror(rc);
  std::string out;
  switch (rc) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_WEIRD_SERVER_REPLY:
      return "not an HTTP answer";
    case CURLE_SSL_CONNECT_ERROR:
      out = "TLS handshake failed: " + err;
      break;
    case CURLE_GOT_NOTHING:
      out = "connection closed without an answer";
      break;
    default:
      out = err;
  }
  if (os_errno != 0) out += std::string(" (") + std::strerror(static_cast<int>(os_errno)) + ")";
  return Lower(out);
}

// Sets up one GET of target through `proxy` ("" = direct), bounded by `budget`.
void Configure(const CurlLib& curl, CURL* c, const std::string& url, const std::string& proxy,
               milliseconds budget, char* errbuf) {
  curl.easy_setopt(c, CURLOPT_URL, url.c_str());
  curl.easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
  curl.easy_setopt(c, CURLOPT_PROXY, proxy.c_str());  // "" = no proxy, whatever the env says
  curl.easy_setopt(c, CURLOPT_NOPROXY, "");           // the env's no_proxy is not read either
  curl.easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
  curl.easy_setopt(c, CURLOPT_TIMEOUT_MS, static_cast<long>(budget.count()));
  curl.easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(budget.count()));
  curl.easy_setopt(c, CURLOPT_HTTP_VERSION, CURL_HTTP_VERSION_1_1);
  curl.easy_setopt(c, CURLOPT_USERAGENT, "registry-proxy-probe");  // how registries tell probes
  curl.easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 0L);                 // see probe.h
  curl.easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 0L);
  curl.easy_setopt(c, CURLOPT_SSLVERSION, CURL_SSLVERSION_TLSv1_2);
  curl.easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
  curl.easy_setopt(c, CURLOPT_WRITEFUNCTION, DiscardBody);
  curl.easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
}

// The proxy URL without its user:password@, for logs.
std::string Redacted(const std::string& proxy) {
  const size_t sep = proxy.find("://");
  const size_t begin = sep == std::string::npos ? 0 : sep + 3;
  const size_t at = proxy.find('@', begin);
  if (at == std::string::npos || proxy.find('/', begin) < at) return proxy;
  return proxy.substr(0, begin) + proxy.substr(at + 1);
}

}  // namespace

ProbeResult ProbeWithProxyEnv(const ProbeTarget& target, const ProxyEnv& env,
                              SteadyClock::time_point deadline, const std::atomic<bool>& stop) {
  ProbeResult r;
  const std::string proxy = ProxyFor(env, target.scheme, target.host);
  r.proxy = Redacted(proxy);
  const auto start = SteadyClock::now();
  const milliseconds budget = std::chrono::ceil<milliseconds>(deadline - start);
  const std::string timed_out = "no answer within " + std::to_string(budget.count()) + "ms";
  if (budget.count() <= 0) {
    r.detail = timed_out;
    return r;
  }
  std::string load_error;
  const CurlLib* curl = LoadCurl(&load_error);
  if (curl == nullptr) {
    // Without libcurl there is no probe; the pull attempt itself will tell whether the mirror
    // answers, so the mirror is not called dead for our own missing library.
    r.alive = true;
    r.detail = "not probed: " + load_error;
    return r;
  }
  std::unique_ptr<CURL, EasyDeleter> easy(curl->easy_init(), EasyDeleter{curl});
  std::unique_ptr<CURLM, MultiDeleter> multi(curl->multi_init(), MultiDeleter{curl});
  if (!easy || !multi) {
    r.detail = "libcurl initialisation failed";
    return r;
  }
  char errbuf[CURL_ERROR_SIZE] = "";
  Configure(*curl, easy.get(), target.Url(), proxy, budget, errbuf);
  curl->multi_add_handle(multi.get(), easy.get());
  // Driven here (not curl_easy_perform) so that `stop` ends it within 50 ms.
  int running = 1;
  CURLcode rc = CURLE_OK;
  bool stopped = false;
  while (running > 0) {
    if (stop.load()) {
      stopped = true;
      break;
    }
    curl->multi_perform(multi.get(), &running);
    if (running > 0) curl->multi_poll(multi.get(), nullptr, 0, 50, nullptr);
  }
  int left = 0;
  if (!stopped) {
    while (CURLMsg* m = curl->multi_info_read(multi.get(), &left)) {
      if (m->msg == CURLMSG_DONE) rc = m->data.result;
    }
  }
  long status = 0, os_errno = 0;
  curl->easy_getinfo(easy.get(), CURLINFO_RESPONSE_CODE, &status);
  curl->easy_getinfo(easy.get(), CURLINFO_OS_ERRNO, &os_errno);
  curl->multi_remove_handle(multi.get(), easy.get());
  if (stopped) {
    r.detail = "probe stopped";
  } else if (status > 0 && (rc == CURLE_OK || rc == CURLE_WRITE_ERROR)) {
    r.http_status = static_cast<int>(status);
    r.alive = r.http_status < 500;
    r.detail = "HTTP " + std::to_string(r.http_status);
  } else if (rc == CURLE_OPERATION_TIMEDOUT) {
    r.detail = timed_out;
  } else {
    r.detail = Describe(*curl, rc, errbuf, os_errno);
  }
  if (!r.proxy.empty() && !stopped) r.detail += " (via proxy " + r.proxy + ")";
  return r;
}

ProbeResult HttpProbe(const ProbeTarget& target, SteadyClock::time_point deadline,
                      const std::atomic<bool>& stop) {
  return ProbeWithProxyEnv(target, ProxyEnvFromEnvironment(), deadline, stop);
}

}  // namespace registry_proxy
