// floor_signer: a signer with no work of its own besides the signature, to
// measure what crossing a process boundary costs by itself
// (bench/nginx_bench.sh --floor). NOT a key service: it holds private keys in
// its own memory and checks nobody's rights. Never run it outside a benchmark.
//
//   floor_signer --listen SOCKET --upstream KEYHOLDD_SOCKET
//                --key NAME=PEM [--key NAME=PEM ...]
//
// It speaks keyhold's wire protocol on SOCKET with one blocking thread per
// connection and no event loop: a Sign request for a key named on the command
// line is answered here (EVP_PKEY_sign over the caller's digest with a copy
// of a prepared context, as keyholdd's software backend signs); every other
// request (Hello, public keys, ...) is relayed unchanged to keyholdd on
// UPSTREAM over a connection of the same thread. Compared with keyholdd it
// leaves out the event loop, authorization, the key cache and store, the audit
// log and the statistics; what remains is the kernel's socket round trip, the
// protocol's framing and protobuf, and the signature.
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <tuple>
#include <utility>

#include "common/frame.h"
#include "common/key_types.h"
#include "common/ssl_ptr.h"
#include "keyhold/v1/keyhold.pb.h"

namespace {

namespace v1 = keyhold::v1;
using keyhold::SslPtr;

// Reads exactly n bytes; false on EOF or error.
bool ReadFull(int fd, void* buf, std::size_t n) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

bool WriteFull(int fd, const void* buf, std::size_t n) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

// One frame, header and body, into *frame.
bool ReadFrame(int fd, uint32_t max_body, std::string* frame) {
  uint8_t header[keyhold::kFrameHeaderBytes];
  if (!ReadFull(fd, header, sizeof header)) return false;
  auto length = keyhold::DecodeFrameHeader(header, max_body);
  if (!length.ok()) return false;
  frame->assign(reinterpret_cast<const char*>(header), sizeof header);
  frame->resize(sizeof header + *length);
  return ReadFull(fd, frame->data() + sizeof header, *length);
}

int Connect(const std::string& path) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  if (fd < 0 ||
      connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

// A signing context for key and the request's parameters, initialised as
// keyholdd's software backend does it; null on failure.
SslPtr<EVP_PKEY_CTX> Prepare(EVP_PKEY* key, const v1::SignRequest& req,
                             int salt) {
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(key, nullptr));
  const EVP_MD* md = keyhold::DigestMd(req.digest());
  if (ctx == nullptr || md == nullptr || EVP_PKEY_sign_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_signature_md(ctx.get(), md) != 1) {
    return nullptr;
  }
  if (req.algorithm() == v1::RSA_PKCS1 &&
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) {
    return nullptr;
  }
  if (req.algorithm() == v1::RSA_PSS) {
    const EVP_MD* mgf1 = req.pss_mgf1_digest() == v1::DIGEST_NONE
                             ? md
                             : keyhold::DigestMd(req.pss_mgf1_digest());
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), salt) != 1 ||
        mgf1 == nullptr || EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), mgf1) != 1) {
      return nullptr;
    }
  }
  return ctx;
}

// One connection thread's prepared contexts, by key and parameters. Each
// signature signs with a copy (EVP_PKEY_CTX_dup), as keyholdd's software
// backend does: setting a context up costs OpenSSL 3 more than the copy, and
// the floor must not pay what keyholdd does not.
using Templates =
    std::map<std::tuple<EVP_PKEY*, int, int, int, int>, SslPtr<EVP_PKEY_CTX>>;

// The signature over the caller's digest; empty on failure.
std::string Sign(Templates& templates, EVP_PKEY* key,
                 const v1::SignRequest& req) {
  const int requested = req.has_pss_salt_length() ? req.pss_salt_length() : -1;
  const int salt = requested == -2   ? RSA_PSS_SALTLEN_MAX
                   : requested == -1 ? RSA_PSS_SALTLEN_DIGEST
                                     : requested;
  SslPtr<EVP_PKEY_CTX>& tmpl = templates[std::make_tuple(
      key, req.algorithm(), req.digest(), salt, req.pss_mgf1_digest())];
  if (tmpl == nullptr && (tmpl = Prepare(key, req, salt)) == nullptr) {
    return {};
  }
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_dup(tmpl.get()));
  const auto* data = reinterpret_cast<const uint8_t*>(req.data().data());
  std::size_t len = 0;
  if (ctx == nullptr ||
      EVP_PKEY_sign(ctx.get(), nullptr, &len, data, req.data().size()) != 1) {
    return {};
  }
  std::string sig(len, '\0');
  if (EVP_PKEY_sign(ctx.get(), reinterpret_cast<uint8_t*>(sig.data()), &len,
                    data, req.data().size()) != 1) {
    return {};
  }
  sig.resize(len);
  return sig;
}

struct Shared {
  std::string upstream;
  std::map<std::string, SslPtr<EVP_PKEY>> keys;  // read-only after start
};

void Serve(const Shared& shared, int fd) {
  int up = -1;
  std::string frame;
  std::string answer;
  v1::Request req;
  v1::Response resp;
  Templates templates;
  while (ReadFrame(fd, keyhold::kDefaultMaxFrameBytes, &frame)) {
    const auto body = std::span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(frame.data()) +
            keyhold::kFrameHeaderBytes,
        frame.size() - keyhold::kFrameHeaderBytes);
    auto found = shared.keys.end();
    if (keyhold::DecodeRequest(body, &req).ok() && req.has_sign()) {
      found = shared.keys.find(req.sign().key().name());
    }
    if (found != shared.keys.end()) {
      resp.Clear();
      resp.set_id(req.id());
      std::string sig = Sign(templates, found->second.get(), req.sign());
      if (sig.empty()) {
        resp.set_code(v1::INTERNAL);
        resp.set_message("floor_signer: signing failed");
      } else {
        resp.set_code(v1::OK);
        *resp.mutable_sign()->mutable_signature() = std::move(sig);
      }
      auto encoded =
          keyhold::EncodeFrame(resp, keyhold::kMaxResponseFrameBytes);
      if (!encoded.ok() || !WriteFull(fd, encoded->data(), encoded->size())) {
        break;
      }
      continue;
    }
    // Everything else goes to keyholdd as is.
    if (up < 0 && (up = Connect(shared.upstream)) < 0) break;
    if (!WriteFull(up, frame.data(), frame.size()) ||
        !ReadFrame(up, keyhold::kMaxResponseFrameBytes, &answer) ||
        !WriteFull(fd, answer.data(), answer.size())) {
      break;
    }
  }
  if (up >= 0) close(up);
  close(fd);
}

void Usage(const char* prog) {
  std::fprintf(stderr,
               "usage: %s --listen SOCKET --upstream KEYHOLDD_SOCKET "
               "--key NAME=PEM [--key NAME=PEM ...]\n",
               prog);
}

}  // namespace

int main(int argc, char** argv) {
  std::string listen_path;
  auto shared = std::make_unique<Shared>();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      Usage(argv[0]);
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--listen") {
      listen_path = v;
    } else if (a == "--upstream") {
      shared->upstream = v;
    } else if (a == "--key" && v.find('=') != std::string::npos) {
      const std::string name = v.substr(0, v.find('='));
      const std::string path = v.substr(v.find('=') + 1);
      SslPtr<BIO> bio(BIO_new_file(path.c_str(), "r"));
      SslPtr<EVP_PKEY> key(
          bio == nullptr
              ? nullptr
              : PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
      if (key == nullptr) {
        std::fprintf(stderr, "floor_signer: cannot read a key from %s\n",
                     path.c_str());
        return 2;
      }
      shared->keys[name] = std::move(key);
    } else {
      Usage(argv[0]);
      return 2;
    }
  }
  if (listen_path.empty() || shared->upstream.empty() || shared->keys.empty()) {
    Usage(argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  const int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", listen_path.c_str());
  unlink(listen_path.c_str());
  if (lfd < 0 ||
      bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      chmod(listen_path.c_str(), 0666) != 0 || listen(lfd, 128) != 0) {
    std::fprintf(stderr, "floor_signer: cannot listen on %s: %s\n",
                 listen_path.c_str(), std::strerror(errno));
    return 1;
  }
  for (;;) {
    const int fd = accept4(lfd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::perror("floor_signer: accept");
      return 1;
    }
    std::thread([&s = *shared, fd] { Serve(s, fd); }).detach();
  }
}
