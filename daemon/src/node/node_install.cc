#include "node/node_install.h"

#include <fcntl.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <thread>
#include <tuple>
#include <variant>

#include "base/cli_args.h"
#include "base/file_util.h"
#include "base/proxy_env.h"
#include "base/signals.h"
#include "containerd/cri_client.h"
#include "cri/cri_server.h"
#include "rules/config.h"
#include "rules/config_store.h"

extern char** environ;

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;

constexpr char kUnitName[] = "registry-proxy.service";
constexpr char kKubeletUnit[] = "kubelet.service";
constexpr char kInstallDir[] = "/opt/registry-proxy";
constexpr char kBinPath[] = "/opt/registry-proxy/bin/registry-proxy";
constexpr char kLibDir[] = "/opt/registry-proxy/lib";
constexpr char kManifestPath[] = "/opt/registry-proxy/install-manifest";
constexpr char kUnitPath[] = "/etc/systemd/system/registry-proxy.service";
constexpr char kSocketName[] = "registry-proxy.socket";
constexpr char kSocketPath[] = "/etc/systemd/system/registry-proxy.socket";
constexpr char kRuntimeDir[] = "/run/registry-proxy";
constexpr char kProxyDropInPath[] =
    "/etc/systemd/system/registry-proxy.service.d/50-containerd-proxy.conf";
constexpr char kConfigPath[] = "/etc/registry-proxy/config.yaml";
constexpr char kBackupSuffix[] = ".registry-proxy.bak";
constexpr char kKubeletKey[] = "imageServiceEndpoint";
constexpr char kCrictlKey[] = "image-endpoint";
constexpr size_t kMaxBinaryBytes = size_t{1} << 30;
constexpr size_t kMaxTextBytes = size_t{16} << 20;

std::string Errno(int err) { return std::strerror(err); }

// ---------------------------------------------------------------------------------------------
// Files

// The file at `path` if there is one; nullopt if there is none; an error if it cannot be read
// or is not a regular file.
Result<std::optional<FileContents>> ReadIfExists(const std::string& path, size_t max_bytes) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<FileContents>();
    return Status::Error("cannot stat " + path + ": " + Errno(errno));
  }
  auto r = ReadRegularFile(path, max_bytes);
  if (auto* e = std::get_if<FileError>(&r)) return Status::Error(e->Message(path));
  return std::optional<FileContents>(std::move(std::get<FileContents>(r)));
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

// Writes `content` to `path` with `mode`: a temp file in the same directory, fsync, rename.
// Readers see the old file or the new one, never a part.
Status WriteFileAtomic(const std::string& path, std::string_view content, mode_t mode) {
  const fs::path p(path);
  std::string tmpl = (p.parent_path() / ("." + p.filename().string() + ".rp-tmp-XXXXXX")).string();
  const int fd = ::mkstemp(tmpl.data());
  if (fd < 0)
    return Status::Error("cannot create a temp file next to " + path + ": " + Errno(errno));
  auto fail = [&](const std::string& what) {
    const int e = errno;
    ::close(fd);
    ::unlink(tmpl.c_str());
    return Status::Error("cannot " + what + " " + path + ": " + Errno(e));
  };
  size_t off = 0;
  while (off < content.size()) {
    const ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail("write");
    }
    off += static_cast<size_t>(n);
  }
  if (::fchmod(fd, mode) != 0) return fail("chmod");
  if (::fsync(fd) != 0) return fail("fsync");
  if (::close(fd) != 0) {
    const int e = errno;
    ::unlink(tmpl.c_str());
    return Status::Error("cannot write " + path + ": " + Errno(e));
  }
  if (::rename(tmpl.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmpl.c_str());
    return Status::Error("cannot rename a temp file to " + path + ": " + Errno(e));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// The install manifest: what uninstall must revert. Host paths, one entry per line:
//   dir  PATH        a directory an install created (removed if empty)
//   file PATH        a file an install wrote (PATH.registry-proxy.bak restored if present)
//   edit PATH KEY    a YAML file whose KEY line an install set (backup at PATH.registry-proxy.bak)

struct Manifest {
  std::set<std::string> dirs;
  std::set<std::string> files;
  std::map<std::string, std::string> edits;

  std::string Serialize() const {
    std::string out =
        "# registry-proxy node install: what `registry-proxy node uninstall` reverts.\n";
    for (const auto& d : dirs) out += "dir\t" + d + "\n";
    for (const auto& f : files) out += "file\t" + f + "\n";
    for (const auto& [path, key] : edits) out += "edit\t" + path + "\t" + key + "\n";
    return out;
  }

  static Result<Manifest> Parse(std::string_view text, const std::string& where) {
    Manifest m;
    std::istringstream in{std::string(text)};
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      ++n;
      if (line.empty() || line[0] == '#') continue;
      std::vector<std::string> f;
      std::istringstream fields(line);
      for (std::string x; std::getline(fields, x, '\t');) f.push_back(x);
      auto bad = [&] {
        return Status::Error(where + ":" + std::to_string(n) + ": unexpected entry '" + line + "'");
      };
      if (f.size() < 2 || f[1].empty() || f[1][0] != '/') return bad();
      if (f[0] == "dir" && f.size() == 2) {
        m.dirs.insert(f[1]);
      } else if (f[0] == "file" && f.size() == 2) {
        m.files.insert(f[1]);
      } else if (f[0] == "edit" && f.size() == 3) {
        m.edits[f[1]] = f[2];
      } else {
        return bad();
      }
    }
    return m;
  }
};

// A host's filesystem seen from here: host paths are joined to the root.
class Host {
 public:
  explicit Host(std::string root) : root_(std::move(root)) {
    while (root_.size() > 1 && root_.back() == '/') root_.pop_back();
  }
  std::string Path(std::string_view host_path) const {
    return root_ == "/" ? std::string(host_path) : root_ + std::string(host_path);
  }
  const std::string& root() const { return root_; }

  // Creates the missing directories of `host_dir` (0755), recording each in `m`.
  Status MakeDirs(const std::string& host_dir, Manifest* m) const {
    std::vector<std::string> missing;
    for (fs::path p(host_dir); !p.empty() && p != p.root_path(); p = p.parent_path()) {
      struct stat st {};
      const std::string real = Path(p.string());
      if (::stat(real.c_str(), &st) == 0) {
        if (!S_ISDIR(st.st_mode)) return Status::Error(real + " exists and is not a directory");
        break;
      }
      missing.push_back(p.string());
    }
    for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
      const std::string real = Path(*it);
      if (::mkdir(real.c_str(), 0755) != 0 && errno != EEXIST) {
        return Status::Error("cannot create " + real + ": " + Errno(errno));
      }
      if (::chmod(real.c_str(), 0755) != 0) {  // the umask must not narrow it
        return Status::Error("cannot chmod " + real + ": " + Errno(errno));
      }
      m->dirs.insert(*it);
    }
    return Status::Ok();
  }

 private:
  std::string root_;
};

// Writes a file we own at `host_path`. Unchanged bytes and mode: nothing happens (returns
// false). A file that was there before an install is kept as PATH.registry-proxy.bak.
Result<bool> ManagedWrite(const Host& host, Manifest* m, const std::string& host_path,
                          std::string_view content, mode_t mode, std::ostream& log) {
  const std::string real = host.Path(host_path);
  auto existing = ReadIfExists(real, kMaxBinaryBytes);
  if (!existing.ok()) return existing.status();
  if (*existing && (*existing)->data == content && ((*existing)->mode & 07777) == mode) {
    return false;
  }
  if (Status s = host.MakeDirs(fs::path(host_path).parent_path().string(), m); !s.ok()) return s;
  if (*existing && !m->files.count(host_path) && !Exists(real + kBackupSuffix)) {
    if (Status s =
            WriteFileAtomic(real + kBackupSuffix, (*existing)->data, (*existing)->mode & 07777);
        !s.ok()) {
      return s;
    }
    log << "backed up " << real << " to " << real << kBackupSuffix << "\n";
  }
  if (Status s = WriteFileAtomic(real, content, mode); !s.ok()) return s;
  m->files.insert(host_path);
  log << "wrote " << real << "\n";
  return true;
}

Result<Manifest> LoadManifest(const Host& host) {
  const std::string real = host.Path(kManifestPath);
  auto r = ReadIfExists(real, kMaxTextBytes);
  if (!r.ok()) return r.status();
  if (!*r) return Manifest{};
  return Manifest::Parse((*r)->data, real);
}

Status SaveManifest(const Host& host, Manifest* m) {
  if (Status s = host.MakeDirs(kInstallDir, m); !s.ok()) return s;
  return WriteFileAtomic(host.Path(kManifestPath), m->Serialize(), 0644);
}

// ---------------------------------------------------------------------------------------------
// YAML text edits

bool IsLineEnd(char c) { return c == '\n' || c == '\r'; }

// The byte range of `key`'s entry at the top level of `text`: its line, plus the following
// lines that continue its value (indented and not comments), when the key's line carries no
// value itself. nullopt when the key is not there.
std::optional<std::pair<size_t, size_t>> FindTopLevelKey(std::string_view text,
                                                         std::string_view key) {
  auto line_end = [&](size_t pos) {
    size_t e = text.find('\n', pos);
    return e == std::string_view::npos ? text.size() : e + 1;
  };
  for (size_t pos = 0; pos < text.size(); pos = line_end(pos)) {
    std::string_view line = text.substr(pos, line_end(pos) - pos);
    size_t k = 0;
    for (std::string_view quote : {"", "\"", "'"}) {
      const std::string want = std::string(quote) + std::string(key) + std::string(quote);
      if (line.substr(0, want.size()) == want) {
        k = want.size();
        break;
      }
    }
    if (k == 0) continue;
    size_t c = k;
    while (c < line.size() && (line[c] == ' ' || line[c] == '\t')) ++c;
    if (c >= line.size() || line[c] != ':') continue;
    ++c;
    if (c < line.size() && !(line[c] == ' ' || line[c] == '\t' || IsLineEnd(line[c]))) continue;
    // A value on the line itself?
    size_t v = c;
    while (v < line.size() && (line[v] == ' ' || line[v] == '\t')) ++v;
    size_t end = pos + line.size();
    const bool has_value = v < line.size() && !IsLineEnd(line[v]) && line[v] != '#';
    if (!has_value) {
      while (end < text.size()) {
        std::string_view next = text.substr(end, line_end(end) - end);
        size_t i = 0;
        while (i < next.size() && (next[i] == ' ' || next[i] == '\t')) ++i;
        if (i == 0 || i >= next.size() || IsLineEnd(next[i]) || next[i] == '#') break;
        end += next.size();
      }
    }
    return std::make_pair(pos, end);
  }
  return std::nullopt;
}

// What `key` says in `text` as YAML; an error if the text is not a YAML mapping.
Result<std::optional<std::string>> YamlTopLevelScalar(std::string_view text, std::string_view key,
                                                      std::string_view where) {
  try {
    YAML::Node doc = YAML::Load(std::string(text));
    if (doc.IsNull()) return std::optional<std::string>();
    if (!doc.IsMap()) return Status::Error(std::string(where) + ": not a YAML mapping");
    YAML::Node v = doc[std::string(key)];
    if (!v || !v.IsScalar()) return std::optional<std::string>();
    return std::optional<std::string>(v.Scalar());
  } catch (const YAML::Exception& e) {
    return Status::Error(std::string(where) + ":" + std::to_string(e.mark.line + 1) + ":" +
                         std::to_string(e.mark.column + 1) + ": not valid YAML: " + e.msg);
  }
}

// Removes (or replaces with `original`) the entry of `key` in `text`, keeping the rest.
std::string ReplaceEntry(std::string_view text, std::pair<size_t, size_t> span,
                         std::string_view replacement) {
  std::string out(text.substr(0, span.first));
  out += replacement;
  out += text.substr(span.second);
  return out;
}

}  // namespace

Result<std::string> SetYamlKeyText(std::string_view text, std::string_view key,
                                   std::string_view value, std::string_view where) {
  size_t first = text.find_first_not_of(" \t\r\n");
  if (first != std::string_view::npos && text[first] == '{') {
    return Status::Error(std::string(where) + ": is JSON; set " + std::string(key) + ": " +
                         std::string(value) + " in it by hand");
  }
  if (auto before = YamlTopLevelScalar(text, key, where); !before.ok()) return before.status();
  const std::string line = std::string(key) + ": " + std::string(value) + "\n";
  std::string out;
  if (auto span = FindTopLevelKey(text, key)) {
    // Keep the line's own ending ("\r\n" files stay so).
    std::string_view old = text.substr(span->first, span->second - span->first);
    std::string repl = line;
    if (old.size() >= 2 && old.substr(old.size() - 2) == "\r\n") repl.insert(repl.size() - 1, "\r");
    if (old.empty() || old.back() != '\n') repl.pop_back();  // the last line had no newline
    out = ReplaceEntry(text, *span, repl);
  } else {
    out = std::string(text);
    if (!out.empty() && out.back() != '\n') out += '\n';
    out += line;
  }
  auto after = YamlTopLevelScalar(out, key, where);
  if (!after.ok()) return after.status();
  if (!*after || **after != value) {
    return Status::Error(std::string(where) + ": could not set " + std::string(key) +
                         " by editing its line (unusual layout); set it by hand");
  }
  return out;
}

namespace {

// Sets `key: value` in the YAML file at `host_path`, keeping a backup of the file as it was
// before the first edit. Returns whether the file changed.
Result<bool> ManagedEdit(const Host& host, Manifest* m, const std::string& host_path,
                         std::string_view key, std::string_view value, bool create_if_missing,
                         std::ostream& log) {
  const std::string real = host.Path(host_path);
  auto existing = ReadIfExists(real, kMaxTextBytes);
  if (!existing.ok()) return existing.status();
  if (!*existing) {
    if (!create_if_missing) return Status::Error(real + ": no such file");
    return ManagedWrite(host, m, host_path, std::string(key) + ": " + std::string(value) + "\n",
                        0644, log);
  }
  auto edited = SetYamlKeyText((*existing)->data, key, value, real);
  if (!edited.ok()) return edited.status();
  if (*edited == (*existing)->data) return false;
  const mode_t mode = (*existing)->mode & 07777;
  if (m->files.count(host_path)) return ManagedWrite(host, m, host_path, *edited, mode, log);
  if (!Exists(real + kBackupSuffix)) {
    if (Status s = WriteFileAtomic(real + kBackupSuffix, (*existing)->data, mode); !s.ok()) {
      return s;
    }
    log << "backed up " << real << " to " << real << kBackupSuffix << "\n";
  }
  if (Status s = WriteFileAtomic(real, *edited, mode); !s.ok()) return s;
  m->edits[host_path] = std::string(key);
  log << "set " << key << ": " << value << " in " << real << "\n";
  return true;
}

// Undoes ManagedEdit: the backup comes back exactly when nothing else changed in the file
// since; otherwise only our entry is put back as it was (or removed). Returns whether the
// file changed.
Result<bool> RevertEdit(const Host& host, const std::string& host_path, std::string_view key,
                        std::string_view value, std::ostream& log) {
  const std::string real = host.Path(host_path);
  const std::string backup = real + kBackupSuffix;
  auto cur = ReadIfExists(real, kMaxTextBytes);
  if (!cur.ok()) return cur.status();
  auto bak = ReadIfExists(backup, kMaxTextBytes);
  if (!bak.ok()) return bak.status();
  if (*bak) {
    auto expected = SetYamlKeyText((*bak)->data, key, value, backup);
    if (!*cur || (expected.ok() && *expected == (*cur)->data)) {
      if (::rename(backup.c_str(), real.c_str()) != 0) {
        return Status::Error("cannot restore " + real + " from " + backup + ": " + Errno(errno));
      }
      log << "restored " << real << " from " << backup << "\n";
      return true;
    }
    // Changed by someone else since: put back only our entry.
    std::string text = (*cur)->data;
    if (auto ours = FindTopLevelKey(text, key)) {
      std::string original;
      if (auto span = FindTopLevelKey((*bak)->data, key)) {
        original = (*bak)->data.substr(span->first, span->second - span->first);
      }
      text = ReplaceEntry(text, *ours, original);
    }
    bool changed = text != (*cur)->data;
    if (changed) {
      if (Status s = WriteFileAtomic(real, text, (*cur)->mode & 07777); !s.ok()) return s;
      log << "reverted " << key << " in " << real << " (the file changed since install; "
          << "only that entry was put back)\n";
    }
    if (::unlink(backup.c_str()) != 0) {
      return Status::Error("cannot remove " + backup + ": " + Errno(errno));
    }
    return changed;
  }
  // No backup: remove our line if it is still ours.
  if (!*cur) return false;
  auto span = FindTopLevelKey((*cur)->data, key);
  if (!span) return false;
  auto now = YamlTopLevelScalar((*cur)->data, key, real);
  if (!now.ok() || !*now || **now != value) return false;
  std::string text = ReplaceEntry((*cur)->data, *span, "");
  if (Status s = WriteFileAtomic(real, text, (*cur)->mode & 07777); !s.ok()) return s;
  log << "removed " << key << " from " << real << " (no backup to restore)\n";
  return true;
}

// ---------------------------------------------------------------------------------------------
// The running binary and its bundle.

struct SourceFile {
  std::string name;  // in lib/
  std::string path;
};

// The libraries of a bundle: BIN is DIR/bin/registry-proxy and DIR/lib is a directory.
std::vector<SourceFile> BundleLibs(const std::string& binary) {
  std::error_code ec;
  fs::path exe = fs::canonical(binary, ec);
  if (ec || exe.parent_path().filename() != "bin") return {};
  fs::path lib = exe.parent_path().parent_path() / "lib";
  if (!fs::is_directory(lib, ec)) return {};
  std::vector<SourceFile> out;
  for (const auto& e : fs::directory_iterator(lib, ec)) {
    if (e.is_regular_file(ec)) out.push_back({e.path().filename().string(), e.path().string()});
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.name < b.name; });
  return out;
}

// The config to install: --config-from, else the host's own, else the built-in default.
struct ConfigChoice {
  std::optional<std::string> yaml;  // nullopt: keep the host's file as it is
  std::string listen;               // the daemon's node.listen under that config
  std::string origin;
};

Result<ConfigChoice> ChooseConfig(const NodeInstallOptions& o, const Host& host,
                                  std::ostream& log) {
  if (o.config_from) {
    auto r = ReadRegularFile(*o.config_from, kMaxTextBytes);
    if (auto* e = std::get_if<FileError>(&r)) return Status::Error(e->Message(*o.config_from));
    std::string yaml = std::get<FileContents>(r).data;
    ConfigLoad load = ParseConfig(yaml, *o.config_from);
    if (!load.ok()) return Status::Error(load.ErrorText());
    return ConfigChoice{std::move(yaml), load.config->node.listen, *o.config_from};
  }
  const std::string host_config = host.Path(kConfigPath);
  if (Exists(host_config)) {
    ConfigLoad load = LoadConfigFile(host_config);
    if (!load.ok()) {
      // Kept as it is: the daemon forwards unchanged until it is fixed, as with any bad file.
      log << "warning: keeping the host's config, which is not valid:\n" << load.ErrorText();
      return ConfigChoice{std::nullopt, BuiltinConfig()->node.listen, host_config};
    }
    return ConfigChoice{std::nullopt, load.config->node.listen, host_config};
  }
  return ConfigChoice{std::string(BuiltinConfigYaml()), BuiltinConfig()->node.listen,
                      "the built-in default"};
}

}  // namespace

// containerd.service and its drop-ins on the host, in the order systemd reads them: the unit
// from the first directory of the search path that has it, then every containerd.service.d/
// *.conf by file name (a name in an earlier directory hides the same name in later ones).
std::vector<std::pair<std::string, std::string>> ContainerdUnitFiles(const Host& host) {
  static const char* const kDirs[] = {"/etc/systemd/system", "/run/systemd/system",
                                      "/usr/local/lib/systemd/system", "/usr/lib/systemd/system",
                                      "/lib/systemd/system"};
  std::vector<std::pair<std::string, std::string>> out;
  auto read = [&](const std::string& host_path) {
    auto r = ReadIfExists(host.Path(host_path), kMaxTextBytes);
    if (r.ok() && *r) out.emplace_back(host_path, (*r)->data);
    return r.ok() && *r;
  };
  for (const char* d : kDirs) {
    if (read(std::string(d) + "/containerd.service")) break;
  }
  std::map<std::string, std::string> dropins;  // file name -> host path
  for (const char* d : kDirs) {
    const std::string dir = std::string(d) + "/containerd.service.d";
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(host.Path(dir), ec)) {
      const std::string name = e.path().filename().string();
      if (name.size() > 5 && name.compare(name.size() - 5, 5, ".conf") == 0) {
        dropins.emplace(name, dir + "/" + name);
      }
    }
  }
  for (const auto& [name, path] : dropins) read(path);
  return out;
}

// Our unit's drop-in with containerd's proxy settings (written, rewritten, or removed when
// containerd has none any more). Returns whether it changed.
Result<bool> SyncProxyDropIn(const Host& host, Manifest* m, std::ostream& log) {
  const std::string text = ProxyDropIn(ProxySettingsOfUnit(ContainerdUnitFiles(host)));
  if (!text.empty()) {
    log << "containerd's proxy settings go to " << host.Path(kProxyDropInPath) << "\n";
    return ManagedWrite(host, m, kProxyDropInPath, text, 0644, log);
  }
  if (!m->files.count(kProxyDropInPath)) return false;
  const std::string real = host.Path(kProxyDropInPath);
  if (::unlink(real.c_str()) != 0 && errno != ENOENT) {
    return Status::Error("cannot remove " + real + ": " + Errno(errno));
  }
  m->files.erase(kProxyDropInPath);
  log << "removed " << real << " (containerd has no proxy settings now)\n";
  return true;
}

// ---------------------------------------------------------------------------------------------

Status NodeInstall(const NodeInstallOptions& o, Systemctl* systemctl, DaemonProbe* probe,
                   std::ostream& log) {
  const Host host(o.host_root);
  if (!fs::is_directory(host.root()))
    return Status::Error("--host-root " + o.host_root + ": not a directory");

  // 1. Everything that can be wrong is checked before anything is written.
  auto config = ChooseConfig(o, host, log);
  if (!config.ok()) return config.status();
  auto socket = UnixSocketPath(config->listen);
  if (!socket.ok()) return Status::Error("node.listen: " + socket.error());
  const std::string endpoint = "unix://" + *socket;
  auto binary = ReadRegularFile(o.source_binary, kMaxBinaryBytes);
  if (auto* e = std::get_if<FileError>(&binary)) return Status::Error(e->Message(o.source_binary));
  const std::vector<SourceFile> libs = BundleLibs(o.source_binary);
  if (libs.empty()) {
    log << "warning: " << o.source_binary
        << " is not a bundle (no ../lib next to bin/): the host must have its libraries\n";
  }
  std::vector<std::pair<std::string, std::string>> lib_contents;  // host path, bytes
  for (const SourceFile& l : libs) {
    auto r = ReadRegularFile(l.path, kMaxBinaryBytes);
    if (auto* e = std::get_if<FileError>(&r)) return Status::Error(e->Message(l.path));
    lib_contents.emplace_back(std::string(kLibDir) + "/" + l.name,
                              std::move(std::get<FileContents>(r).data));
  }
  // kubelet's and crictl's files must be editable before the daemon goes in for them.
  for (const auto& [wanted, path, key] :
       {std::tuple{o.configure_kubelet, o.kubelet_config, kKubeletKey},
        std::tuple{o.configure_crictl, o.crictl_config, kCrictlKey}}) {
    if (!wanted) continue;
    const std::string real = host.Path(path);
    auto text = ReadIfExists(real, kMaxTextBytes);
    if (!text.ok()) return text.status();
    if (!*text) {
      if (key == std::string_view(kKubeletKey)) return Status::Error(real + ": no such file");
      continue;  // crictl.yaml is created
    }
    if (auto edited = SetYamlKeyText((*text)->data, key, endpoint, real); !edited.ok()) {
      return edited.status();
    }
  }
  auto manifest = LoadManifest(host);
  if (!manifest.ok()) return manifest.status();
  Manifest& m = manifest.value();
  const bool installed_before = !m.files.empty();
  if (Status s = systemctl->Reachable(); !s.ok()) return s;
  // What we logged goes out before what systemctl prints (a pod's log is one stream).
  auto run = [&](const std::vector<std::string>& args) {
    log.flush();
    return systemctl->Run(args);
  };

  // 2. Files.
  bool daemon_changed = false;  // binary, libraries or unit: a running daemon must restart
  bool unit_changed = false;
  std::set<std::string> ours;
  auto write = [&](const std::string& path, std::string_view bytes, mode_t mode) -> Result<bool> {
    ours.insert(path);
    return ManagedWrite(host, &m, path, bytes, mode, log);
  };
  auto w = write(kBinPath, std::get<FileContents>(binary).data, 0755);
  if (!w.ok()) return w.status();
  daemon_changed |= *w;
  for (const auto& [path, bytes] : lib_contents) {
    w = write(path, bytes, 0644);
    if (!w.ok()) return w.status();
    daemon_changed |= *w;
  }
  // Libraries an earlier install put there that this binary does not carry.
  for (auto it = m.files.begin(); it != m.files.end();) {
    if (it->rfind(std::string(kLibDir) + "/", 0) == 0 && !ours.count(*it)) {
      const std::string real = host.Path(*it);
      if (::unlink(real.c_str()) != 0 && errno != ENOENT) {
        return Status::Error("cannot remove " + real + ": " + Errno(errno));
      }
      log << "removed " << real << " (not part of this bundle)\n";
      daemon_changed = true;
      it = m.files.erase(it);
    } else {
      ++it;
    }
  }
  w = write(kUnitPath, BuiltinServiceUnit(), 0644);
  if (!w.ok()) return w.status();
  unit_changed = *w;
  w = write(kSocketPath, BuiltinSocketUnit(), 0644);
  if (!w.ok()) return w.status();
  unit_changed |= *w;
  w = SyncProxyDropIn(host, &m, log);
  if (!w.ok()) return w.status();
  unit_changed |= *w;
  daemon_changed |= unit_changed;
  if (config->yaml) {
    w = write(kConfigPath, *config->yaml, 0644);
    if (!w.ok()) return w.status();
    // No restart for the config: the daemon follows its file.
  }
  log << "config: " << config->origin << "\n";
  if (Status s = SaveManifest(host, &m); !s.ok()) return s;

  // 3. systemd.
  if (unit_changed || !installed_before) {
    if (Status s = run({"daemon-reload"}); !s.ok()) return s;
  }
  if (Status s = run({"enable", "--now", kSocketName, kUnitName}); !s.ok()) return s;
  if (installed_before && daemon_changed) {
    // The socket stays (systemd's): calls made meanwhile wait for the new daemon.
    if (Status s = run({"restart", kUnitName}); !s.ok()) return s;
  }

  // 4. Serving?
  const std::string local_socket = host.Path(*socket);
  if (Status s = probe->WaitServing(local_socket, o.wait_timeout); !s.ok()) {
    return Status::Error("the daemon does not answer on " + local_socket + ": " + s.message() +
                         " (kubelet's config was not touched; see `journalctl -u " + kUnitName +
                         "`)");
  }
  log << "daemon serving " << endpoint << "\n";

  // 5. Only now: kubelet, then crictl.
  if (o.configure_kubelet) {
    auto edited = ManagedEdit(host, &m, o.kubelet_config, kKubeletKey, endpoint,
                              /*create_if_missing=*/false, log);
    if (Status s = SaveManifest(host, &m); !s.ok()) return s;
    if (!edited.ok()) return edited.status();
    if (*edited) {
      if (Status s = run({"restart", kKubeletUnit}); !s.ok()) return s;
      log << "restarted kubelet\n";
    } else {
      log << "kubelet already uses " << endpoint << "\n";
    }
  }
  if (o.configure_crictl) {
    auto edited = ManagedEdit(host, &m, o.crictl_config, kCrictlKey, endpoint,
                              /*create_if_missing=*/true, log);
    if (Status s = SaveManifest(host, &m); !s.ok()) return s;
    if (!edited.ok()) return edited.status();
  }
  log << "installed\n";
  return Status::Ok();
}

Status NodeUninstall(const NodeUninstallOptions& o, Systemctl* systemctl, std::ostream& log) {
  const Host host(o.host_root);
  if (!fs::is_directory(host.root()))
    return Status::Error("--host-root " + o.host_root + ": not a directory");
  auto manifest = LoadManifest(host);
  if (!manifest.ok()) return manifest.status();
  Manifest& m = manifest.value();
  std::map<std::string, std::string> edits = m.edits;
  if (edits.empty()) {
    // No manifest (or an old one): revert what our backups say we did.
    for (const auto& [path, key] :
         {std::pair<std::string, std::string>{o.kubelet_config, kKubeletKey},
          {o.crictl_config, kCrictlKey}}) {
      if (Exists(host.Path(path) + kBackupSuffix)) edits[path] = key;
    }
  }
  const bool units = Exists(host.Path(kUnitPath)) || Exists(host.Path(kSocketPath));
  if (m.files.empty() && m.dirs.empty() && edits.empty() && !units &&
      !Exists(host.Path(kManifestPath)) && !Exists(host.Path(kBinPath))) {
    // Nothing of ours here: done, whether or not this host has a systemd to ask.
    ::rmdir(host.Path(kRuntimeDir).c_str());
    log << "nothing to uninstall: no registry-proxy install under " << host.root() << "\n";
    return Status::Ok();
  }
  if (Status s = systemctl->Reachable(); !s.ok()) return s;
  auto run = [&](const std::vector<std::string>& args) {
    log.flush();  // what we logged goes out before what systemctl prints
    return systemctl->Run(args);
  };
  // Which endpoint we set: the installed config's listen (default if none).
  std::string endpoint = "unix://" + *UnixSocketPath(BuiltinConfig()->node.listen);
  if (ConfigLoad load = LoadConfigFile(host.Path(kConfigPath)); load.ok()) {
    if (auto p = UnixSocketPath(load.config->node.listen); p.ok()) endpoint = "unix://" + *p;
  }

  // 1. kubelet first: it must stop using our socket before the socket goes.
  auto is_kubelet = [&](const std::string& key) { return key == kKubeletKey; };
  for (bool kubelet_pass : {true, false}) {
    for (const auto& [path, key] : edits) {
      if (is_kubelet(key) != kubelet_pass) continue;
      auto changed = RevertEdit(host, path, key, endpoint, log);
      if (!changed.ok()) return changed.status();
      m.edits.erase(path);
      if (*changed && kubelet_pass) {
        if (Status s = run({"restart", kKubeletUnit}); !s.ok()) return s;
        log << "restarted kubelet\n";
      }
    }
  }

  // 2. The daemon (when its unit is still there: a rerun after a partial uninstall goes on).
  if (units) {
    if (Status s = run({"disable", "--now", kUnitName, kSocketName}); !s.ok()) {
      return s;
    }
  }
  // The runtime directory (a tmpfs: gone at reboot anyway), kept by the unit across stops.
  ::rmdir(host.Path(kRuntimeDir).c_str());

  // 3. Our files (a replaced file comes back from its backup), then our directories.
  for (const std::string& f : m.files) {
    const std::string real = host.Path(f);
    const std::string backup = real + kBackupSuffix;
    if (Exists(backup)) {
      if (::rename(backup.c_str(), real.c_str()) != 0) {
        return Status::Error("cannot restore " + real + " from " + backup + ": " + Errno(errno));
      }
      log << "restored " << real << "\n";
    } else if (::unlink(real.c_str()) == 0) {
      log << "removed " << real << "\n";
    } else if (errno != ENOENT) {
      return Status::Error("cannot remove " + real + ": " + Errno(errno));
    }
  }
  if (::unlink(host.Path(kManifestPath).c_str()) != 0 && errno != ENOENT) {
    return Status::Error("cannot remove " + host.Path(kManifestPath) + ": " + Errno(errno));
  }
  std::vector<std::string> dirs(m.dirs.begin(), m.dirs.end());
  std::sort(dirs.begin(), dirs.end(), [](auto& a, auto& b) { return a.size() > b.size(); });
  for (const std::string& d : dirs) {
    const std::string real = host.Path(d);
    if (::rmdir(real.c_str()) == 0) {
      log << "removed " << real << "/\n";
    } else if (errno != ENOENT) {
      log << "left " << real << "/: " << Errno(errno) << "\n";
    }
  }
  if (Status s = run({"daemon-reload"}); !s.ok()) return s;
  log << "uninstalled\n";
  return Status::Ok();
}

// ---------------------------------------------------------------------------------------------
// --watch

struct NodeConfigSync::Impl {
  NodeInstallOptions options;
  std::ostream* log;
  Host host;
  ConfigStore store;
  ConfigWatcher watcher;
  mutable std::mutex mu;  // guards stats and the log
  Stats stats;

  std::optional<std::string> plain_target;  // `node sync-config`: this file only

  Impl(const NodeInstallOptions& o, std::ostream* l)
      : options(o), log(l), host(o.host_root), store(*o.config_from), watcher(&store, {}) {}

  // Writes plain_target when its bytes or mode differ; returns whether it did.
  Result<bool> WritePlain(const std::string& yaml, std::ostream& out) {
    const std::string& path = *plain_target;
    auto existing = ReadIfExists(path, kMaxTextBytes);
    if (!existing.ok()) return existing.status();
    if (*existing && (*existing)->data == yaml && ((*existing)->mode & 07777) == 0644) {
      return false;
    }
    if (Status s = WriteFileAtomic(path, yaml, 0644); !s.ok()) return s;
    out << "wrote " << path << "\n";
    return true;
  }

  // Listener calls are never concurrent; the lock makes a copy and its count one step for
  // stats() readers.
  void Sync() {
    std::lock_guard<std::mutex> lock(mu);
    auto r = ReadRegularFile(*options.config_from, kMaxTextBytes);
    std::string error;
    if (auto* e = std::get_if<FileError>(&r)) {
      error = e->Message(*options.config_from);
    } else {
      const std::string& yaml = std::get<FileContents>(r).data;
      ConfigLoad load = ParseConfig(yaml, *options.config_from);
      if (!load.ok()) {
        error = load.ErrorText();
      } else {
        std::ostringstream out;
        Result<bool> w = false;
        if (plain_target) {
          w = WritePlain(yaml, out);
        } else {
          auto m = LoadManifest(host);
          w = m.ok() ? ManagedWrite(host, &m.value(), kConfigPath, yaml, 0644, out)
                     : Result<bool>(m.status());
          if (w.ok() && *w) {
            if (Status s = SaveManifest(host, &m.value()); !s.ok()) w = s;
          }
        }
        if (!w.ok()) {
          stats.last_error = w.error();
          *log << "config sync: " << w.error() << std::endl;
        } else if (*w) {
          ++stats.copied;
          stats.last_error.clear();
          *log << "config sync: " << out.str() << std::flush;
        }
        return;
      }
    }
    ++stats.rejected;
    stats.last_error = error;
    *log << "config sync: not copied: " << error << std::flush;
  }
};

NodeConfigSync::NodeConfigSync(const NodeInstallOptions& options, std::ostream* log)
    : impl_(std::make_unique<Impl>(options, log)) {
  Impl* impl = impl_.get();
  impl_->store.SetListener([impl](ReloadResult r, const ReloadStats&) {
    if (r != ReloadResult::kUnchanged) impl->Sync();
  });
}

namespace {
NodeInstallOptions SyncOnlyOptions(std::string config_from) {
  NodeInstallOptions o;
  o.config_from = std::move(config_from);
  return o;
}
}  // namespace

NodeConfigSync::NodeConfigSync(std::string config_from, std::string host_config, std::ostream* log)
    : NodeConfigSync(SyncOnlyOptions(std::move(config_from)), log) {
  impl_->plain_target = std::move(host_config);
}

NodeConfigSync::~NodeConfigSync() { Stop(); }

Status NodeConfigSync::Start() {
  impl_->store.Reload();
  return impl_->watcher.Start();
}

void NodeConfigSync::TriggerSync() { impl_->watcher.TriggerReload(); }

void NodeConfigSync::Stop() { impl_->watcher.Stop(); }

NodeConfigSync::Stats NodeConfigSync::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->stats;
}

// ---------------------------------------------------------------------------------------------
// The real seams.

namespace {

std::string Readlink(const std::string& path) {
  std::error_code ec;
  return fs::read_symlink(path, ec).string();
}

class HostSystemctl final : public Systemctl {
 public:
  HostSystemctl(std::string host_root, std::string pod)
      : root_(std::move(host_root)), pod_(std::move(pod)) {}

  Status Reachable() override {
    std::error_code ec;
    if (fs::equivalent(root_, "/", ec)) return Status::Ok();
    // The host's / is mounted at root_: we are in a pod. The host's systemd is our PID 1 only
    // with hostPID, and then it is in another mount namespace than ours.
    const Host host(root_);
    HostSystemdFacts f;
    f.host_root = host.root();
    if (auto r = ReadRegularFile("/proc/1/comm", 256); auto* c = std::get_if<FileContents>(&r)) {
      f.pid1_comm = c->data;
      while (!f.pid1_comm.empty() && f.pid1_comm.back() == '\n') f.pid1_comm.pop_back();
    }
    f.host_runs_systemd = fs::is_directory(host.Path("/run/systemd/system"), ec);
    const std::string host_pid_ns = Readlink(host.Path("/proc/1/ns/pid"));
    const std::string our_pid_ns = Readlink("/proc/self/ns/pid");
    if (!host_pid_ns.empty() && !our_pid_ns.empty()) {
      f.in_host_pid_namespace = host_pid_ns == our_pid_ns;
    }
    const std::string mnt = Readlink("/proc/self/ns/mnt");
    f.shares_pid1_mount_namespace = !mnt.empty() && mnt == Readlink("/proc/1/ns/mnt");
    return DiagnoseHostSystemd(f, pod_);
  }

  Status Run(const std::vector<std::string>& args) override {
    if (Status s = Reachable(); !s.ok()) return s;
    std::vector<std::string> argv;
    std::error_code ec;
    if (!fs::equivalent(root_, "/", ec)) {
      argv = {"nsenter", "-t", "1", "-m", "-u", "-i", "-n", "-p", "--"};
    }
    argv.push_back("systemctl");
    argv.insert(argv.end(), args.begin(), args.end());
    std::string text;
    for (const auto& a : argv) text += (text.empty() ? "" : " ") + a;

    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    // The child writes to the same stdout and stderr, unbuffered: what we wrote before it must
    // be out first (a pipe makes our stdout fully buffered).
    std::cout.flush();
    std::cerr.flush();
    std::fflush(nullptr);
    if (auto logger = spdlog::default_logger()) logger->flush();
    pid_t pid;
    if (int e = posix_spawnp(&pid, cargv[0], nullptr, nullptr, cargv.data(), environ); e != 0) {
      return Status::Error("cannot run " + text + ": " + Errno(e));
    }
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0) {
      if (errno != EINTR) return Status::Error(text + ": waitpid: " + Errno(errno));
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return Status::Ok();
    if (WIFEXITED(status)) {
      return Status::Error(text + " failed (exit " + std::to_string(WEXITSTATUS(status)) + ")");
    }
    return Status::Error(text + " failed (signal " + std::to_string(WTERMSIG(status)) + ")");
  }

 private:
  std::string root_;
  std::string pod_;
};

class CriVersionProbe final : public DaemonProbe {
 public:
  Status WaitServing(const std::string& socket_path, std::chrono::seconds timeout) override {
    auto client = CriClient::Connect("unix://" + socket_path);
    if (!client.ok()) return client.status();
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::string last = "no answer";
    while (true) {
      runtime::v1::VersionResponse v;
      RpcStatus s = (*client)->Version(&v, std::chrono::seconds(2));
      if (s.ok()) return Status::Ok();
      last = RpcStatusText(s);
      if (std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    return Status::Error("no CRI Version answer within " + std::to_string(timeout.count()) +
                         " s (last: " + last + ")");
  }
};

}  // namespace

std::unique_ptr<Systemctl> MakeHostSystemctl(std::string host_root, std::string pod) {
  return std::make_unique<HostSystemctl>(std::move(host_root), std::move(pod));
}

Status DiagnoseHostSystemd(const HostSystemdFacts& f, std::string_view pod) {
  const std::string& root = f.host_root;
  // systemd started as /sbin/init may be named "init"; so are other inits, which never create
  // /run/systemd/system.
  const bool pid1_systemd =
      f.pid1_comm == "systemd" || (f.pid1_comm == "init" && f.host_runs_systemd);
  const std::string needs_host_pid = "the " + std::string(pod) + " pod needs hostPID: true";
  if (pid1_systemd && f.in_host_pid_namespace != std::optional<bool>(false)) {
    if (f.shares_pid1_mount_namespace) {
      return Status::Error("--host-root " + root +
                           " is not /, but this process already runs in the host's mount "
                           "namespace: use --host-root /");
    }
    return Status::Ok();
  }
  if (!f.host_runs_systemd) {
    // sd_booted() on the host: whatever PID 1 is here, there is no systemd to talk to.
    return Status::Error("the host does not run systemd (" + root +
                         "/run/systemd/system does not exist): registry-proxy runs as a systemd "
                         "service and cannot be managed on this node");
  }
  if (f.in_host_pid_namespace == std::optional<bool>(true)) {
    return Status::Error("cannot reach the host's systemd: the host's PID 1 is '" + f.pid1_comm +
                         "', not systemd, although " + root + "/run/systemd/system exists");
  }
  if (f.in_host_pid_namespace == std::optional<bool>(false)) {
    return Status::Error(
        "cannot reach the host's systemd: this process is not in the host's PID namespace (PID 1 "
        "here is '" +
        f.pid1_comm + "'): " + needs_host_pid);
  }
  return Status::Error("cannot reach the host's systemd: PID 1 here is '" + f.pid1_comm +
                       "', not systemd: " + needs_host_pid);
}

std::unique_ptr<DaemonProbe> MakeCriVersionProbe() { return std::make_unique<CriVersionProbe>(); }

// ---------------------------------------------------------------------------------------------
// The command.

namespace {

constexpr char kNodeHelp[] =
    R"(Usage: registry-proxy node install --host-root DIR [--config-from FILE]
                              [--configure-kubelet] [--kubelet-config PATH]
                              [--configure-crictl] [--watch] [--wait SECONDS]
       registry-proxy node uninstall --host-root DIR [--kubelet-config PATH]
       registry-proxy node sync-config --config-from FILE --host-config PATH

install: puts this binary (and the libraries of its bundle) in DIR/opt/registry-proxy, the
systemd unit in DIR/etc/systemd/system/registry-proxy.service and the config in
DIR/etc/registry-proxy/config.yaml, then `systemctl daemon-reload` and `enable --now` it and
waits until the daemon answers CRI Version on its socket. Running it again changes nothing.
DIR is / on the host itself; from a pod (hostPID: true, the host's / mounted at DIR), systemctl
runs in the host's namespaces through nsenter.

  --host-root DIR       where the host's / is
  --config-from FILE    the config to install (validated first; a bad one writes nothing);
                        default: keep the host's, else the built-in default
  --configure-kubelet   once the daemon answers, set imageServiceEndpoint in kubelet's
                        config (one line edited, backup kept) and restart kubelet
  --kubelet-config PATH kubelet's KubeletConfiguration on the host
                        (default /var/lib/kubelet/config.yaml)
  --configure-crictl    set image-endpoint in /etc/crictl.yaml (created if missing)
  --watch               then keep DIR/etc/registry-proxy/config.yaml equal to --config-from
                        (only versions that validate) until SIGTERM
  --wait SECONDS        how long to wait for the daemon to answer (default 60)

uninstall: reverts kubelet's config first (restarting kubelet), then crictl.yaml, stops and
disables the unit and removes what install created, restoring any file it replaced. A host
with nothing installed is success, without systemctl.

sync-config: what --watch does, for a process that sees only the host's /etc/registry-proxy
(no host root, no systemctl, no privileges): keeps PATH (the host's
/etc/registry-proxy/config.yaml, as mounted here) equal to FILE, copying only versions that
validate, atomically, until SIGTERM. The daemon follows that file live. SIGHUP copies again.
)";

// Copies until SIGTERM/SIGINT; SIGHUP syncs again.
int WatchUntilSignal(NodeConfigSync& sync, SignalWaiter& signals, const std::string& what,
                     std::ostream& out, std::ostream& err) {
  if (Status s = sync.Start(); !s.ok()) return err << what << ": " << s.message() << "\n", 1;
  int sig;
  while ((sig = signals.Wait()) == SIGHUP) sync.TriggerSync();
  sync.Stop();
  out << "stopped (" << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ")" << std::endl;
  return 0;
}

int SyncConfigMain(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  auto args =
      ParseArgs(argv, {{"--config-from", ""}, {"--host-config", ""}, {"--help", "-h", false}}, err);
  if (!args) return err << kNodeHelp, 2;
  if (args->Has("--help")) return out << kNodeHelp, 0;
  if (!args->positional.empty()) return err << kNodeHelp, 2;
  auto from = args->Get("--config-from");
  auto to = args->Get("--host-config");
  if (!from || from->empty() || !to || to->empty()) {
    return err << "node sync-config: --config-from and --host-config are required\n", 2;
  }
  if (!fs::is_directory(fs::path(*to).parent_path())) {
    return err << "node sync-config: " << fs::path(*to).parent_path().string()
               << " is not a directory (mount the host's /etc/registry-proxy there, after "
                  "`node install`)\n",
           1;
  }
  // Signals are blocked before any thread starts (the watcher's).
  SignalWaiter signals({SIGTERM, SIGINT, SIGHUP});
  NodeConfigSync sync(*from, *to, &out);
  out << "keeping " << *to << " equal to " << *from << std::endl;
  return WatchUntilSignal(sync, signals, "node sync-config", out, err);
}

int NodeMain(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  if (argv.empty()) return err << kNodeHelp, 2;
  const std::string sub = argv[0];
  if (sub == "--help" || sub == "-h" || sub == "help") return out << kNodeHelp, 0;
  const std::vector<std::string> rest(argv.begin() + 1, argv.end());
  if (sub != "install" && sub != "uninstall" && sub != "sync-config") {
    return err << "node: unknown command '" << sub << "'\n\n" << kNodeHelp, 2;
  }
  if (sub == "sync-config") return SyncConfigMain(rest, out, err);
  const bool install = sub == "install";
  std::vector<FlagSpec> specs = {
      {"--host-root", ""}, {"--kubelet-config", ""}, {"--help", "-h", false}};
  if (install) {
    specs.insert(specs.end(), {{"--config-from", ""},
                               {"--configure-kubelet", "", false},
                               {"--configure-crictl", "", false},
                               {"--watch", "", false},
                               {"--wait", ""}});
  }
  auto args = ParseArgs(rest, specs, err);
  if (!args) return err << kNodeHelp, 2;
  if (args->Has("--help")) return out << kNodeHelp, 0;
  if (!args->positional.empty()) return err << kNodeHelp, 2;
  auto root = args->Get("--host-root");
  if (!root || root->empty()) return err << "node " << sub << ": --host-root is required\n", 2;

  if (!install) {
    NodeUninstallOptions o;
    o.host_root = *root;
    if (auto k = args->Get("--kubelet-config")) o.kubelet_config = *k;
    auto systemctl = MakeHostSystemctl(*root, "uninstaller");
    if (Status s = NodeUninstall(o, systemctl.get(), out); !s.ok()) {
      return err << "node uninstall: " << s.message() << "\n", 1;
    }
    return 0;
  }

  NodeInstallOptions o;
  o.host_root = *root;
  o.config_from = args->Get("--config-from");
  o.configure_kubelet = args->Has("--configure-kubelet");
  o.configure_crictl = args->Has("--configure-crictl");
  if (auto k = args->Get("--kubelet-config")) o.kubelet_config = *k;
  if (o.kubelet_config.empty() || o.kubelet_config[0] != '/') {
    return err << "--kubelet-config wants an absolute path on the host, got '" << o.kubelet_config
               << "'\n",
           2;
  }
  if (auto w = args->Get("--wait")) {
    char* end = nullptr;
    long v = std::strtol(w->c_str(), &end, 10);
    if (w->empty() || *end || v < 1 || v > 3600) {
      return err << "--wait wants seconds (1..3600), got '" << *w << "'\n", 2;
    }
    o.wait_timeout = std::chrono::seconds(v);
  }
  const bool watch = args->Has("--watch");
  if (watch && !o.config_from) return err << "--watch needs --config-from\n", 2;

  // Signals are blocked before any thread starts (gRPC's, the watcher's).
  std::optional<SignalWaiter> signals;
  if (watch) signals.emplace(std::initializer_list<int>{SIGTERM, SIGINT, SIGHUP});
  auto systemctl = MakeHostSystemctl(*root);
  auto probe = MakeCriVersionProbe();
  if (Status s = NodeInstall(o, systemctl.get(), probe.get(), out); !s.ok()) {
    return err << "node install: " << s.message() << "\n", 1;
  }
  if (!watch) return 0;

  NodeConfigSync sync(o, &out);
  out << "watching " << *o.config_from << " for " << Host(*root).Path(kConfigPath) << std::endl;
  return WatchUntilSignal(sync, *signals, "node install --watch", out, err);
}

}  // namespace

int CmdNode(const std::vector<std::string>& argv, std::ostream& out, std::ostream& err) {
  return NodeMain(argv, out, err);
}

}  // namespace registry_proxy
