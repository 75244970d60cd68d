// keyhold ping | admin clients | admin delete-client
#include <memory>
#include <string>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands/commands.h"

namespace keyhold::cli {
namespace {

int RunPing(Context& ctx) {
  auto r = ctx.client().Hello();
  if (!r.ok()) {
    return Fail("ping", r.status());
  }
  return Print("ok (keyholdd " + r->daemon_version() + ", protocol " +
               std::to_string(r->version()) + ", you are uid " +
               std::to_string(r->caller_uid()) + ")\n");
}

int RunClients(Context& ctx) {
  auto r = ctx.client().ListClients();
  if (!r.ok()) {
    return Fail("admin clients", r.status());
  }
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"UID", "USER", "KEYS", "CONNECTIONS", "PIDS"});
  for (const auto& c : r->clients()) {
    std::string pids;
    for (uint32_t pid : c.pids()) {
      if (!pids.empty()) {
        pids += ',';
      }
      pids += std::to_string(pid);
    }
    const auto user = UserName(c.uid());
    rows.push_back({std::to_string(c.uid()), user ? *user : "-",
                    std::to_string(c.key_count()),
                    std::to_string(c.connections()),
                    pids.empty() ? "-" : pids});
  }
  return PrintTable(rows);
}

struct DeleteClientOptions {
  std::string user;
};

int RunDeleteClient(Context& ctx, const DeleteClientOptions& o) {
  const std::string what = "admin delete-client " + Quote(o.user);
  auto uid = ResolveUser(o.user);
  if (!uid.ok()) {
    return Fail(what, uid.status());
  }
  auto r = ctx.client().DeleteClient(*uid);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  return Print("deleted " + std::to_string(*r) + " keys of uid " +
               std::to_string(*uid) + "\n");
}

}  // namespace

void AddPingCommand(CLI::App& app, Action* action) {
  auto* sub = app.add_subcommand("ping", "Check that keyholdd answers");
  SetAction(sub, action, RunPing);
}

void AddAdminCommands(CLI::App& app, Action* action) {
  auto* admin =
      app.add_subcommand("admin", "Daemon administration (admins only)");
  admin->require_subcommand(1);
  {
    auto* sub = admin->add_subcommand("clients", "List the daemon's clients");
    SetAction(sub, action, RunClients);
  }
  {
    auto* sub = admin->add_subcommand(
        "delete-client",
        "Delete every key of a uid (before the uid is reused)");
    auto o = std::make_shared<DeleteClientOptions>();
    sub->add_option("USER", o->user, "User name or uid")
        ->required()
        ->option_text("UID|USER REQUIRED");
    SetAction(sub, action,
              [o](Context& ctx) { return RunDeleteClient(ctx, *o); });
  }
}

}  // namespace keyhold::cli
