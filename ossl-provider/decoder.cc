// DECODER for key reference files written by `keyhold key ref NAME`:
//
//   -----BEGIN KEYHOLD KEY REFERENCE-----
//   base64 of DER SEQUENCE { UTF8String uri, SubjectPublicKeyInfo }
//   -----END KEYHOLD KEY REFERENCE-----
//
// The file holds no secret. It decodes to the same key object as the store
// loader, so programs that only take a key *file* (nginx, curl) use the
// daemon's key. Decoding does not contact the daemon; the first private-key
// operation does. The DER body is parsed by key_ref_file.cc (fuzzed).
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/params.h>
#include <openssl/pem.h>

#include <cstring>
#include <string>

#include "ossl-provider/key_ref_file.h"
#include "ossl-provider/provider.h"

namespace keyhold::ossl {
namespace {

constexpr char kPemName[] = "KEYHOLD KEY REFERENCE";
constexpr char kStructure[] = "keyhold";

void* DecNew(void* provctx) { return provctx; }
void DecFree(void*) {}

int DecDoesSelection(void*, int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) != 0 || selection == 0 ? 1 : 0;
}

// Reads the whole input; nullopt (with no error) when it is not ours.
bool ReadPemRef(OSSL_CORE_BIO* cin, std::string* der) {
  std::string input;
  if (!ReadCoreBio(cin, &input)) return false;
  BIO* mem = BIO_new_mem_buf(input.data(), static_cast<int>(input.size()));
  if (mem == nullptr) return false;
  char* name = nullptr;
  char* header = nullptr;
  unsigned char* data = nullptr;
  long dlen = 0;
  const int ok = PEM_read_bio(mem, &name, &header, &data, &dlen);
  BIO_free(mem);
  bool ours = false;
  if (ok == 1) {
    ours = std::strcmp(name, kPemName) == 0;
    der->assign(reinterpret_cast<char*>(data), static_cast<size_t>(dlen));
  }
  OPENSSL_free(name);
  OPENSSL_free(header);
  OPENSSL_free(data);
  return ours;
}

// Parses a reference into a key object; raises and returns false on error.
bool MakeKey(ProvCtx* prov, const std::string& der, Key* key) {
  auto parsed = ParseKeyRefFile(der);
  if (!parsed.ok()) {
    RaiseStatus("key reference file", parsed.status());
    return false;
  }
  const std::string& uri = parsed->uri;
  key->prov = prov;
  key->has_ref = true;
  key->uri = uri;
  Status st = SetPublicKey(*key, parsed->spki);
  if (!st.ok()) {
    RaiseStatus(uri, st);
    return false;
  }
  auto ref = ParseKeyUri(uri);
  if (!ref.ok()) {
    RaiseStatus(uri, ref.status());
    return false;
  }
  key->ref = *ref;
  return true;
}

// Stage 1, PEM -> DER: unwraps the PEM block and names the key type, so
// both OpenSSL's file: store and PEM_read_bio_PrivateKey() reach stage 2.
int DecPemToDer(void* ctx, OSSL_CORE_BIO* cin, int, OSSL_CALLBACK* data_cb,
                void* data_cbarg, OSSL_PASSPHRASE_CALLBACK*, void*) {
  KH_OSSL_ENTRY(0, {
    std::string der;
    // Not a key reference: empty-handed, which is not an error.
    if (!ReadPemRef(cin, &der)) return 1;
    Key key;
    if (!MakeKey(static_cast<ProvCtx*>(ctx), der, &key)) return 0;
    int object_type = OSSL_OBJECT_PKEY;
    std::string alg = key.alg;
    std::string structure = kStructure;
    OSSL_PARAM params[] = {
        OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, alg.data(), alg.size()),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_STRUCTURE, structure.data(),
                               structure.size()),
        OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_DATA, der.data(), der.size()),
        OSSL_PARAM_END};
    return data_cb(params, data_cbarg);
  })
}

// Stage 2, DER (structure=keyhold) -> key object by reference.
template <int kAlg>
int DecDerToKey(void* ctx, OSSL_CORE_BIO* cin, int, OSSL_CALLBACK* data_cb,
                void* data_cbarg, OSSL_PASSPHRASE_CALLBACK*, void*) {
  static constexpr const char* kNames[] = {"EC", "RSA", "ED25519", "X25519"};
  KH_OSSL_ENTRY(0, {
    std::string der;
    if (!ReadCoreBio(cin, &der)) return 1;
    if (!ParseKeyRefFile(der).ok()) return 1;  // not ours
    Key key;
    if (!MakeKey(static_cast<ProvCtx*>(ctx), der, &key)) return 0;
    // Another instance of this decoder handles the other key types.
    if (key.alg != kNames[kAlg]) return 1;
    Key* ptr = &key;
    int object_type = OSSL_OBJECT_PKEY;
    std::string alg = key.alg;
    OSSL_PARAM params[] = {
        OSSL_PARAM_int(OSSL_OBJECT_PARAM_TYPE, &object_type),
        OSSL_PARAM_utf8_string(OSSL_OBJECT_PARAM_DATA_TYPE, alg.data(), alg.size()),
        OSSL_PARAM_octet_string(OSSL_OBJECT_PARAM_REFERENCE, &ptr, sizeof(ptr)),
        OSSL_PARAM_END};
    return data_cb(params, data_cbarg);
  })
}

}  // namespace

#define KH_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }
#define KH_DECODER_TABLE(A)                                      \
  {KH_FN(OSSL_FUNC_DECODER_NEWCTX, DecNew),                      \
   KH_FN(OSSL_FUNC_DECODER_FREECTX, DecFree),                    \
   KH_FN(OSSL_FUNC_DECODER_DOES_SELECTION, DecDoesSelection),    \
   KH_FN(OSSL_FUNC_DECODER_DECODE, A),                           \
   {0, nullptr}}

const OSSL_DISPATCH kPemDecoderFunctions[] = KH_DECODER_TABLE(DecPemToDer);
const OSSL_DISPATCH kEcDecoderFunctions[] = KH_DECODER_TABLE(DecDerToKey<0>);
const OSSL_DISPATCH kRsaDecoderFunctions[] = KH_DECODER_TABLE(DecDerToKey<1>);
const OSSL_DISPATCH kEd25519DecoderFunctions[] = KH_DECODER_TABLE(DecDerToKey<2>);
const OSSL_DISPATCH kX25519DecoderFunctions[] = KH_DECODER_TABLE(DecDerToKey<3>);

}  // namespace keyhold::ossl
