// Key lifecycle operations: hello, ping, generate, import, public key, list,
// destroy.
#include <openssl/sha.h>
#include <spdlog/spdlog.h>

#include "common/frame.h"
#include "common/key_types.h"
#include "common/secret.h"
#include "daemon/log.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("ops");
  return *logger;
}
}  // namespace

backend::KeyHandle HandleFor(const KeyRecord& record) {
  return backend::KeyHandle{record.id, record.ref, record.type, record.blob};
}

StatusOr<backend::Backend*> BackendFor(OpContext& ctx,
                                       const std::string& name) {
  const std::string& wanted = name.empty() ? ctx.default_backend : name;
  auto it = ctx.backends.find(wanted);
  if (it == ctx.backends.end()) {
    return InvalidArgument("no backend named '" + wanted + "'");
  }
  return it->second;
}

void FillKeyInfo(const KeyRecord& record, bool include_grants,
                 v1::KeyInfo* info) {
  info->set_owner(record.ref.owner);
  info->set_name(record.ref.name);
  info->set_type(record.type);
  info->set_usage(record.usage);
  info->set_backend(record.backend);
  info->set_created_unix(record.created_unix);
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(record.public_key.data(), record.public_key.size(), digest);
  info->set_public_key_sha256(reinterpret_cast<const char*>(digest),
                              sizeof(digest));
  info->set_certificate(record.certificate.data(), record.certificate.size());
  if (include_grants) {
    for (const GrantEntry& g : record.grants) {
      v1::Grant* out = info->add_grants();
      out->set_kind(g.kind == GrantEntry::Kind::kUser ? v1::Grant::USER
                                                      : v1::Grant::GROUP);
      out->set_id(g.id);
    }
  }
}

Status RetireInBackend(OpContext& ctx, const KeyRecord& key) {
  auto backend = BackendFor(ctx, key.backend);
  if (!backend.ok()) {
    return Status::Ok();  // its backend is not configured: nothing to mark
  }
  return (*backend)->Retire(HandleFor(key));
}

void ForgetInBackend(OpContext& ctx, const KeyRecord& key) {
  auto backend = BackendFor(ctx, key.backend);
  if (!backend.ok()) {
    return;
  }
  Status st = (*backend)->Destroy(HandleFor(key));
  if (!st.ok()) {
    Log().warn(
        "key {}: backend cleanup failed: {} (a pending token object is "
        "removed at the next start)",
        key.ref.ToString(), st.ToString());
  }
}

namespace {

// Stores a key the backend just created. If the store refuses (a duplicate
// name raced in, a full disk), the backend object is destroyed again so
// nothing is left orphaned.
Status StoreNewKey(OpContext& ctx, backend::Backend* backend, const KeyRef& ref,
                   backend::CreatedKey created, v1::KeyInfo* info,
                   std::string* public_key) {
  KeyRecord record;
  record.ref = ref;
  record.backend = std::string(backend->Name());
  record.type = created.type;
  record.usage = DefaultUsage(created.type);
  record.public_key = std::move(created.public_key);
  record.blob = std::move(created.blob);
  Status st = ctx.store->Insert(record);
  if (!st.ok()) {
    (void)backend->Destroy(HandleFor(record));
    return st;
  }
  backend->Recorded(HandleFor(record));
  FillKeyInfo(record, /*include_grants=*/true, info);
  public_key->assign(record.public_key.begin(), record.public_key.end());
  Log().info("key {} created ({}, backend {})", ref.ToString(),
             KeyTypeName(record.type), record.backend);
  return Status::Ok();
}

Status CheckFreeName(OpContext& ctx, const Principal& caller,
                     const KeyRef& ref) {
  // Cheap early refusal, so a duplicate name does not cost a key generation.
  // Insert() re-checks atomically.
  auto existing = ctx.store->Authorize(caller, ref, Right::kManage);
  if (existing.ok()) {
    return AlreadyExists("key '" + ref.name + "' already exists");
  }
  return Status::Ok();
}

}  // namespace

Status HandleHello(OpContext& ctx, const OpArgs& args, v1::Request& request,
                   v1::Response* response) {
  if (request.hello().version() < 1) {
    return Unsupported("protocol version 0 is not supported");
  }
  auto* out = response->mutable_hello();
  out->set_version(kProtocolVersion);
  const auto settings = ctx.settings.Get();
  out->set_max_frame_bytes(settings->limits.max_frame_bytes);
  out->set_max_in_flight(settings->limits.max_in_flight_per_connection);
  out->set_caller_uid(args.caller.uid);
  out->set_daemon_version(KEYHOLD_VERSION);
  return Status::Ok();
}

Status HandlePing(OpContext&, const OpArgs&, v1::Request&,
                  v1::Response* response) {
  response->mutable_ping();
  return Status::Ok();
}

Status HandleGenerateKey(OpContext& ctx, const OpArgs& args,
                         v1::Request& request, v1::Response* response) {
  const auto& op = request.generate_key();
  if (KeyTypeName(op.type()) == "unknown") {
    return Unsupported("unsupported key type");
  }
  auto backend = BackendFor(ctx, op.backend());
  if (!backend.ok()) {
    return backend.status();
  }
  KH_RETURN_IF_ERROR(CheckFreeName(ctx, args.caller, args.new_ref));
  auto created = (*backend)->Generate(args.new_ref, op.type());
  if (!created.ok()) {
    return created.status();
  }
  auto* out = response->mutable_generate_key();
  return StoreNewKey(ctx, *backend, args.new_ref, std::move(*created),
                     out->mutable_info(), out->mutable_public_key());
}

Status HandleImportKey(OpContext& ctx, const OpArgs& args, v1::Request& request,
                       v1::Response* response) {
  auto* op = request.mutable_import_key();
  // Take the key out of the protobuf buffer at once and wipe the buffer.
  SecretBytes private_key = SecretBytes::TakeFrom(*op->mutable_private_key());
  if (private_key.empty()) {
    return InvalidArgument("no private key given");
  }
  auto backend = BackendFor(ctx, op->backend());
  if (!backend.ok()) {
    return backend.status();
  }
  KH_RETURN_IF_ERROR(CheckFreeName(ctx, args.caller, args.new_ref));
  auto created = (*backend)->Import(args.new_ref, private_key);
  if (!created.ok()) {
    return created.status();
  }
  auto* out = response->mutable_import_key();
  return StoreNewKey(ctx, *backend, args.new_ref, std::move(*created),
                     out->mutable_info(), out->mutable_public_key());
}

Status HandleGetPublicKey(OpContext&, const OpArgs& args, v1::Request&,
                          v1::Response* response) {
  auto* out = response->mutable_get_public_key();
  const KeyRecord& key = *args.key;
  FillKeyInfo(key, key.ref.owner == args.caller.uid, out->mutable_info());
  out->set_public_key(key.public_key.data(), key.public_key.size());
  return Status::Ok();
}

Status HandleListKeys(OpContext& ctx, const OpArgs& args, v1::Request& request,
                      v1::Response* response) {
  auto* out = response->mutable_list_keys();
  auto owned = ctx.store->ListOwned(args.caller.uid);
  if (!owned.ok()) {
    return owned.status();
  }
  for (const KeyRecord& r : *owned) {
    FillKeyInfo(r, /*include_grants=*/true, out->add_keys());
  }
  if (request.list_keys().include_shared()) {
    auto shared = ctx.store->ListSharedWith(args.caller);
    if (!shared.ok()) {
      return shared.status();
    }
    for (const KeyRecord& r : *shared) {
      FillKeyInfo(r, /*include_grants=*/false, out->add_keys());
    }
  }
  return Status::Ok();
}

Status HandleDestroyKey(OpContext& ctx, const OpArgs& args, v1::Request&,
                        v1::Response* response) {
  const KeyRecord& key = *args.key;
  // Marked pending first (an HSM object), then the row goes, then the
  // object: a crash in between leaves a pending object no row records,
  // which the next start removes, never a row pointing at nothing. A token
  // that cannot be reached now refuses the delete; the key stays usable.
  KH_RETURN_IF_ERROR(RetireInBackend(ctx, key));
  KH_RETURN_IF_ERROR(ctx.store->Delete(key.ref, key.id));
  ForgetInBackend(ctx, key);
  Log().info("key {} deleted by uid {}", key.ref.ToString(), args.caller.uid);
  response->mutable_destroy_key();
  return Status::Ok();
}

}  // namespace keyhold::daemon
