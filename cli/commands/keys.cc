// keyhold key create|import|list|public|ref|delete|grant|revoke
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands/commands.h"
#include "common/key_types.h"
#include "common/ssl_ptr.h"

namespace keyhold::cli {
namespace {

std::vector<std::string> KeyTypeNames() {
  std::vector<std::string> out;
  for (v1::KeyType t : AllKeyTypes()) {
    out.emplace_back(KeyTypeName(t));
  }
  return out;
}

std::string Join(const std::vector<std::string>& parts, std::string_view sep) {
  std::string out;
  for (const auto& p : parts) {
    if (!out.empty()) {
      out += sep;
    }
    out += p;
  }
  return out;
}

// The fingerprint of a create/import answer: computed over the DER the daemon
// returned, or the daemon's own hash if it sent no DER.
std::string AnswerFingerprint(const v1::KeyInfo& info,
                              const std::string& public_key_der) {
  if (!public_key_der.empty()) {
    return Fingerprint(public_key_der);
  }
  return FingerprintFromHash(info.public_key_sha256());
}

// --- key create ---

struct CreateOptions {
  std::string name;
  std::string type;
  std::string backend;
};

int RunCreate(Context& ctx, const CreateOptions& o) {
  const std::string what = "key create " + Quote(o.name);
  if (Status s = ValidateKeyName(o.name); !s.ok()) {
    return Fail(what, s);
  }
  const auto type = KeyTypeFromString(o.type);
  if (!type) {
    return Fail(what, InvalidArgument("unknown key type " + Quote(o.type)));
  }
  auto r =
      ctx.client().GenerateKey(client::MakeKeyRef(o.name), *type, o.backend);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  return Print(AnswerFingerprint(r->info(), r->public_key()) + "\n");
}

// --- key import ---

struct ImportOptions {
  std::string name;
  std::string in;
  std::string backend;
};

int RunImport(Context& ctx, const ImportOptions& o) {
  const std::string what = "key import " + Quote(o.name);
  if (Status s = ValidateKeyName(o.name); !s.ok()) {
    return Fail(what, s);
  }
  // Read straight into a wiped-on-free buffer; never printed.
  auto key = ReadSecretFile(o.in);
  if (!key.ok()) {
    return Fail("read " + Quote(o.in), key.status());
  }
  if (key->empty()) {
    return Fail("read " + Quote(o.in), InvalidArgument("file is empty"));
  }
  auto r = ctx.client().ImportKey(client::MakeKeyRef(o.name), *key, o.backend);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  return Print(AnswerFingerprint(r->info(), r->public_key()) + "\n");
}

// --- key list ---

struct ListOptions {
  bool json = false;
};

class NameCache {
 public:
  const std::optional<std::string>& User(uint32_t uid) {
    auto it = users_.find(uid);
    if (it == users_.end()) {
      it = users_.emplace(uid, UserName(uid)).first;
    }
    return it->second;
  }
  const std::optional<std::string>& Group(uint32_t gid) {
    auto it = groups_.find(gid);
    if (it == groups_.end()) {
      it = groups_.emplace(gid, GroupName(gid)).first;
    }
    return it->second;
  }

 private:
  std::map<uint32_t, std::optional<std::string>> users_;
  std::map<uint32_t, std::optional<std::string>> groups_;
};

std::string GrantKindWord(v1::Grant::Kind kind) {
  switch (kind) {
    case v1::Grant::USER:
      return "user";
    case v1::Grant::GROUP:
      return "group";
    default:
      return "unknown";
  }
}

std::string GrantsText(const v1::KeyInfo& info, NameCache& names) {
  std::vector<std::string> parts;
  for (const auto& g : info.grants()) {
    std::optional<std::string> name;
    if (g.kind() == v1::Grant::USER) {
      name = names.User(g.id());
    } else if (g.kind() == v1::Grant::GROUP) {
      name = names.Group(g.id());
    }
    parts.push_back(GrantKindWord(g.kind()) + ":" +
                    (name ? *name : std::to_string(g.id())));
  }
  return parts.empty() ? "-" : Join(parts, ",");
}

std::string UsageJson(uint32_t usage) {
  std::vector<std::string> words;
  if ((usage & v1::USAGE_SIGN) != 0) {
    words.emplace_back("\"sign\"");
  }
  if ((usage & v1::USAGE_DECRYPT) != 0) {
    words.emplace_back("\"decrypt\"");
  }
  if ((usage & v1::USAGE_DERIVE) != 0) {
    words.emplace_back("\"derive\"");
  }
  return "[" + Join(words, ",") + "]";
}

std::string KeyJson(const v1::KeyInfo& info, NameCache& names) {
  const auto& owner_name = names.User(info.owner());
  std::vector<std::string> grants;
  for (const auto& g : info.grants()) {
    grants.push_back("{\"kind\":" + JsonString(GrantKindWord(g.kind())) +
                     ",\"id\":" + std::to_string(g.id()) + "}");
  }
  std::string out = "{";
  out += "\"owner\":" + std::to_string(info.owner());
  out += ",\"owner_name\":" + (owner_name ? JsonString(*owner_name) : "null");
  out += ",\"name\":" + JsonString(info.name());
  out += ",\"type\":" + JsonString(KeyTypeName(info.type()));
  out += ",\"usage\":" + UsageJson(info.usage());
  out += ",\"backend\":" + JsonString(info.backend());
  out += ",\"created\":" + std::to_string(info.created_unix());
  out += ",\"fingerprint\":" +
         JsonString(FingerprintFromHash(info.public_key_sha256()));
  out += ",\"grants\":[" + Join(grants, ",") + "]";
  out += std::string(",\"certificate\":") +
         (info.certificate().empty() ? "false" : "true");
  out += "}";
  return out;
}

int RunList(Context& ctx, const ListOptions& o) {
  auto r = ctx.client().ListKeys(/*include_shared=*/true);
  if (!r.ok()) {
    return Fail("key list", r.status());
  }
  NameCache names;
  if (o.json) {
    if (r->keys().empty()) {
      return Print("[]\n");
    }
    std::string out = "[\n";
    for (int i = 0; i < r->keys_size(); ++i) {
      out += "  " + KeyJson(r->keys(i), names);
      out += i + 1 < r->keys_size() ? ",\n" : "\n";
    }
    out += "]\n";
    return Print(out);
  }
  std::vector<std::vector<std::string>> rows;
  rows.push_back({"OWNER", "NAME", "TYPE", "USAGE", "BACKEND", "FINGERPRINT",
                  "SHARED-WITH"});
  for (const auto& k : r->keys()) {
    const auto& owner_name = names.User(k.owner());
    rows.push_back(
        {owner_name ? *owner_name : std::to_string(k.owner()), k.name(),
         std::string(KeyTypeName(k.type())), UsageString(k.usage()),
         k.backend().empty() ? "-" : k.backend(),
         FingerprintFromHash(k.public_key_sha256()), GrantsText(k, names)});
  }
  return PrintTable(rows);
}

// --- key public ---

struct PublicOptions {
  std::string keyref;
};

int RunPublic(Context& ctx, const PublicOptions& o) {
  const std::string what = "key public " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto r = ctx.client().GetPublicKey(*ref);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  const auto* p =
      reinterpret_cast<const unsigned char*>(r->public_key().data());
  SslPtr<EVP_PKEY> pkey(
      d2i_PUBKEY(nullptr, &p, static_cast<long>(r->public_key().size())));
  if (!pkey) {
    return Fail(what, Internal("the daemon sent an unreadable public key"));
  }
  SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PUBKEY(bio.get(), pkey.get()) != 1) {
    return Fail(what, Internal("cannot PEM-encode the public key"));
  }
  return PrintBio(what, bio.get(), "cannot PEM-encode the public key");
}

// --- key ref ---
//
// A key reference file: PEM block "KEYHOLD KEY REFERENCE" around
// DER SEQUENCE { UTF8String uri, SubjectPublicKeyInfo }. The URI always names
// the owner by uid, so the file means the same key to every user it is
// shared with. The OpenSSL provider's decoder reads it (ossl-provider/).

struct RefOptions {
  std::string keyref;
};

void AppendDerLength(std::string& out, std::size_t len) {
  if (len < 0x80) {
    out.push_back(static_cast<char>(len));
    return;
  }
  std::string bytes;
  for (std::size_t v = len; v != 0; v >>= 8) {
    bytes.insert(bytes.begin(), static_cast<char>(v & 0xff));
  }
  out.push_back(static_cast<char>(0x80 | bytes.size()));
  out += bytes;
}

int RunRef(Context& ctx, const RefOptions& o) {
  const std::string what = "key ref " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto r = ctx.client().GetPublicKey(*ref);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  const std::string uri = "keyhold:" + std::to_string(r->info().owner()) + "/" +
                          r->info().name();
  std::string body;
  body.push_back(0x0c);  // UTF8String
  AppendDerLength(body, uri.size());
  body += uri;
  body += r->public_key();
  std::string der;
  der.push_back(0x30);  // SEQUENCE
  AppendDerLength(der, body.size());
  der += body;
  SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  if (!bio ||
      PEM_write_bio(bio.get(), "KEYHOLD KEY REFERENCE", "",
                    reinterpret_cast<const unsigned char*>(der.data()),
                    static_cast<long>(der.size())) <= 0) {
    return Fail(what, Internal("cannot PEM-encode the key reference"));
  }
  return PrintBio(what, bio.get(), "cannot PEM-encode the key reference");
}

// --- key delete ---

struct DeleteOptions {
  std::string keyref;
};

int RunDelete(Context& ctx, const DeleteOptions& o) {
  const std::string what = "key delete " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  if (Status s = ctx.client().DestroyKey(*ref); !s.ok()) {
    return Fail(what, s);
  }
  return kExitOk;
}

// --- key grant / revoke ---

struct ShareOptions {
  std::string keyref;
  std::string user;
  std::string group;
};

int RunShare(Context& ctx, const ShareOptions& o, bool grant) {
  const std::string what =
      std::string(grant ? "key grant " : "key revoke ") + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  v1::Grant grantee;
  if (!o.user.empty()) {
    auto uid = ResolveUser(o.user);
    if (!uid.ok()) {
      return Fail(what, uid.status());
    }
    grantee.set_kind(v1::Grant::USER);
    grantee.set_id(*uid);
  } else {
    auto gid = ResolveGroup(o.group);
    if (!gid.ok()) {
      return Fail(what, gid.status());
    }
    grantee.set_kind(v1::Grant::GROUP);
    grantee.set_id(*gid);
  }
  const Status s = grant ? ctx.client().GrantUse(*ref, grantee)
                         : ctx.client().RevokeUse(*ref, grantee);
  if (!s.ok()) {
    return Fail(what, s);
  }
  return kExitOk;
}

void AddShareCommand(CLI::App& key, Action* action, bool grant) {
  auto* sub = key.add_subcommand(
      grant ? "grant" : "revoke",
      grant ? "Let a user or group use (sign, decrypt, derive) one of your keys"
            : "Withdraw a grant made with 'key grant'");
  auto o = std::make_shared<ShareOptions>();
  sub->add_option("NAME", o->keyref, "Your key's name")->required();
  auto* who = sub->add_option_group("grantee", "Who");
  who->add_option("--user", o->user, "User name or uid")
      ->option_text("USER|UID");
  who->add_option("--group", o->group, "Group name or gid")
      ->option_text("GROUP|GID");
  who->require_option(1);
  SetAction(sub, action,
            [o, grant](Context& ctx) { return RunShare(ctx, *o, grant); });
}

}  // namespace

void AddKeyCommands(CLI::App& app, Action* action) {
  auto* key =
      app.add_subcommand("key", "Create, import, list, share, delete keys");
  key->require_subcommand(1);

  {
    auto* sub = key->add_subcommand("create", "Generate a new key in keyholdd");
    auto o = std::make_shared<CreateOptions>();
    sub->add_option("NAME", o->name, "Key name: 1-64 of [A-Za-z0-9._-]")
        ->required();
    const auto names = KeyTypeNames();
    sub->add_option("--type", o->type, "Key type: " + Join(names, ", "))
        ->required()
        ->check(CLI::IsMember(names))
        ->option_text("TYPE REQUIRED");
    sub->add_option("--backend", o->backend,
                    "Backend (software, pkcs11, tpm); default: the daemon's")
        ->option_text("BACKEND");
    SetAction(sub, action, [o](Context& ctx) { return RunCreate(ctx, *o); });
  }
  {
    auto* sub = key->add_subcommand(
        "import", "Import an existing private key (PEM or DER)");
    auto o = std::make_shared<ImportOptions>();
    sub->add_option("NAME", o->name, "Key name: 1-64 of [A-Za-z0-9._-]")
        ->required();
    sub->add_option("--in", o->in, "Private key file, PEM or DER ('-': stdin)")
        ->required()
        ->option_text("PRIVATE.pem REQUIRED");
    sub->add_option("--backend", o->backend,
                    "Backend (software, pkcs11, tpm); default: the daemon's")
        ->option_text("BACKEND");
    SetAction(sub, action, [o](Context& ctx) { return RunImport(ctx, *o); });
  }
  {
    auto* sub = key->add_subcommand(
        "list", "List your keys and the keys shared with you");
    auto o = std::make_shared<ListOptions>();
    sub->add_flag("--json", o->json, "Print a JSON array");
    SetAction(sub, action, [o](Context& ctx) { return RunList(ctx, *o); });
  }
  {
    auto* sub = key->add_subcommand(
        "public", "Print a key's public key (PEM SubjectPublicKeyInfo)");
    auto o = std::make_shared<PublicOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    SetAction(sub, action, [o](Context& ctx) { return RunPublic(ctx, *o); });
  }
  {
    auto* sub = key->add_subcommand(
        "ref", "Print a key reference file for the OpenSSL provider (no secret)");
    auto o = std::make_shared<RefOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    SetAction(sub, action, [o](Context& ctx) { return RunRef(ctx, *o); });
  }
  {
    auto* sub = key->add_subcommand("delete", "Delete one of your keys");
    auto o = std::make_shared<DeleteOptions>();
    sub->add_option("NAME", o->keyref, "Key name")->required();
    SetAction(sub, action, [o](Context& ctx) { return RunDelete(ctx, *o); });
  }
  AddShareCommand(*key, action, /*grant=*/true);
  AddShareCommand(*key, action, /*grant=*/false);
}

}  // namespace keyhold::cli
