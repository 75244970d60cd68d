// Runs the PKCS#11 backend against a real SoftHSM2 token created in a
// temporary directory (SOFTHSM2_CONF points at its own softhsm2.conf).
#include "daemon/backends/pkcs11/p11_backend.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/key_types.h"
#include "common/ssl_ptr.h"
#include "daemon/backends/pkcs11/p11_errors.h"

#if defined(__SANITIZE_ADDRESS__)
// SoftHSM2 2.6.1 leaks a few bytes per Ed25519 key it loads (its curve name
// as an ASN1 string). The module stays mapped (RTLD_NODELETE below) and
// malloc stacks are unwound slowly, so the frames inside it can be matched.
extern "C" const char* __asan_default_options() {
  return "fast_unwind_on_malloc=0";
}
extern "C" const char* __lsan_default_suppressions() {
  return "leak:libsofthsm2.so\n";
}
#endif

namespace keyhold::backend::pkcs11 {
namespace {

namespace fs = std::filesystem;

constexpr char kModule[] = "/usr/lib/softhsm/libsofthsm2.so";
constexpr char kLabel[] = "kh-unit";
constexpr char kPin[] = "1234";

fs::path g_dir;

class Env : public ::testing::Environment {
 public:
  void SetUp() override {
    char tmpl[] = "/tmp/kh-p11-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    g_dir = tmpl;
    fs::create_directory(g_dir / "tokens");
    {
      std::ofstream conf(g_dir / "softhsm2.conf");
      conf << "directories.tokendir = " << (g_dir / "tokens").string()
           << "\nobjectstore.backend = file\nlog.level = ERROR\n";
    }
    ::setenv("SOFTHSM2_CONF", (g_dir / "softhsm2.conf").c_str(), 1);
    // Keep the module mapped after p11-kit unloads it, for readable leak
    // reports (no C_Initialize here: p11-kit does that).
    ASSERT_NE(::dlopen(kModule, RTLD_NOW | RTLD_NODELETE), nullptr);
    const std::string cmd = std::string("softhsm2-util --init-token --free ") +
                            "--label " + kLabel + " --pin " + kPin +
                            " --so-pin 5678 >/dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
    WritePin(g_dir / "pin", kPin, 0600);
    WritePin(g_dir / "badpin", "9999\n", 0600);
    WritePin(g_dir / "openpin", "1234\n", 0644);
  }
  void TearDown() override { fs::remove_all(g_dir); }

  static void WritePin(const fs::path& p, const std::string& text,
                       mode_t mode) {
    std::ofstream f(p);
    f << text;
    f.close();
    ::chmod(p.c_str(), mode);
  }
};

// GoogleTest takes ownership of the environment.
const auto* const g_env = ::testing::AddGlobalTestEnvironment(
    new Env);  // NOLINT(cppcoreguidelines-owning-memory)

P11Config BaseConfig() {
  P11Config c;
  c.name = "hsm";
  c.module = kModule;
  c.allowed_modules = {kModule};
  c.token_label = kLabel;
  c.pin_file = (g_dir / "pin").string();
  c.sessions = 2;
  return c;
}

SslPtr<EVP_PKEY> ParseSpki(const std::vector<uint8_t>& der) {
  const unsigned char* p = der.data();
  return SslPtr<EVP_PKEY>(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

// msg encrypted to pub with padding (RSA_PKCS1_OAEP_PADDING: SHA-1), by
// OpenSSL alone; empty if that failed.
std::vector<uint8_t> RsaEncrypt(EVP_PKEY* pub, int padding,
                                std::string_view msg) {
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(pub, nullptr));
  std::vector<uint8_t> ct(static_cast<std::size_t>(EVP_PKEY_get_size(pub)));
  std::size_t ct_len = ct.size();
  if (ctx == nullptr || EVP_PKEY_encrypt_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_rsa_padding(ctx.get(), padding) != 1 ||
      EVP_PKEY_encrypt(ctx.get(), ct.data(), &ct_len,
                       reinterpret_cast<const uint8_t*>(msg.data()),
                       msg.size()) != 1) {
    return {};
  }
  ct.resize(ct_len);
  return ct;
}

std::vector<uint8_t> Sha256(std::string_view msg) {
  std::vector<uint8_t> d(32);
  unsigned int len = 0;
  EVP_Digest(msg.data(), msg.size(), d.data(), &len, EVP_sha256(), nullptr);
  return d;
}

class P11BackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto b = P11Backend::Create(BaseConfig());
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    backend_ = std::move(*b);
  }

  // The handle of a key made for {1000, name}: the blob only works under
  // the reference it was made for.
  // Signs digest `each` times from each of `threads` threads at once;
  // returns how many signatures succeeded.
  int SignFromThreads(const KeyHandle& h, const SignParams& p,
                      const std::vector<uint8_t>& digest, int threads,
                      int each) {
    std::atomic<int> good{0};
    std::vector<std::thread> running;
    running.reserve(static_cast<std::size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      running.emplace_back([&] {
        for (int i = 0; i < each; ++i) {
          if (backend_->Sign(h, p, digest).ok()) {
            ++good;
          }
        }
      });
    }
    for (std::thread& t : running) {
      t.join();
    }
    return good.load();
  }

  KeyHandle Handle(const CreatedKey& k, uint64_t id, const std::string& name) {
    KeyHandle h;
    h.id = id;
    h.ref = daemon::KeyRef{1000, name};
    h.type = k.type;
    h.blob = k.blob;
    return h;
  }

  std::unique_ptr<P11Backend> backend_;
};

TEST(P11ConfigTest, ParsesAndRejects) {
  auto c = ParseP11Config(
      "name = 'hsm'\nmodule = '/m.so'\nallowed_modules = ['/m.so']\n"
      "token_label = 't'\npin_file = '/p'\nsessions = 8\n");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->sessions, 8u);
  EXPECT_EQ(c->allowed_modules.size(), 1u);
  EXPECT_EQ(ParseP11Config("name = 'h'\nmodule = '/m'\ntoken_label = 't'\n"
                           "pin_file = '/p'\npin = '1234'\n")
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_EQ(ParseP11Config("name = 'h'\nmodule = '/m'\npin_file = '/p'\n")
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_EQ(ParseP11Config("name = 'h'\nmodule = '/m'\ntoken_label = 't'\n"
                           "pin_file = '/p'\nsessions = 0\n")
                .status()
                .code(),
            Code::kInvalidArgument);
}

TEST(P11StartTest, ModuleMustBeAllowListed) {
  P11Config c = BaseConfig();
  c.allowed_modules = {"/usr/lib/other.so"};
  auto b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kPermissionDenied);
  EXPECT_NE(b.status().message().find("allowed_modules"), std::string::npos);
}

TEST(P11StartTest, MissingModule) {
  P11Config c = BaseConfig();
  c.module = "/nonexistent/libmissing.so";
  c.allowed_modules = {c.module};
  auto b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kBackendUnavailable);
}

TEST(P11StartTest, WrongPinAndBadPinFile) {
  P11Config c = BaseConfig();
  c.pin_file = (g_dir / "badpin").string();
  auto b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kPermissionDenied);
  EXPECT_NE(b.status().message().find("CKR_PIN_INCORRECT"), std::string::npos);
  EXPECT_EQ(b.status().message().find("9999"), std::string::npos);

  c.pin_file = (g_dir / "openpin").string();
  b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("group or others"), std::string::npos);

  c.pin_file = (g_dir / "nope").string();
  EXPECT_FALSE(P11Backend::Create(c).ok());
}

// A token that is not there does not stop the start (it may be plugged in
// later); every request names it.
TEST(P11StartTest, UnknownToken) {
  P11Config c = BaseConfig();
  c.token_label = "no-such-token";
  auto b = P11Backend::Create(c);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto k = (*b)->Generate({1000, "nowhere"}, v1::EC_P256);
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), Code::kBackendUnavailable);
  EXPECT_NE(k.status().message().find("label 'no-such-token' is not present"),
            std::string::npos)
      << k.status().ToString();
}

TEST_F(P11BackendTest, EcdsaAllCurves) {
  uint64_t id = 1;
  for (v1::KeyType t : {v1::EC_P256, v1::EC_P384, v1::EC_P521}) {
    auto k = backend_->Generate({1000, "ec"}, t);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    const std::vector<uint8_t> digest = Sha256("hello");
    SignParams p;
    p.algorithm = v1::ECDSA;
    p.digest = v1::SHA256;
    auto sig = backend_->Sign(Handle(*k, id, "ec"), p, digest);
    ASSERT_TRUE(sig.ok()) << sig.status().ToString();
    SslPtr<EVP_PKEY> pub = ParseSpki(k->public_key);
    ASSERT_NE(pub, nullptr);
    SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(pub.get(), nullptr));
    ASSERT_EQ(EVP_PKEY_verify_init(ctx.get()), 1);
    EXPECT_EQ(EVP_PKEY_verify(ctx.get(), sig->data(), sig->size(),
                              digest.data(), digest.size()),
              1)
        << KeyTypeName(t);
    EXPECT_TRUE(backend_->Destroy(Handle(*k, id, "ec")).ok());
    ++id;
  }
}

TEST_F(P11BackendTest, RsaPkcs1PssAndDecrypt) {
  auto k = backend_->Generate({1000, "rsa"}, v1::RSA_2048);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 10, "rsa");
  SslPtr<EVP_PKEY> pub = ParseSpki(k->public_key);
  ASSERT_NE(pub, nullptr);
  const std::vector<uint8_t> digest = Sha256("message");
  for (v1::SignAlgorithm alg : {v1::RSA_PKCS1, v1::RSA_PSS}) {
    SignParams p;
    p.algorithm = alg;
    p.digest = v1::SHA256;
    auto sig = backend_->Sign(h, p, digest);
    ASSERT_TRUE(sig.ok()) << sig.status().ToString();
    SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(pub.get(), nullptr));
    ASSERT_EQ(EVP_PKEY_verify_init(ctx.get()), 1);
    ASSERT_EQ(EVP_PKEY_CTX_set_rsa_padding(
                  ctx.get(), alg == v1::RSA_PSS ? RSA_PKCS1_PSS_PADDING
                                                : RSA_PKCS1_PADDING),
              1);
    ASSERT_EQ(EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()), 1);
    if (alg == v1::RSA_PSS) {
      ASSERT_EQ(EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), 32), 1);
    }
    EXPECT_EQ(EVP_PKEY_verify(ctx.get(), sig->data(), sig->size(),
                              digest.data(), digest.size()),
              1);
  }
  // Decrypt: OAEP (SHA-1) and PKCS#1 v1.5.
  const std::string secret = "top secret";
  for (v1::DecryptAlgorithm alg : {v1::RSA_OAEP, v1::RSA_PKCS1_V15}) {
    std::vector<uint8_t> ct = RsaEncrypt(
        pub.get(),
        alg == v1::RSA_OAEP ? RSA_PKCS1_OAEP_PADDING : RSA_PKCS1_PADDING,
        secret);
    ASSERT_FALSE(ct.empty());
    DecryptParams dp;
    dp.algorithm = alg;
    auto pt = backend_->Decrypt(h, dp, ct);
    ASSERT_TRUE(pt.ok()) << pt.status().ToString();
    const auto bytes = pt->Expose(SecretAccess::kToken);
    EXPECT_EQ(std::string(bytes.begin(), bytes.end()), secret);
    ct[5] ^= 1;
    EXPECT_EQ(backend_->Decrypt(h, dp, ct).status().code(),
              Code::kInvalidArgument);
  }
  DecryptParams tls;
  tls.algorithm = v1::RSA_TLS_PREMASTER;
  tls.tls_client_version = 0x0303;
  EXPECT_EQ(
      backend_->Decrypt(h, tls, std::vector<uint8_t>(256, 1)).status().code(),
      Code::kUnsupported);
  // Wrong algorithm for the key type.
  SignParams ec;
  ec.algorithm = v1::ECDSA;
  EXPECT_EQ(backend_->Sign(h, ec, digest).status().code(),
            Code::kInvalidArgument);
  EXPECT_TRUE(backend_->Destroy(h).ok());
  SignParams p;
  p.algorithm = v1::RSA_PKCS1;
  p.digest = v1::SHA256;
  EXPECT_EQ(backend_->Sign(h, p, digest).status().code(), Code::kNotFound);
}

TEST_F(P11BackendTest, Ed25519OrClearUnsupported) {
  auto k = backend_->Generate({1000, "ed"}, v1::ED25519);
  if (!backend_->SupportsEd25519()) {
    ASSERT_FALSE(k.ok());
    EXPECT_EQ(k.status().code(), Code::kUnsupported);
    GTEST_SKIP() << "token has no CKM_EDDSA";
  }
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const std::string msg = "a whole message";
  SignParams p;
  p.algorithm = v1::ED25519_PURE;
  auto sig = backend_->Sign(
      Handle(*k, 20, "ed"), p,
      std::span(reinterpret_cast<const uint8_t*>(msg.data()), msg.size()));
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  SslPtr<EVP_PKEY> pub = ParseSpki(k->public_key);
  SslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  ASSERT_EQ(
      EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, pub.get()), 1);
  EXPECT_EQ(EVP_DigestVerify(ctx.get(), sig->data(), sig->size(),
                             reinterpret_cast<const uint8_t*>(msg.data()),
                             msg.size()),
            1);
  EXPECT_TRUE(backend_->Destroy(Handle(*k, 20, "ed")).ok());
}

TEST_F(P11BackendTest, EcdhMatchesOpenSsl) {
  auto k = backend_->Generate({1000, "dh"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  ASSERT_NE(peer, nullptr);
  const int len = i2d_PUBKEY(peer.get(), nullptr);
  std::vector<uint8_t> peer_der(static_cast<std::size_t>(len));
  unsigned char* q = peer_der.data();
  i2d_PUBKEY(peer.get(), &q);
  auto secret = backend_->Derive(Handle(*k, 30, "dh"), peer_der);
  ASSERT_TRUE(secret.ok()) << secret.status().ToString();

  SslPtr<EVP_PKEY> ours = ParseSpki(k->public_key);
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(peer.get(), nullptr));
  ASSERT_EQ(EVP_PKEY_derive_init(ctx.get()), 1);
  ASSERT_EQ(EVP_PKEY_derive_set_peer(ctx.get(), ours.get()), 1);
  std::vector<uint8_t> expect(32);
  std::size_t elen = expect.size();
  ASSERT_EQ(EVP_PKEY_derive(ctx.get(), expect.data(), &elen), 1);
  const auto got = secret->Expose(SecretAccess::kToken);
  EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.end()), expect);
  // A point on another curve is refused.
  SslPtr<EVP_PKEY> other(EVP_EC_gen("P-384"));
  std::vector<uint8_t> other_der(
      static_cast<std::size_t>(i2d_PUBKEY(other.get(), nullptr)));
  q = other_der.data();
  i2d_PUBKEY(other.get(), &q);
  EXPECT_EQ(backend_->Derive(Handle(*k, 30, "dh"), other_der).status().code(),
            Code::kInvalidArgument);
  EXPECT_TRUE(backend_->Destroy(Handle(*k, 30, "dh")).ok());
}

TEST_F(P11BackendTest, ImportEcAndRsa) {
  for (const char* alg : {"EC", "RSA"}) {
    SslPtr<EVP_PKEY> key(std::string(alg) == "EC" ? EVP_EC_gen("P-384")
                                                  : EVP_RSA_gen(2048));
    ASSERT_NE(key, nullptr);
    SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
    ASSERT_EQ(PEM_write_bio_PrivateKey(bio.get(), key.get(), nullptr, nullptr,
                                       0, nullptr, nullptr),
              1);
    char* data = nullptr;
    const long n = BIO_get_mem_data(bio.get(), &data);
    SecretBytes pem(std::span<const uint8_t>(
        reinterpret_cast<const uint8_t*>(data), static_cast<std::size_t>(n)));
    auto k = backend_->Import({1000, "imp"}, pem);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    const std::vector<uint8_t> digest = Sha256("imported");
    SignParams p;
    p.algorithm = std::string(alg) == "EC" ? v1::ECDSA : v1::RSA_PKCS1;
    p.digest = v1::SHA256;
    auto sig = backend_->Sign(Handle(*k, 40, "imp"), p, digest);
    ASSERT_TRUE(sig.ok()) << sig.status().ToString();
    SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(key.get(), nullptr));
    ASSERT_EQ(EVP_PKEY_verify_init(ctx.get()), 1);
    if (std::string(alg) == "RSA") {
      ASSERT_EQ(EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_PADDING), 1);
      ASSERT_EQ(EVP_PKEY_CTX_set_signature_md(ctx.get(), EVP_sha256()), 1);
    }
    EXPECT_EQ(EVP_PKEY_verify(ctx.get(), sig->data(), sig->size(),
                              digest.data(), digest.size()),
              1);
    EXPECT_TRUE(backend_->Destroy(Handle(*k, 40, "imp")).ok());
  }
  SecretBytes junk(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>("junk"), 4));
  EXPECT_EQ(backend_->Import({1000, "j"}, junk).status().code(),
            Code::kInvalidArgument);
}

// Generate/Import mark their objects pending; the key store's commit removes
// the mark (Recorded). Reconciliation removes marked objects no row records
// and keeps recorded ones.
TEST_F(P11BackendTest, ReconcileRemovesUnrecordedPendingAndKeepsRecorded) {
  auto kept = backend_->Generate({1000, "kept"}, v1::EC_P256);
  auto orphan = backend_->Generate({1000, "orphan"}, v1::EC_P256);
  ASSERT_TRUE(kept.ok() && orphan.ok());
  const KeyHandle hk = Handle(*kept, 50, "kept");
  const KeyHandle ho = Handle(*orphan, 51, "orphan");
  backend_->Recorded(hk);
  ASSERT_TRUE(backend_->Reconcile(std::span(&hk, 1), {}).ok());
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  const std::vector<uint8_t> digest = Sha256("x");
  EXPECT_TRUE(backend_->Sign(hk, p, digest).ok());
  EXPECT_EQ(backend_->Sign(ho, p, digest).status().code(), Code::kNotFound);
  // A recorded key whose object is gone is reported, not an error.
  EXPECT_TRUE(backend_->Reconcile(std::vector<KeyHandle>{hk, ho}, {}).ok());
  EXPECT_TRUE(backend_->Destroy(hk).ok());
}

// What reconciliation must never remove: a recorded key whose mark was not
// removed (crash after the commit), a key another backend table on the same
// token records, an unmarked key no row records (a key store restored from
// an older backup, a renamed table), and anything when a recorded blob is
// unreadable.
TEST_F(P11BackendTest, ReconcileNeverRemovesWhatMayBeLive) {
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  const std::vector<uint8_t> digest = Sha256("r");
  auto a = backend_->Generate({1000, "a"}, v1::EC_P256);
  auto b = backend_->Generate({1000, "b"}, v1::EC_P256);
  auto c = backend_->Generate({1000, "c"}, v1::EC_P256);
  auto d = backend_->Generate({1000, "d"}, v1::EC_P256);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok() && d.ok());
  const KeyHandle ha = Handle(*a, 70, "a");
  const KeyHandle hb = Handle(*b, 71, "b");
  const KeyHandle hc = Handle(*c, 72, "c");
  const KeyHandle hd = Handle(*d, 73, "d");
  // a: recorded, still marked. b: marked, recorded by another table.
  // c: unmarked, then its row lost. d: marked, unrecorded, but a recorded
  // blob is unreadable.
  backend_->Recorded(hc);
  const std::vector<uint8_t> garbage = {0xff, 0x00, 0x01};
  KeyHandle unreadable = hd;
  unreadable.id = 74;
  unreadable.blob = garbage;
  ASSERT_TRUE(backend_
                  ->Reconcile(std::vector<KeyHandle>{ha, unreadable},
                              std::vector<KeyHandle>{hb})
                  .ok());
  for (const KeyHandle* h : {&ha, &hb, &hc, &hd}) {
    EXPECT_TRUE(backend_->Sign(*h, p, digest).ok()) << h->ref.ToString();
  }
  // That pass removed a's and b's marks (recorded): with no row at all they
  // now stay, as c does; d, still marked and recorded nowhere, goes.
  ASSERT_TRUE(backend_->Reconcile({}, {}).ok());
  for (const KeyHandle* h : {&ha, &hb, &hc}) {
    EXPECT_TRUE(backend_->Sign(*h, p, digest).ok()) << h->ref.ToString();
    EXPECT_TRUE(backend_->Destroy(*h).ok());
  }
  EXPECT_EQ(backend_->Sign(hd, p, digest).status().code(), Code::kNotFound);
}

// Deleting marks the object pending first: if the row then goes but the
// object stays (a crash, a failed C_DestroyObject), the next start removes
// it; a retired key whose row is still there loses the mark again.
TEST_F(P11BackendTest, RetiredKeyIsRemovedOnlyWithoutItsRow) {
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  const std::vector<uint8_t> digest = Sha256("t");
  auto a = backend_->Generate({1000, "ra"}, v1::EC_P256);
  auto b = backend_->Generate({1000, "rb"}, v1::EC_P256);
  ASSERT_TRUE(a.ok() && b.ok());
  const KeyHandle ha = Handle(*a, 80, "ra");
  const KeyHandle hb = Handle(*b, 81, "rb");
  backend_->Recorded(ha);
  backend_->Recorded(hb);
  ASSERT_TRUE(backend_->Retire(ha).ok());
  ASSERT_TRUE(backend_->Retire(hb).ok());
  EXPECT_TRUE(backend_->Sign(ha, p, digest).ok());  // still usable
  // a's row survived (the delete failed after Retire); b's is gone.
  ASSERT_TRUE(backend_->Reconcile(std::span(&ha, 1), {}).ok());
  EXPECT_TRUE(backend_->Sign(ha, p, digest).ok());
  EXPECT_EQ(backend_->Sign(hb, p, digest).status().code(), Code::kNotFound);
  ASSERT_TRUE(backend_->Reconcile({}, {}).ok());  // a is unmarked now
  EXPECT_TRUE(backend_->Sign(ha, p, digest).ok());
  EXPECT_TRUE(backend_->Destroy(ha).ok());
  EXPECT_TRUE(backend_->Retire(ha).ok());  // gone already: nothing to do
}

// Straight at SoftHSM2 (the same module in this process, as pkcs11-tool
// would see it): keyhold's private keys are sensitive, never extractable,
// and their private values cannot be read.
TEST_F(P11BackendTest, PrivateValuesCannotBeReadFromTheToken) {
  void* lib = ::dlopen(kModule, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(lib, nullptr);
  auto get =
      reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  ASSERT_NE(get, nullptr);
  CK_FUNCTION_LIST* fl = nullptr;
  ASSERT_EQ(get(&fl), CKR_OK);
  const CK_RV init = fl->C_Initialize(nullptr);  // p11-kit did it already
  ASSERT_TRUE(init == CKR_OK || init == CKR_CRYPTOKI_ALREADY_INITIALIZED);
  CK_SLOT_ID slots[16];
  CK_ULONG nslots = 16;
  ASSERT_EQ(fl->C_GetSlotList(CK_TRUE, slots, &nslots), CKR_OK);
  std::optional<CK_SLOT_ID> slot;
  for (CK_ULONG i = 0; i < nslots; ++i) {
    CK_TOKEN_INFO info{};
    if (fl->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
        std::string(reinterpret_cast<const char*>(info.label), 32)
            .starts_with(kLabel)) {
      slot = slots[i];
    }
  }
  ASSERT_TRUE(slot.has_value());
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  ASSERT_EQ(fl->C_OpenSession(*slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s),
            CKR_OK);
  std::string pin = kPin;
  const CK_RV login = fl->C_Login(
      s, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin.data()), pin.size());
  ASSERT_TRUE(login == CKR_OK || login == CKR_USER_ALREADY_LOGGED_IN);
  for (auto [type, name, secret] :
       {std::tuple{v1::EC_P256, "sens-ec", CKA_VALUE},
        std::tuple{v1::RSA_2048, "sens-rsa", CKA_PRIVATE_EXPONENT},
        std::tuple{v1::RSA_2048, "sens-rsa-p", CKA_PRIME_1}}) {
    auto k = backend_->Generate({1000, name}, type);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    const KeyHandle h = Handle(*k, 85, name);
    backend_->Recorded(h);
    std::string label = std::string("keyhold:1000/") + name;
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE find[] = {{CKA_CLASS, &cls, sizeof(cls)},
                           {CKA_LABEL, label.data(), label.size()}};
    ASSERT_EQ(fl->C_FindObjectsInit(s, find, 2), CKR_OK);
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    CK_ULONG n = 0;
    ASSERT_EQ(fl->C_FindObjects(s, &obj, 1, &n), CKR_OK);
    ASSERT_EQ(fl->C_FindObjectsFinal(s), CKR_OK);
    ASSERT_EQ(n, 1u) << name;
    CK_BBOOL sensitive = CK_FALSE;
    CK_BBOOL extractable = CK_TRUE;
    CK_BBOOL never_extractable = CK_FALSE;
    CK_ATTRIBUTE flags[] = {
        {CKA_SENSITIVE, &sensitive, sizeof(sensitive)},
        {CKA_EXTRACTABLE, &extractable, sizeof(extractable)},
        {CKA_NEVER_EXTRACTABLE, &never_extractable, sizeof(never_extractable)}};
    ASSERT_EQ(fl->C_GetAttributeValue(s, obj, flags, 3), CKR_OK);
    EXPECT_EQ(sensitive, CK_TRUE) << name;
    EXPECT_EQ(extractable, CK_FALSE) << name;
    EXPECT_EQ(never_extractable, CK_TRUE) << name;
    uint8_t buf[1024];
    CK_ATTRIBUTE value{secret, buf, sizeof(buf)};
    EXPECT_EQ(fl->C_GetAttributeValue(s, obj, &value, 1),
              CKR_ATTRIBUTE_SENSITIVE)
        << name;
    EXPECT_EQ(value.ulValueLen, CK_UNAVAILABLE_INFORMATION) << name;
    EXPECT_TRUE(backend_->Destroy(h).ok());
  }
  EXPECT_EQ(fl->C_CloseSession(s), CKR_OK);
}

// A blob only works under the key reference it was made for.
TEST_F(P11BackendTest, BlobIsBoundToItsKeyReference) {
  auto k = backend_->Generate({1000, "mine"}, v1::EC_P256);
  ASSERT_TRUE(k.ok());
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  const std::vector<uint8_t> digest = Sha256("b");
  EXPECT_TRUE(backend_->Sign(Handle(*k, 80, "mine"), p, digest).ok());
  EXPECT_EQ(backend_->Sign(Handle(*k, 81, "stolen"), p, digest).status().code(),
            Code::kNotFound);
  EXPECT_TRUE(backend_->Destroy(Handle(*k, 80, "mine")).ok());
}

TEST_F(P11BackendTest, ConcurrentSigning) {
  auto k = backend_->Generate({1000, "conc"}, v1::EC_P256);
  ASSERT_TRUE(k.ok());
  const KeyHandle h = Handle(*k, 60, "conc");
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  EXPECT_EQ(SignFromThreads(h, p, Sha256("c"), 6, 20), 120);
  EXPECT_TRUE(backend_->Destroy(h).ok());
}

// ---------------------------------------------------------------------------
// Against p11_fault_module: SoftHSM2 behind a module that misbehaves on cue.

struct FaultControls {
  void (*fail)(const char*, CK_RV, int) = nullptr;
  void (*lie)(const char*, CK_ULONG, int) = nullptr;
  void (*logout)(int) = nullptr;
  void (*absent)(int) = nullptr;
  unsigned long (*count)(const char*) = nullptr;
  void (*reset)() = nullptr;
  void (*hide_mechanism)(CK_MECHANISM_TYPE) = nullptr;
  void (*reuse_handle)(CK_OBJECT_HANDLE) = nullptr;
  void (*before)(const char*, void (*)(void*), void*) = nullptr;
  CK_C_GetFunctionList functions = nullptr;  // the module's own entry point
};

// The test maps the module itself (and keeps it mapped), so p11-kit's
// dlopen() of the same path shares its state and the controls reach it.
const FaultControls& Faults() {
  static const FaultControls controls = [] {
    FaultControls c;
    void* lib = ::dlopen(KH_P11_FAULT_MODULE, RTLD_NOW | RTLD_NODELETE);
    if (lib == nullptr) {
      return c;
    }
    c.fail = reinterpret_cast<decltype(c.fail)>(::dlsym(lib, "kh_fault_fail"));
    c.lie = reinterpret_cast<decltype(c.lie)>(::dlsym(lib, "kh_fault_lie"));
    c.logout =
        reinterpret_cast<decltype(c.logout)>(::dlsym(lib, "kh_fault_logout"));
    c.absent =
        reinterpret_cast<decltype(c.absent)>(::dlsym(lib, "kh_fault_absent"));
    c.count =
        reinterpret_cast<decltype(c.count)>(::dlsym(lib, "kh_fault_count"));
    c.reset =
        reinterpret_cast<decltype(c.reset)>(::dlsym(lib, "kh_fault_reset"));
    c.hide_mechanism = reinterpret_cast<decltype(c.hide_mechanism)>(
        ::dlsym(lib, "kh_fault_hide_mechanism"));
    c.reuse_handle = reinterpret_cast<decltype(c.reuse_handle)>(
        ::dlsym(lib, "kh_fault_reuse_handle"));
    c.before =
        reinterpret_cast<decltype(c.before)>(::dlsym(lib, "kh_fault_before"));
    c.functions = reinterpret_cast<decltype(c.functions)>(
        ::dlsym(lib, "C_GetFunctionList"));
    return c;
  }();
  return controls;
}

P11Config FaultConfig() {
  P11Config c = BaseConfig();
  c.module = KH_P11_FAULT_MODULE;
  c.allowed_modules = {c.module};
  return c;
}

SignParams EcdsaSha256() {
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  return p;
}

bool Verifies(const std::vector<uint8_t>& spki, const std::vector<uint8_t>& sig,
              const std::vector<uint8_t>& digest) {
  SslPtr<EVP_PKEY> pub = ParseSpki(spki);
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(pub.get(), nullptr));
  return ctx != nullptr && EVP_PKEY_verify_init(ctx.get()) == 1 &&
         EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(), digest.data(),
                         digest.size()) == 1;
}

class P11FaultTest : public P11BackendTest {
 protected:
  void SetUp() override {
    ASSERT_NE(Faults().reset, nullptr) << "cannot load " KH_P11_FAULT_MODULE;
    Faults().reset();
    auto b = P11Backend::Create(FaultConfig());
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    backend_ = std::move(*b);
  }
  void TearDown() override {
    if (Faults().reset != nullptr) {
      Faults().reset();
    }
  }
};

// The session pool is opened and logged in once: operations from several
// threads neither log in nor open sessions again.
TEST_F(P11FaultTest, NoLoginPerOperation) {
  ASSERT_NE(Faults().count, nullptr);
  auto k = backend_->Generate({1000, "pool"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 95, "pool");
  const unsigned long logins = Faults().count("C_Login");
  const unsigned long opens = Faults().count("C_OpenSession");
  EXPECT_GE(logins, 1u);
  EXPECT_EQ(SignFromThreads(h, EcdsaSha256(), Sha256("pool"), 4, 25), 100);
  EXPECT_EQ(Faults().count("C_Login"), logins);
  EXPECT_EQ(Faults().count("C_OpenSession"), opens);
  EXPECT_TRUE(backend_->Destroy(h).ok());
}

// A token without EdDSA (SoftHSM2 has it, so the fault module hides it):
// Ed25519 creation and import say so, and nothing is left on the token.
TEST_F(P11FaultTest, TokenWithoutEd25519SaysSo) {
  ASSERT_NE(Faults().hide_mechanism, nullptr);
  Faults().hide_mechanism(CKM_EDDSA);
  Faults().hide_mechanism(CKM_EC_EDWARDS_KEY_PAIR_GEN);
  auto b = P11Backend::Create(FaultConfig());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_FALSE((*b)->SupportsEd25519());
  auto k = (*b)->Generate({1000, "no-ed"}, v1::ED25519);
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), Code::kUnsupported);
  EXPECT_NE(k.status().message().find("does not offer Ed25519"),
            std::string::npos)
      << k.status().ToString();
  // Other types still work on that token.
  auto ec = (*b)->Generate({1000, "still-ec"}, v1::EC_P256);
  ASSERT_TRUE(ec.ok()) << ec.status().ToString();
  EXPECT_TRUE((*b)->Destroy(Handle(*ec, 90, "still-ec")).ok());
}

// C_Sign hangs in the one session. The next request waits
// acquire_timeout_ms and fails; after that, with the session busy for longer
// than the timeout, a request fails without waiting at all: even though the
// session comes back 100 ms after it started, well inside the timeout, it
// does not get it.
TEST_F(P11FaultTest, HungSessionsFailFurtherRequestsAtOnce) {
  P11Config c = FaultConfig();
  c.sessions = 1;
  c.acquire_timeout_ms = 500;
  auto b = P11Backend::Create(c);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto k = (*b)->Generate({1000, "hung"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 94, "hung");
  const std::vector<uint8_t> d = Sha256("hung");

  const fs::path hang = g_dir / "hang";
  const fs::path entered = g_dir / "hang.entered";
  fs::remove(entered);
  { std::ofstream(hang).put('x'); }
  ::setenv("KH_P11_FAULT_HANG_FILE", hang.c_str(), 1);
  StatusOr<std::vector<uint8_t>> held = Internal("not run");
  std::thread inside([&] { held = (*b)->Sign(h, EcdsaSha256(), d); });
  for (int i = 0; i < 1000 && !fs::exists(entered); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(fs::exists(entered));

  auto waited = (*b)->Sign(h, EcdsaSha256(), d);
  ASSERT_FALSE(waited.ok());
  EXPECT_EQ(waited.status().code(), Code::kBackendUnavailable);
  EXPECT_NE(waited.status().message().find("stayed busy"), std::string::npos)
      << waited.status().ToString();
  // What the shutdown watchdog would name.
  EXPECT_NE((*b)->CallsInProgress().find("backend 'hsm': 1 of 1 token "
                                         "sessions in a module call, all "
                                         "of them for "),
            std::string::npos)
      << (*b)->CallsInProgress();
  std::thread release([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    fs::remove(hang);
  });
  auto at_once = (*b)->Sign(h, EcdsaSha256(), d);
  release.join();
  inside.join();
  ::unsetenv("KH_P11_FAULT_HANG_FILE");
  ASSERT_FALSE(at_once.ok());
  EXPECT_NE(at_once.status().message().find("stayed busy"), std::string::npos)
      << at_once.status().ToString();
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *held, d));
  EXPECT_EQ((*b)->CallsInProgress(), "");
  auto after = (*b)->Sign(h, EcdsaSha256(), d);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *after, d));
  EXPECT_TRUE((*b)->Destroy(h).ok());
}

TEST(P11StartTest, ModulePathRules) {
  P11Config c = FaultConfig();
  c.module = "libkh-p11-fault.so";
  c.allowed_modules = {c.module};
  auto b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kPermissionDenied);
  EXPECT_NE(b.status().message().find("absolute path"), std::string::npos);

  c.module = g_dir.string();
  c.allowed_modules = {c.module};
  b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("not a regular file"), std::string::npos);

  const fs::path copy = g_dir / "writable-module.so";
  fs::copy_file(KH_P11_FAULT_MODULE, copy);
  ::chmod(copy.c_str(), 0666);
  c.module = copy.string();
  c.allowed_modules = {c.module};
  b = P11Backend::Create(c);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), Code::kPermissionDenied);
  EXPECT_NE(b.status().message().find("writable by group or others"),
            std::string::npos);
  fs::remove(copy);
}

// Impossible counts at start: clear start-up errors, no huge allocation.
TEST(P11StartTest, ImpossibleListCountsFailTheStart) {
  ASSERT_NE(Faults().reset, nullptr);
  for (const char* fn : {"C_GetSlotList", "C_GetMechanismList"}) {
    for (CK_ULONG lie : {CK_ULONG{1} << 40, ~CK_ULONG{0}}) {
      Faults().reset();
      Faults().lie(fn, lie, 1);
      auto b = P11Backend::Create(FaultConfig());
      ASSERT_FALSE(b.ok()) << fn;
      EXPECT_EQ(b.status().code(), Code::kInternal) << fn;
      EXPECT_NE(b.status().message().find("faulty"), std::string::npos)
          << b.status().ToString();
    }
  }
  Faults().reset();
}

TEST_F(P11FaultTest, SignLengthsAreChecked) {
  auto ec = backend_->Generate({1000, "len-ec"}, v1::EC_P256);
  ASSERT_TRUE(ec.ok()) << ec.status().ToString();
  auto rsa = backend_->Generate({1000, "len-rsa"}, v1::RSA_2048);
  ASSERT_TRUE(rsa.ok()) << rsa.status().ToString();
  const KeyHandle hec = Handle(*ec, 300, "len-ec");
  const KeyHandle hrsa = Handle(*rsa, 301, "len-rsa");
  const std::vector<uint8_t> digest = Sha256("lengths");
  SignParams pkcs1;
  pkcs1.algorithm = v1::RSA_PKCS1;
  pkcs1.digest = v1::SHA256;
  // Larger than the buffer, absurd, odd (r || s cannot be split), even but
  // not 2 x 32 for P-256; for RSA-2048 anything but 256.
  for (CK_ULONG lie : {CK_ULONG{5000}, ~CK_ULONG{0} - 1, CK_ULONG{63},
                       CK_ULONG{96}, CK_ULONG{0}}) {
    Faults().lie("C_Sign", lie, 1);
    auto sig = backend_->Sign(hec, EcdsaSha256(), digest);
    ASSERT_FALSE(sig.ok()) << lie;
    EXPECT_EQ(sig.status().code(), Code::kInternal);
    EXPECT_NE(sig.status().message().find("faulty PKCS#11 module"),
              std::string::npos)
        << sig.status().ToString();
  }
  for (CK_ULONG lie : {CK_ULONG{255}, CK_ULONG{1025}, ~CK_ULONG{0}}) {
    Faults().lie("C_Sign", lie, 1);
    auto sig = backend_->Sign(hrsa, pkcs1, digest);
    ASSERT_FALSE(sig.ok()) << lie;
    EXPECT_EQ(sig.status().code(), Code::kInternal);
  }
  // The sessions are still good.
  auto sig = backend_->Sign(hec, EcdsaSha256(), digest);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(Verifies(ec->public_key, *sig, digest));
  EXPECT_TRUE(backend_->Sign(hrsa, pkcs1, digest).ok());
}

TEST_F(P11FaultTest, DecryptLengthIsChecked) {
  auto k = backend_->Generate({1000, "len-dec"}, v1::RSA_2048);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 310, "len-dec");
  SslPtr<EVP_PKEY> pub = ParseSpki(k->public_key);
  const std::string secret = "plaintext";
  const std::vector<uint8_t> ct =
      RsaEncrypt(pub.get(), RSA_PKCS1_OAEP_PADDING, secret);
  ASSERT_FALSE(ct.empty());
  DecryptParams dp;
  dp.algorithm = v1::RSA_OAEP;
  for (CK_ULONG lie : {CK_ULONG{257}, CK_ULONG{5000}, ~CK_ULONG{0}}) {
    Faults().lie("C_Decrypt", lie, 1);
    auto pt = backend_->Decrypt(h, dp, ct);
    ASSERT_FALSE(pt.ok()) << lie;
    EXPECT_EQ(pt.status().code(), Code::kInternal);
    EXPECT_NE(pt.status().message().find("faulty PKCS#11 module"),
              std::string::npos)
        << pt.status().ToString();
  }
  auto pt = backend_->Decrypt(h, dp, ct);
  ASSERT_TRUE(pt.ok()) << pt.status().ToString();
  const auto bytes = pt->Expose(SecretAccess::kToken);
  EXPECT_EQ(std::string(bytes.begin(), bytes.end()), secret);
}

TEST_F(P11FaultTest, DerivedSecretLengthIsChecked) {
  auto k = backend_->Generate({1000, "len-ecdh"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 320, "len-ecdh");
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  ASSERT_NE(peer, nullptr);
  std::vector<uint8_t> peer_der(
      static_cast<std::size_t>(i2d_PUBKEY(peer.get(), nullptr)));
  unsigned char* q = peer_der.data();
  i2d_PUBKEY(peer.get(), &q);
  ASSERT_TRUE(backend_->Derive(h, peer_der).ok());  // warms the handle cache
  for (CK_ULONG lie : {CK_ULONG{33}, CK_ULONG{5000}, CK_UNAVAILABLE_INFORMATION}) {
    Faults().lie("C_GetAttributeValue/data", lie, 1);
    auto z = backend_->Derive(h, peer_der);
    ASSERT_FALSE(z.ok()) << lie;
    EXPECT_EQ(z.status().code(), Code::kInternal);
    EXPECT_NE(z.status().message().find("malformed answer"), std::string::npos)
        << z.status().ToString();
  }
  EXPECT_TRUE(backend_->Derive(h, peer_der).ok());
}

TEST_F(P11FaultTest, AttributeAndFindLengthsAreChecked) {
  // First call of the two-step read: an absurd size, never allocated.
  Faults().lie("C_GetAttributeValue", CK_ULONG{1} << 40, 1);
  auto k = backend_->Generate({1000, "attr"}, v1::EC_P256);
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), Code::kInternal);
  // Second call: more than the buffer the first answer sized.
  Faults().lie("C_GetAttributeValue/data", 100000, 1);
  k = backend_->Generate({1000, "attr"}, v1::RSA_2048);
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.status().code(), Code::kInternal);
  EXPECT_NE(k.status().message().find("faulty"), std::string::npos)
      << k.status().ToString();
  // The failed creations left no key behind, and a normal one works.
  k = backend_->Generate({1000, "attr"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 330, "attr");
  const std::vector<uint8_t> digest = Sha256("find");
  // C_FindObjects claiming more handles than the 64 it was given.
  Faults().lie("C_FindObjects", 1000, 1);
  auto sig = backend_->Sign(h, EcdsaSha256(), digest);
  ASSERT_FALSE(sig.ok());
  EXPECT_EQ(sig.status().code(), Code::kInternal);
  sig = backend_->Sign(h, EcdsaSha256(), digest);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *sig, digest));
  // Reconcile: only "attr" is a keyhold object left on the token by us.
  std::vector<KeyHandle> recorded = {h};
  EXPECT_TRUE(backend_->Reconcile(recorded, {}).ok());
}

// A session that dies (or a token that goes and comes back) once: the
// backend closes it, opens a fresh one and the same request succeeds.
TEST_F(P11FaultTest, LostSessionIsReopened) {
  auto k = backend_->Generate({1000, "lost"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 340, "lost");
  const std::vector<uint8_t> digest = Sha256("lost");
  for (CK_RV rv : {CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED,
                   CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT,
                   CKR_DEVICE_ERROR}) {
    const unsigned long opened = Faults().count("C_OpenSession");
    Faults().fail("C_Sign", rv, 1);
    auto sig = backend_->Sign(h, EcdsaSha256(), digest);
    ASSERT_TRUE(sig.ok()) << CkrName(rv) << ": " << sig.status().ToString();
    EXPECT_TRUE(Verifies(k->public_key, *sig, digest)) << CkrName(rv);
    EXPECT_GT(Faults().count("C_OpenSession"), opened) << CkrName(rv);
  }
  // Lost twice in a row: one retry only, then a clear status; the next
  // request works again.
  Faults().fail("C_Sign", CKR_DEVICE_REMOVED, 2);
  auto sig = backend_->Sign(h, EcdsaSha256(), digest);
  ASSERT_FALSE(sig.ok());
  EXPECT_EQ(sig.status().code(), Code::kBackendUnavailable);
  EXPECT_NE(sig.status().message().find("not present"), std::string::npos)
      << sig.status().ToString();
  EXPECT_TRUE(backend_->Sign(h, EcdsaSha256(), digest).ok());
}

// The token is logged out behind our back: every pooled session is logged
// out with it (login state is per token). The retry must not land on
// another pooled, logged-out session; it logs in again on a fresh one.
TEST_F(P11FaultTest, LoggedOutTokenIsLoggedInAgain) {
  auto k = backend_->Generate({1000, "relog"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 350, "relog");
  const std::vector<uint8_t> digest = Sha256("relog");
  const unsigned long logins = Faults().count("C_Login");
  Faults().logout(1);
  auto sig = backend_->Sign(h, EcdsaSha256(), digest);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *sig, digest));
  EXPECT_GT(Faults().count("C_Login"), logins);
  // Both pool sessions are usable afterwards, also from two threads.
  EXPECT_EQ(SignFromThreads(h, EcdsaSha256(), digest, 2, 10), 20);
}

// The token is removed: requests get a clear "not present" status (and no
// crash, no hang) for as long as it is away; when it is back the backend
// finds it again, logs in and the key works.
TEST_F(P11FaultTest, RemovedTokenThenBack) {
  auto k = backend_->Generate({1000, "gone"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 360, "gone");
  const std::vector<uint8_t> digest = Sha256("gone");
  ASSERT_TRUE(backend_->Sign(h, EcdsaSha256(), digest).ok());
  Faults().absent(1);
  for (int i = 0; i < 3; ++i) {
    auto sig = backend_->Sign(h, EcdsaSha256(), digest);
    ASSERT_FALSE(sig.ok());
    EXPECT_EQ(sig.status().code(), Code::kBackendUnavailable);
    EXPECT_NE(sig.status().message().find("is not present"),
              std::string::npos)
        << sig.status().ToString();
  }
  EXPECT_EQ(backend_->Generate({1000, "gone2"}, v1::EC_P256).status().code(),
            Code::kBackendUnavailable);
  const unsigned long logins = Faults().count("C_Login");
  Faults().absent(0);
  auto sig = backend_->Sign(h, EcdsaSha256(), digest);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *sig, digest));
  EXPECT_GT(Faults().count("C_Login"), logins);
}

// The token is not there when the backend starts (unplugged, its reader
// not up): the backend starts anyway so the daemon's other backends serve,
// its requests fail with "backend unavailable", and once the token is there
// the next request finds it, logs in and works. The start's reconciliation
// waits for the token and then removes no marked object (one may be in the
// middle of its creation by then).
TEST_F(P11FaultTest, TokenAbsentAtStartIsUsedOnceItIsThere) {
  auto k = backend_->Generate({1000, "late"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 370, "late");
  auto pending = backend_->Generate({1000, "late-pending"}, v1::EC_P256);
  ASSERT_TRUE(pending.ok()) << pending.status().ToString();
  const KeyHandle ph = Handle(*pending, 371, "late-pending");
  const std::vector<uint8_t> digest = Sha256("late");

  Faults().absent(1);
  auto b = P11Backend::Create(FaultConfig());
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_FALSE((*b)->SupportsEd25519());
  const KeyHandle recorded[] = {h};
  ASSERT_TRUE((*b)->Reconcile(recorded, {}).ok());
  for (int i = 0; i < 2; ++i) {
    auto sig = (*b)->Sign(h, EcdsaSha256(), digest);
    ASSERT_FALSE(sig.ok());
    EXPECT_EQ(sig.status().code(), Code::kBackendUnavailable);
    EXPECT_NE(sig.status().message().find("is not present"), std::string::npos)
        << sig.status().ToString();
  }
  EXPECT_EQ((*b)->Generate({1000, "late2"}, v1::EC_P256).status().code(),
            Code::kBackendUnavailable);

  Faults().absent(0);
  auto sig = (*b)->Sign(h, EcdsaSha256(), digest);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(Verifies(k->public_key, *sig, digest));
  EXPECT_TRUE((*b)->SupportsEd25519());
  // The unrecorded marked object survived the late reconciliation.
  auto psig = (*b)->Sign(ph, EcdsaSha256(), digest);
  ASSERT_TRUE(psig.ok()) << psig.status().ToString();
  EXPECT_TRUE(Verifies(pending->public_key, *psig, digest));
  EXPECT_TRUE((*b)->Destroy(h).ok());
  EXPECT_TRUE((*b)->Destroy(ph).ok());
}

// The handle of the private key object labelled `label`, found through the
// module directly (a session of the test's own, as another program on the
// token would have); CK_INVALID_HANDLE if there is not exactly one.
CK_OBJECT_HANDLE FindByLabel(CK_FUNCTION_LIST* f, CK_SESSION_HANDLE s,
                             const std::string& label) {
  CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
  CK_ATTRIBUTE t[] = {
      {CKA_CLASS, &cls, sizeof(cls)},
      {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
  CK_OBJECT_HANDLE found[2] = {CK_INVALID_HANDLE, CK_INVALID_HANDLE};
  CK_ULONG n = 0;
  if (f->C_FindObjectsInit(s, t, 2) != CKR_OK) {
    return CK_INVALID_HANDLE;
  }
  const CK_RV rv = f->C_FindObjects(s, found, 2, &n);
  f->C_FindObjectsFinal(s);
  return rv == CKR_OK && n == 1 ? found[0] : CK_INVALID_HANDLE;
}

// Destroys the token object of key {1000, name} through a session of its
// own, as another program with the PIN could; returns the handle it had
// (CK_INVALID_HANDLE if that failed).
CK_OBJECT_HANDLE DestroyBehindKeyholdsBack(const std::string& name) {
  CK_FUNCTION_LIST* f = nullptr;
  CK_SLOT_ID slots[8];
  CK_ULONG count = 8;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  if (Faults().functions(&f) != CKR_OK ||
      f->C_GetSlotList(CK_TRUE, slots, &count) != CKR_OK || count == 0 ||
      f->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                       nullptr, &s) != CKR_OK) {
    return CK_INVALID_HANDLE;
  }
  CK_OBJECT_HANDLE h = FindByLabel(f, s, "keyhold:1000/" + name);
  if (h != CK_INVALID_HANDLE && f->C_DestroyObject(s, h) != CKR_OK) {
    h = CK_INVALID_HANDLE;
  }
  f->C_CloseSession(s);
  return h;
}

// Runs a std::function<void()> as a kh_fault_before() hook.
void RunFunction(void* fn) { (*static_cast<std::function<void()>*>(fn))(); }

// A hook that destroys {1000, victim}'s object behind keyhold's back, then
// lets make() create the key that takes its handle, into *made.
std::function<void()> TakeHandleOf(const std::string& victim,
                                   std::function<StatusOr<CreatedKey>()> make,
                                   StatusOr<CreatedKey>* made) {
  return [victim, make = std::move(make), made] {
    const CK_OBJECT_HANDLE old = DestroyBehindKeyholdsBack(victim);
    ASSERT_NE(old, CK_INVALID_HANDLE);
    Faults().reuse_handle(old);
    *made = make();
  };
}

// A key pair made by OpenSSL, as PEM for Import().
SecretBytes PemOf(EVP_PKEY* key) {
  SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr,
                           nullptr);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return SecretBytes(std::span<const uint8_t>(
      reinterpret_cast<const uint8_t*>(data), static_cast<std::size_t>(n)));
}

// Another program destroys a key's token object behind keyhold's back, and
// the module gives that object's handle to the next key made, another
// user's: the first key's requests must never reach the new key through
// the handle cached for it; they find the key gone.
TEST_F(P11FaultTest, ReusedHandleNeverReachesAnotherKey) {
  ASSERT_NE(Faults().reuse_handle, nullptr);
  ASSERT_NE(Faults().functions, nullptr);
  auto x = backend_->Generate({1000, "reused"}, v1::EC_P256);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  const KeyHandle hx = Handle(*x, 380, "reused");
  const std::vector<uint8_t> digest = Sha256("reused");
  ASSERT_TRUE(backend_->Sign(hx, EcdsaSha256(), digest).ok());  // cached

  const CK_OBJECT_HANDLE old = DestroyBehindKeyholdsBack("reused");
  ASSERT_NE(old, CK_INVALID_HANDLE);
  Faults().reuse_handle(old);
  auto y = backend_->Generate({2000, "taker"}, v1::EC_P256);
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  KeyHandle hy = Handle(*y, 381, "taker");
  hy.ref = daemon::KeyRef{2000, "taker"};

  auto sig = backend_->Sign(hx, EcdsaSha256(), digest);
  ASSERT_FALSE(sig.ok()) << "signed with the key that took the handle: "
                         << Verifies(y->public_key, *sig, digest);
  EXPECT_EQ(sig.status().code(), Code::kNotFound) << sig.status().ToString();
  EXPECT_NE(sig.status().message().find("is gone"), std::string::npos)
      << sig.status().ToString();
  // The new key works through the reused number.
  auto ysig = backend_->Sign(hy, EcdsaSha256(), digest);
  ASSERT_TRUE(ysig.ok()) << ysig.status().ToString();
  EXPECT_TRUE(Verifies(y->public_key, *ysig, digest));
  EXPECT_TRUE(backend_->Destroy(hy).ok());
}

// As above, but the new key takes the number between the moment a sign
// reads the cached handle and the moment its C_SignInit binds the operation
// (the hook runs inside that C_SignInit, before the token's): the operation
// is bound to the new key, and nothing signed with it may come out.
TEST_F(P11FaultTest, HandleTakenBeforeSignInitBindsIsNeverUsed) {
  ASSERT_NE(Faults().before, nullptr);
  auto x = backend_->Generate({1000, "race-x"}, v1::EC_P256);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  const KeyHandle hx = Handle(*x, 390, "race-x");
  const std::vector<uint8_t> digest = Sha256("race");
  ASSERT_TRUE(backend_->Sign(hx, EcdsaSha256(), digest).ok());  // cached

  StatusOr<CreatedKey> y = Status(Code::kInternal, "hook did not run");
  std::function<void()> take = TakeHandleOf(
      "race-x",
      [&] {
        return backend_->Generate({2000, "race-y"}, v1::EC_P256);
      },
      &y);
  Faults().before("C_SignInit", &RunFunction, &take);
  auto sig = backend_->Sign(hx, EcdsaSha256(), digest);
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  ASSERT_FALSE(sig.ok()) << "signed with the key that took the handle: "
                         << Verifies(y->public_key, *sig, digest);
  EXPECT_EQ(sig.status().code(), Code::kNotFound) << sig.status().ToString();

  KeyHandle hy = Handle(*y, 391, "race-y");
  hy.ref = daemon::KeyRef{2000, "race-y"};
  auto ysig = backend_->Sign(hy, EcdsaSha256(), digest);
  ASSERT_TRUE(ysig.ok()) << ysig.status().ToString();
  EXPECT_TRUE(Verifies(y->public_key, *ysig, digest));
}

// The new key is being made (its C_GenerateKeyPair under way, its number not
// yet forgotten by the cache) when a sign reads the cached handle, and is
// made before that sign's C_SignInit: that sign must not use it either.
TEST_F(P11FaultTest, HandleTakenByAKeyBeingMadeIsNeverUsed) {
  ASSERT_NE(Faults().before, nullptr);
  auto x = backend_->Generate({1000, "made-x"}, v1::EC_P256);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  const KeyHandle hx = Handle(*x, 392, "made-x");
  const std::vector<uint8_t> digest = Sha256("made");
  ASSERT_TRUE(backend_->Sign(hx, EcdsaSha256(), digest).ok());  // cached
  const CK_OBJECT_HANDLE old = DestroyBehindKeyholdsBack("made-x");
  ASSERT_NE(old, CK_INVALID_HANDLE);
  Faults().reuse_handle(old);

  std::promise<void> entered;
  std::promise<void> go;
  std::shared_future<void> go_f = go.get_future().share();
  std::function<void()> hold = [&] {
    entered.set_value();
    go_f.wait();
  };
  Faults().before("C_GenerateKeyPair", &RunFunction, &hold);
  StatusOr<CreatedKey> y = Status(Code::kInternal, "not made");
  std::thread maker([&] {
    y = backend_->Generate({2000, "made-y"}, v1::EC_P256);
  });
  entered.get_future().wait();

  std::function<void()> finish = [&] {
    go.set_value();
    maker.join();
  };
  Faults().before("C_SignInit", &RunFunction, &finish);
  auto sig = backend_->Sign(hx, EcdsaSha256(), digest);
  if (maker.joinable()) {
    go.set_value();
    maker.join();
  }
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  ASSERT_FALSE(sig.ok()) << "signed with the key that took the handle: "
                         << Verifies(y->public_key, *sig, digest);
  EXPECT_EQ(sig.status().code(), Code::kNotFound) << sig.status().ToString();
}

// The same race for a decryption: the ciphertext is for the key that takes
// the number (imported, so the test knows its public key first), and its
// plaintext must not come out to the first key's caller.
TEST_F(P11FaultTest, HandleTakenBeforeDecryptInitBindsIsNeverUsed) {
  ASSERT_NE(Faults().before, nullptr);
  auto x = backend_->Generate({1000, "dec-x"}, v1::RSA_2048);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  const KeyHandle hx = Handle(*x, 393, "dec-x");
  SslPtr<EVP_PKEY> other(EVP_RSA_gen(2048));
  ASSERT_NE(other, nullptr);
  const std::vector<uint8_t> ct =
      RsaEncrypt(other.get(), RSA_PKCS1_OAEP_PADDING, "another user's secret");
  ASSERT_FALSE(ct.empty());
  DecryptParams dp;
  dp.algorithm = v1::RSA_OAEP;
  // Warms the handle cache (the ciphertext is not x's: the token says so).
  EXPECT_FALSE(backend_->Decrypt(hx, dp, ct).ok());

  StatusOr<CreatedKey> y = Status(Code::kInternal, "hook did not run");
  std::function<void()> take = TakeHandleOf(
      "dec-x",
      [&] {
        return backend_->Import({2000, "dec-y"}, PemOf(other.get()));
      },
      &y);
  Faults().before("C_DecryptInit", &RunFunction, &take);
  auto pt = backend_->Decrypt(hx, dp, ct);
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  ASSERT_FALSE(pt.ok()) << "decrypted with the key that took the handle";
  EXPECT_EQ(pt.status().code(), Code::kNotFound) << pt.status().ToString();
}

// And for ECDH: the secret derived with the key that took the number must
// not come out.
TEST_F(P11FaultTest, HandleTakenBeforeDeriveIsNeverUsed) {
  ASSERT_NE(Faults().before, nullptr);
  auto x = backend_->Generate({1000, "dh-x"}, v1::EC_P256);
  ASSERT_TRUE(x.ok()) << x.status().ToString();
  const KeyHandle hx = Handle(*x, 394, "dh-x");
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  ASSERT_NE(peer, nullptr);
  std::vector<uint8_t> peer_der(
      static_cast<std::size_t>(i2d_PUBKEY(peer.get(), nullptr)));
  unsigned char* q = peer_der.data();
  i2d_PUBKEY(peer.get(), &q);
  ASSERT_TRUE(backend_->Derive(hx, peer_der).ok());  // cached

  SslPtr<EVP_PKEY> other(EVP_EC_gen("P-256"));
  ASSERT_NE(other, nullptr);
  StatusOr<CreatedKey> y = Status(Code::kInternal, "hook did not run");
  std::function<void()> take = TakeHandleOf(
      "dh-x",
      [&] {
        return backend_->Import({2000, "dh-y"}, PemOf(other.get()));
      },
      &y);
  Faults().before("C_DeriveKey", &RunFunction, &take);
  auto z = backend_->Derive(hx, peer_der);
  ASSERT_TRUE(y.ok()) << y.status().ToString();
  ASSERT_FALSE(z.ok()) << "derived with the key that took the handle";
  EXPECT_EQ(z.status().code(), Code::kNotFound) << z.status().ToString();
}

// A read-write session of the test's own on the token, through the fault
// module, as another program with the PIN would have.
class OwnSession {
 public:
  OwnSession() {
    CK_SLOT_ID slots[8];
    CK_ULONG count = 8;
    if (Faults().functions(&f_) != CKR_OK ||
        f_->C_GetSlotList(CK_TRUE, slots, &count) != CKR_OK || count == 0 ||
        f_->C_OpenSession(slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION,
                          nullptr, nullptr, &s_) != CKR_OK) {
      s_ = CK_INVALID_HANDLE;
    }
  }
  OwnSession(const OwnSession&) = delete;
  OwnSession& operator=(const OwnSession&) = delete;
  ~OwnSession() {
    if (s_ != CK_INVALID_HANDLE) {
      f_->C_CloseSession(s_);
    }
  }
  bool ok() const { return s_ != CK_INVALID_HANDLE; }

  // The token objects of class cls that carry label (at most 16); false if
  // the search failed.
  bool Find(CK_OBJECT_CLASS cls, const std::string& label,
            std::vector<CK_OBJECT_HANDLE>* out) {
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
    if (f_->C_FindObjectsInit(s_, t, 2) != CKR_OK) {
      return false;
    }
    CK_OBJECT_HANDLE found[16];
    CK_ULONG n = 0;
    const CK_RV rv = f_->C_FindObjects(s_, found, 16, &n);
    f_->C_FindObjectsFinal(s_);
    out->assign(found, found + (rv == CKR_OK ? n : 0));
    return rv == CKR_OK;
  }

  // Destroys every token object of class cls that carries label; false if
  // a call failed.
  bool DestroyAll(CK_OBJECT_CLASS cls, const std::string& label) {
    std::vector<CK_OBJECT_HANDLE> found;
    bool ok = Find(cls, label, &found);
    for (std::size_t i = 0; ok && i < found.size(); ++i) {
      ok = f_->C_DestroyObject(s_, found[i]) == CKR_OK;
    }
    return ok;
  }

  // How many token objects of class cls carry label (-1: the search failed).
  int Count(CK_OBJECT_CLASS cls, const std::string& label) {
    std::vector<CK_OBJECT_HANDLE> found;
    return Find(cls, label, &found) ? static_cast<int>(found.size()) : -1;
  }

  // A private token data object, as keyhold's pending markers are.
  bool Data(const std::string& label, const std::string& application,
            std::vector<uint8_t> value) {
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_LABEL, const_cast<char*>(label.data()), label.size()},
        {CKA_APPLICATION, const_cast<char*>(application.data()),
         application.size()},
        {CKA_VALUE, value.data(), value.size()}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    return f_->C_CreateObject(s_, t, 6, &h) == CKR_OK;
  }

 private:
  CK_FUNCTION_LIST* f_ = nullptr;
  CK_SESSION_HANDLE s_ = CK_INVALID_HANDLE;
};

// SoftHSM2 rewrites an object's file in place when an attribute changes,
// and a keyholdd killed during that write lost the key (an empty file, seen
// with kill -9 during relabels). So a key object is made with its final
// label and never changed again; a separate marker object says "pending"
// and is only ever created and destroyed.
TEST_F(P11FaultTest, KeyObjectsAreNeverChangedAfterCreation) {
  ASSERT_NE(Faults().count, nullptr);
  OwnSession own;
  ASSERT_TRUE(own.ok());
  auto g = backend_->Generate({1000, "still-g"}, v1::EC_P256);
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  SslPtr<EVP_PKEY> ec(EVP_EC_gen("P-256"));
  auto i = backend_->Import({1000, "still-i"}, PemOf(ec.get()));
  ASSERT_TRUE(i.ok()) << i.status().ToString();
  const KeyHandle hg = Handle(*g, 400, "still-g");
  const KeyHandle hi = Handle(*i, 401, "still-i");
  EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, "keyhold:1000/still-g"), 1);
  EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, "keyhold:1000/still-i"), 1);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-g"), 1);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-i"), 1);
  backend_->Recorded(hg);
  backend_->Recorded(hi);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-g"), 0);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-i"), 0);

  // A delete: marked, the row goes, then the object and its mark.
  ASSERT_TRUE(backend_->Retire(hg).ok());
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-g"), 1);
  EXPECT_TRUE(backend_->Sign(hg, EcdsaSha256(), Sha256("g")).ok());
  ASSERT_TRUE(backend_->Destroy(hg).ok());
  EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, "keyhold:1000/still-g"), 0);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-g"), 0);
  // A delete that failed after Retire: the start takes the mark off.
  ASSERT_TRUE(backend_->Retire(hi).ok());
  ASSERT_TRUE(backend_->Reconcile(std::span(&hi, 1), {}).ok());
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/still-i"), 0);
  EXPECT_TRUE(backend_->Sign(hi, EcdsaSha256(), Sha256("i")).ok());
  ASSERT_TRUE(backend_->Destroy(hi).ok());
  EXPECT_EQ(Faults().count("C_SetAttributeValue"), 0u);
}

// What a kill -9 can leave, one state per step of a create or delete, and
// what the next start makes of it.
TEST_F(P11FaultTest, CrashLeftoversAreSettledAtStart) {
  OwnSession own;
  ASSERT_TRUE(own.ok());
  // Died before the store's commit: key and mark, no row.
  auto made = backend_->Generate({1000, "c-made"}, v1::EC_P256);
  // Died after the commit: key, mark and row.
  auto committed = backend_->Generate({1000, "c-committed"}, v1::EC_P256);
  // Died in a delete, after the row went: key and mark, no row.
  auto deleting = backend_->Generate({1000, "c-deleting"}, v1::EC_P256);
  ASSERT_TRUE(made.ok() && committed.ok() && deleting.ok());
  const KeyHandle hm = Handle(*made, 410, "c-made");
  const KeyHandle hc = Handle(*committed, 411, "c-committed");
  const KeyHandle hd = Handle(*deleting, 412, "c-deleting");
  backend_->Recorded(hd);
  ASSERT_TRUE(backend_->Retire(hd).ok());
  // Died while the token made the key: only the mark.
  const std::vector<uint8_t> unmade_id(16, 0x5a);
  ASSERT_TRUE(own.Data("keyhold-pending:1000/c-unmade", "keyhold", unmade_id));
  // Not keyhold's, for all its label: never touched.
  ASSERT_TRUE(own.Data("keyhold-pending:1000/c-foreign", "other", unmade_id));

  ASSERT_TRUE(backend_->Reconcile(std::span(&hc, 1), {}).ok());
  const std::vector<uint8_t> digest = Sha256("c");
  EXPECT_EQ(backend_->Sign(hm, EcdsaSha256(), digest).status().code(),
            Code::kNotFound);
  EXPECT_EQ(backend_->Sign(hd, EcdsaSha256(), digest).status().code(),
            Code::kNotFound);
  EXPECT_TRUE(backend_->Sign(hc, EcdsaSha256(), digest).ok());
  for (const char* name : {"c-made", "c-deleting"}) {
    EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, std::string("keyhold:1000/") + name),
              0)
        << name;
  }
  for (const char* name : {"c-made", "c-committed", "c-deleting", "c-unmade"}) {
    EXPECT_EQ(own.Count(CKO_DATA, std::string("keyhold-pending:1000/") + name),
              0)
        << name;
  }
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/c-foreign"), 1);
  EXPECT_TRUE(own.DestroyAll(CKO_DATA, "keyhold-pending:1000/c-foreign"));
  EXPECT_TRUE(backend_->Destroy(hc).ok());
}

// A mark the token refuses to make fails the creation before any key
// exists; a key the token refuses to make takes its mark away again.
TEST_F(P11FaultTest, CreationWithoutAMarkFailsAndLeavesNothing) {
  OwnSession own;
  ASSERT_TRUE(own.ok());
  Faults().fail("C_CreateObject", CKR_DEVICE_MEMORY, 1);
  auto g = backend_->Generate({1000, "nomark"}, v1::EC_P256);
  ASSERT_FALSE(g.ok());
  EXPECT_NE(g.status().message().find("pending marker"), std::string::npos)
      << g.status().ToString();
  EXPECT_EQ(Faults().count("C_GenerateKeyPair"), 0u);
  SslPtr<EVP_PKEY> ec(EVP_EC_gen("P-256"));
  Faults().fail("C_CreateObject", CKR_DEVICE_MEMORY, 1);
  EXPECT_FALSE(backend_->Import({1000, "nomark"}, PemOf(ec.get())).ok());
  EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, "keyhold:1000/nomark"), 0);

  Faults().fail("C_GenerateKeyPair", CKR_DEVICE_MEMORY, 1);
  EXPECT_FALSE(backend_->Generate({1000, "nokey"}, v1::EC_P256).ok());
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/nokey"), 0);
  EXPECT_EQ(own.Count(CKO_PRIVATE_KEY, "keyhold:1000/nokey"), 0);
}

// A mark that cannot be removed after the commit leaves a usable key and
// goes at the next start; a delete whose mark cannot be made is refused
// and keeps the key.
TEST_F(P11FaultTest, MarkFailuresNeverCostAKey) {
  OwnSession own;
  ASSERT_TRUE(own.ok());
  auto k = backend_->Generate({1000, "mf"}, v1::EC_P256);
  ASSERT_TRUE(k.ok()) << k.status().ToString();
  const KeyHandle h = Handle(*k, 420, "mf");
  Faults().fail("C_DestroyObject", CKR_ACTION_PROHIBITED, 1);
  backend_->Recorded(h);
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/mf"), 1);
  const std::vector<uint8_t> digest = Sha256("mf");
  EXPECT_TRUE(backend_->Sign(h, EcdsaSha256(), digest).ok());
  ASSERT_TRUE(backend_->Reconcile(std::span(&h, 1), {}).ok());
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/mf"), 0);
  EXPECT_TRUE(backend_->Sign(h, EcdsaSha256(), digest).ok());

  Faults().fail("C_CreateObject", CKR_DEVICE_MEMORY, 1);
  EXPECT_FALSE(backend_->Retire(h).ok());
  EXPECT_EQ(own.Count(CKO_DATA, "keyhold-pending:1000/mf"), 0);
  ASSERT_TRUE(backend_->Reconcile({}, {}).ok());  // unmarked: kept
  EXPECT_TRUE(backend_->Sign(h, EcdsaSha256(), digest).ok());
  EXPECT_TRUE(backend_->Destroy(h).ok());
}

}  // namespace
}  // namespace keyhold::backend::pkcs11
