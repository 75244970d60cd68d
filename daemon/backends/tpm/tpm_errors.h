// TSS2_RC → Status, in one place (tpm_errors.cc).
#ifndef KEYHOLD_DAEMON_BACKENDS_TPM_TPM_ERRORS_H_
#define KEYHOLD_DAEMON_BACKENDS_TPM_TPM_ERRORS_H_

#include <tss2/tss2_common.h>

#include <string_view>

#include "common/status.h"

namespace keyhold::backend::tpm {

// The TPM response code without the handle/parameter/session number of
// format-one codes, so it can be compared with TPM2_RC_* constants. Codes of
// other layers (TCTI, ESAPI) are returned unchanged.
TSS2_RC BaseRc(TSS2_RC rc);

// True if rc means the TPM connection is gone or the TPM was reset, so the
// ESYS context and every handle in it must be rebuilt.
bool IsConnectionLost(TSS2_RC rc);

// what failed, plus the decoded code. Connection problems become
// kBackendUnavailable, TPM_RC_OBJECT_MEMORY kResourceExhausted, the rest
// kInternal.
Status TpmError(TSS2_RC rc, std::string_view what);

}  // namespace keyhold::backend::tpm

#endif  // KEYHOLD_DAEMON_BACKENDS_TPM_TPM_ERRORS_H_
