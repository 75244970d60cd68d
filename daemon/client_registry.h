// Who is connected right now: uid -> connections and pids. Fed by the
// listener, read by the admin ListClients operation.
#ifndef KEYHOLD_DAEMON_CLIENT_REGISTRY_H_
#define KEYHOLD_DAEMON_CLIENT_REGISTRY_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace keyhold::daemon {

class ClientRegistry {
 public:
  struct Entry {
    uint32_t connections = 0;
    std::map<int32_t, uint32_t> pids;  // pid -> connections
  };

  void Add(uint32_t uid, int32_t pid) {
    std::lock_guard<std::mutex> lock(mu_);
    Entry& e = by_uid_[uid];
    ++e.connections;
    ++e.pids[pid];
    ++total_;
  }
  void Remove(uint32_t uid, int32_t pid) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = by_uid_.find(uid);
    if (it == by_uid_.end()) {
      return;
    }
    --total_;
    if (--it->second.connections == 0) {
      by_uid_.erase(it);
      return;
    }
    auto p = it->second.pids.find(pid);
    if (p != it->second.pids.end() && --p->second == 0) {
      it->second.pids.erase(p);
    }
  }
  uint32_t Total() const {
    std::lock_guard<std::mutex> lock(mu_);
    return total_;
  }
  std::map<uint32_t, Entry> Snapshot() const {
    std::lock_guard<std::mutex> lock(mu_);
    return by_uid_;
  }

 private:
  mutable std::mutex mu_;
  std::map<uint32_t, Entry> by_uid_;
  uint32_t total_ = 0;
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_CLIENT_REGISTRY_H_
