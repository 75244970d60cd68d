// The CK_ATTRIBUTE templates applications hand to libkeyhold-pkcs11.so, read
// without any daemon or module state: C_FindObjectsInit (parse and match),
// C_GetAttributeValue (answer a template from an object's attributes),
// C_GenerateKeyPair, C_CreateObject (certificates) and C_DeriveKey. Every
// byte here comes from the application, so this is a parser of untrusted
// input: fuzz/p11_template_fuzzer.cc drives every function below.
//
// An input template is only read after TemplateOk() accepted it: `t` is
// non-null unless `n` is 0, and each attribute's pValue points to
// ulValueLen readable bytes unless it is null with ulValueLen 0.
#ifndef KEYHOLD_PKCS11_MODULE_TEMPLATE_H_
#define KEYHOLD_PKCS11_MODULE_TEMPLATE_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "keyhold/v1/keyhold.pb.h"

// Last on purpose: p11-kit's compatibility names are macros (value, count,
// params, ...) that would rewrite any header included after this one.
#include <p11-kit/pkcs11.h>

#ifndef CKK_EC_MONTGOMERY
#define CKK_EC_MONTGOMERY (0x41UL)
#endif
#ifndef CKM_EC_MONTGOMERY_KEY_PAIR_GEN
#define CKM_EC_MONTGOMERY_KEY_PAIR_GEN (0x1056UL)
#endif

namespace keyhold::pkcs11 {

using Bytes = std::vector<uint8_t>;
using AttrMap = std::map<CK_ATTRIBUTE_TYPE, Bytes>;

// Attribute values as PKCS#11 lays them out: CK_BBOOL, CK_ULONG.
Bytes BoolAttr(bool b);
Bytes UlongAttr(CK_ULONG v);

// The DER OID (CKA_EC_PARAMS) of an EC, Ed25519 or X25519 key type; empty
// for any other type.
Bytes CurveOid(v1::KeyType t);

// Attributes a private key never reveals (CKR_ATTRIBUTE_SENSITIVE).
bool IsSensitiveAttr(CK_ATTRIBUTE_TYPE t);

// An input template the module may read: `t` is non-null unless `n` is 0,
// no pValue is null with a non-zero ulValueLen, and no ulValueLen is
// CK_UNAVAILABLE_INFORMATION.
bool TemplateOk(const CK_ATTRIBUTE* t, CK_ULONG n);

// The value of the first attribute of `type` in a template TemplateOk()
// accepted: nullopt if there is none, empty if its pValue is null.
std::optional<Bytes> TemplateValue(const CK_ATTRIBUTE* t, CK_ULONG n,
                                   CK_ATTRIBUTE_TYPE type);

// C_FindObjectsInit: every attribute of the template, in order.
using FindTemplate = std::vector<std::pair<CK_ATTRIBUTE_TYPE, Bytes>>;
// CKR_ARGUMENTS_BAD unless TemplateOk(t, n); else fills `want`.
CK_RV ParseFindTemplate(const CK_ATTRIBUTE* t, CK_ULONG n, FindTemplate* want);
// An object matches if it has every attribute of `want` with that value.
bool Matches(const AttrMap& attrs, const FindTemplate& want);

// C_GetAttributeValue: what an object shows. A derived secret's CKA_VALUE
// is `secret`, given only if `secret_readable`; for a private key
// (`is_private`) a missing sensitive attribute is CKR_ATTRIBUTE_SENSITIVE.
struct AttrSource {
  const AttrMap* attrs = nullptr;
  bool is_private = false;
  const Bytes* secret = nullptr;
  bool secret_readable = false;
};
// Answers every attribute of `t` (n > 0 needs t non-null) by the rules of
// PKCS#11 2.40 5.7: a null pValue asks for the length; a value that is
// missing, sensitive or longer than ulValueLen sets ulValueLen to
// CK_UNAVAILABLE_INFORMATION. Writes at most ulValueLen bytes to a pValue,
// and nothing when ulValueLen is CK_UNAVAILABLE_INFORMATION (a template
// passed again after a failure: CKR_BUFFER_TOO_SMALL).
// Returns CKR_OK or the error of the last attribute that failed.
CK_RV ReadAttributes(const AttrSource& src, CK_ATTRIBUTE* t, CK_ULONG n);

// C_GenerateKeyPair, once the templates passed TemplateOk(): the key type
// for `mechanism` (CKA_MODULUS_BITS, CKA_PUBLIC_EXPONENT, CKA_EC_PARAMS of
// the public template) and the key's name (CKA_LABEL, private template
// first). CKA_TOKEN, if given, must be true.
struct GenerateRequest {
  v1::KeyType type = v1::KEY_TYPE_UNSPECIFIED;
  std::string name;
};
CK_RV ParseGenerateTemplates(CK_MECHANISM_TYPE mechanism,
                             const CK_ATTRIBUTE* pub_t, CK_ULONG pub_n,
                             const CK_ATTRIBUTE* priv_t, CK_ULONG priv_n,
                             GenerateRequest* out);

// C_CreateObject, once the template passed TemplateOk(): a token X.509
// certificate object. `der` is its DER (one certificate, no trailing
// bytes) and `id` the SHA-256 of its SubjectPublicKeyInfo, which a CKA_ID in
// the template must equal.
struct CertificateRequest {
  Bytes der;
  Bytes id;
};
CK_RV ParseCertificateTemplate(const CK_ATTRIBUTE* t, CK_ULONG n,
                               CertificateRequest* out);

// C_DeriveKey (CKM_ECDH1_DERIVE), once the template passed TemplateOk(): a
// session CKO_SECRET_KEY. CKA_LABEL and CKA_ID are kept as given (`attrs`);
// other attributes the module does not act on are ignored.
struct DeriveRequest {
  CK_KEY_TYPE key_type = CKK_GENERIC_SECRET;
  std::optional<CK_ULONG> value_length;  // CKA_VALUE_LEN
  bool sensitive = false;
  bool extractable = true;
  AttrMap attrs;
};
// CKR_TEMPLATE_INCONSISTENT for a wrong class, a CKA_TOKEN that is not
// false, or a CKA_CLASS/KEY_TYPE/VALUE_LEN/SENSITIVE/EXTRACTABLE/TOKEN value
// of the wrong length.
CK_RV ParseDeriveTemplate(const CK_ATTRIBUTE* t, CK_ULONG n,
                          DeriveRequest* out);

}  // namespace keyhold::pkcs11

#endif  // KEYHOLD_PKCS11_MODULE_TEMPLATE_H_
