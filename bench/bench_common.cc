// Code shared by the benchmarks; see bench_common.h.
#include "bench/bench_common.h"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/store.h>
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
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <latch>
#include <sstream>
#include <thread>
#include <utility>

#include "common/key_types.h"
#include "common/status.h"

namespace keyhold::bench {

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

std::string Trim(const std::string& s) {
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
    std::string value = Trim(line.substr(colon + 1));
    if (key == "model name") {
      return value;
    }
    if ((key == "Hardware" || key == "cpu model" || key == "CPU part") &&
        fallback.empty()) {
      fallback = key;
      fallback += ' ';
      fallback += value;
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

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

ProviderEnv::~ProviderEnv() {
  if (keyhold_ != nullptr) {
    OSSL_PROVIDER_unload(keyhold_);
  }
  if (default_ != nullptr) {
    OSSL_PROVIDER_unload(default_);
  }
  OSSL_LIB_CTX_free(libctx_);
}

void ProviderEnv::Load(const std::string& module_path) {
  const std::filesystem::path p(module_path);
  if (!std::filesystem::exists(p)) {
    Fail("provider module not found: " + module_path);
  }
  libctx_ = OSSL_LIB_CTX_new();
  if (libctx_ == nullptr) {
    Fail("OSSL_LIB_CTX_new: " + OpenSslErrors());
  }
  const std::string dir = p.parent_path().string();
  std::string name = p.filename().string();
  if (name.size() > 3 && name.ends_with(".so")) {
    name.resize(name.size() - 3);
  }
  if (OSSL_PROVIDER_set_default_search_path(libctx_, dir.c_str()) != 1) {
    Fail("OSSL_PROVIDER_set_default_search_path: " + OpenSslErrors());
  }
  default_ = OSSL_PROVIDER_load(libctx_, "default");
  if (default_ == nullptr) {
    Fail("cannot load the default provider: " + OpenSslErrors());
  }
  keyhold_ = OSSL_PROVIDER_load(libctx_, name.c_str());
  if (keyhold_ == nullptr) {
    Fail("cannot load " + module_path + ": " + OpenSslErrors());
  }
  // As conf/openssl-keyhold.cnf: prefer default where both offer an
  // algorithm; keyhold keys still go to keyhold.
  if (EVP_set_default_properties(libctx_, "?provider=default") != 1) {
    Fail("EVP_set_default_properties: " + OpenSslErrors());
  }
}

SslPtr<EVP_PKEY> ProviderEnv::LoadKey(const std::string& uri) {
  OSSL_STORE_CTX* store =
      OSSL_STORE_open_ex(uri.c_str(), libctx_, nullptr, nullptr, nullptr,
                         nullptr, nullptr, nullptr);
  if (store == nullptr) {
    Fail("OSSL_STORE_open_ex " + uri + ": " + OpenSslErrors());
  }
  EVP_PKEY* key = nullptr;
  while (key == nullptr && OSSL_STORE_eof(store) == 0) {
    OSSL_STORE_INFO* info = OSSL_STORE_load(store);
    if (info == nullptr) {
      break;
    }
    if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
      key = OSSL_STORE_INFO_get1_PKEY(info);
    }
    OSSL_STORE_INFO_free(info);
  }
  OSSL_STORE_close(store);
  if (key == nullptr) {
    Fail("no private key at " + uri + ": " + OpenSslErrors());
  }
  SslPtr<EVP_PKEY> out(key);
  // The key must live in keyhold, or a provider side would measure the
  // default provider.
  const OSSL_PROVIDER* prov = EVP_PKEY_get0_provider(key);
  if (prov == nullptr || prov != keyhold_) {
    Fail(uri + " was not loaded by the keyhold provider");
  }
  return out;
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

void ImportLocalKey(keyhold::client::Client& client, const std::string& name,
                    v1::KeyType type, EVP_PKEY* local,
                    std::vector<std::string>* created) {
  const std::string local_pub = PublicKeyDer(local);
  keyhold::SecretBytes pem = Pkcs8Pem(local);
  auto imported = client.ImportKey(keyhold::client::MakeKeyRef(name), pem);
  if (!imported.ok()) {
    Fail("ImportKey " + name + ": " + imported.status().ToString());
  }
  created->push_back(name);
  if (imported->info().type() != type) {
    Fail("ImportKey " + name + ": daemon reports type " +
         std::string(keyhold::KeyTypeName(imported->info().type())));
  }
  if (imported->public_key() != local_pub) {
    Fail("ImportKey " + name +
         ": the daemon's public key differs from the local key");
  }
}

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

// ---------------------------------------------------------------------------
// Options

bool ParseArgs(int argc, char** argv, const char* prog,
               const char* default_keyholdd, void (*usage)(const char*),
               CommonOptions* o, const ExtraArg& extra) {
  const char* env_daemon = std::getenv("KEYHOLDD");
  o->keyholdd_path = env_daemon != nullptr && *env_daemon != '\0'
                         ? env_daemon
                         : default_keyholdd;
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
      usage(argv[0]);
      std::exit(0);
    }
    auto need_value = [&]() -> bool {
      if (has_value) {
        return true;
      }
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s: %s needs a value\n", prog, arg.c_str());
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
        std::fprintf(stderr, "%s: %s: not a positive number: %s\n", prog,
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
          std::fprintf(stderr, "%s: bad thread count: %s\n", prog, t.c_str());
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
                       "%s: unsupported key type: %s (ec-p256, "
                       "ed25519, rsa-2048)\n",
                       prog, t.c_str());
          return false;
        }
        o->types.push_back(*type);
      }
    } else {
      const int handled = extra ? extra(arg,
                                        [&](std::string* out) {
                                          if (!need_value()) {
                                            return false;
                                          }
                                          *out = value;
                                          return true;
                                        })
                                : -1;
      if (handled == 0) {
        return false;
      }
      if (handled < 0) {
        std::fprintf(stderr, "%s: unknown argument: %s\n", prog, argv[i]);
        usage(argv[0]);
        return false;
      }
    }
  }
  return true;
}

// ---------------------------------------------------------------------------
// Interrupts

std::atomic<bool> g_interrupted{false};

namespace {
extern "C" void OnSignal(int) { g_interrupted.store(true); }
}  // namespace

void InstallSignalHandlers() {
  struct sigaction sa {};
  sa.sa_handler = OnSignal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

// ---------------------------------------------------------------------------
// Report header

void PrintHeader(const char* title, int argc, char** argv,
                 const char* build_type) {
  std::string command;
  for (int i = 0; i < argc; ++i) {
    command += (i ? " " : "") + ShellQuote(argv[i]);
  }
  struct utsname uts {};
  uname(&uts);

  std::printf("## %s\n\n", title);
  std::printf("- command: `%s`\n", command.c_str());
  std::printf("- date: %s\n", UtcNow().c_str());
  std::printf("- machine: nproc %u, CPU %s, kernel %s %s\n", NprocAffinity(),
              CpuModel().c_str(), uts.sysname, uts.release);
  std::printf("- load average at start: %s\n",
              Trim(ReadFile("/proc/loadavg")).c_str());
  std::printf("- OpenSSL: %s (built against %s)\n",
              OpenSSL_version(OPENSSL_VERSION), OPENSSL_VERSION_TEXT);
  std::printf("- build type: %s\n", build_type);
}

// ---------------------------------------------------------------------------
// The daemon we start ourselves

OwnDaemon::~OwnDaemon() {
  Stop();
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

void OwnDaemon::Start(const std::string& binary,
                      const std::string& dir_template,
                      bool world_readable_dir) {
  std::vector<char> tmpl(dir_template.begin(), dir_template.end());
  tmpl.push_back('\0');
  if (mkdtemp(tmpl.data()) == nullptr) {
    Fail(std::string("mkdtemp: ") + std::strerror(errno));
  }
  dir_ = tmpl.data();
  // 0755 like a system socket directory (mkdtemp makes it 0700).
  if (world_readable_dir && chmod(dir_.c_str(), 0755) != 0) {
    Fail(std::string("chmod: ") + std::strerror(errno));
  }
  binary_ = binary;
  socket_path_ = dir_ + "/keyhold.sock";
  log_path_ = dir_ + "/keyholdd.log";
  const std::string state_dir = dir_ + "/state";

  // Everything the child needs is prepared before fork().
  std::vector<std::string> args = {binary,        "--socket", socket_path_,
                                   "--state-dir", state_dir,  "--log-level",
                                   "warn"};
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
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

void OwnDaemon::WaitReady(keyhold::client::Client& client) {
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

std::string OwnDaemon::Stop() {
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

std::string OwnDaemon::DescribeStatus(int status) {
  if (WIFEXITED(status)) {
    return "exit status " + std::to_string(WEXITSTATUS(status));
  }
  if (WIFSIGNALED(status)) {
    return "signal " + std::to_string(WTERMSIG(status));
  }
  return "status " + std::to_string(status);
}

std::unique_ptr<keyhold::client::Client> StartAndConnect(
    const char* prog, const CommonOptions& o, const std::string& dir_template,
    bool world_readable_dir, OwnDaemon* daemon,
    const std::function<void(const std::string& socket_path)>& before_connect) {
  keyhold::client::Options copts;
  std::string daemon_desc;
  if (o.socket_path.empty()) {
    if (std::filesystem::exists("/etc/keyhold/keyholdd.toml")) {
      std::fprintf(stderr,
                   "%s: note: /etc/keyhold/keyholdd.toml exists; "
                   "the started keyholdd reads it\n",
                   prog);
    }
    daemon->Start(o.keyholdd_path, dir_template, world_readable_dir);
    copts.socket_path = daemon->socket_path();
    daemon_desc = "started by the benchmark: `" + o.keyholdd_path +
                  " --socket " + daemon->socket_path() +
                  " --state-dir <tmp>/state --log-level warn` (pid " +
                  std::to_string(daemon->pid()) + ")";
  } else {
    copts = keyhold::client::OptionsFromEnvironment();
    copts.socket_path = o.socket_path;
    daemon_desc = "already running at " + o.socket_path;
  }
  if (before_connect) {
    before_connect(copts.socket_path);
  }
  copts.connect_timeout = std::chrono::milliseconds(2000);
  copts.call_timeout = std::chrono::milliseconds(30000);
  auto client = std::make_unique<keyhold::client::Client>(copts);
  if (daemon->pid() > 0) {
    daemon->WaitReady(*client);
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
  return client;
}

std::string UniquePrefix(const std::string& base) {
  return base + "-" + std::to_string(getpid()) + "-" +
         std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count() %
                        1000000);
}

int Finish(const char* prog, int rc, const std::string& error,
           const CommonOptions& o, const std::vector<std::string>& created,
           std::unique_ptr<keyhold::client::Client>* client,
           OwnDaemon* daemon) {
  if (*client != nullptr && !o.socket_path.empty()) {
    for (const std::string& name : created) {
      keyhold::Status st =
          (*client)->DestroyKey(keyhold::client::MakeKeyRef(name));
      if (!st.ok()) {
        std::fprintf(stderr, "%s: warning: cannot destroy key %s: %s\n", prog,
                     name.c_str(), st.ToString().c_str());
      }
    }
  }
  client->reset();
  if (rc != 0) {
    std::fprintf(stderr, "%s: FAILED: %s\n", prog, error.c_str());
    if (daemon->pid() > 0) {
      const std::string log = daemon->Log();
      if (!log.empty()) {
        std::fprintf(stderr, "%s: keyholdd log:\n%s\n", prog, log.c_str());
      }
    }
  }
  const std::string note = daemon->Stop();
  if (!note.empty()) {
    std::fprintf(stderr, "%s: warning: %s\n", prog, note.c_str());
  }
  return rc;
}

// ---------------------------------------------------------------------------
// Timed runs

void Failure::Set(const std::string& m) {
  std::lock_guard<std::mutex> lock(mu);
  if (!failed.load()) {
    message = m;
    failed.store(true);
  }
}

bool RunSigners(const std::vector<std::unique_ptr<Signer>>& signers,
                double duration, bool record, Measurement* m, Failure* failure,
                const std::function<bool(std::size_t t)>& verify_last) {
  const std::size_t threads = signers.size();
  std::vector<std::vector<int64_t>> lat(threads);
  std::vector<Clock::time_point> started(threads);
  std::vector<Clock::time_point> finished(threads);
  Clock::time_point deadline;
  std::latch go(1);

  std::vector<std::thread> workers;
  for (std::size_t t = 0; t < threads; ++t) {
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
  for (std::size_t t = 0; t < threads; ++t) {
    if (!verify_last(t)) {
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

bool RunAbba(std::size_t config_index, double seconds, double warmup_seconds,
             const Segment& segment, Measurement* m_in, Measurement* m_other) {
  // ABBA; the next configuration starts with the other side.
  const bool in_first = config_index % 2 == 0;
  const bool order[4] = {in_first, !in_first, !in_first, in_first};
  std::optional<bool> previous;
  for (bool in_process : order) {
    if (previous != in_process) {
      segment(in_process, warmup_seconds, false, nullptr);
    }
    previous = in_process;
    segment(in_process, seconds / 2, true, in_process ? m_in : m_other);
  }
  return in_first;
}

// ---------------------------------------------------------------------------
// Report

Row MakeRow(const std::string& type_name, unsigned threads, Measurement* m_in,
            Measurement* m_other) {
  Row row;
  row.type_name = type_name;
  row.threads = threads;
  row.ops_in = static_cast<double>(m_in->ops) / m_in->seconds;
  row.ops_other = static_cast<double>(m_other->ops) / m_other->seconds;
  row.p50_in = PercentileUs(m_in->latency_ns, 0.50);
  row.p99_in = PercentileUs(m_in->latency_ns, 0.99);
  row.p50_other = PercentileUs(m_other->latency_ns, 0.50);
  row.p99_other = PercentileUs(m_other->latency_ns, 0.99);
  return row;
}

void PrintTable(const char* other, const std::vector<Row>& rows) {
  std::printf(
      "| key type | threads | in-process ops/s | %s ops/s | ratio "
      "(%s/in-process) | in-process p50/p99 µs | %s p50/p99 µs | "
      "added p50 µs |\n",
      other, other, other);
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf(
        "| %s | %u | %.0f | %.0f | %.1f%% | %.1f / %.1f | %.1f / %.1f | "
        "%+.1f |\n",
        r.type_name.c_str(), r.threads, r.ops_in, r.ops_other,
        100.0 * r.ops_other / r.ops_in, r.p50_in, r.p99_in, r.p50_other,
        r.p99_other, r.p50_other - r.p50_in);
  }
  std::printf("\n");
  std::fflush(stdout);
}

}  // namespace keyhold::bench
