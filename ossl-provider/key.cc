// KEYMGMT for EC, RSA, ED25519 and X25519 keys held by keyholdd.
//
// A key object holds the daemon reference and the public key (as an EVP_PKEY
// of the default provider). Export gives public parts only and refuses any
// request that includes the private key, so OpenSSL runs private operations
// here and everything public (verify, encrypt, encoding, matching a
// certificate) in the default provider. Import takes public keys only; it
// exists so that EVP_PKEY_eq() can compare a certificate's key with ours.
#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#include <cstring>
#include <memory>

#include "ossl-provider/provider.h"

namespace keyhold::ossl {
namespace {

enum class Alg { kEc, kRsa, kEd25519, kX25519 };

constexpr const char* Name(Alg a) {
  switch (a) {
    case Alg::kEc:
      return "EC";
    case Alg::kRsa:
      return "RSA";
    case Alg::kEd25519:
      return "ED25519";
    case Alg::kX25519:
      return "X25519";
  }
  return "";
}

const OSSL_PARAM kEcTypes[] = {
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kRsaTypes[] = {
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, nullptr, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, nullptr, 0), OSSL_PARAM_END};
const OSSL_PARAM kEcxTypes[] = {
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
    OSSL_PARAM_END};

const OSSL_PARAM kEcGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_ENCODING, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kRsaGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, nullptr, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, nullptr, 0),
    OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, nullptr, 0), OSSL_PARAM_END};
const OSSL_PARAM kEcxGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_MANDATORY_DIGEST, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
    OSSL_PARAM_END};

void* KmNew(void* provctx) {
  KH_OSSL_ENTRY(nullptr, {
    auto* k = new Key();
    k->prov = static_cast<ProvCtx*>(provctx);
    return k;
  })
}

void KmFree(void* keydata) {
  try {
    delete static_cast<Key*>(keydata);
  } catch (...) {
  }
}

void* KmLoad(const void* reference, size_t reference_sz) {
  KH_OSSL_ENTRY(nullptr, {
    if (reference == nullptr || reference_sz != sizeof(Key*)) return nullptr;
    const Key* src = nullptr;
    std::memcpy(&src, reference, sizeof(src));
    return src == nullptr ? nullptr : src->Clone();
  })
}

void* KmDup(const void* keydata, int) {
  KH_OSSL_ENTRY(nullptr, {
    return keydata == nullptr ? nullptr : static_cast<const Key*>(keydata)->Clone();
  })
}

int KmHas(const void* keydata, int selection) {
  const auto* k = static_cast<const Key*>(keydata);
  if (k == nullptr) return 0;
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 && !k->has_ref) return 0;
  if ((selection & (OSSL_KEYMGMT_SELECT_PUBLIC_KEY |
                    OSSL_KEYMGMT_SELECT_ALL_PARAMETERS)) != 0 &&
      k->pub == nullptr) {
    return 0;
  }
  return 1;
}

int KmMatch(const void* a, const void* b, int selection) {
  KH_OSSL_ENTRY(0, {
    const auto* k1 = static_cast<const Key*>(a);
    const auto* k2 = static_cast<const Key*>(b);
    if (k1 == nullptr || k2 == nullptr || k1->pub == nullptr || k2->pub == nullptr) {
      return 0;
    }
    if ((selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0) {
      return k1->spki == k2->spki ? 1 : 0;
    }
    if ((selection & OSSL_KEYMGMT_SELECT_ALL_PARAMETERS) != 0) {
      return EVP_PKEY_parameters_eq(k1->pub, k2->pub) == 1 ? 1 : 0;
    }
    return 1;
  })
}

int KmGetParams(void* keydata, OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* k = static_cast<Key*>(keydata);
    if (k == nullptr || k->pub == nullptr) return 0;
    // The public half answers everything a caller may ask.
    return EVP_PKEY_get_params(k->pub, params) == 1 ? 1 : 0;
  })
}

int KmExport(void* keydata, int selection, OSSL_CALLBACK* cb, void* cbarg) {
  KH_OSSL_ENTRY(0, {
    auto* k = static_cast<Key*>(keydata);
    if (k == nullptr || k->pub == nullptr) return 0;
    // The private key never leaves the daemon. Refusing (rather than
    // exporting a public-only key) makes OpenSSL route private operations to
    // this provider.
    if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) return 0;
    OSSL_PARAM* params = nullptr;
    if (EVP_PKEY_todata(k->pub, EVP_PKEY_PUBLIC_KEY, &params) != 1) return 0;
    const int rc = cb(params, cbarg);
    OSSL_PARAM_free(params);
    return rc;
  })
}

template <Alg A>
const OSSL_PARAM* KmTypes(int) {
  switch (A) {
    case Alg::kEc:
      return kEcTypes;
    case Alg::kRsa:
      return kRsaTypes;
    default:
      return kEcxTypes;
  }
}

template <Alg A>
const OSSL_PARAM* KmGettable(void*) {
  switch (A) {
    case Alg::kEc:
      return kEcGettable;
    case Alg::kRsa:
      return kRsaGettable;
    default:
      return kEcxGettable;
  }
}

template <Alg A>
int KmImport(void* keydata, int selection, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* k = static_cast<Key*>(keydata);
    if (k == nullptr || k->has_ref ||
        (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) == 0) {
      return 0;
    }
    // A key with private parts belongs to another provider, which must keep
    // doing its private operations: taking only its public half here would
    // route them to us, and we can only sign with daemon keys.
    if (OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_PRIV_KEY) != nullptr ||
        OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_D) != nullptr) {
      return 0;
    }
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, Name(A), kDefaultProps);
    if (ctx == nullptr) return 0;
    EVP_PKEY* pkey = nullptr;
    const int ok = EVP_PKEY_fromdata_init(ctx) == 1 &&
                   EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY,
                                     const_cast<OSSL_PARAM*>(params)) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok) return 0;
    unsigned char* der = nullptr;
    const int len = i2d_PUBKEY(pkey, &der);
    if (len <= 0) {
      EVP_PKEY_free(pkey);
      return 0;
    }
    k->spki.assign(reinterpret_cast<char*>(der), static_cast<size_t>(len));
    OPENSSL_free(der);
    EVP_PKEY_free(k->pub);
    k->pub = pkey;
    k->alg = Name(A);
    return 1;
  })
}

template <Alg A>
const char* KmOperationName(int operation_id) {
  if (A == Alg::kEc) {
    return operation_id == OSSL_OP_KEYEXCH ? "ECDH" : "ECDSA";
  }
  return Name(A);
}

#define KH_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }


// --- Key generation in the daemon ---
//
//   openssl genpkey -propquery provider=keyhold -algorithm EC
//     -pkeyopt group:P-256 -pkeyopt keyhold_name:web -out web.ref.pem
//
// The key is created in keyholdd under the caller's uid; the file written is
// a key reference (see encoder.cc).

constexpr char kGenNameParam[] = "keyhold_name";

struct GenCtx {
  ProvCtx* prov = nullptr;
  std::string name;
  std::string group = "P-256";
  size_t bits = 2048;
};

template <Alg A>
void* KmGenInit(void* provctx, int selection, const OSSL_PARAM params[]);

int KmGenSetParams(void* genctx, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(0, {
    auto* g = static_cast<GenCtx*>(genctx);
    if (params == nullptr) return 1;
    const OSSL_PARAM* p = OSSL_PARAM_locate_const(params, kGenNameParam);
    if (p != nullptr) {
      const char* v = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &v)) return 0;
      g->name = v;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_GROUP_NAME);
    if (p != nullptr) {
      const char* v = nullptr;
      if (!OSSL_PARAM_get_utf8_string_ptr(p, &v)) return 0;
      g->group = v;
    }
    p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_RSA_BITS);
    if (p != nullptr && !OSSL_PARAM_get_size_t(p, &g->bits)) return 0;
    return 1;
  })
}

template <Alg A>
void* KmGenInit(void* provctx, int, const OSSL_PARAM params[]) {
  KH_OSSL_ENTRY(nullptr, {
    auto g = std::make_unique<GenCtx>();
    g->prov = static_cast<ProvCtx*>(provctx);
    if (!KmGenSetParams(g.get(), params)) return nullptr;
    return g.release();
  })
}

template <Alg A>
const OSSL_PARAM* KmGenSettable(void*, void*) {
  static const OSSL_PARAM kEc[] = {
      OSSL_PARAM_utf8_string(kGenNameParam, nullptr, 0),
      OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0), OSSL_PARAM_END};
  static const OSSL_PARAM kRsa[] = {
      OSSL_PARAM_utf8_string(kGenNameParam, nullptr, 0),
      OSSL_PARAM_size_t(OSSL_PKEY_PARAM_RSA_BITS, nullptr), OSSL_PARAM_END};
  static const OSSL_PARAM kOther[] = {
      OSSL_PARAM_utf8_string(kGenNameParam, nullptr, 0), OSSL_PARAM_END};
  return A == Alg::kEc ? kEc : A == Alg::kRsa ? kRsa : kOther;
}

template <Alg A>
StatusOr<v1::KeyType> GenType(const GenCtx& g) {
  switch (A) {
    case Alg::kEc: {
      const std::string& n = g.group;
      if (n == "P-256" || n == "prime256v1" || n == "secp256r1") return v1::EC_P256;
      if (n == "P-384" || n == "secp384r1") return v1::EC_P384;
      if (n == "P-521" || n == "secp521r1") return v1::EC_P521;
      return Unsupported("unsupported EC group '" + n + "'");
    }
    case Alg::kRsa:
      if (g.bits == 2048) return v1::RSA_2048;
      if (g.bits == 3072) return v1::RSA_3072;
      if (g.bits == 4096) return v1::RSA_4096;
      return Unsupported("unsupported RSA size " + std::to_string(g.bits));
    case Alg::kEd25519:
      return v1::ED25519;
    case Alg::kX25519:
      return v1::X25519;
  }
  return Unsupported("unsupported key type");
}

template <Alg A>
void* KmGen(void* genctx, OSSL_CALLBACK*, void*) {
  KH_OSSL_ENTRY(nullptr, {
    auto* g = static_cast<GenCtx*>(genctx);
    if (g->name.empty()) {
      RaiseError(kReasonBadArgument,
                 "keyhold: name the key with -pkeyopt keyhold_name:NAME");
      return nullptr;
    }
    const std::string uri = "keyhold:" + g->name;
    auto type = GenType<A>(*g);
    if (!type.ok()) {
      RaiseStatus(uri, type.status());
      return nullptr;
    }
    auto r = GlobalClient().GenerateKey(client::MakeKeyRef(g->name), *type);
    if (!r.ok()) {
      RaiseStatus(uri, r.status());
      return nullptr;
    }
    auto k = std::make_unique<Key>();
    k->prov = g->prov;
    k->has_ref = true;
    k->ref = client::MakeKeyRef(g->name);
    k->uri = uri;
    k->type = *type;
    Status st = SetPublicKey(*k, r->public_key());
    if (!st.ok()) {
      RaiseStatus(uri, st);
      return nullptr;
    }
    return k.release();
  })
}

void KmGenCleanup(void* genctx) {
  try {
    delete static_cast<GenCtx*>(genctx);
  } catch (...) {
  }
}

}  // namespace

#define KH_KEYMGMT_TABLE(A)                                              \
  {KH_FN(OSSL_FUNC_KEYMGMT_NEW, KmNew),                                  \
   KH_FN(OSSL_FUNC_KEYMGMT_FREE, KmFree),                                \
   KH_FN(OSSL_FUNC_KEYMGMT_LOAD, KmLoad),                                \
   KH_FN(OSSL_FUNC_KEYMGMT_DUP, KmDup),                                  \
   KH_FN(OSSL_FUNC_KEYMGMT_HAS, KmHas),                                  \
   KH_FN(OSSL_FUNC_KEYMGMT_MATCH, KmMatch),                              \
   KH_FN(OSSL_FUNC_KEYMGMT_GET_PARAMS, KmGetParams),                     \
   KH_FN(OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, KmGettable<A>),              \
   KH_FN(OSSL_FUNC_KEYMGMT_EXPORT, KmExport),                            \
   KH_FN(OSSL_FUNC_KEYMGMT_EXPORT_TYPES, KmTypes<A>),                    \
   KH_FN(OSSL_FUNC_KEYMGMT_IMPORT, KmImport<A>),                         \
   KH_FN(OSSL_FUNC_KEYMGMT_IMPORT_TYPES, KmTypes<A>),                    \
   KH_FN(OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, KmOperationName<A>),    \
   KH_FN(OSSL_FUNC_KEYMGMT_GEN_INIT, KmGenInit<A>),                      \
   KH_FN(OSSL_FUNC_KEYMGMT_GEN_SET_PARAMS, KmGenSetParams),              \
   KH_FN(OSSL_FUNC_KEYMGMT_GEN_SETTABLE_PARAMS, KmGenSettable<A>),       \
   KH_FN(OSSL_FUNC_KEYMGMT_GEN, KmGen<A>),                               \
   KH_FN(OSSL_FUNC_KEYMGMT_GEN_CLEANUP, KmGenCleanup),                   \
   {0, nullptr}}

const OSSL_DISPATCH kEcKeymgmtFunctions[] = KH_KEYMGMT_TABLE(Alg::kEc);
const OSSL_DISPATCH kRsaKeymgmtFunctions[] = KH_KEYMGMT_TABLE(Alg::kRsa);
const OSSL_DISPATCH kEd25519KeymgmtFunctions[] = KH_KEYMGMT_TABLE(Alg::kEd25519);
const OSSL_DISPATCH kX25519KeymgmtFunctions[] = KH_KEYMGMT_TABLE(Alg::kX25519);

}  // namespace keyhold::ossl
