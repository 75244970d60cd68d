// Who is calling, as the kernel reported it when the connection was accepted.
#ifndef KEYHOLD_DAEMON_KEYSTORE_PRINCIPAL_H_
#define KEYHOLD_DAEMON_KEYSTORE_PRINCIPAL_H_

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace keyhold::daemon {

struct Principal {
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::vector<uint32_t> groups;  // supplementary groups
  int32_t pid = 0;
  std::string exe;  // /proc/PID/exe at accept, "" if unreadable

  bool InGroup(uint32_t g) const {
    return g == gid || std::find(groups.begin(), groups.end(), g) != groups.end();
  }
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_KEYSTORE_PRINCIPAL_H_
