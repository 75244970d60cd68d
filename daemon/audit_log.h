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
// Rotation, as auditd does it (SetRotation): once audit.log holds the
// configured size, it becomes audit.log.1 (audit.log.1 becomes .2, and so
// on; files past the configured number are deleted) and a new audit.log
// starts with an "audit-log-rotated" record chained to the last record of
// the old one. Verify() walks the files in order and checks the chain
// across them; the oldest file kept starts with a rotation record whose
// "prev" it cannot check (that record's file is gone), at the record this
// daemon knows the oldest file starts with.
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
  uint64_t first = 0;    // seq of the oldest record kept (1 unless rotated)
  std::size_t files = 0;  // files read: audit.log and audit.log.N kept
};

// The "op" of the record that starts each file after a rotation.
inline constexpr char kAuditRotatedOp[] = "audit-log-rotated";

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

  // Rotates audit.log once it holds max_bytes or more (0: never), keeping
  // `keep` earlier files (at least 1). A failed rotation (full disk) leaves
  // the records in audit.log and is tried again once it has grown by
  // another sixteenth of max_bytes (at least 1 MiB).
  void SetRotation(uint64_t max_bytes, unsigned keep);

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

  // Checks every record of every file kept, oldest first, and the last
  // against this daemon's head. Reads outside the lock: appends go on.
  StatusOr<AuditCheck> Verify();

  // The last `limit` records matching key ("OWNER_UID/NAME") and uid, if
  // given, oldest first; from the rotated files too when audit.log has
  // fewer.
  StatusOr<std::vector<std::string>> Read(const std::optional<std::string>& key,
                                          std::optional<uint32_t> uid,
                                          std::size_t limit);

 private:
  AuditLog(std::filesystem::path path, int fd, SecretBytes mac_key);
  // HMAC-SHA256 of prefix under the MAC key, hex, with ctx (keyed), else a
  // one-shot HMAC.
  std::string Mac(EVP_MAC_CTX* ctx, const std::string& prefix) const;
  // Called with mu_ held, after a record took audit.log past the limit.
  Status Rotate();
  // The numbers N of the audit.log.N files, descending (oldest first).
  std::vector<unsigned> RotatedNumbers() const;
  std::filesystem::path Rotated(unsigned n) const;
  // The seq of the first record of the oldest file there is (1 if none).
  uint64_t OldestKeptSeq() const;

  const std::filesystem::path path_;
  int fd_;  // audit.log; guarded by mu_ (Rotate replaces it)
  const SecretBytes mac_key_;
  std::mutex mu_;
  uint64_t seq_ = 0;  // last record's
  std::string head_;  // last record's MAC (hex); 64 zeros before the first
  uint64_t size_ = 0;          // bytes in audit.log
  uint64_t rotate_bytes_ = 0;  // SetRotation; 0: never
  unsigned keep_ = 1;
  uint64_t rotate_retry_at_ = 0;  // size_ before the next try after a failure
  // Seq of the first record of the oldest file kept, as this daemon knows
  // it (read at Open and after a rotation deleted files): Verify expects
  // the chain to start there, so records cut from the start are found.
  uint64_t floor_ = 1;
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
  // One record line, ending in "\n", and its MAC; called with mu_ held.
  std::string FormatRecord(uint64_t seq, const AuditEvent& e,
                           const UseGroup* uses, std::string* mac);
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
