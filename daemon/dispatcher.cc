#include "daemon/dispatcher.h"

#include <spdlog/spdlog.h>

#include <array>
#include <exception>

#include "common/key_types.h"
#include "daemon/log.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("dispatch");
  return *logger;
}

using R = v1::Request;

#define KH_KEY_OF(field) \
  [](const R& r) -> const v1::KeyRef& { return r.field().key(); }

// Every operation the daemon accepts. Reviewers audit this table: an
// operation missing here does not exist, and its permission is enforced by
// Dispatcher::Handle before the handler sees the request.
constexpr std::array<OpEntry, 17> kOps = {{
    {R::kHello, "hello", Permission::kAnyone, Execution::kInline, HandleHello,
     nullptr},
    {R::kPing, "ping", Permission::kAnyone, Execution::kInline, HandlePing,
     nullptr},
    {R::kGenerateKey, "generate-key", Permission::kOwnNamespace,
     Execution::kBlocking, HandleGenerateKey, KH_KEY_OF(generate_key)},
    {R::kImportKey, "import-key", Permission::kOwnNamespace,
     Execution::kBlocking, HandleImportKey, KH_KEY_OF(import_key)},
    {R::kGetPublicKey, "get-public-key", Permission::kKeyUse,
     Execution::kByBackend, HandleGetPublicKey, KH_KEY_OF(get_public_key)},
    {R::kListKeys, "list-keys", Permission::kAnyone, Execution::kBlocking,
     HandleListKeys, nullptr},
    {R::kDestroyKey, "destroy-key", Permission::kKeyOwner, Execution::kBlocking,
     HandleDestroyKey, KH_KEY_OF(destroy_key)},
    {R::kSign, "sign", Permission::kKeyUse, Execution::kByBackend, HandleSign,
     KH_KEY_OF(sign)},
    {R::kDecrypt, "decrypt", Permission::kKeyUse, Execution::kByBackend,
     HandleDecrypt, KH_KEY_OF(decrypt)},
    {R::kDerive, "derive", Permission::kKeyUse, Execution::kByBackend,
     HandleDerive, KH_KEY_OF(derive)},
    {R::kGrantUse, "grant-use", Permission::kKeyOwner, Execution::kBlocking,
     HandleGrantUse, KH_KEY_OF(grant_use)},
    {R::kRevokeUse, "revoke-use", Permission::kKeyOwner, Execution::kBlocking,
     HandleRevokeUse, KH_KEY_OF(revoke_use)},
    {R::kSetCertificate, "set-certificate", Permission::kKeyOwner,
     Execution::kBlocking, HandleSetCertificate, KH_KEY_OF(set_certificate)},
    {R::kListClients, "list-clients", Permission::kAdmin, Execution::kBlocking,
     HandleListClients, nullptr},
    {R::kDeleteClient, "delete-client", Permission::kAdmin,
     Execution::kBlocking, HandleDeleteClient, nullptr},
    {R::kAudit, "audit", Permission::kAdmin, Execution::kBlocking, HandleAudit,
     nullptr},
    {R::kStats, "stats", Permission::kAdmin, Execution::kInline, HandleStats,
     nullptr},
}};

#undef KH_KEY_OF

const OpEntry* Find(R::OpCase op) {
  for (const OpEntry& e : kOps) {
    if (e.op == op) {
      return &e;
    }
  }
  return nullptr;
}

// Resolves the request's key reference against the caller's namespace.
StatusOr<KeyRef> ResolveRef(const Principal& caller, const v1::KeyRef& wire) {
  KH_RETURN_IF_ERROR(ValidateKeyName(wire.name()));
  return KeyRef{wire.has_owner() ? wire.owner() : caller.uid, wire.name()};
}

Status Authorize(OpContext& ctx, const OpEntry& entry, const Principal& caller,
                 const R& request, OpArgs* args) {
  switch (entry.permission) {
    case Permission::kAnyone:
      return Status::Ok();
    case Permission::kAdmin:
      if (!ctx.settings.IsAdmin(caller.uid)) {
        return PermissionDenied("operation '" + std::string(entry.name) +
                                "' is for keyhold admins only");
      }
      return Status::Ok();
    case Permission::kOwnNamespace: {
      auto ref = ResolveRef(caller, entry.key_of(request));
      if (!ref.ok()) {
        return ref.status();
      }
      if (ref->owner != caller.uid) {
        return PermissionDenied(
            "keys can only be created in your own namespace");
      }
      args->new_ref = std::move(*ref);
      return Status::Ok();
    }
    case Permission::kKeyUse:
    case Permission::kKeyOwner: {
      auto ref = ResolveRef(caller, entry.key_of(request));
      if (!ref.ok()) {
        return ref.status();
      }
      auto key = ctx.store->Authorize(caller, *ref,
                                      entry.permission == Permission::kKeyUse
                                          ? Right::kUse
                                          : Right::kManage);
      if (!key.ok()) {
        return key.status();
      }
      args->key = std::move(*key);
      return Status::Ok();
    }
  }
  return Internal("unhandled permission");
}

}  // namespace

std::span<const OpEntry> OpTable() { return kOps; }

std::string_view OpName(v1::Request::OpCase op) {
  const OpEntry* e = Find(op);
  return e == nullptr ? "unknown" : e->name;
}

std::optional<v1::Response> Dispatcher::TryHandleInline(const Principal& caller,
                                                        v1::Request& request,
                                                        bool* device_key_use) {
  if (device_key_use != nullptr) {
    *device_key_use = false;
  }
  const OpEntry* entry = Find(request.op_case());
  if (entry == nullptr || entry->execution == Execution::kInline) {
    return Handle(caller, request);
  }
  if (entry->execution == Execution::kBlocking ||
      !ctx_->settings.inline_crypto()) {
    return std::nullopt;
  }
  // kByBackend: inline only if the key's record is already in memory (a
  // miss would read the database, which may wait behind a write's fsync)
  // and its backend does not block. A malformed reference is answered
  // inline: that is just an error. Handle() authorizes; nothing is decided
  // here.
  auto ref = ResolveRef(caller, entry->key_of(request));
  if (ref.ok()) {
    auto backend = ctx_->store->CachedBackend(*ref);
    if (!backend) {
      return std::nullopt;
    }
    auto it = ctx_->backends.find(*backend);
    if (it != ctx_->backends.end() && it->second->MayBlock()) {
      if (device_key_use != nullptr) {
        *device_key_use = true;
      }
      return std::nullopt;
    }
  }
  return Handle(caller, request);
}

namespace {

// A use of a private key: what audit_key_use and audit_key_use_per_minute
// are about.
bool IsKeyUse(v1::Request::OpCase op) {
  return op == R::kSign || op == R::kDecrypt || op == R::kDerive;
}

// What the audit log records: everything that changes keys, grants or
// clients, every admin operation, and (audit_key_use) every private-key use;
// not the reads a client makes all the time (hello, ping, public key, list).
bool Audited(const OpContext& ctx, v1::Request::OpCase op) {
  if (IsKeyUse(op)) {
    return ctx.settings.audit_key_use();
  }
  switch (op) {
    case R::kHello:
    case R::kPing:
    case R::kGetPublicKey:
    case R::kListKeys:
    case R::OP_NOT_SET:
      return false;
    default:
      return true;
  }
}

std::string AuditDetail(const v1::Request& request) {
  const v1::Grant* g = nullptr;
  if (request.has_grant_use()) {
    g = &request.grant_use().grantee();
  } else if (request.has_revoke_use()) {
    g = &request.revoke_use().grantee();
  }
  if (g != nullptr) {
    return std::string(g->kind() == v1::Grant::GROUP ? "gid " : "uid ") +
           std::to_string(g->id());
  }
  if (request.has_delete_client()) {
    return "uid " + std::to_string(request.delete_client().uid());
  }
  if (request.has_set_certificate()) {
    return request.set_certificate().certificate().empty() ? "removed"
                                                           : "stored";
  }
  if (request.has_audit()) {
    return request.audit().verify() ? "verify" : "show";
  }
  return "";
}

}  // namespace

void Dispatcher::Audit(const Principal& caller, const v1::Request& request,
                       const OpEntry* entry, const Status& status) {
  if (ctx_->audit == nullptr || entry == nullptr ||
      !Audited(*ctx_, request.op_case())) {
    return;
  }
  AuditEvent e;
  e.uid = caller.uid;
  e.pid = caller.pid;
  e.exe = caller.exe;
  e.op = std::string(entry->name);
  if (entry->key_of != nullptr) {
    const v1::KeyRef& wire = entry->key_of(request);
    e.key = std::to_string(wire.has_owner() ? wire.owner() : caller.uid) + "/" +
            wire.name();
  }
  e.result = status.ok() ? "ok" : std::string(CodeName(status.code()));
  e.detail = AuditDetail(request);
  if (IsKeyUse(request.op_case()) &&
      ctx_->settings.audit_key_use_per_minute()) {
    ctx_->audit->CountUse(e);  // written with the next minute's records
    return;
  }
  if (Status st = ctx_->audit->Append(e); !st.ok()) {
    Log().error("audit log: {} (op {} by uid {} not recorded)", st.message(),
                e.op, e.uid);
  }
}

v1::Response Dispatcher::Handle(const Principal& caller, v1::Request& request) {
  const auto start = std::chrono::steady_clock::now();
  v1::Response response;
  response.set_id(request.id());
  Status status;
  const OpEntry* entry = Find(request.op_case());
  if (entry == nullptr) {
    status = Unsupported("unknown operation");
  } else {
    try {
      OpArgs args{caller, nullptr, {}};
      status = Authorize(*ctx_, *entry, caller, request, &args);
      if (status.ok()) {
        status = entry->handler(*ctx_, args, request, &response);
      }
    } catch (const std::exception& e) {
      Log().error("op {} for uid {}: exception: {}", entry->name, caller.uid,
                  e.what());
      status = Internal("internal error");
    }
  }
  Audit(caller, request, entry, status);
  if (!status.ok()) {
    // Details of internal failures stay in the log; the client gets the
    // category.
    if (status.code() == Code::kInternal) {
      Log().warn("op {} for uid {} pid {} failed: {}",
                 OpName(request.op_case()), caller.uid, caller.pid,
                 status.message());
    } else {
      Log().debug("op {} for uid {} pid {}: {}", OpName(request.op_case()),
                  caller.uid, caller.pid, status.ToString());
    }
    const uint64_t id = response.id();
    response.Clear();
    response.set_id(id);
    response.set_code(static_cast<v1::Code>(status.code()));
    response.set_message(status.code() == Code::kInternal ? "internal error"
                                                          : status.message());
  } else {
    Log().debug("op {} for uid {} pid {}: ok", OpName(request.op_case()),
                caller.uid, caller.pid);
  }
  if (ctx_->stats != nullptr) {
    ctx_->stats->Record(static_cast<uint32_t>(request.op_case()), status.ok(),
                        std::chrono::steady_clock::now() - start);
  }
  return response;
}

}  // namespace keyhold::daemon
