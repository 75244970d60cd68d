#include "daemon/backends/pkcs11/p11_errors.h"

#include <cstdio>

namespace keyhold::backend::pkcs11 {

std::string CkrName(CK_RV rv) {
  switch (rv) {
#define KH_CKR(x) \
  case x:         \
    return #x
    KH_CKR(CKR_OK);
    KH_CKR(CKR_CANCEL);
    KH_CKR(CKR_HOST_MEMORY);
    KH_CKR(CKR_SLOT_ID_INVALID);
    KH_CKR(CKR_GENERAL_ERROR);
    KH_CKR(CKR_FUNCTION_FAILED);
    KH_CKR(CKR_ARGUMENTS_BAD);
    KH_CKR(CKR_ACTION_PROHIBITED);
    KH_CKR(CKR_ATTRIBUTE_READ_ONLY);
    KH_CKR(CKR_ATTRIBUTE_SENSITIVE);
    KH_CKR(CKR_ATTRIBUTE_TYPE_INVALID);
    KH_CKR(CKR_ATTRIBUTE_VALUE_INVALID);
    KH_CKR(CKR_DATA_INVALID);
    KH_CKR(CKR_DATA_LEN_RANGE);
    KH_CKR(CKR_DEVICE_ERROR);
    KH_CKR(CKR_DEVICE_MEMORY);
    KH_CKR(CKR_DEVICE_REMOVED);
    KH_CKR(CKR_ENCRYPTED_DATA_INVALID);
    KH_CKR(CKR_ENCRYPTED_DATA_LEN_RANGE);
    KH_CKR(CKR_FUNCTION_NOT_SUPPORTED);
    KH_CKR(CKR_KEY_HANDLE_INVALID);
    KH_CKR(CKR_KEY_SIZE_RANGE);
    KH_CKR(CKR_KEY_TYPE_INCONSISTENT);
    KH_CKR(CKR_KEY_FUNCTION_NOT_PERMITTED);
    KH_CKR(CKR_MECHANISM_INVALID);
    KH_CKR(CKR_MECHANISM_PARAM_INVALID);
    KH_CKR(CKR_OBJECT_HANDLE_INVALID);
    KH_CKR(CKR_OPERATION_ACTIVE);
    KH_CKR(CKR_OPERATION_NOT_INITIALIZED);
    KH_CKR(CKR_PIN_INCORRECT);
    KH_CKR(CKR_PIN_LEN_RANGE);
    KH_CKR(CKR_PIN_EXPIRED);
    KH_CKR(CKR_PIN_LOCKED);
    KH_CKR(CKR_SESSION_CLOSED);
    KH_CKR(CKR_SESSION_COUNT);
    KH_CKR(CKR_SESSION_HANDLE_INVALID);
    KH_CKR(CKR_SESSION_READ_ONLY);
    KH_CKR(CKR_SIGNATURE_INVALID);
    KH_CKR(CKR_SIGNATURE_LEN_RANGE);
    KH_CKR(CKR_TEMPLATE_INCOMPLETE);
    KH_CKR(CKR_TEMPLATE_INCONSISTENT);
    KH_CKR(CKR_TOKEN_NOT_PRESENT);
    KH_CKR(CKR_TOKEN_NOT_RECOGNIZED);
    KH_CKR(CKR_TOKEN_WRITE_PROTECTED);
    KH_CKR(CKR_USER_ALREADY_LOGGED_IN);
    KH_CKR(CKR_USER_NOT_LOGGED_IN);
    KH_CKR(CKR_USER_PIN_NOT_INITIALIZED);
    KH_CKR(CKR_USER_TYPE_INVALID);
    KH_CKR(CKR_DOMAIN_PARAMS_INVALID);
    KH_CKR(CKR_CURVE_NOT_SUPPORTED);
    KH_CKR(CKR_BUFFER_TOO_SMALL);
    KH_CKR(CKR_CRYPTOKI_NOT_INITIALIZED);
    KH_CKR(CKR_CRYPTOKI_ALREADY_INITIALIZED);
#undef KH_CKR
    case kCkrBadModuleOutput:
      return "a malformed answer of the module";
    case kCkrWrongObject:
      return "the key's object handle now names another object";
    default: {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "CKR_0x%lx", rv);
      return buf;
    }
  }
}

Status P11Error(CK_RV rv, std::string_view what) {
  std::string msg = std::string(what) + " failed: " + CkrName(rv);
  switch (rv) {
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_FUNCTION_NOT_SUPPORTED:
    case CKR_KEY_SIZE_RANGE:
    case CKR_CURVE_NOT_SUPPORTED:
    case CKR_DOMAIN_PARAMS_INVALID:
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
      return Unsupported("the token does not support this: " + msg);
    case CKR_DATA_INVALID:
    case CKR_DATA_LEN_RANGE:
      return InvalidArgument(msg);
    case CKR_PIN_INCORRECT:
    case CKR_PIN_LOCKED:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LEN_RANGE:
    case CKR_USER_PIN_NOT_INITIALIZED:
      return PermissionDenied(msg);
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
    case kCkrWrongObject:
      return NotFound(msg + " (the key's token object is gone)");
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
      return BackendUnavailable(msg + " (the token is not present)");
    case CKR_DEVICE_ERROR:
    case CKR_SESSION_CLOSED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_COUNT:
    case CKR_USER_NOT_LOGGED_IN:
      return BackendUnavailable(msg);
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
      return ResourceExhausted(msg);
    case kCkrBadModuleOutput:
      return Internal(msg +
                      " (an impossible output length or count; the "
                      "PKCS#11 module is faulty)");
    default:
      return Internal(msg);
  }
}

bool IsSessionLost(CK_RV rv) {
  return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED ||
         rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT ||
         rv == CKR_USER_NOT_LOGGED_IN || rv == CKR_DEVICE_ERROR;
}

bool IsHandleStale(CK_RV rv) {
  return rv == CKR_OBJECT_HANDLE_INVALID || rv == CKR_KEY_HANDLE_INVALID;
}

}  // namespace keyhold::backend::pkcs11
