#include "common/secret.h"

#include <gtest/gtest.h>

#include <type_traits>

namespace keyhold {
namespace {

static_assert(!std::is_copy_constructible_v<SecretBytes>);
static_assert(!std::is_copy_assignable_v<SecretBytes>);
static_assert(std::is_nothrow_move_constructible_v<SecretBytes>);

TEST(SecretTest, TakeFromWipesTheString) {
  std::string s = "private key bytes";
  const char* buffer = s.data();
  const std::size_t n = s.size();
  SecretBytes secret = SecretBytes::TakeFrom(s);
  EXPECT_TRUE(s.empty());
  // The string's own buffer (short-string or heap) is zeroed.
  for (std::size_t i = 0; i < n; ++i) {
    EXPECT_EQ(buffer[i], '\0');
  }
  ASSERT_EQ(secret.size(), n);
  EXPECT_EQ(secret.Expose(SecretAccess::kToken)[0], 'p');
}

TEST(SecretTest, CloneAndEquals) {
  const uint8_t raw[] = {1, 2, 3};
  SecretBytes a(raw);
  SecretBytes b = a.Clone();
  EXPECT_TRUE(a.Equals(b));
  b.ExposeMutable(SecretAccess::kToken)[0] = 9;
  EXPECT_FALSE(a.Equals(b));
  SecretBytes c(std::span<const uint8_t>(raw, 2));
  EXPECT_FALSE(a.Equals(c));
}

TEST(SecretTest, MoveLeavesSourceEmpty) {
  const uint8_t raw[] = {1, 2, 3};
  SecretBytes a(raw);
  SecretBytes b = std::move(a);
  EXPECT_EQ(b.size(), 3u);
  EXPECT_TRUE(a.empty());  // NOLINT(bugprone-use-after-move): checked on purpose
}

TEST(SecretTest, CleanseStringClearsCapacity) {
  std::string s(100, 'k');
  s.resize(10);
  const char* buffer = s.data();
  CleanseString(s);
  EXPECT_TRUE(s.empty());
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(buffer[i], '\0');
  }
}

}  // namespace
}  // namespace keyhold
