#include "daemon/audit_log.h"

#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/key_types.h"

namespace keyhold::daemon {
namespace {

namespace fs = std::filesystem;

class AuditLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/keyhold-audit-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<AuditLog> Open() {
    auto log = AuditLog::Open(dir_);
    EXPECT_TRUE(log.ok()) << log.status().ToString();
    return log.ok() ? std::move(*log) : nullptr;
  }
  static AuditEvent Event(uint32_t uid, std::string op, std::string key) {
    AuditEvent e;
    e.uid = uid;
    e.pid = 42;
    e.exe = "/usr/bin/\"odd\" name";
    e.op = std::move(op);
    e.key = std::move(key);
    e.result = "ok";
    return e;
  }
  std::vector<std::string> Lines(const std::string& name = "audit.log") {
    std::ifstream in(dir_ / name);
    std::vector<std::string> out;
    std::string line;
    while (std::getline(in, line)) {
      out.push_back(line);
    }
    return out;
  }
  void Write(const std::vector<std::string>& lines,
             const std::string& name = "audit.log") {
    std::ofstream out(dir_ / name, std::ios::trunc);
    for (const auto& l : lines) {
      out << l << "\n";
    }
  }
  // Appends five records: uid 1000 creates, signs twice, deletes; root
  // lists clients.
  void Fill(AuditLog& log) {
    ASSERT_TRUE(log.Append(Event(1000, "generate-key", "1000/web")).ok());
    ASSERT_TRUE(log.Append(Event(1000, "sign", "1000/web")).ok());
    ASSERT_TRUE(log.Append(Event(1000, "sign", "1000/web")).ok());
    ASSERT_TRUE(log.Append(Event(0, "list-clients", "")).ok());
    ASSERT_TRUE(log.Append(Event(1000, "destroy-key", "1000/web")).ok());
  }
  // Appends n signatures by uid 1000 with key 1000/web.
  static void Signs(AuditLog& log, int n) {
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(log.Append(Event(1000, "sign", "1000/web")).ok());
    }
  }
  // Verify() runs and says intact; the check, for further expectations.
  static AuditCheck Intact(AuditLog& log) {
    auto check = log.Verify();
    if (!check.ok()) {
      ADD_FAILURE() << check.status().ToString();
      return {};
    }
    EXPECT_TRUE(check->intact) << check->problem;
    return *check;
  }
  std::string Problem(AuditLog& log) {
    auto check = log.Verify();
    EXPECT_TRUE(check.ok());
    EXPECT_FALSE(check->intact);
    return check->problem;
  }

  fs::path dir_;
};

TEST_F(AuditLogTest, RecordsChainAndVerify) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto check = Intact(*log);
  EXPECT_EQ(check.records, 5u);
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_EQ(AuditField(lines[0], "seq"), "1");
  EXPECT_EQ(AuditField(lines[1], "op"), "sign");
  EXPECT_EQ(AuditField(lines[1], "exe"), "/usr/bin/\"odd\" name");
  EXPECT_EQ(AuditField(lines[1], "prev"), AuditField(lines[0], "mac"));
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "audit.log").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(stat((dir_ / "audit.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);

  // Filters: by key, by uid, newest `limit`.
  auto by_key = log->Read(std::string("1000/web"), std::nullopt, 100);
  ASSERT_TRUE(by_key.ok());
  EXPECT_EQ(by_key->size(), 4u);
  auto by_uid = log->Read(std::nullopt, 0u, 100);
  ASSERT_TRUE(by_uid.ok());
  ASSERT_EQ(by_uid->size(), 1u);
  EXPECT_EQ(AuditField(by_uid->front(), "op"), "list-clients");
  auto last2 = log->Read(std::nullopt, std::nullopt, 2);
  ASSERT_TRUE(last2.ok());
  ASSERT_EQ(last2->size(), 2u);
  EXPECT_EQ(AuditField(last2->back(), "op"), "destroy-key");

  // A restarted daemon continues the chain.
  log.reset();
  log = Open();
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event(7, "grant-use", "1000/web")).ok());
  check = Intact(*log);
  EXPECT_EQ(check.records, 6u);
}

// The MAC is HMAC-SHA256 over the line up to ",\"mac\":\"" under the
// 32-byte key file, checked here independently of AuditLog; and the line
// keeps its field order and formats.
TEST_F(AuditLogTest, MacIsHmacSha256OfTheLineUnderTheKeyFile) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  AuditEvent e = Event(1000, "sign", "1000/web");
  e.pid = -7;
  e.detail = std::string("ctl\x01\x1f\x7f");
  ASSERT_TRUE(log->Append(e).ok());
  Fill(*log);
  std::ifstream key_in(dir_ / "audit.key", std::ios::binary);
  std::string key((std::istreambuf_iterator<char>(key_in)),
                  std::istreambuf_iterator<char>());
  ASSERT_EQ(key.size(), 32u);
  const auto lines = Lines();
  ASSERT_EQ(lines.size(), 6u);
  for (const std::string& line : lines) {
    const std::size_t mark = line.rfind(",\"mac\":\"");
    ASSERT_NE(mark, std::string::npos) << line;
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    ASSERT_NE(HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
                   reinterpret_cast<const unsigned char*>(line.data()), mark,
                   mac, &len),
              nullptr);
    EXPECT_EQ(AuditField(line, "mac"),
              HexEncode(std::span<const uint8_t>(mac, len)));
  }
  EXPECT_TRUE(std::regex_match(
      lines[0],
      std::regex("\\{\"seq\":1,\"time\":\"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:"
                 "[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z\",\"uid\":1000,\"pid\":-7,"
                 "\"exe\":\"/usr/bin/\\\\\"odd\\\\\" name\",\"op\":\"sign\","
                 "\"key\":\"1000/web\",\"result\":\"ok\",\"detail\":\"ctl"
                 "\\\\u0001\\\\u001f\\\\u007f\",\"prev\":\"0{64}\","
                 "\"mac\":\"[0-9a-f]{64}\"\\}")))
      << lines[0];
  EXPECT_EQ(AuditField(lines[1], "pid"), "42");
}

// Aggregated key uses: one record per group with the number of uses, in the
// same chain; written by FlushUses, by the flusher thread and at shutdown.
TEST_F(AuditLogTest, CountedUsesBecomeOneRecordPerGroup) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event(1000, "generate-key", "1000/web")).ok());
  for (int i = 0; i < 5; ++i) {
    log->CountUse(Event(1000, "sign", "1000/web"));
  }
  AuditEvent failed = Event(1000, "sign", "1000/web");
  failed.result = "PERMISSION_DENIED";
  log->CountUse(failed);
  log->CountUse(Event(33, "decrypt", "1000/web"));
  ASSERT_TRUE(log->FlushUses().ok());
  ASSERT_TRUE(log->FlushUses().ok());  // nothing new: no record
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 4u);
  std::map<std::string, std::string> counts;
  for (std::size_t i = 1; i < lines.size(); ++i) {
    EXPECT_FALSE(AuditField(lines[i], "since").empty());
    counts[AuditField(lines[i], "uid") + " " + AuditField(lines[i], "op") +
           " " + AuditField(lines[i], "result")] =
        AuditField(lines[i], "count");
  }
  EXPECT_EQ(counts["1000 sign ok"], "5");
  EXPECT_EQ(counts["1000 sign PERMISSION_DENIED"], "1");
  EXPECT_EQ(counts["33 decrypt ok"], "1");
  EXPECT_EQ(AuditField(lines[0], "count"), "");

  // The flusher thread writes without being asked (a restarted log, so the
  // period is set before its first CountUse starts the thread).
  log.reset();
  ASSERT_EQ(Lines().size(), 4u);
  log = Open();
  ASSERT_NE(log, nullptr);
  log->SetUseFlushPeriodForTest(std::chrono::milliseconds(20));
  log->CountUse(Event(1000, "derive", "1000/web"));
  for (int i = 0; i < 500 && Lines().size() < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(Lines().size(), 5u);
  EXPECT_EQ(AuditField(Lines()[4], "op"), "derive");

  // A clean stop writes what is still counted (the flusher may already
  // have written part of it); the chain verifies after a restart.
  log->CountUse(Event(1000, "sign", "1000/web"));
  log->CountUse(Event(1000, "sign", "1000/web"));
  log.reset();
  lines = Lines();
  ASSERT_GE(lines.size(), 6u);
  int signs = 0;
  for (std::size_t i = 5; i < lines.size(); ++i) {
    EXPECT_EQ(AuditField(lines[i], "op"), "sign");
    signs += std::stoi(AuditField(lines[i], "count"));
  }
  EXPECT_EQ(signs, 2);
  log = Open();
  ASSERT_NE(log, nullptr);
  auto check = Intact(*log);
  EXPECT_EQ(check.records, lines.size());
}

TEST_F(AuditLogTest, EditedRecordIsFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto lines = Lines();
  const std::size_t at = lines[2].find("\"uid\":1000");
  ASSERT_NE(at, std::string::npos);
  lines[2].replace(at, 10, "\"uid\":1001");  // blame someone else
  Write(lines);
  EXPECT_NE(Problem(*log).find("record 3: edited"), std::string::npos);
}

// The MAC covers a record up to its "mac" field; what follows it is checked
// too (found by audit_log_fuzzer: a byte after the MAC went unnoticed).
TEST_F(AuditLogTest, BytesAfterTheMacAreFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  const auto original = Lines();
  for (const std::string& tail :
       {std::string("\"} "), std::string("\"}\r"), std::string("\",\"uid\":0}"),
        std::string("\"")}) {
    auto lines = original;
    lines[1].replace(lines[1].size() - 2, 2, tail);
    Write(lines);
    EXPECT_NE(Problem(*log).find("record 2: edited"), std::string::npos)
        << tail;
  }
  Write(original);
  Intact(*log);
}

// The last record without its line end (found by audit_log_fuzzer): the
// next record appended would share its line.
TEST_F(AuditLogTest, MissingLastLineEndIsFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  const auto original = Lines();
  {
    std::ofstream out(dir_ / "audit.log", std::ios::trunc);
    for (std::size_t i = 0; i < original.size(); ++i) {
      out << original[i] << (i + 1 < original.size() ? "\n" : "");
    }
  }
  EXPECT_NE(Problem(*log).find("record 5: edited (no line end"),
            std::string::npos);
  Write(original);
  Intact(*log);
}

TEST_F(AuditLogTest, RemovedRecordIsFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto lines = Lines();
  lines.erase(lines.begin() + 1);
  Write(lines);
  EXPECT_NE(Problem(*log).find("record 2: out of sequence"), std::string::npos);
}

TEST_F(AuditLogTest, ReorderedRecordsAreFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto lines = Lines();
  std::swap(lines[3], lines[4]);
  Write(lines);
  EXPECT_NE(Problem(*log).find("record 4"), std::string::npos);
}

TEST_F(AuditLogTest, RenumberedRecordsDoNotVerify) {
  // Removing a record and renumbering the rest still breaks the chain.
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto lines = Lines();
  lines.erase(lines.begin() + 1);
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::string from = "{\"seq\":" + std::to_string(i + 2) + ",";
    const std::string to = "{\"seq\":" + std::to_string(i + 1) + ",";
    ASSERT_EQ(lines[i].rfind(from, 0), 0u);
    lines[i].replace(0, from.size(), to);
  }
  Write(lines);
  EXPECT_NE(Problem(*log).find("record 2"), std::string::npos);
}

TEST_F(AuditLogTest, CutOffTailIsFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Fill(*log);
  auto lines = Lines();
  lines.pop_back();
  Write(lines);
  EXPECT_NE(Problem(*log).find("removed from the end"), std::string::npos);
}

// Rotation: audit.log past the limit becomes audit.log.1 and so on, files
// past `keep` go, and each new file starts with a rotation record chained to
// the last record before it; Verify checks the chain across the files and
// Read reaches into them.
TEST_F(AuditLogTest, RotationKeepsTheChainAcrossFiles) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  log->SetRotation(1000, 3);  // ~250-byte records: a new file every 4-5
  Signs(*log, 40);
  EXPECT_TRUE(fs::exists(dir_ / "audit.log.1"));
  EXPECT_TRUE(fs::exists(dir_ / "audit.log.3"));
  EXPECT_FALSE(fs::exists(dir_ / "audit.log.4"));
  EXPECT_FALSE(fs::exists(dir_ / "audit.log.new"));
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "audit.log.2").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_LT(st.st_size, 1300);

  const auto current = Lines();
  const auto before = Lines("audit.log.1");
  ASSERT_FALSE(current.empty());
  ASSERT_FALSE(before.empty());
  EXPECT_EQ(AuditField(current[0], "op"), kAuditRotatedOp);
  EXPECT_EQ(AuditField(current[0], "detail"),
            "the records before this one are in audit.log.1");
  EXPECT_EQ(AuditField(current[0], "prev"), AuditField(before.back(), "mac"));
  EXPECT_EQ(std::stoull(AuditField(current[0], "seq")),
            std::stoull(AuditField(before.back(), "seq")) + 1);

  auto check = Intact(*log);
  EXPECT_EQ(check.files, 4u);
  const auto oldest = Lines("audit.log.3");
  ASSERT_FALSE(oldest.empty());
  EXPECT_EQ(AuditField(oldest[0], "op"), kAuditRotatedOp);
  EXPECT_EQ(check.first, std::stoull(AuditField(oldest[0], "seq")));
  EXPECT_GT(check.first, 1u);
  const std::size_t kept = oldest.size() + Lines("audit.log.2").size() +
                           before.size() + current.size();
  EXPECT_EQ(check.records, kept);

  // Read: the newest records, oldest first, across files.
  auto all = log->Read(std::nullopt, std::nullopt, 1000);
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), kept);
  for (std::size_t i = 1; i < all->size(); ++i) {
    EXPECT_EQ(std::stoull(AuditField((*all)[i], "seq")),
              std::stoull(AuditField((*all)[i - 1], "seq")) + 1);
  }
  auto some = log->Read(std::nullopt, std::nullopt, current.size() + 2);
  ASSERT_TRUE(some.ok());
  ASSERT_EQ(some->size(), current.size() + 2);
  EXPECT_EQ(some->back(), current.back());

  // A restarted daemon continues the chain in the current file.
  log.reset();
  log = Open();
  ASSERT_NE(log, nullptr);
  ASSERT_TRUE(log->Append(Event(7, "grant-use", "1000/web")).ok());
  check = Intact(*log);
  EXPECT_EQ(check.records, kept + 1);
}

// Verify and Read take the files under the lock and read them outside it:
// checks running while another thread appends and rotates all see an intact
// chain.
TEST_F(AuditLogTest, VerifyWhileAppendingAndRotating) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  log->SetRotation(2000, 3);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (int i = 0; i < 400; ++i) {
      EXPECT_TRUE(log->Append(Event(1000, "sign", "1000/web")).ok());
    }
    done = true;
  });
  int checks = 0;
  while (!done || checks == 0) {
    Intact(*log);
    auto some = log->Read(std::nullopt, std::nullopt, 5);
    ASSERT_TRUE(some.ok());
    ++checks;
  }
  writer.join();
  EXPECT_TRUE(fs::exists(dir_ / "audit.log.3"));
}

// Without rotation nothing changes: one file, the chain from record 1.
TEST_F(AuditLogTest, NoRotationByDefault) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  Signs(*log, 40);
  EXPECT_FALSE(fs::exists(dir_ / "audit.log.1"));
  auto check = Intact(*log);
  EXPECT_EQ(check.first, 1u);
  EXPECT_EQ(check.files, 1u);
  EXPECT_EQ(check.records, 40u);
}

// Edits in a rotated file, a removed rotated file and records cut from the
// start of the oldest file are all found.
TEST_F(AuditLogTest, TamperingAcrossRotatedFilesIsFound) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  log->SetRotation(1000, 5);
  Signs(*log, 30);
  ASSERT_TRUE(fs::exists(dir_ / "audit.log.5"));
  {
    // An edited record in audit.log.2.
    auto lines = Lines("audit.log.2");
    const auto original = lines;
    const std::size_t at = lines[1].find("1000/web");
    ASSERT_NE(at, std::string::npos);
    lines[1].replace(at, 8, "1000/wex");
    Write(lines, "audit.log.2");
    const std::string problem = Problem(*log);
    EXPECT_EQ(problem.rfind("audit.log.2: record ", 0), 0u) << problem;
    EXPECT_NE(problem.find("MAC does not match"), std::string::npos);
    Write(original, "audit.log.2");
  }
  {
    // The last record of audit.log.1 removed.
    auto lines = Lines("audit.log.1");
    const auto original = lines;
    lines.pop_back();
    Write(lines, "audit.log.1");
    EXPECT_NE(Problem(*log).find("out of sequence"), std::string::npos);
    Write(original, "audit.log.1");
  }
  {
    // audit.log.3 removed as a whole.
    fs::rename(dir_ / "audit.log.3", dir_ / "aside");
    EXPECT_NE(Problem(*log).find("out of sequence"), std::string::npos);
    fs::rename(dir_ / "aside", dir_ / "audit.log.3");
  }
  {
    // The first records of the oldest file (its rotation record among
    // them) removed.
    auto lines = Lines("audit.log.5");
    const auto original = lines;
    lines.erase(lines.begin(), lines.begin() + 2);
    Write(lines, "audit.log.5");
    EXPECT_NE(Problem(*log).find("audit.log.5: record 1: out of sequence"),
              std::string::npos);
    Write(original, "audit.log.5");
  }
  Intact(*log);
}

// A rotation that cannot happen (here audit.log.new is a directory) loses
// no record: they go on in audit.log, and a later try succeeds.
TEST_F(AuditLogTest, FailedRotationLosesNothing) {
  auto log = Open();
  ASSERT_NE(log, nullptr);
  fs::create_directory(dir_ / "audit.log.new");
  log->SetRotation(1000, 2);
  Signs(*log, 10);
  EXPECT_FALSE(fs::exists(dir_ / "audit.log.1"));
  EXPECT_EQ(Lines().size(), 10u);
  auto check = Intact(*log);
  // The next try comes after another MiB (1000 / 16 is less).
  fs::remove(dir_ / "audit.log.new");
  log->SetRotation(1000, 2);  // a new setting tries again at once
  ASSERT_TRUE(log->Append(Event(1000, "sign", "1000/web")).ok());
  EXPECT_TRUE(fs::exists(dir_ / "audit.log.1"));
  EXPECT_EQ(Lines("audit.log.1").size(), 11u);
  check = Intact(*log);
  EXPECT_EQ(check.records, 12u);
}

// A rotation cut short by a crash: a new file that never replaced
// audit.log is dropped; one that had (audit.log gone) becomes audit.log.
TEST_F(AuditLogTest, InterruptedRotationIsCompletedAtOpen) {
  {
    auto log = Open();
    ASSERT_NE(log, nullptr);
    log->SetRotation(1000, 2);
    Signs(*log, 8);
  }
  ASSERT_TRUE(fs::exists(dir_ / "audit.log.1"));
  const auto current = Lines();
  // Crash before the renames: a stray new file beside audit.log.
  Write({"{\"seq\":99}"}, "audit.log.new");
  {
    auto log = Open();
    ASSERT_NE(log, nullptr);
    EXPECT_FALSE(fs::exists(dir_ / "audit.log.new"));
    EXPECT_EQ(Lines(), current);
    Intact(*log);
  }
  // Crash between the renames: audit.log is audit.log.1 now, the new file
  // not yet in its place.
  fs::rename(dir_ / "audit.log.1", dir_ / "audit.log.2");
  fs::rename(dir_ / "audit.log", dir_ / "audit.log.1");
  Write({current.back()}, "audit.log.new");  // stands in for a new file
  auto log = Open();
  ASSERT_NE(log, nullptr);
  EXPECT_FALSE(fs::exists(dir_ / "audit.log.new"));
  EXPECT_EQ(Lines(), std::vector<std::string>{current.back()});
}

TEST_F(AuditLogTest, UnsafeKeyFileIsRefused) {
  { ASSERT_NE(Open(), nullptr); }
  ASSERT_EQ(chmod((dir_ / "audit.key").c_str(), 0644), 0);
  auto log = AuditLog::Open(dir_);
  ASSERT_FALSE(log.ok());
  EXPECT_NE(log.status().message().find("0600"), std::string::npos);
}

}  // namespace
}  // namespace keyhold::daemon
