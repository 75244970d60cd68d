// Sharing: the owner grants or revokes use of a key to a uid or gid.
#include <spdlog/spdlog.h>

#include "daemon/log.h"
#include "daemon/ops/ops.h"

namespace keyhold::daemon {

namespace {
spdlog::logger& Log() {
  static const auto logger = keyhold::daemon::ComponentLog("ops");
  return *logger;
}

StatusOr<GrantEntry> ToGrant(const v1::Grant& g) {
  switch (g.kind()) {
    case v1::Grant::USER:
      return GrantEntry{GrantEntry::Kind::kUser, g.id()};
    case v1::Grant::GROUP:
      return GrantEntry{GrantEntry::Kind::kGroup, g.id()};
    default:
      return InvalidArgument("grant needs a user or a group");
  }
}

}  // namespace

Status HandleGrantUse(OpContext& ctx, const OpArgs& args, v1::Request& request,
                      v1::Response* response) {
  auto grant = ToGrant(request.grant_use().grantee());
  if (!grant.ok()) {
    return grant.status();
  }
  if (grant->kind == GrantEntry::Kind::kUser && grant->id == args.caller.uid) {
    return InvalidArgument("you already own this key");
  }
  KH_RETURN_IF_ERROR(ctx.store->AddGrant(args.key->ref, *grant));
  Log().info("key {}: use granted to {} {}", args.key->ref.ToString(),
             grant->kind == GrantEntry::Kind::kUser ? "uid" : "gid", grant->id);
  response->mutable_grant_use();
  return Status::Ok();
}

Status HandleRevokeUse(OpContext& ctx, const OpArgs& args, v1::Request& request,
                       v1::Response* response) {
  auto grant = ToGrant(request.revoke_use().grantee());
  if (!grant.ok()) {
    return grant.status();
  }
  KH_RETURN_IF_ERROR(ctx.store->RemoveGrant(args.key->ref, *grant));
  Log().info("key {}: use revoked from {} {}", args.key->ref.ToString(),
             grant->kind == GrantEntry::Kind::kUser ? "uid" : "gid", grant->id);
  response->mutable_revoke_use();
  return Status::Ok();
}

}  // namespace keyhold::daemon
