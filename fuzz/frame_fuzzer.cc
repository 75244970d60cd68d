// libFuzzer target for the untrusted byte stream a client sends: framing,
// Request decoding and the first checks the daemon applies (key names).
//
// Invariants checked: no crash or hang on any input; a frame the splitter
// yields never exceeds the limit; a Request that decodes re-encodes to a
// frame that decodes to an equal Request.
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "common/frame.h"
#include "common/key_types.h"

namespace {

void CheckRequest(const keyhold::v1::Request& req) {
  const keyhold::v1::KeyRef* ref = nullptr;
  switch (req.op_case()) {
    case keyhold::v1::Request::kSign:
      ref = &req.sign().key();
      break;
    case keyhold::v1::Request::kGenerateKey:
      ref = &req.generate_key().key();
      break;
    case keyhold::v1::Request::kDestroyKey:
      ref = &req.destroy_key().key();
      break;
    default:
      break;
  }
  if (ref != nullptr) {
    (void)keyhold::ValidateKeyName(ref->name());
    (void)keyhold::ParseKeyRefText(ref->name());
  }
  auto frame = keyhold::EncodeFrame(req, keyhold::kMaxResponseFrameBytes);
  if (!frame.ok()) {
    __builtin_trap();
  }
  keyhold::v1::Request again;
  const auto* p = reinterpret_cast<const uint8_t*>(frame->data());
  if (!keyhold::DecodeRequest(
           std::span<const uint8_t>(p + 4, frame->size() - 4), &again)
           .ok() ||
      again.SerializeAsString() != req.SerializeAsString()) {
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr uint32_t kLimit = 4096;
  keyhold::FrameSplitter splitter(kLimit);
  // Feed in two pieces to exercise partial frames.
  const size_t half = size / 2;
  splitter.Append(std::span<const uint8_t>(data, half));
  for (int pass = 0; pass < 2; ++pass) {
    for (;;) {
      std::string body;
      bool has = false;
      if (!splitter.Next(&body, &has).ok() || !has) {
        break;
      }
      if (body.size() > kLimit) {
        __builtin_trap();
      }
      keyhold::v1::Request req;
      const auto* b = reinterpret_cast<const uint8_t*>(body.data());
      if (keyhold::DecodeRequest(std::span<const uint8_t>(b, body.size()), &req)
              .ok()) {
        CheckRequest(req);
      }
    }
    if (pass == 0) {
      splitter.Append(std::span<const uint8_t>(data + half, size - half));
    }
  }
  // The whole input as one body, too.
  keyhold::v1::Request whole;
  if (keyhold::DecodeRequest(std::span<const uint8_t>(data, size), &whole)
          .ok()) {
    CheckRequest(whole);
  }
  return 0;
}
