#include "daemon/backends/tpm/tpm_errors.h"

#include <tss2/tss2_rc.h>
#include <tss2/tss2_tpm2_types.h>

#include <string>

namespace keyhold::backend::tpm {

TSS2_RC BaseRc(TSS2_RC rc) {
  if ((rc & TSS2_RC_LAYER_MASK) != TSS2_TPM_RC_LAYER) {
    return rc;
  }
  if ((rc & TPM2_RC_FMT1) != 0) {
    return rc & (TPM2_RC_FMT1 | 0x3fU);
  }
  return rc & 0xfffU;
}

bool IsConnectionLost(TSS2_RC rc) {
  const TSS2_RC layer = rc & TSS2_RC_LAYER_MASK;
  if (layer == TSS2_TCTI_RC_LAYER) {
    return true;
  }
  // The ESAPI reports a TCTI failure in the middle of a command as its own
  // I/O or sequence error.
  if (layer == TSS2_ESAPI_RC_LAYER || layer == TSS2_SYS_RC_LAYER) {
    const TSS2_RC base = rc & 0xffffU;
    return base == TSS2_BASE_RC_IO_ERROR || base == TSS2_BASE_RC_TRY_AGAIN ||
           base == TSS2_BASE_RC_NO_CONNECTION ||
           base == TSS2_BASE_RC_MALFORMED_RESPONSE ||
           base == TSS2_BASE_RC_INSUFFICIENT_RESPONSE;
  }
  const TSS2_RC base = BaseRc(rc);
  // A TPM that was restarted: not started up, or our handles are gone.
  return base == TPM2_RC_INITIALIZE || base == TPM2_RC_REFERENCE_H0;
}

bool IsDecryptionFailure(TSS2_RC rc) {
  if ((rc & TSS2_RC_LAYER_MASK) != TSS2_TPM_RC_LAYER) {
    return false;
  }
  // libtpms (swtpm) answers a bad padding with TPM_RC_FAILURE rather than
  // TPM_RC_VALUE. A TPM really in failure mode fails every other command
  // too, so nothing is hidden for long by counting it here.
  const TSS2_RC base = BaseRc(rc);
  return base == TPM2_RC_VALUE || base == TPM2_RC_SIZE ||
         base == TPM2_RC_FAILURE;
}

Status TpmError(TSS2_RC rc, std::string_view what) {
  std::string message = "TPM: " + std::string(what) + ": " + Tss2_RC_Decode(rc);
  if (IsConnectionLost(rc)) {
    return BackendUnavailable(std::move(message));
  }
  if ((rc & TSS2_RC_LAYER_MASK) != TSS2_TPM_RC_LAYER) {
    return Internal(std::move(message));
  }
  switch (BaseRc(rc)) {
    case TPM2_RC_OBJECT_MEMORY:
    case TPM2_RC_SESSION_MEMORY:
      return Status(Code::kResourceExhausted, std::move(message));
    case TPM2_RC_AUTH_FAIL:
    case TPM2_RC_BAD_AUTH:
      return PermissionDenied(std::move(message) +
                              " (the TPM refused the authorization value)");
    case TPM2_RC_LOCKOUT:
      return Unavailable(std::move(message) +
                         " (the TPM is in dictionary-attack lockout)");
    case TPM2_RC_RETRY:
    case TPM2_RC_YIELDED:
    case TPM2_RC_CANCELED:
    case TPM2_RC_TESTING:
    case TPM2_RC_NV_RATE:
    case TPM2_RC_NV_UNAVAILABLE:
      return Unavailable(std::move(message) + " (the TPM is busy; retry)");
    default:
      return Internal(std::move(message));
  }
}

}  // namespace keyhold::backend::tpm
