#include "cli/cli_util.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <string>

namespace keyhold::cli {
namespace {

std::string TempPath(const std::string& name) {
  return testing::TempDir() + "/keyhold_cli_util_test_" + name;
}

mode_t ModeOf(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(stat(path.c_str(), &st), 0);
  return st.st_mode & 0777;
}

TEST(JsonStringTest, EscapesAndKeepsValidUtf8) {
  EXPECT_EQ(JsonString("web-1"), "\"web-1\"");
  EXPECT_EQ(JsonString("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(JsonString("\n\t\r\b\f"), "\"\\n\\t\\r\\b\\f\"");
  EXPECT_EQ(JsonString(std::string("\x01\x1f\x7f", 3)),
            "\"\\u0001\\u001f\\u007f\"");
  EXPECT_EQ(JsonString(std::string("a\0b", 3)), "\"a\\u0000b\"");
  EXPECT_EQ(JsonString("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91"),
            "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91\"");
}

TEST(JsonStringTest, ReplacesInvalidUtf8) {
  EXPECT_EQ(JsonString("\xff"), "\"\\ufffd\"");
  EXPECT_EQ(JsonString("\xc0\xaf"), "\"\\ufffd\\ufffd\"");  // overlong
  EXPECT_EQ(JsonString("\xed\xa0\x80"),
            "\"\\ufffd\\ufffd\\ufffd\"");                     // surrogate
  EXPECT_EQ(JsonString("x\xe2\x82"), "\"x\\ufffd\\ufffd\"");  // truncated
  EXPECT_EQ(JsonString("\xf4\x90\x80\x80"),
            "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");  // > U+10FFFF
}

TEST(FingerprintTest, Sha256OfDer) {
  EXPECT_EQ(Fingerprint(""),
            "sha256:"
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(FingerprintFromHash(std::string("\x01\xab", 2)), "sha256:01ab");
}

TEST(ResolveTest, UsersAndUids) {
  auto root = ResolveUser("root");
  ASSERT_TRUE(root.ok());
  EXPECT_EQ(*root, 0u);
  auto numeric = ResolveUser("64101");
  ASSERT_TRUE(numeric.ok());
  EXPECT_EQ(*numeric, 64101u);
  EXPECT_EQ(ResolveUser("no-such-user-kh").status().code(), Code::kNotFound);
  EXPECT_EQ(ResolveUser("4294967295").status().code(), Code::kNotFound);
  EXPECT_EQ(ResolveUser("-1").status().code(), Code::kNotFound);
  EXPECT_EQ(ResolveUser("").status().code(), Code::kNotFound);
  auto gid = ResolveGroup("64200");
  ASSERT_TRUE(gid.ok());
  EXPECT_EQ(*gid, 64200u);
  EXPECT_EQ(ResolveGroup("no-such-group-kh").status().code(), Code::kNotFound);
  EXPECT_EQ(UserName(0).value_or(""), "root");
}

TEST(ResolveTest, KeyRefs) {
  auto own = ResolveKeyRef("web");
  ASSERT_TRUE(own.ok());
  EXPECT_EQ(own->name(), "web");
  EXPECT_FALSE(own->has_owner());

  auto shared = ResolveKeyRef("root/web");
  ASSERT_TRUE(shared.ok());
  EXPECT_EQ(shared->name(), "web");
  ASSERT_TRUE(shared->has_owner());
  EXPECT_EQ(shared->owner(), 0u);

  auto by_uid = ResolveKeyRef("1234/web");
  ASSERT_TRUE(by_uid.ok());
  EXPECT_EQ(by_uid->owner(), 1234u);

  EXPECT_EQ(ResolveKeyRef("no-such-user-kh/web").status().code(),
            Code::kNotFound);
  EXPECT_EQ(ResolveKeyRef("a/b/c").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ResolveKeyRef("/web").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(ResolveKeyRef("").status().code(), Code::kInvalidArgument);
}

TEST(FilesTest, SecretRoundTripAndMode) {
  const std::string path = TempPath("secret");
  std::remove(path.c_str());
  std::string big(10000, 'k');  // larger than the initial buffer
  ASSERT_TRUE(WriteFile(path, big, /*secret=*/true).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  auto back = ReadSecretFile(path);
  ASSERT_TRUE(back.ok());
  const auto bytes = back->Expose(SecretAccess::kToken);
  EXPECT_EQ(std::string(bytes.begin(), bytes.end()), big);
  std::remove(path.c_str());
}

TEST(FilesTest, SecretWriteTightensExistingFile) {
  const std::string path = TempPath("existing");
  std::remove(path.c_str());
  ASSERT_TRUE(WriteFile(path, std::string("old contents, longer"),
                        /*secret=*/false)
                  .ok());
  ASSERT_EQ(chmod(path.c_str(), 0644), 0);
  ASSERT_TRUE(WriteFile(path, std::string("new"), /*secret=*/true).ok());
  EXPECT_EQ(ModeOf(path), 0600u);
  auto back = ReadFile(path);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, "new");
  std::remove(path.c_str());
}

TEST(FilesTest, Errors) {
  EXPECT_EQ(ReadFile(TempPath("missing")).status().code(), Code::kNotFound);
  EXPECT_EQ(ReadSecretFile(TempPath("missing")).status().code(),
            Code::kNotFound);
  EXPECT_FALSE(ReadFile(testing::TempDir()).ok());  // a directory
  EXPECT_FALSE(
      WriteFile(TempPath("no/such/dir"), std::string("x"), false).ok());

  const std::string path = TempPath("huge");
  ASSERT_TRUE(
      WriteFile(path, std::string((1 << 20) + 1, 'x'), /*secret=*/false).ok());
  EXPECT_EQ(ReadSecretFile(path).status().code(), Code::kInvalidArgument);
  std::remove(path.c_str());
}

TEST(FilesTest, DigestFile) {
  const std::string path = TempPath("digest");
  ASSERT_TRUE(WriteFile(path, std::string("abc"), /*secret=*/false).ok());
  auto d = DigestFile(path, EVP_sha256());
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(FingerprintFromHash(*d),
            "sha256:"
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  std::remove(path.c_str());
}

}  // namespace
}  // namespace keyhold::cli
