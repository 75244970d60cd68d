// Certificates kept beside keys: public data that PKCS#11 programs (NSS,
// GnuTLS, pkcs11-tool) expect to find on the token next to the private key.
#include <openssl/x509.h>
#include <spdlog/spdlog.h>

#include "common/ssl_ptr.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {
namespace {

// Far above any real end-entity certificate; keeps ListKeys answers small.
constexpr std::size_t kMaxCertificateBytes = 16 * 1024;

// The certificate must be one DER X.509 certificate (no trailing bytes) whose
// SubjectPublicKeyInfo is the key's, byte for byte.
Status CheckCertificate(const std::string& der, const KeyRecord& key) {
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
  unsigned char* spki = nullptr;
  const int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert.get()), &spki);
  const bool same =
      len > 0 && static_cast<std::size_t>(len) == key.public_key.size() &&
      std::equal(key.public_key.begin(), key.public_key.end(), spki);
  OPENSSL_free(spki);
  if (!same) {
    return InvalidArgument("the certificate is not for this key");
  }
  return Status::Ok();
}

}  // namespace

Status HandleSetCertificate(OpContext& ctx, const OpArgs& args,
                            v1::Request& request, v1::Response* response) {
  const KeyRecord& key = *args.key;
  const std::string& der = request.set_certificate().certificate();
  if (!der.empty()) {
    KH_RETURN_IF_ERROR(CheckCertificate(der, key));
  }
  const std::vector<uint8_t> bytes(der.begin(), der.end());
  KH_RETURN_IF_ERROR(ctx.store->SetCertificate(key.ref, bytes));
  KeyRecord updated = key;
  updated.certificate = bytes;
  FillKeyInfo(updated, /*include_grants=*/true,
              response->mutable_set_certificate()->mutable_info());
  spdlog::info("key {}: certificate {}", key.ref.ToString(),
               der.empty() ? "removed" : "stored");
  return Status::Ok();
}

}  // namespace keyhold::daemon
