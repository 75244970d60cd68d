#include "common/private_file.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

namespace keyhold {
namespace {

namespace fs = std::filesystem;

class PrivateFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kh-private-file-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

std::vector<uint8_t> Bytes(const SecretBytes& s) {
  auto e = s.Expose(SecretAccess::kToken);
  return {e.begin(), e.end()};
}

TEST_F(PrivateFileTest, WritesReadsAndReplaces) {
  const fs::path p = dir_ / "secret";
  const std::vector<uint8_t> a = {1, 2, 3, 4};
  ASSERT_TRUE(WritePrivateFileAtomically(p, a).ok());
  struct stat st {};
  ASSERT_EQ(::stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0600u);
  auto got = ReadPrivateFile(p, 4, 4);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(Bytes(*got), a);

  const std::vector<uint8_t> b(100, 7);
  ASSERT_TRUE(WritePrivateFileAtomically(p, b).ok());
  got = ReadPrivateFile(p, 0, 4096);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ(Bytes(*got), b);
  EXPECT_FALSE(fs::exists(dir_ / "secret.tmp"));
  // A leftover temporary file of a crash does not get in the way.
  {
    std::FILE* f = std::fopen((dir_ / "secret.tmp").c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fclose(f);
  }
  ASSERT_TRUE(WritePrivateFileAtomically(p, a).ok());
  EXPECT_EQ(Bytes(*ReadPrivateFile(p, 0, 16)), a);
}

TEST_F(PrivateFileTest, RefusesWhatMayHaveLeakedOrIsWrong) {
  const fs::path p = dir_ / "secret";
  ASSERT_TRUE(WritePrivateFileAtomically(p, std::vector<uint8_t>(8, 1)).ok());
  // Wrong size: exact and maximum.
  EXPECT_FALSE(ReadPrivateFile(p, 4, 16).ok());
  EXPECT_FALSE(ReadPrivateFile(p, 0, 7).ok());
  // Readable by others.
  ASSERT_EQ(::chmod(p.c_str(), 0644), 0);
  auto r = ReadPrivateFile(p, 0, 16);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("group or others"), std::string::npos);
  // Not a regular file; missing.
  EXPECT_FALSE(ReadPrivateFile(dir_, 0, 16).ok());
  r = ReadPrivateFile(dir_ / "missing", 0, 16);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("missing"), std::string::npos);
  // A FIFO does not block the reader.
  const fs::path fifo = dir_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_FALSE(ReadPrivateFile(fifo, 0, 16).ok());
  // A directory that does not exist cannot be written to.
  EXPECT_FALSE(
      WritePrivateFileAtomically(dir_ / "no" / "x", std::vector<uint8_t>(1))
          .ok());
}

}  // namespace
}  // namespace keyhold
