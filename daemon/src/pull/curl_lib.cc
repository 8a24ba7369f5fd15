#include "pull/curl_lib.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>

namespace registry_proxy {
namespace {

constexpr char kSoname[] = "libcurl.so.4";

std::atomic<bool> g_loaded{false};

template <typename Fn>
bool Resolve(void* handle, const char* name, Fn* out, std::string* error) {
  *out = reinterpret_cast<Fn>(dlsym(handle, name));
  if (*out == nullptr) *error = std::string(kSoname) + " has no " + name;
  return *out != nullptr;
}

bool ResolveAll(void* h, CurlLib* c, std::string* e) {
  return Resolve(h, "curl_easy_init", &c->easy_init, e) &&
         Resolve(h, "curl_easy_cleanup", &c->easy_cleanup, e) &&
         Resolve(h, "curl_easy_setopt", &c->easy_setopt, e) &&
         Resolve(h, "curl_easy_getinfo", &c->easy_getinfo, e) &&
         Resolve(h, "curl_easy_strerror", &c->easy_strerror, e) &&
         Resolve(h, "curl_multi_init", &c->multi_init, e) &&
         Resolve(h, "curl_multi_cleanup", &c->multi_cleanup, e) &&
         Resolve(h, "curl_multi_add_handle", &c->multi_add_handle, e) &&
         Resolve(h, "curl_multi_remove_handle", &c->multi_remove_handle, e) &&
         Resolve(h, "curl_multi_perform", &c->multi_perform, e) &&
         Resolve(h, "curl_multi_poll", &c->multi_poll, e) &&
         Resolve(h, "curl_multi_info_read", &c->multi_info_read, e);
}

struct Loaded {
  CurlLib lib{};
  bool ok = false;
  std::string error;
};

Loaded Load() {
  Loaded l;
  // Never unloaded: libcurl's global state lives as long as the process.
  void* handle = dlopen(kSoname, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    l.error = std::string("cannot load ") + kSoname + ": " + (why ? why : "unknown error");
    return l;
  }
  using GlobalInit = decltype(&::curl_global_init);
  GlobalInit global_init = nullptr;
  if (!ResolveAll(handle, &l.lib, &l.error) ||
      !Resolve(handle, "curl_global_init", &global_init, &l.error)) {
    return l;
  }
  if (global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    l.error = std::string(kSoname) + ": curl_global_init failed";
    return l;
  }
  l.ok = true;
  g_loaded.store(true);
  return l;
}

}  // namespace

const CurlLib* LoadCurl(std::string* error) {
  static const Loaded loaded = Load();  // once, thread-safe
  if (!loaded.ok) *error = loaded.error;
  return loaded.ok ? &loaded.lib : nullptr;
}

bool CurlLoaded() { return g_loaded.load(); }

}  // namespace registry_proxy
