// The TPM 2.0 backend: keys are created by the TPM as children of a storage
// primary key under the owner hierarchy and leave it only wrapped by that
// primary (TPM2B_PRIVATE). keyhold keeps the public area, the wrapped private
// area and a random per-key auth value; the auth value is encrypted at rest
// under a key derived from the daemon's master key, so a copy of keys.db
// alone cannot drive the TPM, and a copy of keys.db plus master.key cannot
// do anything without the TPM that wrapped the keys.
//
// Access goes through ESAPI (Esys_*) over the TCTI named in the config, one
// ESYS context serialized by a mutex whose waits are bounded
// (acquire_timeout_ms). Loaded keys are kept in a small LRU of
// transient handles sized to the TPM's free object slots; a lost TPM
// connection is re-established (and the primary recreated) on the next use.
#ifndef KEYHOLD_DAEMON_BACKENDS_TPM_TPM_BACKEND_H_
#define KEYHOLD_DAEMON_BACKENDS_TPM_TPM_BACKEND_H_

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "daemon/backends/backend.h"

namespace keyhold::backend::tpm {

// The [[backend.tpm]] table.
struct TpmOptions {
  std::string name;
  // Tss2_TctiLdr_Initialize configuration, e.g. "device:/dev/tpmrm0",
  // "swtpm:host=127.0.0.1,port=2321", "mssim:...".
  std::string tcti = "device:/dev/tpmrm0";
  // Optional file holding the owner hierarchy auth value (regular file,
  // owned by the daemon's uid, no group or other access).
  std::string owner_auth_file;
  // 0: create the storage primary (ECC P-256 SRK template) at every start;
  // else the persistent handle (0x81xxxxxx) of an existing storage key with
  // an empty auth value.
  uint32_t persistent_handle = 0;
  // The expected name (hex TPM2B_NAME, as `tpm2_readpublic -c HANDLE`
  // prints it) of the key at persistent_handle. The key is refused when the
  // TPM presents another one. Required with encrypted_sessions: the session
  // is salted with that key, so an unchecked one (say, a key substituted by
  // whoever sits on the TPM bus) would defeat the encryption.
  std::string persistent_name;
  // Upper bound on keys kept loaded; the TPM's free transient slots may
  // lower it.
  uint32_t max_loaded_keys = 8;
  // Use an HMAC session salted with the storage key, with parameter
  // encryption, instead of password authorization: protects key auth values
  // and operation data on the TPM bus / TCTI. Off by default: on swtpm it
  // costs about 4 ms per operation (bench/RESULTS.md).
  bool encrypted_sessions = false;
  // keyholdd is the TPM's only user: at every connection it flushes the
  // transient objects and sessions it finds (those of a keyholdd killed
  // with -9, say, which a TPM without a resource manager keeps until its
  // next reset and which can fill its few object slots). Set from
  // `sole_user`; the default is true for device:/dev/tpmN, which the
  // kernel lets one process open at a time, else false.
  bool sole_user = false;
  // How long a request waits for the TPM while another one has it. A
  // request that finds the TPM held for this long already (a TPM, or a
  // resource manager, that stopped answering) fails at once: the call that
  // hangs holds one thread, not every thread that wants the TPM.
  uint32_t acquire_timeout_ms = 30000;
};

// Parses a [[backend.tpm]] table (TOML text). Unknown keys are an error.
StatusOr<TpmOptions> ParseTpmSettings(std::string_view toml_text);

// How many transient objects one connection may hold when the TCTI is the
// kernel's resource manager (device:/dev/tpmrmN): the kernel keeps three
// per open file and fails a command that would make a fourth ("out of
// slots"), whatever the TPM itself has free. 0: no such per-connection limit
// (another TCTI).
std::size_t TransientLimitOfTcti(std::string_view tcti);

class TpmBackend : public Backend {
 public:
  // Connects to the TPM, creates or opens the storage primary and reads the
  // TPM's capabilities. master_key_path is the daemon's master key file
  // (written by the software backend, which the daemon creates first).
  static StatusOr<std::unique_ptr<TpmBackend>> Create(
      TpmOptions options, const std::filesystem::path& master_key_path);
  // The same with the master key itself (32 bytes).
  static StatusOr<std::unique_ptr<TpmBackend>> Create(
      TpmOptions options, const SecretBytes& master_key);

  // The daemon's master key sealed by this TPM: a keyed-hash data object
  // (fixedTPM, fixedParent, empty auth value, noDA) under the storage
  // primary key, returned as an opaque blob for the state directory. Only
  // this TPM, with the same owner seed (no TPM2_Clear since), can unseal
  // it. With encrypted_sessions the key crosses the TCTI only encrypted.
  // Each call opens its own connection to the TPM and closes it.
  static StatusOr<std::vector<uint8_t>> SealMasterKey(
      const TpmOptions& options, const SecretBytes& master_key);
  // The master key from a SealMasterKey blob. A blob from another TPM (or
  // from before a TPM clear) is kPermissionDenied with a message saying so;
  // a damaged one kInvalidArgument.
  static StatusOr<SecretBytes> UnsealMasterKey(const TpmOptions& options,
                                               std::span<const uint8_t> sealed);
  // Flushes every loaded key and the primary.
  ~TpmBackend() override;

  std::string_view Name() const override;
  unsigned MaxBlockingCalls() const override { return 1; }
  std::string CallsInProgress() const override;
  std::string State() const override;
  StatusOr<CreatedKey> Generate(const daemon::KeyRef& ref,
                                v1::KeyType type) override;
  // Always kUnsupported: TPM keys are created inside the TPM.
  StatusOr<CreatedKey> Import(const daemon::KeyRef& ref,
                              const SecretBytes& private_key) override;
  StatusOr<std::vector<uint8_t>> Sign(const KeyHandle& key,
                                      const SignParams& params,
                                      std::span<const uint8_t> data) override;
  StatusOr<SecretBytes> Decrypt(const KeyHandle& key,
                                const DecryptParams& params,
                                std::span<const uint8_t> ciphertext) override;
  StatusOr<SecretBytes> Derive(const KeyHandle& key,
                               std::span<const uint8_t> peer) override;
  Status Destroy(const KeyHandle& key) override;

  // Key types this TPM can create (from TPM2_GetCapability/TPM2_TestParms).
  std::vector<v1::KeyType> SupportedKeyTypes() const;
  // Keys currently loaded in the TPM (for tests).
  std::size_t LoadedKeyCount() const;
  // The LRU capacity in use (for tests).
  std::size_t LoadedKeyCapacity() const;

 private:
  struct Impl;
  explicit TpmBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The daemon's factory: parses settings and creates the backend.
StatusOr<std::unique_ptr<Backend>> CreateTpmBackend(
    std::string_view settings_toml, const SecretBytes& master_key);

}  // namespace keyhold::backend::tpm

#endif  // KEYHOLD_DAEMON_BACKENDS_TPM_TPM_BACKEND_H_
