// Many threads and forked children signing with one EVP_PKEY loaded through
// the keyhold provider before fork(). Every signature is verified with the
// public key in the default provider.
//
//   sign_stress URI PUBLIC.pem   (OPENSSL_CONF must load keyhold)
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/store.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace {

EVP_PKEY* LoadKey(const char* uri) {
  OSSL_STORE_CTX* store = OSSL_STORE_open(uri, nullptr, nullptr, nullptr, nullptr);
  if (store == nullptr) return nullptr;
  EVP_PKEY* key = nullptr;
  while (key == nullptr && OSSL_STORE_eof(store) == 0) {
    OSSL_STORE_INFO* info = OSSL_STORE_load(store);
    if (info == nullptr) break;
    if (OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
      key = OSSL_STORE_INFO_get1_PKEY(info);
    }
    OSSL_STORE_INFO_free(info);
  }
  OSSL_STORE_close(store);
  return key;
}

bool SignAndVerify(EVP_PKEY* key, EVP_PKEY* pub, int i) {
  const std::string msg = "message " + std::to_string(i) + " from " + std::to_string(getpid());
  const auto* data = reinterpret_cast<const unsigned char*>(msg.data());
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  std::vector<unsigned char> sig(1024);
  size_t siglen = sig.size();
  bool ok = ctx != nullptr &&
            EVP_DigestSignInit_ex(ctx, nullptr, "SHA256", nullptr, nullptr, key, nullptr) == 1 &&
            EVP_DigestSign(ctx, sig.data(), &siglen, data, msg.size()) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) return false;
  ctx = EVP_MD_CTX_new();
  ok = ctx != nullptr &&
       EVP_DigestVerifyInit_ex(ctx, nullptr, "SHA256", nullptr, "provider=default", pub,
                               nullptr) == 1 &&
       EVP_DigestVerify(ctx, sig.data(), siglen, data, msg.size()) == 1;
  EVP_MD_CTX_free(ctx);
  return ok;
}

int Threads(EVP_PKEY* key, EVP_PKEY* pub, int nthreads, int per_thread) {
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < per_thread; ++i) {
        if (!SignAndVerify(key, pub, t * 1000 + i)) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  return failures.load();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: sign_stress URI PUBLIC.pem\n");
    return 2;
  }
  EVP_PKEY* key = LoadKey(argv[1]);
  FILE* f = std::fopen(argv[2], "r");
  EVP_PKEY* pub = f == nullptr ? nullptr : PEM_read_PUBKEY(f, nullptr, nullptr, nullptr);
  if (f != nullptr) std::fclose(f);
  if (key == nullptr || pub == nullptr) {
    std::fprintf(stderr, "cannot load the key or the public key\n");
    ERR_print_errors_fp(stderr);
    return 1;
  }
  // One signature before fork(), so the parent holds a live connection.
  if (!SignAndVerify(key, pub, -1)) {
    std::fprintf(stderr, "first signature failed\n");
    ERR_print_errors_fp(stderr);
    return 1;
  }
  int failures = Threads(key, pub, 4, 25);
  std::printf("threads: %d failures\n", failures);

  std::vector<pid_t> children;
  for (int c = 0; c < 4; ++c) {
    const pid_t pid = fork();
    if (pid == 0) {
      const int child_failures = Threads(key, pub, 2, 10);
      _exit(child_failures == 0 ? 0 : 1);
    }
    if (pid < 0) return 1;
    children.push_back(pid);
  }
  failures += Threads(key, pub, 2, 10);  // the parent signs meanwhile
  for (pid_t pid : children) {
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      std::printf("child %d failed\n", static_cast<int>(pid));
      failures++;
    }
  }
  std::printf("fork: %zu children, total failures %d\n", children.size(), failures);
  EVP_PKEY_free(key);
  EVP_PKEY_free(pub);
  return failures == 0 ? 0 : 1;
}
