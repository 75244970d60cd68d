// keyholdd configuration: TOML file with working defaults for every key, so
// the daemon starts with no file at all.
#ifndef KEYHOLD_DAEMON_CONFIG_H_
#define KEYHOLD_DAEMON_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"

namespace keyhold::daemon {

struct Limits {
  uint32_t max_frame_bytes = 64 * 1024;
  uint32_t max_in_flight_per_connection = 16;
  uint32_t max_connections = 1024;
  // Open connections one uid may hold; its further connections are closed
  // at once, so one user cannot take every slot (Parsec U-0). Far above
  // what a client needs (the client library pools a few per process).
  uint32_t max_connections_per_uid = 128;
  // Requests of one uid waiting for or running on the blocking pool (key
  // generation, key store writes, device backends), over all its
  // connections; past this its further ones are answered "resource
  // exhausted" at once instead of queueing. Requests answered inline (a
  // software signature) are not counted: they never wait.
  uint32_t max_in_flight_per_uid = 256;
  // A connection with nothing in flight that sends nothing for this long is
  // closed (clients reconnect transparently). 0 disables.
  uint32_t idle_timeout_seconds = 300;
  // Once a frame has started, the rest must arrive (and each response must be
  // taken by the client) within this time.
  uint32_t io_timeout_seconds = 10;
};

// One [[backend.KIND]] table of the config (KIND: pkcs11, tpm). The daemon
// core checks only the name; the backend of that kind parses the rest of the
// table (settings: the table re-serialized as TOML) and rejects unknown keys.
struct BackendSection {
  std::string kind;
  std::string name;      // unique among all backends; never "software"
  std::string settings;  // the whole table as TOML text, name included
};

struct Config {
  std::string socket_path = "/run/keyhold/keyhold.sock";
  std::string state_dir = "/var/lib/keyhold";
  std::vector<uint32_t> admin_uids = {0};
  std::string log_level = "info";
  std::string default_backend = "software";
  // Name of a [[backend.tpm]] table whose TPM seals the master key
  // (master.key.tpm in the state directory) instead of the plain
  // master.key file; an existing master.key is moved into the TPM at the
  // next start. Empty: the plain file.
  std::string master_key_sealed_by;
  // Threads that do I/O and cheap, bounded crypto; 0: one per core.
  uint32_t worker_threads = 0;
  // Serve each connection from an I/O thread pinned to its client's CPU
  // (the CPU the client process is confined to, else the one the client
  // library names in its socket address), so requests and answers hand
  // over on one CPU instead of waking another (server.h). Adds two mostly
  // idle threads per CPU. false: every client on the shared I/O threads.
  bool cpu_local_sessions = true;
  // Threads for work that may wait (key generation, key store writes,
  // device backends); 0: max(2, cores) plus one per HSM session and TPM.
  uint32_t blocking_threads = 0;
  // Answer bounded-CPU private-key operations (software-backend sign,
  // decrypt, derive) on the I/O threads, saving a thread hop per request.
  // false: every key operation goes through the blocking pool.
  bool inline_crypto = true;
  // Record every private-key use (sign, decrypt, derive) in the audit log,
  // not only key management and admin operations.
  bool audit_key_use = true;
  // With audit_key_use: count uses in memory and record them once a minute,
  // one record per caller, operation, key and result ("count", "since"),
  // instead of one record per use. A crash loses at most a minute of counts.
  bool audit_key_use_per_minute = false;
  // The audit log rotates once it holds this many MiB (0: never): it
  // becomes audit.log.1 and a new one starts, chained to it.
  uint32_t audit_rotate_mb = 64;
  // Rotated audit logs kept (audit.log.1 .. .N); older ones are deleted.
  uint32_t audit_keep_files = 16;
  Limits limits;
  // Device backends besides the built-in "software" one, in file order.
  std::vector<BackendSection> backends;
};

// Parses TOML text. Unknown keys are an error (a typo must not silently fall
// back to a default).
StatusOr<Config> ParseConfig(const std::string& toml_text,
                             const std::string& source_name);
StatusOr<Config> LoadConfigFile(const std::string& path);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_CONFIG_H_
