#include "base/sd_listen.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <systemd/sd-daemon.h>

#include <cstring>
#include <string>

namespace registry_proxy {

Result<int> SdListenFd() {
  const char* fds_env = getenv("LISTEN_FDS");
  const std::string fds = fds_env ? fds_env : "";
  // unset_environment 1: LISTEN_* are cleared whatever the answer; the fds get FD_CLOEXEC.
  const int n = sd_listen_fds(1);
  if (n < 0) {
    return Status::Error("socket activation: LISTEN_FDS=" + fds + ": " + std::strerror(-n));
  }
  if (n == 0) return -1;  // not activated, or meant for another process (LISTEN_PID)
  if (n != 1) {
    return Status::Error("socket activation: LISTEN_FDS=" + std::to_string(n) +
                         "; registry-proxy serves exactly one socket");
  }
  const int fd = SD_LISTEN_FDS_START;
  // > 0: a listening (1) unix stream socket, whatever its path (nullptr, 0).
  if (sd_is_socket_unix(fd, SOCK_STREAM, 1, nullptr, 0) <= 0) {
    return Status::Error(
        "socket activation: fd 3 is not a listening unix stream socket (use ListenStream=PATH)");
  }
  return fd;
}

}  // namespace registry_proxy
