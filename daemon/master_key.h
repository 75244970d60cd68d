// Where keyholdd's master key comes from. The master key encrypts software-
// backend keys at rest and the TPM backend's per-key auth values.
//
// - By default: STATE_DIR/master.key, a 0600 file created at first start.
// - With master_key_sealed_by = "TPM": STATE_DIR/master.key.tpm, the key
//   sealed by that [[backend.tpm]]'s TPM (see TpmBackend::SealMasterKey),
//   so a copy of the state directory is useless without this machine's TPM.
//   At the first start with the setting, an existing master.key is sealed,
//   the sealed copy written and checked, and only then master.key deleted;
//   a start that finds both (a crash in between) keeps the sealed one if
//   they hold the same key and refuses to start if they do not.
#ifndef KEYHOLD_DAEMON_MASTER_KEY_H_
#define KEYHOLD_DAEMON_MASTER_KEY_H_

#include "common/secret.h"
#include "common/status.h"
#include "daemon/config.h"

namespace keyhold::daemon {

StatusOr<SecretBytes> LoadMasterKey(const Config& config);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_MASTER_KEY_H_
