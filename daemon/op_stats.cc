#include "daemon/op_stats.h"

#include <algorithm>
#include <bit>

namespace keyhold::daemon {

std::size_t OpStats::BucketOf(uint64_t us) {
  if (us < kSubBuckets) {
    return static_cast<std::size_t>(us);  // 0..3 us, exact
  }
  // e >= 2: the power of two; the two bits below the top one pick the
  // quarter of [2^e, 2^(e+1)).
  const auto e = static_cast<std::size_t>(std::bit_width(us) - 1);
  const auto sub = static_cast<std::size_t>((us >> (e - 2)) & 3);
  return std::min(kSubBuckets + (e - 2) * kSubBuckets + sub, kBuckets - 1);
}

uint64_t OpStats::UpperBoundUs(std::size_t bucket) {
  if (bucket < kSubBuckets) {
    return bucket;
  }
  const std::size_t e = (bucket - kSubBuckets) / kSubBuckets + 2;
  const std::size_t sub = (bucket - kSubBuckets) % kSubBuckets;
  return ((uint64_t{kSubBuckets} + sub + 1) << (e - 2)) - 1;
}

void OpStats::Record(uint32_t op, bool ok, std::chrono::nanoseconds latency) {
  PerOp& o = ops_[op < kMaxOps ? op : 0];
  const auto us =
      static_cast<uint64_t>(std::max<int64_t>(0, latency.count()) / 1000);
  o.count.fetch_add(1, std::memory_order_relaxed);
  if (!ok) {
    o.errors.fetch_add(1, std::memory_order_relaxed);
  }
  o.buckets[BucketOf(us)].fetch_add(1, std::memory_order_relaxed);
  uint64_t seen = o.max_us.load(std::memory_order_relaxed);
  while (us > seen &&
         !o.max_us.compare_exchange_weak(seen, us, std::memory_order_relaxed)) {
  }
}

std::vector<OpSummary> OpStats::Summaries(
    std::string (*name_of)(uint32_t)) const {
  std::vector<OpSummary> out;
  for (uint32_t op = 0; op < kMaxOps; ++op) {
    const PerOp& o = ops_[op];
    OpSummary s;
    s.count = o.count.load(std::memory_order_relaxed);
    if (s.count == 0) {
      continue;
    }
    s.op = name_of(op);
    s.errors = o.errors.load(std::memory_order_relaxed);
    s.max_us = o.max_us.load(std::memory_order_relaxed);
    // Percentiles from a copy of the buckets (requests may be counted
    // while we read; the copy is self-consistent enough for a report).
    std::array<uint64_t, kBuckets> b{};
    uint64_t total = 0;
    for (std::size_t i = 0; i < kBuckets; ++i) {
      b[i] = o.buckets[i].load(std::memory_order_relaxed);
      total += b[i];
    }
    const auto percentile = [&](uint64_t per_mille) {
      const uint64_t rank =
          std::max<uint64_t>(1, (total * per_mille + 999) / 1000);
      uint64_t seen = 0;
      for (std::size_t i = 0; i < kBuckets; ++i) {
        seen += b[i];
        if (seen >= rank) {
          return std::min(UpperBoundUs(i), s.max_us);
        }
      }
      return s.max_us;
    };
    s.p50_us = percentile(500);
    s.p90_us = percentile(900);
    s.p99_us = percentile(990);
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace keyhold::daemon
