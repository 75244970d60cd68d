// Key types, usages and names as users write them ("ec-p256", "sign").
#ifndef KEYHOLD_COMMON_KEY_TYPES_H_
#define KEYHOLD_COMMON_KEY_TYPES_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <openssl/evp.h>

#include "common/status.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold {

inline constexpr std::size_t kMaxKeyNameLength = 64;

// "rsa-2048", "ec-p256", "ed25519", ...; nullopt for anything else.
std::optional<v1::KeyType> KeyTypeFromString(std::string_view s);
// The inverse; "unknown" for values outside the enum.
std::string_view KeyTypeName(v1::KeyType t);
// Every supported type, in display order.
std::vector<v1::KeyType> AllKeyTypes();

bool IsRsa(v1::KeyType t);
bool IsEc(v1::KeyType t);  // NIST curves only

// What a key of this type may do (bit set of v1::Usage).
uint32_t DefaultUsage(v1::KeyType t);
// "sign,decrypt"
std::string UsageString(uint32_t usage);

// 1-64 characters of [A-Za-z0-9._-].
Status ValidateKeyName(std::string_view name);

// Parses "NAME" or "OWNER/NAME" (the CLI's KEYREF). Owner is returned as
// written: a user name or a decimal uid; resolving it is the caller's job.
struct KeyRefText {
  std::optional<std::string> owner;
  std::string name;
};
StatusOr<KeyRefText> ParseKeyRefText(std::string_view text);

// "sha256", "sha384", ... <-> v1::Digest.
std::optional<v1::Digest> DigestFromString(std::string_view s);
std::string_view DigestName(v1::Digest d);
std::size_t DigestSize(v1::Digest d);  // 0 for DIGEST_NONE
// OpenSSL's EVP_MD for a digest; nullptr for DIGEST_NONE and values outside
// the enum.
const EVP_MD* DigestMd(v1::Digest d);

// Lower-case hex.
std::string HexEncode(std::span<const uint8_t> bytes);

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_KEY_TYPES_H_
