// STORE loader for keyhold: URIs.
//
//   keyhold:NAME        the caller's own key
//   keyhold:OWNER/NAME  a key OWNER (user name or uid) shared with the caller
//   keyhold:            every key the caller owns or may use
//
// Each key is passed to OpenSSL by reference to this provider's KEYMGMT; the
// object holds the daemon reference and the public key, never a secret.
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>
#include <openssl/store.h>
#include <pwd.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/key_types.h"
#include "ossl-provider/provider.h"

namespace keyhold::ossl {
namespace {

struct StoreCtx {
  ProvCtx* prov = nullptr;
  std::string uri;
  bool list = false;
  std::optional<v1::KeyRef> single;
  std::vector<v1::KeyRef> pending;  // for a listing, filled on first load
  bool listed = false;
  bool eof = false;
  int expect = 0;  // OSSL_STORE_PARAM_EXPECT: 0 or an OSSL_STORE_INFO_* type
};

StatusOr<uint32_t> ResolveOwner(const std::string& text) {
  std::vector<char> buf(16384);
  struct passwd pw {};
  struct passwd* result = nullptr;
  if (getpwnam_r(text.c_str(), &pw, buf.data(), buf.size(), &result) == 0 &&
      result != nullptr) {
    return static_cast<uint32_t>(result->pw_uid);
  }
  uint32_t uid = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, uid);
  if (ec == std::errc() && ptr == end && !text.empty()) return uid;
  return NotFound("unknown user '" + text + "'");
}

}  // namespace

StatusOr<v1::KeyRef> ParseKeyRefUri(const std::string& rest) {
  auto parsed = ParseKeyRefText(rest);
  if (!parsed.ok()) return parsed.status();
  std::optional<uint32_t> owner;
  if (parsed->owner) {
    auto uid = ResolveOwner(*parsed->owner);
    if (!uid.ok()) return uid.status();
    owner = *uid;
  }
  return client::MakeKeyRef(parsed->name, owner);
}

StatusOr<v1::KeyRef> ParseKeyUri(const std::string& uri) {
  constexpr std::string_view kScheme = "keyhold:";
  if (uri.compare(0, kScheme.size(), kScheme) != 0) {
    return InvalidArgument("not a keyhold: URI");
  }
  return ParseKeyRefUri(uri.substr(kScheme.size()));
}

namespace {

std::string UriOf(const v1::KeyRef& ref) {
  if (ref.has_owner() && ref.owner() != static_cast<uint32_t>(geteuid())) {
    return "keyhold:" + std::to_string(ref.owner()) + "/" + ref.name();
  }
  return "keyhold:" + ref.name();
}

// Fetches the public key and hands the object to OpenSSL.
int LoadOne(StoreCtx* s, const v1::KeyRef& ref, const std::string& uri,
            OSSL_CALLBACK* object_cb, void* object_cbarg) {
  auto r = GlobalClient().GetPublicKey(ref);
  if (!r.ok()) {
    RaiseStatus(uri, r.status());
    return 0;
  }
  Key key;
  key.prov = s->prov;
  key.has_ref = true;
  key.ref = ref;
  key.uri = uri;
  key.type = r->info().type();
  Status st = SetPublicKey(key, r->public_key());
  if (!st.ok()) {
    RaiseStatus(uri, st);
    return 0;
  }
  if (AlgName(key.type) == nullptr || key.alg != AlgName(key.type)) {
    RaiseStatus(uri, Unsupported("unsupported key type"));
    return 0;
  }
  Key* ptr = &key;
  int object_type = OSSL_OBJECT_PKEY;
  std::string alg = key.alg;
  std::string desc = uri;
  if (s->expect == OSSL_STORE_INFO_PUBKEY) {
    // A caller that wants the public key (openssl dgst -verify keyhold:NAME)
    // gets it by value, as DER SubjectPublicKeyInfo that the default
    // provider decodes: OpenSSL drops a key object here, since it has
    // private parts and so is not of the expected type.
    std::string structure = "SubjectPublicKeyInfo";
    OSSL_PARAM by_value[] = {
        OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, alg.data(),
                               alg.size()),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE,
                               structure.data(), structure.size()),
        OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_DATA, key.spki.data(),
                                key.spki.size()),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DESC, desc.data(),
                               desc.size()),
        OSSL_PARAM_END};
    return object_cb(by_value, object_cbarg);
  }
  OSSL_PARAM params[] = {
      OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
      OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, alg.data(), alg.size()),
      OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &ptr, sizeof(ptr)),
      OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DESC, desc.data(), desc.size()),
      OSSL_PARAM_END};
  return object_cb(params, object_cbarg);
}

void* StoreOpen(void* provctx, const char* uri) {
  KH_OSSL_ENTRY(nullptr, {
    std::string u = uri == nullptr ? "" : uri;
    constexpr std::string_view kScheme = "keyhold:";
    if (u.compare(0, kScheme.size(), kScheme) != 0) return nullptr;
    auto s = std::make_unique<StoreCtx>();
    s->prov = static_cast<ProvCtx*>(provctx);
    s->uri = u;
    std::string rest = u.substr(kScheme.size());
    if (rest.empty()) {
      s->list = true;
    } else {
      auto ref = ParseKeyRefUri(rest);
      if (!ref.ok()) {
        RaiseStatus(u, ref.status());
        return nullptr;
      }
      s->single = *ref;
    }
    return s.release();
  })
}

int StoreLoad(void* loaderctx, OSSL_CALLBACK* object_cb, void* object_cbarg,
              OSSL_PASSPHRASE_CALLBACK*, void*) {
  KH_OSSL_ENTRY(0, {
    auto* s = static_cast<StoreCtx*>(loaderctx);
    if (s->eof) return 0;
    if (!s->list) {
      s->eof = true;
      return LoadOne(s, *s->single, s->uri, object_cb, object_cbarg);
    }
    if (!s->listed) {
      s->listed = true;
      auto r = GlobalClient().ListKeys(/*include_shared=*/true);
      if (!r.ok()) {
        s->eof = true;
        RaiseStatus(s->uri, r.status());
        return 0;
      }
      for (const auto& info : r->keys()) {
        if (AlgName(info.type()) == nullptr) continue;
        std::optional<uint32_t> owner;
        if (info.owner() != static_cast<uint32_t>(geteuid())) owner = info.owner();
        s->pending.push_back(client::MakeKeyRef(info.name(), owner));
      }
      std::reverse(s->pending.begin(), s->pending.end());
    }
    if (s->pending.empty()) {
      s->eof = true;
      return 0;
    }
    v1::KeyRef ref = s->pending.back();
    s->pending.pop_back();
    if (s->pending.empty()) s->eof = true;
    return LoadOne(s, ref, UriOf(ref), object_cb, object_cbarg);
  })
}

int StoreEof(void* loaderctx) {
  auto* s = static_cast<StoreCtx*>(loaderctx);
  return s == nullptr || s->eof ? 1 : 0;
}

int StoreClose(void* loaderctx) {
  try {
    delete static_cast<StoreCtx*>(loaderctx);
  } catch (...) {
  }
  return 1;
}

const OSSL_PARAM kStoreSettable[] = {
    OSSL_PARAM_int(OSSL_STORE_PARAM_EXPECT, nullptr), OSSL_PARAM_END};

const OSSL_PARAM* StoreSettable(void*) { return kStoreSettable; }
int StoreSetParams(void* loaderctx, const OSSL_PARAM params[]) {
  auto* s = static_cast<StoreCtx*>(loaderctx);
  const OSSL_PARAM* p =
      OSSL_PARAM_locate_const(params, OSSL_STORE_PARAM_EXPECT);
  if (s != nullptr && p != nullptr && !OSSL_PARAM_get_int(p, &s->expect)) {
    return 0;
  }
  return 1;
}

}  // namespace

const OSSL_DISPATCH kStoreFunctions[] = {
    {OSSL_FUNC_STORE_OPEN, reinterpret_cast<void (*)()>(StoreOpen)},
    {OSSL_FUNC_STORE_LOAD, reinterpret_cast<void (*)()>(StoreLoad)},
    {OSSL_FUNC_STORE_EOF, reinterpret_cast<void (*)()>(StoreEof)},
    {OSSL_FUNC_STORE_CLOSE, reinterpret_cast<void (*)()>(StoreClose)},
    {OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS, reinterpret_cast<void (*)()>(StoreSettable)},
    {OSSL_FUNC_STORE_SET_CTX_PARAMS, reinterpret_cast<void (*)()>(StoreSetParams)},
    {0, nullptr}};

}  // namespace keyhold::ossl
