// The one interface every key backend implements (software, pkcs11, tpm).
//
// A backend turns requests into private-key operations and hands back an
// opaque blob for the key store to keep. Nothing outside the backend looks
// inside a blob. Backends never include the session layer, the ops or each
// other; only daemon/main.cc names concrete backends.
#ifndef KEYHOLD_DAEMON_BACKENDS_BACKEND_H_
#define KEYHOLD_DAEMON_BACKENDS_BACKEND_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/secret.h"
#include "common/status.h"
#include "daemon/keystore/key_ref.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::backend {

// What a backend returns for a new key.
struct CreatedKey {
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::vector<uint8_t> public_key;  // DER SubjectPublicKeyInfo
  std::vector<uint8_t> blob;        // opaque to everyone but the backend
};

// A stored key as a backend sees it. id is the key store's row id: unique for
// the lifetime of the store (never reused), so backends may cache by it.
struct KeyHandle {
  uint64_t id = 0;
  daemon::KeyRef ref;
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::span<const uint8_t> blob;
};

struct SignParams {
  v1::SignAlgorithm algorithm = v1::SIGN_ALGORITHM_UNSPECIFIED;
  v1::Digest digest = v1::DIGEST_NONE;
  int32_t pss_salt_length = -1;  // >= 0 as is; -1 digest length; -2 max
  v1::Digest pss_mgf1_digest = v1::DIGEST_NONE;  // NONE: same as digest
};

struct DecryptParams {
  v1::DecryptAlgorithm algorithm = v1::DECRYPT_ALGORITHM_UNSPECIFIED;
  v1::Digest oaep_digest = v1::DIGEST_NONE;       // NONE: SHA-1
  v1::Digest oaep_mgf1_digest = v1::DIGEST_NONE;  // NONE: same as oaep_digest
  std::string oaep_label;
  uint32_t tls_client_version = 0;      // RSA_TLS_PREMASTER only
  uint32_t tls_negotiated_version = 0;  // RSA_TLS_PREMASTER; 0: not accepted
};

class Backend {
 public:
  virtual ~Backend() = default;

  // The name the config and the key store use for this backend instance.
  virtual std::string_view Name() const = 0;

  // How many of this backend's calls may block at once (an HSM's session
  // pool; a TPM's one connection). keyholdd sizes its blocking pool so that
  // these can all hang and threads remain for everyone else. 0: none.
  virtual unsigned MaxBlockingCalls() const { return 0; }

  // False if Sign/Decrypt/Derive only use the CPU for a bounded time, so the
  // daemon may run them on its I/O threads (one fewer thread hop per
  // request). Backends that talk to a device (TPM, HSM) keep the default,
  // and their operations run on the blocking pool.
  virtual bool MayBlock() const { return true; }

  // The device calls in progress right now, in words for the shutdown
  // watchdog's message ("" when none is). Must not wait for the device.
  virtual std::string CallsInProgress() const { return {}; }

  // "ready", or in words why this backend's keys cannot be used right now
  // (a TPM not connected, a token not found), for `keyhold admin stats`.
  // Must not wait for the device.
  virtual std::string State() const { return "ready"; }

  // Creates a new key for ref. ref is bound into the blob (e.g. as AEAD
  // associated data), so a blob copied to another reference does not work.
  virtual StatusOr<CreatedKey> Generate(const daemon::KeyRef& ref,
                                        v1::KeyType type) = 0;
  // Takes a private key in PEM or DER (PKCS#8 or traditional). The type is
  // detected; unsupported types and sizes give kUnsupported.
  virtual StatusOr<CreatedKey> Import(const daemon::KeyRef& ref,
                                      const SecretBytes& private_key) = 0;

  // data is the digest (RSA, ECDSA) or the message (Ed25519). The caller has
  // already checked that the key's type and usage allow the operation.
  virtual StatusOr<std::vector<uint8_t>> Sign(
      const KeyHandle& key, const SignParams& params,
      std::span<const uint8_t> data) = 0;
  virtual StatusOr<SecretBytes> Decrypt(
      const KeyHandle& key, const DecryptParams& params,
      std::span<const uint8_t> ciphertext) = 0;
  // peer is a DER SubjectPublicKeyInfo or the raw public encoding.
  virtual StatusOr<SecretBytes> Derive(const KeyHandle& key,
                                       std::span<const uint8_t> peer) = 0;

  // Forgets the key: removes backend objects and cached state. Called after
  // the key store row is gone.
  virtual Status Destroy(const KeyHandle& key) = 0;

  // Backends holding objects outside the key store (HSM tokens) mark an
  // object "pending" while no key store row may exist for it, so that a
  // crash in between leaves something reconciliation may remove:
  // Generate/Import create marked objects; Recorded() is called once the
  // store has committed the new row (a failure only leaves the mark until
  // the next start); Retire() before the row is deleted (an error other
  // than kNotFound keeps the row: the key stays usable and the caller may
  // retry); Destroy() removes the object, then the mark.
  virtual void Recorded(const KeyHandle& key) { (void)key; }
  virtual Status Retire(const KeyHandle& key) {
    (void)key;
    return Status::Ok();
  }

  // Called once at start with every key the key store records for this
  // backend, and every key it records for other backends (an HSM token may
  // be named by two backend tables, or a table renamed). Backends holding
  // objects outside the store report recorded keys whose object is gone,
  // remove marked objects no row records (a crash between creation and the
  // store's insert, or between a row's deletion and the object's), and
  // leave any other unrecorded object in place.
  virtual Status Reconcile(std::span<const KeyHandle> recorded,
                           std::span<const KeyHandle> others) {
    (void)recorded;
    (void)others;
    return Status::Ok();
  }
};

}  // namespace keyhold::backend

#endif  // KEYHOLD_DAEMON_BACKENDS_BACKEND_H_
