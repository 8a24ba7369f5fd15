// The boundary between the CRI server (h2_relay: relays every call's HTTP/2 frames) and the
// code that changes pulls (pull_service). The relay decodes only the few calls it intercepts
// and hands them to an ImageInterceptor.
#pragma once

#include <string>

#include "base/rpc_status.h"
#include "cri/call.h"

namespace registry_proxy {

// The outcome of an intercepted call: a status, and the serialized response when OK.
struct InterceptResult {
  RpcStatus status;
  std::string response;  // serialized response message (when status is OK)
};

class ImageInterceptor {
 public:
  virtual ~ImageInterceptor() = default;

  // PullImage, v1 or v1alpha2. `request` is the serialized PullImageRequest as received.
  // Runs on a worker thread of its own and may block for as long as the pull takes;
  // `opts.cancellation` fires if the caller goes away.
  virtual InterceptResult PullImage(CriVersion v, const std::string& request,
                                    const CallOptions& opts) = 0;

  // ImageStatus: the proxy forwarded the request unchanged and containerd answered OK with
  // `response`. Called on the relay's event-loop thread, so it must be cheap and must
  // not block: true means "this miss may be repairable" (an image that a mirror could have
  // served is not found under its original name), and the proxy then calls RecoverStatus on
  // a worker thread. False means the response goes to the caller as it is.
  virtual bool StatusNeedsRecovery(CriVersion v, const std::string& request,
                                   const std::string& response) = 0;

  // Runs on a worker thread; may block briefly (a few containerd calls). Returns the response
  // to send instead (e.g. after aliasing a mirror-named image to its original name), or the
  // original `response` unchanged when there is nothing to repair.
  virtual InterceptResult RecoverStatus(CriVersion v, const std::string& request,
                                        const std::string& response, const CallOptions& opts) = 0;
};

}  // namespace registry_proxy
