// Operation handlers: one function per wire operation, grouped by family in
// key_ops.cc, crypto_ops.cc, share_ops.cc and admin_ops.cc. The dispatcher
// table (dispatcher.cc) says which permission each needs and has already
// authorized the caller against the key (OpArgs::key) before a handler runs.
#ifndef KEYHOLD_DAEMON_OPS_OPS_H_
#define KEYHOLD_DAEMON_OPS_OPS_H_

#include <chrono>
#include <map>
#include <memory>
#include <string>

#include "common/status.h"
#include "daemon/audit_log.h"
#include "daemon/backends/backend.h"
#include "daemon/client_registry.h"
#include "daemon/config.h"
#include "daemon/keystore/key_store.h"
#include "daemon/live_settings.h"
#include "daemon/op_stats.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::daemon {

// Everything a handler may use. Owned by main.cc; outlives every request.
struct OpContext {
  KeyStore* store = nullptr;
  std::map<std::string, backend::Backend*> backends;
  std::string default_backend;
  ClientRegistry* clients = nullptr;
  // Limits, admins, inline_crypto, audit_key_use (also record sign,
  // decrypt, derive): replaced as a whole on SIGHUP.
  LiveSettings settings;
  AuditLog* audit = nullptr;  // null: no audit log (unit tests)
  OpStats* stats = nullptr;   // null: not counted (unit tests)
  std::chrono::steady_clock::time_point started =
      std::chrono::steady_clock::now();
};

struct OpArgs {
  const Principal& caller;
  // Set for operations on an existing key: the key, already authorized for
  // the permission the dispatcher table lists.
  std::shared_ptr<const KeyRecord> key;
  // For operations that create a key: the reference in the caller's
  // namespace.
  KeyRef new_ref;
};

using OpHandler = Status (*)(OpContext& ctx, const OpArgs& args,
                             v1::Request& request, v1::Response* response);

// key_ops.cc
Status HandleHello(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandlePing(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleGenerateKey(OpContext&, const OpArgs&, v1::Request&,
                         v1::Response*);
Status HandleImportKey(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleGetPublicKey(OpContext&, const OpArgs&, v1::Request&,
                          v1::Response*);
Status HandleListKeys(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleDestroyKey(OpContext&, const OpArgs&, v1::Request&,
                        v1::Response*);
// audit_ops.cc
Status HandleAudit(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleStats(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
// cert_ops.cc
Status HandleSetCertificate(OpContext&, const OpArgs&, v1::Request&,
                            v1::Response*);
// crypto_ops.cc
Status HandleSign(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleDecrypt(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleDerive(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
// share_ops.cc
Status HandleGrantUse(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
Status HandleRevokeUse(OpContext&, const OpArgs&, v1::Request&, v1::Response*);
// admin_ops.cc
Status HandleListClients(OpContext&, const OpArgs&, v1::Request&,
                         v1::Response*);
Status HandleDeleteClient(OpContext&, const OpArgs&, v1::Request&,
                          v1::Response*);

// Helpers shared by the handlers.
backend::KeyHandle HandleFor(const KeyRecord& record);
StatusOr<backend::Backend*> BackendFor(OpContext& ctx, const std::string& name);
void FillKeyInfo(const KeyRecord& record, bool include_grants,
                 v1::KeyInfo* info);
// Before a key's row is deleted: marks its backend object pending (see
// Backend::Retire); an error means the row must stay.
Status RetireInBackend(OpContext& ctx, const KeyRecord& key);
// Tells the key's backend to forget it after its row is gone; a failure is
// logged (the row is already gone, so the key is unusable either way).
void ForgetInBackend(OpContext& ctx, const KeyRecord& key);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_OPS_OPS_H_
