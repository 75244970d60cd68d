// KeyStore: the SQLite database of keys, grants and their owners.
//
// Every key lives in its owner's namespace, (owner uid, name). The store is
// the one place that decides who may do what with a key (Authorize); op
// handlers call it before they touch a backend. A key that exists but is not
// visible to the caller reads exactly like a key that does not exist.
//
// Durability: WAL with synchronous=FULL; every mutation is one transaction, so
// an acknowledged create or delete survives kill -9 and power loss, and a
// crash mid-way leaves no half-written row.
//
// Thread-safe: all methods may be called from any thread.
#ifndef KEYHOLD_DAEMON_KEYSTORE_KEY_STORE_H_
#define KEYHOLD_DAEMON_KEYSTORE_KEY_STORE_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "common/status.h"
#include "daemon/keystore/key_ref.h"
#include "daemon/keystore/principal.h"
#include "keyhold/v1/keyhold.pb.h"

struct sqlite3;

namespace keyhold::daemon {

struct GrantEntry {
  enum class Kind : uint8_t { kUser = 1, kGroup = 2 };
  Kind kind = Kind::kUser;
  uint32_t id = 0;
  friend bool operator==(const GrantEntry&, const GrantEntry&) = default;
};

struct KeyRecord {
  uint64_t id = 0;  // row id; never reused
  KeyRef ref;
  std::string backend;
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  uint32_t usage = 0;               // bit set of v1::Usage
  std::vector<uint8_t> public_key;  // DER SubjectPublicKeyInfo
  std::vector<uint8_t> blob;        // backend-opaque
  int64_t created_unix = 0;
  std::vector<GrantEntry> grants;
  std::vector<uint8_t> certificate;  // DER X.509; empty if none
};

enum class Right : uint8_t {
  kUse,     // sign, decrypt, derive, public key: owner or grantee
  kManage,  // delete, grant, revoke: owner only
};

class KeyStore {
 public:
  // Opens or creates the database at path (mode 0600).
  static StatusOr<std::unique_ptr<KeyStore>> Open(
      const std::filesystem::path& path);
  ~KeyStore();
  KeyStore(const KeyStore&) = delete;
  KeyStore& operator=(const KeyStore&) = delete;

  // The key if `who` may exercise `right` on it. kNotFound when it does not
  // exist or is invisible to `who`; kPermissionDenied when `who` holds a
  // grant but asks for kManage.
  StatusOr<std::shared_ptr<const KeyRecord>> Authorize(const Principal& who,
                                                       const KeyRef& ref,
                                                       Right right);

  // The backend of a key if its record is in the memory cache; never reads
  // the database, so it never waits. For routing only: authorizes nothing.
  std::optional<std::string> CachedBackend(const KeyRef& ref);

  // Stores a new key; sets record.id and record.created_unix.
  // kAlreadyExists if (owner, name) is taken.
  Status Insert(KeyRecord& record);
  // Removes a key and its grants. kNotFound if absent. With a non-zero id,
  // only that row: a key deleted and re-created under the same name in the
  // meantime is left alone.
  Status Delete(const KeyRef& ref, uint64_t id = 0);

  StatusOr<std::vector<KeyRecord>> ListOwned(uint32_t owner);
  // Every key held by the named backend, ordered by row id (for a backend's
  // reconciliation at start).
  StatusOr<std::vector<KeyRecord>> ListByBackend(const std::string& backend);
  // Every row, whatever its owner and backend (start-up reconciliation).
  StatusOr<std::vector<KeyRecord>> ListAll();
  // Keys of other owners granted to who's uid or one of its groups.
  StatusOr<std::vector<KeyRecord>> ListSharedWith(const Principal& who);

  // Adding an existing grant is not an error; removing a missing one is
  // kNotFound.
  Status AddGrant(const KeyRef& ref, GrantEntry grant);
  Status RemoveGrant(const KeyRef& ref, GrantEntry grant);

  // Stores (replaces) the certificate kept beside a key; an empty one
  // removes it (kNotFound if there was none). The caller checked that it is
  // a certificate for this key.
  Status SetCertificate(const KeyRef& ref, const std::vector<uint8_t>& der);

  // uid -> number of keys owned.
  StatusOr<std::map<uint32_t, uint32_t>> CountByOwner();

  // Removes every key uid owns and every grant made to uid (so a reused uid
  // inherits nothing). Returns the removed keys so their backends can
  // destroy them.
  StatusOr<std::vector<KeyRecord>> DeleteAllOf(uint32_t uid);

 private:
  explicit KeyStore(sqlite3* db);
  StatusOr<std::shared_ptr<const KeyRecord>> LoadLocked(const KeyRef& ref);

  // Looks up the cache only; null on a miss.
  std::shared_ptr<const KeyRecord> Cached(const KeyRef& ref);
  void Uncache(const KeyRef& ref);
  void UncacheAll();

  std::mutex mu_;
  sqlite3* db_;  // guarded by mu_
  // Read cache for the hot path (Authorize on every sign). Its own lock, so
  // a cache hit never waits behind a write's fsync. Entries are inserted
  // only while holding mu_, and writers invalidate while holding mu_, so a
  // stale row can never be cached after a write.
  std::shared_mutex cache_mu_;
  std::map<KeyRef, std::shared_ptr<const KeyRecord>> cache_;
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_KEYSTORE_KEY_STORE_H_
