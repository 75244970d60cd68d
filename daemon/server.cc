#include "daemon/server.h"

#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <optional>

#include "common/cpu_hint.h"
#include "common/frame.h"
#include "common/peer_cred.h"
#include "common/secret.h"
#include "daemon/log.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("server");
  return *logger;
}
}  // namespace

namespace asio = boost::asio;
using Socket = asio::local::stream_protocol::socket;

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(Server& server, Socket socket, int cpu_local, Dispatcher& dispatcher,
          ClientRegistry& clients, Principal principal,
          std::shared_ptr<std::atomic<uint32_t>> uid_pool_use)
      : server_(server),
        socket_(std::move(socket)),
        cpu_local_(cpu_local),
        watchdog_(socket_.get_executor()),
        dispatcher_(dispatcher),
        clients_(clients),
        limits_(server.settings().Get()->limits),
        principal_(std::move(principal)),
        uid_pool_use_(std::move(uid_pool_use)) {}

  asio::any_io_executor executor() { return socket_.get_executor(); }
  uint32_t uid() const { return principal_.uid; }

  void Start() {
    clients_.Add(principal_.uid, principal_.pid);
    registered_ = true;
    boost::system::error_code ignored;
    socket_.non_blocking(true, ignored);  // for the direct writes (WriteNext)
    Watch();
    if (cpu_local_ >= 0) {
      Log().debug("connection from uid {} pid {}, served on its CPU {}",
                  principal_.uid, principal_.pid, cpu_local_);
    } else {
      Log().debug("connection from uid {} pid {}", principal_.uid,
                  principal_.pid);
    }
    Pump();
  }

  // Graceful stop: take no new requests, close once every response in
  // flight has been written.
  void Drain() {
    draining_ = true;
    if (in_flight_ == 0) {
      Close(nullptr);
    }
  }

  void Close(const char* why) {
    if (closed_) {
      return;
    }
    closed_ = true;
    abandoned_.store(true, std::memory_order_relaxed);
    if (why != nullptr) {
      Log().debug("closing connection of uid {} pid {}: {}", principal_.uid,
                  principal_.pid, why);
    }
    boost::system::error_code ignored;
    socket_.shutdown(Socket::shutdown_both, ignored);
    socket_.close(ignored);
    watchdog_.cancel();
    for (std::string& frame : write_queue_) {
      CleanseString(frame);
    }
    write_queue_.clear();
    if (registered_) {
      clients_.Remove(principal_.uid, principal_.pid);
      registered_ = false;
    }
    server_.Forget(this);
  }

 private:
  // Deadlines are enforced by one periodic watchdog per connection rather
  // than a timer re-armed per frame: the hot path only stamps the time
  // (no timer syscalls per request); timeouts are exact to about a second.
  void Watch() {
    watchdog_.expires_after(std::chrono::seconds(1));
    watchdog_.async_wait(
        [self = shared_from_this()](const boost::system::error_code& ec) {
          if (ec || self->closed_) {
            return;
          }
          self->CheckDeadlines();
          self->Watch();
        });
  }

  void CheckDeadlines() {
    // A reload (SIGHUP) reaches open connections here, within a second.
    limits_ = server_.settings().Get()->limits;
    const auto now = Clock::now();
    const auto io = std::chrono::seconds(limits_.io_timeout_seconds);
    const auto idle = std::chrono::seconds(limits_.idle_timeout_seconds);
    if (writing_ && now - write_since_ > io) {
      Close("client does not read");
    } else if (reading_ && rlen_ > 0 && now - frame_since_ > io) {
      // Counted from the frame's first byte, so trickling bytes does not
      // keep a frame open.
      Close("frame not completed in time");
    } else if (reading_ && rlen_ == 0 && in_flight_ == 0 &&
               limits_.idle_timeout_seconds != 0 && now - idle_since_ > idle) {
      Close("idle timeout");
    }
  }

  // Reading: bytes accumulate in rbuf_ (wiped when freed); Pump() handles
  // every complete frame in it, then reads more. One recv usually brings a
  // whole request, and pipelined requests arrive together.
  bool MayTakeRequests() const {
    return !closed_ && !close_after_write_ && !draining_ &&
           in_flight_ < limits_.max_in_flight_per_connection;
  }

  void Pump() {
    pumping_ = true;
    struct Done {
      bool& flag;
      ~Done() { flag = false; }
    } done{pumping_};
    while (MayTakeRequests() && rlen_ >= kFrameHeaderBytes) {
      const uint8_t* data = rbuf_.data(SecretAccess::kToken);
      auto length =
          DecodeFrameHeader(std::span<const uint8_t>(data, kFrameHeaderBytes),
                            limits_.max_frame_bytes);
      if (!length.ok()) {
        Log().info("uid {} pid {}: {}; closing", principal_.uid, principal_.pid,
                   length.status().message());
        close_after_write_ = true;  // before: the answer may go out at once
        SendError(0, length.status());
        return;
      }
      const std::size_t total = kFrameHeaderBytes + *length;
      if (rlen_ < total) {
        if (rbuf_.size() < total) {
          // A pending read targets rbuf_; it is only ever started after the
          // buffer was sized for the frame it continues.
          KH_CHECK(!reading_);
          rbuf_.resize(total);  // the old buffer is wiped by the allocator
        }
        break;
      }
      HandleFrame(std::span<const uint8_t>(data + kFrameHeaderBytes, *length));
      Consume(total);
    }
    if (rlen_ == 0 && !reading_ && rbuf_.size() > kReadChunk) {
      rbuf_ = SecretBytes(kReadChunk);  // give back a large frame's buffer
    }
    if (eof_) {
      // The client shut down its side: answer what it sent, then close.
      if (in_flight_ == 0) {
        Close(rlen_ > 0 ? "truncated frame" : nullptr);
      }
      return;
    }
    if (MayTakeRequests() && !reading_) {
      StartRead();
    }
  }

  void Consume(std::size_t n) {
    uint8_t* data = rbuf_.data(SecretAccess::kToken);
    std::memmove(data, data + n, rlen_ - n);
    CleanseMemory(data + (rlen_ - n), n);
    rlen_ -= n;
    if (rlen_ > 0) {
      frame_since_ = Clock::now();  // the next frame has begun
    }
  }

  void StartRead() {
    reading_ = true;
    socket_.async_read_some(
        asio::buffer(rbuf_.data(SecretAccess::kToken) + rlen_,
                     rbuf_.size() - rlen_),
        [self = shared_from_this()](const boost::system::error_code& ec,
                                    std::size_t n) { self->OnRead(ec, n); });
  }

  void OnRead(const boost::system::error_code& ec, std::size_t n) {
    reading_ = false;
    if (closed_) {
      return;
    }
    if (draining_) {
      // Shutting down: no new requests; close once the last answer is out.
      if (in_flight_ == 0) {
        Close(nullptr);
      }
      return;
    }
    if (ec == asio::error::eof) {
      eof_ = true;
      Pump();
      return;
    }
    if (ec) {
      Close("read failed");
      return;
    }
    if (rlen_ == 0) {
      frame_since_ = Clock::now();
    }
    rlen_ += n;
    Pump();
  }

  void HandleFrame(std::span<const uint8_t> body) {
    auto request = std::make_shared<v1::Request>();
    Status st = DecodeRequest(body, request.get());
    if (!st.ok()) {
      if (st.code() == Code::kUnsupported) {
        // A well-formed request for an operation we do not know: answer and
        // keep the connection.
        SendError(request->id(), st);
        return;
      }
      Log().info("uid {} pid {}: {}; closing", principal_.uid, principal_.pid,
                 st.message());
      close_after_write_ = true;  // before: the answer may go out at once
      SendError(0, st);
      return;
    }
    ++in_flight_;
    // Cheap operations are answered right here, on this I/O thread: the
    // response goes out without another thread hop. The rest goes to the
    // blocking pool so it cannot hold up I/O.
    bool device_key_use = false;
    std::optional<v1::Response> response =
        dispatcher_.TryHandleInline(principal_, *request, &device_key_use);
    if (response) {
      Queue(Encode(*request, *response));
      return;
    }
    // A TPM or HSM key use: this thread runs it itself if the pool is idle
    // and another I/O thread stays free to serve everyone else (see
    // server.h), which saves two thread hops per operation.
    const bool local = cpu_local_ >= 0;
    if (device_key_use &&
        (local ? server_.TryRunHereLocal(cpu_local_) : server_.TryRunHere())) {
      v1::Response r = dispatcher_.Handle(principal_, *request);
      if (local) {
        server_.DoneRunningHereLocal(cpu_local_);
      } else {
        server_.DoneRunningHere();
      }
      Queue(Encode(*request, r));
      return;
    }
    // Work for the blocking pool counts against the uid's share
    // (limits.max_in_flight_per_uid) until it has run.
    if (uid_pool_use_->fetch_add(1, std::memory_order_relaxed) >=
        limits_.max_in_flight_per_uid) {
      uid_pool_use_->fetch_sub(1, std::memory_order_relaxed);
      --in_flight_;  // SendError counts its own response
      SendError(
          request->id(),
          ResourceExhausted("uid " + std::to_string(principal_.uid) + " has " +
                            std::to_string(limits_.max_in_flight_per_uid) +
                            " requests waiting already "
                            "(limits.max_in_flight_per_uid); try again later"));
      return;
    }
    server_.blocking_queue().Post(
        principal_.uid,
        [self = shared_from_this(), request] { self->Work(*request); });
  }

  // Runs on the blocking pool, when it is this uid's turn (FairQueue).
  void Work(v1::Request& request) {
    struct Release {
      std::atomic<uint32_t>& n;
      ~Release() { n.fetch_sub(1, std::memory_order_relaxed); }
    } release{*uid_pool_use_};
    v1::Response response;
    if (abandoned_.load(std::memory_order_relaxed)) {
      // The client has gone: queued work (say, a flood of generations from
      // a client that was killed) is dropped, not done for no one.
      return;
    }
    if (server_.stopping()) {
      // Queued work is not started once the daemon stops: a flood of
      // queued generations must not hold up the exit.
      response.set_id(request.id());
      response.set_code(v1::UNAVAILABLE);
      response.set_message("daemon shutting down");
    } else {
      response = dispatcher_.Handle(principal_, request);
    }
    asio::post(socket_.get_executor(),
               [self = shared_from_this(),
                bytes = Encode(request, response)]() mutable {
                 self->Queue(std::move(bytes));
               });
  }

  // Serializes a response and wipes whatever secret the request or the
  // response message still holds.
  static std::string Encode(v1::Request& request, v1::Response& response) {
    if (request.has_import_key()) {
      CleanseString(*request.mutable_import_key()->mutable_private_key());
    }
    auto frame = EncodeFrame(response, kMaxResponseFrameBytes);
    if (response.has_decrypt()) {
      CleanseString(*response.mutable_decrypt()->mutable_plaintext());
    }
    if (response.has_derive()) {
      CleanseString(*response.mutable_derive()->mutable_shared_secret());
    }
    std::string bytes;
    if (frame.ok()) {
      bytes = std::move(*frame);
    } else {
      v1::Response error;
      error.set_id(request.id());
      error.set_code(static_cast<v1::Code>(frame.status().code()));
      error.set_message("response too large");
      bytes = std::move(*EncodeFrame(error, kMaxResponseFrameBytes));
    }
    return bytes;
  }

  void SendError(uint64_t id, const Status& st) {
    v1::Response r;
    r.set_id(id);
    r.set_code(static_cast<v1::Code>(st.code()));
    r.set_message(st.message());
    auto frame = EncodeFrame(r, kMaxResponseFrameBytes);
    if (frame.ok()) {
      ++in_flight_;  // balanced in OnWritten like every response
      Queue(std::move(*frame));
    }
  }

  void Queue(std::string frame) {
    if (closed_) {
      CleanseString(frame);
      return;
    }
    write_queue_.push_back(std::move(frame));
    if (!writing_) {
      WriteNext();
    }
  }

  // Writes first try a plain send() on the non-blocking socket, here and
  // now: a response nearly always fits the socket buffer, and this way it
  // goes out without an async_write whose completion is queued on the
  // io_context and handed to another I/O thread (one such hand-off per
  // request showed up as futex and epoll calls in strace). What does not
  // fit is left to async_write, which also arms the slow-reader timeout.
  void WriteNext() {
    while (!write_queue_.empty()) {
      std::string& frame = write_queue_.front();
      boost::system::error_code ec;
      const std::size_t n =
          socket_.write_some(asio::buffer(frame.data() + write_offset_,
                                          frame.size() - write_offset_),
                             ec);
      if (ec && ec != asio::error::would_block &&
          ec != asio::error::try_again) {
        Close("write failed");
        return;
      }
      write_offset_ += n;
      if (write_offset_ < frame.size()) {
        writing_ = true;
        write_since_ = Clock::now();
        asio::async_write(
            socket_,
            asio::buffer(frame.data() + write_offset_,
                         frame.size() - write_offset_),
            [self = shared_from_this()](const boost::system::error_code& e,
                                        std::size_t) { self->OnWritten(e); });
        return;
      }
      FrameWritten();
    }
    AfterWrites();
  }

  void OnWritten(const boost::system::error_code& ec) {
    writing_ = false;
    if (closed_) {
      return;
    }
    if (ec) {
      Close("write failed");
      return;
    }
    FrameWritten();
    WriteNext();
  }

  void FrameWritten() {
    CleanseString(write_queue_.front());
    write_queue_.pop_front();
    write_offset_ = 0;
    --in_flight_;
  }

  // Every queued response is out.
  void AfterWrites() {
    if ((close_after_write_ || draining_) && in_flight_ == 0) {
      Close(nullptr);
      return;
    }
    if (in_flight_ == 0) {
      idle_since_ = Clock::now();
    }
    // Reading may have paused at the in-flight limit. Inside Pump() (an
    // inline answer) the loop there goes on by itself; a nested Pump()
    // would handle the frame being answered a second time.
    if (!pumping_) {
      Pump();
    }
  }

  Server& server_;
  Socket socket_;
  // The CPU whose CPU-local context serves this session
  // (Server::SetCpuLocalContexts); -1: the shared context.
  const int cpu_local_;
  asio::steady_timer watchdog_;
  Dispatcher& dispatcher_;
  ClientRegistry& clients_;
  Limits limits_;  // the daemon's, as of the last watchdog tick
  const Principal principal_;

  // Everything below is touched on the I/O thread only.
  static constexpr std::size_t kReadChunk = 4096;
  SecretBytes rbuf_{kReadChunk};
  std::size_t rlen_ = 0;  // bytes of rbuf_ in use
  std::deque<std::string> write_queue_;
  std::size_t write_offset_ = 0;  // bytes of write_queue_.front() sent
  Clock::time_point idle_since_ = Clock::now();  // nothing in flight since
  Clock::time_point frame_since_;  // first byte of the partial frame in rbuf_
  Clock::time_point write_since_;
  uint32_t in_flight_ = 0;  // requests read whose response is not yet written
  bool reading_ = false;
  bool writing_ = false;
  bool closed_ = false;
  bool close_after_write_ = false;
  bool draining_ = false;
  bool eof_ = false;      // the client shut down its sending side
  bool pumping_ = false;  // inside Pump()
  bool registered_ = false;
  // Set with closed_; read by the blocking pool (Work), hence atomic.
  std::atomic<bool> abandoned_{false};
  // This uid's requests on the blocking pool, over all its sessions.
  const std::shared_ptr<std::atomic<uint32_t>> uid_pool_use_;
};

Server::Server(std::vector<asio::io_context*> io, unsigned io_threads,
               asio::thread_pool& workers, unsigned blocking_threads,
               Dispatcher& dispatcher, ClientRegistry& clients,
               const LiveSettings& settings)
    : io_(*io.at(0)),
      io_contexts_(std::move(io)),
      io_threads_(io_threads),
      blocking_queue_(workers, blocking_threads),
      dispatcher_(dispatcher),
      clients_(clients),
      settings_(settings) {}

Server::~Server() = default;

bool Server::TryRunHere() {
  unsigned busy = io_threads_running_jobs_.load(std::memory_order_relaxed);
  do {
    if (busy + 1 >= io_threads_) {
      return false;  // the last free I/O thread keeps serving I/O
    }
  } while (!io_threads_running_jobs_.compare_exchange_weak(
      busy, busy + 1, std::memory_order_relaxed));
  if (!blocking_queue_.TryClaim()) {
    io_threads_running_jobs_.fetch_sub(1, std::memory_order_relaxed);
    return false;
  }
  return true;
}

void Server::DoneRunningHere() {
  blocking_queue_.Release();
  io_threads_running_jobs_.fetch_sub(1, std::memory_order_relaxed);
}

namespace {

// The caller's executable for the audit log (informative: a process can
// exec something else after connecting); "" when it cannot be read.
std::string ExecutableOf(int32_t pid) {
  if (pid <= 0) {
    return "";
  }
  char buf[4096];
  const std::string link = "/proc/" + std::to_string(pid) + "/exe";
  const ssize_t n = ::readlink(link.c_str(), buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : "";
}

// True if something accepts connections at path.
bool SomeoneListens(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return false;
  }
  struct sockaddr_un addr {};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const bool live =
      connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return live;
}

}  // namespace

Status Server::Listen(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty() || path.size() >= sizeof(sockaddr_un::sun_path)) {
    return InvalidArgument("socket path is empty or too long: " + path);
  }
  const fs::path dir = fs::path(path).parent_path();
  std::error_code fec;
  if (!dir.empty() && !fs::exists(dir, fec)) {
    fs::create_directories(dir, fec);
    if (fec) {
      return Internal("cannot create socket directory " + dir.string() + ": " +
                      fec.message());
    }
    ::chmod(dir.c_str(), 0755);
  }
  // Clients trust a socket by its owner; that is only sound if no one but
  // us (or root) can create files next to it.
  struct stat dst {};
  const std::string dir_name = dir.empty() ? "." : dir.string();
  if (stat(dir_name.c_str(), &dst) != 0) {
    return Internal("cannot stat socket directory " + dir_name + ": " +
                    std::strerror(errno));
  }
  if ((dst.st_uid != geteuid() && dst.st_uid != 0) ||
      (dst.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return Internal("socket directory " + dir_name +
                    " can be written by other users; use a directory only "
                    "keyholdd (or root) can write, such as /run/keyhold");
  }
  struct stat st {};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return Internal("refusing to replace " + path + ": not a socket");
    }
    if (SomeoneListens(path)) {
      return Internal("another daemon is already listening on " + path);
    }
    ::unlink(path.c_str());
  }
  boost::system::error_code ec;
  acceptor_ = std::make_unique<asio::local::stream_protocol::acceptor>(io_);
  acceptor_->open(asio::local::stream_protocol(), ec);
  if (!ec) {
    // Access control is per operation by peer credentials; every local user
    // may connect, so the socket is created 0666 (umask 0111 at bind; no
    // chmod by path afterwards).
    const mode_t old_mask = ::umask(0111);
    acceptor_->bind(asio::local::stream_protocol::endpoint(path), ec);
    ::umask(old_mask);
  }
  if (!ec) {
    acceptor_->listen(asio::socket_base::max_listen_connections, ec);
  }
  if (ec) {
    return Internal("cannot listen on " + path + ": " + ec.message());
  }
  path_ = path;
  return Status::Ok();
}

Status Server::Adopt(int fd) {
  int type = 0;
  int listening = 0;
  socklen_t type_len = sizeof(type);
  socklen_t listening_len = sizeof(listening);
  sockaddr_storage addr{};
  socklen_t addr_len = sizeof(addr);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) != 0 ||
      getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &listening_len) !=
          0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &addr_len) != 0) {
    return Internal("socket from systemd (fd " + std::to_string(fd) +
                    "): " + std::strerror(errno));
  }
  if (addr.ss_family != AF_UNIX || type != SOCK_STREAM || listening == 0) {
    return InvalidArgument(
        "socket from systemd (fd " + std::to_string(fd) +
        ") is not a listening Unix stream socket; use ListenStream=/path");
  }
  // listen() again, as keyholdd: the credentials a client reads with
  // SO_PEERCRED are those of whoever last called listen(), and systemd ran
  // as root. Connections queued before this still report root (clients
  // accept root, see common/client).
  if (::listen(fd, SOMAXCONN) != 0) {
    return Internal("listen on the socket from systemd: " +
                    std::string(std::strerror(errno)));
  }
  boost::system::error_code ec;
  acceptor_ = std::make_unique<asio::local::stream_protocol::acceptor>(io_);
  acceptor_->assign(asio::local::stream_protocol(), fd, ec);
  if (ec) {
    return Internal("cannot use the socket from systemd: " + ec.message());
  }
  path_.clear();
  return Status::Ok();
}

void Server::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  Accept();
}

void Server::Accept() {
  if (stopped_ || !acceptor_) {
    return;
  }
  // Each connection gets its own strand on the next I/O thread's context:
  // its handlers never run concurrently and never change threads, while
  // different connections spread over the I/O threads.
  asio::io_context& home = *io_contexts_[next_context_];
  next_context_ = (next_context_ + 1) % io_contexts_.size();
  acceptor_->async_accept(
      asio::make_strand(home),
      [this](const boost::system::error_code& ec, Socket socket) {
        std::unique_lock<std::mutex> lock(mu_);
        if (stopped_ || ec == asio::error::operation_aborted) {
          return;
        }
        if (ec) {
          // Out of descriptors or similar: back off briefly instead of
          // spinning.
          Log().warn("accept failed: {}", ec.message());
          auto timer = std::make_shared<asio::steady_timer>(io_);
          timer->expires_after(std::chrono::milliseconds(100));
          timer->async_wait([this, timer](const boost::system::error_code&) {
            std::lock_guard<std::mutex> relock(mu_);
            Accept();
          });
          return;
        }
        const Limits limits = settings_.Get()->limits;
        if (sessions_.size() >= limits.max_connections) {
          LogRefusal(std::to_string(sessions_.size()) +
                     " connections open (limits.max_connections)");
          boost::system::error_code ignored;
          socket.close(ignored);
          Accept();
          return;
        }
        auto cred = GetPeerCred(socket.native_handle(), /*with_groups=*/true);
        if (!cred.ok()) {
          Log().warn("connection refused: {}", cred.status().message());
          Accept();
          return;
        }
        const auto per_uid = sessions_per_uid_.find(cred->uid);
        const uint32_t same_uid =
            per_uid == sessions_per_uid_.end() ? 0 : per_uid->second;
        if (same_uid >= limits.max_connections_per_uid) {
          LogRefusal("uid " + std::to_string(cred->uid) + " already has " +
                     std::to_string(same_uid) +
                     " connections (limits.max_connections_per_uid)");
          boost::system::error_code ignored;
          socket.close(ignored);
          Accept();
          return;
        }
        Principal who;
        who.uid = cred->uid;
        who.gid = cred->gid;
        who.groups.assign(cred->groups.begin(), cred->groups.end());
        who.pid = cred->pid;
        who.exe = ExecutableOf(cred->pid);
        auto& pool_use = pool_use_per_uid_[cred->uid];
        if (!pool_use) {
          pool_use = std::make_shared<std::atomic<uint32_t>>(0);
        }
        const int cpu_local = MoveToClientCpu(cred->pid, &socket);
        auto session = std::make_shared<Session>(
            *this, std::move(socket), cpu_local, dispatcher_, clients_,
            std::move(who), pool_use);
        sessions_.emplace(session.get(), session);
        ++sessions_per_uid_[session->uid()];
        Accept();
        lock.unlock();
        asio::dispatch(session->executor(), [session] { session->Start(); });
      });
}

void Server::SetCpuLocalContexts(std::map<int, asio::io_context*> contexts) {
  std::lock_guard<std::mutex> lock(mu_);
  cpu_contexts_ = std::move(contexts);
  device_use_since_.clear();
  for (const auto& [cpu, context] : cpu_contexts_) {
    device_use_since_[cpu] = std::make_unique<std::atomic<int64_t>>(0);
  }
}

namespace {
// The CPU a connection's client names in its socket address, if any.
std::optional<int> CpuHintOf(int fd) {
  struct sockaddr_un addr {};
  socklen_t len = sizeof(addr);
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
      len <= offsetof(struct sockaddr_un, sun_path) || len > sizeof(addr)) {
    return std::nullopt;
  }
  return CpuFromHintAddress(std::string_view(
      addr.sun_path, len - offsetof(struct sockaddr_un, sun_path)));
}

int64_t SteadyNowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             Clock::now().time_since_epoch())
      .count();
}
}  // namespace

bool Server::TryRunHereLocal(int cpu) {
  std::atomic<int64_t>& since = *device_use_since_.at(cpu);
  int64_t none = 0;
  if (!since.compare_exchange_strong(none, SteadyNowNs())) {
    return false;  // one device key use at a time per context
  }
  if (!blocking_queue_.TryClaim()) {
    since.store(0);
    return false;
  }
  return true;
}

void Server::DoneRunningHereLocal(int cpu) {
  blocking_queue_.Release();
  device_use_since_.at(cpu)->store(0);
}

void Server::RunCpuLocalStandIn(int cpu) {
  constexpr auto kPatience = std::chrono::milliseconds(100);
  std::atomic<int64_t>& since = *device_use_since_.at(cpu);
  asio::io_context& context = *cpu_contexts_.at(cpu);
  std::unique_lock<std::mutex> lock(stand_in_mu_);
  while (!stopping_) {
    stand_in_cv_.wait_for(lock, kPatience);
    const int64_t began = since.load();
    if (stopping_ || began == 0 ||
        SteadyNowNs() - began <
            std::chrono::duration_cast<std::chrono::nanoseconds>(kPatience)
                .count()) {
      continue;
    }
    lock.unlock();
    Log().warn(
        "a device key use has held the I/O thread of CPU {} for over {} ms; "
        "another thread serves that CPU's connections until it returns",
        cpu, kPatience.count());
    while (!stopping_ && since.load() == began) {
      context.run_for(std::chrono::milliseconds(20));
    }
    lock.lock();
  }
}

std::optional<int> SoleCpuOf(pid_t pid) {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (pid <= 0 || ::sched_getaffinity(pid, sizeof(set), &set) != 0 ||
      CPU_COUNT(&set) != 1) {
    return std::nullopt;
  }
  for (std::size_t cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) {
      return static_cast<int>(cpu);
    }
  }
  return std::nullopt;
}

int Server::MoveToClientCpu(pid_t pid, Socket* socket) {
  if (cpu_contexts_.empty()) {
    return -1;
  }
  // A process confined to one CPU runs there whatever its connection says;
  // otherwise the CPU the client made the connection on (common/cpu_hint.h).
  std::optional<int> cpu = SoleCpuOf(pid);
  if (!cpu) {
    cpu = CpuHintOf(socket->native_handle());
  }
  if (!cpu) {
    return -1;
  }
  const auto it = cpu_contexts_.find(*cpu);
  if (it == cpu_contexts_.end()) {
    return -1;  // the daemon may not run there (cpuset, CPUAffinity=)
  }
  boost::system::error_code ec;
  const int fd = socket->release(ec);
  if (ec) {
    return -1;  // still registered where it was: stays there
  }
  Socket moved(asio::make_strand(*it->second));
  moved.assign(asio::local::stream_protocol(), fd, ec);
  if (ec) {
    // Cannot happen short of running out of memory; the connection is
    // closed and the client reconnects.
    ::close(fd);
    Log().warn("cannot move a connection to CPU {}: {}", *cpu, ec.message());
  }
  *socket = std::move(moved);
  return ec ? -1 : *cpu;
}

void Server::LogRefusal(const std::string& why) {
  ++refusals_since_log_;
  const auto now = Clock::now();
  if (now - last_refusal_log_ < std::chrono::seconds(1)) {
    return;
  }
  if (refusals_since_log_ > 1) {
    Log().warn("connection refused: {} ({} refused since the last line)", why,
               refusals_since_log_);
  } else {
    Log().warn("connection refused: {}", why);
  }
  last_refusal_log_ = now;
  refusals_since_log_ = 0;
}

void Server::Forget(Session* session) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = sessions_.find(session); it != sessions_.end()) {
    auto per_uid = sessions_per_uid_.find(session->uid());
    if (per_uid != sessions_per_uid_.end() && --per_uid->second == 0) {
      sessions_per_uid_.erase(per_uid);
      // Work still queued keeps its own reference to the counter.
      pool_use_per_uid_.erase(session->uid());
    }
    sessions_.erase(it);
  }
  if (stopped_ && sessions_.empty() && stop_timer_) {
    stop_timer_->cancel();
  }
}

void Server::Stop() {
  std::lock_guard<std::mutex> lock(mu_);
  if (stopped_) {
    return;
  }
  stopped_ = true;
  stopping_ = true;
  {
    std::lock_guard<std::mutex> stand_in_lock(stand_in_mu_);
    stand_in_cv_.notify_all();
  }
  if (acceptor_) {
    boost::system::error_code ignored;
    acceptor_->close(ignored);
  }
  if (!path_.empty()) {
    ::unlink(path_.c_str());
  }
  for (const auto& entry : sessions_) {
    const std::shared_ptr<Session>& session = entry.second;
    asio::post(session->executor(), [session] { session->Drain(); });
  }
  // Whatever has not finished within the I/O timeout is cut off.
  stop_timer_ = std::make_unique<asio::steady_timer>(io_);
  stop_timer_->expires_after(
      std::chrono::seconds(settings_.Get()->limits.io_timeout_seconds));
  stop_timer_->async_wait([this](const boost::system::error_code& ec) {
    if (ec) {
      return;
    }
    std::lock_guard<std::mutex> relock(mu_);
    for (const auto& entry : sessions_) {
      const std::shared_ptr<Session>& session = entry.second;
      asio::post(session->executor(),
                 [session] { session->Close("daemon shutting down"); });
    }
  });
  if (sessions_.empty()) {
    stop_timer_->cancel();
  }
}

}  // namespace keyhold::daemon
