// systemd socket activation: the listening socket a .socket unit hands to the service, found
// with libsystemd's sd_listen_fds.
#pragma once

#include "base/status.h"

namespace registry_proxy {

// The inherited listening socket, or -1 when this process was not socket-activated
// (LISTEN_PID is not our pid, or LISTEN_FDS is unset). An error when systemd passed something
// the daemon cannot serve: not exactly one fd, or it is not a listening unix stream socket.
// Clears LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES (children must not take the fd for theirs) and
// marks the fd close-on-exec.
Result<int> SdListenFd();

}  // namespace registry_proxy
