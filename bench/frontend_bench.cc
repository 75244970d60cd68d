// frontend_bench: signing through keyhold's two front-ends versus signing
// in-process with the same key, side by side.
//
// For each front-end, key type (ec-p256, ed25519, rsa-2048) and thread count
// (1, 2) it measures two sides on the very same key and the same 64-byte
// message:
//   in-process  EVP_DigestSign (SHA-256; Ed25519 one-shot) with the key as a
//               plain EVP_PKEY in this process, one EVP_MD_CTX per signature;
//   provider    the same EVP_DigestSign with an EVP_PKEY loaded through
//               keyhold.so (OSSL_STORE "keyhold:NAME") in a library context
//               that has the default and keyhold providers loaded;
//   pkcs11      C_SignInit + C_Sign through libkeyhold-pkcs11.so (dlopen,
//               one session per thread), CKM_ECDSA_SHA256 / CKM_EDDSA /
//               CKM_SHA256_RSA_PKCS.
// and, with --frontends p11kit, the nearest existing design against the
// PKCS#11 module (not against in-process):
//   p11kit      C_SignInit + C_Sign through p11-kit-client.so to a
//               `p11-kit server` serving a SoftHSM2 token (bench/p11_compare.sh
//               starts it), versus the same calls through libkeyhold-pkcs11.so,
//               CKM_ECDSA over a SHA-256 digest (SoftHSM2 2.6 has no
//               CKM_ECDSA_SHA256) / CKM_EDDSA / CKM_SHA256_RSA_PKCS on both.
//               The key is imported into the token with C_CreateObject.
// The key is generated here with OpenSSL and imported into keyholdd with the
// client library (PKCS#8 PEM), so all sides sign with identical key material.
//
// Every configuration runs its two sides in ABBA order, with a warm-up before
// every change of side. Every op is checked; any failure aborts with exit
// status 1. Signatures are verified with the public key before timing and
// after every timed segment (the last signature of each thread; PKCS#11
// ECDSA's raw r||s is converted to DER first).
//
// The output is Markdown, like sign_bench's.
#include <dlfcn.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "bench/bench_common.h"
#include "common/client/client.h"
#include "common/key_types.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"
#include "common/status.h"

#ifdef KEYHOLD_PKCS11_PATH
// Last: p11-kit's compatibility names are macros (value, count, ...).
#include <p11-kit/pkcs11.h>
#endif

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

enum class Frontend { kProvider, kPkcs11, kP11Kit };

const char* FrontendName(Frontend f) {
  switch (f) {
    case Frontend::kProvider:
      return "provider";
    case Frontend::kPkcs11:
      return "pkcs11";
    default:
      return "p11kit";
  }
}

struct BenchOptions : CommonOptions {
#ifdef KEYHOLD_PROVIDER_PATH
  std::string provider_path = KEYHOLD_PROVIDER_PATH;
#else
  std::string provider_path;
#endif
#ifdef KEYHOLD_PKCS11_PATH
  std::string pkcs11_path = KEYHOLD_PKCS11_PATH;
#else
  std::string pkcs11_path;
#endif
  std::string p11kit_path;  // p11-kit-client.so; empty: no p11kit side
  std::string p11kit_pin = "1234";
  std::vector<Frontend> frontends = DefaultFrontends();

  static std::vector<Frontend> DefaultFrontends() {
    std::vector<Frontend> f;
#ifdef KEYHOLD_PROVIDER_PATH
    f.push_back(Frontend::kProvider);
#endif
#ifdef KEYHOLD_PKCS11_PATH
    f.push_back(Frontend::kPkcs11);
#endif
    return f;
  }
};

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
      "  --frontends LIST provider,pkcs11,p11kit (default: provider,pkcs11,\n"
      "                   those that were built)\n"
      "  --provider PATH  keyhold.so (default: the one built with this bench)\n"
      "  --pkcs11 PATH    libkeyhold-pkcs11.so (default: the one built with\n"
      "                   this bench)\n"
      "  --p11kit PATH    p11-kit-client.so; $P11_KIT_SERVER_ADDRESS must\n"
      "                   name a running `p11-kit server` (see\n"
      "                   bench/p11_compare.sh); needed for p11kit\n"
      "  --p11kit-pin PIN user PIN of the served token (default 1234)\n"
      "  --help\n",
      argv0);
}

// frontend_bench's own options (--provider, --pkcs11, --frontends).
bool ParseArgs(int argc, char** argv, BenchOptions* o) {
  return keyhold::bench::ParseArgs(
      argc, argv, "frontend_bench", KEYHOLDD_PATH, PrintUsage, o,
      [o](const std::string& arg, const GetValue& get_value) -> int {
        std::string value;
        if (arg == "--provider" || arg == "--pkcs11") {
          if (!get_value(&value)) {
            return 0;
          }
          (arg == "--provider" ? o->provider_path : o->pkcs11_path) = value;
          return 1;
        }
        if (arg == "--p11kit" || arg == "--p11kit-pin") {
          if (!get_value(&value)) {
            return 0;
          }
          (arg == "--p11kit" ? o->p11kit_path : o->p11kit_pin) = value;
          return 1;
        }
        if (arg == "--frontends") {
          if (!get_value(&value)) {
            return 0;
          }
          o->frontends.clear();
          for (const std::string& f : SplitComma(value)) {
            if (f == "provider" && !o->provider_path.empty()) {
              o->frontends.push_back(Frontend::kProvider);
            } else if (f == "pkcs11" && !o->pkcs11_path.empty()) {
              o->frontends.push_back(Frontend::kPkcs11);
            } else if (f == "p11kit" && !o->pkcs11_path.empty() &&
                       !o->p11kit_path.empty()) {
              o->frontends.push_back(Frontend::kP11Kit);
            } else {
              std::fprintf(stderr,
                           "frontend_bench: unknown or not built front-end: "
                           "%s (provider, pkcs11, p11kit; give --provider/"
                           "--pkcs11/--p11kit first)\n",
                           f.c_str());
              return 0;
            }
          }
          return 1;
        }
        return -1;
      });
}

// ---------------------------------------------------------------------------
// Keys and signatures

// ---------------------------------------------------------------------------
// Signing and verifying with EVP_DigestSign

const char* DigestName(v1::KeyType type) {
  return type == v1::ED25519 ? nullptr : "SHA256";
}

// One EVP_DigestSign with a fresh EVP_MD_CTX, as an application does it.
// libctx nullptr: the default library context. Returns the length, 0 on
// failure.
std::size_t DigestSign(OSSL_LIB_CTX* libctx, EVP_PKEY* pkey, v1::KeyType type,
                       std::span<const uint8_t> msg, uint8_t* sig,
                       std::size_t sig_cap) {
  std::size_t sig_len = sig_cap;
  EVP_MD_CTX* md_ctx = EVP_MD_CTX_new();
  const bool ok =
      md_ctx != nullptr &&
      EVP_DigestSignInit_ex(md_ctx, nullptr, DigestName(type), libctx, nullptr,
                            pkey, nullptr) == 1 &&
      EVP_DigestSign(md_ctx, sig, &sig_len, msg.data(), msg.size()) == 1;
  EVP_MD_CTX_free(md_ctx);
  return ok ? sig_len : 0;
}

// Raw r||s (PKCS#11 ECDSA) to a DER ECDSA-Sig-Value; empty on failure.
std::vector<uint8_t> RawEcdsaToDer(std::span<const uint8_t> raw) {
  if (raw.empty() || raw.size() % 2 != 0) {
    return {};
  }
  const int half = static_cast<int>(raw.size() / 2);
  ECDSA_SIG* sig = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(raw.data(), half, nullptr);
  BIGNUM* s = BN_bin2bn(raw.data() + half, half, nullptr);
  if (sig == nullptr || r == nullptr || s == nullptr ||
      ECDSA_SIG_set0(sig, r, s) != 1) {
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    return {};
  }
  unsigned char* der = nullptr;
  const int len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  if (len <= 0) {
    return {};
  }
  std::vector<uint8_t> out(der, der + len);
  OPENSSL_free(der);
  return out;
}

// Verifies with the public key in the default library context (never
// through keyhold). raw_ecdsa: the signature is PKCS#11's r||s.
bool Verify(EVP_PKEY* pub, v1::KeyType type, std::span<const uint8_t> msg,
            std::span<const uint8_t> sig, bool raw_ecdsa) {
  std::vector<uint8_t> der;
  if (raw_ecdsa && type == v1::EC_P256) {
    der = RawEcdsaToDer(sig);
    if (der.empty()) {
      return false;
    }
    sig = der;
  }
  SslPtr<EVP_MD_CTX> md_ctx(EVP_MD_CTX_new());
  return md_ctx != nullptr && !sig.empty() &&
         EVP_DigestVerifyInit_ex(md_ctx.get(), nullptr, DigestName(type),
                                 nullptr, "provider=default", pub,
                                 nullptr) == 1 &&
         EVP_DigestVerify(md_ctx.get(), sig.data(), sig.size(), msg.data(),
                          msg.size()) == 1;
}

// ---------------------------------------------------------------------------
// The front-ends

#ifdef KEYHOLD_PKCS11_PATH
std::string CkrName(CK_RV rv) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "CKR 0x%lx", static_cast<unsigned long>(rv));
  return buf;
}

// A PKCS#11 module (libkeyhold-pkcs11.so or p11-kit-client.so), dlopen()ed
// as a PKCS#11 application does, on its first slot with a token. It is
// finalized at the end but never dlclose()d (see tests/pkcs11).
class Pkcs11Env {
 public:
  Pkcs11Env() = default;
  Pkcs11Env(const Pkcs11Env&) = delete;
  Pkcs11Env& operator=(const Pkcs11Env&) = delete;
  ~Pkcs11Env() {
    if (f_ != nullptr) {
      if (setup_session_ != CK_INVALID_HANDLE) {
        f_->C_CloseSession(setup_session_);
      }
      f_->C_Finalize(nullptr);
    }
  }

  // pin: logs the setup session in as CKU_USER (which logs in every session
  // of this application) unless empty.
  void Load(const std::string& module_path, const std::string& pin) {
    lib_ = dlopen(module_path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib_ == nullptr) {
      Fail(std::string("dlopen: ") + dlerror());
    }
    auto get = reinterpret_cast<CK_C_GetFunctionList>(
        dlsym(lib_, "C_GetFunctionList"));
    if (get == nullptr) {
      Fail(module_path + " has no C_GetFunctionList");
    }
    CK_FUNCTION_LIST_PTR f = nullptr;
    if (CK_RV rv = get(&f); rv != CKR_OK || f == nullptr) {
      Fail("C_GetFunctionList: " + CkrName(rv));
    }
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    if (CK_RV rv = f->C_Initialize(&args); rv != CKR_OK) {
      Fail("C_Initialize: " + CkrName(rv));
    }
    f_ = f;
    CK_ULONG n = 1;
    CK_SLOT_ID slot = 0;
    if (CK_RV rv = f_->C_GetSlotList(CK_TRUE, &slot, &n);
        rv != CKR_OK || n < 1) {
      Fail("C_GetSlotList: " + CkrName(rv));
    }
    slot_ = slot;
    setup_session_ = OpenSession(nullptr);
    if (setup_session_ == CK_INVALID_HANDLE) {
      Fail("C_OpenSession failed");
    }
    if (!pin.empty()) {
      std::string p = pin;
      const CK_RV rv = f_->C_Login(setup_session_, CKU_USER,
                                   reinterpret_cast<CK_UTF8CHAR_PTR>(p.data()),
                                   static_cast<CK_ULONG>(p.size()));
      if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        Fail("C_Login: " + CkrName(rv));
      }
    }
  }

  // Imports `pkey`'s private key as a session object (CKA_TOKEN false,
  // CKA_PRIVATE, CKA_SENSITIVE, CKA_SIGN) labelled `label`; it lives as
  // long as the setup session. Returns its handle.
  CK_OBJECT_HANDLE ImportPrivateKey(const std::string& label, v1::KeyType type,
                                    EVP_PKEY* pkey) const {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_BBOOL yes = CK_TRUE;
    CK_BBOOL no = CK_FALSE;
    CK_KEY_TYPE key_type = CKK_EC;
    std::string l = label;
    std::vector<CK_ATTRIBUTE> t = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_KEY_TYPE, &key_type, sizeof key_type},
        {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_SIGN, &yes, sizeof yes},
        {CKA_LABEL, l.data(), static_cast<CK_ULONG>(l.size())}};
    // Owns the attribute values until C_CreateObject returns.
    std::vector<std::vector<uint8_t>> values;
    auto add = [&](CK_ATTRIBUTE_TYPE a, std::vector<uint8_t> v) {
      values.push_back(std::move(v));
      t.push_back({a, values.back().data(),
                   static_cast<CK_ULONG>(values.back().size())});
    };
    values.reserve(8);
    auto bn = [&](const char* name) {
      BIGNUM* b = nullptr;
      if (EVP_PKEY_get_bn_param(pkey, name, &b) != 1) {
        Fail(std::string("EVP_PKEY_get_bn_param ") + name + ": " +
             OpenSslErrors());
      }
      std::vector<uint8_t> out(static_cast<std::size_t>(BN_num_bytes(b)));
      BN_bn2bin(b, out.data());
      BN_clear_free(b);
      return out;
    };
    switch (type) {
      case v1::EC_P256: {
        // DER OID 1.2.840.10045.3.1.7 (prime256v1).
        add(CKA_EC_PARAMS,
            {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07});
        std::vector<uint8_t> d = bn(OSSL_PKEY_PARAM_PRIV_KEY);
        d.insert(d.begin(), 32 - std::min<std::size_t>(32, d.size()), 0);
        add(CKA_VALUE, std::move(d));
        break;
      }
      case v1::ED25519: {
        key_type = CKK_EC_EDWARDS;
        // DER OID 1.3.101.112 (Ed25519), as SoftHSM2 2.6 expects it.
        add(CKA_EC_PARAMS, {0x06, 0x03, 0x2b, 0x65, 0x70});
        std::vector<uint8_t> raw(32);
        std::size_t n = raw.size();
        if (EVP_PKEY_get_raw_private_key(pkey, raw.data(), &n) != 1 ||
            n != 32) {
          Fail("EVP_PKEY_get_raw_private_key: " + OpenSslErrors());
        }
        add(CKA_VALUE, std::move(raw));
        break;
      }
      default:
        key_type = CKK_RSA;
        add(CKA_MODULUS, bn(OSSL_PKEY_PARAM_RSA_N));
        add(CKA_PUBLIC_EXPONENT, bn(OSSL_PKEY_PARAM_RSA_E));
        add(CKA_PRIVATE_EXPONENT, bn(OSSL_PKEY_PARAM_RSA_D));
        add(CKA_PRIME_1, bn(OSSL_PKEY_PARAM_RSA_FACTOR1));
        add(CKA_PRIME_2, bn(OSSL_PKEY_PARAM_RSA_FACTOR2));
        add(CKA_EXPONENT_1, bn(OSSL_PKEY_PARAM_RSA_EXPONENT1));
        add(CKA_EXPONENT_2, bn(OSSL_PKEY_PARAM_RSA_EXPONENT2));
        add(CKA_COEFFICIENT, bn(OSSL_PKEY_PARAM_RSA_COEFFICIENT1));
        break;
    }
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    const CK_RV rv = f_->C_CreateObject(setup_session_, t.data(),
                                        static_cast<CK_ULONG>(t.size()), &h);
    for (auto& v : values) {
      OPENSSL_cleanse(v.data(), v.size());
    }
    if (rv != CKR_OK) {
      Fail("C_CreateObject (" + label + "): " + CkrName(rv));
    }
    return h;
  }

  // CK_INVALID_HANDLE on failure (with *error set if error is non-null).
  CK_SESSION_HANDLE OpenSession(std::string* error) const {
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    const CK_RV rv =
        f_->C_OpenSession(slot_, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
    if (rv != CKR_OK) {
      if (error != nullptr) {
        *error = "C_OpenSession: " + CkrName(rv);
      }
      return CK_INVALID_HANDLE;
    }
    return s;
  }

  CK_OBJECT_HANDLE FindPrivateKey(const std::string& label) const {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    std::string l = label;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                        {CKA_LABEL, l.data(), static_cast<CK_ULONG>(l.size())}};
    if (CK_RV rv = f_->C_FindObjectsInit(setup_session_, t, 2); rv != CKR_OK) {
      Fail("C_FindObjectsInit: " + CkrName(rv));
    }
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;
    const CK_RV rv = f_->C_FindObjects(setup_session_, found, 2, &n);
    f_->C_FindObjectsFinal(setup_session_);
    if (rv != CKR_OK || n != 1) {
      Fail("C_FindObjects for label " + label + ": " + CkrName(rv) + ", " +
           std::to_string(n) + " objects");
    }
    return found[0];
  }

  CK_FUNCTION_LIST_PTR f() const { return f_; }

 private:
  void* lib_ = nullptr;
  CK_FUNCTION_LIST_PTR f_ = nullptr;
  CK_SLOT_ID slot_ = 0;
  CK_SESSION_HANDLE setup_session_ = CK_INVALID_HANDLE;
};

// over_digest: ECDSA as CKM_ECDSA over a SHA-256 digest (the p11kit
// comparison; SoftHSM2 2.6 has no CKM_ECDSA_SHA256), else CKM_ECDSA_SHA256
// over the message.
CK_MECHANISM_TYPE Pkcs11Mechanism(v1::KeyType type, bool over_digest) {
  switch (type) {
    case v1::EC_P256:
      return over_digest ? CKM_ECDSA : CKM_ECDSA_SHA256;
    case v1::ED25519:
      return CKM_EDDSA;
    default:
      return CKM_SHA256_RSA_PKCS;
  }
}
#else
class Pkcs11Env {
 public:
  void Load(const std::string&, const std::string&) {
    Fail("built without the PKCS#11 module");
  }
};
#endif

struct BenchKey {
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::string type_name;
  std::string name;               // the imported key in keyholdd
  SslPtr<EVP_PKEY> local;         // plain EVP_PKEY (in-process side)
  SslPtr<EVP_PKEY> provider_key;  // the same key through keyhold.so
  unsigned long pkcs11_key = 0;   // CK_OBJECT_HANDLE of the private key
  unsigned long p11kit_key = 0;   // the same key in the p11-kit-served token
  bool p11kit_signs = true;       // false: p11-kit refuses the mechanism
};

// ---------------------------------------------------------------------------
// Timed runs

// EVP_DigestSign with a fresh EVP_MD_CTX per op: in-process (plain key,
// default library context) or provider (keyhold key, its library context).
class EvpSigner final : public Signer {
 public:
  EvpSigner(const char* side, OSSL_LIB_CTX* libctx, EVP_PKEY* pkey,
            const BenchKey& key, std::span<const uint8_t> msg)
      : side_(side), libctx_(libctx), pkey_(pkey), key_(key), msg_(msg) {}
  bool Sign(std::string* error) override {
    sig_len_ =
        DigestSign(libctx_, pkey_, key_.type, msg_, sig_.data(), sig_.size());
    if (sig_len_ == 0) {
      *error = std::string(side_) + " " + key_.type_name +
               " signature failed: " + OpenSslErrors();
      return false;
    }
    return true;
  }
  std::span<const uint8_t> LastSignature() const override {
    return {sig_.data(), sig_len_};
  }

 private:
  const char* side_;
  OSSL_LIB_CTX* libctx_;
  EVP_PKEY* pkey_;
  const BenchKey& key_;
  std::span<const uint8_t> msg_;
  std::vector<uint8_t> sig_ = std::vector<uint8_t>(1024);
  std::size_t sig_len_ = 0;
};

#ifdef KEYHOLD_PKCS11_PATH
// C_SignInit + C_Sign in this worker's own session (opened before timing)
// with `mechanism` on `input` (the message, or its SHA-256 digest for
// CKM_ECDSA).
class Pkcs11Signer final : public Signer {
 public:
  Pkcs11Signer(const char* side, const Pkcs11Env& env, const BenchKey& key,
               CK_OBJECT_HANDLE handle, CK_MECHANISM_TYPE mechanism,
               std::span<const uint8_t> input)
      : side_(side),
        f_(env.f()),
        key_(key),
        handle_(handle),
        mechanism_(mechanism),
        msg_(input.begin(), input.end()) {
    session_ = env.OpenSession(&open_error_);
  }
  ~Pkcs11Signer() override {
    if (session_ != CK_INVALID_HANDLE) {
      f_->C_CloseSession(session_);
    }
  }
  bool Sign(std::string* error) override {
    if (session_ == CK_INVALID_HANDLE) {
      *error = std::string(side_) + ": " + open_error_;
      return false;
    }
    CK_MECHANISM m{mechanism_, nullptr, 0};
    CK_RV rv = f_->C_SignInit(session_, &m, handle_);
    if (rv == CKR_OK) {
      sig_len_ = static_cast<CK_ULONG>(sig_.size());
      rv = f_->C_Sign(session_, msg_.data(), static_cast<CK_ULONG>(msg_.size()),
                      sig_.data(), &sig_len_);
    }
    if (rv != CKR_OK || sig_len_ == 0) {
      sig_len_ = 0;
      *error = std::string(side_) + " " + key_.type_name +
               " C_SignInit/C_Sign: " + CkrName(rv);
      return false;
    }
    return true;
  }
  std::span<const uint8_t> LastSignature() const override {
    return {sig_.data(), static_cast<std::size_t>(sig_len_)};
  }
  bool RawEcdsa() const override { return true; }

 private:
  const char* side_;
  CK_FUNCTION_LIST_PTR f_;
  const BenchKey& key_;
  CK_OBJECT_HANDLE handle_;
  CK_MECHANISM_TYPE mechanism_;
  std::vector<uint8_t> msg_;  // C_Sign takes a non-const pointer
  std::vector<uint8_t> sig_ = std::vector<uint8_t>(1024);
  CK_ULONG sig_len_ = 0;
  CK_SESSION_HANDLE session_ = CK_INVALID_HANDLE;
  std::string open_error_;
};
#endif

// Who signs. Each front-end's table compares two sides (SidesOf).
enum class Side {
  kInProcess,         // EVP_DigestSign, plain key
  kProvider,          // EVP_DigestSign, key through keyhold.so
  kPkcs11,            // libkeyhold-pkcs11.so, CKM_ECDSA_SHA256 for ECDSA
  kPkcs11OverDigest,  // libkeyhold-pkcs11.so, CKM_ECDSA over the digest
  kP11Kit,            // p11-kit-client.so, CKM_ECDSA over the digest
};

const char* SideName(Side side) {
  switch (side) {
    case Side::kInProcess:
      return "in-process";
    case Side::kProvider:
      return "provider";
    case Side::kPkcs11:
      return "pkcs11";
    case Side::kPkcs11OverDigest:
      return "keyhold pkcs11";
    default:
      return "p11-kit server";
  }
}

// The two sides of a front-end's table: {first column, second column}.
std::pair<Side, Side> SidesOf(Frontend f) {
  switch (f) {
    case Frontend::kProvider:
      return {Side::kInProcess, Side::kProvider};
    case Frontend::kPkcs11:
      return {Side::kInProcess, Side::kPkcs11};
    default:
      return {Side::kPkcs11OverDigest, Side::kP11Kit};
  }
}

struct Context {
  ProviderEnv* provider = nullptr;
  Pkcs11Env* pkcs11 = nullptr;
  Pkcs11Env* p11kit = nullptr;
  std::span<const uint8_t> msg;
  std::span<const uint8_t> digest;  // SHA-256 of msg
};

std::unique_ptr<Signer> MakeSigner(const Context& ctx, Side side,
                                   const BenchKey& key) {
  switch (side) {
    case Side::kInProcess:
      return std::make_unique<EvpSigner>("in-process", nullptr, key.local.get(),
                                         key, ctx.msg);
    case Side::kProvider:
      return std::make_unique<EvpSigner>("provider", ctx.provider->libctx(),
                                         key.provider_key.get(), key, ctx.msg);
    default:
      break;
  }
#ifdef KEYHOLD_PKCS11_PATH
  const bool over_digest = side != Side::kPkcs11;
  const std::span<const uint8_t> input =
      over_digest && key.type == v1::EC_P256 ? ctx.digest : ctx.msg;
  const bool p11kit = side == Side::kP11Kit;
  return std::make_unique<Pkcs11Signer>(
      SideName(side), p11kit ? *ctx.p11kit : *ctx.pkcs11, key,
      p11kit ? key.p11kit_key : key.pkcs11_key,
      Pkcs11Mechanism(key.type, over_digest), input);
#else
  Fail("built without the PKCS#11 module");
#endif
}

// Runs `threads` workers on one side for `duration`. With record, adds ops,
// elapsed time and latencies to *m and verifies each worker's last
// signature. Returns false on failure (details in *failure).
bool RunSegment(const Context& ctx, const BenchKey& key, Side side,
                unsigned threads, double duration, bool record, Measurement* m,
                Failure* failure) {
  std::vector<std::unique_ptr<Signer>> signers;
  for (unsigned t = 0; t < threads; ++t) {
    signers.push_back(MakeSigner(ctx, side, key));
  }
  return RunSigners(signers, duration, record, m, failure, [&](std::size_t t) {
    // An ECDSA signature over SHA-256(msg) verifies as a signature of msg.
    if (!Verify(key.local.get(), key.type, ctx.msg, signers[t]->LastSignature(),
                signers[t]->RawEcdsa())) {
      failure->Set(std::string(SideName(side)) + " " + key.type_name +
                   " signature from a timed segment does not verify");
      return false;
    }
    return true;
  });
}

// ---------------------------------------------------------------------------
// Setup

// Generates the key locally, imports it into keyholdd, checks the public key
// and that an in-process signature verifies.
void SetUpKey(keyhold::client::Client& client, v1::KeyType type,
              const std::string& prefix, std::span<const uint8_t> msg,
              BenchKey* key, std::vector<std::string>* created) {
  key->type = type;
  key->type_name = std::string(keyhold::KeyTypeName(type));
  key->local = GenerateLocalKey(type);
  key->name = prefix + "-" + key->type_name;
  {
    std::vector<uint8_t> sig(1024);
    const std::size_t n = DigestSign(nullptr, key->local.get(), type, msg,
                                     sig.data(), sig.size());
    if (n == 0 ||
        !Verify(key->local.get(), type, msg, {sig.data(), n}, false)) {
      Fail("in-process " + key->type_name +
           " sign/verify check failed: " + OpenSslErrors());
    }
  }
  ImportLocalKey(client, key->name, type, key->local.get(), created);
}

// One signature by each side of the front-end's table, verified with the
// local public key.
void CheckFrontend(const Context& ctx, Frontend frontend, const BenchKey& key) {
  const auto [a, b] = SidesOf(frontend);
  for (Side side : {a, b}) {
    auto signer = MakeSigner(ctx, side, key);
    std::string error;
    if (!signer->Sign(&error)) {
      Fail(error);
    }
    if (!Verify(key.local.get(), key.type, ctx.msg, signer->LastSignature(),
                signer->RawEcdsa())) {
      Fail(std::string(SideName(side)) + " " + key.type_name +
           " signature does not verify against the public key");
    }
  }
}

// The p11kit table: keyhold's PKCS#11 module against p11-kit-client.so.
void PrintP11KitTable(const std::vector<Row>& rows) {
  std::printf(
      "| key type | threads | keyhold pkcs11 ops/s | p11-kit server ops/s | "
      "ratio (keyhold/p11-kit) | keyhold p50/p99 µs | p11-kit p50/p99 µs |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::printf(
        "| %s | %u | %.0f | %.0f | %.2f× | %.1f / %.1f | %.1f / %.1f |\n",
        r.type_name.c_str(), r.threads, r.ops_in, r.ops_other,
        r.ops_in / r.ops_other, r.p50_in, r.p99_in, r.p50_other, r.p99_other);
  }
  std::printf("\n");
  std::fflush(stdout);
}

int Run(int argc, char** argv) {
  BenchOptions opt;
  if (!ParseArgs(argc, argv, &opt)) {
    return 2;
  }
  if (opt.frontends.empty()) {
    std::fprintf(stderr, "frontend_bench: no front-end to measure\n");
    return 2;
  }
  InstallSignalHandlers();
  PrintHeader("keyhold front-end benchmark", argc, argv, KH_BENCH_BUILD_TYPE);
  for (Frontend f : opt.frontends) {
    if (f == Frontend::kP11Kit) {
      const char* address = std::getenv("P11_KIT_SERVER_ADDRESS");
      std::printf("- p11kit: `%s` with P11_KIT_SERVER_ADDRESS=%s\n",
                  opt.p11kit_path.c_str(),
                  address != nullptr ? address : "(unset)");
      continue;
    }
    std::printf("- %s: `%s`\n", FrontendName(f),
                (f == Frontend::kProvider ? opt.provider_path : opt.pkcs11_path)
                    .c_str());
  }
  std::fflush(stdout);

  OwnDaemon daemon;
  std::vector<std::string> created;
  std::unique_ptr<keyhold::client::Client> client;
  // Destroyed before the client and the daemon (members free their keys
  // before the environments go).
  std::unique_ptr<ProviderEnv> provider;
  std::unique_ptr<Pkcs11Env> pkcs11;
  std::unique_ptr<Pkcs11Env> p11kit;
  std::vector<std::string> p11kit_notes;
  std::vector<std::unique_ptr<BenchKey>> keys;
  int rc = 0;
  std::string error;

  try {
    client = StartAndConnect("frontend_bench", opt,
                             "/tmp/keyhold-frontend-bench-XXXXXX", true,
                             &daemon, [](const std::string& socket_path) {
                               // The front-ends find the daemon through the
                               // environment.
                               setenv("KEYHOLD_SOCKET", socket_path.c_str(), 1);
                             });
    std::printf(
        "- method: per configuration %.2f s measured per side, in two "
        "halves in ABBA order, %.2f s warm-up before each change of side; "
        "latencies over all threads; every side signs the same 64-byte "
        "message (SHA-256 inside the signature operation; Ed25519 pure%s)\n\n",
        opt.seconds, opt.warmup_seconds,
        std::find(opt.frontends.begin(), opt.frontends.end(),
                  Frontend::kP11Kit) != opt.frontends.end()
            ? "; except in the p11kit table, where ECDSA is CKM_ECDSA over "
              "the message's SHA-256 digest on both sides"
            : "");
    std::fflush(stdout);

    std::vector<uint8_t> message(64);
    if (RAND_bytes(message.data(), 64) != 1) {
      Fail("RAND_bytes failed");
    }
    std::vector<uint8_t> digest(32);
    if (EVP_Digest(message.data(), message.size(), digest.data(), nullptr,
                   EVP_sha256(), nullptr) != 1) {
      Fail("EVP_Digest failed");
    }
    Context ctx;
    ctx.msg = message;
    ctx.digest = digest;

    const std::string prefix = UniquePrefix("frontend-bench");
    for (v1::KeyType type : opt.types) {
      auto key = std::make_unique<BenchKey>();
      SetUpKey(*client, type, prefix, message, key.get(), &created);
      keys.push_back(std::move(key));
    }

    for (Frontend f : opt.frontends) {
      if (f == Frontend::kProvider) {
        provider = std::make_unique<ProviderEnv>();
        provider->Load(opt.provider_path);
        ctx.provider = provider.get();
        for (auto& key : keys) {
          key->provider_key = provider->LoadKey("keyhold:" + key->name);
        }
      }
      if ((f == Frontend::kPkcs11 || f == Frontend::kP11Kit) &&
          pkcs11 == nullptr) {
        pkcs11 = std::make_unique<Pkcs11Env>();
        pkcs11->Load(opt.pkcs11_path, "");
        ctx.pkcs11 = pkcs11.get();
#ifdef KEYHOLD_PKCS11_PATH
        for (auto& key : keys) {
          key->pkcs11_key = pkcs11->FindPrivateKey(key->name);
        }
#endif
      }
      if (f == Frontend::kP11Kit) {
        p11kit = std::make_unique<Pkcs11Env>();
        p11kit->Load(opt.p11kit_path, opt.p11kit_pin);
        ctx.p11kit = p11kit.get();
#ifdef KEYHOLD_PKCS11_PATH
        for (auto& key : keys) {
          key->p11kit_key =
              p11kit->ImportPrivateKey(key->name, key->type, key->local.get());
          // p11-kit 0.24's RPC only carries mechanisms on its allow-list;
          // CKM_EDDSA is not on it, so the client refuses the call.
          auto probe = MakeSigner(ctx, Side::kP11Kit, *key);
          std::string probe_error;
          if (!probe->Sign(&probe_error) &&
              probe_error.ends_with(CkrName(CKR_MECHANISM_INVALID))) {
            key->p11kit_signs = false;
            p11kit_notes.push_back(
                key->type_name + ": p11-kit-client.so refuses its mechanism (" +
                probe_error + "), so it is not measured");
            std::fprintf(stderr,
                         "frontend_bench: p11kit %s: not measured: %s\n",
                         key->type_name.c_str(), probe_error.c_str());
          }
        }
#endif
      }
      for (auto& key : keys) {
        if (f == Frontend::kP11Kit && !key->p11kit_signs) {
          continue;
        }
        CheckFrontend(ctx, f, *key);
        std::fprintf(stderr,
                     "frontend_bench: %s %s: imported key matches, %s and "
                     "%s signatures verify\n",
                     FrontendName(f), key->type_name.c_str(),
                     SideName(SidesOf(f).first), SideName(SidesOf(f).second));
      }
    }

    Failure failure;
    for (Frontend f : opt.frontends) {
      const char* fe = FrontendName(f);
      const auto [side_a, side_b] = SidesOf(f);
      std::vector<Row> rows;
      std::size_t config_index = 0;
      for (const auto& key : keys) {
        if (f == Frontend::kP11Kit && !key->p11kit_signs) {
          continue;
        }
        for (unsigned threads : opt.threads) {
          Measurement m_in;
          Measurement m_fe;
          const bool in_first = RunAbba(
              config_index++, opt.seconds, opt.warmup_seconds,
              [&](bool in_process, double duration, bool record,
                  Measurement* m) {
                if (!RunSegment(ctx, *key, in_process ? side_a : side_b,
                                threads, duration, record, m, &failure)) {
                  Fail(failure.message);
                }
              },
              &m_in, &m_fe);
          Row row = MakeRow(key->type_name, threads, &m_in, &m_fe);
          std::fprintf(stderr,
                       "frontend_bench: %s %s x%u done (%s first): "
                       "%s %llu ops, %s %llu ops\n",
                       fe, row.type_name.c_str(), threads,
                       SideName(in_first ? side_a : side_b), SideName(side_a),
                       static_cast<unsigned long long>(m_in.ops),
                       SideName(side_b),
                       static_cast<unsigned long long>(m_fe.ops));
          rows.push_back(std::move(row));
        }
      }
      if (f == Frontend::kP11Kit) {
        std::printf(
            "### PKCS#11: libkeyhold-pkcs11.so vs SoftHSM2 through p11-kit "
            "server (p11-kit-client.so): C_SignInit + C_Sign\n\n");
        PrintP11KitTable(rows);
        for (const std::string& note : p11kit_notes) {
          std::printf("- %s\n", note.c_str());
        }
        if (!p11kit_notes.empty()) {
          std::printf("\n");
        }
        continue;
      }
      std::printf("### %s\n\n",
                  f == Frontend::kProvider
                      ? "OpenSSL provider (keyhold.so): EVP_DigestSign"
                      : "PKCS#11 (libkeyhold-pkcs11.so): C_SignInit + C_Sign");
      PrintTable(fe, rows);
    }
  } catch (const BenchError& e) {
    rc = 1;
    error = e.message;
  }

  // Cleanup: keys loaded through the front-ends, the front-ends, our keys
  // in a shared daemon, then our daemon.
  for (auto& key : keys) {
    key->provider_key.reset();
  }
  provider.reset();
  pkcs11.reset();
  p11kit.reset();
  return Finish("frontend_bench", rc, error, opt, created, &client, &daemon);
}

}  // namespace

int main(int argc, char** argv) { return Run(argc, argv); }
