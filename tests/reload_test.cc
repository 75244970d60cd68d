// SIGHUP while clients are signing: the new limits and admins apply, open
// connections and requests in flight survive, and a bad file changes
// nothing. Also `admin stats` through a real daemon.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>
#include <vector>

#include "tests/harness/daemon_process.h"

namespace keyhold::testing {
namespace {

constexpr uid_t kOtherUid = 65534;  // nobody

v1::SignRequest SignRequestFor(const std::string& name) {
  v1::SignRequest req;
  *req.mutable_key() = client::MakeKeyRef(name);
  req.set_algorithm(v1::ECDSA);
  req.set_digest(v1::SHA256);
  req.set_data(std::string(32, '\x5a'));
  return req;
}

TEST(ReloadTest, SighupUnderLoadAppliesGoodFilesAndKeepsConnections) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to act as a second uid";
  }
  // Uses are not audited here, so the reload records are easy to find.
  const std::string base = "audit_key_use = false\n";
  DaemonProcess daemon(base);
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client owner(daemon.ClientOptions());
  ASSERT_TRUE(owner.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());

  // Load: four threads signing over the client's pooled connections for
  // the whole test. Not one request may fail.
  std::atomic<bool> stop{false};
  std::atomic<int> signed_ok{0};
  std::atomic<int> failed{0};
  std::vector<std::thread> load;
  load.reserve(4);
  for (int t = 0; t < 4; ++t) {
    load.emplace_back([&] {
      const v1::SignRequest req = SignRequestFor("k");
      while (!stop.load()) {
        (owner.Sign(req).ok() ? signed_ok : failed)++;
      }
    });
  }
  // And one connection opened before the reload, used after it.
  RawConnection before(daemon.socket_path());
  ASSERT_TRUE(before.ok());
  v1::Request ping;
  ping.set_id(7);
  ping.mutable_ping();
  ASSERT_TRUE(before.Send(Frame(ping)));
  v1::Response pong;
  ASSERT_TRUE(before.ReadResponse(&pong));

  const auto stats_as_other = [&daemon] {
    return RunAsUid(kOtherUid, [&daemon] {
      client::Client c(daemon.ClientOptions());
      auto r = c.Stats();
      if (r.ok()) {
        return 'y';
      }
      return r.status().code() == Code::kPermissionDenied ? 'n' : 'e';
    });
  };
  EXPECT_EQ(stats_as_other(), 'n') << "nobody is not an admin yet";

  // A good file: nobody becomes an admin, the frame limit changes.
  std::string line = daemon.Reload(
      base + "admins = [0, 65534]\n[limits]\nmax_frame_bytes = 200000\n");
  EXPECT_NE(line.find("reloaded"), std::string::npos) << daemon.log();
  EXPECT_EQ(stats_as_other(), 'y') << "the new admin list applies";
  auto hello = client::Client(daemon.ClientOptions()).Hello();
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(hello->max_frame_bytes(), 200000u);
  ping.set_id(8);
  ASSERT_TRUE(before.Send(Frame(ping)));
  ASSERT_TRUE(before.ReadResponse(&pong)) << "the open connection survived";
  EXPECT_EQ(pong.id(), 8u);
  EXPECT_EQ(pong.code(), v1::OK);

  // A bad file: rejected, everything stays as the good one set it.
  line = daemon.Reload(base +
                       "admins = [0]\n[limits]\nmax_frame_bytes = \"many\"\n");
  EXPECT_NE(line.find("reload rejected"), std::string::npos) << daemon.log();
  EXPECT_NE(line.find("max_frame_bytes"), std::string::npos) << line;
  EXPECT_EQ(stats_as_other(), 'y') << "a rejected file changed the admins";
  hello = client::Client(daemon.ClientOptions()).Hello();
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(hello->max_frame_bytes(), 200000u);

  // Unknown settings are a bad file too; restart-only ones are kept.
  line = daemon.Reload(base + "admins = [0, 65534]\nfrobnicate = true\n");
  EXPECT_NE(line.find("reload rejected"), std::string::npos) << line;
  line = daemon.Reload(base + "admins = [0]\nworker_threads = 7\n");
  EXPECT_NE(line.find("reloaded"), std::string::npos) << line;
  EXPECT_NE(daemon.log().find("'worker_threads' changed"), std::string::npos);
  EXPECT_EQ(stats_as_other(), 'n') << "admin removed again";

  // Keep the load running across all of that for a little longer.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  stop = true;
  for (auto& t : load) {
    t.join();
  }
  EXPECT_GT(signed_ok.load(), 0);
  EXPECT_EQ(failed.load(), 0) << "a reload broke requests in flight";
  ping.set_id(9);
  ASSERT_TRUE(before.Send(Frame(ping)));
  ASSERT_TRUE(before.ReadResponse(&pong));
  EXPECT_EQ(pong.code(), v1::OK);

  // Every reload is in the audit log with its result.
  v1::AuditRequest audit;
  audit.set_limit(1000);
  auto records = owner.Audit(audit);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  int reloads_ok = 0;
  int reloads_rejected = 0;
  for (const std::string& r : records->records()) {
    if (r.find("\"reload-config\"") == std::string::npos) {
      continue;
    }
    (r.find("\"ok\"") != std::string::npos ? reloads_ok : reloads_rejected)++;
  }
  EXPECT_EQ(reloads_ok, 2);
  EXPECT_EQ(reloads_rejected, 2);

  // Stats count what the load did.
  auto stats = owner.Stats();
  ASSERT_TRUE(stats.ok()) << stats.status().ToString();
  bool found = false;
  for (const v1::OpStats& s : stats->ops()) {
    if (s.op() == "sign") {
      found = true;
      EXPECT_GE(s.count(), static_cast<uint64_t>(signed_ok.load()));
      EXPECT_EQ(s.errors(), 0u);
      EXPECT_LE(s.p50_us(), s.p90_us());
      EXPECT_LE(s.p90_us(), s.p99_us());
      EXPECT_LE(s.p99_us(), s.max_us());
    }
  }
  EXPECT_TRUE(found);
  EXPECT_GE(stats->connections(), 1u);
}

TEST(ReloadTest, AnInvalidLogLevelIsRejectedAndTheDaemonServesOn) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  const std::string line = daemon.Reload("log_level = \"bogus\"\n");
  EXPECT_NE(line.find("reload rejected"), std::string::npos) << daemon.log();
  EXPECT_TRUE(client::Client(daemon.ClientOptions()).Ping().ok());
}

}  // namespace
}  // namespace keyhold::testing

namespace keyhold::testing {
namespace {

// audit_key_use_per_minute: uses become one counted record per key and
// minute; a clean stop writes what is pending.
TEST(AuditAggregateTest, UsesAreCountedNotRecordedOneByOne) {
  DaemonProcess daemon("audit_key_use_per_minute = true\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  {
    client::Client c(daemon.ClientOptions());
    ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("agg"), v1::EC_P256).ok());
    const v1::SignRequest req = SignRequestFor("agg");
    for (int i = 0; i < 25; ++i) {
      ASSERT_TRUE(c.Sign(req).ok());
    }
  }
  ASSERT_EQ(daemon.Stop(), 0);
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  v1::AuditRequest audit;
  audit.set_key(std::to_string(geteuid()) + "/agg");
  auto records = c.Audit(audit);
  ASSERT_TRUE(records.ok()) << records.status().ToString();
  uint64_t counted = 0;
  int sign_records = 0;
  for (const std::string& r : records->records()) {
    if (r.find("\"op\":\"sign\"") == std::string::npos) {
      continue;
    }
    ++sign_records;
    const auto pos = r.find("\"count\":");
    ASSERT_NE(pos, std::string::npos) << r;
    counted += std::stoull(r.substr(pos + 8));
  }
  EXPECT_EQ(counted, 25u);
  EXPECT_LE(sign_records, 2) << "one record per minute, not per use";
  v1::AuditRequest verify;
  verify.set_verify(true);
  auto check = c.Audit(verify);
  ASSERT_TRUE(check.ok());
  EXPECT_TRUE(check->intact()) << check->problem();
}

// audit_rotate_mb and audit_keep_files through a real daemon: with rotation
// off the log grows past 1 MiB in one file; a reload that turns it on
// rotates at its own record; the next MiB rotates again and, with one file
// kept, deletes the oldest. Verify checks the chain across the files.
TEST(AuditRotationTest, ReloadTurnsRotationOnAndVerifySpansTheFiles) {
  DaemonProcess daemon("audit_rotate_mb = 0\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("rot"), v1::EC_P256).ok());
  const v1::SignRequest req = SignRequestFor("rot");
  const std::filesystem::path log = daemon.state_dir() + "/audit.log";
  const std::filesystem::path one = daemon.state_dir() + "/audit.log.1";
  const auto fill = [&](uintmax_t bytes) {
    for (int i = 0; i < 20000 && std::filesystem::file_size(log) < bytes; ++i) {
      ASSERT_TRUE(c.Sign(req).ok());
    }
  };
  fill((1 << 20) + 4096);
  EXPECT_FALSE(std::filesystem::exists(one));

  const std::string line =
      daemon.Reload("audit_rotate_mb = 1\naudit_keep_files = 1\n");
  EXPECT_NE(line.find("reloaded"), std::string::npos) << line;
  // The reload's audit record follows its log line.
  for (int i = 0; i < 500 && !std::filesystem::exists(one); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(std::filesystem::exists(one));
  ASSERT_TRUE(c.Sign(req).ok());  // waits for the rotation to finish
  EXPECT_GT(std::filesystem::file_size(one), uintmax_t{1} << 20);
  EXPECT_LT(std::filesystem::file_size(log), 4096u);
  v1::AuditRequest verify;
  verify.set_verify(true);
  auto check = c.Audit(verify);
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  EXPECT_TRUE(check->intact()) << check->problem();
  EXPECT_EQ(check->files(), 2u);
  EXPECT_EQ(check->first(), 1u);
  const uint64_t all = check->checked();

  // Sign until the log rotates again (audit.log shrinks).
  uintmax_t size = std::filesystem::file_size(log);
  for (int i = 0; i < 20000; ++i) {
    ASSERT_TRUE(c.Sign(req).ok());
    const uintmax_t now = std::filesystem::file_size(log);
    if (now < size) {
      break;
    }
    size = now;
  }
  EXPECT_LT(std::filesystem::file_size(log), 4096u);
  EXPECT_FALSE(std::filesystem::exists(daemon.state_dir() + "/audit.log.2"));
  check = c.Audit(verify);
  ASSERT_TRUE(check.ok()) << check.status().ToString();
  EXPECT_TRUE(check->intact()) << check->problem();
  EXPECT_EQ(check->files(), 2u);
  // The first file went: the oldest kept starts at the reload's rotation.
  EXPECT_GT(check->first(), 1u);
  EXPECT_LE(check->first(), all);
  v1::AuditRequest last;
  last.set_limit(3);
  auto records = c.Audit(last);
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->records_size(), 3);
  // The newest: the signature that rotated, the rotation, the verify.
  EXPECT_NE(records->records(1).find("\"op\":\"audit-log-rotated\""),
            std::string::npos)
      << records->records(1);
}

}  // namespace
}  // namespace keyhold::testing
