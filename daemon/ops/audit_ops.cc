// The audit log, for admins: list records, verify the chain.
#include <algorithm>

#include "daemon/ops/ops.h"

namespace keyhold::daemon {

Status HandleAudit(OpContext& ctx, const OpArgs&, v1::Request& request,
                   v1::Response* response) {
  if (ctx.audit == nullptr) {
    return Unsupported("this daemon keeps no audit log");
  }
  const auto& op = request.audit();
  auto* out = response->mutable_audit();
  if (op.verify()) {
    auto check = ctx.audit->Verify();
    if (!check.ok()) {
      return check.status();
    }
    out->set_intact(check->intact);
    out->set_checked(check->records);
    out->set_problem(check->problem);
    out->set_first(check->first);
    out->set_files(static_cast<uint32_t>(check->files));
    return Status::Ok();
  }
  constexpr uint32_t kDefaultLimit = 100;
  constexpr uint32_t kMaxLimit = 10000;  // keeps the answer far below 16 MiB
  const uint32_t limit =
      op.limit() == 0 ? kDefaultLimit : std::min(op.limit(), kMaxLimit);
  auto records = ctx.audit->Read(
      op.key().empty() ? std::nullopt : std::optional<std::string>(op.key()),
      op.has_uid() ? std::optional<uint32_t>(op.uid()) : std::nullopt, limit);
  if (!records.ok()) {
    return records.status();
  }
  for (std::string& r : *records) {
    out->add_records(std::move(r));
  }
  return Status::Ok();
}

}  // namespace keyhold::daemon
