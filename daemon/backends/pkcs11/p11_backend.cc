#include "daemon/backends/pkcs11/p11_backend.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/key_types.h"
#include "common/ssl_ptr.h"
#include "daemon/backends/pkcs11/p11_errors.h"
#include "daemon/log.h"

namespace keyhold::backend::pkcs11 {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("pkcs11");
  return *logger;
}

// Every key object keyhold creates carries this CKA_LABEL prefix; objects
// without it are never touched (reconciliation included).
constexpr std::string_view kLabelPrefix = "keyhold:";
// The label of a pending marker (Impl::CreateMarker): a data object beside a
// key object that no key store row may record yet (being created) or any
// more (being deleted). Reconciliation at start removes a marked key object
// when no row records it; an unmarked one no row records is only reported,
// never removed (a renamed backend table, a key store restored from a
// backup). Before markers, keyhold gave the key object this label itself
// and relabelled it; such objects are still found, and still removed when
// no row records them.
constexpr std::string_view kPendingPrefix = "keyhold-pending:";
// The CKA_APPLICATION of keyhold's pending markers (Impl::CreateMarker).
constexpr std::string_view kApplication = "keyhold";
constexpr std::size_t kIdSize = 16;
constexpr uint8_t kBlobVersion = 0x01;
constexpr std::size_t kMaxPinSize = 256;
// Largest output of any operation we run (RSA-4096 is 512 bytes).
constexpr std::size_t kMaxOutput = 1024;
// Largest attribute value we read (an RSA-4096 modulus is 512 bytes, a P-521
// CKA_EC_POINT 136); a module that reports more is faulty.
constexpr CK_ULONG kMaxAttribute = CK_ULONG{16} * 1024;
// Most slots or mechanisms a module may list.
constexpr CK_ULONG kMaxListCount = 4096;

// Reads a list the PKCS#11 two-call way (C_GetSlotList, C_GetMechanismList):
// call(nullptr, &n) for the count, then call(buffer, &n) for the items. A
// count over kMaxListCount, or more items than the first answer made room
// for, is kCkrBadModuleOutput.
template <typename T, typename Call>
CK_RV ReadList(Call&& call, std::vector<T>* out) {
  CK_ULONG count = 0;
  CK_RV rv = call(nullptr, &count);
  if (rv == CKR_OK && count > kMaxListCount) {
    rv = kCkrBadModuleOutput;
  }
  if (rv != CKR_OK) {
    return rv;
  }
  out->resize(count);
  rv = call(out->data(), &count);
  if (rv == CKR_OK && count > out->size()) {
    rv = kCkrBadModuleOutput;
  }
  if (rv == CKR_OK) {
    out->resize(count);
  }
  return rv;
}

// DER OIDs for CKA_EC_PARAMS.
constexpr uint8_t kOidP256[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr uint8_t kOidP384[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};
constexpr uint8_t kOidP521[] = {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23};
constexpr uint8_t kOidEd25519[] = {0x06, 0x03, 0x2b, 0x65, 0x70};

// ---------------------------------------------------------------------------
// Small helpers

Status SslFail(Code code, std::string message) {
  ERR_clear_error();
  return Status(code, std::move(message));
}

std::string TrimPadded(const unsigned char* p, std::size_t n) {
  std::string s(reinterpret_cast<const char*>(p), n);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) {
    s.pop_back();
  }
  return s;
}

std::span<const uint8_t> AsBytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

std::span<const uint8_t> EcParams(v1::KeyType type) {
  switch (type) {
    case v1::EC_P256:
      return kOidP256;
    case v1::EC_P384:
      return kOidP384;
    case v1::EC_P521:
      return kOidP521;
    case v1::ED25519:
      return kOidEd25519;
    default:
      return {};
  }
}

const char* GroupName(v1::KeyType type) {
  switch (type) {
    case v1::EC_P256:
      return "P-256";
    case v1::EC_P384:
      return "P-384";
    case v1::EC_P521:
      return "P-521";
    default:
      return nullptr;
  }
}

std::size_t FieldBytes(v1::KeyType type) {
  switch (type) {
    case v1::EC_P256:
      return 32;
    case v1::EC_P384:
      return 48;
    case v1::EC_P521:
      return 66;
    default:
      return 0;
  }
}

unsigned long RsaBits(v1::KeyType type) {
  switch (type) {
    case v1::RSA_2048:
      return 2048;
    case v1::RSA_3072:
      return 3072;
    case v1::RSA_4096:
      return 4096;
    default:
      return 0;
  }
}

std::string MechName(CK_MECHANISM_TYPE m) {
  switch (m) {
    case CKM_RSA_PKCS_KEY_PAIR_GEN:
      return "CKM_RSA_PKCS_KEY_PAIR_GEN";
    case CKM_RSA_PKCS:
      return "CKM_RSA_PKCS";
    case CKM_RSA_PKCS_PSS:
      return "CKM_RSA_PKCS_PSS";
    case CKM_RSA_PKCS_OAEP:
      return "CKM_RSA_PKCS_OAEP";
    case CKM_EC_KEY_PAIR_GEN:
      return "CKM_EC_KEY_PAIR_GEN";
    case CKM_ECDSA:
      return "CKM_ECDSA";
    case CKM_ECDH1_DERIVE:
      return "CKM_ECDH1_DERIVE";
    case CKM_EC_EDWARDS_KEY_PAIR_GEN:
      return "CKM_EC_EDWARDS_KEY_PAIR_GEN";
    case CKM_EDDSA:
      return "CKM_EDDSA";
    default:
      return "mechanism " + std::to_string(m);
  }
}

// PKCS#11 hash mechanism and MGF1 generator for a digest; 0 if none.
CK_MECHANISM_TYPE HashMech(v1::Digest d) {
  switch (d) {
    case v1::SHA1:
      return CKM_SHA_1;
    case v1::SHA224:
      return CKM_SHA224;
    case v1::SHA256:
      return CKM_SHA256;
    case v1::SHA384:
      return CKM_SHA384;
    case v1::SHA512:
      return CKM_SHA512;
    default:
      return 0;
  }
}

CK_RSA_PKCS_MGF_TYPE MgfFor(v1::Digest d) {
  switch (d) {
    case v1::SHA1:
      return CKG_MGF1_SHA1;
    case v1::SHA224:
      return CKG_MGF1_SHA224;
    case v1::SHA256:
      return CKG_MGF1_SHA256;
    case v1::SHA384:
      return CKG_MGF1_SHA384;
    case v1::SHA512:
      return CKG_MGF1_SHA512;
    default:
      return 0;
  }
}

// DER DigestInfo prefix (RFC 8017 9.2 note 1) for RSA PKCS#1 v1.5.
std::span<const uint8_t> DigestInfoPrefix(v1::Digest d) {
  static constexpr uint8_t kSha1[] = {0x30, 0x21, 0x30, 0x09, 0x06,
                                      0x05, 0x2b, 0x0e, 0x03, 0x02,
                                      0x1a, 0x05, 0x00, 0x04, 0x14};
  static constexpr uint8_t kSha224[] = {
      0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
      0x65, 0x03, 0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c};
  static constexpr uint8_t kSha256[] = {
      0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
      0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20};
  static constexpr uint8_t kSha384[] = {
      0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
      0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30};
  static constexpr uint8_t kSha512[] = {
      0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
      0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40};
  switch (d) {
    case v1::SHA1:
      return kSha1;
    case v1::SHA224:
      return kSha224;
    case v1::SHA256:
      return kSha256;
    case v1::SHA384:
      return kSha384;
    case v1::SHA512:
      return kSha512;
    default:
      return {};
  }
}

Status CheckDigestLength(v1::Digest digest, std::span<const uint8_t> data) {
  if (DigestSize(digest) == 0) {
    return InvalidArgument(
        "digest must be one of sha1, sha224, sha256, sha384, sha512");
  }
  if (data.size() != DigestSize(digest)) {
    return InvalidArgument("data must be a " + std::string(DigestName(digest)) +
                           " digest of " + std::to_string(DigestSize(digest)) +
                           " bytes, got " + std::to_string(data.size()));
  }
  return Status::Ok();
}

// ---------------------------------------------------------------------------
// Blob: version | serial_len | serial | id_len | id

std::vector<uint8_t> EncodeBlob(const std::string& serial,
                                std::span<const uint8_t> id) {
  std::vector<uint8_t> out(3 + serial.size() + id.size());
  out[0] = kBlobVersion;
  out[1] = static_cast<uint8_t>(serial.size());
  std::copy(serial.begin(), serial.end(), out.begin() + 2);
  out[2 + serial.size()] = static_cast<uint8_t>(id.size());
  std::copy(id.begin(), id.end(),
            out.begin() + static_cast<std::ptrdiff_t>(3 + serial.size()));
  return out;
}

struct Blob {
  std::string serial;
  std::vector<uint8_t> id;
};

StatusOr<Blob> DecodeBlob(std::span<const uint8_t> b) {
  if (b.size() < 3 || b[0] != kBlobVersion) {
    return Internal("not a PKCS#11 key blob");
  }
  const std::size_t serial_len = b[1];
  if (b.size() < 2 + serial_len + 1) {
    return Internal("truncated PKCS#11 key blob");
  }
  Blob out;
  out.serial.assign(reinterpret_cast<const char*>(b.data() + 2), serial_len);
  const std::size_t id_len = b[2 + serial_len];
  if (id_len == 0 || b.size() != 3 + serial_len + id_len) {
    return Internal("malformed PKCS#11 key blob");
  }
  const uint8_t* id = b.data() + 3 + serial_len;
  out.id.assign(id, id + id_len);
  return out;
}

// ---------------------------------------------------------------------------
// PIN file

StatusOr<SecretBytes> ReadPinFile(const std::string& path) {
  const int fd =
      ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    return PermissionDenied("pin_file '" + path +
                            "': cannot open: " + std::strerror(errno));
  }
  struct stat st {};
  Status bad;
  if (::fstat(fd, &st) != 0) {
    bad = PermissionDenied("pin_file '" + path + "': cannot stat");
  } else if (!S_ISREG(st.st_mode)) {
    bad = PermissionDenied("pin_file '" + path + "': not a regular file");
  } else if (st.st_uid != ::geteuid()) {
    bad = PermissionDenied("pin_file '" + path +
                           "': must be owned by the daemon's uid " +
                           std::to_string(::geteuid()));
  } else if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    bad = PermissionDenied("pin_file '" + path +
                           "': group or others have access (chmod 0600)");
  }
  if (!bad.ok()) {
    ::close(fd);
    return bad;
  }
  SecretBytes pin(kMaxPinSize + 1);
  std::size_t got = 0;
  while (got < pin.size()) {
    const ssize_t n =
        ::read(fd, pin.data(SecretAccess::kToken) + got, pin.size() - got);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      break;
    }
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  if (got > kMaxPinSize) {
    return PermissionDenied("pin_file '" + path + "': longer than " +
                            std::to_string(kMaxPinSize) + " bytes");
  }
  const auto bytes = pin.Expose(SecretAccess::kToken);
  while (got > 0 && (bytes[got - 1] == '\n' || bytes[got - 1] == '\r')) {
    --got;
  }
  pin.resize(got);
  if (got == 0) {
    return PermissionDenied("pin_file '" + path + "': empty");
  }
  return pin;
}

// ---------------------------------------------------------------------------
// OpenSSL: public keys and imports

StatusOr<std::vector<uint8_t>> SpkiOf(EVP_PKEY* pkey) {
  const int len = i2d_PUBKEY(pkey, nullptr);
  if (len <= 0) {
    return SslFail(Code::kInternal, "cannot encode public key");
  }
  std::vector<uint8_t> out(static_cast<std::size_t>(len));
  unsigned char* p = out.data();
  if (i2d_PUBKEY(pkey, &p) != len) {
    return SslFail(Code::kInternal, "cannot encode public key");
  }
  return out;
}

StatusOr<std::vector<uint8_t>> RsaSpki(std::span<const uint8_t> n,
                                       std::span<const uint8_t> e) {
  SslPtr<BIGNUM> bn_n(BN_bin2bn(n.data(), static_cast<int>(n.size()), nullptr));
  SslPtr<BIGNUM> bn_e(BN_bin2bn(e.data(), static_cast<int>(e.size()), nullptr));
  OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
  OSSL_PARAM* params = nullptr;
  if (bn_n == nullptr || bn_e == nullptr || bld == nullptr ||
      OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n.get()) != 1 ||
      OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e.get()) != 1 ||
      (params = OSSL_PARAM_BLD_to_param(bld)) == nullptr) {
    OSSL_PARAM_BLD_free(bld);
    return SslFail(Code::kInternal, "cannot build RSA public key");
  }
  OSSL_PARAM_BLD_free(bld);
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(nullptr, "RSA", nullptr));
  EVP_PKEY* raw = nullptr;
  const bool ok =
      ctx != nullptr && EVP_PKEY_fromdata_init(ctx.get()) == 1 &&
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) == 1;
  OSSL_PARAM_free(params);
  if (!ok) {
    return SslFail(Code::kInternal, "cannot build RSA public key");
  }
  SslPtr<EVP_PKEY> pkey(raw);
  return SpkiOf(pkey.get());
}

StatusOr<SslPtr<EVP_PKEY>> EcPublicKey(const char* group,
                                       std::span<const uint8_t> point) {
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME,
                                       const_cast<char*>(group), 0),
      OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY,
                                        const_cast<uint8_t*>(point.data()),
                                        point.size()),
      OSSL_PARAM_construct_end(),
  };
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
  EVP_PKEY* raw = nullptr;
  if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
    return SslFail(Code::kInvalidArgument,
                   std::string("not a point on curve ") + group);
  }
  return SslPtr<EVP_PKEY>(raw);
}

// CKA_EC_POINT is a DER OCTET STRING holding the point; some tokens return
// the raw point. Returns the raw point.
std::span<const uint8_t> UnwrapEcPoint(std::span<const uint8_t> v) {
  if (v.size() >= 2 && v[0] == 0x04) {
    std::size_t len = 0;
    std::size_t hdr = 0;
    if (v[1] < 0x80) {
      len = v[1];
      hdr = 2;
    } else if (v[1] == 0x81 && v.size() >= 3) {
      len = v[2];
      hdr = 3;
    }
    if (hdr != 0 && hdr + len == v.size()) {
      return v.subspan(hdr);
    }
  }
  return v;
}

int NoPassphrase(char*, std::size_t, std::size_t*, const OSSL_PARAM[], void*) {
  return 0;
}
int NoPemPassword(char*, int, int, void*) { return -1; }

SslPtr<EVP_PKEY> ParsePrivateKey(std::span<const uint8_t> data) {
  if (data.empty() || data.size() > static_cast<std::size_t>(INT_MAX)) {
    return nullptr;
  }
  if (data[0] == 0x30) {
    EVP_PKEY* pkey = nullptr;
    OSSL_DECODER_CTX* ctx = OSSL_DECODER_CTX_new_for_pkey(
        &pkey, "DER", nullptr, nullptr, EVP_PKEY_KEYPAIR, nullptr, nullptr);
    const unsigned char* p = data.data();
    std::size_t len = data.size();
    const bool ok =
        ctx != nullptr &&
        OSSL_DECODER_CTX_set_passphrase_cb(ctx, &NoPassphrase, nullptr) == 1 &&
        OSSL_DECODER_from_data(ctx, &p, &len) == 1;
    OSSL_DECODER_CTX_free(ctx);
    if (!ok) {
      EVP_PKEY_free(pkey);
      return nullptr;
    }
    return SslPtr<EVP_PKEY>(pkey);
  }
  SslPtr<BIO> bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
  if (bio == nullptr) {
    return nullptr;
  }
  return SslPtr<EVP_PKEY>(
      PEM_read_bio_PrivateKey(bio.get(), nullptr, &NoPemPassword, nullptr));
}

// A BIGNUM parameter of pkey as big-endian bytes (optionally left-padded to
// pad bytes), wiped on free.
StatusOr<SecretBytes> BnParam(const EVP_PKEY* pkey, const char* name,
                              std::size_t pad = 0) {
  BIGNUM* bn = nullptr;
  if (EVP_PKEY_get_bn_param(pkey, name, &bn) != 1) {
    return SslFail(Code::kInvalidArgument,
                   std::string("private key lacks ") + name);
  }
  const std::size_t len =
      std::max(pad, static_cast<std::size_t>(BN_num_bytes(bn)));
  SecretBytes out(len);
  const int w =
      BN_bn2binpad(bn, out.data(SecretAccess::kToken), static_cast<int>(len));
  BN_clear_free(bn);
  if (w < 0) {
    return SslFail(Code::kInternal, "cannot encode key parameter");
  }
  return out;
}

// ---------------------------------------------------------------------------
// Templates

class Template {
 public:
  void Bool(CK_ATTRIBUTE_TYPE t, bool v) {
    bools_.push_back(v ? CK_TRUE : CK_FALSE);
    Add(t, nullptr, sizeof(CK_BBOOL), bools_.size() - 1, kBool);
  }
  void Ulong(CK_ATTRIBUTE_TYPE t, CK_ULONG v) {
    ulongs_.push_back(v);
    Add(t, nullptr, sizeof(CK_ULONG), ulongs_.size() - 1, kUlong);
  }
  // Bytes must outlive Get().
  void Bytes(CK_ATTRIBUTE_TYPE t, std::span<const uint8_t> v) {
    Add(t, const_cast<uint8_t*>(v.data()), v.size(), 0, kBytes);
  }
  CK_ATTRIBUTE* Get() {
    for (std::size_t i = 0; i < attrs_.size(); ++i) {
      if (kinds_[i].first == kBool) {
        attrs_[i].pValue = &bools_[kinds_[i].second];
      } else if (kinds_[i].first == kUlong) {
        attrs_[i].pValue = &ulongs_[kinds_[i].second];
      }
    }
    return attrs_.data();
  }
  CK_ULONG Count() const { return attrs_.size(); }

 private:
  enum Kind { kBool, kUlong, kBytes };
  void Add(CK_ATTRIBUTE_TYPE t, void* p, std::size_t len, std::size_t idx,
           Kind kind) {
    attrs_.push_back(CK_ATTRIBUTE{t, p, len});
    kinds_.emplace_back(kind, idx);
  }
  std::vector<CK_ATTRIBUTE> attrs_;
  std::vector<std::pair<Kind, std::size_t>> kinds_;
  std::vector<CK_BBOOL> bools_;
  std::vector<CK_ULONG> ulongs_;
};

// The mechanism parameters keyhold passes to C_SignInit/C_DecryptInit are
// checked before (hash, MGF1, salt and label lengths), so a token that calls
// them bad (SoftHSM2 does for OAEP with SHA-256 or a label, and for PSS
// with another MGF1 hash) does not support them: "unsupported", not an
// internal error.
CK_RV InitRv(CK_RV rv) {
  return rv == CKR_ARGUMENTS_BAD ? CKR_MECHANISM_PARAM_INVALID : rv;
}

// Overwrites id with fresh random bytes, in place.
bool RedrawId(std::vector<uint8_t>* id) {
  return RAND_bytes(id->data(), static_cast<int>(id->size())) == 1;
}

// Attributes of every private key keyhold puts on a token.
void AddPrivateKeyPolicy(Template& t, std::span<const uint8_t> id,
                         const std::string& label) {
  t.Bool(CKA_TOKEN, true);
  t.Bool(CKA_PRIVATE, true);
  t.Bool(CKA_SENSITIVE, true);
  t.Bool(CKA_EXTRACTABLE, false);
  t.Bytes(CKA_ID, id);
  t.Bytes(CKA_LABEL, AsBytes(label));
}

}  // namespace

// ---------------------------------------------------------------------------
// Config

StatusOr<P11Config> ParseP11Config(const std::string& settings_toml) {
  toml::table t;
  try {
    t = toml::parse(settings_toml, std::string("[[backend.pkcs11]]"));
  } catch (const toml::parse_error& e) {
    return InvalidArgument(std::string("[[backend.pkcs11]]: ") +
                           std::string(e.description()));
  }
  static const std::set<std::string> kKnown = {
      "name",         "module",   "allowed_modules", "token_label",
      "token_serial", "pin_file", "sessions",        "acquire_timeout_ms"};
  for (const auto& [key, value] : t) {
    if (!kKnown.contains(std::string(key.str()))) {
      return InvalidArgument("unknown setting '" + std::string(key.str()) +
                             "' in [[backend.pkcs11]]");
    }
  }
  P11Config c;
  auto str = [&](const char* key, std::string* out) -> Status {
    const toml::node* n = t.get(key);
    if (n == nullptr) {
      return Status::Ok();
    }
    auto v = n->value<std::string>();
    if (!v || v->empty()) {
      return InvalidArgument(std::string("[[backend.pkcs11]] setting '") + key +
                             "' must be a non-empty string");
    }
    *out = *v;
    return Status::Ok();
  };
  auto num = [&](const char* key, uint32_t* out, int64_t min,
                 int64_t max) -> Status {
    const toml::node* n = t.get(key);
    if (n == nullptr) {
      return Status::Ok();
    }
    auto v = n->value<int64_t>();
    if (!v || *v < min || *v > max) {
      return InvalidArgument(std::string("[[backend.pkcs11]] setting '") + key +
                             "' must be an integer from " +
                             std::to_string(min) + " to " +
                             std::to_string(max));
    }
    *out = static_cast<uint32_t>(*v);
    return Status::Ok();
  };
  KH_RETURN_IF_ERROR(str("name", &c.name));
  KH_RETURN_IF_ERROR(str("module", &c.module));
  KH_RETURN_IF_ERROR(str("token_label", &c.token_label));
  KH_RETURN_IF_ERROR(str("token_serial", &c.token_serial));
  KH_RETURN_IF_ERROR(str("pin_file", &c.pin_file));
  KH_RETURN_IF_ERROR(num("sessions", &c.sessions, 1, 256));
  KH_RETURN_IF_ERROR(num("acquire_timeout_ms", &c.acquire_timeout_ms, 1,
                         int64_t{3600} * 1000));
  if (const toml::node* n = t.get("allowed_modules")) {
    const toml::array* arr = n->as_array();
    if (arr == nullptr) {
      return InvalidArgument(
          "[[backend.pkcs11]] allowed_modules must be an array of paths");
    }
    for (const toml::node& e : *arr) {
      auto v = e.value<std::string>();
      if (!v || v->empty()) {
        return InvalidArgument(
            "[[backend.pkcs11]] allowed_modules must be an array of paths");
      }
      c.allowed_modules.push_back(*v);
    }
  }
  if (c.name.empty()) {
    return InvalidArgument("[[backend.pkcs11]] needs a name");
  }
  const std::string where = "backend '" + c.name + "': ";
  if (c.module.empty()) {
    return InvalidArgument(where + "'module' (PKCS#11 module path) is missing");
  }
  if (c.token_label.empty() == c.token_serial.empty()) {
    return InvalidArgument(where +
                           "set exactly one of 'token_label', 'token_serial'");
  }
  if (c.pin_file.empty()) {
    return InvalidArgument(where + "'pin_file' is missing");
  }
  return c;
}

// ---------------------------------------------------------------------------

struct P11Backend::Impl {
  P11Config config;
  CK_FUNCTION_LIST* fn = nullptr;
  bool initialized = false;
  CK_SLOT_ID slot = 0;
  std::string serial;
  std::set<CK_MECHANISM_TYPE> mechanisms;

  // Session pool. `open` counts sessions that exist (idle or leased).
  mutable std::mutex pool_mu;
  std::condition_variable pool_cv;
  std::vector<CK_SESSION_HANDLE> idle;
  uint32_t open = 0;
  // Since when every session has been leased without one coming back
  // (unset: some session is free or may be opened).
  std::optional<std::chrono::steady_clock::time_point> full_since;
  std::mutex slot_mu;  // guards slot during re-discovery
  std::atomic<bool> pin_refused{false};
  // Bumped when a session is found lost; sessions of older generations are
  // closed instead of pooled (guarded by pool_mu).
  uint64_t generation = 0;

  // key id -> (CKA_ID, private key handle)
  std::shared_mutex cache_mu;
  std::unordered_map<uint64_t,
                     std::pair<std::vector<uint8_t>, CK_OBJECT_HANDLE>>
      handles;

  // Every backend's handle cache in the process (two backend tables may
  // name one module), for ForgetObjectHandle().
  static std::mutex& RegistryMu() {
    static std::mutex mu;
    return mu;
  }
  static std::vector<Impl*>& Registry() {
    static std::vector<Impl*> impls;
    return impls;
  }

  // A handle names an object only while the object exists: once someone
  // else destroys a key's object, a module may give its number to the next
  // object made, and a cached handle would then lead that key's requests
  // to the new object, which may be another user's key. So a handle a new
  // object gets is dropped from every cache at once, and the key whose
  // object is gone is looked up afresh (and found missing). A request that
  // read the handle while an object was being made checks it once more
  // before it gives anything out or changes anything (HandleWatch).
  static void ForgetObjectHandle(CK_OBJECT_HANDLE h) {
    std::lock_guard lock(RegistryMu());
    for (Impl* im : Registry()) {
      std::unique_lock cache(im->cache_mu);
      std::erase_if(im->handles, [h](const auto& entry) {
        return entry.second.second == h;
      });
    }
  }

  // Object creations by every backend of the process (C_GenerateKeyPair,
  // C_CreateObject, C_DeriveKey): how many began, and how many ended with
  // their new handles forgotten by every cache.
  static std::atomic<uint64_t>& CreationsBegun() {
    static std::atomic<uint64_t> n{0};
    return n;
  }
  static std::atomic<uint64_t>& CreationsEnded() {
    static std::atomic<uint64_t> n{0};
    return n;
  }
  // One object creation: from before the module call until after its
  // handles are forgotten (ForgetObjectHandle).
  class Creation {
   public:
    Creation() { CreationsBegun().fetch_add(1); }
    ~Creation() { CreationsEnded().fetch_add(1); }
    Creation(const Creation&) = delete;
    Creation& operator=(const Creation&) = delete;
  };

  // Taken before a request reads its key's handle (cached or found). The
  // handle was the key's object then, but a creation under way at that
  // moment, or begun before the module's init call has bound the operation,
  // may have given its number to a new object (the key's own destroyed
  // behind keyhold's back), whose key must not serve the request.
  // Unchanged() says that cannot have happened; otherwise StillKey reads
  // the object's CKA_ID first. So the check costs three atomic loads unless
  // an object is being made at the same time.
  struct HandleWatch {
    uint64_t begun = CreationsBegun().load();
    bool quiet = begun == CreationsEnded().load();

    // own: creations the use itself began since (C_DeriveKey's).
    bool Unchanged(uint64_t own = 0) const {
      return quiet && CreationsBegun().load() == begun + own;
    }
  };

  // What WithKey's op asks before it acts on h (a key use: once its init
  // call has bound the operation to h), whether h is still the key's
  // object: CKR_OK if no creation can have taken h's number since the
  // handle was read, or if h still has the key's CKA_ID (PKCS#11 allows
  // C_GetAttributeValue while an operation is active). Otherwise the op
  // gives nothing out, changes nothing and returns what this returns:
  // kCkrWrongObject, or the code of a lost session.
  struct StillKey {
    Impl* im;
    HandleWatch watch;
    const Blob* blob;
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE h;

    // own: creations the op itself began since (C_DeriveKey's).
    CK_RV operator()(uint64_t own = 0) const {
      if (watch.Unchanged(own)) {
        return CKR_OK;
      }
      std::vector<uint8_t> id;
      const CK_RV rv = im->GetAttr(s, h, CKA_ID, &id);
      if (IsSessionLost(rv)) {
        return rv;
      }
      return rv == CKR_OK && id == blob->id ? CKR_OK : kCkrWrongObject;
    }
  };

  Impl() {
    std::lock_guard lock(RegistryMu());
    Registry().push_back(this);
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  ~Impl() {
    {
      std::lock_guard lock(RegistryMu());
      std::erase(Registry(), this);
    }
    if (fn != nullptr) {
      for (CK_SESSION_HANDLE s : idle) {
        fn->C_CloseSession(s);
      }
      if (initialized) {
        p11_kit_module_finalize(fn);
      }
      p11_kit_module_release(fn);
    }
  }

  std::string Where() const { return "backend '" + config.name + "': "; }

  // Finds the configured token's slot.
  Status FindSlot() {
    std::vector<CK_SLOT_ID> slots;
    const CK_RV rv = ReadList(
        [this](CK_SLOT_ID* list, CK_ULONG* n) {
          return fn->C_GetSlotList(CK_TRUE, list, n);
        },
        &slots);
    if (rv != CKR_OK) {
      return P11Error(rv, Where() + "C_GetSlotList");
    }
    for (CK_SLOT_ID s : slots) {
      CK_TOKEN_INFO info{};
      if (fn->C_GetTokenInfo(s, &info) != CKR_OK) {
        continue;
      }
      const std::string label = TrimPadded(info.label, sizeof(info.label));
      const std::string sn =
          TrimPadded(info.serialNumber, sizeof(info.serialNumber));
      if ((!config.token_label.empty() && label == config.token_label) ||
          (!config.token_serial.empty() && sn == config.token_serial)) {
        std::lock_guard lock(slot_mu);
        if (serial.empty()) {
          serial = sn;  // first start; never changes afterwards
        } else if (sn != serial) {
          continue;  // another token under the same label: not ours
        }
        slot = s;
        return Status::Ok();
      }
    }
    return BackendUnavailable(Where() + "the token with " +
                              (config.token_label.empty()
                                   ? "serial '" + config.token_serial
                                   : "label '" + config.token_label) +
                              "' is not present in module " + config.module +
                              (serial.empty() ? "" : " (removed?)"));
  }

  // Opens a read-write session and makes sure the token is logged in. The
  // PIN is read from its file for C_Login and wiped right after.
  StatusOr<CK_SESSION_HANDLE> OpenSession() {
    CK_SLOT_ID s;
    {
      std::lock_guard lock(slot_mu);
      s = slot;
    }
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = fn->C_OpenSession(s, CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                 nullptr, nullptr, &h);
    if (rv == CKR_SLOT_ID_INVALID || rv == CKR_TOKEN_NOT_PRESENT ||
        rv == CKR_DEVICE_REMOVED) {
      KH_RETURN_IF_ERROR(FindSlot());
      std::lock_guard lock(slot_mu);
      s = slot;
      rv = fn->C_OpenSession(s, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                             nullptr, &h);
    }
    if (rv != CKR_OK) {
      return P11Error(rv, Where() + "C_OpenSession");
    }
    CK_SESSION_INFO info{};
    rv = fn->C_GetSessionInfo(h, &info);
    if (rv == CKR_OK && info.state == CKS_RW_USER_FUNCTIONS) {
      return h;
    }
    if (pin_refused.load()) {
      // Each C_Login with a wrong PIN spends one of the token's few tries;
      // after a refusal no more are spent until the daemon restarts.
      fn->C_CloseSession(h);
      return PermissionDenied(Where() +
                              "the token refused the PIN from pin_file; fix "
                              "the file and restart keyholdd");
    }
    StatusOr<SecretBytes> pin = ReadPinFile(config.pin_file);
    if (!pin.ok()) {
      fn->C_CloseSession(h);
      return Status(pin.status().code(), Where() + pin.status().message());
    }
    rv = fn->C_Login(h, CKU_USER, pin->data(SecretAccess::kToken), pin->size());
    pin = Status(Code::kInternal, "wiped");  // SecretBytes wipes on free
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
      if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED ||
          rv == CKR_PIN_EXPIRED || rv == CKR_PIN_INVALID ||
          rv == CKR_PIN_LEN_RANGE) {
        pin_refused = true;
      }
      fn->C_CloseSession(h);
      return P11Error(rv, Where() + "C_Login (user PIN from pin_file)");
    }
    return h;
  }

  class Lease {
   public:
    Lease(Impl* impl, CK_SESSION_HANDLE h, uint64_t gen)
        : impl_(impl), h_(h), generation_(gen) {}
    Lease(Lease&& o) noexcept
        : impl_(std::exchange(o.impl_, nullptr)),
          h_(o.h_),
          generation_(o.generation_),
          dead_(o.dead_) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    Lease& operator=(Lease&&) = delete;
    ~Lease() {
      if (impl_ != nullptr) {
        impl_->Release(h_, generation_, dead_);
      }
    }
    CK_SESSION_HANDLE get() const { return h_; }
    void MarkDead() { dead_ = true; }

   private:
    Impl* impl_;
    CK_SESSION_HANDLE h_;
    uint64_t generation_;
    bool dead_ = false;
  };

  // A session goes back to the pool unless it died or was opened before the
  // last loss (DropIdleSessions): then it is closed and a later Acquire
  // opens a fresh one.
  void Release(CK_SESSION_HANDLE h, uint64_t gen, bool dead) {
    bool close = dead;
    {
      std::lock_guard lock(pool_mu);
      if (gen != generation) {
        close = true;
      }
      if (close) {
        --open;
      } else {
        idle.push_back(h);
      }
      full_since.reset();
    }
    if (close) {
      fn->C_CloseSession(h);
    }
    pool_cv.notify_one();
  }

  // After one session was lost, the others are most likely gone too (token
  // removed, or logged out: login state is per token, not per session).
  // Retrying on another pooled session would spend the one retry on a dead
  // session, so every idle session is closed and leased ones are closed
  // when they come back; the retry opens (and logs in) a fresh session.
  void DropIdleSessions() {
    std::vector<CK_SESSION_HANDLE> stale;
    {
      std::lock_guard lock(pool_mu);
      ++generation;
      stale.swap(idle);
      open -= static_cast<uint32_t>(stale.size());
      if (!stale.empty()) {
        full_since.reset();
      }
    }
    for (CK_SESSION_HANDLE h : stale) {
      fn->C_CloseSession(h);  // may fail: the session is likely gone
    }
    pool_cv.notify_all();
  }

  // A free session, waiting at most acquire_timeout_ms for one; none at all
  // when every session has been busy that long already (a module that hangs
  // in each of them), so a hung module holds `sessions` threads, not also
  // every thread that wants a session.
  StatusOr<Lease> Acquire() {
    using Clock = std::chrono::steady_clock;
    const auto timeout = std::chrono::milliseconds(config.acquire_timeout_ms);
    std::unique_lock lock(pool_mu);
    const Clock::time_point give_up = Clock::now() + timeout;
    while (idle.empty() && open >= config.sessions) {
      // Every session leased for the whole timeout: the module hangs.
      const Clock::time_point now = Clock::now();
      const bool hung = full_since && now - *full_since >= timeout;
      if (!hung && now < give_up) {
        pool_cv.wait_until(lock, full_since
                                     ? std::min(give_up, *full_since + timeout)
                                     : give_up);
        continue;
      }
      return BackendUnavailable(Where() + "all " +
                                std::to_string(config.sessions) +
                                " token sessions stayed busy for " +
                                std::to_string(config.acquire_timeout_ms) +
                                " ms (acquire_timeout_ms; is the PKCS#11 "
                                "module hanging?)");
    }
    auto mark_full = [&] {
      if (idle.empty() && open >= config.sessions && !full_since) {
        full_since = Clock::now();
      }
    };
    if (!idle.empty()) {
      CK_SESSION_HANDLE h = idle.back();
      idle.pop_back();
      mark_full();
      return Lease(this, h, generation);
    }
    ++open;
    mark_full();
    const uint64_t gen = generation;
    lock.unlock();
    StatusOr<CK_SESSION_HANDLE> h = OpenSession();
    if (!h.ok()) {
      {
        std::lock_guard relock(pool_mu);
        --open;
        full_since.reset();
      }
      pool_cv.notify_one();
      return h.status();
    }
    return Lease(this, *h, gen);
  }

  // Runs f(session, &what) -> CK_RV on a pooled session. A lost session is
  // closed and the call retried once on a fresh one (which re-finds the
  // token and logs in again if needed).
  template <typename F>
  Status Run(F&& f) {
    for (int attempt = 0;; ++attempt) {
      StatusOr<Lease> lease = Acquire();
      if (!lease.ok()) {
        return lease.status();
      }
      const char* what = "PKCS#11 call";
      const CK_RV rv = f(lease->get(), &what);
      if (rv == CKR_OK) {
        return Status::Ok();
      }
      if (rv == kCkrWrongObject) {
        lease->MarkDead();  // ends the operation (see kCkrWrongObject)
        if (attempt == 0) {
          continue;
        }
      }
      if (IsSessionLost(rv)) {
        // Object handles are only promised while a session that found them
        // is open; after a lost session (token removed, re-login) the same
        // number may name another object, so every cached handle goes.
        lease->MarkDead();
        DropIdleSessions();
        ForgetAllHandles();
        if (attempt == 0) {
          Log().warn("{}session lost ({}); reopening", Where(), CkrName(rv));
          continue;
        }
      }
      return P11Error(rv, Where() + what);
    }
  }

  Status RequireMech(CK_MECHANISM_TYPE m) const {
    if (!mechanisms.contains(m)) {
      return Unsupported(Where() + "the token does not offer " + MechName(m));
    }
    return Status::Ok();
  }

  // Reads one variable-length attribute. The module's lengths are checked:
  // more than kMaxAttribute, or a second answer longer than the buffer the
  // first one sized, is kCkrBadModuleOutput, never a larger read.
  CK_RV GetAttr(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_ATTRIBUTE_TYPE t,
                std::vector<uint8_t>* out) {
    CK_ATTRIBUTE a{t, nullptr, 0};
    CK_RV rv = fn->C_GetAttributeValue(s, o, &a, 1);
    if (rv != CKR_OK) {
      return rv;
    }
    if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      return CKR_ATTRIBUTE_TYPE_INVALID;
    }
    if (a.ulValueLen > kMaxAttribute) {
      return kCkrBadModuleOutput;
    }
    out->assign(a.ulValueLen, 0);
    a.pValue = out->data();
    rv = fn->C_GetAttributeValue(s, o, &a, 1);
    if (rv != CKR_OK) {
      out->clear();
      return rv;
    }
    if (a.ulValueLen > out->size()) {
      out->clear();
      return kCkrBadModuleOutput;
    }
    out->resize(a.ulValueLen);
    return CKR_OK;
  }

  // Token private keys matching tmpl.
  CK_RV FindObjects(CK_SESSION_HANDLE s, Template& tmpl,
                    std::vector<CK_OBJECT_HANDLE>* out) {
    CK_RV rv = fn->C_FindObjectsInit(s, tmpl.Get(), tmpl.Count());
    if (rv != CKR_OK) {
      return rv;
    }
    CK_OBJECT_HANDLE batch[64];
    for (;;) {
      CK_ULONG n = 0;
      rv = fn->C_FindObjects(s, batch, 64, &n);
      if (rv == CKR_OK && n > 64) {
        rv = kCkrBadModuleOutput;
      }
      if (rv != CKR_OK || n == 0) {
        break;
      }
      out->insert(out->end(), batch, batch + n);
    }
    const CK_RV fin = fn->C_FindObjectsFinal(s);
    return rv != CKR_OK ? rv : fin;
  }

  // The private key object of blob, from the cache unless fresh.
  // The object must carry the key's own label too, so a blob copied to
  // another key reference finds nothing.
  // The private key object of key: its CKA_ID, and a label naming ref (final,
  // or pending as keyhold labelled new objects before markers). fresh:
  // search the token even if a handle is cached.
  CK_RV FindKey(CK_SESSION_HANDLE s, uint64_t key_id, const Blob& blob,
                const daemon::KeyRef& ref, bool fresh, CK_OBJECT_HANDLE* out) {
    if (!fresh) {
      std::shared_lock lock(cache_mu);
      auto it = handles.find(key_id);
      if (it != handles.end() && it->second.first == blob.id) {
        *out = it->second.second;
        return CKR_OK;
      }
    }
    Template t;
    t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY);
    t.Bool(CKA_TOKEN, true);
    t.Bytes(CKA_ID, blob.id);
    std::vector<CK_OBJECT_HANDLE> found;
    CK_RV rv = FindObjects(s, t, &found);
    if (rv != CKR_OK) {
      return rv;
    }
    const std::string final_label = LabelFor(ref);
    const std::string pending_label = PendingLabelFor(ref);
    std::vector<CK_OBJECT_HANDLE> ours;
    for (CK_OBJECT_HANDLE h : found) {
      std::vector<uint8_t> label;
      rv = GetAttr(s, h, CKA_LABEL, &label);
      if (rv != CKR_OK) {
        return rv;
      }
      const std::string_view l(reinterpret_cast<const char*>(label.data()),
                               label.size());
      if (l == final_label || l == pending_label) {
        ours.push_back(h);
      }
    }
    if (ours.size() != 1) {
      // None: the object is gone. Several: ambiguous, refuse to guess.
      return CKR_OBJECT_HANDLE_INVALID;
    }
    std::unique_lock lock(cache_mu);
    handles.insert_or_assign(key_id, std::make_pair(blob.id, ours[0]));
    *out = ours[0];
    return CKR_OK;
  }

  // A key's pending marker: a token data object (CKO_DATA, CKA_APPLICATION
  // kApplication, label kPendingPrefix + reference, CKA_VALUE the key's
  // CKA_ID) that exists while no key store row may record the key: from
  // before its object is made until the store's commit (Recorded()), and
  // from Retire() until the object is destroyed. A key object itself is
  // never changed after it is made: SoftHSM2 rewrites an object's file in
  // place on C_SetAttributeValue, and a crash in that write loses the key.
  CK_RV CreateMarker(CK_SESSION_HANDLE s, const daemon::KeyRef& ref,
                     std::span<const uint8_t> id) {
    const std::string label = PendingLabelFor(ref);
    Template t;
    t.Ulong(CKA_CLASS, CKO_DATA);
    t.Bool(CKA_TOKEN, true);
    t.Bool(CKA_PRIVATE, true);
    t.Bytes(CKA_LABEL, AsBytes(label));
    t.Bytes(CKA_APPLICATION, AsBytes(kApplication));
    t.Bytes(CKA_VALUE, id);
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    const Creation creation;
    const CK_RV rv = fn->C_CreateObject(s, t.Get(), t.Count(), &h);
    if (rv == CKR_OK) {
      ForgetObjectHandle(h);
    }
    return rv;
  }

  // Whether the data object h is a keyhold marker; if so its label and
  // value (another application's values are never read).
  CK_RV ReadMarker(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, bool* is_marker,
                   std::string* label, std::vector<uint8_t>* id) {
    *is_marker = false;
    std::vector<uint8_t> app;
    CK_RV rv = GetAttr(s, h, CKA_APPLICATION, &app);
    if (rv != CKR_OK || !std::ranges::equal(app, AsBytes(kApplication))) {
      return rv;
    }
    std::vector<uint8_t> l;
    if (rv = GetAttr(s, h, CKA_LABEL, &l); rv != CKR_OK) {
      return rv;
    }
    label->assign(l.begin(), l.end());
    if (!label->starts_with(kPendingPrefix)) {
      return CKR_OK;
    }
    if (rv = GetAttr(s, h, CKA_VALUE, id); rv != CKR_OK) {
      return rv;
    }
    *is_marker = id->size() == kIdSize;
    return CKR_OK;
  }

  // Destroys one pending marker of key (ref, id), if there is one: one per
  // CreateMarker(), so a Retire() racing a Recorded() and the Destroy()
  // after it remove one each.
  CK_RV DestroyMarker(CK_SESSION_HANDLE s, const daemon::KeyRef& ref,
                      std::span<const uint8_t> id) {
    const std::string label = PendingLabelFor(ref);
    Template t;
    t.Ulong(CKA_CLASS, CKO_DATA);
    t.Bool(CKA_TOKEN, true);
    t.Bytes(CKA_LABEL, AsBytes(label));
    std::vector<CK_OBJECT_HANDLE> found;
    CK_RV rv = FindObjects(s, t, &found);
    if (rv != CKR_OK) {
      return rv;
    }
    for (CK_OBJECT_HANDLE h : found) {
      // Read just before the destroy: a number another object took since
      // the search fails this check.
      bool marker = false;
      std::string l;
      std::vector<uint8_t> value;
      rv = ReadMarker(s, h, &marker, &l, &value);
      if (IsSessionLost(rv)) {
        return rv;
      }
      const bool yes =
          rv == CKR_OK && marker && l == label && std::ranges::equal(value, id);
      if (yes) {
        rv = fn->C_DestroyObject(s, h);
        return rv == CKR_OBJECT_HANDLE_INVALID ? CKR_OK : rv;
      }
    }
    return CKR_OK;
  }

  // Makes a key object under a pending marker: the marker first, then
  // create() (which names its call in *what), and the marker goes again if
  // the object could not be made. After a lost session neither is certain,
  // so both stay for the next start's reconciliation.
  template <typename Create>
  CK_RV CreateMarked(CK_SESSION_HANDLE s, const daemon::KeyRef& ref,
                     std::span<const uint8_t> id, const char** what,
                     Create&& create) {
    *what = "C_CreateObject (pending marker)";
    CK_RV rv = CreateMarker(s, ref, id);
    if (rv != CKR_OK) {
      return rv;
    }
    {
      const Creation creation;
      rv = create();
    }
    if (rv != CKR_OK && !IsSessionLost(rv)) {
      (void)DestroyMarker(s, ref, id);
    }
    return rv;
  }

  // Removes key (ref, id)'s pending marker in a session of its own.
  Status Unmark(const daemon::KeyRef& ref, std::span<const uint8_t> id) {
    return Run([&](CK_SESSION_HANDLE s, const char** what) -> CK_RV {
      *what = "C_DestroyObject (pending marker)";
      return DestroyMarker(s, ref, id);
    });
  }

  void Forget(uint64_t key_id) {
    std::unique_lock lock(cache_mu);
    handles.erase(key_id);
  }

  void ForgetAllHandles() {
    std::unique_lock lock(cache_mu);
    handles.clear();
  }

  StatusOr<Blob> BlobOf(const KeyHandle& key) const {
    StatusOr<Blob> blob = DecodeBlob(key.blob);
    if (!blob.ok()) {
      return blob.status();
    }
    if (blob->serial != serial) {
      return BackendUnavailable(Where() + "key '" + key.ref.ToString() +
                                "' lives on token serial '" + blob->serial +
                                "', this backend uses '" + serial + "'");
    }
    return blob;
  }

  // Runs op(session, key object, &what, still_key) with the key's private
  // object; a stale cached handle is looked up again once, and so is one
  // whose number a new object took (StillKey), on a fresh session.
  template <typename F>
  Status WithKey(const KeyHandle& key, F&& op, bool fresh_lookup = false) {
    StatusOr<Blob> blob = BlobOf(key);
    if (!blob.ok()) {
      return blob.status();
    }
    Status st = Run([&](CK_SESSION_HANDLE s, const char** what) -> CK_RV {
      for (int i = 0; i < 2; ++i) {
        const HandleWatch watch;
        CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
        *what = "find key object";
        CK_RV rv =
            FindKey(s, key.id, *blob, key.ref, fresh_lookup || i == 1, &h);
        if (rv != CKR_OK) {
          return rv;
        }
        rv = op(s, h, what, StillKey{this, watch, &*blob, s, h});
        if (rv == kCkrWrongObject) {
          Forget(key.id);
          fresh_lookup = true;
          return rv;
        }
        if (!IsHandleStale(rv)) {
          return rv;
        }
        Forget(key.id);
      }
      return CKR_OBJECT_HANDLE_INVALID;
    });
    if (st.code() == Code::kNotFound) {
      return NotFound(Where() + "the token object of key '" +
                      key.ref.ToString() + "' is gone");
    }
    return st;
  }

  std::string LabelFor(const daemon::KeyRef& ref) const {
    return std::string(kLabelPrefix) + ref.ToString();
  }
  std::string PendingLabelFor(const daemon::KeyRef& ref) const {
    return std::string(kPendingPrefix) + ref.ToString();
  }

  StatusOr<std::vector<uint8_t>> NewId() const {
    std::vector<uint8_t> id(kIdSize);
    if (RAND_bytes(id.data(), static_cast<int>(id.size())) != 1) {
      return SslFail(Code::kInternal, "cannot draw a random CKA_ID");
    }
    return id;
  }

  // SPKI of the public key object pub of the given type.
  CK_RV PublicSpki(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE pub, v1::KeyType type,
                   std::vector<uint8_t>* out, Status* conv) {
    if (IsRsa(type)) {
      std::vector<uint8_t> n;
      std::vector<uint8_t> e;
      CK_RV rv = GetAttr(s, pub, CKA_MODULUS, &n);
      if (rv == CKR_OK) {
        rv = GetAttr(s, pub, CKA_PUBLIC_EXPONENT, &e);
      }
      if (rv != CKR_OK) {
        return rv;
      }
      StatusOr<std::vector<uint8_t>> spki = RsaSpki(n, e);
      if (!spki.ok()) {
        *conv = spki.status();
        return CKR_GENERAL_ERROR;
      }
      *out = std::move(*spki);
      return CKR_OK;
    }
    std::vector<uint8_t> point;
    const CK_RV rv = GetAttr(s, pub, CKA_EC_POINT, &point);
    if (rv != CKR_OK) {
      return rv;
    }
    const std::span<const uint8_t> raw = UnwrapEcPoint(point);
    SslPtr<EVP_PKEY> pkey;
    if (type == v1::ED25519) {
      pkey.reset(EVP_PKEY_new_raw_public_key_ex(nullptr, "ED25519", nullptr,
                                                raw.data(), raw.size()));
    } else {
      StatusOr<SslPtr<EVP_PKEY>> ec = EcPublicKey(GroupName(type), raw);
      if (ec.ok()) {
        pkey = std::move(*ec);
      }
    }
    if (pkey == nullptr) {
      *conv = SslFail(Code::kInternal, "token returned an invalid public key");
      return CKR_GENERAL_ERROR;
    }
    StatusOr<std::vector<uint8_t>> spki = SpkiOf(pkey.get());
    if (!spki.ok()) {
      *conv = spki.status();
      return CKR_GENERAL_ERROR;
    }
    *out = std::move(*spki);
    return CKR_OK;
  }

  // Finds the token, reads its mechanisms and opens (and logs in) the whole
  // session pool: a wrong PIN or a full token fails here, not at the first
  // request.
  Status Start() {
    KH_RETURN_IF_ERROR(FindSlot());
    CK_SLOT_ID s;
    {
      std::lock_guard lock(slot_mu);
      s = slot;
    }
    std::vector<CK_MECHANISM_TYPE> mechs;
    const CK_RV rv = ReadList(
        [this, s](CK_MECHANISM_TYPE* list, CK_ULONG* n) {
          return fn->C_GetMechanismList(s, list, n);
        },
        &mechs);
    if (rv != CKR_OK) {
      return P11Error(rv, Where() + "C_GetMechanismList");
    }
    mechanisms.insert(mechs.begin(), mechs.end());
    std::vector<Lease> leases;
    for (uint32_t i = 0; i < config.sessions; ++i) {
      StatusOr<Lease> lease = Acquire();
      if (!lease.ok()) {
        return lease.status();
      }
      leases.push_back(std::move(*lease));
    }
    return Status::Ok();
  }

  // A key row as Reconcile() got it, kept for a reconciliation that waits
  // for the token (its blob is only borrowed there).
  struct RecordedKey {
    uint64_t id = 0;
    daemon::KeyRef ref;
    v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
    std::vector<uint8_t> blob;
  };
  static std::vector<RecordedKey> Keep(std::span<const KeyHandle> keys) {
    std::vector<RecordedKey> out;
    out.reserve(keys.size());
    for (const KeyHandle& k : keys) {
      out.push_back({k.id, k.ref, k.type, {k.blob.begin(), k.blob.end()}});
    }
    return out;
  }
  static std::vector<KeyHandle> Handles(const std::vector<RecordedKey>& keys) {
    std::vector<KeyHandle> out;
    out.reserve(keys.size());
    for (const RecordedKey& k : keys) {
      out.push_back({k.id, k.ref, k.type, k.blob});
    }
    return out;
  }

  // Whether Start() has succeeded. A token absent when the daemon starts
  // leaves it false: every request first tries to start (EnsureReady), so
  // the backend comes up with the token instead of keeping the daemon down.
  std::atomic<bool> ready{false};
  // Why the last start attempt failed, for State() (which cannot take
  // ready_mu: held across module calls).
  mutable std::mutex start_error_mu;
  std::string start_error;  // guarded by start_error_mu
  std::mutex ready_mu;  // one start attempt at a time; guards the below
  bool reconcile_pending = false;
  std::vector<RecordedKey> pending_recorded;
  std::vector<RecordedKey> pending_others;

  Status EnsureReady() {
    if (ready.load(std::memory_order_acquire)) {
      return Status::Ok();
    }
    // Never queue behind a start attempt that the module may hold for long:
    // the others fail now, like requests that find every session busy.
    std::unique_lock lock(ready_mu, std::try_to_lock);
    if (!lock.owns_lock()) {
      return BackendUnavailable(Where() +
                                "another request is looking for the token; "
                                "retry");
    }
    if (ready.load(std::memory_order_relaxed)) {
      return Status::Ok();
    }
    if (Status st = Start(); !st.ok()) {
      std::lock_guard error(start_error_mu);
      start_error = st.message();
      return st;
    }
    if (reconcile_pending) {
      // Other requests may be creating keys by now (a second backend table
      // on this token that found it first), so a pending object may be one
      // being made: none is removed here, only at the next start.
      KH_RETURN_IF_ERROR(Reconcile(Handles(pending_recorded),
                                   Handles(pending_others),
                                   /*remove_pending=*/false));
      reconcile_pending = false;
      pending_recorded.clear();
      pending_others.clear();
    }
    ready.store(true, std::memory_order_release);
    Log().info("{}token serial '{}' found: {} sessions, {} mechanisms", Where(),
               serial, config.sessions, mechanisms.size());
    return Status::Ok();
  }

  Status Reconcile(std::span<const KeyHandle> recorded,
                   std::span<const KeyHandle> others, bool remove_pending);
};

// ---------------------------------------------------------------------------

P11Backend::P11Backend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
P11Backend::~P11Backend() = default;

StatusOr<std::unique_ptr<P11Backend>> P11Backend::Create(
    const P11Config& config) {
  auto impl = std::make_unique<Impl>();
  impl->config = config;
  const std::string where = impl->Where();
  if (std::find(config.allowed_modules.begin(), config.allowed_modules.end(),
                config.module) == config.allowed_modules.end()) {
    return PermissionDenied(where + "module '" + config.module +
                            "' is not in allowed_modules");
  }
  // p11-kit resolves a relative name in its own module directory, so only
  // an absolute path names the file the allow-list names.
  if (config.module.empty() || config.module.front() != '/') {
    return PermissionDenied(where + "module '" + config.module +
                            "' must be an absolute path");
  }
  struct stat st {};
  if (::stat(config.module.c_str(), &st) != 0) {
    return BackendUnavailable(where + "module '" + config.module +
                              "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return PermissionDenied(where + "module '" + config.module +
                            "' is not a regular file");
  }
  // Code loaded into the daemon: nobody but its owner may replace it.
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    return PermissionDenied(where + "module '" + config.module +
                            "' is writable by group or others");
  }
  // p11-kit loads the module (managed: it coordinates C_Initialize with other
  // users of the same module in this process).
  impl->fn = p11_kit_module_load(config.module.c_str(), 0);
  if (impl->fn == nullptr) {
    const char* msg = p11_kit_message();
    return BackendUnavailable(where + "cannot load module '" + config.module +
                              "': " + (msg != nullptr ? msg : "unknown"));
  }
  // Keep the module mapped until exit even after p11_kit_module_release():
  // some modules (SoftHSM2 among them) leave atexit handlers and threads
  // behind, and leak reports need its symbols.
  if (void* pin = ::dlopen(config.module.c_str(),
                           RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE)) {
    ::dlclose(pin);
  }
  CK_RV rv = p11_kit_module_initialize(impl->fn);
  if (rv != CKR_OK) {
    return P11Error(rv, where + "C_Initialize of '" + config.module + "'");
  }
  impl->initialized = true;
  Status started = impl->Start();
  if (!started.ok()) {
    impl->start_error = started.message();
    // A token that is not there (yet): unplugged, or its reader or daemon
    // not up. The other backends must not stay down with it, so the daemon
    // starts and each request for this backend looks for the token again.
    // Anything else (a refused PIN, a broken module) stops the start.
    if (started.code() != Code::kBackendUnavailable) {
      return started;
    }
    Log().error(
        "{}; starting without it: its keys fail with \"backend "
        "unavailable\" until it is there, and each request looks for it "
        "again",
        started.message());
    return std::unique_ptr<P11Backend>(new P11Backend(std::move(impl)));
  }
  impl->ready = true;
  Log().info(
      "{}token serial '{}' in {}: {} sessions, {} mechanisms{}", where,
      impl->serial, config.module, config.sessions, impl->mechanisms.size(),
      impl->mechanisms.contains(CKM_EDDSA) ? ", Ed25519" : ", no Ed25519");
  return std::unique_ptr<P11Backend>(new P11Backend(std::move(impl)));
}

StatusOr<std::unique_ptr<Backend>> CreateP11Backend(
    const std::string& settings_toml) {
  StatusOr<P11Config> config = ParseP11Config(settings_toml);
  if (!config.ok()) {
    return config.status();
  }
  StatusOr<std::unique_ptr<P11Backend>> made = P11Backend::Create(*config);
  if (!made.ok()) {
    return made.status();
  }
  return std::unique_ptr<Backend>(std::move(*made));
}

std::string_view P11Backend::Name() const { return impl_->config.name; }
const std::string& P11Backend::TokenSerial() const { return impl_->serial; }
bool P11Backend::SupportsEd25519() const {
  return impl_->ready.load(std::memory_order_acquire) &&
         impl_->mechanisms.contains(CKM_EDDSA) &&
         impl_->mechanisms.contains(CKM_EC_EDWARDS_KEY_PAIR_GEN);
}

StatusOr<CreatedKey> P11Backend::Generate(const daemon::KeyRef& ref,
                                          v1::KeyType type) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  CK_MECHANISM mech{};
  if (IsRsa(type)) {
    KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS_KEY_PAIR_GEN));
    mech.mechanism = CKM_RSA_PKCS_KEY_PAIR_GEN;
  } else if (IsEc(type)) {
    KH_RETURN_IF_ERROR(im.RequireMech(CKM_EC_KEY_PAIR_GEN));
    mech.mechanism = CKM_EC_KEY_PAIR_GEN;
  } else if (type == v1::ED25519) {
    if (!SupportsEd25519()) {
      return Unsupported(im.Where() +
                         "the token does not offer Ed25519 "
                         "(CKM_EC_EDWARDS_KEY_PAIR_GEN and CKM_EDDSA)");
    }
    mech.mechanism = CKM_EC_EDWARDS_KEY_PAIR_GEN;
  } else if (type == v1::KEY_TYPE_UNSPECIFIED) {
    return InvalidArgument("key type must be specified");
  } else {
    return Unsupported(im.Where() + "key type " +
                       std::string(KeyTypeName(type)) +
                       " is not supported by the PKCS#11 backend");
  }
  StatusOr<std::vector<uint8_t>> id = im.NewId();
  if (!id.ok()) {
    return id.status();
  }
  // Marked pending until the key store records it (Recorded()).
  const std::string label = im.LabelFor(ref);
  static constexpr uint8_t kF4[] = {0x01, 0x00, 0x01};

  Template pub;
  pub.Bool(CKA_TOKEN, false);  // the SPKI lives in the key store
  Template priv;
  AddPrivateKeyPolicy(priv, *id, label);
  if (IsRsa(type)) {
    pub.Ulong(CKA_MODULUS_BITS, RsaBits(type));
    pub.Bytes(CKA_PUBLIC_EXPONENT, kF4);
    pub.Bool(CKA_VERIFY, true);
    pub.Bool(CKA_ENCRYPT, true);
    priv.Bool(CKA_SIGN, true);
    priv.Bool(CKA_DECRYPT, true);
  } else {
    pub.Bytes(CKA_EC_PARAMS, EcParams(type));
    pub.Bool(CKA_VERIFY, true);
    priv.Bool(CKA_SIGN, true);
    if (IsEc(type)) {
      priv.Bool(CKA_DERIVE, true);
    }
  }
  CreatedKey out;
  out.type = type;
  Status conv;
  bool retry = false;
  Status st = im.Run([&](CK_SESSION_HANDLE s, const char** what) -> CK_RV {
    // A retry after a lost session may follow a pair the token did make:
    // a new CKA_ID (same buffer, which the template points at) keeps the
    // two apart; the first stays marked and goes at the next start.
    if (retry && !RedrawId(&*id)) {
      *what = "drawing a random CKA_ID";
      return CKR_FUNCTION_FAILED;
    }
    retry = true;
    CK_OBJECT_HANDLE hpub = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE hpriv = CK_INVALID_HANDLE;
    CK_RV rv = im.CreateMarked(s, ref, *id, what, [&] {
      *what = "C_GenerateKeyPair";
      const CK_RV made =
          im.fn->C_GenerateKeyPair(s, &mech, pub.Get(), pub.Count(), priv.Get(),
                                   priv.Count(), &hpub, &hpriv);
      if (made == CKR_OK) {
        Impl::ForgetObjectHandle(hpub);
        Impl::ForgetObjectHandle(hpriv);
      }
      return made;
    });
    if (rv != CKR_OK) {
      return rv;
    }
    *what = "reading the new public key";
    rv = im.PublicSpki(s, hpub, type, &out.public_key, &conv);
    im.fn->C_DestroyObject(s, hpub);
    if (rv != CKR_OK && !IsSessionLost(rv) &&
        im.fn->C_DestroyObject(s, hpriv) == CKR_OK) {
      (void)im.DestroyMarker(s, ref, *id);
    }
    return rv;
  });
  if (!conv.ok()) {
    return conv;
  }
  if (!st.ok()) {
    return st;
  }
  out.blob = EncodeBlob(im.serial, *id);
  return out;
}

StatusOr<CreatedKey> P11Backend::Import(const daemon::KeyRef& ref,
                                        const SecretBytes& private_key) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  SslPtr<EVP_PKEY> pkey =
      ParsePrivateKey(private_key.Expose(SecretAccess::kToken));
  if (pkey == nullptr) {
    return SslFail(Code::kInvalidArgument, "cannot parse private key");
  }
  ERR_clear_error();
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  Template t;
  std::vector<SecretBytes> parts;  // wiped when this function returns
  auto add = [&](StatusOr<SecretBytes> v) -> Status {
    if (!v.ok()) {
      return v.status();
    }
    parts.push_back(std::move(*v));
    return Status::Ok();
  };
  std::vector<std::pair<CK_ATTRIBUTE_TYPE, std::size_t>> refs;
  if (EVP_PKEY_is_a(pkey.get(), "RSA")) {
    switch (EVP_PKEY_get_bits(pkey.get())) {
      case 2048:
        type = v1::RSA_2048;
        break;
      case 3072:
        type = v1::RSA_3072;
        break;
      case 4096:
        type = v1::RSA_4096;
        break;
      default:
        return Unsupported("RSA keys must be 2048, 3072 or 4096 bits");
    }
    KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS));
    const std::pair<CK_ATTRIBUTE_TYPE, const char*> kRsa[] = {
        {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},
        {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
        {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},
        {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
        {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},
        {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
        {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2},
        {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1},
    };
    for (const auto& [attr, param] : kRsa) {
      KH_RETURN_IF_ERROR(add(BnParam(pkey.get(), param)));
      refs.emplace_back(attr, parts.size() - 1);
    }
    t.Ulong(CKA_KEY_TYPE, CKK_RSA);
    t.Bool(CKA_SIGN, true);
    t.Bool(CKA_DECRYPT, true);
  } else if (EVP_PKEY_is_a(pkey.get(), "EC")) {
    char group[80] = {};
    std::size_t group_len = 0;
    EVP_PKEY_get_group_name(pkey.get(), group, sizeof(group), &group_len);
    const std::string g = group;
    if (g == "prime256v1" || g == "P-256") {
      type = v1::EC_P256;
    } else if (g == "secp384r1" || g == "P-384") {
      type = v1::EC_P384;
    } else if (g == "secp521r1" || g == "P-521") {
      type = v1::EC_P521;
    } else {
      return SslFail(Code::kUnsupported,
                     "EC keys must be on P-256, P-384 or P-521");
    }
    KH_RETURN_IF_ERROR(im.RequireMech(CKM_ECDSA));
    KH_RETURN_IF_ERROR(
        add(BnParam(pkey.get(), OSSL_PKEY_PARAM_PRIV_KEY, FieldBytes(type))));
    refs.emplace_back(CKA_VALUE, parts.size() - 1);
    t.Ulong(CKA_KEY_TYPE, CKK_EC);
    t.Bytes(CKA_EC_PARAMS, EcParams(type));
    t.Bool(CKA_SIGN, true);
    t.Bool(CKA_DERIVE, true);
  } else if (EVP_PKEY_is_a(pkey.get(), "ED25519")) {
    type = v1::ED25519;
    if (!SupportsEd25519()) {
      return Unsupported(im.Where() + "the token does not offer Ed25519");
    }
    SecretBytes raw(32);
    std::size_t len = raw.size();
    if (EVP_PKEY_get_raw_private_key(pkey.get(), raw.data(SecretAccess::kToken),
                                     &len) != 1 ||
        len != 32) {
      return SslFail(Code::kInvalidArgument, "bad Ed25519 private key");
    }
    parts.push_back(std::move(raw));
    refs.emplace_back(CKA_VALUE, parts.size() - 1);
    t.Ulong(CKA_KEY_TYPE, CKK_EC_EDWARDS);
    t.Bytes(CKA_EC_PARAMS, EcParams(type));
    t.Bool(CKA_SIGN, true);
  } else {
    return Unsupported(im.Where() +
                       "only RSA, EC P-256/384/521 and Ed25519 keys can be "
                       "imported into a token");
  }
  for (const auto& [attr, idx] : refs) {
    t.Bytes(attr, parts[idx].Expose(SecretAccess::kToken));
  }
  StatusOr<std::vector<uint8_t>> spki = SpkiOf(pkey.get());
  if (!spki.ok()) {
    return spki.status();
  }
  pkey.reset();  // OpenSSL clears private key material on free
  StatusOr<std::vector<uint8_t>> id = im.NewId();
  if (!id.ok()) {
    return id.status();
  }
  const std::string label = im.LabelFor(ref);
  t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  AddPrivateKeyPolicy(t, *id, label);
  bool retry = false;
  Status st = im.Run([&](CK_SESSION_HANDLE s, const char** what) -> CK_RV {
    if (retry && !RedrawId(&*id)) {  // as in Generate
      *what = "drawing a random CKA_ID";
      return CKR_FUNCTION_FAILED;
    }
    retry = true;
    return im.CreateMarked(s, ref, *id, what, [&] {
      *what = "C_CreateObject";
      CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
      const CK_RV made = im.fn->C_CreateObject(s, t.Get(), t.Count(), &h);
      if (made == CKR_OK) {
        Impl::ForgetObjectHandle(h);
      }
      return made;
    });
  });
  if (!st.ok()) {
    return st;
  }
  CreatedKey out;
  out.type = type;
  out.public_key = std::move(*spki);
  out.blob = EncodeBlob(im.serial, *id);
  return out;
}

StatusOr<std::vector<uint8_t>> P11Backend::Sign(const KeyHandle& key,
                                                const SignParams& p,
                                                std::span<const uint8_t> data) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  const v1::KeyType type = key.type;
  CK_MECHANISM mech{};
  CK_RSA_PKCS_PSS_PARAMS pss{};
  std::vector<uint8_t> input;
  switch (p.algorithm) {
    case v1::RSA_PKCS1: {
      if (!IsRsa(type)) {
        return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                               " cannot sign with RSA-PKCS1");
      }
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS));
      mech.mechanism = CKM_RSA_PKCS;
      if (p.digest != v1::DIGEST_NONE) {
        KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
        const auto prefix = DigestInfoPrefix(p.digest);
        input.assign(prefix.begin(), prefix.end());
      } else if (data.size() + 11 > RsaBits(type) / 8) {
        return InvalidArgument("data is too long for PKCS#1 v1.5");
      }
      input.insert(input.end(), data.begin(), data.end());
      break;
    }
    case v1::RSA_PSS: {
      if (!IsRsa(type)) {
        return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                               " cannot sign with RSA-PSS");
      }
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS_PSS));
      KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
      const v1::Digest mgf =
          p.pss_mgf1_digest == v1::DIGEST_NONE ? p.digest : p.pss_mgf1_digest;
      if (MgfFor(mgf) == 0) {
        return InvalidArgument("bad RSA-PSS MGF1 digest");
      }
      const std::size_t em_len = (RsaBits(type) - 1 + 7) / 8;
      const std::size_t max_salt = em_len - DigestSize(p.digest) - 2;
      std::size_t salt = 0;
      if (p.pss_salt_length == -1) {
        salt = DigestSize(p.digest);
      } else if (p.pss_salt_length == -2) {
        salt = max_salt;
      } else if (p.pss_salt_length < 0 ||
                 static_cast<std::size_t>(p.pss_salt_length) > max_salt) {
        return InvalidArgument("RSA-PSS salt length " +
                               std::to_string(p.pss_salt_length) +
                               " is invalid for this key and digest (max " +
                               std::to_string(max_salt) + ")");
      } else {
        salt = static_cast<std::size_t>(p.pss_salt_length);
      }
      pss.hashAlg = HashMech(p.digest);
      pss.mgf = MgfFor(mgf);
      pss.sLen = salt;
      mech.mechanism = CKM_RSA_PKCS_PSS;
      mech.pParameter = &pss;
      mech.ulParameterLen = sizeof(pss);
      input.assign(data.begin(), data.end());
      break;
    }
    case v1::ECDSA: {
      if (!IsEc(type)) {
        return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                               " cannot sign with ECDSA");
      }
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_ECDSA));
      if (p.digest != v1::DIGEST_NONE) {
        KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
      }
      if (data.empty() || data.size() > 64) {
        return InvalidArgument("ECDSA input must be a digest of 1 to 64 bytes");
      }
      mech.mechanism = CKM_ECDSA;
      input.assign(data.begin(), data.end());
      break;
    }
    case v1::ED25519_PURE: {
      if (type != v1::ED25519) {
        return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                               " cannot sign with Ed25519");
      }
      if (p.digest != v1::DIGEST_NONE) {
        return InvalidArgument(
            "Ed25519 signs the whole message; digest must be none");
      }
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_EDDSA));
      mech.mechanism = CKM_EDDSA;
      input.assign(data.begin(), data.end());
      break;
    }
    default:
      return InvalidArgument("unknown sign algorithm");
  }
  std::vector<uint8_t> sig(kMaxOutput);
  CK_ULONG sig_len = 0;
  Status st = im.WithKey(
      key,
      [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, const char** what,
          const Impl::StillKey& still_key) -> CK_RV {
        *what = "C_SignInit";
        CK_RV rv = InitRv(im.fn->C_SignInit(s, &mech, h));
        if (rv != CKR_OK) {
          return rv;
        }
        if (const CK_RV bound = still_key(); bound != CKR_OK) {
          return bound;
        }
        *what = "C_Sign";
        sig_len = sig.size();
        return im.fn->C_Sign(s, input.data(), input.size(), sig.data(),
                             &sig_len);
      });
  if (!st.ok()) {
    return st;
  }
  // The module's length is checked before anything reads the buffer: never
  // more than it was given, and exactly what the mechanism produces (RSA:
  // the modulus size; ECDSA: r || s, each the curve's field size; Ed25519:
  // 64 bytes), so a faulty module cannot make us return garbage.
  std::size_t expected = 0;
  if (IsRsa(type)) {
    expected = RsaBits(type) / 8;
  } else if (p.algorithm == v1::ECDSA) {
    expected = 2 * FieldBytes(type);
  } else {
    expected = 64;
  }
  if (sig_len > sig.size() || sig_len != expected) {
    return Internal(im.Where() + "C_Sign: the module returned a " +
                    std::to_string(sig_len) + "-byte signature where " +
                    std::to_string(expected) +
                    " bytes are expected (faulty PKCS#11 module)");
  }
  sig.resize(sig_len);
  if (p.algorithm != v1::ECDSA) {
    return sig;
  }
  // PKCS#11 gives r || s (checked above: even, 2 x field size); the
  // protocol answers a DER ECDSA-Sig-Value.
  const int half = static_cast<int>(sig.size() / 2);
  ECDSA_SIG* es = ECDSA_SIG_new();
  BIGNUM* r = BN_bin2bn(sig.data(), half, nullptr);
  BIGNUM* sv = BN_bin2bn(sig.data() + half, half, nullptr);
  if (es == nullptr || r == nullptr || sv == nullptr ||
      ECDSA_SIG_set0(es, r, sv) != 1) {
    BN_free(r);
    BN_free(sv);
    ECDSA_SIG_free(es);
    return SslFail(Code::kInternal, "cannot encode ECDSA signature");
  }
  const int der_len = i2d_ECDSA_SIG(es, nullptr);
  std::vector<uint8_t> der(der_len > 0 ? static_cast<std::size_t>(der_len) : 0);
  unsigned char* q = der.data();
  const bool ok = der_len > 0 && i2d_ECDSA_SIG(es, &q) == der_len;
  ECDSA_SIG_free(es);
  if (!ok) {
    return SslFail(Code::kInternal, "cannot encode ECDSA signature");
  }
  return der;
}

StatusOr<SecretBytes> P11Backend::Decrypt(const KeyHandle& key,
                                          const DecryptParams& p,
                                          std::span<const uint8_t> ciphertext) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  if (!IsRsa(key.type)) {
    return InvalidArgument("key type " + std::string(KeyTypeName(key.type)) +
                           " cannot decrypt");
  }
  const std::size_t key_bytes = RsaBits(key.type) / 8;
  if (ciphertext.empty() || ciphertext.size() > key_bytes) {
    return InvalidArgument(
        "ciphertext must be 1 to " + std::to_string(key_bytes) +
        " bytes for this key, got " + std::to_string(ciphertext.size()));
  }
  CK_MECHANISM mech{};
  CK_RSA_PKCS_OAEP_PARAMS oaep{};
  std::vector<uint8_t> label(p.oaep_label.begin(), p.oaep_label.end());
  switch (p.algorithm) {
    case v1::RSA_OAEP: {
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS_OAEP));
      const v1::Digest d =
          p.oaep_digest == v1::DIGEST_NONE ? v1::SHA1 : p.oaep_digest;
      const v1::Digest mgf =
          p.oaep_mgf1_digest == v1::DIGEST_NONE ? d : p.oaep_mgf1_digest;
      if (HashMech(d) == 0 || MgfFor(mgf) == 0) {
        return InvalidArgument("bad RSA-OAEP digest");
      }
      oaep.hashAlg = HashMech(d);
      oaep.mgf = MgfFor(mgf);
      oaep.source = CKZ_DATA_SPECIFIED;
      oaep.pSourceData = label.empty() ? nullptr : label.data();
      oaep.ulSourceDataLen = label.size();
      mech.mechanism = CKM_RSA_PKCS_OAEP;
      mech.pParameter = &oaep;
      mech.ulParameterLen = sizeof(oaep);
      break;
    }
    case v1::RSA_PKCS1_V15:
      if (!label.empty()) {
        return InvalidArgument("a label is only valid with RSA-OAEP");
      }
      KH_RETURN_IF_ERROR(im.RequireMech(CKM_RSA_PKCS));
      mech.mechanism = CKM_RSA_PKCS;
      break;
    case v1::RSA_TLS_PREMASTER:
      // A token's CKM_RSA_PKCS reports bad padding as an error, which would
      // make this a padding oracle; the implicit-rejection answer the
      // protocol promises cannot be built on top of it.
      return Unsupported(im.Where() +
                         "TLS premaster decryption is not offered by HSM keys "
                         "(the token would be a padding oracle)");
    default:
      return InvalidArgument("unknown decrypt algorithm");
  }
  SecretBytes out(kMaxOutput);
  CK_ULONG out_len = 0;
  bool bad_input = false;
  Status st = im.WithKey(
      key,
      [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, const char** what,
          const Impl::StillKey& still_key) -> CK_RV {
        *what = "C_DecryptInit";
        CK_RV rv = InitRv(im.fn->C_DecryptInit(s, &mech, h));
        if (rv != CKR_OK) {
          return rv;
        }
        if (const CK_RV bound = still_key(); bound != CKR_OK) {
          return bound;
        }
        *what = "C_Decrypt";
        out_len = out.size();
        rv = im.fn->C_Decrypt(s, const_cast<uint8_t*>(ciphertext.data()),
                              ciphertext.size(), out.data(SecretAccess::kToken),
                              &out_len);
        // Tokens disagree on how a bad padding is reported (SoftHSM2 says
        // CKR_GENERAL_ERROR): every failure of C_Decrypt itself that is not a
        // lost session or key is one answer, "decryption failed".
        if (rv != CKR_OK && !IsSessionLost(rv) && !IsHandleStale(rv) &&
            rv != CKR_HOST_MEMORY && rv != CKR_DEVICE_MEMORY) {
          bad_input = true;
          return CKR_OK;
        }
        return rv;
      });
  if (bad_input) {
    // No detail: the reason for a padding failure is an oracle.
    return InvalidArgument("decryption failed");
  }
  if (!st.ok()) {
    return st;
  }
  if (out_len > out.size() || out_len > key_bytes) {
    return Internal(im.Where() + "C_Decrypt: the module returned " +
                    std::to_string(out_len) + " bytes of plaintext for a " +
                    std::to_string(key_bytes) +
                    "-byte key (faulty PKCS#11 module)");
  }
  out.resize(out_len);
  return out;
}

StatusOr<SecretBytes> P11Backend::Derive(const KeyHandle& key,
                                         std::span<const uint8_t> peer) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  if (!IsEc(key.type)) {
    return InvalidArgument("key type " + std::string(KeyTypeName(key.type)) +
                           " cannot derive" +
                           (key.type == v1::X25519 ? " on this backend" : ""));
  }
  KH_RETURN_IF_ERROR(im.RequireMech(CKM_ECDH1_DERIVE));
  if (peer.empty() || peer.size() > 4096) {
    return InvalidArgument("peer public key is empty or too large");
  }
  const char* group = GroupName(key.type);
  SslPtr<EVP_PKEY> pk;
  if (peer[0] == 0x02 || peer[0] == 0x03 || peer[0] == 0x04) {
    StatusOr<SslPtr<EVP_PKEY>> ec = EcPublicKey(group, peer);
    if (!ec.ok()) {
      return InvalidArgument("peer public key is not a point on curve " +
                             std::string(KeyTypeName(key.type)));
    }
    pk = std::move(*ec);
  } else {
    const unsigned char* q = peer.data();
    pk.reset(d2i_PUBKEY(nullptr, &q, static_cast<long>(peer.size())));
    char name[80] = {};
    std::size_t name_len = 0;
    if (pk == nullptr || q != peer.data() + peer.size() ||
        !EVP_PKEY_is_a(pk.get(), "EC") ||
        EVP_PKEY_get_group_name(pk.get(), name, sizeof(name), &name_len) != 1 ||
        (std::string(name) != group && OBJ_sn2nid(name) != OBJ_txt2nid(group) &&
         EC_curve_nist2nid(group) != OBJ_sn2nid(name))) {
      return SslFail(Code::kInvalidArgument,
                     "peer public key does not match key type " +
                         std::string(KeyTypeName(key.type)));
    }
  }
  SslPtr<EVP_PKEY_CTX> check(
      EVP_PKEY_CTX_new_from_pkey(nullptr, pk.get(), nullptr));
  if (check == nullptr || EVP_PKEY_public_check(check.get()) != 1 ||
      EVP_PKEY_set_utf8_string_param(pk.get(),
                                     OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
                                     "uncompressed") != 1) {
    return SslFail(Code::kInvalidArgument, "invalid peer public key");
  }
  std::vector<uint8_t> point(2 * FieldBytes(key.type) + 1);
  std::size_t point_len = 0;
  if (EVP_PKEY_get_octet_string_param(
          pk.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, point.data(),
          point.size(), &point_len) != 1 ||
      point_len != point.size()) {
    return SslFail(Code::kInvalidArgument, "invalid peer public key");
  }
  CK_ECDH1_DERIVE_PARAMS params{};
  params.kdf = CKD_NULL;
  params.pPublicData = point.data();
  params.ulPublicDataLen = point.size();
  CK_MECHANISM mech{CKM_ECDH1_DERIVE, &params, sizeof(params)};
  Template t;
  t.Ulong(CKA_CLASS, CKO_SECRET_KEY);
  t.Ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
  t.Bool(CKA_TOKEN, false);
  t.Bool(CKA_SENSITIVE, false);
  t.Bool(CKA_EXTRACTABLE, true);
  t.Ulong(CKA_VALUE_LEN, FieldBytes(key.type));
  SecretBytes secret(FieldBytes(key.type));
  Status st = im.WithKey(
      key,
      [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, const char** what,
          const Impl::StillKey& still_key) -> CK_RV {
        CK_OBJECT_HANDLE derived = CK_INVALID_HANDLE;
        *what = "C_DeriveKey";
        CK_RV rv = CKR_OK;
        {
          const Impl::Creation creation;
          rv = im.fn->C_DeriveKey(s, &mech, h, t.Get(), t.Count(), &derived);
          if (rv == CKR_OK) {
            Impl::ForgetObjectHandle(derived);
          }
        }
        if (rv != CKR_OK) {
          return rv;
        }
        if (const CK_RV bound = still_key(/*own=*/1); bound != CKR_OK) {
          im.fn->C_DestroyObject(s, derived);
          return bound;
        }
        CK_ATTRIBUTE a{CKA_VALUE, secret.data(SecretAccess::kToken),
                       secret.size()};
        *what = "reading the shared secret";
        rv = im.fn->C_GetAttributeValue(s, derived, &a, 1);
        im.fn->C_DestroyObject(s, derived);
        if (rv == CKR_OK && a.ulValueLen != secret.size()) {
          // A length other than the field size (larger than the buffer, or
          // CK_UNAVAILABLE_INFORMATION) is never read past.
          rv = kCkrBadModuleOutput;
        }
        return rv;
      });
  if (!st.ok()) {
    return st;
  }
  return secret;
}

Status P11Backend::Destroy(const KeyHandle& key) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  // A fresh search, not a cached handle, and checked again if an object
  // was being made meanwhile: never destroy another object that took a
  // stale handle's number.
  Status st = im.WithKey(
      key,
      [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE h, const char** what,
          const Impl::StillKey& still_key) -> CK_RV {
        if (const CK_RV bound = still_key(); bound != CKR_OK) {
          return bound;
        }
        *what = "C_DestroyObject";
        return im.fn->C_DestroyObject(s, h);
      },
      /*fresh_lookup=*/true);
  im.Forget(key.id);
  if (st.code() == Code::kNotFound) {
    st = Status::Ok();  // already gone: the goal is reached
  }
  if (!st.ok()) {
    return st;  // a marker stays, so the next start removes the object
  }
  // The marker goes last (Generate's if the store refused the key,
  // Retire's after a delete).
  StatusOr<Blob> blob = im.BlobOf(key);
  if (!blob.ok()) {
    return blob.status();
  }
  return im.Unmark(key.ref, blob->id);
}

unsigned P11Backend::MaxBlockingCalls() const { return impl_->config.sessions; }

std::string P11Backend::State() const {
  const Impl& im = *impl_;
  if (im.ready.load(std::memory_order_acquire)) {
    return "ready (token serial '" + im.serial + "')";
  }
  std::lock_guard lock(im.start_error_mu);
  return "token not found yet: " + im.start_error;
}

std::string P11Backend::CallsInProgress() const {
  const Impl& im = *impl_;
  std::lock_guard lock(im.pool_mu);
  const std::size_t busy =
      im.open - std::min<std::size_t>(im.open, im.idle.size());
  if (busy == 0) {
    return {};
  }
  std::string out = im.Where() + std::to_string(busy) + " of " +
                    std::to_string(im.config.sessions) +
                    " token sessions in a module call";
  if (im.full_since) {
    const auto held = std::chrono::duration_cast<std::chrono::seconds>(
        std::chrono::steady_clock::now() - *im.full_since);
    out += ", all of them for " + std::to_string(held.count()) + " s";
  }
  return out;
}

void P11Backend::Recorded(const KeyHandle& key) {
  Impl& im = *impl_;
  StatusOr<Blob> blob = im.BlobOf(key);
  Status st = blob.ok() ? im.EnsureReady() : blob.status();
  if (st.ok()) {
    st = im.Unmark(key.ref, blob->id);
  }
  if (!st.ok()) {
    Log().warn(
        "{}key '{}' is recorded but its pending marker is still on the token "
        "({}); the next start removes the marker",
        im.Where(), key.ref.ToString(), st.message());
  }
}

Status P11Backend::Retire(const KeyHandle& key) {
  Impl& im = *impl_;
  KH_RETURN_IF_ERROR(im.EnsureReady());
  StatusOr<Blob> blob = im.BlobOf(key);
  if (!blob.ok()) {
    return blob.status();
  }
  // Only a key whose object is there gets a marker: nothing else is left
  // to remove.
  Status st = im.WithKey(
      key,
      [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE, const char** what,
          const Impl::StillKey&) -> CK_RV {
        *what = "C_CreateObject (pending marker)";
        return im.CreateMarker(s, key.ref, blob->id);
      },
      /*fresh_lookup=*/true);
  if (st.code() == Code::kNotFound) {
    return Status::Ok();
  }
  return st;
}

Status P11Backend::Reconcile(std::span<const KeyHandle> recorded,
                             std::span<const KeyHandle> others) {
  Impl& im = *impl_;
  if (!im.ready.load(std::memory_order_acquire)) {
    // The token was not there at start: reconciled when it is found.
    std::lock_guard lock(im.ready_mu);
    im.pending_recorded = Impl::Keep(recorded);
    im.pending_others = Impl::Keep(others);
    im.reconcile_pending = true;
    return Status::Ok();
  }
  return im.Reconcile(recorded, others, /*remove_pending=*/true);
}

Status P11Backend::Impl::Reconcile(std::span<const KeyHandle> recorded,
                                   std::span<const KeyHandle> others,
                                   bool remove_pending) {
  Impl& im = *this;
  // This backend's keys (reported when their object is gone), and every
  // CKA_ID on this token that any row records, with that row's reference.
  std::map<std::vector<uint8_t>, const KeyHandle*> wanted;
  std::map<std::vector<uint8_t>, const KeyHandle*> known;
  // Markers are only touched at a start no request can run beside (a
  // marker may belong to a key being made or deleted right now), and
  // unrecorded keys only removed when the recorded set is also complete: a
  // blob this daemon cannot read (say, from a newer version) means the list
  // may miss live keys.
  const bool clear_markers = remove_pending;
  bool may_delete = remove_pending;
  for (const KeyHandle& k : recorded) {
    StatusOr<Blob> blob = DecodeBlob(k.blob);
    if (!blob.ok()) {
      Log().error("{}key '{}': {}", im.Where(), k.ref.ToString(),
                  blob.status().message());
      may_delete = false;
      continue;
    }
    if (blob->serial != im.serial) {
      Log().error("{}key '{}' lives on token serial '{}', not on '{}'",
                  im.Where(), k.ref.ToString(), blob->serial, im.serial);
      continue;
    }
    wanted.emplace(blob->id, &k);
    known.emplace(blob->id, &k);
  }
  for (const KeyHandle& k : others) {
    StatusOr<Blob> blob = DecodeBlob(k.blob);
    if (blob.ok() && blob->serial == im.serial) {
      known.emplace(blob->id, &k);  // another backend table on this token
    }
  }
  std::size_t removed = 0;
  std::size_t missing = 0;
  std::size_t cleared = 0;
  Status st = im.Run([&](CK_SESSION_HANDLE s, const char** what) -> CK_RV {
    removed = missing = cleared = 0;
    // The pending markers: (CKA_ID, the reference their label names).
    struct Marker {
      CK_OBJECT_HANDLE h;
      std::vector<uint8_t> id;
      std::string ref;
      bool keep = false;  // its key object could not be removed
    };
    std::vector<Marker> markers;
    Template dt;
    dt.Ulong(CKA_CLASS, CKO_DATA);
    dt.Bool(CKA_TOKEN, true);
    std::vector<CK_OBJECT_HANDLE> found;
    *what = "listing token data objects";
    CK_RV rv = im.FindObjects(s, dt, &found);
    if (rv != CKR_OK) {
      return rv;
    }
    for (CK_OBJECT_HANDLE h : found) {
      bool is_marker = false;
      std::string label;
      std::vector<uint8_t> id;
      rv = im.ReadMarker(s, h, &is_marker, &label, &id);
      if (IsSessionLost(rv)) {
        return rv;
      }
      if (rv == CKR_OK && is_marker) {  // else not ours: never touched
        markers.push_back(
            {h, std::move(id), label.substr(kPendingPrefix.size())});
      }
    }
    auto marked = [&](std::span<const uint8_t> id, std::string_view ref) {
      return std::ranges::find_if(markers, [&](const Marker& m) {
        return std::ranges::equal(m.id, id) && m.ref == ref;
      });
    };

    Template t;
    t.Ulong(CKA_CLASS, CKO_PRIVATE_KEY);
    t.Bool(CKA_TOKEN, true);
    *what = "listing token keys";
    found.clear();
    rv = im.FindObjects(s, t, &found);
    if (rv != CKR_OK) {
      return rv;
    }
    std::set<std::vector<uint8_t>> present;
    for (CK_OBJECT_HANDLE h : found) {
      std::vector<uint8_t> label;
      std::vector<uint8_t> id;
      if (im.GetAttr(s, h, CKA_LABEL, &label) != CKR_OK ||
          im.GetAttr(s, h, CKA_ID, &id) != CKR_OK) {
        continue;
      }
      const std::string_view l(reinterpret_cast<const char*>(label.data()),
                               label.size());
      // Labelled pending itself: made by a keyhold from before markers.
      const bool old_pending = l.starts_with(kPendingPrefix);
      if ((!old_pending && !l.starts_with(kLabelPrefix)) ||
          id.size() != kIdSize) {
        continue;  // not ours: never touched
      }
      if (known.contains(id)) {
        present.insert(id);
        continue;  // recorded: never removed, never changed
      }
      const std::string_view ref =
          l.substr(old_pending ? kPendingPrefix.size() : kLabelPrefix.size());
      const auto marker = marked(id, ref);
      const bool pending = old_pending || marker != markers.end();
      if (!pending || !may_delete) {
        // Unmarked and recorded nowhere: a key store restored from an older
        // backup, or another keyhold on this token. Never removed. Marked
        // ones wait for a start that may remove them.
        Log().warn(
            "{}token key '{}' (id {}) is not recorded in the key store; "
            "left in place{}",
            im.Where(), std::string(l), HexEncode(id),
            pending ? " until the next start" : "");
        if (marker != markers.end()) {
          marker->keep = true;
        }
        continue;
      }
      // Marked pending and recorded nowhere: a crash (or a failed insert)
      // between creation and the store's commit, or between a row's
      // deletion and the object's.
      *what = "C_DestroyObject";
      rv = im.fn->C_DestroyObject(s, h);
      if (rv != CKR_OK) {
        return rv;
      }
      ++removed;
      Log().warn("{}removed unrecorded pending token key '{}' (id {})",
                 im.Where(), std::string(l), HexEncode(id));
    }
    if (clear_markers) {
      // Recorded keys' markers (a crash right after the store's commit, or
      // before a delete removed the row), and those whose key is gone.
      for (const Marker& m : markers) {
        if (m.keep || (!known.contains(m.id) && !may_delete)) {
          continue;
        }
        *what = "C_DestroyObject (pending marker)";
        rv = im.fn->C_DestroyObject(s, m.h);
        if (rv != CKR_OK) {
          return rv;
        }
        ++cleared;
      }
    }
    for (const auto& [id, k] : wanted) {
      if (!present.contains(id)) {
        ++missing;
        Log().error(
            "{}key '{}' is recorded but its token object (id {}) is gone; "
            "the key store row is kept",
            im.Where(), k->ref.ToString(), HexEncode(id));
      }
    }
    return CKR_OK;
  });
  if (!st.ok()) {
    return st;
  }
  im.ForgetAllHandles();
  Log().info(
      "{}reconciled: {} recorded, {} missing, {} unrecorded pending removed, "
      "{} pending markers removed",
      im.Where(), wanted.size(), missing, removed, cleared);
  return Status::Ok();
}

}  // namespace keyhold::backend::pkcs11
