// keyholdd: the composition root. Reads the config, hardens the process,
// builds the object graph (key store, backends, dispatcher, server) and runs
// until SIGTERM or SIGINT; SIGHUP reloads the config. Under systemd it takes
// its socket from socket activation and reports READY/RELOADING/STOPPING
// (sd_notify; both are no-ops elsewhere). The only file that names concrete
// backends.
#include <sched.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/thread_pool.hpp>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "daemon/audit_log.h"
#include "daemon/backends/pkcs11/p11_backend.h"
#include "daemon/backends/software/software_backend.h"
#include "daemon/backends/tpm/tpm_backend.h"
#include "daemon/config.h"
#include "daemon/dispatcher.h"
#include "daemon/keystore/key_store.h"
#include "daemon/live_settings.h"
#include "daemon/master_key.h"
#include "daemon/server.h"

namespace {

namespace fs = std::filesystem;
using keyhold::Status;
using keyhold::backend::Backend;

constexpr char kDefaultConfigPath[] = "/etc/keyhold/keyholdd.toml";

// Secrets must not end up in core files or be readable through ptrace by
// other processes of the same uid.
void HardenProcess() {
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  struct rlimit none {
    0, 0
  };
  setrlimit(RLIMIT_CORE, &none);
  umask(077);
  std::signal(SIGPIPE, SIG_IGN);
}

Status PrepareStateDir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec) {
      return keyhold::Internal("cannot create state directory " + dir + ": " +
                               ec.message());
    }
    ::chmod(dir.c_str(), 0700);
  }
  struct stat st {};
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return keyhold::Internal("state directory " + dir + " is not a directory");
  }
  if (st.st_uid != geteuid()) {
    return keyhold::Internal("state directory " + dir +
                             " is not owned by the daemon's uid " +
                             std::to_string(geteuid()));
  }
  if ((st.st_mode & 0077) != 0) {
    return keyhold::Internal(
        "state directory " + dir + " is accessible to other users (mode " +
        std::to_string(st.st_mode & 0777) + " octal-decimal); chmod 700 it");
  }
  return Status::Ok();
}

// What keyholdd was started with and what a reload may change.
struct StartOptions {
  std::string config_path;  // "" when running on built-in defaults
  std::string socket_path;  // command-line overrides, "" if not given
  std::string state_dir;
  std::string log_level;
};

void ApplyOverrides(const StartOptions& opts, keyhold::daemon::Config* c) {
  if (!opts.socket_path.empty()) {
    c->socket_path = opts.socket_path;
  }
  if (!opts.state_dir.empty()) {
    c->state_dir = opts.state_dir;
  }
  if (!opts.log_level.empty()) {
    c->log_level = opts.log_level;
  }
}

// The settings a reload cannot change, by name, where next differs from the
// running config.
std::vector<std::string> NeedRestart(const keyhold::daemon::Config& running,
                                     const keyhold::daemon::Config& next) {
  std::vector<std::string> changed;
  if (next.socket_path != running.socket_path) changed.push_back("socket");
  if (next.state_dir != running.state_dir) changed.push_back("state_dir");
  if (next.worker_threads != running.worker_threads) {
    changed.push_back("worker_threads");
  }
  if (next.blocking_threads != running.blocking_threads) {
    changed.push_back("blocking_threads");
  }
  if (next.default_backend != running.default_backend) {
    changed.push_back("default_backend");
  }
  if (next.master_key_sealed_by != running.master_key_sealed_by) {
    changed.push_back("master_key_sealed_by");
  }
  if (next.cpu_local_sessions != running.cpu_local_sessions) {
    changed.push_back("cpu_local_sessions");
  }
  const auto same_backend = [](const keyhold::daemon::BackendSection& a,
                               const keyhold::daemon::BackendSection& b) {
    return a.kind == b.kind && a.name == b.name && a.settings == b.settings;
  };
  if (!std::equal(next.backends.begin(), next.backends.end(),
                  running.backends.begin(), running.backends.end(),
                  same_backend)) {
    changed.push_back("backend");
  }
  return changed;
}

void NotifySystemd(const std::string& state) {
  sd_notify(/*unset_environment=*/0, state.c_str());
}

// SIGHUP: re-reads the config file and applies what can change while
// connections stay open (limits, admins, log level, inline_crypto,
// audit_key_use, audit log rotation). A file that does not load or validate
// changes nothing; settings that need a restart keep their running values, with
// a warning. Recorded in the audit log either way.
void Reload(const StartOptions& opts, keyhold::daemon::Config* running,
            keyhold::daemon::LiveSettings* live,
            keyhold::daemon::AuditLog* audit) {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  NotifySystemd("RELOADING=1\nMONOTONIC_USEC=" +
                std::to_string(static_cast<uint64_t>(now.tv_sec) * 1000000 +
                               static_cast<uint64_t>(now.tv_nsec) / 1000));
  // Started on built-in defaults: the default file may have been written
  // since.
  std::string path = opts.config_path;
  if (path.empty() && fs::exists(kDefaultConfigPath)) {
    path = kDefaultConfigPath;
  }
  Status result = Status::Ok();
  if (path.empty()) {
    result = keyhold::InvalidArgument(std::string("SIGHUP: no config file (") +
                                      kDefaultConfigPath +
                                      " does not exist); nothing to reload");
  } else if (auto next = keyhold::daemon::LoadConfigFile(path); !next.ok()) {
    result = next.status();
  } else {
    ApplyOverrides(opts, &*next);
    for (const std::string& name : NeedRestart(*running, *next)) {
      spdlog::warn(
          "reload: '{}' changed in {}; it takes effect after a restart "
          "(the running value stays)",
          name, path);
    }
    running->limits = next->limits;
    running->admin_uids = next->admin_uids;
    running->log_level = next->log_level;
    running->inline_crypto = next->inline_crypto;
    running->audit_key_use = next->audit_key_use;
    running->audit_key_use_per_minute = next->audit_key_use_per_minute;
    running->audit_rotate_mb = next->audit_rotate_mb;
    running->audit_keep_files = next->audit_keep_files;
    if (audit != nullptr) {
      audit->SetRotation(uint64_t{running->audit_rotate_mb} << 20,
                         running->audit_keep_files);
    }
    live->Set(keyhold::daemon::RuntimeSettings::From(*running));
    spdlog::set_level(spdlog::level::from_str(running->log_level));
  }
  if (result.ok()) {
    spdlog::info("reloaded {}", path);
  } else {
    spdlog::error("reload rejected, the running configuration stays: {}",
                  result.message());
  }
  if (audit != nullptr) {
    keyhold::daemon::AuditEvent event;
    event.uid = geteuid();
    event.pid = getpid();
    event.op = "reload-config";
    event.result =
        result.ok() ? "ok" : std::string(keyhold::CodeName(result.code()));
    event.detail = path;
    if (Status st = audit->Append(event); !st.ok()) {
      spdlog::error("audit log: {}", st.message());
    }
  }
  NotifySystemd("READY=1");
}

// Bounds the shutdown. A TPM or HSM call that never returns keeps its
// thread, and so the exit, waiting for as long as the device is silent
// (systemd would kill the daemon only after TimeoutStopSec). Once armed,
// this ends the process when the shutdown has not finished within the limit.
// Declared before everything the shutdown waits for (backends included,
// whose destructors may talk to the device), so its destructor runs last.
class ShutdownWatchdog {
 public:
  ShutdownWatchdog() = default;
  ShutdownWatchdog(const ShutdownWatchdog&) = delete;
  ShutdownWatchdog& operator=(const ShutdownWatchdog&) = delete;
  ~ShutdownWatchdog() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) {
      thread_.join();
    }
  }

  void Arm(std::chrono::seconds limit) {
    std::lock_guard lock(mu_);
    if (thread_.joinable() || done_) {
      return;
    }
    thread_ = std::thread([this, limit] {
      std::unique_lock waiting(mu_);
      if (cv_.wait_for(waiting, limit, [this] { return done_; })) {
        return;
      }
      // What the shutdown waits for: the calls the backends report (they
      // answer without touching the device), or their destructors.
      const std::string calls = devices_ == nullptr ? "" : CallsOf(*devices_);
      spdlog::critical(
          "shutdown has not finished after {} s: {}; exiting without "
          "waiting for it",
          limit.count(),
          !calls.empty() ? "a TPM or HSM call has not returned (" + calls + ")"
          : devices_ == nullptr
              ? std::string("closing the backends")
              : std::string("no TPM or HSM call is in progress"));
      spdlog::default_logger()->flush();
      std::_Exit(1);
    });
  }

  // The device backends whose calls the message names; nullptr (before
  // they are destroyed) makes it say the backends are being closed.
  void Watch(const std::vector<std::unique_ptr<Backend>>* devices) {
    std::lock_guard lock(mu_);
    devices_ = devices;
  }

 private:
  static std::string CallsOf(
      const std::vector<std::unique_ptr<Backend>>& devices) {
    std::string out;
    for (const auto& device : devices) {
      const std::string calls = device->CallsInProgress();
      if (!calls.empty()) {
        out += (out.empty() ? "" : "; ") + calls;
      }
    }
    return out;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  const std::vector<std::unique_ptr<Backend>>* devices_ = nullptr;
  std::thread thread_;
};

// Points the watchdog at the device backends while they exist.
class WatchedDevices {
 public:
  WatchedDevices(ShutdownWatchdog* watchdog,
                 const std::vector<std::unique_ptr<Backend>>* devices)
      : watchdog_(watchdog) {
    watchdog_->Watch(devices);
  }
  WatchedDevices(const WatchedDevices&) = delete;
  WatchedDevices& operator=(const WatchedDevices&) = delete;
  ~WatchedDevices() { watchdog_->Watch(nullptr); }

 private:
  ShutdownWatchdog* watchdog_;
};

int Run(int argc, char** argv) {
  CLI::App app{"keyholdd: keeps private keys out of application processes"};
  StartOptions opts;
  app.add_option("--config", opts.config_path,
                 std::string("TOML config file (default: ") +
                     kDefaultConfigPath +
                     " if it exists, else built-in "
                     "defaults)");
  app.add_option("--socket", opts.socket_path,
                 "Unix socket path (overrides config; ignored when systemd "
                 "passes the socket)");
  app.add_option("--state-dir", opts.state_dir,
                 "directory for the key store and master key (overrides "
                 "config)");
  app.add_option("--log-level", opts.log_level,
                 "trace, debug, info, warn, error or off (overrides config)");
  app.set_version_flag("--version", KEYHOLD_VERSION);
  CLI11_PARSE(app, argc, argv);

  ShutdownWatchdog watchdog;
  HardenProcess();
  // The default logger is main's (start-up, config, reload, signals); the
  // other components log through their own (daemon/log.h). Every line names
  // its component in brackets.
  auto logger = spdlog::stderr_color_mt("main");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %v");

  keyhold::daemon::Config config;
  if (opts.config_path.empty() && fs::exists(kDefaultConfigPath)) {
    opts.config_path = kDefaultConfigPath;
  }
  if (!opts.config_path.empty()) {
    auto loaded = keyhold::daemon::LoadConfigFile(opts.config_path);
    if (!loaded.ok()) {
      spdlog::critical("config: {}", loaded.status().message());
      return 2;
    }
    config = std::move(*loaded);
  }
  ApplyOverrides(opts, &config);
  spdlog::set_level(spdlog::level::from_str(config.log_level));

  if (Status st = PrepareStateDir(config.state_dir); !st.ok()) {
    spdlog::critical("{}", st.message());
    return 1;
  }
  auto store =
      keyhold::daemon::KeyStore::Open(fs::path(config.state_dir) / "keys.db");
  if (!store.ok()) {
    spdlog::critical("key store: {}", store.status().message());
    return 1;
  }
  auto audit = keyhold::daemon::AuditLog::Open(config.state_dir);
  if (!audit.ok()) {
    spdlog::critical("audit log: {}", audit.status().message());
    return 1;
  }
  (*audit)->SetRotation(uint64_t{config.audit_rotate_mb} << 20,
                        config.audit_keep_files);
  keyhold::StatusOr<keyhold::SecretBytes> master_key =
      keyhold::daemon::LoadMasterKey(config);
  if (!master_key.ok()) {
    spdlog::critical("master key: {}", master_key.status().message());
    return 1;
  }
  auto software = keyhold::backend::software::SoftwareBackend::Create(
      "software", master_key->Clone());
  if (!software.ok()) {
    spdlog::critical("software backend: {}", software.status().message());
    return 1;
  }

  // Device backends from [[backend.KIND]] tables. Each kind's factory parses
  // its own settings; a backend that cannot be made (bad settings, a module
  // not allowed, a refused PIN) stops the daemon with a clear message (a key
  // store naming a missing backend is worse). A device that is merely not
  // there yet (no TPM answering, no token) still gets its backend, which
  // looks for the device at each request.
  std::vector<std::unique_ptr<keyhold::backend::Backend>> devices;
  const WatchedDevices watched(&watchdog, &devices);
  for (const keyhold::daemon::BackendSection& section : config.backends) {
    keyhold::StatusOr<std::unique_ptr<keyhold::backend::Backend>> made =
        keyhold::Unavailable("backend kind '" + section.kind +
                             "' is not available in this build");
    if (section.kind == "pkcs11") {
      made = keyhold::backend::pkcs11::CreateP11Backend(section.settings);
    } else if (section.kind == "tpm") {
      made = keyhold::backend::tpm::CreateTpmBackend(section.settings,
                                                     *master_key);
    }
    if (!made.ok()) {
      spdlog::critical("backend '{}': {}", section.name,
                       made.status().message());
      return 1;
    }
    devices.push_back(std::move(*made));
  }
  // Each backend keeps what it derived from the master key; main's copy goes.
  *master_key = keyhold::SecretBytes();
  // Each device backend learns which keys the store records, its own and
  // the other backends' (an HSM removes pending objects no row records,
  // reports lost ones).
  auto rows = (*store)->ListAll();
  if (!rows.ok()) {
    spdlog::critical("key store: {}", rows.status().message());
    return 1;
  }
  for (const auto& device : devices) {
    std::vector<keyhold::backend::KeyHandle> own;
    std::vector<keyhold::backend::KeyHandle> others;
    for (const keyhold::daemon::KeyRecord& row : *rows) {
      (row.backend == device->Name() ? own : others)
          .push_back({row.id, row.ref, row.type, row.blob});
    }
    if (Status st = device->Reconcile(own, others); !st.ok()) {
      spdlog::critical("backend '{}': reconciliation: {}", device->Name(),
                       st.message());
      return 1;
    }
  }

  keyhold::daemon::ClientRegistry clients;
  keyhold::daemon::OpContext ctx;
  ctx.store = store->get();
  ctx.backends[std::string((*software)->Name())] = software->get();
  for (const auto& device : devices) {
    ctx.backends[std::string(device->Name())] = device.get();
  }
  ctx.default_backend = config.default_backend;
  ctx.clients = &clients;
  ctx.settings.Set(keyhold::daemon::RuntimeSettings::From(config));
  ctx.audit = audit->get();
  keyhold::daemon::OpStats stats;
  ctx.stats = &stats;
  if (!ctx.backends.contains(ctx.default_backend)) {
    spdlog::critical("default_backend '{}' is not a configured backend",
                     ctx.default_backend);
    return 2;
  }
  keyhold::daemon::Dispatcher dispatcher(&ctx);

  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  // With a TPM or HSM backend an I/O thread may run a device key use itself
  // (server.h), so one more thread than cores keeps a core's worth of I/O
  // threads free while one of them waits on the device.
  const unsigned io_threads = config.worker_threads != 0
                                  ? config.worker_threads
                                  : cores + (devices.empty() ? 0u : 1u);
  // Device calls that may all hang at once (a module or TPM that stops
  // answering) must leave pool threads for key generation and store writes.
  unsigned device_calls = 0;
  for (const auto& device : devices) {
    device_calls += device->MaxBlockingCalls();
  }
  const unsigned blocking_threads = config.blocking_threads != 0
                                        ? config.blocking_threads
                                        : std::max(2u, cores) + device_calls;
  if (config.blocking_threads != 0 && config.blocking_threads <= device_calls) {
    spdlog::warn(
        "blocking_threads = {} is not more than the {} device calls that may "
        "block at once (HSM sessions, TPMs): a hung device could hold every "
        "thread; 0 sizes the pool for them",
        config.blocking_threads, device_calls);
  }
  // One io_context run by every I/O thread (see server.h for why not one
  // context per thread).
  boost::asio::io_context io(static_cast<int>(io_threads));
  std::vector<boost::asio::io_context*> all_io = {&io};
  boost::asio::thread_pool blocking(blocking_threads);
  keyhold::daemon::Server server(all_io, io_threads, blocking, blocking_threads,
                                 dispatcher, clients, ctx.settings);
  // One context per CPU the daemon may run on, each run by a thread pinned
  // there, serving the connections made on that CPU (server.h,
  // SetCpuLocalContexts). Pointless with one CPU.
  std::vector<std::unique_ptr<boost::asio::io_context>> cpu_io;
  std::map<int, boost::asio::io_context*> cpu_io_by_cpu;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (config.cpu_local_sessions &&
      ::sched_getaffinity(0, sizeof(allowed), &allowed) == 0 &&
      CPU_COUNT(&allowed) > 1) {
    for (std::size_t cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &allowed)) {
        cpu_io.push_back(std::make_unique<boost::asio::io_context>(2));
        cpu_io_by_cpu[static_cast<int>(cpu)] = cpu_io.back().get();
      }
    }
  }
  server.SetCpuLocalContexts(cpu_io_by_cpu);
  // Socket activation: systemd (or systemd-socket-activate) passes exactly
  // one listening socket in LISTEN_FDS; otherwise bind our own.
  const int passed = sd_listen_fds(/*unset_environment=*/1);
  std::string listening_on = config.socket_path;
  Status listened = Status::Ok();
  if (passed < 0) {
    listened = keyhold::Internal(std::string("socket activation: ") +
                                 std::strerror(-passed));
  } else if (passed > 1) {
    listened = keyhold::InvalidArgument(
        "socket activation passed " + std::to_string(passed) +
        " sockets; keyholdd takes exactly one (one ListenStream=)");
  } else if (passed == 1) {
    listened = server.Adopt(SD_LISTEN_FDS_START);
    listening_on = "the socket from systemd";
  } else {
    listened = server.Listen(config.socket_path);
  }
  if (!listened.ok()) {
    spdlog::critical("{}", listened.message());
    return 1;
  }

  boost::asio::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  std::function<void(const boost::system::error_code&, int)> on_signal;
  on_signal = [&](const boost::system::error_code& ec, int sig) {
    if (ec) {
      return;
    }
    if (sig == SIGHUP) {
      Reload(opts, &config, &ctx.settings, ctx.audit);
      signals.async_wait(on_signal);
      return;
    }
    spdlog::info("signal {}: shutting down", sig);
    NotifySystemd("STOPPING=1");
    // Sessions get io_timeout_seconds to finish (Server::Stop); a few
    // seconds more for the threads to wind down.
    watchdog.Arm(std::chrono::seconds(
        ctx.settings.Get()->limits.io_timeout_seconds + 5));
    server.Stop();
  };
  signals.async_wait(on_signal);

  server.Start();
  spdlog::info(
      "keyholdd {} listening on {} (state {}, {} I/O threads, {} CPU-local, "
      "{} blocking)",
      KEYHOLD_VERSION, listening_on, config.state_dir, io_threads,
      cpu_io.size(), blocking_threads);
  NotifySystemd("READY=1\nSTATUS=serving on " + listening_on);
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < io_threads; ++i) {
    threads.emplace_back([&io] { io.run(); });
  }
  // The CPU-local threads run until the shared context is done (the server
  // has stopped and its sessions are gone), idle or not.
  using WorkGuard =
      boost::asio::executor_work_guard<boost::asio::io_context::executor_type>;
  std::vector<WorkGuard> cpu_guards;
  std::vector<std::thread> cpu_threads;
  for (const auto& [cpu, context] : cpu_io_by_cpu) {
    cpu_guards.push_back(boost::asio::make_work_guard(*context));
    cpu_threads.emplace_back([cpu = cpu, context = context] {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(static_cast<std::size_t>(cpu), &one);
      if (::sched_setaffinity(0, sizeof(one), &one) != 0) {
        spdlog::warn("cannot pin an I/O thread to CPU {}: {}", cpu,
                     std::strerror(errno));
      }
      context->run();
    });
  }
  std::vector<std::thread> stand_ins;
  stand_ins.reserve(cpu_io_by_cpu.size());
  for (const auto& [cpu, context] : cpu_io_by_cpu) {
    stand_ins.emplace_back(
        [&server, cpu = cpu] { server.RunCpuLocalStandIn(cpu); });
  }
  io.run();
  for (auto& t : threads) {
    t.join();
  }
  for (auto& t : stand_ins) {
    t.join();
  }
  for (WorkGuard& guard : cpu_guards) {
    guard.reset();
  }
  for (auto& t : cpu_threads) {
    t.join();
  }
  blocking.join();
  spdlog::info("keyholdd stopped");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "keyholdd: fatal: %s\n", e.what());
    return 1;
  }
}
