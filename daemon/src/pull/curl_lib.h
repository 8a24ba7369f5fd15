// libcurl, loaded when the first probe needs it (dlopen of libcurl.so.4), not when the daemon
// starts. Debian's libcurl brings GnuTLS, p11-kit, Kerberos, LDAP, libssh2 and more, whose
// constructors run at load: about 4.5 MiB of resident memory in every `serve` process, most of
// which never probes (probing is off, or no mirror has failed yet). systemd loads its optional
// libraries the same way. The bundle and the .deb ship libcurl.so.4 (scripts/bundle.sh).
#pragma once

#include <curl/curl.h>

#include <string>

namespace registry_proxy {

// The libcurl functions the probe uses.
struct CurlLib {
  decltype(&::curl_easy_init) easy_init;
  decltype(&::curl_easy_cleanup) easy_cleanup;
  CURLcode (*easy_setopt)(CURL*, CURLoption, ...);
  CURLcode (*easy_getinfo)(CURL*, CURLINFO, ...);
  decltype(&::curl_easy_strerror) easy_strerror;
  decltype(&::curl_multi_init) multi_init;
  decltype(&::curl_multi_cleanup) multi_cleanup;
  decltype(&::curl_multi_add_handle) multi_add_handle;
  decltype(&::curl_multi_remove_handle) multi_remove_handle;
  decltype(&::curl_multi_perform) multi_perform;
  decltype(&::curl_multi_poll) multi_poll;
  decltype(&::curl_multi_info_read) multi_info_read;
};

// libcurl, loaded and initialised (curl_global_init) on the first call; thread-safe. Null when
// it cannot be loaded, with the reason in *error (the same on every later call).
const CurlLib* LoadCurl(std::string* error);

// Whether libcurl is in this process yet (for tests and the idle-memory check).
bool CurlLoaded();

}  // namespace registry_proxy
