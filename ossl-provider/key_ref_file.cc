#include "ossl-provider/key_ref_file.h"

#include <openssl/asn1.h>

namespace keyhold::ossl {
namespace {

// Reads one DER TLV header; false if malformed, of another tag, or longer
// than what is left.
bool ReadTlv(const unsigned char** p, long max, int expected_tag, long* len) {
  int tag = 0;
  int xclass = 0;
  const int r = ASN1_get_object(p, len, &tag, &xclass, max);
  return (r & 0x80) == 0 && r != V_ASN1_CONSTRUCTED + 1 &&  // not indefinite
         tag == expected_tag && xclass == V_ASN1_UNIVERSAL;
}

}  // namespace

StatusOr<KeyRefFile> ParseKeyRefFile(std::string_view der) {
  const auto* p = reinterpret_cast<const unsigned char*>(der.data());
  const unsigned char* end = p + der.size();
  long len = 0;
  if (!ReadTlv(&p, static_cast<long>(der.size()), V_ASN1_SEQUENCE, &len) ||
      len != end - p) {
    return InvalidArgument("malformed key reference");
  }
  long ulen = 0;
  if (!ReadTlv(&p, end - p, V_ASN1_UTF8STRING, &ulen) || ulen > end - p) {
    return InvalidArgument("malformed key reference");
  }
  KeyRefFile out;
  out.uri.assign(reinterpret_cast<const char*>(p), static_cast<size_t>(ulen));
  p += ulen;
  out.spki.assign(reinterpret_cast<const char*>(p),
                  static_cast<size_t>(end - p));
  return out;
}

}  // namespace keyhold::ossl
