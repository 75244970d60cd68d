#include "common/key_types.h"

#include <array>
#include <utility>

namespace keyhold {
namespace {

constexpr std::array<std::pair<std::string_view, v1::KeyType>, 8> kTypes = {{
    {"rsa-2048", v1::RSA_2048},
    {"rsa-3072", v1::RSA_3072},
    {"rsa-4096", v1::RSA_4096},
    {"ec-p256", v1::EC_P256},
    {"ec-p384", v1::EC_P384},
    {"ec-p521", v1::EC_P521},
    {"ed25519", v1::ED25519},
    {"x25519", v1::X25519},
}};

constexpr std::array<std::pair<std::string_view, v1::Digest>, 5> kDigests = {{
    {"sha1", v1::SHA1},
    {"sha224", v1::SHA224},
    {"sha256", v1::SHA256},
    {"sha384", v1::SHA384},
    {"sha512", v1::SHA512},
}};

}  // namespace

std::optional<v1::KeyType> KeyTypeFromString(std::string_view s) {
  for (const auto& [name, type] : kTypes) {
    if (name == s) {
      return type;
    }
  }
  return std::nullopt;
}

std::string_view KeyTypeName(v1::KeyType t) {
  for (const auto& [name, type] : kTypes) {
    if (type == t) {
      return name;
    }
  }
  return "unknown";
}

std::vector<v1::KeyType> AllKeyTypes() {
  std::vector<v1::KeyType> out;
  out.reserve(kTypes.size());
  for (const auto& entry : kTypes) {
    out.push_back(entry.second);
  }
  return out;
}

bool IsRsa(v1::KeyType t) {
  return t == v1::RSA_2048 || t == v1::RSA_3072 || t == v1::RSA_4096;
}

bool IsEc(v1::KeyType t) {
  return t == v1::EC_P256 || t == v1::EC_P384 || t == v1::EC_P521;
}

uint32_t DefaultUsage(v1::KeyType t) {
  if (IsRsa(t)) {
    return v1::USAGE_SIGN | v1::USAGE_DECRYPT;
  }
  if (IsEc(t)) {
    return v1::USAGE_SIGN | v1::USAGE_DERIVE;
  }
  if (t == v1::ED25519) {
    return v1::USAGE_SIGN;
  }
  if (t == v1::X25519) {
    return v1::USAGE_DERIVE;
  }
  return v1::USAGE_NONE;
}

std::string UsageString(uint32_t usage) {
  std::string out;
  auto add = [&out](std::string_view word) {
    if (!out.empty()) {
      out += ',';
    }
    out += word;
  };
  if ((usage & v1::USAGE_SIGN) != 0) {
    add("sign");
  }
  if ((usage & v1::USAGE_DECRYPT) != 0) {
    add("decrypt");
  }
  if ((usage & v1::USAGE_DERIVE) != 0) {
    add("derive");
  }
  return out.empty() ? "none" : out;
}

Status ValidateKeyName(std::string_view name) {
  if (name.empty() || name.size() > kMaxKeyNameLength) {
    return InvalidArgument("key name must be 1 to 64 characters");
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                    (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                    c == '-';
    if (!ok) {
      return InvalidArgument(
          "key name may contain only letters, digits, '.', '_' and '-'");
    }
  }
  return Status::Ok();
}

StatusOr<KeyRefText> ParseKeyRefText(std::string_view text) {
  KeyRefText out;
  const auto slash = text.find('/');
  if (slash == std::string_view::npos) {
    out.name = std::string(text);
  } else {
    if (slash == 0) {
      return InvalidArgument("empty owner in key reference");
    }
    out.owner = std::string(text.substr(0, slash));
    out.name = std::string(text.substr(slash + 1));
  }
  KH_RETURN_IF_ERROR(ValidateKeyName(out.name));
  return out;
}

std::optional<v1::Digest> DigestFromString(std::string_view s) {
  for (const auto& [name, d] : kDigests) {
    if (name == s) {
      return d;
    }
  }
  return std::nullopt;
}

std::string_view DigestName(v1::Digest d) {
  for (const auto& [name, digest] : kDigests) {
    if (digest == d) {
      return name;
    }
  }
  return "none";
}

std::size_t DigestSize(v1::Digest d) {
  switch (d) {
    case v1::SHA1:
      return 20;
    case v1::SHA224:
      return 28;
    case v1::SHA256:
      return 32;
    case v1::SHA384:
      return 48;
    case v1::SHA512:
      return 64;
    default:
      return 0;
  }
}

const EVP_MD* DigestMd(v1::Digest d) {
  switch (d) {
    case v1::SHA1:
      return EVP_sha1();
    case v1::SHA224:
      return EVP_sha224();
    case v1::SHA256:
      return EVP_sha256();
    case v1::SHA384:
      return EVP_sha384();
    case v1::SHA512:
      return EVP_sha512();
    default:
      return nullptr;
  }
}

std::string HexEncode(std::span<const uint8_t> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    out += kHex[b >> 4];
    out += kHex[b & 0xf];
  }
  return out;
}

}  // namespace keyhold
