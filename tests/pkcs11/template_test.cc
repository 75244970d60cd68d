// Unit tests for pkcs11-module/template.cc (CMocka, like
// pkcs11_module_test, but no daemon and no dlopen): the reading of the
// CK_ATTRIBUTE templates applications pass to C_FindObjectsInit,
// C_GetAttributeValue, C_GenerateKeyPair, C_CreateObject and C_DeriveKey.
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cstring>
#include <string>
#include <vector>

#include "common/ssl_ptr.h"

extern "C" {
#include <cmocka.h>
}

// Last: p11-kit's compatibility names are macros (value, count, ...).
#include "pkcs11-module/template.h"

namespace keyhold::pkcs11 {
namespace {

CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, const void* p, std::size_t len) {
  return CK_ATTRIBUTE{type, const_cast<void*>(p), len};
}

CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, const Bytes& b) {
  return Attr(type, b.data(), b.size());
}

CK_ATTRIBUTE Attr(CK_ATTRIBUTE_TYPE type, const std::string& s) {
  return Attr(type, s.data(), s.size());
}

void TemplateOkRefusesUnreadableValues(void** /*state*/) {
  const Bytes cls = UlongAttr(CKO_PRIVATE_KEY);
  CK_ATTRIBUTE good[] = {Attr(CKA_CLASS, cls), Attr(CKA_LABEL, nullptr, 0)};
  assert_true(TemplateOk(good, 2));
  assert_true(TemplateOk(nullptr, 0));
  assert_false(TemplateOk(nullptr, 1));
  CK_ATTRIBUTE null_with_length[] = {Attr(CKA_LABEL, nullptr, 4)};
  assert_false(TemplateOk(null_with_length, 1));
  // Regression (found by fuzz/p11_template_fuzzer): a length of
  // CK_UNAVAILABLE_INFORMATION passed TemplateOk, and the value was then
  // read as [p, p + ~0), past the end of the address space.
  CK_ATTRIBUTE unavailable[] = {
      Attr(CKA_ID, cls.data(), CK_UNAVAILABLE_INFORMATION)};
  assert_false(TemplateOk(unavailable, 1));
  std::vector<std::pair<CK_ATTRIBUTE_TYPE, Bytes>> want;
  assert_int_equal(ParseFindTemplate(unavailable, 1, &want), CKR_ARGUMENTS_BAD);
}

void FindTemplatesParseAndMatch(void** /*state*/) {
  AttrMap obj;
  obj[CKA_CLASS] = UlongAttr(CKO_PUBLIC_KEY);
  obj[CKA_LABEL] = Bytes{'k'};
  obj[CKA_SUBJECT] = Bytes{};
  const Bytes cls = UlongAttr(CKO_PUBLIC_KEY);
  const std::string label = "k";
  CK_ATTRIBUTE t[] = {Attr(CKA_CLASS, cls), Attr(CKA_LABEL, label),
                      Attr(CKA_SUBJECT, nullptr, 0)};
  FindTemplate want;
  assert_int_equal(ParseFindTemplate(t, 3, &want), CKR_OK);
  assert_int_equal(want.size(), 3);
  assert_true(want[1].second == Bytes{'k'});
  assert_true(Matches(obj, want));
  assert_true(Matches(obj, {}));
  const std::string other = "kk";
  CK_ATTRIBUTE wrong[] = {Attr(CKA_LABEL, other)};
  assert_int_equal(ParseFindTemplate(wrong, 1, &want), CKR_OK);
  assert_false(Matches(obj, want));
  CK_ATTRIBUTE missing[] = {Attr(CKA_ID, nullptr, 0)};
  assert_int_equal(ParseFindTemplate(missing, 1, &want), CKR_OK);
  assert_false(Matches(obj, want));

  // An application that reads attributes into a template, gets
  // CK_UNAVAILABLE_INFORMATION for one and then searches with the same
  // template is refused, not read past its buffer.
  uint8_t buf[2] = {};
  CK_ATTRIBUTE reused[] = {Attr(CKA_LABEL, buf, sizeof buf),
                           Attr(CKA_ID, buf, sizeof buf)};
  AttrSource src;
  src.attrs = &obj;
  assert_int_equal(ReadAttributes(src, reused, 2), CKR_ATTRIBUTE_TYPE_INVALID);
  assert_int_equal(reused[0].ulValueLen, 1);
  assert_int_equal(reused[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(ParseFindTemplate(reused, 2, &want), CKR_ARGUMENTS_BAD);
}

void ReadAttributesFollowsTheSpec(void** /*state*/) {
  AttrMap obj;
  obj[CKA_LABEL] = Bytes{'a', 'b', 'c'};
  obj[CKA_SUBJECT] = Bytes{};
  AttrSource src;
  src.attrs = &obj;
  src.is_private = true;
  uint8_t small[2] = {0xee, 0xee};
  uint8_t big[8];
  std::memset(big, 0xee, sizeof big);
  CK_ATTRIBUTE t[] = {Attr(CKA_LABEL, nullptr, 0), Attr(CKA_LABEL, small, 2),
                      Attr(CKA_LABEL, big, 8), Attr(CKA_SUBJECT, big, 0)};
  assert_int_equal(ReadAttributes(src, t, 4), CKR_BUFFER_TOO_SMALL);
  assert_int_equal(t[0].ulValueLen, 3);
  assert_int_equal(t[1].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(small[0], 0xee);  // nothing written
  assert_int_equal(t[2].ulValueLen, 3);
  assert_memory_equal(big, "abc", 3);
  assert_int_equal(big[3], 0xee);
  assert_int_equal(t[3].ulValueLen, 0);

  // A template passed again after a failure still says
  // CK_UNAVAILABLE_INFORMATION: no write into that buffer.
  std::memset(big, 0xee, sizeof big);
  CK_ATTRIBUTE reused_len[] = {
      Attr(CKA_LABEL, big, CK_UNAVAILABLE_INFORMATION)};
  assert_int_equal(ReadAttributes(src, reused_len, 1), CKR_BUFFER_TOO_SMALL);
  assert_int_equal(reused_len[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(big[0], 0xee);

  // The error of the last failing attribute; sensitive ones on a private
  // key say so.
  CK_ATTRIBUTE missing[] = {Attr(CKA_PRIVATE_EXPONENT, nullptr, 0),
                            Attr(CKA_ID, nullptr, 0)};
  assert_int_equal(ReadAttributes(src, missing, 2), CKR_ATTRIBUTE_TYPE_INVALID);
  assert_int_equal(missing[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  assert_int_equal(ReadAttributes(src, missing, 1), CKR_ATTRIBUTE_SENSITIVE);
  src.is_private = false;
  assert_int_equal(ReadAttributes(src, missing, 1), CKR_ATTRIBUTE_TYPE_INVALID);

  // A derived secret: CKA_VALUE only if readable.
  const Bytes secret{1, 2, 3, 4};
  src.secret = &secret;
  CK_ATTRIBUTE value[] = {Attr(CKA_VALUE, big, sizeof big)};
  assert_int_equal(ReadAttributes(src, value, 1), CKR_ATTRIBUTE_SENSITIVE);
  assert_int_equal(value[0].ulValueLen, CK_UNAVAILABLE_INFORMATION);
  src.secret_readable = true;
  value[0].ulValueLen = sizeof big;
  assert_int_equal(ReadAttributes(src, value, 1), CKR_OK);
  assert_int_equal(value[0].ulValueLen, 4);
  assert_memory_equal(big, secret.data(), 4);
}

void GenerateTemplates(void** /*state*/) {
  const Bytes p256 = CurveOid(v1::EC_P256);
  const std::string name = "web-1";
  const Bytes yes = BoolAttr(true);
  const Bytes no = BoolAttr(false);
  CK_ATTRIBUTE pub[] = {Attr(CKA_EC_PARAMS, p256), Attr(CKA_TOKEN, yes)};
  CK_ATTRIBUTE priv[] = {Attr(CKA_LABEL, name)};
  GenerateRequest req;
  assert_int_equal(
      ParseGenerateTemplates(CKM_EC_KEY_PAIR_GEN, pub, 2, priv, 1, &req),
      CKR_OK);
  assert_int_equal(req.type, v1::EC_P256);
  assert_string_equal(req.name.c_str(), "web-1");
  assert_int_equal(
      ParseGenerateTemplates(CKM_EC_KEY_PAIR_GEN, pub, 2, nullptr, 0, &req),
      CKR_TEMPLATE_INCOMPLETE);  // no label
  assert_int_equal(
      ParseGenerateTemplates(CKM_EC_KEY_PAIR_GEN, pub, 1, priv, 1, &req),
      CKR_OK);
  assert_int_equal(ParseGenerateTemplates(CKM_SHA256, pub, 2, priv, 1, &req),
                   CKR_MECHANISM_INVALID);
  CK_ATTRIBUTE session[] = {Attr(CKA_TOKEN, no), Attr(CKA_LABEL, name)};
  assert_int_equal(ParseGenerateTemplates(CKM_EC_EDWARDS_KEY_PAIR_GEN, nullptr,
                                          0, session, 2, &req),
                   CKR_TEMPLATE_INCONSISTENT);
  const std::string bad_name = "a/b";
  CK_ATTRIBUTE bad[] = {Attr(CKA_LABEL, bad_name)};
  assert_int_equal(ParseGenerateTemplates(CKM_EC_MONTGOMERY_KEY_PAIR_GEN,
                                          nullptr, 0, bad, 1, &req),
                   CKR_ATTRIBUTE_VALUE_INVALID);
  const std::string printable(
      "\x13\x0c"
      "edwards25519");
  CK_ATTRIBUTE ed[] = {Attr(CKA_EC_PARAMS, printable)};
  assert_int_equal(
      ParseGenerateTemplates(CKM_EC_EDWARDS_KEY_PAIR_GEN, ed, 1, priv, 1, &req),
      CKR_OK);
  assert_int_equal(req.type, v1::ED25519);
  const uint32_t short_bits = 2048;  // a CK_ULONG is 8 bytes
  CK_ATTRIBUTE rsa[] = {Attr(CKA_MODULUS_BITS, &short_bits, sizeof short_bits)};
  assert_int_equal(
      ParseGenerateTemplates(CKM_RSA_PKCS_KEY_PAIR_GEN, rsa, 1, priv, 1, &req),
      CKR_ATTRIBUTE_VALUE_INVALID);
  const Bytes bits = UlongAttr(3072);
  const Bytes e{0x00, 0x01, 0x00, 0x01};
  CK_ATTRIBUTE rsa_ok[] = {Attr(CKA_MODULUS_BITS, bits),
                           Attr(CKA_PUBLIC_EXPONENT, e)};
  assert_int_equal(ParseGenerateTemplates(CKM_RSA_PKCS_KEY_PAIR_GEN, rsa_ok, 2,
                                          priv, 1, &req),
                   CKR_OK);
  assert_int_equal(req.type, v1::RSA_3072);
}

Bytes SelfSigned(Bytes* id) {
  SslPtr<EVP_PKEY> key(EVP_EC_gen("P-256"));
  SslPtr<X509> x(X509_new());
  X509_set_version(x.get(), X509_VERSION_3);
  ASN1_INTEGER_set(X509_get_serialNumber(x.get()), 1);
  X509_NAME_add_entry_by_txt(X509_get_subject_name(x.get()), "CN", MBSTRING_ASC,
                             reinterpret_cast<const unsigned char*>("t"), -1,
                             -1, 0);
  X509_set_issuer_name(x.get(), X509_get_subject_name(x.get()));
  X509_gmtime_adj(X509_getm_notBefore(x.get()), 0);
  X509_gmtime_adj(X509_getm_notAfter(x.get()), 60);
  X509_set_pubkey(x.get(), key.get());
  assert_true(X509_sign(x.get(), key.get(), EVP_sha256()) > 0);
  unsigned char* der = nullptr;
  const int len = i2d_X509(x.get(), &der);
  assert_true(len > 0);
  Bytes out(der, der + len);
  OPENSSL_free(der);
  unsigned char* spki = nullptr;
  const int spki_len = i2d_PUBKEY(key.get(), &spki);
  assert_true(spki_len > 0);
  id->resize(SHA256_DIGEST_LENGTH);
  SHA256(spki, static_cast<std::size_t>(spki_len), id->data());
  OPENSSL_free(spki);
  return out;
}

void CertificateTemplates(void** /*state*/) {
  Bytes id;
  const Bytes der = SelfSigned(&id);
  const Bytes cls = UlongAttr(CKO_CERTIFICATE);
  const Bytes x509 = UlongAttr(CKC_X_509);
  CK_ATTRIBUTE t[] = {Attr(CKA_CLASS, cls), Attr(CKA_CERTIFICATE_TYPE, x509),
                      Attr(CKA_VALUE, der), Attr(CKA_ID, id)};
  CertificateRequest req;
  assert_int_equal(ParseCertificateTemplate(t, 4, &req), CKR_OK);
  assert_true(req.der == der);
  assert_true(req.id == id);
  assert_int_equal(ParseCertificateTemplate(t + 1, 3, &req),
                   CKR_TEMPLATE_INCOMPLETE);  // no class
  assert_int_equal(ParseCertificateTemplate(t, 2, &req),
                   CKR_TEMPLATE_INCOMPLETE);  // no value
  Bytes other_id = id;
  other_id[0] ^= 1;
  CK_ATTRIBUTE wrong_id[] = {Attr(CKA_CLASS, cls), Attr(CKA_VALUE, der),
                             Attr(CKA_ID, other_id)};
  assert_int_equal(ParseCertificateTemplate(wrong_id, 3, &req),
                   CKR_TEMPLATE_INCONSISTENT);
  Bytes trailing = der;
  trailing.push_back(0);
  CK_ATTRIBUTE longer[] = {Attr(CKA_CLASS, cls), Attr(CKA_VALUE, trailing)};
  assert_int_equal(ParseCertificateTemplate(longer, 2, &req),
                   CKR_ATTRIBUTE_VALUE_INVALID);
  CK_ATTRIBUTE shorter[] = {Attr(CKA_CLASS, cls),
                            Attr(CKA_VALUE, der.data(), der.size() - 1)};
  assert_int_equal(ParseCertificateTemplate(shorter, 2, &req),
                   CKR_ATTRIBUTE_VALUE_INVALID);
}

void DeriveTemplates(void** /*state*/) {
  const Bytes cls = UlongAttr(CKO_SECRET_KEY);
  const Bytes len = UlongAttr(16);
  const Bytes yes = BoolAttr(true);
  const Bytes no = BoolAttr(false);
  const std::string label = "shared";
  CK_ATTRIBUTE t[] = {Attr(CKA_CLASS, cls),     Attr(CKA_VALUE_LEN, len),
                      Attr(CKA_SENSITIVE, yes), Attr(CKA_EXTRACTABLE, no),
                      Attr(CKA_TOKEN, no),      Attr(CKA_LABEL, label),
                      Attr(CKA_SIGN, yes)};
  DeriveRequest req;
  assert_int_equal(ParseDeriveTemplate(t, 7, &req), CKR_OK);
  assert_true(req.value_length.has_value());
  assert_int_equal(*req.value_length, 16);
  assert_true(req.sensitive);
  assert_false(req.extractable);
  assert_int_equal(req.attrs.size(), 1);
  assert_true(req.attrs[CKA_LABEL] == Bytes(label.begin(), label.end()));
  CK_ATTRIBUTE token[] = {Attr(CKA_TOKEN, yes)};
  assert_int_equal(ParseDeriveTemplate(token, 1, &req),
                   CKR_TEMPLATE_INCONSISTENT);
  const Bytes two{1, 1};
  CK_ATTRIBUTE wide_bool[] = {Attr(CKA_SENSITIVE, two)};
  assert_int_equal(ParseDeriveTemplate(wide_bool, 1, &req),
                   CKR_TEMPLATE_INCONSISTENT);
  const Bytes pub = UlongAttr(CKO_PUBLIC_KEY);
  CK_ATTRIBUTE wrong_class[] = {Attr(CKA_CLASS, pub)};
  assert_int_equal(ParseDeriveTemplate(wrong_class, 1, &req),
                   CKR_TEMPLATE_INCONSISTENT);
  assert_int_equal(ParseDeriveTemplate(nullptr, 0, &req), CKR_OK);
  assert_false(req.value_length.has_value());
  assert_false(req.sensitive);
  assert_true(req.extractable);
}

}  // namespace
}  // namespace keyhold::pkcs11

int main() {
  using namespace keyhold::pkcs11;  // NOLINT(build/namespaces)
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(TemplateOkRefusesUnreadableValues),
      cmocka_unit_test(FindTemplatesParseAndMatch),
      cmocka_unit_test(ReadAttributesFollowsTheSpec),
      cmocka_unit_test(GenerateTemplates),
      cmocka_unit_test(CertificateTemplates),
      cmocka_unit_test(DeriveTemplates),
  };
  return cmocka_run_group_tests(tests, nullptr, nullptr);
}
