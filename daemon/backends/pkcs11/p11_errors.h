// CK_RV -> Status: the one place a PKCS#11 return value becomes a Status.
#ifndef KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_ERRORS_H_
#define KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_ERRORS_H_

#include <p11-kit/pkcs11.h>

#include <string>
#include <string_view>

#include "common/status.h"

namespace keyhold::backend::pkcs11 {

// Not a module's code: the backend's own verdict that a module returned
// something it cannot have (an output length larger than the buffer it was
// given, or not the length the operation produces). Vendor-defined range, so
// it never collides with a real CKR_ value.
inline constexpr CK_RV kCkrBadModuleOutput = CKR_VENDOR_DEFINED | 0x4b480001UL;

// Ours too: a key use's operation was bound to an object that is no longer
// the key's (its handle number went to a new object). The session is closed,
// which ends the operation with nothing given out, and the use starts over.
inline constexpr CK_RV kCkrWrongObject = CKR_VENDOR_DEFINED | 0x4b480002UL;

// "CKR_PIN_INCORRECT"; "CKR_0x..." for values we do not name.
std::string CkrName(CK_RV rv);

// The status for a failed call; what says what was attempted ("C_Sign").
// The message names the CKR_ value and never carries data or PINs.
Status P11Error(CK_RV rv, std::string_view what);

// True if rv means the session (or the token behind it) is gone, so the
// session should be reopened and the call retried once.
bool IsSessionLost(CK_RV rv);

// True if rv means an object handle is stale (look the object up again).
bool IsHandleStale(CK_RV rv);

}  // namespace keyhold::backend::pkcs11

#endif  // KEYHOLD_DAEMON_BACKENDS_PKCS11_P11_ERRORS_H_
