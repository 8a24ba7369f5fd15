// The CRI relay: serves a unix socket and relays HTTP/2 frames to the upstream CRI endpoint
// (containerd), with nghttp2 on both sides, on one event-loop thread.
//
// Why frames and not gRPC calls: a gRPC proxy terminates every call twice (server and client),
// and on these 2-core nodes gRPC's per-call machinery was >95% of the daemon's work (callgrind,
// BENCHMARKS.md). Relaying HEADERS/DATA/trailers of the calls the daemon doesn't change costs
// little more than a byte relay, and keeps everything the caller and containerd said: every
// header (deadline, metadata, encodings), every byte of every message, status, message and
// details, RST_STREAM codes. Messages of relayed calls are never parsed or size-limited here:
// the limits users meet are kubelet's and containerd's.
//
// - One upstream HTTP/2 connection carries every call (opened on demand; after containerd
//   goes away or sends GOAWAY the next call opens a new one at once, no back-off).
// - Flow control is per call, end to end: bytes are acknowledged to the sender (WINDOW_UPDATE)
//   only once the other side took them, so a slow reader holds back its own call and never
//   the connection (connection windows are acknowledged on arrival). What one relayed call
//   can have buffered here is bounded by the stream window (1 MiB each way); an intercepted
//   one holds its request (at most 4 MiB; 64 MiB for all together) or its ImageStatus answer
//   (max_message_bytes).
//   Headers: at most 256 KiB a call each way; at most 1,000 calls at once on a connection.
// - Cancellation: a caller's RST_STREAM becomes containerd's RST_STREAM(CANCEL) and fires the
//   interceptor's cancellation; containerd's reset reaches the caller with its code; a lost
//   containerd connection fails its calls UNAVAILABLE.
// - PullImage and ImageStatus (v1, v1alpha2) are decoded: the request (one gRPC message) goes
//   to the ImageInterceptor on a worker thread of its own (a pull), or to containerd with the
//   response held until it is known to be a hit (forwarded as it came) or a miss (the
//   interceptor may repair it on a worker). A compressed or malformed request is forwarded as
//   the caller's bytes, unchanged. The relay does the frames; CallInterception (intercept.h)
//   the interceptor, its workers and their results.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cri/cri_server.h"
#include "cri/interceptor.h"

namespace registry_proxy {

class CallInterception;

class H2Relay final : public CriServer {
 public:
  // `interceptor` and `observer` may be null (then everything is forwarded untouched).
  // Neither is owned; both must outlive the relay. `options.upstream` is containerd's socket.
  H2Relay(ProxyOptions options, ImageInterceptor* interceptor, CallObserver* observer);
  ~H2Relay() override;  // Shutdown() with no grace
  H2Relay(const H2Relay&) = delete;
  H2Relay& operator=(const H2Relay&) = delete;

  Status Start() override;
  void Shutdown(std::chrono::milliseconds grace) override;
  const std::string& socket_path() const override { return socket_path_; }
  int in_flight() const override { return active_calls_.load(); }

 private:
  struct Stream;
  struct Session;
  friend struct Callbacks;

  // Everything below runs on the loop thread unless it says otherwise.
  void Loop();
  void Accept();
  void ReadFrom(Session* s);
  void Flush(Session* s);
  void MarkDirty(Session* s);
  void Kill(Session* s, const std::string& why);
  void Reap();
  Session* NewSession(int fd, bool server);
  Session* UpstreamSession(std::string* error);
  void UpdateEvents(Session* s);

  void OnRequestHeaders(Stream* st);
  void OnRequestEnded(Stream* st);
  void OnRequestComplete(Stream* st);  // intercepted calls: the whole request is here
  void ReleaseHeld(Stream* st);
  void OpenUpstream(Stream* st);
  void OnResponseHeaders(Stream* st);
  void OnResponseEnded(Stream* st);
  void FinishHeldStatus(Stream* st);
  void SubmitResponse(Stream* st);
  void FailCall(Stream* st, int code, const std::string& message, const std::string& details = "");
  void OnDownstreamClosed(Stream* st, uint32_t error_code);
  void OnUpstreamClosed(Stream* st, uint32_t error_code, const std::string& why);
  void ResumeUp(Stream* st);
  void ResumeDown(Stream* st);
  void MaybeDelete(Stream* st);
  // Interception (intercept.h): hands the call to a worker; false when none can be had (at
  // max_workers, or shutting down).
  bool StartIntercepted(Stream* st, std::function<InterceptResult(const CallOptions&)> work);
  void OnCompletions();
  void AnswerIntercepted(Stream* st, const InterceptResult& result);
  void CancelEverything();

  // Any thread.
  void Wake();

  const ProxyOptions options_;
  const std::unique_ptr<CallInterception> interception_;  // PullImage and ImageStatus
  CallObserver* const observer_;
  std::string socket_path_;
  std::string upstream_path_;

  int epoll_fd_ = -1;
  int wake_fd_ = -1;        // eventfd: worker completions and Shutdown's steps
  int listen_fd_ = -1;      // ours, or the inherited one (never closed then)
  bool listening_ = false;  // listen_fd_ is in the epoll set
  std::optional<std::chrono::steady_clock::time_point> accept_paused_until_;  // after EMFILE
  std::thread loop_;

  // Loop thread only.
  std::vector<Session*> sessions_;  // every live session, for teardown
  std::vector<Session*> dirty_;     // sessions with frames to send this turn
  std::vector<Session*> dead_;      // killed this turn; freed at its end
  Session* upstream_ = nullptr;     // where new calls go
  std::unordered_map<uint64_t, Stream*> streams_;
  uint64_t next_serial_ = 1;
  size_t held_bytes_ = 0;  // intercepted requests' bytes held here, all calls together
  std::vector<uint8_t> read_buf_;

  std::atomic<bool> started_{false};
  std::atomic<bool> stop_accepting_{false};
  std::atomic<bool> refusing_{false};  // after the drain: new calls get UNAVAILABLE
  std::atomic<bool> cancel_all_{false};
  std::atomic<bool> exit_{false};
  std::atomic<int> active_calls_{0};

  std::once_flag shutdown_once_;
};

}  // namespace registry_proxy
