#include "common/cpu_hint.h"

#include <gtest/gtest.h>

#include <string>

namespace keyhold {
namespace {

TEST(CpuHintTest, RoundTrips) {
  for (int cpu : {0, 1, 7, 255, 4095}) {
    const std::string a = CpuHintAddress(cpu, 12345);
    ASSERT_FALSE(a.empty());
    EXPECT_EQ(a[0], '\0');  // abstract: no file is created
    EXPECT_EQ(CpuFromHintAddress(a), cpu);
  }
  EXPECT_NE(CpuHintAddress(1, 1), CpuHintAddress(1, 2));
}

TEST(CpuHintTest, AnythingElseIsNoHint) {
  using namespace std::string_literals;
  for (const std::string& s :
       {""s, "/run/keyhold/keyhold.sock"s, "\0"s, "\0keyhold-cpu/"s,
        "\0keyhold-cpu/x/1"s, "\0keyhold-cpu/-1/1"s, "\0keyhold-cpu/3"s,
        "\0keyhold-cpu/99999999999999999999/1"s, "\0keyhold-cpu/65536/1"s,
        "\0other/1/1"s, "keyhold-cpu/1/1"s}) {
    EXPECT_FALSE(CpuFromHintAddress(s)) << s.substr(1);
  }
}

}  // namespace
}  // namespace keyhold
