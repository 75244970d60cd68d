// SIGNATURE for ECDSA, RSA (PKCS#1 v1.5 and PSS) and Ed25519.
//
// Hashing happens here, with the default provider's digests; the daemon gets
// one SignRequest with the digest (or, for Ed25519, the whole message).
// Verify needs no daemon: it is handed to the default provider with the
// key's public half. OpenSSL 3.0 cannot do that itself, since it copies a
// key to another provider only whole and keyhold refuses private parts.
#include <openssl/core_names.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <cstring>
#include <memory>
#include <string>

#include "common/key_types.h"
#include "common/ssl_ptr.h"
#include "ossl-provider/provider.h"
#include "ossl-provider/util.h"

namespace keyhold::ossl {
namespace {

enum class Kind { kEcdsa, kRsa, kEd25519 };

struct SigCtx {
  ProvCtx* prov = nullptr;
  Kind kind = Kind::kEcdsa;
  std::unique_ptr<Key> key;
  int pad = RSA_PKCS1_PADDING;
  Md md;
  Md mgf1;
  int saltlen = RSA_PSS_SALTLEN_AUTO;  // OpenSSL's convention
  EVP_MD_CTX* mdctx = nullptr;

  ~SigCtx() { EVP_MD_CTX_free(mdctx); }
};

template <Kind K>
void* SigNew(void* provctx, const char*) {
  KH_OSSL_ENTRY(nullptr, {
    auto* c = new SigCtx();
    c->prov = static_cast<ProvCtx*>(provctx);
    c->kind = K;
    return c;
  })
}

void SigFree(void* ctx) {
  try {
    delete static_cast<SigCtx*>(ctx);
  } catch (...) {
  }
}

void* SigDup(void* ctx) {
  KH_OSSL_ENTRY(nullptr, {
    const auto* src = static_cast<SigCtx*>(ctx);
    auto c = std::make_unique<SigCtx>();
    c->prov = src->prov;
    c->kind = src->kind;
    if (src->key) {
      c->key.reset(src->key->Clone());
      if (!c->key) return nullptr;
    }
    c->pad = src->pad;
    c->md = src->md;
    c->mgf1 = src->mgf1;
    c->saltlen = src->saltlen;
    if (src->mdctx != nullptr) {
      c->mdctx = EVP_MD_CTX_new();
      if (c->mdctx == nullptr || EVP_MD_CTX_copy_ex(c->mdctx, src->mdctx) != 1) {
        return nullptr;
      }
    }
    return c.release();
  })
}

int SigSetParams(void* ctx, const OSSL_PARAM params[]);

int InitCommon(SigCtx* c, void* provkey, const OSSL_PARAM params[],
               bool verify = false) {
  auto* k = static_cast<Key*>(provkey);
  if (k == nullptr) {
    if (!c->key) return 0;
  } else {
    if (!verify && !k->has_ref) {
      RaiseError(kReasonBadArgument, "keyhold: not a keyhold private key");
      return 0;
    }
    c->key.reset(k->Clone());
    if (!c->key) return 0;
  }
  c->pad = RSA_PKCS1_PADDING;
  c->md = Md();
  c->mgf1 = Md();
  c->saltlen = RSA_PSS_SALTLEN_AUTO;
  EVP_MD_CTX_free(c->mdctx);
  c->mdctx = nullptr;
  return SigSetParams(c, params);
}

int SigSignInit(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, { return InitCommon(static_cast<SigCtx*>(ctx), provkey, params); })
}

// PSS salt length in the wire convention (-1 digest length, -2 maximum).
int32_t WireSaltLen(int saltlen) {
  switch (saltlen) {
    case RSA_PSS_SALTLEN_DIGEST:
      return -1;
    case RSA_PSS_SALTLEN_AUTO:
    case RSA_PSS_SALTLEN_MAX:
      return -2;
    default:
      return saltlen < 0 ? -1 : saltlen;
  }
}

int DoSign(SigCtx* c, unsigned char* sig, size_t* siglen, size_t sigsize,
           const unsigned char* tbs, size_t tbslen) {
  if (!c->key || c->key->pub == nullptr) {
    RaiseError(kReasonBadArgument, "keyhold: no key");
    return 0;
  }
  const int max = EVP_PKEY_get_size(c->key->pub);
  if (sig == nullptr) {
    *siglen = static_cast<size_t>(max);
    return 1;
  }
  v1::SignRequest req;
  *req.mutable_key() = c->key->ref;
  req.set_data(tbs, tbslen);
  switch (c->kind) {
    case Kind::kEd25519:
      req.set_algorithm(v1::ED25519_PURE);
      req.set_digest(v1::DIGEST_NONE);
      break;
    case Kind::kEcdsa: {
      req.set_algorithm(v1::ECDSA);
      v1::Digest d = c->md.set() ? c->md.wire : DigestForLength(tbslen);
      if (d == v1::DIGEST_NONE || DigestSize(d) != tbslen) {
        RaiseError(kReasonBadArgument,
                   "keyhold: " + c->key->uri + ": input is not a digest of the expected size");
        return 0;
      }
      req.set_digest(d);
      break;
    }
    case Kind::kRsa: {
      if (c->pad == RSA_PKCS1_PADDING) {
        req.set_algorithm(v1::RSA_PKCS1);
        req.set_digest(c->md.set() ? c->md.wire : v1::DIGEST_NONE);
      } else if (c->pad == RSA_PKCS1_PSS_PADDING) {
        req.set_algorithm(v1::RSA_PSS);
        v1::Digest d = c->md.set() ? c->md.wire : DigestForLength(tbslen);
        if (d == v1::DIGEST_NONE) {
          RaiseError(kReasonBadArgument, "keyhold: PSS needs a digest");
          return 0;
        }
        req.set_digest(d);
        req.set_pss_salt_length(WireSaltLen(c->saltlen));
        req.set_pss_mgf1_digest(c->mgf1.set() ? c->mgf1.wire : d);
      } else {
        RaiseError(kReasonUnsupported, "keyhold: unsupported RSA padding mode");
        return 0;
      }
      if (req.digest() != v1::DIGEST_NONE && DigestSize(req.digest()) != tbslen) {
        RaiseError(kReasonBadArgument,
                   "keyhold: " + c->key->uri + ": input is not a digest of the expected size");
        return 0;
      }
      break;
    }
  }
  auto r = GlobalClient().Sign(req);
  if (!r.ok()) {
    RaiseStatus(c->key->uri, r.status());
    return 0;
  }
  if (r->size() > sigsize) {
    RaiseError(kReasonInternal, "keyhold: signature buffer too small");
    return 0;
  }
  std::memcpy(sig, r->data(), r->size());
  *siglen = r->size();
  return 1;
}

// Verifies with the public half in the default provider, under the same
// parameters a signature would have been made with.
int DoVerify(SigCtx* c, const unsigned char* sig, size_t siglen,
             const unsigned char* tbs, size_t tbslen) {
  if (!c->key || c->key->pub == nullptr) {
    RaiseError(kReasonBadArgument, "keyhold: no key");
    return 0;
  }
  if (c->kind == Kind::kEd25519) {
    SslPtr<EVP_MD_CTX> mctx(EVP_MD_CTX_new());
    return mctx != nullptr &&
                   EVP_DigestVerifyInit_ex(mctx.get(), nullptr, nullptr,
                                           nullptr, kDefaultProps, c->key->pub,
                                           nullptr) == 1 &&
                   EVP_DigestVerify(mctx.get(), sig, siglen, tbs, tbslen) == 1
               ? 1
               : 0;
  }
  SslPtr<EVP_PKEY_CTX> pctx(
      EVP_PKEY_CTX_new_from_pkey(nullptr, c->key->pub, kDefaultProps));
  if (pctx == nullptr || EVP_PKEY_verify_init(pctx.get()) != 1) return 0;
  if (c->md.set() &&
      EVP_PKEY_CTX_set_signature_md(pctx.get(), c->md.md.get()) != 1) {
    return 0;
  }
  if (c->kind == Kind::kRsa) {
    if (EVP_PKEY_CTX_set_rsa_padding(pctx.get(), c->pad) != 1) return 0;
    if (c->pad == RSA_PKCS1_PSS_PADDING &&
        (EVP_PKEY_CTX_set_rsa_pss_saltlen(pctx.get(), c->saltlen) != 1 ||
         (c->mgf1.set() &&
          EVP_PKEY_CTX_set_rsa_mgf1_md(pctx.get(), c->mgf1.md.get()) != 1))) {
      return 0;
    }
  }
  return EVP_PKEY_verify(pctx.get(), sig, siglen, tbs, tbslen) == 1 ? 1 : 0;
}

int SigVerifyInit(void* ctx, void* provkey, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    return InitCommon(static_cast<SigCtx*>(ctx), provkey, params,
                      /*verify=*/true);
  })
}

int SigVerify(void* ctx, const unsigned char* sig, size_t siglen,
              const unsigned char* tbs, size_t tbslen) {
  KH_OSSL_ENTRY(0, {
    return DoVerify(static_cast<SigCtx*>(ctx), sig, siglen, tbs, tbslen);
  })
}

int SigSign(void* ctx, unsigned char* sig, size_t* siglen, size_t sigsize,
            const unsigned char* tbs, size_t tbslen) {
  KH_OSSL_ENTRY(0, {
    return DoSign(static_cast<SigCtx*>(ctx), sig, siglen, sigsize, tbs, tbslen);
  })
}

int DigestInitCommon(SigCtx* c, const char* mdname, void* provkey,
                     const OSSL_PARAM params[], bool verify) {
  {
    if (!InitCommon(c, provkey, params, verify)) return 0;
    if (c->kind == Kind::kEd25519) {
      if (mdname != nullptr && mdname[0] != '\0') {
        RaiseError(kReasonBadArgument, "keyhold: Ed25519 takes no digest");
        return 0;
      }
      return 1;
    }
    const char* name = (mdname == nullptr || mdname[0] == '\0') ? "SHA256" : mdname;
    if (!c->md.Set(name)) {
      RaiseError(kReasonUnsupported, std::string("keyhold: unsupported digest ") + name);
      return 0;
    }
    c->mdctx = EVP_MD_CTX_new();
    if (c->mdctx == nullptr ||
        EVP_DigestInit_ex2(c->mdctx, c->md.md.get(), nullptr) != 1) {
      return 0;
    }
    return 1;
  }
}

int SigDigestSignInit(void* ctx, const char* mdname, void* provkey,
                      const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    return DigestInitCommon(static_cast<SigCtx*>(ctx), mdname, provkey, params,
                            /*verify=*/false);
  })
}

int SigDigestVerifyInit(void* ctx, const char* mdname, void* provkey,
                        const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    return DigestInitCommon(static_cast<SigCtx*>(ctx), mdname, provkey, params,
                            /*verify=*/true);
  })
}

int SigDigestSignUpdate(void* ctx, const unsigned char* data, size_t datalen) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<SigCtx*>(ctx);
    if (c->mdctx == nullptr) return 0;
    return EVP_DigestUpdate(c->mdctx, data, datalen);
  })
}

int SigDigestSignFinal(void* ctx, unsigned char* sig, size_t* siglen,
                       size_t sigsize) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<SigCtx*>(ctx);
    if (c->mdctx == nullptr) return 0;
    if (sig == nullptr) return DoSign(c, nullptr, siglen, 0, nullptr, 0);
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (EVP_DigestFinal_ex(c->mdctx, dgst, &dlen) != 1) return 0;
    return DoSign(c, sig, siglen, sigsize, dgst, dlen);
  })
}

int SigDigestVerifyFinal(void* ctx, const unsigned char* sig, size_t siglen) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<SigCtx*>(ctx);
    if (c->mdctx == nullptr) return 0;
    unsigned char dgst[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0;
    if (EVP_DigestFinal_ex(c->mdctx, dgst, &dlen) != 1) return 0;
    return DoVerify(c, sig, siglen, dgst, dlen);
  })
}

int SigDigestVerify(void* ctx, const unsigned char* sig, size_t siglen,
                    const unsigned char* tbs, size_t tbslen) {
  KH_OSSL_ENTRY(0, {
    return DoVerify(static_cast<SigCtx*>(ctx), sig, siglen, tbs, tbslen);
  })
}

int SigDigestSign(void* ctx, unsigned char* sig, size_t* siglen, size_t sigsize,
                  const unsigned char* tbs, size_t tbslen) {
  KH_OSSL_ENTRY(0, {
    return DoSign(static_cast<SigCtx*>(ctx), sig, siglen, sigsize, tbs, tbslen);
  })
}

// A hash AlgorithmIdentifier as RFC 4055 wants it inside RSASSA-PSS-params:
// absent parameters for SHA-2 (RFC 5754 allows both; OpenSSL writes NULL),
// so follow OpenSSL: NULL.
X509_ALGOR* HashAlgor(const EVP_MD* md) {
  X509_ALGOR* a = X509_ALGOR_new();
  if (a != nullptr) X509_ALGOR_set_md(a, md);
  return a;
}

// RSASSA-PSS-params (RFC 4055) for the context's digest, MGF1 digest and salt
// length, resolved to a number as a signature's AlgorithmIdentifier needs.
ASN1_STRING* PssParams(const SigCtx* c) {
  const EVP_MD* md = c->md.md.get();
  const EVP_MD* mgf1 = c->mgf1.set() ? c->mgf1.md.get() : md;
  const int hlen = EVP_MD_get_size(md);
  const int bits =
      c->key && c->key->pub != nullptr ? EVP_PKEY_get_bits(c->key->pub) : 0;
  const int em_len = (bits - 1 + 7) / 8;
  int salt = c->saltlen;
  if (salt == RSA_PSS_SALTLEN_DIGEST) {
    salt = hlen;
  } else if (salt == RSA_PSS_SALTLEN_MAX || salt == RSA_PSS_SALTLEN_AUTO) {
    salt = em_len - hlen - 2;
  }
  if (bits <= 0 || hlen <= 0 || salt < 0 || salt > em_len - hlen - 2)
    return nullptr;

  ASN1_STRING* out = nullptr;
  RSA_PSS_PARAMS* pss = RSA_PSS_PARAMS_new();
  X509_ALGOR* mgf1_hash = HashAlgor(mgf1);
  if (pss != nullptr && mgf1_hash != nullptr) {
    // Defaults (SHA-1, MGF1-SHA-1, salt 20) are left out, as DER requires.
    bool ok = true;
    if (EVP_MD_get_type(md) != NID_sha1) {
      pss->hashAlgorithm = HashAlgor(md);
      ok = pss->hashAlgorithm != nullptr;
    }
    if (ok && EVP_MD_get_type(mgf1) != NID_sha1) {
      ASN1_STRING* mgf1_params = nullptr;
      pss->maskGenAlgorithm = X509_ALGOR_new();
      ok = pss->maskGenAlgorithm != nullptr &&
           ASN1_item_pack(mgf1_hash, ASN1_ITEM_rptr(X509_ALGOR),
                          &mgf1_params) != nullptr &&
           X509_ALGOR_set0(pss->maskGenAlgorithm, OBJ_nid2obj(NID_mgf1),
                           V_ASN1_SEQUENCE, mgf1_params) == 1;
      if (!ok) ASN1_STRING_free(mgf1_params);
    }
    if (ok && salt != 20) {
      pss->saltLength = ASN1_INTEGER_new();
      ok = pss->saltLength != nullptr &&
           ASN1_INTEGER_set(pss->saltLength, salt) == 1;
    }
    if (ok) ASN1_item_pack(pss, ASN1_ITEM_rptr(RSA_PSS_PARAMS), &out);
  }
  X509_ALGOR_free(mgf1_hash);
  RSA_PSS_PARAMS_free(pss);
  return out;
}

// DER AlgorithmIdentifier of the signature this context makes.
std::string AlgorithmId(const SigCtx* c) {
  int sig_nid = NID_undef;
  int ptype = V_ASN1_UNDEF;
  void* pval = nullptr;
  switch (c->kind) {
    case Kind::kEd25519:
      sig_nid = NID_ED25519;
      break;
    case Kind::kEcdsa:
      if (!c->md.set() ||
          !OBJ_find_sigid_by_algs(&sig_nid, EVP_MD_get_type(c->md.md.get()),
                                  NID_X9_62_id_ecPublicKey)) {
        return "";
      }
      break;
    case Kind::kRsa:
      if (c->pad == RSA_PKCS1_PSS_PADDING && c->md.set()) {
        ASN1_STRING* params = PssParams(c);
        if (params == nullptr) return "";
        sig_nid = NID_rsassaPss;
        ptype = V_ASN1_SEQUENCE;
        pval = params;
        break;
      }
      if (c->pad != RSA_PKCS1_PADDING || !c->md.set() ||
          !OBJ_find_sigid_by_algs(&sig_nid, EVP_MD_get_type(c->md.md.get()),
                                  NID_rsaEncryption)) {
        return "";
      }
      ptype = V_ASN1_NULL;
      break;
  }
  X509_ALGOR* a = X509_ALGOR_new();
  if (a == nullptr) {
    ASN1_STRING_free(static_cast<ASN1_STRING*>(pval));
    return "";
  }
  std::string out;
  if (X509_ALGOR_set0(a, OBJ_nid2obj(sig_nid), ptype, pval) != 1) {
    ASN1_STRING_free(static_cast<ASN1_STRING*>(pval));
  } else {
    unsigned char* der = nullptr;
    const int len = i2d_X509_ALGOR(a, &der);
    if (len > 0) {
      out.assign(reinterpret_cast<char*>(der), static_cast<size_t>(len));
      OPENSSL_free(der);
    }
  }
  X509_ALGOR_free(a);
  return out;
}

int SigGetParams(void* ctx, OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<SigCtx*>(ctx);
    OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_ALGORITHM_ID);
    if (p != nullptr) {
      std::string aid = AlgorithmId(c);
      if (aid.empty() || !OSSL_PARAM_set_octet_string(p, aid.data(), aid.size())) {
        return 0;
      }
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != nullptr && c->md.set() &&
        !OSSL_PARAM_set_utf8_string(p, EVP_MD_get0_name(c->md.md.get()))) {
      return 0;
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_DIGEST_SIZE);
    if (p != nullptr && c->md.set() &&
        !OSSL_PARAM_set_size_t(p, static_cast<size_t>(EVP_MD_get_size(c->md.md.get())))) {
      return 0;
    }
    if (c->kind != Kind::kRsa) return 1;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != nullptr && !GetPadMode(p, c->pad)) return 0;
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != nullptr) {
      const Md& m = c->mgf1.set() ? c->mgf1 : c->md;
      if (m.set() && !OSSL_PARAM_set_utf8_string(p, EVP_MD_get0_name(m.md.get()))) {
        return 0;
      }
    }
    p = OSSL_PARAM_locate(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != nullptr) {
      if (p->data_type == OSSL_PARAM_INTEGER) {
        if (!OSSL_PARAM_set_int(p, c->saltlen)) return 0;
      } else {
        const char* v = c->saltlen == RSA_PSS_SALTLEN_DIGEST ? OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST
                        : c->saltlen == RSA_PSS_SALTLEN_MAX  ? OSSL_PKEY_RSA_PSS_SALT_LEN_MAX
                        : c->saltlen == RSA_PSS_SALTLEN_AUTO ? OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO
                                                             : nullptr;
        std::string num = std::to_string(c->saltlen);
        if (!OSSL_PARAM_set_utf8_string(p, v != nullptr ? v : num.c_str())) return 0;
      }
    }
    return 1;
  })
}

int SigSetParams(void* ctx, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* c = static_cast<SigCtx*>(ctx);
    if (params == nullptr) return 1;
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_DIGEST);
    if (p != nullptr) {
      const char* name = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !c->md.Set(name)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported digest");
        return 0;
      }
    }
    if (c->kind != Kind::kRsa) return 1;
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PAD_MODE);
    if (p != nullptr) {
      int pad = 0;
      if (!ParsePadMode(p, &pad) ||
          (pad != RSA_PKCS1_PADDING && pad != RSA_PKCS1_PSS_PADDING)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported RSA padding mode");
        return 0;
      }
      c->pad = pad;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_PSS_SALTLEN);
    if (p != nullptr) {
      int saltlen = 0;
      if (p->data_type == OSSL_PARAM_INTEGER) {
        if (!OSSL_PARAM_get_int(p, &saltlen)) return 0;
      } else {
        const char* v = nullptr;
        if (!OSSL_PARAM_get_utf8_string_ptr(p, &v)) return 0;
        std::string s = v;
        if (s == OSSL_PKEY_RSA_PSS_SALT_LEN_DIGEST) {
          saltlen = RSA_PSS_SALTLEN_DIGEST;
        } else if (s == OSSL_PKEY_RSA_PSS_SALT_LEN_MAX) {
          saltlen = RSA_PSS_SALTLEN_MAX;
        } else if (s == OSSL_PKEY_RSA_PSS_SALT_LEN_AUTO) {
          saltlen = RSA_PSS_SALTLEN_AUTO;
        } else {
          try {
            size_t used = 0;
            saltlen = std::stoi(s, &used);
            if (used != s.size()) throw std::invalid_argument("salt");
          } catch (const std::exception&) {
            RaiseError(kReasonBadArgument, "keyhold: bad PSS salt length '" + s + "'");
            return 0;
          }
        }
      }
      if (saltlen < RSA_PSS_SALTLEN_MAX) {
        RaiseError(kReasonBadArgument, "keyhold: bad PSS salt length");
        return 0;
      }
      c->saltlen = saltlen;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_SIGNATURE_PARAM_MGF1_DIGEST);
    if (p != nullptr) {
      const char* name = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !c->mgf1.Set(name)) {
        RaiseError(kReasonUnsupported, "keyhold: unsupported MGF1 digest");
        return 0;
      }
    }
    return 1;
  })
}

const OSSL_PARAM kGettable[] = {
    OSSL_PARAM_octet_string(OSSL_SIGNATURE_PARAM_ALGORITHM_ID, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
    OSSL_PARAM_size_t(OSSL_SIGNATURE_PARAM_DIGEST_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kSettableRsa[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PAD_MODE, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_MGF1_PROPERTIES, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PSS_SALTLEN, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kSettableEc[] = {
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_SIGNATURE_PARAM_PROPERTIES, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kSettableNone[] = {OSSL_PARAM_END};

const OSSL_PARAM* SigGettable(void*, void*) { return kGettable; }

template <Kind K>
const OSSL_PARAM* SigSettable(void*, void*) {
  switch (K) {
    case Kind::kRsa:
      return kSettableRsa;
    case Kind::kEcdsa:
      return kSettableEc;
    default:
      return kSettableNone;
  }
}

}  // namespace

#define KH_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }
#define KH_SIG_COMMON(K)                                                  \
  KH_FN(OSSL_FUNC_SIGNATURE_NEWCTX, SigNew<K>),                           \
      KH_FN(OSSL_FUNC_SIGNATURE_FREECTX, SigFree),                        \
      KH_FN(OSSL_FUNC_SIGNATURE_DUPCTX, SigDup),                          \
      KH_FN(OSSL_FUNC_SIGNATURE_SIGN_INIT, SigSignInit),                  \
      KH_FN(OSSL_FUNC_SIGNATURE_SIGN, SigSign),                           \
      KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT, SigDigestSignInit),     \
      KH_FN(OSSL_FUNC_SIGNATURE_VERIFY_INIT, SigVerifyInit),              \
      KH_FN(OSSL_FUNC_SIGNATURE_VERIFY, SigVerify),                       \
      KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT, SigDigestVerifyInit), \
      KH_FN(OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS, SigGetParams),            \
      KH_FN(OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, SigGettable),        \
      KH_FN(OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS, SigSetParams),            \
      KH_FN(OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, SigSettable<K>)

const OSSL_DISPATCH kEcdsaSignatureFunctions[] = {
    KH_SIG_COMMON(Kind::kEcdsa),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, SigDigestSignUpdate),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, SigDigestSignFinal),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE, SigDigestSignUpdate),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL, SigDigestVerifyFinal),
    {0, nullptr}};
const OSSL_DISPATCH kRsaSignatureFunctions[] = {
    KH_SIG_COMMON(Kind::kRsa),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, SigDigestSignUpdate),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL, SigDigestSignFinal),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE, SigDigestSignUpdate),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL, SigDigestVerifyFinal),
    {0, nullptr}};
const OSSL_DISPATCH kEd25519SignatureFunctions[] = {
    KH_SIG_COMMON(Kind::kEd25519),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_SIGN, SigDigestSign),
    KH_FN(OSSL_FUNC_SIGNATURE_DIGEST_VERIFY, SigDigestVerify),
    {0, nullptr}};

}  // namespace keyhold::ossl
