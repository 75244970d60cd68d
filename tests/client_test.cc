// The client library against a real keyholdd: concurrency, fork, daemon
// restart, a dead daemon and an impostor socket.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "tests/harness/daemon_process.h"

namespace keyhold::testing {
namespace {

v1::SignRequest EcSign(const std::string& name) {
  v1::SignRequest req;
  *req.mutable_key() = client::MakeKeyRef(name);
  req.set_algorithm(v1::ECDSA);
  req.set_digest(v1::SHA256);
  req.set_data(std::string(32, '\x42'));
  return req;
}

TEST(ClientTest, ManyThreadsShareOneClient) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) {
        if (c.Sign(EcSign("k")).ok()) {
          ++ok;
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 800);
}

TEST(ClientTest, EveryKeyOperationThroughTheBlockingPool) {
  // inline_crypto = false: the path hardware backends take.
  DaemonProcess daemon("inline_crypto = false\n");
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) {
        if (c.Sign(EcSign("k")).ok()) {
          ++ok;
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(ok.load(), 400);
}

TEST(ClientTest, WorksInChildrenAfterFork) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());
  ASSERT_TRUE(c.Sign(EcSign("k")).ok());  // parent holds a pooled connection
  std::vector<pid_t> kids;
  for (int i = 0; i < 4; ++i) {
    const pid_t pid = fork();
    if (pid == 0) {
      int failures = 0;
      for (int j = 0; j < 50; ++j) {
        failures += c.Sign(EcSign("k")).ok() ? 0 : 1;
      }
      _exit(failures == 0 ? 0 : 1);
    }
    kids.push_back(pid);
  }
  // The parent keeps signing while the children do.
  for (int j = 0; j < 50; ++j) {
    ASSERT_TRUE(c.Sign(EcSign("k")).ok());
  }
  for (pid_t pid : kids) {
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
}

TEST(ClientTest, SurvivesDaemonRestart) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());
  ASSERT_TRUE(c.Sign(EcSign("k")).ok());
  EXPECT_EQ(daemon.Stop(), 0);
  // While it is down: a clear error, no hang.
  auto down = c.Sign(EcSign("k"));
  EXPECT_EQ(down.status().code(), Code::kUnavailable);
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  auto again = c.Sign(EcSign("k"));
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST(ClientTest, SurvivesDaemonKill) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("k"), v1::EC_P256).ok());
  ASSERT_TRUE(c.Sign(EcSign("k")).ok());
  daemon.Kill();
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  // The pooled connection is dead; the client reconnects on its own.
  auto again = c.Sign(EcSign("k"));
  EXPECT_TRUE(again.ok()) << again.status().ToString();
}

TEST(ClientTest, NoDaemonIsUnavailable) {
  client::Options o;
  o.socket_path = "/tmp/keyhold-no-such-dir/keyhold.sock";
  client::Client c(o);
  EXPECT_EQ(c.Ping().code(), Code::kUnavailable);
}

TEST(ClientTest, RefusesAnImpostor) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  // The real daemon runs as our uid; demand another one and the client must
  // refuse before sending anything.
  client::Options o = daemon.ClientOptions();
  o.expected_daemon_uid = getuid() + 4242;
  client::Client c(o);
  auto r = c.Ping();
  EXPECT_EQ(r.code(), Code::kPermissionDenied);
  EXPECT_NE(r.message().find("expected keyholdd's uid"), std::string::npos);
}

TEST(ClientTest, ImpostorGetsNoBytes) {
  // A listener run by a different uid than expected. We are root in CI, so
  // fork a child that drops to another uid and listens on a socket.
  if (geteuid() != 0) {
    GTEST_SKIP() << "needs root to listen as another uid";
  }
  char tmpl[] = "/tmp/keyhold-impostor-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  chmod(dir.c_str(), 0777);
  const std::string path = dir + "/keyhold.sock";
  int pipefd[2];
  ASSERT_EQ(pipe(pipefd), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    if (setgid(65534) != 0 || setuid(65534) != 0) {
      _exit(2);
    }
    const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr {};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(fd, 4) != 0) {
      _exit(3);
    }
    (void)write(pipefd[1], "r", 1);
    // Two clients connect; report whether either sent a single byte.
    ssize_t total = 0;
    for (int i = 0; i < 2; ++i) {
      const int conn = accept(fd, nullptr, nullptr);
      char buf[16];
      const ssize_t n = recv(conn, buf, sizeof(buf), 0);
      total += n > 0 ? n : 0;
      close(conn);
    }
    _exit(total == 0 ? 0 : 1);
  }
  char ready;
  ASSERT_EQ(read(pipefd[0], &ready, 1), 1);
  client::Options o;
  o.socket_path = path;
  o.expected_daemon_uid = 0;  // we expect root; the listener is nobody
  {
    client::Client c(o);
    EXPECT_EQ(c.Ping().code(), Code::kPermissionDenied);
  }
  {
    // Default expectation (the socket's owner): the impostor owns its
    // socket, but the directory is world-writable, so that proves nothing.
    client::Options d;
    d.socket_path = path;
    client::Client c(d);
    auto r = c.Ping();
    EXPECT_EQ(r.code(), Code::kPermissionDenied);
    EXPECT_NE(r.message().find("can be written by other users"),
              std::string::npos)
        << r.message();
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the impostor received bytes";
  unlink(path.c_str());
  rmdir(dir.c_str());
}

TEST(ClientTest, HelloReportsLimitsAndCaller) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  auto hello = c.Hello();
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(hello->version(), 1u);
  EXPECT_EQ(hello->max_frame_bytes(), 65536u);
  EXPECT_EQ(hello->caller_uid(), getuid());
}

TEST(ClientTest, SecondDaemonOnSameSocketRefusesToStart) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  const pid_t pid = fork();
  if (pid == 0) {
    const int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 2);
    const std::string state = daemon.dir() + "/state2";
    execl(KEYHOLDD_PATH, "keyholdd", "--socket", daemon.socket_path().c_str(),
          "--state-dir", state.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_NE(WEXITSTATUS(status), 0);
  client::Client c(daemon.ClientOptions());
  EXPECT_TRUE(c.Ping().ok());
}

}  // namespace
}  // namespace keyhold::testing
