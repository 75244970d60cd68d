// Which CPU a client connection is for, told at connect time without a
// protocol message: before connect() the client binds its Unix socket to an
// abstract address that names the CPU it runs on ("\0keyhold-cpu/CPU/ID"),
// and the daemon reads it with getpeername() when it accepts. The daemon
// then serves the connection from its I/O thread pinned to that CPU, so a
// request and its answer change hands on one CPU (daemon/server.h). The
// hint is only a placement preference: a wrong or hostile one changes
// which daemon thread serves that client, nothing else.
#ifndef KEYHOLD_COMMON_CPU_HINT_H_
#define KEYHOLD_COMMON_CPU_HINT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace keyhold {

// The abstract socket name (sun_path bytes, leading NUL included) for a
// connection made on cpu; id makes it unique (the name space is shared by
// every process in the network namespace).
std::string CpuHintAddress(int cpu, uint64_t id);

// The CPU named by a peer's address (sun_path bytes as getpeername returned
// them), if it is a hint address.
std::optional<int> CpuFromHintAddress(std::string_view sun_path);

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_CPU_HINT_H_
