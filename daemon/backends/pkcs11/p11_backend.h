// The PKCS#11 (HSM) backend: keys are generated or imported into a token
// reached through its PKCS#11 module and never leave it. The module is loaded
// through p11-kit and must be on the config's allow-list. A blob records the
// token serial and the object's random CKA_ID; nothing secret.
//
// Operations use a pool of sessions opened and logged in once at start. A
// request waits at most acquire_timeout_ms for a free session, so a module
// call that never returns can hold at most `sessions` blocking-pool threads:
// later requests fail with kBackendUnavailable instead of queueing forever.
#ifndef KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_BACKEND_H_
#define KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "daemon/backends/backend.h"

namespace keyhold::backend::pkcs11 {

// The settings of one [[backend.pkcs11]] table.
struct P11Config {
  std::string name;
  std::string module;                        // path of the PKCS#11 module
  std::vector<std::string> allowed_modules;  // module must be one of these
  std::string token_label;                   // one of label or serial
  std::string token_serial;
  std::string pin_file;  // user PIN; regular file, our uid, mode 0600/0400
  uint32_t sessions = 4;
  uint32_t acquire_timeout_ms = 30000;
};

// Parses a [[backend.pkcs11]] table given as TOML text; unknown keys are an
// error.
StatusOr<P11Config> ParseP11Config(const std::string& settings_toml);

// The factory daemon/main.cc calls for a [[backend.pkcs11]] table.
StatusOr<std::unique_ptr<Backend>> CreateP11Backend(
    const std::string& settings_toml);

class P11Backend : public Backend {
 public:
  // Loads the module, finds the token, reads the PIN file, opens and logs in
  // the session pool and reads the token's mechanisms. The PIN is wiped after
  // C_Login and re-read from its file only if the token must be logged in
  // again (it was removed and came back). A token that is not present does
  // not fail the start: the backend looks for it again at each request.
  static StatusOr<std::unique_ptr<P11Backend>> Create(const P11Config& config);
  ~P11Backend() override;

  std::string_view Name() const override;
  unsigned MaxBlockingCalls() const override;
  std::string CallsInProgress() const override;
  std::string State() const override;
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
  void Recorded(const KeyHandle& key) override;
  Status Retire(const KeyHandle& key) override;
  Status Reconcile(std::span<const KeyHandle> recorded,
                   std::span<const KeyHandle> others) override;

  // The token's serial number (as padded in CK_TOKEN_INFO, trimmed).
  const std::string& TokenSerial() const;
  // Whether the token offers CKM_EDDSA (Ed25519 keys).
  bool SupportsEd25519() const;

 private:
  struct Impl;
  explicit P11Backend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace keyhold::backend::pkcs11

#endif  // KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_BACKEND_H_
