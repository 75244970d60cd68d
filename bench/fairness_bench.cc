// fairness_bench: does one uid's abuse slow another uid's signing? (issue 7,
// Parsec U-0). A victim (this process, root) signs with an ec-p256 key in
// the daemon while an attacker uid (nobody, a child process) either
//   idle   holds 1,000 connections open and sends nothing,
//   flood  keeps 8 RSA-4096 generations in flight, or
//   both   does both at once.
// The victim's rate under each attack is compared with its unloaded rate,
// measured before and after the attacks (their mean is the baseline), and
// the same signature in-process (OpenSSL, same key) is shown for scale. The
// target is >= 80% of the unloaded rate.
//
// Needs root (to start the attacker as another uid). Every signature's
// status is checked; the last one of each segment is verified.
#include <grp.h>
#include <openssl/evp.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "bench/bench_common.h"
#include "common/client/client.h"

#ifndef KEYHOLDD_PATH
#define KEYHOLDD_PATH "keyholdd"
#endif
#ifndef KH_BENCH_BUILD_TYPE
#define KH_BENCH_BUILD_TYPE "unknown"
#endif

namespace keyhold::bench {
namespace {

constexpr uid_t kAttackerUid = 65534;
constexpr int kIdleConnections = 1000;
constexpr int kFloodThreads = 8;

void PrintUsage(const char* prog) {
  std::printf(
      "usage: %s [--seconds N] [--keyholdd PATH]\n"
      "  --seconds N      measured time per segment (default 2)\n"
      "  --keyholdd PATH  daemon binary to start (default: $KEYHOLDD, else\n"
      "                   the one built with this benchmark)\n",
      prog);
}

// The attacker: a child process running as kAttackerUid until killed.
// Writes one byte to ready_fd once its attack is under way.
[[noreturn]] void Attack(const std::string& socket_path, bool idle, bool flood,
                         int ready_fd) {
  if (setgroups(0, nullptr) != 0 || setgid(kAttackerUid) != 0 ||
      setuid(kAttackerUid) != 0) {
    std::fprintf(stderr, "fairness_bench: attacker cannot become uid %u\n",
                 kAttackerUid);
    _exit(1);
  }
  std::vector<int> fds;
  if (idle) {
    rlimit nofile{};
    getrlimit(RLIMIT_NOFILE, &nofile);
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
    for (int i = 0; i < kIdleConnections; ++i) {
      const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::strncpy(addr.sun_path, socket_path.c_str(),
                   sizeof(addr.sun_path) - 1);
      if (fd < 0 ||
          connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
        if (fd >= 0) {
          close(fd);
        }
        continue;  // backlog full: keep trying the rest
      }
      fds.push_back(fd);
    }
  }
  std::vector<std::thread> threads;
  std::atomic<uint64_t> generated{0};
  if (flood) {
    for (int t = 0; t < kFloodThreads; ++t) {
      threads.emplace_back([&socket_path, &generated, t] {
        client::Options o;
        o.socket_path = socket_path;
        o.call_timeout = std::chrono::minutes(10);
        client::Client c(o);
        for (uint64_t i = 0;; ++i) {
          const std::string name =
              "flood-" + std::to_string(t) + "-" + std::to_string(i);
          if (c.GenerateKey(client::MakeKeyRef(name), v1::RSA_4096).ok()) {
            ++generated;
            (void)c.DestroyKey(client::MakeKeyRef(name));
          }
        }
      });
    }
  }
  // Give the flood time to fill the daemon's queue.
  std::this_thread::sleep_for(std::chrono::milliseconds(flood ? 500 : 100));
  const char ready = 'r';
  (void)!write(ready_fd, &ready, 1);
  for (;;) {
    pause();  // until SIGKILL
  }
}

struct Attacker {
  pid_t pid = -1;
  void Start(const std::string& socket_path, bool idle, bool flood) {
    int p[2];
    if (pipe(p) != 0) {
      Fail("pipe: " + std::string(std::strerror(errno)));
    }
    pid = fork();
    if (pid == 0) {
      close(p[0]);
      Attack(socket_path, idle, flood, p[1]);
    }
    close(p[1]);
    char c = 0;
    if (read(p[0], &c, 1) != 1) {
      close(p[0]);
      Fail("the attacker did not start");
    }
    close(p[0]);
  }
  void Stop() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      int status = 0;
      waitpid(pid, &status, 0);
      pid = -1;
    }
  }
  ~Attacker() { Stop(); }
};

// Signs for `seconds` with one thread; returns signatures per second.
double VictimRate(client::Client& client, const std::string& name,
                  double seconds, EVP_PKEY* pub) {
  v1::SignRequest req;
  *req.mutable_key() = client::MakeKeyRef(name);
  req.set_algorithm(v1::ECDSA);
  req.set_digest(v1::SHA256);
  req.set_data(std::string(32, '\x42'));
  const auto end = Clock::now() + std::chrono::duration<double>(seconds);
  uint64_t ops = 0;
  std::string last;
  const auto start = Clock::now();
  while (Clock::now() < end && !g_interrupted) {
    auto sig = client.Sign(req);
    if (!sig.ok()) {
      Fail("victim sign: " + sig.status().ToString());
    }
    last = std::move(*sig);
    ++ops;
  }
  const double elapsed =
      std::chrono::duration<double>(Clock::now() - start).count();
  SslPtr<EVP_PKEY_CTX> vctx(EVP_PKEY_CTX_new(pub, nullptr));
  if (!vctx || EVP_PKEY_verify_init(vctx.get()) <= 0 ||
      EVP_PKEY_CTX_set_signature_md(vctx.get(), EVP_sha256()) <= 0 ||
      EVP_PKEY_verify(vctx.get(), Bytes(last).data(), last.size(),
                      Bytes(req.data()).data(), req.data().size()) != 1) {
    Fail("the victim's last signature does not verify");
  }
  return static_cast<double>(ops) / elapsed;
}

double InProcessRate(EVP_PKEY* key, double seconds) {
  const std::string digest(32, '\x42');
  unsigned char sig[256];
  const auto end = Clock::now() + std::chrono::duration<double>(seconds);
  uint64_t ops = 0;
  const auto start = Clock::now();
  while (Clock::now() < end) {
    SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(key, nullptr));
    size_t len = sizeof(sig);
    if (!ctx || EVP_PKEY_sign_init(ctx.get()) <= 0 ||
        EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) <= 0 ||
        EVP_PKEY_sign(ctx.get(), sig, &len, Bytes(digest).data(),
                      digest.size()) <= 0) {
      Fail("in-process sign: " + OpenSslErrors());
    }
    ++ops;
  }
  return static_cast<double>(ops) /
         std::chrono::duration<double>(Clock::now() - start).count();
}

int Run(int argc, char** argv) {
  CommonOptions opt;
  if (!ParseArgs(argc, argv, "fairness_bench", KEYHOLDD_PATH, PrintUsage, &opt,
                 [](const std::string&, const GetValue&) { return -1; })) {
    return 2;
  }
  if (geteuid() != 0) {
    std::fprintf(stderr,
                 "fairness_bench: needs root (the attacker runs as "
                 "uid 65534)\n");
    return 2;
  }
  InstallSignalHandlers();
  PrintHeader("keyhold fairness: a victim's ec-p256 signing under attack", argc,
              argv, KH_BENCH_BUILD_TYPE);
  OwnDaemon daemon;
  std::unique_ptr<client::Client> client;
  std::vector<std::string> created;
  std::string error;
  int rc = 0;
  try {
    opt.socket_path.clear();  // always our own daemon: it gets attacked
    client =
        StartAndConnect("fairness_bench", opt, "/tmp/keyhold-fair-bench-XXXXXX",
                        /*world_readable_dir=*/true, &daemon, nullptr);
    const std::string socket = daemon.socket_path();
    SslPtr<EVP_PKEY> local = GenerateLocalKey(v1::EC_P256);
    const std::string name = UniquePrefix("victim");
    ImportLocalKey(*client, name, v1::EC_P256, local.get(), &created);
    std::printf(
        "\nattacker: uid %u; idle = %d connections opened and left silent "
        "(limits.max_connections_per_uid is 128 by default), flood = %d "
        "threads each generating RSA-4096 keys back to back\n\n",
        kAttackerUid, kIdleConnections, kFloodThreads);
    (void)VictimRate(*client, name, opt.warmup_seconds, local.get());
    const double in_process = InProcessRate(local.get(), opt.seconds);
    const double before = VictimRate(*client, name, opt.seconds, local.get());
    struct Row {
      const char* attack;
      double rate;
    };
    std::vector<Row> rows;
    for (const auto& [label, idle, flood] :
         {std::tuple{"idle", true, false}, std::tuple{"flood", false, true},
          std::tuple{"both", true, true}}) {
      Attacker attacker;
      attacker.Start(socket, idle, flood);
      rows.push_back(
          {label, VictimRate(*client, name, opt.seconds, local.get())});
      attacker.Stop();
      if (g_interrupted) {
        break;
      }
    }
    const double after = VictimRate(*client, name, opt.seconds, local.get());
    const double baseline = (before + after) / 2;
    std::printf("| victim (1 thread, ec-p256) | sign/s | %% of unloaded |\n");
    std::printf("|---|---:|---:|\n");
    std::printf("| in-process OpenSSL, same key | %.0f | - |\n", in_process);
    std::printf("| unloaded, before the attacks | %.0f | %.0f%% |\n", before,
                100 * before / baseline);
    std::printf("| unloaded, after the attacks | %.0f | %.0f%% |\n", after,
                100 * after / baseline);
    for (const Row& r : rows) {
      std::printf("| attacker: %s | %.0f | %.0f%% |\n", r.attack, r.rate,
                  100 * r.rate / baseline);
    }
    std::printf("\nTarget: >= 80%% of the unloaded rate under every attack.\n");
    // What the daemon said about the attacker (refusals are logged at most
    // once a second, with a count).
    uint64_t refused_lines = 0;
    std::string last_refusal;
    const std::string log = daemon.Log();
    for (std::size_t pos = 0;
         (pos = log.find("connection refused", pos)) != std::string::npos;
         ++pos) {
      ++refused_lines;
      last_refusal = log.substr(pos, log.find('\n', pos) - pos);
    }
    std::printf("keyholdd logged %llu refusal lines; the last: %s\n",
                static_cast<unsigned long long>(refused_lines),
                last_refusal.empty() ? "-" : last_refusal.c_str());
  } catch (const BenchError& e) {
    error = e.message;
    rc = 1;
  }
  return Finish("fairness_bench", rc, error, opt, created, &client, &daemon);
}

}  // namespace
}  // namespace keyhold::bench

int main(int argc, char** argv) { return keyhold::bench::Run(argc, argv); }
