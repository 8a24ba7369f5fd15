// systemd's readiness protocol: a thin wrapper of libsystemd's sd_notify. A no-op when not
// started by systemd with Type=notify.
#pragma once

#include <string_view>

namespace registry_proxy {

// Sends e.g. "READY=1", "STOPPING=1", "STATUS=...". Returns false if not under systemd or the
// send failed (never fatal: the daemon works the same without it).
bool SdNotify(std::string_view state);

}  // namespace registry_proxy
