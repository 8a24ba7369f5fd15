// Per-mirror pull credentials: the YAML file named by `node.credentialsFile`.
//
//   credentials:            # the only top-level key
//     corp:                 # a name, referenced by a mirror's `credentials: corp` in the config
//       username: robot
//       password: s3cret
//     gcr-mirror:
//       auth: cm9ib3Q6czNjcmV0   # base64("user:password"), as in a docker config.json
//     acr:
//       identityToken: eyJ...    # an OAuth2 refresh token (registry token exchange)
//
// Each entry has exactly one form: username+password, auth, or identityToken. The loader is
// strict like the config loader: unknown keys, duplicate names, missing or mixed forms, a
// non-string value and bad base64 are errors with file:line:column. Error messages never quote
// a secret value (only key names and positions).
//
// The file should be readable by root only; a group- or world-readable file loads, with a
// warning. The file is separate from the config because the config is a ConfigMap (readable by
// many) while credentials belong in a Secret or a root-only file on the host.
//
// Thread safety: a Credentials is immutable once loaded and safe to share. CredentialsCache is
// thread-safe: Get() may be called concurrently from any thread.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "base/status.h"

namespace registry_proxy {

// What containerd's CRI accepts in runtime.v1.AuthConfig; exactly one form is set.
struct RegistryAuth {
  std::string username;
  std::string password;
  std::string auth;  // base64("user:password")
  std::string identity_token;
};

class Credentials {
 public:
  // Parses the YAML text; `source` names it in errors ("file:line:col: field: message").
  static Result<std::shared_ptr<const Credentials>> Parse(std::string_view yaml,
                                                          std::string_view source);
  // Reads and parses a file (regular files only, at most 1 MiB). Warns if others can read it.
  static Result<std::shared_ptr<const Credentials>> LoadFile(const std::string& path);

  // The entry called `name`, or nullptr.
  const RegistryAuth* Find(std::string_view name) const;
  size_t size() const { return entries_.size(); }

 private:
  std::map<std::string, RegistryAuth, std::less<>> entries_;
};

// Loads the credentials file on demand and caches it by the file's identity (device, inode,
// size, mtime): a Get() costs one stat() while the file is unchanged, and a changed file (a
// Secret volume swaps a symlink; an editor renames) is re-read on the next pull that needs it.
// No watcher thread: credentials are only needed by pulls from mirrors that name them.
//
// A bad or unreadable file never replaces a good one read earlier from the same path (the
// error is logged once per file version, and the good one stays in use): a half-written file
// must not turn every mirror pull anonymous. An error is returned only when no good version of
// that path was ever read.
class CredentialsCache {
 public:
  Result<std::shared_ptr<const Credentials>> Get(const std::string& path);

 private:
  struct Identity {
    dev_t dev = 0;
    ino_t ino = 0;
    off_t size = -1;
    timespec mtime{};
    bool operator==(const Identity& o) const {
      return dev == o.dev && ino == o.ino && size == o.size && mtime.tv_sec == o.mtime.tv_sec &&
             mtime.tv_nsec == o.mtime.tv_nsec;
    }
  };

  std::mutex mu_;
  // All guarded by mu_. Loading happens under mu_: the file is small and loads are rare, and
  // concurrent pulls that need it would otherwise each read it.
  std::string path_;                         // the path the fields below describe
  Identity seen_;                            // the last version looked at (good or bad)
  bool seen_valid_ = false;                  // seen_ describes a version of path_
  std::shared_ptr<const Credentials> good_;  // last good version of path_, or null
  std::string last_error_;                   // why the last version looked at was bad
};

}  // namespace registry_proxy
