#include "common/frame.h"

namespace keyhold {

std::array<uint8_t, kFrameHeaderBytes> EncodeFrameHeader(uint32_t length) {
  return {static_cast<uint8_t>(length >> 24),
          static_cast<uint8_t>(length >> 16), static_cast<uint8_t>(length >> 8),
          static_cast<uint8_t>(length)};
}

StatusOr<uint32_t> DecodeFrameHeader(std::span<const uint8_t> header,
                                     uint32_t max_body) {
  if (header.size() != kFrameHeaderBytes) {
    return InvalidArgument("truncated frame header");
  }
  const uint32_t length = (uint32_t{header[0]} << 24) |
                          (uint32_t{header[1]} << 16) |
                          (uint32_t{header[2]} << 8) | uint32_t{header[3]};
  if (length == 0) {
    return InvalidArgument("empty frame");
  }
  if (length > max_body) {
    return ResourceExhausted("frame of " + std::to_string(length) +
                             " bytes exceeds the limit of " +
                             std::to_string(max_body));
  }
  return length;
}

StatusOr<std::string> EncodeFrame(const google::protobuf::MessageLite& msg,
                                  uint32_t max_body) {
  const std::size_t size = msg.ByteSizeLong();
  if (size > max_body) {
    return ResourceExhausted("message of " + std::to_string(size) +
                             " bytes exceeds the frame limit of " +
                             std::to_string(max_body));
  }
  std::string out;
  out.resize(kFrameHeaderBytes + size);
  const auto header = EncodeFrameHeader(static_cast<uint32_t>(size));
  std::copy(header.begin(), header.end(), out.begin());
  if (!msg.SerializeToArray(out.data() + kFrameHeaderBytes,
                            static_cast<int>(size))) {
    return Internal("cannot serialize message");
  }
  return out;
}

Status DecodeRequest(std::span<const uint8_t> body, v1::Request* out) {
  if (body.size() > static_cast<std::size_t>(INT32_MAX) ||
      !out->ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return InvalidArgument("malformed request");
  }
  if (out->op_case() == v1::Request::OP_NOT_SET) {
    return Unsupported("unknown operation");
  }
  return Status::Ok();
}

Status DecodeResponse(std::span<const uint8_t> body, v1::Response* out) {
  if (body.size() > static_cast<std::size_t>(INT32_MAX) ||
      !out->ParseFromArray(body.data(), static_cast<int>(body.size()))) {
    return InvalidArgument("malformed response");
  }
  return Status::Ok();
}

void FrameSplitter::Append(std::span<const uint8_t> bytes) {
  if (offset_ > 0 && offset_ == buffer_.size()) {
    buffer_.clear();
    offset_ = 0;
  }
  buffer_.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

Status FrameSplitter::Next(std::string* body, bool* has_frame) {
  *has_frame = false;
  const std::size_t available = buffer_.size() - offset_;
  if (available < kFrameHeaderBytes) {
    return Status::Ok();
  }
  auto length = DecodeFrameHeader(
      std::span<const uint8_t>(
          reinterpret_cast<const uint8_t*>(buffer_.data() + offset_),
          kFrameHeaderBytes),
      max_body_);
  if (!length.ok()) {
    return length.status();
  }
  if (available - kFrameHeaderBytes < *length) {
    return Status::Ok();
  }
  body->assign(buffer_, offset_ + kFrameHeaderBytes, *length);
  offset_ += kFrameHeaderBytes + *length;
  *has_frame = true;
  return Status::Ok();
}

}  // namespace keyhold
