// The credentials file loader. Small and strict; see credentials.h for the format.
//
// The config loader's YAML machinery (config.cc) is private to it; this file is one flat map
// of short maps, so yaml-cpp's node API is enough: its map iteration yields duplicate keys
// (so they can be reported), and marks give line and column. Secret values never reach a
// message: errors name keys and positions only.
#include "pull/credentials.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <set>
#include <utility>
#include <variant>
#include <vector>

#include "base/file_util.h"
#include "base/string_util.h"

namespace registry_proxy {
namespace {

constexpr size_t kMaxBytes = size_t{1} << 20;  // a Secret holds at most 1 MiB

const std::vector<std::string_view> kEntryKeys = {"username", "password", "auth", "identityToken"};

// "file:line:col: field: message", positions 1-based as in config errors.
std::string At(std::string_view source, const YAML::Mark& mark, std::string_view field,
               std::string_view message) {
  std::string out(source);
  if (!mark.is_null() && mark.line >= 0) {
    out += ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
  }
  out += ": ";
  if (!field.empty()) out.append(field).append(": ");
  out.append(message);
  return out;
}

// Keys are names chosen by the admin, not secrets; still keep a message on one short line.
std::string QuoteKey(std::string_view key) {
  std::string out = "'";
  for (char c : key.substr(0, 80)) out.push_back(static_cast<unsigned char>(c) < 0x20 ? '?' : c);
  if (key.size() > 80) out += "...";
  return out + "'";
}

// Only plain or quoted scalars, or an explicit !!str: "!!binary" and friends are mistakes.
bool IsStringScalar(const YAML::Node& n) {
  if (!n.IsScalar()) return false;
  const std::string& tag = n.Tag();
  return tag == "?" || tag == "!" || tag == "tag:yaml.org,2002:str";
}

class Parser {
 public:
  explicit Parser(std::string_view source) : source_(source) {}

  // Fills `entries`; on any error returns all of them, one per line.
  Status Run(std::string_view yaml, std::map<std::string, RegistryAuth, std::less<>>& entries);

 private:
  void Error(const YAML::Mark& mark, std::string_view field, std::string_view message) {
    if (errors_.size() < 50) errors_.push_back(At(source_, mark, field, message));
  }
  void Entry(const YAML::Node& key, const YAML::Node& value,
             std::map<std::string, RegistryAuth, std::less<>>& entries);

  std::string source_;
  std::vector<std::string> errors_;
};

void Parser::Entry(const YAML::Node& key, const YAML::Node& value,
                   std::map<std::string, RegistryAuth, std::less<>>& entries) {
  const std::string name = key.Scalar();
  const std::string field = "credentials." + name;
  if (!value.IsMap()) {
    Error(value.IsNull() ? key.Mark() : value.Mark(), field,
          "must be a map with username and password, auth, or identityToken");
    return;
  }
  RegistryAuth a;
  std::set<std::string> seen;
  bool ok = true;
  for (auto it = value.begin(); it != value.end(); ++it) {
    const YAML::Node k = it->first;
    const YAML::Node v = it->second;
    if (!k.IsScalar()) {
      Error(k.Mark(), field, "keys must be strings");
      ok = false;
      continue;
    }
    const std::string& kn = k.Scalar();
    const std::string kfield = field + "." + kn;
    if (std::find(kEntryKeys.begin(), kEntryKeys.end(), kn) == kEntryKeys.end()) {
      Error(k.Mark(), kfield,
            "unknown key " + QuoteKey(kn) +
                "; known keys are username, password, auth, "
                "identityToken");
      ok = false;
      continue;
    }
    if (!seen.insert(kn).second) {
      Error(k.Mark(), kfield, "duplicate key");
      ok = false;
      continue;
    }
    // The value itself is never described: it may be a secret.
    if (!IsStringScalar(v) || v.Scalar().empty()) {
      Error(v.IsNull() ? k.Mark() : v.Mark(), kfield, "must be a non-empty string");
      ok = false;
      continue;
    }
    const std::string& s = v.Scalar();
    if (kn == "username") {
      a.username = s;
    } else if (kn == "password") {
      a.password = s;
    } else if (kn == "auth") {
      a.auth = s;
    } else {
      a.identity_token = s;
    }
  }
  if (!ok) return;
  const bool basic = !a.username.empty() || !a.password.empty();
  const int forms = int(basic) + int(!a.auth.empty()) + int(!a.identity_token.empty());
  if (forms != 1) {
    Error(key.Mark(), field,
          forms == 0 ? "needs username and password, auth, or identityToken"
                     : "has more than one of username/password, auth and identityToken; keep one");
    return;
  }
  if (basic && (a.username.empty() || a.password.empty())) {
    Error(key.Mark(), field,
          a.username.empty() ? "password without username"
                             : "username "
                               "without "
                               "password");
    return;
  }
  if (!a.auth.empty()) {
    std::string decoded;
    if (!Base64Decode(a.auth, &decoded) || decoded.find(':') == std::string::npos) {
      Error(key.Mark(), field + ".auth", "must be base64 of \"username:password\"");
      return;
    }
  }
  entries.emplace(name, std::move(a));
}

Status Parser::Run(std::string_view yaml,
                   std::map<std::string, RegistryAuth, std::less<>>& entries) {
  if (yaml.size() > kMaxBytes) {
    return Status::Error(source_ + ": credentials file is larger than 1 MiB");
  }
  YAML::Node root;
  try {
    root = YAML::Load(std::string(yaml));
  } catch (const YAML::Exception& e) {
    // yaml-cpp's messages describe the syntax, not the text, so no secret leaks through them.
    return Status::Error(At(source_, e.mark, "", "invalid YAML: " + e.msg));
  }
  if (root.IsNull()) {
    return Status::Error(source_ + ": credentials file is empty; write 'credentials: {}' for none");
  }
  if (!root.IsMap()) {
    return Status::Error(At(source_, root.Mark(), "", "must be a map with the key 'credentials'"));
  }
  bool has_credentials = false;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const YAML::Node k = it->first;
    const YAML::Node v = it->second;
    if (!k.IsScalar() || k.Scalar() != "credentials") {
      Error(k.Mark(), "",
            "unknown key " + (k.IsScalar() ? QuoteKey(k.Scalar()) : std::string("(not a string)")) +
                "; the only key is 'credentials'");
      continue;
    }
    if (has_credentials) {
      Error(k.Mark(), "credentials", "duplicate key");
      continue;
    }
    has_credentials = true;
    if (v.IsNull()) continue;  // "credentials:" = none
    if (!v.IsMap()) {
      Error(v.Mark(), "credentials", "must be a map of name -> credentials");
      continue;
    }
    std::set<std::string> names;
    for (auto e = v.begin(); e != v.end(); ++e) {
      const YAML::Node name = e->first;
      const YAML::Node entry = e->second;
      if (!name.IsScalar() || name.Scalar().empty()) {
        Error(name.Mark(), "credentials", "names must be non-empty strings");
        continue;
      }
      if (!names.insert(name.Scalar()).second) {
        Error(name.Mark(), "credentials." + name.Scalar(), "duplicate name");
        continue;
      }
      Entry(name, entry, entries);
    }
  }
  if (!errors_.empty()) {
    std::string all;
    for (const auto& e : errors_) all += (all.empty() ? "" : "\n") + e;
    return Status::Error(all);
  }
  return Status::Ok();
}

}  // namespace

Result<std::shared_ptr<const Credentials>> Credentials::Parse(std::string_view yaml,
                                                              std::string_view source) {
  try {
    auto creds = std::shared_ptr<Credentials>(new Credentials());
    Parser parser(source.empty() ? "<string>" : source);
    if (Status s = parser.Run(yaml, creds->entries_); !s.ok()) return s;
    return std::shared_ptr<const Credentials>(std::move(creds));
  } catch (const std::exception& e) {
    return Status::Error(std::string(source) + ": internal error loading credentials: " + e.what());
  }
}

Result<std::shared_ptr<const Credentials>> Credentials::LoadFile(const std::string& path) {
  auto file = ReadRegularFile(path, kMaxBytes);
  if (const auto* e = std::get_if<FileError>(&file)) {
    return Status::Error(path + ": " + e->Message("credentials file"));
  }
  const FileContents& f = std::get<FileContents>(file);
  if (f.mode & (S_IRGRP | S_IROTH)) {
    spdlog::warn("credentials file {} is readable by {} (mode {:o}); chmod 600 it", path,
                 (f.mode & S_IROTH) ? "everyone" : "its group", f.mode & 0777);
  }
  return Parse(f.data, path);
}

const RegistryAuth* Credentials::Find(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

Result<std::shared_ptr<const Credentials>> CredentialsCache::Get(const std::string& path) {
  std::lock_guard lock(mu_);
  if (path != path_) {
    path_ = path;
    seen_valid_ = false;
    good_.reset();
    last_error_.clear();
  }
  Identity now;
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    now = Identity{st.st_dev, st.st_ino, st.st_size, st.st_mtim};
  } else {
    now.size = -2;  // "missing": differs from every real identity and from "never seen"
  }
  if (!(seen_valid_ && now == seen_)) {
    seen_ = now;
    seen_valid_ = true;
    auto loaded = Credentials::LoadFile(path);
    if (loaded.ok()) {
      if (good_)
        spdlog::info("credentials file {} reloaded: {} entries", path, loaded->get()->size());
      good_ = std::move(loaded).value();
      last_error_.clear();
    } else {
      last_error_ = loaded.error();
      if (good_) {
        spdlog::error("credentials file {} is bad; keeping the version read before: {}", path,
                      last_error_);
      } else {
        spdlog::error("credentials file {} cannot be used: {}", path, last_error_);
      }
    }
  }
  if (good_) return good_;
  return Status::Error(last_error_);
}

}  // namespace registry_proxy
