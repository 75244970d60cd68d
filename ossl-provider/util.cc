#include "ossl-provider/util.h"

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include <cstring>

#include "ossl-provider/provider.h"

namespace keyhold::ossl {
namespace {

struct PadName {
  int pad;
  const char* name;
};
constexpr PadName kPads[] = {
    {RSA_PKCS1_PADDING, OSSL_PKEY_RSA_PAD_MODE_PKCSV15},
    {RSA_NO_PADDING, OSSL_PKEY_RSA_PAD_MODE_NONE},
    {RSA_PKCS1_OAEP_PADDING, OSSL_PKEY_RSA_PAD_MODE_OAEP},
    {RSA_X931_PADDING, OSSL_PKEY_RSA_PAD_MODE_X931},
    {RSA_PKCS1_PSS_PADDING, OSSL_PKEY_RSA_PAD_MODE_PSS},
};

}  // namespace

bool Md::Set(const char* name) {
  if (name == nullptr) return false;
  EVP_MD* fetched = EVP_MD_fetch(nullptr, name, kDefaultProps);
  if (fetched == nullptr) return false;
  std::shared_ptr<EVP_MD> m(fetched, EVP_MD_free);
  v1::Digest w = v1::DIGEST_NONE;
  if (EVP_MD_is_a(fetched, "SHA1")) {
    w = v1::SHA1;
  } else if (EVP_MD_is_a(fetched, "SHA2-224")) {
    w = v1::SHA224;
  } else if (EVP_MD_is_a(fetched, "SHA2-256")) {
    w = v1::SHA256;
  } else if (EVP_MD_is_a(fetched, "SHA2-384")) {
    w = v1::SHA384;
  } else if (EVP_MD_is_a(fetched, "SHA2-512")) {
    w = v1::SHA512;
  } else {
    return false;
  }
  md = std::move(m);
  wire = w;
  return true;
}

v1::Digest DigestForLength(std::size_t len) {
  switch (len) {
    case 20:
      return v1::SHA1;
    case 28:
      return v1::SHA224;
    case 32:
      return v1::SHA256;
    case 48:
      return v1::SHA384;
    case 64:
      return v1::SHA512;
    default:
      return v1::DIGEST_NONE;
  }
}


bool ParsePadMode(const OSSL_PARAM* p, int* pad) {
  if (p->data_type == OSSL_PARAM_INTEGER) return OSSL_PARAM_get_int(p, pad) == 1;
  const char* name = nullptr;
  if (OSSL_PARAM_get_utf8_string_ptr(p, &name) != 1) return false;
  for (const auto& e : kPads) {
    if (std::strcmp(e.name, name) == 0) {
      *pad = e.pad;
      return true;
    }
  }
  return false;
}

bool GetPadMode(OSSL_PARAM* p, int pad) {
  if (p->data_type == OSSL_PARAM_INTEGER) return OSSL_PARAM_set_int(p, pad) == 1;
  for (const auto& e : kPads) {
    if (e.pad == pad) return OSSL_PARAM_set_utf8_string(p, e.name) == 1;
  }
  return false;
}

}  // namespace keyhold::ossl
