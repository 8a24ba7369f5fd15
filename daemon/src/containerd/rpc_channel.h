// A small gRPC client over HTTP/2 (nghttp2) to a unix socket peer: containerd, for the daemon's
// own calls (CRI ImageService, Images, Events, Version), so `serve` does not need gRPC's library.
//
// One HTTP/2 connection, opened on first use and again after it breaks, carries every call;
// one event-loop thread owns it (and nghttp2, which is not thread-safe). Callers block on their
// own call only: a slow call never holds up another. The loop thread sleeps in epoll_wait while
// nothing is in flight: no periodic timer, and a deadline timer (timerfd) armed only while some
// call with a deadline waits.
//
// Wire format: gRPC's PROTOCOL-HTTP2 (length-prefixed messages, status in trailers or in a
// Trailers-Only response), without compression.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "base/rpc_status.h"
#include "cri/call.h"

namespace google::protobuf {
class MessageLite;
}

namespace registry_proxy {

class RpcChannel;

// Metadata to send with a call: lower-case keys; values of keys ending in "-bin" are bytes
// (base64-encoded on the wire), others printable ASCII.
using RpcMetadata = std::vector<std::pair<std::string, std::string>>;

// Cancels one call from any thread: before it starts (it then fails CANCELLED at once), while
// it runs (RST_STREAM CANCEL; the call returns CANCELLED) or after it ended (nothing). Owned by
// the caller; it must outlive the call it is given to (for a stream: the RpcStream object). Once
// cancelled it stays cancelled, so a call started with it later fails CANCELLED too. Thread-safe. A
// Cancellable, so a downstream call's Cancellation (cri/call.h) can hold it: Cancellation::Scope
// scope(c, &handle).
class RpcCallHandle final : public Cancellable {
 public:
  RpcCallHandle() = default;
  RpcCallHandle(const RpcCallHandle&) = delete;
  RpcCallHandle& operator=(const RpcCallHandle&) = delete;

  void Cancel() override;
  bool cancelled() const;

  struct Call;  // the channel's state of one call (rpc_channel.cc)

 private:
  friend class RpcChannel;
  friend class RpcStream;
  // The call now in progress, or null.
  bool Attach(std::shared_ptr<Call> call);  // false: already cancelled
  void Detach(const Call* call);

  mutable std::mutex mu_;
  bool cancelled_ = false;      // guarded by mu_
  std::shared_ptr<Call> call_;  // guarded by mu_
};

struct RpcCallOptions {
  // The call fails DEADLINE_EXCEEDED after this (sent as grpc-timeout, and enforced here).
  std::chrono::system_clock::time_point deadline = std::chrono::system_clock::time_point::max();
  RpcMetadata metadata;
  // false (gRPC's default, fail-fast): a peer that cannot be reached fails the call UNAVAILABLE
  // at once. true: keep trying to connect (short back-off) until the deadline or a cancel.
  bool wait_for_ready = false;
  RpcCallHandle* handle = nullptr;  // may be null
};

struct RpcChannelOptions {
  // "unix:///run/containerd/containerd.sock" or "/run/containerd/containerd.sock".
  std::string endpoint;
  // :authority (containerd's gRPC server accepts any; gRPC clients of unix sockets send this).
  std::string authority = "localhost";
  std::string user_agent = "registry-proxy";
  // The largest message sent or received; a larger response fails RESOURCE_EXHAUSTED.
  size_t max_message_bytes = 64 << 20;
  // wait_for_ready: the first and the longest pause between connection attempts.
  std::chrono::milliseconds initial_backoff{20};
  std::chrono::milliseconds max_backoff{1000};
};

// A server-streaming call: one request, any number of responses. Read on one thread at a time;
// Cancel from any. Destroying it cancels the call if it has not ended.
class RpcStream {
 public:
  ~RpcStream();
  RpcStream(const RpcStream&) = delete;
  RpcStream& operator=(const RpcStream&) = delete;

  // The next message; false when there are no more (the call ended: see Finish).
  bool Read(std::string* message);
  // The same, parsed; a message that does not parse cancels the call (Finish: INTERNAL).
  bool Read(google::protobuf::MessageLite* message);
  // Waits for the call to end and says how it ended. Messages not read are dropped.
  RpcStatus Finish();
  // Ends the call now (RST_STREAM CANCEL): a blocked Read returns false, Finish CANCELLED.
  void Cancel();

 private:
  friend class RpcChannel;
  explicit RpcStream(std::shared_ptr<RpcCallHandle::Call> call);
  void Abort(RpcStatus why);

  std::shared_ptr<RpcCallHandle::Call> call_;
};

class RpcChannel {
 public:
  explicit RpcChannel(RpcChannelOptions options);
  // Cancels every call in flight (CANCELLED), closes the connection and joins the loop thread.
  ~RpcChannel();
  RpcChannel(const RpcChannel&) = delete;
  RpcChannel& operator=(const RpcChannel&) = delete;

  // A unary call by method path ("/runtime.v1.ImageService/ImageStatus"): the serialized
  // request, and on OK the serialized response. Blocks until the call ends. Thread-safe.
  RpcStatus Call(std::string_view method, std::string_view request, std::string* response,
                 const RpcCallOptions& options = {});
  // The same with protobuf messages; a response that does not parse is INTERNAL.
  RpcStatus Call(std::string_view method, const google::protobuf::MessageLite& request,
                 google::protobuf::MessageLite* response, const RpcCallOptions& options = {});

  // Starts a server-streaming call. Errors (including a request that cannot be sent) come
  // from the stream's Finish. `options.handle` may cancel it as well as RpcStream::Cancel.
  std::unique_ptr<RpcStream> Stream(std::string_view method, std::string_view request,
                                    const RpcCallOptions& options = {});
  std::unique_ptr<RpcStream> Stream(std::string_view method,
                                    const google::protobuf::MessageLite& request,
                                    const RpcCallOptions& options = {});

  const RpcChannelOptions& options() const { return options_; }

  // For tests and metrics: HTTP/2 connections opened so far.
  int connections_opened() const;

  // The connection's state, in gRPC's words (a metric shows it): kIdle before the first call
  // and after the connection ended, kReady while it is up, kTransientFailure after an attempt
  // to connect failed (until one succeeds). A unix socket connects at once, so there is no
  // "connecting".
  enum class State { kIdle, kReady, kTransientFailure };
  State state() const;

  struct Loop;  // everything the loop thread owns (rpc_channel.cc)

 private:
  friend class RpcCallHandle;
  friend class RpcStream;

  // `framed`: the request with its 5-byte gRPC prefix.
  std::shared_ptr<RpcCallHandle::Call> Start(std::string_view method, std::string framed,
                                             const RpcCallOptions& options, bool streaming);
  static void RequestCancel(const std::shared_ptr<RpcCallHandle::Call>& call, RpcStatus why);
  static void RequestConsume(const std::shared_ptr<RpcCallHandle::Call>& call);

  const RpcChannelOptions options_;
  std::unique_ptr<Loop> loop_;
};

}  // namespace registry_proxy
