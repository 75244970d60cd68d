// Bad input against a real keyholdd: every case gets a clear status or a
// closed connection, the daemon keeps serving others, and stored keys are
// untouched.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <set>
#include <thread>

#include "common/frame.h"
#include "tests/harness/daemon_process.h"

namespace keyhold::testing {
namespace {

class BadInputTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<DaemonProcess>(
        "[limits]\nio_timeout_seconds = 2\nmax_in_flight_per_connection = 4\n");
    ASSERT_TRUE(daemon_->Start()) << daemon_->log();
    client_ = std::make_unique<client::Client>(daemon_->ClientOptions());
    auto created =
        client_->GenerateKey(client::MakeKeyRef("keep"), v1::EC_P256);
    ASSERT_TRUE(created.ok()) << created.status().ToString();
    public_key_ = created->public_key();
    ASSERT_TRUE(Sign("keep").ok());
  }

  StatusOr<std::string> Sign(const std::string& name) {
    v1::SignRequest req;
    *req.mutable_key() = client::MakeKeyRef(name);
    req.set_algorithm(v1::ECDSA);
    req.set_digest(v1::SHA256);
    req.set_data(std::string(32, '\x11'));
    return client_->Sign(req);
  }

  // After every abuse: the daemon is alive, the stored key is unchanged and
  // still signs with a signature that verifies under the original public key.
  void ExpectHealthy() {
    ASSERT_TRUE(daemon_->Running());
    client::Client fresh(daemon_->ClientOptions());
    ASSERT_TRUE(fresh.Ping().ok());
    auto pub = fresh.GetPublicKey(client::MakeKeyRef("keep"));
    ASSERT_TRUE(pub.ok()) << pub.status().ToString();
    EXPECT_EQ(pub->public_key(), public_key_);
    auto sig = Sign("keep");
    ASSERT_TRUE(sig.ok()) << sig.status().ToString();
    const auto* p = reinterpret_cast<const uint8_t*>(public_key_.data());
    EVP_PKEY* pkey =
        d2i_PUBKEY(nullptr, &p, static_cast<long>(public_key_.size()));
    ASSERT_NE(pkey, nullptr);
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(pkey, nullptr);
    ASSERT_EQ(EVP_PKEY_verify_init(ctx), 1);
    const std::string digest(32, '\x11');
    EXPECT_EQ(
        EVP_PKEY_verify(
            ctx, reinterpret_cast<const uint8_t*>(sig->data()), sig->size(),
            reinterpret_cast<const uint8_t*>(digest.data()), digest.size()),
        1);
    EVP_PKEY_CTX_free(ctx);
    EVP_PKEY_free(pkey);
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::unique_ptr<client::Client> client_;
  std::string public_key_;
};

TEST_F(BadInputTest, OversizedFrameIsRefusedAndClosed) {
  RawConnection raw(daemon_->socket_path());
  ASSERT_TRUE(raw.ok());
  const auto header = EncodeFrameHeader(kDefaultMaxFrameBytes + 1);
  ASSERT_TRUE(raw.Send(std::string(header.begin(), header.end())));
  v1::Response r;
  ASSERT_TRUE(raw.ReadResponse(&r));
  EXPECT_EQ(r.code(), v1::RESOURCE_EXHAUSTED);
  EXPECT_NE(r.message().find("exceeds the limit"), std::string::npos);
  EXPECT_TRUE(raw.ClosedByPeer(3000));
  ExpectHealthy();
}

TEST_F(BadInputTest, HugeLengthDoesNotAllocate) {
  RawConnection raw(daemon_->socket_path());
  ASSERT_TRUE(raw.Send(std::string("\xff\xff\xff\xff", 4)));
  v1::Response r;
  ASSERT_TRUE(raw.ReadResponse(&r));
  EXPECT_EQ(r.code(), v1::RESOURCE_EXHAUSTED);
  EXPECT_TRUE(raw.ClosedByPeer(3000));
  ExpectHealthy();
}

TEST_F(BadInputTest, ClientSideFrameLimitGivesClearError) {
  v1::SignRequest req;
  *req.mutable_key() = client::MakeKeyRef("keep");
  req.set_algorithm(v1::ECDSA);
  req.set_data(std::string(kDefaultMaxFrameBytes, 'x'));
  auto r = client_->Sign(req);
  EXPECT_EQ(r.status().code(), Code::kResourceExhausted);
  ExpectHealthy();
}

TEST_F(BadInputTest, TruncatedFrameThenHangupIsHarmless) {
  {
    RawConnection raw(daemon_->socket_path());
    v1::Request req;
    req.set_id(1);
    req.mutable_ping();
    const std::string frame = Frame(req);
    ASSERT_TRUE(raw.Send(frame.substr(0, frame.size() - 1)));
  }
  ExpectHealthy();
}

TEST_F(BadInputTest, StalledFrameIsTimedOut) {
  RawConnection raw(daemon_->socket_path());
  const auto header = EncodeFrameHeader(100);
  ASSERT_TRUE(raw.Send(std::string(header.begin(), header.end()) + "abc"));
  // io_timeout_seconds = 2 in this test's config.
  EXPECT_TRUE(raw.ClosedByPeer(6000));
  ExpectHealthy();
}

TEST_F(BadInputTest, TricklingFrameIsTimedOutFromItsFirstByte) {
  // One byte every 500 ms keeps the socket busy, but the frame is not done
  // within io_timeout_seconds (2) of its first byte.
  RawConnection raw(daemon_->socket_path());
  const auto header = EncodeFrameHeader(100);
  ASSERT_TRUE(raw.Send(std::string(header.begin(), header.end())));
  const auto start = std::chrono::steady_clock::now();
  bool closed = false;
  for (int i = 0; i < 30 && !closed; ++i) {
    if (!raw.Send("x")) {
      closed = true;
      break;
    }
    closed = raw.ClosedByPeer(500);
  }
  EXPECT_TRUE(closed);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(8));
  ExpectHealthy();
}

TEST_F(BadInputTest, HalfClosedClientStillGetsEveryAnswer) {
  RawConnection raw(daemon_->socket_path());
  std::string batch;
  for (uint64_t id = 1; id <= 10; ++id) {
    v1::Request req;
    req.set_id(id);
    if (id % 2 == 0) {
      req.mutable_ping();
    } else {
      req.mutable_list_keys();  // runs on the blocking pool
    }
    batch += Frame(req);
  }
  ASSERT_TRUE(raw.Send(batch));
  ASSERT_EQ(shutdown(raw.fd(), SHUT_WR), 0);
  std::set<uint64_t> ids;
  for (int i = 0; i < 10; ++i) {
    v1::Response r;
    ASSERT_TRUE(raw.ReadResponse(&r)) << "answer " << i << " lost";
    EXPECT_EQ(r.code(), v1::OK);
    ids.insert(r.id());
  }
  EXPECT_EQ(ids.size(), 10u);
  EXPECT_TRUE(raw.ClosedByPeer(3000));
}

TEST_F(BadInputTest, GarbageIsRefusedAndClosed) {
  RawConnection raw(daemon_->socket_path());
  const std::string garbage = "\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8";
  const auto header = EncodeFrameHeader(static_cast<uint32_t>(garbage.size()));
  ASSERT_TRUE(raw.Send(std::string(header.begin(), header.end()) + garbage));
  v1::Response r;
  ASSERT_TRUE(raw.ReadResponse(&r));
  EXPECT_EQ(r.code(), v1::INVALID_ARGUMENT);
  EXPECT_EQ(r.message(), "malformed request");
  EXPECT_TRUE(raw.ClosedByPeer(3000));
  ExpectHealthy();
}

TEST_F(BadInputTest, RandomBytesNeverCrashTheDaemon) {
  uint32_t seed = 12345;
  for (int i = 0; i < 200; ++i) {
    RawConnection raw(daemon_->socket_path());
    std::string junk;
    const int n = 1 + static_cast<int>(seed % 300);
    for (int j = 0; j < n; ++j) {
      seed = seed * 1103515245u + 12345u;
      junk += static_cast<char>(seed >> 16);
    }
    // Sometimes a plausible small length prefix, sometimes raw noise.
    if (i % 2 == 0) {
      const auto header = EncodeFrameHeader(static_cast<uint32_t>(junk.size()));
      junk = std::string(header.begin(), header.end()) + junk;
    }
    raw.Send(junk);
  }
  ExpectHealthy();
}

TEST_F(BadInputTest, UnknownOperationKeepsConnection) {
  RawConnection raw(daemon_->socket_path());
  // id = 9, then field 99 (length-delimited, empty): an op from the future.
  const std::string body("\x08\x09\x9a\x06\x00", 5);
  const auto header = EncodeFrameHeader(static_cast<uint32_t>(body.size()));
  ASSERT_TRUE(raw.Send(std::string(header.begin(), header.end()) + body));
  v1::Response r;
  ASSERT_TRUE(raw.ReadResponse(&r));
  EXPECT_EQ(r.id(), 9u);
  EXPECT_EQ(r.code(), v1::UNSUPPORTED);
  EXPECT_EQ(r.message(), "unknown operation");
  // Same connection still works.
  v1::Request ping;
  ping.set_id(10);
  ping.mutable_ping();
  ASSERT_TRUE(raw.Send(Frame(ping)));
  ASSERT_TRUE(raw.ReadResponse(&r));
  EXPECT_EQ(r.id(), 10u);
  EXPECT_EQ(r.code(), v1::OK);
}

TEST_F(BadInputTest, PipelinedRequestsAnsweredById) {
  RawConnection raw(daemon_->socket_path());
  std::string batch;
  for (uint64_t id = 100; id < 110; ++id) {
    v1::Request req;
    req.set_id(id);
    if (id % 2 == 0) {
      req.mutable_ping();
    } else {
      auto* s = req.mutable_sign();
      *s->mutable_key() = client::MakeKeyRef("keep");
      s->set_algorithm(v1::ECDSA);
      s->set_digest(v1::SHA256);
      s->set_data(std::string(32, 'x'));
    }
    batch += Frame(req);
  }
  ASSERT_TRUE(raw.Send(batch));
  std::set<uint64_t> ids;
  for (int i = 0; i < 10; ++i) {
    v1::Response r;
    ASSERT_TRUE(raw.ReadResponse(&r));
    EXPECT_EQ(r.code(), v1::OK) << r.message();
    EXPECT_EQ(r.id() % 2 == 0, r.has_ping());
    ids.insert(r.id());
  }
  EXPECT_EQ(ids.size(), 10u);
}

TEST_F(BadInputTest, SilentClientDoesNotBlockOthers) {
  std::vector<std::unique_ptr<RawConnection>> silent;
  for (int i = 0; i < 50; ++i) {
    silent.push_back(std::make_unique<RawConnection>(daemon_->socket_path()));
    ASSERT_TRUE(silent.back()->ok());
  }
  // Half a frame, then nothing.
  ASSERT_TRUE(silent[0]->Send(std::string("\x00\x00", 2)));
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(Sign("keep").ok());
  }
  ExpectHealthy();
}

TEST_F(BadInputTest, WrongKeyTypeMissingKeyInvalidNamesDuplicates) {
  v1::SignRequest pss;
  *pss.mutable_key() = client::MakeKeyRef("keep");
  pss.set_algorithm(v1::RSA_PSS);
  pss.set_digest(v1::SHA256);
  pss.set_data(std::string(32, 'x'));
  auto r = client_->Sign(pss);
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  EXPECT_NE(r.status().message().find("ec-p256"), std::string::npos);

  v1::DecryptRequest dec;
  *dec.mutable_key() = client::MakeKeyRef("keep");
  dec.set_algorithm(v1::RSA_OAEP);
  dec.set_ciphertext("x");
  EXPECT_EQ(client_->Decrypt(dec).status().code(), Code::kInvalidArgument);

  EXPECT_EQ(Sign("missing").status().code(), Code::kNotFound);
  EXPECT_EQ(client_->GenerateKey(client::MakeKeyRef("keep"), v1::EC_P256)
                .status()
                .code(),
            Code::kAlreadyExists);
  for (const char* bad : {"", "a/b", "white space", "semi;colon"}) {
    EXPECT_EQ(client_->GenerateKey(client::MakeKeyRef(bad), v1::EC_P256)
                  .status()
                  .code(),
              Code::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(
      client_
          ->GenerateKey(client::MakeKeyRef(std::string(65, 'a')), v1::EC_P256)
          .status()
          .code(),
      Code::kInvalidArgument);
  EXPECT_EQ(
      client_
          ->GenerateKey(client::MakeKeyRef("t"), static_cast<v1::KeyType>(42))
          .status()
          .code(),
      Code::kUnsupported);
  SecretBytes junk(std::vector<uint8_t>{1, 2, 3});
  EXPECT_EQ(client_->ImportKey(client::MakeKeyRef("imp"), junk).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(
      client_->Derive(client::MakeKeyRef("keep"), std::vector<uint8_t>{4, 1, 2})
          .status()
          .code(),
      Code::kInvalidArgument);
  ExpectHealthy();
}

TEST_F(BadInputTest, InFlightLimitAppliesBackpressureNotErrors) {
  // max_in_flight_per_connection = 4: 40 pipelined requests all get answers.
  RawConnection raw(daemon_->socket_path());
  std::string batch;
  for (uint64_t id = 1; id <= 40; ++id) {
    v1::Request req;
    req.set_id(id);
    auto* s = req.mutable_sign();
    *s->mutable_key() = client::MakeKeyRef("keep");
    s->set_algorithm(v1::ECDSA);
    s->set_digest(v1::SHA256);
    s->set_data(std::string(32, 'x'));
    batch += Frame(req);
  }
  ASSERT_TRUE(raw.Send(batch));
  for (int i = 0; i < 40; ++i) {
    v1::Response r;
    ASSERT_TRUE(raw.ReadResponse(&r)) << i;
    EXPECT_EQ(r.code(), v1::OK);
  }
}

TEST(IdleTimeoutTest, IdleConnectionIsClosedAfterUse) {
  DaemonProcess daemon("[limits]\nidle_timeout_seconds = 2\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  RawConnection raw(daemon.socket_path());
  v1::Request ping;
  ping.set_id(1);
  ping.mutable_ping();
  ASSERT_TRUE(raw.Send(Frame(ping)));
  v1::Response r;
  ASSERT_TRUE(raw.ReadResponse(&r));
  // Used once, then silent: closed after about 2 s.
  EXPECT_TRUE(raw.ClosedByPeer(6000));
  // A client library user does not notice: it reconnects.
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.Ping().ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(3500));
  EXPECT_TRUE(c.Ping().ok());
}

// One uid holding its quota of connections (Parsec U-0) cannot take the
// daemon from others: its next connection is closed at once, another uid is
// served as usual, and a freed slot is usable again.
TEST(PerUidConnectionLimitTest, OneUidCannotTakeEverySlot) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to act as a second uid";
  }
  DaemonProcess daemon("[limits]\nmax_connections_per_uid = 8\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  std::vector<std::unique_ptr<RawConnection>> hog;
  for (int i = 0; i < 8; ++i) {
    hog.push_back(std::make_unique<RawConnection>(daemon.socket_path()));
    ASSERT_TRUE(hog.back()->ok());
  }
  // A round trip on each shows which were accepted. The harness's own ping
  // connection (same uid) may still have counted when they arrived, so one
  // of the eight may have been refused already.
  v1::Request ping;
  ping.set_id(1);
  ping.mutable_ping();
  int answered = 0;
  for (auto& c : hog) {
    v1::Response r;
    if (c->Send(Frame(ping)) && c->ReadResponse(&r)) {
      ++answered;
    }
  }
  EXPECT_GE(answered, 7);
  EXPECT_LE(answered, 8);
  // With the quota full, a further connection is closed at once (if a slot
  // was still freeing up, the next one is).
  bool refused = false;
  for (int i = 0; i < 3 && !refused; ++i) {
    auto extra = std::make_unique<RawConnection>(daemon.socket_path());
    ASSERT_TRUE(extra->ok());
    refused = extra->ClosedByPeer(3000);
    if (!refused) {
      hog.push_back(std::move(extra));
    }
  }
  EXPECT_TRUE(refused);
  EXPECT_NE(daemon.log().find("max_connections_per_uid"), std::string::npos);

  // Another uid: creates a key and signs, unaffected.
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (setgid(64103) != 0 || setuid(64103) != 0) {
      _exit(10);
    }
    client::Client other(daemon.ClientOptions());
    if (!other.GenerateKey(client::MakeKeyRef("mine"), v1::EC_P256).ok()) {
      _exit(11);
    }
    v1::SignRequest req;
    *req.mutable_key() = client::MakeKeyRef("mine");
    req.set_algorithm(v1::ECDSA);
    req.set_digest(v1::SHA256);
    req.set_data(std::string(32, '\x22'));
    _exit(other.Sign(req).ok() ? 0 : 12);
  }
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);

  // A slot freed is a slot usable again.
  hog.pop_back();
  bool served = false;
  for (int attempt = 0; attempt < 50 && !served; ++attempt) {
    client::Client again(daemon.ClientOptions());
    served = again.Ping().ok();
    if (!served) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  EXPECT_TRUE(served);
}

// One uid flooding the blocking pool with RSA-4096 generations (Parsec U-0)
// does not make another uid wait behind the flood: the victim's key
// creation (a blocking job too) is answered while most of the flood is
// still queued. An ordering check, not a timing one.
TEST(FairnessTest, FloodOfGenerationsDoesNotStarveAnotherUid) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to act as a second uid";
  }
  DaemonProcess daemon("blocking_threads = 2\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  // One call per thread: all of them queued in the daemon at once.
  constexpr int kAttackers = 12;
  constexpr int kPerAttacker = 1;
  client::Client attacker(daemon.ClientOptions());
  std::atomic<int> generated{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kAttackers; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerAttacker; ++i) {
        const std::string name =
            "flood-" + std::to_string(t) + "-" + std::to_string(i);
        if (attacker.GenerateKey(client::MakeKeyRef(name), v1::RSA_4096).ok()) {
          ++generated;
        }
      }
    });
  }
  // Let the flood reach the daemon's queue.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  int to_parent[2];
  ASSERT_EQ(pipe(to_parent), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(to_parent[0]);
    char verdict = 'x';
    if (setgid(64104) == 0 && setuid(64104) == 0) {
      // What is checked is the order of service (below), not its speed:
      // on a loaded machine an RSA-4096 generation at nice 10 can take
      // many seconds, so the victim waits as long as it has to.
      client::Options options = daemon.ClientOptions();
      options.call_timeout = std::chrono::minutes(5);
      client::Client victim(options);
      v1::SignRequest req;
      *req.mutable_key() = client::MakeKeyRef("victim");
      req.set_algorithm(v1::ECDSA);
      req.set_digest(v1::SHA256);
      req.set_data(std::string(32, '\x33'));
      verdict = victim.GenerateKey(req.key(), v1::EC_P256).ok() &&
                        victim.Sign(req).ok()
                    ? 'y'
                    : 'n';
    }
    _exit(write(to_parent[1], &verdict, 1) == 1 ? 0 : 1);
  }
  close(to_parent[1]);
  char verdict = 0;
  ASSERT_EQ(read(to_parent[0], &verdict, 1), 1);
  const int done_when_served = generated.load();
  close(to_parent[0]);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_EQ(verdict, 'y');
  // First come, first served would have answered the victim after all
  // kAttackers * kPerAttacker generations; its turn came after at most
  // the two running ones and one more per attacker connection's turn.
  EXPECT_LT(done_when_served, kAttackers * kPerAttacker / 2)
      << "the victim waited behind the flood";
  // Stopping the daemon drops the queued flood instead of working it off.
  daemon.Stop();
  for (auto& t : threads) {
    t.join();
  }
}

// Issue 7's first abuse case with the default limits: one uid opens 1,000
// connections and sends nothing; another uid is still served.
TEST(FairnessTest, ThousandIdleConnectionsDoNotLockOutAnotherUid) {
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to act as a second uid";
  }
  rlimit nofile{};
  ASSERT_EQ(getrlimit(RLIMIT_NOFILE, &nofile), 0);
  const rlimit saved = nofile;
  nofile.rlim_cur = std::max<rlim_t>(nofile.rlim_cur, 4096);
  nofile.rlim_max = std::max(nofile.rlim_max, nofile.rlim_cur);
  ASSERT_EQ(setrlimit(RLIMIT_NOFILE, &nofile), 0);
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  std::vector<std::unique_ptr<RawConnection>> idle;
  for (int i = 0; i < 1000; ++i) {
    idle.push_back(std::make_unique<RawConnection>(daemon.socket_path()));
  }
  const char verdict = RunAsUid(64104, [&daemon] {
    client::Client victim(daemon.ClientOptions());
    v1::SignRequest req;
    *req.mutable_key() = client::MakeKeyRef("victim");
    req.set_algorithm(v1::ECDSA);
    req.set_digest(v1::SHA256);
    req.set_data(std::string(32, '\x33'));
    if (!victim.GenerateKey(req.key(), v1::EC_P256).ok()) {
      return 'g';
    }
    for (int i = 0; i < 100; ++i) {
      if (!victim.Sign(req).ok()) {
        return 's';
      }
    }
    return 'y';
  });
  EXPECT_EQ(verdict, 'y') << "g: could not create its key, s: a sign failed";
  // The hog got its quota and no more.
  EXPECT_NE(daemon.log().find("limits.max_connections_per_uid"),
            std::string::npos);
  idle.clear();
  daemon.Stop();
  setrlimit(RLIMIT_NOFILE, &saved);
}

// limits.max_in_flight_per_uid: a uid's requests for the blocking pool past
// its cap are refused at once with a clear status, not queued; those taken
// complete, and the uid is served again once they have.
TEST(FairnessTest, PoolRequestsPastTheUidCapAreRefusedAtOnce) {
  DaemonProcess daemon(
      "blocking_threads = 1\n[limits]\nmax_in_flight_per_uid = 2\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Options options = daemon.ClientOptions();
  options.call_timeout = std::chrono::minutes(5);  // RSA-4096 on a busy box
  client::Client c(options);
  constexpr int kCalls = 6;
  std::vector<Status> results(kCalls);
  std::vector<std::thread> threads;
  for (int i = 0; i < kCalls; ++i) {
    threads.emplace_back([&, i] {
      results[static_cast<std::size_t>(i)] =
          c.GenerateKey(client::MakeKeyRef("cap-" + std::to_string(i)),
                        v1::RSA_4096)
              .status();
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  int ok = 0;
  int refused = 0;
  for (const Status& st : results) {
    if (st.ok()) {
      ++ok;
    } else {
      EXPECT_EQ(st.code(), Code::kResourceExhausted) << st.ToString();
      EXPECT_NE(st.message().find("limits.max_in_flight_per_uid"),
                std::string::npos)
          << st.message();
      ++refused;
    }
  }
  EXPECT_GE(ok, 2) << "the two within the cap must complete";
  EXPECT_GE(refused, 1) << "six at once against a cap of two";
  // Nothing is left counted: the uid gets its full share again.
  EXPECT_TRUE(c.GenerateKey(client::MakeKeyRef("after"), v1::EC_P256).ok());
  EXPECT_TRUE(c.DestroyKey(client::MakeKeyRef("after")).ok());
}

TEST(SocketDirectoryTest, DaemonRefusesAWorldWritableDirectory) {
  char tmpl[] = "/tmp/keyhold-ww-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  chmod(dir.c_str(), 0777);
  const std::string sock = dir + "/keyhold.sock";
  const std::string state = dir + "/state";
  const pid_t pid = fork();
  if (pid == 0) {
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    execl(KEYHOLDD_PATH, "keyholdd", "--socket", sock.c_str(), "--state-dir",
          state.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 1);
  struct stat st {};
  EXPECT_NE(stat(sock.c_str(), &st), 0) << "a socket was created anyway";
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace keyhold::testing
