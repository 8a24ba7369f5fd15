#include "base/sd_notify.h"

#include <systemd/sd-daemon.h>

#include <string>

namespace registry_proxy {

bool SdNotify(std::string_view state) {
  // > 0: sent; 0: no $NOTIFY_SOCKET (not under systemd); < 0: -errno. The environment is kept
  // (unset_environment 0): the daemon notifies again when it stops.
  return sd_notify(0, std::string(state).c_str()) > 0;
}

}  // namespace registry_proxy
