#include "daemon/ops/cert_check.h"

#include <openssl/crypto.h>
#include <openssl/x509.h>

#include <algorithm>
#include <string>

#include "common/ssl_ptr.h"

namespace keyhold::daemon {

Status CheckCertificate(std::string_view der,
                        std::span<const uint8_t> public_key) {
  if (der.size() > kMaxCertificateBytes) {
    return InvalidArgument("certificate larger than " +
                           std::to_string(kMaxCertificateBytes) + " bytes");
  }
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  SslPtr<X509> cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  if (cert == nullptr ||
      p != reinterpret_cast<const unsigned char*>(der.data()) + der.size()) {
    return InvalidArgument("not a DER X.509 certificate");
  }
  // d2i_X509 also takes BER (long-form lengths, indefinite lengths, non-zero
  // padding bits...), which the daemon must not store and hand out as DER.
  // Encoded afresh (i2d_re_X509_tbs drops the cached encoding of the signed
  // part), a DER certificate gives back exactly its own bytes.
  unsigned char* again = nullptr;
  const int again_len = i2d_re_X509_tbs(cert.get(), nullptr) > 0
                            ? i2d_X509(cert.get(), &again)
                            : -1;
  const bool der_ok =
      again_len > 0 && static_cast<std::size_t>(again_len) == der.size() &&
      std::equal(der.begin(), der.end(), again, [](char a, unsigned char b) {
        return static_cast<unsigned char>(a) == b;
      });
  OPENSSL_free(again);
  if (!der_ok) {
    return InvalidArgument("not a DER X.509 certificate");
  }
  unsigned char* spki = nullptr;
  const int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert.get()), &spki);
  const bool same = len > 0 &&
                    static_cast<std::size_t>(len) == public_key.size() &&
                    std::equal(public_key.begin(), public_key.end(), spki);
  OPENSSL_free(spki);
  if (!same) {
    return InvalidArgument("the certificate is not for this key");
  }
  return Status::Ok();
}

}  // namespace keyhold::daemon
