// SslPtr<T>: std::unique_ptr with the matching OpenSSL free function.
#ifndef KEYHOLD_COMMON_SSL_PTR_H_
#define KEYHOLD_COMMON_SSL_PTR_H_

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <memory>

namespace keyhold {

template <typename T>
struct SslDeleter;

// `type` names a type, which cannot be parenthesized.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define KH_SSL_DELETER(type, fn)              \
  template <>                                 \
  struct SslDeleter<type> {                   \
    void operator()(type* p) const { fn(p); } \
  }
// NOLINTEND(bugprone-macro-parentheses)

KH_SSL_DELETER(EVP_PKEY, EVP_PKEY_free);
KH_SSL_DELETER(EVP_PKEY_CTX, EVP_PKEY_CTX_free);
KH_SSL_DELETER(EVP_MD_CTX, EVP_MD_CTX_free);
KH_SSL_DELETER(EVP_CIPHER_CTX, EVP_CIPHER_CTX_free);
KH_SSL_DELETER(BIO, BIO_free_all);
KH_SSL_DELETER(BIGNUM, BN_free);
KH_SSL_DELETER(X509, X509_free);
KH_SSL_DELETER(EVP_MD, EVP_MD_free);

#undef KH_SSL_DELETER

template <typename T>
using SslPtr = std::unique_ptr<T, SslDeleter<T>>;

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_SSL_PTR_H_
