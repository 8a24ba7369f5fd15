// The unix socket the CRI server binds: parsing endpoints, preparing the path, naming an
// inherited socket (cri_server.h).
#include <errno.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "cri/cri_server.h"

namespace registry_proxy {

Result<std::string> UnixSocketPath(std::string_view endpoint) {
  std::string_view path = endpoint;
  if (path.substr(0, 7) == "unix://") path.remove_prefix(7);
  if (path.empty() || path[0] != '/') {
    return Status::Error("'" + std::string(endpoint) +
                         "' is not a unix socket: want unix:///absolute/path");
  }
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::Error("socket path '" + std::string(path) + "' is too long");
  }
  return std::string(path);
}

namespace {

// Is something serving on this unix socket? (A stale file from a crashed daemon answers
// ECONNREFUSED; a live daemon accepts.)
bool SocketAnswers(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  bool answers = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return answers;
}

}  // namespace

std::string BoundSocketPath(int fd, const std::string& fallback) {
  sockaddr_un addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
      addr.sun_family == AF_UNIX && addr.sun_path[0] != '\0') {
    return addr.sun_path;
  }
  return fallback;
}

Status PrepareSocketPath(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (!fs::create_directories(dir, ec)) {
      return Status::Error("cannot create " + dir.string() + ": " + ec.message());
    }
    // Only root (and kubelet, as root) reaches the socket; the directory says so first.
    if (chmod(dir.c_str(), 0700) != 0) {
      return Status::Error("cannot chmod " + dir.string() + ": " + std::strerror(errno));
    }
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::Error(path + " exists and is not a socket; not replacing it");
    }
    if (SocketAnswers(path)) {
      return Status::Error(path + " is in use: another process answers on it");
    }
    if (unlink(path.c_str()) != 0) {
      return Status::Error("cannot remove stale socket " + path + ": " + std::strerror(errno));
    }
    spdlog::info("replaced stale socket {}", path);
  }
  return Status::Ok();
}

}  // namespace registry_proxy
