// libkeyhold-pkcs11.so: a PKCS#11 2.40 module over keyholdd.
//
// One slot with one token presenting the caller's keys and the keys shared
// with the caller. Every key appears as a private-key object and a public-key
// object with the same CKA_ID. Attributes are served from a cache of the key
// list (refreshed at C_FindObjectsInit); C_SignInit sends nothing and C_Sign
// or C_SignFinal sends one SignRequest (hashed mechanisms are hashed here).
//
// Every entry point catches all exceptions; keyhold Status codes become CKR_*
// in one table (MapStatus). Thread-safe with OS locks; a child after fork()
// may call C_Initialize again (the client library drops the parent's
// connections by itself).
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <pwd.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "common/client/client.h"
#include "common/key_types.h"
#include "common/secret.h"
#include "common/ssl_ptr.h"
#include "common/status.h"

// Last on purpose: p11-kit's compatibility names are macros (value, count,
// params, ...) that would rewrite any header included after this one. Code
// below therefore never calls StatusOr::value(); it uses operator*.
#include <p11-kit/pkcs11.h>

#include "pkcs11-module/interface3.h"
#include "pkcs11-module/template.h"

namespace keyhold::pkcs11 {
namespace {

constexpr CK_SLOT_ID kSlotId = 1;
constexpr std::size_t kMaxBufferedInput = 1 << 20;  // multi-part raw input

// CK_EDDSA_PARAMS (PKCS#11 3.0); p11-kit's 2.40 header lacks it.
struct EddsaParams {
  CK_BBOOL ph_flag;
  CK_ULONG context_data_len;
  CK_BYTE_PTR context_data;
};

// ---------------------------------------------------------------------------
// Status -> CKR_*: the one table.

enum class Context { kObject, kKey, kOther };

CK_RV MapStatus(const Status& s, Context ctx) {
  switch (s.code()) {
    case Code::kOk:
      return CKR_OK;
    case Code::kInvalidArgument:
      return ctx == Context::kKey ? CKR_MECHANISM_PARAM_INVALID
                                  : CKR_ARGUMENTS_BAD;
    case Code::kNotFound:
      return ctx == Context::kKey      ? CKR_KEY_HANDLE_INVALID
             : ctx == Context::kObject ? CKR_OBJECT_HANDLE_INVALID
                                       : CKR_ARGUMENTS_BAD;
    case Code::kPermissionDenied:
      return CKR_KEY_FUNCTION_NOT_PERMITTED;
    case Code::kAlreadyExists:
      return CKR_TEMPLATE_INCONSISTENT;
    case Code::kUnsupported:
      return CKR_MECHANISM_INVALID;
    case Code::kResourceExhausted:
      return CKR_DEVICE_MEMORY;
    case Code::kBackendUnavailable:
    case Code::kUnavailable:
    case Code::kDeadlineExceeded:
      return CKR_DEVICE_ERROR;
    case Code::kInternal:
      return CKR_FUNCTION_FAILED;
  }
  return CKR_GENERAL_ERROR;
}

template <typename F>
CK_RV Guard(F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  } catch (...) {
    return CKR_GENERAL_ERROR;
  }
}

// ---------------------------------------------------------------------------
// Small encoders.

Bytes StrAttr(const std::string& s) { return Bytes(s.begin(), s.end()); }

// DER OCTET STRING around raw bytes.
Bytes DerOctetString(const Bytes& raw) {
  Bytes out{0x04};
  const std::size_t n = raw.size();
  if (n < 0x80) {
    out.push_back(static_cast<uint8_t>(n));
  } else if (n < 0x100) {
    out.push_back(0x81);
    out.push_back(static_cast<uint8_t>(n));
  } else {
    out.push_back(0x82);
    out.push_back(static_cast<uint8_t>(n >> 8));
    out.push_back(static_cast<uint8_t>(n & 0xff));
  }
  out.insert(out.end(), raw.begin(), raw.end());
  return out;
}

void Pad(CK_UTF8CHAR* dst, std::size_t n, const std::string& s) {
  std::memset(dst, ' ', n);
  std::memcpy(dst, s.data(), std::min(n, s.size()));
}

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::string(v) : fallback;
}

std::string OwnerName(uint32_t uid) {
  struct passwd pw {};
  struct passwd* result = nullptr;
  std::vector<char> buf(4096);
  if (getpwuid_r(uid, &pw, buf.data(), buf.size(), &result) == 0 &&
      result != nullptr) {
    return pw.pw_name;
  }
  return std::to_string(uid);
}

// ---------------------------------------------------------------------------
// Objects.

struct KeyObject {
  v1::KeyRef ref;
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  uint32_t usage = 0;
  std::string public_key_sha256;
  std::string spki;
  CK_KEY_TYPE key_type = 0;
  std::size_t sig_len = 0;      // RSA modulus bytes; ECDSA r||s; Ed25519 64
  std::size_t field_bytes = 0;  // EC: bytes of one coordinate
  std::string certificate;      // DER X.509 kept beside the key; may be empty
  CK_OBJECT_HANDLE priv_handle = 0;
  CK_OBJECT_HANDLE pub_handle = 0;   // priv_handle + 1
  CK_OBJECT_HANDLE cert_handle = 0;  // priv_handle + 2, if certificate
  AttrMap priv_attrs;
  AttrMap pub_attrs;
  AttrMap cert_attrs;

  bool can(v1::Usage u) const {
    return (usage & static_cast<uint32_t>(u)) != 0;
  }
  // The attributes of the object `h` (one of this key's handles).
  const AttrMap& AttrsOf(CK_OBJECT_HANDLE h) const {
    return h == priv_handle                         ? priv_attrs
           : (cert_handle != 0 && h == cert_handle) ? cert_attrs
                                                    : pub_attrs;
  }
  // Gives the key's objects their handles: base, base + 1, base + 2.
  void SetHandles(CK_OBJECT_HANDLE base) {
    priv_handle = base;
    pub_handle = base + 1;
    cert_handle = certificate.empty() ? 0 : base + 2;
  }
};

// Handles per key: private, public, certificate.
constexpr CK_OBJECT_HANDLE kHandlesPerKey = 3;

Bytes BnParam(EVP_PKEY* pkey, const char* name) {
  BIGNUM* bn = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &bn) != 1) {
    return {};
  }
  SslPtr<BIGNUM> owned(bn);
  Bytes out(static_cast<std::size_t>(BN_num_bytes(bn)));
  BN_bn2bin(bn, out.data());
  return out;
}

Bytes OctetParam(EVP_PKEY* pkey, const char* name) {
  std::size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey, name, nullptr, 0, &len) != 1) {
    return {};
  }
  Bytes out(len);
  if (EVP_PKEY_get_octet_string_param(pkey, name, out.data(), out.size(),
                                      &len) != 1) {
    return {};
  }
  out.resize(len);
  return out;
}

template <typename T, int (*Encode)(const T*, unsigned char**)>
Bytes Der(const T* v) {
  unsigned char* der = nullptr;
  const int len = v == nullptr ? -1 : Encode(v, &der);
  if (len <= 0) {
    return {};
  }
  Bytes out(der, der + len);
  OPENSSL_free(der);
  return out;
}

// The attributes of an X.509 certificate object (PKCS#11 2.40 4.6.3).
StatusOr<AttrMap> CertificateAttrs(const std::string& der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  SslPtr<X509> cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (cert == nullptr) {
    return Internal("daemon returned an unreadable certificate");
  }
  AttrMap a;
  a[CKA_CLASS] = UlongAttr(CKO_CERTIFICATE);
  a[CKA_CERTIFICATE_TYPE] = UlongAttr(CKC_X_509);
  a[CKA_PRIVATE] = BoolAttr(false);
  a[CKA_TRUSTED] = BoolAttr(false);
  a[CKA_CERTIFICATE_CATEGORY] = UlongAttr(1);  // token user: ours, with key
  a[CKA_VALUE] = StrAttr(der);
  a[CKA_SUBJECT] =
      Der<X509_NAME, i2d_X509_NAME>(X509_get_subject_name(cert.get()));
  a[CKA_ISSUER] =
      Der<X509_NAME, i2d_X509_NAME>(X509_get_issuer_name(cert.get()));
  a[CKA_SERIAL_NUMBER] =
      Der<ASN1_INTEGER, i2d_ASN1_INTEGER>(X509_get0_serialNumber(cert.get()));
  unsigned char sha1[SHA_DIGEST_LENGTH];
  SHA1(reinterpret_cast<const unsigned char*>(der.data()), der.size(), sha1);
  a[CKA_CHECK_VALUE] = Bytes(sha1, sha1 + 3);
  a[CKA_URL] = Bytes{};
  a[CKA_HASH_OF_SUBJECT_PUBLIC_KEY] = Bytes{};
  a[CKA_HASH_OF_ISSUER_PUBLIC_KEY] = Bytes{};
  a[CKA_JAVA_MIDP_SECURITY_DOMAIN] = UlongAttr(0);
  a[CKA_NAME_HASH_ALGORITHM] = UlongAttr(CKM_SHA_1);
  return a;
}

// Builds the objects of a key (private, public and, when the daemon keeps
// one, certificate) from its KeyInfo and DER SPKI.
StatusOr<std::shared_ptr<KeyObject>> BuildObject(const v1::KeyInfo& info,
                                                 const std::string& spki,
                                                 uint32_t self_uid) {
  auto obj = std::make_shared<KeyObject>();
  const bool own = info.owner() == self_uid;
  obj->ref = client::MakeKeyRef(
      info.name(), own ? std::nullopt : std::optional<uint32_t>(info.owner()));
  obj->type = info.type();
  obj->usage = info.usage();
  obj->public_key_sha256 = info.public_key_sha256();
  obj->spki = spki;
  obj->certificate = info.certificate();

  const auto* p = reinterpret_cast<const unsigned char*>(spki.data());
  SslPtr<EVP_PKEY> pkey(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  if (pkey == nullptr) {
    return Internal("daemon returned an unreadable public key");
  }

  AttrMap common;
  const std::string label =
      own ? info.name() : OwnerName(info.owner()) + "/" + info.name();
  common[CKA_LABEL] = StrAttr(label);
  std::string id = info.public_key_sha256();
  common[CKA_ID] = StrAttr(id);
  common[CKA_TOKEN] = BoolAttr(true);
  common[CKA_MODIFIABLE] = BoolAttr(false);
  common[CKA_COPYABLE] = BoolAttr(false);
  common[CKA_DESTROYABLE] = BoolAttr(own);  // C_DestroyObject: own keys only
  common[CKA_START_DATE] = Bytes{};
  common[CKA_END_DATE] = Bytes{};
  common[CKA_LOCAL] = BoolAttr(false);
  common[CKA_KEY_GEN_MECHANISM] = UlongAttr(CK_UNAVAILABLE_INFORMATION);
  common[CKA_SUBJECT] = Bytes{};
  if (!obj->certificate.empty()) {
    auto cert = CertificateAttrs(obj->certificate);
    if (!cert.ok()) {
      return cert.status();
    }
    obj->cert_attrs = std::move(*cert);
    common[CKA_SUBJECT] = obj->cert_attrs[CKA_SUBJECT];
  }
  common[CKA_PUBLIC_KEY_INFO] = StrAttr(spki);
  common[CKA_DERIVE] = BoolAttr(obj->can(v1::USAGE_DERIVE));

  if (IsRsa(info.type())) {
    obj->key_type = CKK_RSA;
    obj->sig_len = static_cast<std::size_t>(EVP_PKEY_get_size(pkey.get()));
    common[CKA_MODULUS] = BnParam(pkey.get(), OSSL_PKEY_PARAM_RSA_N);
    common[CKA_PUBLIC_EXPONENT] = BnParam(pkey.get(), OSSL_PKEY_PARAM_RSA_E);
    common[CKA_MODULUS_BITS] =
        UlongAttr(static_cast<CK_ULONG>(EVP_PKEY_get_bits(pkey.get())));
  } else {
    switch (info.type()) {
      case v1::EC_P256:
        obj->field_bytes = 32;
        obj->key_type = CKK_EC;
        break;
      case v1::EC_P384:
        obj->field_bytes = 48;
        obj->key_type = CKK_EC;
        break;
      case v1::EC_P521:
        obj->field_bytes = 66;
        obj->key_type = CKK_EC;
        break;
      case v1::ED25519:
        obj->field_bytes = 32;
        obj->key_type = CKK_EC_EDWARDS;
        break;
      case v1::X25519:
        obj->field_bytes = 32;
        obj->key_type = CKK_EC_MONTGOMERY;
        break;
      default:
        return Unsupported("key type not presented by the PKCS#11 module");
    }
    obj->sig_len = 2 * obj->field_bytes;
    // OpenSSL 3.0 has no encoded form for Ed25519; its raw public key is
    // the encoding.
    Bytes point = OctetParam(pkey.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    if (point.empty()) {
      point = OctetParam(pkey.get(), OSSL_PKEY_PARAM_PUB_KEY);
    }
    if (point.empty()) {
      return Internal("cannot read the public point");
    }
    common[CKA_EC_PARAMS] = CurveOid(info.type());
    common[CKA_EC_POINT] = DerOctetString(point);
  }
  common[CKA_KEY_TYPE] = UlongAttr(obj->key_type);

  if (!obj->certificate.empty()) {
    for (CK_ATTRIBUTE_TYPE t :
         {CKA_LABEL, CKA_ID, CKA_TOKEN, CKA_MODIFIABLE, CKA_COPYABLE,
          CKA_DESTROYABLE, CKA_START_DATE, CKA_END_DATE}) {
      obj->cert_attrs[t] = common[t];
    }
  }
  obj->priv_attrs = common;
  obj->priv_attrs[CKA_CLASS] = UlongAttr(CKO_PRIVATE_KEY);
  obj->priv_attrs[CKA_PRIVATE] = BoolAttr(true);
  obj->priv_attrs[CKA_SENSITIVE] = BoolAttr(true);
  obj->priv_attrs[CKA_ALWAYS_SENSITIVE] = BoolAttr(true);
  obj->priv_attrs[CKA_EXTRACTABLE] = BoolAttr(false);
  obj->priv_attrs[CKA_NEVER_EXTRACTABLE] = BoolAttr(true);
  obj->priv_attrs[CKA_ALWAYS_AUTHENTICATE] = BoolAttr(false);
  obj->priv_attrs[CKA_WRAP_WITH_TRUSTED] = BoolAttr(false);
  obj->priv_attrs[CKA_SIGN] = BoolAttr(obj->can(v1::USAGE_SIGN));
  obj->priv_attrs[CKA_SIGN_RECOVER] = BoolAttr(false);
  obj->priv_attrs[CKA_DECRYPT] = BoolAttr(obj->can(v1::USAGE_DECRYPT));
  obj->priv_attrs[CKA_UNWRAP] = BoolAttr(false);

  obj->pub_attrs = std::move(common);
  obj->pub_attrs[CKA_CLASS] = UlongAttr(CKO_PUBLIC_KEY);
  obj->pub_attrs[CKA_PRIVATE] = BoolAttr(false);
  obj->pub_attrs[CKA_VERIFY] = BoolAttr(obj->can(v1::USAGE_SIGN));
  obj->pub_attrs[CKA_VERIFY_RECOVER] = BoolAttr(false);
  obj->pub_attrs[CKA_ENCRYPT] = BoolAttr(obj->can(v1::USAGE_DECRYPT));
  obj->pub_attrs[CKA_WRAP] = BoolAttr(false);
  obj->pub_attrs[CKA_TRUSTED] = BoolAttr(false);
  return obj;
}

// ---------------------------------------------------------------------------
// Mechanisms.

struct MechanismSpec {
  CK_MECHANISM_TYPE type;
  CK_ULONG min_bits;
  CK_ULONG max_bits;
  CK_FLAGS flags;
};

constexpr CK_FLAGS kEcFlags =
    CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;

const MechanismSpec kMechanisms[] = {
    {CKM_RSA_PKCS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY | CKF_DECRYPT},
    {CKM_SHA256_RSA_PKCS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_SHA384_RSA_PKCS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_SHA512_RSA_PKCS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_RSA_PKCS_PSS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_SHA256_RSA_PKCS_PSS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_SHA384_RSA_PKCS_PSS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_SHA512_RSA_PKCS_PSS, 2048, 4096, CKF_HW | CKF_SIGN | CKF_VERIFY},
    {CKM_RSA_PKCS_OAEP, 2048, 4096, CKF_HW | CKF_DECRYPT},
    {CKM_ECDSA, 256, 521, CKF_HW | CKF_SIGN | CKF_VERIFY | kEcFlags},
    {CKM_ECDSA_SHA256, 256, 521, CKF_HW | CKF_SIGN | CKF_VERIFY | kEcFlags},
    {CKM_ECDSA_SHA384, 256, 521, CKF_HW | CKF_SIGN | CKF_VERIFY | kEcFlags},
    {CKM_ECDSA_SHA512, 256, 521, CKF_HW | CKF_SIGN | CKF_VERIFY | kEcFlags},
    {CKM_EDDSA, 255, 255, CKF_HW | CKF_SIGN | CKF_VERIFY | CKF_EC_NAMEDCURVE},
    {CKM_ECDH1_DERIVE, 255, 521, CKF_HW | CKF_DERIVE | kEcFlags},
    {CKM_SHA256, 0, 0, CKF_DIGEST},
    {CKM_SHA384, 0, 0, CKF_DIGEST},
    {CKM_SHA512, 0, 0, CKF_DIGEST},
    {CKM_RSA_PKCS_KEY_PAIR_GEN, 2048, 4096, CKF_HW | CKF_GENERATE_KEY_PAIR},
    {CKM_EC_KEY_PAIR_GEN, 256, 521, CKF_HW | CKF_GENERATE_KEY_PAIR | kEcFlags},
    {CKM_EC_EDWARDS_KEY_PAIR_GEN, 255, 255,
     CKF_HW | CKF_GENERATE_KEY_PAIR | CKF_EC_NAMEDCURVE},
    {CKM_EC_MONTGOMERY_KEY_PAIR_GEN, 255, 255,
     CKF_HW | CKF_GENERATE_KEY_PAIR | CKF_EC_NAMEDCURVE},
};

std::optional<v1::Digest> DigestForMechanism(CK_MECHANISM_TYPE m) {
  switch (m) {
    case CKM_SHA_1:
      return v1::SHA1;
    case CKM_SHA224:
      return v1::SHA224;
    case CKM_SHA256:
      return v1::SHA256;
    case CKM_SHA384:
      return v1::SHA384;
    case CKM_SHA512:
      return v1::SHA512;
    default:
      return std::nullopt;
  }
}

std::optional<v1::Digest> DigestForMgf(CK_RSA_PKCS_MGF_TYPE mgf) {
  switch (mgf) {
    case CKG_MGF1_SHA1:
      return v1::SHA1;
    case CKG_MGF1_SHA224:
      return v1::SHA224;
    case CKG_MGF1_SHA256:
      return v1::SHA256;
    case CKG_MGF1_SHA384:
      return v1::SHA384;
    case CKG_MGF1_SHA512:
      return v1::SHA512;
    default:
      return std::nullopt;
  }
}

// ---------------------------------------------------------------------------
// Sessions and module state.

struct SignOp {
  CK_MECHANISM_TYPE mechanism = 0;
  std::shared_ptr<const KeyObject> key;
  v1::SignRequest request;  // algorithm, digest, PSS parameters filled in
  SslPtr<EVP_MD_CTX> md;    // hashed mechanisms
  Bytes buffer;             // raw mechanisms
  bool updated = false;     // C_SignUpdate was called
};

struct DecryptOp {
  std::shared_ptr<const KeyObject> key;
  v1::DecryptRequest request;
  std::optional<SecretBytes> pending;  // plaintext kept after BUFFER_TOO_SMALL
};

struct Session {
  std::mutex mu;
  CK_FLAGS flags = 0;
  bool find_active = false;
  std::vector<CK_OBJECT_HANDLE> found;
  std::size_t found_pos = 0;
  std::optional<SignOp> sign;
  std::optional<SignOp> verify;  // same parameters; checked in the process
  std::optional<DecryptOp> decrypt;
  SslPtr<EVP_MD_CTX> digest;  // C_DigestInit .. C_Digest/C_DigestFinal
};

// A session object made by C_DeriveKey: the shared secret belongs to the
// application (that is what ECDH is for); it is wiped when destroyed.
struct SecretObject {
  CK_SESSION_HANDLE session = 0;
  AttrMap attrs;  // everything but CKA_VALUE
  Bytes value;
  bool readable = false;  // !CKA_SENSITIVE && CKA_EXTRACTABLE
  SecretObject() = default;
  SecretObject(const SecretObject&) = delete;
  SecretObject& operator=(const SecretObject&) = delete;
  ~SecretObject() { CleanseMemory(value.data(), value.size()); }
};

struct State {
  pid_t pid = 0;
  uint32_t self_uid = 0;
  std::string token_label;
  std::unique_ptr<client::Client> client;

  std::mutex load_mu;  // one key-list refresh at a time

  std::mutex mu;  // everything below
  std::map<CK_SESSION_HANDLE, std::shared_ptr<Session>> sessions;
  CK_SESSION_HANDLE next_session = 1;
  std::map<std::string, CK_OBJECT_HANDLE>
      handle_for;  // "owner/name" -> private handle
  CK_OBJECT_HANDLE next_handle = 2;
  std::map<CK_OBJECT_HANDLE, std::shared_ptr<const KeyObject>> objects;
  bool loaded = false;
  bool logged_in = false;
  std::map<CK_OBJECT_HANDLE, std::shared_ptr<SecretObject>> secrets;
  CK_OBJECT_HANDLE next_secret = 0x40000000;  // never collides with keys
};

std::mutex g_mu;
std::shared_ptr<State> g_state;

// g_mu is held across fork() so a child never inherits it locked.
void RegisterForkHandlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { g_mu.lock(); }, [] { g_mu.unlock(); },
                   [] { g_mu.unlock(); });
  });
}

std::shared_ptr<State> GetState() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_state;
}

#define KH_STATE_OR_RETURN(st)            \
  std::shared_ptr<State> st = GetState(); \
  if (st == nullptr) {                    \
    return CKR_CRYPTOKI_NOT_INITIALIZED;  \
  }

std::shared_ptr<Session> FindSession(State& st, CK_SESSION_HANDLE h) {
  std::lock_guard<std::mutex> lock(st.mu);
  auto it = st.sessions.find(h);
  return it == st.sessions.end() ? nullptr : it->second;
}

#define KH_SESSION_OR_RETURN(st, h, sess)                \
  KH_STATE_OR_RETURN(st);                                \
  std::shared_ptr<Session> sess = FindSession(*st, (h)); \
  if (sess == nullptr) {                                 \
    return CKR_SESSION_HANDLE_INVALID;                   \
  }

// Refreshes the object cache: one ListKeys, plus one GetPublicKey for each
// key not seen before (or whose public key changed).
CK_RV LoadObjects(State& st) {
  std::lock_guard<std::mutex> load_lock(st.load_mu);
  auto list = st.client->ListKeys(/*include_shared=*/true);
  if (!list.ok()) {
    return MapStatus(list.status(), Context::kOther);
  }
  std::map<std::string, std::shared_ptr<const KeyObject>> previous;
  {
    std::lock_guard<std::mutex> lock(st.mu);
    for (const auto& [h, obj] : st.objects) {
      if (h == obj->priv_handle) {
        previous[std::to_string(obj->ref.has_owner() ? obj->ref.owner()
                                                     : st.self_uid) +
                 "/" + obj->ref.name()] = obj;
      }
    }
  }
  std::vector<std::pair<std::string, std::shared_ptr<KeyObject>>> fresh;
  for (const v1::KeyInfo& info : (*list).keys()) {
    const std::string key = std::to_string(info.owner()) + "/" + info.name();
    auto prev = previous.find(key);
    if (prev != previous.end() &&
        prev->second->public_key_sha256 == info.public_key_sha256() &&
        prev->second->usage == info.usage() &&
        prev->second->certificate == info.certificate()) {
      fresh.emplace_back(key, std::const_pointer_cast<KeyObject>(prev->second));
      continue;
    }
    v1::KeyRef ref = client::MakeKeyRef(
        info.name(), info.owner() == st.self_uid
                         ? std::nullopt
                         : std::optional<uint32_t>(info.owner()));
    auto pub = st.client->GetPublicKey(ref);
    if (!pub.ok()) {
      if (pub.status().code() == Code::kNotFound) {
        continue;  // deleted or revoked between the two calls
      }
      return MapStatus(pub.status(), Context::kOther);
    }
    auto obj = BuildObject(info, (*pub).public_key(), st.self_uid);
    if (!obj.ok()) {
      continue;  // a key type this module does not present
    }
    fresh.emplace_back(key, *obj);
  }
  std::lock_guard<std::mutex> lock(st.mu);
  st.objects.clear();
  for (auto& [key, obj] : fresh) {
    if (obj->priv_handle == 0) {
      auto it = st.handle_for.find(key);
      if (it == st.handle_for.end()) {
        it = st.handle_for.emplace(key, st.next_handle).first;
        st.next_handle += kHandlesPerKey;
      }
      obj->SetHandles(it->second);
    }
    st.objects[obj->priv_handle] = obj;
    st.objects[obj->pub_handle] = obj;
    if (obj->cert_handle != 0) {
      st.objects[obj->cert_handle] = obj;
    }
  }
  st.loaded = true;
  return CKR_OK;
}

std::shared_ptr<const KeyObject> FindObject(State& st, CK_OBJECT_HANDLE h,
                                            bool* is_private) {
  std::lock_guard<std::mutex> lock(st.mu);
  auto it = st.objects.find(h);
  if (it == st.objects.end()) {
    return nullptr;
  }
  *is_private = it->second->priv_handle == h;
  return it->second;
}

// ---------------------------------------------------------------------------
// General, slot and token.

CK_RV Initialize(CK_VOID_PTR init_args) {
  if (init_args != nullptr) {
    auto* a = static_cast<CK_C_INITIALIZE_ARGS*>(init_args);
    if (a->pReserved != nullptr) {
      return CKR_ARGUMENTS_BAD;
    }
    const int set = (a->CreateMutex != nullptr) + (a->DestroyMutex != nullptr) +
                    (a->LockMutex != nullptr) + (a->UnlockMutex != nullptr);
    if (set != 0 && set != 4) {
      return CKR_ARGUMENTS_BAD;
    }
    // With or without CKF_OS_LOCKING_OK we use OS locks, which every
    // application that supplies its own mutexes also accepts in practice.
  }
  RegisterForkHandlers();
  // The new state (and its client, which takes the client library's own
  // locks) is built and destroyed outside g_mu: at fork() those locks are
  // taken before g_mu, so holding g_mu while taking them could deadlock.
  auto fresh = std::make_shared<State>();
  fresh->pid = getpid();
  fresh->self_uid = static_cast<uint32_t>(geteuid());
  fresh->token_label = EnvOr("KEYHOLD_PKCS11_TOKEN_LABEL", "keyhold");
  fresh->client =
      std::make_unique<client::Client>(client::OptionsFromEnvironment());
  std::unique_lock<std::mutex> lock(g_mu);
  if (g_state != nullptr) {
    if (g_state->pid == getpid()) {
      lock.unlock();
      return CKR_CRYPTOKI_ALREADY_INITIALIZED;  // `fresh` is dropped unlocked
    }
    // A child after fork(): the parent's state may hold locked mutexes, so it
    // is abandoned rather than destroyed.
    new std::shared_ptr<State>(
        std::move(g_state));  // NOLINT: leaked on purpose
  }
  g_state = std::move(fresh);
  return CKR_OK;
}

CK_RV Finalize(CK_VOID_PTR reserved_ptr) {
  if (reserved_ptr != nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::shared_ptr<State> old;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (g_state == nullptr) {
      return CKR_CRYPTOKI_NOT_INITIALIZED;
    }
    old = std::move(g_state);
  }
  old.reset();  // outside g_mu, see Initialize
  return CKR_OK;
}

CK_RV GetInfo(CK_INFO_PTR info) {
  KH_STATE_OR_RETURN(st);
  if (info == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::memset(info, 0, sizeof *info);
  info->cryptokiVersion = {2, 40};
  Pad(info->manufacturerID, sizeof info->manufacturerID, "keyhold");
  Pad(info->libraryDescription, sizeof info->libraryDescription,
      "keyhold PKCS#11 module");
  info->libraryVersion = {0, 1};
  return CKR_OK;
}

CK_RV GetSlotList(CK_BBOOL /*token_present*/, CK_SLOT_ID_PTR list,
                  CK_ULONG_PTR n) {
  KH_STATE_OR_RETURN(st);
  if (n == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  if (list == nullptr) {
    *n = 1;
    return CKR_OK;
  }
  if (*n < 1) {
    *n = 1;
    return CKR_BUFFER_TOO_SMALL;
  }
  list[0] = kSlotId;
  *n = 1;
  return CKR_OK;
}

CK_RV GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  if (info == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::memset(info, 0, sizeof *info);
  Pad(info->slotDescription, sizeof info->slotDescription, "keyhold daemon");
  Pad(info->manufacturerID, sizeof info->manufacturerID, "keyhold");
  info->flags = CKF_TOKEN_PRESENT;
  info->hardwareVersion = {0, 1};
  info->firmwareVersion = {0, 1};
  return CKR_OK;
}

CK_RV GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  if (info == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::memset(info, 0, sizeof *info);
  Pad(info->label, sizeof info->label, st->token_label);
  Pad(info->manufacturerID, sizeof info->manufacturerID, "keyhold");
  Pad(info->model, sizeof info->model, "keyholdd");
  Pad(info->serialNumber, sizeof info->serialNumber,
      "uid" + std::to_string(st->self_uid));
  info->flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_RNG;
  info->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
  info->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    info->ulSessionCount = st->sessions.size();
    CK_ULONG rw = 0;
    for (const auto& [h, s] : st->sessions) {
      rw += (s->flags & CKF_RW_SESSION) != 0 ? 1UL : 0UL;
    }
    info->ulRwSessionCount = rw;
  }
  info->ulMaxPinLen = 0;
  info->ulMinPinLen = 0;
  info->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
  info->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
  info->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
  info->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
  info->hardwareVersion = {0, 1};
  info->firmwareVersion = {0, 1};
  return CKR_OK;
}

CK_RV GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                       CK_ULONG_PTR n) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  if (n == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  constexpr CK_ULONG kCount = std::size(kMechanisms);
  if (list == nullptr) {
    *n = kCount;
    return CKR_OK;
  }
  if (*n < kCount) {
    *n = kCount;
    return CKR_BUFFER_TOO_SMALL;
  }
  for (CK_ULONG i = 0; i < kCount; ++i) {
    list[i] = kMechanisms[i].type;
  }
  *n = kCount;
  return CKR_OK;
}

CK_RV GetMechanismInfo(CK_SLOT_ID slot, CK_MECHANISM_TYPE type,
                       CK_MECHANISM_INFO_PTR info) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  if (info == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  for (const auto& m : kMechanisms) {
    if (m.type == type) {
      info->ulMinKeySize = m.min_bits;
      info->ulMaxKeySize = m.max_bits;
      info->flags = m.flags;
      return CKR_OK;
    }
  }
  return CKR_MECHANISM_INVALID;
}

// ---------------------------------------------------------------------------
// Sessions and login.

CK_RV OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR /*app*/,
                  CK_NOTIFY /*notify*/, CK_SESSION_HANDLE_PTR out) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  if ((flags & CKF_SERIAL_SESSION) == 0) {
    return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
  }
  if (out == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  auto s = std::make_shared<Session>();
  s->flags = flags;
  std::lock_guard<std::mutex> lock(st->mu);
  const CK_SESSION_HANDLE h = st->next_session++;
  st->sessions[h] = std::move(s);
  *out = h;
  return CKR_OK;
}

CK_RV CloseSession(CK_SESSION_HANDLE h) {
  KH_STATE_OR_RETURN(st);
  std::lock_guard<std::mutex> lock(st->mu);
  if (st->sessions.erase(h) == 0) {
    return CKR_SESSION_HANDLE_INVALID;
  }
  std::erase_if(st->secrets,
                [h](const auto& kv) { return kv.second->session == h; });
  if (st->sessions.empty()) {
    st->logged_in = false;  // login state ends with the last session
  }
  return CKR_OK;
}

CK_RV CloseAllSessions(CK_SLOT_ID slot) {
  KH_STATE_OR_RETURN(st);
  if (slot != kSlotId) {
    return CKR_SLOT_ID_INVALID;
  }
  std::lock_guard<std::mutex> lock(st->mu);
  st->sessions.clear();
  st->secrets.clear();
  st->logged_in = false;
  return CKR_OK;
}

CK_RV GetSessionInfo(CK_SESSION_HANDLE h, CK_SESSION_INFO_PTR info) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (info == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  bool logged_in = false;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    logged_in = st->logged_in;
  }
  const bool rw = (sess->flags & CKF_RW_SESSION) != 0;
  info->slotID = kSlotId;
  info->flags = sess->flags;
  info->ulDeviceError = 0;
  info->state = logged_in
                    ? (rw ? CKS_RW_USER_FUNCTIONS : CKS_RO_USER_FUNCTIONS)
                    : (rw ? CKS_RW_PUBLIC_SESSION : CKS_RO_PUBLIC_SESSION);
  return CKR_OK;
}

// The caller's identity is its uid; the PIN is ignored, so programs that
// always log in keep working.
CK_RV Login(CK_SESSION_HANDLE h, CK_USER_TYPE user, CK_UTF8CHAR_PTR /*pin*/,
            CK_ULONG /*pin_len*/) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (user != CKU_USER && user != CKU_SO && user != CKU_CONTEXT_SPECIFIC) {
    return CKR_USER_TYPE_INVALID;
  }
  std::lock_guard<std::mutex> lock(st->mu);
  if (user == CKU_CONTEXT_SPECIFIC) {
    return CKR_OK;
  }
  if (st->logged_in) {
    return CKR_USER_ALREADY_LOGGED_IN;
  }
  st->logged_in = true;
  return CKR_OK;
}

CK_RV Logout(CK_SESSION_HANDLE h) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> lock(st->mu);
  if (!st->logged_in) {
    return CKR_USER_NOT_LOGGED_IN;
  }
  st->logged_in = false;
  return CKR_OK;
}

// ---------------------------------------------------------------------------
// Objects.

CK_RV GetAttributeValue(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                        CK_ATTRIBUTE_PTR templ, CK_ULONG n) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (templ == nullptr && n != 0) {
    return CKR_ARGUMENTS_BAD;
  }
  bool is_private = false;
  auto obj = FindObject(*st, object, &is_private);
  std::shared_ptr<const SecretObject> secret;
  if (obj == nullptr) {
    std::lock_guard<std::mutex> lock(st->mu);
    auto it = st->secrets.find(object);
    if (it == st->secrets.end()) {
      return CKR_OBJECT_HANDLE_INVALID;
    }
    secret = it->second;
  }
  AttrSource src;
  src.attrs = secret != nullptr ? &secret->attrs : &obj->AttrsOf(object);
  src.is_private = is_private;
  if (secret != nullptr) {
    src.secret = &secret->value;
    src.secret_readable = secret->readable;
  }
  return ReadAttributes(src, templ, n);
}

CK_RV FindObjectsInit(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR templ, CK_ULONG n) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (templ == nullptr && n != 0) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->find_active) {
    return CKR_OPERATION_ACTIVE;
  }
  FindTemplate want;
  CK_RV rv = ParseFindTemplate(templ, n, &want);
  if (rv != CKR_OK) {
    return rv;
  }
  rv = LoadObjects(*st);
  if (rv != CKR_OK) {
    return rv;
  }
  sess->found.clear();
  sess->found_pos = 0;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    for (const auto& [handle, obj] : st->objects) {
      if (Matches(obj->AttrsOf(handle), want)) {
        sess->found.push_back(handle);
      }
    }
    for (const auto& [handle, secret] : st->secrets) {
      if (Matches(secret->attrs, want)) {
        sess->found.push_back(handle);
      }
    }
  }
  sess->find_active = true;
  return CKR_OK;
}

CK_RV FindObjects(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE_PTR out, CK_ULONG max,
                  CK_ULONG_PTR n) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if ((out == nullptr && max != 0) || n == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->find_active) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  CK_ULONG got = 0;
  while (got < max && sess->found_pos < sess->found.size()) {
    out[got++] = sess->found[sess->found_pos++];
  }
  *n = got;
  return CKR_OK;
}

CK_RV FindObjectsFinal(CK_SESSION_HANDLE h) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->find_active) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  sess->find_active = false;
  sess->found.clear();
  return CKR_OK;
}

CK_RV GetObjectSize(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object,
                    CK_ULONG_PTR size) {
  KH_SESSION_OR_RETURN(st, h, sess);
  bool is_private = false;
  if (FindObject(*st, object, &is_private) == nullptr) {
    return CKR_OBJECT_HANDLE_INVALID;
  }
  if (size == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  *size = CK_UNAVAILABLE_INFORMATION;
  return CKR_OK;
}

// ---------------------------------------------------------------------------
// Signing.

// Looks up a private key for an operation, loading the key list once if the
// application uses a handle before any search (handles are stable).
CK_RV KeyForOperation(State& st, CK_OBJECT_HANDLE key, v1::Usage usage,
                      std::shared_ptr<const KeyObject>* out) {
  bool is_private = false;
  auto obj = FindObject(st, key, &is_private);
  if (obj == nullptr) {
    bool loaded = false;
    {
      std::lock_guard<std::mutex> lock(st.mu);
      loaded = st.loaded;
    }
    if (!loaded) {
      CK_RV rv = LoadObjects(st);
      if (rv != CKR_OK) {
        return rv;
      }
      obj = FindObject(st, key, &is_private);
    }
  }
  if (obj == nullptr) {
    return CKR_KEY_HANDLE_INVALID;
  }
  if (!is_private || !obj->can(usage)) {
    return CKR_KEY_FUNCTION_NOT_PERMITTED;
  }
  *out = std::move(obj);
  return CKR_OK;
}

bool NoParameter(const CK_MECHANISM& m) {
  return m.pParameter == nullptr || m.ulParameterLen == 0;
}

// Verification is a public-key operation: the key's public or private
// object names it, and the signature is checked here, with no round trip.
CK_RV KeyForVerify(State& st, CK_OBJECT_HANDLE key,
                   std::shared_ptr<const KeyObject>* out) {
  bool is_private = false;
  auto obj = FindObject(st, key, &is_private);
  if (obj == nullptr) {
    CK_RV rv = LoadObjects(st);
    if (rv != CKR_OK) {
      return rv;
    }
    obj = FindObject(st, key, &is_private);
  }
  if (obj == nullptr || (obj->cert_handle != 0 && key == obj->cert_handle)) {
    return CKR_KEY_HANDLE_INVALID;
  }
  if (!obj->can(v1::USAGE_SIGN)) {
    return CKR_KEY_FUNCTION_NOT_PERMITTED;
  }
  *out = std::move(obj);
  return CKR_OK;
}

// Checks mechanism and parameters against the key and fills in op for a
// sign (the request sent at C_Sign) or a verify (done in the process).
CK_RV PrepareSignOp(State& st, CK_MECHANISM_PTR mech, CK_OBJECT_HANDLE key,
                    bool verify, SignOp* out) {
  SignOp op;
  op.mechanism = mech->mechanism;
  CK_RV rv = verify ? KeyForVerify(st, key, &op.key)
                    : KeyForOperation(st, key, v1::USAGE_SIGN, &op.key);
  if (rv != CKR_OK) {
    return rv;
  }
  const bool rsa = op.key->key_type == CKK_RSA;
  const bool ec = op.key->key_type == CKK_EC;
  const bool ed = op.key->key_type == CKK_EC_EDWARDS;
  std::optional<v1::Digest> hash;  // hashed here
  v1::SignRequest& req = op.request;
  switch (mech->mechanism) {
    case CKM_RSA_PKCS:
    case CKM_SHA256_RSA_PKCS:
    case CKM_SHA384_RSA_PKCS:
    case CKM_SHA512_RSA_PKCS:
      if (!rsa) {
        return CKR_KEY_TYPE_INCONSISTENT;
      }
      if (!NoParameter(*mech)) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      req.set_algorithm(v1::RSA_PKCS1);
      if (mech->mechanism == CKM_SHA256_RSA_PKCS) hash = v1::SHA256;
      if (mech->mechanism == CKM_SHA384_RSA_PKCS) hash = v1::SHA384;
      if (mech->mechanism == CKM_SHA512_RSA_PKCS) hash = v1::SHA512;
      req.set_digest(hash.value_or(v1::DIGEST_NONE));
      break;
    case CKM_RSA_PKCS_PSS:
    case CKM_SHA256_RSA_PKCS_PSS:
    case CKM_SHA384_RSA_PKCS_PSS:
    case CKM_SHA512_RSA_PKCS_PSS: {
      if (!rsa) {
        return CKR_KEY_TYPE_INCONSISTENT;
      }
      if (mech->pParameter == nullptr ||
          mech->ulParameterLen != sizeof(CK_RSA_PKCS_PSS_PARAMS)) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      const auto* pp =
          static_cast<const CK_RSA_PKCS_PSS_PARAMS*>(mech->pParameter);
      auto d = DigestForMechanism(pp->hashAlg);
      auto mgf = DigestForMgf(pp->mgf);
      if (!d || !mgf || pp->sLen > 0x7fffffffUL) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      if (mech->mechanism != CKM_RSA_PKCS_PSS) {
        hash = mech->mechanism == CKM_SHA256_RSA_PKCS_PSS   ? v1::SHA256
               : mech->mechanism == CKM_SHA384_RSA_PKCS_PSS ? v1::SHA384
                                                            : v1::SHA512;
        if (*d != *hash) {
          return CKR_MECHANISM_PARAM_INVALID;
        }
      }
      req.set_algorithm(v1::RSA_PSS);
      req.set_digest(*d);
      req.set_pss_mgf1_digest(*mgf);
      req.set_pss_salt_length(static_cast<int32_t>(pp->sLen));
      break;
    }
    case CKM_ECDSA:
    case CKM_ECDSA_SHA256:
    case CKM_ECDSA_SHA384:
    case CKM_ECDSA_SHA512:
      if (!ec) {
        return CKR_KEY_TYPE_INCONSISTENT;
      }
      if (!NoParameter(*mech)) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      req.set_algorithm(v1::ECDSA);
      if (mech->mechanism == CKM_ECDSA_SHA256) hash = v1::SHA256;
      if (mech->mechanism == CKM_ECDSA_SHA384) hash = v1::SHA384;
      if (mech->mechanism == CKM_ECDSA_SHA512) hash = v1::SHA512;
      req.set_digest(hash.value_or(v1::DIGEST_NONE));
      break;
    case CKM_EDDSA:
      if (!ed) {
        return CKR_KEY_TYPE_INCONSISTENT;
      }
      if (!NoParameter(*mech)) {
        // Only PureEdDSA (Ed25519) without a context.
        if (mech->ulParameterLen != sizeof(EddsaParams)) {
          return CKR_MECHANISM_PARAM_INVALID;
        }
        const auto* ep = static_cast<const EddsaParams*>(mech->pParameter);
        if (ep->ph_flag != CK_FALSE || ep->context_data_len != 0) {
          return CKR_MECHANISM_PARAM_INVALID;
        }
      }
      req.set_algorithm(v1::ED25519_PURE);
      req.set_digest(v1::DIGEST_NONE);
      break;
    default:
      return CKR_MECHANISM_INVALID;
  }
  *req.mutable_key() = op.key->ref;
  if (hash.has_value()) {
    op.md.reset(EVP_MD_CTX_new());
    if (op.md == nullptr ||
        EVP_DigestInit_ex(op.md.get(), DigestMd(*hash), nullptr) != 1) {
      return CKR_HOST_MEMORY;
    }
  }
  *out = std::move(op);
  return CKR_OK;
}

CK_RV SignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
               CK_OBJECT_HANDLE key) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->sign.has_value()) {
    return CKR_OPERATION_ACTIVE;
  }
  SignOp op;
  CK_RV rv = PrepareSignOp(*st, mech, key, /*verify=*/false, &op);
  if (rv != CKR_OK) {
    return rv;
  }
  sess->sign = std::move(op);
  return CKR_OK;
}

// Converts the daemon's DER ECDSA-Sig-Value to PKCS#11's r || s.
std::optional<Bytes> EcdsaDerToRaw(const std::string& der, std::size_t field) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
  if (sig == nullptr) {
    return std::nullopt;
  }
  const BIGNUM* r = nullptr;
  const BIGNUM* s = nullptr;
  ECDSA_SIG_get0(sig, &r, &s);
  Bytes out(2 * field);
  const int f = static_cast<int>(field);
  const bool ok = BN_bn2binpad(r, out.data(), f) == f &&
                  BN_bn2binpad(s, out.data() + field, f) == f;
  ECDSA_SIG_free(sig);
  return ok ? std::optional<Bytes>(std::move(out)) : std::nullopt;
}

// Finishes a sign operation over `input` (the message for hashed mechanisms
// whose hashing already happened in op.md, else the raw input). The caller
// has checked the output buffer; the operation ends on return.
// Sets op.request's data: the digest of everything hashed (hashed
// mechanisms), or the raw input after checking its length.
CK_RV SetSignInput(SignOp& op, const uint8_t* input, std::size_t len) {
  v1::SignRequest& req = op.request;
  if (op.md != nullptr) {
    if (input != nullptr && len != 0 &&
        EVP_DigestUpdate(op.md.get(), input, len) != 1) {
      return CKR_FUNCTION_FAILED;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int md_len = 0;
    if (EVP_DigestFinal_ex(op.md.get(), md, &md_len) != 1) {
      return CKR_FUNCTION_FAILED;
    }
    req.set_data(md, md_len);
  } else {
    if (len == 0) {
      return CKR_DATA_LEN_RANGE;
    }
    switch (req.algorithm()) {
      case v1::RSA_PKCS1:
        if (len + 11 > op.key->sig_len) {
          return CKR_DATA_LEN_RANGE;
        }
        break;
      case v1::RSA_PSS:
        if (len != DigestSize(req.digest())) {
          return CKR_DATA_LEN_RANGE;
        }
        break;
      case v1::ECDSA:
        if (len > EVP_MAX_MD_SIZE) {
          return CKR_DATA_LEN_RANGE;
        }
        break;
      default:
        break;
    }
    req.set_data(input, len);
  }
  return CKR_OK;
}

CK_RV FinishSign(State& st, SignOp& op, const uint8_t* input, std::size_t len,
                 CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  CK_RV rv = SetSignInput(op, input, len);
  if (rv != CKR_OK) {
    return rv;
  }
  const v1::SignRequest& req = op.request;
  auto out = st.client->Sign(req);
  if (!out.ok()) {
    return MapStatus(out.status(), Context::kKey);
  }
  const std::string& der_or_raw = *out;
  Bytes result;
  if (req.algorithm() == v1::ECDSA) {
    auto raw = EcdsaDerToRaw(der_or_raw, op.key->field_bytes);
    if (!raw) {
      return CKR_DEVICE_ERROR;
    }
    result = std::move(*raw);
  } else {
    result.assign(der_or_raw.begin(), der_or_raw.end());
  }
  if (result.size() > *sig_len) {
    return CKR_DEVICE_ERROR;  // cannot happen: sizes are fixed per key
  }
  std::memcpy(sig, result.data(), result.size());
  *sig_len = result.size();
  return CKR_OK;
}

// Size query and buffer check shared by C_Sign and C_SignFinal. Returns true
// when the call must return `*rv` without touching the operation.
bool SignSizeOnly(const SignOp& op, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len,
                  CK_RV* rv) {
  const CK_ULONG need = op.key->sig_len;
  if (sig == nullptr) {
    *sig_len = need;
    *rv = CKR_OK;
    return true;
  }
  if (*sig_len < need) {
    *sig_len = need;
    *rv = CKR_BUFFER_TOO_SMALL;
    return true;
  }
  return false;
}

CK_RV Sign(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
           CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->sign.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if (sig_len == nullptr || (data == nullptr && data_len != 0)) {
    sess->sign.reset();
    return CKR_ARGUMENTS_BAD;
  }
  CK_RV rv = CKR_OK;
  if (SignSizeOnly(*sess->sign, sig, sig_len, &rv)) {
    return rv;
  }
  if (sess->sign->updated) {
    sess->sign.reset();
    return CKR_FUNCTION_FAILED;  // C_Sign after C_SignUpdate
  }
  SignOp op = std::move(*sess->sign);
  sess->sign.reset();
  return FinishSign(*st, op, data, data_len, sig, sig_len);
}

CK_RV SignUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->sign.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if (part == nullptr && part_len != 0) {
    sess->sign.reset();
    return CKR_ARGUMENTS_BAD;
  }
  SignOp& op = *sess->sign;
  op.updated = true;
  if (op.md != nullptr) {
    if (part_len != 0 && EVP_DigestUpdate(op.md.get(), part, part_len) != 1) {
      sess->sign.reset();
      return CKR_FUNCTION_FAILED;
    }
    return CKR_OK;
  }
  if (op.buffer.size() + part_len > kMaxBufferedInput) {
    sess->sign.reset();
    return CKR_DATA_LEN_RANGE;
  }
  op.buffer.insert(op.buffer.end(), part, part + part_len);
  return CKR_OK;
}

CK_RV SignFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->sign.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if (sig_len == nullptr) {
    sess->sign.reset();
    return CKR_ARGUMENTS_BAD;
  }
  CK_RV rv = CKR_OK;
  if (SignSizeOnly(*sess->sign, sig, sig_len, &rv)) {
    return rv;
  }
  SignOp op = std::move(*sess->sign);
  sess->sign.reset();
  Bytes input = std::move(op.buffer);
  return FinishSign(*st, op, input.data(), input.size(), sig, sig_len);
}

// ---------------------------------------------------------------------------
// Verification, in the process with the key's public half (OpenSSL).

// PKCS#11 ECDSA r || s -> DER ECDSA-Sig-Value.
std::optional<Bytes> EcdsaRawToDer(const uint8_t* sig, std::size_t len) {
  if (len == 0 || len % 2 != 0) {
    return std::nullopt;
  }
  const int half = static_cast<int>(len / 2);
  ECDSA_SIG* s = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(sig, half, nullptr);
  BIGNUM* ss = BN_bin2bn(sig + half, half, nullptr);
  if (s == nullptr || r == nullptr || ss == nullptr ||
      ECDSA_SIG_set0(s, r, ss) != 1) {
    BN_free(r);
    BN_free(ss);
    ECDSA_SIG_free(s);
    return std::nullopt;
  }
  unsigned char* der = nullptr;
  const int der_len = i2d_ECDSA_SIG(s, &der);
  ECDSA_SIG_free(s);
  if (der_len <= 0) {
    return std::nullopt;
  }
  Bytes out(der, der + der_len);
  OPENSSL_free(der);
  return out;
}

CK_RV FinishVerify(SignOp& op, const uint8_t* input, std::size_t len,
                   const uint8_t* sig, std::size_t sig_len) {
  CK_RV rv = SetSignInput(op, input, len);
  if (rv != CKR_OK) {
    return rv;
  }
  if (sig_len != op.key->sig_len) {
    return CKR_SIGNATURE_LEN_RANGE;
  }
  const v1::SignRequest& req = op.request;
  const auto* spki =
      reinterpret_cast<const unsigned char*>(op.key->spki.data());
  SslPtr<EVP_PKEY> pub(
      d2i_PUBKEY(nullptr, &spki, static_cast<long>(op.key->spki.size())));
  if (pub == nullptr) {
    return CKR_FUNCTION_FAILED;
  }
  const auto* data = reinterpret_cast<const unsigned char*>(req.data().data());
  const std::size_t data_len = req.data().size();
  int ok = 0;
  if (req.algorithm() == v1::ED25519_PURE) {
    SslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
    ok = ctx != nullptr &&
         EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr,
                              pub.get()) == 1 &&
         EVP_DigestVerify(ctx.get(), sig, sig_len, data, data_len) == 1;
  } else {
    SslPtr<EVP_PKEY_CTX> ctx(
        EVP_PKEY_CTX_new_from_pkey(nullptr, pub.get(), nullptr));
    if (ctx == nullptr || EVP_PKEY_verify_init(ctx.get()) != 1) {
      return CKR_FUNCTION_FAILED;
    }
    Bytes der;
    const uint8_t* check = sig;
    std::size_t check_len = sig_len;
    bool set = true;
    switch (req.algorithm()) {
      case v1::RSA_PKCS1:
        set = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) == 1 &&
              (req.digest() == v1::DIGEST_NONE ||
               EVP_PKEY_CTX_set_signature_md(ctx.get(),
                                             DigestMd(req.digest())) == 1);
        break;
      case v1::RSA_PSS:
        set = EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PSS_PADDING) ==
                  1 &&
              EVP_PKEY_CTX_set_signature_md(ctx.get(),
                                            DigestMd(req.digest())) == 1 &&
              EVP_PKEY_CTX_set_rsa_mgf1_md(
                  ctx.get(), DigestMd(req.pss_mgf1_digest())) == 1 &&
              EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(),
                                               req.pss_salt_length()) == 1;
        break;
      case v1::ECDSA: {
        auto converted = EcdsaRawToDer(sig, sig_len);
        if (!converted) {
          return CKR_SIGNATURE_INVALID;
        }
        der = std::move(*converted);
        check = der.data();
        check_len = der.size();
        break;
      }
      default:
        return CKR_FUNCTION_FAILED;
    }
    if (!set) {
      ERR_clear_error();
      return CKR_MECHANISM_PARAM_INVALID;
    }
    ok = EVP_PKEY_verify(ctx.get(), check, check_len, data, data_len) == 1;
  }
  ERR_clear_error();
  return ok ? CKR_OK : CKR_SIGNATURE_INVALID;
}

CK_RV VerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                 CK_OBJECT_HANDLE key) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->verify.has_value()) {
    return CKR_OPERATION_ACTIVE;
  }
  SignOp op;
  CK_RV rv = PrepareSignOp(*st, mech, key, /*verify=*/true, &op);
  if (rv != CKR_OK) {
    return rv;
  }
  sess->verify = std::move(op);
  return CKR_OK;
}

CK_RV Verify(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG data_len,
             CK_BYTE_PTR sig, CK_ULONG sig_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->verify.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  SignOp op = std::move(*sess->verify);
  sess->verify.reset();
  if ((data == nullptr && data_len != 0) || sig == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  if (op.updated) {
    return CKR_FUNCTION_FAILED;  // C_Verify after C_VerifyUpdate
  }
  return FinishVerify(op, data, data_len, sig, sig_len);
}

CK_RV VerifyUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG part_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->verify.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if (part == nullptr && part_len != 0) {
    sess->verify.reset();
    return CKR_ARGUMENTS_BAD;
  }
  SignOp& op = *sess->verify;
  op.updated = true;
  if (op.md != nullptr) {
    if (part_len != 0 && EVP_DigestUpdate(op.md.get(), part, part_len) != 1) {
      sess->verify.reset();
      return CKR_FUNCTION_FAILED;
    }
    return CKR_OK;
  }
  if (op.buffer.size() + part_len > kMaxBufferedInput) {
    sess->verify.reset();
    return CKR_DATA_LEN_RANGE;
  }
  op.buffer.insert(op.buffer.end(), part, part + part_len);
  return CKR_OK;
}

CK_RV VerifyFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR sig, CK_ULONG sig_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->verify.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  SignOp op = std::move(*sess->verify);
  sess->verify.reset();
  if (sig == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  Bytes input = std::move(op.buffer);
  return FinishVerify(op, input.data(), input.size(), sig, sig_len);
}

// ---------------------------------------------------------------------------
// Decryption (RSA).

CK_RV DecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                  CK_OBJECT_HANDLE key) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->decrypt.has_value()) {
    return CKR_OPERATION_ACTIVE;
  }
  DecryptOp op;
  CK_RV rv = KeyForOperation(*st, key, v1::USAGE_DECRYPT, &op.key);
  if (rv != CKR_OK) {
    return rv;
  }
  if (op.key->key_type != CKK_RSA) {
    return CKR_KEY_TYPE_INCONSISTENT;
  }
  v1::DecryptRequest& req = op.request;
  if (mech->mechanism == CKM_RSA_PKCS) {
    if (!NoParameter(*mech)) {
      return CKR_MECHANISM_PARAM_INVALID;
    }
    req.set_algorithm(v1::RSA_PKCS1_V15);
  } else if (mech->mechanism == CKM_RSA_PKCS_OAEP) {
    if (mech->pParameter == nullptr ||
        mech->ulParameterLen != sizeof(CK_RSA_PKCS_OAEP_PARAMS)) {
      return CKR_MECHANISM_PARAM_INVALID;
    }
    const auto* op_params =
        static_cast<const CK_RSA_PKCS_OAEP_PARAMS*>(mech->pParameter);
    auto d = DigestForMechanism(op_params->hashAlg);
    auto mgf = DigestForMgf(op_params->mgf);
    if (!d || !mgf) {
      return CKR_MECHANISM_PARAM_INVALID;
    }
    if (op_params->ulSourceDataLen != 0) {
      if (op_params->source != CKZ_DATA_SPECIFIED ||
          op_params->pSourceData == nullptr) {
        return CKR_MECHANISM_PARAM_INVALID;
      }
      req.set_oaep_label(op_params->pSourceData, op_params->ulSourceDataLen);
    }
    req.set_algorithm(v1::RSA_OAEP);
    req.set_oaep_digest(*d);
    req.set_oaep_mgf1_digest(*mgf);
  } else {
    return CKR_MECHANISM_INVALID;
  }
  *req.mutable_key() = op.key->ref;
  sess->decrypt = std::move(op);
  return CKR_OK;
}

CK_RV Decrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR ct, CK_ULONG ct_len,
              CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (!sess->decrypt.has_value()) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  DecryptOp& op = *sess->decrypt;
  if (out_len == nullptr || (ct == nullptr && ct_len != 0)) {
    sess->decrypt.reset();
    return CKR_ARGUMENTS_BAD;
  }
  if (!op.pending.has_value()) {
    if (out == nullptr) {
      *out_len = op.key->sig_len;  // upper bound: the modulus length
      return CKR_OK;
    }
    if (ct_len != op.key->sig_len) {
      sess->decrypt.reset();
      return CKR_ENCRYPTED_DATA_LEN_RANGE;
    }
    op.request.set_ciphertext(ct, ct_len);
    auto plain = st->client->Decrypt(op.request);
    if (!plain.ok()) {
      sess->decrypt.reset();
      const Status& s = plain.status();
      return s.code() == Code::kInvalidArgument || s.code() == Code::kInternal
                 ? CKR_ENCRYPTED_DATA_INVALID
                 : MapStatus(s, Context::kKey);
    }
    op.pending = std::move(*plain);
  }
  const std::size_t n = op.pending->size();
  if (out == nullptr) {
    *out_len = n;
    return CKR_OK;
  }
  if (*out_len < n) {
    *out_len = n;
    return CKR_BUFFER_TOO_SMALL;
  }
  if (n != 0) {
    std::memcpy(out, op.pending->Expose(SecretAccess::kToken).data(), n);
  }
  *out_len = n;
  sess->decrypt.reset();
  return CKR_OK;
}

// ---------------------------------------------------------------------------
// Key generation and deletion (the caller's own namespace only).

// Registers a key the daemon just created and returns its object.
std::shared_ptr<const KeyObject> AddObject(State& st,
                                           std::shared_ptr<KeyObject> obj) {
  std::lock_guard<std::mutex> lock(st.mu);
  const std::string key = std::to_string(st.self_uid) + "/" + obj->ref.name();
  auto it = st.handle_for.find(key);
  if (it == st.handle_for.end()) {
    it = st.handle_for.emplace(key, st.next_handle).first;
    st.next_handle += kHandlesPerKey;
  }
  obj->SetHandles(it->second);
  st.objects[obj->priv_handle] = obj;
  st.objects[obj->pub_handle] = obj;
  if (obj->cert_handle != 0) {
    st.objects[obj->cert_handle] = obj;
  }
  return obj;
}

bool IsRwSession(const Session& s) { return (s.flags & CKF_RW_SESSION) != 0; }

CK_RV GenerateKeyPair(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                      CK_ATTRIBUTE_PTR pub_t, CK_ULONG pub_n,
                      CK_ATTRIBUTE_PTR priv_t, CK_ULONG priv_n,
                      CK_OBJECT_HANDLE_PTR pub_out,
                      CK_OBJECT_HANDLE_PTR priv_out) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr || pub_out == nullptr || priv_out == nullptr ||
      !TemplateOk(pub_t, pub_n) || !TemplateOk(priv_t, priv_n)) {
    return CKR_ARGUMENTS_BAD;
  }
  if (!IsRwSession(*sess)) {
    return CKR_SESSION_READ_ONLY;
  }
  if (!NoParameter(*mech)) {
    return CKR_MECHANISM_PARAM_INVALID;
  }
  GenerateRequest req;
  const CK_RV parsed = ParseGenerateTemplates(mech->mechanism, pub_t, pub_n,
                                              priv_t, priv_n, &req);
  if (parsed != CKR_OK) {
    return parsed;
  }
  auto made = st->client->GenerateKey(client::MakeKeyRef(req.name), req.type);
  if (!made.ok()) {
    return MapStatus(made.status(), Context::kOther);
  }
  auto obj = BuildObject((*made).info(), (*made).public_key(), st->self_uid);
  if (!obj.ok()) {
    return CKR_DEVICE_ERROR;
  }
  auto added = AddObject(*st, *obj);
  *pub_out = added->pub_handle;
  *priv_out = added->priv_handle;
  return CKR_OK;
}

// C_CreateObject for X.509 certificates: the daemon keeps the certificate
// beside the caller's own key whose public key it certifies (its CKA_ID is
// that key's). Other object classes are not created this way: keys come from
// C_GenerateKeyPair or `keyhold key import`.
CK_RV CreateObject(CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR templ, CK_ULONG n,
                   CK_OBJECT_HANDLE_PTR out) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (!TemplateOk(templ, n) || out == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  if (!IsRwSession(*sess)) {
    return CKR_SESSION_READ_ONLY;
  }
  CertificateRequest req;
  CK_RV rv = ParseCertificateTemplate(templ, n, &req);
  if (rv != CKR_OK) {
    return rv;
  }
  const Bytes& value = req.der;
  const Bytes& id = req.id;
  rv = LoadObjects(*st);
  if (rv != CKR_OK) {
    return rv;
  }
  std::shared_ptr<const KeyObject> key;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    for (const auto& [handle, obj] : st->objects) {
      if (!obj->ref.has_owner() &&
          obj->public_key_sha256 == std::string(id.begin(), id.end())) {
        key = obj;
        break;
      }
    }
  }
  if (key == nullptr) {
    return CKR_TEMPLATE_INCONSISTENT;  // none of the caller's own keys
  }
  auto r = st->client->SetCertificate(key->ref,
                                      std::string(value.begin(), value.end()));
  if (!r.ok()) {
    return r.status().code() == Code::kInvalidArgument
               ? CKR_ATTRIBUTE_VALUE_INVALID
               : MapStatus(r.status(), Context::kOther);
  }
  rv = LoadObjects(*st);
  if (rv != CKR_OK) {
    return rv;
  }
  std::lock_guard<std::mutex> lock(st->mu);
  for (const auto& [handle, obj] : st->objects) {
    if (handle == obj->cert_handle && obj->ref.name() == key->ref.name() &&
        !obj->ref.has_owner()) {
      *out = handle;
      return CKR_OK;
    }
  }
  return CKR_FUNCTION_FAILED;  // deleted again in between
}

// Destroying the private or public object of a key deletes the key in the
// daemon (and its certificate); destroying the certificate object removes
// only the certificate.
CK_RV DestroyObject(CK_SESSION_HANDLE h, CK_OBJECT_HANDLE object) {
  KH_SESSION_OR_RETURN(st, h, sess);
  {
    std::lock_guard<std::mutex> lock(st->mu);
    if (st->secrets.erase(object) != 0) {
      return CKR_OK;  // a derived session object
    }
  }
  bool is_private = false;
  auto obj = FindObject(*st, object, &is_private);
  if (obj == nullptr) {
    return CKR_OBJECT_HANDLE_INVALID;
  }
  if (!IsRwSession(*sess)) {
    return CKR_SESSION_READ_ONLY;
  }
  if (obj->ref.has_owner()) {
    return CKR_ACTION_PROHIBITED;  // a shared key: use only, never delete
  }
  if (obj->cert_handle != 0 && object == obj->cert_handle) {
    // The certificate alone; the key stays.
    auto r = st->client->SetCertificate(obj->ref, "");
    if (!r.ok() && r.status().code() != Code::kNotFound) {
      return MapStatus(r.status(), Context::kObject);
    }
    std::lock_guard<std::mutex> lock(st->mu);
    st->objects.erase(obj->cert_handle);
    return r.ok() ? CKR_OK : CKR_OBJECT_HANDLE_INVALID;
  }
  Status s = st->client->DestroyKey(obj->ref);
  if (!s.ok() && s.code() != Code::kNotFound) {
    return MapStatus(s, Context::kObject);
  }
  std::lock_guard<std::mutex> lock(st->mu);
  st->objects.erase(obj->priv_handle);
  st->objects.erase(obj->pub_handle);
  if (obj->cert_handle != 0) {
    st->objects.erase(obj->cert_handle);
  }
  return s.ok() ? CKR_OK : CKR_OBJECT_HANDLE_INVALID;
}

// ---------------------------------------------------------------------------
// ECDH (CKM_ECDH1_DERIVE with CKD_NULL): the daemon computes the shared
// secret; the module keeps it as a session object of class CKO_SECRET_KEY.

CK_RV DeriveKey(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech,
                CK_OBJECT_HANDLE base, CK_ATTRIBUTE_PTR t, CK_ULONG n,
                CK_OBJECT_HANDLE_PTR out) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr || out == nullptr || !TemplateOk(t, n)) {
    return CKR_ARGUMENTS_BAD;
  }
  if (mech->mechanism != CKM_ECDH1_DERIVE) {
    return CKR_MECHANISM_INVALID;
  }
  if (mech->pParameter == nullptr ||
      mech->ulParameterLen != sizeof(CK_ECDH1_DERIVE_PARAMS)) {
    return CKR_MECHANISM_PARAM_INVALID;
  }
  const auto* dp = static_cast<const CK_ECDH1_DERIVE_PARAMS*>(mech->pParameter);
  if (dp->kdf != CKD_NULL || dp->ulSharedDataLen != 0 ||
      dp->pPublicData == nullptr || dp->ulPublicDataLen == 0) {
    return CKR_MECHANISM_PARAM_INVALID;
  }
  std::shared_ptr<const KeyObject> key;
  CK_RV rv = KeyForOperation(*st, base, v1::USAGE_DERIVE, &key);
  if (rv != CKR_OK) {
    return rv;
  }
  if (key->key_type != CKK_EC && key->key_type != CKK_EC_MONTGOMERY) {
    return CKR_KEY_TYPE_INCONSISTENT;
  }
  // The peer point, raw or wrapped in a DER OCTET STRING.
  Bytes peer(dp->pPublicData, dp->pPublicData + dp->ulPublicDataLen);
  const std::size_t raw_len =
      key->key_type == CKK_EC ? 2 * key->field_bytes + 1 : key->field_bytes;
  if (peer.size() != raw_len && peer.size() > 2 && peer[0] == 0x04) {
    std::size_t hdr = 0;
    if (peer[1] < 0x80 && peer.size() == 2u + peer[1]) {
      hdr = 2;
    } else if (peer[1] == 0x81 && peer.size() == 3u + peer[2]) {
      hdr = 3;
    }
    peer.erase(peer.begin(), peer.begin() + static_cast<std::ptrdiff_t>(hdr));
  }
  // Template: a session secret key; CKA_VALUE_LEN keeps the leading bytes.
  DeriveRequest req;
  rv = ParseDeriveTemplate(t, n, &req);
  if (rv != CKR_OK) {
    return rv;
  }
  const std::optional<CK_ULONG>& value_len = req.value_length;
  const bool sensitive = req.sensitive;
  const bool extractable = req.extractable;
  AttrMap attrs = std::move(req.attrs);
  auto secret = st->client->Derive(key->ref, peer);
  if (!secret.ok()) {
    return secret.status().code() == Code::kInvalidArgument
               ? CKR_MECHANISM_PARAM_INVALID
               : MapStatus(secret.status(), Context::kKey);
  }
  auto obj = std::make_shared<SecretObject>();
  std::span<const uint8_t> bytes = (*secret).Expose(SecretAccess::kToken);
  if (value_len.has_value()) {
    if (*value_len == 0 || *value_len > bytes.size()) {
      return CKR_TEMPLATE_INCONSISTENT;
    }
    bytes = bytes.first(*value_len);
  }
  obj->session = h;
  obj->value.assign(bytes.begin(), bytes.end());
  obj->readable = !sensitive && extractable;
  attrs[CKA_CLASS] = UlongAttr(CKO_SECRET_KEY);
  attrs[CKA_KEY_TYPE] = UlongAttr(req.key_type);
  attrs[CKA_VALUE_LEN] = UlongAttr(obj->value.size());
  attrs[CKA_TOKEN] = BoolAttr(false);
  attrs[CKA_PRIVATE] = BoolAttr(false);
  attrs[CKA_MODIFIABLE] = BoolAttr(false);
  attrs[CKA_DESTROYABLE] = BoolAttr(true);
  attrs[CKA_LOCAL] = BoolAttr(false);
  attrs[CKA_SENSITIVE] = BoolAttr(sensitive);
  attrs[CKA_ALWAYS_SENSITIVE] = BoolAttr(sensitive);
  attrs[CKA_EXTRACTABLE] = BoolAttr(extractable);
  attrs[CKA_NEVER_EXTRACTABLE] = BoolAttr(!extractable);
  attrs[CKA_KEY_GEN_MECHANISM] = UlongAttr(CKM_ECDH1_DERIVE);
  for (CK_ATTRIBUTE_TYPE u : {CKA_ENCRYPT, CKA_DECRYPT, CKA_SIGN, CKA_VERIFY,
                              CKA_WRAP, CKA_UNWRAP, CKA_DERIVE}) {
    attrs[u] = BoolAttr(false);
  }
  if (attrs.find(CKA_LABEL) == attrs.end()) {
    attrs[CKA_LABEL] = Bytes{};
  }
  if (attrs.find(CKA_ID) == attrs.end()) {
    attrs[CKA_ID] = Bytes{};
  }
  obj->attrs = std::move(attrs);
  std::lock_guard<std::mutex> lock(st->mu);
  const CK_OBJECT_HANDLE handle = st->next_secret++;
  st->secrets[handle] = std::move(obj);
  *out = handle;
  return CKR_OK;
}

// ---------------------------------------------------------------------------
// Digests: computed in the process (no key involved, no round trip).

CK_RV DigestInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR mech) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (mech == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->digest != nullptr) {
    return CKR_OPERATION_ACTIVE;
  }
  const EVP_MD* md = mech->mechanism == CKM_SHA256   ? EVP_sha256()
                     : mech->mechanism == CKM_SHA384 ? EVP_sha384()
                     : mech->mechanism == CKM_SHA512 ? EVP_sha512()
                                                     : nullptr;
  if (md == nullptr) {
    return CKR_MECHANISM_INVALID;
  }
  if (!NoParameter(*mech)) {
    return CKR_MECHANISM_PARAM_INVALID;
  }
  SslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1) {
    return CKR_HOST_MEMORY;
  }
  sess->digest = std::move(ctx);
  return CKR_OK;
}

CK_RV DigestUpdate(CK_SESSION_HANDLE h, CK_BYTE_PTR part, CK_ULONG len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->digest == nullptr) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if ((part == nullptr && len != 0) ||
      (len != 0 && EVP_DigestUpdate(sess->digest.get(), part, len) != 1)) {
    sess->digest.reset();
    return CKR_ARGUMENTS_BAD;
  }
  return CKR_OK;
}

CK_RV DigestFinal(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  std::lock_guard<std::mutex> slock(sess->mu);
  if (sess->digest == nullptr) {
    return CKR_OPERATION_NOT_INITIALIZED;
  }
  if (out_len == nullptr) {
    sess->digest.reset();
    return CKR_ARGUMENTS_BAD;
  }
  const auto need =
      static_cast<CK_ULONG>(EVP_MD_CTX_get_size(sess->digest.get()));
  if (out == nullptr) {
    *out_len = need;
    return CKR_OK;
  }
  if (*out_len < need) {
    *out_len = need;
    return CKR_BUFFER_TOO_SMALL;
  }
  unsigned int n = 0;
  const bool ok = EVP_DigestFinal_ex(sess->digest.get(), out, &n) == 1;
  sess->digest.reset();
  *out_len = n;
  return ok ? CKR_OK : CKR_FUNCTION_FAILED;
}

CK_RV Digest(CK_SESSION_HANDLE h, CK_BYTE_PTR data, CK_ULONG len,
             CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  {
    KH_SESSION_OR_RETURN(st, h, sess);
    std::lock_guard<std::mutex> slock(sess->mu);
    if (sess->digest == nullptr) {
      return CKR_OPERATION_NOT_INITIALIZED;
    }
    if (out_len == nullptr) {
      sess->digest.reset();
      return CKR_ARGUMENTS_BAD;
    }
    if (out == nullptr || *out_len < static_cast<CK_ULONG>(EVP_MD_CTX_get_size(
                                         sess->digest.get()))) {
      const bool query = out == nullptr;
      *out_len = static_cast<CK_ULONG>(EVP_MD_CTX_get_size(sess->digest.get()));
      return query ? CKR_OK : CKR_BUFFER_TOO_SMALL;
    }
  }
  CK_RV rv = DigestUpdate(h, data, len);
  return rv != CKR_OK ? rv : DigestFinal(h, out, out_len);
}

// Random numbers come from OpenSSL in this process: no secret is involved,
// so no round trip.
CK_RV GenerateRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR out, CK_ULONG len) {
  KH_SESSION_OR_RETURN(st, h, sess);
  if (out == nullptr && len != 0) {
    return CKR_ARGUMENTS_BAD;
  }
  if (len > (1UL << 30)) {
    return CKR_ARGUMENTS_BAD;
  }
  if (len > 0 && RAND_bytes(out, static_cast<int>(len)) != 1) {
    return CKR_FUNCTION_FAILED;
  }
  return CKR_OK;
}

CK_RV SeedRandom(CK_SESSION_HANDLE h, CK_BYTE_PTR /*seed*/, CK_ULONG /*len*/) {
  KH_SESSION_OR_RETURN(st, h, sess);
  return CKR_RANDOM_SEED_NOT_SUPPORTED;
}

// ---------------------------------------------------------------------------
// The function list.

template <typename... A>
CK_RV NotSupported(A...) {
  return CKR_FUNCTION_NOT_SUPPORTED;
}

// Wraps an implementation so that no exception ever leaves the module.
template <auto F>
struct Wrap;
template <typename... A, CK_RV (*F)(A...)>
struct Wrap<F> {
  static CK_RV Call(A... args) {
    return Guard([&]() { return F(args...); });
  }
};

CK_RV GetFunctionListImpl(CK_FUNCTION_LIST_PTR_PTR out);

CK_FUNCTION_LIST* Functions() {
  static CK_FUNCTION_LIST list = [] {
    CK_FUNCTION_LIST l;
    std::memset(&l, 0, sizeof l);
    l.version = {2, 40};
    l.C_Initialize = Wrap<Initialize>::Call;
    l.C_Finalize = Wrap<Finalize>::Call;
    l.C_GetInfo = Wrap<GetInfo>::Call;
    l.C_GetFunctionList = GetFunctionListImpl;
    l.C_GetSlotList = Wrap<GetSlotList>::Call;
    l.C_GetSlotInfo = Wrap<GetSlotInfo>::Call;
    l.C_GetTokenInfo = Wrap<GetTokenInfo>::Call;
    l.C_GetMechanismList = Wrap<GetMechanismList>::Call;
    l.C_GetMechanismInfo = Wrap<GetMechanismInfo>::Call;
    l.C_InitToken = NotSupported;
    l.C_InitPIN = NotSupported;
    l.C_SetPIN = NotSupported;
    l.C_OpenSession = Wrap<OpenSession>::Call;
    l.C_CloseSession = Wrap<CloseSession>::Call;
    l.C_CloseAllSessions = Wrap<CloseAllSessions>::Call;
    l.C_GetSessionInfo = Wrap<GetSessionInfo>::Call;
    l.C_GetOperationState = NotSupported;
    l.C_SetOperationState = NotSupported;
    l.C_Login = Wrap<Login>::Call;
    l.C_Logout = Wrap<Logout>::Call;
    l.C_CreateObject = Wrap<CreateObject>::Call;
    l.C_CopyObject = NotSupported;
    l.C_DestroyObject = Wrap<DestroyObject>::Call;
    l.C_GetObjectSize = Wrap<GetObjectSize>::Call;
    l.C_GetAttributeValue = Wrap<GetAttributeValue>::Call;
    l.C_SetAttributeValue = NotSupported;
    l.C_FindObjectsInit = Wrap<FindObjectsInit>::Call;
    l.C_FindObjects = Wrap<FindObjects>::Call;
    l.C_FindObjectsFinal = Wrap<FindObjectsFinal>::Call;
    l.C_EncryptInit = NotSupported;
    l.C_Encrypt = NotSupported;
    l.C_EncryptUpdate = NotSupported;
    l.C_EncryptFinal = NotSupported;
    l.C_DecryptInit = Wrap<DecryptInit>::Call;
    l.C_Decrypt = Wrap<Decrypt>::Call;
    l.C_DecryptUpdate = NotSupported;
    l.C_DecryptFinal = NotSupported;
    l.C_DigestInit = Wrap<DigestInit>::Call;
    l.C_Digest = Wrap<Digest>::Call;
    l.C_DigestUpdate = Wrap<DigestUpdate>::Call;
    l.C_DigestKey = NotSupported;
    l.C_DigestFinal = Wrap<DigestFinal>::Call;
    l.C_SignInit = Wrap<SignInit>::Call;
    l.C_Sign = Wrap<Sign>::Call;
    l.C_SignUpdate = Wrap<SignUpdate>::Call;
    l.C_SignFinal = Wrap<SignFinal>::Call;
    l.C_SignRecoverInit = NotSupported;
    l.C_SignRecover = NotSupported;
    l.C_VerifyInit = Wrap<VerifyInit>::Call;
    l.C_Verify = Wrap<Verify>::Call;
    l.C_VerifyUpdate = Wrap<VerifyUpdate>::Call;
    l.C_VerifyFinal = Wrap<VerifyFinal>::Call;
    l.C_VerifyRecoverInit = NotSupported;
    l.C_VerifyRecover = NotSupported;
    l.C_DigestEncryptUpdate = NotSupported;
    l.C_DecryptDigestUpdate = NotSupported;
    l.C_SignEncryptUpdate = NotSupported;
    l.C_DecryptVerifyUpdate = NotSupported;
    l.C_GenerateKey = NotSupported;
    l.C_GenerateKeyPair = Wrap<GenerateKeyPair>::Call;
    l.C_WrapKey = NotSupported;
    l.C_UnwrapKey = NotSupported;
    l.C_DeriveKey = Wrap<DeriveKey>::Call;
    l.C_SeedRandom = Wrap<SeedRandom>::Call;
    l.C_GenerateRandom = Wrap<GenerateRandom>::Call;
    l.C_GetFunctionStatus = NotSupported;
    l.C_CancelFunction = NotSupported;
    l.C_WaitForSlotEvent = NotSupported;
    return l;
  }();
  return &list;
}

CK_RV GetFunctionListImpl(CK_FUNCTION_LIST_PTR_PTR out) {
  if (out == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  *out = Functions();
  return CKR_OK;
}

}  // namespace

// For the 3.0 interface (interface3.h, interface3.cc).

CK_FUNCTION_LIST* FunctionList240() { return Functions(); }

CK_RV SessionCancel(CK_SESSION_HANDLE h, CK_FLAGS flags) {
  return Guard([&]() -> CK_RV {
    KH_SESSION_OR_RETURN(st, h, sess);
    std::lock_guard<std::mutex> slock(sess->mu);
    if ((flags & CKF_SIGN) != 0) {
      sess->sign.reset();
    }
    if ((flags & CKF_VERIFY) != 0) {
      sess->verify.reset();
    }
    if ((flags & CKF_DECRYPT) != 0) {
      sess->decrypt.reset();
    }
    if ((flags & CKF_DIGEST) != 0) {
      sess->digest.reset();
    }
    if ((flags & kFindObjects) != 0) {
      sess->find_active = false;
      sess->found.clear();
    }
    return CKR_OK;
  });
}

}  // namespace keyhold::pkcs11

extern "C" __attribute__((visibility("default"))) CK_RV C_GetFunctionList(
    CK_FUNCTION_LIST_PTR_PTR out) {
  return keyhold::pkcs11::GetFunctionListImpl(out);
}
