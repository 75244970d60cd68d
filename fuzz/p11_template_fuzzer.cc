// libFuzzer target for the CK_ATTRIBUTE templates an application hands to
// libkeyhold-pkcs11.so (pkcs11-module/template.cc): TemplateOk,
// TemplateValue, ParseFindTemplate + Matches (C_FindObjectsInit),
// ReadAttributes (C_GetAttributeValue), ParseGenerateTemplates
// (C_GenerateKeyPair), ParseCertificateTemplate (C_CreateObject) and
// ParseDeriveTemplate (C_DeriveKey). No daemon is involved.
//
// Input: a mechanism byte (C_GenerateKeyPair), a split byte (how many
// attributes go to the public template), a flags byte (C_GetAttributeValue's
// object: private key or not, derived secret or not, readable or not), then
// attributes: a type byte (an index into kTypes, or 0xff and 4 raw bytes) and
// a kind byte choosing pValue and ulValueLen: a value of the type's natural
// size, of a length from the input (1 or 2 bytes), one byte more or less
// than natural, a null pValue with a zero or non-zero length, an empty
// value, or CK_UNAVAILABLE_INFORMATION as the length. Every value is copied
// into its own heap block of exactly its length, so ASan reports any read
// past a value.
//
// Invariants checked (abort on violation): TemplateOk accepts exactly the
// templates whose every pValue is readable for ulValueLen bytes;
// TemplateValue, ParseFindTemplate and Matches agree with a direct reading
// of the template; ReadAttributes follows PKCS#11 2.40 5.7 attribute by
// attribute, writes no byte past a value's length (the rest of each buffer
// keeps its filler) and returns the error of the last failing attribute;
// what the generate, certificate and derive parsers accept is consistent
// with the template (label, key type for the mechanism, CKA_TOKEN,
// certificate DER and CKA_ID, derive flags) and their errors are ones the
// module documents.
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/key_types.h"
#include "common/ssl_ptr.h"

// Last: p11-kit's compatibility names are macros (value, count, ...).
#include "pkcs11-module/template.h"

namespace {

using namespace keyhold::pkcs11;  // NOLINT(build/namespaces)

// Aborts (a crash libFuzzer reports) with the invariant that failed.
#define Check(cond) CheckImpl((cond), #cond, __LINE__)
void CheckImpl(bool ok, const char* what, int line) {
  if (!ok) {
    std::fprintf(stderr, "p11_template_fuzzer:%d: invariant violated: %s\n",
                 line, what);
    std::abort();
  }
}

constexpr CK_ATTRIBUTE_TYPE kTypes[] = {
    CKA_CLASS,
    CKA_TOKEN,
    CKA_PRIVATE,
    CKA_LABEL,
    CKA_VALUE,
    CKA_CERTIFICATE_TYPE,
    CKA_KEY_TYPE,
    CKA_ID,
    CKA_SENSITIVE,
    CKA_SIGN,
    CKA_DECRYPT,
    CKA_DERIVE,
    CKA_EXTRACTABLE,
    CKA_MODULUS,
    CKA_MODULUS_BITS,
    CKA_PUBLIC_EXPONENT,
    CKA_PRIVATE_EXPONENT,
    CKA_VALUE_LEN,
    CKA_EC_PARAMS,
    CKA_EC_POINT,
    CKA_SUBJECT,
    CKA_ISSUER,
    CKA_SERIAL_NUMBER,
    CKA_PUBLIC_KEY_INFO,
    CKA_VENDOR_DEFINED,
};

constexpr CK_MECHANISM_TYPE kMechanisms[] = {
    CKM_RSA_PKCS_KEY_PAIR_GEN, CKM_EC_KEY_PAIR_GEN, CKM_EC_EDWARDS_KEY_PAIR_GEN,
    CKM_EC_MONTGOMERY_KEY_PAIR_GEN, CKM_SHA256};

// The size of a value of this type: CK_ULONG, CK_BBOOL, or none (0).
std::size_t NaturalSize(CK_ATTRIBUTE_TYPE t) {
  switch (t) {
    case CKA_CLASS:
    case CKA_CERTIFICATE_TYPE:
    case CKA_KEY_TYPE:
    case CKA_MODULUS_BITS:
    case CKA_VALUE_LEN:
      return sizeof(CK_ULONG);
    case CKA_TOKEN:
    case CKA_PRIVATE:
    case CKA_SENSITIVE:
    case CKA_SIGN:
    case CKA_DECRYPT:
    case CKA_DERIVE:
    case CKA_EXTRACTABLE:
      return 1;
    default:
      return 0;
  }
}

class Reader {
 public:
  Reader(const uint8_t* data, std::size_t size) : p_(data), n_(size) {}
  bool empty() const { return n_ == 0; }
  uint8_t Byte() {
    if (n_ == 0) {
      return 0;
    }
    --n_;
    return *p_++;
  }
  // Up to `k` bytes (fewer at the end of the input).
  Bytes Take(std::size_t k) {
    k = std::min(k, n_);
    Bytes out(p_, p_ + k);
    p_ += k;
    n_ -= k;
    return out;
  }

 private:
  const uint8_t* p_;
  std::size_t n_;
};

// One template built from the input; owns every value it points to.
struct Template {
  std::vector<CK_ATTRIBUTE> attrs;
  std::vector<std::unique_ptr<uint8_t[]>> blocks;

  void Add(CK_ATTRIBUTE_TYPE type, const Bytes* bytes, CK_ULONG len) {
    CK_ATTRIBUTE a{type, nullptr, len};
    if (bytes != nullptr) {
      // Exactly the value's length (at least one byte, so the pointer is
      // a real block ASan guards).
      blocks.emplace_back(new uint8_t[std::max<std::size_t>(bytes->size(), 1)]);
      if (!bytes->empty()) {
        std::memcpy(blocks.back().get(), bytes->data(), bytes->size());
      }
      a.pValue = blocks.back().get();
    }
    attrs.push_back(a);
  }
  CK_ATTRIBUTE* data() { return attrs.empty() ? nullptr : attrs.data(); }
  CK_ULONG size() const { return attrs.size(); }
};

Template ReadTemplate(Reader& in) {
  Template t;
  constexpr std::size_t kMaxAttrs = 48;
  while (!in.empty() && t.attrs.size() < kMaxAttrs) {
    const uint8_t tb = in.Byte();
    CK_ATTRIBUTE_TYPE type = kTypes[tb % std::size(kTypes)];
    if (tb == 0xff) {
      const Bytes raw = in.Take(4);
      type = 0;
      for (uint8_t b : raw) {
        type = type << 8 | b;
      }
    }
    const uint8_t kind = in.Byte();
    const std::size_t natural = NaturalSize(type);
    switch (kind % 8) {
      case 0: {  // the natural size, or a length byte for other types
        const Bytes v = in.Take(natural != 0 ? natural : in.Byte());
        t.Add(type, &v, v.size());
        break;
      }
      case 1: {  // a length from one byte
        const Bytes v = in.Take(in.Byte());
        t.Add(type, &v, v.size());
        break;
      }
      case 2: {  // a length from two bytes (certificates)
        const std::size_t hi = in.Byte();
        const std::size_t len = hi << 8 | in.Byte();
        const Bytes v = in.Take(len);
        t.Add(type, &v, v.size());
        break;
      }
      case 3:  // null, no length: "no value"
        t.Add(type, nullptr, 0);
        break;
      case 4:  // null with a length: refused
        t.Add(type, nullptr, 1 + static_cast<CK_ULONG>(in.Byte()));
        break;
      case 5: {  // a real (one-byte) block claiming CK_UNAVAILABLE_INFORMATION
        const Bytes v = in.Take(1);
        t.Add(type, &v, CK_UNAVAILABLE_INFORMATION);
        break;
      }
      case 6: {  // empty, non-null
        const Bytes v;
        t.Add(type, &v, 0);
        break;
      }
      default: {  // one byte more or less than the type wants
        const std::size_t len =
            (kind & 0x08) != 0 ? natural + 1 : (natural == 0 ? 0 : natural - 1);
        const Bytes v = in.Take(len);
        t.Add(type, &v, v.size());
        break;
      }
    }
  }
  return t;
}

Bytes ValueOf(const CK_ATTRIBUTE& a) {
  const auto* p = static_cast<const uint8_t*>(a.pValue);
  return p == nullptr ? Bytes{} : Bytes(p, p + a.ulValueLen);
}

const CK_ATTRIBUTE* First(const CK_ATTRIBUTE* t, CK_ULONG n,
                          CK_ATTRIBUTE_TYPE type) {
  for (CK_ULONG i = 0; i < n; ++i) {
    if (t[i].type == type) {
      return &t[i];
    }
  }
  return nullptr;
}

const CK_ATTRIBUTE* Last(const CK_ATTRIBUTE* t, CK_ULONG n,
                         CK_ATTRIBUTE_TYPE type) {
  const CK_ATTRIBUTE* found = nullptr;
  for (CK_ULONG i = 0; i < n; ++i) {
    if (t[i].type == type) {
      found = &t[i];
    }
  }
  return found;
}

// A private key object as the module presents one.
const AttrMap& SampleObject() {
  static const AttrMap* attrs = [] {
    auto* a = new AttrMap;
    (*a)[CKA_CLASS] = UlongAttr(CKO_PRIVATE_KEY);
    (*a)[CKA_KEY_TYPE] = UlongAttr(CKK_EC);
    (*a)[CKA_TOKEN] = BoolAttr(true);
    (*a)[CKA_PRIVATE] = BoolAttr(false);
    (*a)[CKA_LABEL] = Bytes{'k', 'e', 'y'};
    (*a)[CKA_ID] = Bytes(32, 0x11);
    (*a)[CKA_SIGN] = BoolAttr(true);
    (*a)[CKA_DERIVE] = BoolAttr(false);
    (*a)[CKA_SENSITIVE] = BoolAttr(true);
    (*a)[CKA_EC_PARAMS] = CurveOid(keyhold::v1::EC_P256);
    (*a)[CKA_SUBJECT] = Bytes{};
    return a;
  }();
  return *attrs;
}

void CheckTemplateValue(const Template& t) {
  for (CK_ATTRIBUTE_TYPE type : kTypes) {
    const std::optional<Bytes> got =
        TemplateValue(t.attrs.data(), t.size(), type);
    const CK_ATTRIBUTE* first = First(t.attrs.data(), t.size(), type);
    Check(got.has_value() == (first != nullptr));
    if (first != nullptr) {
      Check(*got == ValueOf(*first));
    }
  }
}

void CheckFind(const Template& t) {
  FindTemplate want;
  const CK_RV rv = ParseFindTemplate(t.attrs.data(), t.size(), &want);
  Check(rv == CKR_OK || rv == CKR_ARGUMENTS_BAD);
  Check((rv == CKR_OK) == TemplateOk(t.attrs.data(), t.size()));
  if (rv != CKR_OK) {
    return;
  }
  Check(want.size() == t.size());
  AttrMap own;  // the template as an object (last value wins)
  bool consistent = true;
  for (std::size_t i = 0; i < want.size(); ++i) {
    Check(want[i].first == t.attrs[i].type);
    Check(want[i].second == ValueOf(t.attrs[i]));
    auto [it, added] = own.emplace(want[i].first, want[i].second);
    if (!added && it->second != want[i].second) {
      consistent = false;
    }
  }
  // An object with exactly these attributes matches unless the template
  // asks for two values of one attribute.
  Check(Matches(own, want) == consistent);
  bool expected = true;
  for (const auto& [type, bytes] : want) {
    auto it = SampleObject().find(type);
    expected = expected && it != SampleObject().end() && it->second == bytes;
  }
  Check(Matches(SampleObject(), want) == expected);
}

// C_GetAttributeValue: output buffers of the lengths the input claims.
void CheckRead(const Template& in, uint8_t flags) {
  constexpr uint8_t kFiller = 0xa5;
  const Bytes secret(24, 0x5e);
  AttrSource src;
  src.attrs = &SampleObject();
  src.is_private = (flags & 1) != 0;
  if ((flags & 2) != 0) {
    src.secret = &secret;
    src.secret_readable = (flags & 4) != 0;
  }
  std::vector<CK_ATTRIBUTE> out = in.attrs;
  std::vector<std::unique_ptr<uint8_t[]>> buffers;
  std::vector<CK_ULONG> sizes;
  for (CK_ATTRIBUTE& a : out) {
    if (a.pValue == nullptr || a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      a.pValue = nullptr;  // a length query (any ulValueLen)
      sizes.push_back(0);
      continue;
    }
    buffers.emplace_back(new uint8_t[std::max<CK_ULONG>(a.ulValueLen, 1)]);
    std::memset(buffers.back().get(), kFiller, a.ulValueLen);
    a.pValue = buffers.back().get();
    sizes.push_back(a.ulValueLen);
  }
  const CK_RV rv =
      ReadAttributes(src, out.empty() ? nullptr : out.data(), out.size());
  CK_RV expected_rv = CKR_OK;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const CK_ATTRIBUTE& a = out[i];
    Check(a.type == in.attrs[i].type);
    const Bytes* value = nullptr;
    CK_RV fail = CKR_OK;
    if (src.secret != nullptr && a.type == CKA_VALUE) {
      if (src.secret_readable) {
        value = src.secret;
      } else {
        fail = CKR_ATTRIBUTE_SENSITIVE;
      }
    } else if (auto it = src.attrs->find(a.type); it != src.attrs->end()) {
      value = &it->second;
    } else {
      fail = src.is_private && IsSensitiveAttr(a.type)
                 ? CKR_ATTRIBUTE_SENSITIVE
                 : CKR_ATTRIBUTE_TYPE_INVALID;
    }
    const auto* buf = static_cast<const uint8_t*>(a.pValue);
    const std::size_t kept =  // bytes that must still hold the filler
        value != nullptr && buf != nullptr && sizes[i] >= value->size()
            ? value->size()
            : 0;
    if (value == nullptr) {
      Check(a.ulValueLen == CK_UNAVAILABLE_INFORMATION);
    } else if (buf == nullptr) {
      Check(a.ulValueLen == value->size());
    } else if (sizes[i] < value->size()) {
      Check(a.ulValueLen == CK_UNAVAILABLE_INFORMATION);
      fail = CKR_BUFFER_TOO_SMALL;
    } else {
      Check(a.ulValueLen == value->size());
      Check(std::equal(value->begin(), value->end(), buf));
    }
    for (std::size_t j = kept; buf != nullptr && j < sizes[i]; ++j) {
      Check(buf[j] == kFiller);
    }
    if (fail != CKR_OK) {
      expected_rv = fail;
    }
  }
  Check(rv == expected_rv);
}

void CheckGenerate(const Template& t, CK_MECHANISM_TYPE mech,
                   std::size_t split) {
  const CK_ATTRIBUTE* pub = t.attrs.data();
  const auto pub_n = static_cast<CK_ULONG>(std::min(split, t.attrs.size()));
  const CK_ATTRIBUTE* priv = pub_n < t.size() ? pub + pub_n : nullptr;
  const CK_ULONG priv_n = t.size() - pub_n;
  GenerateRequest req;
  const CK_RV rv = ParseGenerateTemplates(mech, pub, pub_n, priv, priv_n, &req);
  static const std::set<CK_RV> kErrors = {
      CKR_TEMPLATE_INCONSISTENT, CKR_TEMPLATE_INCOMPLETE,
      CKR_ATTRIBUTE_VALUE_INVALID, CKR_MECHANISM_INVALID};
  Check(rv == CKR_OK || kErrors.count(rv) == 1);
  if (rv != CKR_OK) {
    return;
  }
  for (auto [tt, tn] : {std::pair{pub, pub_n}, std::pair{priv, priv_n}}) {
    if (const CK_ATTRIBUTE* tok = First(tt, tn, CKA_TOKEN)) {
      const Bytes v = ValueOf(*tok);
      Check(v.size() == 1 && v[0] != CK_FALSE);
    }
  }
  const CK_ATTRIBUTE* label = First(priv, priv_n, CKA_LABEL);
  if (label == nullptr) {
    label = First(pub, pub_n, CKA_LABEL);
  }
  Check(label != nullptr);
  const Bytes name = ValueOf(*label);
  Check(req.name == std::string(name.begin(), name.end()));
  Check(keyhold::ValidateKeyName(req.name).ok());
  switch (mech) {
    case CKM_RSA_PKCS_KEY_PAIR_GEN:
      Check(req.type == keyhold::v1::RSA_2048 ||
            req.type == keyhold::v1::RSA_3072 ||
            req.type == keyhold::v1::RSA_4096);
      break;
    case CKM_EC_KEY_PAIR_GEN:
      Check(req.type == keyhold::v1::EC_P256 ||
            req.type == keyhold::v1::EC_P384 ||
            req.type == keyhold::v1::EC_P521);
      Check(First(pub, pub_n, CKA_EC_PARAMS) != nullptr &&
            ValueOf(*First(pub, pub_n, CKA_EC_PARAMS)) == CurveOid(req.type));
      break;
    case CKM_EC_EDWARDS_KEY_PAIR_GEN:
      Check(req.type == keyhold::v1::ED25519);
      break;
    case CKM_EC_MONTGOMERY_KEY_PAIR_GEN:
      Check(req.type == keyhold::v1::X25519);
      break;
    default:
      Check(false);  // no other mechanism generates a key pair
  }
}

void CheckCertificate(const Template& t) {
  CertificateRequest req;
  const CK_RV rv = ParseCertificateTemplate(t.attrs.data(), t.size(), &req);
  static const std::set<CK_RV> kErrors = {CKR_TEMPLATE_INCONSISTENT,
                                          CKR_TEMPLATE_INCOMPLETE,
                                          CKR_ATTRIBUTE_VALUE_INVALID};
  Check(rv == CKR_OK || kErrors.count(rv) == 1);
  if (rv != CKR_OK) {
    return;
  }
  const CK_ATTRIBUTE* cls = First(t.attrs.data(), t.size(), CKA_CLASS);
  Check(cls != nullptr && ValueOf(*cls) == UlongAttr(CKO_CERTIFICATE));
  const CK_ATTRIBUTE* der = First(t.attrs.data(), t.size(), CKA_VALUE);
  Check(der != nullptr && ValueOf(*der) == req.der);
  const unsigned char* p = req.der.data();
  keyhold::SslPtr<X509> x(
      d2i_X509(nullptr, &p, static_cast<long>(req.der.size())));
  Check(x != nullptr && p == req.der.data() + req.der.size());
  unsigned char* spki = nullptr;
  const int len = i2d_X509_PUBKEY(X509_get_X509_PUBKEY(x.get()), &spki);
  Check(len > 0);
  Bytes id(SHA256_DIGEST_LENGTH);
  SHA256(spki, static_cast<std::size_t>(len), id.data());
  OPENSSL_free(spki);
  Check(req.id == id);
  if (const CK_ATTRIBUTE* want = First(t.attrs.data(), t.size(), CKA_ID)) {
    Check(ValueOf(*want) == id);
  }
}

void CheckDerive(const Template& t) {
  DeriveRequest req;
  const CK_RV rv = ParseDeriveTemplate(t.attrs.data(), t.size(), &req);
  Check(rv == CKR_OK || rv == CKR_TEMPLATE_INCONSISTENT);
  if (rv != CKR_OK) {
    return;
  }
  const CK_ATTRIBUTE* a = t.attrs.data();
  const CK_ULONG n = t.size();
  for (CK_ULONG i = 0; i < n; ++i) {
    const Bytes v = ValueOf(a[i]);
    if (a[i].type == CKA_CLASS) {
      Check(v == UlongAttr(CKO_SECRET_KEY));
    } else if (a[i].type == CKA_TOKEN) {
      Check(v == BoolAttr(false));
    } else if (a[i].type == CKA_KEY_TYPE || a[i].type == CKA_VALUE_LEN) {
      Check(v.size() == sizeof(CK_ULONG));
    } else if (a[i].type == CKA_SENSITIVE || a[i].type == CKA_EXTRACTABLE) {
      Check(v.size() == 1);
    }
  }
  Check(req.value_length.has_value() ==
        (First(a, n, CKA_VALUE_LEN) != nullptr));
  const CK_ATTRIBUTE* s = Last(a, n, CKA_SENSITIVE);
  Check(req.sensitive == (s != nullptr && ValueOf(*s)[0] != CK_FALSE));
  const CK_ATTRIBUTE* e = Last(a, n, CKA_EXTRACTABLE);
  Check(req.extractable == (e == nullptr || ValueOf(*e)[0] != CK_FALSE));
  for (const auto& [type, bytes] : req.attrs) {
    Check(type == CKA_LABEL || type == CKA_ID);
    Check(bytes == ValueOf(*Last(a, n, type)));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in(data, size);
  const CK_MECHANISM_TYPE mech =
      kMechanisms[in.Byte() % std::size(kMechanisms)];
  const std::size_t split = in.Byte();
  const uint8_t flags = in.Byte();
  const Template t = ReadTemplate(in);

  bool readable = true;  // every pValue is good for ulValueLen bytes
  for (const CK_ATTRIBUTE& a : t.attrs) {
    if ((a.pValue == nullptr && a.ulValueLen != 0) ||
        a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      readable = false;
    }
  }
  // The find template is parsed whatever the input: it must refuse what it
  // cannot read.
  CheckFind(t);
  Check(TemplateOk(t.attrs.data(), t.size()) == readable);
  Check(TemplateOk(nullptr, 0));
  Check(!TemplateOk(nullptr, 1));
  CheckRead(t, flags);
  if (!readable) {
    return 0;  // the module refuses the template before reading it
  }
  CheckTemplateValue(t);
  CheckGenerate(t, mech, split);
  CheckCertificate(t);
  CheckDerive(t);
  return 0;
}
