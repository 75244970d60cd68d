// keyhold cert import|show|delete: the certificate kept beside a key, which
// the PKCS#11 module presents as the key's certificate object.
#include <openssl/bio.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>
#include <string>

#include "cli/cli_util.h"
#include "cli/commands/commands.h"
#include "common/ssl_ptr.h"

namespace keyhold::cli {
namespace {

// PEM ("CERTIFICATE") or DER in, DER out.
StatusOr<std::string> CertificateDer(const std::string& bytes) {
  SslPtr<BIO> bio(
      BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
  if (!bio) {
    return Internal("out of memory");
  }
  SslPtr<X509> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
    cert.reset(d2i_X509(nullptr, &p, static_cast<long>(bytes.size())));
  }
  if (!cert) {
    return InvalidArgument("not a PEM or DER X.509 certificate");
  }
  unsigned char* der = nullptr;
  const int len = i2d_X509(cert.get(), &der);
  if (len <= 0) {
    return Internal("cannot DER-encode the certificate");
  }
  std::string out(reinterpret_cast<char*>(der), static_cast<std::size_t>(len));
  OPENSSL_free(der);
  return out;
}

struct ImportOptions {
  std::string name;
  std::string in;
};

int RunImport(Context& ctx, const ImportOptions& o) {
  const std::string what = "cert import " + Quote(o.name);
  auto bytes = ReadFile(o.in);
  if (!bytes.ok()) {
    return Fail("read " + Quote(o.in), bytes.status());
  }
  auto der = CertificateDer(*bytes);
  if (!der.ok()) {
    return Fail(what, der.status());
  }
  auto ref = ResolveKeyRef(o.name);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto r = ctx.client().SetCertificate(*ref, *der);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  return kExitOk;
}

struct ShowOptions {
  std::string keyref;
};

int RunShow(Context& ctx, const ShowOptions& o) {
  const std::string what = "cert show " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto r = ctx.client().GetPublicKey(*ref);
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  const std::string& der = r->info().certificate();
  if (der.empty()) {
    return Fail(what, NotFound("the key has no certificate"));
  }
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  SslPtr<X509> cert(d2i_X509(nullptr, &p, static_cast<long>(der.size())));
  SslPtr<BIO> bio(BIO_new(BIO_s_mem()));
  if (!cert || !bio || PEM_write_bio_X509(bio.get(), cert.get()) != 1) {
    return Fail(what, Internal("cannot PEM-encode the certificate"));
  }
  return PrintBio(what, bio.get(), "cannot PEM-encode the certificate");
}

struct DeleteOptions {
  std::string name;
};

int RunDelete(Context& ctx, const DeleteOptions& o) {
  const std::string what = "cert delete " + Quote(o.name);
  auto ref = ResolveKeyRef(o.name);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto r = ctx.client().SetCertificate(*ref, "");
  if (!r.ok()) {
    return Fail(what, r.status());
  }
  return kExitOk;
}

}  // namespace

void AddCertCommands(CLI::App& app, Action* action) {
  auto* cert = app.add_subcommand(
      "cert", "Keep a certificate beside a key (shown to PKCS#11 programs)");
  cert->require_subcommand(1);
  {
    auto* sub = cert->add_subcommand(
        "import", "Store (or replace) the certificate of one of your keys");
    auto o = std::make_shared<ImportOptions>();
    sub->add_option("NAME", o->name, "Your key's name")->required();
    sub->add_option("--in", o->in, "Certificate file, PEM or DER ('-': stdin)")
        ->required()
        ->option_text("CERT.pem REQUIRED");
    SetAction(sub, action, [o](Context& ctx) { return RunImport(ctx, *o); });
  }
  {
    auto* sub = cert->add_subcommand("show", "Print a key's certificate (PEM)");
    auto o = std::make_shared<ShowOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    SetAction(sub, action, [o](Context& ctx) { return RunShow(ctx, *o); });
  }
  {
    auto* sub = cert->add_subcommand(
        "delete", "Remove the certificate of one of your keys (not the key)");
    auto o = std::make_shared<DeleteOptions>();
    sub->add_option("NAME", o->name, "Your key's name")->required();
    SetAction(sub, action, [o](Context& ctx) { return RunDelete(ctx, *o); });
  }
}

}  // namespace keyhold::cli
