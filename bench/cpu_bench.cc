// cpu_bench: CPU time per signature, keyholdd versus in-process OpenSSL with
// the same key.
//
// sign_bench reports throughput and latency, which on a shared 2-core
// machine depend on who else runs. This benchmark counts CPU time instead:
// each of N client threads (--threads, default 1 and 2) signs a fixed number
// of times, one signature at a time, and the report divides CPU time by the
// number of signatures:
//   in-process  the signing threads' CPU time (CLOCK_THREAD_CPUTIME_ID), a
//               fresh EVP_PKEY_CTX per signature, each thread with its own
//               copy of the key parsed from the very PKCS#8 PEM the daemon
//               was given (as separate nginx workers parse their key file);
//   keyholdd    the daemon's CPU time over the same number of
//               Client::Sign() calls: the run time of all its threads
//               (/proc/PID/task/*/schedstat, ns) and, as a cross-check,
//               utime + stime (/proc/PID/stat, clock ticks). Everything the
//               daemon does per request counts: socket I/O, protobuf,
//               authorization, the audit log, the signature;
//   client      the signing threads' own CPU time on the keyhold side
//               (framing, protobuf, socket syscalls).
// Segments run in ABBA order (in-process, keyhold, keyhold, in-process), each
// after a warm-up. Every signature is checked for OK status; the last one of
// every thread and segment is verified against the public key.
#include <dirent.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/bench_common.h"
#include "common/client/client.h"
#include "common/key_types.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"

#ifndef KEYHOLDD_PATH
#define KEYHOLDD_PATH "keyholdd"
#endif
#ifndef KH_BENCH_BUILD_TYPE
#define KH_BENCH_BUILD_TYPE "unknown"
#endif

namespace {

using namespace keyhold::bench;  // NOLINT(build/namespaces)
using keyhold::SslPtr;

void PrintUsage(const char* argv0) {
  std::fprintf(
      stderr,
      "usage: %s [options]\n"
      "  --ops N          signatures per segment (default 2000)\n"
      "  --warmup-ops N   unmeasured signatures before each segment "
      "(default 200)\n"
      "  --socket PATH    use a running keyholdd instead of starting one\n"
      "  --pid PID        that daemon's process id (needed with --socket)\n"
      "  --keyholdd PATH  daemon binary to start (default: $KEYHOLDD, else\n"
      "                   the one built with this benchmark)\n"
      "  --threads LIST   client thread counts (default 1,2)\n"
      "  --types LIST     key types (default ec-p256,ed25519,rsa-2048)\n"
      "  --help\n",
      argv0);
}

// One way of signing: key type, algorithm, digest.
struct Variant {
  v1::KeyType type;
  v1::SignAlgorithm algorithm;
  std::string name;  // for the table
};

std::vector<Variant> VariantsFor(v1::KeyType type) {
  switch (type) {
    case v1::EC_P256:
      return {{type, v1::ECDSA, "ec-p256 ECDSA SHA-256"}};
    case v1::ED25519:
      return {{type, v1::ED25519_PURE, "ed25519 (64-byte message)"}};
    default:
      return {{type, v1::RSA_PKCS1, "rsa-2048 PKCS#1 v1.5 SHA-256"},
              {type, v1::RSA_PSS, "rsa-2048 PSS SHA-256 (TLS)"}};
  }
}

int64_t ThreadCpuNs() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Sum of the run time (ns) of every thread of pid.
int64_t ProcessSchedNs(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    Fail("cannot read " + dir);
  }
  int64_t total = 0;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') {
      continue;
    }
    std::ifstream in(dir + "/" + e->d_name + "/schedstat");
    int64_t ns = 0;
    if (in >> ns) {
      total += ns;
    }
  }
  closedir(d);
  return total;
}

// utime + stime of pid in clock ticks.
int64_t ProcessTicks(pid_t pid) {
  std::string stat = ReadFile("/proc/" + std::to_string(pid) + "/stat");
  const auto close = stat.rfind(')');
  if (close == std::string::npos) {
    Fail("cannot parse /proc/" + std::to_string(pid) + "/stat");
  }
  std::istringstream in(stat.substr(close + 2));
  std::string field;
  int64_t utime = 0;
  int64_t stime = 0;
  // Fields after the command: state is field 3; utime 14, stime 15.
  for (int i = 3; i <= 15 && in >> field; ++i) {
    if (i == 14) {
      utime = std::strtoll(field.c_str(), nullptr, 10);
    } else if (i == 15) {
      stime = std::strtoll(field.c_str(), nullptr, 10);
    }
  }
  return utime + stime;
}

struct Key {
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  SslPtr<EVP_PKEY> local;  // parsed from the PEM the daemon imported
  std::string name;
  std::string input;  // digest or message
};

std::string Input(v1::KeyType type) {
  std::string message(64, '\0');
  if (RAND_bytes(reinterpret_cast<unsigned char*>(message.data()), 64) != 1) {
    Fail("RAND_bytes failed");
  }
  if (type == v1::ED25519) {
    return message;
  }
  std::string digest(32, '\0');
  if (EVP_Digest(message.data(), message.size(),
                 reinterpret_cast<unsigned char*>(digest.data()), nullptr,
                 EVP_sha256(), nullptr) != 1) {
    Fail("SHA-256 failed");
  }
  return digest;
}

// One in-process signature with a fresh context, as sign_bench does (PSS:
// salt length = digest length, MGF1 = SHA-256, as TLS signs).
std::size_t SignLocal(const Key& key, v1::SignAlgorithm alg, uint8_t* sig,
                      std::size_t cap) {
  std::size_t len = cap;
  const auto* in = reinterpret_cast<const uint8_t*>(key.input.data());
  if (alg == v1::ED25519_PURE) {
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    const bool ok = md != nullptr &&
                    EVP_DigestSignInit(md, nullptr, nullptr, nullptr,
                                       key.local.get()) == 1 &&
                    EVP_DigestSign(md, sig, &len, in, key.input.size()) == 1;
    EVP_MD_CTX_free(md);
    return ok ? len : 0;
  }
  EVP_PKEY_CTX* ctx =
      EVP_PKEY_CTX_new_from_pkey(nullptr, key.local.get(), nullptr);
  bool ok = ctx != nullptr && EVP_PKEY_sign_init(ctx) == 1;
  if (ok && alg == v1::RSA_PKCS1) {
    ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1;
  } else if (ok && alg == v1::RSA_PSS) {
    ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) == 1 &&
         EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1 &&
         EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, RSA_PSS_SALTLEN_DIGEST) == 1;
  }
  ok = ok && EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) == 1 &&
       EVP_PKEY_sign(ctx, sig, &len, in, key.input.size()) == 1;
  EVP_PKEY_CTX_free(ctx);
  return ok ? len : 0;
}

bool Verify(const Key& key, v1::SignAlgorithm alg, const uint8_t* sig,
            std::size_t sig_len) {
  const auto* in = reinterpret_cast<const uint8_t*>(key.input.data());
  if (alg == v1::ED25519_PURE) {
    SslPtr<EVP_MD_CTX> md(EVP_MD_CTX_new());
    return md != nullptr &&
           EVP_DigestVerifyInit(md.get(), nullptr, nullptr, nullptr,
                                key.local.get()) == 1 &&
           EVP_DigestVerify(md.get(), sig, sig_len, in, key.input.size()) == 1;
  }
  SslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, key.local.get(), nullptr));
  bool ok = ctx != nullptr && EVP_PKEY_verify_init(ctx.get()) == 1;
  if (ok && alg == v1::RSA_PKCS1) {
    ok = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) == 1;
  } else if (ok && alg == v1::RSA_PSS) {
    ok = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) == 1 &&
         EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_sha256()) == 1 &&
         EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), RSA_PSS_SALTLEN_DIGEST) ==
             1;
  }
  return ok && EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) == 1 &&
         EVP_PKEY_verify(ctx.get(), sig, sig_len, in, key.input.size()) == 1;
}

v1::SignRequest Request(const Key& key, v1::SignAlgorithm alg) {
  v1::SignRequest req;
  *req.mutable_key() = keyhold::client::MakeKeyRef(key.name);
  req.set_algorithm(alg);
  req.set_digest(alg == v1::ED25519_PURE ? v1::DIGEST_NONE : v1::SHA256);
  if (alg == v1::RSA_PSS) {
    req.set_pss_salt_length(-1);  // digest length
    req.set_pss_mgf1_digest(v1::SHA256);
  }
  req.set_data(key.input);
  return req;
}

struct Totals {
  uint64_t ops_in = 0;
  int64_t in_ns = 0;  // in-process thread CPU
  uint64_t ops_kh = 0;
  int64_t daemon_ns = 0;     // schedstat
  int64_t daemon_ticks = 0;  // /proc/PID/stat
  int64_t client_ns = 0;     // our thread, keyhold side
};

// Runs fn(t) on `threads` threads at once; the first failure is rethrown.
void OnThreads(unsigned threads, const std::function<void(unsigned)>& fn) {
  std::vector<std::thread> pool;
  std::mutex mu;
  std::optional<BenchError> error;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        fn(t);
      } catch (const BenchError& e) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) {
          error = e;
        }
      }
    });
  }
  for (std::thread& th : pool) {
    th.join();
  }
  if (error) {
    throw *error;
  }
}

// Each thread signs with its own copy of the key (keys[t]), as separate
// server processes (nginx workers) each parse their own key file.
void InProcessSegment(const std::vector<std::unique_ptr<Key>>& keys,
                      v1::SignAlgorithm alg, uint64_t ops, uint64_t warmup,
                      Totals* t) {
  std::atomic<int64_t> cpu{0};
  OnThreads(static_cast<unsigned>(keys.size()), [&](unsigned th) {
    const Key& key = *keys[th];
    uint8_t sig[1024];
    std::size_t len = 0;
    int64_t start = 0;
    for (uint64_t i = 0; i < warmup + ops; ++i) {
      if (i == warmup) {
        start = ThreadCpuNs();
      }
      len = SignLocal(key, alg, sig, sizeof(sig));
      if (len == 0) {
        Fail("in-process signature failed: " + OpenSslErrors());
      }
    }
    cpu += ThreadCpuNs() - start;
    if (!Verify(key, alg, sig, len)) {
      Fail("in-process signature does not verify");
    }
  });
  t->in_ns += cpu.load();
  t->ops_in += ops * keys.size();
}

// `threads` client threads sign at once through one shared Client (one
// pooled connection each); the daemon's CPU is read once all of them have
// finished their warm-up and again when all have finished.
void KeyholdSegment(keyhold::client::Client& client, pid_t daemon_pid,
                    const Key& key, v1::SignAlgorithm alg, unsigned threads,
                    uint64_t ops, uint64_t warmup, Totals* t) {
  const v1::SignRequest req = Request(key, alg);
  std::barrier sync(static_cast<std::ptrdiff_t>(threads), []() noexcept {});
  std::atomic<int64_t> client_cpu{0};
  int64_t daemon_ns = 0;
  int64_t daemon_ticks = 0;
  OnThreads(threads, [&](unsigned th) {
    std::string sig;
    bool ok = true;
    std::string error;
    int64_t start = 0;
    for (uint64_t i = 0; i < warmup + ops; ++i) {
      if (i == warmup) {
        // Every thread arrives even after a failure, so none waits forever.
        sync.arrive_and_wait();
        if (th == 0) {
          daemon_ns -= ProcessSchedNs(daemon_pid);
          daemon_ticks -= ProcessTicks(daemon_pid);
        }
        sync.arrive_and_wait();
        start = ThreadCpuNs();
      }
      if (!ok) {
        continue;
      }
      auto r = client.Sign(req);
      if (!r.ok()) {
        ok = false;
        error = "keyhold Sign: " + r.status().ToString();
        continue;
      }
      sig = std::move(*r);
    }
    client_cpu += ThreadCpuNs() - start;
    sync.arrive_and_wait();
    if (th == 0) {
      daemon_ticks += ProcessTicks(daemon_pid);
      daemon_ns += ProcessSchedNs(daemon_pid);
    }
    if (!ok) {
      Fail(error);
    }
    if (!Verify(key, alg, reinterpret_cast<const uint8_t*>(sig.data()),
                sig.size())) {
      Fail("keyhold signature does not verify");
    }
  });
  t->daemon_ns += daemon_ns;
  t->daemon_ticks += daemon_ticks;
  t->client_ns += client_cpu.load();
  t->ops_kh += ops * threads;
}

int Run(int argc, char** argv) {
  CommonOptions opt;
  uint64_t ops = 2000;
  uint64_t warmup_ops = 200;
  pid_t pid = -1;
  auto parse_count = [](const std::string& v, uint64_t* out) {
    char* end = nullptr;
    const unsigned long long n = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || n < 1 || n > 100000000) {
      return false;
    }
    *out = n;
    return true;
  };
  if (!ParseArgs(argc, argv, "cpu_bench", KEYHOLDD_PATH, PrintUsage, &opt,
                 [&](const std::string& arg, const GetValue& get) -> int {
                   std::string v;
                   if (arg == "--ops" || arg == "--warmup-ops") {
                     if (!get(&v) ||
                         !parse_count(v, arg == "--ops" ? &ops : &warmup_ops)) {
                       std::fprintf(stderr, "cpu_bench: %s: bad count\n",
                                    arg.c_str());
                       return 0;
                     }
                     return 1;
                   }
                   if (arg == "--pid") {
                     uint64_t p = 0;
                     if (!get(&v) || !parse_count(v, &p)) {
                       std::fprintf(stderr, "cpu_bench: bad --pid\n");
                       return 0;
                     }
                     pid = static_cast<pid_t>(p);
                     return 1;
                   }
                   return -1;
                 })) {
    return 2;
  }
  if (!opt.socket_path.empty() && pid <= 0) {
    std::fprintf(stderr, "cpu_bench: --socket needs --pid\n");
    return 2;
  }
  InstallSignalHandlers();
  PrintHeader("keyhold CPU per signature", argc, argv, KH_BENCH_BUILD_TYPE);
  std::fflush(stdout);

  OwnDaemon daemon;
  std::vector<std::string> created;
  std::unique_ptr<keyhold::client::Client> client;
  int rc = 0;
  std::string error;
  try {
    client = StartAndConnect("cpu_bench", opt, "/tmp/keyhold-cpu-bench-XXXXXX",
                             false, &daemon, nullptr);
    if (daemon.pid() > 0) {
      pid = daemon.pid();
    }
    std::printf(
        "- method: per thread %llu signatures per segment after %llu "
        "unmeasured ones, segments in the order in-process, keyhold, keyhold, "
        "in-process; CPU time divided by signatures: in-process = the "
        "signing threads (CLOCK_THREAD_CPUTIME_ID; each thread its own copy "
        "of the key, like separate server processes), keyholdd = all its "
        "threads (/proc/%d/task/*/schedstat; stat = utime+stime in 100 Hz "
        "ticks), client = the signing threads on the keyhold side (one "
        "shared Client)\n\n",
        static_cast<unsigned long long>(ops),
        static_cast<unsigned long long>(warmup_ops), static_cast<int>(pid));
    std::fflush(stdout);

    const std::string prefix = UniquePrefix("cpu-bench");
    std::printf(
        "| signature | threads | in-process µs/op | keyholdd µs/op | "
        "keyholdd µs/op, stat | keyholdd − in-process µs | client µs/op |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n");
    std::fflush(stdout);
    unsigned max_threads = 1;
    for (unsigned n : opt.threads) {
      max_threads = std::max(max_threads, n);
    }
    for (v1::KeyType type : opt.types) {
      const std::string name =
          prefix + "-" + std::string(keyhold::KeyTypeName(type));
      SslPtr<EVP_PKEY> generated = GenerateLocalKey(type);
      ImportLocalKey(*client, name, type, generated.get(), &created);
      // The in-process side parses the PEM the daemon got, as a server
      // parses its key file; every thread gets its own parsed copy.
      keyhold::SecretBytes pem = Pkcs8Pem(generated.get());
      const auto bytes = pem.Expose(keyhold::SecretAccess::kToken);
      const std::string input = Input(type);
      std::vector<std::unique_ptr<Key>> keys;
      for (unsigned i = 0; i < max_threads; ++i) {
        auto key = std::make_unique<Key>();
        key->type = type;
        key->name = name;
        key->input = input;
        SslPtr<BIO> bio(
            BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
        key->local.reset(
            PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
        if (key->local == nullptr) {
          Fail("cannot parse the key's PEM: " + OpenSslErrors());
        }
        keys.push_back(std::move(key));
      }
      for (const Variant& v : VariantsFor(type)) {
        for (unsigned threads : opt.threads) {
          std::vector<std::unique_ptr<Key>> mine;
          for (unsigned i = 0; i < threads; ++i) {
            mine.push_back(std::move(keys[i]));
          }
          Totals t;
          InProcessSegment(mine, v.algorithm, ops, warmup_ops, &t);
          KeyholdSegment(*client, pid, *mine[0], v.algorithm, threads, ops,
                         warmup_ops, &t);
          KeyholdSegment(*client, pid, *mine[0], v.algorithm, threads, ops,
                         warmup_ops, &t);
          InProcessSegment(mine, v.algorithm, ops, warmup_ops, &t);
          for (unsigned i = 0; i < threads; ++i) {
            keys[i] = std::move(mine[i]);
          }
          if (g_interrupted.load()) {
            Fail("interrupted");
          }
          const double in_us = static_cast<double>(t.in_ns) / 1000.0 /
                               static_cast<double>(t.ops_in);
          const double kh_us = static_cast<double>(t.daemon_ns) / 1000.0 /
                               static_cast<double>(t.ops_kh);
          const double kh_stat_us = static_cast<double>(t.daemon_ticks) * 1e6 /
                                    static_cast<double>(sysconf(_SC_CLK_TCK)) /
                                    static_cast<double>(t.ops_kh);
          const double client_us = static_cast<double>(t.client_ns) / 1000.0 /
                                   static_cast<double>(t.ops_kh);
          std::printf("| %s | %u | %.1f | %.1f | %.0f | %+.1f | %.1f |\n",
                      v.name.c_str(), threads, in_us, kh_us, kh_stat_us,
                      kh_us - in_us, client_us);
          std::fflush(stdout);
        }
      }
    }
    std::printf("\n");
  } catch (const BenchError& e) {
    rc = 1;
    error = e.message;
  }
  return Finish("cpu_bench", rc, error, opt, created, &client, &daemon);
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
