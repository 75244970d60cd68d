// Code shared by the benchmarks (sign_bench, frontend_bench): option
// parsing, the Markdown header, the keyholdd the benchmark starts itself,
// keys, the timed worker loop in ABBA order, percentiles and the report
// table. Everything specific to one benchmark stays in its own .cc file.
#ifndef KEYHOLD_BENCH_BENCH_COMMON_H_
#define KEYHOLD_BENCH_BENCH_COMMON_H_

#include <openssl/evp.h>
#include <openssl/provider.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/client/client.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"

namespace keyhold::bench {

namespace v1 = keyhold::v1;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// Small helpers

std::string OpenSslErrors();

// Thrown for setup failures; Run() reports it and exits 1 after cleanup.
struct BenchError {
  std::string message;
};

[[noreturn]] void Fail(const std::string& message);

std::string ShellQuote(const std::string& s);
std::string ReadFile(const std::string& path);
std::string Trim(const std::string& s);
std::string CpuModel();
unsigned NprocAffinity();
std::string UtcNow();

// The cost of the IPC itself on this machine: a child echoes one byte over a
// socketpair; returns the median round trip in microseconds.
double SocketPairRoundTripMicros();

// ---------------------------------------------------------------------------
// Options

// The options every benchmark has.
struct CommonOptions {
  double seconds = 2.0;
  double warmup_seconds = 0.3;
  std::string socket_path;  // empty: start our own keyholdd
  std::string keyholdd_path;
  std::vector<unsigned> threads = {1, 2};
  std::vector<v1::KeyType> types = {v1::EC_P256, v1::ED25519, v1::RSA_2048};
};

std::optional<double> ParsePositiveDouble(const std::string& s);
std::vector<std::string> SplitComma(const std::string& s);

// Fetches the current option's value into *value; false (message printed)
// if it has none.
using GetValue = std::function<bool(std::string* value)>;
// A benchmark's own options: returns 1 if `arg` was handled, 0 on error
// (message printed), -1 if `arg` is not one of its options.
using ExtraArg =
    std::function<int(const std::string& arg, const GetValue& get_value)>;

// Parses argv into *o; `prog` prefixes messages, `usage` prints the usage,
// `default_keyholdd` is used unless $KEYHOLDD is set. --help exits 0.
bool ParseArgs(int argc, char** argv, const char* prog,
               const char* default_keyholdd, void (*usage)(const char*),
               CommonOptions* o, const ExtraArg& extra);

// ---------------------------------------------------------------------------
// Interrupts: Ctrl-C stops the run cleanly (keys destroyed, daemon stopped).

extern std::atomic<bool> g_interrupted;

// SIGINT and SIGTERM set g_interrupted.
void InstallSignalHandlers();

// ---------------------------------------------------------------------------
// Report header

// Prints "## title" and the command, date, machine, load, OpenSSL and build
// type lines.
void PrintHeader(const char* title, int argc, char** argv,
                 const char* build_type);

// ---------------------------------------------------------------------------
// The daemon we start ourselves

class OwnDaemon {
 public:
  OwnDaemon() = default;
  OwnDaemon(const OwnDaemon&) = delete;
  OwnDaemon& operator=(const OwnDaemon&) = delete;
  ~OwnDaemon();

  // dir_template: for mkdtemp(). world_readable_dir: chmod 0755 the
  // directory (mkdtemp makes it 0700).
  void Start(const std::string& binary, const std::string& dir_template,
             bool world_readable_dir);

  // Waits until the daemon answers a ping (up to 10 s).
  void WaitReady(keyhold::client::Client& client);

  // SIGTERM, wait up to 10 s, then SIGKILL. Returns a note if the exit was
  // not clean, else empty.
  std::string Stop();

  pid_t pid() const { return pid_; }
  const std::string& socket_path() const { return socket_path_; }
  std::string Log() const { return ReadFile(log_path_); }

 private:
  static std::string DescribeStatus(int status);

  std::string binary_;
  std::string dir_;
  std::string socket_path_;
  std::string log_path_;
  pid_t pid_ = -1;
};

// Starts our own daemon (unless o.socket_path names a running one), connects
// a client, waits for it, calls Hello and prints the keyholdd and floor
// lines. before_connect runs with the final socket path before the client is
// created.
std::unique_ptr<keyhold::client::Client> StartAndConnect(
    const char* prog, const CommonOptions& o, const std::string& dir_template,
    bool world_readable_dir, OwnDaemon* daemon,
    const std::function<void(const std::string& socket_path)>& before_connect);

// "<base>-<pid>-<ms % 1000000>": unique key names, so a shared running
// daemon is never disturbed.
std::string UniquePrefix(const std::string& base);

// Cleanup at the end of Run(): destroys `created` in a shared daemon (our
// own daemon's state directory is removed as a whole), resets the client,
// reports a failure with the daemon's log, stops the daemon. Returns rc.
int Finish(const char* prog, int rc, const std::string& error,
           const CommonOptions& o, const std::vector<std::string>& created,
           std::unique_ptr<keyhold::client::Client>* client, OwnDaemon* daemon);

// ---------------------------------------------------------------------------
// Keys

std::span<const uint8_t> Bytes(const std::string& s);
keyhold::SslPtr<EVP_PKEY> GenerateLocalKey(v1::KeyType type);

// A library context with the default and keyhold providers, like an
// application's OPENSSL_CONF with conf/openssl-keyhold.cnf.
class ProviderEnv {
 public:
  ProviderEnv() = default;
  ProviderEnv(const ProviderEnv&) = delete;
  ProviderEnv& operator=(const ProviderEnv&) = delete;
  ~ProviderEnv();

  // Loads keyhold.so from module_path. Throws BenchError on failure.
  void Load(const std::string& module_path);

  // The private key at `uri` (e.g. "keyhold:NAME"), which must come from the
  // keyhold provider. Throws BenchError otherwise.
  keyhold::SslPtr<EVP_PKEY> LoadKey(const std::string& uri);

  OSSL_LIB_CTX* libctx() const { return libctx_; }

 private:
  OSSL_LIB_CTX* libctx_ = nullptr;
  OSSL_PROVIDER* default_ = nullptr;
  OSSL_PROVIDER* keyhold_ = nullptr;
};
keyhold::SecretBytes Pkcs8Pem(EVP_PKEY* pkey);
std::string PublicKeyDer(EVP_PKEY* pkey);

// Imports `local` (PKCS#8 PEM) into the daemon as `name`, adds the name to
// *created and checks the type and public key the daemon reports.
void ImportLocalKey(keyhold::client::Client& client, const std::string& name,
                    v1::KeyType type, EVP_PKEY* local,
                    std::vector<std::string>* created);

// ---------------------------------------------------------------------------
// Timed runs

struct Failure {
  std::mutex mu;
  std::atomic<bool> failed{false};
  std::string message;
  void Set(const std::string& m);
};

// One worker's view of one side: Sign() performs exactly one timed op.
class Signer {
 public:
  virtual ~Signer() = default;
  virtual bool Sign(std::string* error) = 0;
  virtual std::span<const uint8_t> LastSignature() const = 0;
  // The signature is PKCS#11's raw ECDSA r||s.
  virtual bool RawEcdsa() const { return false; }
};

struct Measurement {
  uint64_t ops = 0;
  double seconds = 0;               // summed over segments
  std::vector<int64_t> latency_ns;  // every op of every thread
};

// Runs one worker thread per signer for `duration`. With record, calls
// verify_last(t) for each worker (it sets *failure and returns false if the
// last signature does not verify), then adds ops, elapsed time and latencies
// to *m. Returns false on failure (details in *failure).
bool RunSigners(const std::vector<std::unique_ptr<Signer>>& signers,
                double duration, bool record, Measurement* m, Failure* failure,
                const std::function<bool(std::size_t t)>& verify_last);

// One segment: in_process selects the side. Throws BenchError on failure.
using Segment = std::function<void(bool in_process, double duration,
                                   bool record, Measurement* m)>;

// One configuration in ABBA order (in-process first for even config_index,
// else the other side first), a warm-up before every change of side, each
// side measured in two halves of `seconds`. Returns whether in-process went
// first.
bool RunAbba(std::size_t config_index, double seconds, double warmup_seconds,
             const Segment& segment, Measurement* m_in, Measurement* m_other);

// Nearest-rank percentile in microseconds.
double PercentileUs(std::vector<int64_t>& v, double p);

// ---------------------------------------------------------------------------
// Report

struct Row {
  std::string type_name;
  unsigned threads = 0;
  double ops_in = 0;
  double ops_other = 0;
  double p50_in = 0;
  double p99_in = 0;
  double p50_other = 0;
  double p99_other = 0;
};

Row MakeRow(const std::string& type_name, unsigned threads, Measurement* m_in,
            Measurement* m_other);

// The Markdown table; `other` names the non-in-process side.
void PrintTable(const char* other, const std::vector<Row>& rows);

}  // namespace keyhold::bench

#endif  // KEYHOLD_BENCH_BENCH_COMMON_H_
