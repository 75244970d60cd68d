// ASYM_CIPHER (RSA decrypt: OAEP and PKCS#1 v1.5) and KEYEXCH (ECDH,
// X25519). Encryption needs no daemon: it is handed to the default provider
// with the key's public half (OpenSSL 3.0 copies a key to another provider
// only whole, which keyhold refuses). The peer of a key exchange arrives as
// a public-only key object (imported from the default provider) and is sent
// as DER SPKI.
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/rsa.h>

#include <cstring>
#include <memory>
#include <string>

#include "common/secret.h"
#include "common/ssl_ptr.h"
#include "ossl-provider/provider.h"
#include "ossl-provider/util.h"

namespace keyhold::ossl {
namespace {

// --- RSA decrypt ---

struct CipherCtx {
  ProvCtx* prov = nullptr;
  std::unique_ptr<Key> key;
  int pad = RSA_PKCS1_PADDING;
  Md oaep;
  Md mgf1;
  std::string label;
  // TLS 1.2 RSA key transport (RSA_PKCS1_WITH_TLS_PADDING, set by libssl).
  unsigned int tls_client_version = 0;
  unsigned int tls_negotiated_version = 0;
};

void* CipherNew(void* provctx) {
  KH_OSSL_ENTRY(nullptr, {
    auto* c = new CipherCtx();
    c->prov = static_cast<ProvCtx*>(provctx);
    return c;
  })
}

void CipherFree(void* ctx) {
  try {
    delete static_cast<CipherCtx*>(ctx);
  } catch (...) {
  }
}

void* CipherDup(void* ctx) {
  KH_OSSL_ENTRY(nullptr, {
    const auto* src = static_cast<CipherCtx*>(ctx);
    auto c = std::make_unique<CipherCtx>();
    c->prov = src->prov;
    if (src->key) {
      c->key.reset(src->key->Clone());
      if (!c->key) return nullptr;
    }
    c->pad = src->pad;
    c->oaep = src->oaep;
    c->mgf1 = src->mgf1;
    c->label = src->label;
    c->tls_client_version = src->tls_client_version;
    c->tls_negotiated_version = src->tls_negotiated_version;
    return c.release();
  })
}

int CipherSetParams(void* ctx, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<CipherCtx*>(ctx);
    if (params == nullptr) return 1;
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != nullptr) {
      int pad = 0;
      if (!ParsePadMode(p, &pad) ||
          (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_OAEP_PADDING &&
           pad != RSA_PKCS1_WITH_TLS_PADDING)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported RSA padding mode");
        return 0;
      }
      c->pad = pad;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != nullptr) {
      const char* name = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !c->oaep.Set(name)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported OAEP digest");
        return 0;
      }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST);
    if (p != nullptr) {
      const char* name = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !c->mgf1.Set(name)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported MGF1 digest");
        return 0;
      }
    }
    p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL);
    if (p != nullptr) {
      const void* data = nullptr;
      size_t len = 0;
      if (!OSSL_PARAM_get_octet_string_ptr(p, &data, &len)) return 0;
      c->label.assign(static_cast<const char*>(data), len);
    }
    p = OSSL_PARAM_locate_const(params,
                                OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION);
    if (p != nullptr && !OSSL_PARAM_get_uint(p, &c->tls_client_version))
      return 0;
    p = OSSL_PARAM_locate_const(params,
                                OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION);
    if (p != nullptr && !OSSL_PARAM_get_uint(p, &c->tls_negotiated_version))
      return 0;
    return 1;
  })
}

int CipherGetParams(void* ctx, OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<CipherCtx*>(ctx);
    OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE);
    if (p != nullptr && !GetPadMode(p, c->pad)) return 0;
    p = OSSL_PARAM_locate(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST);
    if (p != nullptr &&
        !OSSL_PARAM_set_utf8_string(p, c->oaep.set() ? EVP_MD_get0_name(c->oaep.md.get())
                                                     : "SHA1")) {
      return 0;
    }
    return 1;
  })
}

int CipherInit(void* ctx, void* provkey, const OSSL_PARAM params[],
               bool encrypt) {
  {
    auto* c = static_cast<CipherCtx*>(ctx);
    auto* k = static_cast<Key*>(provkey);
    if (k == nullptr || (!encrypt && !k->has_ref)) {
      RaiseError(kReasonBadArgument, "keyhold: not a keyhold private key");
      return 0;
    }
    c->key.reset(k->Clone());
    if (!c->key) return 0;
    c->pad = RSA_PKCS1_PADDING;
    c->oaep = Md();
    c->mgf1 = Md();
    c->label.clear();
    c->tls_client_version = 0;
    c->tls_negotiated_version = 0;
    return CipherSetParams(c, params);
  }
}

int CipherDecryptInit(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, { return CipherInit(ctx, provkey, params, false); })
}

int CipherEncryptInit(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, { return CipherInit(ctx, provkey, params, true); })
}

int CipherEncrypt(void* ctx, unsigned char* out, size_t* outlen, size_t outsize,
                  const unsigned char* in, size_t inlen) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<CipherCtx*>(ctx);
    if (!c->key || c->key->pub == nullptr) return 0;
    if (c->pad != RSA_PKCS1_PADDING && c->pad != RSA_PKCS1_OAEP_PADDING) {
      RaiseError(kReasonUnsupported, "keyhold: unsupported RSA padding mode");
      return 0;
    }
    SslPtr<EVP_PKEY_CTX> pctx(
        EVP_PKEY_CTX_new_from_pkey(nullptr, c->key->pub, kDefaultProps));
    if (pctx == nullptr || EVP_PKEY_encrypt_init(pctx.get()) != 1 ||
        EVP_PKEY_CTX_set_rsa_padding(pctx.get(), c->pad) != 1) {
      return 0;
    }
    if (c->pad == RSA_PKCS1_OAEP_PADDING) {
      if ((c->oaep.set() &&
           EVP_PKEY_CTX_set_rsa_oaep_md(pctx.get(), c->oaep.md.get()) != 1) ||
          (c->mgf1.set() &&
           EVP_PKEY_CTX_set_rsa_mgf1_md(pctx.get(), c->mgf1.md.get()) != 1)) {
        return 0;
      }
      if (!c->label.empty()) {
        // set0 takes ownership of an OPENSSL_malloc'ed copy.
        void* label = OPENSSL_memdup(c->label.data(), c->label.size());
        if (label == nullptr ||
            EVP_PKEY_CTX_set0_rsa_oaep_label(
                pctx.get(), label, static_cast<int>(c->label.size())) != 1) {
          OPENSSL_free(label);
          return 0;
        }
      }
    }
    size_t len = outsize;
    if (out == nullptr) {
      return EVP_PKEY_encrypt(pctx.get(), nullptr, outlen, in, inlen) == 1 ? 1
                                                                           : 0;
    }
    if (EVP_PKEY_encrypt(pctx.get(), out, &len, in, inlen) != 1) return 0;
    *outlen = len;
    return 1;
  })
}

int CipherDecrypt(void* ctx, unsigned char* out, size_t* outlen, size_t outsize,
                  const unsigned char* in, size_t inlen) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<CipherCtx*>(ctx);
    if (!c->key || c->key->pub == nullptr) return 0;
    if (out == nullptr) {
      *outlen = static_cast<size_t>(EVP_PKEY_get_size(c->key->pub));
      return 1;
    }
    v1::DecryptRequest req;
    *req.mutable_key() = c->key->ref;
    if (c->pad == RSA_PKCS1_OAEP_PADDING) {
      req.set_algorithm(v1::RSA_OAEP);
      req.set_oaep_digest(c->oaep.set() ? c->oaep.wire : v1::SHA1);
      req.set_oaep_mgf1_digest(c->mgf1.set() ? c->mgf1.wire : req.oaep_digest());
      req.set_oaep_label(c->label);
    } else if (c->pad == RSA_PKCS1_WITH_TLS_PADDING) {
      // The daemon checks padding and version in constant time and answers
      // random bytes on a mismatch: no Bleichenbacher oracle.
      req.set_algorithm(v1::RSA_TLS_PREMASTER);
      req.set_tls_client_version(c->tls_client_version);
      req.set_tls_negotiated_version(c->tls_negotiated_version);
    } else {
      req.set_algorithm(v1::RSA_PKCS1_V15);
    }
    req.set_ciphertext(in, inlen);
    auto r = GlobalClient().Decrypt(req);
    if (!r.ok()) {
      RaiseStatus(c->key->uri, r.status());
      return 0;
    }
    auto plain = r->Expose(SecretAccess::kToken);
    if (plain.size() > outsize) {
      RaiseError(kReasonInternal, "keyhold: output buffer too small");
      return 0;
    }
    std::memcpy(out, plain.data(), plain.size());
    *outlen = plain.size();
    return 1;
  })
}

const OSSL_PARAM kCipherSettable[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, nullptr,
                           0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, nullptr,
                           0),
    OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, nullptr, 0),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION, nullptr),
    OSSL_PARAM_uint(OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, nullptr),
    OSSL_PARAM_END};
const OSSL_PARAM kCipherGettable[] = {
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM* CipherSettable(void*, void*) { return kCipherSettable; }
const OSSL_PARAM* CipherGettable(void*, void*) { return kCipherGettable; }

// --- ECDH / X25519 ---

struct ExchCtx {
  ProvCtx* prov = nullptr;
  std::unique_ptr<Key> key;
  std::unique_ptr<Key> peer;
};

void* ExchNew(void* provctx) {
  KH_OSSL_ENTRY(nullptr, {
    auto* c = new ExchCtx();
    c->prov = static_cast<ProvCtx*>(provctx);
    return c;
  })
}

void ExchFree(void* ctx) {
  try {
    delete static_cast<ExchCtx*>(ctx);
  } catch (...) {
  }
}

void* ExchDup(void* ctx) {
  KH_OSSL_ENTRY(nullptr, {
    const auto* src = static_cast<ExchCtx*>(ctx);
    auto c = std::make_unique<ExchCtx>();
    c->prov = src->prov;
    if (src->key) {
      c->key.reset(src->key->Clone());
      if (!c->key) return nullptr;
    }
    if (src->peer) {
      c->peer.reset(src->peer->Clone());
      if (!c->peer) return nullptr;
    }
    return c.release();
  })
}

int ExchInit(void* ctx, void* provkey, const OSSL_PARAM[]) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<ExchCtx*>(ctx);
    auto* k = static_cast<Key*>(provkey);
    if (k == nullptr || !k->has_ref) {
      RaiseError(kReasonBadArgument, "keyhold: not a keyhold private key");
      return 0;
    }
    c->key.reset(k->Clone());
    return c->key ? 1 : 0;
  })
}

int ExchSetPeer(void* ctx, void* provkey) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<ExchCtx*>(ctx);
    auto* k = static_cast<Key*>(provkey);
    if (k == nullptr || k->spki.empty()) return 0;
    c->peer.reset(k->Clone());
    return c->peer ? 1 : 0;
  })
}

int ExchDerive(void* ctx, unsigned char* secret, size_t* secretlen, size_t outlen) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<ExchCtx*>(ctx);
    if (!c->key || c->key->pub == nullptr) return 0;
    const auto size = static_cast<size_t>((EVP_PKEY_get_bits(c->key->pub) + 7) / 8);
    if (secret == nullptr) {
      *secretlen = size;
      return 1;
    }
    if (!c->peer) {
      RaiseError(kReasonBadArgument, "keyhold: no peer key");
      return 0;
    }
    const auto& spki = c->peer->spki;
    auto r = GlobalClient().Derive(
        c->key->ref, std::span<const uint8_t>(
                         reinterpret_cast<const uint8_t*>(spki.data()), spki.size()));
    if (!r.ok()) {
      RaiseStatus(c->key->uri, r.status());
      return 0;
    }
    auto s = r->Expose(SecretAccess::kToken);
    if (s.size() > outlen) {
      RaiseError(kReasonInternal, "keyhold: output buffer too small");
      return 0;
    }
    std::memcpy(secret, s.data(), s.size());
    *secretlen = s.size();
    return 1;
  })
}

const OSSL_PARAM kExchSettable[] = {OSSL_PARAM_END};
const OSSL_PARAM* ExchSettable(void*, void*) { return kExchSettable; }
int ExchSetParams(void*, const OSSL_PARAM[]) { return 1; }

}  // namespace

#define KH_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }

const OSSL_DISPATCH kRsaCipherFunctions[] = {
    KH_FN(OSSL_FUNC_ASYM_CIPHER_NEWCTX, CipherNew),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_FREECTX, CipherFree),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_DUPCTX, CipherDup),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, CipherDecryptInit),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_DECRYPT, CipherDecrypt),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_ENCRYPT_INIT, CipherEncryptInit),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_ENCRYPT, CipherEncrypt),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_GET_CTX_PARAMS, CipherGetParams),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_GETTABLE_CTX_PARAMS, CipherGettable),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, CipherSetParams),
    KH_FN(OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, CipherSettable),
    {0, nullptr}};

#define KH_EXCH_TABLE                                                 \
  {KH_FN(OSSL_FUNC_KEYEXCH_NEWCTX, ExchNew),                          \
   KH_FN(OSSL_FUNC_KEYEXCH_FREECTX, ExchFree),                        \
   KH_FN(OSSL_FUNC_KEYEXCH_DUPCTX, ExchDup),                          \
   KH_FN(OSSL_FUNC_KEYEXCH_INIT, ExchInit),                           \
   KH_FN(OSSL_FUNC_KEYEXCH_SET_PEER, ExchSetPeer),                    \
   KH_FN(OSSL_FUNC_KEYEXCH_DERIVE, ExchDerive),                       \
   KH_FN(OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, ExchSetParams),            \
   KH_FN(OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, ExchSettable),        \
   {0, nullptr}}

const OSSL_DISPATCH kEcdhExchangeFunctions[] = KH_EXCH_TABLE;
const OSSL_DISPATCH kX25519ExchangeFunctions[] = KH_EXCH_TABLE;

}  // namespace keyhold::ossl
