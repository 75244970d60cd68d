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
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <span>
#include <string>
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

// ---------------------------------------------------------------------------
// Options

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

// ---------------------------------------------------------------------------
// Keys and signatures

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
  return RunSigners(signers, duration, record, m, failure, [&](std::size_t t) {
    if (!Verify(key.local.get(), key.type, Bytes(key.input),
                signers[t]->LastSignature())) {
      failure->Set(std::string(SideName(side)) + " " + key.type_name +
                   " signature from a timed segment does not verify");
      return false;
    }
    return true;
  });
}

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
  ImportLocalKey(client, key->imported_name, type, key->local.get(), created);
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
  CommonOptions opt;
  if (!ParseArgs(argc, argv, "sign_bench", KEYHOLDD_PATH, PrintUsage, &opt,
                 nullptr)) {
    return 2;
  }
  InstallSignalHandlers();
  PrintHeader("keyhold sign benchmark", argc, argv, KH_BENCH_BUILD_TYPE);
  std::fflush(stdout);

  OwnDaemon daemon;
  std::vector<std::string> created;
  std::unique_ptr<keyhold::client::Client> client;
  int rc = 0;
  std::string error;

  try {
    client = StartAndConnect("sign_bench", opt, "/tmp/keyhold-bench-XXXXXX",
                             false, &daemon, nullptr);
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
    const std::string prefix = UniquePrefix("sign-bench");

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
        Measurement m_in;
        Measurement m_kh;
        const bool in_first = RunAbba(
            config_index++, opt.seconds, opt.warmup_seconds,
            [&](bool in_process, double duration, bool record, Measurement* m) {
              if (!RunSegment(
                      *key, in_process ? Side::kInProcess : Side::kKeyhold,
                      threads, duration, *client, record, m, &failure)) {
                Fail(failure.message);
              }
            },
            &m_in, &m_kh);
        Row row = MakeRow(key->type_name, threads, &m_in, &m_kh);
        std::fprintf(stderr,
                     "sign_bench: %s x%u done (%s): in-process %llu ops, "
                     "keyhold %llu ops\n",
                     row.type_name.c_str(), threads,
                     in_first ? "in-process first" : "keyhold first",
                     static_cast<unsigned long long>(m_in.ops),
                     static_cast<unsigned long long>(m_kh.ops));
        rows.push_back(std::move(row));
      }
    }

    PrintTable("keyhold", rows);
  } catch (const BenchError& e) {
    rc = 1;
    error = e.message;
  }

  // Cleanup: our keys in a shared daemon (our own daemon's state directory
  // is removed as a whole), then our daemon.
  return Finish("sign_bench", rc, error, opt, created, &client, &daemon);
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
