// The dispatcher: the one table of operations, the permission each needs, and
// the code that enforces it before a handler runs.
#ifndef KEYHOLD_DAEMON_DISPATCHER_H_
#define KEYHOLD_DAEMON_DISPATCHER_H_

#include <optional>
#include <span>
#include <string_view>

#include "daemon/ops/ops.h"

namespace keyhold::daemon {

enum class Permission : uint8_t {
  kAnyone,        // no key involved (hello, ping, list own keys)
  kOwnNamespace,  // creates a key; the reference must be in the caller's
                  // namespace
  kKeyUse,        // the key's owner or a grantee
  kKeyOwner,      // the key's owner only
  kAdmin,         // a uid listed in the config's admins
};

// Where an operation runs. I/O threads handle a request inline when it costs
// bounded CPU only; anything that may wait (fsync of a key store write, key
// generation, a device) runs on the blocking pool so it never holds up I/O.
enum class Execution : uint8_t {
  kInline,     // cheap and bounded: answered on the I/O thread
  kBlocking,   // always on the blocking pool
  kByBackend,  // inline if the key's record is cached and its backend
               // does not block (Backend::MayBlock()), else the pool
};

struct OpEntry {
  v1::Request::OpCase op;
  std::string_view name;
  Permission permission;
  Execution execution;
  OpHandler handler;
  // Where the request names its key (kOwnNamespace, kKeyUse, kKeyOwner).
  const v1::KeyRef& (*key_of)(const v1::Request&);
};

// The table, for tests and docs.
std::span<const OpEntry> OpTable();
// Short name of an operation ("sign"), "unknown" if absent from the table.
std::string_view OpName(v1::Request::OpCase op);

class Dispatcher {
 public:
  explicit Dispatcher(OpContext* ctx) : ctx_(ctx) {}

  // Runs one request for caller and returns the response (same id). Never
  // throws: a handler exception becomes kInternal. May block.
  v1::Response Handle(const Principal& caller, v1::Request& request);

  // For I/O threads: handles the request if its table entry allows it to run
  // inline (for kByBackend: if the key's backend does not block), else
  // returns nullopt and the caller hands it to Handle() on the blocking pool.
  // When it returns nullopt for a kByBackend request whose key record is
  // cached but whose backend may block (a TPM or HSM key use, which takes
  // bounded time unless the device misbehaves), *device_key_use is set: the
  // caller may run Handle() itself if it can spare the thread (server.h).
  std::optional<v1::Response> TryHandleInline(const Principal& caller,
                                              v1::Request& request,
                                              bool* device_key_use = nullptr);

 private:
  // Records the request in the audit log if it is one that is audited.
  void Audit(const Principal& caller, const v1::Request& request,
             const OpEntry* entry, const Status& status);

  OpContext* ctx_;
};

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_DISPATCHER_H_
