// Private-key operations: sign, decrypt, derive. The dispatcher has already
// authorized the caller for Right::kUse; here we check that the key's type
// and usage fit the request and hand it to the key's backend.
#include "common/key_types.h"
#include "common/secret.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {
namespace {

// Ed25519 signs whole messages; keep them well inside one frame.
constexpr std::size_t kMaxSignMessageBytes = std::size_t{16} * 1024;
constexpr std::size_t kMaxDigestBytes = 64;

Status CheckUsage(const KeyRecord& key, v1::Usage usage, const char* verb) {
  if ((key.usage & static_cast<uint32_t>(usage)) == 0) {
    return InvalidArgument("key '" + key.ref.name + "' (" +
                           std::string(KeyTypeName(key.type)) + ") cannot " +
                           verb);
  }
  return Status::Ok();
}

bool KnownDigest(v1::Digest d) { return v1::Digest_IsValid(d); }

Status ValidateSign(const KeyRecord& key, const v1::SignRequest& op) {
  KH_RETURN_IF_ERROR(CheckUsage(key, v1::USAGE_SIGN, "sign"));
  if (!KnownDigest(op.digest()) || !KnownDigest(op.pss_mgf1_digest())) {
    return InvalidArgument("unknown digest");
  }
  if (op.data().empty()) {
    return InvalidArgument("nothing to sign");
  }
  const std::string type(KeyTypeName(key.type));
  switch (op.algorithm()) {
    case v1::RSA_PKCS1:
    case v1::RSA_PSS:
      if (!IsRsa(key.type)) {
        return InvalidArgument("key type " + type + " cannot sign with RSA");
      }
      break;
    case v1::ECDSA:
      if (!IsEc(key.type)) {
        return InvalidArgument("key type " + type + " cannot sign with ECDSA");
      }
      break;
    case v1::ED25519_PURE:
      if (key.type != v1::ED25519) {
        return InvalidArgument("key type " + type +
                               " cannot sign with Ed25519");
      }
      if (op.data().size() > kMaxSignMessageBytes) {
        return InvalidArgument("Ed25519 message larger than " +
                               std::to_string(kMaxSignMessageBytes) + " bytes");
      }
      return Status::Ok();
    default:
      return Unsupported("unknown signature algorithm");
  }
  if (op.data().size() > 512) {
    return InvalidArgument("digest too long");
  }
  if (op.digest() != v1::DIGEST_NONE &&
      op.data().size() != DigestSize(op.digest())) {
    return InvalidArgument("data is not a " +
                           std::string(DigestName(op.digest())) + " digest");
  }
  if (op.algorithm() == v1::ECDSA && op.data().size() > kMaxDigestBytes) {
    return InvalidArgument("digest too long");
  }
  if (op.algorithm() == v1::RSA_PSS) {
    if (op.digest() == v1::DIGEST_NONE) {
      return InvalidArgument("RSA-PSS needs a digest");
    }
    if (op.pss_salt_length() < -2) {
      return InvalidArgument("invalid RSA-PSS salt length");
    }
  }
  return Status::Ok();
}

std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

}  // namespace

Status HandleSign(OpContext& ctx, const OpArgs& args, v1::Request& request,
                  v1::Response* response) {
  const KeyRecord& key = *args.key;
  const auto& op = request.sign();
  KH_RETURN_IF_ERROR(ValidateSign(key, op));
  auto backend = BackendFor(ctx, key.backend);
  if (!backend.ok()) {
    return BackendUnavailable("backend '" + key.backend +
                              "' is not configured");
  }
  backend::SignParams params;
  params.algorithm = op.algorithm();
  params.digest = op.digest();
  params.pss_salt_length = op.has_pss_salt_length() ? op.pss_salt_length() : -1;
  params.pss_mgf1_digest = op.pss_mgf1_digest();
  auto sig = (*backend)->Sign(HandleFor(key), params, Bytes(op.data()));
  if (!sig.ok()) {
    return sig.status();
  }
  response->mutable_sign()->set_signature(sig->data(), sig->size());
  return Status::Ok();
}

Status HandleDecrypt(OpContext& ctx, const OpArgs& args, v1::Request& request,
                     v1::Response* response) {
  const KeyRecord& key = *args.key;
  const auto& op = request.decrypt();
  KH_RETURN_IF_ERROR(CheckUsage(key, v1::USAGE_DECRYPT, "decrypt"));
  if (op.algorithm() != v1::RSA_OAEP && op.algorithm() != v1::RSA_PKCS1_V15 &&
      op.algorithm() != v1::RSA_TLS_PREMASTER) {
    return Unsupported("unknown decryption algorithm");
  }
  if (!KnownDigest(op.oaep_digest()) || !KnownDigest(op.oaep_mgf1_digest())) {
    return InvalidArgument("unknown digest");
  }
  if (op.ciphertext().empty() || op.ciphertext().size() > 1024) {
    return InvalidArgument("ciphertext size does not fit the key");
  }
  auto backend = BackendFor(ctx, key.backend);
  if (!backend.ok()) {
    return BackendUnavailable("backend '" + key.backend +
                              "' is not configured");
  }
  backend::DecryptParams params;
  params.algorithm = op.algorithm();
  params.oaep_digest = op.oaep_digest();
  params.oaep_mgf1_digest = op.oaep_mgf1_digest();
  params.oaep_label = op.oaep_label();
  params.tls_client_version = op.tls_client_version();
  params.tls_negotiated_version = op.tls_negotiated_version();
  auto plain =
      (*backend)->Decrypt(HandleFor(key), params, Bytes(op.ciphertext()));
  if (!plain.ok()) {
    return plain.status();
  }
  const auto bytes = plain->Expose(SecretAccess::kToken);
  response->mutable_decrypt()->set_plaintext(bytes.data(), bytes.size());
  return Status::Ok();
}

Status HandleDerive(OpContext& ctx, const OpArgs& args, v1::Request& request,
                    v1::Response* response) {
  const KeyRecord& key = *args.key;
  const auto& op = request.derive();
  KH_RETURN_IF_ERROR(CheckUsage(key, v1::USAGE_DERIVE, "derive"));
  if (op.peer_public_key().empty() || op.peer_public_key().size() > 1024) {
    return InvalidArgument("invalid peer public key");
  }
  auto backend = BackendFor(ctx, key.backend);
  if (!backend.ok()) {
    return BackendUnavailable("backend '" + key.backend +
                              "' is not configured");
  }
  auto secret = (*backend)->Derive(HandleFor(key), Bytes(op.peer_public_key()));
  if (!secret.ok()) {
    return secret.status();
  }
  const auto bytes = secret->Expose(SecretAccess::kToken);
  response->mutable_derive()->set_shared_secret(bytes.data(), bytes.size());
  return Status::Ok();
}

}  // namespace keyhold::daemon
