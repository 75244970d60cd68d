#include "daemon/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

namespace keyhold::daemon {
namespace {

TEST(ConfigTest, EmptyFileGivesDefaults) {
  auto c = ParseConfig("", "test");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->socket_path, "/run/keyhold/keyhold.sock");
  EXPECT_EQ(c->state_dir, "/var/lib/keyhold");
  EXPECT_EQ(c->admin_uids, std::vector<uint32_t>{0});
  EXPECT_EQ(c->limits.max_frame_bytes, 65536u);
}

TEST(ConfigTest, ReadsEverySetting) {
  auto c = ParseConfig(R"(
socket = "/tmp/k.sock"
state_dir = "/tmp/state"
admins = [0, 1000]
log_level = "debug"
default_backend = "software"
worker_threads = 3
cpu_local_sessions = false
[limits]
max_frame_bytes = 4096
max_in_flight_per_connection = 4
max_connections = 10
idle_timeout_seconds = 0
io_timeout_seconds = 2
)",
                       "test");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->socket_path, "/tmp/k.sock");
  EXPECT_EQ(c->admin_uids, (std::vector<uint32_t>{0, 1000}));
  EXPECT_EQ(c->worker_threads, 3u);
  EXPECT_FALSE(c->cpu_local_sessions);
  EXPECT_TRUE(Config().cpu_local_sessions);
  EXPECT_EQ(c->limits.max_frame_bytes, 4096u);
  EXPECT_EQ(c->limits.max_in_flight_per_connection, 4u);
  EXPECT_EQ(c->limits.idle_timeout_seconds, 0u);
}

TEST(ConfigTest, RejectsTyposAndBadValues) {
  EXPECT_FALSE(ParseConfig("sokcet = \"/x\"", "t").ok());
  EXPECT_FALSE(ParseConfig("[limits]\nmax_frame = 1", "t").ok());
  EXPECT_FALSE(ParseConfig("[limits]\nmax_frame_bytes = 10", "t").ok());
  EXPECT_FALSE(ParseConfig("admins = [\"root\"]", "t").ok());
  EXPECT_FALSE(ParseConfig("admins = 0", "t").ok());
  EXPECT_FALSE(ParseConfig("log_level = \"loud\"", "t").ok());
  EXPECT_FALSE(ParseConfig("socket = \"\"", "t").ok());
  EXPECT_FALSE(ParseConfig("worker_threads = -1", "t").ok());
  EXPECT_FALSE(ParseConfig("inline_crypto = 1", "t").ok());
  auto off = ParseConfig("inline_crypto = false", "t");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->inline_crypto);
  auto bad = ParseConfig("socket = ", "file.toml");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("file.toml:1"), std::string::npos);
}

TEST(ConfigTest, BackendSectionsKeepTheirSettingsForTheirBackend) {
  auto c = ParseConfig(R"(
default_backend = "hsm1"
[[backend.pkcs11]]
name = "hsm1"
module = "/usr/lib/softhsm/libsofthsm2.so"
sessions = 4
[[backend.tpm]]
name = "tpm"
[[backend.pkcs11]]
name = "hsm2"
)",
                       "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  ASSERT_EQ(c->backends.size(), 3u);
  EXPECT_EQ(c->backends[0].kind, "pkcs11");
  EXPECT_EQ(c->backends[0].name, "hsm1");
  EXPECT_EQ(c->backends[1].name, "hsm2");
  EXPECT_EQ(c->backends[2].kind, "tpm");
  EXPECT_EQ(c->default_backend, "hsm1");
  // The settings text parses back to the same table.
  auto again =
      ParseConfig("[[backend.pkcs11]]\n" + c->backends[0].settings, "again");
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_NE(c->backends[0].settings.find("libsofthsm2.so"), std::string::npos);
  EXPECT_NE(c->backends[0].settings.find("sessions = 4"), std::string::npos);

  EXPECT_FALSE(ParseConfig("[[backend.hsm]]\nname = \"x\"", "t").ok());
  EXPECT_FALSE(ParseConfig("[backend.pkcs11]\nname = \"x\"", "t").ok());
  EXPECT_FALSE(ParseConfig("[[backend.pkcs11]]\nmodule = \"/m.so\"", "t").ok());
  EXPECT_FALSE(
      ParseConfig("[[backend.pkcs11]]\nname = \"software\"", "t").ok());
  EXPECT_FALSE(ParseConfig("[[backend.pkcs11]]\nname = \"a\"\n"
                           "[[backend.tpm]]\nname = \"a\"",
                           "t")
                   .ok());
  EXPECT_FALSE(ParseConfig("backend = 1", "t").ok());
}

TEST(ConfigTest, AuditKeyUsePerMinute) {
  auto c = ParseConfig("audit_key_use_per_minute = true", "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_TRUE(c->audit_key_use_per_minute);
  EXPECT_FALSE(Config().audit_key_use_per_minute);
  EXPECT_FALSE(ParseConfig("audit_key_use_per_minute = 1", "t").ok());
}

TEST(ConfigTest, AuditRotation) {
  const Config d;
  EXPECT_EQ(d.audit_rotate_mb, 64u);
  EXPECT_EQ(d.audit_keep_files, 16u);
  auto c = ParseConfig("audit_rotate_mb = 0\naudit_keep_files = 3", "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->audit_rotate_mb, 0u);
  EXPECT_EQ(c->audit_keep_files, 3u);
  EXPECT_FALSE(ParseConfig("audit_keep_files = 0", "t").ok());
  EXPECT_FALSE(ParseConfig("audit_rotate_mb = -1", "t").ok());
  EXPECT_FALSE(ParseConfig("audit_rotate_mb = \"64M\"", "t").ok());
}

TEST(ConfigTest, MasterKeySealedByNamesATpmBackend) {
  auto c = ParseConfig(
      "master_key_sealed_by = \"tpm\"\n[[backend.tpm]]\nname = \"tpm\"\n", "t");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->master_key_sealed_by, "tpm");
  EXPECT_TRUE(Config().master_key_sealed_by.empty());
  // Only a configured TPM can seal it: not an HSM, not a missing name.
  auto bad = ParseConfig(
      "master_key_sealed_by = \"hsm\"\n[[backend.pkcs11]]\nname = \"hsm\"\n",
      "t");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("not a [[backend.tpm]] table"),
            std::string::npos)
      << bad.status().ToString();
  EXPECT_FALSE(ParseConfig("master_key_sealed_by = \"tpm\"", "t").ok());
  EXPECT_FALSE(ParseConfig("master_key_sealed_by = 1", "t").ok());
}

TEST(ConfigTest, MissingFile) {
  EXPECT_FALSE(LoadConfigFile("/nonexistent/keyholdd.toml").ok());
}

// A config others could edit could make them admins: refused, saying why.
TEST(ConfigTest, UnsafeFileOwnershipOrModeIsRefused) {
  char tmpl[] = "/tmp/kh-config-XXXXXX";
  const int fd = mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  close(fd);
  const std::string path = tmpl;
  { std::ofstream(path) << "log_level = \"info\"\n"; }
  ASSERT_EQ(chmod(path.c_str(), 0644), 0);
  EXPECT_TRUE(LoadConfigFile(path).ok());
  for (mode_t mode : {0664u, 0646u, 0666u}) {
    ASSERT_EQ(chmod(path.c_str(), mode), 0);
    auto c = LoadConfigFile(path);
    ASSERT_FALSE(c.ok()) << std::oct << mode;
    EXPECT_NE(c.status().message().find("chmod go-w"), std::string::npos)
        << c.status().message();
  }
  ASSERT_EQ(chmod(path.c_str(), 0600), 0);
  if (geteuid() == 0) {
    ASSERT_EQ(chown(path.c_str(), 65534, 65534), 0);
    auto c = LoadConfigFile(path);
    ASSERT_FALSE(c.ok());
    EXPECT_NE(c.status().message().find("owned by uid 65534"),
              std::string::npos)
        << c.status().message();
  }
  EXPECT_FALSE(LoadConfigFile("/tmp").ok());  // not a regular file
  unlink(path.c_str());
}

}  // namespace
}  // namespace keyhold::daemon

namespace keyhold::daemon {
namespace {

// The shipped example documents the defaults; it must parse and agree.
TEST(ConfigTest, ShippedExampleMatchesDefaults) {
  auto c = LoadConfigFile(KH_SOURCE_DIR "/conf/keyholdd.toml.example");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  const Config d;
  EXPECT_EQ(c->socket_path, d.socket_path);
  EXPECT_EQ(c->state_dir, d.state_dir);
  EXPECT_EQ(c->admin_uids, d.admin_uids);
  EXPECT_EQ(c->log_level, d.log_level);
  EXPECT_EQ(c->worker_threads, d.worker_threads);
  EXPECT_EQ(c->blocking_threads, d.blocking_threads);
  EXPECT_EQ(c->inline_crypto, d.inline_crypto);
  EXPECT_EQ(c->audit_key_use, d.audit_key_use);
  EXPECT_EQ(c->audit_key_use_per_minute, d.audit_key_use_per_minute);
  EXPECT_EQ(c->audit_rotate_mb, d.audit_rotate_mb);
  EXPECT_EQ(c->audit_keep_files, d.audit_keep_files);
  EXPECT_EQ(c->master_key_sealed_by, d.master_key_sealed_by);
  EXPECT_EQ(c->cpu_local_sessions, d.cpu_local_sessions);
  EXPECT_EQ(c->limits.max_frame_bytes, d.limits.max_frame_bytes);
  EXPECT_EQ(c->limits.max_in_flight_per_connection,
            d.limits.max_in_flight_per_connection);
  EXPECT_EQ(c->limits.max_connections, d.limits.max_connections);
  EXPECT_EQ(c->limits.max_connections_per_uid,
            d.limits.max_connections_per_uid);
  EXPECT_EQ(c->limits.max_in_flight_per_uid, d.limits.max_in_flight_per_uid);
  EXPECT_EQ(c->limits.idle_timeout_seconds, d.limits.idle_timeout_seconds);
  EXPECT_EQ(c->limits.io_timeout_seconds, d.limits.io_timeout_seconds);
}

}  // namespace
}  // namespace keyhold::daemon
