#include "cri/h2_relay.h"

#include <errno.h>
#include <fcntl.h>
#include <nghttp2/nghttp2.h>
#include <spdlog/spdlog.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string_view>
#include <unordered_set>

#include "base/string_util.h"
#include "cri/cri_methods.h"
#include "cri/intercept.h"

namespace registry_proxy {
namespace {

// Per call, per direction: what the sender may have in flight before we acknowledge it, and so
// the most one call can have buffered here.
constexpr int32_t kStreamWindow = 1 << 20;
// Connection windows are acknowledged on arrival (a stalled call must not stall the others):
// the largest HTTP/2 allows, so WINDOW_UPDATEs for the connection are rare.
constexpr int32_t kConnectionWindow = (1u << 31) - 1;
// Stop serializing frames for a socket whose peer doesn't read.
constexpr size_t kMaxPendingOut = 1 << 20;
constexpr size_t kReadChunk = 64 << 10;
// Header bytes one call may carry (all its header blocks, each way counted apart), as HPACK
// decodes them: a small HEADERS frame can name large table entries many times over.
constexpr size_t kMaxHeaderBytes = 256 << 10;
// Calls at once on one caller's connection (kubelet keeps a few dozen at most).
constexpr uint32_t kMaxConcurrentCalls = 1000;
// An intercepted request is held whole (PullImageRequest: an image, auth, the pod's sandbox
// config with its annotations, at most 256 KiB in Kubernetes).
constexpr size_t kMaxHeldRequest = 4 << 20;
// ... and all held requests together (acknowledged on arrival, so bounded here, not by windows).
constexpr size_t kMaxHeldTotal = 64 << 20;
// The longest grpc-message (encoded) and details (raw) in our own answers: together under the
// 8 KiB of metadata gRPC C++ clients accept (grpc-go's take 16 MiB).
constexpr size_t kMaxOwnMessage = 2 << 10;
constexpr size_t kMaxOwnDetails = 4 << 10;
constexpr int kGrpcFrameHeader = 5;

// gRPC status codes used here (RpcCode values; the wire carries the numbers).
constexpr int kCancelled = 1;
constexpr int kUnknown = 2;
constexpr int kResourceExhausted = 8;
constexpr int kInternal = 13;
constexpr int kUnavailable = 14;

struct Header {
  std::string name, value;
};
using Headers = std::vector<Header>;

std::vector<nghttp2_nv> ToNv(const Headers& headers) {
  std::vector<nghttp2_nv> nv;
  nv.reserve(headers.size());
  for (const Header& h : headers) {
    nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(h.name.data())),
                  reinterpret_cast<uint8_t*>(const_cast<char*>(h.value.data())), h.name.size(),
                  h.value.size(), NGHTTP2_NV_FLAG_NONE});
  }
  return nv;
}

// Bytes waiting to go to the other side of a call.
class ByteQueue {
 public:
  void Append(const uint8_t* p, size_t n) {
    if (off_ == buf_.size()) buf_.clear(), off_ = 0;
    buf_.append(reinterpret_cast<const char*>(p), n);
  }
  void Append(std::string_view s) { Append(reinterpret_cast<const uint8_t*>(s.data()), s.size()); }
  size_t size() const { return buf_.size() - off_; }
  bool empty() const { return size() == 0; }
  std::string_view view() const { return std::string_view(buf_).substr(off_); }
  size_t Take(uint8_t* dst, size_t max) {
    size_t n = std::min(max, size());
    std::memcpy(dst, buf_.data() + off_, n);
    off_ += n;
    if (off_ == buf_.size()) {
      buf_.clear();
      off_ = 0;
    } else if (off_ > (64u << 10) && off_ > buf_.size() / 2) {
      buf_.erase(0, off_);
      off_ = 0;
    }
    return n;
  }
  void Clear() {
    buf_.clear();
    off_ = 0;
  }

 private:
  std::string buf_;
  size_t off_ = 0;
};

// The single uncompressed gRPC message of `body`; false for anything else (compressed, several
// messages, truncated).
bool SingleMessage(std::string_view body, std::string_view* message) {
  if (body.size() < kGrpcFrameHeader || body[0] != 0) return false;
  uint32_t n = (uint32_t(uint8_t(body[1])) << 24) | (uint32_t(uint8_t(body[2])) << 16) |
               (uint32_t(uint8_t(body[3])) << 8) | uint32_t(uint8_t(body[4]));
  if (body.size() - kGrpcFrameHeader != n) return false;
  *message = body.substr(kGrpcFrameHeader);
  return true;
}

std::string Frame(std::string_view message) {
  std::string out(kGrpcFrameHeader, '\0');
  uint32_t n = static_cast<uint32_t>(message.size());
  out[1] = static_cast<char>(n >> 24);
  out[2] = static_cast<char>(n >> 16);
  out[3] = static_cast<char>(n >> 8);
  out[4] = static_cast<char>(n);
  out.append(message);
  return out;
}

// grpc-message is percent-encoded (gRPC's HTTP/2 protocol spec).
std::string PercentEncode(std::string_view s) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (c < 0x20 || c > 0x7e || c == '%') {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

int ParseStatus(std::string_view v) {
  if (v.empty() || v.size() > 3) return kUnknown;
  int n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return kUnknown;
    n = n * 10 + (c - '0');
  }
  return n;
}

// How a gRPC client reads an RST_STREAM (grpc's HTTP/2 error code mapping).
int StatusOfReset(uint32_t code) {
  switch (code) {
    case NGHTTP2_CANCEL:
      return kCancelled;
    case NGHTTP2_REFUSED_STREAM:
      return kUnavailable;
    case NGHTTP2_ENHANCE_YOUR_CALM:
      return kResourceExhausted;
    case NGHTTP2_INADEQUATE_SECURITY:
      return 7;  // PERMISSION_DENIED
    default:
      return kInternal;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// One connection: a caller's (server side) or containerd's (client side).

struct H2Relay::Session {
  H2Relay* relay;
  int fd;
  bool server;
  nghttp2_session* ng = nullptr;
  std::string out;  // serialized frames not yet written
  size_t out_off = 0;
  uint32_t events = 0;  // registered with epoll
  bool dirty = false;
  bool dead = false;
  bool usable = true;  // upstream: new calls may start here (false after GOAWAY)
  std::unordered_set<Stream*> streams;

  ~Session() {
    if (ng) nghttp2_session_del(ng);
    if (fd >= 0) close(fd);
  }
};

// One call: the caller's stream and, once opened, containerd's.
struct H2Relay::Stream {
  uint64_t serial;
  std::chrono::steady_clock::time_point started;
  Session* down = nullptr;  // null once the caller's stream closed
  int32_t down_id = 0;
  Session* up = nullptr;  // null until opened, and once containerd's stream closed
  int32_t up_id = 0;
  MethodInfo info{CallKind::kStream, CriVersion::kV1};
  std::string path;
  std::string timeout;  // grpc-timeout as the caller sent it
  Headers request_headers;
  std::string held_request;  // ImageStatus: the request message

  // Caller -> containerd.
  ByteQueue to_up;
  bool request_ended = false;
  bool up_deferred = false;
  bool hold_request = false;   // intercepted: the whole request is collected first
  bool request_acked = false;  // caller's bytes already acknowledged on arrival

  // containerd -> caller.
  Headers response_headers, trailers;
  ByteQueue to_down;
  bool response_ended = false;    // containerd's (or our) response is complete
  bool hold_response = false;     // ImageStatus: kept until hit/miss is known
  bool response_acked = false;    // containerd's bytes already acknowledged on arrival
  bool response_started = false;  // response HEADERS submitted to the caller
  bool response_done = false;     // END_STREAM (or trailers) submitted to the caller
  bool down_deferred = false;
  int grpc_status = -1;
  int reset_status = -1;  // the call ended by RST_STREAM: how the caller reads it

  size_t request_header_bytes = 0, response_header_bytes = 0;
  size_t held_bytes = 0;  // of the relay's held_bytes_
  bool worker = false;    // an interceptor worker runs for it
  std::shared_ptr<Cancellation> cancellation;
};

// nghttp2's callbacks, as static functions reaching the relay through the session.
struct Callbacks {
  static H2Relay::Stream* Get(nghttp2_session* ng, int32_t id) {
    return static_cast<H2Relay::Stream*>(nghttp2_session_get_stream_user_data(ng, id));
  }

  static int OnBeginHeaders(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    if (!s->server || frame->hd.type != NGHTTP2_HEADERS ||
        frame->headers.cat != NGHTTP2_HCAT_REQUEST) {
      return 0;
    }
    H2Relay* r = s->relay;
    auto* st = new H2Relay::Stream();
    st->serial = r->next_serial_++;
    st->started = std::chrono::steady_clock::now();
    st->down = s;
    st->down_id = frame->hd.stream_id;
    r->streams_.emplace(st->serial, st);
    s->streams.insert(st);
    r->active_calls_.fetch_add(1, std::memory_order_relaxed);
    nghttp2_session_set_stream_user_data(ng, frame->hd.stream_id, st);
    return 0;
  }

  static int OnHeader(nghttp2_session* ng, const nghttp2_frame* frame, const uint8_t* name,
                      size_t namelen, const uint8_t* value, size_t valuelen, uint8_t /*flags*/,
                      void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    H2Relay::Stream* st = Get(ng, frame->hd.stream_id);
    if (!st) return 0;
    std::string_view n(reinterpret_cast<const char*>(name), namelen);
    std::string_view v(reinterpret_cast<const char*>(value), valuelen);
    size_t& bytes = s->server ? st->request_header_bytes : st->response_header_bytes;
    bytes += namelen + valuelen + 32;  // HPACK's own measure of an entry
    if (bytes > kMaxHeaderBytes) {
      if (st->reset_status < 0) st->reset_status = kResourceExhausted;
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;  // nghttp2 resets the call
    }
    if (s->server) {
      if (frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;  // request trailers: none in gRPC
      if (n == ":path") st->path = v;
      if (n == "grpc-timeout") st->timeout = v;
      st->request_headers.push_back({std::string(n), std::string(v)});
      return 0;
    }
    if (n == "grpc-status") st->grpc_status = ParseStatus(v);
    Headers& into =
        frame->headers.cat == NGHTTP2_HCAT_HEADERS ? st->trailers : st->response_headers;
    into.push_back({std::string(n), std::string(v)});
    return 0;
  }

  static int OnFrameRecv(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    H2Relay* r = s->relay;
    if (frame->hd.type == NGHTTP2_GOAWAY) {
      if (!s->server) {
        s->usable = false;  // containerd is going away: new calls open a new connection
        if (r->upstream_ == s) r->upstream_ = nullptr;
      }
      return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    H2Relay::Stream* st = Get(ng, frame->hd.stream_id);
    if (!st) return 0;
    const bool end = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;
    if (s->server) {
      if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        r->OnRequestHeaders(st);
      }
      // OnRequestHeaders may have answered and closed the call already.
      if (end && st->down == s) r->OnRequestEnded(st);
      return 0;
    }
    if (frame->hd.type == NGHTTP2_HEADERS) {
      if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
        st->response_ended = end;  // trailers-only
        r->OnResponseHeaders(st);
        return 0;
      }
      if (frame->headers.cat != NGHTTP2_HCAT_HEADERS) return 0;  // 1xx: not used by gRPC
    }
    if (end) {
      st->response_ended = true;
      r->OnResponseEnded(st);
    }
    return 0;
  }

  static int OnDataChunk(nghttp2_session* ng, uint8_t /*flags*/, int32_t id, const uint8_t* data,
                         size_t len, void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    H2Relay* r = s->relay;
    // The connection's window is acknowledged at once: only the call's own window holds back.
    nghttp2_session_consume_connection(ng, len);
    H2Relay::Stream* st = Get(ng, id);
    if (s->server) {
      if (!st || st->response_done || (!st->hold_request && !st->up)) {
        nghttp2_session_consume_stream(ng, id, len);  // nobody to pass it to: dropped
        return 0;
      }
      if (st->hold_request) {
        nghttp2_session_consume_stream(ng, id, len);
        const size_t limit =
            std::min(kMaxHeldRequest, static_cast<size_t>(r->options_.max_message_bytes));
        if (st->to_up.size() + len > limit + kGrpcFrameHeader) {
          r->ReleaseHeld(st);
          r->FailCall(st, kResourceExhausted,
                      "registry-proxy: request larger than the largest message allowed");
          return 0;
        }
        if (r->held_bytes_ + len > kMaxHeldTotal) {
          r->ReleaseHeld(st);
          r->FailCall(st, kResourceExhausted,
                      "registry-proxy: too many large requests in progress");
          return 0;
        }
        st->to_up.Append(data, len);
        st->held_bytes += len;
        r->held_bytes_ += len;
        return 0;
      }
      st->to_up.Append(data, len);
      r->ResumeUp(st);
      return 0;
    }
    if (st && st->hold_response) {
      if (st->to_down.size() + len > static_cast<size_t>(r->options_.max_message_bytes) + 5) {
        nghttp2_session_consume_stream(ng, id, len);
        r->FailCall(st, kResourceExhausted,
                    "registry-proxy: response larger than the largest message allowed");
        return 0;
      }
      st->to_down.Append(data, len);
      nghttp2_session_consume_stream(ng, id, len);
      return 0;
    }
    if (!st || !st->down || st->response_done) {
      nghttp2_session_consume_stream(ng, id, len);
      return 0;
    }
    st->to_down.Append(data, len);
    r->ResumeDown(st);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* ng, int32_t id, uint32_t error_code, void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    H2Relay::Stream* st = Get(ng, id);
    if (!st) return 0;
    nghttp2_session_set_stream_user_data(ng, id, nullptr);
    s->streams.erase(st);
    if (s->server) {
      s->relay->OnDownstreamClosed(st, error_code);
    } else {
      s->relay->OnUpstreamClosed(st, error_code, "");
    }
    return 0;
  }

  // The caller's bytes, to containerd.
  static ssize_t ReadRequest(nghttp2_session* /*ng*/, int32_t /*id*/, uint8_t* buf, size_t length,
                             uint32_t* flags, nghttp2_data_source* source, void* /*user*/) {
    auto* st = static_cast<H2Relay::Stream*>(source->ptr);
    size_t n = st->to_up.Take(buf, length);
    if (n > 0 && st->down && !st->request_acked) {
      nghttp2_session_consume_stream(st->down->ng, st->down_id, n);
      st->down->relay->MarkDirty(st->down);
    }
    if (st->to_up.empty()) {
      if (st->request_ended) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
      } else if (n == 0) {
        st->up_deferred = true;
        return NGHTTP2_ERR_DEFERRED;
      }
    }
    return static_cast<ssize_t>(n);
  }

  // containerd's bytes (or ours), to the caller; the trailers after the last of them.
  static ssize_t ReadResponse(nghttp2_session* ng, int32_t id, uint8_t* buf, size_t length,
                              uint32_t* flags, nghttp2_data_source* source, void* /*user*/) {
    auto* st = static_cast<H2Relay::Stream*>(source->ptr);
    size_t n = st->to_down.Take(buf, length);
    if (n > 0 && st->up && !st->response_acked) {
      nghttp2_session_consume_stream(st->up->ng, st->up_id, n);
      st->up->relay->MarkDirty(st->up);
    }
    if (st->to_down.empty()) {
      if (st->response_ended) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        st->response_done = true;
        if (!st->trailers.empty()) {
          *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
          auto nv = ToNv(st->trailers);
          if (nghttp2_submit_trailer(ng, id, nv.data(), nv.size()) != 0) {
            return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
          }
        }
      } else if (n == 0) {
        st->down_deferred = true;
        return NGHTTP2_ERR_DEFERRED;
      }
    }
    return static_cast<ssize_t>(n);
  }

  // A complete answer went to a caller that is still sending: ask it to stop, without error
  // (RFC 9113 8.1; gRPC servers do the same). Sent after the END_STREAM frame, never before.
  static int OnFrameSend(nghttp2_session* ng, const nghttp2_frame* frame, void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    if (!s->server || !(frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) return 0;
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    H2Relay::Stream* st = Get(ng, frame->hd.stream_id);
    if (st && !st->request_ended) {
      nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
  }

  // A frame nghttp2 would not send (a header block over the send limit): for a caller's answer
  // that would leave the call open for ever, so it is reset instead.
  static int OnFrameNotSend(nghttp2_session* ng, const nghttp2_frame* frame, int error,
                            void* user) {
    auto* s = static_cast<H2Relay::Session*>(user);
    // Other reasons (the stream closed meanwhile) need nothing from us.
    if (!s->server || frame->hd.type != NGHTTP2_HEADERS || error != NGHTTP2_ERR_FRAME_SIZE_ERROR) {
      return 0;
    }
    H2Relay::Stream* st = Get(ng, frame->hd.stream_id);
    if (!st) return 0;
    spdlog::warn("an answer too large to send; resetting the call");
    if (st->reset_status < 0) st->reset_status = kInternal;
    nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_INTERNAL_ERROR);
    return 0;
  }

  static nghttp2_session_callbacks* Make() {
    nghttp2_session_callbacks* cb;
    nghttp2_session_callbacks_new(&cb);
    nghttp2_session_callbacks_set_on_begin_headers_callback(cb, OnBeginHeaders);
    nghttp2_session_callbacks_set_on_header_callback(cb, OnHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(cb, OnFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, OnDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(cb, OnStreamClose);
    nghttp2_session_callbacks_set_on_frame_send_callback(cb, OnFrameSend);
    nghttp2_session_callbacks_set_on_frame_not_send_callback(cb, OnFrameNotSend);
    return cb;
  }
};

// ---------------------------------------------------------------------------------------------

H2Relay::H2Relay(ProxyOptions options, ImageInterceptor* interceptor, CallObserver* observer)
    : options_(std::move(options)),
      interception_(std::make_unique<CallInterception>(interceptor, options_.max_workers,
                                                       [this] { Wake(); })),
      observer_(observer) {
  read_buf_.resize(kReadChunk);
}

H2Relay::~H2Relay() { Shutdown(std::chrono::milliseconds(0)); }

Status H2Relay::Start() {
  auto path = UnixSocketPath(options_.listen);
  if (!path.ok()) return path.status();
  socket_path_ = *path;
  auto up = UnixSocketPath(options_.upstream);
  if (!up.ok()) return up.status();
  upstream_path_ = *up;

  if (options_.listen_fd >= 0) {
    // Socket activation: systemd made and owns the socket; name it as it is.
    listen_fd_ = options_.listen_fd;
    socket_path_ = BoundSocketPath(listen_fd_, socket_path_);
    fcntl(listen_fd_, F_SETFL, fcntl(listen_fd_, F_GETFL) | O_NONBLOCK);
  } else {
    if (Status s = PrepareSocketPath(socket_path_); !s.ok()) return s;
    listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listen_fd_ < 0) return Status::Error(std::string("socket: ") + std::strerror(errno));
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, socket_path_.c_str(), sizeof(addr.sun_path) - 1);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(listen_fd_, SOMAXCONN) != 0) {
      std::string why = std::strerror(errno);
      close(listen_fd_);
      listen_fd_ = -1;
      return Status::Error("cannot listen on " + socket_path_ + ": " + why);
    }
    if (chmod(socket_path_.c_str(), 0660) != 0) {
      spdlog::warn("cannot chmod {}: {}", socket_path_, std::strerror(errno));
    }
  }
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  wake_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (epoll_fd_ < 0 || wake_fd_ < 0) {
    return Status::Error(std::string("epoll/eventfd: ") + std::strerror(errno));
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.ptr = &listen_fd_;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev);
  listening_ = true;
  ev.data.ptr = &wake_fd_;
  epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_fd_, &ev);
  started_ = true;
  loop_ = std::thread([this] { Loop(); });
  return Status::Ok();
}

void H2Relay::Wake() {
  uint64_t one = 1;
  if (write(wake_fd_, &one, sizeof one) < 0 && errno != EAGAIN) {
    spdlog::warn("eventfd write: {}", std::strerror(errno));
  }
}

// --- the loop ----------------------------------------------------------------------------------

void H2Relay::Loop() {
  epoll_event events[64];
  while (true) {
    int timeout_ms = -1;
    if (accept_paused_until_) {
      auto left = *accept_paused_until_ - std::chrono::steady_clock::now();
      timeout_ms = std::max<int>(0, std::chrono::ceil<std::chrono::milliseconds>(left).count());
    }
    int n = epoll_wait(epoll_fd_, events, 64, timeout_ms);
    if (accept_paused_until_ && std::chrono::steady_clock::now() >= *accept_paused_until_) {
      accept_paused_until_.reset();
      if (!stop_accepting_ && listen_fd_ >= 0) {
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.ptr = &listen_fd_;
        listening_ = epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, listen_fd_, &ev) == 0;
      }
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      spdlog::critical("epoll_wait: {}", std::strerror(errno));
      break;
    }
    for (int i = 0; i < n; ++i) {
      void* p = events[i].data.ptr;
      if (p == &listen_fd_) {
        Accept();
      } else if (p == &wake_fd_) {
        uint64_t v;
        while (read(wake_fd_, &v, sizeof v) > 0) {
        }
        if (stop_accepting_ && listen_fd_ >= 0) {
          if (listening_) epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
          listening_ = false;
          // An inherited socket stays: new connections wait in its backlog for the next daemon.
          if (options_.listen_fd < 0) close(listen_fd_);
          listen_fd_ = -1;
        }
        OnCompletions();
        if (cancel_all_) CancelEverything();
      } else {
        auto* s = static_cast<Session*>(p);
        if (s->dead) continue;
        if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) ReadFrom(s);
        if (!s->dead && (events[i].events & EPOLLOUT)) MarkDirty(s);
      }
    }
    // Frames that callbacks queued on any session go out once per turn: one write per socket.
    for (size_t i = 0; i < dirty_.size(); ++i) {
      Session* s = dirty_[i];
      s->dirty = false;
      if (!s->dead) Flush(s);
    }
    dirty_.clear();
    Reap();
    if (exit_) break;
  }
  // Teardown: nothing is in flight any more (Shutdown waited for the workers).
  for (Session* s : sessions_) {
    if (!s->dead) Kill(s, "shutting down");
  }
  Reap();
  for (auto& [serial, st] : streams_) delete st;
  streams_.clear();
}

void H2Relay::Accept() {
  if (listen_fd_ < 0) return;  // closed by Shutdown's step earlier in this turn
  for (int i = 0; i < 64; ++i) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
        return;
      }
      // EMFILE and the like: the socket stays readable, so stop watching it for a moment
      // rather than spin (connections wait in the backlog), and say so once a pause.
      spdlog::error("accept on {}: {}; accepting again in 100 ms", socket_path_,
                    std::strerror(errno));
      epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
      listening_ = false;
      accept_paused_until_ = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
      return;
    }
    Session* s = NewSession(fd, /*server=*/true);
    if (!s) close(fd);
  }
}

H2Relay::Session* H2Relay::NewSession(int fd, bool server) {
  static nghttp2_session_callbacks* callbacks = Callbacks::Make();
  static nghttp2_option* option = [] {
    nghttp2_option* o;
    nghttp2_option_new(&o);
    nghttp2_option_set_no_auto_window_update(o, 1);  // we acknowledge what the other side took
    // No priority tree, so no closed streams kept for it (by default a server session keeps
    // them, and with unlimited concurrent streams that grows with every call).
    nghttp2_option_set_no_closed_streams(o, 1);
    // gRPC accepts header values with leading or trailing spaces (a grpc-message "no such
    // image: " is fine), RFC 9113 does not; nghttp2 would reset such a call. Relay them.
    nghttp2_option_set_no_rfc9113_leading_and_trailing_ws_validation(o, 1);
    // What one call may receive (kMaxHeaderBytes) it may also send on.
    nghttp2_option_set_max_send_header_block_length(o, kMaxHeaderBytes + (16 << 10));
    // Until containerd's SETTINGS arrive nghttp2 would assume 100 concurrent streams; gRPC
    // servers allow any number.
    nghttp2_option_set_peer_max_concurrent_streams(o, 1u << 30);
    return o;
  }();
  auto s = std::make_unique<Session>();
  s->relay = this;
  s->fd = fd;
  s->server = server;
  int rv = server ? nghttp2_session_server_new2(&s->ng, callbacks, s.get(), option)
                  : nghttp2_session_client_new2(&s->ng, callbacks, s.get(), option);
  if (rv != 0) {
    s->fd = -1;  // the caller closes it
    return nullptr;
  }
  nghttp2_settings_entry settings[] = {
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, kStreamWindow},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, kMaxHeaderBytes},
      {server ? NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS : NGHTTP2_SETTINGS_ENABLE_PUSH,
       server ? kMaxConcurrentCalls : 0}};
  nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, settings, 3);
  nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
  s->events = EPOLLIN;
  epoll_event ev{};
  ev.events = s->events;
  ev.data.ptr = s.get();
  if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
    s->fd = -1;
    return nullptr;
  }
  Session* raw = s.release();
  sessions_.push_back(raw);
  MarkDirty(raw);
  return raw;
}

H2Relay::Session* H2Relay::UpstreamSession(std::string* error) {
  if (upstream_ && !upstream_->dead && upstream_->usable) return upstream_;
  upstream_ = nullptr;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    *error = std::string("socket: ") + std::strerror(errno);
    return nullptr;
  }
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, upstream_path_.c_str(), sizeof(addr.sun_path) - 1);
  // A unix socket connects at once or not at all (EAGAIN: its backlog is full).
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    *error = StrCat({"registry-proxy: cannot connect to containerd at ", upstream_path_, ": ",
                     std::strerror(errno)});
    close(fd);
    return nullptr;
  }
  upstream_ = NewSession(fd, /*server=*/false);
  if (!upstream_) {
    close(fd);
    *error = "registry-proxy: cannot start an HTTP/2 session";
  }
  return upstream_;
}

void H2Relay::MarkDirty(Session* s) {
  if (s->dirty || s->dead) return;
  s->dirty = true;
  dirty_.push_back(s);
}

void H2Relay::UpdateEvents(Session* s) {
  uint32_t want = EPOLLIN | (s->out_off < s->out.size() ? uint32_t{EPOLLOUT} : 0u);
  if (want == s->events) return;
  s->events = want;
  epoll_event ev{};
  ev.events = want;
  ev.data.ptr = s;
  epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, s->fd, &ev);
}

void H2Relay::ReadFrom(Session* s) {
  for (int i = 0; i < 16; ++i) {
    ssize_t n = recv(s->fd, read_buf_.data(), read_buf_.size(), 0);
    if (n > 0) {
      ssize_t rv = nghttp2_session_mem_recv(s->ng, read_buf_.data(), static_cast<size_t>(n));
      MarkDirty(s);  // acknowledgements, SETTINGS ACK, PING replies, or a GOAWAY for an error
      if (rv < 0) {
        Kill(s, StrCat({"HTTP/2 error: ", nghttp2_strerror(static_cast<int>(rv))}));
        return;
      }
      if (static_cast<size_t>(n) < read_buf_.size()) return;
      continue;
    }
    if (n == 0) {
      Kill(s, "connection closed by peer");
      return;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) Kill(s, std::strerror(errno));
    return;
  }
}

void H2Relay::Flush(Session* s) {
  auto write_out = [&]() -> bool {
    while (s->out_off < s->out.size()) {
      ssize_t n = send(s->fd, s->out.data() + s->out_off, s->out.size() - s->out_off,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        s->out_off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      Kill(s, n < 0 ? std::strerror(errno) : "short write");
      return false;
    }
    s->out.clear();
    s->out_off = 0;
    return true;
  };
  while (s->out.size() - s->out_off < kMaxPendingOut) {
    const uint8_t* data;
    ssize_t n = nghttp2_session_mem_send(s->ng, &data);
    if (n < 0) {
      Kill(s, StrCat({"HTTP/2 error: ", nghttp2_strerror(static_cast<int>(n))}));
      return;
    }
    if (n == 0) break;
    s->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
    if (s->out.size() - s->out_off >= (64u << 10) && !write_out()) return;
  }
  if (!write_out()) return;
  if (s->out_off == s->out.size() && !nghttp2_session_want_read(s->ng) &&
      !nghttp2_session_want_write(s->ng)) {
    Kill(s, "session ended");  // GOAWAY exchanged and nothing left in flight
    return;
  }
  UpdateEvents(s);
}

void H2Relay::Kill(Session* s, const std::string& why) {
  if (s->dead) return;
  s->dead = true;
  if (upstream_ == s) upstream_ = nullptr;
  epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, s->fd, nullptr);
  dead_.push_back(s);
  if (!s->server) spdlog::debug("containerd connection closed: {}", why);
  auto streams = std::move(s->streams);
  s->streams.clear();
  for (Stream* st : streams) {
    if (s->server) {
      OnDownstreamClosed(st, NGHTTP2_CANCEL);
    } else {
      OnUpstreamClosed(st, NGHTTP2_NO_ERROR, why);
    }
  }
}

void H2Relay::Reap() {
  for (Session* s : dead_) {
    sessions_.erase(std::find(sessions_.begin(), sessions_.end(), s));
    delete s;
  }
  dead_.clear();
}

// --- a call ------------------------------------------------------------------------------------

void H2Relay::OnRequestHeaders(Stream* st) {
  st->info = ClassifyMethod(st->path, interception_->enabled());
  if (refusing_) {
    // Arrived on an open connection after the drain: a clear, retryable answer.
    FailCall(st, kUnavailable, "registry-proxy is shutting down");
    return;
  }
  if (st->info.kind == CallKind::kPull || st->info.kind == CallKind::kStatus) {
    st->hold_request = true;
    st->request_acked = true;
    return;
  }
  OpenUpstream(st);
}

void H2Relay::OnRequestEnded(Stream* st) {
  st->request_ended = true;
  if (st->hold_request) {
    if (!st->response_started) OnRequestComplete(st);
    return;
  }
  ResumeUp(st);
}

// A held request refused before it was complete: its bytes are dropped and no longer count.
void H2Relay::ReleaseHeld(Stream* st) {
  held_bytes_ -= st->held_bytes;
  st->held_bytes = 0;
  st->to_up.Clear();
}

void H2Relay::OnRequestComplete(Stream* st) {
  held_bytes_ -= st->held_bytes;  // from here it is a request like any other (or a worker's)
  st->held_bytes = 0;
  st->hold_request = false;
  std::string_view message;
  if (!SingleMessage(st->to_up.view(), &message)) {
    // Compressed, empty or several messages: containerd gets the caller's bytes unchanged.
    spdlog::debug("{}: request is not one plain gRPC message; forwarded unchanged", st->path);
    st->info.kind = CallKind::kUnary;
    OpenUpstream(st);
    return;
  }
  const CriVersion v = st->info.version;
  if (st->info.kind == CallKind::kPull) {
    std::string request(message);
    st->to_up.Clear();
    if (!StartIntercepted(st, interception_->Pull(v, std::move(request)))) {
      FailCall(st, refusing_ ? kUnavailable : kResourceExhausted,
               refusing_ ? "registry-proxy is shutting down"
                         : "registry-proxy: too many pulls in progress");
    }
    return;
  }
  st->held_request = message;  // ImageStatus: the interceptor may need it for a miss
  st->hold_response = true;
  st->response_acked = true;
  OpenUpstream(st);
}

void H2Relay::OpenUpstream(Stream* st) {
  for (int attempt = 0; attempt < 2; ++attempt) {
    std::string error;
    Session* up = UpstreamSession(&error);
    if (!up) {
      FailCall(st, kUnavailable, error);
      return;
    }
    auto nv = ToNv(st->request_headers);
    nghttp2_data_provider provider{};
    provider.source.ptr = st;
    provider.read_callback = Callbacks::ReadRequest;
    const bool no_body = st->request_ended && st->to_up.empty();
    int32_t id = nghttp2_submit_request(up->ng, nullptr, nv.data(), nv.size(),
                                        no_body ? nullptr : &provider, st);
    if (id < 0) {  // e.g. stream ids used up: the next call opens a new connection
      up->usable = false;
      upstream_ = nullptr;
      // The old one ends once its calls have (Flush sees nothing more to read or write).
      nghttp2_submit_goaway(up->ng, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, nullptr, 0);
      MarkDirty(up);
      continue;
    }
    st->up = up;
    st->up_id = id;
    up->streams.insert(st);
    if (st->info.kind != CallKind::kStatus) {
      st->request_headers.clear();
      st->request_headers.shrink_to_fit();
    }
    MarkDirty(up);
    return;
  }
  FailCall(st, kUnavailable, "registry-proxy: cannot open a stream to containerd");
}

void H2Relay::OnResponseHeaders(Stream* st) {
  if (st->hold_response) {
    if (st->response_ended) FinishHeldStatus(st);
    return;
  }
  if (!st->down || st->response_started) return;
  SubmitResponse(st);
}

void H2Relay::OnResponseEnded(Stream* st) {
  if (st->hold_response) {
    FinishHeldStatus(st);
    return;
  }
  if (!st->response_started) {
    if (st->down) SubmitResponse(st);
    return;
  }
  ResumeDown(st);
}

// ImageStatus: containerd answered; a hit (or an error) goes to the caller as it came; a miss
// may be repaired by the interceptor.
void H2Relay::FinishHeldStatus(Stream* st) {
  if (!st->down || st->response_started) return;
  std::string_view message;
  if (st->grpc_status == 0 && SingleMessage(st->to_down.view(), &message)) {
    // Without a worker to repair it (too many, or shutting down), containerd's answer stands.
    auto repair = interception_->RepairIfMiss(st->info.version, st->held_request, message);
    if (repair && StartIntercepted(st, std::move(repair))) return;
  }
  st->hold_response = false;
  SubmitResponse(st);
}

void H2Relay::SubmitResponse(Stream* st) {
  if (!st->down || st->response_started) return;
  st->response_started = true;
  auto nv = ToNv(st->response_headers);
  nghttp2_data_provider provider{};
  provider.source.ptr = st;
  provider.read_callback = Callbacks::ReadResponse;
  const bool headers_only = st->response_ended && st->to_down.empty() && st->trailers.empty();
  if (headers_only) st->response_done = true;
  int rv = nghttp2_submit_response(st->down->ng, st->down_id, nv.data(), nv.size(),
                                   headers_only ? nullptr : &provider);
  if (rv != 0) {
    nghttp2_submit_rst_stream(st->down->ng, NGHTTP2_FLAG_NONE, st->down_id, NGHTTP2_INTERNAL_ERROR);
    st->reset_status = kInternal;
  }
  MarkDirty(st->down);
}

void H2Relay::FailCall(Stream* st, int code, const std::string& message,
                       const std::string& details) {
  if (!st->down || st->response_done) return;
  st->grpc_status = code;
  std::string encoded = PercentEncode(std::string_view(message).substr(0, kMaxOwnMessage));
  if (encoded.size() > kMaxOwnMessage) {
    size_t cut = kMaxOwnMessage;
    if (encoded[cut - 1] == '%') {
      cut -= 1;  // never half an escape
    } else if (encoded[cut - 2] == '%') {
      cut -= 2;
    }
    encoded.resize(cut);
  }
  Headers status = {{"grpc-status", std::to_string(code)}, {"grpc-message", std::move(encoded)}};
  if (!details.empty() && details.size() <= kMaxOwnDetails) {  // cut, they would not parse
    status.push_back({"grpc-status-details-bin", Base64Encode(details)});
  }
  st->response_ended = true;
  st->hold_response = false;
  if (st->response_started) {
    st->trailers = std::move(status);  // after what was already relayed
    ResumeDown(st);
    return;
  }
  // Trailers-only: the whole answer in one HEADERS frame.
  st->to_down.Clear();
  st->trailers.clear();
  st->response_headers = {{":status", "200"}, {"content-type", "application/grpc"}};
  for (Header& h : status) st->response_headers.push_back(std::move(h));
  SubmitResponse(st);
  if (st->up) {  // containerd's side of it is no longer wanted
    nghttp2_submit_rst_stream(st->up->ng, NGHTTP2_FLAG_NONE, st->up_id, NGHTTP2_CANCEL);
    MarkDirty(st->up);
  }
}

void H2Relay::ResumeUp(Stream* st) {
  if (!st->up || !st->up_deferred) return;
  st->up_deferred = false;
  nghttp2_session_resume_data(st->up->ng, st->up_id);
  MarkDirty(st->up);
}

void H2Relay::ResumeDown(Stream* st) {
  if (!st->down || !st->down_deferred) return;
  st->down_deferred = false;
  nghttp2_session_resume_data(st->down->ng, st->down_id);
  MarkDirty(st->down);
}

void H2Relay::OnDownstreamClosed(Stream* st, uint32_t error_code) {
  st->down = nullptr;
  int code;
  if (st->reset_status >= 0) {
    code = st->reset_status;
  } else if (st->response_done && error_code == NGHTTP2_NO_ERROR) {
    code = st->grpc_status >= 0 ? st->grpc_status : kUnknown;
  } else {
    code = kCancelled;  // the caller went away (or reset the call) before its answer
  }
  active_calls_.fetch_sub(1, std::memory_order_relaxed);
  if (observer_) {
    observer_->OnCallDone(st->path, static_cast<RpcCode>(code),
                          std::chrono::steady_clock::now() - st->started);
  }
  if (st->cancellation) st->cancellation->Cancel();
  if (st->up) {  // whatever containerd still has of it is not wanted any more
    nghttp2_submit_rst_stream(st->up->ng, NGHTTP2_FLAG_NONE, st->up_id, NGHTTP2_CANCEL);
    MarkDirty(st->up);
  }
  MaybeDelete(st);
}

void H2Relay::OnUpstreamClosed(Stream* st, uint32_t error_code, const std::string& why) {
  st->up = nullptr;
  if (st->down && !st->response_ended) {
    if (!why.empty()) {
      // The connection to containerd is gone (or ended) under the call.
      FailCall(st, kUnavailable, "registry-proxy: connection to containerd lost: " + why);
    } else if (error_code != NGHTTP2_NO_ERROR) {
      // containerd reset the call: the caller gets the same reset, as if it had talked to
      // containerd itself (REFUSED_STREAM lets a gRPC client retry it transparently).
      nghttp2_submit_rst_stream(st->down->ng, NGHTTP2_FLAG_NONE, st->down_id, error_code);
      st->reset_status = StatusOfReset(error_code);
      MarkDirty(st->down);
    } else {
      FailCall(st, kInternal, "registry-proxy: containerd ended the call without a status");
    }
  }
  MaybeDelete(st);
}

void H2Relay::MaybeDelete(Stream* st) {
  if (st->down || st->up || st->worker) return;
  held_bytes_ -= st->held_bytes;
  streams_.erase(st->serial);
  delete st;
}

// --- interception --------------------------------------------------------------------------------

bool H2Relay::StartIntercepted(Stream* st,
                               std::function<InterceptResult(const CallOptions&)> work) {
  InterceptedCall call;
  call.serial = st->serial;
  call.timeout = st->timeout;
  for (const Header& h : st->request_headers) {
    if (ForwardableMetadata(h.name)) call.metadata.emplace_back(h.name, h.value);
  }
  call.cancellation = std::make_shared<Cancellation>();
  st->cancellation = call.cancellation;
  st->worker = interception_->Start(std::move(call), std::move(work));
  return st->worker;
}

void H2Relay::OnCompletions() {
  for (CallInterception::Completion& c : interception_->TakeCompletions()) {
    auto it = streams_.find(c.serial);
    if (it == streams_.end()) continue;
    Stream* st = it->second;
    st->worker = false;
    if (st->down && !st->response_started) AnswerIntercepted(st, c.result);
    MaybeDelete(st);
  }
}

// A worker's result, as the call's answer: OK with its message (containerd's response headers
// and non-gRPC trailers kept, for an ImageStatus), or its status.
void H2Relay::AnswerIntercepted(Stream* st, const InterceptResult& result) {
  const RpcStatus& s = result.status;
  if (!s.ok()) {
    st->response_headers.clear();
    FailCall(st, static_cast<int>(s.error_code()), s.error_message(), s.error_details());
    return;
  }
  if (st->response_headers.empty()) {
    st->response_headers = {{":status", "200"}, {"content-type", "application/grpc"}};
  }
  std::vector<Header> trailers = {{"grpc-status", "0"}};
  for (Header& h : st->trailers) {
    if (h.name.rfind("grpc-", 0) != 0) trailers.push_back(std::move(h));
  }
  st->trailers = std::move(trailers);
  st->to_down.Clear();
  st->to_down.Append(Frame(result.response));
  st->grpc_status = 0;
  st->response_ended = true;
  st->hold_response = false;
  SubmitResponse(st);
}

// --- shutdown ------------------------------------------------------------------------------------

void H2Relay::CancelEverything() {
  cancel_all_ = false;
  std::vector<Stream*> open;
  for (auto& [serial, st] : streams_) open.push_back(st);
  for (Stream* st : open) {
    if (st->cancellation) st->cancellation->Cancel();
    if (st->down) {
      nghttp2_submit_rst_stream(st->down->ng, NGHTTP2_FLAG_NONE, st->down_id, NGHTTP2_CANCEL);
      st->reset_status = kCancelled;
      MarkDirty(st->down);
    }
    if (st->up) {
      nghttp2_submit_rst_stream(st->up->ng, NGHTTP2_FLAG_NONE, st->up_id, NGHTTP2_CANCEL);
      MarkDirty(st->up);
    }
  }
  for (Session* s : sessions_) {
    if (s->server && !s->dead) {
      nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE,
                            nghttp2_session_get_last_proc_stream_id(s->ng), NGHTTP2_NO_ERROR,
                            nullptr, 0);
      MarkDirty(s);
    }
  }
}

void H2Relay::Shutdown(std::chrono::milliseconds grace) {
  std::call_once(shutdown_once_, [&] {
    if (!started_) {
      if (listen_fd_ >= 0 && options_.listen_fd < 0) close(listen_fd_);
      if (epoll_fd_ >= 0) close(epoll_fd_);
      if (wake_fd_ >= 0) close(wake_fd_);
      return;
    }
    // New connections fail from now on (and a new daemon can bind at once); calls on open
    // connections are still served.
    if (options_.listen_fd < 0) unlink(socket_path_.c_str());
    stop_accepting_ = true;
    Wake();
    // Drain: wait for the calls in flight, not for idle connections.
    auto deadline = std::chrono::steady_clock::now() + grace;
    auto drain = [&](std::chrono::steady_clock::time_point until) {
      while (active_calls_.load() > 0 && std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    };
    drain(deadline);
    // Calls arriving from now on are answered UNAVAILABLE at once. One that started between the
    // wait above and this line is still relayed: it gets the rest of the grace (and the refused
    // answers at least 100 ms to leave) before anything is cancelled.
    refusing_ = true;
    drain(std::max(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(100)));
    if (active_calls_.load() > 0) {
      spdlog::warn("{} call(s) still in flight after {} ms; cancelling them", active_calls_.load(),
                   grace.count());
    }
    // Cancel what is left (which cancels their pulls, so workers end promptly).
    cancel_all_ = true;
    Wake();
    interception_->CloseAndWait();
    exit_ = true;
    Wake();
    if (loop_.joinable()) loop_.join();
    close(epoll_fd_);
    close(wake_fd_);
  });
}

}  // namespace registry_proxy
