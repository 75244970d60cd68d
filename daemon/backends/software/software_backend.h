// The software backend: keys are OpenSSL 3 EVP keys, stored as PKCS#8 DER
// sealed with AES-256-GCM under the daemon's master key, with the key
// reference ("owner/name") as associated data. Decoded keys are cached in
// memory by key id so the hot path does not decrypt and parse, each with its
// initialised signing contexts (one per parameter set), which every
// signature copies instead of setting one up.
#ifndef KEYHOLD_DAEMON_BACKENDS_SOFTWARE_SOFTWARE_BACKEND_H_
#define KEYHOLD_DAEMON_BACKENDS_SOFTWARE_SOFTWARE_BACKEND_H_

#include <filesystem>
#include <memory>
#include <string>

#include "daemon/backends/backend.h"

namespace keyhold::backend::software {

// Loads the daemon's 32-byte master key from path, creating it (mode 0600,
// O_EXCL, fsynced) if it does not exist. Refuses a file that is not a
// regular file of exactly 32 bytes, is owned by another uid or that group
// or others can access.
StatusOr<SecretBytes> LoadOrCreateMasterKeyFile(
    const std::filesystem::path& path);
// The same checks on an existing file; never creates one.
StatusOr<SecretBytes> ReadMasterKeyFile(const std::filesystem::path& path);

class SoftwareBackend : public Backend {
 public:
  // With the master key from LoadOrCreateMasterKeyFile(master_key_path).
  static StatusOr<std::unique_ptr<SoftwareBackend>> Create(
      std::string name, const std::filesystem::path& master_key_path);
  // With a master key the caller obtained (e.g. unsealed by a TPM); it must
  // be 32 bytes.
  static StatusOr<std::unique_ptr<SoftwareBackend>> Create(
      std::string name, SecretBytes master_key);
  ~SoftwareBackend() override;

  std::string_view Name() const override;
  bool MayBlock() const override { return false; }
  StatusOr<CreatedKey> Generate(const daemon::KeyRef& ref,
                                v1::KeyType type) override;
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

 private:
  struct Impl;
  explicit SoftwareBackend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace keyhold::backend::software

#endif  // KEYHOLD_DAEMON_BACKENDS_SOFTWARE_SOFTWARE_BACKEND_H_
