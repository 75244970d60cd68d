// Admin operations (Permission::kAdmin): list clients, delete a client's keys
// before its uid is reused (Parsec threat O-11), the daemon's statistics.
#include <spdlog/spdlog.h>

#include <set>

#include "daemon/dispatcher.h"
#include "daemon/log.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("ops");
  return *logger;
}
}  // namespace

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
  // As for one key (HandleDestroyKey): every backend object is marked
  // pending before the rows go; an unreachable token refuses the whole
  // request and nothing is deleted.
  auto owned = ctx.store->ListOwned(uid);
  if (!owned.ok()) {
    return owned.status();
  }
  for (const KeyRecord& key : *owned) {
    KH_RETURN_IF_ERROR(RetireInBackend(ctx, key));
  }
  auto removed = ctx.store->DeleteAllOf(uid);
  if (!removed.ok()) {
    return removed.status();
  }
  for (const KeyRecord& key : *removed) {
    ForgetInBackend(ctx, key);
  }
  Log().info("admin uid {} deleted client uid {} ({} keys)", args.caller.uid,
             uid, removed->size());
  response->mutable_delete_client()->set_keys_deleted(
      static_cast<uint32_t>(removed->size()));
  return Status::Ok();
}

Status HandleStats(OpContext& ctx, const OpArgs&, v1::Request&,
                   v1::Response* response) {
  auto* out = response->mutable_stats();
  out->set_daemon_version(KEYHOLD_VERSION);
  out->set_uptime_seconds(
      static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::seconds>(
                                std::chrono::steady_clock::now() - ctx.started)
                                .count()));
  out->set_connections(ctx.clients != nullptr ? ctx.clients->Total() : 0);
  for (const auto& [name, backend] : ctx.backends) {
    v1::BackendState* b = out->add_backends();
    b->set_name(name);
    b->set_state(backend->State());
    b->set_calls_in_progress(backend->CallsInProgress());
  }
  if (ctx.stats == nullptr) {
    return Status::Ok();
  }
  const auto name_of = [](uint32_t op) {
    return std::string(OpName(static_cast<v1::Request::OpCase>(op)));
  };
  for (const OpSummary& s : ctx.stats->Summaries(name_of)) {
    v1::OpStats* o = out->add_ops();
    o->set_op(s.op);
    o->set_count(s.count);
    o->set_errors(s.errors);
    o->set_p50_us(s.p50_us);
    o->set_p90_us(s.p90_us);
    o->set_p99_us(s.p99_us);
    o->set_max_us(s.max_us);
  }
  return Status::Ok();
}

}  // namespace keyhold::daemon
