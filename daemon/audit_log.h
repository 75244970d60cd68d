// The audit log (Parsec U-7, repudiation): one line per key creation,
// import, deletion, grant, revoke, certificate change, admin operation and
// (configurable) private-key use, with time, uid, pid, executable, key,
// operation and result. Never a secret: no key bytes, no plaintext, no
// signature, no PIN.
//
// Append-only, hash-chained and keyed: every line carries the MAC of the
// line before it ("prev") and its own MAC ("mac" = HMAC-SHA256 over the
// line up to the MAC, with a key kept in the state directory, 0600). So
// Verify() finds any record that was edited, removed, inserted or moved
// (the chain or a MAC breaks at it), and, against the head this daemon
// keeps in memory, records cut off the end. Someone who can read the MAC key
// (root, the daemon's uid) could rewrite the whole chain: ship the log off
// the host for that threat.
//
// Each record is one write(2) on an O_APPEND descriptor, without fsync:
// a daemon crash loses nothing written, a power loss may lose the last
// records (the chain up to there stays verifiable).
//
// Key uses may instead be recorded in aggregate (CountUse, issue 7's
// per-key per-minute mode): uses are counted in memory and written once a
// minute as one record per caller, operation, key and result, with the
// number of uses ("count") and the time of the first ("since"). That makes
// a use nearly free (no MAC, no write) at a price: a daemon crash loses the
// counts of at most the last minute; a clean stop writes them.
//
// Thread-safe.
#ifndef KEYHOLD_DAEMON_AUDIT_LOG_H_
#define KEYHOLD_DAEMON_AUDIT_LOG_H_

#include <openssl/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/secret.h"
#include "common/status.h"

namespace keyhold::daemon {

struct AuditEvent {
  uint32_t uid = 0;
  int32_t pid = 0;
  std::string exe;     // the caller's executable, "" if unknown
  std::string op;      // "sign", "generate-key", ...
  std::string key;     // "OWNER_UID/NAME", "" for operations without a key
  std::string result;  // "ok" or the status code's name
  std::string detail;  // operation specifics (grantee, uid deleted), or ""
};

struct AuditCheck {
  bool intact = false;
  uint64_t records = 0;  // records checked
  std::string problem;   // the first problem found, if not intact
};

class AuditLog {
 public:
  // Opens (or creates) dir/audit.log and its MAC key dir/audit.key, and
  // continues the chain after the last record.
  static StatusOr<std::unique_ptr<AuditLog>> Open(
      const std::filesystem::path& dir);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one record; on failure (full disk) the chain does not advance.
  Status Append(const AuditEvent& event);

  // Counts one key use (event.detail is not kept) for the next aggregate
  // record of its group (uid, pid, exe, op, key, result). The first call
  // starts a thread that appends the aggregate records every minute;
  // FlushUses and the destructor append them too.
  void CountUse(const AuditEvent& event);
  // Appends one record per group counted since the last flush. A group
  // whose record cannot be written (full disk) is counted again next time.
  Status FlushUses();
  // Tests only, before the first CountUse: how often the flusher thread
  // writes (default one minute).
  void SetUseFlushPeriodForTest(std::chrono::milliseconds period) {
    use_flush_period_ = period;
  }

  // Checks every record from the first and the last against this daemon's
  // head.
  StatusOr<AuditCheck> Verify();

  // The last `limit` records matching key ("OWNER_UID/NAME") and uid, if
  // given, oldest first.
  StatusOr<std::vector<std::string>> Read(const std::optional<std::string>& key,
                                          std::optional<uint32_t> uid,
                                          std::size_t limit);

 private:
  AuditLog(std::filesystem::path path, int fd, SecretBytes mac_key);
  // HMAC-SHA256 of prefix under the MAC key, hex; called with mu_ held.
  std::string Mac(const std::string& prefix);

  const std::filesystem::path path_;
  const int fd_;
  const SecretBytes mac_key_;
  std::mutex mu_;
  uint64_t seq_ = 0;  // last record's
  std::string head_;  // last record's MAC (hex); 64 zeros before the first
  // Keyed once at construction, re-initialised per record (guarded by mu_);
  // null if OpenSSL could not set it up (Mac then uses one-shot HMAC).
  EVP_MAC_CTX* mac_ctx_ = nullptr;

  // Aggregated key uses (CountUse). Lock order: uses_mu_ is never held
  // while taking mu_.
  struct UseGroup {
    AuditEvent event;
    uint64_t count = 0;
    std::string since;  // time of the first use counted
  };
  Status AppendRecord(const AuditEvent& event, const UseGroup* uses);
  void FlushLoop();
  std::mutex uses_mu_;
  std::condition_variable uses_cv_;
  std::map<std::string, UseGroup> uses_;  // by group; guarded by uses_mu_
  bool stopping_ = false;                 // guarded by uses_mu_
  std::thread flusher_;                   // started by the first CountUse
  std::chrono::milliseconds use_flush_period_{60000};
};

// For tests and the CLI: the fields of one record line ("" if absent).
std::string AuditField(const std::string& line, const std::string& name);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_AUDIT_LOG_H_
