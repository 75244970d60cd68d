// OSSL_provider_init, the algorithm tables, errors and the global client.
#include "ossl-provider/provider.h"

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#include <cstdarg>
#include <memory>
#include <mutex>

namespace keyhold::ossl {
namespace {

OSSL_FUNC_core_new_error_fn* core_new_error = nullptr;
OSSL_FUNC_core_set_error_debug_fn* core_set_error_debug = nullptr;
OSSL_FUNC_core_vset_error_fn* core_vset_error = nullptr;
OSSL_FUNC_BIO_read_ex_fn* core_bio_read_ex = nullptr;
OSSL_FUNC_BIO_write_ex_fn* core_bio_write_ex = nullptr;
const OSSL_CORE_HANDLE* g_handle = nullptr;

std::mutex g_client_mu;
int g_live_contexts = 0;  // guarded by g_client_mu
// A plain pointer: OpenSSL tears providers down from an atexit handler that
// runs after this module's static destructors.
client::Client* g_client = nullptr;

void SetError(int reason, const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  core_vset_error(g_handle, static_cast<uint32_t>(reason), fmt, args);
  va_end(args);
}

const OSSL_ALGORITHM kStores[] = {
    {"keyhold", kProps, kStoreFunctions, "keyhold key store"},
    {nullptr, nullptr, nullptr, nullptr}};

// Key reference files (PEM); decoding never contacts the daemon.
const OSSL_ALGORITHM kDecoders[] = {
    {"DER", "provider=keyhold,input=pem", kPemDecoderFunctions,
     "keyhold key reference (PEM)"},
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", "provider=keyhold,input=der,structure=keyhold",
     kEcDecoderFunctions, "keyhold key reference"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=keyhold,input=der,structure=keyhold",
     kRsaDecoderFunctions, "keyhold key reference"},
    {"ED25519:1.3.101.112", "provider=keyhold,input=der,structure=keyhold",
     kEd25519DecoderFunctions, "keyhold key reference"},
    {"X25519:1.3.101.110", "provider=keyhold,input=der,structure=keyhold",
     kX25519DecoderFunctions, "keyhold key reference"},
    {nullptr, nullptr, nullptr, nullptr}};

// Private keys are written as key reference files.
#define KH_ENCODER_PROPS "provider=keyhold,output=pem,structure=PrivateKeyInfo"
const OSSL_ALGORITHM kEncoders[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", KH_ENCODER_PROPS, kRefEncoderFunctions,
     "keyhold key reference"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", KH_ENCODER_PROPS, kRefEncoderFunctions,
     "keyhold key reference"},
    {"ED25519:1.3.101.112", KH_ENCODER_PROPS, kRefEncoderFunctions,
     "keyhold key reference"},
    {"X25519:1.3.101.110", KH_ENCODER_PROPS, kRefEncoderFunctions,
     "keyhold key reference"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kKeymgmt[] = {
    {"EC:id-ecPublicKey:1.2.840.10045.2.1", kProps, kEcKeymgmtFunctions,
     "keyhold EC"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", kProps, kRsaKeymgmtFunctions,
     "keyhold RSA"},
    {"ED25519:1.3.101.112", kProps, kEd25519KeymgmtFunctions, "keyhold Ed25519"},
    {"X25519:1.3.101.110", kProps, kX25519KeymgmtFunctions, "keyhold X25519"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kSignatures[] = {
    {"ECDSA", kProps, kEcdsaSignatureFunctions, "keyhold ECDSA"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", kProps, kRsaSignatureFunctions,
     "keyhold RSA"},
    {"ED25519:1.3.101.112", kProps, kEd25519SignatureFunctions,
     "keyhold Ed25519"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kCiphers[] = {
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", kProps, kRsaCipherFunctions,
     "keyhold RSA"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kExchanges[] = {
    {"ECDH", kProps, kEcdhExchangeFunctions, "keyhold ECDH"},
    {"X25519:1.3.101.110", kProps, kX25519ExchangeFunctions, "keyhold X25519"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ITEM kReasons[] = {
    {1 + static_cast<int>(Code::kInvalidArgument), const_cast<char*>("invalid argument")},
    {1 + static_cast<int>(Code::kNotFound), const_cast<char*>("key not found")},
    {1 + static_cast<int>(Code::kPermissionDenied), const_cast<char*>("permission denied")},
    {1 + static_cast<int>(Code::kAlreadyExists), const_cast<char*>("already exists")},
    {1 + static_cast<int>(Code::kUnsupported), const_cast<char*>("unsupported")},
    {1 + static_cast<int>(Code::kBackendUnavailable), const_cast<char*>("backend unavailable")},
    {1 + static_cast<int>(Code::kInternal), const_cast<char*>("internal error")},
    {1 + static_cast<int>(Code::kResourceExhausted), const_cast<char*>("resource exhausted")},
    {1 + static_cast<int>(Code::kUnavailable), const_cast<char*>("daemon unavailable")},
    {1 + static_cast<int>(Code::kDeadlineExceeded), const_cast<char*>("deadline exceeded")},
    {kReasonException, const_cast<char*>("exception")},
    {0, nullptr}};

const OSSL_PARAM kGettableParams[] = {
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, nullptr, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, nullptr, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_BUILDINFO, OSSL_PARAM_UTF8_PTR, nullptr, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, nullptr, 0),
    OSSL_PARAM_END};

extern "C" {

void kh_teardown(void* provctx) {
  delete static_cast<ProvCtx*>(provctx);
  std::lock_guard<std::mutex> lock(g_client_mu);
  if (--g_live_contexts == 0) {
    delete g_client;
    g_client = nullptr;
  }
}

const OSSL_PARAM* kh_gettable_params(void*) { return kGettableParams; }

int kh_get_params(void*, OSSL_PARAM params[]) {
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "keyhold OpenSSL provider")) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "0.1.0")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_BUILDINFO);
  if (p != nullptr && !OSSL_PARAM_set_utf8_ptr(p, "keyhold 0.1.0")) return 0;
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  if (p != nullptr && !OSSL_PARAM_set_int(p, 1)) return 0;
  return 1;
}

const OSSL_ALGORITHM* kh_query(void*, int operation_id, int* no_cache) {
  *no_cache = 0;
  switch (operation_id) {
    case OSSL_OP_STORE:
      return kStores;
    case OSSL_OP_KEYMGMT:
      return kKeymgmt;
    case OSSL_OP_DECODER:
      return kDecoders;
    case OSSL_OP_ENCODER:
      return kEncoders;
    case OSSL_OP_SIGNATURE:
      return kSignatures;
    case OSSL_OP_ASYM_CIPHER:
      return kCiphers;
    case OSSL_OP_KEYEXCH:
      return kExchanges;
    default:
      return nullptr;
  }
}

const OSSL_ITEM* kh_get_reason_strings(void*) { return kReasons; }

const OSSL_DISPATCH kProviderFunctions[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, reinterpret_cast<void (*)()>(kh_teardown)},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS,
     reinterpret_cast<void (*)()>(kh_gettable_params)},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, reinterpret_cast<void (*)()>(kh_get_params)},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, reinterpret_cast<void (*)()>(kh_query)},
    {OSSL_FUNC_PROVIDER_GET_REASON_STRINGS,
     reinterpret_cast<void (*)()>(kh_get_reason_strings)},
    {0, nullptr}};

}  // extern "C"

}  // namespace

void RaiseError(int reason, const std::string& message) {
  if (core_new_error == nullptr || core_set_error_debug == nullptr ||
      core_vset_error == nullptr) {
    return;
  }
  core_new_error(g_handle);
  core_set_error_debug(g_handle, nullptr, 0, nullptr);
  SetError(reason, "%s", message.c_str());
}

void RaiseStatus(const std::string& what, const Status& status) {
  RaiseError(1 + static_cast<int>(status.code()),
             "keyhold: " + what + ": " + status.ToString());
}

bool ReadCoreBio(OSSL_CORE_BIO* bio, std::string* out) {
  if (core_bio_read_ex == nullptr) return false;
  char buf[4096];
  for (;;) {
    size_t n = 0;
    if (core_bio_read_ex(bio, buf, sizeof(buf), &n) != 1 || n == 0) break;
    out->append(buf, n);
    if (out->size() > (1u << 20)) return false;  // no key reference is this big
  }
  return true;
}

bool WriteCoreBio(OSSL_CORE_BIO* bio, const char* data, size_t len) {
  if (core_bio_write_ex == nullptr) return false;
  while (len > 0) {
    size_t n = 0;
    if (core_bio_write_ex(bio, data, len, &n) != 1 || n == 0) return false;
    data += n;
    len -= n;
  }
  return true;
}

client::Client& GlobalClient() {
  std::lock_guard<std::mutex> lock(g_client_mu);
  if (g_client == nullptr) {
    g_client = new client::Client(client::OptionsFromEnvironment());
  }
  return *g_client;
}

const char* AlgName(v1::KeyType type) {
  switch (type) {
    case v1::RSA_2048:
    case v1::RSA_3072:
    case v1::RSA_4096:
      return "RSA";
    case v1::EC_P256:
    case v1::EC_P384:
    case v1::EC_P521:
      return "EC";
    case v1::ED25519:
      return "ED25519";
    case v1::X25519:
      return "X25519";
    default:
      return nullptr;
  }
}

Key::~Key() { EVP_PKEY_free(pub); }

Key* Key::Clone() const {
  auto k = std::make_unique<Key>();
  k->prov = prov;
  k->has_ref = has_ref;
  k->ref = ref;
  k->uri = uri;
  k->type = type;
  k->spki = spki;
  k->alg = alg;
  if (pub != nullptr) {
    if (EVP_PKEY_up_ref(pub) != 1) return nullptr;
    k->pub = pub;
  }
  return k.release();
}

Status SetPublicKey(Key& key, const std::string& spki_der) {
  const auto* p = reinterpret_cast<const unsigned char*>(spki_der.data());
  EVP_PKEY* pub = d2i_PUBKEY_ex(nullptr, &p, static_cast<long>(spki_der.size()),
                                nullptr, kDefaultProps);
  if (pub == nullptr) {
    return Internal("the daemon sent an unreadable public key");
  }
  const char* name = nullptr;
  for (const char* n : {"RSA", "EC", "ED25519", "X25519"}) {
    if (EVP_PKEY_is_a(pub, n)) {
      name = n;
      break;
    }
  }
  if (name == nullptr) {
    EVP_PKEY_free(pub);
    return Unsupported("unsupported public key type");
  }
  EVP_PKEY_free(key.pub);
  key.pub = pub;
  key.spki = spki_der;
  key.alg = name;
  return Status::Ok();
}

}  // namespace keyhold::ossl

extern "C" __attribute__((visibility("default"))) int OSSL_provider_init(
    const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in,
    const OSSL_DISPATCH** out, void** provctx) {
  using namespace keyhold::ossl;
  KH_OSSL_ENTRY(0, {
    for (; in->function_id != 0; ++in) {
      switch (in->function_id) {
        case OSSL_FUNC_CORE_NEW_ERROR:
          core_new_error = OSSL_FUNC_core_new_error(in);
          break;
        case OSSL_FUNC_CORE_SET_ERROR_DEBUG:
          core_set_error_debug = OSSL_FUNC_core_set_error_debug(in);
          break;
        case OSSL_FUNC_BIO_WRITE_EX:
          core_bio_write_ex = OSSL_FUNC_BIO_write_ex(in);
          break;
        case OSSL_FUNC_BIO_READ_EX:
          core_bio_read_ex = OSSL_FUNC_BIO_read_ex(in);
          break;
        case OSSL_FUNC_CORE_VSET_ERROR:
          core_vset_error = OSSL_FUNC_core_vset_error(in);
          break;
        default:
          break;
      }
    }
    g_handle = handle;
    auto* ctx = new ProvCtx();
    {
      std::lock_guard<std::mutex> lock(g_client_mu);
      ++g_live_contexts;
    }
    ctx->handle = handle;
    *provctx = ctx;
    *out = kProviderFunctions;
    return 1;
  })
}
