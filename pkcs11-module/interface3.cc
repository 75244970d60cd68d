// PKCS#11 3.0 discovery: C_GetInterfaceList and C_GetInterface offer
// "PKCS 11" 3.0 (a CK_FUNCTION_LIST_3_0) first and "PKCS 11" 2.40 (the list
// C_GetFunctionList returns) second.
//
// The 3.0 list shares every 2.40 entry with the 2.40 list except C_GetInfo,
// which reports cryptokiVersion 3.0 there. Of the 3.0 additions,
// C_LoginUser is C_Login (the identity is the caller's uid; PIN and user name
// are ignored), C_SessionCancel ends the session's active operations, and the
// message-based functions return CKR_FUNCTION_NOT_SUPPORTED: no mechanism has
// CKF_MESSAGE_* flags, so no message operation can ever be initialized.
#include "pkcs11-module/interface3.h"

#include <cstddef>
#include <cstring>

namespace keyhold::pkcs11 {
namespace {

// The 3.0 list starts with the exact 2.40 layout, so the 2.40 entries can be
// copied as one block.
static_assert(offsetof(FunctionList30, C_WaitForSlotEvent) ==
              offsetof(CK_FUNCTION_LIST, C_WaitForSlotEvent));
static_assert(offsetof(FunctionList30, C_GetInterfaceList) ==
              sizeof(CK_FUNCTION_LIST));
static_assert(sizeof(FunctionList30) ==
              sizeof(CK_FUNCTION_LIST) + 24 * sizeof(void*));

template <typename... A>
CK_RV NotSupported(A...) {
  return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV GetInfo30(CK_INFO_PTR info) {
  const CK_RV rv = FunctionList240()->C_GetInfo(info);
  if (rv == CKR_OK) {
    info->cryptokiVersion = {3, 0};
  }
  return rv;
}

CK_RV LoginUser(CK_SESSION_HANDLE session, CK_USER_TYPE user,
                CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,
                CK_UTF8CHAR_PTR /*username*/, CK_ULONG /*username_len*/) {
  return FunctionList240()->C_Login(session, user, pin, pin_len);
}

FunctionList30* Functions30() {
  static FunctionList30 list = [] {
    FunctionList30 l;
    std::memset(&l, 0, sizeof l);
    std::memcpy(&l, FunctionList240(), sizeof(CK_FUNCTION_LIST));
    l.version = {3, 0};
    l.C_GetInfo = GetInfo30;
    l.C_GetInterfaceList = GetInterfaceList;
    l.C_GetInterface = GetInterface;
    l.C_LoginUser = LoginUser;
    l.C_SessionCancel = SessionCancel;
    l.C_MessageEncryptInit = NotSupported;
    l.C_EncryptMessage = NotSupported;
    l.C_EncryptMessageBegin = NotSupported;
    l.C_EncryptMessageNext = NotSupported;
    l.C_MessageEncryptFinal = NotSupported;
    l.C_MessageDecryptInit = NotSupported;
    l.C_DecryptMessage = NotSupported;
    l.C_DecryptMessageBegin = NotSupported;
    l.C_DecryptMessageNext = NotSupported;
    l.C_MessageDecryptFinal = NotSupported;
    l.C_MessageSignInit = NotSupported;
    l.C_SignMessage = NotSupported;
    l.C_SignMessageBegin = NotSupported;
    l.C_SignMessageNext = NotSupported;
    l.C_MessageSignFinal = NotSupported;
    l.C_MessageVerifyInit = NotSupported;
    l.C_VerifyMessage = NotSupported;
    l.C_VerifyMessageBegin = NotSupported;
    l.C_VerifyMessageNext = NotSupported;
    l.C_MessageVerifyFinal = NotSupported;
    return l;
  }();
  return &list;
}

char kInterfaceName[] = "PKCS 11";
constexpr CK_ULONG kNumInterfaces = 2;

// Preferred first: C_GetInterface without name and version picks 3.0.
Interface* Interfaces() {
  static Interface interfaces[kNumInterfaces] = {
      {reinterpret_cast<CK_UTF8CHAR*>(kInterfaceName), Functions30(), 0},
      {reinterpret_cast<CK_UTF8CHAR*>(kInterfaceName), FunctionList240(), 0},
  };
  return interfaces;
}

// Every function list begins with its CK_VERSION.
const CK_VERSION& VersionOf(const Interface& iface) {
  return *static_cast<const CK_VERSION*>(iface.function_list);
}

}  // namespace

CK_RV GetInterfaceList(Interface* list, CK_ULONG_PTR count) {
  if (count == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  if (list == nullptr) {
    *count = kNumInterfaces;
    return CKR_OK;
  }
  if (*count < kNumInterfaces) {
    *count = kNumInterfaces;
    return CKR_BUFFER_TOO_SMALL;
  }
  for (CK_ULONG i = 0; i < kNumInterfaces; ++i) {
    list[i] = Interfaces()[i];
  }
  *count = kNumInterfaces;
  return CKR_OK;
}

CK_RV GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                   Interface** out, CK_FLAGS flags) {
  if (out == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  for (CK_ULONG i = 0; i < kNumInterfaces; ++i) {
    Interface& iface = Interfaces()[i];
    const CK_VERSION& v = VersionOf(iface);
    if ((name == nullptr || std::strcmp(reinterpret_cast<const char*>(name),
                                        kInterfaceName) == 0) &&
        (version == nullptr ||
         (version->major == v.major && version->minor == v.minor)) &&
        (flags & ~iface.flags) == 0) {
      *out = &iface;
      return CKR_OK;
    }
  }
  return CKR_ARGUMENTS_BAD;  // no such interface
}

}  // namespace keyhold::pkcs11

extern "C" __attribute__((visibility("default"))) CK_RV C_GetInterfaceList(
    keyhold::pkcs11::Interface* list, CK_ULONG_PTR count) {
  return keyhold::pkcs11::GetInterfaceList(list, count);
}

extern "C" __attribute__((visibility("default"))) CK_RV C_GetInterface(
    CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
    keyhold::pkcs11::Interface** out, CK_FLAGS flags) {
  return keyhold::pkcs11::GetInterface(name, version, out, flags);
}
