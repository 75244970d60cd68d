// tls_handshake_load: a load generator for full TLS handshakes.
//
// N client threads each loop for a fixed time: TCP connect to HOST:PORT,
// a full TLS handshake (a fresh SSL object, no session offered, no tickets
// requested, so the server can never resume), optionally one HTTP request
// "GET / ... Connection: close" read to the server's close, then close. It
// counts handshakes that succeeded and connections that failed, and prints
// one line of key=value pairs on stdout for scripts (bench/nginx_bench.sh):
//
//   handshakes=N failures=N resumed=N seconds=S rate=R client_cpu_s=C
//   protocol=P first_error="..."
//
// `rate` is handshakes per wall second, `client_cpu_s` the generator's own
// CPU time (user + system, all threads) during the run. Exit status: 0 if
// the run completed (even with failures; they are counted), 2 for bad
// arguments or setup errors.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string host = "127.0.0.1";
  int port = 0;
  double seconds = 10;
  unsigned threads = 2;
  int tls_version = TLS1_3_VERSION;
  std::string cafile;  // verify the server against it if set
  bool request = true;
};

void PrintUsage(const char* argv0) {
  std::fprintf(
      stderr,
      "usage: %s --port N [options]\n"
      "  --host ADDR      IPv4 address (default 127.0.0.1)\n"
      "  --port N         server port (required)\n"
      "  --seconds N      run time (default 10; fractions allowed)\n"
      "  --threads N      client threads, one connection at a time each\n"
      "                   (default 2)\n"
      "  --tls 1.3|1.2    the only protocol version offered (default 1.3;\n"
      "                   1.2 offers ECDHE AES-GCM suites only, so the\n"
      "                   server signs its key exchange)\n"
      "  --cafile PATH    verify the server certificate against PATH\n"
      "  --no-request     handshake only: no HTTP request after it\n",
      argv0);
}

bool ParseArgs(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help") {
      PrintUsage(argv[0]);
      std::exit(0);
    }
    if (arg == "--no-request") {
      o->request = false;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr,
                   "tls_handshake_load: %s needs a value or is "
                   "unknown\n",
                   arg.c_str());
      return false;
    }
    const std::string value = argv[++i];
    char* end = nullptr;
    if (arg == "--host") {
      o->host = value;
    } else if (arg == "--port") {
      const long p = std::strtol(value.c_str(), &end, 10);
      if (*end != '\0' || p <= 0 || p > 65535) {
        std::fprintf(stderr, "tls_handshake_load: bad port %s\n",
                     value.c_str());
        return false;
      }
      o->port = static_cast<int>(p);
    } else if (arg == "--seconds") {
      o->seconds = std::strtod(value.c_str(), &end);
      if (*end != '\0' || !(o->seconds > 0)) {
        std::fprintf(stderr, "tls_handshake_load: bad seconds %s\n",
                     value.c_str());
        return false;
      }
    } else if (arg == "--threads") {
      const long t = std::strtol(value.c_str(), &end, 10);
      if (*end != '\0' || t < 1 || t > 1024) {
        std::fprintf(stderr, "tls_handshake_load: bad threads %s\n",
                     value.c_str());
        return false;
      }
      o->threads = static_cast<unsigned>(t);
    } else if (arg == "--tls") {
      if (value == "1.3") {
        o->tls_version = TLS1_3_VERSION;
      } else if (value == "1.2") {
        o->tls_version = TLS1_2_VERSION;
      } else {
        std::fprintf(stderr, "tls_handshake_load: --tls 1.3 or 1.2\n");
        return false;
      }
    } else if (arg == "--cafile") {
      o->cafile = value;
    } else {
      std::fprintf(stderr, "tls_handshake_load: unknown option %s\n",
                   arg.c_str());
      PrintUsage(argv[0]);
      return false;
    }
  }
  if (o->port == 0) {
    std::fprintf(stderr, "tls_handshake_load: --port is required\n");
    return false;
  }
  return true;
}

std::string SslErrors() {
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
  return out.empty() ? "(no OpenSSL error)" : out;
}

double CpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  auto secs = [](const timeval& tv) {
    return static_cast<double>(tv.tv_sec) +
           static_cast<double>(tv.tv_usec) / 1e6;
  };
  return secs(ru.ru_utime) + secs(ru.ru_stime);
}

struct Totals {
  std::atomic<uint64_t> handshakes{0};
  std::atomic<uint64_t> failures{0};
  std::atomic<uint64_t> resumed{0};
  std::mutex mu;
  std::string first_error;
  std::string protocol;

  void Error(const std::string& e) {
    failures.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu);
    if (first_error.empty()) {
      first_error = e;
    }
  }
};

// One connection: connect, full handshake, optional request. Returns an
// empty string on success, else what failed.
std::string OneConnection(SSL_CTX* ctx, const sockaddr_in& addr,
                          const Options& o, const std::string& request,
                          Totals* totals) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    return std::string("socket: ") + std::strerror(errno);
  }
  // A stuck server must not hang the run.
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) !=
      0) {
    const std::string e = std::string("connect: ") + std::strerror(errno);
    close(fd);
    return e;
  }
  SSL* ssl = SSL_new(ctx);
  std::string error;
  if (ssl == nullptr || SSL_set_fd(ssl, fd) != 1 ||
      SSL_set1_host(ssl, o.host.c_str()) != 1) {
    error = "SSL_new: " + SslErrors();
  } else if (SSL_connect(ssl) != 1) {
    error = "SSL_connect: " + SslErrors();
  } else {
    if (SSL_session_reused(ssl) != 0) {
      totals->resumed.fetch_add(1, std::memory_order_relaxed);
    }
    if (o.request) {
      if (SSL_write(ssl, request.data(), static_cast<int>(request.size())) !=
          static_cast<int>(request.size())) {
        error = "SSL_write: " + SslErrors();
      } else {
        std::string response;
        char buf[4096];
        int n = 0;
        while ((n = SSL_read(ssl, buf, sizeof(buf))) > 0) {
          response.append(buf, static_cast<std::size_t>(n));
        }
        if (!response.starts_with("HTTP/1.1 200")) {
          error =
              "response is not 200: " + response.substr(0, response.find('\r'));
        }
      }
    }
    if (error.empty()) {
      SSL_shutdown(ssl);
      std::lock_guard<std::mutex> lock(totals->mu);
      if (totals->protocol.empty()) {
        totals->protocol = SSL_get_version(ssl);
      }
    }
  }
  ERR_clear_error();
  SSL_free(ssl);
  close(fd);
  return error;
}

int Run(int argc, char** argv) {
  Options o;
  if (!ParseArgs(argc, argv, &o)) {
    return 2;
  }
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(o.port));
  if (inet_pton(AF_INET, o.host.c_str(), &addr.sin_addr) != 1) {
    std::fprintf(stderr,
                 "tls_handshake_load: --host must be an IPv4 "
                 "address\n");
    return 2;
  }

  SSL_CTX* ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == nullptr ||
      SSL_CTX_set_min_proto_version(ctx, o.tls_version) != 1 ||
      SSL_CTX_set_max_proto_version(ctx, o.tls_version) != 1) {
    std::fprintf(stderr, "tls_handshake_load: SSL_CTX setup: %s\n",
                 SslErrors().c_str());
    return 2;
  }
  // Never resume: no client session cache, no tickets asked for; each
  // connection gets a fresh SSL object that offers no session.
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
  if (o.tls_version == TLS1_2_VERSION &&
      SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM") != 1) {
    std::fprintf(stderr, "tls_handshake_load: cipher list: %s\n",
                 SslErrors().c_str());
    return 2;
  }
  if (!o.cafile.empty()) {
    if (SSL_CTX_load_verify_locations(ctx, o.cafile.c_str(), nullptr) != 1) {
      std::fprintf(stderr, "tls_handshake_load: cannot load %s: %s\n",
                   o.cafile.c_str(), SslErrors().c_str());
      return 2;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, nullptr);
  }
  const std::string request =
      "GET / HTTP/1.1\r\nHost: " + o.host + "\r\nConnection: close\r\n\r\n";

  Totals totals;
  const double cpu_start = CpuSeconds();
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(o.seconds));
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < o.threads; ++t) {
    workers.emplace_back([&] {
      while (Clock::now() < deadline) {
        const std::string e = OneConnection(ctx, addr, o, request, &totals);
        if (e.empty()) {
          totals.handshakes.fetch_add(1, std::memory_order_relaxed);
        } else {
          totals.Error(e);
        }
      }
    });
  }
  for (auto& w : workers) {
    w.join();
  }
  const double wall =
      std::chrono::duration<double>(Clock::now() - start).count();
  const double cpu = CpuSeconds() - cpu_start;
  SSL_CTX_free(ctx);

  std::string first_error =
      totals.first_error.empty() ? "-" : totals.first_error;
  for (char& c : first_error) {
    if (c == '"') {
      c = '\'';
    }
  }
  const uint64_t n = totals.handshakes.load();
  std::printf(
      "handshakes=%llu failures=%llu resumed=%llu seconds=%.3f rate=%.1f "
      "client_cpu_s=%.3f protocol=%s first_error=\"%s\"\n",
      static_cast<unsigned long long>(n),
      static_cast<unsigned long long>(totals.failures.load()),
      static_cast<unsigned long long>(totals.resumed.load()), wall,
      static_cast<double>(n) / wall, cpu,
      totals.protocol.empty() ? "-" : totals.protocol.c_str(),
      first_error.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
