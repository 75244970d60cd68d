#include "common/client/client.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "common/cpu_hint.h"
#include "common/frame.h"
#include "common/peer_cred.h"

namespace keyhold::client {
namespace {

using Clock = std::chrono::steady_clock;

std::string Errno(const char* what) {
  return std::string(what) + ": " + std::strerror(errno);
}

// Milliseconds left until deadline, at least 0, for poll().
int MillisLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - Clock::now());
  if (left.count() <= 0) {
    return 0;
  }
  return left.count() > INT32_MAX ? INT32_MAX : static_cast<int>(left.count());
}

// Waits until fd is ready for `events` or the deadline passes.
Status WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    struct pollfd p {
      fd, events, 0
    };
    const int rc = poll(&p, 1, MillisLeft(deadline));
    if (rc > 0) {
      return Status::Ok();
    }
    if (rc == 0) {
      return DeadlineExceeded("no answer from keyholdd in time");
    }
    if (errno != EINTR) {
      return Unavailable(Errno("poll"));
    }
  }
}

// A connection failure that a fresh connection may fix (the daemon restarted,
// or closed an idle connection).
bool IsRetryable(const Status& s) { return s.code() == Code::kUnavailable; }

// Operations that change nothing, so running one twice is harmless.
bool IsRepeatable(v1::Request::OpCase op) {
  switch (op) {
    case v1::Request::kHello:
    case v1::Request::kPing:
    case v1::Request::kGetPublicKey:
    case v1::Request::kListKeys:
    case v1::Request::kSign:
    case v1::Request::kDecrypt:
    case v1::Request::kDerive:
    case v1::Request::kListClients:
      return true;
    default:
      return false;
  }
}

class Connection {
 public:
  Connection(int fd, int cpu) : fd_(fd), cpu_(cpu) {}
  ~Connection() {
    if (fd_ >= 0) {
      close(fd_);
    }
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  int fd() const { return fd_; }
  // The CPU this connection was made for (its hint to the daemon); -1: none.
  int cpu() const { return cpu_; }

  Status WriteAll(const std::string& bytes, Clock::time_point deadline) {
    std::size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = send(fd_, bytes.data() + done, bytes.size() - done,
                             MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) {
        continue;
      }
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        KH_RETURN_IF_ERROR(WaitFor(fd_, POLLOUT, deadline));
        continue;
      }
      return Unavailable(Errno("send to keyholdd"));
    }
    return Status::Ok();
  }

  // Reads at least one byte, at most len. Waits first: right after a request
  // the answer is never there yet, so a recv would only fail with EAGAIN.
  StatusOr<std::size_t> ReadSome(uint8_t* out, std::size_t len,
                                 Clock::time_point deadline) {
    for (;;) {
      KH_RETURN_IF_ERROR(WaitFor(fd_, POLLIN, deadline));
      const ssize_t n = recv(fd_, out, len, MSG_DONTWAIT);
      if (n > 0) {
        return static_cast<std::size_t>(n);
      }
      if (n == 0) {
        return Unavailable("keyholdd closed the connection");
      }
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) {
        continue;
      }
      return Unavailable(Errno("receive from keyholdd"));
    }
  }

  Status ReadAll(uint8_t* out, std::size_t len, Clock::time_point deadline) {
    std::size_t done = 0;
    while (done < len) {
      const ssize_t n = recv(fd_, out + done, len - done, MSG_DONTWAIT);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n == 0) {
        return Unavailable("keyholdd closed the connection");
      }
      if (errno == EINTR) {
        continue;
      }
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        KH_RETURN_IF_ERROR(WaitFor(fd_, POLLIN, deadline));
        continue;
      }
      return Unavailable(Errno("receive from keyholdd"));
    }
    return Status::Ok();
  }

 private:
  int fd_;
  int cpu_;
};

// The CPU the calling thread runs on, or -1.
int CurrentCpu() {
  const int cpu = sched_getcpu();
  return cpu < 0 ? -1 : cpu;
}

// Binds fd to the abstract address that tells the daemon which CPU this
// connection is for (common/cpu_hint.h). Best effort: without it the daemon
// serves the connection from its shared threads.
void BindCpuHint(int fd, int cpu) {
  static std::atomic<uint64_t> counter{0};
  if (cpu < 0) {
    return;
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    // Random, so the name (listed in /proc/net/unix) says nothing about
    // the process; a counter and the clock if the kernel has no entropy yet.
    uint64_t id = 0;
    if (getrandom(&id, sizeof(id), GRND_NONBLOCK) != sizeof(id)) {
      id = (counter.fetch_add(1, std::memory_order_relaxed) << 32) ^
           static_cast<uint64_t>(
               std::chrono::steady_clock::now().time_since_epoch().count());
    }
    const std::string name = CpuHintAddress(cpu, id);
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    if (name.size() > sizeof(addr.sun_path)) {
      return;
    }
    std::memcpy(addr.sun_path, name.data(), name.size());
    const auto len = static_cast<socklen_t>(
        offsetof(struct sockaddr_un, sun_path) + name.size());
    if (bind(fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0 ||
        errno != EADDRINUSE) {
      return;
    }
  }
}

}  // namespace

Options OptionsFromEnvironment() {
  Options o;
  if (const char* s = std::getenv("KEYHOLD_SOCKET"); s != nullptr && *s) {
    o.socket_path = s;
  }
  if (const char* s = std::getenv("KEYHOLD_DAEMON_UID"); s != nullptr && *s) {
    char* end = nullptr;
    const unsigned long v = std::strtoul(s, &end, 10);
    if (end != nullptr && *end == '\0') {
      o.expected_daemon_uid = static_cast<uid_t>(v);
    }
  }
  if (const char* s = std::getenv("KEYHOLD_TIMEOUT_MS"); s != nullptr && *s) {
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    if (end != nullptr && *end == '\0' && v > 0) {
      o.call_timeout = std::chrono::milliseconds(v);
    }
  }
  return o;
}

struct Client::Impl {
  explicit Impl(Options o) : options(std::move(o)) {
    if (options.socket_path.empty()) {
      options.socket_path = OptionsFromEnvironment().socket_path;
    }
    if (options.socket_path.empty()) {
      options.socket_path = kDefaultSocketPath;
    }
    if (!options.expected_daemon_uid) {
      options.expected_daemon_uid =
          OptionsFromEnvironment().expected_daemon_uid;
    }
  }

  // A new connection, made for (and hinting) cpu.
  StatusOr<std::unique_ptr<Connection>> Connect(int cpu);
  // *sent tells whether the whole request reached the socket.
  StatusOr<v1::Response> RoundTrip(Connection& conn, const std::string& frame,
                                   uint64_t id, bool* sent);
  // An idle connection made for cpu, if any.
  std::unique_ptr<Connection> TakeIdle(int cpu, bool* reused);
  void ReturnIdle(std::unique_ptr<Connection> conn);

  Options options;
  std::atomic<uint64_t> next_id{1};

  // Guards idle and owner_pid; also taken around fork() (see below).
  std::mutex mu;
  std::vector<std::unique_ptr<Connection>> idle;
  pid_t owner_pid = getpid();
};

// fork() safety: a child must never reuse the parent's connections (both
// would read each other's responses), and must not inherit a locked mutex.
// pthread_atfork handlers lock every client's pool around fork(), and in the
// child drop the inherited connections (closing our copies of the fds does
// not affect the parent's).
namespace {
// Never destroyed on purpose: fork handlers may run during exit.
std::mutex& RegistryMutex() {
  static auto* mu = new std::mutex;  // NOLINT(cppcoreguidelines-owning-memory)
  return *mu;
}
std::set<Client::Impl*>& Registry() {
  // NOLINTNEXTLINE(cppcoreguidelines-owning-memory)
  static auto* set = new std::set<Client::Impl*>;
  return *set;
}
}  // namespace

namespace {
void AtForkPrepare() {
  RegistryMutex().lock();
  for (auto* impl : Registry()) {
    impl->mu.lock();
  }
}
void AtForkParent() {
  for (auto* impl : Registry()) {
    impl->mu.unlock();
  }
  RegistryMutex().unlock();
}
void AtForkChild() {
  for (auto* impl : Registry()) {
    impl->idle.clear();
    impl->owner_pid = getpid();
    impl->mu.unlock();
  }
  RegistryMutex().unlock();
}
void RegisterAtFork() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork(AtForkPrepare, AtForkParent, AtForkChild);
  });
}
}  // namespace

StatusOr<std::unique_ptr<Connection>> Client::Impl::Connect(int cpu) {
  const std::string& path = options.socket_path;
  struct sockaddr_un addr {};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return InvalidArgument("socket path too long: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);

  const auto deadline = Clock::now() + options.connect_timeout;
  std::unique_ptr<Connection> conn;
  for (auto backoff = std::chrono::milliseconds(1);;) {
    const int fd =
        socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      return Unavailable(Errno("socket"));
    }
    conn = std::make_unique<Connection>(fd, cpu);
    BindCpuHint(fd, cpu);
    int rc;
    do {
      rc = connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
    } while (rc != 0 && errno == EINTR);
    if (rc == 0) {
      break;
    }
    // A Unix socket says EAGAIN when the daemon's listen backlog is full;
    // nothing was connected, so try again (a fresh socket) until the deadline.
    if (errno != EAGAIN || Clock::now() + backoff > deadline) {
      return Unavailable("cannot connect to keyholdd at " + path + ": " +
                         std::strerror(errno));
    }
    std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, std::chrono::milliseconds(50));
  }

  // Check who is listening before sending a single byte.
  auto peer = GetPeerCred(conn->fd(), /*with_groups=*/false);
  if (!peer.ok()) {
    return Unavailable(peer.status().message());
  }
  if (peer->uid == static_cast<uid_t>(-1)) {
    return Unavailable("connection to keyholdd not established");
  }
  uid_t expected = 0;
  // Under socket activation systemd (root) called listen(), and a connection
  // queued before keyholdd took the socket over (the one that starts it)
  // reports systemd's credentials. Root can plant any socket anyway, so a
  // root peer proves as much; only an explicit expected uid excludes it.
  bool root_peer_ok = false;
  if (options.expected_daemon_uid) {
    expected = *options.expected_daemon_uid;
  } else {
    // The default expectation is the socket file's owner. That only means
    // something if nobody else could have put a socket there: the directory
    // must belong to that uid (or root) and be writable by no one else.
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
      return Unavailable(Errno(("stat " + path).c_str()));
    }
    expected = st.st_uid;
    root_peer_ok = true;
    const std::string dir =
        path.find('/') == std::string::npos
            ? "."
            : (path.rfind('/') == 0 ? "/" : path.substr(0, path.rfind('/')));
    struct stat dst {};
    if (stat(dir.c_str(), &dst) != 0) {
      return Unavailable(Errno(("stat " + dir).c_str()));
    }
    if ((dst.st_uid != expected && dst.st_uid != 0) ||
        (dst.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
      return PermissionDenied(
          "refusing to talk to " + path + ": its directory " + dir +
          " can be written by other users, so the socket's owner proves "
          "nothing; set KEYHOLD_DAEMON_UID or move the socket");
    }
  }
  if (peer->uid != expected && !(root_peer_ok && peer->uid == 0)) {
    return PermissionDenied("refusing to talk to " + path +
                            ": its peer runs as uid " +
                            std::to_string(peer->uid) +
                            ", expected keyholdd's uid " +
                            std::to_string(expected));
  }
  return conn;
}

StatusOr<v1::Response> Client::Impl::RoundTrip(Connection& conn,
                                               const std::string& frame,
                                               uint64_t id, bool* sent) {
  const auto deadline = Clock::now() + options.call_timeout;
  *sent = false;
  KH_RETURN_IF_ERROR(conn.WriteAll(frame, deadline));
  *sent = true;
  // Only one request is in flight per pooled connection, so the next
  // response is ours; the id check guards against a confused stream.
  // One read usually brings the whole response. The buffer is wiped when
  // freed: a response may carry a plaintext or a shared secret.
  SecretBytes buffer(4096);
  uint8_t* data = buffer.data(SecretAccess::kToken);
  std::size_t have = 0;
  while (have < kFrameHeaderBytes) {
    auto n = conn.ReadSome(data + have, buffer.size() - have, deadline);
    if (!n.ok()) {
      return n.status();
    }
    have += *n;
  }
  auto length = DecodeFrameHeader(
      std::span<const uint8_t>(data, kFrameHeaderBytes), kMaxResponseFrameBytes);
  if (!length.ok()) {
    return Internal("bad response frame from keyholdd: " +
                    length.status().message());
  }
  const std::size_t total = kFrameHeaderBytes + *length;
  if (have > total) {
    // Only one request is in flight per connection; extra bytes mean the
    // stream is confused, and the caller drops this connection.
    return Internal("unexpected data from keyholdd");
  }
  if (buffer.size() < total) {
    buffer.resize(total);
    data = buffer.data(SecretAccess::kToken);
  }
  if (have < total) {
    KH_RETURN_IF_ERROR(conn.ReadAll(data + have, total - have, deadline));
  }
  v1::Response response;
  KH_RETURN_IF_ERROR(DecodeResponse(
      std::span<const uint8_t>(data + kFrameHeaderBytes, *length), &response));
  if (response.id() != id) {
    // The daemon answers a frame it could not read with id 0 and closes.
    if (response.id() == 0 && response.code() != v1::OK) {
      return Status(CodeFromWire(response.code()), response.message());
    }
    return Internal("response id mismatch from keyholdd");
  }
  return response;
}

std::unique_ptr<Connection> Client::Impl::TakeIdle(int cpu, bool* reused) {
  std::lock_guard<std::mutex> lock(mu);
  if (owner_pid != getpid()) {  // belt and braces next to pthread_atfork
    idle.clear();
    owner_pid = getpid();
  }
  *reused = false;
  // The most recently used connection made for this CPU: the daemon serves
  // it on this CPU. One made for another CPU would wake a daemon thread
  // there; a new connection costs less than that after a few calls.
  for (auto it = idle.rbegin(); it != idle.rend(); ++it) {
    if ((*it)->cpu() == cpu) {
      auto conn = std::move(*it);
      idle.erase(std::next(it).base());
      *reused = true;
      return conn;
    }
  }
  return nullptr;
}

void Client::Impl::ReturnIdle(std::unique_ptr<Connection> conn) {
  std::lock_guard<std::mutex> lock(mu);
  if (owner_pid != getpid() || options.max_idle_connections == 0) {
    return;
  }
  if (idle.size() >= options.max_idle_connections) {
    idle.erase(idle.begin());  // the least recently used one goes
  }
  idle.push_back(std::move(conn));
}

Client::Client(Options options)
    : impl_(std::make_unique<Impl>(std::move(options))) {
  RegisterAtFork();
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry().insert(impl_.get());
}

Client::~Client() {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry().erase(impl_.get());
}

const Options& Client::options() const { return impl_->options; }

StatusOr<v1::Response> Client::Call(v1::Request request) {
  const uint64_t id = impl_->next_id.fetch_add(1, std::memory_order_relaxed);
  request.set_id(id);
  auto frame = EncodeFrame(request, kMaxResponseFrameBytes);
  if (request.has_import_key()) {
    CleanseString(*request.mutable_import_key()->mutable_private_key());
  }
  if (!frame.ok()) {
    return frame.status();
  }
  // Wipe the serialized request on every path: it may carry a private key
  // (ImportKey) or a plaintext.
  struct Wipe {
    std::string& s;
    ~Wipe() { CleanseString(s); }
  } wipe{*frame};

  bool reused = false;
  const int cpu = CurrentCpu();
  std::unique_ptr<Connection> conn = impl_->TakeIdle(cpu, &reused);
  for (int attempt = 0;; ++attempt) {
    if (!conn) {
      auto fresh = impl_->Connect(cpu);
      if (!fresh.ok()) {
        return fresh.status();
      }
      conn = std::move(*fresh);
      reused = false;
    }
    bool sent = false;
    auto response = impl_->RoundTrip(*conn, *frame, id, &sent);
    if (!response.ok()) {
      conn.reset();
      // A pooled connection may have died with a daemon restart or idle
      // timeout; one retry on a fresh connection covers that. A request that
      // was sent may have run, so only a repeatable one is sent again.
      if (reused && attempt == 0 && IsRetryable(response.status()) &&
          (!sent || IsRepeatable(request.op_case()))) {
        continue;
      }
      return response.status();
    }
    impl_->ReturnIdle(std::move(conn));
    if (response->code() != v1::OK) {
      return Status(CodeFromWire(response->code()), response->message());
    }
    return response;
  }
}

StatusOr<v1::HelloResponse> Client::Hello() {
  v1::Request req;
  req.mutable_hello()->set_version(kProtocolVersion);
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->hello();
}

Status Client::Ping() {
  v1::Request req;
  req.mutable_ping();
  auto r = Call(std::move(req));
  return r.ok() ? Status::Ok() : r.status();
}

StatusOr<v1::GenerateKeyResponse> Client::GenerateKey(
    const v1::KeyRef& key, v1::KeyType type, const std::string& backend) {
  v1::Request req;
  auto* op = req.mutable_generate_key();
  *op->mutable_key() = key;
  op->set_type(type);
  op->set_backend(backend);
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->generate_key();
}

StatusOr<v1::ImportKeyResponse> Client::ImportKey(const v1::KeyRef& key,
                                                  const SecretBytes& private_key,
                                                  const std::string& backend) {
  v1::Request req;
  auto* op = req.mutable_import_key();
  *op->mutable_key() = key;
  const auto bytes = private_key.Expose(SecretAccess::kToken);
  op->mutable_private_key()->assign(reinterpret_cast<const char*>(bytes.data()),
                                    bytes.size());
  op->set_backend(backend);
  auto r = Call(std::move(req));  // Call() wipes the key bytes
  if (!r.ok()) {
    return r.status();
  }
  return r->import_key();
}

StatusOr<v1::GetPublicKeyResponse> Client::GetPublicKey(const v1::KeyRef& key) {
  v1::Request req;
  *req.mutable_get_public_key()->mutable_key() = key;
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->get_public_key();
}

StatusOr<v1::ListKeysResponse> Client::ListKeys(bool include_shared) {
  v1::Request req;
  req.mutable_list_keys()->set_include_shared(include_shared);
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->list_keys();
}

Status Client::DestroyKey(const v1::KeyRef& key) {
  v1::Request req;
  *req.mutable_destroy_key()->mutable_key() = key;
  auto r = Call(std::move(req));
  return r.ok() ? Status::Ok() : r.status();
}

StatusOr<v1::KeyInfo> Client::SetCertificate(const v1::KeyRef& key,
                                             const std::string& der) {
  v1::Request req;
  *req.mutable_set_certificate()->mutable_key() = key;
  req.mutable_set_certificate()->set_certificate(der);
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->set_certificate().info();
}

StatusOr<v1::AuditResponse> Client::Audit(const v1::AuditRequest& request) {
  v1::Request req;
  *req.mutable_audit() = request;
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return std::move(*r->mutable_audit());
}

StatusOr<v1::StatsResponse> Client::Stats() {
  v1::Request req;
  req.mutable_stats();
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return std::move(*r->mutable_stats());
}

StatusOr<std::string> Client::Sign(const v1::SignRequest& request) {
  v1::Request req;
  *req.mutable_sign() = request;
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return std::move(*r->mutable_sign()->mutable_signature());
}

StatusOr<SecretBytes> Client::Decrypt(const v1::DecryptRequest& request) {
  v1::Request req;
  *req.mutable_decrypt() = request;
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return SecretBytes::TakeFrom(*r->mutable_decrypt()->mutable_plaintext());
}

StatusOr<SecretBytes> Client::Derive(const v1::KeyRef& key,
                                     std::span<const uint8_t> peer_public_key) {
  v1::Request req;
  auto* op = req.mutable_derive();
  *op->mutable_key() = key;
  op->set_peer_public_key(
      std::string(reinterpret_cast<const char*>(peer_public_key.data()),
                  peer_public_key.size()));
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return SecretBytes::TakeFrom(*r->mutable_derive()->mutable_shared_secret());
}

Status Client::GrantUse(const v1::KeyRef& key, const v1::Grant& grantee) {
  v1::Request req;
  *req.mutable_grant_use()->mutable_key() = key;
  *req.mutable_grant_use()->mutable_grantee() = grantee;
  auto r = Call(std::move(req));
  return r.ok() ? Status::Ok() : r.status();
}

Status Client::RevokeUse(const v1::KeyRef& key, const v1::Grant& grantee) {
  v1::Request req;
  *req.mutable_revoke_use()->mutable_key() = key;
  *req.mutable_revoke_use()->mutable_grantee() = grantee;
  auto r = Call(std::move(req));
  return r.ok() ? Status::Ok() : r.status();
}

StatusOr<v1::ListClientsResponse> Client::ListClients() {
  v1::Request req;
  req.mutable_list_clients();
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->list_clients();
}

StatusOr<uint32_t> Client::DeleteClient(uint32_t uid) {
  v1::Request req;
  req.mutable_delete_client()->set_uid(uid);
  auto r = Call(std::move(req));
  if (!r.ok()) {
    return r.status();
  }
  return r->delete_client().keys_deleted();
}

v1::KeyRef MakeKeyRef(const std::string& name, std::optional<uint32_t> owner) {
  v1::KeyRef ref;
  ref.set_name(name);
  if (owner) {
    ref.set_owner(*owner);
  }
  return ref;
}

}  // namespace keyhold::client
