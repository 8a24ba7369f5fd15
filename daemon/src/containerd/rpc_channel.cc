#include "containerd/rpc_channel.h"

#include <absl/strings/escaping.h>
#include <errno.h>
#include <google/protobuf/message_lite.h>
#include <nghttp2/nghttp2.h>
#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <set>
#include <thread>
#include <unordered_map>

namespace registry_proxy {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kPrefix = 5;  // gRPC's message prefix: compressed flag, 4-byte length
// Per call: what the peer may send before we acknowledge it. Unary responses are acknowledged
// on arrival (bounded by max_message_bytes), so this only paces a single large response.
constexpr int32_t kStreamWindow = 4 << 20;
// The connection's window is acknowledged on arrival (one slow reader must not stall the
// others): the largest HTTP/2 allows, so its WINDOW_UPDATEs are rare.
constexpr int32_t kConnectionWindow = INT32_MAX;
// Unread bytes of a streaming call before we stop acknowledging its data (the peer then
// stops at the stream's window): a reader that falls behind holds back its own call only.
constexpr size_t kStreamBuffer = 4 << 20;
// Response header bytes per call (HPACK's measure), as the relay allows.
constexpr size_t kMaxHeaderBytes = 256 << 10;
constexpr size_t kReadChunk = 64 << 10;
// Serialize at most this much before writing, so a burst of requests is sent in pieces.
constexpr size_t kWriteChunk = 256 << 10;

std::string Frame(std::string_view message) {
  std::string out(kPrefix, '\0');
  const uint32_t n = static_cast<uint32_t>(message.size());
  out[1] = static_cast<char>(n >> 24);
  out[2] = static_cast<char>(n >> 16);
  out[3] = static_cast<char>(n >> 8);
  out[4] = static_cast<char>(n);
  out.append(message);
  return out;
}

// grpc-timeout: at most 8 digits and a unit; the finest unit that fits, rounded up, so the
// peer never sees more time than we allow.
std::string TimeoutHeader(Clock::duration left) {
  const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(left).count();
  struct Unit {
    int64_t ns;
    char name;
  };
  static constexpr Unit kUnits[] = {{1, 'n'},          {1000, 'u'},        {1000000, 'm'},
                                    {1000000000, 'S'}, {60000000000, 'M'}, {3600000000000, 'H'}};
  for (const Unit& u : kUnits) {
    const int64_t v = (ns + u.ns - 1) / u.ns;
    if (v <= 99999999) return std::to_string(std::max<int64_t>(v, 1)) + u.name;
  }
  return "99999999H";
}

// grpc-message is percent-encoded (PROTOCOL-HTTP2); a malformed escape is kept as it is.
std::string PercentDecode(std::string_view s) {
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size()) {
      const int hi = hex(s[i + 1]), lo = hex(s[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out += static_cast<char>(hi * 16 + lo);
        i += 2;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

// -bin values are base64, padded or not (PROTOCOL-HTTP2); empty when it is not base64.
std::string DecodeBinaryHeader(std::string_view v) {
  std::string padded(v);
  while (padded.size() % 4 != 0) padded += '=';
  std::string out;
  if (!absl::Base64Unescape(padded, &out)) return {};
  return out;
}

// How gRPC reads an HTTP status that comes without grpc-status (doc/http-grpc-status-mapping).
RpcCode CodeOfHttpStatus(int status) {
  switch (status) {
    case 400:
      return RpcCode::INTERNAL;
    case 401:
      return RpcCode::UNAUTHENTICATED;
    case 403:
      return RpcCode::PERMISSION_DENIED;
    case 404:
      return RpcCode::UNIMPLEMENTED;
    case 429:
    case 502:
    case 503:
    case 504:
      return RpcCode::UNAVAILABLE;
    default:
      return RpcCode::UNKNOWN;
  }
}

// How gRPC reads an RST_STREAM from the peer (PROTOCOL-HTTP2, "Errors").
RpcCode CodeOfReset(uint32_t error) {
  switch (error) {
    case NGHTTP2_CANCEL:
      return RpcCode::CANCELLED;
    case NGHTTP2_REFUSED_STREAM:
      return RpcCode::UNAVAILABLE;
    case NGHTTP2_ENHANCE_YOUR_CALM:
      return RpcCode::RESOURCE_EXHAUSTED;
    case NGHTTP2_INADEQUATE_SECURITY:
      return RpcCode::PERMISSION_DENIED;
    default:
      return RpcCode::INTERNAL;
  }
}

// 1 to 3 decimal digits (:status, grpc-status); -1 for anything else.
int SmallNumber(std::string_view v) {
  if (v.empty() || v.size() > 3) return -1;
  int n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return -1;
    n = n * 10 + (c - '0');
  }
  return n;
}

bool ValidKey(std::string_view k) {
  if (k.empty()) return false;
  return std::all_of(k.begin(), k.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
  });
}

bool ValidAsciiValue(std::string_view v) {
  return std::all_of(v.begin(), v.end(), [](char c) { return c >= 0x20 && c <= 0x7e; });
}

bool IsBinaryKey(std::string_view k) { return k.size() > 4 && k.substr(k.size() - 4) == "-bin"; }

nghttp2_nv Nv(const std::string& name, const std::string& value) {
  return {reinterpret_cast<uint8_t*>(const_cast<char*>(name.data())),
          reinterpret_cast<uint8_t*>(const_cast<char*>(value.data())), name.size(), value.size(),
          NGHTTP2_NV_FLAG_NONE};
}

// "unix:///path" or "/path" -> "/path"; empty if it is neither.
std::string SocketPath(std::string_view endpoint) {
  if (endpoint.rfind("unix://", 0) == 0) endpoint.remove_prefix(7);
  if (endpoint.empty() || endpoint[0] != '/') return {};
  return std::string(endpoint);
}

struct Session;  // one HTTP/2 connection (below)

}  // namespace

// ---------------------------------------------------------------------------------------------
// One call, shared by the caller's thread and the loop thread.

struct RpcCallHandle::Call {
  // Set before the call is handed to the loop; read-only afterwards.
  RpcChannel* channel = nullptr;
  std::string method;
  std::string request;                                       // framed
  std::vector<std::pair<std::string, std::string>> headers;  // without grpc-timeout
  Clock::time_point deadline = Clock::time_point::max();
  bool wait_for_ready = false;
  bool streaming = false;
  RpcCallHandle* handle = nullptr;  // the caller's, or null

  // The loop thread's alone.
  Session* session = nullptr;  // where the stream is open, or null
  int32_t stream_id = 0;
  size_t sent = 0;    // of request
  std::string rx;     // received bytes of a message not yet complete
  size_t rx_off = 0;  // start of the unparsed part of rx
  int http_status = 0;
  int grpc_status = -1;
  std::string grpc_message, grpc_details;
  size_t header_bytes = 0;
  size_t unconsumed = 0;  // data held back from the flow-control window (slow stream reader)
  bool finished = false;  // the loop has set the outcome

  // Shared, under mu.
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> messages;
  size_t buffered = 0;          // bytes in messages
  bool consume_wanted = false;  // the loop holds data back until the reader catches up
  bool done = false;
  RpcStatus status;
};

using CallPtr = std::shared_ptr<RpcCallHandle::Call>;

namespace {

struct Session {
  struct RpcChannel::Loop* loop = nullptr;
  int fd = -1;
  nghttp2_session* ng = nullptr;
  std::string out;  // serialized frames not yet written
  size_t out_off = 0;
  uint32_t events = 0;  // registered with epoll
  bool usable = true;   // new calls may start here (false after GOAWAY)
  bool dead = false;
  std::unordered_map<int32_t, CallPtr> streams;  // open streams (finished or not)

  ~Session() {
    if (ng) nghttp2_session_del(ng);
    if (fd >= 0) close(fd);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The loop thread and everything it owns.

struct RpcChannel::Loop {
  explicit Loop(const RpcChannelOptions& options);
  ~Loop();

  // Caller side (any thread).
  void Submit(const CallPtr& call);
  void Cancel(const CallPtr& call, RpcStatus why);
  void Consume(const CallPtr& call);
  void Stop();
  template <class Push>
  bool Post(Push push);

  // Loop side.
  void Run();
  void TakeRequests();
  void StartCall(const CallPtr& call);
  Session* Connect(std::string* error);
  void RetryConnect();
  void Finish(const CallPtr& call, RpcStatus status);
  void Abort(const CallPtr& call, RpcStatus status);
  void OnMessageBytes(const CallPtr& call, const uint8_t* data, size_t len);
  void OnStreamClosed(Session* s, int32_t id, uint32_t error);
  void ExpireDeadlines();
  void ArmTimer();
  void ReadFrom(Session* s);
  void Flush(Session* s);
  void Kill(Session* s, const std::string& why);

  const RpcChannelOptions& options;
  const std::string path;
  int epoll_fd = -1, wake_fd = -1, timer_fd = -1;
  std::atomic<int> connections{0};
  std::atomic<State> state{State::kIdle};  // written by the loop only

  // Shared with callers, under mu.
  std::mutex mu;
  std::vector<CallPtr> submitted;
  std::vector<std::pair<CallPtr, RpcStatus>> cancels;
  std::vector<CallPtr> consumes;
  bool wake_pending = false;  // the eventfd was written and the loop has not taken the queues
  bool stop = false;

  // The loop thread's alone.
  std::vector<std::unique_ptr<Session>> sessions;  // the current one and any draining
  Session* current = nullptr;                      // where new calls go
  std::vector<CallPtr> waiting;                    // wait-for-ready, until a connection is up
  std::set<CallPtr> timed;                         // unfinished calls with a deadline
  bool connect_scheduled = false;
  Clock::time_point next_connect;
  Clock::duration backoff{};
  Clock::time_point armed_at = Clock::time_point::max();
  std::string read_buf;

  std::thread thread;  // last: started once everything above exists
};

namespace {

// nghttp2's callbacks reach the loop through the session.
struct Callbacks {
  static CallPtr Find(Session* s, int32_t id) {
    auto it = s->streams.find(id);
    return it == s->streams.end() ? nullptr : it->second;
  }

  static int OnHeader(nghttp2_session* /*ng*/, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t /*flags*/,
                      void* user) {
    auto* s = static_cast<Session*>(user);
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    CallPtr call = Find(s, frame->hd.stream_id);
    if (!call || call->finished) return 0;
    call->header_bytes += namelen + valuelen + 32;  // HPACK's own measure of an entry
    if (call->header_bytes > kMaxHeaderBytes) {
      s->loop->Abort(call, RpcStatus(RpcCode::RESOURCE_EXHAUSTED,
                                     "response headers larger than the largest allowed"));
      return 0;
    }
    std::string_view n(reinterpret_cast<const char*>(name), namelen);
    std::string_view v(reinterpret_cast<const char*>(value), valuelen);
    if (n == ":status") {
      call->http_status = SmallNumber(v);
    } else if (n == "grpc-status") {
      const int code = SmallNumber(v);
      call->grpc_status = code < 0 ? static_cast<int>(RpcCode::UNKNOWN) : code;
    } else if (n == "grpc-message") {
      call->grpc_message = PercentDecode(v);
    } else if (n == "grpc-status-details-bin") {
      call->grpc_details = DecodeBinaryHeader(v);
    }
    return 0;
  }

  static int OnFrameRecv(nghttp2_session* /*ng*/, const nghttp2_frame* frame, void* user) {
    auto* s = static_cast<Session*>(user);
    if (frame->hd.type == NGHTTP2_GOAWAY) {
      // The peer is going away: calls it accepted finish here, new ones open a new connection.
      // nghttp2 closes the streams it refused (REFUSED_STREAM: UNAVAILABLE).
      s->usable = false;
      if (s->loop->current == s) {
        s->loop->current = nullptr;
        s->loop->state.store(RpcChannel::State::kIdle, std::memory_order_relaxed);
      }
    }
    return 0;
  }

  static int OnDataChunk(nghttp2_session* ng, uint8_t /*flags*/, int32_t id, const uint8_t* data,
                         size_t len, void* user) {
    auto* s = static_cast<Session*>(user);
    nghttp2_session_consume_connection(ng, len);
    CallPtr call = Find(s, id);
    if (!call || call->finished) {
      nghttp2_session_consume_stream(ng, id, len);  // nobody wants it any more
      return 0;
    }
    s->loop->OnMessageBytes(call, data, len);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* /*ng*/, int32_t id, uint32_t error, void* user) {
    auto* s = static_cast<Session*>(user);
    s->loop->OnStreamClosed(s, id, error);
    return 0;
  }

  // A request nghttp2 could not send (the stream was reset before its HEADERS went out, or the
  // session is going away): the call ends here, since no stream-close will come for it.
  static int OnFrameNotSend(nghttp2_session* /*ng*/, const nghttp2_frame* frame, int error,
                            void* user) {
    auto* s = static_cast<Session*>(user);
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    CallPtr call = Find(s, frame->hd.stream_id);
    if (!call) return 0;
    s->streams.erase(frame->hd.stream_id);
    s->loop->Finish(call, RpcStatus(RpcCode::UNAVAILABLE,
                                    std::string("request not sent: ") + nghttp2_strerror(error)));
    return 0;
  }

  static ssize_t ReadRequest(nghttp2_session* /*ng*/, int32_t /*id*/, uint8_t* buf, size_t length,
                             uint32_t* flags, nghttp2_data_source* source, void* /*user*/) {
    auto* call = static_cast<RpcCallHandle::Call*>(source->ptr);
    const size_t n = std::min(length, call->request.size() - call->sent);
    std::memcpy(buf, call->request.data() + call->sent, n);
    call->sent += n;
    if (call->sent == call->request.size()) *flags |= NGHTTP2_DATA_FLAG_EOF;
    return static_cast<ssize_t>(n);
  }

  static nghttp2_session_callbacks* Make() {
    nghttp2_session_callbacks* cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_header_callback(cb, OnHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, OnFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, OnDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, OnStreamClose);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, OnFrameNotSend);
    return cb;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Ending a call, from either side.

namespace {

// Publishes the outcome to the caller (once). `drop` discards messages not read yet: the call
// was ended here (cancel, deadline, bad message), so what came before is of no use.
void Complete(const CallPtr& call, RpcStatus status, bool drop = false) {
  {
    std::lock_guard lock(call->mu);
    if (call->done) return;
    call->done = true;
    call->status = std::move(status);
    if (drop) {
      call->messages.clear();
      call->buffered = 0;
    }
  }
  call->cv.notify_all();
}

// How a call whose stream closed cleanly (or was reset by the peer) ended.
RpcStatus StatusAtClose(const RpcCallHandle::Call& call, uint32_t error) {
  if (error == NGHTTP2_CANCEL && Clock::now() >= call.deadline) {
    // The peer's own deadline (from our grpc-timeout, never earlier than ours) ended the call
    // just before our timer did: containerd 2.x resets the stream then. gRPC reads that as
    // DEADLINE_EXCEEDED, and so does the pull service's attempt timeout.
    return RpcStatus(RpcCode::DEADLINE_EXCEEDED, "deadline exceeded");
  }
  if (error != NGHTTP2_NO_ERROR) {
    return RpcStatus(CodeOfReset(error), std::string("stream reset (HTTP/2 error ") +
                                             nghttp2_http2_strerror(error) + ")");
  }
  if (call.grpc_status >= 0) {
    const RpcCode code = RpcCodeFromWire(call.grpc_status);
    if (code == RpcCode::OK && call.rx_off < call.rx.size()) {
      return RpcStatus(RpcCode::INTERNAL, "the response ended inside a message");
    }
    return RpcStatus(code, call.grpc_message, call.grpc_details);
  }
  if (call.http_status == 0) {
    return RpcStatus(RpcCode::INTERNAL, "the stream ended without a response");
  }
  if (call.http_status != 200) {
    return RpcStatus(CodeOfHttpStatus(call.http_status),
                     "HTTP status " + std::to_string(call.http_status) + " without grpc-status");
  }
  return RpcStatus(RpcCode::UNKNOWN, "the response ended without grpc-status");
}

}  // namespace

void RpcChannel::Loop::Finish(const CallPtr& call, RpcStatus status) {
  if (call->finished) return;
  call->finished = true;
  timed.erase(call);
  Complete(call, std::move(status));
}

// Ends a call here, before its peer did: the stream (if any) is reset, the call leaves the
// wait-for-ready queue (if there).
void RpcChannel::Loop::Abort(const CallPtr& call, RpcStatus status) {
  if (call->finished) return;
  call->finished = true;
  timed.erase(call);
  Complete(call, std::move(status), /*drop=*/true);
  Session* s = call->session;
  if (s && !s->dead && s->streams.count(call->stream_id)) {
    nghttp2_submit_rst_stream(s->ng, NGHTTP2_FLAG_NONE, call->stream_id, NGHTTP2_CANCEL);
  } else {
    waiting.erase(std::remove(waiting.begin(), waiting.end(), call), waiting.end());
  }
}

// ---------------------------------------------------------------------------------------------
// Requests from callers' threads.

// Queues a request (under mu) and wakes the loop, unless a wake is already on its way: the loop
// takes every queued request at once, so one eventfd write serves a burst of calls.
template <class Push>
bool RpcChannel::Loop::Post(Push push) {
  bool wake = false;
  {
    std::lock_guard lock(mu);
    if (stop) return false;  // the loop has finished (or is finishing) every call
    push();
    wake = !wake_pending;
    wake_pending = true;
  }
  uint64_t one = 1;
  if (wake) (void)!write(wake_fd, &one, sizeof one);  // EAGAIN: the counter is full, loop awake
  return true;
}

void RpcChannel::Loop::Submit(const CallPtr& call) {
  if (wake_fd < 0) {
    Complete(call, RpcStatus(RpcCode::UNAVAILABLE, "the channel has no event loop"));
  } else if (!Post([&] { submitted.push_back(call); })) {
    Complete(call, RpcStatus(RpcCode::CANCELLED, "the channel was closed"));
  }
}

// Both with the call's lock held by the caller (RpcChannel::RequestCancel, RequestConsume).
void RpcChannel::Loop::Cancel(const CallPtr& call, RpcStatus why) {
  Post([&] { cancels.emplace_back(call, std::move(why)); });
}

void RpcChannel::Loop::Consume(const CallPtr& call) {
  Post([&] { consumes.push_back(call); });
}

void RpcChannel::Loop::Stop() {
  {
    std::lock_guard lock(mu);
    stop = true;
  }
  uint64_t one = 1;
  if (wake_fd >= 0) (void)!write(wake_fd, &one, sizeof one);
}

// ---------------------------------------------------------------------------------------------
// The loop.

RpcChannel::Loop::Loop(const RpcChannelOptions& o)
    : options(o), path(SocketPath(o.endpoint)), read_buf(kReadChunk, '\0') {
  epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &wake_fd;
  bool ok = epoll_fd >= 0 && wake_fd >= 0 && timer_fd >= 0 &&
            epoll_ctl(epoll_fd, EPOLL_CTL_ADD, wake_fd, &ev) == 0;
  ev.data.ptr = &timer_fd;
  ok = ok && epoll_ctl(epoll_fd, EPOLL_CTL_ADD, timer_fd, &ev) == 0;
  if (!ok) {
    // Out of descriptors: every call fails UNAVAILABLE (Submit) rather than hang.
    if (wake_fd >= 0) close(wake_fd);
    wake_fd = -1;
    return;
  }
  thread = std::thread([this] { Run(); });
}

RpcChannel::Loop::~Loop() {
  Stop();
  if (thread.joinable()) thread.join();
  for (int fd : {epoll_fd, wake_fd, timer_fd}) {
    if (fd >= 0) close(fd);
  }
}

void RpcChannel::Loop::Run() {
  pthread_setname_np(pthread_self(), "rpc-channel");  // for top, perf and the tests
  epoll_event events[16];
  bool stopping = false;
  while (!stopping) {
    ArmTimer();
    const int n = epoll_wait(epoll_fd, events, 16, -1);
    if (n < 0 && errno != EINTR) break;
    for (int i = 0; i < n; ++i) {
      void* p = events[i].data.ptr;
      if (p == &wake_fd) {
        uint64_t v;
        (void)!read(wake_fd, &v, sizeof v);
        std::lock_guard lock(mu);
        stopping = stop;
      } else if (p == &timer_fd) {
        uint64_t v;
        (void)!read(timer_fd, &v, sizeof v);
        armed_at = Clock::time_point::max();  // fired: re-arm for whatever is next
      } else {
        auto* s = static_cast<Session*>(p);
        if (!s->dead && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) ReadFrom(s);
      }
    }
    TakeRequests();
    ExpireDeadlines();
    if (connect_scheduled && Clock::now() >= next_connect) RetryConnect();
    // Frames queued by this turn (requests, resets, acknowledgements) go out once per turn.
    for (size_t i = 0; i < sessions.size(); ++i) {
      if (!sessions[i]->dead) Flush(sessions[i].get());
    }
    std::erase_if(sessions, [](const std::unique_ptr<Session>& s) { return s->dead; });
  }
  // Closing: every call still here ends CANCELLED, and callers blocked on one return.
  const RpcStatus closed(RpcCode::CANCELLED, "the channel was closed");
  std::vector<CallPtr> unstarted;
  {
    std::lock_guard lock(mu);
    stop = true;  // also when epoll_wait failed: no request is queued after this
    unstarted.swap(submitted);
    cancels.clear();
    consumes.clear();
  }
  // Not under mu: RequestCancel holds a call's lock while it takes mu.
  for (const CallPtr& c : unstarted) Finish(c, closed);
  for (const CallPtr& c : std::vector<CallPtr>(waiting)) Finish(c, closed);
  waiting.clear();
  for (auto& s : sessions) {
    for (auto& [id, c] : s->streams) Finish(c, closed);
    s->streams.clear();
  }
  sessions.clear();
}

void RpcChannel::Loop::TakeRequests() {
  std::vector<CallPtr> new_calls, to_consume;
  std::vector<std::pair<CallPtr, RpcStatus>> to_cancel;
  {
    std::lock_guard lock(mu);
    wake_pending = false;
    new_calls.swap(submitted);
    to_cancel.swap(cancels);
    to_consume.swap(consumes);
  }
  // Started before cancelled: a cancel may arrive in the same batch as its call.
  for (const CallPtr& c : new_calls) StartCall(c);
  for (auto& [c, why] : to_cancel) Abort(c, std::move(why));
  for (const CallPtr& c : to_consume) {
    Session* s = c->session;
    if (c->finished || !s || s->dead || c->unconsumed == 0) continue;
    nghttp2_session_consume_stream(s->ng, c->stream_id, c->unconsumed);
    c->unconsumed = 0;
  }
}

// --- connections and calls -------------------------------------------------------------------

Session* RpcChannel::Loop::Connect(std::string* error) {
  if (path.empty()) {
    *error = "not a unix socket endpoint: '" + options.endpoint + "'";
    return nullptr;
  }
  static nghttp2_session_callbacks* callbacks = Callbacks::Make();
  static nghttp2_option* option = [] {
    nghttp2_option* o;
    nghttp2_option_new(&o);
    nghttp2_option_set_no_auto_window_update(o, 1);  // we acknowledge what callers took
    nghttp2_option_set_no_closed_streams(o, 1);      // no priority tree: keep nothing closed
    // gRPC servers send grpc-message values with leading or trailing spaces; RFC 9113 forbids
    // them and nghttp2 would reset the call. Take them.
    nghttp2_option_set_no_rfc9113_leading_and_trailing_ws_validation(o, 1);
    // Until the peer's SETTINGS arrive nghttp2 would assume 100 streams; gRPC servers allow any.
    nghttp2_option_set_peer_max_concurrent_streams(o, 1u << 30);
    return o;
  }();
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *error = std::string("socket: ") + std::strerror(errno);
    return nullptr;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    close(fd);
    *error = "socket path too long: " + path;
    return nullptr;
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // A unix socket connects at once or not at all (EAGAIN: the peer's backlog is full).
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    *error = "cannot connect to " + path + ": " + std::strerror(errno);
    close(fd);
    state.store(State::kTransientFailure, std::memory_order_relaxed);
    return nullptr;
  }
  auto s = std::make_unique<Session>();
  s->loop = this;
  s->fd = fd;
  if (nghttp2_session_client_new2(&s->ng, callbacks, s.get(), option) != 0) {
    *error = "cannot start an HTTP/2 session";
    return nullptr;
  }
  const nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kStreamWindow},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, kMaxHeaderBytes}};
  nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, settings, 3);
  nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
  s->events = EPOLLIN;
  epoll_event ev{};
  ev.events = s->events;
  ev.data.ptr = s.get();
  if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
    *error = std::string("epoll_ctl: ") + std::strerror(errno);
    return nullptr;
  }
  connections.fetch_add(1, std::memory_order_relaxed);
  state.store(State::kReady, std::memory_order_relaxed);
  backoff = Clock::duration::zero();
  current = s.get();
  sessions.push_back(std::move(s));
  return current;
}

void RpcChannel::Loop::StartCall(const CallPtr& call) {
  if (call->finished) return;  // cancelled before the loop saw it
  const Clock::time_point now = Clock::now();
  if (call->deadline != Clock::time_point::max()) {
    if (call->deadline <= now) {
      Finish(call, RpcStatus(RpcCode::DEADLINE_EXCEEDED, "deadline exceeded"));
      return;
    }
    timed.insert(call);
  }
  std::string error;
  Session* s = current && current->usable && !current->dead ? current : Connect(&error);
  if (!s) {
    if (!call->wait_for_ready) {
      Finish(call, RpcStatus(RpcCode::UNAVAILABLE, error));
      return;
    }
    waiting.push_back(call);
    if (!connect_scheduled) {
      backoff = backoff == Clock::duration::zero()
                    ? Clock::duration(options.initial_backoff)
                    : std::min<Clock::duration>(backoff * 2, options.max_backoff);
      next_connect = now + backoff;
      connect_scheduled = true;
    }
    return;
  }
  std::vector<nghttp2_nv> nv;
  nv.reserve(call->headers.size() + 1);
  for (const auto& [name, value] : call->headers) nv.push_back(Nv(name, value));
  static const std::string kTimeout = "grpc-timeout";
  std::string timeout;
  if (call->deadline != Clock::time_point::max()) {
    timeout = TimeoutHeader(call->deadline - now);
    nv.push_back(Nv(kTimeout, timeout));
  }
  nghttp2_data_provider body{};
  body.source.ptr = call.get();
  body.read_callback = Callbacks::ReadRequest;
  const int32_t id = nghttp2_submit_request(s->ng, nullptr, nv.data(), nv.size(), &body, nullptr);
  if (id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE) {
    // This connection has used up its stream ids (2^30 calls): the next one goes on a new one.
    s->usable = false;
    current = nullptr;
    StartCall(call);
    return;
  }
  if (id < 0) {
    Finish(call, RpcStatus(RpcCode::INTERNAL,
                           std::string("cannot start the call: ") + nghttp2_strerror(id)));
    return;
  }
  call->session = s;
  call->stream_id = id;
  s->streams.emplace(id, call);
}

// A wait-for-ready call is waiting and the back-off has passed.
void RpcChannel::Loop::RetryConnect() {
  connect_scheduled = false;
  if (waiting.empty()) return;
  std::vector<CallPtr> ready;
  ready.swap(waiting);
  // StartCall connects (or queues the calls again and schedules the next attempt).
  for (const CallPtr& c : ready) StartCall(c);
}

void RpcChannel::Loop::OnMessageBytes(const CallPtr& call, const uint8_t* data, size_t len) {
  nghttp2_session* ng = call->session->ng;
  const int32_t id = call->stream_id;
  if (!call->streaming) nghttp2_session_consume_stream(ng, id, len);  // bounded below
  call->rx.append(reinterpret_cast<const char*>(data), len);
  std::vector<std::string> got;
  RpcStatus error;
  while (call->rx.size() - call->rx_off >= kPrefix) {
    const auto* p = reinterpret_cast<const uint8_t*>(call->rx.data() + call->rx_off);
    const size_t n = (size_t{p[1]} << 24) | (size_t{p[2]} << 16) | (size_t{p[3]} << 8) | p[4];
    if (p[0] & 1) {
      error =
          RpcStatus(RpcCode::INTERNAL, "a compressed message, and no compression was asked for");
      break;
    }
    if (n > options.max_message_bytes) {
      error = RpcStatus(RpcCode::RESOURCE_EXHAUSTED,
                        "received message larger than max (" + std::to_string(n) + " vs. " +
                            std::to_string(options.max_message_bytes) + ")");
      break;
    }
    if (call->rx.size() - call->rx_off < kPrefix + n) break;
    got.emplace_back(call->rx, call->rx_off + kPrefix, n);
    call->rx_off += kPrefix + n;
  }
  if (call->rx_off == call->rx.size()) {
    call->rx.clear();
    call->rx_off = 0;
  } else if (call->rx_off > (64u << 10) && call->rx_off > call->rx.size() / 2) {
    call->rx.erase(0, call->rx_off);
    call->rx_off = 0;
  }
  if (error.ok() && !call->streaming && !got.empty()) {
    std::lock_guard lock(call->mu);
    if (call->messages.size() + got.size() > 1) {
      error = RpcStatus(RpcCode::INTERNAL, "more than one message in a unary response");
    }
  }
  if (!error.ok()) {
    if (call->streaming) nghttp2_session_consume_stream(ng, id, len + call->unconsumed);
    call->unconsumed = 0;
    Abort(call, std::move(error));
    return;
  }
  bool consume_now = !call->streaming;
  if (!got.empty() || call->streaming) {
    std::lock_guard lock(call->mu);
    for (std::string& m : got) {
      call->buffered += m.size();
      call->messages.push_back(std::move(m));
    }
    if (call->streaming) {
      // A reader that keeps up keeps the window open; one that does not holds its stream back.
      consume_now = call->buffered <= kStreamBuffer;
      call->consume_wanted = !consume_now;
    }
  }
  if (!got.empty()) call->cv.notify_all();
  if (call->streaming) {
    call->unconsumed += len;
    if (consume_now) {
      nghttp2_session_consume_stream(ng, id, call->unconsumed);
      call->unconsumed = 0;
    }
  }
}

void RpcChannel::Loop::OnStreamClosed(Session* s, int32_t id, uint32_t error) {
  auto it = s->streams.find(id);
  if (it == s->streams.end()) return;
  CallPtr call = std::move(it->second);
  s->streams.erase(it);
  call->session = nullptr;
  if (!call->finished) Finish(call, StatusAtClose(*call, error));
}

// --- time --------------------------------------------------------------------------------------

void RpcChannel::Loop::ExpireDeadlines() {
  if (timed.empty()) return;
  const Clock::time_point now = Clock::now();
  std::vector<CallPtr> due;
  for (const CallPtr& c : timed) {
    if (c->deadline <= now) due.push_back(c);
  }
  for (const CallPtr& c : due) Abort(c, RpcStatus(RpcCode::DEADLINE_EXCEEDED, "deadline exceeded"));
}

// The timer runs only while a call with a deadline is in flight or a connection attempt is
// due: an idle channel has nothing armed and its thread never wakes.
void RpcChannel::Loop::ArmTimer() {
  Clock::time_point next = connect_scheduled ? next_connect : Clock::time_point::max();
  for (const CallPtr& c : timed) next = std::min(next, c->deadline);
  if (next == armed_at) return;
  armed_at = next;
  itimerspec its{};  // all zero: disarmed
  if (next != Clock::time_point::max()) {
    // steady_clock is CLOCK_MONOTONIC, the timer's clock.
    const int64_t ns = std::max<int64_t>(
        1, std::chrono::duration_cast<std::chrono::nanoseconds>(next.time_since_epoch()).count());
    its.it_value.tv_sec = ns / 1000000000;
    its.it_value.tv_nsec = ns % 1000000000;
  }
  timerfd_settime(timer_fd, TFD_TIMER_ABSTIME, &its, nullptr);
}

// --- bytes -------------------------------------------------------------------------------------

void RpcChannel::Loop::ReadFrom(Session* s) {
  for (int i = 0; i < 16; ++i) {
    const ssize_t n = recv(s->fd, read_buf.data(), read_buf.size(), 0);
    if (n > 0) {
      const ssize_t rv = nghttp2_session_mem_recv(
          s->ng, reinterpret_cast<const uint8_t*>(read_buf.data()), static_cast<size_t>(n));
      if (rv < 0) {
        Kill(s, std::string("HTTP/2 error: ") + nghttp2_strerror(static_cast<int>(rv)));
        return;
      }
      if (static_cast<size_t>(n) < read_buf.size()) return;
      continue;
    }
    if (n == 0) {
      Kill(s, "connection closed by the peer");
      return;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) Kill(s, std::strerror(errno));
    return;
  }
}

void RpcChannel::Loop::Flush(Session* s) {
  for (;;) {
    while (s->out_off < s->out.size()) {
      const ssize_t n = send(s->fd, s->out.data() + s->out_off, s->out.size() - s->out_off,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        s->out_off += static_cast<size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        break;
      } else {
        Kill(s, n < 0 ? std::strerror(errno) : "short write");
        return;
      }
    }
    if (s->out_off < s->out.size()) break;  // the socket is full: wait for EPOLLOUT
    s->out.clear();
    s->out_off = 0;
    // Serialize the next piece.
    while (s->out.size() < kWriteChunk) {
      const uint8_t* data;
      const ssize_t n = nghttp2_session_mem_send(s->ng, &data);
      if (n < 0) {
        Kill(s, std::string("HTTP/2 error: ") + nghttp2_strerror(static_cast<int>(n)));
        return;
      }
      if (n == 0) break;
      s->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
    }
    if (s->out.empty()) break;
  }
  if (s->out.empty() && !nghttp2_session_want_read(s->ng) && !nghttp2_session_want_write(s->ng)) {
    Kill(s, "the session ended");  // GOAWAY exchanged and nothing left in flight
    return;
  }
  const uint32_t want = EPOLLIN | (s->out_off < s->out.size() ? uint32_t{EPOLLOUT} : 0u);
  if (want != s->events) {
    s->events = want;
    epoll_event ev{};
    ev.events = want;
    ev.data.ptr = s;
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s->fd, &ev);
  }
}

void RpcChannel::Loop::Kill(Session* s, const std::string& why) {
  if (s->dead) return;
  s->dead = true;
  if (current == s) {
    current = nullptr;
    state.store(State::kIdle, std::memory_order_relaxed);
  }
  epoll_ctl(epoll_fd, EPOLL_CTL_DEL, s->fd, nullptr);
  auto streams = std::move(s->streams);
  s->streams.clear();
  const RpcStatus lost(RpcCode::UNAVAILABLE, "connection to " + path + " lost: " + why);
  for (auto& [id, call] : streams) {
    call->session = nullptr;
    Finish(call, lost);
  }
}

// ---------------------------------------------------------------------------------------------
// The callers' side.

namespace {

bool FrameMessage(const google::protobuf::MessageLite& m, std::string* framed) {
  framed->assign(kPrefix, '\0');
  if (!m.AppendToString(framed)) return false;
  const uint32_t n = static_cast<uint32_t>(framed->size() - kPrefix);
  (*framed)[1] = static_cast<char>(n >> 24);
  (*framed)[2] = static_cast<char>(n >> 16);
  (*framed)[3] = static_cast<char>(n >> 8);
  (*framed)[4] = static_cast<char>(n);
  return true;
}

RpcStatus Wait(RpcCallHandle::Call& call) {
  std::unique_lock lock(call.mu);
  call.cv.wait(lock, [&] { return call.done; });
  return call.status;
}

}  // namespace

bool RpcCallHandle::Attach(std::shared_ptr<Call> call) {
  std::lock_guard lock(mu_);
  if (cancelled_) return false;
  call_ = std::move(call);
  return true;
}

void RpcCallHandle::Detach(const Call* call) {
  std::lock_guard lock(mu_);
  if (call_.get() == call) call_.reset();
}

void RpcCallHandle::Cancel() {
  std::shared_ptr<Call> call;
  {
    std::lock_guard lock(mu_);
    cancelled_ = true;
    call = call_;
  }
  if (call) RpcChannel::RequestCancel(call, RpcStatus(RpcCode::CANCELLED, "cancelled"));
}

bool RpcCallHandle::cancelled() const {
  std::lock_guard lock(mu_);
  return cancelled_;
}

RpcChannel::RpcChannel(RpcChannelOptions options)
    : options_(std::move(options)), loop_(std::make_unique<Loop>(options_)) {}

RpcChannel::~RpcChannel() = default;  // ~Loop: stops, cancels and joins

// A call not done is one the loop has not finished, and the loop finishes every call before it
// exits: so while the call's lock is held and it is not done, its channel and loop are alive,
// even if another thread is destroying the channel.
void RpcChannel::RequestCancel(const std::shared_ptr<RpcCallHandle::Call>& call, RpcStatus why) {
  std::lock_guard lock(call->mu);
  if (call->done) return;
  call->channel->loop_->Cancel(call, std::move(why));
}

void RpcChannel::RequestConsume(const std::shared_ptr<RpcCallHandle::Call>& call) {
  std::lock_guard lock(call->mu);
  if (call->done) return;
  call->channel->loop_->Consume(call);
}

int RpcChannel::connections_opened() const {
  return loop_->connections.load(std::memory_order_relaxed);
}

RpcChannel::State RpcChannel::state() const { return loop_->state.load(std::memory_order_relaxed); }

std::shared_ptr<RpcCallHandle::Call> RpcChannel::Start(std::string_view method, std::string framed,
                                                       const RpcCallOptions& options,
                                                       bool streaming) {
  auto call = std::make_shared<RpcCallHandle::Call>();
  call->channel = this;
  call->method = method;
  call->streaming = streaming;
  call->wait_for_ready = options.wait_for_ready;
  call->handle = options.handle;
  if (framed.size() - kPrefix > options_.max_message_bytes) {
    Complete(call, RpcStatus(RpcCode::RESOURCE_EXHAUSTED,
                             "request larger than max (" + std::to_string(framed.size() - kPrefix) +
                                 " vs. " + std::to_string(options_.max_message_bytes) + ")"));
    return call;
  }
  call->request = std::move(framed);
  call->headers = {{":method", "POST"},
                   {":scheme", "http"},
                   {":path", std::string(method)},
                   {":authority", options_.authority},
                   {"content-type", "application/grpc"},
                   {"te", "trailers"},
                   {"user-agent", options_.user_agent}};
  for (const auto& [key, value] : options.metadata) {
    const bool binary = IsBinaryKey(key);
    if (!ValidKey(key) || (!binary && !ValidAsciiValue(value))) {
      Complete(call, RpcStatus(RpcCode::INTERNAL, "invalid metadata '" + key + "'"));
      return call;
    }
    if (!binary) {
      call->headers.emplace_back(key, value);
      continue;
    }
    // Unpadded, as gRPC implementations should send it (they must accept both).
    std::string encoded = absl::Base64Escape(value);
    while (!encoded.empty() && encoded.back() == '=') encoded.pop_back();
    call->headers.emplace_back(key, std::move(encoded));
  }
  if (options.deadline != std::chrono::system_clock::time_point::max()) {
    const auto left = options.deadline - std::chrono::system_clock::now();
    // Beyond a century a deadline means none (and would overflow the steady clock).
    if (left < std::chrono::hours(24 * 365 * 100)) {
      call->deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(left);
    }
  }
  if (options.handle && !options.handle->Attach(call)) {
    Complete(call, RpcStatus(RpcCode::CANCELLED, "cancelled"));
    return call;
  }
  loop_->Submit(call);
  return call;
}

RpcStatus RpcChannel::Call(std::string_view method, std::string_view request, std::string* response,
                           const RpcCallOptions& options) {
  auto call = Start(method, Frame(request), options, /*streaming=*/false);
  RpcStatus status = Wait(*call);
  if (options.handle) options.handle->Detach(call.get());
  if (!status.ok()) return status;
  std::lock_guard lock(call->mu);
  if (call->messages.size() != 1) {
    return RpcStatus(RpcCode::INTERNAL, "no message in the response of " + std::string(method));
  }
  *response = std::move(call->messages.front());
  return status;
}

RpcStatus RpcChannel::Call(std::string_view method, const google::protobuf::MessageLite& request,
                           google::protobuf::MessageLite* response, const RpcCallOptions& options) {
  std::string framed;
  if (!FrameMessage(request, &framed)) {
    return RpcStatus(RpcCode::INTERNAL, "cannot serialize the request of " + std::string(method));
  }
  auto call = Start(method, std::move(framed), options, /*streaming=*/false);
  RpcStatus status = Wait(*call);
  if (options.handle) options.handle->Detach(call.get());
  if (!status.ok()) return status;
  std::lock_guard lock(call->mu);
  if (call->messages.size() != 1) {
    return RpcStatus(RpcCode::INTERNAL, "no message in the response of " + std::string(method));
  }
  if (!response->ParseFromString(call->messages.front())) {
    return RpcStatus(RpcCode::INTERNAL, "cannot parse the response of " + std::string(method));
  }
  return status;
}

std::unique_ptr<RpcStream> RpcChannel::Stream(std::string_view method, std::string_view request,
                                              const RpcCallOptions& options) {
  auto call = Start(method, Frame(request), options, /*streaming=*/true);
  return std::unique_ptr<RpcStream>(new RpcStream(std::move(call)));
}

std::unique_ptr<RpcStream> RpcChannel::Stream(std::string_view method,
                                              const google::protobuf::MessageLite& request,
                                              const RpcCallOptions& options) {
  std::string framed;
  std::shared_ptr<RpcCallHandle::Call> call;
  if (FrameMessage(request, &framed)) {
    call = Start(method, std::move(framed), options, /*streaming=*/true);
  } else {
    call = std::make_shared<RpcCallHandle::Call>();
    Complete(call, RpcStatus(RpcCode::INTERNAL,
                             "cannot serialize the request of " + std::string(method)));
  }
  return std::unique_ptr<RpcStream>(new RpcStream(std::move(call)));
}

RpcStream::RpcStream(std::shared_ptr<RpcCallHandle::Call> call) : call_(std::move(call)) {}

RpcStream::~RpcStream() {
  Cancel();
  if (call_->handle) call_->handle->Detach(call_.get());
}

bool RpcStream::Read(std::string* message) {
  bool consume = false;
  {
    std::unique_lock lock(call_->mu);
    call_->cv.wait(lock, [&] { return call_->done || !call_->messages.empty(); });
    if (call_->messages.empty()) return false;
    *message = std::move(call_->messages.front());
    call_->messages.pop_front();
    call_->buffered -= message->size();
    // The loop held this stream's window back: open it again once half the backlog is read.
    if (call_->consume_wanted && call_->buffered <= kStreamBuffer / 2) {
      call_->consume_wanted = false;
      consume = true;
    }
  }
  if (consume) RpcChannel::RequestConsume(call_);
  return true;
}

bool RpcStream::Read(google::protobuf::MessageLite* message) {
  std::string bytes;
  if (!Read(&bytes)) return false;
  if (message->ParseFromString(bytes)) return true;
  Abort(RpcStatus(RpcCode::INTERNAL, "cannot parse a message of " + call_->method));
  return false;
}

RpcStatus RpcStream::Finish() {
  RpcStatus status = Wait(*call_);
  if (call_->handle) call_->handle->Detach(call_.get());
  return status;
}

void RpcStream::Cancel() { Abort(RpcStatus(RpcCode::CANCELLED, "cancelled")); }

void RpcStream::Abort(RpcStatus why) { RpcChannel::RequestCancel(call_, std::move(why)); }

}  // namespace registry_proxy
