// Kernel-reported identity of the process at the other end of a Unix socket.
#ifndef KEYHOLD_COMMON_PEER_CRED_H_
#define KEYHOLD_COMMON_PEER_CRED_H_

#include <sys/types.h>

#include <vector>

#include "common/status.h"

namespace keyhold {

struct PeerCred {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups (SO_PEERGROUPS)
};

// Reads SO_PEERCRED and, when with_groups, SO_PEERGROUPS from a connected
// AF_UNIX socket.
StatusOr<PeerCred> GetPeerCred(int fd, bool with_groups);

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_PEER_CRED_H_
