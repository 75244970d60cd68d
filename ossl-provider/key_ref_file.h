// The body of a key reference file (`keyhold key ref NAME`): the DER inside
//
//   -----BEGIN KEYHOLD KEY REFERENCE-----
//   base64 of DER SEQUENCE { UTF8String uri, SubjectPublicKeyInfo }
//   -----END KEYHOLD KEY REFERENCE-----
//
// Any file a user hands to openssl or nginx may reach this parser, so it is
// kept free of provider state and fuzzed (fuzz/key_ref_fuzzer.cc).
#ifndef KEYHOLD_OSSL_PROVIDER_KEY_REF_FILE_H_
#define KEYHOLD_OSSL_PROVIDER_KEY_REF_FILE_H_

#include <string>
#include <string_view>

#include "common/status.h"

namespace keyhold::ossl {

struct KeyRefFile {
  std::string uri;   // "keyhold:NAME" or "keyhold:OWNER/NAME"
  std::string spki;  // DER SubjectPublicKeyInfo, not yet parsed
};

// Splits the DER body; "malformed key reference" unless it is exactly one
// SEQUENCE of a UTF8String followed by the rest (the SPKI).
StatusOr<KeyRefFile> ParseKeyRefFile(std::string_view der);

}  // namespace keyhold::ossl

#endif  // KEYHOLD_OSSL_PROVIDER_KEY_REF_FILE_H_
