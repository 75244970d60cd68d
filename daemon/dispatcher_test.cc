// Dispatcher tests over the real key store and a fake backend: the table's
// permissions are enforced before any handler or backend runs.
#include "daemon/dispatcher.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>

namespace keyhold::daemon {
namespace {

class FakeBackend : public backend::Backend {
 public:
  std::string_view Name() const override { return "fake"; }
  StatusOr<backend::CreatedKey> Generate(const KeyRef&,
                                         v1::KeyType type) override {
    ++generated;
    return backend::CreatedKey{type, {0x30, 0x00}, {1, 2, 3}};
  }
  StatusOr<backend::CreatedKey> Import(const KeyRef&,
                                       const SecretBytes&) override {
    return backend::CreatedKey{v1::EC_P256, {0x30, 0x00}, {4}};
  }
  StatusOr<std::vector<uint8_t>> Sign(const backend::KeyHandle&,
                                      const backend::SignParams& params,
                                      std::span<const uint8_t>) override {
    ++signs;
    last_sign = params;
    return std::vector<uint8_t>{0xaa};
  }
  StatusOr<SecretBytes> Decrypt(const backend::KeyHandle&,
                                const backend::DecryptParams&,
                                std::span<const uint8_t>) override {
    return SecretBytes(std::vector<uint8_t>{7});
  }
  StatusOr<SecretBytes> Derive(const backend::KeyHandle&,
                               std::span<const uint8_t>) override {
    return SecretBytes(std::vector<uint8_t>{8});
  }
  Status Destroy(const backend::KeyHandle&) override {
    ++destroyed;
    return Status::Ok();
  }
  int generated = 0;
  int signs = 0;
  backend::SignParams last_sign;
  int destroyed = 0;
};

class DispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kh-dispatch-XXXXXX";
    dir_ = mkdtemp(tmpl);
    auto store = KeyStore::Open(std::filesystem::path(dir_) / "keys.db");
    ASSERT_TRUE(store.ok()) << store.status().ToString();
    store_ = std::move(*store);
    ctx_.store = store_.get();
    ctx_.backends["fake"] = &backend_;
    ctx_.default_backend = "fake";
    ctx_.clients = &clients_;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  v1::Response Run(const Principal& who, v1::Request req) {
    Dispatcher d(&ctx_);
    return d.Handle(who, req);
  }
  v1::Response Create(const Principal& who, const std::string& name) {
    v1::Request req;
    req.set_id(1);
    req.mutable_generate_key()->mutable_key()->set_name(name);
    req.mutable_generate_key()->set_type(v1::EC_P256);
    return Run(who, req);
  }
  v1::Response Sign(const Principal& who, const std::string& name,
                    std::optional<uint32_t> owner = std::nullopt) {
    v1::Request req;
    req.set_id(2);
    auto* s = req.mutable_sign();
    s->mutable_key()->set_name(name);
    if (owner) {
      s->mutable_key()->set_owner(*owner);
    }
    s->set_algorithm(v1::ECDSA);
    s->set_digest(v1::SHA256);
    s->set_data(std::string(32, 'd'));
    return Run(who, req);
  }

  std::string dir_;
  std::unique_ptr<KeyStore> store_;
  FakeBackend backend_;
  ClientRegistry clients_;
  OpContext ctx_;
  Principal alice_{1001, 1001, {}, 10, ""};
  Principal bob_{1002, 1002, {}, 11, ""};
  Principal root_{0, 0, {}, 1, ""};  // an admin: settings default to {0}
};

TEST_F(DispatcherTest, EveryOperationIsInTheTableOnce) {
  std::set<int> seen;
  for (const OpEntry& e : OpTable()) {
    EXPECT_TRUE(seen.insert(e.op).second) << e.name;
    const bool names_key = e.permission == Permission::kKeyUse ||
                           e.permission == Permission::kKeyOwner ||
                           e.permission == Permission::kOwnNamespace;
    EXPECT_EQ(names_key, e.key_of != nullptr) << e.name;
  }
  // Every oneof arm of Request (10..23) is listed.
  for (int op = 10; op <= 23; ++op) {
    EXPECT_TRUE(seen.contains(op)) << op;
  }
}

TEST_F(DispatcherTest, ResponseCarriesRequestId) {
  v1::Request req;
  req.set_id(77);
  req.mutable_ping();
  auto r = Run(alice_, req);
  EXPECT_EQ(r.id(), 77u);
  EXPECT_EQ(r.code(), v1::OK);
  EXPECT_TRUE(r.has_ping());
}

TEST_F(DispatcherTest, UnknownOperation) {
  v1::Request req;
  req.set_id(5);
  auto r = Run(alice_, req);
  EXPECT_EQ(r.code(), v1::UNSUPPORTED);
  EXPECT_EQ(r.id(), 5u);
}

TEST_F(DispatcherTest, CreateOnlyInOwnNamespace) {
  v1::Request req;
  req.mutable_generate_key()->mutable_key()->set_name("k");
  req.mutable_generate_key()->mutable_key()->set_owner(bob_.uid);
  req.mutable_generate_key()->set_type(v1::EC_P256);
  EXPECT_EQ(Run(alice_, req).code(), v1::PERMISSION_DENIED);
  EXPECT_EQ(backend_.generated, 0);
}

TEST_F(DispatcherTest, InvalidNamesNeverReachTheBackend) {
  for (const char* bad : {"", "a/b", "x y", "../etc"}) {
    EXPECT_EQ(Create(alice_, bad).code(), v1::INVALID_ARGUMENT) << bad;
  }
  EXPECT_EQ(backend_.generated, 0);
}

TEST_F(DispatcherTest, DuplicateNameIsAlreadyExists) {
  EXPECT_EQ(Create(alice_, "k").code(), v1::OK);
  EXPECT_EQ(Create(alice_, "k").code(), v1::ALREADY_EXISTS);
  EXPECT_EQ(backend_.generated, 1);
  EXPECT_EQ(Create(bob_, "k").code(), v1::OK);  // other namespace
}

TEST_F(DispatcherTest, OtherUsersKeyLooksMissing) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);
  auto hidden = Sign(bob_, "k", alice_.uid);
  auto missing = Sign(bob_, "nope", alice_.uid);
  EXPECT_EQ(hidden.code(), v1::NOT_FOUND);
  EXPECT_EQ(hidden.code(), missing.code());
  EXPECT_EQ(hidden.message(), missing.message());
  EXPECT_EQ(backend_.signs, 0);
  // Bob's own namespace has no "k" either.
  EXPECT_EQ(Sign(bob_, "k").code(), v1::NOT_FOUND);
}

TEST_F(DispatcherTest, GrantAllowsUseButNotManagement) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);
  v1::Request grant;
  grant.mutable_grant_use()->mutable_key()->set_name("k");
  grant.mutable_grant_use()->mutable_grantee()->set_kind(v1::Grant::USER);
  grant.mutable_grant_use()->mutable_grantee()->set_id(bob_.uid);
  // Bob cannot grant himself Alice's key.
  v1::Request self_grant = grant;
  self_grant.mutable_grant_use()->mutable_key()->set_owner(alice_.uid);
  EXPECT_EQ(Run(bob_, self_grant).code(), v1::NOT_FOUND);
  ASSERT_EQ(Run(alice_, grant).code(), v1::OK);
  EXPECT_EQ(Sign(bob_, "k", alice_.uid).code(), v1::OK);
  v1::Request del;
  del.mutable_destroy_key()->mutable_key()->set_name("k");
  del.mutable_destroy_key()->mutable_key()->set_owner(alice_.uid);
  EXPECT_EQ(Run(bob_, del).code(), v1::PERMISSION_DENIED);
  EXPECT_EQ(Run(bob_, self_grant).code(), v1::PERMISSION_DENIED);
  EXPECT_EQ(backend_.destroyed, 0);
}

TEST_F(DispatcherTest, WrongKeyTypeForOperation) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);  // ec-p256
  v1::Request req;
  auto* s = req.mutable_sign();
  s->mutable_key()->set_name("k");
  s->set_algorithm(v1::RSA_PSS);
  s->set_digest(v1::SHA256);
  s->set_data(std::string(32, 'd'));
  EXPECT_EQ(Run(alice_, req).code(), v1::INVALID_ARGUMENT);
  v1::Request dec;
  dec.mutable_decrypt()->mutable_key()->set_name("k");
  dec.mutable_decrypt()->set_algorithm(v1::RSA_OAEP);
  dec.mutable_decrypt()->set_ciphertext("c");
  EXPECT_EQ(Run(alice_, dec).code(), v1::INVALID_ARGUMENT);
  // A digest of the wrong length.
  s->set_algorithm(v1::ECDSA);
  s->set_data(std::string(31, 'd'));
  EXPECT_EQ(Run(alice_, req).code(), v1::INVALID_ARGUMENT);
  EXPECT_EQ(backend_.signs, 0);
}

TEST_F(DispatcherTest, UnsetPssSaltMeansDigestLength) {
  v1::Request req;
  req.mutable_generate_key()->mutable_key()->set_name("r");
  req.mutable_generate_key()->set_type(v1::RSA_2048);
  ASSERT_EQ(Run(alice_, req).code(), v1::OK);
  v1::Request sign;
  auto* s = sign.mutable_sign();
  s->mutable_key()->set_name("r");
  s->set_algorithm(v1::RSA_PSS);
  s->set_digest(v1::SHA256);
  s->set_data(std::string(32, 'd'));
  ASSERT_EQ(Run(alice_, sign).code(), v1::OK);
  EXPECT_EQ(backend_.last_sign.pss_salt_length, -1);
  s->set_pss_salt_length(0);  // explicitly empty salt is honoured
  ASSERT_EQ(Run(alice_, sign).code(), v1::OK);
  EXPECT_EQ(backend_.last_sign.pss_salt_length, 0);
}

TEST_F(DispatcherTest, OnlyCachedKeysOfNonBlockingBackendsRunInline) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);
  Dispatcher d(&ctx_);
  v1::Request sign;
  auto* s = sign.mutable_sign();
  s->mutable_key()->set_name("k");
  s->set_algorithm(v1::ECDSA);
  s->set_digest(v1::SHA256);
  s->set_data(std::string(32, 'd'));
  bool device_key_use = true;
  // Not yet in the cache: a database read, so the blocking pool.
  EXPECT_FALSE(d.TryHandleInline(alice_, sign, &device_key_use).has_value());
  EXPECT_FALSE(device_key_use);
  ASSERT_EQ(d.Handle(alice_, sign).code(), v1::OK);  // now cached
  // The fake backend keeps the default MayBlock() == true: a device key use,
  // which the I/O thread may run itself when it can spare the thread.
  EXPECT_FALSE(d.TryHandleInline(alice_, sign, &device_key_use).has_value());
  EXPECT_TRUE(device_key_use);
  // With inline_crypto off every key use goes to the pool.
  RuntimeSettings off = *ctx_.settings.Get();
  off.inline_crypto = false;
  ctx_.settings.Set(off);
  EXPECT_FALSE(d.TryHandleInline(alice_, sign, &device_key_use).has_value());
  EXPECT_FALSE(device_key_use);
  off.inline_crypto = true;
  ctx_.settings.Set(off);
  // Unknown names never reach the database from an I/O thread.
  s->mutable_key()->set_name("nope");
  EXPECT_FALSE(d.TryHandleInline(alice_, sign, &device_key_use).has_value());
  EXPECT_FALSE(device_key_use);
  // Invalid names are just errors, answered inline.
  s->mutable_key()->set_name("a/b");
  auto r = d.TryHandleInline(alice_, sign);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->code(), v1::INVALID_ARGUMENT);
  v1::Request ping;
  ping.mutable_ping();
  EXPECT_TRUE(d.TryHandleInline(alice_, ping).has_value());
  v1::Request gen;
  gen.mutable_generate_key()->mutable_key()->set_name("g");
  EXPECT_FALSE(d.TryHandleInline(alice_, gen, &device_key_use).has_value());
  EXPECT_FALSE(device_key_use);  // generation is never run on an I/O thread
}

TEST_F(DispatcherTest, AdminOperationsNeedAdmin) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);
  v1::Request list;
  list.mutable_list_clients();
  EXPECT_EQ(Run(alice_, list).code(), v1::PERMISSION_DENIED);
  v1::Request del;
  del.mutable_delete_client()->set_uid(alice_.uid);
  EXPECT_EQ(Run(bob_, del).code(), v1::PERMISSION_DENIED);
  EXPECT_EQ(Sign(alice_, "k").code(), v1::OK);

  auto listed = Run(root_, list);
  ASSERT_EQ(listed.code(), v1::OK);
  ASSERT_EQ(listed.list_clients().clients_size(), 1);
  EXPECT_EQ(listed.list_clients().clients(0).uid(), alice_.uid);
  EXPECT_EQ(listed.list_clients().clients(0).key_count(), 1u);

  auto deleted = Run(root_, del);
  ASSERT_EQ(deleted.code(), v1::OK);
  EXPECT_EQ(deleted.delete_client().keys_deleted(), 1u);
  EXPECT_EQ(backend_.destroyed, 1);
  EXPECT_EQ(Sign(alice_, "k").code(), v1::NOT_FOUND);
}

TEST_F(DispatcherTest, ReloadedAdminListAppliesToTheNextRequest) {
  v1::Request list;
  list.mutable_list_clients();
  ASSERT_EQ(Run(root_, list).code(), v1::OK);
  ASSERT_EQ(Run(alice_, list).code(), v1::PERMISSION_DENIED);

  RuntimeSettings next;
  next.admin_uids = {alice_.uid};
  ctx_.settings.Set(next);  // what SIGHUP does
  EXPECT_EQ(Run(root_, list).code(), v1::PERMISSION_DENIED);
  EXPECT_EQ(Run(alice_, list).code(), v1::OK);
}

TEST_F(DispatcherTest, AdminCannotUseOthersKeys) {
  ASSERT_EQ(Create(alice_, "k").code(), v1::OK);
  EXPECT_EQ(Sign(root_, "k", alice_.uid).code(), v1::NOT_FOUND);
}

TEST_F(DispatcherTest, ListShowsOwnAndShared) {
  ASSERT_EQ(Create(alice_, "a1").code(), v1::OK);
  ASSERT_EQ(Create(bob_, "b1").code(), v1::OK);
  v1::Request grant;
  grant.mutable_grant_use()->mutable_key()->set_name("a1");
  grant.mutable_grant_use()->mutable_grantee()->set_kind(v1::Grant::GROUP);
  grant.mutable_grant_use()->mutable_grantee()->set_id(5000);
  ASSERT_EQ(Run(alice_, grant).code(), v1::OK);
  Principal bob_in_group = bob_;
  bob_in_group.groups = {5000};
  v1::Request list;
  list.mutable_list_keys()->set_include_shared(true);
  auto r = Run(bob_in_group, list);
  ASSERT_EQ(r.code(), v1::OK);
  ASSERT_EQ(r.list_keys().keys_size(), 2);
  EXPECT_EQ(r.list_keys().keys(0).name(), "b1");
  EXPECT_EQ(r.list_keys().keys(1).name(), "a1");
  EXPECT_EQ(r.list_keys().keys(1).grants_size(), 0);  // not the owner
  // Without the group, Bob sees only his own.
  r = Run(bob_, list);
  EXPECT_EQ(r.list_keys().keys_size(), 1);
}

}  // namespace
}  // namespace keyhold::daemon
