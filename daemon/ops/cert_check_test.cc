#include "daemon/ops/cert_check.h"

#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/ssl_ptr.h"

namespace keyhold::daemon {
namespace {

using Bytes = std::vector<uint8_t>;

template <typename T, int (*Encode)(const T*, unsigned char**)>
Bytes Der(const T* v) {
  unsigned char* der = nullptr;
  const int len = Encode(v, &der);
  EXPECT_GT(len, 0);
  Bytes out(der, der + std::max(len, 0));
  OPENSSL_free(der);
  return out;
}

std::string Str(const Bytes& b) { return std::string(b.begin(), b.end()); }

// A TLV with a one-byte tag and the shortest length, or, if `long_form`,
// a length with a leading zero byte (0x83 00 hi lo), which BER allows and DER
// does not.
Bytes Tlv(uint8_t tag, const Bytes& contents, bool long_form = false) {
  Bytes out{tag};
  const std::size_t n = contents.size();
  const auto hi = static_cast<uint8_t>(n >> 8);
  const auto lo = static_cast<uint8_t>(n & 0xff);
  if (long_form) {
    out.insert(out.end(), {0x83, 0x00, hi, lo});
  } else if (n < 0x80) {
    out.push_back(lo);
  } else if (n < 0x100) {
    out.insert(out.end(), {0x81, lo});
  } else {
    out.insert(out.end(), {0x82, hi, lo});
  }
  out.insert(out.end(), contents.begin(), contents.end());
  return out;
}

// The contents of one DER TLV (after its tag and length).
Bytes Contents(const Bytes& tlv) {
  std::size_t hdr = 2;
  if (tlv[1] & 0x80) {
    hdr += static_cast<std::size_t>(tlv[1] & 0x7f);
  }
  return Bytes(tlv.begin() + static_cast<std::ptrdiff_t>(hdr), tlv.end());
}

struct Parts {
  Bytes tbs;   // TBSCertificate
  Bytes alg;   // signatureAlgorithm
  Bytes sig;   // signatureValue (BIT STRING)
  Bytes der;   // the whole certificate
  Bytes spki;  // the key's SubjectPublicKeyInfo
};

Parts MakeCertificate(EVP_PKEY* key) {
  SslPtr<X509> x(X509_new());
  EXPECT_EQ(X509_set_version(x.get(), X509_VERSION_3), 1);
  EXPECT_EQ(ASN1_INTEGER_set(X509_get_serialNumber(x.get()), 99), 1);
  X509_NAME* name = X509_get_subject_name(x.get());
  EXPECT_EQ(
      X509_NAME_add_entry_by_txt(
          name, "CN", MBSTRING_ASC,
          reinterpret_cast<const unsigned char*>("cert check test"), -1, -1, 0),
      1);
  EXPECT_EQ(X509_set_issuer_name(x.get(), name), 1);
  EXPECT_NE(X509_gmtime_adj(X509_getm_notBefore(x.get()), 0), nullptr);
  EXPECT_NE(X509_gmtime_adj(X509_getm_notAfter(x.get()), 3600), nullptr);
  EXPECT_EQ(X509_set_pubkey(x.get(), key), 1);
  EXPECT_GT(X509_sign(x.get(), key, EVP_sha256()), 0);
  Parts p;
  p.der = Der<X509, i2d_X509>(x.get());
  unsigned char* tbs = nullptr;
  const int tbs_len = i2d_re_X509_tbs(x.get(), &tbs);
  EXPECT_GT(tbs_len, 0);
  p.tbs.assign(tbs, tbs + std::max(tbs_len, 0));
  OPENSSL_free(tbs);
  const ASN1_BIT_STRING* sig = nullptr;
  const X509_ALGOR* alg = nullptr;
  X509_get0_signature(&sig, &alg, x.get());
  p.alg = Der<X509_ALGOR, i2d_X509_ALGOR>(alg);
  p.sig = Der<ASN1_BIT_STRING, i2d_ASN1_BIT_STRING>(sig);
  p.spki = Der<EVP_PKEY, i2d_PUBKEY>(key);
  return p;
}

Bytes Concat(std::initializer_list<Bytes> parts) {
  Bytes out;
  for (const Bytes& b : parts) {
    out.insert(out.end(), b.begin(), b.end());
  }
  return out;
}

class CertCheckTest : public ::testing::Test {
 protected:
  void SetUp() override {
    key_.reset(EVP_EC_gen("P-256"));
    ASSERT_NE(key_, nullptr);
    cert_ = MakeCertificate(key_.get());
    // Sanity: the parts put back together are the certificate.
    ASSERT_EQ(Tlv(0x30, Concat({cert_.tbs, cert_.alg, cert_.sig})), cert_.der);
  }

  SslPtr<EVP_PKEY> key_;
  Parts cert_;
};

TEST_F(CertCheckTest, AcceptsTheKeysCertificate) {
  EXPECT_TRUE(CheckCertificate(Str(cert_.der), cert_.spki).ok());
}

TEST_F(CertCheckTest, RefusesAnotherKeysCertificate) {
  SslPtr<EVP_PKEY> other(EVP_EC_gen("P-256"));
  ASSERT_NE(other, nullptr);
  const Parts theirs = MakeCertificate(other.get());
  const Status s = CheckCertificate(Str(theirs.der), cert_.spki);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("not for this key"), std::string::npos);
  EXPECT_FALSE(CheckCertificate(Str(cert_.der), theirs.spki).ok());
  EXPECT_FALSE(CheckCertificate(Str(cert_.der), {}).ok());
}

TEST_F(CertCheckTest, RefusesGarbageTruncationAndTrailingBytes) {
  for (const std::string& bad :
       {std::string(), std::string("\x30", 1), std::string("\x30\x00", 2),
        std::string("not a certificate"),
        Str(cert_.der).substr(0, cert_.der.size() - 1),
        Str(cert_.der) + std::string(1, '\0'), Str(cert_.der) + Str(cert_.der),
        Str(cert_.spki)}) {
    const Status s = CheckCertificate(bad, cert_.spki);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << bad.size();
  }
}

TEST_F(CertCheckTest, RefusesMoreThanTheLimit) {
  // Whatever follows the limit, the size is refused before any parsing.
  const std::string big(kMaxCertificateBytes + 1, '\x30');
  const Status s = CheckCertificate(big, cert_.spki);
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("larger than"), std::string::npos);
}

// Regression (found by fuzz/cert_check_fuzzer): d2i_X509 parses BER, and the
// check used to accept a certificate whose encoding is not DER as long as
// its key matched; the daemon then stored and served those bytes as DER.
TEST_F(CertCheckTest, RefusesBerThatIsNotDer) {
  const Bytes body = Concat({cert_.tbs, cert_.alg, cert_.sig});
  // The outer SEQUENCE with a non-minimal (long-form) length.
  const Bytes long_length = Tlv(0x30, body, /*long_form=*/true);
  // The outer SEQUENCE with an indefinite length and end-of-contents.
  const Bytes indefinite = Concat({Bytes{0x30, 0x80}, body, Bytes{0, 0}});
  // The signature BIT STRING claiming 3 unused bits that are not zero.
  Bytes padded_sig = cert_.sig;
  const std::size_t unused_at = padded_sig.size() - Contents(padded_sig).size();
  ASSERT_EQ(padded_sig[unused_at], 0x00);
  padded_sig[unused_at] = 0x03;
  padded_sig.back() |= 0x07;
  const Bytes bad_padding =
      Tlv(0x30, Concat({cert_.tbs, cert_.alg, padded_sig}));
  // Inside the signed part: the SubjectPublicKeyInfo with a long-form
  // length (the key itself re-encodes to the right bytes).
  Bytes tbs_contents = Contents(cert_.tbs);
  auto at = std::search(tbs_contents.begin(), tbs_contents.end(),
                        cert_.spki.begin(), cert_.spki.end());
  ASSERT_NE(at, tbs_contents.end());
  const auto spki_at = at - tbs_contents.begin();
  tbs_contents.erase(at, at + static_cast<std::ptrdiff_t>(cert_.spki.size()));
  const Bytes ber_spki = Tlv(0x30, Contents(cert_.spki), /*long_form=*/true);
  tbs_contents.insert(tbs_contents.begin() + spki_at, ber_spki.begin(),
                      ber_spki.end());
  const Bytes inner =
      Tlv(0x30, Concat({Tlv(0x30, tbs_contents), cert_.alg, cert_.sig}));

  const std::pair<const char*, const Bytes*> cases[] = {
      {"long-form length", &long_length},
      {"indefinite length", &indefinite},
      {"non-zero padding bits", &bad_padding},
      {"long-form length inside the signed part", &inner},
  };
  for (const auto& [what, ber] : cases) {
    // OpenSSL parses each of them, and the key matches...
    const unsigned char* p = ber->data();
    SslPtr<X509> x(d2i_X509(nullptr, &p, static_cast<long>(ber->size())));
    ASSERT_NE(x, nullptr) << what;
    EXPECT_EQ(p, ber->data() + ber->size()) << what;
    const Bytes spki =
        Der<X509_PUBKEY, i2d_X509_PUBKEY>(X509_get_X509_PUBKEY(x.get()));
    EXPECT_EQ(spki, cert_.spki) << what;
    // ...but none is DER.
    const Status s = CheckCertificate(Str(*ber), cert_.spki);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << what;
    EXPECT_NE(s.message().find("not a DER"), std::string::npos) << what;
  }
}

}  // namespace
}  // namespace keyhold::daemon
