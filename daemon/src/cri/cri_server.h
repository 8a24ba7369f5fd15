// What serves the CRI socket: the options, the observer of every finished call, and the small
// interface serve.cc and the tests drive. H2Relay (h2_relay.h) implements it: it relays HTTP/2
// frames, decodes only the calls it intercepts and hands PullImage and ImageStatus to an
// ImageInterceptor (tests/unit/cri/h2_relay_test.cc).
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "base/rpc_status.h"
#include "base/status.h"

namespace registry_proxy {

// Told about every finished call (metrics, logs). Called on the relay's event-loop thread:
// must be cheap and must not block.
class CallObserver {
 public:
  virtual ~CallObserver() = default;
  virtual void OnCallDone(std::string_view method, RpcCode code,
                          std::chrono::nanoseconds duration) = 0;
};

struct ProxyOptions {
  // "unix:///run/registry-proxy/registry-proxy.sock" (or an absolute path).
  std::string listen;
  // "unix:///run/containerd/containerd.sock" (or an absolute path).
  std::string upstream;
  // Largest message accepted in either direction. containerd and kubelet use 16 MiB; ours is
  // larger so that the limits users meet are theirs, never the proxy's.
  int max_message_bytes = 64 << 20;
  // Pull and status-repair workers at once; beyond this a call gets RESOURCE_EXHAUSTED.
  int max_workers = 512;
  // A listening unix socket inherited from systemd (socket activation: registry-proxy.socket)
  // to serve instead of binding `listen`. Connections are accepted on it and handed to gRPC.
  // Not owned, never closed or unlinked: connections made while the daemon restarts wait in
  // its backlog for the next daemon. -1: bind `listen`.
  int listen_fd = -1;
};

// Parses "unix:///abs/path" or "/abs/path" into the path; error otherwise.
Result<std::string> UnixSocketPath(std::string_view endpoint);

// Makes `path` ready to bind: its directory is created (0700) if missing; a stale socket is
// removed only if nobody answers on it; anything that is not a socket is left alone (error).
Status PrepareSocketPath(const std::string& path);

// The path a listening unix socket inherited from systemd is bound to, or `fallback` when it
// has none (abstract or unnamed).
std::string BoundSocketPath(int fd, const std::string& fallback);

class CriServer {
 public:
  virtual ~CriServer() = default;

  // Prepares the socket (directory 0700 if created, socket 0660; a stale socket is replaced
  // only if nobody answers on it), binds and starts serving.
  virtual Status Start() = 0;

  // Removes the socket (no new connections), lets the calls in flight finish until `grace`
  // has passed (idle connections do not hold it up), cancels the rest, and waits for every
  // call and worker to end. Idempotent.
  virtual void Shutdown(std::chrono::milliseconds grace) = 0;

  virtual const std::string& socket_path() const = 0;
  virtual int in_flight() const = 0;  // calls that arrived and have not ended
};

}  // namespace registry_proxy
