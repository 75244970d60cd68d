// keyhold sign | decrypt | derive
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>
#include <optional>
#include <string>

#include "cli/cli_util.h"
#include "cli/commands/commands.h"
#include "common/key_types.h"
#include "common/ssl_ptr.h"

namespace keyhold::cli {
namespace {

// --- sign ---

struct SignOptions {
  std::string keyref;
  std::string in;
  std::string out;
  std::string digest = "sha256";
  bool pss = false;
};

int RunSign(Context& ctx, const SignOptions& o) {
  const std::string what = "sign " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  const auto digest = DigestFromString(o.digest);
  if (!digest || DigestMd(*digest) == nullptr) {
    return Fail(what, InvalidArgument("unknown digest " + Quote(o.digest)));
  }
  // One round trip to learn the key type, which picks the algorithm.
  auto pub = ctx.client().GetPublicKey(*ref);
  if (!pub.ok()) {
    return Fail(what, pub.status());
  }
  const v1::KeyType type = pub->info().type();

  v1::SignRequest req;
  *req.mutable_key() = *ref;
  if (type == v1::ED25519) {
    if (o.pss) {
      return Fail(what, InvalidArgument("--pss needs an RSA key"));
    }
    auto message = ReadFile(o.in);
    if (!message.ok()) {
      return Fail("read " + Quote(o.in), message.status());
    }
    req.set_algorithm(v1::ED25519_PURE);
    req.set_digest(v1::DIGEST_NONE);
    req.set_data(std::move(*message));
  } else if (IsRsa(type) || IsEc(type)) {
    if (o.pss && !IsRsa(type)) {
      return Fail(what, InvalidArgument("--pss needs an RSA key"));
    }
    auto hash = DigestFile(o.in, DigestMd(*digest));
    if (!hash.ok()) {
      return Fail("read " + Quote(o.in), hash.status());
    }
    req.set_digest(*digest);
    req.set_data(std::move(*hash));
    if (IsEc(type)) {
      req.set_algorithm(v1::ECDSA);
    } else if (o.pss) {
      req.set_algorithm(v1::RSA_PSS);
      req.set_pss_salt_length(-1);  // the digest length
      req.set_pss_mgf1_digest(*digest);
    } else {
      req.set_algorithm(v1::RSA_PKCS1);
    }
  } else {
    return Fail(what,
                InvalidArgument("key type " + std::string(KeyTypeName(type)) +
                                " cannot sign"));
  }

  auto sig = ctx.client().Sign(req);
  if (!sig.ok()) {
    return Fail(what, sig.status());
  }
  if (Status s = WriteFile(o.out, *sig, /*secret=*/false); !s.ok()) {
    return Fail("write " + Quote(o.out), s);
  }
  return kExitOk;
}

// --- decrypt ---

struct DecryptOptions {
  std::string keyref;
  std::string in;
  std::string out;
  std::string oaep;  // empty: PKCS#1 v1.5
  std::string label;
};

int RunDecrypt(Context& ctx, const DecryptOptions& o) {
  const std::string what = "decrypt " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  v1::DecryptRequest req;
  *req.mutable_key() = *ref;
  if (o.oaep.empty()) {
    if (!o.label.empty()) {
      return Fail(what, InvalidArgument("--label needs --oaep"));
    }
    req.set_algorithm(v1::RSA_PKCS1_V15);
  } else {
    const auto digest = DigestFromString(o.oaep);
    if (!digest) {
      return Fail(what,
                  InvalidArgument("unknown OAEP digest " + Quote(o.oaep)));
    }
    req.set_algorithm(v1::RSA_OAEP);
    req.set_oaep_digest(*digest);
    req.set_oaep_mgf1_digest(*digest);
    req.set_oaep_label(o.label);
  }
  auto ciphertext = ReadFile(o.in);
  if (!ciphertext.ok()) {
    return Fail("read " + Quote(o.in), ciphertext.status());
  }
  req.set_ciphertext(std::move(*ciphertext));

  auto plaintext = ctx.client().Decrypt(req);
  if (!plaintext.ok()) {
    return Fail(what, plaintext.status());
  }
  if (Status s = WriteFile(o.out, plaintext->Expose(SecretAccess::kToken),
                           /*secret=*/true);
      !s.ok()) {
    return Fail("write " + Quote(o.out), s);
  }
  return kExitOk;
}

// --- derive ---

struct DeriveOptions {
  std::string keyref;
  std::string peer;
  std::string out;
};

// PEM or DER public key -> DER SubjectPublicKeyInfo.
StatusOr<std::string> PeerSpki(const std::string& bytes) {
  SslPtr<EVP_PKEY> pkey;
  {
    SslPtr<BIO> bio(
        BIO_new_mem_buf(bytes.data(), static_cast<int>(bytes.size())));
    if (bio) {
      pkey.reset(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
    }
  }
  if (!pkey) {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
    pkey.reset(d2i_PUBKEY(nullptr, &p, static_cast<long>(bytes.size())));
  }
  ERR_clear_error();
  if (!pkey) {
    return InvalidArgument("not a PEM or DER public key");
  }
  unsigned char* der = nullptr;
  const int len = i2d_PUBKEY(pkey.get(), &der);
  if (len <= 0 || der == nullptr) {
    return Internal("cannot DER-encode the public key");
  }
  std::string out(reinterpret_cast<const char*>(der),
                  static_cast<std::size_t>(len));
  OPENSSL_free(der);
  return out;
}

int RunDerive(Context& ctx, const DeriveOptions& o) {
  const std::string what = "derive " + Quote(o.keyref);
  auto ref = ResolveKeyRef(o.keyref);
  if (!ref.ok()) {
    return Fail(what, ref.status());
  }
  auto peer_file = ReadFile(o.peer);
  if (!peer_file.ok()) {
    return Fail("read " + Quote(o.peer), peer_file.status());
  }
  if (peer_file->size() > 1 << 20) {
    return Fail("read " + Quote(o.peer),
                InvalidArgument("not a PEM or DER public key"));
  }
  auto spki = PeerSpki(*peer_file);
  if (!spki.ok()) {
    return Fail("read " + Quote(o.peer), spki.status());
  }
  auto secret = ctx.client().Derive(*ref, AsBytes(*spki));
  if (!secret.ok()) {
    return Fail(what, secret.status());
  }
  if (Status s = WriteFile(o.out, secret->Expose(SecretAccess::kToken),
                           /*secret=*/true);
      !s.ok()) {
    return Fail("write " + Quote(o.out), s);
  }
  return kExitOk;
}

}  // namespace

void AddCryptoCommands(CLI::App& app, Action* action) {
  {
    auto* sub = app.add_subcommand(
        "sign", "Sign a file with a key (digest computed locally)");
    auto o = std::make_shared<SignOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    sub->add_option("--in", o->in, "File to sign ('-': stdin)")
        ->required()
        ->option_text("FILE REQUIRED");
    sub->add_option("--out", o->out, "Signature output ('-': stdout)")
        ->required()
        ->option_text("SIG REQUIRED");
    sub->add_option("--digest", o->digest,
                    "Digest for RSA and ECDSA (ignored for Ed25519)")
        ->check(CLI::IsMember({"sha256", "sha384", "sha512"}))
        ->capture_default_str();
    sub->add_flag("--pss", o->pss, "RSA-PSS instead of PKCS#1 v1.5 (RSA only)");
    SetAction(sub, action, [o](Context& ctx) { return RunSign(ctx, *o); });
  }
  {
    auto* sub = app.add_subcommand("decrypt", "Decrypt a file with an RSA key");
    auto o = std::make_shared<DecryptOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    sub->add_option("--in", o->in, "Ciphertext file ('-': stdin)")
        ->required()
        ->option_text("FILE REQUIRED");
    sub->add_option("--out", o->out,
                    "Plaintext output, created 0600 ('-': stdout)")
        ->required()
        ->option_text("FILE REQUIRED");
    auto* oaep = sub->add_option("--oaep", o->oaep,
                                 "RSA-OAEP with this digest (OAEP and MGF1); "
                                 "default: PKCS#1 v1.5")
                     ->check(CLI::IsMember({"sha1", "sha256"}));
    sub->add_option("--label", o->label, "OAEP label")
        ->option_text("TEXT")
        ->needs(oaep);
    SetAction(sub, action, [o](Context& ctx) { return RunDecrypt(ctx, *o); });
  }
  {
    auto* sub = app.add_subcommand(
        "derive", "ECDH / X25519 key agreement; raw shared secret to a file");
    auto o = std::make_shared<DeriveOptions>();
    sub->add_option("KEYREF", o->keyref, "NAME or OWNER/NAME")->required();
    sub->add_option("--peer", o->peer, "Peer public key, PEM or DER")
        ->required()
        ->option_text("PEER_PUBLIC.pem REQUIRED");
    sub->add_option("--out", o->out,
                    "Shared secret output, created 0600 ('-': stdout)")
        ->required()
        ->option_text("FILE REQUIRED");
    SetAction(sub, action, [o](Context& ctx) { return RunDerive(ctx, *o); });
  }
}

}  // namespace keyhold::cli
