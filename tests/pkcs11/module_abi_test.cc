// The C ABI of libkeyhold-pkcs11.so, loaded with dlopen() like any PKCS#11
// application loads it, against a real keyholdd: function list and exports,
// slot/token info, sessions and login, find templates, attribute reads by the
// spec's rules, signing (size queries, multi-part, bad parameters), fork,
// many threads, and a daemon that goes down and comes back.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "common/ssl_ptr.h"
#include "tests/harness/daemon_process.h"

// Last: p11-kit's compatibility names are macros (value, count, ...).
#include <p11-kit/pkcs11.h>

namespace keyhold::testing {
namespace {

using Bytes = std::vector<uint8_t>;

class ModuleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(daemon_.Start()) << daemon_.log();
    setenv("KEYHOLD_SOCKET", daemon_.socket_path().c_str(), 1);
    client_ = std::make_unique<client::Client>(daemon_.ClientOptions());
    lib_ = dlopen(KEYHOLD_PKCS11_PATH, RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(lib_, nullptr) << dlerror();
    auto get = reinterpret_cast<CK_C_GetFunctionList>(
        dlsym(lib_, "C_GetFunctionList"));
    ASSERT_NE(get, nullptr);
    ASSERT_EQ(get(&f_), CKR_OK);
    CK_C_INITIALIZE_ARGS args{};
    args.flags = CKF_OS_LOCKING_OK;
    ASSERT_EQ(f_->C_Initialize(&args), CKR_OK);
  }
  void TearDown() override {
    if (f_ != nullptr) {
      f_->C_Finalize(nullptr);
    }
    // The module is never dlclose()d: the client library's fork handlers
    // stay registered for the life of the process.
  }

  std::string MakeKey(const std::string& name, v1::KeyType type) {
    auto r = client_->GenerateKey(client::MakeKeyRef(name), type);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? (*r).public_key() : std::string();
  }

  CK_SESSION_HANDLE Open(CK_FLAGS flags = CKF_SERIAL_SESSION) {
    CK_SESSION_HANDLE s = 0;
    EXPECT_EQ(f_->C_OpenSession(1, flags, nullptr, nullptr, &s), CKR_OK);
    return s;
  }

  std::vector<CK_OBJECT_HANDLE> Find(CK_SESSION_HANDLE s,
                                     std::vector<CK_ATTRIBUTE> t,
                                     CK_RV* rv = nullptr) {
    std::vector<CK_OBJECT_HANDLE> out;
    CK_RV r =
        f_->C_FindObjectsInit(s, t.data(), static_cast<CK_ULONG>(t.size()));
    if (rv != nullptr) {
      *rv = r;
    }
    if (r != CKR_OK) {
      return out;
    }
    CK_OBJECT_HANDLE buf[3];
    CK_ULONG n = 0;
    do {
      EXPECT_EQ(f_->C_FindObjects(s, buf, 3, &n), CKR_OK);
      out.insert(out.end(), buf, buf + n);
    } while (n == 3);
    EXPECT_EQ(f_->C_FindObjectsFinal(s), CKR_OK);
    return out;
  }

  CK_OBJECT_HANDLE PrivateKey(CK_SESSION_HANDLE s, const std::string& label) {
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    auto found = Find(s, {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_LABEL, const_cast<char*>(label.data()),
                           static_cast<CK_ULONG>(label.size())}});
    EXPECT_EQ(found.size(), 1u);
    return found.empty() ? 0 : found[0];
  }

  Bytes SignEcdsa(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                  const Bytes& digest) {
    CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
    if (f_->C_SignInit(s, &m, key) != CKR_OK) {
      return {};
    }
    Bytes sig(256);
    CK_ULONG len = sig.size();
    if (f_->C_Sign(s, const_cast<uint8_t*>(digest.data()),
                   static_cast<CK_ULONG>(digest.size()), sig.data(),
                   &len) != CKR_OK) {
      return {};
    }
    sig.resize(len);
    return sig;
  }

  DaemonProcess daemon_;
  std::unique_ptr<client::Client> client_;
  void* lib_ = nullptr;
  CK_FUNCTION_LIST_PTR f_ = nullptr;
};

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

// CK_INTERFACE (PKCS#11 3.0); p11-kit's 2.40 header lacks it.
struct Interface {
  CK_UTF8CHAR* name;
  CK_VOID_PTR function_list;
  CK_FLAGS flags;
};

TEST_F(ModuleTest, ExportsOnlyTheEntryPoints) {
  EXPECT_NE(dlsym(lib_, "C_GetFunctionList"), nullptr);
  EXPECT_EQ(dlsym(lib_, "C_Initialize"), nullptr);
  EXPECT_EQ(dlsym(lib_, "C_Sign"), nullptr);
  using GetInterfaceList = CK_RV (*)(Interface*, CK_ULONG*);
  using GetInterface =
      CK_RV (*)(CK_UTF8CHAR*, CK_VERSION*, Interface**, CK_FLAGS);
  auto list =
      reinterpret_cast<GetInterfaceList>(dlsym(lib_, "C_GetInterfaceList"));
  auto get = reinterpret_cast<GetInterface>(dlsym(lib_, "C_GetInterface"));
  ASSERT_NE(list, nullptr);
  ASSERT_NE(get, nullptr);
  CK_ULONG n = 0;
  ASSERT_EQ(list(nullptr, &n), CKR_OK);
  ASSERT_EQ(n, 1u);
  Interface one{};
  ASSERT_EQ(list(&one, &n), CKR_OK);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(one.name)), "PKCS 11");
  EXPECT_EQ(one.function_list, static_cast<void*>(f_));
  Interface* iface = nullptr;
  ASSERT_EQ(get(nullptr, nullptr, &iface, 0), CKR_OK);
  EXPECT_EQ(iface->function_list, static_cast<void*>(f_));
  CK_VERSION v30{3, 0};
  EXPECT_EQ(get(nullptr, &v30, &iface, 0), CKR_ARGUMENTS_BAD);
}

TEST_F(ModuleTest, DigestsInTheModule) {
  CK_SESSION_HANDLE s = Open();
  CK_MECHANISM m{CKM_SHA256, nullptr, 0};
  ASSERT_EQ(f_->C_DigestInit(s, &m), CKR_OK);
  std::string msg = "hello";
  CK_ULONG len = 0;
  ASSERT_EQ(f_->C_Digest(s, reinterpret_cast<CK_BYTE_PTR>(msg.data()), 5,
                         nullptr, &len),
            CKR_OK);
  ASSERT_EQ(len, 32u);
  Bytes out(32);
  ASSERT_EQ(f_->C_Digest(s, reinterpret_cast<CK_BYTE_PTR>(msg.data()), 5,
                         out.data(), &len),
            CKR_OK);
  EXPECT_EQ(out, Sha256("hello"));
  CK_MECHANISM md5{CKM_MD5, nullptr, 0};
  EXPECT_EQ(f_->C_DigestInit(s, &md5), CKR_MECHANISM_INVALID);
}

TEST_F(ModuleTest, InfoSlotAndToken) {
  EXPECT_EQ(f_->C_Initialize(nullptr), CKR_CRYPTOKI_ALREADY_INITIALIZED);
  CK_INFO info;
  ASSERT_EQ(f_->C_GetInfo(&info), CKR_OK);
  EXPECT_EQ(info.cryptokiVersion.major, 2);
  EXPECT_EQ(info.cryptokiVersion.minor, 40);
  CK_ULONG n = 0;
  ASSERT_EQ(f_->C_GetSlotList(CK_TRUE, nullptr, &n), CKR_OK);
  ASSERT_EQ(n, 1u);
  CK_SLOT_ID slot = 0;
  CK_ULONG zero = 0;
  EXPECT_EQ(f_->C_GetSlotList(CK_TRUE, &slot, &zero), CKR_BUFFER_TOO_SMALL);
  ASSERT_EQ(f_->C_GetSlotList(CK_TRUE, &slot, &n), CKR_OK);
  CK_TOKEN_INFO token;
  ASSERT_EQ(f_->C_GetTokenInfo(slot, &token), CKR_OK);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(token.label), 32),
            "keyhold" + std::string(25, ' '));
  EXPECT_NE(token.flags & CKF_TOKEN_INITIALIZED, 0u);
  EXPECT_EQ(token.flags & CKF_LOGIN_REQUIRED, 0u);
  EXPECT_EQ(token.flags & CKF_WRITE_PROTECTED, 0u);
  EXPECT_EQ(f_->C_GetTokenInfo(slot + 7, &token), CKR_SLOT_ID_INVALID);
  CK_MECHANISM_INFO mi;
  EXPECT_EQ(f_->C_GetMechanismInfo(slot, CKM_ECDSA, &mi), CKR_OK);
  EXPECT_NE(mi.flags & CKF_SIGN, 0u);
  EXPECT_EQ(f_->C_GetMechanismInfo(slot, CKM_AES_CBC, &mi),
            CKR_MECHANISM_INVALID);
  EXPECT_EQ(f_->C_Finalize(nullptr), CKR_OK);
  EXPECT_EQ(f_->C_GetInfo(&info), CKR_CRYPTOKI_NOT_INITIALIZED);
  EXPECT_EQ(f_->C_Initialize(nullptr), CKR_OK);
}

TEST_F(ModuleTest, SessionsAndLogin) {
  CK_SESSION_HANDLE s = 0;
  EXPECT_EQ(f_->C_OpenSession(1, 0, nullptr, nullptr, &s),
            CKR_SESSION_PARALLEL_NOT_SUPPORTED);
  s = Open();
  CK_SESSION_INFO si;
  ASSERT_EQ(f_->C_GetSessionInfo(s, &si), CKR_OK);
  EXPECT_EQ(si.state, CKS_RO_PUBLIC_SESSION);
  EXPECT_EQ(f_->C_Login(s, CKU_USER, nullptr, 0), CKR_OK);
  EXPECT_EQ(f_->C_Login(s, CKU_USER, nullptr, 0), CKR_USER_ALREADY_LOGGED_IN);
  ASSERT_EQ(f_->C_GetSessionInfo(s, &si), CKR_OK);
  EXPECT_EQ(si.state, CKS_RO_USER_FUNCTIONS);
  EXPECT_EQ(f_->C_Logout(s), CKR_OK);
  EXPECT_EQ(f_->C_Logout(s), CKR_USER_NOT_LOGGED_IN);
  CK_SESSION_HANDLE rw = Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  ASSERT_EQ(f_->C_GetSessionInfo(rw, &si), CKR_OK);
  EXPECT_EQ(si.state, CKS_RW_PUBLIC_SESSION);
  EXPECT_EQ(f_->C_CloseSession(s), CKR_OK);
  EXPECT_EQ(f_->C_CloseSession(s), CKR_SESSION_HANDLE_INVALID);
  EXPECT_EQ(f_->C_GetSessionInfo(s, &si), CKR_SESSION_HANDLE_INVALID);
  EXPECT_EQ(f_->C_CloseAllSessions(1), CKR_OK);
  EXPECT_EQ(f_->C_GetSessionInfo(rw, &si), CKR_SESSION_HANDLE_INVALID);
}

TEST_F(ModuleTest, FindTemplatesAndAttributes) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  MakeKey("rsa", v1::RSA_2048);
  CK_SESSION_HANDLE s = Open();
  EXPECT_EQ(Find(s, {}).size(), 4u);
  CK_OBJECT_CLASS priv = CKO_PRIVATE_KEY;
  EXPECT_EQ(Find(s, {{CKA_CLASS, &priv, sizeof priv}}).size(), 2u);
  CK_KEY_TYPE rsa = CKK_RSA;
  EXPECT_EQ(Find(s, {{CKA_KEY_TYPE, &rsa, sizeof rsa}}).size(), 2u);
  Bytes id(32);
  SHA256(reinterpret_cast<const unsigned char*>(spki.data()), spki.size(),
         id.data());
  EXPECT_EQ(Find(s, {{CKA_ID, id.data(), 32}}).size(), 2u);
  char nope[] = "nope";
  EXPECT_EQ(Find(s, {{CKA_LABEL, nope, 4}}).size(), 0u);
  CK_RV rv = CKR_OK;
  Find(s, {{CKA_LABEL, nullptr, 4}}, &rv);
  EXPECT_EQ(rv, CKR_ARGUMENTS_BAD);

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
  const CK_RV got = f_->C_GetAttributeValue(s, key, t, 8);
  EXPECT_TRUE(got == CKR_BUFFER_TOO_SMALL || got == CKR_ATTRIBUTE_SENSITIVE ||
              got == CKR_ATTRIBUTE_TYPE_INVALID)
      << got;
  EXPECT_EQ(t[0].ulValueLen, 67u);  // 04 41 04 X Y
  EXPECT_EQ(t[1].ulValueLen, 2u);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(label), 2), "ec");
  EXPECT_EQ(t[2].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  EXPECT_EQ(sensitive, CK_TRUE);
  EXPECT_EQ(extractable, CK_FALSE);
  EXPECT_EQ(always_auth, CK_FALSE);
  EXPECT_EQ(t[6].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  EXPECT_EQ(t[7].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  CK_ATTRIBUTE one = {CKA_VALUE, small, sizeof small};
  EXPECT_EQ(f_->C_GetAttributeValue(s, key, &one, 1), CKR_ATTRIBUTE_SENSITIVE);
  one = {0x8123456UL, small, sizeof small};
  EXPECT_EQ(f_->C_GetAttributeValue(s, key, &one, 1),
            CKR_ATTRIBUTE_TYPE_INVALID);
  one = {CKA_LABEL, small, 1};
  EXPECT_EQ(f_->C_GetAttributeValue(s, key, &one, 1), CKR_BUFFER_TOO_SMALL);
  EXPECT_EQ(f_->C_GetAttributeValue(s, 999999, &one, 1),
            CKR_OBJECT_HANDLE_INVALID);
}

TEST_F(ModuleTest, SignSizeQueriesMultiPartAndBadParameters) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  MakeKey("rsa", v1::RSA_2048);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  const Bytes digest = Sha256("hello");
  Bytes data = digest;

  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  CK_ULONG len = 0;
  EXPECT_EQ(f_->C_Sign(s, data.data(), 32, nullptr, &len),
            CKR_OPERATION_NOT_INITIALIZED);
  ASSERT_EQ(f_->C_SignInit(s, &m, key), CKR_OK);
  EXPECT_EQ(f_->C_SignInit(s, &m, key), CKR_OPERATION_ACTIVE);
  ASSERT_EQ(f_->C_Sign(s, data.data(), 32, nullptr, &len), CKR_OK);
  EXPECT_EQ(len, 64u);
  Bytes sig(64);
  CK_ULONG small = 10;
  EXPECT_EQ(f_->C_Sign(s, data.data(), 32, sig.data(), &small),
            CKR_BUFFER_TOO_SMALL);
  EXPECT_EQ(small, 64u);
  ASSERT_EQ(f_->C_Sign(s, data.data(), 32, sig.data(), &len), CKR_OK);
  EXPECT_TRUE(VerifyEcdsa(spki, digest, sig));
  EXPECT_EQ(f_->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_OPERATION_NOT_INITIALIZED);

  // Multi-part, hashed in the module.
  CK_MECHANISM m256{CKM_ECDSA_SHA256, nullptr, 0};
  ASSERT_EQ(f_->C_SignInit(s, &m256, key), CKR_OK);
  std::string he = "he", llo = "llo";
  ASSERT_EQ(f_->C_SignUpdate(s, reinterpret_cast<CK_BYTE_PTR>(he.data()), 2),
            CKR_OK);
  ASSERT_EQ(f_->C_SignUpdate(s, reinterpret_cast<CK_BYTE_PTR>(llo.data()), 3),
            CKR_OK);
  len = 0;
  ASSERT_EQ(f_->C_SignFinal(s, nullptr, &len), CKR_OK);
  ASSERT_EQ(len, 64u);
  ASSERT_EQ(f_->C_SignFinal(s, sig.data(), &len), CKR_OK);
  EXPECT_TRUE(VerifyEcdsa(spki, digest, sig));

  // Parameters the mechanism does not take, or does not support.
  CK_ULONG junk = 1;
  CK_MECHANISM with_param{CKM_ECDSA, &junk, sizeof junk};
  EXPECT_EQ(f_->C_SignInit(s, &with_param, key), CKR_MECHANISM_PARAM_INVALID);
  CK_OBJECT_HANDLE rsa = PrivateKey(s, "rsa");
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, 0x12345, 32};
  CK_MECHANISM bad_mgf{CKM_RSA_PKCS_PSS, &pss, sizeof pss};
  EXPECT_EQ(f_->C_SignInit(s, &bad_mgf, rsa), CKR_MECHANISM_PARAM_INVALID);
  pss = {CKM_SHA384, CKG_MGF1_SHA384, 48};
  CK_MECHANISM mismatch{CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss};
  EXPECT_EQ(f_->C_SignInit(s, &mismatch, rsa), CKR_MECHANISM_PARAM_INVALID);
  CK_MECHANISM no_param{CKM_RSA_PKCS_PSS, nullptr, 0};
  EXPECT_EQ(f_->C_SignInit(s, &no_param, rsa), CKR_MECHANISM_PARAM_INVALID);
  EXPECT_EQ(f_->C_SignInit(s, &m, rsa), CKR_KEY_TYPE_INCONSISTENT);
  CK_MECHANISM aes{CKM_AES_CBC, nullptr, 0};
  EXPECT_EQ(f_->C_SignInit(s, &aes, key), CKR_MECHANISM_INVALID);
  EXPECT_EQ(f_->C_SignInit(s, &m, 999999), CKR_KEY_HANDLE_INVALID);
  EXPECT_EQ(f_->C_SignInit(s, &m, key + 1),
            CKR_KEY_FUNCTION_NOT_PERMITTED);  // public
  // The key deleted behind the module's back: a clean key error.
  ASSERT_TRUE(client_->DestroyKey(client::MakeKeyRef("ec")).ok());
  ASSERT_EQ(f_->C_SignInit(s, &m, key), CKR_OK);
  len = 64;
  EXPECT_EQ(f_->C_Sign(s, data.data(), 32, sig.data(), &len),
            CKR_KEY_HANDLE_INVALID);
}

TEST_F(ModuleTest, ChildAfterForkReinitializesAndSigns) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  const Bytes digest = Sha256("fork");
  ASSERT_TRUE(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child starts over as the spec says, and also finds the key again.
    int code = 0;
    if (f_->C_Initialize(nullptr) != CKR_OK) code = 1;
    CK_SESSION_HANDLE cs = 0;
    if (code == 0 && f_->C_OpenSession(1, CKF_SERIAL_SESSION, nullptr, nullptr,
                                       &cs) != CKR_OK)
      code = 2;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}};
    CK_OBJECT_HANDLE h = 0;
    CK_ULONG n = 0;
    if (code == 0 && (f_->C_FindObjectsInit(cs, t, 1) != CKR_OK ||
                      f_->C_FindObjects(cs, &h, 1, &n) != CKR_OK || n != 1 ||
                      f_->C_FindObjectsFinal(cs) != CKR_OK))
      code = 3;
    if (code == 0 && !VerifyEcdsa(spki, digest, SignEcdsa(cs, h, digest)))
      code = 4;
    if (code == 0 && f_->C_Finalize(nullptr) != CKR_OK) code = 5;
    _exit(code);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  // The parent is unaffected.
  EXPECT_TRUE(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
}

TEST_F(ModuleTest, ManyThreadsSignInParallel) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s0 = Open();
  const CK_OBJECT_HANDLE key = PrivateKey(s0, "ec");
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      CK_SESSION_HANDLE s = Open();
      for (int i = 0; i < 40; ++i) {
        const Bytes d =
            Sha256("thread " + std::to_string(t) + " " + std::to_string(i));
        if (VerifyEcdsa(spki, d, SignEcdsa(s, key, d))) {
          ++ok;
        }
      }
      f_->C_CloseSession(s);
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_EQ(ok.load(), 240);
}

TEST_F(ModuleTest, DaemonDownThenRestarted) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  daemon_.Stop();
  CK_RV rv = CKR_OK;
  Find(s, {}, &rv);
  EXPECT_EQ(rv, CKR_DEVICE_ERROR);
  const Bytes digest = Sha256("restart");
  CK_MECHANISM m{CKM_ECDSA, nullptr, 0};
  ASSERT_EQ(f_->C_SignInit(s, &m, key), CKR_OK);  // sends nothing
  Bytes sig(64);
  CK_ULONG len = 64;
  Bytes data = digest;
  EXPECT_EQ(f_->C_Sign(s, data.data(), 32, sig.data(), &len), CKR_DEVICE_ERROR);
  CK_TOKEN_INFO token;
  EXPECT_EQ(f_->C_GetTokenInfo(1, &token), CKR_OK);
  // Same state directory: the key and its handle are back, no re-init needed.
  ASSERT_TRUE(daemon_.Start()) << daemon_.log();
  EXPECT_TRUE(VerifyEcdsa(spki, digest, SignEcdsa(s, key, digest)));
}

TEST_F(ModuleTest, EcdhDeriveMakesASessionSecret) {
  const std::string spki = MakeKey("ec", v1::EC_P256);
  CK_SESSION_HANDLE s = Open();
  CK_OBJECT_HANDLE key = PrivateKey(s, "ec");
  // A peer key and the secret OpenSSL derives with it.
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  ASSERT_NE(peer, nullptr);
  Bytes point(65);
  size_t point_len = 0;
  ASSERT_EQ(
      EVP_PKEY_get_octet_string_param(peer.get(), "encoded-pub-key",
                                      point.data(), point.size(), &point_len),
      1);
  const auto* p = reinterpret_cast<const unsigned char*>(spki.data());
  SslPtr<EVP_PKEY> ours(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  SslPtr<EVP_PKEY_CTX> dctx(EVP_PKEY_CTX_new(peer.get(), nullptr));
  size_t want_len = 0;
  ASSERT_EQ(EVP_PKEY_derive_init(dctx.get()), 1);
  ASSERT_EQ(EVP_PKEY_derive_set_peer(dctx.get(), ours.get()), 1);
  ASSERT_EQ(EVP_PKEY_derive(dctx.get(), nullptr, &want_len), 1);
  Bytes want(want_len);
  ASSERT_EQ(EVP_PKEY_derive(dctx.get(), want.data(), &want_len), 1);

  CK_ECDH1_DERIVE_PARAMS params{CKD_NULL, 0, nullptr, 65, point.data()};
  CK_MECHANISM m{CKM_ECDH1_DERIVE, &params, sizeof params};
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_BBOOL no = CK_FALSE, yes = CK_TRUE;
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls},
                      {CKA_SENSITIVE, &no, sizeof no},
                      {CKA_EXTRACTABLE, &yes, sizeof yes}};
  CK_OBJECT_HANDLE secret = 0;
  ASSERT_EQ(f_->C_DeriveKey(s, &m, key, t, 3, &secret), CKR_OK);
  Bytes got(64);
  CK_ATTRIBUTE v{CKA_VALUE, got.data(), 64};
  ASSERT_EQ(f_->C_GetAttributeValue(s, secret, &v, 1), CKR_OK);
  got.resize(v.ulValueLen);
  EXPECT_EQ(got, want);
  // Sensitive secrets cannot be read; unsupported KDFs are refused.
  CK_ATTRIBUTE sens[] = {{CKA_SENSITIVE, &yes, sizeof yes}};
  CK_OBJECT_HANDLE hidden = 0;
  ASSERT_EQ(f_->C_DeriveKey(s, &m, key, sens, 1, &hidden), CKR_OK);
  v = {CKA_VALUE, got.data(), 64};
  EXPECT_EQ(f_->C_GetAttributeValue(s, hidden, &v, 1), CKR_ATTRIBUTE_SENSITIVE);
  CK_ECDH1_DERIVE_PARAMS sha{CKD_SHA1_KDF, 0, nullptr, 65, point.data()};
  CK_MECHANISM msha{CKM_ECDH1_DERIVE, &sha, sizeof sha};
  EXPECT_EQ(f_->C_DeriveKey(s, &msha, key, t, 3, &hidden),
            CKR_MECHANISM_PARAM_INVALID);
  // Session objects go away with their session.
  EXPECT_EQ(f_->C_DestroyObject(s, secret), CKR_OK);
  EXPECT_EQ(f_->C_GetAttributeValue(s, secret, &v, 1),
            CKR_OBJECT_HANDLE_INVALID);
  CK_SESSION_HANDLE s2 = Open();
  ASSERT_EQ(f_->C_CloseSession(s), CKR_OK);
  EXPECT_EQ(f_->C_GetAttributeValue(s2, hidden, &v, 1),
            CKR_OBJECT_HANDLE_INVALID);
}

TEST_F(ModuleTest, GenerateAndDestroy) {
  CK_SESSION_HANDLE ro = Open();
  CK_SESSION_HANDLE rw = Open(CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  uint8_t p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  char label[] = "made";
  CK_ATTRIBUTE pub[] = {{CKA_EC_PARAMS, p256, sizeof p256}};
  CK_ATTRIBUTE priv[] = {{CKA_LABEL, label, 4}};
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  EXPECT_EQ(f_->C_GenerateKeyPair(ro, &gen, pub, 1, priv, 1, &hpub, &hpriv),
            CKR_SESSION_READ_ONLY);
  EXPECT_EQ(f_->C_GenerateKeyPair(rw, &gen, pub, 1, priv, 0, &hpub, &hpriv),
            CKR_TEMPLATE_INCOMPLETE);
  ASSERT_EQ(f_->C_GenerateKeyPair(rw, &gen, pub, 1, priv, 1, &hpub, &hpriv),
            CKR_OK);
  auto got = client_->GetPublicKey(client::MakeKeyRef("made"));
  ASSERT_TRUE(got.ok());
  const Bytes digest = Sha256("made");
  EXPECT_TRUE(
      VerifyEcdsa((*got).public_key(), digest, SignEcdsa(rw, hpriv, digest)));
  EXPECT_EQ(f_->C_DestroyObject(ro, hpriv), CKR_SESSION_READ_ONLY);
  EXPECT_EQ(f_->C_DestroyObject(rw, hpriv), CKR_OK);
  EXPECT_FALSE(client_->GetPublicKey(client::MakeKeyRef("made")).ok());
  EXPECT_EQ(f_->C_DestroyObject(rw, hpub), CKR_OBJECT_HANDLE_INVALID);
}

}  // namespace
}  // namespace keyhold::testing
