// PKCS#11 3.0 discovery for libkeyhold-pkcs11.so: CK_INTERFACE and
// CK_FUNCTION_LIST_3_0, which p11-kit 0.24's pkcs11.h (Debian 12) lacks.
// Both are declared here with the layout of OASIS pkcs11t.h / pkcs11f.h
// (3.0): the 2.40 entries in CK_FUNCTION_LIST order, then the 3.0 ones.
// Field names follow the spec so the table reads like the header.
#ifndef KEYHOLD_PKCS11_MODULE_INTERFACE3_H_
#define KEYHOLD_PKCS11_MODULE_INTERFACE3_H_

// Only p11-kit here: its compatibility names are macros (value, count, ...)
// that would rewrite any header included after this one.
#include <p11-kit/pkcs11.h>

namespace keyhold::pkcs11 {

// CK_INTERFACE (pkcs11t.h 3.0).
struct Interface {
  CK_UTF8CHAR* name;  // pInterfaceName
  CK_VOID_PTR function_list;
  CK_FLAGS flags;
};

// CKF_FIND_OBJECTS (3.0): C_SessionCancel's flag for an object search.
inline constexpr CK_FLAGS kFindObjects = 0x00000040UL;

// The 3.0 function types (pkcs11f.h 3.0).
using GetInterfaceListFn = CK_RV (*)(Interface* list, CK_ULONG_PTR count);
using GetInterfaceFn = CK_RV (*)(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                 Interface** out, CK_FLAGS flags);
using LoginUserFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_USER_TYPE user,
                              CK_UTF8CHAR_PTR pin, CK_ULONG pin_len,
                              CK_UTF8CHAR_PTR username, CK_ULONG username_len);
using SessionCancelFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_FLAGS flags);
using MessageInitFn = CK_RV (*)(CK_SESSION_HANDLE session,
                                CK_MECHANISM_PTR mechanism,
                                CK_OBJECT_HANDLE key);
using MessageCryptFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_VOID_PTR param,
                                 CK_ULONG param_len, CK_BYTE_PTR aad,
                                 CK_ULONG aad_len, CK_BYTE_PTR in,
                                 CK_ULONG in_len, CK_BYTE_PTR out,
                                 CK_ULONG_PTR out_len);
using MessageCryptBeginFn = CK_RV (*)(CK_SESSION_HANDLE session,
                                      CK_VOID_PTR param, CK_ULONG param_len,
                                      CK_BYTE_PTR aad, CK_ULONG aad_len);
using MessageCryptNextFn = CK_RV (*)(CK_SESSION_HANDLE session,
                                     CK_VOID_PTR param, CK_ULONG param_len,
                                     CK_BYTE_PTR in, CK_ULONG in_len,
                                     CK_BYTE_PTR out, CK_ULONG_PTR out_len,
                                     CK_FLAGS flags);
using MessageFinalFn = CK_RV (*)(CK_SESSION_HANDLE session);
using SignMessageFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_VOID_PTR param,
                                CK_ULONG param_len, CK_BYTE_PTR data,
                                CK_ULONG data_len, CK_BYTE_PTR sig,
                                CK_ULONG_PTR sig_len);
using MessageBeginFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_VOID_PTR param,
                                 CK_ULONG param_len);
using VerifyMessageFn = CK_RV (*)(CK_SESSION_HANDLE session, CK_VOID_PTR param,
                                  CK_ULONG param_len, CK_BYTE_PTR data,
                                  CK_ULONG data_len, CK_BYTE_PTR sig,
                                  CK_ULONG sig_len);

// CK_FUNCTION_LIST_3_0.
struct FunctionList30 {
  CK_VERSION version;
  CK_C_Initialize C_Initialize;
  CK_C_Finalize C_Finalize;
  CK_C_GetInfo C_GetInfo;
  CK_C_GetFunctionList C_GetFunctionList;
  CK_C_GetSlotList C_GetSlotList;
  CK_C_GetSlotInfo C_GetSlotInfo;
  CK_C_GetTokenInfo C_GetTokenInfo;
  CK_C_GetMechanismList C_GetMechanismList;
  CK_C_GetMechanismInfo C_GetMechanismInfo;
  CK_C_InitToken C_InitToken;
  CK_C_InitPIN C_InitPIN;
  CK_C_SetPIN C_SetPIN;
  CK_C_OpenSession C_OpenSession;
  CK_C_CloseSession C_CloseSession;
  CK_C_CloseAllSessions C_CloseAllSessions;
  CK_C_GetSessionInfo C_GetSessionInfo;
  CK_C_GetOperationState C_GetOperationState;
  CK_C_SetOperationState C_SetOperationState;
  CK_C_Login C_Login;
  CK_C_Logout C_Logout;
  CK_C_CreateObject C_CreateObject;
  CK_C_CopyObject C_CopyObject;
  CK_C_DestroyObject C_DestroyObject;
  CK_C_GetObjectSize C_GetObjectSize;
  CK_C_GetAttributeValue C_GetAttributeValue;
  CK_C_SetAttributeValue C_SetAttributeValue;
  CK_C_FindObjectsInit C_FindObjectsInit;
  CK_C_FindObjects C_FindObjects;
  CK_C_FindObjectsFinal C_FindObjectsFinal;
  CK_C_EncryptInit C_EncryptInit;
  CK_C_Encrypt C_Encrypt;
  CK_C_EncryptUpdate C_EncryptUpdate;
  CK_C_EncryptFinal C_EncryptFinal;
  CK_C_DecryptInit C_DecryptInit;
  CK_C_Decrypt C_Decrypt;
  CK_C_DecryptUpdate C_DecryptUpdate;
  CK_C_DecryptFinal C_DecryptFinal;
  CK_C_DigestInit C_DigestInit;
  CK_C_Digest C_Digest;
  CK_C_DigestUpdate C_DigestUpdate;
  CK_C_DigestKey C_DigestKey;
  CK_C_DigestFinal C_DigestFinal;
  CK_C_SignInit C_SignInit;
  CK_C_Sign C_Sign;
  CK_C_SignUpdate C_SignUpdate;
  CK_C_SignFinal C_SignFinal;
  CK_C_SignRecoverInit C_SignRecoverInit;
  CK_C_SignRecover C_SignRecover;
  CK_C_VerifyInit C_VerifyInit;
  CK_C_Verify C_Verify;
  CK_C_VerifyUpdate C_VerifyUpdate;
  CK_C_VerifyFinal C_VerifyFinal;
  CK_C_VerifyRecoverInit C_VerifyRecoverInit;
  CK_C_VerifyRecover C_VerifyRecover;
  CK_C_DigestEncryptUpdate C_DigestEncryptUpdate;
  CK_C_DecryptDigestUpdate C_DecryptDigestUpdate;
  CK_C_SignEncryptUpdate C_SignEncryptUpdate;
  CK_C_DecryptVerifyUpdate C_DecryptVerifyUpdate;
  CK_C_GenerateKey C_GenerateKey;
  CK_C_GenerateKeyPair C_GenerateKeyPair;
  CK_C_WrapKey C_WrapKey;
  CK_C_UnwrapKey C_UnwrapKey;
  CK_C_DeriveKey C_DeriveKey;
  CK_C_SeedRandom C_SeedRandom;
  CK_C_GenerateRandom C_GenerateRandom;
  CK_C_GetFunctionStatus C_GetFunctionStatus;
  CK_C_CancelFunction C_CancelFunction;
  CK_C_WaitForSlotEvent C_WaitForSlotEvent;
  // New in 3.0, in pkcs11f.h order.
  GetInterfaceListFn C_GetInterfaceList;
  GetInterfaceFn C_GetInterface;
  LoginUserFn C_LoginUser;
  SessionCancelFn C_SessionCancel;
  MessageInitFn C_MessageEncryptInit;
  MessageCryptFn C_EncryptMessage;
  MessageCryptBeginFn C_EncryptMessageBegin;
  MessageCryptNextFn C_EncryptMessageNext;
  MessageFinalFn C_MessageEncryptFinal;
  MessageInitFn C_MessageDecryptInit;
  MessageCryptFn C_DecryptMessage;
  MessageCryptBeginFn C_DecryptMessageBegin;
  MessageCryptNextFn C_DecryptMessageNext;
  MessageFinalFn C_MessageDecryptFinal;
  MessageInitFn C_MessageSignInit;
  SignMessageFn C_SignMessage;
  MessageBeginFn C_SignMessageBegin;
  SignMessageFn C_SignMessageNext;
  MessageFinalFn C_MessageSignFinal;
  MessageInitFn C_MessageVerifyInit;
  VerifyMessageFn C_VerifyMessage;
  MessageBeginFn C_VerifyMessageBegin;
  VerifyMessageFn C_VerifyMessageNext;
  MessageFinalFn C_MessageVerifyFinal;
};

// Defined in module.cc.

// FunctionList240 returns the module's 2.40 function list (static storage).
CK_FUNCTION_LIST* FunctionList240();
// SessionCancel is C_SessionCancel: ends the session's active operations
// named in flags (CKF_SIGN, CKF_DECRYPT, CKF_DIGEST, CKF_FIND_OBJECTS);
// flags for operations the module never starts are accepted and ignored.
// Never throws.
CK_RV SessionCancel(CK_SESSION_HANDLE session, CK_FLAGS flags);

// Defined in interface3.cc.

// GetInterfaceList and GetInterface are C_GetInterfaceList and
// C_GetInterface: "PKCS 11" 3.0 first, then "PKCS 11" 2.40. The returned
// pointers are static.
CK_RV GetInterfaceList(Interface* list, CK_ULONG_PTR count);
CK_RV GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                   Interface** out, CK_FLAGS flags);

}  // namespace keyhold::pkcs11

#endif  // KEYHOLD_PKCS11_MODULE_INTERFACE3_H_
