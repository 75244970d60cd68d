#include "common/status.h"

#include <gtest/gtest.h>

#include "keyhold/v1/keyhold.pb.h"

namespace keyhold {
namespace {

TEST(StatusTest, CodesMirrorTheWireEnum) {
  // The daemon and clients cast between the two; they must never drift.
  for (int i = 0; i <= kMaxCode; ++i) {
    ASSERT_TRUE(v1::Code_IsValid(i)) << i;
    EXPECT_EQ(static_cast<int>(CodeFromWire(i)), i);
  }
  EXPECT_FALSE(v1::Code_IsValid(kMaxCode + 1));
  EXPECT_EQ(static_cast<int>(Code::kNotFound), v1::NOT_FOUND);
  EXPECT_EQ(static_cast<int>(Code::kPermissionDenied), v1::PERMISSION_DENIED);
  EXPECT_EQ(static_cast<int>(Code::kResourceExhausted), v1::RESOURCE_EXHAUSTED);
  EXPECT_EQ(static_cast<int>(Code::kDeadlineExceeded), v1::DEADLINE_EXCEEDED);
}

TEST(StatusTest, UnknownWireCodeIsInternal) {
  EXPECT_EQ(CodeFromWire(99), Code::kInternal);
  EXPECT_EQ(CodeFromWire(-1), Code::kInternal);
}

TEST(StatusTest, ToString) {
  EXPECT_EQ(Status().ToString(), "ok");
  EXPECT_EQ(NotFound("key not found").ToString(), "not found: key not found");
  EXPECT_TRUE(Status::Ok().ok());
  EXPECT_FALSE(Internal("x").ok());
}

TEST(StatusTest, StatusOrHoldsValueOrError) {
  StatusOr<int> v = 5;
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 5);
  StatusOr<int> e = InvalidArgument("bad");
  EXPECT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), Code::kInvalidArgument);
}

Status Fails() { return Unsupported("no"); }
Status Propagates() {
  KH_RETURN_IF_ERROR(Fails());
  return Status::Ok();
}

TEST(StatusTest, ReturnIfError) {
  EXPECT_EQ(Propagates().code(), Code::kUnsupported);
}

TEST(StatusDeathTest, ValueOfErrorAborts) {
  StatusOr<int> e = InvalidArgument("bad");
  EXPECT_DEATH((void)e.value(), "check failed");
}

}  // namespace
}  // namespace keyhold
