#include "daemon/keystore/key_store.h"

#include <fcntl.h>
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <ctime>
#include <limits>
#include <set>
#include <string_view>
#include <system_error>
#include <utility>

#include "common/key_types.h"

namespace keyhold::daemon {
namespace {

// Bump together with a new step in Migrate().
constexpr int kSchemaVersion = 2;

constexpr int kOpenFlags =
    SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;

// The one message for "does not exist" and "exists but is not yours".
constexpr std::string_view kKeyNotFound = "key not found";

constexpr std::string_view kSchemaV1[] = {
    "CREATE TABLE keys ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " owner INTEGER NOT NULL,"
    " name TEXT NOT NULL,"
    " backend TEXT NOT NULL,"
    " type INTEGER NOT NULL,"
    " usage INTEGER NOT NULL,"
    " public_key BLOB NOT NULL,"
    " blob BLOB NOT NULL,"
    " created INTEGER NOT NULL,"
    " UNIQUE(owner, name))",
    "CREATE TABLE grants ("
    " key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,"
    " kind INTEGER NOT NULL,"
    " grantee INTEGER NOT NULL,"
    " PRIMARY KEY(key_id, kind, grantee))",
    "CREATE INDEX grants_by_grantee ON grants(kind, grantee)",
};

// v2: a certificate beside a key (public data; goes with the key).
constexpr std::string_view kSchemaV2[] = {
    "CREATE TABLE certificates ("
    " key_id INTEGER PRIMARY KEY REFERENCES keys(id) ON DELETE CASCADE,"
    " der BLOB NOT NULL)",
};

constexpr char kKeyColumns[] =
    "id, owner, name, backend, type, usage, public_key, blob, created,"
    " (SELECT der FROM certificates WHERE key_id = keys.id)";

struct StmtDeleter {
  void operator()(sqlite3_stmt* stmt) const { sqlite3_finalize(stmt); }
};
using Stmt = std::unique_ptr<sqlite3_stmt, StmtDeleter>;

// sqlite3_errstr for codes that mean the disk refused the write (full disk,
// I/O error); the errmsg of the connection otherwise. Never carries user data.
Status SqliteError(sqlite3* db, int rc) {
  const int primary = rc & 0xff;
  if (primary == SQLITE_FULL || primary == SQLITE_IOERR) {
    return Internal(std::string("key store write failed: ") +
                    sqlite3_errstr(rc));
  }
  return Internal(std::string("key store error: ") +
                  (db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc)));
}

StatusOr<Stmt> Prepare(sqlite3* db, std::string_view sql) {
  sqlite3_stmt* raw = nullptr;
  const int rc = sqlite3_prepare_v2(
      db, sql.data(), static_cast<int>(sql.size()), &raw, nullptr);
  Stmt stmt(raw);
  if (rc != SQLITE_OK) {
    return SqliteError(db, rc);
  }
  return stmt;
}

// Runs a statement that returns no rows we care about.
Status Exec(sqlite3* db, std::string_view sql) {
  StatusOr<Stmt> stmt = Prepare(db, sql);
  if (!stmt.ok()) {
    return stmt.status();
  }
  int rc;
  while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db, rc);
  }
  return Status::Ok();
}

// Runs a statement that returns one integer (PRAGMA user_version, ...).
StatusOr<int64_t> QueryInt(sqlite3* db, std::string_view sql) {
  StatusOr<Stmt> stmt = Prepare(db, sql);
  if (!stmt.ok()) {
    return stmt.status();
  }
  const int rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_ROW) {
    return rc == SQLITE_DONE ? Internal("key store: empty pragma result")
                             : SqliteError(db, rc);
  }
  return static_cast<int64_t>(sqlite3_column_int64(stmt->get(), 0));
}

void BindInt(sqlite3_stmt* stmt, int index, int64_t value) {
  // Binding to a valid index of a freshly prepared statement cannot fail.
  sqlite3_bind_int64(stmt, index, static_cast<sqlite3_int64>(value));
}

void BindText(sqlite3_stmt* stmt, int index, std::string_view text) {
  sqlite3_bind_text64(stmt, index, text.data(),
                      static_cast<sqlite3_uint64>(text.size()),
                      SQLITE_TRANSIENT, SQLITE_UTF8);
}

void BindBlob(sqlite3_stmt* stmt, int index,
              const std::vector<uint8_t>& bytes) {
  if (bytes.empty()) {
    // A null pointer would bind SQL NULL, which NOT NULL refuses.
    sqlite3_bind_zeroblob(stmt, index, 0);
    return;
  }
  sqlite3_bind_blob64(stmt, index, bytes.data(),
                      static_cast<sqlite3_uint64>(bytes.size()),
                      SQLITE_TRANSIENT);
}

void BindRef(sqlite3_stmt* stmt, const KeyRef& ref) {
  BindInt(stmt, 1, static_cast<int64_t>(ref.owner));
  BindText(stmt, 2, ref.name);
}

std::string ColumnText(sqlite3_stmt* stmt, int col) {
  const unsigned char* text = sqlite3_column_text(stmt, col);
  const int size = sqlite3_column_bytes(stmt, col);
  if (text == nullptr || size <= 0) {
    return {};
  }
  return std::string(reinterpret_cast<const char*>(text),
                     static_cast<std::size_t>(size));
}

std::vector<uint8_t> ColumnBlob(sqlite3_stmt* stmt, int col) {
  const auto* data =
      static_cast<const uint8_t*>(sqlite3_column_blob(stmt, col));
  const int size = sqlite3_column_bytes(stmt, col);
  if (data == nullptr || size <= 0) {
    return {};
  }
  return std::vector<uint8_t>(data, data + size);
}

bool ColumnU32(sqlite3_stmt* stmt, int col, uint32_t& out) {
  const sqlite3_int64 v = sqlite3_column_int64(stmt, col);
  if (v < 0 || v > std::numeric_limits<uint32_t>::max()) {
    return false;
  }
  out = static_cast<uint32_t>(v);
  return true;
}

Status BadRow() { return Internal("key store holds an invalid row"); }

// Reads a row selected with kKeyColumns, grants excluded.
Status ReadKeyRow(sqlite3_stmt* stmt, KeyRecord& out) {
  const sqlite3_int64 id = sqlite3_column_int64(stmt, 0);
  if (id <= 0) {
    return BadRow();
  }
  out.id = static_cast<uint64_t>(id);
  if (!ColumnU32(stmt, 1, out.ref.owner)) {
    return BadRow();
  }
  out.ref.name = ColumnText(stmt, 2);
  out.backend = ColumnText(stmt, 3);
  const sqlite3_int64 type = sqlite3_column_int64(stmt, 4);
  if (type < std::numeric_limits<int>::min() ||
      type > std::numeric_limits<int>::max()) {
    return BadRow();
  }
  out.type = static_cast<v1::KeyType>(static_cast<int>(type));
  if (!ColumnU32(stmt, 5, out.usage)) {
    return BadRow();
  }
  out.public_key = ColumnBlob(stmt, 6);
  out.blob = ColumnBlob(stmt, 7);
  out.created_unix = static_cast<int64_t>(sqlite3_column_int64(stmt, 8));
  out.certificate = ColumnBlob(stmt, 9);
  return Status::Ok();
}

Status ReadGrants(sqlite3* db, KeyRecord& record) {
  StatusOr<Stmt> stmt =
      Prepare(db,
              "SELECT kind, grantee FROM grants WHERE key_id = ?1 "
              "ORDER BY kind, grantee");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindInt(stmt->get(), 1, static_cast<int64_t>(record.id));
  record.grants.clear();
  int rc;
  while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
    const sqlite3_int64 kind = sqlite3_column_int64(stmt->get(), 0);
    GrantEntry grant;
    if (kind == static_cast<sqlite3_int64>(GrantEntry::Kind::kUser)) {
      grant.kind = GrantEntry::Kind::kUser;
    } else if (kind == static_cast<sqlite3_int64>(GrantEntry::Kind::kGroup)) {
      grant.kind = GrantEntry::Kind::kGroup;
    } else {
      return BadRow();
    }
    if (!ColumnU32(stmt->get(), 1, grant.id)) {
      return BadRow();
    }
    record.grants.push_back(grant);
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db, rc);
  }
  return Status::Ok();
}

// Steps a statement selecting kKeyColumns and collects the records, grants
// included.
StatusOr<std::vector<KeyRecord>> ReadKeys(sqlite3* db, sqlite3_stmt* stmt) {
  std::vector<KeyRecord> out;
  int rc;
  while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
    KeyRecord record;
    KH_RETURN_IF_ERROR(ReadKeyRow(stmt, record));
    out.push_back(std::move(record));
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db, rc);
  }
  for (KeyRecord& record : out) {
    KH_RETURN_IF_ERROR(ReadGrants(db, record));
  }
  return out;
}

StatusOr<std::vector<KeyRecord>> SelectOwned(sqlite3* db, uint32_t owner) {
  StatusOr<Stmt> stmt =
      Prepare(db, std::string("SELECT ") + kKeyColumns +
                      " FROM keys WHERE owner = ?1 ORDER BY name");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindInt(stmt->get(), 1, static_cast<int64_t>(owner));
  return ReadKeys(db, stmt->get());
}

// The row id of ref, 0 if there is no such key.
StatusOr<int64_t> KeyId(sqlite3* db, const KeyRef& ref) {
  StatusOr<Stmt> stmt =
      Prepare(db, "SELECT id FROM keys WHERE owner = ?1 AND name = ?2");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindRef(stmt->get(), ref);
  const int rc = sqlite3_step(stmt->get());
  if (rc == SQLITE_DONE) {
    return int64_t{0};
  }
  if (rc != SQLITE_ROW) {
    return SqliteError(db, rc);
  }
  return static_cast<int64_t>(sqlite3_column_int64(stmt->get(), 0));
}

Status InsertGrant(sqlite3* db, int64_t key_id, GrantEntry grant) {
  StatusOr<Stmt> stmt =
      Prepare(db,
              "INSERT OR IGNORE INTO grants (key_id, kind, grantee) "
              "VALUES (?1, ?2, ?3)");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindInt(stmt->get(), 1, key_id);
  BindInt(stmt->get(), 2, static_cast<int64_t>(grant.kind));
  BindInt(stmt->get(), 3, static_cast<int64_t>(grant.id));
  const int rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_DONE) {
    return SqliteError(db, rc);
  }
  return Status::Ok();
}

Status ValidateGrant(GrantEntry grant) {
  if (grant.kind != GrantEntry::Kind::kUser &&
      grant.kind != GrantEntry::Kind::kGroup) {
    return InvalidArgument("unknown grant kind");
  }
  return Status::Ok();
}

// One write transaction: Begin() issues BEGIN IMMEDIATE (takes the write lock
// up front, so no upgrade deadlock); destruction rolls back unless Commit()
// succeeded.
class Transaction {
 public:
  explicit Transaction(sqlite3* db) : db_(db) {}
  ~Transaction() {
    // After SQLITE_FULL and some I/O errors SQLite has already rolled back;
    // autocommit tells whether a transaction is still open.
    if (begun_ && !committed_ && sqlite3_get_autocommit(db_) == 0) {
      sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;

  Status Begin() {
    KH_RETURN_IF_ERROR(Exec(db_, "BEGIN IMMEDIATE"));
    begun_ = true;
    return Status::Ok();
  }
  Status Commit() {
    KH_RETURN_IF_ERROR(Exec(db_, "COMMIT"));
    committed_ = true;
    return Status::Ok();
  }

 private:
  sqlite3* db_;
  bool begun_ = false;
  bool committed_ = false;
};

// Creates the file ourselves so that it is never, even for an instant,
// readable by anyone but the daemon user; SQLite would honour the umask.
Status PrepareFile(const std::filesystem::path& path) {
  const int fd = open(path.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    return Internal("cannot open key store " + path.string() + ": " +
                    std::error_code(errno, std::system_category()).message());
  }
  struct FdCloser {
    int fd;
    ~FdCloser() { close(fd); }
  } closer{fd};

  struct stat st {};
  if (fstat(fd, &st) != 0) {
    return Internal("cannot stat key store " + path.string() + ": " +
                    std::error_code(errno, std::system_category()).message());
  }
  if (!S_ISREG(st.st_mode)) {
    return Internal("key store " + path.string() + " is not a regular file");
  }
  if (fchmod(fd, S_IRUSR | S_IWUSR) != 0) {
    return Internal("cannot set mode 0600 on key store " + path.string() +
                    ": " +
                    std::error_code(errno, std::system_category()).message());
  }
  if (fstat(fd, &st) != 0 || (st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    return Internal("key store " + path.string() +
                    " is accessible to group or others");
  }
  return Status::Ok();
}

Status ConfigureConnection(sqlite3* db) {
  sqlite3_extended_result_codes(db, 1);
  KH_RETURN_IF_ERROR(Exec(db, "PRAGMA busy_timeout = 5000"));
  // The first statement that reads the file: a non-database fails here.
  {
    StatusOr<Stmt> stmt = Prepare(db, "PRAGMA journal_mode = WAL");
    if (!stmt.ok()) {
      return stmt.status();
    }
    const int rc = sqlite3_step(stmt->get());
    if (rc != SQLITE_ROW) {
      return SqliteError(db, rc);
    }
    if (ColumnText(stmt->get(), 0) != "wal") {
      return Internal("key store: cannot enable WAL journal mode");
    }
  }
  KH_RETURN_IF_ERROR(Exec(db, "PRAGMA synchronous = FULL"));
  KH_RETURN_IF_ERROR(Exec(db, "PRAGMA foreign_keys = ON"));
  StatusOr<int64_t> fk = QueryInt(db, "PRAGMA foreign_keys");
  if (!fk.ok()) {
    return fk.status();
  }
  if (*fk != 1) {
    // Without it, deleting a key would leave its grants behind.
    return Internal("key store: SQLite lacks foreign key support");
  }
  return Status::Ok();
}

Status Migrate(sqlite3* db) {
  Transaction txn(db);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<int64_t> version = QueryInt(db, "PRAGMA user_version");
  if (!version.ok()) {
    return version.status();
  }
  if (*version > kSchemaVersion) {
    return Internal("key store schema version " + std::to_string(*version) +
                    " is newer than this daemon supports (" +
                    std::to_string(kSchemaVersion) + ")");
  }
  if (*version == kSchemaVersion) {
    return Status::Ok();  // up to date; the destructor ends the transaction
  }
  if (*version < 1) {
    for (std::string_view sql : kSchemaV1) {
      KH_RETURN_IF_ERROR(Exec(db, sql));
    }
  }
  if (*version < 2) {
    for (std::string_view sql : kSchemaV2) {
      KH_RETURN_IF_ERROR(Exec(db, sql));
    }
  }
  // Future versions: if (*version < 3) { ... }
  KH_RETURN_IF_ERROR(
      Exec(db, "PRAGMA user_version = " + std::to_string(kSchemaVersion)));
  return txn.Commit();
}

}  // namespace

KeyStore::KeyStore(sqlite3* db) : db_(db) {}

KeyStore::~KeyStore() {
  // Every statement is finalized by its Stmt before the call that prepared it
  // returns, so nothing is left open here; close_v2 would defer otherwise.
  sqlite3_close_v2(db_);
}

StatusOr<std::unique_ptr<KeyStore>> KeyStore::Open(
    const std::filesystem::path& path) {
  KH_RETURN_IF_ERROR(PrepareFile(path));
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, kOpenFlags, nullptr);
  // Owns raw from here on, even when the open failed (close_v2 frees it).
  std::unique_ptr<KeyStore> store(new KeyStore(raw));
  if (rc != SQLITE_OK) {
    return SqliteError(raw, rc);
  }
  KH_RETURN_IF_ERROR(ConfigureConnection(raw));
  KH_RETURN_IF_ERROR(Migrate(raw));
  return store;
}

std::shared_ptr<const KeyRecord> KeyStore::Cached(const KeyRef& ref) {
  std::shared_lock<std::shared_mutex> lock(cache_mu_);
  auto it = cache_.find(ref);
  return it == cache_.end() ? nullptr : it->second;
}

std::optional<std::string> KeyStore::CachedBackend(const KeyRef& ref) {
  if (auto cached = Cached(ref)) {
    return cached->backend;
  }
  return std::nullopt;
}

void KeyStore::Uncache(const KeyRef& ref) {
  std::unique_lock<std::shared_mutex> lock(cache_mu_);
  cache_.erase(ref);
}

void KeyStore::UncacheAll() {
  std::unique_lock<std::shared_mutex> lock(cache_mu_);
  cache_.clear();
}

StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::LoadLocked(
    const KeyRef& ref) {
  if (auto cached = Cached(ref)) {
    return cached;
  }
  StatusOr<Stmt> stmt =
      Prepare(db_, std::string("SELECT ") + kKeyColumns +
                       " FROM keys WHERE owner = ?1 AND name = ?2");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindRef(stmt->get(), ref);
  StatusOr<std::vector<KeyRecord>> rows = ReadKeys(db_, stmt->get());
  if (!rows.ok()) {
    return rows.status();
  }
  if (rows->empty()) {
    return NotFound(std::string(kKeyNotFound));
  }
  auto record = std::make_shared<const KeyRecord>(std::move(rows->front()));
  {
    std::unique_lock<std::shared_mutex> lock(cache_mu_);
    cache_.emplace(ref, record);
  }
  return record;
}

StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::Authorize(
    const Principal& who, const KeyRef& ref, Right right) {
  StatusOr<std::shared_ptr<const KeyRecord>> record = Cached(ref);
  if (*record == nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    record = LoadLocked(ref);
    if (!record.ok()) {
      return record.status();
    }
  }
  const KeyRecord& key = **record;
  if (key.ref.owner == who.uid) {
    return record;
  }
  for (const GrantEntry& grant : key.grants) {
    const bool match =
        (grant.kind == GrantEntry::Kind::kUser && grant.id == who.uid) ||
        (grant.kind == GrantEntry::Kind::kGroup && who.InGroup(grant.id));
    if (match) {
      if (right == Right::kUse) {
        return record;
      }
      return PermissionDenied("only the owner may manage this key");
    }
  }
  // Same code and message as a missing key: existence is not disclosed.
  return NotFound(std::string(kKeyNotFound));
}

Status KeyStore::Insert(KeyRecord& record) {
  KH_RETURN_IF_ERROR(ValidateKeyName(record.ref.name));
  for (const GrantEntry& grant : record.grants) {
    KH_RETURN_IF_ERROR(ValidateGrant(grant));
  }
  const int64_t created = static_cast<int64_t>(std::time(nullptr));

  std::lock_guard<std::mutex> lock(mu_);
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<Stmt> stmt = Prepare(
      db_,
      "INSERT INTO keys (owner, name, backend, type, usage, public_key, blob,"
      " created) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindRef(stmt->get(), record.ref);
  BindText(stmt->get(), 3, record.backend);
  BindInt(stmt->get(), 4, static_cast<int64_t>(record.type));
  BindInt(stmt->get(), 5, static_cast<int64_t>(record.usage));
  BindBlob(stmt->get(), 6, record.public_key);
  BindBlob(stmt->get(), 7, record.blob);
  BindInt(stmt->get(), 8, created);
  const int rc = sqlite3_step(stmt->get());
  if ((rc & 0xff) == SQLITE_CONSTRAINT) {
    return AlreadyExists("a key with this name already exists");
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, rc);
  }
  const int64_t id = static_cast<int64_t>(sqlite3_last_insert_rowid(db_));
  for (const GrantEntry& grant : record.grants) {
    KH_RETURN_IF_ERROR(InsertGrant(db_, id, grant));
  }
  KH_RETURN_IF_ERROR(txn.Commit());
  record.id = static_cast<uint64_t>(id);
  record.created_unix = created;
  // Not cached here: the next Authorize loads it, with grants as stored.
  Uncache(record.ref);
  return Status::Ok();
}

Status KeyStore::Delete(const KeyRef& ref, uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  Uncache(ref);
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<Stmt> stmt = Prepare(db_,
                                "DELETE FROM keys WHERE owner = ?1 AND name = "
                                "?2 AND (?3 = 0 OR id = ?3)");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindRef(stmt->get(), ref);
  BindInt(stmt->get(), 3, static_cast<int64_t>(id));
  const int rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, rc);
  }
  if (sqlite3_changes(db_) == 0) {
    return NotFound(std::string(kKeyNotFound));
  }
  return txn.Commit();
}

StatusOr<std::vector<KeyRecord>> KeyStore::ListOwned(uint32_t owner) {
  std::lock_guard<std::mutex> lock(mu_);
  return SelectOwned(db_, owner);
}

StatusOr<std::vector<KeyRecord>> KeyStore::ListByBackend(
    const std::string& backend) {
  std::lock_guard<std::mutex> lock(mu_);
  StatusOr<Stmt> stmt =
      Prepare(db_, std::string("SELECT ") + kKeyColumns +
                       " FROM keys WHERE backend = ?1 ORDER BY id");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindText(stmt->get(), 1, backend);
  return ReadKeys(db_, stmt->get());
}

StatusOr<std::vector<KeyRecord>> KeyStore::ListAll() {
  std::lock_guard<std::mutex> lock(mu_);
  StatusOr<Stmt> stmt = Prepare(
      db_, std::string("SELECT ") + kKeyColumns + " FROM keys ORDER BY id");
  if (!stmt.ok()) {
    return stmt.status();
  }
  return ReadKeys(db_, stmt->get());
}

StatusOr<std::vector<KeyRecord>> KeyStore::ListSharedWith(
    const Principal& who) {
  std::set<uint32_t> groups(who.groups.begin(), who.groups.end());
  groups.insert(who.gid);

  std::lock_guard<std::mutex> lock(mu_);
  // One indexed lookup per grantee; the map makes the result distinct and
  // ordered by (owner, name).
  std::map<KeyRef, KeyRecord> found;
  StatusOr<Stmt> stmt =
      Prepare(db_,
              "SELECT k.id, k.owner, k.name, k.backend, k.type, k.usage,"
              " k.public_key, k.blob, k.created,"
              " (SELECT der FROM certificates c WHERE c.key_id = k.id)"
              " FROM grants g JOIN keys k ON k.id = g.key_id"
              " WHERE g.kind = ?1 AND g.grantee = ?2 AND k.owner <> ?3");
  if (!stmt.ok()) {
    return stmt.status();
  }
  auto collect = [&](GrantEntry::Kind kind, uint32_t grantee) -> Status {
    sqlite3_reset(stmt->get());
    BindInt(stmt->get(), 1, static_cast<int64_t>(kind));
    BindInt(stmt->get(), 2, static_cast<int64_t>(grantee));
    BindInt(stmt->get(), 3, static_cast<int64_t>(who.uid));
    int rc;
    while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
      KeyRecord record;
      KH_RETURN_IF_ERROR(ReadKeyRow(stmt->get(), record));
      KeyRef ref = record.ref;
      found.try_emplace(std::move(ref), std::move(record));
    }
    if (rc != SQLITE_DONE) {
      return SqliteError(db_, rc);
    }
    return Status::Ok();
  };
  KH_RETURN_IF_ERROR(collect(GrantEntry::Kind::kUser, who.uid));
  for (uint32_t gid : groups) {
    KH_RETURN_IF_ERROR(collect(GrantEntry::Kind::kGroup, gid));
  }
  sqlite3_reset(stmt->get());

  std::vector<KeyRecord> out;
  out.reserve(found.size());
  for (auto& [ref, record] : found) {
    KH_RETURN_IF_ERROR(ReadGrants(db_, record));
    out.push_back(std::move(record));
  }
  return out;
}

Status KeyStore::AddGrant(const KeyRef& ref, GrantEntry grant) {
  KH_RETURN_IF_ERROR(ValidateGrant(grant));
  std::lock_guard<std::mutex> lock(mu_);
  Uncache(ref);
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<int64_t> id = KeyId(db_, ref);
  if (!id.ok()) {
    return id.status();
  }
  if (*id == 0) {
    return NotFound(std::string(kKeyNotFound));
  }
  KH_RETURN_IF_ERROR(InsertGrant(db_, *id, grant));
  return txn.Commit();
}

Status KeyStore::RemoveGrant(const KeyRef& ref, GrantEntry grant) {
  KH_RETURN_IF_ERROR(ValidateGrant(grant));
  std::lock_guard<std::mutex> lock(mu_);
  Uncache(ref);
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<int64_t> id = KeyId(db_, ref);
  if (!id.ok()) {
    return id.status();
  }
  if (*id == 0) {
    return NotFound(std::string(kKeyNotFound));
  }
  StatusOr<Stmt> stmt = Prepare(
      db_,
      "DELETE FROM grants WHERE key_id = ?1 AND kind = ?2 AND grantee = ?3");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindInt(stmt->get(), 1, *id);
  BindInt(stmt->get(), 2, static_cast<int64_t>(grant.kind));
  BindInt(stmt->get(), 3, static_cast<int64_t>(grant.id));
  const int rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, rc);
  }
  if (sqlite3_changes(db_) == 0) {
    return NotFound("no such grant");
  }
  return txn.Commit();
}

Status KeyStore::SetCertificate(const KeyRef& ref,
                                const std::vector<uint8_t>& der) {
  std::lock_guard<std::mutex> lock(mu_);
  Uncache(ref);
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<int64_t> id = KeyId(db_, ref);
  if (!id.ok()) {
    return id.status();
  }
  if (*id == 0) {
    return NotFound(std::string(kKeyNotFound));
  }
  StatusOr<Stmt> stmt =
      der.empty() ? Prepare(db_, "DELETE FROM certificates WHERE key_id = ?1")
                  : Prepare(db_,
                            "INSERT OR REPLACE INTO certificates (key_id, der) "
                            "VALUES (?1, ?2)");
  if (!stmt.ok()) {
    return stmt.status();
  }
  BindInt(stmt->get(), 1, *id);
  if (!der.empty()) {
    BindBlob(stmt->get(), 2, der);
  }
  const int rc = sqlite3_step(stmt->get());
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, rc);
  }
  if (der.empty() && sqlite3_changes(db_) == 0) {
    return NotFound("the key has no certificate");
  }
  return txn.Commit();
}

StatusOr<std::map<uint32_t, uint32_t>> KeyStore::CountByOwner() {
  std::lock_guard<std::mutex> lock(mu_);
  StatusOr<Stmt> stmt =
      Prepare(db_, "SELECT owner, COUNT(*) FROM keys GROUP BY owner");
  if (!stmt.ok()) {
    return stmt.status();
  }
  std::map<uint32_t, uint32_t> out;
  int rc;
  while ((rc = sqlite3_step(stmt->get())) == SQLITE_ROW) {
    uint32_t owner = 0;
    uint32_t count = 0;
    if (!ColumnU32(stmt->get(), 0, owner) ||
        !ColumnU32(stmt->get(), 1, count)) {
      return BadRow();
    }
    out[owner] = count;
  }
  if (rc != SQLITE_DONE) {
    return SqliteError(db_, rc);
  }
  return out;
}

StatusOr<std::vector<KeyRecord>> KeyStore::DeleteAllOf(uint32_t uid) {
  std::lock_guard<std::mutex> lock(mu_);
  // Grants made to uid hide in other owners' records too.
  UncacheAll();
  Transaction txn(db_);
  KH_RETURN_IF_ERROR(txn.Begin());
  StatusOr<std::vector<KeyRecord>> removed = SelectOwned(db_, uid);
  if (!removed.ok()) {
    return removed.status();
  }
  {
    StatusOr<Stmt> stmt = Prepare(db_, "DELETE FROM keys WHERE owner = ?1");
    if (!stmt.ok()) {
      return stmt.status();
    }
    BindInt(stmt->get(), 1, static_cast<int64_t>(uid));
    const int rc = sqlite3_step(stmt->get());
    if (rc != SQLITE_DONE) {
      return SqliteError(db_, rc);
    }
  }
  {
    StatusOr<Stmt> stmt =
        Prepare(db_, "DELETE FROM grants WHERE kind = ?1 AND grantee = ?2");
    if (!stmt.ok()) {
      return stmt.status();
    }
    BindInt(stmt->get(), 1, static_cast<int64_t>(GrantEntry::Kind::kUser));
    BindInt(stmt->get(), 2, static_cast<int64_t>(uid));
    const int rc = sqlite3_step(stmt->get());
    if (rc != SQLITE_DONE) {
      return SqliteError(db_, rc);
    }
  }
  KH_RETURN_IF_ERROR(txn.Commit());
  return removed;
}

}  // namespace keyhold::daemon
