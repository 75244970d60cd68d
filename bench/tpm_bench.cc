// tpm_bench: signing with a TPM-held key, keyhold's TPM backend versus
// tpm2-openssl, both on the same TPM (swtpm). One side per process run, so
// bench/tpm_compare.sh can give the TPM connection to one user at a time
// (swtpm serves one TCP client at a time) and run the sides in ABBA order.
//
//   tpm_bench --side keyhold --socket PATH [--backend tpm] [--seconds N]
//             [--many]    also: 10,000 ops over 20 ec-p256 keys, ops/s of the
//                         first and the last 1,000
//   tpm_bench --side tpm2-openssl --tcti TCTI [--seconds N]
//   both sides: [--api sign|digest-sign]
//
// Per key type (ec-p256, rsa-2048; ECDSA and RSA PKCS#1 v1.5 with SHA-256)
// prints one line: "side type ops seconds ops_per_s p50_us p90_us p99_us".
// The signature of the first and last op is verified with OpenSSL's default
// provider against the key's public key.
//
// --api sign (default): a signature over a SHA-256 digest the caller made,
// the path most favourable to tpm2-openssl (EVP_PKEY_sign: one TPM2_Sign).
// keyhold's side calls the client library's Sign().
// --api digest-sign: EVP_DigestSign over a 130-byte message (the size of a
// TLS 1.3 CertificateVerify input), a fresh EVP_MD_CTX per signature, which
// is what TLS, X.509, CMS and `openssl dgst` do. tpm2-openssl's signature
// then hashes in the TPM first (two TPM commands per signature, with the
// hash's ticket passed to TPM2_Sign); keyhold's side goes through keyhold.so
// (OSSL_STORE "keyhold:NAME", needs --provider), which hashes in the process
// and sends one request. The --many round signs with Sign() either way.
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench_common.h"
#include "common/client/client.h"
#include "common/key_types.h"
#include "common/ssl_ptr.h"

namespace {

using Clock = std::chrono::steady_clock;
using keyhold::SslPtr;
namespace v1 = keyhold::v1;

struct Options {
  std::string side;
  std::string socket;
  std::string backend = "tpm";
  std::string tcti;
  double seconds = 5;
  bool many = false;
  bool digest_sign = false;  // --api digest-sign
#ifdef KEYHOLD_PROVIDER_PATH
  std::string provider = KEYHOLD_PROVIDER_PATH;
#else
  std::string provider;
#endif
};

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "tpm_bench: %s\n", what.c_str());
  unsigned long e = 0;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    std::fprintf(stderr, "  %s\n", buf);
  }
  std::exit(1);
}

std::vector<uint8_t> Digest(const std::string& s) {
  std::vector<uint8_t> d(32);
  EVP_Digest(s.data(), s.size(), d.data(), nullptr, EVP_sha256(), nullptr);
  return d;
}

bool Verify(EVP_PKEY* pub, bool rsa, const std::vector<uint8_t>& digest,
            const std::string& sig) {
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pub, nullptr));
  if (ctx == nullptr || EVP_PKEY_verify_init(ctx.get()) != 1 ||
      (rsa &&
       EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) ||
      EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) != 1) {
    return false;
  }
  return EVP_PKEY_verify(ctx.get(),
                         reinterpret_cast<const unsigned char*>(sig.data()),
                         sig.size(), digest.data(), digest.size()) == 1;
}

SslPtr<EVP_PKEY> ParseSpki(const std::string& der) {
  const unsigned char* p = reinterpret_cast<const unsigned char*>(der.data());
  return SslPtr<EVP_PKEY>(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

// What --api digest-sign signs: 130 bytes, as the TLS 1.3 CertificateVerify
// input (64 spaces, a 33-byte context string, a zero byte, a SHA-256
// transcript hash).
const std::string& Message() {
  static const std::string m = std::string(64, ' ') +
                               "TLS 1.3, server CertificateVerify" +
                               std::string(1, '\0') + std::string(32, 'h');
  return m;
}

// One EVP_DigestSign (SHA-256; RSA PKCS#1 v1.5 or ECDSA) with a fresh
// EVP_MD_CTX, the signature implementation coming from the key's provider.
std::string DigestSign(OSSL_LIB_CTX* libctx, EVP_PKEY* key, bool rsa) {
  SslPtr<EVP_MD_CTX> md(EVP_MD_CTX_new());
  EVP_PKEY_CTX* pctx = nullptr;  // owned by md
  if (md == nullptr ||
      EVP_DigestSignInit_ex(md.get(), &pctx, "SHA256", libctx, nullptr, key,
                            nullptr) != 1 ||
      (rsa && EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_PADDING) != 1)) {
    Die("EVP_DigestSignInit_ex failed");
  }
  const auto* msg = reinterpret_cast<const unsigned char*>(Message().data());
  std::size_t len = 0;
  if (EVP_DigestSign(md.get(), nullptr, &len, msg, Message().size()) != 1) {
    Die("EVP_DigestSign (size) failed");
  }
  std::string sig(len, '\0');
  if (EVP_DigestSign(md.get(), reinterpret_cast<unsigned char*>(sig.data()),
                     &len, msg, Message().size()) != 1) {
    Die("EVP_DigestSign failed");
  }
  sig.resize(len);
  return sig;
}

void Report(const std::string& side, const std::string& type, std::size_t ops,
            double secs, std::vector<double>& lat_us) {
  std::sort(lat_us.begin(), lat_us.end());
  auto at = [&](double q) {
    return lat_us.empty()
               ? 0.0
               : lat_us[std::min(lat_us.size() - 1,
                                 static_cast<std::size_t>(
                                     q * static_cast<double>(lat_us.size())))];
  };
  std::printf("%s %s %zu %.2f %.1f %.0f %.0f %.0f\n", side.c_str(),
              type.c_str(), ops, secs, static_cast<double>(ops) / secs, at(0.5),
              at(0.9), at(0.99));
  std::fflush(stdout);
}

// Runs op until seconds have passed (after a 0.3 s warm-up).
template <typename Op>
void Timed(const Options& o, const std::string& type, Op op) {
  const auto warm_end = Clock::now() + std::chrono::milliseconds(300);
  while (Clock::now() < warm_end) {
    op();
  }
  std::vector<double> lat;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration<double>(o.seconds);
  std::size_t ops = 0;
  for (auto now = start; now < end;) {
    op();
    const auto after = Clock::now();
    lat.push_back(
        std::chrono::duration<double, std::micro>(after - now).count());
    now = after;
    ++ops;
  }
  const double secs =
      std::chrono::duration<double>(Clock::now() - start).count();
  Report(o.side, type, ops, secs, lat);
}

void RunKeyhold(const Options& o) {
  keyhold::client::Options co = keyhold::client::OptionsFromEnvironment();
  co.socket_path = o.socket;
  keyhold::client::Client client(co);
  std::unique_ptr<keyhold::bench::ProviderEnv> provider;
  if (o.digest_sign) {
    if (o.provider.empty()) {
      Die("--api digest-sign needs --provider PATH (keyhold.so)");
    }
    ::setenv("KEYHOLD_SOCKET", o.socket.c_str(), 1);
    provider = std::make_unique<keyhold::bench::ProviderEnv>();
    provider->Load(o.provider);
  }
  const std::vector<uint8_t> digest =
      o.digest_sign ? Digest(Message()) : Digest("tpm bench");
  const std::string prefix = "tpmbench-" + std::to_string(::getpid());
  for (v1::KeyType type : {v1::EC_P256, v1::RSA_2048}) {
    const bool rsa = type == v1::RSA_2048;
    v1::KeyRef ref;
    ref.set_name(prefix + "-" + std::string(keyhold::KeyTypeName(type)));
    auto made = client.GenerateKey(ref, type, o.backend);
    if (!made.ok()) {
      Die("GenerateKey: " + made.status().ToString());
    }
    SslPtr<EVP_PKEY> pub = ParseSpki(made->public_key());
    if (pub == nullptr) {
      Die("cannot parse the daemon's public key");
    }
    v1::SignRequest req;
    *req.mutable_key() = ref;
    req.set_algorithm(rsa ? v1::RSA_PKCS1 : v1::ECDSA);
    req.set_digest(v1::SHA256);
    req.set_data(digest.data(), digest.size());
    SslPtr<EVP_PKEY> key;
    if (provider != nullptr) {
      key = provider->LoadKey("keyhold:" + ref.name());
    }
    std::string last;
    auto sign = [&] {
      if (key != nullptr) {
        last = DigestSign(provider->libctx(), key.get(), rsa);
        return;
      }
      auto sig = client.Sign(req);
      if (!sig.ok()) {
        Die("Sign: " + sig.status().ToString());
      }
      last = std::move(*sig);
    };
    sign();
    if (!Verify(pub.get(), rsa, digest, last)) {
      Die("keyhold signature does not verify");
    }
    Timed(o, std::string(keyhold::KeyTypeName(type)), sign);
    if (!Verify(pub.get(), rsa, digest, last)) {
      Die("keyhold signature does not verify");
    }
  }
  if (o.many) {
    // 10,000 signatures over 20 keys in turn: more keys than the TPM has
    // slots, so this measures the LRU's load/flush path too.
    std::vector<v1::SignRequest> reqs;
    for (int i = 0; i < 20; ++i) {
      v1::KeyRef ref;
      ref.set_name(prefix + "-many-" + std::to_string(i));
      auto made = client.GenerateKey(ref, v1::EC_P256, o.backend);
      if (!made.ok()) {
        Die("GenerateKey: " + made.status().ToString());
      }
      v1::SignRequest req;
      *req.mutable_key() = ref;
      req.set_algorithm(v1::ECDSA);
      req.set_digest(v1::SHA256);
      req.set_data(digest.data(), digest.size());
      reqs.push_back(std::move(req));
    }
    constexpr int kOps = 10000;
    constexpr int kWindow = 1000;
    std::vector<double> first;
    std::vector<double> last;
    auto t0 = Clock::now();
    auto window_start = t0;
    double first_secs = 0;
    double last_secs = 0;
    for (int i = 0; i < kOps; ++i) {
      // Same key for 5 ops in a row, then the next: a realistic mix of hits
      // and misses (20 keys, 2 slots).
      const auto before = Clock::now();
      auto sig = client.Sign(reqs[static_cast<std::size_t>((i / 5) % 20)]);
      if (!sig.ok()) {
        Die("Sign (many) op " + std::to_string(i) + ": " +
            sig.status().ToString());
      }
      const double us =
          std::chrono::duration<double, std::micro>(Clock::now() - before)
              .count();
      if (i < kWindow) {
        first.push_back(us);
      } else if (i >= kOps - kWindow) {
        last.push_back(us);
      }
      if (i == kWindow - 1) {
        first_secs =
            std::chrono::duration<double>(Clock::now() - window_start).count();
      }
      if (i == kOps - kWindow) {
        window_start = before;
      }
    }
    last_secs =
        std::chrono::duration<double>(Clock::now() - window_start).count();
    Report(o.side, "ec-p256x20-first1000", kWindow, first_secs, first);
    Report(o.side, "ec-p256x20-last1000", kWindow, last_secs, last);
    const double all = std::chrono::duration<double>(Clock::now() - t0).count();
    std::vector<double> none;
    Report(o.side, "ec-p256x20-all10000", kOps, all, none);
  }
}

void RunTpm2OpenSsl(const Options& o) {
  if (!o.tcti.empty()) {
    ::setenv("TPM2OPENSSL_TCTI", o.tcti.c_str(), 1);
  }
  OSSL_LIB_CTX* libctx = OSSL_LIB_CTX_new();
  OSSL_PROVIDER* tpm2 = OSSL_PROVIDER_load(libctx, "tpm2");
  OSSL_PROVIDER* base = OSSL_PROVIDER_load(libctx, "default");
  if (libctx == nullptr || tpm2 == nullptr || base == nullptr) {
    Die("cannot load the tpm2 provider (Debian package tpm2-openssl)");
  }
  const std::vector<uint8_t> digest =
      o.digest_sign ? Digest(Message()) : Digest("tpm bench");
  for (v1::KeyType type : {v1::EC_P256, v1::RSA_2048}) {
    const bool rsa = type == v1::RSA_2048;
    EVP_PKEY* raw =
        rsa ? EVP_PKEY_Q_keygen(libctx, "provider=tpm2", "RSA",
                                static_cast<size_t>(2048))
            : EVP_PKEY_Q_keygen(libctx, "provider=tpm2", "EC", "P-256");
    if (raw == nullptr) {
      Die("tpm2-openssl key generation failed");
    }
    SslPtr<EVP_PKEY> key(raw);
    unsigned char* der = nullptr;
    const int der_len = i2d_PUBKEY(key.get(), &der);
    if (der_len <= 0) {
      Die("cannot export the tpm2 key's public key");
    }
    SslPtr<EVP_PKEY> pub = ParseSpki(std::string(
        reinterpret_cast<char*>(der), static_cast<std::size_t>(der_len)));
    OPENSSL_free(der);
    std::string last;
    // One context per signature, as keyhold's own in-process side does.
    auto sign = [&] {
      if (o.digest_sign) {
        last = DigestSign(libctx, key.get(), rsa);
        return;
      }
      SslPtr<EVP_PKEY_CTX> ctx(
          EVP_PKEY_CTX_new_from_pkey(libctx, key.get(), "provider=tpm2"));
      if (ctx == nullptr || EVP_PKEY_sign_init(ctx.get()) != 1 ||
          (rsa &&
           EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) ||
          EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()) != 1) {
        Die("tpm2-openssl sign setup failed");
      }
      std::size_t len = 0;
      if (EVP_PKEY_sign(ctx.get(), nullptr, &len, digest.data(),
                        digest.size()) != 1) {
        Die("tpm2-openssl sign (size) failed");
      }
      last.resize(len);
      if (EVP_PKEY_sign(ctx.get(),
                        reinterpret_cast<unsigned char*>(last.data()), &len,
                        digest.data(), digest.size()) != 1) {
        Die("tpm2-openssl sign failed");
      }
      last.resize(len);
    };
    sign();
    if (pub == nullptr || !Verify(pub.get(), rsa, digest, last)) {
      Die("tpm2-openssl signature does not verify");
    }
    Timed(o, std::string(keyhold::KeyTypeName(type)), sign);
    if (!Verify(pub.get(), rsa, digest, last)) {
      Die("tpm2-openssl signature does not verify");
    }
  }
  OSSL_PROVIDER_unload(tpm2);
  OSSL_PROVIDER_unload(base);
  OSSL_LIB_CTX_free(libctx);
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        Die("missing value for " + a);
      }
      return argv[++i];
    };
    if (a == "--side") {
      o.side = next();
    } else if (a == "--socket") {
      o.socket = next();
    } else if (a == "--backend") {
      o.backend = next();
    } else if (a == "--tcti") {
      o.tcti = next();
    } else if (a == "--seconds") {
      o.seconds = std::atof(next().c_str());
    } else if (a == "--many") {
      o.many = true;
    } else if (a == "--api") {
      const std::string api = next();
      if (api != "sign" && api != "digest-sign") {
        Die("--api sign or --api digest-sign");
      }
      o.digest_sign = api == "digest-sign";
    } else if (a == "--provider") {
      o.provider = next();
    } else {
      std::fprintf(stderr,
                   "usage: %s --side keyhold --socket PATH [--backend NAME] "
                   "[--many] [--provider PATH] | --side tpm2-openssl --tcti "
                   "TCTI; [--seconds N] [--api sign|digest-sign]\n",
                   argv[0]);
      return 2;
    }
  }
  if (o.side == "keyhold" && !o.socket.empty()) {
    try {
      RunKeyhold(o);
    } catch (const keyhold::bench::BenchError& e) {  // from ProviderEnv
      Die(e.message);
    }
  } else if (o.side == "tpm2-openssl") {
    RunTpm2OpenSsl(o);
  } else {
    std::fprintf(stderr, "tpm_bench: --side keyhold needs --socket\n");
    return 2;
  }
  return 0;
}
