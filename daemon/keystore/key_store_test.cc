#include "daemon/keystore/key_store.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

namespace keyhold::daemon {
namespace {

namespace fs = std::filesystem;

using Kind = GrantEntry::Kind;

KeyRecord MakeRecord(uint32_t owner, std::string name) {
  KeyRecord r;
  r.ref = KeyRef{owner, std::move(name)};
  r.backend = "software";
  r.type = v1::EC_P256;
  r.usage = v1::USAGE_SIGN;
  r.public_key = {0x30, 0x59, 0x30, 0x13};
  r.blob = {0xde, 0xad, 0xbe, 0xef, 0x00, 0x01};
  return r;
}

Principal User(uint32_t uid, uint32_t gid = 100,
               std::vector<uint32_t> groups = {}) {
  Principal p;
  p.uid = uid;
  p.gid = gid;
  p.groups = std::move(groups);
  return p;
}

std::vector<std::string> Names(const std::vector<KeyRecord>& records) {
  std::vector<std::string> out;
  for (const KeyRecord& r : records) {
    out.push_back(r.ref.ToString());
  }
  return out;
}

class KeyStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl =
        (fs::temp_directory_path() / "key_store_test.XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
    path_ = dir_ / "keys.db";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::unique_ptr<KeyStore> OpenStore() {
    StatusOr<std::unique_ptr<KeyStore>> store = KeyStore::Open(path_);
    EXPECT_TRUE(store.ok()) << store.status().ToString();
    if (!store.ok()) {
      return nullptr;
    }
    return std::move(store).value();
  }

  // Inserts and checks success; returns the stored record.
  KeyRecord Insert(KeyStore& store, uint32_t owner, const std::string& name,
                   std::vector<GrantEntry> grants = {}) {
    KeyRecord r = MakeRecord(owner, name);
    r.grants = std::move(grants);
    Status s = store.Insert(r);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return r;
  }

  fs::path dir_;
  fs::path path_;
};

TEST_F(KeyStoreTest, InsertThenOwnerIsAuthorized) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const int64_t before = static_cast<int64_t>(std::time(nullptr));
  KeyRecord r = MakeRecord(1000, "web");
  ASSERT_TRUE(store->Insert(r).ok());
  EXPECT_GT(r.id, 0u);
  EXPECT_GE(r.created_unix, before);
  EXPECT_LE(r.created_unix, static_cast<int64_t>(std::time(nullptr)));

  for (Right right : {Right::kUse, Right::kManage}) {
    auto got = store->Authorize(User(1000), KeyRef{1000, "web"}, right);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    const KeyRecord& k = **got;
    EXPECT_EQ(k.id, r.id);
    EXPECT_EQ(k.ref, r.ref);
    EXPECT_EQ(k.backend, "software");
    EXPECT_EQ(k.type, v1::EC_P256);
    EXPECT_EQ(k.usage, static_cast<uint32_t>(v1::USAGE_SIGN));
    EXPECT_EQ(k.public_key, r.public_key);
    EXPECT_EQ(k.blob, r.blob);
    EXPECT_EQ(k.created_unix, r.created_unix);
    EXPECT_TRUE(k.grants.empty());
  }
}

TEST_F(KeyStoreTest, EmptyBlobsRoundTrip) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord r = MakeRecord(1000, "empty");
  r.public_key.clear();
  r.blob.clear();
  ASSERT_TRUE(store->Insert(r).ok());
  auto got = store->Authorize(User(1000), r.ref, Right::kUse);
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE((*got)->public_key.empty());
  EXPECT_TRUE((*got)->blob.empty());
}

TEST_F(KeyStoreTest, InvalidNameIsRejected) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (const char* name : {"", "a/b", "with space", "x'; DROP TABLE keys;--"}) {
    KeyRecord r = MakeRecord(1000, name);
    EXPECT_EQ(store->Insert(r).code(), Code::kInvalidArgument) << name;
  }
  auto counts = store->CountByOwner();
  ASSERT_TRUE(counts.ok());
  EXPECT_TRUE(counts->empty());
}

TEST_F(KeyStoreTest, DuplicateNameIsAlreadyExists) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord first = Insert(*store, 1000, "web");
  KeyRecord again = MakeRecord(1000, "web");
  again.blob = {1, 2, 3};
  Status s = store->Insert(again);
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.ToString();
  // The first record is untouched and the store still accepts writes.
  auto got = store->Authorize(User(1000), first.ref, Right::kUse);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)->blob, first.blob);
  EXPECT_EQ((*got)->id, first.id);
  Insert(*store, 1000, "other");
}

TEST_F(KeyStoreTest, SameNameUnderTwoOwners) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord a = Insert(*store, 1000, "web");
  KeyRecord b = Insert(*store, 1001, "web");
  EXPECT_NE(a.id, b.id);
  auto ga = store->Authorize(User(1000), KeyRef{1000, "web"}, Right::kUse);
  auto gb = store->Authorize(User(1001), KeyRef{1001, "web"}, Right::kUse);
  ASSERT_TRUE(ga.ok());
  ASSERT_TRUE(gb.ok());
  EXPECT_EQ((*ga)->id, a.id);
  EXPECT_EQ((*gb)->id, b.id);
}

TEST_F(KeyStoreTest, InvisibleKeyReadsExactlyLikeMissingKey) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");
  Principal other = User(1001);
  Principal admin = User(0, 0);  // the default admin uid
  for (Right right : {Right::kUse, Right::kManage}) {
    auto invisible = store->Authorize(other, KeyRef{1000, "web"}, right);
    auto missing = store->Authorize(other, KeyRef{1000, "nope"}, right);
    ASSERT_FALSE(invisible.ok());
    ASSERT_FALSE(missing.ok());
    EXPECT_EQ(invisible.status().code(), Code::kNotFound);
    EXPECT_EQ(invisible.status(), missing.status());
    EXPECT_EQ(invisible.status().message(), "key not found");
    // Being an admin grants nothing here.
    auto by_admin = store->Authorize(admin, KeyRef{1000, "web"}, right);
    EXPECT_EQ(by_admin.status(), missing.status());
  }
}

TEST_F(KeyStoreTest, UserGrantAllowsUseButNotManage) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");
  const KeyRef ref{1000, "web"};
  // Load into the cache first: AddGrant must invalidate it.
  EXPECT_EQ(store->Authorize(User(33), ref, Right::kUse).status().code(),
            Code::kNotFound);
  ASSERT_TRUE(store->AddGrant(ref, {Kind::kUser, 33}).ok());

  auto use = store->Authorize(User(33), ref, Right::kUse);
  ASSERT_TRUE(use.ok()) << use.status().ToString();
  EXPECT_EQ((*use)->grants, (std::vector<GrantEntry>{{Kind::kUser, 33}}));
  auto manage = store->Authorize(User(33), ref, Right::kManage);
  EXPECT_EQ(manage.status().code(), Code::kPermissionDenied);
  EXPECT_EQ(manage.status().message(), "only the owner may manage this key");
  // A user grant says nothing about a group with the same number.
  EXPECT_EQ(store->Authorize(User(34, 33), ref, Right::kUse).status().code(),
            Code::kNotFound);
}

TEST_F(KeyStoreTest, GroupGrantByPrimaryGid) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web", {{Kind::kGroup, 500}});
  const KeyRef ref{1000, "web"};
  EXPECT_TRUE(store->Authorize(User(2000, 500), ref, Right::kUse).ok());
  EXPECT_EQ(
      store->Authorize(User(2000, 500), ref, Right::kManage).status().code(),
      Code::kPermissionDenied);
  EXPECT_EQ(store->Authorize(User(2000, 501), ref, Right::kUse).status().code(),
            Code::kNotFound);
  // A group grant says nothing about the uid with the same number.
  EXPECT_EQ(store->Authorize(User(500, 1), ref, Right::kUse).status().code(),
            Code::kNotFound);
}

TEST_F(KeyStoreTest, GroupGrantBySupplementaryGroup) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");
  const KeyRef ref{1000, "web"};
  ASSERT_TRUE(store->AddGrant(ref, {Kind::kGroup, 500}).ok());
  Principal p = User(2000, 100, {7, 500, 9});
  EXPECT_TRUE(store->Authorize(p, ref, Right::kUse).ok());
  EXPECT_EQ(store->Authorize(p, ref, Right::kManage).status().code(),
            Code::kPermissionDenied);
  EXPECT_EQ(store->Authorize(User(2000, 100, {7, 9}), ref, Right::kUse)
                .status()
                .code(),
            Code::kNotFound);
}

TEST_F(KeyStoreTest, RevokeRemovesAccess) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web", {{Kind::kUser, 33}, {Kind::kGroup, 500}});
  const KeyRef ref{1000, "web"};
  ASSERT_TRUE(store->Authorize(User(33), ref, Right::kUse).ok());  // cached
  ASSERT_TRUE(store->Authorize(User(44, 500), ref, Right::kUse).ok());

  ASSERT_TRUE(store->RemoveGrant(ref, {Kind::kUser, 33}).ok());
  auto revoked = store->Authorize(User(33), ref, Right::kUse);
  EXPECT_EQ(revoked.status(), NotFound("key not found"));
  EXPECT_TRUE(store->Authorize(User(44, 500), ref, Right::kUse).ok());

  ASSERT_TRUE(store->RemoveGrant(ref, {Kind::kGroup, 500}).ok());
  EXPECT_EQ(store->Authorize(User(44, 500), ref, Right::kUse).status(),
            NotFound("key not found"));
  auto own = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(own.ok());
  EXPECT_TRUE((*own)->grants.empty());
}

TEST_F(KeyStoreTest, GrantEdgeCases) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");
  const KeyRef ref{1000, "web"};
  const KeyRef missing{1000, "nope"};

  Status s = store->RemoveGrant(ref, {Kind::kUser, 33});
  EXPECT_EQ(s.code(), Code::kNotFound);
  EXPECT_EQ(s.message(), "no such grant");
  EXPECT_EQ(store->RemoveGrant(missing, {Kind::kUser, 33}).code(),
            Code::kNotFound);
  EXPECT_EQ(store->AddGrant(missing, {Kind::kUser, 33}).code(),
            Code::kNotFound);

  // Adding twice is fine and stores one grant.
  ASSERT_TRUE(store->AddGrant(ref, {Kind::kUser, 33}).ok());
  ASSERT_TRUE(store->AddGrant(ref, {Kind::kUser, 33}).ok());
  auto got = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ((*got)->grants.size(), 1u);

  // A grant kind outside the enum never reaches the database.
  EXPECT_EQ(store->AddGrant(ref, {static_cast<Kind>(9), 33}).code(),
            Code::kInvalidArgument);
}

TEST_F(KeyStoreTest, ListByBackend) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "soft");
  KeyRecord r = MakeRecord(1000, "hsm1");
  r.backend = "hsm";
  ASSERT_TRUE(store->Insert(r).ok());
  KeyRecord r2 = MakeRecord(2000, "hsm2");
  r2.backend = "hsm";
  ASSERT_TRUE(store->Insert(r2).ok());

  auto hsm = store->ListByBackend("hsm");
  ASSERT_TRUE(hsm.ok());
  EXPECT_EQ(Names(*hsm), (std::vector<std::string>{"1000/hsm1", "2000/hsm2"}));
  EXPECT_FALSE((*hsm)[0].blob.empty());
  auto soft = store->ListByBackend("software");
  ASSERT_TRUE(soft.ok());
  EXPECT_EQ(soft->size(), 1u);
  auto none = store->ListByBackend("tpm");
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  auto all = store->ListAll();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(Names(*all),
            (std::vector<std::string>{"1000/soft", "1000/hsm1", "2000/hsm2"}));
}

TEST_F(KeyStoreTest, ListOwnedAndSharedWith) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "zeta", {{Kind::kUser, 33}});
  Insert(*store, 1000, "alpha");
  Insert(*store, 1000, "mid", {{Kind::kGroup, 500}});
  // Granted both ways: must appear once.
  Insert(*store, 900, "both", {{Kind::kUser, 33}, {Kind::kGroup, 33}});
  Insert(*store, 1200, "sup", {{Kind::kGroup, 600}});
  Insert(*store, 1200, "hidden", {{Kind::kGroup, 601}});
  // 33's own key, granted to its own group: not "shared with" 33.
  Insert(*store, 33, "mine", {{Kind::kGroup, 33}});

  auto owned = store->ListOwned(1000);
  ASSERT_TRUE(owned.ok());
  EXPECT_EQ(Names(*owned),
            (std::vector<std::string>{"1000/alpha", "1000/mid", "1000/zeta"}));
  EXPECT_EQ((*owned)[2].grants, (std::vector<GrantEntry>{{Kind::kUser, 33}}));
  EXPECT_FALSE((*owned)[0].blob.empty());

  auto none = store->ListOwned(4242);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());

  Principal www = User(33, 33, {500, 600});
  auto shared = store->ListSharedWith(www);
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(Names(*shared),
            (std::vector<std::string>{"900/both", "1000/mid", "1000/zeta",
                                      "1200/sup"}));
  EXPECT_EQ((*shared)[0].grants.size(), 2u);

  auto nobody = store->ListSharedWith(User(4242, 4242));
  ASSERT_TRUE(nobody.ok());
  EXPECT_TRUE(nobody->empty());

  auto counts = store->CountByOwner();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ(*counts, (std::map<uint32_t, uint32_t>{
                         {33, 1}, {900, 1}, {1000, 3}, {1200, 2}}));
}

TEST_F(KeyStoreTest, DeleteThenNotFoundAndIdsNeverReused) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord a = Insert(*store, 1000, "a");
  KeyRecord b = Insert(*store, 1000, "b", {{Kind::kUser, 33}});
  ASSERT_TRUE(store->Authorize(User(1000), b.ref, Right::kUse).ok());  // cached

  ASSERT_TRUE(store->Delete(b.ref).ok());
  EXPECT_EQ(store->Authorize(User(1000), b.ref, Right::kUse).status(),
            NotFound("key not found"));
  EXPECT_EQ(store->Authorize(User(33), b.ref, Right::kUse).status(),
            NotFound("key not found"));
  EXPECT_EQ(store->Delete(b.ref).code(), Code::kNotFound);
  EXPECT_TRUE(store->Authorize(User(1000), a.ref, Right::kUse).ok());

  // The largest id was deleted; without AUTOINCREMENT SQLite would hand it
  // out again.
  KeyRecord c = Insert(*store, 1000, "b");
  EXPECT_GT(c.id, b.id);

  ASSERT_TRUE(store->Delete(c.ref).ok());
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord d = Insert(*store, 1000, "b");
  EXPECT_GT(d.id, c.id);
  // The recreated key does not inherit the old grant.
  EXPECT_EQ(store->Authorize(User(33), d.ref, Right::kUse).status().code(),
            Code::kNotFound);
}

TEST_F(KeyStoreTest, DataSurvivesReopen) {
  KeyRecord web;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    web = Insert(*store, 1000, "web", {{Kind::kUser, 33}});
    ASSERT_TRUE(store->AddGrant(web.ref, {Kind::kGroup, 500}).ok());
    Insert(*store, 1001, "db");
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto got = store->Authorize(User(1000), web.ref, Right::kManage);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ((*got)->id, web.id);
  EXPECT_EQ((*got)->blob, web.blob);
  EXPECT_EQ((*got)->public_key, web.public_key);
  EXPECT_EQ((*got)->created_unix, web.created_unix);
  EXPECT_EQ((*got)->grants,
            (std::vector<GrantEntry>{{Kind::kUser, 33}, {Kind::kGroup, 500}}));
  EXPECT_TRUE(store->Authorize(User(33), web.ref, Right::kUse).ok());
  EXPECT_TRUE(store->Authorize(User(7, 500), web.ref, Right::kUse).ok());
  EXPECT_TRUE(
      store->Authorize(User(1001), KeyRef{1001, "db"}, Right::kUse).ok());
}

TEST_F(KeyStoreTest, DeleteAllOfRemovesKeysAndGrantsToUid) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord k1 = Insert(*store, 1000, "one", {{Kind::kUser, 2000}});
  KeyRecord k2 = Insert(*store, 1000, "two");
  // Grants made to 1000 by others; a group grant to gid 1000 stays.
  Insert(*store, 2000, "theirs", {{Kind::kUser, 1000}, {Kind::kGroup, 1000}});
  Insert(*store, 3000, "other", {{Kind::kUser, 1000}});
  const KeyRef theirs{2000, "theirs"};
  ASSERT_TRUE(store->Authorize(User(1000, 1), theirs, Right::kUse).ok());

  auto removed = store->DeleteAllOf(1000);
  ASSERT_TRUE(removed.ok()) << removed.status().ToString();
  EXPECT_EQ(Names(*removed),
            (std::vector<std::string>{"1000/one", "1000/two"}));
  EXPECT_EQ((*removed)[0].id, k1.id);
  EXPECT_EQ((*removed)[0].blob, k1.blob);
  EXPECT_EQ((*removed)[0].grants,
            (std::vector<GrantEntry>{{Kind::kUser, 2000}}));
  EXPECT_EQ((*removed)[1].id, k2.id);

  EXPECT_EQ(store->Authorize(User(1000), k1.ref, Right::kUse).status().code(),
            Code::kNotFound);
  EXPECT_EQ(store->Authorize(User(2000), k1.ref, Right::kUse).status().code(),
            Code::kNotFound);
  // The next user to get uid 1000 inherits no user grant.
  EXPECT_EQ(
      store->Authorize(User(1000, 1), theirs, Right::kUse).status().code(),
      Code::kNotFound);
  EXPECT_TRUE(store->Authorize(User(5, 1000), theirs, Right::kUse).ok());
  auto t = store->Authorize(User(2000), theirs, Right::kUse);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->grants, (std::vector<GrantEntry>{{Kind::kGroup, 1000}}));
  auto other = store->ListOwned(3000);
  ASSERT_TRUE(other.ok());
  ASSERT_EQ(other->size(), 1u);
  EXPECT_TRUE((*other)[0].grants.empty());

  auto shared = store->ListSharedWith(User(1000, 1));
  ASSERT_TRUE(shared.ok());
  EXPECT_TRUE(shared->empty());
  auto counts = store->CountByOwner();
  ASSERT_TRUE(counts.ok());
  EXPECT_EQ(counts->count(1000), 0u);

  auto again = store->DeleteAllOf(1000);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->empty());
}

TEST_F(KeyStoreTest, FileModeIs0600) {
  // A pre-existing, too open, empty file is tightened.
  { std::ofstream created(path_); }
  ASSERT_EQ(chmod(path_.c_str(), 0644), 0);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");

  struct stat st {};
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  // SQLite gives the WAL the mode of the database.
  const fs::path wal = path_.string() + "-wal";
  ASSERT_EQ(stat(wal.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(KeyStoreTest, FreshFileIs0600DespiteUmask) {
  const mode_t old = umask(0);
  auto store = OpenStore();
  umask(old);
  ASSERT_NE(store, nullptr);
  struct stat st {};
  ASSERT_EQ(stat(path_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
}

TEST_F(KeyStoreTest, RefusesNonRegularFile) {
  ASSERT_EQ(mkfifo(path_.c_str(), 0600), 0);
  EXPECT_FALSE(KeyStore::Open(path_).ok());
  EXPECT_FALSE(KeyStore::Open(dir_).ok());  // a directory
  EXPECT_FALSE(KeyStore::Open(dir_ / "missing-dir" / "keys.db").ok());
}

TEST_F(KeyStoreTest, NonDatabaseFileFailsOpen) {
  {
    std::ofstream out(path_, std::ios::binary);
    for (int i = 0; i < 8192; ++i) {
      out.put(static_cast<char>((i * 131 + 7) & 0xff));
    }
  }
  auto store = KeyStore::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), Code::kInternal);

  // Short text file.
  std::ofstream(path_, std::ios::trunc) << "this is not a database\n";
  EXPECT_FALSE(KeyStore::Open(path_).ok());
}

TEST_F(KeyStoreTest, CorruptedHeaderFailsOpen) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    Insert(*store, 1000, "web");
  }
  {
    std::fstream f(path_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(0);
    f.write("garbage garbage garbage garbage!", 32);
  }
  auto store = KeyStore::Open(path_);
  EXPECT_FALSE(store.ok());
}

TEST_F(KeyStoreTest, CorruptedPagesGiveErrorsNotCrashes) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    for (int i = 0; i < 50; ++i) {
      Insert(*store, 1000, "key" + std::to_string(i));
    }
  }
  {
    // Keep the 100-byte file header, scribble over everything else.
    std::fstream f(path_, std::ios::in | std::ios::out | std::ios::binary);
    const auto size = fs::file_size(path_);
    f.seekp(100);
    for (uintmax_t i = 100; i < size; ++i) {
      f.put(static_cast<char>((i * 197 + 3) & 0xff));
    }
  }
  auto store = KeyStore::Open(path_);
  if (!store.ok()) {
    SUCCEED() << store.status().ToString();
    return;
  }
  // If the damage was not noticed at open, every call still returns.
  (void)(*store)->ListOwned(1000);
  (void)(*store)->Authorize(User(1000), KeyRef{1000, "key1"}, Right::kUse);
  KeyRecord r = MakeRecord(1000, "new");
  (void)(*store)->Insert(r);
}

TEST_F(KeyStoreTest, NewerSchemaIsRefused) {
  { ASSERT_NE(OpenStore(), nullptr); }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(
      sqlite3_exec(db, "PRAGMA user_version = 99", nullptr, nullptr, nullptr),
      SQLITE_OK);
  sqlite3_close(db);
  auto store = KeyStore::Open(path_);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("99"), std::string::npos);
}

TEST_F(KeyStoreTest, CertificateLivesBesideItsKey) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "tls", {{Kind::kUser, 2000}});
  const KeyRef ref{1000, "tls"};
  const std::vector<uint8_t> cert = {0x30, 0x82, 0x01, 0x02, 0x03};
  const std::vector<uint8_t> renewed = {0x30, 0x82, 0x09, 0x09};

  // Removing a certificate that is not there, or one of a missing key.
  EXPECT_EQ(store->SetCertificate(ref, {}).code(), Code::kNotFound);
  EXPECT_EQ(store->SetCertificate(KeyRef{1000, "none"}, cert).code(),
            Code::kNotFound);

  ASSERT_TRUE(store->SetCertificate(ref, cert).ok());
  auto owner_view = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(owner_view.ok());
  EXPECT_EQ((*owner_view)->certificate, cert);  // the cache was refreshed
  ASSERT_TRUE(store->SetCertificate(ref, renewed).ok());
  auto owned = store->ListOwned(1000);
  ASSERT_TRUE(owned.ok());
  ASSERT_EQ(owned->size(), 1u);
  EXPECT_EQ(owned->front().certificate, renewed);
  auto shared = store->ListSharedWith(User(2000));
  ASSERT_TRUE(shared.ok());
  ASSERT_EQ(shared->size(), 1u);
  EXPECT_EQ(shared->front().certificate, renewed);

  // Survives a reopen; goes away with its key, so a new key of the same
  // name starts without one.
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto reopened = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(reopened.ok());
  EXPECT_EQ((*reopened)->certificate, renewed);
  ASSERT_TRUE(store->Delete(ref).ok());
  Insert(*store, 1000, "tls");
  auto fresh = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(fresh.ok());
  EXPECT_TRUE((*fresh)->certificate.empty());

  ASSERT_TRUE(store->SetCertificate(ref, cert).ok());
  ASSERT_TRUE(store->SetCertificate(ref, {}).ok());
  auto removed = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(removed.ok());
  EXPECT_TRUE((*removed)->certificate.empty());
}

// A store written by a version-1 daemon (no certificates table) opens,
// keeps its keys and gains certificates.
TEST_F(KeyStoreTest, MigratesVersionOneStore) {
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    const char* v1_schema =
        "CREATE TABLE keys (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " owner INTEGER NOT NULL, name TEXT NOT NULL, backend TEXT NOT NULL,"
        " type INTEGER NOT NULL, usage INTEGER NOT NULL,"
        " public_key BLOB NOT NULL, blob BLOB NOT NULL,"
        " created INTEGER NOT NULL, UNIQUE(owner, name));"
        "CREATE TABLE grants (key_id INTEGER NOT NULL REFERENCES keys(id)"
        " ON DELETE CASCADE, kind INTEGER NOT NULL, grantee INTEGER NOT NULL,"
        " PRIMARY KEY(key_id, kind, grantee));"
        "CREATE INDEX grants_by_grantee ON grants(kind, grantee);"
        "INSERT INTO keys (owner, name, backend, type, usage, public_key,"
        " blob, created) VALUES (1000, 'old', 'software', 1, 1, x'3059',"
        " x'dead', 1);"
        "PRAGMA user_version = 1;";
    ASSERT_EQ(sqlite3_exec(db, v1_schema, nullptr, nullptr, nullptr),
              SQLITE_OK);
    sqlite3_close(db);
  }
  ::chmod(path_.c_str(), 0600);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const KeyRef ref{1000, "old"};
  auto old = store->Authorize(User(1000), ref, Right::kUse);
  ASSERT_TRUE(old.ok()) << old.status().ToString();
  EXPECT_EQ((*old)->blob, (std::vector<uint8_t>{0xde, 0xad}));
  EXPECT_TRUE((*old)->certificate.empty());
  ASSERT_TRUE(store->SetCertificate(ref, {0x30, 0x00}).ok());
}

TEST_F(KeyStoreTest, ConcurrentAuthorizeAndInsert) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "shared", {{Kind::kGroup, 500}});
  Insert(*store, 1000, "flapping");
  const KeyRef shared{1000, "shared"};
  const KeyRef flapping{1000, "flapping"};

  constexpr int kThreads = 8;
  constexpr int kKeysPerThread = 25;
  std::atomic<int> failures{0};
  std::atomic<bool> stop{false};
  auto check = [&](bool ok) {
    if (!ok) {
      failures.fetch_add(1);
    }
  };

  // Grants come and go on one key while the others work.
  std::thread flipper([&] {
    while (!stop.load()) {
      check(store->AddGrant(flapping, {Kind::kUser, 7}).ok());
      auto r = store->Authorize(User(7), flapping, Right::kUse);
      check(r.ok() || r.status().code() == Code::kNotFound);
      check(store->RemoveGrant(flapping, {Kind::kUser, 7}).ok());
    }
  });

  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const uint32_t uid = 2000 + static_cast<uint32_t>(t);
      const Principal me = User(uid, 500);
      for (int i = 0; i < kKeysPerThread; ++i) {
        KeyRecord r = MakeRecord(uid, "k" + std::to_string(i));
        check(store->Insert(r).ok());
        auto own = store->Authorize(me, r.ref, Right::kManage);
        check(own.ok() && (*own)->id == r.id);
        check(store->Authorize(me, shared, Right::kUse).ok());
        check(store->Authorize(me, shared, Right::kManage).status().code() ==
              Code::kPermissionDenied);
        check(store->Authorize(User(9999, 9999), r.ref, Right::kUse)
                  .status()
                  .code() == Code::kNotFound);
      }
      auto owned = store->ListOwned(uid);
      check(owned.ok() && owned->size() == kKeysPerThread);
    });
  }
  for (std::thread& th : threads) {
    th.join();
  }
  stop.store(true);
  flipper.join();

  EXPECT_EQ(failures.load(), 0);
  auto counts = store->CountByOwner();
  ASSERT_TRUE(counts.ok());
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(counts->at(2000 + static_cast<uint32_t>(t)),
              static_cast<uint32_t>(kKeysPerThread));
  }
}

// A full disk is simulated with RLIMIT_FSIZE: writes past the limit fail
// with EFBIG (SIGXFSZ ignored), which SQLite reports as SQLITE_FULL/IOERR.
TEST_F(KeyStoreTest, FullDiskGivesCleanErrorAndKeepsData) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord keep = Insert(*store, 1000, "keep", {{Kind::kUser, 33}});

  const fs::path wal = path_.string() + "-wal";
  const uintmax_t largest =
      std::max(fs::file_size(path_), fs::exists(wal) ? fs::file_size(wal) : 0);

  struct rlimit old_limit {};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limit = old_limit;
  limit.rlim_cur = static_cast<rlim_t>(largest + 8192);
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &limit), 0);

  KeyRecord big = MakeRecord(1000, "big");
  big.blob.assign(1 << 20, 0x5a);
  Status s = store->Insert(big);
  Status grant = store->AddGrant(keep.ref, {Kind::kGroup, 500});

  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  std::signal(SIGXFSZ, old_handler);

  EXPECT_EQ(s.code(), Code::kInternal);
  EXPECT_EQ(s.message().rfind("key store write failed: ", 0), 0u)
      << s.ToString();
  EXPECT_EQ(big.id, 0u);
  // Small enough that it may still fit; either way it fails cleanly.
  EXPECT_TRUE(grant.ok() || grant.code() == Code::kInternal)
      << grant.ToString();

  // The store keeps working and the old data is intact.
  auto got = store->Authorize(User(1000), keep.ref, Right::kUse);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ((*got)->blob, keep.blob);
  EXPECT_EQ(store->Authorize(User(1000), big.ref, Right::kUse).status().code(),
            Code::kNotFound);
  Insert(*store, 1000, "after");

  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto owned = store->ListOwned(1000);
  ASSERT_TRUE(owned.ok()) << owned.status().ToString();
  EXPECT_EQ(Names(*owned),
            (std::vector<std::string>{"1000/after", "1000/keep"}));
  EXPECT_EQ((*owned)[1].blob, keep.blob);
  EXPECT_TRUE(store->Authorize(User(33), keep.ref, Right::kUse).ok());
}

}  // namespace
}  // namespace keyhold::daemon

namespace keyhold::daemon {
namespace {

TEST_F(KeyStoreTest, DeleteByIdLeavesARecreatedKeyAlone) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  KeyRecord old_key = Insert(*store, 1000, "web");
  ASSERT_TRUE(store->Delete(old_key.ref).ok());
  KeyRecord new_key = Insert(*store, 1000, "web");
  // A delete that authorized the old row must not remove the new one.
  EXPECT_EQ(store->Delete(old_key.ref, old_key.id).code(), Code::kNotFound);
  EXPECT_TRUE(
      store->Authorize(User(1000), KeyRef{1000, "web"}, Right::kUse).ok());
  EXPECT_TRUE(store->Delete(new_key.ref, new_key.id).ok());
}

TEST_F(KeyStoreTest, CachedBackendNeverReadsTheDatabase) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Insert(*store, 1000, "web");
  EXPECT_FALSE(store->CachedBackend(KeyRef{1000, "web"}).has_value());
  ASSERT_TRUE(
      store->Authorize(User(1000), KeyRef{1000, "web"}, Right::kUse).ok());
  EXPECT_EQ(store->CachedBackend(KeyRef{1000, "web"}), "software");
  ASSERT_TRUE(store->Delete(KeyRef{1000, "web"}).ok());
  EXPECT_FALSE(store->CachedBackend(KeyRef{1000, "web"}).has_value());
}

}  // namespace
}  // namespace keyhold::daemon
