#include "pkcs11-module/template.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "common/key_types.h"
#include "common/ssl_ptr.h"

namespace keyhold::pkcs11 {

Bytes BoolAttr(bool b) {
  return Bytes{static_cast<uint8_t>(b ? CK_TRUE : CK_FALSE)};
}

Bytes UlongAttr(CK_ULONG v) {
  Bytes out(sizeof v);
  std::memcpy(out.data(), &v, sizeof v);
  return out;
}

Bytes CurveOid(v1::KeyType t) {
  switch (t) {
    case v1::EC_P256:
      return {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
    case v1::EC_P384:
      return {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22};
    case v1::EC_P521:
      return {0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23};
    case v1::ED25519:
      return {0x06, 0x03, 0x2b, 0x65, 0x70};
    case v1::X25519:
      return {0x06, 0x03, 0x2b, 0x65, 0x6e};
    default:
      return {};
  }
}

bool IsSensitiveAttr(CK_ATTRIBUTE_TYPE t) {
  switch (t) {
    case CKA_VALUE:
    case CKA_PRIVATE_EXPONENT:
    case CKA_PRIME_1:
    case CKA_PRIME_2:
    case CKA_EXPONENT_1:
    case CKA_EXPONENT_2:
    case CKA_COEFFICIENT:
      return true;
    default:
      return false;
  }
}

bool TemplateOk(const CK_ATTRIBUTE* t, CK_ULONG n) {
  if (t == nullptr && n != 0) {
    return false;
  }
  for (CK_ULONG i = 0; i < n; ++i) {
    if (t[i].pValue == nullptr && t[i].ulValueLen != 0) {
      return false;
    }
    // What C_GetAttributeValue writes back for a value it could not give
    // (an application may pass such a template on unchanged): no buffer is
    // that long, and reading it would run off the end of the address space.
    if (t[i].ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      return false;
    }
  }
  return true;
}

std::optional<Bytes> TemplateValue(const CK_ATTRIBUTE* t, CK_ULONG n,
                                   CK_ATTRIBUTE_TYPE type) {
  for (CK_ULONG i = 0; i < n; ++i) {
    if (t[i].type == type) {
      const auto* p = static_cast<const uint8_t*>(t[i].pValue);
      if (p == nullptr) {
        return Bytes{};
      }
      return Bytes(p, p + t[i].ulValueLen);
    }
  }
  return std::nullopt;
}

CK_RV ParseFindTemplate(const CK_ATTRIBUTE* t, CK_ULONG n, FindTemplate* want) {
  if (!TemplateOk(t, n)) {
    return CKR_ARGUMENTS_BAD;
  }
  want->clear();
  for (CK_ULONG i = 0; i < n; ++i) {
    const auto* p = static_cast<const uint8_t*>(t[i].pValue);
    want->emplace_back(t[i].type,
                       p == nullptr ? Bytes{} : Bytes(p, p + t[i].ulValueLen));
  }
  return CKR_OK;
}

bool Matches(const AttrMap& attrs, const FindTemplate& want) {
  for (const auto& [type, bytes] : want) {
    auto it = attrs.find(type);
    if (it == attrs.end() || it->second != bytes) {
      return false;
    }
  }
  return true;
}

CK_RV ReadAttributes(const AttrSource& src, CK_ATTRIBUTE* t, CK_ULONG n) {
  CK_RV rv = CKR_OK;
  for (CK_ULONG i = 0; i < n; ++i) {
    CK_ATTRIBUTE& a = t[i];
    const Bytes* found = nullptr;
    if (src.secret != nullptr && a.type == CKA_VALUE) {
      if (!src.secret_readable) {
        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        rv = CKR_ATTRIBUTE_SENSITIVE;
        continue;
      }
      found = src.secret;
    } else if (auto it = src.attrs->find(a.type); it != src.attrs->end()) {
      found = &it->second;
    }
    if (found == nullptr) {
      a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
      if (src.is_private && IsSensitiveAttr(a.type)) {
        rv = CKR_ATTRIBUTE_SENSITIVE;
      } else {
        rv = CKR_ATTRIBUTE_TYPE_INVALID;
      }
      continue;
    }
    const Bytes& v = *found;
    if (a.pValue == nullptr) {
      a.ulValueLen = v.size();
    } else if (a.ulValueLen < v.size() ||
               a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      // CK_UNAVAILABLE_INFORMATION is what a failed call left in a template
      // the caller passes again unchanged: not a buffer size, so nothing is
      // written to a buffer whose real size we cannot know.
      a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
      rv = CKR_BUFFER_TOO_SMALL;
    } else {
      if (!v.empty()) {
        std::memcpy(a.pValue, v.data(), v.size());
      }
      a.ulValueLen = v.size();
    }
  }
  return rv;
}

CK_RV ParseGenerateTemplates(CK_MECHANISM_TYPE mechanism,
                             const CK_ATTRIBUTE* pub_t, CK_ULONG pub_n,
                             const CK_ATTRIBUTE* priv_t, CK_ULONG priv_n,
                             GenerateRequest* out) {
  for (auto [t, n] : {std::pair{pub_t, pub_n}, std::pair{priv_t, priv_n}}) {
    auto token = TemplateValue(t, n, CKA_TOKEN);
    if (token && (token->size() != 1 || (*token)[0] == CK_FALSE)) {
      return CKR_TEMPLATE_INCONSISTENT;  // session objects are not supported
    }
  }
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  switch (mechanism) {
    case CKM_RSA_PKCS_KEY_PAIR_GEN: {
      auto bits = TemplateValue(pub_t, pub_n, CKA_MODULUS_BITS);
      if (!bits) {
        return CKR_TEMPLATE_INCOMPLETE;
      }
      if (bits->size() != sizeof(CK_ULONG)) {
        return CKR_ATTRIBUTE_VALUE_INVALID;
      }
      CK_ULONG b = 0;
      std::memcpy(&b, bits->data(), sizeof b);
      type = b == 2048   ? v1::RSA_2048
             : b == 3072 ? v1::RSA_3072
             : b == 4096 ? v1::RSA_4096
                         : v1::KEY_TYPE_UNSPECIFIED;
      if (type == v1::KEY_TYPE_UNSPECIFIED) {
        return CKR_ATTRIBUTE_VALUE_INVALID;
      }
      if (auto e = TemplateValue(pub_t, pub_n, CKA_PUBLIC_EXPONENT)) {
        auto first = std::find_if(e->begin(), e->end(),
                                  [](uint8_t c) { return c != 0; });
        if (Bytes(first, e->end()) != Bytes{0x01, 0x00, 0x01}) {
          return CKR_ATTRIBUTE_VALUE_INVALID;  // the daemon uses 65537
        }
      }
      break;
    }
    case CKM_EC_KEY_PAIR_GEN:
    case CKM_EC_EDWARDS_KEY_PAIR_GEN:
    case CKM_EC_MONTGOMERY_KEY_PAIR_GEN: {
      auto params = TemplateValue(pub_t, pub_n, CKA_EC_PARAMS);
      const std::vector<v1::KeyType> candidates =
          mechanism == CKM_EC_KEY_PAIR_GEN
              ? std::vector<v1::KeyType>{v1::EC_P256, v1::EC_P384, v1::EC_P521}
          : mechanism == CKM_EC_EDWARDS_KEY_PAIR_GEN
              ? std::vector<v1::KeyType>{v1::ED25519}
              : std::vector<v1::KeyType>{v1::X25519};
      if (!params) {
        if (candidates.size() != 1) {
          return CKR_TEMPLATE_INCOMPLETE;
        }
        type = candidates[0];
        break;
      }
      const std::string printable(params->begin(), params->end());
      for (v1::KeyType c : candidates) {
        if (*params == CurveOid(c) ||
            (c == v1::ED25519 && printable == std::string("\x13\x0c"
                                                          "edwards25519")) ||
            (c == v1::X25519 && printable == std::string("\x13\x0a"
                                                         "curve25519"))) {
          type = c;
        }
      }
      if (type == v1::KEY_TYPE_UNSPECIFIED) {
        return CKR_ATTRIBUTE_VALUE_INVALID;
      }
      break;
    }
    default:
      return CKR_MECHANISM_INVALID;
  }
  auto label = TemplateValue(priv_t, priv_n, CKA_LABEL);
  if (!label) {
    label = TemplateValue(pub_t, pub_n, CKA_LABEL);
  }
  if (!label) {
    return CKR_TEMPLATE_INCOMPLETE;  // the label is the key's name
  }
  std::string name(label->begin(), label->end());
  if (!ValidateKeyName(name).ok()) {
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  out->type = type;
  out->name = std::move(name);
  return CKR_OK;
}

CK_RV ParseCertificateTemplate(const CK_ATTRIBUTE* t, CK_ULONG n,
                               CertificateRequest* out) {
  std::optional<Bytes> cls = TemplateValue(t, n, CKA_CLASS);
  if (!cls) {
    return CKR_TEMPLATE_INCOMPLETE;
  }
  if (*cls != UlongAttr(CKO_CERTIFICATE)) {
    return CKR_TEMPLATE_INCONSISTENT;
  }
  std::optional<Bytes> type = TemplateValue(t, n, CKA_CERTIFICATE_TYPE);
  if (type && *type != UlongAttr(CKC_X_509)) {
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  std::optional<Bytes> token = TemplateValue(t, n, CKA_TOKEN);
  if (token && *token != BoolAttr(true)) {
    return CKR_TEMPLATE_INCONSISTENT;  // session certificates: not kept
  }
  std::optional<Bytes> value = TemplateValue(t, n, CKA_VALUE);
  if (!value) {
    return CKR_TEMPLATE_INCOMPLETE;
  }
  const auto* p = value->data();
  SslPtr<X509> cert(d2i_X509(nullptr, &p, static_cast<long>(value->size())));
  if (cert == nullptr || p != value->data() + value->size()) {
    return CKR_ATTRIBUTE_VALUE_INVALID;
  }
  unsigned char* spki_der = nullptr;
  const int spki_len =
      i2d_X509_PUBKEY(X509_get_X509_PUBKEY(cert.get()), &spki_der);
  const Bytes spki =
      spki_len > 0 ? Bytes(spki_der, spki_der + spki_len) : Bytes{};
  OPENSSL_free(spki_der);
  Bytes id(SHA256_DIGEST_LENGTH);
  SHA256(spki.data(), spki.size(), id.data());
  std::optional<Bytes> want_id = TemplateValue(t, n, CKA_ID);
  if (want_id && *want_id != id) {
    return CKR_TEMPLATE_INCONSISTENT;  // CKA_ID is always the key's
  }
  out->der = std::move(*value);
  out->id = std::move(id);
  return CKR_OK;
}

CK_RV ParseDeriveTemplate(const CK_ATTRIBUTE* t, CK_ULONG n,
                          DeriveRequest* out) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  DeriveRequest r;
  for (CK_ULONG i = 0; i < n; ++i) {
    const CK_ATTRIBUTE& a = t[i];
    const auto* p = static_cast<const uint8_t*>(a.pValue);
    const Bytes v = p == nullptr ? Bytes{} : Bytes(p, p + a.ulValueLen);
    auto as_ulong = [&](CK_ULONG* dst) {
      if (v.size() != sizeof(CK_ULONG)) {
        return false;
      }
      std::memcpy(dst, v.data(), sizeof(CK_ULONG));
      return true;
    };
    auto as_bool = [&](bool* dst) {
      if (v.size() != 1) {
        return false;
      }
      *dst = v[0] != CK_FALSE;
      return true;
    };
    bool ok = true;
    bool token = false;
    CK_ULONG len = 0;
    switch (a.type) {
      case CKA_CLASS:
        ok = as_ulong(&cls) && cls == CKO_SECRET_KEY;
        break;
      case CKA_KEY_TYPE:
        ok = as_ulong(&r.key_type);
        break;
      case CKA_VALUE_LEN:
        ok = as_ulong(&len);
        r.value_length = len;
        break;
      case CKA_SENSITIVE:
        ok = as_bool(&r.sensitive);
        break;
      case CKA_EXTRACTABLE:
        ok = as_bool(&r.extractable);
        break;
      case CKA_TOKEN:
        ok = as_bool(&token) && !token;  // session objects only
        break;
      case CKA_LABEL:
      case CKA_ID:
        r.attrs[a.type] = v;
        break;
      default:
        break;  // usage flags etc.: the secret is handed to the application
    }
    if (!ok) {
      return CKR_TEMPLATE_INCONSISTENT;
    }
  }
  *out = std::move(r);
  return CKR_OK;
}

}  // namespace keyhold::pkcs11
