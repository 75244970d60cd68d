// Shared plumbing of the keyhold CLI: the lazily created client, error
// reporting, file I/O, user/group resolution and output helpers.
#ifndef KEYHOLD_CLI_CLI_UTIL_H_
#define KEYHOLD_CLI_CLI_UTIL_H_

#include <openssl/evp.h>
#include <sys/types.h>

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/client/client.h"
#include "common/secret.h"
#include "common/status.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::cli {

// Exit codes: 0 success, 1 operation failed, 2 usage error.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailure = 1;
inline constexpr int kExitUsage = 2;

// State shared by every command: global options and the client, which is
// created on first use so that --help never touches the socket.
class Context {
 public:
  Context() = default;
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // --socket; empty: $KEYHOLD_SOCKET, else client::kDefaultSocketPath.
  std::string socket_path;

  client::Client& client();

 private:
  std::unique_ptr<client::Client> client_;
};

// What runs after a successful parse; set by the chosen subcommand.
using Action = std::function<int(Context&)>;

// Makes `run` the action when subcommand `sub` is the one parsed.
void SetAction(CLI::App* sub, Action* slot, Action run);

// Prints "keyhold: <what>: <status>" on stderr and returns kExitFailure.
int Fail(std::string_view what, const Status& status);

// "'name'" for messages.
std::string Quote(std::string_view s);

// --- Files. "-" means stdin / stdout. Error messages name no file; callers
// say which file in `what`.

// Whole file contents.
StatusOr<std::string> ReadFile(const std::string& path);
// Whole file contents into a buffer that is wiped when freed; intermediate
// buffers are wiped too.
StatusOr<SecretBytes> ReadSecretFile(const std::string& path);
// SHA-style digest of a whole file, read in chunks.
StatusOr<std::string> DigestFile(const std::string& path, const EVP_MD* md);
// Writes (creating or truncating) path. mode applies to a newly created file;
// with secret=true the file is also forced to 0600 if it already existed.
Status WriteFile(const std::string& path, std::span<const uint8_t> bytes,
                 bool secret);
Status WriteFile(const std::string& path, std::string_view bytes, bool secret);

// --- Users and groups.

// A user name (getpwnam_r) or a decimal uid.
StatusOr<uint32_t> ResolveUser(const std::string& text);
// A group name (getgrnam_r) or a decimal gid.
StatusOr<uint32_t> ResolveGroup(const std::string& text);
// The user name of uid, if it has one.
std::optional<std::string> UserName(uint32_t uid);
std::optional<std::string> GroupName(uint32_t gid);

// KEYREF text ("NAME" or "OWNER/NAME") -> v1::KeyRef with the owner resolved
// to a uid.
StatusOr<v1::KeyRef> ResolveKeyRef(const std::string& text);

// --- Output.

// "sha256:<64 lowercase hex>" of the DER SubjectPublicKeyInfo.
std::string Fingerprint(std::string_view spki_der);
// "sha256:" + hex of an already computed SHA-256.
std::string FingerprintFromHash(std::string_view sha256);

// A JSON string literal (with quotes), escaped; invalid UTF-8 becomes U+FFFD.
std::string JsonString(std::string_view s);

// Prints rows as left-aligned columns separated by two spaces; returns like
// Print().
int PrintTable(const std::vector<std::vector<std::string>>& rows);

// Writes bytes to stdout; false on error.
bool WriteStdout(std::string_view bytes);
// Writes text to stdout: kExitOk, or kExitFailure after reporting the error.
int Print(std::string_view text);
// Prints a memory BIO's contents (a PEM block) to stdout; an empty BIO is
// reported as `encode_error` for `what`.
int PrintBio(std::string_view what, BIO* bio, const char* encode_error);

// Bytes of a std::string as a span.
inline std::span<const uint8_t> AsBytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

}  // namespace keyhold::cli

#endif  // KEYHOLD_CLI_CLI_UTIL_H_
