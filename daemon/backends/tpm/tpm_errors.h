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

// True if rc is how TPM2_RSA_Decrypt reports a ciphertext that does not
// decrypt (bad padding, value out of range): the one answer "decryption
// failed", with no detail, so the TPM is no padding oracle. Every other
// failure (connection, resources, authorization) keeps its real status.
bool IsDecryptionFailure(TSS2_RC rc);

// what failed, plus the decoded code. Connection problems become
// kBackendUnavailable; TPM_RC_OBJECT_MEMORY/SESSION_MEMORY
// kResourceExhausted; a refused auth value kPermissionDenied; dictionary-
// attack lockout and "busy, retry" warnings kUnavailable; the rest kInternal.
Status TpmError(TSS2_RC rc, std::string_view what);

}  // namespace keyhold::backend::tpm

#endif  // KEYHOLD_DAEMON_BACKENDS_TPM_TPM_ERRORS_H_
