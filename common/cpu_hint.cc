#include "common/cpu_hint.h"

#include <charconv>

namespace keyhold {
namespace {

constexpr std::string_view kPrefix("\0keyhold-cpu/", 13);
constexpr int kMaxCpu = 1 << 16;

}  // namespace

std::string CpuHintAddress(int cpu, uint64_t id) {
  return std::string(kPrefix) + std::to_string(cpu) + "/" + std::to_string(id);
}

std::optional<int> CpuFromHintAddress(std::string_view sun_path) {
  if (sun_path.substr(0, kPrefix.size()) != kPrefix) {
    return std::nullopt;
  }
  sun_path.remove_prefix(kPrefix.size());
  int cpu = -1;
  const auto [end, ec] =
      std::from_chars(sun_path.data(), sun_path.data() + sun_path.size(), cpu);
  if (ec != std::errc() || end == sun_path.data() || cpu < 0 ||
      cpu >= kMaxCpu || end == sun_path.data() + sun_path.size() ||
      *end != '/') {
    return std::nullopt;
  }
  return cpu;
}

}  // namespace keyhold
