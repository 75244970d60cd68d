#include "daemon/backends/software/software_backend.h"

#include <fcntl.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/decoder.h>
#include <openssl/encoder.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/obj_mac.h>
#include <openssl/objects.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/key_types.h"
#include "common/private_file.h"
#include "common/ssl_ptr.h"

namespace keyhold::backend::software {
namespace {

constexpr std::size_t kMasterKeySize = 32;
constexpr uint8_t kBlobVersion = 0x01;
constexpr std::size_t kNonceSize = 12;
constexpr std::size_t kTagSize = 16;
constexpr std::size_t kBlobOverhead = 1 + kNonceSize + kTagSize;
constexpr std::string_view kAadPrefix = "keyhold-sw-v1:";
// Upper bound on decoded keys held in memory; beyond it an arbitrary entry is
// evicted (it is re-decoded from its blob on next use).
constexpr std::size_t kMaxCachedKeys = 4096;
constexpr std::string_view kBlobAuthFailed = "key blob failed authentication";

// ---------------------------------------------------------------------------
// Errors

// The one place an OpenSSL failure becomes a Status. The error queue is always
// drained, so a failure cannot surface later in an unrelated call on this
// thread. with_detail appends OpenSSL's reason string (never key material);
// callers pass false where the reason could act as an oracle (decryption).
Status SslError(Code code, std::string message, bool with_detail = true) {
  if (with_detail) {
    const unsigned long err = ERR_peek_last_error();
    const char* reason = err != 0 ? ERR_reason_error_string(err) : nullptr;
    if (reason != nullptr) {
      message += " (";
      message += reason;
      message += ")";
    }
  }
  ERR_clear_error();
  return Status(code, std::move(message));
}

// ---------------------------------------------------------------------------
// Small helpers

std::string_view SignAlgorithmName(v1::SignAlgorithm a) {
  switch (a) {
    case v1::RSA_PKCS1:
      return "RSA-PKCS1";
    case v1::RSA_PSS:
      return "RSA-PSS";
    case v1::ECDSA:
      return "ECDSA";
    case v1::ED25519_PURE:
      return "Ed25519";
    default:
      return "unknown";
  }
}

// Digest that must be a real one (not NONE); what names the parameter.
StatusOr<const EVP_MD*> RequireDigest(v1::Digest d, std::string_view what) {
  const EVP_MD* md = DigestMd(d);
  if (md == nullptr) {
    return InvalidArgument(std::string(what) + " must be one of sha1, " +
                           "sha224, sha256, sha384, sha512");
  }
  return md;
}

// The key's NID of its named curve, or NID_undef.
int CurveNid(const EVP_PKEY* pkey) {
  char name[80] = {};
  std::size_t len = 0;
  if (EVP_PKEY_get_group_name(pkey, name, sizeof(name), &len) != 1) {
    ERR_clear_error();
    return NID_undef;
  }
  return OBJ_sn2nid(name);
}

// Which of our key types pkey is; kUnsupported for everything else.
StatusOr<v1::KeyType> DetectKeyType(const EVP_PKEY* pkey) {
  if (EVP_PKEY_is_a(pkey, "RSA")) {
    switch (EVP_PKEY_get_bits(pkey)) {
      case 2048:
        return v1::RSA_2048;
      case 3072:
        return v1::RSA_3072;
      case 4096:
        return v1::RSA_4096;
      default:
        return Unsupported("RSA keys must be 2048, 3072 or 4096 bits, not " +
                           std::to_string(EVP_PKEY_get_bits(pkey)));
    }
  }
  if (EVP_PKEY_is_a(pkey, "EC")) {
    switch (CurveNid(pkey)) {
      case NID_X9_62_prime256v1:
        return v1::EC_P256;
      case NID_secp384r1:
        return v1::EC_P384;
      case NID_secp521r1:
        return v1::EC_P521;
      default:
        return Unsupported("EC keys must be on P-256, P-384 or P-521");
    }
  }
  if (EVP_PKEY_is_a(pkey, "ED25519")) {
    return v1::ED25519;
  }
  if (EVP_PKEY_is_a(pkey, "X25519")) {
    return v1::X25519;
  }
  const char* name = EVP_PKEY_get0_type_name(pkey);
  return Unsupported(std::string("unsupported key algorithm ") +
                     (name != nullptr ? name : "(unknown)"));
}

StatusOr<std::vector<uint8_t>> PublicKeyDer(EVP_PKEY* pkey) {
  const int len = i2d_PUBKEY(pkey, nullptr);
  if (len <= 0) {
    return SslError(Code::kInternal, "cannot encode public key");
  }
  std::vector<uint8_t> out(static_cast<std::size_t>(len));
  unsigned char* p = out.data();
  if (i2d_PUBKEY(pkey, &p) != len) {
    return SslError(Code::kInternal, "cannot encode public key");
  }
  return out;
}

// PKCS#8 PrivateKeyInfo DER of pkey; the encoder's buffer is wiped.
StatusOr<SecretBytes> PrivateKeyPkcs8(const EVP_PKEY* pkey) {
  OSSL_ENCODER_CTX* raw = OSSL_ENCODER_CTX_new_for_pkey(
      pkey, EVP_PKEY_KEYPAIR, "DER", "PrivateKeyInfo", nullptr);
  std::unique_ptr<OSSL_ENCODER_CTX, decltype(&OSSL_ENCODER_CTX_free)> ctx(
      raw, &OSSL_ENCODER_CTX_free);
  if (ctx == nullptr || OSSL_ENCODER_CTX_get_num_encoders(ctx.get()) == 0) {
    return SslError(Code::kInternal, "no PKCS#8 encoder for key");
  }
  unsigned char* der = nullptr;
  std::size_t der_len = 0;
  if (OSSL_ENCODER_to_data(ctx.get(), &der, &der_len) != 1) {
    return SslError(Code::kInternal, "cannot encode private key");
  }
  SecretBytes out(std::span<const uint8_t>(der, der_len));
  OPENSSL_clear_free(der, der_len);
  return out;
}

// Refuses passphrases, so an encrypted key fails instead of prompting on the
// daemon's terminal.
int NoPassphrase(char*, std::size_t, std::size_t*, const OSSL_PARAM[], void*) {
  return 0;
}
int NoPemPassword(char*, int, int, void*) { return -1; }

// Decodes a DER private key. structure is "PrivateKeyInfo" for our own
// blobs, nullptr to accept any (PKCS#8 or type-specific) for imports.
SslPtr<EVP_PKEY> DecodeDerPrivateKey(std::span<const uint8_t> der,
                                     const char* structure) {
  EVP_PKEY* pkey = nullptr;
  OSSL_DECODER_CTX* raw = OSSL_DECODER_CTX_new_for_pkey(
      &pkey, "DER", structure, nullptr, EVP_PKEY_KEYPAIR, nullptr, nullptr);
  std::unique_ptr<OSSL_DECODER_CTX, decltype(&OSSL_DECODER_CTX_free)> ctx(
      raw, &OSSL_DECODER_CTX_free);
  if (ctx == nullptr || OSSL_DECODER_CTX_set_passphrase_cb(
                            ctx.get(), &NoPassphrase, nullptr) != 1) {
    EVP_PKEY_free(pkey);
    return nullptr;
  }
  const unsigned char* p = der.data();
  std::size_t len = der.size();
  if (OSSL_DECODER_from_data(ctx.get(), &p, &len) != 1) {
    EVP_PKEY_free(pkey);
    return nullptr;
  }
  return SslPtr<EVP_PKEY>(pkey);
}

SslPtr<EVP_PKEY> ParsePrivateKey(std::span<const uint8_t> data) {
  if (data.empty() || data.size() > static_cast<std::size_t>(INT_MAX)) {
    return nullptr;
  }
  // Every DER private key (PKCS#8, PKCS#1, SEC1) is a SEQUENCE.
  if (data[0] == 0x30) {
    return DecodeDerPrivateKey(data, nullptr);
  }
  // Read-only memory BIO over the caller's buffer: no plaintext copy here.
  // PEM_read_bio_PrivateKey skips unrelated blocks ("EC PARAMETERS") and
  // accepts PKCS#8 and traditional ("RSA/EC PRIVATE KEY") armour.
  SslPtr<BIO> bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())));
  if (bio == nullptr) {
    return nullptr;
  }
  return SslPtr<EVP_PKEY>(
      PEM_read_bio_PrivateKey(bio.get(), nullptr, &NoPemPassword, nullptr));
}

// ---------------------------------------------------------------------------
// Blob sealing: version | nonce | AES-256-GCM(PKCS#8) | tag

std::string AssociatedData(const daemon::KeyRef& ref) {
  return std::string(kAadPrefix) + ref.ToString();
}

StatusOr<std::vector<uint8_t>> SealBlob(const SecretBytes& master_key,
                                        const daemon::KeyRef& ref,
                                        const SecretBytes& plaintext) {
  const std::string aad = AssociatedData(ref);
  if (plaintext.size() > static_cast<std::size_t>(INT_MAX) - kBlobOverhead ||
      aad.size() > static_cast<std::size_t>(INT_MAX)) {
    return Internal("key too large to seal");
  }
  std::vector<uint8_t> blob(kBlobOverhead + plaintext.size());
  blob[0] = kBlobVersion;
  uint8_t* nonce = blob.data() + 1;
  uint8_t* ct = nonce + kNonceSize;
  uint8_t* tag = ct + plaintext.size();
  if (RAND_bytes(nonce, static_cast<int>(kNonceSize)) != 1) {
    return SslError(Code::kInternal, "cannot draw a random nonce");
  }
  SslPtr<EVP_CIPHER_CTX> ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  const auto pt = plaintext.Expose(SecretAccess::kToken);
  if (ctx == nullptr ||
      EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr,
                         nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(kNonceSize), nullptr) != 1 ||
      EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr,
                         master_key.Expose(SecretAccess::kToken).data(),
                         nonce) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &len,
                        reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), ct, &len, pt.data(),
                        static_cast<int>(pt.size())) != 1 ||
      static_cast<std::size_t>(len) != pt.size() ||
      EVP_EncryptFinal_ex(ctx.get(), ct + len, &len) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG,
                          static_cast<int>(kTagSize), tag) != 1) {
    return SslError(Code::kInternal, "cannot seal key blob");
  }
  return blob;
}

StatusOr<SecretBytes> OpenBlob(const SecretBytes& master_key,
                               const daemon::KeyRef& ref,
                               std::span<const uint8_t> blob) {
  if (blob.size() <= kBlobOverhead ||
      blob.size() > static_cast<std::size_t>(INT_MAX)) {
    return Internal(std::string(kBlobAuthFailed) + " (bad length)");
  }
  if (blob[0] != kBlobVersion) {
    return Internal(std::string(kBlobAuthFailed) + " (unknown version)");
  }
  const std::string aad = AssociatedData(ref);
  const uint8_t* nonce = blob.data() + 1;
  const uint8_t* ct = nonce + kNonceSize;
  const std::size_t ct_len = blob.size() - kBlobOverhead;
  // The tag argument of EVP_CTRL_GCM_SET_TAG is not const in the API; copy it.
  uint8_t tag[kTagSize];
  std::memcpy(tag, ct + ct_len, kTagSize);

  SecretBytes plaintext(ct_len);
  SslPtr<EVP_CIPHER_CTX> ctx(EVP_CIPHER_CTX_new());
  int len = 0;
  if (ctx == nullptr ||
      EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr,
                         nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN,
                          static_cast<int>(kNonceSize), nullptr) != 1 ||
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr,
                         master_key.Expose(SecretAccess::kToken).data(),
                         nonce) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &len,
                        reinterpret_cast<const unsigned char*>(aad.data()),
                        static_cast<int>(aad.size())) != 1) {
    return SslError(Code::kInternal, "cannot open key blob");
  }
  uint8_t* out = plaintext.data(SecretAccess::kToken);
  if (EVP_DecryptUpdate(ctx.get(), out, &len, ct, static_cast<int>(ct_len)) !=
          1 ||
      static_cast<std::size_t>(len) != ct_len ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG,
                          static_cast<int>(kTagSize), tag) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), out + len, &len) != 1) {
    // Plaintext of a failed open is wiped by SecretBytes on return.
    return SslError(Code::kInternal, std::string(kBlobAuthFailed),
                    /*with_detail=*/false);
  }
  return plaintext;
}

// ---------------------------------------------------------------------------
// Master key file

Status MasterKeyError(const std::filesystem::path& path,
                      std::string_view reason) {
  return Internal("master key file '" + path.string() +
                  "': " + std::string(reason));
}

Status MasterKeyErrno(const std::filesystem::path& path, std::string_view what,
                      int err) {
  return MasterKeyError(path, std::string(what) + ": " + std::strerror(err));
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) {
      ::close(fd_);
    }
  }
  int get() const { return fd_; }
  // close() with its error reported (it can carry a delayed write error).
  int Close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd);
  }

 private:
  int fd_;
};

StatusOr<SecretBytes> ReadMasterKey(const std::filesystem::path& path,
                                    const Fd& fd) {
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return MasterKeyErrno(path, "cannot stat", errno);
  }
  if (!S_ISREG(st.st_mode)) {
    return MasterKeyError(path, "not a regular file");
  }
  if (st.st_uid != ::geteuid()) {
    return MasterKeyError(path, "is owned by uid " + std::to_string(st.st_uid) +
                                    ", not by keyholdd's uid " +
                                    std::to_string(::geteuid()));
  }
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o",
                  static_cast<unsigned>(st.st_mode & 07777));
    return MasterKeyError(path, std::string("mode ") + mode +
                                    " gives access to group or others "
                                    "(must be 0600 or stricter)");
  }
  if (st.st_size != static_cast<off_t>(kMasterKeySize)) {
    return MasterKeyError(path, "size is " + std::to_string(st.st_size) +
                                    " bytes, must be exactly " +
                                    std::to_string(kMasterKeySize));
  }
  // One byte of slack detects a file that grew between fstat and read.
  SecretBytes key(kMasterKeySize + 1);
  std::size_t got = 0;
  while (got < key.size()) {
    const ssize_t n = ::read(fd.get(), key.data(SecretAccess::kToken) + got,
                             key.size() - got);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      return MasterKeyErrno(path, "cannot read", errno);
    }
    if (n == 0) {
      break;
    }
    got += static_cast<std::size_t>(n);
  }
  if (got != kMasterKeySize) {
    return MasterKeyError(path, "read " + std::to_string(got) +
                                    " bytes, must be exactly " +
                                    std::to_string(kMasterKeySize));
  }
  key.resize(kMasterKeySize);
  return key;
}

// Writes a fresh key to a file that does not exist yet. Returns kAlreadyExists
// (not an error for the caller) if another process created it first.
StatusOr<SecretBytes> CreateMasterKey(const std::filesystem::path& path) {
  Fd fd(::open(path.c_str(),
               O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (fd.get() < 0) {
    if (errno == EEXIST) {
      return AlreadyExists("master key file exists");
    }
    return MasterKeyErrno(path, "cannot create", errno);
  }
  SecretBytes key(kMasterKeySize);
  Status status;
  if (RAND_bytes(key.data(SecretAccess::kToken),
                 static_cast<int>(kMasterKeySize)) != 1) {
    status = SslError(Code::kInternal, "master key file '" + path.string() +
                                           "': cannot draw random bytes");
  }
  // A restrictive umask must not leave the daemon unable to read it back.
  if (status.ok() && ::fchmod(fd.get(), 0600) != 0) {
    status = MasterKeyErrno(path, "cannot chmod", errno);
  }
  std::size_t written = 0;
  while (status.ok() && written < kMasterKeySize) {
    const ssize_t n =
        ::write(fd.get(), key.Expose(SecretAccess::kToken).data() + written,
                kMasterKeySize - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      status = MasterKeyErrno(path, "cannot write", n < 0 ? errno : EIO);
      break;
    }
    written += static_cast<std::size_t>(n);
  }
  if (status.ok() && ::fsync(fd.get()) != 0) {
    status = MasterKeyErrno(path, "cannot fsync", errno);
  }
  if (status.ok() && fd.Close() != 0) {
    status = MasterKeyErrno(path, "cannot close", errno);
  }
  if (!status.ok()) {
    // Never leave a short or unsynced key behind for the next start to load.
    ::unlink(path.c_str());
    return status;
  }
  KH_RETURN_IF_ERROR(FsyncDirectoryOf(path));
  return key;
}

StatusOr<SecretBytes> LoadOrCreateMasterKey(const std::filesystem::path& path) {
  // Two rounds: if the file appears between our failed open and our create
  // (another daemon instance), load what the other one wrote.
  for (int attempt = 0; attempt < 2; ++attempt) {
    // O_NONBLOCK: a FIFO in place of the file must not hang the daemon.
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
    if (fd.get() >= 0) {
      return ReadMasterKey(path, fd);
    }
    if (errno != ENOENT) {
      return MasterKeyErrno(path, "cannot open", errno);
    }
    StatusOr<SecretBytes> created = CreateMasterKey(path);
    if (created.ok() || created.status().code() != Code::kAlreadyExists) {
      return created;
    }
  }
  return MasterKeyError(
      path, "cannot be opened yet exists (dangling symbolic link?)");
}

// ---------------------------------------------------------------------------
// Key generation

StatusOr<SslPtr<EVP_PKEY>> GenerateKey(v1::KeyType type) {
  const char* algorithm = nullptr;
  unsigned int rsa_bits = 0;
  const char* group = nullptr;
  switch (type) {
    case v1::RSA_2048:
      algorithm = "RSA";
      rsa_bits = 2048;
      break;
    case v1::RSA_3072:
      algorithm = "RSA";
      rsa_bits = 3072;
      break;
    case v1::RSA_4096:
      algorithm = "RSA";
      rsa_bits = 4096;
      break;
    case v1::EC_P256:
      algorithm = "EC";
      group = "P-256";
      break;
    case v1::EC_P384:
      algorithm = "EC";
      group = "P-384";
      break;
    case v1::EC_P521:
      algorithm = "EC";
      group = "P-521";
      break;
    case v1::ED25519:
      algorithm = "ED25519";
      break;
    case v1::X25519:
      algorithm = "X25519";
      break;
    case v1::KEY_TYPE_UNSPECIFIED:
      return InvalidArgument("key type must be specified");
    default:
      return Unsupported("unsupported key type " +
                         std::to_string(static_cast<int>(type)));
  }
  SslPtr<EVP_PKEY_CTX> ctx(
      EVP_PKEY_CTX_new_from_name(nullptr, algorithm, nullptr));
  if (ctx == nullptr || EVP_PKEY_keygen_init(ctx.get()) != 1) {
    return SslError(Code::kInternal, "cannot set up key generation");
  }
  if (rsa_bits != 0) {
    SslPtr<BIGNUM> e(BN_new());
    if (e == nullptr || BN_set_word(e.get(), RSA_F4) != 1 ||
        EVP_PKEY_CTX_set_rsa_keygen_bits(ctx.get(),
                                         static_cast<int>(rsa_bits)) != 1 ||
        EVP_PKEY_CTX_set1_rsa_keygen_pubexp(ctx.get(), e.get()) != 1) {
      return SslError(Code::kInternal, "cannot set RSA key parameters");
    }
  }
  if (group != nullptr && EVP_PKEY_CTX_set_group_name(ctx.get(), group) != 1) {
    return SslError(Code::kInternal, "cannot set EC curve");
  }
  EVP_PKEY* pkey = nullptr;
  if (EVP_PKEY_keygen(ctx.get(), &pkey) != 1) {
    return SslError(Code::kInternal, "key generation failed");
  }
  return SslPtr<EVP_PKEY>(pkey);
}

// ---------------------------------------------------------------------------
// Operations on a decoded key

std::shared_ptr<EVP_PKEY> Share(SslPtr<EVP_PKEY> pkey) {
  return std::shared_ptr<EVP_PKEY>(pkey.release(), &EVP_PKEY_free);
}

Status CannotSign(v1::KeyType type, v1::SignAlgorithm algorithm) {
  return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                         " cannot sign with " +
                         std::string(SignAlgorithmName(algorithm)));
}

Status CheckDigestLength(v1::Digest digest, std::span<const uint8_t> data) {
  if (data.size() != DigestSize(digest)) {
    return InvalidArgument("data must be a " + std::string(DigestName(digest)) +
                           " digest of " + std::to_string(DigestSize(digest)) +
                           " bytes, got " + std::to_string(data.size()));
  }
  return Status::Ok();
}

StatusOr<std::vector<uint8_t>> PkeySign(EVP_PKEY_CTX* ctx, EVP_PKEY* pkey,
                                        std::span<const uint8_t> data) {
  std::size_t sig_len = static_cast<std::size_t>(EVP_PKEY_get_size(pkey));
  std::vector<uint8_t> sig(sig_len);
  if (EVP_PKEY_sign(ctx, sig.data(), &sig_len, data.data(), data.size()) != 1) {
    return SslError(Code::kInternal, "signing failed");
  }
  sig.resize(sig_len);
  return sig;
}

// Initialised signing contexts of one key, one per set of signature
// parameters, from which each signature gets a copy.
//
// Setting up a context (EVP_PKEY_CTX_new_from_pkey, EVP_PKEY_sign_init and
// the parameter setters, which fetch the digests by name) costs OpenSSL 3
// about 16,000 instructions for ECDSA and 40,000 for RSA-PSS, measured with
// callgrind: a third of an ECDSA P-256 signature. EVP_PKEY_CTX_dup of a
// ready context costs about 1,000. A copy per signature keeps contexts
// unshared between threads; the templates themselves are only read (by
// EVP_PKEY_CTX_dup, under mu) after they are stored, and live as long as the
// cached key, so a destroyed or evicted key takes them with it.
class SignTemplates {
 public:
  // Signs data with a copy of the template `id`, made by `fresh` on first use.
  template <typename MakeCtx>
  StatusOr<std::vector<uint8_t>> Sign(EVP_PKEY* pkey, uint64_t id,
                                      MakeCtx&& fresh,
                                      std::span<const uint8_t> data) {
    SslPtr<EVP_PKEY_CTX> ctx = Copy(id);
    if (ctx == nullptr) {
      StatusOr<SslPtr<EVP_PKEY_CTX>> made = fresh();
      if (!made.ok()) {
        return made.status();
      }
      ctx = std::move(*made);
      Keep(id, ctx.get());
    }
    return PkeySign(ctx.get(), pkey, data);
  }

 private:
  // Enough for every parameter set one client uses; a client cycling through
  // more (PSS salt lengths) still works, it just sets up contexts afresh.
  static constexpr std::size_t kMaxTemplates = 8;

  SslPtr<EVP_PKEY_CTX> Copy(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [tid, tmpl] : templates_) {
      if (tid == id) {
        SslPtr<EVP_PKEY_CTX> copy(EVP_PKEY_CTX_dup(tmpl.get()));
        if (copy == nullptr) {
          ERR_clear_error();  // set up afresh instead
        }
        return copy;
      }
    }
    return nullptr;
  }

  void Keep(uint64_t id, EVP_PKEY_CTX* ctx) {
    // Copied before its first use, so the template never held a signature
    // operation's state.
    SslPtr<EVP_PKEY_CTX> copy(EVP_PKEY_CTX_dup(ctx));
    if (copy == nullptr) {
      ERR_clear_error();
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (templates_.size() >= kMaxTemplates) {
      return;
    }
    for (const auto& entry : templates_) {
      if (entry.first == id) {
        return;  // another thread stored it first
      }
    }
    templates_.emplace_back(id, std::move(copy));
  }

  std::mutex mu_;
  std::vector<std::pair<uint64_t, SslPtr<EVP_PKEY_CTX>>> templates_;
};

// Names one set of signature parameters for SignTemplates.
uint64_t TemplateId(v1::SignAlgorithm algorithm, v1::Digest digest,
                    v1::Digest mgf1, int salt) {
  return (static_cast<uint64_t>(static_cast<uint8_t>(algorithm)) << 56) |
         (static_cast<uint64_t>(static_cast<uint8_t>(digest)) << 48) |
         (static_cast<uint64_t>(static_cast<uint8_t>(mgf1)) << 40) |
         static_cast<uint64_t>(static_cast<uint32_t>(salt));
}

StatusOr<std::vector<uint8_t>> SignRsa(EVP_PKEY* pkey, SignTemplates& templates,
                                       const SignParams& p,
                                       std::span<const uint8_t> data) {
  const std::size_t key_bytes =
      static_cast<std::size_t>(EVP_PKEY_get_size(pkey));
  const EVP_MD* md = nullptr;
  const EVP_MD* mgf1 = nullptr;
  int salt = 0;
  if (p.algorithm == v1::RSA_PKCS1) {
    if (p.digest == v1::DIGEST_NONE) {
      // Raw PKCS#1 v1.5 type-1 padding of data (the caller built DigestInfo).
      if (data.size() + 11 > key_bytes) {
        return InvalidArgument("data of " + std::to_string(data.size()) +
                               " bytes is too long for PKCS#1 v1.5 with a " +
                               std::to_string(key_bytes) + "-byte key");
      }
    } else {
      StatusOr<const EVP_MD*> m = RequireDigest(p.digest, "digest");
      if (!m.ok()) {
        return m.status();
      }
      md = *m;
      KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
    }
  } else {  // RSA_PSS
    StatusOr<const EVP_MD*> m = RequireDigest(p.digest, "RSA-PSS digest");
    if (!m.ok()) {
      return m.status();
    }
    md = *m;
    KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
    if (p.pss_mgf1_digest == v1::DIGEST_NONE) {
      mgf1 = md;
    } else {
      StatusOr<const EVP_MD*> g =
          RequireDigest(p.pss_mgf1_digest, "RSA-PSS MGF1 digest");
      if (!g.ok()) {
        return g.status();
      }
      mgf1 = *g;
    }
    // RFC 8017 9.1.1: emLen >= hLen + sLen + 2, emLen = ceil((modBits-1)/8).
    const std::size_t em_len =
        (static_cast<std::size_t>(EVP_PKEY_get_bits(pkey)) - 1 + 7) / 8;
    const std::size_t h_len = DigestSize(p.digest);
    const std::size_t max_salt = em_len - h_len - 2;
    if (p.pss_salt_length == -1) {
      salt = RSA_PSS_SALTLEN_DIGEST;
    } else if (p.pss_salt_length == -2) {
      salt = RSA_PSS_SALTLEN_MAX;
    } else if (p.pss_salt_length < 0) {
      return InvalidArgument(
          "RSA-PSS salt length must be >= 0, -1 (digest length) or -2 (max)");
    } else if (static_cast<std::size_t>(p.pss_salt_length) > max_salt) {
      return InvalidArgument("RSA-PSS salt length " +
                             std::to_string(p.pss_salt_length) +
                             " is too long for this key and digest (max " +
                             std::to_string(max_salt) + ")");
    } else {
      salt = p.pss_salt_length;
    }
  }

  return templates.Sign(
      pkey, TemplateId(p.algorithm, p.digest, p.pss_mgf1_digest, salt),
      [&]() -> StatusOr<SslPtr<EVP_PKEY_CTX>> {
        SslPtr<EVP_PKEY_CTX> ctx(
            EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
        if (ctx == nullptr || EVP_PKEY_sign_init(ctx.get()) != 1) {
          return SslError(Code::kInternal, "cannot set up RSA signing");
        }
        const int padding = p.algorithm == v1::RSA_PSS ? RSA_PKCS1_PSS_PADDING
                                                       : RSA_PKCS1_PADDING;
        if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), padding) != 1 ||
            (md != nullptr &&
             EVP_PKEY_CTX_set_signature_md(ctx.get(), md) != 1)) {
          return SslError(Code::kInternal,
                          "cannot set RSA signature parameters");
        }
        if (p.algorithm == v1::RSA_PSS &&
            (EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), mgf1) != 1 ||
             EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), salt) != 1)) {
          return SslError(Code::kInternal, "cannot set RSA-PSS parameters");
        }
        return ctx;
      },
      data);
}

StatusOr<std::vector<uint8_t>> SignEcdsa(EVP_PKEY* pkey,
                                         SignTemplates& templates,
                                         const SignParams& p,
                                         std::span<const uint8_t> data) {
  if (p.digest != v1::DIGEST_NONE) {
    StatusOr<const EVP_MD*> m = RequireDigest(p.digest, "digest");
    if (!m.ok()) {
      return m.status();
    }
    KH_RETURN_IF_ERROR(CheckDigestLength(p.digest, data));
  }
  if (data.empty() || data.size() > EVP_MAX_MD_SIZE) {
    return InvalidArgument("ECDSA input must be a digest of 1 to " +
                           std::to_string(EVP_MAX_MD_SIZE) + " bytes");
  }
  // No signature md: OpenSSL signs the caller's digest as given, so one
  // context serves every digest.
  return templates.Sign(
      pkey, TemplateId(v1::ECDSA, v1::DIGEST_NONE, v1::DIGEST_NONE, 0),
      [&]() -> StatusOr<SslPtr<EVP_PKEY_CTX>> {
        SslPtr<EVP_PKEY_CTX> ctx(
            EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
        if (ctx == nullptr || EVP_PKEY_sign_init(ctx.get()) != 1) {
          return SslError(Code::kInternal, "cannot set up ECDSA signing");
        }
        return ctx;
      },
      data);
}

StatusOr<std::vector<uint8_t>> SignEd25519(EVP_PKEY* pkey, const SignParams& p,
                                           std::span<const uint8_t> data) {
  if (p.digest != v1::DIGEST_NONE) {
    return InvalidArgument(
        "Ed25519 signs the whole message; digest must be none");
  }
  SslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  if (ctx == nullptr ||
      EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, pkey) != 1) {
    return SslError(Code::kInternal, "cannot set up Ed25519 signing");
  }
  std::size_t sig_len = static_cast<std::size_t>(EVP_PKEY_get_size(pkey));
  std::vector<uint8_t> sig(sig_len);
  if (EVP_DigestSign(ctx.get(), sig.data(), &sig_len, data.data(),
                     data.size()) != 1) {
    return SslError(Code::kInternal, "signing failed");
  }
  sig.resize(sig_len);
  return sig;
}

// TLS 1.2 RSA key transport. The default provider's TLS padding mode checks
// the PKCS#1 v1.5 padding and the premaster's version in constant time and
// returns 48 random bytes when either is wrong, so this answers every
// well-sized ciphertext with 48 bytes and the same status: the TLS handshake
// then fails at Finished, as RFC 5246 7.4.7.1 requires, and the caller
// learns nothing about the padding.
StatusOr<SecretBytes> DecryptTlsPremaster(EVP_PKEY* pkey,
                                          const DecryptParams& p,
                                          std::span<const uint8_t> ciphertext) {
  constexpr std::size_t kPremasterSize = 48;
  if (p.tls_client_version < 0x0300 || p.tls_client_version > 0x03ff ||
      (p.tls_negotiated_version != 0 && (p.tls_negotiated_version < 0x0300 ||
                                         p.tls_negotiated_version > 0x03ff))) {
    return InvalidArgument("TLS premaster decryption needs a TLS version");
  }
  if (ciphertext.size() != static_cast<std::size_t>(EVP_PKEY_get_size(pkey))) {
    return InvalidArgument(
        "a TLS premaster ciphertext is exactly the key size");
  }
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  if (ctx == nullptr || EVP_PKEY_decrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_WITH_TLS_PADDING) !=
          1) {
    return SslError(Code::kInternal, "cannot set up TLS premaster decryption");
  }
  unsigned int client_version = p.tls_client_version;
  unsigned int negotiated_version = p.tls_negotiated_version;
  OSSL_PARAM params[3];
  OSSL_PARAM* q = params;
  *q++ = OSSL_PARAM_construct_uint(OSSL_ASYM_CIPHER_PARAM_TLS_CLIENT_VERSION,
                                   &client_version);
  if (negotiated_version != 0) {
    *q++ = OSSL_PARAM_construct_uint(
        OSSL_ASYM_CIPHER_PARAM_TLS_NEGOTIATED_VERSION, &negotiated_version);
  }
  *q = OSSL_PARAM_construct_end();
  if (EVP_PKEY_CTX_set_params(ctx.get(), params) != 1) {
    return SslError(Code::kInternal, "cannot set TLS versions");
  }
  SecretBytes out(kPremasterSize);
  std::size_t out_len = out.size();
  if (EVP_PKEY_decrypt(ctx.get(), out.data(SecretAccess::kToken), &out_len,
                       ciphertext.data(), ciphertext.size()) != 1 ||
      out_len != kPremasterSize) {
    // Only a ciphertext not below the modulus gets here: public knowledge.
    return SslError(Code::kInvalidArgument, "decryption failed",
                    /*with_detail=*/false);
  }
  return out;
}

StatusOr<SecretBytes> DecryptRsa(EVP_PKEY* pkey, const DecryptParams& p,
                                 std::span<const uint8_t> ciphertext) {
  const std::size_t key_bytes =
      static_cast<std::size_t>(EVP_PKEY_get_size(pkey));
  // Shorter input is accepted as OpenSSL does (a leading zero stripped).
  if (ciphertext.empty() || ciphertext.size() > key_bytes) {
    return InvalidArgument(
        "ciphertext must be 1 to " + std::to_string(key_bytes) +
        " bytes for this key, got " + std::to_string(ciphertext.size()));
  }
  const EVP_MD* oaep_md = nullptr;
  const EVP_MD* mgf1 = nullptr;
  if (p.algorithm == v1::RSA_OAEP) {
    if (p.oaep_digest == v1::DIGEST_NONE) {
      oaep_md = EVP_sha1();
    } else {
      StatusOr<const EVP_MD*> m = RequireDigest(p.oaep_digest, "OAEP digest");
      if (!m.ok()) {
        return m.status();
      }
      oaep_md = *m;
    }
    if (p.oaep_mgf1_digest == v1::DIGEST_NONE) {
      mgf1 = oaep_md;
    } else {
      StatusOr<const EVP_MD*> m =
          RequireDigest(p.oaep_mgf1_digest, "OAEP MGF1 digest");
      if (!m.ok()) {
        return m.status();
      }
      mgf1 = *m;
    }
    if (p.oaep_label.size() > static_cast<std::size_t>(INT_MAX)) {
      return InvalidArgument("OAEP label too long");
    }
  } else if (p.algorithm != v1::RSA_PKCS1_V15 &&
             p.algorithm != v1::RSA_TLS_PREMASTER) {
    return InvalidArgument("unknown decrypt algorithm");
  } else if (!p.oaep_label.empty()) {
    return InvalidArgument("a label is only valid with RSA-OAEP");
  }
  if (p.algorithm == v1::RSA_TLS_PREMASTER) {
    return DecryptTlsPremaster(pkey, p, ciphertext);
  }

  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  if (ctx == nullptr || EVP_PKEY_decrypt_init(ctx.get()) != 1) {
    return SslError(Code::kInternal, "cannot set up RSA decryption");
  }
  if (p.algorithm == v1::RSA_OAEP) {
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
        EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), oaep_md) != 1 ||
        EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), mgf1) != 1) {
      return SslError(Code::kInternal, "cannot set RSA-OAEP parameters");
    }
    if (!p.oaep_label.empty()) {
      // set0 takes ownership of an OPENSSL_malloc'd buffer on success only.
      void* label = OPENSSL_memdup(p.oaep_label.data(), p.oaep_label.size());
      if (label == nullptr) {
        return SslError(Code::kInternal, "out of memory");
      }
      if (EVP_PKEY_CTX_set0_rsa_oaep_label(
              ctx.get(), label, static_cast<int>(p.oaep_label.size())) != 1) {
        OPENSSL_free(label);
        return SslError(Code::kInternal, "cannot set RSA-OAEP label");
      }
    }
  } else if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING) != 1) {
    return SslError(Code::kInternal, "cannot set RSA PKCS#1 v1.5 padding");
  }
  SecretBytes out(key_bytes);
  std::size_t out_len = out.size();
  if (EVP_PKEY_decrypt(ctx.get(), out.data(SecretAccess::kToken), &out_len,
                       ciphertext.data(), ciphertext.size()) != 1) {
    // No detail: the reason for a padding failure is an oracle.
    return SslError(Code::kInvalidArgument, "decryption failed",
                    /*with_detail=*/false);
  }
  out.resize(out_len);
  return out;
}

// The peer's public key for a derive with pkey of our type.
StatusOr<SslPtr<EVP_PKEY>> ParsePeer(EVP_PKEY* pkey, v1::KeyType type,
                                     std::span<const uint8_t> peer) {
  if (peer.empty() || peer.size() > static_cast<std::size_t>(INT_MAX)) {
    return InvalidArgument("peer public key is empty or too large");
  }
  SslPtr<EVP_PKEY> out;
  if (type == v1::X25519 && peer.size() == 32) {
    out.reset(EVP_PKEY_new_raw_public_key_ex(nullptr, "X25519", nullptr,
                                             peer.data(), peer.size()));
    if (out == nullptr) {
      return SslError(Code::kInvalidArgument,
                      "cannot parse raw X25519 peer public key");
    }
  } else if (IsEc(type) &&
             (peer[0] == 0x02 || peer[0] == 0x03 || peer[0] == 0x04)) {
    // A SEC1 point on our curve (SPKI always starts with 0x30).
    char group[80] = {};
    std::size_t group_len = 0;
    if (EVP_PKEY_get_group_name(pkey, group, sizeof(group), &group_len) != 1) {
      return SslError(Code::kInternal, "cannot read key curve");
    }
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0),
        OSSL_PARAM_construct_octet_string(
            OSSL_PKEY_PARAM_PUB_KEY,
            const_cast<uint8_t*>(peer.data()),  // read only by fromdata
            peer.size()),
        OSSL_PARAM_construct_end(),
    };
    SslPtr<EVP_PKEY_CTX> ctx(
        EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr));
    EVP_PKEY* raw = nullptr;
    if (ctx == nullptr || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
        EVP_PKEY_fromdata(ctx.get(), &raw, EVP_PKEY_PUBLIC_KEY, params) != 1) {
      return SslError(Code::kInvalidArgument,
                      "peer public key is not a point on curve " +
                          std::string(KeyTypeName(type)));
    }
    out.reset(raw);
  } else {
    const unsigned char* p = peer.data();
    out.reset(d2i_PUBKEY(nullptr, &p, static_cast<long>(peer.size())));
    if (out == nullptr) {
      return SslError(Code::kInvalidArgument,
                      "cannot parse peer public key (expected DER "
                      "SubjectPublicKeyInfo or the raw public encoding)");
    }
    if (p != peer.data() + peer.size()) {
      return InvalidArgument("trailing bytes after peer public key");
    }
  }
  // Same algorithm and, for EC, same curve as ours.
  StatusOr<v1::KeyType> peer_type = DetectKeyType(out.get());
  if (!peer_type.ok() || *peer_type != type) {
    return InvalidArgument("peer public key does not match key type " +
                           std::string(KeyTypeName(type)));
  }
  return out;
}

struct CachedKey {
  std::shared_ptr<EVP_PKEY> pkey;
  std::shared_ptr<SignTemplates> templates;
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  daemon::KeyRef ref;
  // The blob this entry was decoded from (ciphertext, not secret). A hit
  // requires the same blob, so the cache can never answer for a blob that
  // would not itself decrypt to this key.
  std::vector<uint8_t> blob;
};

struct LoadedKey {
  std::shared_ptr<EVP_PKEY> pkey;
  std::shared_ptr<SignTemplates> templates;
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
};

}  // namespace

StatusOr<SecretBytes> LoadOrCreateMasterKeyFile(
    const std::filesystem::path& path) {
  return LoadOrCreateMasterKey(path);
}

StatusOr<SecretBytes> ReadMasterKeyFile(const std::filesystem::path& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (fd.get() < 0) {
    return MasterKeyErrno(path, "cannot open", errno);
  }
  return ReadMasterKey(path, fd);
}

// ---------------------------------------------------------------------------

struct SoftwareBackend::Impl {
  std::string name;
  SecretBytes master_key;

  std::shared_mutex mu;
  std::unordered_map<uint64_t, CachedKey> cache;  // guarded by mu

  StatusOr<CreatedKey> Seal(const daemon::KeyRef& ref, EVP_PKEY* pkey,
                            v1::KeyType type) {
    StatusOr<SecretBytes> der = PrivateKeyPkcs8(pkey);
    if (!der.ok()) {
      return der.status();
    }
    StatusOr<std::vector<uint8_t>> blob = SealBlob(master_key, ref, *der);
    if (!blob.ok()) {
      return blob.status();
    }
    StatusOr<std::vector<uint8_t>> pub = PublicKeyDer(pkey);
    if (!pub.ok()) {
      return pub.status();
    }
    CreatedKey out;
    out.type = type;
    out.public_key = std::move(*pub);
    out.blob = std::move(*blob);
    return out;
  }

  // The decoded key for a handle: from the cache, or decrypted, decoded and
  // cached.
  StatusOr<LoadedKey> Load(const KeyHandle& key) {
    {
      std::shared_lock lock(mu);
      auto it = cache.find(key.id);
      if (it != cache.end() && it->second.ref == key.ref &&
          it->second.type == key.type &&
          std::equal(it->second.blob.begin(), it->second.blob.end(),
                     key.blob.begin(), key.blob.end())) {
        return LoadedKey{it->second.pkey, it->second.templates,
                         it->second.type};
      }
    }
    StatusOr<SecretBytes> der = OpenBlob(master_key, key.ref, key.blob);
    if (!der.ok()) {
      return der.status();
    }
    SslPtr<EVP_PKEY> pkey = DecodeDerPrivateKey(
        der->Expose(SecretAccess::kToken), "PrivateKeyInfo");
    if (pkey == nullptr) {
      return SslError(Code::kInternal, "key blob holds no valid private key");
    }
    StatusOr<v1::KeyType> type = DetectKeyType(pkey.get());
    if (!type.ok() || *type != key.type) {
      ERR_clear_error();
      return Internal("key blob does not hold a key of type " +
                      std::string(KeyTypeName(key.type)));
    }
    CachedKey entry;
    entry.pkey = Share(std::move(pkey));
    entry.templates = std::make_shared<SignTemplates>();
    entry.type = *type;
    entry.ref = key.ref;
    entry.blob.assign(key.blob.begin(), key.blob.end());
    LoadedKey loaded{entry.pkey, entry.templates, entry.type};

    std::unique_lock lock(mu);
    if (cache.size() >= kMaxCachedKeys && cache.find(key.id) == cache.end()) {
      cache.erase(cache.begin());
    }
    cache.insert_or_assign(key.id, std::move(entry));
    return loaded;
  }
};

SoftwareBackend::SoftwareBackend(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

SoftwareBackend::~SoftwareBackend() = default;

StatusOr<std::unique_ptr<SoftwareBackend>> SoftwareBackend::Create(
    std::string name, const std::filesystem::path& master_key_path) {
  StatusOr<SecretBytes> master_key = LoadOrCreateMasterKey(master_key_path);
  if (!master_key.ok()) {
    return master_key.status();
  }
  return Create(std::move(name), std::move(*master_key));
}

StatusOr<std::unique_ptr<SoftwareBackend>> SoftwareBackend::Create(
    std::string name, SecretBytes master_key) {
  if (master_key.size() != kMasterKeySize) {
    return InvalidArgument("the master key must be " +
                           std::to_string(kMasterKeySize) + " bytes");
  }
  auto impl = std::make_unique<Impl>();
  impl->name = std::move(name);
  impl->master_key = std::move(master_key);
  return std::unique_ptr<SoftwareBackend>(new SoftwareBackend(std::move(impl)));
}

std::string_view SoftwareBackend::Name() const { return impl_->name; }

StatusOr<CreatedKey> SoftwareBackend::Generate(const daemon::KeyRef& ref,
                                               v1::KeyType type) {
  StatusOr<SslPtr<EVP_PKEY>> pkey = GenerateKey(type);
  if (!pkey.ok()) {
    return pkey.status();
  }
  return impl_->Seal(ref, pkey->get(), type);
}

StatusOr<CreatedKey> SoftwareBackend::Import(const daemon::KeyRef& ref,
                                             const SecretBytes& private_key) {
  SslPtr<EVP_PKEY> pkey =
      ParsePrivateKey(private_key.Expose(SecretAccess::kToken));
  if (pkey == nullptr) {
    return SslError(Code::kInvalidArgument, "cannot parse private key",
                    /*with_detail=*/false);
  }
  ERR_clear_error();  // decoders may leave notes from rejected candidates
  StatusOr<v1::KeyType> type = DetectKeyType(pkey.get());
  if (!type.ok()) {
    return type.status();
  }
  return impl_->Seal(ref, pkey.get(), *type);
}

StatusOr<std::vector<uint8_t>> SoftwareBackend::Sign(
    const KeyHandle& key, const SignParams& params,
    std::span<const uint8_t> data) {
  StatusOr<LoadedKey> loaded = impl_->Load(key);
  if (!loaded.ok()) {
    return loaded.status();
  }
  EVP_PKEY* pkey = loaded->pkey.get();
  const v1::KeyType type = loaded->type;
  switch (params.algorithm) {
    case v1::RSA_PKCS1:
    case v1::RSA_PSS:
      if (!IsRsa(type)) {
        return CannotSign(type, params.algorithm);
      }
      return SignRsa(pkey, *loaded->templates, params, data);
    case v1::ECDSA:
      if (!IsEc(type)) {
        return CannotSign(type, params.algorithm);
      }
      return SignEcdsa(pkey, *loaded->templates, params, data);
    case v1::ED25519_PURE:
      if (type != v1::ED25519) {
        return CannotSign(type, params.algorithm);
      }
      return SignEd25519(pkey, params, data);
    default:
      return InvalidArgument("unknown sign algorithm");
  }
}

StatusOr<SecretBytes> SoftwareBackend::Decrypt(
    const KeyHandle& key, const DecryptParams& params,
    std::span<const uint8_t> ciphertext) {
  StatusOr<LoadedKey> loaded = impl_->Load(key);
  if (!loaded.ok()) {
    return loaded.status();
  }
  if (!IsRsa(loaded->type)) {
    return InvalidArgument("key type " +
                           std::string(KeyTypeName(loaded->type)) +
                           " cannot decrypt");
  }
  return DecryptRsa(loaded->pkey.get(), params, ciphertext);
}

StatusOr<SecretBytes> SoftwareBackend::Derive(const KeyHandle& key,
                                              std::span<const uint8_t> peer) {
  StatusOr<LoadedKey> loaded = impl_->Load(key);
  if (!loaded.ok()) {
    return loaded.status();
  }
  const v1::KeyType type = loaded->type;
  if (!IsEc(type) && type != v1::X25519) {
    return InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                           " cannot derive");
  }
  EVP_PKEY* pkey = loaded->pkey.get();
  StatusOr<SslPtr<EVP_PKEY>> peer_key = ParsePeer(pkey, type, peer);
  if (!peer_key.ok()) {
    return peer_key.status();
  }
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pkey, nullptr));
  if (ctx == nullptr || EVP_PKEY_derive_init(ctx.get()) != 1) {
    return SslError(Code::kInternal, "cannot set up key agreement");
  }
  // Validates the peer key (point on the curve, in the right subgroup).
  if (EVP_PKEY_derive_set_peer_ex(ctx.get(), peer_key->get(), 1) != 1) {
    return SslError(Code::kInvalidArgument, "invalid peer public key");
  }
  std::size_t len = 0;
  if (EVP_PKEY_derive(ctx.get(), nullptr, &len) != 1) {
    return SslError(Code::kInternal, "key agreement failed");
  }
  SecretBytes secret(len);
  if (EVP_PKEY_derive(ctx.get(), secret.data(SecretAccess::kToken), &len) !=
      1) {
    // X25519 with a low-order peer point ends here (all-zero secret).
    return SslError(Code::kInvalidArgument, "key agreement failed");
  }
  secret.resize(len);
  return secret;
}

Status SoftwareBackend::Destroy(const KeyHandle& key) {
  std::unique_lock lock(impl_->mu);
  impl_->cache.erase(key.id);
  return Status::Ok();
}

}  // namespace keyhold::backend::software
