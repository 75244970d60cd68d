#include "common/key_types.h"

#include <gtest/gtest.h>

namespace keyhold {
namespace {

TEST(KeyTypesTest, NamesRoundTrip) {
  for (v1::KeyType t : AllKeyTypes()) {
    auto back = KeyTypeFromString(KeyTypeName(t));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, t);
  }
  EXPECT_EQ(AllKeyTypes().size(), 8u);
  EXPECT_FALSE(KeyTypeFromString("rsa-1024").has_value());
  EXPECT_FALSE(KeyTypeFromString("").has_value());
  EXPECT_EQ(KeyTypeName(static_cast<v1::KeyType>(99)), "unknown");
}

TEST(KeyTypesTest, Usage) {
  EXPECT_EQ(UsageString(DefaultUsage(v1::RSA_2048)), "sign,decrypt");
  EXPECT_EQ(UsageString(DefaultUsage(v1::EC_P384)), "sign,derive");
  EXPECT_EQ(UsageString(DefaultUsage(v1::ED25519)), "sign");
  EXPECT_EQ(UsageString(DefaultUsage(v1::X25519)), "derive");
  EXPECT_EQ(UsageString(0), "none");
}

TEST(KeyTypesTest, KeyNames) {
  EXPECT_TRUE(ValidateKeyName("web-1.example_com").ok());
  EXPECT_TRUE(ValidateKeyName(std::string(64, 'a')).ok());
  EXPECT_FALSE(ValidateKeyName("").ok());
  EXPECT_FALSE(ValidateKeyName(std::string(65, 'a')).ok());
  for (const char* bad : {"a/b", "a b", "../x", "ключ", "a\nb", "a:b", "*"}) {
    EXPECT_EQ(ValidateKeyName(bad).code(), Code::kInvalidArgument) << bad;
  }
  EXPECT_FALSE(ValidateKeyName(std::string("a\0b", 3)).ok());
}

TEST(KeyTypesTest, KeyRefText) {
  auto own = ParseKeyRefText("web");
  ASSERT_TRUE(own.ok());
  EXPECT_FALSE(own->owner.has_value());
  EXPECT_EQ(own->name, "web");
  auto shared = ParseKeyRefText("alice/web");
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(*shared->owner, "alice");
  EXPECT_EQ(shared->name, "web");
  EXPECT_FALSE(ParseKeyRefText("/web").ok());
  EXPECT_FALSE(ParseKeyRefText("alice/").ok());
  EXPECT_FALSE(ParseKeyRefText("a/b/c").ok());
}

TEST(KeyTypesTest, Digests) {
  EXPECT_EQ(DigestFromString("sha384"), v1::SHA384);
  EXPECT_FALSE(DigestFromString("md5").has_value());
  EXPECT_EQ(DigestSize(v1::SHA256), 32u);
  EXPECT_EQ(DigestSize(v1::DIGEST_NONE), 0u);
  EXPECT_EQ(DigestName(v1::SHA512), "sha512");
  EXPECT_EQ(DigestMd(v1::SHA384), EVP_sha384());
  EXPECT_EQ(DigestMd(v1::DIGEST_NONE), nullptr);
  for (v1::Digest d :
       {v1::SHA1, v1::SHA224, v1::SHA256, v1::SHA384, v1::SHA512}) {
    EXPECT_EQ(static_cast<std::size_t>(EVP_MD_get_size(DigestMd(d))),
              DigestSize(d));
  }
}

TEST(KeyTypesTest, Hex) {
  const uint8_t b[] = {0x00, 0xab, 0xff};
  EXPECT_EQ(HexEncode(b), "00abff");
}

}  // namespace
}  // namespace keyhold
