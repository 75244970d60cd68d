// sign_bench: signing through keyholdd versus signing in-process with the
// same key, side by side.
//
// For each key type (ec-p256, ed25519, rsa-2048) and client thread count
// (1, 2) it measures two sides on the very same key:
//   in-process  OpenSSL in this process, one EVP_PKEY_CTX (Ed25519:
//               EVP_MD_CTX) created, initialised, used and freed per
//               signature, as an application would do it;
//   keyhold     keyhold::client::Client::Sign() against keyholdd over its
//               Unix socket, one Client shared by the worker threads.
// The key is generated here with OpenSSL and imported into the daemon
// (PKCS#8 PEM), so both sides sign with identical key material. The daemon's
// own GenerateKey path is exercised and verified too, but not timed.
//
// Every configuration runs its two sides in ABBA order (in-process, keyhold,
// keyhold, in-process; the next configuration starts with keyhold), so slow
// drift of the machine does not favour one side. A warm-up precedes every
// change of side. Every op is checked; any failure aborts with exit status 1.
// Signatures are verified against the public key before timing and after
// every timed segment (the last signature of each thread).
//
// The output is Markdown, ready to paste into bench/RESULTS.md.
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <latch>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "common/client/client.h"
#include "common/key_types.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"
#include "common/status.h"

#ifndef KEYHOLDD_PATH
#define KEYHOLDD_PATH "keyholdd"
#endif
#ifndef KH_BENCH_BUILD_TYPE
#define KH_BENCH_BUILD_TYPE "unknown"
#endif

namespace {

namespace v1 = keyhold::v1;
using Clock = std::chrono::steady_clock;
using keyhold::SslPtr;

// ---------------------------------------------------------------------------
// Small helpers

std::string OpenSslErrors() {
  std::string out;
  unsigned long e = 0;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) {
      out += "; ";
    }
    out += buf;
  }
  return out.empty() ? "no OpenSSL error queued" : out;
}

// Thrown for setup failures; main() reports it and exits 1 after cleanup.
struct BenchError {
  std::string message;
};

[[noreturn]] void Fail(const std::string& message) {
  throw BenchError{message};
}

std::string ShellQuote(const std::string& s) {
  if (!s.empty() &&
      s.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                          "0123456789_-.,/:=+@%") == std::string::npos) {
    return s;
  }
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string Trim(std::string s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) {
    return {};
  }
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  std::string fallback;
  while (std::getline(in, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) {
      continue;
    }
    const std::string key = Trim(line.substr(0, colon));
    const std::string value = Trim(line.substr(colon + 1));
    if (key == "model name") {
      return value;
    }
    if ((key == "Hardware" || key == "cpu model" || key == "CPU part") &&
        fallback.empty()) {
      fallback = key + " " + value;
    }
  }
  return fallback.empty() ? "unknown" : fallback;
}

unsigned NprocAffinity() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return static_cast<unsigned>(CPU_COUNT(&set));
  }
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<unsigned>(n) : 1u;
}

std::string UtcNow() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S UTC", &tm);
  return buf;
}

// ---------------------------------------------------------------------------
// Options

struct BenchOptions {
  double seconds = 2.0;
  double warmup_seconds = 0.3;
  std::string socket_path;  // empty: start our own keyholdd
  std::string keyholdd_path;
  std::vector<unsigned> threads = {1, 2};
  std::vector<v1::KeyType> types = {v1::EC_P256, v1::ED25519, v1::RSA_2048};
};

// The cost of the IPC itself on this machine: a child echoes one byte over a
// socketpair; returns the median round trip in microseconds.
double SocketPairRoundTripMicros() {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return -1;
  }
  const pid_t pid = fork();
  if (pid == 0) {
    close(sv[0]);
    char b;
    while (read(sv[1], &b, 1) == 1) {
      if (write(sv[1], &b, 1) != 1) {
        break;
      }
    }
    _exit(0);
  }
  close(sv[1]);
  std::vector<double> samples;
  samples.reserve(20000);
  char b = 'x';
  for (int i = 0; i < 20000; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    if (write(sv[0], &b, 1) != 1 || read(sv[0], &b, 1) != 1) {
      break;
    }
    samples.push_back(std::chrono::duration<double, std::micro>(
                          std::chrono::steady_clock::now() - t0)
                          .count());
  }
  close(sv[0]);
  waitpid(pid, nullptr, 0);
  if (samples.empty()) {
    return -1;
  }
  std::nth_element(
      samples.begin(),
      samples.begin() + static_cast<std::ptrdiff_t>(samples.size() / 2),
      samples.end());
  return samples[samples.size() / 2];
}

void PrintUsage(const char* argv0) {
  std::fprintf(
      stderr,
      "usage: %s [options]\n"
      "  --seconds N      measured time per side and config (default 2)\n"
      "  --warmup N       warm-up before each change of side (default 0.3)\n"
      "  --socket PATH    use a running keyholdd instead of starting one\n"
      "  --keyholdd PATH  daemon binary to start (default: $KEYHOLDD, else\n"
      "                   the one built with this benchmark)\n"
      "  --threads LIST   client thread counts (default 1,2)\n"
      "  --types LIST     key types (default ec-p256,ed25519,rsa-2048)\n"
      "  --help\n",
      argv0);
}

std::optional<double> ParsePositiveDouble(const std::string& s) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || errno != 0 || end == nullptr || *end != '\0' ||
      !std::isfinite(v) || v <= 0) {
    return std::nullopt;
  }
  return v;
}

std::vector<std::string> SplitComma(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == ',') {
      out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  out.push_back(cur);
  return out;
}

bool ParseArgs(int argc, char** argv, BenchOptions* o) {
  const char* env_daemon = std::getenv("KEYHOLDD");
  o->keyholdd_path =
      env_daemon != nullptr && *env_daemon != '\0' ? env_daemon : KEYHOLDD_PATH;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_value = false;
    if (const auto eq = arg.find('=');
        arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (arg == "--help" || arg == "-h") {
      PrintUsage(argv[0]);
      std::exit(0);
    }
    auto need_value = [&]() -> bool {
      if (has_value) {
        return true;
      }
      if (i + 1 >= argc) {
        std::fprintf(stderr, "sign_bench: %s needs a value\n", arg.c_str());
        return false;
      }
      value = argv[++i];
      return true;
    };
    if (arg == "--seconds" || arg == "--warmup") {
      if (!need_value()) {
        return false;
      }
      auto v = ParsePositiveDouble(value);
      if (!v) {
        std::fprintf(stderr, "sign_bench: %s: not a positive number: %s\n",
                     arg.c_str(), value.c_str());
        return false;
      }
      (arg == "--seconds" ? o->seconds : o->warmup_seconds) = *v;
    } else if (arg == "--socket") {
      if (!need_value()) {
        return false;
      }
      o->socket_path = value;
    } else if (arg == "--keyholdd") {
      if (!need_value()) {
        return false;
      }
      o->keyholdd_path = value;
    } else if (arg == "--threads") {
      if (!need_value()) {
        return false;
      }
      o->threads.clear();
      for (const std::string& t : SplitComma(value)) {
        char* end = nullptr;
        const long n = std::strtol(t.c_str(), &end, 10);
        if (t.empty() || *end != '\0' || n < 1 || n > 256) {
          std::fprintf(stderr, "sign_bench: bad thread count: %s\n", t.c_str());
          return false;
        }
        o->threads.push_back(static_cast<unsigned>(n));
      }
    } else if (arg == "--types") {
      if (!need_value()) {
        return false;
      }
      o->types.clear();
      for (const std::string& t : SplitComma(value)) {
        auto type = keyhold::KeyTypeFromString(t);
        if (!type || (*type != v1::EC_P256 && *type != v1::ED25519 &&
                      *type != v1::RSA_2048)) {
          std::fprintf(stderr,
                       "sign_bench: unsupported key type: %s (ec-p256, "
                       "ed25519, rsa-2048)\n",
                       t.c_str());
          return false;
        }
        o->types.push_back(*type);
      }
    } else {
      std::fprintf(stderr, "sign_bench: unknown argument: %s\n", argv[i]);
      PrintUsage(argv[0]);
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// Interrupts: Ctrl-C stops the run cleanly (keys destroyed, daemon stopped).

std::atomic<bool> g_interrupted{false};

extern "C" void OnSignal(int) { g_interrupted.store(true); }

// ---------------------------------------------------------------------------
// The daemon we start ourselves

class OwnDaemon {
 public:
  OwnDaemon() = default;
  OwnDaemon(const OwnDaemon&) = delete;
  OwnDaemon& operator=(const OwnDaemon&) = delete;
  ~OwnDaemon() {
    Stop();
    if (!dir_.empty()) {
      std::error_code ec;
      std::filesystem::remove_all(dir_, ec);
    }
  }

  void Start(const std::string& binary) {
    char tmpl[] = "/tmp/keyhold-bench-XXXXXX";
    if (mkdtemp(tmpl) == nullptr) {
      Fail(std::string("mkdtemp: ") + std::strerror(errno));
    }
    dir_ = tmpl;
    binary_ = binary;
    socket_path_ = dir_ + "/keyhold.sock";
    log_path_ = dir_ + "/keyholdd.log";
    const std::string state_dir = dir_ + "/state";

    // Everything the child needs is prepared before fork().
    std::vector<std::string> args = {binary,        "--socket", socket_path_,
                                     "--state-dir", state_dir,  "--log-level",
                                     "warn"};
    std::vector<char*> argv;
    for (std::string& a : args) {
      argv.push_back(a.data());
    }
    argv.push_back(nullptr);
    const pid_t parent = getpid();

    const pid_t pid = fork();
    if (pid < 0) {
      Fail(std::string("fork: ") + std::strerror(errno));
    }
    if (pid == 0) {
      // Own process group: a Ctrl-C reaches the benchmark, which then stops
      // the daemon itself. Die with the benchmark if it dies.
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) {
        _exit(126);
      }
      const int log = open(log_path_.c_str(),
                           O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
      if (log >= 0) {
        dup2(log, 1);
        dup2(log, 2);
      }
      execv(argv[0], argv.data());
      _exit(127);
    }
    pid_ = pid;
  }

  // Waits until the daemon answers a ping (up to 10 s).
  void WaitReady(keyhold::client::Client& client) {
    for (int i = 0; i < 200; ++i) {
      if (client.Ping().ok()) {
        return;
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        if (WIFEXITED(status) && WEXITSTATUS(status) == 127) {
          Fail("cannot execute " + binary_ + " (exit status 127)");
        }
        Fail("keyholdd exited during startup (" + DescribeStatus(status) +
             "); its log:\n" + Log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    Fail("keyholdd did not answer a ping within 10 s; its log:\n" + Log());
  }

  // SIGTERM, wait up to 10 s, then SIGKILL. Returns a note if the exit was
  // not clean, else empty.
  std::string Stop() {
    if (pid_ <= 0) {
      return {};
    }
    kill(pid_, SIGTERM);
    int status = 0;
    pid_t r = 0;
    for (int i = 0; i < 1000; ++i) {
      r = waitpid(pid_, &status, WNOHANG);
      if (r != 0) {
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::string note;
    if (r == 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      note = "keyholdd did not stop within 10 s of SIGTERM; killed";
    } else if (r == pid_ && !(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
      note = "keyholdd stopped with " + DescribeStatus(status);
    }
    pid_ = -1;
    return note;
  }

  pid_t pid() const { return pid_; }
  const std::string& socket_path() const { return socket_path_; }
  std::string Log() const { return ReadFile(log_path_); }

 private:
  static std::string DescribeStatus(int status) {
    if (WIFEXITED(status)) {
      return "exit status " + std::to_string(WEXITSTATUS(status));
    }
    if (WIFSIGNALED(status)) {
      return "signal " + std::to_string(WTERMSIG(status));
    }
    return "status " + std::to_string(status);
  }

  std::string binary_;
  std::string dir_;
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
};

// ---------------------------------------------------------------------------
// Keys and signatures

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

SslPtr<EVP_PKEY> GenerateLocalKey(v1::KeyType type) {
  EVP_PKEY* k = nullptr;
  switch (type) {
    case v1::EC_P256:
      k = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
      break;
    case v1::ED25519:
      k = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
      break;
    case v1::RSA_2048:
      k = EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", static_cast<size_t>(2048));
      break;
    default:
      break;
  }
  if (k == nullptr) {
    Fail("OpenSSL key generation failed: " + OpenSslErrors());
  }
  return SslPtr<EVP_PKEY>(k);
}

keyhold::SecretBytes Pkcs8Pem(EVP_PKEY* pkey) {
  SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr ||
      PEM_write_bio_PKCS8PrivateKey(bio.get(), pkey, nullptr, nullptr, 0,
                                    nullptr, nullptr) != 1) {
    Fail("cannot encode the key as PKCS#8 PEM: " + OpenSslErrors());
  }
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio.get(), &data);
  if (len <= 0) {
    Fail("empty PKCS#8 PEM");
  }
  keyhold::SecretBytes out(std::span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(data), static_cast<std::size_t>(len)));
  OPENSSL_cleanse(data, static_cast<std::size_t>(len));
  return out;
}

std::string PublicKeyDer(EVP_PKEY* pkey) {
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(pkey, &der);
  if (len <= 0) {
    Fail("cannot encode the public key: " + OpenSslErrors());
  }
  std::string out(reinterpret_cast<const char*>(der),
                  static_cast<std::size_t>(len));
  OPENSSL_free(der);
  return out;
}

SslPtr<EVP_PKEY> ParsePublicKey(const std::string& der) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  EVP_PKEY* k = d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size()));
  if (k == nullptr) {
    Fail("daemon returned an unparsable public key: " + OpenSslErrors());
  }
  return SslPtr<EVP_PKEY>(k);
}

// What gets signed: a SHA-256 digest (ECDSA, RSA) or a 64-byte message
// (Ed25519). Hashing is outside the timed region on both sides.
std::string SignInput(v1::KeyType type, const std::string& digest,
                      const std::string& message) {
  return type == v1::ED25519 ? message : digest;
}

v1::SignRequest MakeSignRequest(v1::KeyType type, const std::string& name,
                                const std::string& input) {
  v1::SignRequest req;
  *req.mutable_key() = keyhold::client::MakeKeyRef(name);
  switch (type) {
    case v1::EC_P256:
      req.set_algorithm(v1::ECDSA);
      req.set_digest(v1::SHA256);
      break;
    case v1::RSA_2048:
      req.set_algorithm(v1::RSA_PKCS1);
      req.set_digest(v1::SHA256);
      break;
    default:  // ED25519
      req.set_algorithm(v1::ED25519_PURE);
      req.set_digest(v1::DIGEST_NONE);
      break;
  }
  req.set_data(input);
  return req;
}

// One in-process signature, the way an application does it: a fresh
// context per operation. Returns the signature length, 0 on failure.
std::size_t SignInProcess(EVP_PKEY* pkey, v1::KeyType type,
                          std::span<const uint8_t> input, uint8_t* sig,
                          std::size_t sig_cap) {
  std::size_t sig_len = sig_cap;
  if (type == v1::ED25519) {
    EVP_MD_CTX* md_ctx = EVP_MD_CTX_new();
    const bool ok =
        md_ctx != nullptr &&
        EVP_DigestSignInit(md_ctx, nullptr, nullptr, nullptr, pkey) == 1 &&
        EVP_DigestSign(md_ctx, sig, &sig_len, input.data(), input.size()) == 1;
    EVP_MD_CTX_free(md_ctx);
    return ok ? sig_len : 0;
  }
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr);
  bool ok = ctx != nullptr && EVP_PKEY_sign_init(ctx) == 1;
  if (ok && type == v1::RSA_2048) {
    ok = EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) == 1;
  }
  ok = ok && EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256()) == 1 &&
       EVP_PKEY_sign(ctx, sig, &sig_len, input.data(), input.size()) == 1;
  EVP_PKEY_CTX_free(ctx);
  return ok ? sig_len : 0;
}

bool Verify(EVP_PKEY* pub, v1::KeyType type, std::span<const uint8_t> input,
            std::span<const uint8_t> sig) {
  if (type == v1::ED25519) {
    SslPtr<EVP_MD_CTX> md_ctx(EVP_MD_CTX_new());
    return md_ctx != nullptr &&
           EVP_DigestVerifyInit(md_ctx.get(), nullptr, nullptr, nullptr, pub) ==
               1 &&
           EVP_DigestVerify(md_ctx.get(), sig.data(), sig.size(), input.data(),
                            input.size()) == 1;
  }
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pub, nullptr));
  if (ctx == nullptr || EVP_PKEY_verify_init(ctx.get()) != 1) {
    return false;
  }
  if (type == v1::RSA_2048 &&
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) {
    return false;
  }
  return EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) == 1 &&
         EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(), input.data(),
                         input.size()) == 1;
}

struct BenchKey {
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::string type_name;
  SslPtr<EVP_PKEY> local;      // private key used by the in-process side
  std::string imported_name;   // the same key inside keyholdd (timed)
  std::string generated_name;  // a daemon-generated key (verified, not timed)
  std::string input;           // digest or message
  v1::SignRequest request;     // for imported_name
};

// ---------------------------------------------------------------------------
// Timed runs

enum class Side { kInProcess, kKeyhold };

const char* SideName(Side s) {
  return s == Side::kInProcess ? "in-process" : "keyhold";
}

struct Failure {
  std::mutex mu;
  std::atomic<bool> failed{false};
  std::string message;
  void Set(const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed.load()) {
      message = m;
      failed.store(true);
    }
  }
};

// One worker's view of one side: Sign() performs exactly one timed op.
class Signer {
 public:
  virtual ~Signer() = default;
  virtual bool Sign(std::string* error) = 0;
  virtual std::span<const uint8_t> LastSignature() const = 0;
};

class InProcessSigner final : public Signer {
 public:
  explicit InProcessSigner(const BenchKey& key)
      : key_(key),
        sig_(static_cast<std::size_t>(EVP_PKEY_get_size(key.local.get()))) {}
  bool Sign(std::string* error) override {
    sig_len_ = SignInProcess(key_.local.get(), key_.type, Bytes(key_.input),
                             sig_.data(), sig_.size());
    if (sig_len_ == 0) {
      *error = "in-process " + key_.type_name +
               " signature failed: " + OpenSslErrors();
      return false;
    }
    return true;
  }
  std::span<const uint8_t> LastSignature() const override {
    return {sig_.data(), sig_len_};
  }

 private:
  const BenchKey& key_;
  std::vector<uint8_t> sig_;
  std::size_t sig_len_ = 0;
};

class KeyholdSigner final : public Signer {
 public:
  KeyholdSigner(keyhold::client::Client& client, const BenchKey& key)
      : client_(client), key_(key) {}
  bool Sign(std::string* error) override {
    auto sig = client_.Sign(key_.request);
    if (!sig.ok()) {
      *error = "keyhold " + key_.type_name +
               " signature failed: " + sig.status().ToString();
      return false;
    }
    if (sig->empty()) {
      *error = "keyhold " + key_.type_name + " returned an empty signature";
      return false;
    }
    last_ = std::move(*sig);
    return true;
  }
  std::span<const uint8_t> LastSignature() const override {
    return Bytes(last_);
  }

 private:
  keyhold::client::Client& client_;
  const BenchKey& key_;
  std::string last_;
};

struct Measurement {
  uint64_t ops = 0;
  double seconds = 0;               // summed over segments
  std::vector<int64_t> latency_ns;  // every op of every thread
};

// Runs `threads` workers on one side for `duration`. With record, adds ops,
// elapsed time and latencies to *m and verifies each worker's last
// signature. Returns false on failure (details in *failure).
bool RunSegment(const BenchKey& key, Side side, unsigned threads,
                double duration, keyhold::client::Client& client, bool record,
                Measurement* m, Failure* failure) {
  std::vector<std::unique_ptr<Signer>> signers;
  for (unsigned t = 0; t < threads; ++t) {
    if (side == Side::kInProcess) {
      signers.push_back(std::make_unique<InProcessSigner>(key));
    } else {
      signers.push_back(std::make_unique<KeyholdSigner>(client, key));
    }
  }
  std::vector<std::vector<int64_t>> lat(threads);
  std::vector<Clock::time_point> started(threads);
  std::vector<Clock::time_point> finished(threads);
  Clock::time_point deadline;
  std::latch go(1);

  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::vector<int64_t>& mine = lat[t];
      if (record) {
        mine.reserve(1 << 16);
      }
      Signer& signer = *signers[t];
      std::string error;
      go.wait();
      started[t] = Clock::now();
      for (;;) {
        const Clock::time_point t0 = Clock::now();
        const bool ok = signer.Sign(&error);
        const Clock::time_point t1 = Clock::now();
        if (!ok) {
          failure->Set(error);
          break;
        }
        if (record) {
          mine.push_back(
              std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0)
                  .count());
        }
        if (t1 >= deadline || failure->failed.load(std::memory_order_relaxed) ||
            g_interrupted.load(std::memory_order_relaxed)) {
          break;
        }
      }
      finished[t] = Clock::now();
    });
  }
  deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(duration));
  go.count_down();
  for (std::thread& w : workers) {
    w.join();
  }
  if (failure->failed.load()) {
    return false;
  }
  if (g_interrupted.load()) {
    failure->Set("interrupted");
    return false;
  }
  if (!record) {
    return true;
  }
  // Each worker's last signature must verify: the timed ops were real.
  for (unsigned t = 0; t < threads; ++t) {
    if (!Verify(key.local.get(), key.type, Bytes(key.input),
                signers[t]->LastSignature())) {
      failure->Set(std::string(SideName(side)) + " " + key.type_name +
                   " signature from a timed segment does not verify");
      return false;
    }
  }
  const auto first = *std::min_element(started.begin(), started.end());
  const auto last = *std::max_element(finished.begin(), finished.end());
  m->seconds += std::chrono::duration<double>(last - first).count();
  for (auto& v : lat) {
    m->ops += v.size();
    m->latency_ns.insert(m->latency_ns.end(), v.begin(), v.end());
  }
  return true;
}

// Nearest-rank percentile in microseconds.
double PercentileUs(std::vector<int64_t>& v, double p) {
  if (v.empty()) {
    return 0;
  }
  const double rank = std::ceil(p * static_cast<double>(v.size()));
  std::size_t idx = rank < 1 ? 0 : static_cast<std::size_t>(rank) - 1;
  idx = std::min(idx, v.size() - 1);
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(idx),
                   v.end());
  return static_cast<double>(v[idx]) / 1000.0;
}

struct Row {
  std::string type_name;
  unsigned threads = 0;
  double ops_in = 0;
  double ops_kh = 0;
  double p50_in = 0;
  double p99_in = 0;
  double p50_kh = 0;
  double p99_kh = 0;
  uint64_t n_in = 0;
  uint64_t n_kh = 0;
  std::string order;
};

// ---------------------------------------------------------------------------
// Setup

void SetUpKey(keyhold::client::Client& client, v1::KeyType type,
              const std::string& prefix, const std::string& digest,
              const std::string& message, BenchKey* key,
              std::vector<std::string>* created) {
  key->type = type;
  key->type_name = std::string(keyhold::KeyTypeName(type));
  key->input = SignInput(type, digest, message);
  key->local = GenerateLocalKey(type);
  key->imported_name = prefix + "-" + key->type_name + "-imported";
  key->generated_name = prefix + "-" + key->type_name + "-generated";
  const std::string local_pub = PublicKeyDer(key->local.get());

  // The in-process side works at all and produces verifiable signatures.
  {
    std::vector<uint8_t> sig(
        static_cast<std::size_t>(EVP_PKEY_get_size(key->local.get())));
    const std::size_t n = SignInProcess(
        key->local.get(), type, Bytes(key->input), sig.data(), sig.size());
    if (n == 0 ||
        !Verify(key->local.get(), type, Bytes(key->input), {sig.data(), n})) {
      Fail("in-process " + key->type_name +
           " sign/verify check failed: " + OpenSslErrors());
    }
  }

  // The same key inside the daemon.
  {
    keyhold::SecretBytes pem = Pkcs8Pem(key->local.get());
    auto imported =
        client.ImportKey(keyhold::client::MakeKeyRef(key->imported_name), pem);
    if (!imported.ok()) {
      Fail("ImportKey " + key->imported_name + ": " +
           imported.status().ToString());
    }
    created->push_back(key->imported_name);
    if (imported->info().type() != type) {
      Fail("ImportKey " + key->imported_name + ": daemon reports type " +
           std::string(keyhold::KeyTypeName(imported->info().type())));
    }
    if (imported->public_key() != local_pub) {
      Fail("ImportKey " + key->imported_name +
           ": the daemon's public key differs from the local key");
    }
  }
  key->request = MakeSignRequest(type, key->imported_name, key->input);
  {
    auto sig = client.Sign(key->request);
    if (!sig.ok()) {
      Fail("Sign with " + key->imported_name + ": " + sig.status().ToString());
    }
    if (!Verify(key->local.get(), type, Bytes(key->input), Bytes(*sig))) {
      Fail("keyhold " + key->type_name +
           " signature (imported key) does not verify against the public key");
    }
  }

  // A daemon-generated key of the same type signs correctly too.
  {
    auto generated = client.GenerateKey(
        keyhold::client::MakeKeyRef(key->generated_name), type);
    if (!generated.ok()) {
      Fail("GenerateKey " + key->generated_name + ": " +
           generated.status().ToString());
    }
    created->push_back(key->generated_name);
    SslPtr<EVP_PKEY> pub = ParsePublicKey(generated->public_key());
    auto sig =
        client.Sign(MakeSignRequest(type, key->generated_name, key->input));
    if (!sig.ok()) {
      Fail("Sign with " + key->generated_name + ": " + sig.status().ToString());
    }
    if (!Verify(pub.get(), type, Bytes(key->input), Bytes(*sig))) {
      Fail("keyhold " + key->type_name +
           " signature (generated key) does not verify against its public "
           "key");
    }
  }
}

int Run(int argc, char** argv) {
  BenchOptions opt;
  if (!ParseArgs(argc, argv, &opt)) {
    return 2;
  }
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::string command;
  for (int i = 0; i < argc; ++i) {
    command += (i ? " " : "") + ShellQuote(argv[i]);
  }
  struct utsname uts {};
  uname(&uts);

  std::printf("## keyhold sign benchmark\n\n");
  std::printf("- command: `%s`\n", command.c_str());
  std::printf("- date: %s\n", UtcNow().c_str());
  std::printf("- machine: nproc %u, CPU %s, kernel %s %s\n", NprocAffinity(),
              CpuModel().c_str(), uts.sysname, uts.release);
  std::printf("- load average at start: %s\n",
              Trim(ReadFile("/proc/loadavg")).c_str());
  std::printf("- OpenSSL: %s (built against %s)\n",
              OpenSSL_version(OPENSSL_VERSION), OPENSSL_VERSION_TEXT);
  std::printf("- build type: %s\n", KH_BENCH_BUILD_TYPE);
  std::fflush(stdout);

  OwnDaemon daemon;
  std::vector<std::string> created;
  std::unique_ptr<keyhold::client::Client> client;
  int rc = 0;
  std::string error;

  try {
    keyhold::client::Options copts;
    std::string daemon_desc;
    if (opt.socket_path.empty()) {
      if (std::filesystem::exists("/etc/keyhold/keyholdd.toml")) {
        std::fprintf(stderr,
                     "sign_bench: note: /etc/keyhold/keyholdd.toml exists; "
                     "the started keyholdd reads it\n");
      }
      daemon.Start(opt.keyholdd_path);
      copts.socket_path = daemon.socket_path();
      daemon_desc = "started by the benchmark: `" + opt.keyholdd_path +
                    " --socket " + daemon.socket_path() +
                    " --state-dir <tmp>/state --log-level warn` (pid " +
                    std::to_string(daemon.pid()) + ")";
    } else {
      copts = keyhold::client::OptionsFromEnvironment();
      copts.socket_path = opt.socket_path;
      daemon_desc = "already running at " + opt.socket_path;
    }
    copts.connect_timeout = std::chrono::milliseconds(2000);
    copts.call_timeout = std::chrono::milliseconds(30000);
    client = std::make_unique<keyhold::client::Client>(copts);
    if (daemon.pid() > 0) {
      daemon.WaitReady(*client);
    }
    auto hello = client->Hello();
    if (!hello.ok()) {
      Fail("Hello: " + hello.status().ToString());
    }
    std::printf("- keyholdd %s, %s\n", hello->daemon_version().c_str(),
                daemon_desc.c_str());
    std::printf(
        "- floor: a 1-byte round trip between two processes over a Unix "
        "socketpair takes %.1f µs p50 here (no keyhold code; every keyhold "
        "call pays at least this)\n",
        SocketPairRoundTripMicros());
    std::printf(
        "- method: per configuration %.2f s measured per side, in two "
        "halves in ABBA order, %.2f s warm-up before each change of side; "
        "latencies over all threads\n\n",
        opt.seconds, opt.warmup_seconds);
    std::fflush(stdout);

    // Shared inputs: one SHA-256 digest and one 64-byte message.
    std::string message(64, '\0');
    if (RAND_bytes(reinterpret_cast<unsigned char*>(message.data()), 64) != 1) {
      Fail("RAND_bytes failed");
    }
    std::string digest(32, '\0');
    if (EVP_Digest(message.data(), message.size(),
                   reinterpret_cast<unsigned char*>(digest.data()), nullptr,
                   EVP_sha256(), nullptr) != 1) {
      Fail("SHA-256 failed");
    }

    // Unique names, so a shared running daemon is never disturbed.
    const std::string prefix =
        "sign-bench-" + std::to_string(getpid()) + "-" +
        std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::system_clock::now().time_since_epoch())
                           .count() %
                       1000000);

    std::vector<std::unique_ptr<BenchKey>> keys;
    for (v1::KeyType type : opt.types) {
      auto key = std::make_unique<BenchKey>();
      SetUpKey(*client, type, prefix, digest, message, key.get(), &created);
      std::fprintf(stderr,
                   "sign_bench: %s: imported key matches, keyhold and "
                   "in-process signatures verify\n",
                   key->type_name.c_str());
      keys.push_back(std::move(key));
    }

    std::vector<Row> rows;
    Failure failure;
    std::size_t config_index = 0;
    for (const auto& key : keys) {
      for (unsigned threads : opt.threads) {
        // ABBA; the next configuration starts with the other side.
        const bool in_first = config_index % 2 == 0;
        const Side a = in_first ? Side::kInProcess : Side::kKeyhold;
        const Side b = in_first ? Side::kKeyhold : Side::kInProcess;
        const Side order[4] = {a, b, b, a};
        ++config_index;

        Measurement m_in;
        Measurement m_kh;
        std::optional<Side> previous;
        for (Side side : order) {
          if (previous != side) {
            if (!RunSegment(*key, side, threads, opt.warmup_seconds, *client,
                            false, nullptr, &failure)) {
              Fail(failure.message);
            }
          }
          previous = side;
          Measurement* m = side == Side::kInProcess ? &m_in : &m_kh;
          if (!RunSegment(*key, side, threads, opt.seconds / 2, *client, true,
                          m, &failure)) {
            Fail(failure.message);
          }
        }
        Row row;
        row.type_name = key->type_name;
        row.threads = threads;
        row.n_in = m_in.ops;
        row.n_kh = m_kh.ops;
        row.ops_in = static_cast<double>(m_in.ops) / m_in.seconds;
        row.ops_kh = static_cast<double>(m_kh.ops) / m_kh.seconds;
        row.p50_in = PercentileUs(m_in.latency_ns, 0.50);
        row.p99_in = PercentileUs(m_in.latency_ns, 0.99);
        row.p50_kh = PercentileUs(m_kh.latency_ns, 0.50);
        row.p99_kh = PercentileUs(m_kh.latency_ns, 0.99);
        row.order = in_first ? "in-process first" : "keyhold first";
        std::fprintf(stderr,
                     "sign_bench: %s x%u done (%s): in-process %llu ops, "
                     "keyhold %llu ops\n",
                     row.type_name.c_str(), threads, row.order.c_str(),
                     static_cast<unsigned long long>(row.n_in),
                     static_cast<unsigned long long>(row.n_kh));
        rows.push_back(std::move(row));
      }
    }

    std::printf(
        "| key type | threads | in-process ops/s | keyhold ops/s | ratio "
        "(keyhold/in-process) | in-process p50/p99 µs | keyhold p50/p99 µs | "
        "added p50 µs |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for (const Row& r : rows) {
      std::printf(
          "| %s | %u | %.0f | %.0f | %.1f%% | %.1f / %.1f | %.1f / %.1f | "
          "%+.1f |\n",
          r.type_name.c_str(), r.threads, r.ops_in, r.ops_kh,
          100.0 * r.ops_kh / r.ops_in, r.p50_in, r.p99_in, r.p50_kh, r.p99_kh,
          r.p50_kh - r.p50_in);
    }
    std::printf("\n");
    std::fflush(stdout);
  } catch (const BenchError& e) {
    rc = 1;
    error = e.message;
  }

  // Cleanup: our keys in a shared daemon (our own daemon's state directory
  // is removed as a whole), then our daemon.
  if (client != nullptr && !opt.socket_path.empty()) {
    for (const std::string& name : created) {
      keyhold::Status st =
          client->DestroyKey(keyhold::client::MakeKeyRef(name));
      if (!st.ok()) {
        std::fprintf(stderr, "sign_bench: warning: cannot destroy key %s: %s\n",
                     name.c_str(), st.ToString().c_str());
      }
    }
  }
  client.reset();
  if (rc != 0) {
    std::fprintf(stderr, "sign_bench: FAILED: %s\n", error.c_str());
    if (daemon.pid() > 0) {
      const std::string log = daemon.Log();
      if (!log.empty()) {
        std::fprintf(stderr, "sign_bench: keyholdd log:\n%s\n", log.c_str());
      }
    }
  }
  const std::string note = daemon.Stop();
  if (!note.empty()) {
    std::fprintf(stderr, "sign_bench: warning: %s\n", note.c_str());
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
