// Starts a real keyholdd on a temporary socket and state directory, for the
// cross-component tests. Stops it by process id.
#ifndef KEYHOLD_TESTS_HARNESS_DAEMON_PROCESS_H_
#define KEYHOLD_TESTS_HARNESS_DAEMON_PROCESS_H_

#include <sys/types.h>

#include <functional>
#include <string>
#include <vector>

#include "common/client/client.h"

namespace keyhold::testing {

class DaemonProcess {
 public:
  // Creates a fresh temporary directory (0755, so other uids can reach the
  // socket) holding state/ and keyhold.sock. extra_config is appended to the
  // generated TOML config.
  explicit DaemonProcess(std::string extra_config = "");
  // Stops the daemon, fails the test if its log holds a sanitizer report,
  // and removes the directory.
  ~DaemonProcess();

  // Starts keyholdd and waits until it answers a ping. Returns false (and
  // keeps the log) if it does not come up within 10 s.
  bool Start();
  // SIGTERM and wait (at most 20 s, then SIGKILL and a test failure);
  // returns the wait status.
  int Stop();
  // SIGKILL and wait.
  void Kill();
  bool Running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  const std::string& socket_path() const { return socket_path_; }
  const std::string& dir() const { return dir_; }
  std::string state_dir() const { return dir_ + "/state"; }
  std::string log() const;  // the daemon's stderr so far

  // Rewrites the config file (the generated base plus extra_config, as the
  // constructor did) and sends SIGHUP. Returns the daemon's log line saying
  // whether it reloaded or rejected the file, "" if none came within 10 s.
  std::string Reload(const std::string& extra_config);

  client::Options ClientOptions() const;

 private:
  std::string dir_;
  std::string socket_path_;
  std::string config_path_;
  void WriteConfig(const std::string& extra_config);
  std::string log_path_;
  pid_t pid_ = -1;
};

// Runs fn in a forked child as uid:gid (no supplementary groups) and returns
// the one-byte verdict it reports: fn's result, 'u' if the child could not
// switch uid, 'r' if no verdict arrived. For tests that act as a second
// user; the caller must be root.
char RunAsUid(uid_t uid, const std::function<char()>& fn);

// A raw connection for bad-input tests: no framing help, no checks.
class RawConnection {
 public:
  explicit RawConnection(const std::string& socket_path);
  ~RawConnection();
  bool ok() const { return fd_ >= 0; }
  bool Send(const std::string& bytes);
  // Reads one response frame; false on EOF, error or 5 s without data.
  bool ReadResponse(v1::Response* out);
  // True once the daemon has closed the connection (EOF within timeout_ms).
  bool ClosedByPeer(int timeout_ms);
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
};

std::string Frame(const v1::Request& req);

}  // namespace keyhold::testing

#endif  // KEYHOLD_TESTS_HARNESS_DAEMON_PROCESS_H_
