#include "common/peer_cred.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

namespace keyhold {

StatusOr<PeerCred> GetPeerCred(int fd, bool with_groups) {
  struct ucred cred {};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    return Internal(std::string("SO_PEERCRED: ") + std::strerror(errno));
  }
  PeerCred out;
  out.pid = cred.pid;
  out.uid = cred.uid;
  out.gid = cred.gid;
  if (with_groups) {
    std::vector<gid_t> groups(64);
    for (int attempt = 0; attempt < 4; ++attempt) {
      socklen_t glen = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
      if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &glen) ==
          0) {
        groups.resize(glen / sizeof(gid_t));
        out.groups = std::move(groups);
        break;
      }
      if (errno != ERANGE) {
        return Internal(std::string("SO_PEERGROUPS: ") + std::strerror(errno));
      }
      // The kernel reports the size it needs in glen.
      groups.resize(glen / sizeof(gid_t) + 1);
    }
  }
  return out;
}

}  // namespace keyhold
