// libFuzzer target for key reference files (`keyhold key ref NAME`), which
// any user may hand to openssl, nginx or curl as a key file: the PEM
// envelope (as the provider's decoder reads it), the DER body
// (ParseKeyRefFile), the public key inside (d2i_PUBKEY, as SetPublicKey
// does) and the keyhold: URI's key reference (ParseKeyRefText).
//
// Invariants checked: no crash or hang on any input; a parsed body's URI and
// SPKI are no longer than the body.
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/key_types.h"
#include "ossl-provider/key_ref_file.h"

namespace {

void ParseBody(std::string_view der) {
  auto parsed = keyhold::ossl::ParseKeyRefFile(der);
  if (!parsed.ok()) {
    return;
  }
  if (parsed->uri.size() + parsed->spki.size() > der.size()) {
    __builtin_trap();
  }
  const auto* p = reinterpret_cast<const unsigned char*>(parsed->spki.data());
  EVP_PKEY* pub =
      d2i_PUBKEY(nullptr, &p, static_cast<long>(parsed->spki.size()));
  EVP_PKEY_free(pub);
  constexpr std::string_view kScheme = "keyhold:";
  if (parsed->uri.compare(0, kScheme.size(), kScheme) == 0) {
    (void)keyhold::ParseKeyRefText(
        std::string_view(parsed->uri).substr(kScheme.size()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  ParseBody(input);  // the DER stage on its own
  BIO* mem = BIO_new_mem_buf(data, static_cast<int>(size));
  if (mem == nullptr) {
    return 0;
  }
  char* name = nullptr;
  char* header = nullptr;
  unsigned char* der = nullptr;
  long len = 0;
  if (PEM_read_bio(mem, &name, &header, &der, &len) == 1) {
    ParseBody(std::string_view(reinterpret_cast<const char*>(der),
                               static_cast<size_t>(len)));
  }
  OPENSSL_free(name);
  OPENSSL_free(header);
  OPENSSL_free(der);
  BIO_free(mem);
  return 0;
}
