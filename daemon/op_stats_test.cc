#include "daemon/op_stats.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace keyhold::daemon {
namespace {

std::string NameOf(uint32_t op) { return "op" + std::to_string(op); }

TEST(OpStatsTest, BucketsCoverEveryValueAndBoundItFromAbove) {
  for (uint64_t us : {0ull, 1ull, 3ull, 4ull, 5ull, 7ull, 8ull, 100ull, 1000ull,
                      123456ull, 1ull << 26}) {
    const std::size_t b = OpStats::BucketOf(us);
    ASSERT_LT(b, OpStats::kBuckets);
    EXPECT_GE(OpStats::UpperBoundUs(b), us) << us;
    if (b > 0) {
      EXPECT_LT(OpStats::UpperBoundUs(b - 1), us) << us;
    }
  }
  // Bucket bounds grow by at most a quarter of their value.
  for (std::size_t b = 5; b < OpStats::kBuckets; ++b) {
    EXPECT_LE(OpStats::UpperBoundUs(b) - OpStats::UpperBoundUs(b - 1),
              (OpStats::UpperBoundUs(b - 1) + 1) / 4 + 1);
  }
  // Far too slow: the last bucket, not past the end.
  EXPECT_EQ(OpStats::BucketOf(~0ull), OpStats::kBuckets - 1);
}

TEST(OpStatsTest, CountsErrorsAndPercentiles) {
  OpStats stats;
  // 100 requests of op 17: 1..100 us, the last 10 failing.
  for (int i = 1; i <= 100; ++i) {
    stats.Record(17, i <= 90, std::chrono::microseconds(i));
  }
  stats.Record(3, true, std::chrono::milliseconds(2));
  const auto s = stats.Summaries(NameOf);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].op, "op3");
  EXPECT_EQ(s[0].count, 1u);
  EXPECT_EQ(s[0].p50_us, 2000u);  // capped at the exact max
  EXPECT_EQ(s[1].op, "op17");
  EXPECT_EQ(s[1].count, 100u);
  EXPECT_EQ(s[1].errors, 10u);
  EXPECT_EQ(s[1].max_us, 100u);
  // Bucket upper bounds: within a quarter above the true percentile.
  EXPECT_GE(s[1].p50_us, 50u);
  EXPECT_LE(s[1].p50_us, 63u);
  EXPECT_GE(s[1].p90_us, 90u);
  EXPECT_LE(s[1].p90_us, 100u);
  EXPECT_GE(s[1].p99_us, 99u);
  EXPECT_LE(s[1].p99_us, 100u);
}

TEST(OpStatsTest, UnknownOpNumbersCountAsZero) {
  OpStats stats;
  stats.Record(1000, false, std::chrono::nanoseconds(-5));
  const auto s = stats.Summaries(NameOf);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].op, "op0");
  EXPECT_EQ(s[0].errors, 1u);
  EXPECT_EQ(s[0].max_us, 0u);
}

TEST(OpStatsTest, ConcurrentRecordsAllCount) {
  OpStats stats;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&stats, t] {
      for (int i = 0; i < 10000; ++i) {
        stats.Record(17, (i % 7) != 0,
                     std::chrono::microseconds(t * 100 + i % 50));
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  const auto s = stats.Summaries(NameOf);
  ASSERT_EQ(s.size(), 1u);
  EXPECT_EQ(s[0].count, 40000u);
  EXPECT_EQ(s[0].errors, 4u * 1429u);
  EXPECT_EQ(s[0].max_us, 349u);
}

}  // namespace
}  // namespace keyhold::daemon
