#include "tests/harness/daemon_process.h"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "common/frame.h"

namespace keyhold::testing {

DaemonProcess::DaemonProcess(std::string extra_config) {
  char tmpl[] = "/tmp/keyhold-test-XXXXXX";
  dir_ = mkdtemp(tmpl);
  ::chmod(dir_.c_str(), 0755);
  socket_path_ = dir_ + "/keyhold.sock";
  config_path_ = dir_ + "/keyholdd.toml";
  log_path_ = dir_ + "/keyholdd.log";
  WriteConfig(extra_config);
}

void DaemonProcess::WriteConfig(const std::string& extra_config) {
  // Written beside and renamed over, so the daemon never reads half a file.
  const std::string tmp = config_path_ + ".new";
  {
    std::ofstream cfg(tmp);
    cfg << "socket = \"" << socket_path_ << "\"\n"
        << "state_dir = \"" << state_dir() << "\"\n"
        << "log_level = \"debug\"\n"
        << extra_config << "\n";
  }
  ::chmod(tmp.c_str(), 0644);
  std::filesystem::rename(tmp, config_path_);
}

std::string DaemonProcess::Reload(const std::string& extra_config) {
  const auto verdicts = [this] {
    std::vector<std::string> lines;
    std::istringstream in(log());
    for (std::string line; std::getline(in, line);) {
      if (line.find("reloaded ") != std::string::npos ||
          line.find("reload rejected") != std::string::npos) {
        lines.push_back(line);
      }
    }
    return lines;
  };
  const std::size_t before = verdicts().size();
  WriteConfig(extra_config);
  if (pid_ <= 0 || ::kill(pid_, SIGHUP) != 0) {
    return "";
  }
  for (int i = 0; i < 500; ++i) {
    const auto now = verdicts();
    if (now.size() > before) {
      return now.back();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return "";
}

DaemonProcess::~DaemonProcess() {
  // A clean stop lets sanitizer builds run their exit checks (leaks), and
  // any sanitizer report in the daemon's log fails the test.
  if (pid_ > 0) {
    Stop();
  }
  const std::string text = log();
  for (const char* marker : {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                             "WARNING: ThreadSanitizer", "runtime error:"}) {
    if (text.find(marker) != std::string::npos) {
      ADD_FAILURE() << "sanitizer report in keyholdd's log:\n" << text;
      break;
    }
  }
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

bool DaemonProcess::Start() {
  const pid_t pid = fork();
  if (pid == 0) {
    const int log =
        open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log >= 0) {
      dup2(log, 2);
      dup2(log, 1);
    }
    execl(KEYHOLDD_PATH, "keyholdd", "--config", config_path_.c_str(),
          static_cast<char*>(nullptr));
    _exit(127);
  }
  pid_ = pid;
  client::Client probe(ClientOptions());
  for (int i = 0; i < 200; ++i) {
    if (probe.Ping().ok()) {
      return true;
    }
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

int DaemonProcess::Stop() {
  if (pid_ <= 0) {
    return -1;
  }
  kill(pid_, SIGTERM);
  int status = 0;
  // A graceful stop must not hang: 20 s (sanitizer builds are slow), then
  // SIGKILL and report it.
  for (int i = 0; i < 400; ++i) {
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      return status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ADD_FAILURE() << "keyholdd did not stop within 20 s of SIGTERM";
  Kill();
  return -1;
}

void DaemonProcess::Kill() {
  if (pid_ <= 0) {
    return;
  }
  kill(pid_, SIGKILL);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

std::string DaemonProcess::log() const {
  std::ifstream in(log_path_);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

client::Options DaemonProcess::ClientOptions() const {
  client::Options o;
  o.socket_path = socket_path_;
  o.connect_timeout = std::chrono::milliseconds(2000);
  o.call_timeout = std::chrono::milliseconds(30000);
  return o;
}

RawConnection::RawConnection(const std::string& socket_path) {
  fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un addr {};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
  if (connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr)) !=
      0) {
    close(fd_);
    fd_ = -1;
  }
}

RawConnection::~RawConnection() {
  if (fd_ >= 0) {
    close(fd_);
  }
}

bool RawConnection::Send(const std::string& bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n =
        send(fd_, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (n <= 0) {
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return true;
}

namespace {
bool ReadExactly(int fd, uint8_t* out, std::size_t len, int timeout_ms) {
  std::size_t done = 0;
  while (done < len) {
    struct pollfd p {
      fd, POLLIN, 0
    };
    if (poll(&p, 1, timeout_ms) <= 0) {
      return false;
    }
    const ssize_t n = recv(fd, out + done, len - done, 0);
    if (n <= 0) {
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return true;
}
}  // namespace

bool RawConnection::ReadResponse(v1::Response* out) {
  uint8_t header[4];
  if (!ReadExactly(fd_, header, 4, 5000)) {
    return false;
  }
  auto len = DecodeFrameHeader(header, kMaxResponseFrameBytes);
  if (!len.ok()) {
    return false;
  }
  std::vector<uint8_t> body(*len);
  if (!ReadExactly(fd_, body.data(), body.size(), 5000)) {
    return false;
  }
  return out->ParseFromArray(body.data(), static_cast<int>(body.size()));
}

bool RawConnection::ClosedByPeer(int timeout_ms) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      return false;
    }
    struct pollfd p {
      fd_, POLLIN, 0
    };
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) {
      return false;
    }
    char buf[256];
    const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) {
      return true;
    }
    if (n < 0) {
      return false;
    }
    // Data (e.g. an error response) before the close: keep reading.
  }
}

char RunAsUid(uid_t uid, const std::function<char()>& fn) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    return 'r';
  }
  const pid_t child = fork();
  if (child == 0) {
    close(pipe_fds[0]);
    char verdict = 'u';
    if (setgroups(0, nullptr) == 0 && setgid(uid) == 0 && setuid(uid) == 0) {
      verdict = fn();
    }
    _exit(write(pipe_fds[1], &verdict, 1) == 1 ? 0 : 1);
  }
  close(pipe_fds[1]);
  char verdict = 'r';
  if (child < 0 || read(pipe_fds[0], &verdict, 1) != 1) {
    verdict = 'r';
  }
  close(pipe_fds[0]);
  if (child > 0) {
    int status = 0;
    waitpid(child, &status, 0);
  }
  return verdict;
}

std::string Frame(const v1::Request& req) {
  return *EncodeFrame(req, kMaxResponseFrameBytes);
}

}  // namespace keyhold::testing
