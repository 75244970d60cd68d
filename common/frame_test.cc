#include "common/frame.h"

#include <gtest/gtest.h>

namespace keyhold {
namespace {

std::span<const uint8_t> AsBytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(FrameTest, HeaderRoundTrip) {
  for (uint32_t n : {1u, 255u, 256u, 65536u, 0x01020304u}) {
    auto h = EncodeFrameHeader(n);
    auto back = DecodeFrameHeader(h, UINT32_MAX);
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, n);
  }
}

TEST(FrameTest, HeaderIsBigEndian) {
  auto h = EncodeFrameHeader(0x01020304u);
  EXPECT_EQ(h[0], 1);
  EXPECT_EQ(h[3], 4);
}

TEST(FrameTest, OversizedFrameIsRefused) {
  auto h = EncodeFrameHeader(kDefaultMaxFrameBytes + 1);
  auto r = DecodeFrameHeader(h, kDefaultMaxFrameBytes);
  EXPECT_EQ(r.status().code(), Code::kResourceExhausted);
}

TEST(FrameTest, EmptyAndTruncatedHeaders) {
  auto h = EncodeFrameHeader(0);
  EXPECT_EQ(DecodeFrameHeader(h, 100).status().code(), Code::kInvalidArgument);
  const uint8_t three[3] = {0, 0, 1};
  EXPECT_EQ(DecodeFrameHeader(three, 100).status().code(),
            Code::kInvalidArgument);
}

TEST(FrameTest, EncodeDecodeRequest) {
  v1::Request req;
  req.set_id(42);
  req.mutable_sign()->mutable_key()->set_name("web");
  req.mutable_sign()->set_data("digest");
  auto frame = EncodeFrame(req, kDefaultMaxFrameBytes);
  ASSERT_TRUE(frame.ok());
  auto len = DecodeFrameHeader(AsBytes(frame->substr(0, 4)), UINT32_MAX);
  ASSERT_TRUE(len.ok());
  EXPECT_EQ(*len, frame->size() - 4);
  v1::Request back;
  ASSERT_TRUE(DecodeRequest(AsBytes(frame->substr(4)), &back).ok());
  EXPECT_EQ(back.id(), 42u);
  EXPECT_EQ(back.sign().key().name(), "web");
}

TEST(FrameTest, EncodeRefusesOversizedMessage) {
  v1::Request req;
  req.mutable_sign()->set_data(std::string(2000, 'x'));
  EXPECT_EQ(EncodeFrame(req, 1000).status().code(), Code::kResourceExhausted);
}

TEST(FrameTest, GarbageIsInvalidArgument) {
  const std::string garbage = "\xff\xff\xff\xff\xff\xff\xff";
  v1::Request req;
  EXPECT_EQ(DecodeRequest(AsBytes(garbage), &req).code(),
            Code::kInvalidArgument);
}

TEST(FrameTest, UnknownOperationIsUnsupported) {
  // Field 99, length-delimited, empty: an operation from a newer protocol.
  const std::string unknown("\x08\x07\x9a\x06\x00", 5);
  v1::Request req;
  EXPECT_EQ(DecodeRequest(AsBytes(unknown), &req).code(), Code::kUnsupported);
  EXPECT_EQ(req.id(), 7u);
}

TEST(FrameTest, SplitterHandlesPiecesAndLimits) {
  v1::Request req;
  req.mutable_ping();
  req.set_id(1);
  std::string stream = *EncodeFrame(req, 1000);
  req.set_id(2);
  stream += *EncodeFrame(req, 1000);
  FrameSplitter splitter(1000);
  std::vector<uint64_t> ids;
  for (char c : stream) {
    const uint8_t b = static_cast<uint8_t>(c);
    splitter.Append(std::span<const uint8_t>(&b, 1));
    std::string body;
    bool has = false;
    ASSERT_TRUE(splitter.Next(&body, &has).ok());
    if (has) {
      v1::Request r;
      ASSERT_TRUE(DecodeRequest(AsBytes(body), &r).ok());
      ids.push_back(r.id());
    }
  }
  EXPECT_EQ(ids, (std::vector<uint64_t>{1, 2}));

  FrameSplitter small(10);
  auto h = EncodeFrameHeader(11);
  small.Append(h);
  std::string body;
  bool has = false;
  EXPECT_EQ(small.Next(&body, &has).code(), Code::kResourceExhausted);
}

}  // namespace
}  // namespace keyhold
