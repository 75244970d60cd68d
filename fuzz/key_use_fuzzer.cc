// key_use_fuzzer: a client's requests to use keys, handled by the daemon's
// real dispatcher, key store and software backend (daemon/dispatcher.cc,
// daemon/ops/crypto_ops.cc, daemon/ops/key_ops.cc, the software backend):
// every sign, decrypt and derive parameter, peer key and data length a
// client can send.
//
// Set up once per process: alice (uid 1001) imports an ec-p256, ec-p384,
// rsa-2048, ed25519 and x25519 key; bob (uid 1002) an ec-p256 and an
// rsa-2048 key, and grants alice the use of a third one ("shared"). The keys
// are made here, so their private parts are known.
//
// Input: byte 0 picks the caller (alice, bob, or root, an admin); the rest
// is a request body as a client sends it (DecodeRequest). Requests that
// change state (create, import, delete, grant, revoke, certificates, delete
// client) are skipped, so every input meets the same store.
//
// Invariants: no crash or sanitizer report; the response carries the
// request's id; no response (serialized, message included) contains any
// private part of any key; a request naming another uid's key fails unless
// that key was granted to the caller (root included: admin is not owner);
// list-keys shows the caller's keys and those granted to it, nothing else.
#include <google/protobuf/stubs/logging.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/frame.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"
#include "daemon/backends/software/software_backend.h"
#include "daemon/client_registry.h"
#include "daemon/dispatcher.h"
#include "daemon/keystore/key_store.h"
#include "daemon/ops/ops.h"
#include "fuzz/scratch_dir.h"

namespace {

using keyhold::SslPtr;
using keyhold::daemon::Dispatcher;
using keyhold::daemon::Principal;
namespace v1 = keyhold::v1;

constexpr uint32_t kAlice = 1001;
constexpr uint32_t kBob = 1002;

[[noreturn]] void Die(const std::string& why) {
  std::fprintf(stderr, "key_use_fuzzer: %s\n", why.c_str());
  std::abort();
}

// The private parts of a key, as big-endian bytes.
std::vector<std::string> PrivateParts(EVP_PKEY* key) {
  std::vector<std::string> parts;
  for (const char* name :
       {OSSL_PKEY_PARAM_RSA_D, OSSL_PKEY_PARAM_RSA_FACTOR1,
        OSSL_PKEY_PARAM_RSA_FACTOR2, OSSL_PKEY_PARAM_RSA_EXPONENT1,
        OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
        OSSL_PKEY_PARAM_PRIV_KEY}) {
    BIGNUM* bn = nullptr;
    if (EVP_PKEY_get_bn_param(key, name, &bn) == 1) {
      std::string bytes(static_cast<std::size_t>(BN_num_bytes(bn)), '\0');
      BN_bn2bin(bn, reinterpret_cast<unsigned char*>(bytes.data()));
      BN_clear_free(bn);
      parts.push_back(std::move(bytes));
    }
  }
  std::size_t len = 0;
  if (EVP_PKEY_get_raw_private_key(key, nullptr, &len) == 1) {
    std::string raw(len, '\0');
    EVP_PKEY_get_raw_private_key(
        key, reinterpret_cast<unsigned char*>(raw.data()), &len);
    parts.push_back(std::move(raw));
  }
  if (parts.empty()) {
    Die("no private part found");
  }
  return parts;
}

struct World {
  std::unique_ptr<keyhold::daemon::KeyStore> store;
  std::unique_ptr<keyhold::backend::software::SoftwareBackend> backend;
  keyhold::daemon::ClientRegistry clients;
  keyhold::daemon::OpContext ctx;
  std::unique_ptr<Dispatcher> dispatcher;
  std::vector<std::string> secrets;  // every key's private parts
  Principal alice{kAlice, kAlice, {}, 10, "/usr/bin/alice"};
  Principal bob{kBob, kBob, {}, 11, "/usr/bin/bob"};
  Principal root{0, 0, {}, 1, "/usr/sbin/admin"};

  v1::Response Run(const Principal& who, v1::Request& request) {
    return dispatcher->Handle(who, request);
  }

  void Import(const Principal& who, const std::string& name, EVP_PKEY* key) {
    SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
    if (PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr,
                                 nullptr) != 1) {
      Die("cannot write a PEM key");
    }
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    v1::Request req;
    req.set_id(1);
    req.mutable_import_key()->mutable_key()->set_name(name);
    req.mutable_import_key()->set_private_key(data,
                                              static_cast<std::size_t>(n));
    if (Run(who, req).code() != v1::OK) {
      Die("cannot import " + name);
    }
    for (std::string& part : PrivateParts(key)) {
      secrets.push_back(std::move(part));
    }
  }
};

World& TheWorld() {
  static const std::unique_ptr<World> world = [] {
    // Removed at exit after the world: its destructor registers later.
    const std::filesystem::path dir = keyhold::fuzz::ScratchDir("key-use-fuzz");
    // Invalid UTF-8 in a string field is a decode error like any other;
    // protobuf would also log each one.
    google::protobuf::SetLogHandler(nullptr);
    auto w = std::make_unique<World>();
    auto store = keyhold::daemon::KeyStore::Open(dir / "keys.db");
    auto backend = keyhold::backend::software::SoftwareBackend::Create(
        "software", dir / "master.key");
    if (!store.ok() || !backend.ok()) {
      Die("cannot set up the key store or backend");
    }
    w->store = std::move(*store);
    w->backend = std::move(*backend);
    w->ctx.store = w->store.get();
    w->ctx.backends["software"] = w->backend.get();
    w->ctx.default_backend = "software";
    w->ctx.clients = &w->clients;
    w->dispatcher = std::make_unique<Dispatcher>(&w->ctx);
    auto ec = [](const char* group) {
      return SslPtr<EVP_PKEY>(EVP_EC_gen(group));
    };
    auto rsa = [] { return SslPtr<EVP_PKEY>(EVP_RSA_gen(2048)); };
    auto raw = [](const char* type) {
      return SslPtr<EVP_PKEY>(EVP_PKEY_Q_keygen(nullptr, nullptr, type));
    };
    w->Import(w->alice, "ec", ec("P-256").get());
    w->Import(w->alice, "p384", ec("P-384").get());
    w->Import(w->alice, "rsa", rsa().get());
    w->Import(w->alice, "ed", raw("ED25519").get());
    w->Import(w->alice, "x", raw("X25519").get());
    w->Import(w->bob, "ec", ec("P-256").get());
    w->Import(w->bob, "rsa", rsa().get());
    w->Import(w->bob, "shared", ec("P-256").get());
    v1::Request grant;
    grant.set_id(2);
    grant.mutable_grant_use()->mutable_key()->set_name("shared");
    grant.mutable_grant_use()->mutable_grantee()->set_kind(v1::Grant::USER);
    grant.mutable_grant_use()->mutable_grantee()->set_id(kAlice);
    if (w->Run(w->bob, grant).code() != v1::OK) {
      Die("cannot grant");
    }
    return w;
  }();
  return *world;
}

bool ChangesState(v1::Request::OpCase op) {
  using R = v1::Request;
  switch (op) {
    case R::kHello:
    case R::kPing:
    case R::kGetPublicKey:
    case R::kListKeys:
    case R::kSign:
    case R::kDecrypt:
    case R::kDerive:
    case R::kListClients:
    case R::kStats:
      return false;
    default:
      return true;  // and unknown operations: nothing to check past decode
  }
}

// Whether caller may use owner's key `name` (no other grants exist).
bool MayUse(uint32_t caller, uint32_t owner, const std::string& name) {
  return owner == caller ||
         (caller == kAlice && owner == kBob && name == "shared");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  World& w = TheWorld();
  const Principal& who = data[0] % 3 == 0   ? w.alice
                         : data[0] % 3 == 1 ? w.bob
                                            : w.root;
  v1::Request request;
  if (!keyhold::DecodeRequest(std::span<const uint8_t>(data + 1, size - 1),
                              &request)
           .ok() ||
      ChangesState(request.op_case())) {
    return 0;
  }
  const v1::Request copy = request;  // the handler may wipe fields
  const v1::Response response = w.Run(who, request);
  if (response.id() != copy.id()) {
    Die("the response does not carry the request's id");
  }
  const std::string bytes = response.SerializeAsString();
  for (const std::string& secret : w.secrets) {
    if (bytes.find(secret) != std::string::npos) {
      Die("a private key part is in a response");
    }
  }
  for (const keyhold::daemon::OpEntry& entry : keyhold::daemon::OpTable()) {
    if (entry.op != copy.op_case() || entry.key_of == nullptr) {
      continue;
    }
    const v1::KeyRef& ref = entry.key_of(copy);
    const uint32_t owner = ref.has_owner() ? ref.owner() : who.uid;
    if (!MayUse(who.uid, owner, ref.name()) && response.code() == v1::OK) {
      Die("uid " + std::to_string(who.uid) + " used uid " +
          std::to_string(owner) + "'s key " + ref.name());
    }
  }
  if (response.has_list_keys()) {
    for (const v1::KeyInfo& k : response.list_keys().keys()) {
      if (!MayUse(who.uid, k.owner(), k.name())) {
        Die("list-keys showed uid " + std::to_string(k.owner()) + "'s key " +
            k.name() + " to uid " + std::to_string(who.uid));
      }
    }
  }
  return 0;
}
