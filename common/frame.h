// Length-prefixed framing: a 4-byte big-endian length, then one protobuf
// message. Used by the daemon (reading Requests) and the client (reading
// Responses); both refuse a frame over their configured limit before reading
// its body.
#ifndef KEYHOLD_COMMON_FRAME_H_
#define KEYHOLD_COMMON_FRAME_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "common/status.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold {

inline constexpr std::size_t kFrameHeaderBytes = 4;
inline constexpr uint32_t kDefaultMaxFrameBytes = 64 * 1024;
// Responses may be larger than requests (a long key list).
inline constexpr uint32_t kMaxResponseFrameBytes = 16 * 1024 * 1024;
inline constexpr uint32_t kProtocolVersion = 1;

std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(uint32_t length);

// Returns the body length announced by a header, or kResourceExhausted when it
// exceeds max_body, or kInvalidArgument for an empty frame.
StatusOr<uint32_t> DecodeFrameHeader(std::span<const uint8_t> header,
                                     uint32_t max_body);

// Serializes a message with its header prepended. Fails with
// kResourceExhausted if the body would exceed max_body.
StatusOr<std::string> EncodeFrame(const google::protobuf::MessageLite& msg,
                                  uint32_t max_body);

// Parses a Request body and checks the envelope: the request must parse and
// name an operation. An unset operation (also what an operation from a newer
// protocol looks like) yields kUnsupported; a body that does not parse yields
// kInvalidArgument.
Status DecodeRequest(std::span<const uint8_t> body, v1::Request* out);
Status DecodeResponse(std::span<const uint8_t> body, v1::Response* out);

// Incremental splitter for a byte stream, used where bytes arrive in pieces
// (tests, the fuzzer). Next() returns a complete body, or an empty optional
// if more bytes are needed, or an error once the stream is unusable.
class FrameSplitter {
 public:
  explicit FrameSplitter(uint32_t max_body) : max_body_(max_body) {}
  void Append(std::span<const uint8_t> bytes);
  // ok + has_frame=false: need more. ok + has_frame: *body holds one frame.
  Status Next(std::string* body, bool* has_frame);

 private:
  uint32_t max_body_;
  std::string buffer_;
  std::size_t offset_ = 0;
};

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_FRAME_H_
