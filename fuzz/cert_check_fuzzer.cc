// libFuzzer target for the certificate check of SetCertificate
// (CheckCertificate, daemon/ops/cert_check.cc): any client may send any bytes
// as the certificate of one of its keys, and the daemon keeps what passes.
//
// The key is a fixed P-256 key (kKey below; the seed corpus holds
// certificates the openssl CLI made for it). The first input byte picks a
// mode:
//   0: the rest of the input is the certificate;
//   1: a valid certificate for the key (built once at start-up, always the
//      same bytes: fixed dates, issued by a fixed Ed25519 key, whose
//      signatures are deterministic) with the rest of the input as edits:
//      3 bytes each, a position (2 bytes) and a value to XOR there;
//   2: the same certificate cut to a length taken from the input, followed
//      by the rest of the input.
//
// Invariants checked (abort on violation):
// - every answer is OK or InvalidArgument, and the same when asked twice;
// - an accepted certificate is at most kMaxCertificateBytes, parses as
//   exactly one X.509 certificate, and encodes afresh (signed part
//   included) to exactly its own bytes: DER, not merely BER;
// - its SubjectPublicKeyInfo encodes to the key's bytes and its public key
//   equals the key (EVP_PKEY_eq);
// - it is refused for another key, with a byte cut off the end, and with a
//   byte appended.
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "common/ssl_ptr.h"
#include "common/status.h"
#include "daemon/ops/cert_check.h"

namespace {

using keyhold::SslPtr;
using keyhold::daemon::CheckCertificate;
using keyhold::daemon::kMaxCertificateBytes;
using Bytes = std::vector<uint8_t>;

// The fuzzer's key: P-256, SEC1 DER (`openssl genpkey -algorithm EC -pkeyopt
// ec_paramgen_curve:P-256 -outform DER`). A test key, used for nothing else.
constexpr uint8_t kKey[] = {
    0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20, 0xea, 0xce, 0xbc, 0x70,
    0xe6, 0x45, 0x4e, 0x2d, 0x27, 0xb8, 0x4c, 0x29, 0xbd, 0x28, 0xea,
    0x32, 0x6f, 0xd4, 0x2e, 0xc2, 0x84, 0x7f, 0x36, 0x6e, 0x4b, 0x09,
    0xe8, 0x59, 0x40, 0x6d, 0x58, 0x75, 0xa0, 0x0a, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0xa1, 0x44, 0x03, 0x42,
    0x00, 0x04, 0x4d, 0xc1, 0x5f, 0xaf, 0x35, 0x1d, 0xd0, 0xfb, 0xf4,
    0x10, 0x0c, 0x46, 0x95, 0xdd, 0xb3, 0xdd, 0x31, 0xac, 0xc7, 0x98,
    0x2f, 0x64, 0x13, 0xeb, 0x47, 0x46, 0xcc, 0x36, 0xd3, 0x11, 0x3d,
    0x55, 0xa2, 0xc5, 0xc7, 0x30, 0xb0, 0x80, 0x1c, 0x83, 0xa9, 0x13,
    0xa6, 0x6a, 0xd8, 0xbc, 0xd5, 0xe3, 0xea, 0x58, 0x49, 0xe3, 0xca,
    0x5b, 0x88, 0x38, 0xab, 0xb5, 0x8e, 0x52, 0x55, 0x3a, 0x8f, 0x7a,
};

// The issuer of the certificate modes 1 and 2 start from: Ed25519, PKCS#8
// DER (`openssl genpkey -algorithm ED25519 -outform DER`). Also the "other
// key" every accepted certificate must be refused for.
constexpr uint8_t kIssuerKey[] = {
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70,
    0x04, 0x22, 0x04, 0x20, 0x2c, 0x9b, 0xc1, 0x92, 0x1b, 0x3f, 0xd3, 0x7d,
    0xbe, 0xc6, 0xe2, 0x8d, 0xd0, 0x26, 0x6f, 0xc0, 0x1a, 0xfc, 0x36, 0x4f,
    0x95, 0x01, 0xdf, 0x0f, 0xa7, 0x0d, 0x6f, 0x06, 0xe4, 0xb3, 0xce, 0x79,
};

// Aborts (a crash libFuzzer reports) with the invariant that failed.
#define Check(cond) CheckImpl((cond), #cond)
void CheckImpl(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "cert_check_fuzzer: invariant violated: %s\n", what);
    std::abort();
  }
}

Bytes Spki(EVP_PKEY* pkey) {
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(pkey, &der);
  Check(len > 0);
  Bytes out(der, der + len);
  OPENSSL_free(der);
  return out;
}

struct Fixture {
  SslPtr<EVP_PKEY> key;
  Bytes spki;        // the key's SubjectPublicKeyInfo
  Bytes other_spki;  // the issuer's (Ed25519)
  Bytes cert;        // a valid certificate for `key`, the same every run

  Fixture() {
    const unsigned char* p = kKey;
    key.reset(d2i_AutoPrivateKey(nullptr, &p, sizeof kKey));
    Check(key != nullptr);
    spki = Spki(key.get());
    p = kIssuerKey;
    SslPtr<EVP_PKEY> issuer(d2i_AutoPrivateKey(nullptr, &p, sizeof kIssuerKey));
    Check(issuer != nullptr);
    other_spki = Spki(issuer.get());

    SslPtr<X509> x(X509_new());
    Check(x != nullptr && X509_set_version(x.get(), X509_VERSION_3) == 1);
    Check(ASN1_INTEGER_set(X509_get_serialNumber(x.get()), 4242) == 1);
    Check(AddCn(X509_get_subject_name(x.get()), "cert_check_fuzzer"));
    Check(AddCn(X509_get_issuer_name(x.get()), "cert_check_fuzzer issuer"));
    Check(ASN1_TIME_set_string_X509(X509_getm_notBefore(x.get()),
                                    "20260101000000Z") == 1);
    Check(ASN1_TIME_set_string_X509(X509_getm_notAfter(x.get()),
                                    "20360101000000Z") == 1);
    Check(X509_set_pubkey(x.get(), key.get()) == 1);
    Check(X509_sign(x.get(), issuer.get(), nullptr) > 0);
    unsigned char* der = nullptr;
    const int len = i2d_X509(x.get(), &der);
    Check(len > 0);
    cert.assign(der, der + len);
    OPENSSL_free(der);
    Check(CheckCertificate(AsView(cert), spki).ok());
  }

  static bool AddCn(X509_NAME* name, const char* cn) {
    return X509_NAME_add_entry_by_txt(
               name, "CN", MBSTRING_ASC,
               reinterpret_cast<const unsigned char*>(cn), -1, -1, 0) == 1;
  }

  static std::string_view AsView(const Bytes& b) {
    return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
  }
};

const Fixture& GetFixture() {
  static const Fixture* fixture = new Fixture();
  return *fixture;
}

// Re-parses an accepted certificate and checks what acceptance promises.
void CheckAccepted(const Fixture& f, std::string_view der) {
  Check(!der.empty() && der.size() <= kMaxCertificateBytes);
  const auto* begin = reinterpret_cast<const unsigned char*>(der.data());
  const unsigned char* p = begin;
  SslPtr<X509> x(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  Check(x != nullptr && p == begin + der.size());

  // Encoded afresh (i2d_re_X509_tbs drops the cached encoding of the signed
  // part), the certificate gives back exactly its bytes.
  Check(i2d_re_X509_tbs(x.get(), nullptr) > 0);
  unsigned char* again = nullptr;
  const int len = i2d_X509(x.get(), &again);
  Check(len > 0 && static_cast<std::size_t>(len) == der.size() &&
        std::string_view(reinterpret_cast<const char*>(again),
                         static_cast<std::size_t>(len)) == der);
  OPENSSL_free(again);

  unsigned char* spki = nullptr;
  const int spki_len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x.get()), &spki);
  Check(spki_len > 0 && Bytes(spki, spki + spki_len) == f.spki);
  OPENSSL_free(spki);
  EVP_PKEY* pub = X509_get0_pubkey(x.get());
  Check(pub != nullptr && EVP_PKEY_eq(pub, f.key.get()) == 1);

  Check(!CheckCertificate(der, f.other_spki).ok());
  Check(!CheckCertificate(der.substr(0, der.size() - 1), f.spki).ok());
  std::string longer(der);
  longer.push_back('\0');
  Check(!CheckCertificate(longer, f.spki).ok());
}

void Run(const Fixture& f, std::string_view der) {
  const keyhold::Status s = CheckCertificate(der, f.spki);
  Check(s.ok() || s.code() == keyhold::Code::kInvalidArgument);
  const keyhold::Status again = CheckCertificate(der, f.spki);
  Check(again.ok() == s.ok() && again.code() == s.code());
  if (s.ok()) {
    CheckAccepted(f, der);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Fixture& f = GetFixture();
  if (size == 0) {
    return 0;
  }
  const uint8_t mode = data[0] % 3;
  ++data;
  --size;
  std::string der;
  if (mode == 0) {
    der.assign(reinterpret_cast<const char*>(data), size);
  } else if (mode == 1) {
    der.assign(f.cert.begin(), f.cert.end());
    for (std::size_t i = 0; i + 3 <= size; i += 3) {
      const std::size_t pos =
          (static_cast<std::size_t>(data[i]) << 8 | data[i + 1]) % der.size();
      der[pos] =
          static_cast<char>(static_cast<uint8_t>(der[pos]) ^ data[i + 2]);
    }
  } else {
    std::size_t cut = f.cert.size();
    if (size >= 2) {
      cut = (static_cast<std::size_t>(data[0]) << 8 | data[1]) %
            (f.cert.size() + 1);
      data += 2;
      size -= 2;
    }
    der.assign(f.cert.begin(),
               f.cert.begin() + static_cast<std::ptrdiff_t>(cut));
    der.append(reinterpret_cast<const char*>(data), size);
  }
  Run(f, der);
  return 0;
}
