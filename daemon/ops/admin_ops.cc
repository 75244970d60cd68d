// Admin operations (Permission::kAdmin): list clients, delete a client's keys
// before its uid is reused (Parsec threat O-11).
#include <spdlog/spdlog.h>

#include <set>

#include "daemon/ops/ops.h"

namespace keyhold::daemon {

Status HandleListClients(OpContext& ctx, const OpArgs&, v1::Request&,
                         v1::Response* response) {
  auto counts = ctx.store->CountByOwner();
  if (!counts.ok()) {
    return counts.status();
  }
  const auto connected = ctx.clients->Snapshot();
  std::set<uint32_t> uids;
  for (const auto& [uid, n] : *counts) {
    uids.insert(uid);
  }
  for (const auto& [uid, entry] : connected) {
    uids.insert(uid);
  }
  auto* out = response->mutable_list_clients();
  for (uint32_t uid : uids) {
    v1::ClientInfo* info = out->add_clients();
    info->set_uid(uid);
    if (auto it = counts->find(uid); it != counts->end()) {
      info->set_key_count(it->second);
    }
    if (auto it = connected.find(uid); it != connected.end()) {
      info->set_connections(it->second.connections);
      for (const auto& [pid, n] : it->second.pids) {
        info->add_pids(static_cast<uint32_t>(pid));
      }
    }
  }
  return Status::Ok();
}

Status HandleDeleteClient(OpContext& ctx, const OpArgs& args,
                          v1::Request& request, v1::Response* response) {
  const uint32_t uid = request.delete_client().uid();
  auto removed = ctx.store->DeleteAllOf(uid);
  if (!removed.ok()) {
    return removed.status();
  }
  for (const KeyRecord& key : *removed) {
    ForgetInBackend(ctx, key);
  }
  spdlog::info("admin uid {} deleted client uid {} ({} keys)", args.caller.uid,
               uid, removed->size());
  response->mutable_delete_client()->set_keys_deleted(
      static_cast<uint32_t>(removed->size()));
  return Status::Ok();
}

}  // namespace keyhold::daemon
