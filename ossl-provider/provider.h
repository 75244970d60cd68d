// Shared pieces of keyhold.so: the provider context, the lazily created
// client, the key object every operation works on, and the error boundary
// that every extern "C" entry point goes through.
#ifndef KEYHOLD_OSSL_PROVIDER_PROVIDER_H_
#define KEYHOLD_OSSL_PROVIDER_PROVIDER_H_

#include <openssl/core.h>
#include <openssl/core_dispatch.h>
#include <openssl/evp.h>

#include <cstdint>
#include <exception>
#include <string>

#include "common/client/client.h"
#include "common/status.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::ossl {

inline constexpr char kProviderName[] = "keyhold";
inline constexpr char kProps[] = "provider=keyhold";
// Where public-key work (hashing, verify, encoding) is done.
inline constexpr char kDefaultProps[] = "provider=default";

// Error reasons: 1 + keyhold::Code, plus a few of our own.
inline constexpr int kReasonInternal = 1 + static_cast<int>(Code::kInternal);
inline constexpr int kReasonBadArgument = 1 + static_cast<int>(Code::kInvalidArgument);
inline constexpr int kReasonUnsupported = 1 + static_cast<int>(Code::kUnsupported);
inline constexpr int kReasonException = 100;

struct ProvCtx {
  const OSSL_CORE_HANDLE* handle = nullptr;
};

// Pushes an error onto OpenSSL's queue; the text is shown after the reason.
void RaiseError(int reason, const std::string& message);
// "keyhold: keyhold:web: not found: key 'web' not found"
void RaiseStatus(const std::string& what, const Status& status);

// The one client of this process, created on first use (never at load).
client::Client& GlobalClient();

// A key as every operation sees it: where it lives in the daemon and its
// public half. A key made by import (a peer's or a certificate's public key)
// has no daemon reference.
struct Key {
  ProvCtx* prov = nullptr;
  bool has_ref = false;
  v1::KeyRef ref;
  std::string uri;  // "keyhold:NAME", for messages
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::string spki;  // DER SubjectPublicKeyInfo
  EVP_PKEY* pub = nullptr;  // made by the default provider
  std::string alg;  // "EC", "RSA", "ED25519", "X25519"

  Key() = default;
  Key(const Key&) = delete;
  Key& operator=(const Key&) = delete;
  ~Key();
  Key* Clone() const;
};

// Builds the public half from DER SPKI; sets spki, pub and alg.
Status SetPublicKey(Key& key, const std::string& spki_der);
// OpenSSL key type name for a keyhold key type.
const char* AlgName(v1::KeyType type);

// Whole contents of a core BIO (decoder input); false on a read error.
bool ReadCoreBio(OSSL_CORE_BIO* bio, std::string* out);
bool WriteCoreBio(OSSL_CORE_BIO* bio, const char* data, size_t len);
// "NAME" or "OWNER/NAME" (OWNER: user name or uid) -> KeyRef.
StatusOr<v1::KeyRef> ParseKeyRefUri(const std::string& text);
// "keyhold:..." -> KeyRef.
StatusOr<v1::KeyRef> ParseKeyUri(const std::string& uri);

// Dispatch tables (one per algorithm name where it matters).
extern const OSSL_DISPATCH kStoreFunctions[];
extern const OSSL_DISPATCH kPemDecoderFunctions[];
extern const OSSL_DISPATCH kRefEncoderFunctions[];
extern const OSSL_DISPATCH kEcDecoderFunctions[];
extern const OSSL_DISPATCH kRsaDecoderFunctions[];
extern const OSSL_DISPATCH kEd25519DecoderFunctions[];
extern const OSSL_DISPATCH kX25519DecoderFunctions[];
extern const OSSL_DISPATCH kEcKeymgmtFunctions[];
extern const OSSL_DISPATCH kRsaKeymgmtFunctions[];
extern const OSSL_DISPATCH kEd25519KeymgmtFunctions[];
extern const OSSL_DISPATCH kX25519KeymgmtFunctions[];
extern const OSSL_DISPATCH kEcdsaSignatureFunctions[];
extern const OSSL_DISPATCH kRsaSignatureFunctions[];
extern const OSSL_DISPATCH kEd25519SignatureFunctions[];
extern const OSSL_DISPATCH kRsaCipherFunctions[];
extern const OSSL_DISPATCH kEcdhExchangeFunctions[];
extern const OSSL_DISPATCH kX25519ExchangeFunctions[];

}  // namespace keyhold::ossl

// The boundary of every extern "C" entry point: no exception crosses into
// OpenSSL. `fail` is what the entry point returns when one is caught.
#define KH_OSSL_ENTRY(fail, ...)                                          \
  try {                                                                   \
    __VA_ARGS__                                                           \
  } catch (const std::exception& e) {                                     \
    ::keyhold::ossl::RaiseError(::keyhold::ossl::kReasonException,        \
                                std::string("keyhold: ") + e.what());     \
    return fail;                                                          \
  } catch (...) {                                                         \
    ::keyhold::ossl::RaiseError(::keyhold::ossl::kReasonException,        \
                                "keyhold: unknown exception");            \
    return fail;                                                          \
  }

#endif  // KEYHOLD_OSSL_PROVIDER_PROVIDER_H_
