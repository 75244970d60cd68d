// Digest and RSA padding helpers shared by the signature and cipher code.
#ifndef KEYHOLD_OSSL_PROVIDER_UTIL_H_
#define KEYHOLD_OSSL_PROVIDER_UTIL_H_

#include <openssl/core.h>
#include <openssl/evp.h>

#include <cstddef>
#include <memory>

#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::ossl {

// A digest fetched from the default provider, with its wire value.
struct Md {
  std::shared_ptr<EVP_MD> md;
  v1::Digest wire = v1::DIGEST_NONE;

  bool set() const { return md != nullptr; }
  // False for digests the daemon does not take.
  bool Set(const char* name);
};

// DIGEST_NONE if no supported digest has that length.
v1::Digest DigestForLength(std::size_t len);

// OSSL_*_PARAM_PAD_MODE as an int or a name ("pkcs1", "pss", "oaep", ...).
bool ParsePadMode(const OSSL_PARAM* p, int* pad);
bool GetPadMode(OSSL_PARAM* p, int pad);

}  // namespace keyhold::ossl

#endif  // KEYHOLD_OSSL_PROVIDER_UTIL_H_
