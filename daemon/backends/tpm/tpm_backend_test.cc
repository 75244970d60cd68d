// Tests against a real swtpm started here on 127.0.0.1 (skipped if swtpm is
// not installed). Every signature is verified and every ciphertext made with
// plain OpenSSL.
#include "daemon/backends/tpm/tpm_backend.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <tss2/tss2_tpm2_types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/key_types.h"
#include "common/ssl_ptr.h"
#include "daemon/backends/tpm/tpm_errors.h"

namespace keyhold::backend::tpm {
namespace {

namespace fs = std::filesystem;

bool HaveSwtpm() {
  return std::system("command -v swtpm >/dev/null 2>&1") == 0;
}

// A free TCP port P on 127.0.0.1 with P+1 free as well.
int FreePortPair() {
  for (int attempt = 0; attempt < 50; ++attempt) {
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
      ::close(fd);
      continue;
    }
    const int port = ntohs(a.sin_port);
    int fd2 = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in b = a;
    b.sin_port = htons(static_cast<uint16_t>(port + 1));
    const bool ok = port < 65000 && ::bind(fd2, reinterpret_cast<sockaddr*>(&b),
                                           sizeof(b)) == 0;
    ::close(fd2);
    ::close(fd);
    if (ok) {
      return port;
    }
  }
  return 0;
}

bool CanConnect(int port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  const bool ok =
      ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  ::close(fd);
  return ok;
}

// One swtpm process with its state in dir.
class Swtpm {
 public:
  explicit Swtpm(fs::path dir) : dir_(std::move(dir)) {
    fs::create_directories(dir_);
  }
  ~Swtpm() { Stop(); }

  bool Start() {
    for (int attempt = 0; attempt < 5; ++attempt) {
      if (port_ == 0 || attempt > 0) {
        port_ = FreePortPair();
      }
      if (StartOn(port_)) {
        return true;
      }
    }
    return false;
  }
  // Restarts on the same port (the TCTI string stays valid).
  bool Restart() {
    Stop();
    return StartOn(port_);
  }
  void Stop() {
    if (pid_ > 0) {
      ::kill(pid_, SIGCONT);  // if paused
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
      pid_ = -1;
    }
  }
  // SIGSTOP: connections are still accepted, commands never answered.
  void Pause() { ::kill(pid_, SIGSTOP); }
  void Resume() { ::kill(pid_, SIGCONT); }
  std::string Tcti() const {
    return "swtpm:host=127.0.0.1,port=" + std::to_string(port_);
  }
  int Port() const { return port_; }

 private:
  bool StartOn(int port) {
    const std::string server =
        "type=tcp,port=" + std::to_string(port) + ",bindaddr=127.0.0.1";
    const std::string ctrl =
        "type=tcp,port=" + std::to_string(port + 1) + ",bindaddr=127.0.0.1";
    const std::string state = "dir=" + dir_.string();
    pid_ = ::fork();
    if (pid_ == 0) {
      const int devnull = ::open("/dev/null", O_WRONLY);
      ::dup2(devnull, 1);
      ::dup2(devnull, 2);
      ::execlp("swtpm", "swtpm", "socket", "--tpm2", "--server", server.c_str(),
               "--ctrl", ctrl.c_str(), "--tpmstate", state.c_str(), "--flags",
               "not-need-init,startup-clear", static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (int i = 0; i < 200; ++i) {
      if (CanConnect(port)) {
        return true;
      }
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return false;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    Stop();
    return false;
  }

  fs::path dir_;
  int port_ = 0;
  pid_t pid_ = -1;
};

// Forwards 127.0.0.1:Q and Q+1 to a swtpm's command and control ports.
// DropNextResponse() closes the connection instead of passing on the TPM's
// next answer: the command ran, the link is lost, and the TPM keeps running
// (and, having no resource manager, keeps whatever that connection loaded).
class TcpProxy {
 public:
  explicit TcpProxy(int target) : target_(target) {}
  ~TcpProxy() {
    stop_ = true;
    if (thread_.joinable()) {
      thread_.join();
    }
    for (int fd : listen_) {
      if (fd >= 0) {
        ::close(fd);
      }
    }
  }
  bool Start() {
    port_ = FreePortPair();
    for (int i = 0; i < 2; ++i) {
      listen_[i] = ::socket(AF_INET, SOCK_STREAM, 0);
      const int one = 1;
      ::setsockopt(listen_[i], SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
      sockaddr_in a = Addr(port_ + i);
      if (port_ == 0 ||
          ::bind(listen_[i], reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
          ::listen(listen_[i], 4) != 0) {
        return false;
      }
    }
    thread_ = std::thread([this] { Loop(); });
    return true;
  }
  void DropNextResponse() { drop_ = true; }
  std::string Tcti() const {
    return "swtpm:host=127.0.0.1,port=" + std::to_string(port_);
  }

 private:
  static sockaddr_in Addr(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    return a;
  }
  void Loop() {
    struct Pair {
      int fd[2];  // client, upstream
      int port;   // 0: command port, 1: control port
    };
    std::vector<Pair> pairs;
    auto close_pair = [](Pair& p) {
      ::close(p.fd[0]);
      ::close(p.fd[1]);
    };
    while (!stop_) {
      std::vector<pollfd> fds;
      for (int fd : listen_) {
        fds.push_back({fd, POLLIN, 0});
      }
      for (const Pair& p : pairs) {
        fds.push_back({p.fd[0], POLLIN, 0});
        fds.push_back({p.fd[1], POLLIN, 0});
      }
      if (::poll(fds.data(), fds.size(), 20) <= 0) {
        continue;
      }
      std::vector<bool> dead(pairs.size(), false);
      for (std::size_t i = 0; i < pairs.size(); ++i) {
        for (std::size_t side = 0; side < 2 && !dead[i]; ++side) {
          if ((fds[2 + 2 * i + side].revents & (POLLIN | POLLHUP | POLLERR)) ==
              0) {
            continue;
          }
          if (side == 1 && pairs[i].port == 0 && drop_.exchange(false)) {
            dead[i] = true;  // the answer is never passed on
            continue;
          }
          char buf[8192];
          const ssize_t n = ::read(pairs[i].fd[side], buf, sizeof(buf));
          if (n <= 0 || ::send(pairs[i].fd[1 - side], buf,
                               static_cast<std::size_t>(n),
                               MSG_NOSIGNAL) != n) {
            dead[i] = true;
          }
        }
      }
      for (std::size_t i = pairs.size(); i-- > 0;) {
        if (dead[i]) {
          close_pair(pairs[i]);
          pairs.erase(pairs.begin() + static_cast<std::ptrdiff_t>(i));
        }
      }
      for (int i = 0; i < 2; ++i) {
        if ((fds[static_cast<std::size_t>(i)].revents & POLLIN) == 0) {
          continue;
        }
        const int c = ::accept(listen_[i], nullptr, nullptr);
        if (c < 0) {
          continue;
        }
        const int u = ::socket(AF_INET, SOCK_STREAM, 0);
        sockaddr_in a = Addr(target_ + i);
        if (::connect(u, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
          ::close(u);
          ::close(c);
          continue;
        }
        pairs.push_back(Pair{{c, u}, i});
      }
    }
    for (Pair& p : pairs) {
      close_pair(p);
    }
  }

  int target_;
  int port_ = 0;
  int listen_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  std::atomic<bool> drop_{false};
  std::thread thread_;
};

SslPtr<EVP_PKEY> ParsePub(const std::vector<uint8_t>& der) {
  const unsigned char* p = der.data();
  return SslPtr<EVP_PKEY>(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

std::vector<uint8_t> Sha(const EVP_MD* md, std::string_view msg) {
  std::vector<uint8_t> out(static_cast<std::size_t>(EVP_MD_get_size(md)));
  EVP_Digest(msg.data(), msg.size(), out.data(), nullptr, md, nullptr);
  return out;
}

// Verifies a signature over a digest with OpenSSL. pss_salt: -2 = auto.
bool Verify(EVP_PKEY* pub, const EVP_MD* md, int padding,
            std::span<const uint8_t> digest, std::span<const uint8_t> sig,
            const EVP_MD* mgf1 = nullptr) {
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pub, nullptr));
  if (EVP_PKEY_verify_init(ctx.get()) != 1) {
    return false;
  }
  if (padding != 0) {
    EVP_PKEY_CTX_set_rsa_padding(ctx.get(), padding);
    if (padding == RSA_PKCS1_PSS_PADDING) {
      EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), RSA_PSS_SALTLEN_AUTO);
      EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), mgf1 != nullptr ? mgf1 : md);
    }
  }
  if (md != nullptr) {
    EVP_PKEY_CTX_set_signature_md(ctx.get(), md);
  }
  const bool ok = EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(),
                                  digest.data(), digest.size()) == 1;
  ERR_clear_error();
  return ok;
}

std::vector<uint8_t> Encrypt(EVP_PKEY* pub, int padding, const EVP_MD* oaep,
                             std::span<const uint8_t> msg) {
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, pub, nullptr));
  EVP_PKEY_encrypt_init(ctx.get());
  EVP_PKEY_CTX_set_rsa_padding(ctx.get(), padding);
  if (oaep != nullptr) {
    EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), oaep);
    EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), oaep);
  }
  std::size_t len = 0;
  EVP_PKEY_encrypt(ctx.get(), nullptr, &len, msg.data(), msg.size());
  std::vector<uint8_t> out(len);
  EVP_PKEY_encrypt(ctx.get(), out.data(), &len, msg.data(), msg.size());
  out.resize(len);
  return out;
}

std::vector<uint8_t> Bytes(const SecretBytes& s) {
  auto e = s.Expose(SecretAccess::kToken);
  return {e.begin(), e.end()};
}

class TpmBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!HaveSwtpm()) {
      GTEST_SKIP() << "swtpm is not installed";
    }
    char tmpl[] = "/tmp/kh-tpm-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    master_ = dir_ / "master.key";
    WriteMasterKey(master_);
    tpm_ = std::make_unique<Swtpm>(dir_ / "tpm");
    ASSERT_TRUE(tpm_->Start());
  }
  void TearDown() override {
    backend_.reset();
    tpm_.reset();
    if (!dir_.empty()) {
      fs::remove_all(dir_);
    }
  }

  static void WriteMasterKey(const fs::path& path) {
    uint8_t key[32];
    ASSERT_EQ(RAND_bytes(key, sizeof(key)), 1);
    const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, key, sizeof(key)), 32);
    ::close(fd);
  }

  std::unique_ptr<TpmBackend> MakeBackend(const std::string& tcti,
                                          const fs::path& master,
                                          uint32_t max_loaded = 8,
                                          bool encrypted_sessions = false) {
    TpmOptions o;
    o.name = "tpm";
    o.tcti = tcti;
    o.max_loaded_keys = max_loaded;
    o.encrypted_sessions = encrypted_sessions;
    auto b = TpmBackend::Create(std::move(o), master);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    return b.ok() ? std::move(*b) : nullptr;
  }

  fs::path dir_;
  fs::path master_;
  std::unique_ptr<Swtpm> tpm_;
  std::unique_ptr<TpmBackend> backend_;
};

struct Key {
  CreatedKey created;
  KeyHandle handle;
};

SignParams EcdsaSha256() {
  SignParams p;
  p.algorithm = v1::ECDSA;
  p.digest = v1::SHA256;
  return p;
}

// Whether sig is k's ECDSA signature over the digest d.
bool VerifiesEcdsa(const Key& k, std::span<const uint8_t> d,
                   std::span<const uint8_t> sig) {
  return Verify(ParsePub(k.created.public_key).get(), nullptr, 0, d, sig);
}

Key MakeKey(TpmBackend* b, uint64_t id, v1::KeyType type,
            const std::string& name) {
  Key k;
  daemon::KeyRef ref{1000, name};
  auto c = b->Generate(ref, type);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  if (c.ok()) {
    k.created = std::move(*c);
  }
  k.handle.id = id;
  k.handle.ref = ref;
  k.handle.type = type;
  k.handle.blob = k.created.blob;
  return k;
}

TEST(TpmSettingsTest, SoleUserDefaultsToTheExclusiveDevice) {
  auto sole = [](const std::string& extra) -> std::optional<bool> {
    StatusOr<TpmOptions> o = ParseTpmSettings("name = \"t\"\n" + extra);
    if (!o.ok()) {
      return std::nullopt;
    }
    return o->sole_user;
  };
  EXPECT_EQ(sole(""), false);  // device:/dev/tpmrm0
  EXPECT_EQ(sole("tcti = \"device:/dev/tpm0\""), true);
  EXPECT_EQ(sole("tcti = \"device\""), true);
  EXPECT_EQ(sole("tcti = \"device:/dev/tpmrm1\""), false);
  EXPECT_EQ(sole("tcti = \"swtpm:port=2321\""), false);
  EXPECT_EQ(sole("tcti = \"swtpm:port=2321\"\nsole_user = true"), true);
  EXPECT_EQ(sole("tcti = \"device:/dev/tpm0\"\nsole_user = false"), false);
  EXPECT_EQ(sole("sole_user = \"yes\""), std::nullopt);
}

TEST(TpmSettingsTest, KernelResourceManagerLimitsObjectsPerConnection) {
  EXPECT_EQ(TransientLimitOfTcti("device:/dev/tpmrm0"), 3u);
  EXPECT_EQ(TransientLimitOfTcti("device:/dev/tpmrm12"), 3u);
  EXPECT_EQ(TransientLimitOfTcti("device:/dev/tpm0"), 0u);
  EXPECT_EQ(TransientLimitOfTcti("device"), 0u);
  EXPECT_EQ(TransientLimitOfTcti("device:/dev/tpmrm"), 0u);
  EXPECT_EQ(TransientLimitOfTcti("device:/dev/tpmrm0x"), 0u);
  EXPECT_EQ(TransientLimitOfTcti("tabrmd:"), 0u);
  EXPECT_EQ(TransientLimitOfTcti("swtpm:host=127.0.0.1,port=2321"), 0u);
}

TEST(TpmSettingsTest, ParsesAndRejectsUnknownKeys) {
  auto o = ParseTpmSettings("name = \"t\"\n");
  ASSERT_TRUE(o.ok());
  EXPECT_EQ(o->tcti, "device:/dev/tpmrm0");
  EXPECT_EQ(o->persistent_handle, 0u);
  o = ParseTpmSettings(
      "name = \"t\"\ntcti = \"swtpm:port=1\"\nmax_loaded_keys = 3\n"
      "persistent_handle = 0x81000001\npersistent_name = \"000b01\"\n"
      "encrypted_sessions = true\n");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->tcti, "swtpm:port=1");
  EXPECT_EQ(o->max_loaded_keys, 3u);
  EXPECT_EQ(o->persistent_handle, 0x81000001u);
  EXPECT_TRUE(o->encrypted_sessions);
  EXPECT_FALSE(ParseTpmSettings("name = \"t\"\nencrypted_sessions = 1\n").ok());
  EXPECT_EQ(ParseTpmSettings("name = \"t\"\ntcit = \"x\"\n").status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(
      ParseTpmSettings("name = \"t\"\npersistent_handle = 5\n").status().code(),
      Code::kInvalidArgument);
  EXPECT_FALSE(ParseTpmSettings("tcti = \"x\"\n").ok());
  EXPECT_EQ(ParseTpmSettings("name = \"t\"\n")->acquire_timeout_ms, 30000u);
  EXPECT_EQ(ParseTpmSettings("name = \"t\"\nacquire_timeout_ms = 250\n")
                ->acquire_timeout_ms,
            250u);
  EXPECT_FALSE(ParseTpmSettings("name = \"t\"\nacquire_timeout_ms = 0\n").ok());
  EXPECT_FALSE(
      ParseTpmSettings("name = \"t\"\nacquire_timeout_ms = 3600001\n").ok());
}

TEST_F(TpmBackendTest, UnreadableOwnerAuthFileIsRejected) {
  const fs::path auth = dir_ / "owner.auth";
  std::ofstream(auth) << "secret\n";
  ::chmod(auth.c_str(), 0644);
  TpmOptions o;
  o.name = "tpm";
  o.tcti = tpm_->Tcti();
  o.owner_auth_file = auth.string();
  auto b = TpmBackend::Create(o, master_);
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("group or others"), std::string::npos);
  ::chmod(auth.c_str(), 0600);
  // swtpm's owner auth is empty: a wrong one fails to create the primary.
  b = TpmBackend::Create(o, master_);
  ASSERT_FALSE(b.ok());
}

class TpmBackendOpsTest : public TpmBackendTest,
                          public ::testing::WithParamInterface<bool> {};

// Parameter: encrypted (HMAC, parameter-encrypted) sessions or passwords.
TEST_P(TpmBackendOpsTest, EveryTypeAndOperationVerifiedWithOpenSsl) {
  backend_ = MakeBackend(tpm_->Tcti(), master_, 8, GetParam());
  ASSERT_NE(backend_, nullptr);
  std::vector<v1::KeyType> types = backend_->SupportedKeyTypes();
  auto has = [&](v1::KeyType t) {
    return std::find(types.begin(), types.end(), t) != types.end();
  };
  ASSERT_TRUE(has(v1::RSA_2048));
  ASSERT_TRUE(has(v1::EC_P256));
  EXPECT_TRUE(has(v1::EC_P384));

  uint64_t id = 1;
  for (v1::KeyType type : types) {
    SCOPED_TRACE(std::string(KeyTypeName(type)));
    ++id;
    Key k = MakeKey(backend_.get(), id, type, "k" + std::to_string(id));
    SslPtr<EVP_PKEY> pub = ParsePub(k.created.public_key);
    ASSERT_NE(pub, nullptr);
    const std::vector<uint8_t> d256 = Sha(EVP_sha256(), "hello");
    const std::vector<uint8_t> d384 = Sha(EVP_sha384(), "hello");
    if (IsRsa(type)) {
      SignParams p;
      p.algorithm = v1::RSA_PKCS1;
      p.digest = v1::SHA256;
      auto sig = backend_->Sign(k.handle, p, d256);
      ASSERT_TRUE(sig.ok()) << sig.status().ToString();
      EXPECT_TRUE(
          Verify(pub.get(), EVP_sha256(), RSA_PKCS1_PADDING, d256, *sig));
      // SHA-224 is padded on the host; DIGEST_NONE pads the caller's input.
      const std::vector<uint8_t> d224 = Sha(EVP_sha224(), "hello");
      p.digest = v1::SHA224;
      sig = backend_->Sign(k.handle, p, d224);
      ASSERT_TRUE(sig.ok()) << sig.status().ToString();
      EXPECT_TRUE(
          Verify(pub.get(), EVP_sha224(), RSA_PKCS1_PADDING, d224, *sig));
      p.digest = v1::DIGEST_NONE;
      const std::vector<uint8_t> raw = {1, 2, 3, 4, 5};
      sig = backend_->Sign(k.handle, p, raw);
      ASSERT_TRUE(sig.ok()) << sig.status().ToString();
      EXPECT_TRUE(Verify(pub.get(), nullptr, RSA_PKCS1_PADDING, raw, *sig));
      for (int salt : {-1, -2, 0, 10}) {
        for (v1::Digest mgf : {v1::DIGEST_NONE, v1::SHA1}) {
          SignParams pss;
          pss.algorithm = v1::RSA_PSS;
          pss.digest = v1::SHA384;
          pss.pss_salt_length = salt;
          pss.pss_mgf1_digest = mgf;
          sig = backend_->Sign(k.handle, pss, d384);
          ASSERT_TRUE(sig.ok()) << sig.status().ToString();
          EXPECT_TRUE(Verify(pub.get(), EVP_sha384(), RSA_PKCS1_PSS_PADDING,
                             d384, *sig,
                             mgf == v1::SHA1 ? EVP_sha1() : EVP_sha384()))
              << "salt " << salt;
        }
      }
      SignParams ecdsa;
      ecdsa.algorithm = v1::ECDSA;
      EXPECT_EQ(backend_->Sign(k.handle, ecdsa, d256).status().code(),
                Code::kInvalidArgument);

      const std::vector<uint8_t> secret = {9, 8, 7, 6, 5, 4, 3, 2, 1};
      for (v1::Digest d : {v1::DIGEST_NONE, v1::SHA256}) {
        DecryptParams dp;
        dp.algorithm = v1::RSA_OAEP;
        dp.oaep_digest = d;
        auto ct = Encrypt(pub.get(), RSA_PKCS1_OAEP_PADDING,
                          d == v1::SHA256 ? EVP_sha256() : EVP_sha1(), secret);
        auto pt = backend_->Decrypt(k.handle, dp, ct);
        ASSERT_TRUE(pt.ok()) << pt.status().ToString();
        EXPECT_EQ(Bytes(*pt), secret);
      }
      DecryptParams v15;
      v15.algorithm = v1::RSA_PKCS1_V15;
      auto ct = Encrypt(pub.get(), RSA_PKCS1_PADDING, nullptr, secret);
      auto pt = backend_->Decrypt(k.handle, v15, ct);
      ASSERT_TRUE(pt.ok()) << pt.status().ToString();
      EXPECT_EQ(Bytes(*pt), secret);
      ct[ct.size() / 2] ^= 1;
      EXPECT_EQ(backend_->Decrypt(k.handle, v15, ct).status().code(),
                Code::kInvalidArgument);
      DecryptParams tls;
      tls.algorithm = v1::RSA_TLS_PREMASTER;
      EXPECT_EQ(backend_->Decrypt(k.handle, tls, ct).status().code(),
                Code::kUnsupported);
      DecryptParams label;
      label.algorithm = v1::RSA_OAEP;
      label.oaep_label = "x";
      EXPECT_EQ(backend_->Decrypt(k.handle, label, ct).status().code(),
                Code::kUnsupported);
    } else {
      SignParams p;
      p.algorithm = v1::ECDSA;
      for (v1::Digest d : {v1::SHA256, v1::SHA384, v1::DIGEST_NONE}) {
        p.digest = d;
        const std::vector<uint8_t>& dg = d == v1::SHA384 ? d384 : d256;
        auto sig = backend_->Sign(k.handle, p, dg);
        ASSERT_TRUE(sig.ok()) << sig.status().ToString();
        EXPECT_TRUE(Verify(pub.get(), nullptr, 0, dg, *sig));
      }
      p.digest = v1::DIGEST_NONE;
      EXPECT_FALSE(backend_->Sign(k.handle, p, std::vector<uint8_t>(17)).ok());
      SignParams rsa;
      rsa.algorithm = v1::RSA_PKCS1;
      rsa.digest = v1::SHA256;
      EXPECT_EQ(backend_->Sign(k.handle, rsa, d256).status().code(),
                Code::kInvalidArgument);

      // ECDH: our x coordinate equals OpenSSL's derive from the peer side.
      char group[64] = {};
      std::size_t glen = 0;
      ASSERT_EQ(EVP_PKEY_get_group_name(pub.get(), group, sizeof(group), &glen),
                1);
      SslPtr<EVP_PKEY> peer(EVP_EC_gen(group));
      ASSERT_NE(peer, nullptr);
      unsigned char* der = nullptr;
      const int der_len = i2d_PUBKEY(peer.get(), &der);
      std::vector<uint8_t> peer_der(der, der + der_len);
      OPENSSL_free(der);
      SslPtr<EVP_PKEY_CTX> dctx(
          EVP_PKEY_CTX_new_from_pkey(nullptr, peer.get(), nullptr));
      ASSERT_EQ(EVP_PKEY_derive_init(dctx.get()), 1);
      ASSERT_EQ(EVP_PKEY_derive_set_peer(dctx.get(), pub.get()), 1);
      std::size_t zlen = 0;
      EVP_PKEY_derive(dctx.get(), nullptr, &zlen);
      std::vector<uint8_t> expected(zlen);
      ASSERT_EQ(EVP_PKEY_derive(dctx.get(), expected.data(), &zlen), 1);
      auto z = backend_->Derive(k.handle, peer_der);
      ASSERT_TRUE(z.ok()) << z.status().ToString();
      EXPECT_EQ(Bytes(*z), expected);
      // The raw uncompressed point works too.
      std::vector<uint8_t> point(200);
      std::size_t plen = 0;
      ASSERT_EQ(EVP_PKEY_get_octet_string_param(
                    peer.get(), OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                    point.data(), point.size(), &plen),
                1);
      point.resize(plen);
      z = backend_->Derive(k.handle, point);
      ASSERT_TRUE(z.ok()) << z.status().ToString();
      EXPECT_EQ(Bytes(*z), expected);
      // A point from another curve is refused.
      SslPtr<EVP_PKEY> other(
          EVP_EC_gen(type == v1::EC_P256 ? "P-384" : "P-256"));
      der = nullptr;
      const int other_len = i2d_PUBKEY(other.get(), &der);
      std::vector<uint8_t> other_der(der, der + other_len);
      OPENSSL_free(der);
      EXPECT_EQ(backend_->Derive(k.handle, other_der).status().code(),
                Code::kInvalidArgument);
      DecryptParams dp;
      dp.algorithm = v1::RSA_OAEP;
      EXPECT_EQ(backend_->Decrypt(k.handle, dp, d256).status().code(),
                Code::kInvalidArgument);
    }
    EXPECT_TRUE(backend_->Destroy(k.handle).ok());
  }
  EXPECT_EQ(backend_->Generate({1000, "x"}, v1::ED25519).status().code(),
            Code::kUnsupported);
  EXPECT_EQ(backend_->Import({1000, "x"}, SecretBytes(10)).status().code(),
            Code::kUnsupported);
}

INSTANTIATE_TEST_SUITE_P(Sessions, TpmBackendOpsTest, ::testing::Bool());

TEST_F(TpmBackendTest, BlobIsBoundToItsReference) {
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "mine");
  KeyHandle moved = k.handle;
  moved.id = 2;
  moved.ref = {1001, "mine"};
  const SignParams p = EcdsaSha256();
  EXPECT_FALSE(backend_->Sign(moved, p, Sha(EVP_sha256(), "x")).ok());
  EXPECT_TRUE(backend_->Sign(k.handle, p, Sha(EVP_sha256(), "x")).ok());
}

// More keys than the TPM has object slots, thousands of operations, from
// several threads: the LRU never leaks a slot (no TPM_RC_OBJECT_MEMORY).
TEST_F(TpmBackendTest, ManyKeysThousandsOfOperations) {
  backend_ = MakeBackend(tpm_->Tcti(), master_, 64);
  ASSERT_NE(backend_, nullptr);
  // swtpm has 3 transient slots; the primary holds one.
  EXPECT_LE(backend_->LoadedKeyCapacity(), 3u);
  std::vector<Key> keys;
  for (uint64_t i = 0; i < 20; ++i) {
    keys.push_back(MakeKey(backend_.get(), i + 1,
                           i < 2 ? v1::RSA_2048 : v1::EC_P256,
                           "many" + std::to_string(i)));
  }
  std::vector<SslPtr<EVP_PKEY>> pubs;
  for (const Key& k : keys) {
    pubs.push_back(ParsePub(k.created.public_key));
  }
  const std::vector<uint8_t> digest = Sha(EVP_sha256(), "many");
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 500;
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kOpsPerThread; ++i) {
        const std::size_t n =
            static_cast<std::size_t>(i * 7 + t * 3) % keys.size();
        SignParams p;
        p.algorithm = IsRsa(keys[n].handle.type) ? v1::RSA_PKCS1 : v1::ECDSA;
        p.digest = v1::SHA256;
        auto sig = backend_->Sign(keys[n].handle, p, digest);
        if (!sig.ok()) {
          ADD_FAILURE() << sig.status().ToString();
          ++failures[static_cast<std::size_t>(t)];
          continue;
        }
        if (i % 50 == 0 &&
            !Verify(pubs[n].get(),
                    IsRsa(keys[n].handle.type) ? EVP_sha256() : nullptr,
                    IsRsa(keys[n].handle.type) ? RSA_PKCS1_PADDING : 0, digest,
                    *sig)) {
          ++failures[static_cast<std::size_t>(t)];
        }
      }
    });
  }
  for (std::thread& th : threads) {
    th.join();
  }
  for (int f : failures) {
    EXPECT_EQ(f, 0);
  }
  EXPECT_LE(backend_->LoadedKeyCount(), backend_->LoadedKeyCapacity());
  // Shutdown flushes every slot it used: a new backend on the same TPM (no
  // resource manager) finds as many free slots as the first one did.
  const std::size_t capacity = backend_->LoadedKeyCapacity();
  backend_.reset();
  backend_ = MakeBackend(tpm_->Tcti(), master_, 64);
  ASSERT_NE(backend_, nullptr);
  EXPECT_EQ(backend_->LoadedKeyCapacity(), capacity);
}

TEST_F(TpmBackendTest, RestartedBackendKeepsKeysUsable) {
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "persist");
  backend_.reset();
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "after restart");
  auto sig = backend_->Sign(k.handle, p, d);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *sig));
}

TEST_F(TpmBackendTest, TpmRestartGivesClearErrorThenRecovers) {
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "restart");
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "x");
  ASSERT_TRUE(backend_->Sign(k.handle, p, d).ok());
  tpm_->Stop();
  auto down = backend_->Sign(k.handle, p, d);
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.status().code(), Code::kBackendUnavailable)
      << down.status().ToString();
  EXPECT_NE(down.status().message().find("TPM"), std::string::npos);
  ASSERT_TRUE(tpm_->Restart());
  auto up = backend_->Sign(k.handle, p, d);
  ASSERT_TRUE(up.ok()) << up.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *up));
}

// A TPM that stops answering keeps the request inside it for as long as it
// is silent. The others get "TPM busy" after acquire_timeout_ms, and at once
// once the TPM has been silent that long, instead of each holding a thread
// behind it; when the TPM answers again, so does the held request.
TEST_F(TpmBackendTest, SilentTpmHoldsOneRequestAndTheOthersGetBusy) {
  TpmOptions o;
  o.name = "tpm";
  o.tcti = tpm_->Tcti();
  o.acquire_timeout_ms = 300;
  auto created = TpmBackend::Create(std::move(o), master_);
  ASSERT_TRUE(created.ok()) << created.status().ToString();
  backend_ = std::move(*created);
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "silent");
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "x");
  ASSERT_TRUE(backend_->Sign(k.handle, p, d).ok());

  tpm_->Pause();
  StatusOr<std::vector<uint8_t>> held = Internal("not run");
  std::thread inside([&] { held = backend_->Sign(k.handle, p, d); });
  for (int i = 0; i < 1000 && backend_->CallsInProgress().empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // What the shutdown watchdog would name.
  EXPECT_NE(backend_->CallsInProgress().find(
                "TPM backend 'tpm': a request has been in the TPM for "),
            std::string::npos)
      << backend_->CallsInProgress();
  auto waited = backend_->Sign(k.handle, p, d);  // waits up to 300 ms
  ASSERT_FALSE(waited.ok());
  EXPECT_EQ(waited.status().code(), Code::kBackendUnavailable);
  EXPECT_NE(waited.status().message().find("TPM busy"), std::string::npos)
      << waited.status().ToString();
  // Silent for 300 ms by now: no more waiting, for any TPM call.
  auto at_once = backend_->Sign(k.handle, p, d);
  ASSERT_FALSE(at_once.ok());
  EXPECT_NE(at_once.status().message().find("TPM busy"), std::string::npos)
      << at_once.status().ToString();
  auto gen = backend_->Generate(daemon::KeyRef{1000, "during"}, v1::EC_P256);
  ASSERT_FALSE(gen.ok());
  EXPECT_NE(gen.status().message().find("TPM busy"), std::string::npos);
  EXPECT_FALSE(backend_->Destroy(k.handle).ok());

  tpm_->Resume();
  inside.join();
  ASSERT_TRUE(held.ok()) << held.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *held));
  EXPECT_EQ(backend_->CallsInProgress(), "");
  auto after = backend_->Sign(k.handle, p, d);
  ASSERT_TRUE(after.ok()) << after.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *after));
}

// A copy of the key store (and even of master.key) is useless with another
// TPM: the private areas are wrapped by this TPM's storage key.
TEST_F(TpmBackendTest, CopiedKeyStoreCannotSignOnAFreshTpm) {
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "stolen");
  backend_.reset();
  Swtpm fresh(dir_ / "fresh-tpm");
  ASSERT_TRUE(fresh.Start());
  auto other = MakeBackend(fresh.Tcti(), master_);
  ASSERT_NE(other, nullptr);
  const SignParams p = EcdsaSha256();
  auto sig = other->Sign(k.handle, p, Sha(EVP_sha256(), "x"));
  ASSERT_FALSE(sig.ok());
  EXPECT_EQ(sig.status().code(), Code::kPermissionDenied)
      << sig.status().ToString();
  // And without the master key the original TPM refuses the blob too.
  const fs::path other_master = dir_ / "other.key";
  WriteMasterKey(other_master);
  auto wrong = MakeBackend(tpm_->Tcti(), other_master);
  ASSERT_NE(wrong, nullptr);
  sig = wrong->Sign(k.handle, p, Sha(EVP_sha256(), "x"));
  ASSERT_FALSE(sig.ok());
  EXPECT_NE(sig.status().message().find("authentication"), std::string::npos);
}

// The daemon's master key sealed by the TPM: it unseals again (the storage
// primary is recreated at every connection, from the same seed), never
// appears in the blob, and another TPM cannot unseal it.
TEST_F(TpmBackendTest, SealedMasterKeyUnsealsOnlyOnItsTpm) {
  SecretBytes key(32);
  ASSERT_EQ(RAND_bytes(key.data(SecretAccess::kToken), 32), 1);
  TpmOptions o;
  o.name = "tpm";
  o.tcti = tpm_->Tcti();
  auto blob = TpmBackend::SealMasterKey(o, key);
  ASSERT_TRUE(blob.ok()) << blob.status().ToString();
  const std::vector<uint8_t> k = Bytes(key);
  EXPECT_EQ(std::search(blob->begin(), blob->end(), k.begin(), k.end()),
            blob->end());
  for (bool encrypted : {false, true}) {
    o.encrypted_sessions = encrypted;
    auto back = TpmBackend::UnsealMasterKey(o, *blob);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(Bytes(*back), k);
  }
  // Sealed through an encrypted session, unsealed through a plain one.
  auto blob2 = TpmBackend::SealMasterKey(o, key);
  ASSERT_TRUE(blob2.ok()) << blob2.status().ToString();
  o.encrypted_sessions = false;
  auto back = TpmBackend::UnsealMasterKey(o, *blob2);
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(Bytes(*back), k);

  // Damaged blobs: a clear error, never a crash or a wrong key.
  std::vector<uint8_t> bad = *blob;
  bad[0] ^= 1;
  auto r = TpmBackend::UnsealMasterKey(o, bad);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  for (std::size_t cut : {std::size_t{0}, std::size_t{10}, blob->size() - 1}) {
    r = TpmBackend::UnsealMasterKey(
        o, std::span<const uint8_t>(blob->data(), cut));
    ASSERT_FALSE(r.ok()) << cut;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << cut;
  }
  bad = *blob;
  bad.push_back(0);
  EXPECT_FALSE(TpmBackend::UnsealMasterKey(o, bad).ok());
  bad = *blob;
  bad[bad.size() - 5] ^= 0x40;  // inside the wrapped private area
  r = TpmBackend::UnsealMasterKey(o, bad);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().code(), Code::kInternal) << r.status().ToString();

  // Another TPM (another machine, or this one after TPM2_Clear).
  Swtpm fresh(dir_ / "fresh-tpm");
  ASSERT_TRUE(fresh.Start());
  TpmOptions other = o;
  other.tcti = fresh.Tcti();
  r = TpmBackend::UnsealMasterKey(other, *blob);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kPermissionDenied)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("another TPM"), std::string::npos);

  EXPECT_FALSE(TpmBackend::SealMasterKey(o, SecretBytes()).ok());
}

// Without a resource manager the TPM keeps the transient objects (and the
// session) of a connection that is lost while it runs. The reconnect must
// flush them: otherwise every lost connection costs slots until the storage
// key cannot even be created (TPM_RC_OBJECT_MEMORY / SESSION_MEMORY).
TEST_P(TpmBackendOpsTest, LostConnectionDoesNotLeakTransientSlots) {
  TcpProxy proxy(tpm_->Port());
  ASSERT_TRUE(proxy.Start());
  backend_ = MakeBackend(proxy.Tcti(), master_, 8, GetParam());
  ASSERT_NE(backend_, nullptr);
  const std::size_t capacity = backend_->LoadedKeyCapacity();
  Key a = MakeKey(backend_.get(), 1, v1::EC_P256, "cut-a");
  Key b = MakeKey(backend_.get(), 2, v1::EC_P384, "cut-b");
  SignParams p;
  p.algorithm = v1::ECDSA;
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "cut");
  for (int cut = 0; cut < 5; ++cut) {
    if (cut > 0) {
      proxy.DropNextResponse();  // lost during the next command (a sign)
    }
    for (const Key* k : {&a, &b}) {
      auto sig = backend_->Sign(k->handle, p, d);
      ASSERT_TRUE(sig.ok()) << "after " << cut << " cuts: "
                            << sig.status().ToString();
      EXPECT_TRUE(VerifiesEcdsa(*k, d, *sig));
    }
    EXPECT_EQ(backend_->LoadedKeyCount(), 2u);
    EXPECT_EQ(backend_->LoadedKeyCapacity(), capacity) << "after " << cut;
  }
  // A fresh backend straight on the TPM finds every slot free again.
  backend_.reset();
  auto direct = MakeBackend(tpm_->Tcti(), master_, 8, GetParam());
  ASSERT_NE(direct, nullptr);
  EXPECT_EQ(direct->LoadedKeyCapacity(), capacity);
}

TEST(TpmErrorsTest, DecryptFailuresAndRealStatuses) {
  // Padding / value failures of TPM2_RSA_Decrypt (parameter 1): one answer.
  EXPECT_TRUE(IsDecryptionFailure(TPM2_RC_VALUE | TPM2_RC_P | TPM2_RC_1));
  EXPECT_TRUE(IsDecryptionFailure(TPM2_RC_SIZE | TPM2_RC_P | TPM2_RC_1));
  // Everything else keeps its real status.
  const TSS2_RC bad_auth = TPM2_RC_BAD_AUTH | TPM2_RC_S | TPM2_RC_1;
  const TSS2_RC auth_fail = TPM2_RC_AUTH_FAIL | TPM2_RC_S | TPM2_RC_1;
  const TSS2_RC tcti = TSS2_TCTI_RC_LAYER | TSS2_BASE_RC_IO_ERROR;
  for (TSS2_RC rc : {bad_auth, auth_fail, tcti, TSS2_RC(TPM2_RC_LOCKOUT),
                     TSS2_RC(TPM2_RC_OBJECT_MEMORY), TSS2_RC(TPM2_RC_RETRY),
                     TSS2_RC(TPM2_RC_INITIALIZE)}) {
    EXPECT_FALSE(IsDecryptionFailure(rc)) << std::hex << rc;
  }
  EXPECT_EQ(TpmError(bad_auth, "x").code(), Code::kPermissionDenied);
  EXPECT_EQ(TpmError(auth_fail, "x").code(), Code::kPermissionDenied);
  EXPECT_EQ(TpmError(TPM2_RC_LOCKOUT, "x").code(), Code::kUnavailable);
  EXPECT_NE(TpmError(TPM2_RC_LOCKOUT, "x").message().find("lockout"),
            std::string::npos);
  EXPECT_EQ(TpmError(TPM2_RC_RETRY, "x").code(), Code::kUnavailable);
  EXPECT_EQ(TpmError(TPM2_RC_OBJECT_MEMORY, "x").code(),
            Code::kResourceExhausted);
  EXPECT_EQ(TpmError(tcti, "x").code(), Code::kBackendUnavailable);
  EXPECT_EQ(TpmError(TPM2_RC_INITIALIZE, "x").code(),
            Code::kBackendUnavailable);
  EXPECT_EQ(TpmError(TPM2_RC_VALUE | TPM2_RC_P | TPM2_RC_1, "x").code(),
            Code::kInternal);
}

// Bad padding is "decryption failed" and nothing more; a TPM that is gone
// is "backend unavailable", not a decryption failure.
TEST_F(TpmBackendTest, DecryptKeepsPaddingFailuresOpaqueAndOthersReal) {
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  Key k = MakeKey(backend_.get(), 1, v1::RSA_2048, "dec");
  SslPtr<EVP_PKEY> pub = ParsePub(k.created.public_key);
  const std::vector<uint8_t> msg = {'s', 'e', 'c', 'r', 'e', 't'};
  for (v1::DecryptAlgorithm alg : {v1::RSA_OAEP, v1::RSA_PKCS1_V15}) {
    std::vector<uint8_t> ct =
        Encrypt(pub.get(),
                alg == v1::RSA_OAEP ? RSA_PKCS1_OAEP_PADDING : RSA_PKCS1_PADDING,
                alg == v1::RSA_OAEP ? EVP_sha1() : nullptr, msg);
    DecryptParams dp;
    dp.algorithm = alg;
    auto pt = backend_->Decrypt(k.handle, dp, ct);
    ASSERT_TRUE(pt.ok()) << pt.status().ToString();
    EXPECT_EQ(Bytes(*pt), msg);
    ct[ct.size() / 2] ^= 0x40;
    pt = backend_->Decrypt(k.handle, dp, ct);
    ASSERT_FALSE(pt.ok());
    EXPECT_EQ(pt.status().code(), Code::kInvalidArgument);
    EXPECT_EQ(pt.status().message(), "decryption failed");
  }
  DecryptParams dp;
  dp.algorithm = v1::RSA_OAEP;
  std::vector<uint8_t> ct = Encrypt(pub.get(), RSA_PKCS1_OAEP_PADDING,
                                    EVP_sha1(), msg);
  tpm_->Stop();
  auto down = backend_->Decrypt(k.handle, dp, ct);
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.status().code(), Code::kBackendUnavailable)
      << down.status().ToString();
  ASSERT_TRUE(tpm_->Restart());
  auto up = backend_->Decrypt(k.handle, dp, ct);
  ASSERT_TRUE(up.ok()) << up.status().ToString();
  EXPECT_EQ(Bytes(*up), msg);
}

TEST(TpmSettingsTest, PersistentName) {
  auto o = ParseTpmSettings(
      "name = \"t\"\npersistent_handle = 0x81000001\n"
      "persistent_name = \"000B0102\"\nencrypted_sessions = true\n");
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->persistent_name, "000b0102");
  // Encrypted sessions salted with an unchecked persistent key: refused.
  EXPECT_EQ(ParseTpmSettings("name = \"t\"\npersistent_handle = 0x81000001\n"
                             "encrypted_sessions = true\n")
                .status()
                .code(),
            Code::kInvalidArgument);
  EXPECT_FALSE(
      ParseTpmSettings("name = \"t\"\npersistent_name = \"000b0102\"\n").ok());
  EXPECT_FALSE(ParseTpmSettings("name = \"t\"\npersistent_handle = 0x81000001\n"
                                "persistent_name = \"xyz\"\n")
                   .ok());
}

// A persistent storage key is used only if the TPM presents the configured
// one (checked by name), so encrypted sessions cannot be salted with a key
// someone substituted.
TEST_F(TpmBackendTest, PersistentStorageKeyNameIsChecked) {
  if (std::system("command -v tpm2_createprimary >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "tpm2-tools not installed";
  }
  const std::string t = "-T '" + tpm_->Tcti() + "' ";
  const fs::path ctx = dir_ / "srk.ctx";
  const fs::path name = dir_ / "srk.name";
  const std::string cmd =
      "tpm2_createprimary -Q " + t + "-C o -G ecc -c '" + ctx.string() +
      "' && tpm2_evictcontrol -Q " + t + "-C o -c '" + ctx.string() +
      "' 0x81000001 && tpm2_readpublic -Q " + t + "-c 0x81000001 -n '" +
      name.string() + "' && tpm2_flushcontext -Q " + t + "-t";
  // (No resource manager: the tools leave their transient objects loaded.)
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(name, std::ios::binary);
  const std::vector<uint8_t> raw((std::istreambuf_iterator<char>(in)),
                                 std::istreambuf_iterator<char>());
  ASSERT_GT(raw.size(), 2u);
  const std::string hex = HexEncode(raw);

  TpmOptions o;
  o.name = "tpm";
  o.tcti = tpm_->Tcti();
  o.persistent_handle = 0x81000001;
  o.persistent_name = hex;
  o.encrypted_sessions = true;
  auto b = TpmBackend::Create(o, master_);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  Key k = MakeKey(b->get(), 1, v1::EC_P256, "under-persistent");
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "persistent");
  auto sig = (*b)->Sign(k.handle, p, d);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *sig));
  b->reset();

  o.persistent_name = hex.substr(0, hex.size() - 1) +
                      (hex.back() == '0' ? "1" : "0");
  auto wrong = TpmBackend::Create(o, master_);
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.status().code(), Code::kPermissionDenied);
  EXPECT_NE(wrong.status().message().find("persistent_name"),
            std::string::npos)
      << wrong.status().ToString();
}

// A process started for a test; SIGTERM and reaped when it goes.
class Child {
 public:
  Child(const std::vector<std::string>& argv, const fs::path& log) {
    pid_ = ::fork();
    if (pid_ == 0) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      std::vector<char*> args;
      for (const std::string& a : argv) {
        args.push_back(const_cast<char*>(a.c_str()));
      }
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
  }
  bool Running() {
    int status = 0;
    return pid_ > 0 && ::waitpid(pid_, &status, WNOHANG) == 0;
  }

 private:
  pid_t pid_ = -1;
};

// "Works directly on a TPM without a resource manager and with one": every
// other test here talks to swtpm directly (no resource manager); this one
// goes through tpm2-abrmd (Debian's tpm2-abrmd), which needs only a private
// D-Bus session bus, not the system bus. Skipped if either is missing.
TEST_F(TpmBackendTest, WorksThroughTheAbrmdResourceManager) {
#if defined(__SANITIZE_THREAD__)
  // The tabrmd TCTI runs GDBus threads inside this process; glib is not
  // instrumented and its own synchronization is invisible to TSan, which
  // then reports races inside glib. The dev and ASan builds run this test.
  GTEST_SKIP() << "tabrmd TCTI (glib/GDBus) under ThreadSanitizer";
#endif
  if (std::system("command -v tpm2-abrmd >/dev/null 2>&1 && "
                  "command -v dbus-daemon >/dev/null 2>&1 && "
                  "ls /usr/lib/*/libtss2-tcti-tabrmd.so* >/dev/null 2>&1") !=
      0) {
    GTEST_SKIP() << "tpm2-abrmd, dbus-daemon or the tabrmd TCTI missing";
  }
  const std::string bus = "unix:path=" + (dir_ / "bus").string();
  Child dbus({"dbus-daemon", "--session", "--nofork", "--nopidfile",
              "--address=" + bus},
             dir_ / "dbus.log");
  for (int i = 0; i < 200 && !fs::exists(dir_ / "bus"); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  }
  ASSERT_TRUE(fs::exists(dir_ / "bus")) << "dbus-daemon did not start";
  ::setenv("DBUS_SESSION_BUS_ADDRESS", bus.c_str(), 1);
  const std::string name =
      "com.intel.tss2.Tabrmd.kh" + std::to_string(::getpid());
  Child abrmd({"tpm2-abrmd", "--session", "--allow-root", "--dbus-name=" + name,
               "--tcti=" + tpm_->Tcti()},
              dir_ / "abrmd.log");
  const std::string tcti = "tabrmd:bus_name=" + name + ",bus_type=session";
  TpmOptions o;
  o.name = "tpm";
  o.tcti = tcti;
  o.max_loaded_keys = 2;  // fewer than the keys below: eviction through the RM
  StatusOr<std::unique_ptr<TpmBackend>> b = Unavailable("not started");
  for (int i = 0; i < 100 && abrmd.Running(); ++i) {
    b = TpmBackend::Create(o, master_);
    if (b.ok()) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  backend_ = std::move(*b);
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "through abrmd");
  std::vector<Key> keys;
  for (uint64_t i = 0; i < 4; ++i) {
    keys.push_back(MakeKey(backend_.get(), i + 1, v1::EC_P256,
                           "rm-" + std::to_string(i)));
  }
  for (int round = 0; round < 5; ++round) {
    for (const Key& k : keys) {
      auto sig = backend_->Sign(k.handle, p, d);
      ASSERT_TRUE(sig.ok()) << sig.status().ToString();
      EXPECT_TRUE(VerifiesEcdsa(k, d, *sig));
    }
  }
  EXPECT_LE(backend_->LoadedKeyCount(), 2u);
  // ECDH through the resource manager, compared with OpenSSL.
  SslPtr<EVP_PKEY> peer(EVP_EC_gen("P-256"));
  std::vector<uint8_t> peer_der(
      static_cast<std::size_t>(i2d_PUBKEY(peer.get(), nullptr)));
  unsigned char* q = peer_der.data();
  i2d_PUBKEY(peer.get(), &q);
  auto z = backend_->Derive(keys[0].handle, peer_der);
  ASSERT_TRUE(z.ok()) << z.status().ToString();
  SslPtr<EVP_PKEY> mine = ParsePub(keys[0].created.public_key);
  SslPtr<EVP_PKEY_CTX> ctx(EVP_PKEY_CTX_new(peer.get(), nullptr));
  ASSERT_EQ(EVP_PKEY_derive_init(ctx.get()), 1);
  ASSERT_EQ(EVP_PKEY_derive_set_peer(ctx.get(), mine.get()), 1);
  std::vector<uint8_t> expected(32);
  std::size_t len = expected.size();
  ASSERT_EQ(EVP_PKEY_derive(ctx.get(), expected.data(), &len), 1);
  EXPECT_EQ(Bytes(*z), expected);
  backend_.reset();
  ::unsetenv("DBUS_SESSION_BUS_ADDRESS");
}

// The kernel's device TCTI (device:/dev/tpmrm0, the default, or /dev/tpm0
// without the kernel's resource manager) cannot be driven here: no TPM, no
// CUSE and no vtpm proxy in the test machines (docs/tpm.md). What can be
// checked: a device that is not there does not stop the start, and every
// request names it.
TEST_F(TpmBackendTest, MissingDeviceIsAClearError) {
  TpmOptions o;
  o.name = "tpm";
  o.tcti = "device:" + (dir_ / "no-tpm0").string();
  auto b = TpmBackend::Create(o, master_);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto made = (*b)->Generate(daemon::KeyRef{1000, "k"}, v1::EC_P256);
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), Code::kBackendUnavailable);
  EXPECT_NE(made.status().message().find("cannot open TCTI 'device:"),
            std::string::npos)
      << made.status().ToString();
}

// A TCTI setting no retry can mend (an unknown TCTI, a malformed option)
// stops the start.
TEST_F(TpmBackendTest, BadTctiSettingStopsTheStart) {
  for (const std::string& tcti :
       {"swtmp:host=127.0.0.1,port=" + std::to_string(tpm_->Port()),
        std::string("swtpm:hst=127.0.0.1")}) {
    TpmOptions o;
    o.name = "tpm";
    o.tcti = tcti;
    auto b = TpmBackend::Create(o, master_);
    ASSERT_FALSE(b.ok()) << tcti;
    EXPECT_EQ(b.status().code(), Code::kInvalidArgument)
        << b.status().ToString();
    EXPECT_NE(b.status().message().find("check the tcti setting"),
              std::string::npos)
        << b.status().ToString();
  }
}

// A TPM that is not there yet when the daemon starts (swtpm, a resource
// manager or the device started later in boot): the backend starts, its
// requests fail with "backend unavailable", and the first one after the
// TPM appears connects and works.
TEST_F(TpmBackendTest, TpmAbsentAtStartIsUsedOnceItAppears) {
  tpm_->Stop();
  backend_ = MakeBackend(tpm_->Tcti(), master_);
  ASSERT_NE(backend_, nullptr);
  auto down = backend_->Generate(daemon::KeyRef{1000, "late"}, v1::EC_P256);
  ASSERT_FALSE(down.ok());
  EXPECT_EQ(down.status().code(), Code::kBackendUnavailable)
      << down.status().ToString();
  EXPECT_NE(down.status().message().find("TPM unavailable"), std::string::npos)
      << down.status().ToString();
  ASSERT_TRUE(tpm_->Restart());
  Key k = MakeKey(backend_.get(), 1, v1::EC_P256, "late");
  ASSERT_FALSE(k.created.public_key.empty());
  const SignParams p = EcdsaSha256();
  const std::vector<uint8_t> d = Sha(EVP_sha256(), "late TPM");
  auto sig = backend_->Sign(k.handle, p, d);
  ASSERT_TRUE(sig.ok()) << sig.status().ToString();
  EXPECT_TRUE(VerifiesEcdsa(k, d, *sig));
}

}  // namespace
}  // namespace keyhold::backend::tpm
