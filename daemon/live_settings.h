// The part of keyholdd's configuration that SIGHUP may change while the
// daemon runs: limits, admins and the two behaviour switches. (The log level
// is spdlog's own, also reloaded; the socket, state directory, thread counts
// and backends need a restart.)
//
// Readers take a snapshot (Get) and never see a half-applied reload. The two
// flags read on every request also live in plain atomics, so the hot path
// pays no reference count.
#ifndef KEYHOLD_DAEMON_LIVE_SETTINGS_H_
#define KEYHOLD_DAEMON_LIVE_SETTINGS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "daemon/config.h"

namespace keyhold::daemon {

struct RuntimeSettings {
  Limits limits;
  std::vector<uint32_t> admin_uids = {0};
  bool inline_crypto = true;
  bool audit_key_use = true;
  bool audit_key_use_per_minute = false;

  static RuntimeSettings From(const Config& c) {
    return {c.limits, c.admin_uids, c.inline_crypto, c.audit_key_use,
            c.audit_key_use_per_minute};
  }
  bool IsAdmin(uint32_t uid) const {
    return std::find(admin_uids.begin(), admin_uids.end(), uid) !=
           admin_uids.end();
  }
};

class LiveSettings {
 public:
  LiveSettings() : LiveSettings(RuntimeSettings{}) {}
  explicit LiveSettings(RuntimeSettings s) { Set(std::move(s)); }
  LiveSettings(const LiveSettings&) = delete;
  LiveSettings& operator=(const LiveSettings&) = delete;

  std::shared_ptr<const RuntimeSettings> Get() const {
    return current_.load(std::memory_order_acquire);
  }
  void Set(RuntimeSettings s) {
    inline_crypto_.store(s.inline_crypto, std::memory_order_relaxed);
    audit_key_use_.store(s.audit_key_use, std::memory_order_relaxed);
    audit_key_use_per_minute_.store(s.audit_key_use_per_minute,
                                    std::memory_order_relaxed);
    current_.store(std::make_shared<const RuntimeSettings>(std::move(s)),
                   std::memory_order_release);
  }

  bool inline_crypto() const {
    return inline_crypto_.load(std::memory_order_relaxed);
  }
  bool audit_key_use() const {
    return audit_key_use_.load(std::memory_order_relaxed);
  }
  bool audit_key_use_per_minute() const {
    return audit_key_use_per_minute_.load(std::memory_order_relaxed);
  }
  bool IsAdmin(uint32_t uid) const { return Get()->IsAdmin(uid); }

 private:
  std::atomic<std::shared_ptr<const RuntimeSettings>> current_;
  std::atomic<bool> inline_crypto_{true};
  std::atomic<bool> audit_key_use_{true};
  std::atomic<bool> audit_key_use_per_minute_{false};
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_LIVE_SETTINGS_H_
