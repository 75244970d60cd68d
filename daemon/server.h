// The listener and its sessions.
//
// Threads: keyholdd runs one io_context on one thread per core (the Server
// also accepts several contexts, handing connections out in turn, but that
// was measured slower: with a connection pinned to one thread, a client on
// the other core pays a cross-CPU wakeup per request, and one-thread
// ec-p256 signing went from ~87 to ~125 us p50 on the 2-core VM; see
// bench/RESULTS.md). Each connection's handlers are serialized on its own
// strand. A request whose cost is bounded CPU (a software-backend signature,
// a ping) is answered inline on the I/O thread that read it, which saves a
// thread hop per operation; anything that may wait (key generation, key
// store writes, device backends) goes to the blocking pool, so I/O never
// waits on it. One exception: a TPM or HSM key use (sign, decrypt, derive,
// public key; key record cached) is run by the I/O thread that read it when
// the pool is idle and another I/O thread is free (TryRunHere). Handing it
// to the pool and back costs two thread wake-ups per operation (see
// bench/RESULTS.md); the free I/O thread keeps everyone else served even if
// the device hangs. Key generation and store writes always go to the pool.
// Responses are written in whatever order they finish (several requests may
// be in flight per connection, up to limits.max_in_flight_per_connection;
// past that the session stops reading until one completes), each first with
// a direct non-blocking send() and only what does not fit by async_write.
//
// Clients confined to one CPU (nginx with worker_cpu_affinity) are the
// exception to the shared context: each is served by an I/O thread pinned
// to its CPU (SetCpuLocalContexts), so a request and its answer change hands
// on one CPU.
//
// The caller's identity is read from the kernel (SO_PEERCRED, SO_PEERGROUPS)
// once, at accept, and never taken from a request.
#ifndef KEYHOLD_DAEMON_SERVER_H_
#define KEYHOLD_DAEMON_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "daemon/client_registry.h"
#include "daemon/config.h"
#include "daemon/dispatcher.h"
#include "daemon/fair_queue.h"
#include "daemon/live_settings.h"

namespace keyhold::daemon {

class Session;
using Clock = std::chrono::steady_clock;

class Server {
 public:
  // io: at least one context; io[0] accepts. io_threads: how many threads
  // run them in all. blocking_threads: the thread count of `blocking`,
  // shared fairly between uids (FairQueue).
  Server(std::vector<boost::asio::io_context*> io, unsigned io_threads,
         boost::asio::thread_pool& blocking, unsigned blocking_threads,
         Dispatcher& dispatcher, ClientRegistry& clients,
         const LiveSettings& settings);
  ~Server();

  // Binds the socket at path (mode 0666; the directory is created 0755 if
  // missing). A stale socket file is replaced; a live one (another daemon
  // answers) is an error.
  Status Listen(const std::string& path);
  // Takes a listening Unix stream socket handed over by systemd (socket
  // activation). The socket file is systemd's: Stop() leaves it in place.
  Status Adopt(int fd);
  // Contexts each run by one thread pinned to one CPU (CPU number ->
  // context), set before Start(). A connection is served by the thread
  // pinned to its client's CPU: the CPU the client process is confined to
  // (sched_getaffinity of its pid, e.g. nginx workers with
  // worker_cpu_affinity), else the CPU the client library made the
  // connection on (it keeps one per CPU and names the CPU in its socket
  // address, common/cpu_hint.h). A request and the daemon's work on it then
  // change hands on one CPU. Across CPUs each request costs a wake-up of an
  // idle CPU on both sides, which on the test VM was most of keyhold's CPU
  // cost per signature (bench/RESULTS.md). Connections without either
  // (other client code) are served by the shared I/O threads.
  void SetCpuLocalContexts(std::map<int, boost::asio::io_context*> contexts);
  // Starts accepting; runs on the io_context.
  void Start();
  // Stops accepting, closes every session, removes the socket file.
  void Stop();

  // Called by sessions.
  void Forget(Session* session);
  FairQueue& blocking_queue() { return blocking_queue_; }
  // An I/O thread about to run a device key use itself asks here first: yes
  // if a blocking-pool slot is free with nobody waiting for one (the work
  // takes that slot, so the pool's limit and the uids' turns hold) and at
  // least one other I/O thread is not running such work. A hung device can
  // therefore hold at most io_threads - 1 I/O threads; with one I/O thread
  // the answer is always no. A yes is paired with DoneRunningHere().
  bool TryRunHere();
  void DoneRunningHere();
  // The same for a session on the CPU-local context of cpu: yes if no other
  // device key use runs on that context and a pool slot is free. Its one
  // pinned thread then runs it; should that take long (a hung device), that
  // context's stand-in thread serves its other connections meanwhile.
  bool TryRunHereLocal(int cpu);
  void DoneRunningHereLocal(int cpu);
  // Body of the stand-in thread of cpu's CPU-local context (one per
  // context; returns when the server stops): every 100 ms it looks whether
  // a device key use has held the context's pinned thread for over 100 ms,
  // and if so runs the context's other handlers until it returns.
  void RunCpuLocalStandIn(int cpu);
  const LiveSettings& settings() const { return settings_; }
  bool stopping() const { return stopping_.load(); }

 private:
  void Accept();  // with mu_ held
  // Re-homes *socket on the CPU-local context of the client's CPU: the one
  // process pid is confined to, else the one its connection names
  // (common/cpu_hint.h), if that CPU has a context. Returns the CPU, or -1
  // (the socket stays on the shared context). With mu_ held.
  int MoveToClientCpu(pid_t pid,
                      boost::asio::local::stream_protocol::socket* socket);

  boost::asio::io_context& io_;  // io_contexts_[0]
  std::vector<boost::asio::io_context*> io_contexts_;
  std::size_t next_context_ = 0;  // guarded by mu_
  const unsigned io_threads_;
  std::atomic<unsigned> io_threads_running_jobs_{0};
  FairQueue blocking_queue_;
  std::atomic<bool> stopping_{false};
  Dispatcher& dispatcher_;
  ClientRegistry& clients_;
  const LiveSettings& settings_;  // limits; re-read at accept and each second
  std::string path_;
  std::unique_ptr<boost::asio::local::stream_protocol::acceptor> acceptor_;
  std::mutex mu_;  // guards everything below
  std::map<Session*, std::shared_ptr<Session>> sessions_;
  std::map<int, boost::asio::io_context*> cpu_contexts_;
  // Per CPU-local context: since when (steady clock, ns) a device key use
  // runs on its pinned thread; 0: none. Created by SetCpuLocalContexts,
  // never changed after Start().
  std::map<int, std::unique_ptr<std::atomic<int64_t>>> device_use_since_;
  std::mutex stand_in_mu_;
  std::condition_variable stand_in_cv_;  // notified by Stop()
  std::map<uint32_t, uint32_t> sessions_per_uid_;
  // Each uid's requests on the blocking pool, shared by its sessions.
  std::map<uint32_t, std::shared_ptr<std::atomic<uint32_t>>> pool_use_per_uid_;
  // Refusals are logged at most once a second: a client that reconnects in
  // a loop must not turn each refused connection into a log line.
  Clock::time_point last_refusal_log_{};
  uint64_t refusals_since_log_ = 0;
  void LogRefusal(const std::string& why);  // with mu_ held
  std::unique_ptr<boost::asio::steady_timer> stop_timer_;
  bool stopped_ = false;
};

// The CPU a process may run on, if its affinity allows exactly one.
std::optional<int> SoleCpuOf(pid_t pid);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_SERVER_H_
