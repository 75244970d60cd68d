#include "daemon/backends/tpm/tpm_backend.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <toml++/toml.h>
#include <tss2/tss2_esys.h>
#include <tss2/tss2_mu.h>
#include <tss2/tss2_rc.h>
#include <tss2/tss2_sys.h>
#include <tss2/tss2_tctildr.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "common/key_types.h"
#include "common/private_file.h"
#include "common/ssl_ptr.h"
#include "daemon/backends/tpm/tpm_errors.h"
#include "daemon/log.h"

namespace keyhold::backend::tpm {
namespace {

spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("tpm");
  return *logger;
}

// Blob: version | u16 len | TPM2B_PUBLIC | u16 len | TPM2B_PRIVATE |
//       nonce | AES-256-GCM(auth value) | tag
// The AAD binds the key reference and both TPM areas, so a blob's sealed
// auth value works only with its own key and reference.
constexpr uint8_t kBlobVersion = 0x01;
constexpr std::size_t kNonceSize = 12;
constexpr std::size_t kTagSize = 16;
constexpr std::size_t kAuthSize = 32;  // = SHA-256, the keys' nameAlg
constexpr std::size_t kMasterKeySize = 32;
constexpr std::string_view kAadPrefix = "keyhold-tpm-v1:";
// Purpose label for the key that seals auth values, derived from the master
// key: the master key itself is never used for two purposes.
constexpr std::string_view kSealKeyLabel = "keyhold tpm auth-value sealing v1";

using EsysPtr = std::unique_ptr<void, decltype(&Esys_Free)>;

// Owns an ESYS-allocated output that holds secret bytes (a plaintext, an
// ECDH point): wiped before it is freed, on every path.
template <typename T>
struct CleanseAndFree {
  void operator()(T* p) const {
    if (p != nullptr) {
      OPENSSL_cleanse(p, sizeof(T));
      Esys_Free(p);
    }
  }
};
template <typename T>
std::unique_ptr<T, CleanseAndFree<T>> OwnedSecret(T* p) {
  return std::unique_ptr<T, CleanseAndFree<T>>(p);
}
template <typename T>
std::unique_ptr<T, decltype(&Esys_Free)> Owned(T* p) {
  return std::unique_ptr<T, decltype(&Esys_Free)>(p, &Esys_Free);
}

Status SslError(Code code, std::string message) {
  ERR_clear_error();
  return Status(code, std::move(message));
}

// ---------------------------------------------------------------------------
// Settings

// text is prefix followed by one or more decimal digits ("/dev/tpm0").
bool IsPrefixAndNumber(std::string_view text, std::string_view prefix) {
  if (!text.starts_with(prefix) || text.size() == prefix.size()) {
    return false;
  }
  const std::string_view rest = text.substr(prefix.size());
  return std::all_of(rest.begin(), rest.end(),
                     [](char c) { return c >= '0' && c <= '9'; });
}

// device:/dev/tpmN (no resource manager): the kernel lets one process open
// it at a time, so whatever transient objects it holds when keyholdd gets
// it belong to a process that is gone.
bool IsExclusiveDevice(std::string_view tcti) {
  // tcti-device's default is /dev/tpm0.
  return tcti == "device" || IsPrefixAndNumber(tcti, "device:/dev/tpm");
}

StatusOr<TpmOptions> ParseSettings(std::string_view toml_text) {
  toml::table t;
  try {
    t = toml::parse(toml_text, std::string_view("[[backend.tpm]]"));
  } catch (const toml::parse_error& e) {
    return InvalidArgument("[[backend.tpm]]: " + std::string(e.description()));
  }
  const std::set<std::string> known = {"name",
                                       "tcti",
                                       "owner_auth_file",
                                       "persistent_handle",
                                       "persistent_name",
                                       "max_loaded_keys",
                                       "encrypted_sessions",
                                       "sole_user",
                                       "acquire_timeout_ms"};
  for (const auto& [key, value] : t) {
    if (!known.contains(std::string(key.str()))) {
      return InvalidArgument("unknown setting 'backend.tpm." +
                             std::string(key.str()) + "'");
    }
  }
  TpmOptions o;
  for (auto [key, out] : {std::pair<const char*, std::string*>{"name", &o.name},
                          {"tcti", &o.tcti},
                          {"owner_auth_file", &o.owner_auth_file},
                          {"persistent_name", &o.persistent_name}}) {
    if (const toml::node* n = t.get(key)) {
      auto v = n->value<std::string>();
      if (!v || v->empty()) {
        return InvalidArgument(std::string("setting 'backend.tpm.") + key +
                               "' must be a non-empty string");
      }
      *out = *v;
    }
  }
  if (o.name.empty()) {
    return InvalidArgument("[[backend.tpm]] needs a name");
  }
  if (const toml::node* n = t.get("persistent_handle")) {
    auto v = n->value<int64_t>();
    if (!v || *v < 0x81000000LL || *v > 0x81ffffffLL) {
      return InvalidArgument(
          "setting 'backend.tpm.persistent_handle' must be a persistent "
          "handle from 0x81000000 to 0x81ffffff");
    }
    o.persistent_handle = static_cast<uint32_t>(*v);
  }
  for (auto [key, out] : {std::pair<const char*, bool*>{"encrypted_sessions",
                                                        &o.encrypted_sessions},
                          {"sole_user", &o.sole_user}}) {
    if (const toml::node* n = t.get(key)) {
      const toml::value<bool>* v = n->as_boolean();
      if (v == nullptr) {
        return InvalidArgument(std::string("setting 'backend.tpm.") + key +
                               "' must be true or false");
      }
      *out = v->get();
    }
  }
  if (t.get("sole_user") == nullptr) {
    o.sole_user = IsExclusiveDevice(o.tcti);
  }
  if (const toml::node* n = t.get("max_loaded_keys")) {
    auto v = n->value<int64_t>();
    if (!v || *v < 1 || *v > 64) {
      return InvalidArgument(
          "setting 'backend.tpm.max_loaded_keys' must be an integer from 1 "
          "to 64");
    }
    o.max_loaded_keys = static_cast<uint32_t>(*v);
  }
  if (const toml::node* n = t.get("acquire_timeout_ms")) {
    auto v = n->value<int64_t>();
    if (!v || *v < 1 || *v > int64_t{3600} * 1000) {
      return InvalidArgument(
          "setting 'backend.tpm.acquire_timeout_ms' must be an integer from "
          "1 to 3600000");
    }
    o.acquire_timeout_ms = static_cast<uint32_t>(*v);
  }
  if (!o.persistent_name.empty()) {
    std::string lower;
    for (char c : o.persistent_name) {
      lower.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
    }
    if (lower.size() < 4 || lower.size() % 2 != 0 ||
        lower.find_first_not_of("0123456789abcdef") != std::string::npos) {
      return InvalidArgument(
          "setting 'backend.tpm.persistent_name' must be the key's name in "
          "hex (tpm2_readpublic -c HANDLE prints it)");
    }
    if (o.persistent_handle == 0) {
      return InvalidArgument(
          "setting 'backend.tpm.persistent_name' needs persistent_handle");
    }
    o.persistent_name = lower;
  }
  if (o.encrypted_sessions && o.persistent_handle != 0 &&
      o.persistent_name.empty()) {
    return InvalidArgument(
        "backend.tpm: encrypted_sessions with a persistent_handle needs "
        "persistent_name (the key the sessions are salted with must be "
        "checked; tpm2_readpublic -c HANDLE prints its name)");
  }
  return o;
}

// ---------------------------------------------------------------------------
// Digests and TPM algorithm ids

TPM2_ALG_ID TpmHash(v1::Digest d) {
  switch (d) {
    case v1::SHA1:
      return TPM2_ALG_SHA1;
    case v1::SHA256:
      return TPM2_ALG_SHA256;
    case v1::SHA384:
      return TPM2_ALG_SHA384;
    case v1::SHA512:
      return TPM2_ALG_SHA512;
    default:
      return TPM2_ALG_NULL;
  }
}

// The digest of a given length, for callers that pass DIGEST_NONE (sizes
// from common/key_types; SHA-224 has no TPM 2.0 algorithm id).
v1::Digest DigestForLength(std::size_t len) {
  for (v1::Digest d : {v1::SHA1, v1::SHA256, v1::SHA384, v1::SHA512}) {
    if (DigestSize(d) == len) {
      return d;
    }
  }
  return v1::DIGEST_NONE;
}

Status CheckDigestLength(v1::Digest digest, std::span<const uint8_t> data) {
  if (data.size() != DigestSize(digest)) {
    return InvalidArgument("data must be a " + std::string(DigestName(digest)) +
                           " digest of " + std::to_string(DigestSize(digest)) +
                           " bytes, got " + std::to_string(data.size()));
  }
  return Status::Ok();
}

StatusOr<const EVP_MD*> RequireDigest(v1::Digest d, std::string_view what) {
  const EVP_MD* md = DigestMd(d);
  if (md == nullptr) {
    return InvalidArgument(std::string(what) + " must be one of sha1, " +
                           "sha224, sha256, sha384, sha512");
  }
  return md;
}

// ---------------------------------------------------------------------------
// Key templates and public keys

struct TypeInfo {
  bool rsa = false;
  uint16_t rsa_bits = 0;
  TPM2_ECC_CURVE curve = TPM2_ECC_NONE;
  const char* group = nullptr;  // OpenSSL group name
  std::size_t field_bytes = 0;
};

std::optional<TypeInfo> InfoFor(v1::KeyType type) {
  switch (type) {
    case v1::RSA_2048:
      return TypeInfo{true, 2048, TPM2_ECC_NONE, nullptr, 0};
    case v1::RSA_3072:
      return TypeInfo{true, 3072, TPM2_ECC_NONE, nullptr, 0};
    case v1::RSA_4096:
      return TypeInfo{true, 4096, TPM2_ECC_NONE, nullptr, 0};
    case v1::EC_P256:
      return TypeInfo{false, 0, TPM2_ECC_NIST_P256, "P-256", 32};
    case v1::EC_P384:
      return TypeInfo{false, 0, TPM2_ECC_NIST_P384, "P-384", 48};
    case v1::EC_P521:
      return TypeInfo{false, 0, TPM2_ECC_NIST_P521, "P-521", 66};
    default:
      return std::nullopt;
  }
}

// Unrestricted sign + decrypt child key with no scheme fixed, so each
// operation picks its scheme (RSASSA, raw RSA for PSS, OAEP, PKCS#1 v1.5,
// ECDSA, ECDH). userWithAuth: the per-key auth value authorizes use.
TPM2B_PUBLIC ChildTemplate(const TypeInfo& info) {
  TPM2B_PUBLIC pub{};
  TPMT_PUBLIC& a = pub.publicArea;
  a.nameAlg = TPM2_ALG_SHA256;
  a.objectAttributes = TPMA_OBJECT_SIGN_ENCRYPT | TPMA_OBJECT_DECRYPT |
                       TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN |
                       TPMA_OBJECT_USERWITHAUTH;
  if (info.rsa) {
    a.type = TPM2_ALG_RSA;
    a.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG_NULL;
    a.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
    a.parameters.rsaDetail.keyBits = info.rsa_bits;
    a.parameters.rsaDetail.exponent = 0;  // 65537
  } else {
    a.type = TPM2_ALG_ECC;
    a.parameters.eccDetail.symmetric.algorithm = TPM2_ALG_NULL;
    a.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
    a.parameters.eccDetail.curveID = info.curve;
    a.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
  }
  return pub;
}

// The TCG storage root key templates (ECC P-256 or RSA-2048, AES-128-CFB,
// all-zero unique): the same seed gives the same primary at every start.
TPM2B_PUBLIC PrimaryTemplate(bool rsa) {
  TPM2B_PUBLIC pub{};
  TPMT_PUBLIC& a = pub.publicArea;
  a.nameAlg = TPM2_ALG_SHA256;
  a.objectAttributes = TPMA_OBJECT_RESTRICTED | TPMA_OBJECT_DECRYPT |
                       TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
                       TPMA_OBJECT_SENSITIVEDATAORIGIN |
                       TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
  TPMT_SYM_DEF_OBJECT sym{};
  sym.algorithm = TPM2_ALG_AES;
  sym.keyBits.aes = 128;
  sym.mode.aes = TPM2_ALG_CFB;
  if (rsa) {
    a.type = TPM2_ALG_RSA;
    a.parameters.rsaDetail.symmetric = sym;
    a.parameters.rsaDetail.scheme.scheme = TPM2_ALG_NULL;
    a.parameters.rsaDetail.keyBits = 2048;
    a.unique.rsa.size = 256;
  } else {
    a.type = TPM2_ALG_ECC;
    a.parameters.eccDetail.symmetric = sym;
    a.parameters.eccDetail.scheme.scheme = TPM2_ALG_NULL;
    a.parameters.eccDetail.curveID = TPM2_ECC_NIST_P256;
    a.parameters.eccDetail.kdf.scheme = TPM2_ALG_NULL;
    a.unique.ecc.x.size = 32;
    a.unique.ecc.y.size = 32;
  }
  return pub;
}

StatusOr<SslPtr<EVP_PKEY>> PublicToPkey(const TPMT_PUBLIC& a) {
  std::unique_ptr<OSSL_PARAM_BLD, decltype(&OSSL_PARAM_BLD_free)> bld(
      OSSL_PARAM_BLD_new(), &OSSL_PARAM_BLD_free);
  SslPtr<BIGNUM> n;
  SslPtr<BIGNUM> e;
  std::vector<uint8_t> point;
  const char* algorithm = nullptr;
  if (bld == nullptr) {
    return SslError(Code::kInternal, "out of memory");
  }
  if (a.type == TPM2_ALG_RSA) {
    algorithm = "RSA";
    n.reset(BN_bin2bn(a.unique.rsa.buffer, a.unique.rsa.size, nullptr));
    e.reset(BN_new());
    const uint32_t exponent = a.parameters.rsaDetail.exponent == 0
                                  ? 65537
                                  : a.parameters.rsaDetail.exponent;
    if (n == nullptr || e == nullptr || BN_set_word(e.get(), exponent) != 1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get()) !=
            1 ||
        OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get()) !=
            1) {
      return SslError(Code::kInternal, "cannot build RSA public key");
    }
  } else if (a.type == TPM2_ALG_ECC) {
    algorithm = "EC";
    const char* group = nullptr;
    std::size_t field = 0;
    switch (a.parameters.eccDetail.curveID) {
      case TPM2_ECC_NIST_P256:
        group = "P-256";
        field = 32;
        break;
      case TPM2_ECC_NIST_P384:
        group = "P-384";
        field = 48;
        break;
      case TPM2_ECC_NIST_P521:
        group = "P-521";
        field = 66;
        break;
      default:
        return Unsupported("unsupported TPM curve");
    }
    const TPMS_ECC_POINT& p = a.unique.ecc;
    if (p.x.size > field || p.y.size > field) {
      return Internal("TPM public point too large");
    }
    point.assign(1 + 2 * field, 0);
    point[0] = 0x04;
    std::memcpy(point.data() + 1 + field - p.x.size, p.x.buffer, p.x.size);
    std::memcpy(point.data() + 1 + 2 * field - p.y.size, p.y.buffer, p.y.size);
    if (OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME,
                                        group, 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY,
                                         point.data(), point.size()) != 1) {
      return SslError(Code::kInternal, "cannot build EC public key");
    }
  } else {
    return Unsupported("unsupported TPM key type");
  }
  std::unique_ptr<OSSL_PARAM, decltype(&OSSL_PARAM_free)> params(
      OSSL_PARAM_BLD_to_param(bld.get()), &OSSL_PARAM_free);
  SslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, algorithm, nullptr));
  EVP_PKEY* raw = nullptr;
  if (params == nullptr || ctx == nullptr ||
      EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params.get()) !=
          1) {
    return SslError(Code::kInternal, "cannot build public key");
  }
  return SslPtr<EVP_PKEY>(raw);
}

StatusOr<std::vector<uint8_t>> PublicDer(const TPMT_PUBLIC& a) {
  StatusOr<SslPtr<EVP_PKEY>> pkey = PublicToPkey(a);
  if (!pkey.ok()) {
    return pkey.status();
  }
  const int len = i2d_PUBKEY(pkey->get(), nullptr);
  if (len <= 0) {
    return SslError(Code::kInternal, "cannot encode public key");
  }
  std::vector<uint8_t> out(static_cast<std::size_t>(len));
  unsigned char* p = out.data();
  if (i2d_PUBKEY(pkey->get(), &p) != len) {
    return SslError(Code::kInternal, "cannot encode public key");
  }
  return out;
}

// Which of our types a TPM public area is.
v1::KeyType TypeOfPublic(const TPMT_PUBLIC& a) {
  if (a.type == TPM2_ALG_RSA) {
    switch (a.parameters.rsaDetail.keyBits) {
      case 2048:
        return v1::RSA_2048;
      case 3072:
        return v1::RSA_3072;
      case 4096:
        return v1::RSA_4096;
      default:
        return v1::KEY_TYPE_UNSPECIFIED;
    }
  }
  if (a.type == TPM2_ALG_ECC) {
    switch (a.parameters.eccDetail.curveID) {
      case TPM2_ECC_NIST_P256:
        return v1::EC_P256;
      case TPM2_ECC_NIST_P384:
        return v1::EC_P384;
      case TPM2_ECC_NIST_P521:
        return v1::EC_P521;
      default:
        return v1::KEY_TYPE_UNSPECIFIED;
    }
  }
  return v1::KEY_TYPE_UNSPECIFIED;
}

// ---------------------------------------------------------------------------
// Blobs

// Both blob formats (key blob, sealed master key) carry the object as
// u16 length | TPM2B_PUBLIC | u16 length | TPM2B_PRIVATE.
struct Areas {
  TPM2B_PUBLIC pub{};
  TPM2B_PRIVATE priv{};
  std::span<const uint8_t> pub_bytes;
  std::span<const uint8_t> priv_bytes;
  std::size_t size = 0;  // bytes the two areas take, length prefixes included
};

struct MarshalledAreas {
  std::vector<uint8_t> pub;
  std::vector<uint8_t> priv;
};

struct ParsedBlob : Areas {
  std::span<const uint8_t> nonce;
  std::span<const uint8_t> sealed;  // ciphertext || tag
};

std::string AssociatedData(const daemon::KeyRef& ref,
                           std::span<const uint8_t> pub,
                           std::span<const uint8_t> priv) {
  std::string aad(kAadPrefix);
  aad += ref.ToString();
  aad.push_back('\0');
  aad.append(reinterpret_cast<const char*>(pub.data()), pub.size());
  aad.append(reinterpret_cast<const char*>(priv.data()), priv.size());
  return aad;
}

void PutU16(std::vector<uint8_t>* out, std::size_t v) {
  out->push_back(static_cast<uint8_t>(v >> 8));
  out->push_back(static_cast<uint8_t>(v & 0xff));
}

Status BadBlob(std::string_view why) {
  return Internal("TPM key blob is invalid (" + std::string(why) + ")");
}

StatusOr<MarshalledAreas> MarshalAreas(const TPM2B_PUBLIC& pub,
                                       const TPM2B_PRIVATE& priv) {
  MarshalledAreas out;
  out.pub.resize(sizeof(TPM2B_PUBLIC));
  out.priv.resize(sizeof(TPM2B_PRIVATE));
  std::size_t pub_len = 0;
  std::size_t priv_len = 0;
  if (Tss2_MU_TPM2B_PUBLIC_Marshal(&pub, out.pub.data(), out.pub.size(),
                                   &pub_len) != TSS2_RC_SUCCESS ||
      Tss2_MU_TPM2B_PRIVATE_Marshal(&priv, out.priv.data(), out.priv.size(),
                                    &priv_len) != TSS2_RC_SUCCESS) {
    return Internal("cannot marshal a TPM object");
  }
  out.pub.resize(pub_len);
  out.priv.resize(priv_len);
  return out;
}

void AppendAreas(const MarshalledAreas& areas, std::vector<uint8_t>* out) {
  PutU16(out, areas.pub.size());
  out->insert(out->end(), areas.pub.begin(), areas.pub.end());
  PutU16(out, areas.priv.size());
  out->insert(out->end(), areas.priv.begin(), areas.priv.end());
}

// Parses AppendAreas' layout at the start of data (more may follow).
StatusOr<Areas> ParseAreas(std::span<const uint8_t> data) {
  Areas out;
  std::size_t pos = 0;
  std::span<const uint8_t>* parts[] = {&out.pub_bytes, &out.priv_bytes};
  for (std::span<const uint8_t>* part : parts) {
    if (data.size() - pos < 2) {
      return BadBlob("truncated");
    }
    const std::size_t len = (std::size_t{data[pos]} << 8) | data[pos + 1];
    pos += 2;
    if (data.size() - pos < len) {
      return BadBlob("truncated");
    }
    *part = data.subspan(pos, len);
    pos += len;
  }
  out.size = pos;
  std::size_t off = 0;
  if (Tss2_MU_TPM2B_PUBLIC_Unmarshal(out.pub_bytes.data(), out.pub_bytes.size(),
                                     &off, &out.pub) != TSS2_RC_SUCCESS ||
      off != out.pub_bytes.size()) {
    return BadBlob("public area");
  }
  off = 0;
  if (Tss2_MU_TPM2B_PRIVATE_Unmarshal(out.priv_bytes.data(),
                                      out.priv_bytes.size(), &off,
                                      &out.priv) != TSS2_RC_SUCCESS ||
      off != out.priv_bytes.size()) {
    return BadBlob("private area");
  }
  return out;
}

StatusOr<ParsedBlob> ParseBlob(std::span<const uint8_t> blob) {
  if (blob.empty() || blob[0] != kBlobVersion) {
    return BadBlob("unknown version");
  }
  StatusOr<Areas> areas = ParseAreas(blob.subspan(1));
  if (!areas.ok()) {
    return areas.status();
  }
  ParsedBlob out;
  static_cast<Areas&>(out) = *areas;
  const std::size_t pos = 1 + areas->size;
  if (blob.size() != pos + kNonceSize + kAuthSize + kTagSize) {
    return BadBlob("bad length");
  }
  out.nonce = blob.subspan(pos, kNonceSize);
  out.sealed = blob.subspan(pos + kNonceSize);
  return out;
}

// AES-256-GCM of the auth value; ok==false: authentication failed.
bool GcmCrypt(bool encrypt, const SecretBytes& key,
              std::span<const uint8_t> nonce, const std::string& aad,
              const uint8_t* in, std::size_t len, uint8_t* out, uint8_t* tag) {
  SslPtr<EVP_CIPHER_CTX> ctx(EVP_CIPHER_CTX_new());
  int n = 0;
  const auto k = key.Expose(SecretAccess::kToken);
  auto init = encrypt ? &EVP_EncryptInit_ex : &EVP_DecryptInit_ex;
  auto update = encrypt ? &EVP_EncryptUpdate : &EVP_DecryptUpdate;
  if (ctx == nullptr ||
      init(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(nonce.size()), nullptr) != 1 ||
      init(ctx.get(), nullptr, nullptr, k.data(), nonce.data()) != 1 ||
      update(ctx.get(), nullptr, &n,
             reinterpret_cast<const unsigned char*>(aad.data()),
             static_cast<int>(aad.size())) != 1 ||
      update(ctx.get(), out, &n, in, static_cast<int>(len)) != 1) {
    ERR_clear_error();
    return false;
  }
  bool ok = false;
  if (encrypt) {
    ok = EVP_EncryptFinal_ex(ctx.get(), out + n, &n) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG,
                             static_cast<int>(kTagSize), tag) == 1;
  } else {
    ok = EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG,
                             static_cast<int>(kTagSize), tag) == 1 &&
         EVP_DecryptFinal_ex(ctx.get(), out + n, &n) == 1;
  }
  ERR_clear_error();
  return ok;
}

// ---------------------------------------------------------------------------
// Signatures and padding done on the host around a raw TPM RSA operation

// EMSA-PKCS1-v1_5 block type 1 of em_len bytes around t (DigestInfo or the
// caller's raw input).
std::vector<uint8_t> Pkcs1Type1(std::span<const uint8_t> t,
                                std::size_t em_len) {
  std::vector<uint8_t> em(em_len, 0xff);
  em[0] = 0x00;
  em[1] = 0x01;
  em[em_len - t.size() - 1] = 0x00;
  std::copy(t.begin(), t.end(),
            em.end() - static_cast<std::ptrdiff_t>(t.size()));
  return em;
}

// The DER DigestInfo (RFC 8017 9.2) of a digest, built by OpenSSL from the
// digest's OID (common/key_types' DigestMd) rather than from a table of
// encodings; empty on failure.
std::vector<uint8_t> DigestInfo(v1::Digest d, std::span<const uint8_t> hash) {
  const EVP_MD* md = DigestMd(d);
  std::vector<uint8_t> out;
  X509_SIG* sig = X509_SIG_new();
  X509_ALGOR* alg = nullptr;
  ASN1_OCTET_STRING* oct = nullptr;
  if (md != nullptr && sig != nullptr) {
    X509_SIG_getm(sig, &alg, &oct);
    unsigned char* der = nullptr;
    int len = 0;
    if (X509_ALGOR_set0(alg, OBJ_nid2obj(EVP_MD_get_type(md)), V_ASN1_NULL,
                        nullptr) == 1 &&
        ASN1_OCTET_STRING_set(oct, hash.data(),
                              static_cast<int>(hash.size())) == 1 &&
        (len = i2d_X509_SIG(sig, &der)) > 0) {
      out.assign(der, der + len);
    }
    OPENSSL_free(der);
  }
  X509_SIG_free(sig);
  ERR_clear_error();
  return out;
}

bool Mgf1Xor(const EVP_MD* md, std::span<const uint8_t> seed,
             std::span<uint8_t> out) {
  const std::size_t h_len = static_cast<std::size_t>(EVP_MD_get_size(md));
  std::vector<uint8_t> buf(seed.begin(), seed.end());
  buf.resize(seed.size() + 4);
  uint8_t hash[EVP_MAX_MD_SIZE];
  for (uint32_t counter = 0, done = 0; done < out.size(); ++counter) {
    buf[seed.size()] = static_cast<uint8_t>(counter >> 24);
    buf[seed.size() + 1] = static_cast<uint8_t>(counter >> 16);
    buf[seed.size() + 2] = static_cast<uint8_t>(counter >> 8);
    buf[seed.size() + 3] = static_cast<uint8_t>(counter);
    if (EVP_Digest(buf.data(), buf.size(), hash, nullptr, md, nullptr) != 1) {
      return false;
    }
    for (std::size_t i = 0; i < h_len && done < out.size(); ++i, ++done) {
      out[done] ^= hash[i];
    }
  }
  return true;
}

// EMSA-PSS-ENCODE (RFC 8017 9.1.1) into k bytes (a leading zero byte when
// emLen < k). The TPM's own RSAPSS picks the salt length itself; encoding on
// the host and using the TPM for the raw private operation supports every
// salt length and MGF1 digest the callers ask for.
StatusOr<std::vector<uint8_t>> PssEncode(std::span<const uint8_t> m_hash,
                                         const EVP_MD* md, const EVP_MD* mgf1,
                                         std::size_t salt_len,
                                         std::size_t mod_bits) {
  const std::size_t k = (mod_bits + 7) / 8;
  const std::size_t em_bits = mod_bits - 1;
  const std::size_t em_len = (em_bits + 7) / 8;
  const std::size_t h_len = m_hash.size();
  if (em_len < h_len + salt_len + 2) {
    return InvalidArgument("RSA-PSS salt length too long for this key");
  }
  std::vector<uint8_t> salt(salt_len);
  if (salt_len > 0 &&
      RAND_bytes(salt.data(), static_cast<int>(salt_len)) != 1) {
    return SslError(Code::kInternal, "cannot draw a random salt");
  }
  // M' = 8 zero bytes || mHash || salt
  std::vector<uint8_t> m_prime(8 + h_len + salt_len, 0);
  std::copy(m_hash.begin(), m_hash.end(), m_prime.begin() + 8);
  std::copy(salt.begin(), salt.end(),
            m_prime.begin() + static_cast<std::ptrdiff_t>(8 + h_len));
  uint8_t h[EVP_MAX_MD_SIZE];
  if (EVP_Digest(m_prime.data(), m_prime.size(), h, nullptr, md, nullptr) !=
      1) {
    return SslError(Code::kInternal, "hash failed");
  }
  const std::size_t db_len = em_len - h_len - 1;
  std::vector<uint8_t> em(k, 0);
  uint8_t* e = em.data() + (k - em_len);
  std::span<uint8_t> db(e, db_len);
  db[db_len - salt_len - 1] = 0x01;
  std::copy(salt.begin(), salt.end(),
            db.end() - static_cast<std::ptrdiff_t>(salt_len));
  if (!Mgf1Xor(mgf1, std::span<const uint8_t>(h, h_len), db)) {
    return SslError(Code::kInternal, "MGF1 failed");
  }
  e[0] &= static_cast<uint8_t>(0xff >> (8 * em_len - em_bits));
  std::copy(h, h + h_len, e + db_len);
  e[em_len - 1] = 0xbc;
  return em;
}

std::vector<uint8_t> EcdsaDer(const TPMS_SIGNATURE_ECC& sig) {
  ECDSA_SIG* s = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(sig.signatureR.buffer, sig.signatureR.size, nullptr);
  BIGNUM* ss = BN_bin2bn(sig.signatureS.buffer, sig.signatureS.size, nullptr);
  std::vector<uint8_t> out;
  if (s != nullptr && r != nullptr && ss != nullptr &&
      ECDSA_SIG_set0(s, r, ss) == 1) {
    r = nullptr;
    ss = nullptr;
    const int len = i2d_ECDSA_SIG(s, nullptr);
    if (len > 0) {
      out.resize(static_cast<std::size_t>(len));
      unsigned char* p = out.data();
      i2d_ECDSA_SIG(s, &p);
    }
  }
  BN_free(r);
  BN_free(ss);
  ECDSA_SIG_free(s);
  ERR_clear_error();
  return out;
}

// The peer's public point on curve info.group, from DER SPKI or SEC1.
StatusOr<TPM2B_ECC_POINT> ParsePeerPoint(const TypeInfo& info,
                                         std::span<const uint8_t> peer) {
  if (peer.empty() || peer.size() > 4096) {
    return InvalidArgument("peer public key is empty or too large");
  }
  SslPtr<EVP_PKEY> key;
  if (peer[0] == 0x02 || peer[0] == 0x03 || peer[0] == 0x04) {
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                         const_cast<char*>(info.group), 0),
        OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                          const_cast<uint8_t*>(peer.data()),
                                          peer.size()),
        OSSL_PARAM_construct_end(),
    };
    SslPtr<EVP_PKEY_CTX> ctx(
        EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* raw = nullptr;
    if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
      return SslError(
          Code::kInvalidArgument,
          std::string("peer public key is not a point on ") + info.group);
    }
    key.reset(raw);
  } else {
    const unsigned char* p = peer.data();
    key.reset(d2i_PUBKEY(nullptr, &p, static_cast<long>(peer.size())));
    if (key == nullptr || p != peer.data() + peer.size()) {
      return SslError(Code::kInvalidArgument,
                      "cannot parse peer public key (expected DER "
                      "SubjectPublicKeyInfo or the raw public encoding)");
    }
  }
  char group[80] = {};
  std::size_t group_len = 0;
  if (!EVP_PKEY_is_a(key.get(), "EC") ||
      EVP_PKEY_get_group_name(key.get(), group, sizeof(group), &group_len) !=
          1 ||
      EC_curve_nist2nid(info.group) != OBJ_sn2nid(group)) {
    return SslError(
        Code::kInvalidArgument,
        std::string("peer public key is not on curve ") + info.group);
  }
  SslPtr<EVP_PKEY_CTX> check(
      EVP_PKEY_CTX_new_from_pkey(nullptr, key.get(), nullptr));
  if (check == nullptr || EVP_PKEY_public_check(check.get()) != 1) {
    return SslError(Code::kInvalidArgument, "invalid peer public key");
  }
  BIGNUM* x = nullptr;
  BIGNUM* y = nullptr;
  TPM2B_ECC_POINT point{};
  const int field = static_cast<int>(info.field_bytes);
  const bool ok =
      EVP_PKEY_get_bn_param(key.get(), OSSL_PKEY_PARAM_EC_PUB_X, &x) == 1 &&
      EVP_PKEY_get_bn_param(key.get(), OSSL_PKEY_PARAM_EC_PUB_Y, &y) == 1 &&
      BN_bn2binpad(x, point.point.x.buffer, field) == field &&
      BN_bn2binpad(y, point.point.y.buffer, field) == field;
  BN_free(x);
  BN_free(y);
  if (!ok) {
    return SslError(Code::kInternal, "cannot read peer point");
  }
  point.point.x.size = static_cast<UINT16>(field);
  point.point.y.size = static_cast<UINT16>(field);
  return point;
}

TPM2B_AUTH AuthFrom(std::span<const uint8_t> bytes) {
  TPM2B_AUTH auth{};
  auth.size = static_cast<UINT16>(std::min(bytes.size(), sizeof(auth.buffer)));
  std::memcpy(auth.buffer, bytes.data(), auth.size);
  return auth;
}

struct LoadedEntry {
  ESYS_TR handle = ESYS_TR_NONE;
  std::vector<uint8_t> blob;  // the blob it was loaded from
  std::list<uint64_t>::iterator lru;
};

}  // namespace

std::size_t TransientLimitOfTcti(std::string_view tcti) {
  // "device:/dev/tpmrm0", "device:/dev/tpmrm1", ...; "device" alone opens
  // /dev/tpm0 (no resource manager).
  return IsPrefixAndNumber(tcti, "device:/dev/tpmrm") ? 3 : 0;
}

StatusOr<TpmOptions> ParseTpmSettings(std::string_view toml_text) {
  return ParseSettings(toml_text);
}

// ---------------------------------------------------------------------------

struct TpmBackend::Impl {
  TpmOptions options;
  SecretBytes seal_key;    // derived from the master key
  SecretBytes owner_auth;  // empty: no owner auth

  // Requests take the TPM through Acquire(), a gate in front of mu whose
  // waits are bounded (acquire_timeout_ms); the gate's holder then takes mu.
  mutable std::mutex gate_mu;
  std::condition_variable gate_cv;
  bool gate_taken = false;                           // guarded by gate_mu
  std::chrono::steady_clock::time_point gate_since;  // guarded by gate_mu
  mutable std::mutex mu;  // guards everything below and every ESYS call
  TSS2_TCTI_CONTEXT* tcti = nullptr;
  ESYS_CONTEXT* esys = nullptr;
  ESYS_TR primary = ESYS_TR_NONE;
  // ESYS_TR_PASSWORD, or with encrypted_sessions an HMAC session salted
  // with the storage key, with command and response parameter encryption:
  // key auth values never cross the TCTI in clear, and neither do digests,
  // ciphertexts, plaintexts, ECDH points or the sensitive area of a key
  // being created.
  ESYS_TR session = ESYS_TR_NONE;
  bool primary_transient = true;
  std::size_t capacity = 1;
  std::unordered_map<uint64_t, LoadedEntry> loaded;
  std::list<uint64_t> lru;  // front: most recently used
  std::set<v1::KeyType> supported;
  std::set<TPM2_ALG_ID> algs;
  bool capabilities_read = false;
  // A connection attempt failed with the TPM unavailable since the last
  // success; the next success says so in the log (Reconnect).
  bool unreachable = false;
  // The connection's state in words for State(), which cannot take mu (held
  // across TPM calls).
  mutable std::mutex state_mu;
  std::string state = "not connected yet";  // guarded by state_mu
  void SetState(std::string s) {
    std::lock_guard lock(state_mu);
    state = std::move(s);
  }
  // Transient objects and the session of a connection that was lost while
  // the TPM kept running: without a resource manager they still occupy TPM
  // slots, so the next connection flushes them (objects only if their name
  // still matches, so another user's object at a reused handle is never
  // touched). Empty after a TPM reset, which flushes them itself.
  struct StaleHandle {
    TPM2_HANDLE handle = 0;
    std::vector<uint8_t> name;  // empty: a session
  };
  std::vector<StaleHandle> stale;

  ~Impl() {
    std::lock_guard lock(mu);
    Disconnect(/*flush=*/true);
  }

  // Remembers tr's TPM handle (and name, for objects) for FlushStale().
  // Local ESYS lookups only: no TPM command.
  void RememberStale(ESYS_TR tr, bool is_session) {
    StaleHandle s;
    if (Esys_TR_GetTpmHandle(esys, tr, &s.handle) != TSS2_RC_SUCCESS) {
      return;
    }
    if (!is_session) {
      TPM2B_NAME* name = nullptr;
      if (Esys_TR_GetName(esys, tr, &name) != TSS2_RC_SUCCESS) {
        return;
      }
      s.name.assign(name->name, name->name + name->size);
      Esys_Free(name);
    }
    stale.push_back(std::move(s));
  }

  // Drops the ESYS context. flush: also free the TPM's transient slots (not
  // possible when the connection is already gone; then, unless the TPM was
  // reset, their handles are remembered for the next connection to flush).
  void Disconnect(bool flush, bool tpm_reset = false) {
    if (esys != nullptr) {
      const bool remember = !flush && !tpm_reset;
      for (auto& [id, entry] : loaded) {
        if (flush) {
          (void)Esys_FlushContext(esys, entry.handle);
        } else if (remember) {
          RememberStale(entry.handle, /*is_session=*/false);
        }
      }
      if (session != ESYS_TR_NONE && session != ESYS_TR_PASSWORD) {
        if (flush) {
          (void)Esys_FlushContext(esys, session);
        } else if (remember) {
          RememberStale(session, /*is_session=*/true);
        }
      }
      if (primary != ESYS_TR_NONE && primary_transient && remember) {
        RememberStale(primary, /*is_session=*/false);
      }
      if (primary != ESYS_TR_NONE) {
        if (flush && primary_transient) {
          (void)Esys_FlushContext(esys, primary);
        } else {
          (void)Esys_TR_Close(esys, &primary);
        }
      }
      Esys_Finalize(&esys);
    }
    loaded.clear();
    lru.clear();
    primary = ESYS_TR_NONE;
    session = ESYS_TR_NONE;
    if (tcti != nullptr) {
      Tss2_TctiLdr_Finalize(&tcti);
    }
    esys = nullptr;
    tcti = nullptr;
  }

  Status Connect() {
    TSS2_RC rc = Tss2_TctiLdr_Initialize(options.tcti.c_str(), &tcti);
    if (rc != TSS2_RC_SUCCESS) {
      tcti = nullptr;
      const std::string why =
          "cannot open TCTI '" + options.tcti + "': " + Tss2_RC_Decode(rc);
      // An I/O failure is a TPM that is not there (yet): no device node,
      // nothing listening. Anything else (an unknown TCTI, a malformed
      // option) is the setting's fault and no retry mends it.
      if ((rc & 0xffffU) != TSS2_BASE_RC_IO_ERROR) {
        return InvalidArgument("TPM: " + why + " (check the tcti setting)");
      }
      return BackendUnavailable("TPM unavailable: " + why);
    }
    rc = Esys_Initialize(&esys, tcti, nullptr);
    if (rc != TSS2_RC_SUCCESS) {
      esys = nullptr;
      Disconnect(false);
      return TpmError(rc, "Esys_Initialize");
    }
    Status st = EnsureStarted();
    if (!st.ok()) {
      Disconnect(false);
      return st;
    }
    st = FlushStale();
    if (!st.ok()) {
      Disconnect(/*flush=*/false, /*tpm_reset=*/true);  // keep `stale`
      return st;
    }
    if (options.sole_user) {
      st = FlushLeftovers();
      if (!st.ok()) {
        Disconnect(false);
        return st;
      }
    }
    st = SetUpPrimary();
    session = ESYS_TR_PASSWORD;
    if (st.ok() && options.encrypted_sessions) {
      st = StartSession();
    }
    if (st.ok() && !capabilities_read) {
      st = ReadCapabilities();
    }
    if (st.ok()) {
      st = SizeCache();
    }
    if (!st.ok()) {
      Disconnect(!IsUnavailable(st));
      return st;
    }
    return Status::Ok();
  }

  // Connect() for requests (and the start): notes an unreachable TPM, and
  // logs the first success after one.
  Status Reconnect() {
    Status st = Connect();
    if (!st.ok()) {
      unreachable = unreachable || IsUnavailable(st);
      SetState("not connected: " + st.message());
      return st;
    }
    SetState("connected (" + options.tcti + ")");
    if (std::exchange(unreachable, false)) {
      Log().info("TPM backend '{}': connected to the TPM ({})", options.name,
                 options.tcti);
    }
    return Status::Ok();
  }

  // Flushes what a lost connection left in the TPM (see `stale`).
  // The handles of the transient objects and loaded sessions in the TPM.
  StatusOr<std::vector<TPM2_HANDLE>> TransientHandles() {
    std::vector<TPM2_HANDLE> out;
    for (TPM2_HANDLE first : {TPM2_TRANSIENT_FIRST, TPM2_LOADED_SESSION_FIRST}) {
      TPMI_YES_NO more = TPM2_NO;
      TPMS_CAPABILITY_DATA* raw = nullptr;
      const TSS2_RC rc = Esys_GetCapability(
          esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_HANDLES,
          first, TPM2_MAX_CAP_HANDLES, &more, &raw);
      if (rc != TSS2_RC_SUCCESS) {
        return TpmError(rc, "TPM2_GetCapability(handles)");
      }
      auto caps = Owned(raw);
      for (UINT32 i = 0; i < caps->data.handles.count; ++i) {
        const TPM2_HANDLE h = caps->data.handles.handle[i];
        // Only handles of the type asked for (a TPM lists no others).
        if ((h >> 24) == (first >> 24)) {
          out.push_back(h);
        }
      }
    }
    return out;
  }

  Status FlushStale() {
    if (stale.empty()) {
      return Status::Ok();
    }
    StatusOr<std::vector<TPM2_HANDLE>> handles = TransientHandles();
    if (!handles.ok()) {
      return handles.status();
    }
    const std::set<TPM2_HANDLE> present(handles->begin(), handles->end());
    TSS2_SYS_CONTEXT* sys = nullptr;
    if (Esys_GetSysContext(esys, &sys) != TSS2_RC_SUCCESS) {
      sys = nullptr;
    }
    for (const StaleHandle& s : stale) {
      if (!present.contains(s.handle)) {
        continue;  // already gone (TPM restarted, or a resource manager)
      }
      if (s.name.empty()) {
        // A session has no name to check; its handle was ours and the TPM
        // kept running, so nobody else can hold it.
        if (sys != nullptr) {
          (void)Tss2_Sys_FlushContext(sys, s.handle);
        }
        continue;
      }
      ESYS_TR tr = ESYS_TR_NONE;
      if (Esys_TR_FromTPMPublic(esys, s.handle, ESYS_TR_NONE, ESYS_TR_NONE,
                                ESYS_TR_NONE, &tr) != TSS2_RC_SUCCESS) {
        continue;
      }
      TPM2B_NAME* name = nullptr;
      const bool same =
          Esys_TR_GetName(esys, tr, &name) == TSS2_RC_SUCCESS &&
          name->size == s.name.size() &&
          std::equal(s.name.begin(), s.name.end(), name->name);
      Esys_Free(name);
      if (same) {
        (void)Esys_FlushContext(esys, tr);
      } else {
        (void)Esys_TR_Close(esys, &tr);
      }
    }
    stale.clear();
    return Status::Ok();
  }

  // A TPM that nobody started since its reset (a simulator without
  // startup-clear; firmware or the kernel start a real one) answers every
  // command with TPM_RC_INITIALIZE: start it with TPM2_Startup(CLEAR).
  // TPM2_GetCapability for TPM2_PT_HR_TRANSIENT_AVAIL: the free transient
  // object slots, in *avail when the TPM reports the property.
  TSS2_RC FreeTransientSlots(std::optional<std::size_t>* avail) {
    TPMI_YES_NO more = TPM2_NO;
    TPMS_CAPABILITY_DATA* raw = nullptr;
    const TSS2_RC rc = Esys_GetCapability(
        esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, TPM2_CAP_TPM_PROPERTIES,
        TPM2_PT_HR_TRANSIENT_AVAIL, 1, &more, &raw);
    auto caps = Owned(raw);
    if (rc != TSS2_RC_SUCCESS) {
      return rc;
    }
    if (caps->data.tpmProperties.count == 1 &&
        caps->data.tpmProperties.tpmProperty[0].property ==
            TPM2_PT_HR_TRANSIENT_AVAIL) {
      *avail = caps->data.tpmProperties.tpmProperty[0].value;
    }
    return rc;
  }

  Status EnsureStarted() {
    std::optional<std::size_t> unused;
    TSS2_RC rc = FreeTransientSlots(&unused);
    if (rc == TSS2_RC_SUCCESS || BaseRc(rc) != TPM2_RC_INITIALIZE) {
      return Status::Ok();  // started; any other error shows up next
    }
    rc = Esys_Startup(esys, TPM2_SU_CLEAR);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "TPM2_Startup");
    }
    Log().warn("TPM backend '{}': the TPM was not started; sent TPM2_Startup",
               options.name);
    return Status::Ok();
  }

  // sole_user: flushes every transient object and loaded session in the
  // TPM (nothing of this connection's is loaded yet).
  Status FlushLeftovers() {
    TSS2_SYS_CONTEXT* sys = nullptr;
    if (Esys_GetSysContext(esys, &sys) != TSS2_RC_SUCCESS || sys == nullptr) {
      return Internal("TPM: no SYS context for flushing leftovers");
    }
    StatusOr<std::vector<TPM2_HANDLE>> handles = TransientHandles();
    if (!handles.ok()) {
      return handles.status();
    }
    std::size_t flushed = 0;
    for (TPM2_HANDLE h : *handles) {
      if (Tss2_Sys_FlushContext(sys, h) == TSS2_RC_SUCCESS) {
        ++flushed;
      }
    }
    if (flushed > 0) {
      Log().warn(
          "TPM backend '{}': flushed {} transient objects and sessions left "
          "in the TPM by a process that is gone (sole_user)",
          options.name, flushed);
    }
    return Status::Ok();
  }

  static bool IsUnavailable(const Status& st) {
    return st.code() == Code::kBackendUnavailable;
  }

  Status SetUpPrimary() {
    if (options.persistent_handle != 0) {
      primary_transient = false;
      TSS2_RC rc =
          Esys_TR_FromTPMPublic(esys, options.persistent_handle, ESYS_TR_NONE,
                                ESYS_TR_NONE, ESYS_TR_NONE, &primary);
      if (rc != TSS2_RC_SUCCESS) {
        primary = ESYS_TR_NONE;
        return TpmError(rc, "cannot open persistent storage key");
      }
      return CheckPersistentName();
    }
    primary_transient = true;
    if (owner_auth.size() > 0) {
      TPM2B_AUTH auth = AuthFrom(owner_auth.Expose(SecretAccess::kToken));
      TSS2_RC rc = Esys_TR_SetAuth(esys, ESYS_TR_RH_OWNER, &auth);
      OPENSSL_cleanse(&auth, sizeof(auth));
      if (rc != TSS2_RC_SUCCESS) {
        return TpmError(rc, "cannot set owner auth");
      }
    }
    TPM2B_SENSITIVE_CREATE sensitive{};
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION pcrs{};
    TSS2_RC rc = TSS2_RC_SUCCESS;
    for (bool rsa : {false, true}) {
      TPM2B_PUBLIC tmpl = PrimaryTemplate(rsa);
      rc = Esys_CreatePrimary(esys, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD,
                              ESYS_TR_NONE, ESYS_TR_NONE, &sensitive, &tmpl,
                              &outside, &pcrs, &primary, nullptr, nullptr,
                              nullptr, nullptr);
      if (rc == TSS2_RC_SUCCESS) {
        return Status::Ok();
      }
      primary = ESYS_TR_NONE;
      if (IsConnectionLost(rc) ||
          (BaseRc(rc) != TPM2_RC_CURVE && BaseRc(rc) != TPM2_RC_ASYMMETRIC &&
           BaseRc(rc) != TPM2_RC_VALUE)) {
        break;
      }
    }
    if (BaseRc(rc) == TPM2_RC_OBJECT_MEMORY) {
      return TpmError(
          rc,
          "cannot create the storage primary key: the TPM's object slots are "
          "full, most likely with objects of a process that died (a keyholdd "
          "killed with -9 on a TPM without resource manager); restart the "
          "TPM, flush them (tpm2_flushcontext -t), or set sole_user = true "
          "if keyholdd is this TPM's only user");
    }
    return TpmError(rc, "cannot create the storage primary key");
  }

  // The persistent storage key must be the configured one: ESYS takes its
  // public area from TPM2_ReadPublic, i.e. from whatever answers on the
  // TCTI, and an encrypted session salted with a substituted key would be
  // readable by whoever substituted it.
  Status CheckPersistentName() {
    if (options.persistent_name.empty()) {
      return Status::Ok();
    }
    TPM2B_NAME* raw = nullptr;
    const TSS2_RC rc = Esys_TR_GetName(esys, primary, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "cannot read the persistent storage key's name");
    }
    const std::string actual =
        HexEncode(std::span<const uint8_t>(raw->name, raw->size));
    Esys_Free(raw);
    if (actual != options.persistent_name) {
      (void)Esys_TR_Close(esys, &primary);
      primary = ESYS_TR_NONE;
      char handle[16];
      std::snprintf(handle, sizeof(handle), "0x%08x",
                    options.persistent_handle);
      return PermissionDenied(
          std::string("TPM: the key at persistent handle ") + handle +
          " has name " + actual +
          ", not the configured persistent_name; refusing to use it");
    }
    return Status::Ok();
  }

  Status StartSession() {
    TPMT_SYM_DEF sym{};
    sym.algorithm = TPM2_ALG_AES;
    sym.keyBits.aes = 128;
    sym.mode.aes = TPM2_ALG_CFB;
    TSS2_RC rc = Esys_StartAuthSession(
        esys, primary, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
        nullptr, TPM2_SE_HMAC, &sym, TPM2_ALG_SHA256, &session);
    if (rc != TSS2_RC_SUCCESS) {
      session = ESYS_TR_NONE;
      return TpmError(rc, "cannot start an HMAC session");
    }
    const TPMA_SESSION attrs = TPMA_SESSION_CONTINUESESSION |
                               TPMA_SESSION_DECRYPT | TPMA_SESSION_ENCRYPT;
    rc = Esys_TRSess_SetAttributes(esys, session, attrs, 0xff);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "cannot set session attributes");
    }
    return Status::Ok();
  }

  Status ReadCapabilities() {
    TPMI_YES_NO more = TPM2_NO;
    TPMS_CAPABILITY_DATA* raw = nullptr;
    TSS2_RC rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE,
                                    ESYS_TR_NONE, TPM2_CAP_ALGS, TPM2_ALG_FIRST,
                                    TPM2_MAX_CAP_ALGS, &more, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "TPM2_GetCapability(algorithms)");
    }
    auto caps = Owned(raw);
    for (UINT32 i = 0; i < caps->data.algorithms.count; ++i) {
      algs.insert(caps->data.algorithms.algProperties[i].alg);
    }
    raw = nullptr;
    rc = Esys_GetCapability(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                            TPM2_CAP_ECC_CURVES, TPM2_ECC_NONE,
                            TPM2_MAX_ECC_CURVES, &more, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "TPM2_GetCapability(curves)");
    }
    auto curves = Owned(raw);
    std::set<TPM2_ECC_CURVE> have_curves;
    for (UINT32 i = 0; i < curves->data.eccCurves.count; ++i) {
      have_curves.insert(curves->data.eccCurves.eccCurves[i]);
    }
    for (v1::KeyType type : {v1::RSA_2048, v1::RSA_3072, v1::RSA_4096,
                             v1::EC_P256, v1::EC_P384, v1::EC_P521}) {
      const TypeInfo info = *InfoFor(type);
      if (info.rsa) {
        if (!algs.contains(TPM2_ALG_RSA)) {
          continue;
        }
        // GetCapability does not list RSA key sizes; TestParms answers.
        TPMT_PUBLIC_PARMS parms{};
        parms.type = TPM2_ALG_RSA;
        parms.parameters.rsaDetail =
            ChildTemplate(info).publicArea.parameters.rsaDetail;
        rc = Esys_TestParms(esys, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                            &parms);
        if (rc == TSS2_RC_SUCCESS) {
          supported.insert(type);
        } else if (IsConnectionLost(rc)) {
          return TpmError(rc, "TPM2_TestParms");
        }
      } else if (algs.contains(TPM2_ALG_ECC) && algs.contains(TPM2_ALG_ECDSA) &&
                 have_curves.contains(info.curve)) {
        supported.insert(type);
      }
    }
    capabilities_read = true;
    return Status::Ok();
  }

  // Sizes the LRU to the TPM's free transient slots (with a resource manager
  // that is the RM's view), leaving one for a key being created or loaded.
  Status SizeCache() {
    std::optional<std::size_t> avail;
    const TSS2_RC rc = FreeTransientSlots(&avail);
    if (rc != TSS2_RC_SUCCESS) {
      return TpmError(rc, "TPM2_GetCapability(properties)");
    }
    capacity = std::max<std::size_t>(
        1, std::min<std::size_t>(options.max_loaded_keys,
                                 avail.value_or(options.max_loaded_keys)));
    // Under the kernel's resource manager the storage primary (when
    // transient) takes one of the connection's three object handles.
    if (const std::size_t limit = TransientLimitOfTcti(options.tcti);
        limit != 0) {
      const std::size_t keys = primary_transient ? limit - 1 : limit;
      if (capacity > keys) {
        Log().info(
            "TPM backend '{}': {} keeps at most {} objects per connection; "
            "at most {} keys stay loaded",
            options.name, options.tcti, limit, keys);
        capacity = keys;
      }
    }
    return Status::Ok();
  }

  Status EnsureConnected() {
    if (esys != nullptr) {
      return Status::Ok();
    }
    return Reconnect();
  }

  // The gate and mu, held for one request; both released on destruction.
  class Held {
   public:
    explicit Held(Impl* im) : im_(im), lock_(im->mu) {}
    Held(Held&& other) noexcept
        : im_(std::exchange(other.im_, nullptr)),
          lock_(std::move(other.lock_)) {}
    Held(const Held&) = delete;
    Held& operator=(const Held&) = delete;
    Held& operator=(Held&&) = delete;
    ~Held() {
      if (im_ != nullptr) {
        lock_.unlock();
        {
          std::lock_guard gate(im_->gate_mu);
          im_->gate_taken = false;
        }
        im_->gate_cv.notify_one();
      }
    }

   private:
    Impl* im_;
    std::unique_lock<std::mutex> lock_;
  };

  // Takes the TPM for a request. A TPM that stops answering keeps its
  // caller in an ESYS call for as long as it is silent (the synchronous
  // ESYS calls wait without a timeout); the other requests must not each
  // hold a thread behind it for that long: they wait at most
  // acquire_timeout_ms for their turn, and give up as soon as one holder
  // has been in the TPM that long.
  StatusOr<Held> Acquire() {
    using Clock = std::chrono::steady_clock;
    const auto timeout = std::chrono::milliseconds(options.acquire_timeout_ms);
    {
      std::unique_lock gate(gate_mu);
      const Clock::time_point give_up = Clock::now() + timeout;
      while (gate_taken) {
        // The holder in the TPM for the whole timeout: the TPM is silent.
        const Clock::time_point silent = gate_since + timeout;
        const Clock::time_point now = Clock::now();
        if (now < silent && now < give_up) {
          gate_cv.wait_until(gate, std::min(silent, give_up));
          continue;
        }
        const std::string ms = std::to_string(options.acquire_timeout_ms);
        if (now >= silent) {
          return BackendUnavailable(
              "TPM busy: the request in the TPM has waited over " + ms +
              " ms for its answer (acquire_timeout_ms); is the TPM or its "
              "resource manager hanging?");
        }
        return BackendUnavailable("TPM busy: no turn at the TPM within " + ms +
                                  " ms (acquire_timeout_ms)");
      }
      gate_taken = true;
      gate_since = Clock::now();
    }
    return Held(this);
  }

  // Runs op (which issues ESYS calls) with the lock held; after a lost
  // connection the context is rebuilt and op retried once.
  template <typename T, typename Op>
  StatusOr<T> Run(Op op) {
    StatusOr<Held> lock = Acquire();
    if (!lock.ok()) {
      return lock.status();
    }
    for (int attempt = 0;; ++attempt) {
      Status st = EnsureConnected();
      if (!st.ok()) {
        return st;
      }
      TSS2_RC rc = TSS2_RC_SUCCESS;
      StatusOr<T> result = op(&rc);
      if (result.ok() || !IsConnectionLost(rc)) {
        return result;
      }
      Disconnect(/*flush=*/false,
                 /*tpm_reset=*/BaseRc(rc) == TPM2_RC_INITIALIZE);
      SetState("connection lost (" + result.status().message() +
               "); the next request reconnects");
      if (attempt == 1) {
        return result;
      }
    }
  }

  void Evict(uint64_t id) {
    auto it = loaded.find(id);
    if (it == loaded.end()) {
      return;
    }
    ESYS_TR handle = it->second.handle;
    if (Esys_FlushContext(esys, handle) != TSS2_RC_SUCCESS) {
      // Maybe still in the TPM (the connection broke, say): the next
      // connection flushes it if it is there under the same name.
      RememberStale(handle, /*is_session=*/false);
      (void)Esys_TR_Close(esys, &handle);
    }
    lru.erase(it->second.lru);
    loaded.erase(it);
  }

  bool EvictOldest() {
    if (lru.empty()) {
      return false;
    }
    Evict(lru.back());
    return true;
  }

  StatusOr<SecretBytes> OpenAuth(const daemon::KeyRef& ref,
                                 const ParsedBlob& b) {
    const std::string aad = AssociatedData(ref, b.pub_bytes, b.priv_bytes);
    SecretBytes auth(kAuthSize);
    uint8_t tag[kTagSize];
    std::memcpy(tag, b.sealed.data() + kAuthSize, kTagSize);
    if (!GcmCrypt(false, seal_key, b.nonce, aad, b.sealed.data(), kAuthSize,
                  auth.data(SecretAccess::kToken), tag)) {
      return Internal("TPM key blob failed authentication");
    }
    return auth;
  }

  // The loaded handle of key: from the LRU, or loaded (evicting as needed).
  StatusOr<ESYS_TR> Load(const KeyHandle& key, TSS2_RC* rc_out) {
    auto it = loaded.find(key.id);
    if (it != loaded.end()) {
      if (std::equal(it->second.blob.begin(), it->second.blob.end(),
                     key.blob.begin(), key.blob.end())) {
        lru.splice(lru.begin(), lru, it->second.lru);
        return it->second.handle;
      }
      Evict(key.id);
    }
    StatusOr<ParsedBlob> b = ParseBlob(key.blob);
    if (!b.ok()) {
      return b.status();
    }
    if (TypeOfPublic(b->pub.publicArea) != key.type) {
      return BadBlob("key type mismatch");
    }
    StatusOr<SecretBytes> auth = OpenAuth(key.ref, *b);
    if (!auth.ok()) {
      return auth.status();
    }
    while (loaded.size() >= capacity && EvictOldest()) {
    }
    ESYS_TR handle = ESYS_TR_NONE;
    TSS2_RC rc = TSS2_RC_SUCCESS;
    for (;;) {
      rc = Esys_Load(esys, primary, session, ESYS_TR_NONE, ESYS_TR_NONE,
                     &b->priv, &b->pub, &handle);
      // Someone else (no resource manager) holds slots: make room.
      if (BaseRc(rc) == TPM2_RC_OBJECT_MEMORY && EvictOldest()) {
        continue;
      }
      break;
    }
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      if (BaseRc(rc) == TPM2_RC_INTEGRITY || BaseRc(rc) == TPM2_RC_BINDING) {
        // Not transient and not a daemon bug: the key belongs to another
        // TPM (or another storage key), which the caller should be told.
        return PermissionDenied(
            "TPM refuses the key: it was not created under this TPM's "
            "storage key");
      }
      return TpmError(rc, "cannot load key");
    }
    TPM2B_AUTH tpm_auth = AuthFrom(auth->Expose(SecretAccess::kToken));
    rc = Esys_TR_SetAuth(esys, handle, &tpm_auth);
    OPENSSL_cleanse(&tpm_auth, sizeof(tpm_auth));
    if (rc != TSS2_RC_SUCCESS) {
      (void)Esys_FlushContext(esys, handle);
      *rc_out = rc;
      return TpmError(rc, "cannot set key auth");
    }
    lru.push_front(key.id);
    LoadedEntry entry;
    entry.handle = handle;
    entry.blob.assign(key.blob.begin(), key.blob.end());
    entry.lru = lru.begin();
    loaded.emplace(key.id, std::move(entry));
    return handle;
  }

  // Raw RSA private operation (RSADP) on a k-byte input.
  StatusOr<std::vector<uint8_t>> RawRsa(ESYS_TR handle,
                                        std::span<const uint8_t> in,
                                        TSS2_RC* rc_out) {
    TPM2B_PUBLIC_KEY_RSA c{};
    if (in.size() > sizeof(c.buffer)) {
      return InvalidArgument("input too long");
    }
    c.size = static_cast<UINT16>(in.size());
    std::memcpy(c.buffer, in.data(), in.size());
    TPMT_RSA_DECRYPT scheme{};
    scheme.scheme = TPM2_ALG_NULL;
    TPM2B_DATA label{};
    TPM2B_PUBLIC_KEY_RSA* raw = nullptr;
    TSS2_RC rc = Esys_RSA_Decrypt(esys, handle, session, ESYS_TR_NONE,
                                  ESYS_TR_NONE, &c, &scheme, &label, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      return TpmError(rc, "RSA private operation failed");
    }
    auto m = OwnedSecret(raw);
    std::vector<uint8_t> out(in.size(), 0);
    if (m->size > out.size()) {
      return Internal("TPM returned an oversized RSA result");
    }
    std::memcpy(out.data() + out.size() - m->size, m->buffer, m->size);
    return out;
  }

  // TPM2_Sign of a caller's digest with scheme (RSASSA or ECDSA) over hash.
  using SignaturePtr = std::unique_ptr<TPMT_SIGNATURE, decltype(&Esys_Free)>;
  StatusOr<SignaturePtr> SignDigest(ESYS_TR handle, TPM2_ALG_ID scheme_alg,
                                    TPM2_ALG_ID hash,
                                    std::span<const uint8_t> data,
                                    std::string_view what, TSS2_RC* rc_out) {
    TPM2B_DIGEST digest{};
    if (data.size() > sizeof(digest.buffer)) {
      return InvalidArgument("digest too long for the TPM");
    }
    digest.size = static_cast<UINT16>(data.size());
    std::memcpy(digest.buffer, data.data(), data.size());
    TPMT_SIG_SCHEME scheme{};
    scheme.scheme = scheme_alg;
    scheme.details.any.hashAlg = hash;
    TPMT_TK_HASHCHECK ticket{};
    ticket.tag = TPM2_ST_HASHCHECK;
    ticket.hierarchy = TPM2_RH_NULL;
    TPMT_SIGNATURE* raw = nullptr;
    const TSS2_RC rc = Esys_Sign(esys, handle, session, ESYS_TR_NONE,
                                 ESYS_TR_NONE, &digest, &scheme, &ticket, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      return TpmError(rc, what);
    }
    return Owned(raw);
  }

  StatusOr<std::vector<uint8_t>> SignRsa(ESYS_TR handle, v1::KeyType type,
                                         const SignParams& p,
                                         std::span<const uint8_t> data,
                                         TSS2_RC* rc_out) {
    const std::size_t bits = InfoFor(type)->rsa_bits;
    const std::size_t k = bits / 8;
    if (p.algorithm == v1::RSA_PKCS1) {
      if (p.digest == v1::DIGEST_NONE) {
        if (data.size() + 11 > k) {
          return InvalidArgument("data of " + std::to_string(data.size()) +
                                 " bytes is too long for PKCS#1 v1.5 with a " +
                                 std::to_string(k) + "-byte key");
        }
        return RawRsa(handle, Pkcs1Type1(data, k), rc_out);
      }
      StatusOr<const EVP_MD*> md = RequireDigest(p.digest, "digest");
      if (!md.ok()) {
        return md.status();
      }
      KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
      const TPM2_ALG_ID hash = TpmHash(p.digest);
      if (hash == TPM2_ALG_NULL || !algs.contains(hash)) {
        // A digest the TPM does not know (SHA-224): pad on the host.
        const std::vector<uint8_t> t = DigestInfo(p.digest, data);
        if (t.empty()) {
          return Internal("cannot encode DigestInfo");
        }
        return RawRsa(handle, Pkcs1Type1(t, k), rc_out);
      }
      auto sig = SignDigest(handle, TPM2_ALG_RSASSA, hash, data,
                            "RSASSA signing failed", rc_out);
      if (!sig.ok()) {
        return sig.status();
      }
      const TPM2B_PUBLIC_KEY_RSA& s = (*sig)->signature.rsassa.sig;
      std::vector<uint8_t> out(k, 0);
      if (s.size > k) {
        return Internal("TPM returned an oversized signature");
      }
      std::memcpy(out.data() + k - s.size, s.buffer, s.size);
      return out;
    }
    // RSA-PSS
    StatusOr<const EVP_MD*> md = RequireDigest(p.digest, "RSA-PSS digest");
    if (!md.ok()) {
      return md.status();
    }
    KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
    const EVP_MD* mgf1 = *md;
    if (p.pss_mgf1_digest != v1::DIGEST_NONE) {
      StatusOr<const EVP_MD*> g =
          RequireDigest(p.pss_mgf1_digest, "RSA-PSS MGF1 digest");
      if (!g.ok()) {
        return g.status();
      }
      mgf1 = *g;
    }
    const std::size_t em_len = (bits - 1 + 7) / 8;
    const std::size_t h_len = data.size();
    const std::size_t max_salt = em_len - h_len - 2;
    std::size_t salt = 0;
    if (p.pss_salt_length == -1) {
      salt = h_len;
    } else if (p.pss_salt_length == -2) {
      salt = max_salt;
    } else if (p.pss_salt_length < 0) {
      return InvalidArgument(
          "RSA-PSS salt length must be >= 0, -1 (digest length) or -2 (max)");
    } else if (static_cast<std::size_t>(p.pss_salt_length) > max_salt) {
      return InvalidArgument("RSA-PSS salt length " +
                             std::to_string(p.pss_salt_length) +
                             " is too long for this key and digest (max " +
                             std::to_string(max_salt) + ")");
    } else {
      salt = static_cast<std::size_t>(p.pss_salt_length);
    }
    StatusOr<std::vector<uint8_t>> em = PssEncode(data, *md, mgf1, salt, bits);
    if (!em.ok()) {
      return em.status();
    }
    return RawRsa(handle, *em, rc_out);
  }

  StatusOr<std::vector<uint8_t>> SignEcdsa(ESYS_TR handle, const SignParams& p,
                                           std::span<const uint8_t> data,
                                           TSS2_RC* rc_out) {
    v1::Digest d = p.digest;
    if (d != v1::DIGEST_NONE) {
      StatusOr<const EVP_MD*> md = RequireDigest(d, "digest");
      if (!md.ok()) {
        return md.status();
      }
      KH_RETURN_IF_ERROR(CheckDigestLength(d, data));
    } else {
      d = DigestForLength(data.size());
    }
    const TPM2_ALG_ID hash = TpmHash(d);
    if (hash == TPM2_ALG_NULL || !algs.contains(hash)) {
      return Unsupported(
          "this TPM signs ECDSA only over digests of the hash algorithms it "
          "implements (" +
          std::to_string(data.size()) + "-byte input)");
    }
    auto sig = SignDigest(handle, TPM2_ALG_ECDSA, hash, data,
                          "ECDSA signing failed", rc_out);
    if (!sig.ok()) {
      return sig.status();
    }
    std::vector<uint8_t> der = EcdsaDer((*sig)->signature.ecdsa);
    if (der.empty()) {
      return Internal("cannot encode ECDSA signature");
    }
    return der;
  }
};

// ---------------------------------------------------------------------------

TpmBackend::TpmBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TpmBackend::~TpmBackend() = default;

namespace {

// Reads options.owner_auth_file (if set) into *out.
Status LoadOwnerAuth(const TpmOptions& options, SecretBytes* out) {
  if (options.owner_auth_file.empty()) {
    return Status::Ok();
  }
  StatusOr<SecretBytes> auth =
      ReadPrivateFile(options.owner_auth_file, 0, sizeof(TPMU_HA));
  if (!auth.ok()) {
    return Status(auth.status().code(),
                  "owner auth: " + auth.status().message());
  }
  // A trailing newline from `echo secret > file` is not part of the auth.
  std::size_t n = auth->size();
  while (n > 0 && (auth->Expose(SecretAccess::kToken)[n - 1] == '\n' ||
                   auth->Expose(SecretAccess::kToken)[n - 1] == '\r')) {
    --n;
  }
  auth->resize(n);
  *out = std::move(*auth);
  return Status::Ok();
}

void QuietTss2Log() {
  // tpm2-tss logs every TPM error code to stderr itself; the daemon reports
  // them as statuses. An explicit TSS2_LOG from the environment still wins.
  ::setenv("TSS2_LOG", "all+none", /*overwrite=*/0);
}

}  // namespace

StatusOr<std::unique_ptr<TpmBackend>> TpmBackend::Create(
    TpmOptions options, const std::filesystem::path& master_key_path) {
  StatusOr<SecretBytes> master =
      ReadPrivateFile(master_key_path, kMasterKeySize, kMasterKeySize);
  if (!master.ok()) {
    return Status(master.status().code(),
                  "master key: " + master.status().message());
  }
  return Create(std::move(options), *master);
}

StatusOr<std::unique_ptr<TpmBackend>> TpmBackend::Create(
    TpmOptions options, const SecretBytes& master_key) {
  QuietTss2Log();
  if (master_key.size() != kMasterKeySize) {
    return InvalidArgument("master key: must be " +
                           std::to_string(kMasterKeySize) + " bytes");
  }
  auto impl = std::make_unique<Impl>();
  // The auth values are sealed under a key derived from the daemon's master
  // key: one secret to protect and back up, and keys.db alone is useless.
  // The label keeps the derived key distinct from the software backend's
  // use.
  impl->seal_key = SecretBytes(32);
  std::size_t out_len = 0;
  const auto mk = master_key.Expose(SecretAccess::kToken);
  if (EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, mk.data(),
                mk.size(),
                reinterpret_cast<const unsigned char*>(kSealKeyLabel.data()),
                kSealKeyLabel.size(), impl->seal_key.data(SecretAccess::kToken),
                32, &out_len) == nullptr ||
      out_len != 32) {
    return SslError(Code::kInternal, "cannot derive the TPM sealing key");
  }
  KH_RETURN_IF_ERROR(LoadOwnerAuth(options, &impl->owner_auth));
  impl->options = std::move(options);
  {
    std::lock_guard lock(impl->mu);
    Status st = impl->Reconnect();
    // A TPM that is not reachable yet (a device node that appears later in
    // boot, a resource manager or swtpm started after keyholdd) must not
    // take the other backends down with it: the daemon starts, this
    // backend's requests fail with "backend unavailable" and each one tries
    // to connect again. Any other failure (a refused owner auth, a storage
    // key that is not the configured one, a bad TCTI setting) stops the
    // start.
    if (!st.ok()) {
      if (!Impl::IsUnavailable(st)) {
        return st;
      }
      Log().error(
          "TPM backend '{}': {}; starting without the TPM: its keys fail "
          "with \"backend unavailable\" until it answers, and each request "
          "tries to connect again",
          impl->options.name, st.message());
    }
  }
  return std::unique_ptr<TpmBackend>(new TpmBackend(std::move(impl)));
}

// ---------------------------------------------------------------------------
// The daemon's master key sealed by the TPM

namespace {

// Sealed master key: magic | u16 len | TPM2B_PUBLIC | u16 len | TPM2B_PRIVATE
// of a keyed-hash data object (fixedTPM, fixedParent, empty auth, noDA)
// whose sensitive data is the master key, a child of the storage primary.
constexpr std::string_view kSealedMagic = "keyhold-sealed-master-key-v1";

}  // namespace

StatusOr<std::vector<uint8_t>> TpmBackend::SealMasterKey(
    const TpmOptions& options, const SecretBytes& master_key) {
  QuietTss2Log();
  if (master_key.size() == 0 ||
      master_key.size() > sizeof(TPM2B_SENSITIVE_DATA::buffer)) {
    return InvalidArgument("master key: bad length");
  }
  Impl im;
  im.options = options;
  KH_RETURN_IF_ERROR(LoadOwnerAuth(options, &im.owner_auth));
  std::lock_guard lock(im.mu);
  KH_RETURN_IF_ERROR(im.Connect());
  TPM2B_SENSITIVE_CREATE sensitive{};
  const auto mk = master_key.Expose(SecretAccess::kToken);
  sensitive.sensitive.data.size = static_cast<UINT16>(mk.size());
  std::memcpy(sensitive.sensitive.data.buffer, mk.data(), mk.size());
  TPM2B_PUBLIC tmpl{};
  tmpl.publicArea.type = TPM2_ALG_KEYEDHASH;
  tmpl.publicArea.nameAlg = TPM2_ALG_SHA256;
  // Without sensitiveDataOrigin: the data is ours. noDA: an empty auth
  // value has nothing to guess, so it must not count towards a lockout.
  tmpl.publicArea.objectAttributes =
      TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT |
      TPMA_OBJECT_USERWITHAUTH | TPMA_OBJECT_NODA;
  tmpl.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG_NULL;
  TPM2B_DATA outside{};
  TPML_PCR_SELECTION pcrs{};
  TPM2B_PRIVATE* priv_raw = nullptr;
  TPM2B_PUBLIC* pub_raw = nullptr;
  const TSS2_RC rc = Esys_Create(
      im.esys, im.primary, im.session, ESYS_TR_NONE, ESYS_TR_NONE, &sensitive,
      &tmpl, &outside, &pcrs, &priv_raw, &pub_raw, nullptr, nullptr, nullptr);
  OPENSSL_cleanse(&sensitive, sizeof(sensitive));
  if (rc != TSS2_RC_SUCCESS) {
    return TpmError(rc, "cannot seal the master key");
  }
  auto priv = Owned(priv_raw);
  auto pub = Owned(pub_raw);
  StatusOr<MarshalledAreas> areas = MarshalAreas(*pub, *priv);
  if (!areas.ok()) {
    return areas.status();
  }
  std::vector<uint8_t> blob(kSealedMagic.begin(), kSealedMagic.end());
  AppendAreas(*areas, &blob);
  return blob;
}

StatusOr<SecretBytes> TpmBackend::UnsealMasterKey(
    const TpmOptions& options, std::span<const uint8_t> sealed) {
  QuietTss2Log();
  const Status bad = InvalidArgument(
      "sealed master key: not a keyhold sealed master key (damaged file?)");
  if (sealed.size() < kSealedMagic.size() ||
      !std::equal(kSealedMagic.begin(), kSealedMagic.end(), sealed.begin())) {
    return bad;
  }
  StatusOr<Areas> areas = ParseAreas(sealed.subspan(kSealedMagic.size()));
  if (!areas.ok() || kSealedMagic.size() + areas->size != sealed.size() ||
      areas->pub.publicArea.type != TPM2_ALG_KEYEDHASH) {
    return bad;
  }
  Impl im;
  im.options = options;
  KH_RETURN_IF_ERROR(LoadOwnerAuth(options, &im.owner_auth));
  std::lock_guard lock(im.mu);
  KH_RETURN_IF_ERROR(im.Connect());
  ESYS_TR handle = ESYS_TR_NONE;
  TSS2_RC rc = Esys_Load(im.esys, im.primary, im.session, ESYS_TR_NONE,
                         ESYS_TR_NONE, &areas->priv, &areas->pub, &handle);
  if (rc != TSS2_RC_SUCCESS) {
    if (BaseRc(rc) == TPM2_RC_INTEGRITY || BaseRc(rc) == TPM2_RC_BINDING) {
      return PermissionDenied(
          "this TPM cannot unseal the master key: it was sealed under "
          "another TPM's storage key (another machine, or a TPM that was "
          "cleared since)");
    }
    return TpmError(rc, "cannot load the sealed master key");
  }
  TPM2B_SENSITIVE_DATA* raw = nullptr;
  rc = Esys_Unseal(im.esys, handle, im.session, ESYS_TR_NONE, ESYS_TR_NONE,
                   &raw);
  (void)Esys_FlushContext(im.esys, handle);
  if (rc != TSS2_RC_SUCCESS) {
    return TpmError(rc, "cannot unseal the master key");
  }
  auto data = OwnedSecret(raw);
  if (data->size != kMasterKeySize) {
    return Internal("the unsealed master key has " +
                    std::to_string(data->size) + " bytes, not " +
                    std::to_string(kMasterKeySize));
  }
  SecretBytes out(kMasterKeySize);
  std::memcpy(out.data(SecretAccess::kToken), data->buffer, kMasterKeySize);
  return out;
}

std::string_view TpmBackend::Name() const { return impl_->options.name; }

std::vector<v1::KeyType> TpmBackend::SupportedKeyTypes() const {
  std::lock_guard lock(impl_->mu);
  return {impl_->supported.begin(), impl_->supported.end()};
}

std::size_t TpmBackend::LoadedKeyCount() const {
  std::lock_guard lock(impl_->mu);
  return impl_->loaded.size();
}

std::size_t TpmBackend::LoadedKeyCapacity() const {
  std::lock_guard lock(impl_->mu);
  return impl_->capacity;
}

StatusOr<CreatedKey> TpmBackend::Generate(const daemon::KeyRef& ref,
                                          v1::KeyType type) {
  if (type == v1::KEY_TYPE_UNSPECIFIED) {
    return InvalidArgument("key type must be specified");
  }
  std::optional<TypeInfo> info = InfoFor(type);
  if (!info) {
    return Unsupported("the TPM backend does not support key type " +
                       std::string(KeyTypeName(type)));
  }
  SecretBytes auth(kAuthSize);
  if (RAND_bytes(auth.data(SecretAccess::kToken),
                 static_cast<int>(kAuthSize)) != 1) {
    return SslError(Code::kInternal, "cannot draw a random auth value");
  }
  Impl& im = *impl_;
  return im.Run<CreatedKey>([&](TSS2_RC* rc_out) -> StatusOr<CreatedKey> {
    if (!im.supported.contains(type)) {
      return Unsupported("this TPM does not support key type " +
                         std::string(KeyTypeName(type)));
    }
    TPM2B_SENSITIVE_CREATE sensitive{};
    sensitive.sensitive.userAuth = AuthFrom(auth.Expose(SecretAccess::kToken));
    TPM2B_PUBLIC tmpl = ChildTemplate(*info);
    TPM2B_DATA outside{};
    TPML_PCR_SELECTION pcrs{};
    TPM2B_PRIVATE* priv_raw = nullptr;
    TPM2B_PUBLIC* pub_raw = nullptr;
    // Creating needs a free slot in some TPMs; make room first.
    while (im.loaded.size() + 1 > im.capacity && im.EvictOldest()) {
    }
    TSS2_RC rc = TSS2_RC_SUCCESS;
    for (;;) {
      rc = Esys_Create(im.esys, im.primary, im.session, ESYS_TR_NONE,
                       ESYS_TR_NONE, &sensitive, &tmpl, &outside, &pcrs,
                       &priv_raw, &pub_raw, nullptr, nullptr, nullptr);
      if (BaseRc(rc) == TPM2_RC_OBJECT_MEMORY && im.EvictOldest()) {
        continue;
      }
      break;
    }
    OPENSSL_cleanse(&sensitive, sizeof(sensitive));
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      return TpmError(rc, "cannot create key");
    }
    auto priv = Owned(priv_raw);
    auto pub = Owned(pub_raw);
    StatusOr<MarshalledAreas> areas = MarshalAreas(*pub, *priv);
    if (!areas.ok()) {
      return areas.status();
    }
    StatusOr<std::vector<uint8_t>> der = PublicDer(pub->publicArea);
    if (!der.ok()) {
      return der.status();
    }
    std::vector<uint8_t> blob;
    blob.reserve(1 + 4 + areas->pub.size() + areas->priv.size() + kNonceSize +
                 kAuthSize + kTagSize);
    blob.push_back(kBlobVersion);
    AppendAreas(*areas, &blob);
    const std::size_t nonce_at = blob.size();
    blob.resize(blob.size() + kNonceSize + kAuthSize + kTagSize);
    uint8_t* nonce = blob.data() + nonce_at;
    if (RAND_bytes(nonce, static_cast<int>(kNonceSize)) != 1) {
      return SslError(Code::kInternal, "cannot draw a random nonce");
    }
    const std::string aad = AssociatedData(ref, areas->pub, areas->priv);
    const auto a = auth.Expose(SecretAccess::kToken);
    if (!GcmCrypt(true, im.seal_key,
                  std::span<const uint8_t>(nonce, kNonceSize), aad, a.data(),
                  a.size(), nonce + kNonceSize,
                  nonce + kNonceSize + kAuthSize)) {
      return Internal("cannot seal the key's auth value");
    }
    CreatedKey out;
    out.type = type;
    out.public_key = std::move(*der);
    out.blob = std::move(blob);
    return out;
  });
}

StatusOr<CreatedKey> TpmBackend::Import(const daemon::KeyRef&,
                                        const SecretBytes&) {
  return Unsupported(
      "the TPM backend creates keys inside the TPM; importing is not "
      "supported");
}

StatusOr<std::vector<uint8_t>> TpmBackend::Sign(const KeyHandle& key,
                                                const SignParams& params,
                                                std::span<const uint8_t> data) {
  Impl& im = *impl_;
  const bool rsa = IsRsa(key.type);
  switch (params.algorithm) {
    case v1::RSA_PKCS1:
    case v1::RSA_PSS:
      if (!rsa) {
        return InvalidArgument("key type " +
                               std::string(KeyTypeName(key.type)) +
                               " cannot sign with RSA");
      }
      break;
    case v1::ECDSA:
      if (!IsEc(key.type)) {
        return InvalidArgument("key type " +
                               std::string(KeyTypeName(key.type)) +
                               " cannot sign with ECDSA");
      }
      break;
    case v1::ED25519_PURE:
      return Unsupported("TPM 2.0 has no Ed25519");
    default:
      return InvalidArgument("unknown sign algorithm");
  }
  return im.Run<std::vector<uint8_t>>(
      [&](TSS2_RC* rc) -> StatusOr<std::vector<uint8_t>> {
        StatusOr<ESYS_TR> h = im.Load(key, rc);
        if (!h.ok()) {
          return h.status();
        }
        if (rsa) {
          return im.SignRsa(*h, key.type, params, data, rc);
        }
        return im.SignEcdsa(*h, params, data, rc);
      });
}

StatusOr<SecretBytes> TpmBackend::Decrypt(const KeyHandle& key,
                                          const DecryptParams& p,
                                          std::span<const uint8_t> ciphertext) {
  if (!IsRsa(key.type)) {
    return InvalidArgument("key type " + std::string(KeyTypeName(key.type)) +
                           " cannot decrypt");
  }
  const std::size_t k = InfoFor(key.type)->rsa_bits / 8;
  if (ciphertext.empty() || ciphertext.size() > k) {
    return InvalidArgument("ciphertext must be 1 to " + std::to_string(k) +
                           " bytes for this key, got " +
                           std::to_string(ciphertext.size()));
  }
  TPMT_RSA_DECRYPT scheme{};
  Impl& im = *impl_;
  if (p.algorithm == v1::RSA_OAEP) {
    const v1::Digest d =
        p.oaep_digest == v1::DIGEST_NONE ? v1::SHA1 : p.oaep_digest;
    const v1::Digest mgf1 =
        p.oaep_mgf1_digest == v1::DIGEST_NONE ? d : p.oaep_mgf1_digest;
    if (mgf1 != d) {
      return Unsupported("the TPM's RSA-OAEP uses the OAEP digest for MGF1");
    }
    if (!p.oaep_label.empty()) {
      // TPM2_RSA_Decrypt hashes the label with a terminating zero byte that
      // OpenSSL's labels do not have: the two would never agree.
      return Unsupported("the TPM backend does not support RSA-OAEP labels");
    }
    scheme.scheme = TPM2_ALG_OAEP;
    scheme.details.oaep.hashAlg = TpmHash(d);
    if (scheme.details.oaep.hashAlg == TPM2_ALG_NULL) {
      return Unsupported("unsupported RSA-OAEP digest for the TPM");
    }
  } else if (p.algorithm == v1::RSA_PKCS1_V15) {
    if (!p.oaep_label.empty()) {
      return InvalidArgument("a label is only valid with RSA-OAEP");
    }
    scheme.scheme = TPM2_ALG_RSAES;
  } else if (p.algorithm == v1::RSA_TLS_PREMASTER) {
    // The TPM reports a padding failure as an error, which would be a
    // Bleichenbacher oracle; the implicit-rejection TLS mode is not possible.
    return Unsupported(
        "RSA TLS premaster decryption is not supported by the TPM backend");
  } else {
    return InvalidArgument("unknown decrypt algorithm");
  }
  return im.Run<SecretBytes>([&](TSS2_RC* rc_out) -> StatusOr<SecretBytes> {
    if (!im.algs.contains(scheme.scheme) ||
        (scheme.scheme == TPM2_ALG_OAEP &&
         !im.algs.contains(scheme.details.oaep.hashAlg))) {
      return Unsupported(
          "this TPM does not implement the requested RSA "
          "decryption scheme");
    }
    StatusOr<ESYS_TR> h = im.Load(key, rc_out);
    if (!h.ok()) {
      return h.status();
    }
    TPM2B_PUBLIC_KEY_RSA c{};
    c.size = static_cast<UINT16>(ciphertext.size());
    std::memcpy(c.buffer, ciphertext.data(), ciphertext.size());
    TPM2B_DATA label{};
    TPM2B_PUBLIC_KEY_RSA* raw = nullptr;
    TSS2_RC rc = Esys_RSA_Decrypt(im.esys, *h, im.session, ESYS_TR_NONE,
                                  ESYS_TR_NONE, &c, &scheme, &label, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      if (IsDecryptionFailure(rc)) {
        // No detail: the reason for a padding failure is an oracle.
        return InvalidArgument("decryption failed");
      }
      // Connection, resources, authorization, lockout: the real status
      // (they do not depend on the ciphertext, so they tell nothing).
      return TpmError(rc, "RSA decryption");
    }
    auto m = OwnedSecret(raw);
    if (m->size > sizeof(m->buffer)) {
      return Internal("TPM returned an oversized plaintext");
    }
    return SecretBytes(std::span<const uint8_t>(m->buffer, m->size));
  });
}

StatusOr<SecretBytes> TpmBackend::Derive(const KeyHandle& key,
                                         std::span<const uint8_t> peer) {
  if (!IsEc(key.type)) {
    return InvalidArgument("key type " + std::string(KeyTypeName(key.type)) +
                           " cannot derive");
  }
  const TypeInfo info = *InfoFor(key.type);
  StatusOr<TPM2B_ECC_POINT> point = ParsePeerPoint(info, peer);
  if (!point.ok()) {
    return point.status();
  }
  Impl& im = *impl_;
  return im.Run<SecretBytes>([&](TSS2_RC* rc_out) -> StatusOr<SecretBytes> {
    if (!im.algs.contains(TPM2_ALG_ECDH)) {
      return Unsupported("this TPM does not implement ECDH");
    }
    StatusOr<ESYS_TR> h = im.Load(key, rc_out);
    if (!h.ok()) {
      return h.status();
    }
    TPM2B_ECC_POINT* raw = nullptr;
    TSS2_RC rc = Esys_ECDH_ZGen(im.esys, *h, im.session, ESYS_TR_NONE,
                                ESYS_TR_NONE, &*point, &raw);
    if (rc != TSS2_RC_SUCCESS) {
      *rc_out = rc;
      if (BaseRc(rc) == TPM2_RC_ECC_POINT) {
        return InvalidArgument("invalid peer public key");
      }
      return TpmError(rc, "ECDH failed");
    }
    // z holds the shared point: wiped when it goes, on every path.
    auto z = OwnedSecret(raw);
    // The shared secret is the x coordinate, padded to the field size, as
    // OpenSSL's ECDH returns it.
    const TPM2B_ECC_PARAMETER& x = z->point.x;
    if (x.size > info.field_bytes) {
      return Internal("TPM returned an oversized ECDH result");
    }
    SecretBytes out(info.field_bytes);
    std::memcpy(out.data(SecretAccess::kToken) + info.field_bytes - x.size,
                x.buffer, x.size);
    return out;
  });
}

std::string TpmBackend::CallsInProgress() const {
  std::lock_guard gate(impl_->gate_mu);
  if (!impl_->gate_taken) {
    return {};
  }
  const auto held = std::chrono::duration_cast<std::chrono::seconds>(
      std::chrono::steady_clock::now() - impl_->gate_since);
  return "TPM backend '" + impl_->options.name +
         "': a request has been in the TPM for " +
         std::to_string(held.count()) + " s";
}

std::string TpmBackend::State() const {
  std::lock_guard lock(impl_->state_mu);
  return impl_->state;
}

Status TpmBackend::Destroy(const KeyHandle& key) {
  StatusOr<Impl::Held> lock = impl_->Acquire();
  if (!lock.ok()) {
    // The row is gone already; a handle left loaded is evicted in turn (a
    // key with the same id cannot reuse it: Load() compares the blob).
    return lock.status();
  }
  if (impl_->esys != nullptr) {
    impl_->Evict(key.id);
  }
  // The TPM holds nothing else of the key: the blob was its only copy.
  return Status::Ok();
}

StatusOr<std::unique_ptr<Backend>> CreateTpmBackend(
    std::string_view settings_toml, const SecretBytes& master_key) {
  StatusOr<TpmOptions> options = ParseTpmSettings(settings_toml);
  if (!options.ok()) {
    return options.status();
  }
  StatusOr<std::unique_ptr<TpmBackend>> backend =
      TpmBackend::Create(std::move(*options), master_key);
  if (!backend.ok()) {
    return backend.status();
  }
  return std::unique_ptr<Backend>(std::move(*backend));
}

}  // namespace keyhold::backend::tpm
