// Certificates kept beside keys: public data that PKCS#11 programs (NSS,
// GnuTLS, pkcs11-tool) expect to find on the token next to the private key.
#include <spdlog/spdlog.h>

#include "daemon/log.h"
#include "daemon/ops/cert_check.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("ops");
  return *logger;
}
}  // namespace

Status HandleSetCertificate(OpContext& ctx, const OpArgs& args,
                            v1::Request& request, v1::Response* response) {
  const KeyRecord& key = *args.key;
  const std::string& der = request.set_certificate().certificate();
  if (!der.empty()) {
    KH_RETURN_IF_ERROR(CheckCertificate(der, key.public_key));
  }
  const std::vector<uint8_t> bytes(der.begin(), der.end());
  KH_RETURN_IF_ERROR(ctx.store->SetCertificate(key.ref, bytes));
  KeyRecord updated = key;
  updated.certificate = bytes;
  FillKeyInfo(updated, /*include_grants=*/true,
              response->mutable_set_certificate()->mutable_info());
  Log().info("key {}: certificate {}", key.ref.ToString(),
             der.empty() ? "removed" : "stored");
  return Status::Ok();
}

}  // namespace keyhold::daemon
