#include "cri_proxy.h"

#include <absl/synchronization/mutex.h>
#include <errno.h>
#include <fcntl.h>
#include <grpcpp/server_posix.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cri_methods.h"

namespace registry_proxy {
namespace {

using Kind = CallKind;

// Headers gRPC manages itself (and HTTP/2 pseudo-headers) are not copied from one call to
// the other; everything else is.
bool Forwardable(grpc::string_ref key) {
  return ForwardableMetadata(std::string_view(key.data(), key.size()));
}

std::string ToString(const grpc::ByteBuffer& bb) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!bb.Dump(&slices).ok()) return out;
  out.reserve(bb.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

// HasLengthDelimitedField1 of a message in one slice; -1 (cannot tell) for more than one.
int HasLengthDelimitedField1(const grpc::ByteBuffer& bb) {
  grpc::Slice slice;
  if (!bb.TrySingleSlice(&slice).ok()) return -1;
  return registry_proxy::HasLengthDelimitedField1(
      std::string_view(reinterpret_cast<const char*>(slice.begin()), slice.size()));
}

grpc::ByteBuffer ToByteBuffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// One downstream call, from the moment it is requested until every operation on it has
// completed. Every method runs on the completion-queue thread, except that a worker finishes
// an intercepted call (see StartIntercepted): the worker issues the final Finish and touches
// nothing else, and the core has no other operation outstanding on the stream meanwhile.

class CriProxy::Call {
 public:
  explicit Call(CriProxy* proxy) : proxy_(proxy), stream_(&sctx_) {
    proxy_->live_calls_.fetch_add(1, std::memory_order_relaxed);
    sctx_.AsyncNotifyWhenDone(&done_tag_);
    ++ops_;
    proxy_->service_.RequestCall(&sctx_, &stream_, proxy_->cq_.get(), proxy_->cq_.get(),
                                 &request_tag_);
  }

  ~Call() {
    if (requested_) proxy_->active_calls_.fetch_sub(1, std::memory_order_relaxed);
    proxy_->live_calls_.fetch_sub(1, std::memory_order_relaxed);
  }

  // A completion-queue tag: which handler to run for which call.
  struct Tag {
    Call* call;
    void (Call::*handler)(bool ok);
    void Run(bool ok) {
      Call* c = call;
      --c->ops_;
      (c->*handler)(ok);
      c->MaybeDelete();  // the call may be gone after this
    }
  };

 private:
  // --- start ---------------------------------------------------------------------------------

  void OnRequested(bool ok) {
    if (!ok) {  // the server is shutting down; this slot will never carry a call
      requested_ = false;
      return;
    }
    requested_ = true;
    proxy_->active_calls_.fetch_add(1, std::memory_order_relaxed);
    started_ = std::chrono::steady_clock::now();
    ++ops_;  // the done tag, delivered once the call ends
    if (!proxy_->shutting_down_.load()) proxy_->RequestNewCall();

    info_ = ClassifyMethod(sctx_.method(), proxy_->interceptor_ != nullptr);
    if (proxy_->refusing_.load()) {
      // Arrived on an open connection after the drain: a clear, retryable answer rather than
      // the CANCELLED the server's shutdown would give it.
      Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "registry-proxy is shutting down"));
      return;
    }
    PrepareClientContext();
    if (info_.kind == Kind::kStream) {
      cstream_ = proxy_->stub_.PrepareCall(&cctx_, sctx_.method(), proxy_->cq_.get());
      ++ops_;
      cstream_->StartCall(&cstart_tag_);
      return;
    }
    ++ops_;
    stream_.Read(&request_, &sread_tag_);
  }

  void PrepareClientContext() {
    auto deadline = sctx_.deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) cctx_.set_deadline(deadline);
    for (const auto& [k, v] : sctx_.client_metadata()) {
      if (Forwardable(k))
        cctx_.AddMetadata(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
    }
  }

  void OnDone(bool /*ok*/) {
    done_ = true;
    if (sctx_.IsCancelled()) {
      cancelled_ = true;
      cctx_.TryCancel();
      cancellation_.Cancel();
    }
  }

  // --- unary, pull and status ----------------------------------------------------------------

  void OnUnaryRequest(bool ok) {
    if (!ok) {  // cancelled, or the client half-closed without a message
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "no request message"));
      return;
    }
    if (info_.kind == Kind::kPull) {
      StartIntercepted([this] {
        return proxy_->interceptor_->PullImage(info_.version, ToString(request_), CallOpts());
      });
      return;
    }
    unary_ = proxy_->stub_.PrepareUnaryCall(&cctx_, sctx_.method(), request_, proxy_->cq_.get());
    unary_->StartCall();
    ++ops_;
    unary_->Finish(&response_, &cstatus_, &cfinish_tag_);
  }

  void OnUnaryResponse(bool /*ok*/) {
    CopyServerMetadata();
    if (!cstatus_.ok()) {
      Finish(cstatus_);
      return;
    }
    if (info_.kind == Kind::kStatus && !cancelled_ && HasLengthDelimitedField1(response_) != 1) {
      std::string request = ToString(request_);
      std::string response = ToString(response_);
      if (proxy_->interceptor_->StatusNeedsRecovery(info_.version, request, response)) {
        StartIntercepted([this, request = std::move(request), response = std::move(response)] {
          return proxy_->interceptor_->RecoverStatus(info_.version, request, response, CallOpts());
        });
        return;
      }
    }
    ++ops_;
    final_code_ = grpc::StatusCode::OK;
    stream_.WriteAndFinish(response_, grpc::WriteOptions(), grpc::Status::OK, &sfinish_tag_);
  }

  CallOptions CallOpts() {
    CallOptions o;
    o.deadline = sctx_.deadline();
    for (const auto& [k, v] : sctx_.client_metadata()) {
      if (Forwardable(k))
        o.metadata.emplace_back(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
    }
    o.cancellation = &cancellation_;
    return o;
  }

  // Runs `work` on a worker thread, which then finishes the call. The Finish it issues is
  // counted here, on the completion-queue thread, before the worker exists.
  void StartIntercepted(std::function<InterceptResult()> work) {
    ++ops_;
    worker_used_ = true;
    bool started = proxy_->workers_.Start([this, work = std::move(work)] {
      InterceptResult r = work();
      // Held until Finish has returned: MaybeDelete takes it before deleting, so the call
      // cannot go away under a worker still on its way out of gRPC.
      std::lock_guard<std::mutex> lock(worker_mu_);
      final_code_ = r.status.error_code();
      if (r.status.ok()) {
        response_ = ToByteBuffer(r.response);
        stream_.WriteAndFinish(response_, grpc::WriteOptions(), grpc::Status::OK, &sfinish_tag_);
      } else {
        stream_.Finish(r.status, &sfinish_tag_);
      }
    });
    if (!started) {
      --ops_;
      Finish(proxy_->shutting_down_.load()
                 ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "registry-proxy is shutting down")
                 : grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                "registry-proxy: too many pulls in progress"));
    }
  }

  // --- streams -------------------------------------------------------------------------------

  void OnClientStarted(bool ok) {
    if (!ok) {  // the upstream call could not start; Finish says why
      FinishClientStream();
      return;
    }
    ++ops_;
    stream_.Read(&request_, &sread_tag_);
    ++ops_;
    cstream_->Read(&response_, &cread_tag_);
  }

  void OnStreamRequest(bool ok) {
    if (client_finishing_ || client_finished_) return;
    if (!ok) {  // the caller half-closed (or went away: the done tag cancels upstream)
      ++ops_;
      cstream_->WritesDone(&cwritesdone_tag_);
      return;
    }
    ++ops_;
    cstream_->Write(request_, &cwrite_tag_);
  }

  void OnClientWrote(bool ok) {
    // Not ok: upstream ended the call; the outstanding Read will say how.
    if (!ok || client_finishing_ || client_finished_ || server_finishing_) return;
    ++ops_;
    stream_.Read(&request_, &sread_tag_);
  }

  void OnClientWritesDone(bool /*ok*/) {}

  void OnStreamResponse(bool ok) {
    if (!ok) {
      FinishClientStream();
      return;
    }
    CopyInitialMetadata();
    ++ops_;
    stream_.Write(response_, &swrite_tag_);
  }

  void OnServerWrote(bool ok) {
    if (!ok) {  // the caller is gone: stop upstream too
      cctx_.TryCancel();
      FinishClientStream();
      return;
    }
    ++ops_;
    cstream_->Read(&response_, &cread_tag_);
  }

  void FinishClientStream() {
    if (client_finishing_) return;
    client_finishing_ = true;
    ++ops_;
    cstream_->Finish(&cstatus_, &cfinish_tag_);
  }

  void OnStreamFinished(bool /*ok*/) {
    client_finished_ = true;
    CopyServerMetadata();
    Finish(cstatus_);
  }

  void OnClientFinished(bool ok) {
    if (info_.kind == Kind::kStream) {
      OnStreamFinished(ok);
    } else {
      OnUnaryResponse(ok);
    }
  }

  // --- end -----------------------------------------------------------------------------------

  void CopyInitialMetadata() {
    if (initial_metadata_copied_) return;
    initial_metadata_copied_ = true;
    for (const auto& [k, v] : cctx_.GetServerInitialMetadata()) {
      if (Forwardable(k))
        sctx_.AddInitialMetadata(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
    }
  }

  void CopyServerMetadata() {
    CopyInitialMetadata();
    for (const auto& [k, v] : cctx_.GetServerTrailingMetadata()) {
      if (Forwardable(k))
        sctx_.AddTrailingMetadata(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
    }
  }

  void Finish(const grpc::Status& status) {
    server_finishing_ = true;
    final_code_ = status.error_code();
    ++ops_;
    stream_.Finish(status, &sfinish_tag_);
  }

  void OnServerFinished(bool /*ok*/) { server_finished_ = true; }

  void MaybeDelete() {
    if (ops_ > 0) return;
    if (requested_ && (!done_ || !server_finished_)) return;
    if (worker_used_) std::lock_guard<std::mutex> wait_for_worker(worker_mu_);
    if (requested_ && proxy_->observer_) {
      proxy_->observer_->OnCallDone(sctx_.method(), final_code_,
                                    std::chrono::steady_clock::now() - started_);
    }
    delete this;
  }

  CriProxy* const proxy_;
  grpc::GenericServerContext sctx_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ClientContext cctx_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> cstream_;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> unary_;
  grpc::ByteBuffer request_, response_;
  grpc::Status cstatus_;
  Cancellation cancellation_;
  MethodInfo info_{Kind::kStream, CriVersion::kV1};
  std::chrono::steady_clock::time_point started_;
  grpc::StatusCode final_code_ = grpc::StatusCode::UNKNOWN;

  std::mutex worker_mu_;  // see StartIntercepted
  bool worker_used_ = false;

  int ops_ = 0;  // operations started and not yet completed
  bool requested_ = false;
  bool done_ = false;
  bool cancelled_ = false;
  bool initial_metadata_copied_ = false;
  bool client_finishing_ = false;
  bool client_finished_ = false;
  bool server_finishing_ = false;
  bool server_finished_ = false;

  Tag request_tag_{this, &Call::OnRequested};
  Tag done_tag_{this, &Call::OnDone};
  Tag sread_tag_{this, &Call::OnRead};
  Tag swrite_tag_{this, &Call::OnServerWrote};
  Tag sfinish_tag_{this, &Call::OnServerFinished};
  Tag cstart_tag_{this, &Call::OnClientStarted};
  Tag cread_tag_{this, &Call::OnStreamResponse};
  Tag cwrite_tag_{this, &Call::OnClientWrote};
  Tag cwritesdone_tag_{this, &Call::OnClientWritesDone};
  Tag cfinish_tag_{this, &Call::OnClientFinished};

  void OnRead(bool ok) {
    if (info_.kind == Kind::kStream) {
      OnStreamRequest(ok);
    } else {
      OnUnaryRequest(ok);
    }
  }
};

// ---------------------------------------------------------------------------------------------

Result<std::string> UnixSocketPath(std::string_view endpoint) {
  std::string_view path = endpoint;
  if (path.substr(0, 7) == "unix://") path.remove_prefix(7);
  if (path.empty() || path[0] != '/') {
    return Status::Error("'" + std::string(endpoint) +
                         "' is not a unix socket: want unix:///absolute/path");
  }
  if (path.size() >= sizeof(sockaddr_un::sun_path)) {
    return Status::Error("socket path '" + std::string(path) + "' is too long");
  }
  return std::string(path);
}

std::shared_ptr<grpc::Channel> MakeUpstreamChannel(const std::string& endpoint,
                                                   int max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(max_message_bytes);
  args.SetMaxSendMessageSize(max_message_bytes);
  // containerd restarts take seconds; come back within one of it being up again.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Also gRPC's minimum connect timeout (the time an attempt has to receive the peer's SETTINGS
  // frame): at 100 ms a containerd slow to answer (starting, busy) failed pulls with "connection
  // attempt timed out before receiving SETTINGS frame". Calls keep their own deadlines.
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 20000);
  // No retry machinery: it buffers every call's send ops in case it must replay them, and the
  // proxy must not replay anyway (the caller, kubelet, decides that).
  args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);
  std::string target = endpoint.rfind("unix:", 0) == 0 ? endpoint : "unix://" + endpoint;
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

namespace {

// Is something serving on this unix socket? (A stale file from a crashed daemon answers
// ECONNREFUSED; a live daemon accepts.)
bool SocketAnswers(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  bool answers = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return answers;
}

}  // namespace

std::string BoundSocketPath(int fd, const std::string& fallback) {
  sockaddr_un addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
      addr.sun_family == AF_UNIX && addr.sun_path[0] != '\0') {
    return addr.sun_path;
  }
  return fallback;
}

Status PrepareSocketPath(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (!fs::create_directories(dir, ec)) {
      return Status::Error("cannot create " + dir.string() + ": " + ec.message());
    }
    // Only root (and kubelet, as root) reaches the socket; the directory says so first.
    if (chmod(dir.c_str(), 0700) != 0) {
      return Status::Error("cannot chmod " + dir.string() + ": " + std::strerror(errno));
    }
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Status::Error(path + " exists and is not a socket; not replacing it");
    }
    if (SocketAnswers(path)) {
      return Status::Error(path + " is in use: another process answers on it");
    }
    if (unlink(path.c_str()) != 0) {
      return Status::Error("cannot remove stale socket " + path + ": " + std::strerror(errno));
    }
    spdlog::info("replaced stale socket {}", path);
  }
  return Status::Ok();
}

CriProxy::CriProxy(ProxyOptions options, std::shared_ptr<grpc::Channel> upstream,
                   ImageInterceptor* interceptor, CallObserver* observer)
    : options_(std::move(options)),
      upstream_(std::move(upstream)),
      stub_(upstream_),
      interceptor_(interceptor),
      observer_(observer) {
  // Debian's abseil is built without NDEBUG, so every absl::Mutex that gRPC locks also runs
  // abseil's deadlock detector (a lock graph kept under a global lock): about 8% of the
  // daemon's CPU on the forwarding path (perf). gRPC's own locking is not ours to verify;
  // TSan builds still check ours. Process-wide, and idempotent.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
}

CriProxy::~CriProxy() { Shutdown(std::chrono::milliseconds(0)); }

Status CriProxy::Start() {
  auto path = UnixSocketPath(options_.listen);
  if (!path.ok()) return path.status();
  socket_path_ = *path;
  const bool inherited = options_.listen_fd >= 0;
  if (inherited) {
    // Socket activation: systemd made and owns the socket; name it as it is.
    socket_path_ = BoundSocketPath(options_.listen_fd, socket_path_);
    accept_wake_fd_ = eventfd(0, EFD_CLOEXEC);
    if (accept_wake_fd_ < 0) return Status::Error(std::string("eventfd: ") + std::strerror(errno));
  } else if (Status s = PrepareSocketPath(socket_path_); !s.ok()) {
    return s;
  }

  grpc::ServerBuilder builder;
  if (!inherited) {
    builder.AddListeningPort("unix://" + socket_path_, grpc::InsecureServerCredentials());
  }
  builder.RegisterAsyncGenericService(&service_);
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  cq_ = builder.AddCompletionQueue();
  server_ = builder.BuildAndStart();
  if (!server_) return Status::Error("cannot listen on " + socket_path_);
  if (!inherited && chmod(socket_path_.c_str(), 0660) != 0) {
    spdlog::warn("cannot chmod {}: {}", socket_path_, std::strerror(errno));
  }
  for (int i = 0; i < options_.request_slots; ++i) RequestNewCall();
  loop_ = std::thread([this] { Loop(); });
  if (inherited) accept_ = std::thread([this] { AcceptLoop(); });
  return Status::Ok();
}

// Socket activation: accepts on the inherited listener until Shutdown() wakes it, handing each
// connection to the server (gRPC 1.51 cannot serve a listening fd itself).
void CriProxy::AcceptLoop() {
  // The listener is shared with systemd, which only polls it while no daemon runs.
  fcntl(options_.listen_fd, F_SETFL, fcntl(options_.listen_fd, F_GETFL) | O_NONBLOCK);
  pollfd fds[2] = {{options_.listen_fd, POLLIN, 0}, {accept_wake_fd_, POLLIN, 0}};
  while (true) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::critical("poll on the inherited socket: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents) return;
    int fd = accept4(options_.listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ECONNABORTED) {
        continue;
      }
      spdlog::error("accept on {}: {}", socket_path_, std::strerror(errno));
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // e.g. EMFILE: no spin
      continue;
    }
    grpc::AddInsecureChannelFromFd(server_.get(), fd);  // the server owns fd from here
  }
}

void CriProxy::RequestNewCall() { new Call(this); }

void CriProxy::Loop() {
  void* tag = nullptr;
  bool ok = false;
  while (cq_->Next(&tag, &ok)) static_cast<Call::Tag*>(tag)->Run(ok);
}

void CriProxy::Shutdown(std::chrono::milliseconds grace) {
  std::call_once(shutdown_once_, [&] {
    shutting_down_ = true;
    if (!server_) return;
    // New connections fail from now on (and a new daemon can bind at once); calls on open
    // connections are still served. An inherited socket stays: new connections wait in its
    // backlog for the next daemon.
    if (accept_.joinable()) {
      uint64_t one = 1;
      if (write(accept_wake_fd_, &one, sizeof one) < 0) spdlog::warn("eventfd write failed");
      accept_.join();
      close(accept_wake_fd_);
    } else if (options_.listen_fd < 0) {
      unlink(socket_path_.c_str());
    }
    // Drain: wait for the calls in flight, not for idle connections (kubelet keeps one open
    // for good, and gRPC's own Shutdown(deadline) would wait the whole grace for it).
    auto deadline = std::chrono::steady_clock::now() + grace;
    while (active_calls_.load() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (active_calls_.load() > 0) {
      spdlog::warn("{} call(s) still in flight after {} ms; cancelling them", active_calls_.load(),
                   grace.count());
    }
    // Calls arriving from now on are answered UNAVAILABLE at once; give those answers a moment
    // to leave before the server's shutdown would cancel them.
    const int stuck = active_calls_.load();  // 0 unless the grace ran out
    refusing_ = true;
    const auto settle = std::chrono::steady_clock::now() + std::chrono::milliseconds(100);
    while (active_calls_.load() > stuck && std::chrono::steady_clock::now() < settle) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    // Cancels what is left, which cancels their upstream calls and pulls (the done tag), so
    // workers end promptly.
    server_->Shutdown(std::chrono::system_clock::now());
    workers_.CloseAndWait();
    cq_->Shutdown();
    if (loop_.joinable()) loop_.join();
  });
}

}  // namespace registry_proxy
