// Component loggers: every line keyholdd logs names the part of the daemon
// that wrote it ("2026-11-22T15:04:05.123 info [pkcs11] ..."), so an admin
// can filter a journal by component. Each component has its own spdlog
// logger, named after it, sharing the sinks of the default logger that
// keyholdd's main() sets up; spdlog::set_level (start-up and SIGHUP) applies
// to all of them.
//
// Usage, once per .cc file (the static makes the lookup happen once, not on
// every log call, which matters on the request path):
//   namespace {
//   spdlog::logger& Log() {
//     static const auto logger = ComponentLog("server");
//     return *logger;
//   }
//   }  // namespace
// then Log().info("...", ...). Never log key material, PINs or plaintexts.
#ifndef KEYHOLD_DAEMON_LOG_H_
#define KEYHOLD_DAEMON_LOG_H_

#include <spdlog/spdlog.h>

#include <memory>
#include <mutex>
#include <string>

namespace keyhold::daemon {

// The logger named `name`, created on first use from the default logger's
// sinks, level and pattern, and registered so spdlog::set_level reaches it.
// Thread-safe.
inline std::shared_ptr<spdlog::logger> ComponentLog(const std::string& name) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  std::shared_ptr<spdlog::logger> logger = spdlog::get(name);
  if (!logger) {
    logger = spdlog::default_logger()->clone(name);
    spdlog::initialize_logger(logger);  // registers; global level applies
  }
  return logger;
}

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_LOG_H_
