// The C ABI of libkeyhold-pkcs11.so, loaded with dlopen() like any PKCS#11
// application loads it, against a real keyholdd (CMocka): exports and the
// PKCS#11 3.0 interfaces, info/slot/token, sessions and login, find
// templates, attribute reads by the spec's rules, error codes, signing (size
// queries, multi-part, bad parameters) and verification, certificate objects
// (C_CreateObject/C_DestroyObject), fork, many threads, and a daemon that
// goes down and comes back.
//
// The group setup starts one daemon and dlopens the module once (it is never
// dlclose()d: the client library's fork handlers stay registered). Each test
// starts from an empty key store and, unless it tests the uninitialized
// module, a fresh C_Initialize.
//
// CMocka's assert_* macros longjmp out of a failing test, so they are only
// used on the main thread and never in a forked child: threads count
// successes, children report through their exit code.
#include <dlfcn.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "common/ssl_ptr.h"
#include "tests/harness/daemon_process.h"

extern "C" {
#include <cmocka.h>
}

// Last: p11-kit's compatibility names are macros (value, count, ...).
#include <p11-kit/pkcs11.h>

namespace keyhold::testing {
namespace {

using Bytes = std::vector<uint8_t>;

// CK_INTERFACE (PKCS#11 3.0); p11-kit's 2.40 header lacks it.
struct Interface {
  CK_UTF8CHAR* name;
  CK_VOID_PTR function_list;
  CK_FLAGS flags;
};

// CK_FUNCTION_LIST_3_0 as an application sees it: the 2.40 list (same
// layout, no tail padding) followed by the 24 functions new in 3.0, in
// pkcs11f.h order.
using AnyFn = void (*)();
struct FunctionList30 {
  CK_FUNCTION_LIST v2;
  AnyFn extra[24];
};
enum Extra30 {
  kGetInterfaceList,
  kGetInterface,
  kLoginUser,
  kSessionCancel,
  kMessageEncryptInit,
  kEncryptMessage,
  kEncryptMessageBegin,
  kEncryptMessageNext,
  kMessageEncryptFinal,
  kMessageDecryptInit,
  kDecryptMessage,
  kDecryptMessageBegin,
  kDecryptMessageNext,
  kMessageDecryptFinal,
  kMessageSignInit,
  kSignMessage,
  kSignMessageBegin,
  kSignMessageNext,
  kMessageSignFinal,
  kMessageVerifyInit,
  kVerifyMessage,
  kVerifyMessageBegin,
  kVerifyMessageNext,
  kMessageVerifyFinal,
};
static_assert(sizeof(FunctionList30) == sizeof(void*) * (1 + 68 + 24));

using GetInterfaceListFn = CK_RV (*)(Interface*, CK_ULONG*);
using GetInterfaceFn = CK_RV (*)(CK_UTF8CHAR*, CK_VERSION*, Interface**,
                                 CK_FLAGS);
using LoginUserFn = CK_RV (*)(CK_SESSION_HANDLE, CK_USER_TYPE, CK_UTF8CHAR*,
                              CK_ULONG, CK_UTF8CHAR*, CK_ULONG);
using SessionCancelFn = CK_RV (*)(CK_SESSION_HANDLE, CK_FLAGS);
using MessageInitFn = CK_RV (*)(CK_SESSION_HANDLE, CK_MECHANISM*,
                                CK_OBJECT_HANDLE);
using MessageFinalFn = CK_RV (*)(CK_SESSION_HANDLE);
using MessageBeginFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG);
using MessageCryptFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG,
                                 CK_BYTE*, CK_ULONG, CK_BYTE*, CK_ULONG,
                                 CK_BYTE*, CK_ULONG*);
using MessageCryptBeginFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG,
                                      CK_BYTE*, CK_ULONG);
using MessageCryptNextFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG,
                                     CK_BYTE*, CK_ULONG, CK_BYTE*, CK_ULONG*,
                                     CK_FLAGS);
using SignMessageFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG,
                                CK_BYTE*, CK_ULONG, CK_BYTE*, CK_ULONG*);
using VerifyMessageFn = CK_RV (*)(CK_SESSION_HANDLE, CK_VOID_PTR, CK_ULONG,
                                  CK_BYTE*, CK_ULONG, CK_BYTE*, CK_ULONG);

template <typename F>
F Extra(const FunctionList30* l, Extra30 which) {
  return reinterpret_cast<F>(l->extra[which]);
}

constexpr CK_FLAGS kInterfaceForkSafe = 0x1;  // CKF_INTERFACE_FORK_SAFE
constexpr CK_FLAGS kFindObjects = 0x40;       // CKF_FIND_OBJECTS

// The group's state: one daemon, one loaded module.
struct Fixture {
  DaemonProcess daemon;
  std::unique_ptr<client::Client> client;
  void* lib = nullptr;
  CK_FUNCTION_LIST_PTR f = nullptr;
};
Fixture* g = nullptr;
int g_teardown_failures = 0;

CK_FUNCTION_LIST_PTR F() { return g->f; }

#define ASSERT_RV(expr, want) \
  assert_int_equal(static_cast<CK_RV>(expr), static_cast<CK_RV>(want))

int GroupSetup(void** /*state*/) {
  g = new Fixture();
  if (!g->daemon.Start()) {
    std::fprintf(stderr, "keyholdd did not start:\n%s\n",
                 g->daemon.log().c_str());
    return -1;
  }
  setenv("KEYHOLD_SOCKET", g->daemon.socket_path().c_str(), 1);
  g->client = std::make_unique<client::Client>(g->daemon.ClientOptions());
  g->lib = dlopen(KEYHOLD_PKCS11_PATH, RTLD_NOW | RTLD_LOCAL);
  if (g->lib == nullptr) {
    std::fprintf(stderr, "dlopen: %s\n", dlerror());
    return -1;
  }
  auto get = reinterpret_cast<CK_C_GetFunctionList>(
      dlsym(g->lib, "C_GetFunctionList"));
  if (get == nullptr || get(&g->f) != CKR_OK || g->f == nullptr) {
    std::fprintf(stderr, "C_GetFunctionList failed\n");
    return -1;
  }
  return 0;
}

// Stops the daemon cleanly (sanitizer builds run their exit checks) and
// fails the run if its log holds a sanitizer report.
int GroupTeardown(void** /*state*/) {
  if (g == nullptr) {
    return 0;
  }
  g->client.reset();
  if (g->daemon.Running()) {
    const int status = g->daemon.Stop();
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::fprintf(stderr, "keyholdd exited with status %d; log:\n%s\n", status,
                   g->daemon.log().c_str());
      ++g_teardown_failures;
    }
  }
  const std::string log = g->daemon.log();
  for (const char* marker : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                             "WARNING: ThreadSanitizer", "runtime error:"}) {
    if (log.find(marker) != std::string::npos) {
      std::fprintf(stderr, "sanitizer report in keyholdd's log:\n%s\n",
                   log.c_str());
      ++g_teardown_failures;
      break;
    }
  }
  delete g;
  g = nullptr;
  return 0;
}

// Every test starts with no keys.
int ClearKeys() {
  auto list = g->client->ListKeys(/*include_shared=*/false);
  if (!list.ok()) {
    return -1;
  }
  for (const v1::KeyInfo& info : (*list).keys()) {
    if (!g->client->DestroyKey(client::MakeKeyRef(info.name())).ok()) {
      return -1;
    }
  }
  return 0;
}

int Setup(void** /*state*/) {
  if (ClearKeys() != 0) {
    return -1;
  }
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  return F()->C_Initialize(&args) == CKR_OK ? 0 : -1;
}

int SetupUninitialized(void** /*state*/) { return ClearKeys(); }

int Teardown(void** /*state*/) {
  F()->C_Finalize(nullptr);  // CKR_CRYPTOKI_NOT_INITIALIZED is fine here
  return 0;
}

std::string MakeKey(const std::string& name, v1::KeyType type) {
  auto r = g->client->GenerateKey(client::MakeKeyRef(name), type);
  if (!r.ok()) {
    std::fprintf(stderr, "GenerateKey %s: %s\n", name.c_str(),
                 r.status().ToString().c_str());
  }
  assert_true(r.ok());
  return (*r).public_key();
}

CK_SESSION_HANDLE Open(CK_FLAGS flags = CKF_SERIAL_SESSION) {
  CK_SESSION_HANDLE s = 0;
  ASSERT_RV(F()->C_OpenSession(1, flags, nullptr, nullptr, &s), CKR_OK);
  return s;
}

// Runs a whole search; *rv (if given) receives C_FindObjectsInit's result.
std::vector<CK_OBJECT_HANDLE> Find(CK_SESSION_HANDLE s,
                                   std::vector<CK_ATTRIBUTE> t,
                                   CK_RV* rv = nullptr) {
  std::vector<CK_OBJECT_HANDLE> out;
  const CK_RV r = F()->C_FindObjectsInit(s, t.empty() ? nullptr : t.data(),
                                         static_cast<CK_ULONG>(t.size()));
  if (rv != nullptr) {
    *rv = r;
  } else {
    ASSERT_RV(r, CKR_OK);
  }
  if (r != CKR_OK) {
    return out;
  }
  CK_OBJECT_HANDLE buf[3];
  CK_ULONG n = 0;
  do {
    ASSERT_RV(F()->C_FindObjects(s, buf, 3, &n), CKR_OK);
    out.insert(out.end(), buf, buf + n);
  } while (n == 3);
  ASSERT_RV(F()->C_FindObjectsFinal(s), CKR_OK);
  return out;
}

CK_OBJECT_HANDLE FindKey(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls,
                         const std::string& label) {
  auto found = Find(s, {{CKA_CLASS, &cls, sizeof cls},
                        {CKA_LABEL, const_cast<char*>(label.data()),
                         static_cast<CK_ULONG>(label.size())}});
  assert_int_equal(found.size(), 1);
  return found[0];
}

CK_OBJECT_HANDLE PrivateKey(CK_SESSION_HANDLE s, const std::string& label) {
  return FindKey(s, CKO_PRIVATE_KEY, label);
}

// Signs a digest with CKM_ECDSA through list f; empty on any failure. Safe
// to call from other threads and forked children (no asserts).
Bytes SignEcdsaWith(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s,
                    CK_OBJECT_HANDLE key, const Bytes& digest) {
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  if (f->C_SignInit(s, &m, key) != CKR_OK) {
    return {};
  }
  Bytes data = digest;
  Bytes sig(256);
  CK_ULONG len = static_cast<CK_ULONG>(sig.size());
  if (f->C_Sign(s, data.data(), static_cast<CK_ULONG>(data.size()), sig.data(),
                &len) != CKR_OK) {
    return {};
  }
  sig.resize(len);
  return sig;
}

Bytes SignEcdsa(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                const Bytes& digest) {
  return SignEcdsaWith(F(), s, key, digest);
}

Bytes Sha256(const std::string& msg) {
  Bytes d(32);
  SHA256(reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
         d.data());
  return d;
}

// Verifies a raw r||s P-256 signature over digest with the DER SPKI.
bool VerifyEcdsa(const std::string& spki, const Bytes& digest,
                 const Bytes& raw) {
  if (raw.size() != 64) {
    return false;
  }
  const auto* p = reinterpret_cast<const unsigned char*>(spki.data());
  SslPtr<EVP_PKEY> pkey(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  ECDSA_SIG* sig = ECDSA_SIG_new();
  ECDSA_SIG_set0(sig, BN_bin2bn(raw.data(), 32, nullptr),
                 BN_bin2bn(raw.data() + 32, 32, nullptr));
  unsigned char* der = nullptr;
  const int der_len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(pkey.get(), nullptr));
  const bool ok = ctx != nullptr && EVP_PKEY_verify_init(ctx.get()) == 1 &&
                  EVP_PKEY_verify(ctx.get(), der, static_cast<size_t>(der_len),
                                  digest.data(), digest.size()) == 1;
  OPENSSL_free(der);
  return ok;
}

std::string Padded(const CK_UTF8CHAR* field, size_t n) {
  return std::string(reinterpret_cast<const char*>(field), n);
}

std::string Pad(const std::string& s, size_t n) {
  return s + std::string(n - s.size(), ' ');
}

GetInterfaceListFn InterfaceListExport() {
  auto fn =
      reinterpret_cast<GetInterfaceListFn>(dlsym(g->lib, "C_GetInterfaceList"));
  assert_non_null(fn);
  return fn;
}

GetInterfaceFn InterfaceExport() {
  auto fn = reinterpret_cast<GetInterfaceFn>(dlsym(g->lib, "C_GetInterface"));
  assert_non_null(fn);
  return fn;
}

// ---------------------------------------------------------------------------
// Exports and interfaces.

void ExportsOnlyTheEntryPoints(void** /*state*/) {
  assert_non_null(dlsym(g->lib, "C_GetFunctionList"));
  assert_null(dlsym(g->lib, "C_Initialize"));
  assert_null(dlsym(g->lib, "C_Sign"));
  assert_null(dlsym(g->lib, "C_LoginUser"));
  assert_null(dlsym(g->lib, "C_SessionCancel"));
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(
      dlsym(g->lib, "C_GetFunctionList"));
  ASSERT_RV(get_list(nullptr), CKR_ARGUMENTS_BAD);
  CK_FUNCTION_LIST_PTR again = nullptr;
  ASSERT_RV(get_list(&again), CKR_OK);
  assert_ptr_equal(again, F());
  ASSERT_RV(F()->C_GetFunctionList(&again), CKR_OK);
  assert_ptr_equal(again, F());
  assert_int_equal(F()->version.major, 2);
  assert_int_equal(F()->version.minor, 40);

  auto list = InterfaceListExport();
  auto get = InterfaceExport();
  CK_ULONG n = 0;
  ASSERT_RV(list(nullptr, nullptr), CKR_ARGUMENTS_BAD);
  ASSERT_RV(list(nullptr, &n), CKR_OK);
  assert_int_equal(n, 2);
  Interface two[2]{};
  CK_ULONG one = 1;
  ASSERT_RV(list(two, &one), CKR_BUFFER_TOO_SMALL);
  assert_int_equal(one, 2);
  ASSERT_RV(list(two, &n), CKR_OK);
  assert_int_equal(n, 2);
  for (const Interface& i : two) {
    assert_string_equal(reinterpret_cast<char*>(i.name), "PKCS 11");
    assert_int_equal(i.flags, 0);
  }
  // 3.0 first, then the very list C_GetFunctionList returns.
  const auto* v30 = static_cast<const CK_VERSION*>(two[0].function_list);
  assert_int_equal(v30->major, 3);
  assert_int_equal(v30->minor, 0);
  assert_ptr_equal(two[1].function_list, F());

  // C_GetInterface: no name and no version picks 3.0.
  Interface* iface = nullptr;
  ASSERT_RV(get(nullptr, nullptr, &iface, 0), CKR_OK);
  assert_ptr_equal(iface->function_list, two[0].function_list);
  char name[] = "PKCS 11";
  auto* uname = reinterpret_cast<CK_UTF8CHAR*>(name);
  ASSERT_RV(get(uname, nullptr, &iface, 0), CKR_OK);
  assert_ptr_equal(iface->function_list, two[0].function_list);
  CK_VERSION want30{3, 0};
  ASSERT_RV(get(uname, &want30, &iface, 0), CKR_OK);
  assert_ptr_equal(iface->function_list, two[0].function_list);
  CK_VERSION want240{2, 40};
  ASSERT_RV(get(nullptr, &want240, &iface, 0), CKR_OK);
  assert_ptr_equal(iface->function_list, F());
  CK_VERSION want31{3, 1};
  ASSERT_RV(get(nullptr, &want31, &iface, 0), CKR_ARGUMENTS_BAD);
  char other[] = "Vendor thing";
  ASSERT_RV(get(reinterpret_cast<CK_UTF8CHAR*>(other), nullptr, &iface, 0),
            CKR_ARGUMENTS_BAD);
  ASSERT_RV(get(nullptr, nullptr, &iface, kInterfaceForkSafe),
            CKR_ARGUMENTS_BAD);
  ASSERT_RV(get(nullptr, nullptr, nullptr, 0), CKR_ARGUMENTS_BAD);
}

const FunctionList30* List30() {
  Interface* iface = nullptr;
  ASSERT_RV(InterfaceExport()(nullptr, nullptr, &iface, 0), CKR_OK);
  return static_cast<const FunctionList30*>(iface->function_list);
}

void Interface30SignsAndRefusesMessages(void** /*state*/) {
  const FunctionList30* l = List30();
  assert_int_equal(l->v2.version.major, 3);
  assert_int_equal(l->v2.version.minor, 0);
  // The list's own discovery entries agree with the exports.
  CK_ULONG n = 0;
  ASSERT_RV(Extra<GetInterfaceListFn>(l, kGetInterfaceList)(nullptr, &n),
            CKR_OK);
  assert_int_equal(n, 2);
  Interface* iface = nullptr;
  CK_VERSION want240{2, 40};
  ASSERT_RV(
      Extra<GetInterfaceFn>(l, kGetInterface)(nullptr, &want240, &iface, 0),
      CKR_OK);
  assert_ptr_equal(iface->function_list, F());
  CK_FUNCTION_LIST_PTR via30 = nullptr;
  ASSERT_RV(l->v2.C_GetFunctionList(&via30), CKR_OK);
  assert_ptr_equal(via30, F());

  // C_GetInfo through 3.0 says 3.0; through 2.40 it says 2.40.
  CK_INFO info;
  ASSERT_RV(l->v2.C_GetInfo(&info), CKR_OK);
  assert_int_equal(info.cryptokiVersion.major, 3);
  assert_int_equal(info.cryptokiVersion.minor, 0);
  ASSERT_RV(F()->C_GetInfo(&info), CKR_OK);
  assert_int_equal(info.cryptokiVersion.major, 2);
  assert_int_equal(info.cryptokiVersion.minor, 40);

  // The 2.40 entries work through the 3.0 list (same module state).
  const std::string spki = MakeKey("ec", v1::EC_P256);
  auto* f30 = const_cast<CK_FUNCTION_LIST*>(&l->v2);
  CK_SESSION_HANDLE s = 0;
  ASSERT_RV(f30->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &s),
            CKR_OK);
  const CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  const Bytes digest = Sha256("3.0");
  assert_true(VerifyEcdsa(spki, digest, SignEcdsaWith(f30, s, key, digest)));
  CK_MECHANISM m256{CKM_ECDSA_SHA256, nullptr, 0};
  ASSERT_RV(f30->C_SignInit(s, &m256, key), CKR_OK);
  std::string msg = "3.0";
  ASSERT_RV(f30->C_SignUpdate(s, reinterpret_cast<CK_BYTE_PTR>(msg.data()),
                              static_cast<CK_ULONG>(msg.size())),
            CKR_OK);
  Bytes sig(64);
  CK_ULONG len = 64;
  ASSERT_RV(f30->C_SignFinal(s, sig.data(), &len), CKR_OK);
  assert_true(VerifyEcdsa(spki, digest, sig));

  // C_LoginUser: accepted like C_Login, whatever the PIN and user name.
  char pin[] = "any", user[] = "someone";
  auto login_user = Extra<LoginUserFn>(l, kLoginUser);
  ASSERT_RV(login_user(s, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin), 3,
                       reinterpret_cast<CK_UTF8CHAR*>(user), 7),
            CKR_OK);
  CK_SESSION_INFO si;
  ASSERT_RV(f30->C_GetSessionInfo(s, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RO_USER_FUNCTIONS);
  ASSERT_RV(login_user(s, CKU_USER, nullptr, 0, nullptr, 0),
            CKR_USER_ALREADY_LOGGED_IN);
  ASSERT_RV(f30->C_Logout(s), CKR_OK);
  ASSERT_RV(login_user(s, CKU_USER, nullptr, 0, nullptr, 0), CKR_OK);
  ASSERT_RV(login_user(s, 77, nullptr, 0, nullptr, 0), CKR_USER_TYPE_INVALID);
  ASSERT_RV(login_user(999, CKU_USER, nullptr, 0, nullptr, 0),
            CKR_SESSION_HANDLE_INVALID);

  // C_SessionCancel ends the active sign, digest and find operations.
  auto cancel = Extra<SessionCancelFn>(l, kSessionCancel);
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  ASSERT_RV(f30->C_SignInit(s, &m, key), CKR_OK);
  ASSERT_RV(cancel(s, CKF_SIGN), CKR_OK);
  Bytes data = digest;
  len = 64;
  ASSERT_RV(f30->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(f30->C_SignInit(s, &m, key), CKR_OK);  // a new one can start
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  ASSERT_RV(f30->C_DigestInit(s, &sha), CKR_OK);
  ASSERT_RV(f30->C_FindObjectsInit(s, nullptr, 0), CKR_OK);
  ASSERT_RV(cancel(s, CKF_DIGEST | kFindObjects), CKR_OK);
  ASSERT_RV(f30->C_DigestUpdate(s, data.data(), 32),
            CKR_OPERATION_NOT_INITIALIZED);
  CK_OBJECT_HANDLE h = 0;
  ASSERT_RV(f30->C_FindObjects(s, &h, 1, &n), CKR_OPERATION_NOT_INITIALIZED);
  // The sign operation was not named, so it is still active.
  len = 64;
  ASSERT_RV(f30->C_Sign(s, data.data(), 32, sig.data(), &len), CKR_OK);
  assert_true(VerifyEcdsa(spki, digest, sig));
  ASSERT_RV(cancel(s, CKF_SIGN | CKF_DECRYPT | CKF_VERIFY), CKR_OK);  // idle
  ASSERT_RV(cancel(999, CKF_SIGN), CKR_SESSION_HANDLE_INVALID);

  // No message mechanisms: every message-based function is not supported.
  CK_BYTE buf[16] = {};
  CK_ULONG out_len = sizeof buf;
  ASSERT_RV(Extra<MessageInitFn>(l, kMessageEncryptInit)(s, &m, key),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptFn>(l, kEncryptMessage)(s, nullptr, 0, nullptr, 0,
                                                      buf, 1, buf, &out_len),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptBeginFn>(l, kEncryptMessageBegin)(s, nullptr, 0,
                                                                nullptr, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptNextFn>(l, kEncryptMessageNext)(
                s, nullptr, 0, buf, 1, buf, &out_len, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageFinalFn>(l, kMessageEncryptFinal)(s),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageInitFn>(l, kMessageDecryptInit)(s, &m, key),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptFn>(l, kDecryptMessage)(s, nullptr, 0, nullptr, 0,
                                                      buf, 1, buf, &out_len),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptBeginFn>(l, kDecryptMessageBegin)(s, nullptr, 0,
                                                                nullptr, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageCryptNextFn>(l, kDecryptMessageNext)(
                s, nullptr, 0, buf, 1, buf, &out_len, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageFinalFn>(l, kMessageDecryptFinal)(s),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageInitFn>(l, kMessageSignInit)(s, &m, key),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<SignMessageFn>(l, kSignMessage)(s, nullptr, 0, buf, 1, buf,
                                                  &out_len),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageBeginFn>(l, kSignMessageBegin)(s, nullptr, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<SignMessageFn>(l, kSignMessageNext)(s, nullptr, 0, buf, 1,
                                                      buf, &out_len),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageFinalFn>(l, kMessageSignFinal)(s),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageInitFn>(l, kMessageVerifyInit)(s, &m, key),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(
      Extra<VerifyMessageFn>(l, kVerifyMessage)(s, nullptr, 0, buf, 1, buf, 1),
      CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageBeginFn>(l, kVerifyMessageBegin)(s, nullptr, 0),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<VerifyMessageFn>(l, kVerifyMessageNext)(s, nullptr, 0, buf, 1,
                                                          buf, 1),
            CKR_FUNCTION_NOT_SUPPORTED);
  ASSERT_RV(Extra<MessageFinalFn>(l, kMessageVerifyFinal)(s),
            CKR_FUNCTION_NOT_SUPPORTED);
  // No mechanism advertises a message operation.
  CK_ULONG count = 0;
  ASSERT_RV(f30->C_GetMechanismList(1, nullptr, &count), CKR_OK);
  std::vector<CK_MECHANISM_TYPE> mechs(count);
  ASSERT_RV(f30->C_GetMechanismList(1, mechs.data(), &count), CKR_OK);
  for (CK_MECHANISM_TYPE type : mechs) {
    CK_MECHANISM_INFO mi;
    ASSERT_RV(f30->C_GetMechanismInfo(1, type, &mi), CKR_OK);
    assert_int_equal(mi.flags & 0x3eUL, 0);  // CKF_MESSAGE_*, CKF_MULTI_...
  }
  ASSERT_RV(f30->C_CloseSession(s), CKR_OK);
}

// ---------------------------------------------------------------------------
// General, slot and token.

void NotInitialized(void** /*state*/) {
  CK_INFO info;
  ASSERT_RV(F()->C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_ULONG n = 0;
  ASSERT_RV(F()->C_GetSlotList(CK_TRUE, nullptr, &n),
            CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_SLOT_INFO slot_info;
  ASSERT_RV(F()->C_GetSlotInfo(1, &slot_info), CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_TOKEN_INFO token;
  ASSERT_RV(F()->C_GetTokenInfo(1, &token), CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_SESSION_HANDLE s = 0;
  ASSERT_RV(F()->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &s),
            CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_CloseSession(1), CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_FindObjectsInit(1, nullptr, 0),
            CKR_CRYPTOKI_NOT_INITIALIZED);
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(1, &m, 2), CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_Finalize(nullptr), CKR_CRYPTOKI_NOT_INITIALIZED);
  // Bad C_Initialize arguments leave the module uninitialized.
  CK_C_INITIALIZE_ARGS args{};
  int reserved = 0;
  args.pReserved = &reserved;
  ASSERT_RV(F()->C_Initialize(&args), CKR_ARGUMENTS_BAD);
  args = {};
  args.CreateMutex = [](CK_VOID_PTR_PTR) -> CK_RV { return CKR_OK; };
  ASSERT_RV(F()->C_Initialize(&args), CKR_ARGUMENTS_BAD);  // 1 of 4
  ASSERT_RV(F()->C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_Finalize(nullptr), CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_Initialize(nullptr), CKR_OK);
  ASSERT_RV(F()->C_Finalize(&reserved), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_Finalize(nullptr), CKR_OK);
}

void DigestsInTheModule(void** /*state*/) {
  CK_SESSION_HANDLE s = Open();
  CK_MECHANISM m{CKM_SHA256, nullptr, 0};
  ASSERT_RV(F()->C_DigestInit(s, &m), CKR_OK);
  std::string msg = "hello";
  CK_ULONG len = 0;
  ASSERT_RV(F()->C_Digest(s, reinterpret_cast<CK_BYTE_PTR>(msg.data()), 5,
                          nullptr, &len),
            CKR_OK);
  assert_int_equal(len, 32);
  Bytes out(32);
  ASSERT_RV(F()->C_Digest(s, reinterpret_cast<CK_BYTE_PTR>(msg.data()), 5,
                          out.data(), &len),
            CKR_OK);
  assert_true(out == Sha256("hello"));
  CK_MECHANISM md5{CKM_MD5, nullptr, 0};
  ASSERT_RV(F()->C_DigestInit(s, &md5), CKR_MECHANISM_INVALID);
  CK_ULONG junk = 1;
  CK_MECHANISM with_param{CKM_SHA256, &junk, sizeof junk};
  ASSERT_RV(F()->C_DigestInit(s, &with_param), CKR_MECHANISM_PARAM_INVALID);
  ASSERT_RV(F()->C_DigestUpdate(s, out.data(), 1),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_DigestFinal(s, out.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_DigestInit(s, nullptr), CKR_ARGUMENTS_BAD);
}

void InfoSlotAndToken(void** /*state*/) {
  ASSERT_RV(F()->C_Initialize(nullptr), CKR_CRYPTOKI_ALREADY_INITIALIZED);
  CK_INFO info;
  ASSERT_RV(F()->C_GetInfo(&info), CKR_OK);
  assert_int_equal(info.cryptokiVersion.major, 2);
  assert_int_equal(info.cryptokiVersion.minor, 40);
  assert_string_equal(Padded(info.manufacturerID, 32).c_str(),
                      Pad("keyhold", 32).c_str());
  assert_string_equal(Padded(info.libraryDescription, 32).c_str(),
                      Pad("keyhold PKCS#11 module", 32).c_str());
  assert_int_equal(info.flags, 0);
  ASSERT_RV(F()->C_GetInfo(nullptr), CKR_ARGUMENTS_BAD);

  CK_ULONG n = 0;
  ASSERT_RV(F()->C_GetSlotList(CK_TRUE, nullptr, &n), CKR_OK);
  assert_int_equal(n, 1);
  ASSERT_RV(F()->C_GetSlotList(CK_FALSE, nullptr, &n), CKR_OK);
  assert_int_equal(n, 1);
  CK_SLOT_ID slot = 0;
  CK_ULONG zero = 0;
  ASSERT_RV(F()->C_GetSlotList(CK_TRUE, &slot, &zero), CKR_BUFFER_TOO_SMALL);
  assert_int_equal(zero, 1);
  ASSERT_RV(F()->C_GetSlotList(CK_TRUE, &slot, &n), CKR_OK);
  assert_int_equal(slot, 1);
  ASSERT_RV(F()->C_GetSlotList(CK_TRUE, &slot, nullptr), CKR_ARGUMENTS_BAD);

  CK_SLOT_INFO si;
  ASSERT_RV(F()->C_GetSlotInfo(slot, &si), CKR_OK);
  assert_string_equal(Padded(si.slotDescription, 64).c_str(),
                      Pad("keyhold daemon", 64).c_str());
  assert_string_equal(Padded(si.manufacturerID, 32).c_str(),
                      Pad("keyhold", 32).c_str());
  assert_int_equal(si.flags, CKF_TOKEN_PRESENT);  // not removable, not HW
  ASSERT_RV(F()->C_GetSlotInfo(slot + 7, &si), CKR_SLOT_ID_INVALID);
  ASSERT_RV(F()->C_GetSlotInfo(slot, nullptr), CKR_ARGUMENTS_BAD);

  CK_SESSION_HANDLE ro = Open();
  Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CK_TOKEN_INFO token;
  ASSERT_RV(F()->C_GetTokenInfo(slot, &token), CKR_OK);
  assert_string_equal(Padded(token.label, 32).c_str(),
                      Pad("keyhold", 32).c_str());
  assert_string_equal(Padded(token.manufacturerID, 32).c_str(),
                      Pad("keyhold", 32).c_str());
  assert_string_equal(Padded(token.model, 16).c_str(),
                      Pad("keyholdd", 16).c_str());
  assert_string_equal(Padded(token.serialNumber, 16).c_str(),
                      Pad("uid" + std::to_string(geteuid()), 16).c_str());
  assert_true((token.flags & CKF_TOKEN_INITIALIZED) != 0);
  assert_true((token.flags & CKF_USER_PIN_INITIALIZED) != 0);
  assert_true((token.flags & CKF_RNG) != 0);
  assert_int_equal(token.flags & CKF_LOGIN_REQUIRED, 0);
  assert_int_equal(token.flags & CKF_WRITE_PROTECTED, 0);
  assert_int_equal(token.flags & CKF_PROTECTED_AUTHENTICATION_PATH, 0);
  assert_int_equal(token.ulSessionCount, 2);
  assert_int_equal(token.ulRwSessionCount, 1);
  assert_int_equal(token.ulMaxSessionCount, CK_EFFECTIVELY_INFINITE);
  ASSERT_RV(F()->C_CloseSession(ro), CKR_OK);
  ASSERT_RV(F()->C_GetTokenInfo(slot, &token), CKR_OK);
  assert_int_equal(token.ulSessionCount, 1);
  ASSERT_RV(F()->C_GetTokenInfo(slot + 7, &token), CKR_SLOT_ID_INVALID);
  ASSERT_RV(F()->C_GetTokenInfo(slot, nullptr), CKR_ARGUMENTS_BAD);

  CK_MECHANISM_INFO mi;
  ASSERT_RV(F()->C_GetMechanismInfo(slot, CKM_ECDSA, &mi), CKR_OK);
  assert_true((mi.flags & CKF_SIGN) != 0);
  ASSERT_RV(F()->C_GetMechanismInfo(slot, CKM_AES_CBC, &mi),
            CKR_MECHANISM_INVALID);
  ASSERT_RV(F()->C_GetMechanismInfo(slot + 7, CKM_ECDSA, &mi),
            CKR_SLOT_ID_INVALID);
  ASSERT_RV(F()->C_GetMechanismList(slot, nullptr, nullptr), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_Finalize(nullptr), CKR_OK);
  ASSERT_RV(F()->C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
  ASSERT_RV(F()->C_Initialize(nullptr), CKR_OK);
}

// ---------------------------------------------------------------------------
// Sessions and login.

void SessionsAndLogin(void** /*state*/) {
  CK_SESSION_HANDLE s = 0;
  // CKF_SERIAL_SESSION missing: the spec's code is
  // CKR_SESSION_PARALLEL_NOT_SUPPORTED.
  ASSERT_RV(F()->C_OpenSession(1, 0, nullptr, nullptr, &s),
            CKR_SESSION_PARALLEL_NOT_SUPPORTED);
  ASSERT_RV(F()->C_OpenSession(1, CKF_RW_SESSION, nullptr, nullptr, &s),
            CKR_SESSION_PARALLEL_NOT_SUPPORTED);
  ASSERT_RV(F()->C_OpenSession(8, CKF_SERIAL_SESSION, nullptr, nullptr, &s),
            CKR_SLOT_ID_INVALID);
  ASSERT_RV(
      F()->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, nullptr),
      CKR_ARGUMENTS_BAD);
  s = Open();
  CK_SESSION_INFO si;
  ASSERT_RV(F()->C_GetSessionInfo(s, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RO_PUBLIC_SESSION);
  assert_int_equal(si.slotID, 1);
  assert_int_equal(si.flags, CKF_SERIAL_SESSION);
  ASSERT_RV(F()->C_GetSessionInfo(s, nullptr), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_Login(s, CKU_USER, nullptr, 0), CKR_OK);
  ASSERT_RV(F()->C_Login(s, CKU_USER, nullptr, 0), CKR_USER_ALREADY_LOGGED_IN);
  ASSERT_RV(F()->C_GetSessionInfo(s, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RO_USER_FUNCTIONS);
  ASSERT_RV(F()->C_Logout(s), CKR_OK);
  ASSERT_RV(F()->C_Logout(s), CKR_USER_NOT_LOGGED_IN);
  // Any PIN is accepted: the identity is the caller's uid.
  char pin[] = "123456";
  ASSERT_RV(F()->C_Login(s, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin), 6),
            CKR_OK);
  ASSERT_RV(F()->C_Logout(s), CKR_OK);
  ASSERT_RV(F()->C_Login(s, 42, nullptr, 0), CKR_USER_TYPE_INVALID);
  CK_SESSION_HANDLE rw = Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  ASSERT_RV(F()->C_GetSessionInfo(rw, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RW_PUBLIC_SESSION);
  // Login state is per application: one login covers every session.
  ASSERT_RV(F()->C_Login(rw, CKU_USER, nullptr, 0), CKR_OK);
  ASSERT_RV(F()->C_GetSessionInfo(s, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RO_USER_FUNCTIONS);
  ASSERT_RV(F()->C_GetSessionInfo(rw, &si), CKR_OK);
  assert_int_equal(si.state, CKS_RW_USER_FUNCTIONS);
  ASSERT_RV(F()->C_Logout(s), CKR_OK);

  ASSERT_RV(F()->C_CloseSession(s), CKR_OK);
  ASSERT_RV(F()->C_CloseSession(s), CKR_SESSION_HANDLE_INVALID);
  ASSERT_RV(F()->C_GetSessionInfo(s, &si), CKR_SESSION_HANDLE_INVALID);
  ASSERT_RV(F()->C_Login(s, CKU_USER, nullptr, 0), CKR_SESSION_HANDLE_INVALID);
  ASSERT_RV(F()->C_FindObjectsInit(s, nullptr, 0), CKR_SESSION_HANDLE_INVALID);
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &m, 2), CKR_SESSION_HANDLE_INVALID);
  ASSERT_RV(F()->C_CloseAllSessions(8), CKR_SLOT_ID_INVALID);
  ASSERT_RV(F()->C_GetSessionInfo(rw, &si), CKR_OK);  // untouched
  CK_SESSION_HANDLE third = Open();
  ASSERT_RV(F()->C_CloseAllSessions(1), CKR_OK);
  ASSERT_RV(F()->C_GetSessionInfo(rw, &si), CKR_SESSION_HANDLE_INVALID);
  ASSERT_RV(F()->C_CloseSession(third), CKR_SESSION_HANDLE_INVALID);
  CK_TOKEN_INFO token;
  ASSERT_RV(F()->C_GetTokenInfo(1, &token), CKR_OK);
  assert_int_equal(token.ulSessionCount, 0);
  // Handles are not reused after C_CloseAllSessions.
  CK_SESSION_HANDLE fresh = Open();
  assert_true(fresh != s && fresh != rw && fresh != third);
  ASSERT_RV(F()->C_CloseSession(fresh), CKR_OK);
}

// ---------------------------------------------------------------------------
// Objects.

void FindTemplatesAndAttributes(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  MakeKey("rsa", v1::RSA_2048);
  CK_SESSION_HANDLE s = Open();
  // Empty template: every object, a private and a public one per key.
  assert_int_equal(Find(s, {}).size(), 4);
  CK_OBJECT_CLASS priv = CKO_PRIVATE_KEY, pub = CKO_PUBLIC_KEY;
  assert_int_equal(Find(s, {{CKA_CLASS, &priv, sizeof priv}}).size(), 2);
  assert_int_equal(Find(s, {{CKA_CLASS, &pub, sizeof pub}}).size(), 2);
  CK_OBJECT_CLASS cert = CKO_DATA;
  assert_int_equal(Find(s, {{CKA_CLASS, &cert, sizeof cert}}).size(), 0);
  CK_KEY_TYPE rsa = CKK_RSA, ec = CKK_EC;
  assert_int_equal(Find(s, {{CKA_KEY_TYPE, &rsa, sizeof rsa}}).size(), 2);
  assert_int_equal(Find(s, {{CKA_KEY_TYPE, &ec, sizeof ec}}).size(), 2);
  Bytes id(32);
  SHA256(reinterpret_cast<const unsigned char*>(spki.data()), spki.size(),
         id.data());
  assert_int_equal(Find(s, {{CKA_ID, id.data(), 32}}).size(), 2);
  assert_int_equal(
      Find(s, {{CKA_ID, id.data(), 32}, {CKA_CLASS, &priv, sizeof priv}})
          .size(),
      1);
  char ec_label[] = "ec", rsa_label[] = "rsa";
  const auto by_label = Find(s, {{CKA_LABEL, ec_label, 2}});
  assert_int_equal(by_label.size(), 2);
  // A template that matches each attribute somewhere but no object as a
  // whole; a value of the wrong length; a label that does not exist.
  assert_int_equal(
      Find(s, {{CKA_LABEL, rsa_label, 3}, {CKA_KEY_TYPE, &ec, sizeof ec}})
          .size(),
      0);
  assert_int_equal(Find(s, {{CKA_ID, id.data(), 31}}).size(), 0);
  char nope[] = "nope";
  assert_int_equal(Find(s, {{CKA_LABEL, nope, 4}}).size(), 0);
  CK_RV rv = CKR_OK;
  Find(s, {{CKA_LABEL, nullptr, 4}}, &rv);
  ASSERT_RV(rv, CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_FindObjectsInit(s, nullptr, 1), CKR_ARGUMENTS_BAD);
  // Operation state errors.
  CK_OBJECT_HANDLE h = 0;
  CK_ULONG n = 0;
  ASSERT_RV(F()->C_FindObjects(s, &h, 1, &n), CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_FindObjectsFinal(s), CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_FindObjectsInit(s, nullptr, 0), CKR_OK);
  ASSERT_RV(F()->C_FindObjectsInit(s, nullptr, 0), CKR_OPERATION_ACTIVE);
  ASSERT_RV(F()->C_FindObjects(s, &h, 1, nullptr), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_FindObjects(s, nullptr, 1, &n), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_FindObjectsFinal(s), CKR_OK);

  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  // Length query, exact read, too small, unknown, sensitive: in one call.
  uint8_t label[2];
  CK_BBOOL sensitive = CK_FALSE, extractable = CK_TRUE, always_auth = CK_TRUE;
  uint8_t small[4];
  CK_ATTRIBUTE t[] = {
      {CKA_EC_POINT, nullptr, 0},
      {CKA_LABEL, label, sizeof label},
      {CKA_EC_PARAMS, small, sizeof small},
      {CKA_SENSITIVE, &sensitive, sizeof sensitive},
      {CKA_EXTRACTABLE, &extractable, sizeof extractable},
      {CKA_ALWAYS_AUTHENTICATE, &always_auth, sizeof always_auth},
      {CKA_VALUE, small, sizeof small},
      {0x8123456UL, small, sizeof small},
  };
  const CK_RV got = F()->C_GetAttributeValue(s, key, t, 8);
  assert_true(got == CKR_BUFFER_TOO_SMALL || got == CKR_ATTRIBUTE_SENSITIVE ||
              got == CKR_ATTRIBUTE_TYPE_INVALID);
  assert_int_equal(t[0].ulValueLen, 67);  // 04 41 04 X Y
  assert_int_equal(t[1].ulValueLen, 2);
  assert_memory_equal(label, "ec", 2);
  assert_int_equal(t[2].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(sensitive, CK_TRUE);
  assert_int_equal(extractable, CK_FALSE);
  assert_int_equal(always_auth, CK_FALSE);
  assert_int_equal(t[6].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(t[7].ulValueLen, CK_UNAVAILABLE_INFORMATION);

  // One attribute at a time: each rule on its own.
  CK_ATTRIBUTE one = {CKA_VALUE, small, sizeof small};
  ASSERT_RV(F()->C_GetAttributeValue(s, key, &one, 1), CKR_ATTRIBUTE_SENSITIVE);
  assert_int_equal(one.ulValueLen, CK_UNAVAILABLE_INFORMATION);
  one = {CKA_VALUE, nullptr, 0};  // a length query does not get around it
  ASSERT_RV(F()->C_GetAttributeValue(s, key, &one, 1), CKR_ATTRIBUTE_SENSITIVE);
  assert_int_equal(one.ulValueLen, CK_UNAVAILABLE_INFORMATION);
  one = {0x8123456UL, small, sizeof small};
  ASSERT_RV(F()->C_GetAttributeValue(s, key, &one, 1),
            CKR_ATTRIBUTE_TYPE_INVALID);
  assert_int_equal(one.ulValueLen, CK_UNAVAILABLE_INFORMATION);
  one = {CKA_LABEL, small, 1};
  ASSERT_RV(F()->C_GetAttributeValue(s, key, &one, 1), CKR_BUFFER_TOO_SMALL);
  assert_int_equal(one.ulValueLen, CK_UNAVAILABLE_INFORMATION);
  ASSERT_RV(F()->C_GetAttributeValue(s, 999999, &one, 1),
            CKR_OBJECT_HANDLE_INVALID);
  ASSERT_RV(F()->C_GetAttributeValue(s, key, nullptr, 1), CKR_ARGUMENTS_BAD);

  // The key attributes an application relies on, all readable together.
  CK_OBJECT_CLASS cls = 0;
  CK_KEY_TYPE kt = 0;
  CK_BBOOL token = CK_FALSE, is_private = CK_FALSE, sign = CK_FALSE;
  CK_BBOOL always_sensitive = CK_FALSE, never_extractable = CK_FALSE;
  uint8_t got_id[32];
  uint8_t params[16];
  CK_ATTRIBUTE attrs[] = {
      {CKA_CLASS, &cls, sizeof cls},
      {CKA_KEY_TYPE, &kt, sizeof kt},
      {CKA_TOKEN, &token, sizeof token},
      {CKA_PRIVATE, &is_private, sizeof is_private},
      {CKA_SIGN, &sign, sizeof sign},
      {CKA_ALWAYS_SENSITIVE, &always_sensitive, sizeof always_sensitive},
      {CKA_NEVER_EXTRACTABLE, &never_extractable, sizeof never_extractable},
      {CKA_ID, got_id, sizeof got_id},
      {CKA_EC_PARAMS, params, sizeof params},
  };
  ASSERT_RV(F()->C_GetAttributeValue(s, key, attrs, 9), CKR_OK);
  assert_int_equal(cls, CKO_PRIVATE_KEY);
  assert_int_equal(kt, CKK_EC);
  assert_int_equal(token, CK_TRUE);
  assert_int_equal(is_private, CK_TRUE);
  assert_int_equal(sign, CK_TRUE);
  assert_int_equal(always_sensitive, CK_TRUE);
  assert_int_equal(never_extractable, CK_TRUE);
  assert_memory_equal(got_id, id.data(), 32);
  const uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                          0xce, 0x3d, 0x03, 0x01, 0x07};
  assert_int_equal(attrs[8].ulValueLen, sizeof p256);
  assert_memory_equal(params, p256, sizeof p256);

  // The public key: the same CKA_ID, readable key material, nothing
  // sensitive.
  const CK_OBJECT_HANDLE pub_key = FindKey(s, CKO_PUBLIC_KEY, "rsa");
  CK_ULONG bits = 0;
  uint8_t e[8];
  CK_ATTRIBUTE rsa_pub[] = {
      {CKA_MODULUS, nullptr, 0},
      {CKA_MODULUS_BITS, &bits, sizeof bits},
      {CKA_PUBLIC_EXPONENT, e, sizeof e},
  };
  ASSERT_RV(F()->C_GetAttributeValue(s, pub_key, rsa_pub, 3), CKR_OK);
  assert_int_equal(rsa_pub[0].ulValueLen, 256);
  assert_int_equal(bits, 2048);
  assert_int_equal(rsa_pub[2].ulValueLen, 3);
  assert_memory_equal(e, "\x01\x00\x01", 3);
  one = {CKA_SENSITIVE, small, sizeof small};
  ASSERT_RV(F()->C_GetAttributeValue(s, pub_key, &one, 1),
            CKR_ATTRIBUTE_TYPE_INVALID);
  // The RSA private key's secret parts are sensitive, not unknown.
  const CK_OBJECT_HANDLE rsa_key = PrivateKey(s, "rsa");
  for (CK_ATTRIBUTE_TYPE secret :
       {CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_COEFFICIENT}) {
    one = {secret, nullptr, 0};
    ASSERT_RV(F()->C_GetAttributeValue(s, rsa_key, &one, 1),
              CKR_ATTRIBUTE_SENSITIVE);
    assert_int_equal(one.ulValueLen, CK_UNAVAILABLE_INFORMATION);
  }
  CK_ULONG size = 0;
  ASSERT_RV(F()->C_GetObjectSize(s, rsa_key, &size), CKR_OK);
  ASSERT_RV(F()->C_GetObjectSize(s, 999999, &size), CKR_OBJECT_HANDLE_INVALID);
}

// ---------------------------------------------------------------------------
// Signing and other operations.

void SignSizeQueriesMultiPartAndBadParameters(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  MakeKey("rsa", v1::RSA_2048);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  const Bytes digest = Sha256("hello");
  Bytes data = digest;

  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  CK_ULONG len = 0;
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, nullptr, &len),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_SignUpdate(s, data.data(), 32),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_SignFinal(s, nullptr, &len), CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_SignInit(s, nullptr, key), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OK);
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OPERATION_ACTIVE);
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, nullptr, &len), CKR_OK);
  assert_int_equal(len, 64);
  Bytes sig(64);
  CK_ULONG small = 10;
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &small),
            CKR_BUFFER_TOO_SMALL);
  assert_int_equal(small, 64);
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len), CKR_OK);
  assert_true(VerifyEcdsa(spki, digest, sig));
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);
  // A NULL length pointer ends the operation with CKR_ARGUMENTS_BAD.
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OK);
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), nullptr),
            CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);

  // Multi-part, hashed in the module.
  CK_MECHANISM m256{CKM_ECDSA_SHA256, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &m256, key), CKR_OK);
  std::string he = "he", llo = "llo";
  ASSERT_RV(F()->C_SignUpdate(s, reinterpret_cast<CK_BYTE_PTR>(he.data()), 2),
            CKR_OK);
  ASSERT_RV(F()->C_SignUpdate(s, reinterpret_cast<CK_BYTE_PTR>(llo.data()), 3),
            CKR_OK);
  len = 0;
  ASSERT_RV(F()->C_SignFinal(s, nullptr, &len), CKR_OK);
  assert_int_equal(len, 64);
  ASSERT_RV(F()->C_SignFinal(s, sig.data(), &len), CKR_OK);
  assert_true(VerifyEcdsa(spki, digest, sig));

  // Parameters the mechanism does not take, or does not support.
  CK_ULONG junk = 1;
  CK_MECHANISM with_param{CKM_ECDSA, &junk, sizeof junk};
  ASSERT_RV(F()->C_SignInit(s, &with_param, key), CKR_MECHANISM_PARAM_INVALID);
  CK_OBJECT_HANDLE rsa = PrivateKey(s, "rsa");
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, 0x12345, 32};
  CK_MECHANISM bad_mgf{CKM_RSA_PKCS_PSS, &pss, sizeof pss};
  ASSERT_RV(F()->C_SignInit(s, &bad_mgf, rsa), CKR_MECHANISM_PARAM_INVALID);
  pss = {CKM_SHA384, CKG_MGF1_SHA384, 48};
  CK_MECHANISM mismatch{CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss};
  ASSERT_RV(F()->C_SignInit(s, &mismatch, rsa), CKR_MECHANISM_PARAM_INVALID);
  CK_MECHANISM no_param{CKM_RSA_PKCS_PSS, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &no_param, rsa), CKR_MECHANISM_PARAM_INVALID);
  ASSERT_RV(F()->C_SignInit(s, &m, rsa), CKR_KEY_TYPE_INCONSISTENT);
  CK_MECHANISM rsa_pkcs{CKM_RSA_PKCS, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &rsa_pkcs, key), CKR_KEY_TYPE_INCONSISTENT);
  CK_MECHANISM aes{CKM_AES_CBC, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &aes, key), CKR_MECHANISM_INVALID);
  ASSERT_RV(F()->C_SignInit(s, &m, 999999), CKR_KEY_HANDLE_INVALID);
  ASSERT_RV(F()->C_SignInit(s, &m, key + 1),
            CKR_KEY_FUNCTION_NOT_PERMITTED);  // public
  // A failed C_SignInit leaves no operation behind.
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);

  // Decryption: RSA only, and nothing to finish without an init.
  ASSERT_RV(F()->C_Decrypt(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);
  // An EC key has CKA_DECRYPT false and the wrong type; either code fits.
  const CK_RV ec_decrypt = F()->C_DecryptInit(s, &rsa_pkcs, key);
  assert_true(ec_decrypt == CKR_KEY_TYPE_INCONSISTENT ||
              ec_decrypt == CKR_KEY_FUNCTION_NOT_PERMITTED);
  ASSERT_RV(F()->C_DecryptInit(s, &aes, rsa), CKR_MECHANISM_INVALID);
  ASSERT_RV(F()->C_DecryptInit(s, nullptr, rsa), CKR_ARGUMENTS_BAD);
  // Verification runs in the module with the key's public half, named by
  // either object; a wrong signature is CKR_SIGNATURE_INVALID.
  Bytes vsig(64);
  CK_ULONG vlen = 64;
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OK);
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, vsig.data(), &vlen), CKR_OK);
  for (CK_OBJECT_HANDLE h : {key, key + 1}) {
    ASSERT_RV(F()->C_VerifyInit(s, &m, h), CKR_OK);
    ASSERT_RV(F()->C_Verify(s, data.data(), 32, vsig.data(), vlen), CKR_OK);
  }
  Bytes bad_sig = vsig;
  bad_sig[5] ^= 0x01;
  ASSERT_RV(F()->C_VerifyInit(s, &m, key + 1), CKR_OK);
  ASSERT_RV(F()->C_Verify(s, data.data(), 32, bad_sig.data(), vlen),
            CKR_SIGNATURE_INVALID);
  ASSERT_RV(F()->C_VerifyInit(s, &m, key + 1), CKR_OK);
  ASSERT_RV(F()->C_Verify(s, data.data(), 32, vsig.data(), 63),
            CKR_SIGNATURE_LEN_RANGE);
  ASSERT_RV(F()->C_Verify(s, data.data(), 32, vsig.data(), vlen),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_RV(F()->C_VerifyInit(s, &rsa_pkcs, key + 1),
            CKR_KEY_TYPE_INCONSISTENT);
  // Operations the module does not offer.
  ASSERT_RV(F()->C_EncryptInit(s, &rsa_pkcs, rsa + 1),
            CKR_FUNCTION_NOT_SUPPORTED);

  // The key deleted behind the module's back: a clean key error.
  assert_true(g->client->DestroyKey(client::MakeKeyRef("ec")).ok());
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OK);
  len = 64;
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_KEY_HANDLE_INVALID);
}

void ChildAfterForkReinitializesAndSigns(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  const Bytes digest = Sha256("fork");
  assert_true(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
  CK_FUNCTION_LIST_PTR f = F();
  const pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    // The child starts over as the spec says, and also finds the key again.
    // No cmocka asserts here: they would longjmp into the child's copy of
    // the test runner.
    int code = 0;
    if (f->C_Initialize(nullptr) != CKR_OK) {
      code = 1;
    }
    CK_SESSION_HANDLE cs = 0;
    if (code == 0 && f->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr,
                                      &cs) != CKR_OK) {
      code = 2;
    }
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}};
    CK_OBJECT_HANDLE h = 0;
    CK_ULONG n = 0;
    if (code == 0 && (f->C_FindObjectsInit(cs, t, 1) != CKR_OK ||
                      f->C_FindObjects(cs, &h, 1, &n) != CKR_OK || n != 1 ||
                      f->C_FindObjectsFinal(cs) != CKR_OK)) {
      code = 3;
    }
    if (code == 0 &&
        !VerifyEcdsa(spki, digest, SignEcdsaWith(f, cs, h, digest))) {
      code = 4;
    }
    if (code == 0 && f->C_Finalize(nullptr) != CKR_OK) {
      code = 5;
    }
    _exit(code);
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  // The parent is unaffected.
  assert_true(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
}

void ManyThreadsSignInParallel(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s0 = Open();
  const CK_OBJECT_HANDLE key = PrivateKey(s0, "ec");
  CK_FUNCTION_LIST_PTR f = F();
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      CK_SESSION_HANDLE s = 0;
      if (f->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr, &s) !=
          CKR_OK) {
        return;
      }
      for (int i = 0; i < 40; ++i) {
        const Bytes d =
            Sha256("thread " + std::to_string(t) + " " + std::to_string(i));
        if (VerifyEcdsa(spki, d, SignEcdsaWith(f, s, key, d))) {
          ++ok;
        }
      }
      f->C_CloseSession(s);
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  assert_int_equal(ok.load(), 240);
}

void DaemonDownThenRestarted(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  g->daemon.Stop();
  CK_RV rv = CKR_OK;
  Find(s, {}, &rv);
  ASSERT_RV(rv, CKR_DEVICE_ERROR);
  const Bytes digest = Sha256("restart");
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  ASSERT_RV(F()->C_SignInit(s, &m, key), CKR_OK);  // sends nothing
  Bytes sig(64);
  CK_ULONG len = 64;
  Bytes data = digest;
  ASSERT_RV(F()->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_DEVICE_ERROR);
  CK_TOKEN_INFO token;
  ASSERT_RV(F()->C_GetTokenInfo(1, &token), CKR_OK);
  // Same state directory: the key and its handle are back, no re-init needed.
  if (!g->daemon.Start()) {
    std::fprintf(stderr, "%s\n", g->daemon.log().c_str());
    fail_msg("keyholdd did not restart");
  }
  assert_true(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
}

void EcdhDeriveMakesASessionSecret(void** /*state*/) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  // A peer key and the secret OpenSSL derives with it.
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  assert_non_null(peer.get());
  Bytes point(65);
  size_t point_len = 0;
  assert_int_equal(
      EVP_PKEY_get_octet_string_param(peer.get(), "encoded-pub-key",
                                      point.data(), point.size(), &point_len),
      1);
  const auto* p = reinterpret_cast<const unsigned char*>(spki.data());
  SslPtr<EVP_PKEY> ours(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  SslPtr<EVP_PKEY_CTX> dctx(EVP_PKEY_CTX_new(peer.get(), nullptr));
  size_t want_len = 0;
  assert_int_equal(EVP_PKEY_derive_init(dctx.get()), 1);
  assert_int_equal(EVP_PKEY_derive_set_peer(dctx.get(), ours.get()), 1);
  assert_int_equal(EVP_PKEY_derive(dctx.get(), nullptr, &want_len), 1);
  Bytes want(want_len);
  assert_int_equal(EVP_PKEY_derive(dctx.get(), want.data(), &want_len), 1);

  CK_ECDH1_DERIVE_PARAMS params{CKD_NULL, 0, nullptr, 65, point.data()};
  CK_MECHANISM m{CKM_ECDH1_DERIVE, &params, sizeof params};
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                      {CKA_SENSITIVE, &no, sizeof no},
                      {CKA_EXTRACTABLE, &yes, sizeof yes}};
  CK_OBJECT_HANDLE secret = 0;
  ASSERT_RV(F()->C_DeriveKey(s, &m, key, t, 3, &secret), CKR_OK);
  Bytes got(64);
  CK_ATTRIBUTE v{CKA_VALUE, got.data(), 64};
  ASSERT_RV(F()->C_GetAttributeValue(s, secret, &v, 1), CKR_OK);
  got.resize(v.ulValueLen);
  assert_true(got == want);
  // Sensitive secrets cannot be read; unsupported KDFs are refused.
  CK_ATTRIBUTE sens[] = {{CKA_SENSITIVE, &yes, sizeof yes}};
  CK_OBJECT_HANDLE hidden = 0;
  ASSERT_RV(F()->C_DeriveKey(s, &m, key, sens, 1, &hidden), CKR_OK);
  v = {CKA_VALUE, got.data(), 64};
  ASSERT_RV(F()->C_GetAttributeValue(s, hidden, &v, 1),
            CKR_ATTRIBUTE_SENSITIVE);
  CK_ECDH1_DERIVE_PARAMS sha{CKD_SHA1_KDF, 0, nullptr, 65, point.data()};
  CK_MECHANISM msha{CKM_ECDH1_DERIVE, &sha, sizeof sha};
  ASSERT_RV(F()->C_DeriveKey(s, &msha, key, t, 3, &hidden),
            CKR_MECHANISM_PARAM_INVALID);
  // Session objects go away with their session.
  ASSERT_RV(F()->C_DestroyObject(s, secret), CKR_OK);
  ASSERT_RV(F()->C_GetAttributeValue(s, secret, &v, 1),
            CKR_OBJECT_HANDLE_INVALID);
  CK_SESSION_HANDLE s2 = Open();
  ASSERT_RV(F()->C_CloseSession(s), CKR_OK);
  ASSERT_RV(F()->C_GetAttributeValue(s2, hidden, &v, 1),
            CKR_OBJECT_HANDLE_INVALID);
}

void GenerateAndDestroy(void** /*state*/) {
  CK_SESSION_HANDLE ro = Open();
  CK_SESSION_HANDLE rw = Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  char label[] = "made";
  CK_ATTRIBUTE pub[] = {{CKA_EC_PARAMS, p256, sizeof p256}};
  CK_ATTRIBUTE priv[] = {{CKA_LABEL, label, 4}};
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  ASSERT_RV(F()->C_GenerateKeyPair(ro, &gen, pub, 1, priv, 1, &hpub, &hpriv),
            CKR_SESSION_READ_ONLY);
  ASSERT_RV(F()->C_GenerateKeyPair(rw, &gen, pub, 1, priv, 0, &hpub, &hpriv),
            CKR_TEMPLATE_INCOMPLETE);
  ASSERT_RV(F()->C_GenerateKeyPair(rw, &gen, pub, 1, priv, 1, &hpub, &hpriv),
            CKR_OK);
  auto got = g->client->GetPublicKey(client::MakeKeyRef("made"));
  assert_true(got.ok());
  const Bytes digest = Sha256("made");
  assert_true(
      VerifyEcdsa((*got).public_key(), digest, SignEcdsa(rw, hpriv, digest)));
  ASSERT_RV(F()->C_DestroyObject(ro, hpriv), CKR_SESSION_READ_ONLY);
  ASSERT_RV(F()->C_DestroyObject(rw, hpriv), CKR_OK);
  assert_false(g->client->GetPublicKey(client::MakeKeyRef("made")).ok());
  ASSERT_RV(F()->C_DestroyObject(rw, hpub), CKR_OBJECT_HANDLE_INVALID);
}

// A DER X.509 certificate for the public key `spki`, signed by a throwaway
// key (the module and the daemon check whose key it certifies, not the CA).
Bytes CertificateFor(const std::string& spki) {
  const auto* p = reinterpret_cast<const unsigned char*>(spki.data());
  SslPtr<EVP_PKEY> pub(d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  SslPtr<EVP_PKEY> ca(EVP_EC_gen("P-256"));
  SslPtr<X509> cert(X509_new());
  assert_non_null(pub.get());
  assert_non_null(ca.get());
  assert_non_null(cert.get());
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(
      name, "CN", MBSTRING_ASC,
      reinterpret_cast<const unsigned char*>("keyhold test"), -1, -1, 0);
  assert_int_equal(X509_set_issuer_name(cert.get(), name), 1);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), 7);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 3600);
  assert_int_equal(X509_set_pubkey(cert.get(), pub.get()), 1);
  assert_true(X509_sign(cert.get(), ca.get(), EVP_sha256()) > 0);
  unsigned char* der = nullptr;
  const int len = i2d_X509(cert.get(), &der);
  assert_true(len > 0);
  Bytes out(der, der + len);
  OPENSSL_free(der);
  return out;
}

void CertificateObjects(void** /*state*/) {
  const std::string spki = MakeKey("tls", v1::EC_P256);
  MakeKey("other", v1::EC_P256);
  Bytes cert = CertificateFor(spki);
  CK_SESSION_HANDLE ro = Open();
  CK_SESSION_HANDLE rw = Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CK_OBJECT_CLASS cert_class = CKO_CERTIFICATE;
  CK_OBJECT_CLASS key_class = CKO_PRIVATE_KEY;
  CK_CERTIFICATE_TYPE x509 = CKC_X_509;
  CK_CERTIFICATE_TYPE wtls = CKC_WTLS;
  CK_BBOOL no = CK_FALSE;
  CK_OBJECT_HANDLE h = 0;
  CK_ATTRIBUTE good[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                         {CKA_CERTIFICATE_TYPE, &x509, sizeof x509},
                         {CKA_VALUE, cert.data(), cert.size()}};

  // Refusals, each with its own code; nothing is stored.
  ASSERT_RV(F()->C_CreateObject(rw, good, 3, nullptr), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_CreateObject(ro, good, 3, &h), CKR_SESSION_READ_ONLY);
  ASSERT_RV(F()->C_CreateObject(rw, good + 1, 2, &h), CKR_TEMPLATE_INCOMPLETE);
  ASSERT_RV(F()->C_CreateObject(rw, good, 2, &h), CKR_TEMPLATE_INCOMPLETE);
  CK_ATTRIBUTE as_key[] = {{CKA_CLASS, &key_class, sizeof key_class},
                           {CKA_VALUE, cert.data(), cert.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, as_key, 2, &h), CKR_TEMPLATE_INCONSISTENT);
  CK_ATTRIBUTE wrong_type[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                               {CKA_CERTIFICATE_TYPE, &wtls, sizeof wtls},
                               {CKA_VALUE, cert.data(), cert.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, wrong_type, 3, &h),
            CKR_ATTRIBUTE_VALUE_INVALID);
  Bytes junk = {0x30, 0x03, 0x02, 0x01, 0x01};
  CK_ATTRIBUTE garbage[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                            {CKA_VALUE, junk.data(), junk.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, garbage, 2, &h),
            CKR_ATTRIBUTE_VALUE_INVALID);
  CK_ATTRIBUTE session_cert[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                                 {CKA_TOKEN, &no, sizeof no},
                                 {CKA_VALUE, cert.data(), cert.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, session_cert, 3, &h),
            CKR_TEMPLATE_INCONSISTENT);
  uint8_t wrong_id[] = {1, 2, 3};
  CK_ATTRIBUTE bad_id[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                           {CKA_ID, wrong_id, sizeof wrong_id},
                           {CKA_VALUE, cert.data(), cert.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, bad_id, 3, &h), CKR_TEMPLATE_INCONSISTENT);
  // Unreadable values, as C_GenerateKeyPair and C_FindObjectsInit refuse
  // them: a null pValue with a length, and CK_UNAVAILABLE_INFORMATION (what
  // C_GetAttributeValue leaves in a template) as a length.
  CK_ATTRIBUTE null_id[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                            {CKA_ID, nullptr, 32},
                            {CKA_VALUE, cert.data(), cert.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, null_id, 3, &h), CKR_ARGUMENTS_BAD);
  CK_ATTRIBUTE unavailable[] = {
      {CKA_CLASS, &cert_class, sizeof cert_class},
      {CKA_VALUE, cert.data(), CK_UNAVAILABLE_INFORMATION}};
  ASSERT_RV(F()->C_CreateObject(rw, unavailable, 2, &h), CKR_ARGUMENTS_BAD);
  ASSERT_RV(F()->C_FindObjectsInit(ro, unavailable, 2), CKR_ARGUMENTS_BAD);
  EVP_PKEY* lone = EVP_EC_gen("P-256");
  unsigned char* lone_der = nullptr;
  const int lone_len = i2d_PUBKEY(lone, &lone_der);
  Bytes unowned = CertificateFor(std::string(
      reinterpret_cast<char*>(lone_der), static_cast<std::size_t>(lone_len)));
  OPENSSL_free(lone_der);
  EVP_PKEY_free(lone);
  CK_ATTRIBUTE no_key[] = {{CKA_CLASS, &cert_class, sizeof cert_class},
                           {CKA_VALUE, unowned.data(), unowned.size()}};
  ASSERT_RV(F()->C_CreateObject(rw, no_key, 2, &h), CKR_TEMPLATE_INCONSISTENT);
  assert_int_equal(
      Find(ro, {{CKA_CLASS, &cert_class, sizeof cert_class}}).size(), 0);

  // Stored beside its key: same CKA_ID and label, the DER as CKA_VALUE.
  ASSERT_RV(F()->C_CreateObject(rw, good, 3, &h), CKR_OK);
  auto certs = Find(ro, {{CKA_CLASS, &cert_class, sizeof cert_class}});
  assert_int_equal(certs.size(), 1);
  assert_int_equal(certs[0], h);
  const CK_OBJECT_HANDLE key = PrivateKey(ro, "tls");
  Bytes key_id(32), cert_id(32), value(cert.size() + 10);
  char label[16] = {};
  CK_ATTRIBUTE kid[] = {{CKA_ID, key_id.data(), 32}};
  CK_ATTRIBUTE attrs[] = {{CKA_ID, cert_id.data(), 32},
                          {CKA_VALUE, value.data(), value.size()},
                          {CKA_LABEL, label, sizeof label}};
  ASSERT_RV(F()->C_GetAttributeValue(ro, key, kid, 1), CKR_OK);
  ASSERT_RV(F()->C_GetAttributeValue(ro, h, attrs, 3), CKR_OK);
  assert_true(key_id == cert_id);
  value.resize(attrs[1].ulValueLen);
  assert_true(value == cert);
  assert_string_equal(std::string(label, attrs[2].ulValueLen).c_str(), "tls");
  auto stored = g->client->GetPublicKey(client::MakeKeyRef("tls"));
  assert_true(stored.ok());
  assert_true((*stored).info().certificate() ==
              std::string(cert.begin(), cert.end()));

  // Destroying the certificate leaves the key; destroying the key takes both.
  ASSERT_RV(F()->C_DestroyObject(ro, h), CKR_SESSION_READ_ONLY);
  ASSERT_RV(F()->C_DestroyObject(rw, h), CKR_OK);
  assert_int_equal(
      Find(ro, {{CKA_CLASS, &cert_class, sizeof cert_class}}).size(), 0);
  assert_true(g->client->GetPublicKey(client::MakeKeyRef("tls")).ok());
  ASSERT_RV(F()->C_CreateObject(rw, good, 3, &h), CKR_OK);
  ASSERT_RV(F()->C_DestroyObject(rw, PrivateKey(ro, "tls")), CKR_OK);
  assert_int_equal(
      Find(ro, {{CKA_CLASS, &cert_class, sizeof cert_class}}).size(), 0);
}

}  // namespace
}  // namespace keyhold::testing

int main() {
  using namespace keyhold::testing;  // NOLINT(build/namespaces)
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(ExportsOnlyTheEntryPoints, Setup,
                                      Teardown),
      cmocka_unit_test_setup_teardown(Interface30SignsAndRefusesMessages, Setup,
                                      Teardown),
      cmocka_unit_test_setup_teardown(NotInitialized, SetupUninitialized,
                                      Teardown),
      cmocka_unit_test_setup_teardown(DigestsInTheModule, Setup, Teardown),
      cmocka_unit_test_setup_teardown(InfoSlotAndToken, Setup, Teardown),
      cmocka_unit_test_setup_teardown(SessionsAndLogin, Setup, Teardown),
      cmocka_unit_test_setup_teardown(FindTemplatesAndAttributes, Setup,
                                      Teardown),
      cmocka_unit_test_setup_teardown(SignSizeQueriesMultiPartAndBadParameters,
                                      Setup, Teardown),
      cmocka_unit_test_setup_teardown(ChildAfterForkReinitializesAndSigns,
                                      Setup, Teardown),
      cmocka_unit_test_setup_teardown(ManyThreadsSignInParallel, Setup,
                                      Teardown),
      cmocka_unit_test_setup_teardown(DaemonDownThenRestarted, Setup, Teardown),
      cmocka_unit_test_setup_teardown(EcdhDeriveMakesASessionSecret, Setup,
                                      Teardown),
      cmocka_unit_test_setup_teardown(GenerateAndDestroy, Setup, Teardown),
      cmocka_unit_test_setup_teardown(CertificateObjects, Setup, Teardown),
  };
  const int failed = cmocka_run_group_tests_name("pkcs11_module_test", tests,
                                                 GroupSetup, GroupTeardown);
  return failed != 0 || g_teardown_failures != 0 ? 1 : 0;
}
