// Per-operation counters for `keyhold admin stats`: how many requests of
// each operation the daemon answered since it started, how many failed, and
// their latency distribution (time in the dispatcher: authorization, the
// handler and the backend; not the time a request waited for a thread).
//
// Record() is on every request's path, so it is a few relaxed atomic
// increments: no lock, no allocation. Latencies go into log-linear buckets
// (4 per power of two, so a percentile is exact to within 25%), from 1 us to
// about 134 s; anything slower lands in the last bucket.
#ifndef KEYHOLD_DAEMON_OP_STATS_H_
#define KEYHOLD_DAEMON_OP_STATS_H_

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace keyhold::daemon {

struct OpSummary {
  std::string op;
  uint64_t count = 0;
  uint64_t errors = 0;  // answered with a code other than OK
  // Upper bounds of the buckets holding these percentiles, microseconds.
  uint64_t p50_us = 0;
  uint64_t p90_us = 0;
  uint64_t p99_us = 0;
  uint64_t max_us = 0;  // the largest latency seen, exact
};

class OpStats {
 public:
  static constexpr std::size_t kMaxOps = 64;  // wire op numbers below this
  static constexpr std::size_t kSubBuckets = 4;
  static constexpr std::size_t kBuckets = 26 * kSubBuckets + 1;

  OpStats() = default;
  OpStats(const OpStats&) = delete;
  OpStats& operator=(const OpStats&) = delete;

  // op: the request's oneof number (v1::Request::OpCase); ones outside
  // [1, kMaxOps) are counted under 0 ("unknown").
  void Record(uint32_t op, bool ok, std::chrono::nanoseconds latency);

  // Operations with at least one request, in op number order. name_of maps
  // an op number to its name.
  std::vector<OpSummary> Summaries(std::string (*name_of)(uint32_t)) const;

  // Bucket arithmetic, public for the unit test.
  static std::size_t BucketOf(uint64_t us);
  static uint64_t UpperBoundUs(std::size_t bucket);

 private:
  struct PerOp {
    std::atomic<uint64_t> count{0};
    std::atomic<uint64_t> errors{0};
    std::atomic<uint64_t> max_us{0};
    std::array<std::atomic<uint64_t>, kBuckets> buckets{};
  };
  std::array<PerOp, kMaxOps> ops_{};
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_OP_STATS_H_
