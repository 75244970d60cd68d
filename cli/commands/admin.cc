// keyhold ping | admin clients | admin delete-client | admin audit |
// admin stats
#include <cstdio>
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

struct AuditShowOptions {
  std::string key;
  std::string user;
  uint32_t limit = 100;
};

int RunAuditShow(Context& ctx, const AuditShowOptions& o) {
  const std::string what = "admin audit show";
  v1::AuditRequest req;
  if (!o.key.empty()) {
    auto ref = ResolveKeyRef(o.key);
    if (!ref.ok()) {
      return Fail(what, ref.status());
    }
    // Records name keys by owner uid: NAME alone is the caller's own.
    auto self = ctx.client().Hello();
    if (!self.ok()) {
      return Fail(what, self.status());
    }
    req.set_key(
        std::to_string(ref->has_owner() ? ref->owner() : self->caller_uid()) +
        "/" + ref->name());
  }
  if (!o.user.empty()) {
    auto uid = ResolveUser(o.user);
    if (!uid.ok()) {
      return Fail(what, uid.status());
    }
    req.set_uid(*uid);
  }
  req.set_limit(o.limit);
  auto r = ctx.client().Audit(req);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  std::string out;
  for (const std::string& record : r->records()) {
    out += record + "\n";
  }
  return Print(out);
}

int RunAuditVerify(Context& ctx) {
  v1::AuditRequest req;
  req.set_verify(true);
  auto r = ctx.client().Audit(req);
  if (!r.ok()) {
    return Fail("admin audit verify", r.status());
  }
  if (!r->intact()) {
    std::fprintf(
        stderr, "keyhold: audit log NOT intact after %llu records: %s\n",
        static_cast<unsigned long long>(r->checked()), r->problem().c_str());
    return 1;
  }
  std::string out =
      "audit log intact: " + std::to_string(r->checked()) + " records";
  if (r->files() > 1) {
    out += " in " + std::to_string(r->files()) + " files";
  }
  if (r->first() > 1) {
    out += ", from record " + std::to_string(r->first()) + " (records 1 to " +
           std::to_string(r->first() - 1) + " were rotated away)";
  }
  return Print(out + "\n");
}

struct StatsOptions {
  bool json = false;
};

int RunStats(Context& ctx, const StatsOptions& o) {
  auto r = ctx.client().Stats();
  if (!r.ok()) {
    return Fail("admin stats", r.status());
  }
  if (o.json) {
    std::string out =
        "{\"daemon_version\": " + JsonString(r->daemon_version()) +
        ", \"uptime_seconds\": " + std::to_string(r->uptime_seconds()) +
        ", \"connections\": " + std::to_string(r->connections()) +
        ", \"ops\": [";
    for (int i = 0; i < r->ops_size(); ++i) {
      const auto& s = r->ops(i);
      out += (i == 0 ? "" : ", ");
      out += "{\"op\": " + JsonString(s.op()) +
             ", \"count\": " + std::to_string(s.count()) +
             ", \"errors\": " + std::to_string(s.errors()) +
             ", \"p50_us\": " + std::to_string(s.p50_us()) +
             ", \"p90_us\": " + std::to_string(s.p90_us()) +
             ", \"p99_us\": " + std::to_string(s.p99_us()) +
             ", \"max_us\": " + std::to_string(s.max_us()) + "}";
    }
    out += "], \"backends\": [";
    for (int i = 0; i < r->backends_size(); ++i) {
      const auto& b = r->backends(i);
      out += (i == 0 ? "" : ", ");
      out += "{\"name\": " + JsonString(b.name()) +
             ", \"state\": " + JsonString(b.state()) +
             ", \"calls_in_progress\": " + JsonString(b.calls_in_progress()) +
             "}";
    }
    return Print(out + "]}\n");
  }
  Print("keyholdd " + r->daemon_version() + ", up " +
        std::to_string(r->uptime_seconds()) + " s, " +
        std::to_string(r->connections()) + " connections open\n");
  std::vector<std::vector<std::string>> rows;
  rows.push_back(
      {"OPERATION", "COUNT", "ERRORS", "P50_US", "P90_US", "P99_US", "MAX_US"});
  for (const auto& s : r->ops()) {
    rows.push_back({s.op(), std::to_string(s.count()),
                    std::to_string(s.errors()), std::to_string(s.p50_us()),
                    std::to_string(s.p90_us()), std::to_string(s.p99_us()),
                    std::to_string(s.max_us())});
  }
  if (int rc = PrintTable(rows); rc != 0) {
    return rc;
  }
  std::vector<std::vector<std::string>> backends;
  backends.push_back({"BACKEND", "STATE", "CALLS_IN_PROGRESS"});
  for (const auto& b : r->backends()) {
    backends.push_back(
        {b.name(), b.state(),
         b.calls_in_progress().empty() ? "-" : b.calls_in_progress()});
  }
  Print("\n");
  return PrintTable(backends);
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
  {
    auto* audit =
        admin->add_subcommand("audit", "Read or verify the daemon's audit log");
    audit->require_subcommand(1);
    auto* show = audit->add_subcommand(
        "show", "Print audit records (JSON lines), newest last");
    auto o = std::make_shared<AuditShowOptions>();
    show->add_option("--key", o->key, "Only this key: NAME or OWNER/NAME")
        ->option_text("KEYREF");
    show->add_option("--user", o->user, "Only this caller: user name or uid")
        ->option_text("USER|UID");
    show->add_option("--limit", o->limit, "At most this many (default 100)")
        ->check(CLI::Range(1, 10000));
    SetAction(show, action,
              [o](Context& ctx) { return RunAuditShow(ctx, *o); });
    auto* verify = audit->add_subcommand(
        "verify",
        "Check every record's chain and MAC; exit 1 if any was edited, "
        "removed or reordered");
    SetAction(verify, action, RunAuditVerify);
  }
  {
    auto* sub = admin->add_subcommand(
        "stats",
        "Requests answered since the daemon started: count, errors and "
        "latency percentiles (microseconds) per operation");
    auto o = std::make_shared<StatsOptions>();
    sub->add_flag("--json", o->json, "Print one JSON object");
    SetAction(sub, action, [o](Context& ctx) { return RunStats(ctx, *o); });
  }
}

}  // namespace keyhold::cli
