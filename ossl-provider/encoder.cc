// ENCODER: writes a keyhold key as a key reference file (the same PEM block
// `keyhold key ref` prints) wherever OpenSSL writes a private key, e.g.
// `openssl pkey -in keyhold:web -out web.ref.pem` or `openssl genpkey`.
// Public keys are encoded by the default provider from the exported public
// half.
#include <openssl/core_names.h>
#include <openssl/pem.h>
#include <unistd.h>

#include <string>

#include "ossl-provider/provider.h"

namespace keyhold::ossl {
namespace {

void AppendDerLength(std::string& out, size_t len) {
  if (len < 0x80) {
    out.push_back(static_cast<char>(len));
    return;
  }
  std::string bytes;
  for (size_t v = len; v != 0; v >>= 8) {
    bytes.insert(bytes.begin(), static_cast<char>(v & 0xff));
  }
  out.push_back(static_cast<char>(0x80 | bytes.size()));
  out += bytes;
}

void* EncNew(void* provctx) { return provctx; }
void EncFree(void*) {}

int EncDoesSelection(void*, int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 ? 1 : 0;
}

int EncEncode(void*, OSSL_CORE_BIO* out, const void* obj_raw, const OSSL_PARAM[],
              int selection, OSSL_PASSPHRASE_CALLBACK*, void*) {
  KH_OSSL_ENTRY(0, {
    const auto* key = static_cast<const Key*>(obj_raw);
    if (key == nullptr || !key->has_ref ||
        (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) == 0) {
      return 0;
    }
    const uint32_t owner =
        key->ref.has_owner() ? key->ref.owner() : static_cast<uint32_t>(geteuid());
    const std::string uri = "keyhold:" + std::to_string(owner) + "/" + key->ref.name();
    std::string body;
    body.push_back(0x0c);  // UTF8String
    AppendDerLength(body, uri.size());
    body += uri;
    body += key->spki;
    std::string der;
    der.push_back(0x30);  // SEQUENCE
    AppendDerLength(der, body.size());
    der += body;
    BIO* mem = BIO_new(BIO_s_mem());
    if (mem == nullptr) return 0;
    int ok = PEM_write_bio(mem, "KEYHOLD KEY REFERENCE", "",
                           reinterpret_cast<const unsigned char*>(der.data()),
                           static_cast<long>(der.size())) > 0;
    char* data = nullptr;
    const long len = BIO_get_mem_data(mem, &data);
    ok = ok && len > 0 && WriteCoreBio(out, data, static_cast<size_t>(len));
    BIO_free(mem);
    return ok ? 1 : 0;
  })
}

}  // namespace

const OSSL_DISPATCH kRefEncoderFunctions[] = {
    {OSSL_FUNC_ENCODER_NEWCTX, reinterpret_cast<void (*)()>(EncNew)},
    {OSSL_FUNC_ENCODER_FREECTX, reinterpret_cast<void (*)()>(EncFree)},
    {OSSL_FUNC_ENCODER_DOES_SELECTION, reinterpret_cast<void (*)()>(EncDoesSelection)},
    {OSSL_FUNC_ENCODER_ENCODE, reinterpret_cast<void (*)()>(EncEncode)},
    {0, nullptr}};

}  // namespace keyhold::ossl
