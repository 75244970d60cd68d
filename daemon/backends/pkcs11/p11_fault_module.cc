// A PKCS#11 module for tests only: it forwards every call to a real module
// (KH_P11_FAULT_TARGET, default SoftHSM2) and can be told to misbehave the
// way real tokens and modules do, so the backend's handling of each case can
// be tested (the p11-kit mock-module idea, on top of a real token):
//
//  - fail: the next N calls of a function return a given CKR_ value
//    (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, ...);
//  - lie: the next N calls of a function succeed but report a given output
//    length or count (larger than the buffer, absurd, odd, ...);
//  - logout: the next C_Sign logs the token out and says so;
//  - absent: the token is "removed" (every real session closed, no token in
//    the slot list) until switched back, by kh_fault_absent() or, for the
//    daemon-level test, while the file KH_P11_FAULT_ABSENT_FILE exists;
//  - hang: while the file named by KH_P11_FAULT_HANG_FILE exists, C_Sign
//    waits (it touches FILE.entered first), for the daemon-level test that a
//    hanging module cannot hang the daemon's I/O;
//  - reuse: the next key pair made (or key object created) gets a given
//    (destroyed) object's handle for its private key, as modules that
//    recycle handles do; that number then names the new key in every call,
//    for the test that a handle cached for a key destroyed behind keyhold's
//    back is never used for whatever takes its number;
//  - before: the next call of a function first runs a function of the test
//    (C_GenerateKeyPair, C_SignInit, C_DecryptInit, C_DeriveKey), so a test
//    can make something happen at exactly that point of a backend call;
//  - crash: while the file named by KH_P11_FAULT_CRASH_FILE exists, a
//    C_GenerateKeyPair or C_CreateObject (of a key) that succeeded ends the
//    process (_exit), as a kill -9 of keyholdd between the token's creation
//    of a key and the key store's commit would.
//
// The controls are plain C functions; a test dlopen()s this module itself
// and looks them up. Nothing here is built into keyholdd.
#include <dlfcn.h>
#include <fcntl.h>
#include <p11-kit/pkcs11.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#define KH_FAULT_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

struct Fault {
  enum Kind { kFail, kLie, kLogout } kind = kFail;
  CK_RV rv = CKR_OK;
  CK_ULONG len = 0;
  int times = 0;
};

std::mutex g_mu;
std::map<std::string, Fault> g_faults;
std::map<std::string, unsigned long> g_counts;
bool g_absent = false;
std::set<CK_MECHANISM_TYPE> g_hidden;  // left out of C_GetMechanismList
bool g_file_absent = false;  // KH_P11_FAULT_ABSENT_FILE seen at the last call

// kh_fault_reuse_handle(): the handle the next private key gets (0: none),
// and once made, the handle callers use for it and its real one.
CK_OBJECT_HANDLE g_reuse_next = 0;
CK_OBJECT_HANDLE g_alias = 0;
CK_OBJECT_HANDLE g_alias_real = 0;

// kh_fault_before(): per function, what to run at the start of its next call.
struct Hook {
  void (*run)(void*) = nullptr;
  void* arg = nullptr;
};
std::map<std::string, Hook> g_hooks;

// Runs (once) what the test set for the start of fn, outside g_mu: it may
// call into this module itself.
void RunHook(const std::string& fn) {
  Hook hook;
  {
    std::lock_guard lock(g_mu);
    auto it = g_hooks.find(fn);
    if (it == g_hooks.end()) {
      return;
    }
    hook = it->second;
    g_hooks.erase(it);
  }
  hook.run(hook.arg);
}

// A handle from the caller, as the real module knows it.
CK_OBJECT_HANDLE In(CK_OBJECT_HANDLE h) {
  std::lock_guard lock(g_mu);
  return g_alias_real != 0 && h == g_alias ? g_alias_real : h;
}
// A handle from the real module, as callers know it.
CK_OBJECT_HANDLE Out(CK_OBJECT_HANDLE h) {
  std::lock_guard lock(g_mu);
  return g_alias_real != 0 && h == g_alias_real ? g_alias : h;
}

CK_FUNCTION_LIST* g_real = nullptr;
CK_FUNCTION_LIST g_list;

// Counts the call and returns the fault to apply to it, if any.
bool TakeFault(const std::string& fn, Fault* out) {
  std::lock_guard lock(g_mu);
  ++g_counts[fn];
  auto it = g_faults.find(fn);
  if (it == g_faults.end() || it->second.times == 0) {
    return false;
  }
  *out = it->second;
  if (--it->second.times == 0) {
    g_faults.erase(it);
  }
  return true;
}

void CloseAllRealSessions();

// Whether the token is "removed" now. The first call that sees the absent
// file appear closes every real session, as a real removal would.
bool Absent() {
  const char* file = std::getenv("KH_P11_FAULT_ABSENT_FILE");
  const bool file_absent = file != nullptr && ::access(file, F_OK) == 0;
  bool removed_now = false;
  bool absent = false;
  {
    std::lock_guard lock(g_mu);
    removed_now = file_absent && !g_file_absent;
    g_file_absent = file_absent;
    absent = g_absent || file_absent;
  }
  if (removed_now) {
    CloseAllRealSessions();
  }
  return absent;
}

void CloseAllRealSessions() {
  CK_ULONG n = 0;
  if (g_real->C_GetSlotList(CK_FALSE, nullptr, &n) != CKR_OK) {
    return;
  }
  std::vector<CK_SLOT_ID> slots(n);
  if (g_real->C_GetSlotList(CK_FALSE, slots.data(), &n) != CKR_OK) {
    return;
  }
  for (CK_ULONG i = 0; i < n && i < slots.size(); ++i) {
    g_real->C_CloseAllSessions(slots[i]);
  }
}

void WaitWhileHangFile() {
  const char* file = std::getenv("KH_P11_FAULT_HANG_FILE");
  if (file == nullptr || ::access(file, F_OK) != 0) {
    return;
  }
  const std::string entered = std::string(file) + ".entered";
  const int fd = ::open(entered.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd >= 0) {
    ::close(fd);
  }
  // At most two minutes, so a broken test cannot leave a daemon stuck.
  for (int i = 0; i < 2400 && ::access(file, F_OK) == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

CK_RV GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count) {
  Fault f;
  const bool faulty = TakeFault("C_GetSlotList", &f);
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  if (present == CK_TRUE && Absent()) {
    *count = 0;
    return CKR_OK;
  }
  const CK_RV rv = g_real->C_GetSlotList(present, list, count);
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie) {
    *count = f.len;
  }
  return rv;
}

CK_RV GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) {
  if (Absent()) {
    return CKR_TOKEN_NOT_PRESENT;
  }
  return g_real->C_GetTokenInfo(slot, info);
}

CK_RV GetMechanismList(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                       CK_ULONG_PTR count) {
  Fault f;
  const bool faulty = TakeFault("C_GetMechanismList", &f);
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  std::set<CK_MECHANISM_TYPE> hidden;
  {
    std::lock_guard lock(g_mu);
    hidden = g_hidden;
  }
  if (!hidden.empty()) {
    // A token without these: the real list, filtered.
    CK_ULONG n = 0;
    CK_RV rv = g_real->C_GetMechanismList(slot, nullptr, &n);
    if (rv != CKR_OK) {
      return rv;
    }
    std::vector<CK_MECHANISM_TYPE> all(n);
    rv = g_real->C_GetMechanismList(slot, all.data(), &n);
    if (rv != CKR_OK) {
      return rv;
    }
    all.resize(n);
    std::erase_if(all, [&](CK_MECHANISM_TYPE m) { return hidden.contains(m); });
    if (list != nullptr) {
      if (*count < all.size()) {
        *count = all.size();
        return CKR_BUFFER_TOO_SMALL;
      }
      std::copy(all.begin(), all.end(), list);
    }
    *count = all.size();
    return CKR_OK;
  }
  const CK_RV rv = g_real->C_GetMechanismList(slot, list, count);
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie) {
    *count = f.len;
  }
  return rv;
}

CK_RV OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app,
                  CK_NOTIFY notify, CK_SESSION_HANDLE_PTR h) {
  Fault f;
  if (TakeFault("C_OpenSession", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  if (Absent()) {
    return CKR_TOKEN_NOT_PRESENT;
  }
  return g_real->C_OpenSession(slot, flags, app, notify, h);
}

CK_RV Login(CK_SESSION_HANDLE s, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin,
            CK_ULONG pin_len) {
  Fault f;
  if (TakeFault("C_Login", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  return g_real->C_Login(s, user, pin, pin_len);
}

CK_RV GetAttributeValue(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                        CK_ATTRIBUTE_PTR t, CK_ULONG n) {
  (void)Absent();  // notices a removal: the real sessions close
  Fault f;
  bool faulty = TakeFault("C_GetAttributeValue", &f);
  // "C_GetAttributeValue/data": only calls that pass a buffer (the second
  // call of a two-step read).
  if (!faulty && n > 0 && t[0].pValue != nullptr) {
    faulty = TakeFault("C_GetAttributeValue/data", &f);
  }
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  const CK_RV rv = g_real->C_GetAttributeValue(s, In(o), t, n);
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie && n > 0) {
    t[0].ulValueLen = f.len;
  }
  return rv;
}

CK_RV FindObjects(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE_PTR out, CK_ULONG max,
                  CK_ULONG_PTR n) {
  (void)Absent();
  Fault f;
  const bool faulty = TakeFault("C_FindObjects", &f);
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  const CK_RV rv = g_real->C_FindObjects(s, out, max, n);
  if (rv == CKR_OK) {
    for (CK_ULONG i = 0; i < *n && i < max; ++i) {
      out[i] = Out(out[i]);
    }
  }
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie) {
    *n = f.len;
  }
  return rv;
}

CK_RV SetAttributeValue(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o,
                        CK_ATTRIBUTE_PTR t, CK_ULONG n) {
  Fault f;
  if (TakeFault("C_SetAttributeValue", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  return g_real->C_SetAttributeValue(s, In(o), t, n);
}

CK_RV DestroyObject(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) {
  Fault f;
  if (TakeFault("C_DestroyObject", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  return g_real->C_DestroyObject(s, In(o));
}

CK_RV DecryptInit(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  RunHook("C_DecryptInit");
  return g_real->C_DecryptInit(s, m, In(k));
}

CK_RV DeriveKey(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE base,
                CK_ATTRIBUTE_PTR t, CK_ULONG n, CK_OBJECT_HANDLE_PTR out) {
  RunHook("C_DeriveKey");
  return g_real->C_DeriveKey(s, m, In(base), t, n, out);
}

// After a call that made the key object *h (rv: its result): the crash
// file, then kh_fault_reuse_handle().
CK_RV Made(CK_RV rv, CK_OBJECT_HANDLE_PTR h) {
  const char* file = std::getenv("KH_P11_FAULT_CRASH_FILE");
  if (rv == CKR_OK && file != nullptr && ::access(file, F_OK) == 0) {
    ::_exit(137);
  }
  if (rv == CKR_OK) {
    std::lock_guard lock(g_mu);
    if (g_reuse_next != 0) {
      g_alias = std::exchange(g_reuse_next, 0);
      g_alias_real = *h;
      *h = g_alias;
    }
  }
  return rv;
}

CK_RV GenerateKeyPair(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m,
                      CK_ATTRIBUTE_PTR pub, CK_ULONG npub,
                      CK_ATTRIBUTE_PTR priv, CK_ULONG npriv,
                      CK_OBJECT_HANDLE_PTR hpub, CK_OBJECT_HANDLE_PTR hpriv) {
  RunHook("C_GenerateKeyPair");
  Fault f;
  if (TakeFault("C_GenerateKeyPair", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  return Made(
      g_real->C_GenerateKeyPair(s, m, pub, npub, priv, npriv, hpub, hpriv),
      hpriv);
}

CK_RV CreateObject(CK_SESSION_HANDLE s, CK_ATTRIBUTE_PTR t, CK_ULONG n,
                   CK_OBJECT_HANDLE_PTR h) {
  Fault f;
  if (TakeFault("C_CreateObject", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  const CK_RV rv = g_real->C_CreateObject(s, t, n, h);
  // Data objects (keyhold's pending markers) are not keys: no crash, no
  // reused handle.
  for (CK_ULONG i = 0; i < n; ++i) {
    if (t[i].type == CKA_CLASS && t[i].ulValueLen == sizeof(CK_OBJECT_CLASS) &&
        *static_cast<const CK_OBJECT_CLASS*>(t[i].pValue) == CKO_DATA) {
      return rv;
    }
  }
  return Made(rv, h);
}

CK_RV SignInit(CK_SESSION_HANDLE s, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
  (void)Absent();
  Fault f;
  if (TakeFault("C_SignInit", &f) && f.kind == Fault::kFail) {
    return f.rv;
  }
  RunHook("C_SignInit");
  return g_real->C_SignInit(s, m, In(k));
}

CK_RV Sign(CK_SESSION_HANDLE s, CK_BYTE_PTR data, CK_ULONG data_len,
           CK_BYTE_PTR sig, CK_ULONG_PTR sig_len) {
  WaitWhileHangFile();
  Fault f;
  const bool faulty = TakeFault("C_Sign", &f);
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  if (faulty && f.kind == Fault::kLogout) {
    g_real->C_Logout(s);
    return CKR_USER_NOT_LOGGED_IN;
  }
  const CK_RV rv = g_real->C_Sign(s, data, data_len, sig, sig_len);
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie) {
    *sig_len = f.len;
  }
  return rv;
}

CK_RV Decrypt(CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG in_len,
              CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
  (void)Absent();
  Fault f;
  const bool faulty = TakeFault("C_Decrypt", &f);
  if (faulty && f.kind == Fault::kFail) {
    return f.rv;
  }
  const CK_RV rv = g_real->C_Decrypt(s, in, in_len, out, out_len);
  if (rv == CKR_OK && faulty && f.kind == Fault::kLie) {
    *out_len = f.len;
  }
  return rv;
}

}  // namespace

KH_FAULT_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR out) {
  if (out == nullptr) {
    return CKR_ARGUMENTS_BAD;
  }
  std::lock_guard lock(g_mu);
  if (g_real == nullptr) {
    const char* target = std::getenv("KH_P11_FAULT_TARGET");
    if (target == nullptr) {
      target = "/usr/lib/softhsm/libsofthsm2.so";
    }
    void* lib = ::dlopen(target, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (lib == nullptr) {
      return CKR_GENERAL_ERROR;
    }
    auto get = reinterpret_cast<CK_C_GetFunctionList>(
        ::dlsym(lib, "C_GetFunctionList"));
    CK_FUNCTION_LIST* real = nullptr;
    if (get == nullptr || get(&real) != CKR_OK || real == nullptr) {
      return CKR_GENERAL_ERROR;
    }
    g_real = real;
    g_list = *real;
    g_list.C_GetSlotList = &GetSlotList;
    g_list.C_GetTokenInfo = &GetTokenInfo;
    g_list.C_GetMechanismList = &GetMechanismList;
    g_list.C_OpenSession = &OpenSession;
    g_list.C_Login = &Login;
    g_list.C_GetAttributeValue = &GetAttributeValue;
    g_list.C_FindObjects = &FindObjects;
    g_list.C_SignInit = &SignInit;
    g_list.C_Sign = &Sign;
    g_list.C_Decrypt = &Decrypt;
    g_list.C_GenerateKeyPair = &GenerateKeyPair;
    g_list.C_SetAttributeValue = &SetAttributeValue;
    g_list.C_DestroyObject = &DestroyObject;
    g_list.C_DecryptInit = &DecryptInit;
    g_list.C_DeriveKey = &DeriveKey;
    g_list.C_CreateObject = &CreateObject;
  }
  *out = &g_list;
  return CKR_OK;
}

// The next `times` calls of fn return rv without reaching the token.
KH_FAULT_EXPORT void kh_fault_fail(const char* fn, CK_RV rv, int times) {
  std::lock_guard lock(g_mu);
  g_faults[fn] = Fault{Fault::kFail, rv, 0, times};
}

// The next `times` calls of fn run on the token, then report len as their
// output length (or count).
KH_FAULT_EXPORT void kh_fault_lie(const char* fn, CK_ULONG len, int times) {
  std::lock_guard lock(g_mu);
  g_faults[fn] = Fault{Fault::kLie, CKR_OK, len, times};
}

// The next `times` C_Sign calls log the token out and fail with
// CKR_USER_NOT_LOGGED_IN, as after another application's C_Logout.
KH_FAULT_EXPORT void kh_fault_logout(int times) {
  std::lock_guard lock(g_mu);
  g_faults["C_Sign"] = Fault{Fault::kLogout, CKR_OK, 0, times};
}

// absent != 0: the token is removed (all sessions close); 0: it is back.
KH_FAULT_EXPORT void kh_fault_absent(int absent) {
  {
    std::lock_guard lock(g_mu);
    g_absent = absent != 0;
  }
  if (absent != 0 && g_real != nullptr) {
    CloseAllRealSessions();
  }
}

// How often fn was called since the last reset.
KH_FAULT_EXPORT unsigned long kh_fault_count(const char* fn) {
  std::lock_guard lock(g_mu);
  auto it = g_counts.find(fn);
  return it == g_counts.end() ? 0 : it->second;
}

KH_FAULT_EXPORT void kh_fault_reset(void) {
  std::lock_guard lock(g_mu);
  g_faults.clear();
  g_counts.clear();
  g_absent = false;
  g_hidden.clear();
  g_reuse_next = g_alias = g_alias_real = 0;
  g_hooks.clear();
}

// The private key of the next key pair made (or the next object created) is
// handed out as h (which the test destroyed first); h names that key from
// then on (until reset).
KH_FAULT_EXPORT void kh_fault_reuse_handle(CK_OBJECT_HANDLE h) {
  std::lock_guard lock(g_mu);
  g_reuse_next = h;
}

// The next call of fn runs run(arg) first (see Hook).
KH_FAULT_EXPORT void kh_fault_before(const char* fn, void (*run)(void*),
                                     void* arg) {
  std::lock_guard lock(g_mu);
  g_hooks[fn] = Hook{run, arg};
}

// C_GetMechanismList leaves m out from now on (until kh_fault_reset).
KH_FAULT_EXPORT void kh_fault_hide_mechanism(CK_MECHANISM_TYPE m) {
  std::lock_guard lock(g_mu);
  g_hidden.insert(m);
}
