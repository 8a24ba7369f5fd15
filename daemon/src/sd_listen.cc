#include "sd_listen.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

namespace registry_proxy {

Result<int> SdListenFd() {
  constexpr int kFirstFd = 3;  // SD_LISTEN_FDS_START
  const char* pid = getenv("LISTEN_PID");
  const char* fds = getenv("LISTEN_FDS");
  if (!pid || !fds) return -1;
  const std::string pid_s = pid, fds_s = fds;
  unsetenv("LISTEN_PID");
  unsetenv("LISTEN_FDS");
  unsetenv("LISTEN_FDNAMES");
  if (pid_s != std::to_string(getpid())) return -1;  // meant for another process
  if (fds_s != "1") {
    return Status::Error("socket activation: LISTEN_FDS=" + fds_s +
                         "; registry-proxy serves exactly one socket");
  }
  int type = 0, listening = 0, domain = 0;
  socklen_t len = sizeof(int);
  if (getsockopt(kFirstFd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
    return Status::Error(std::string("socket activation: fd 3 is not a socket: ") +
                         std::strerror(errno));
  }
  len = sizeof(int);
  getsockopt(kFirstFd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len);
  len = sizeof(int);
  getsockopt(kFirstFd, SOL_SOCKET, SO_DOMAIN, &domain, &len);
  if (type != SOCK_STREAM || !listening || domain != AF_UNIX) {
    return Status::Error(
        "socket activation: fd 3 is not a listening unix stream socket (use ListenStream=PATH)");
  }
  fcntl(kFirstFd, F_SETFD, FD_CLOEXEC);
  return kFirstFd;
}

}  // namespace registry_proxy
