#include "cli/cli_util.h"

#include <fcntl.h>
#include <grp.h>
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <climits>
#include <cstdio>
#include <cstring>
#include <utility>

#include "common/key_types.h"
#include "common/ssl_ptr.h"

namespace keyhold::cli {
namespace {

// Largest private key file `key import` accepts.
constexpr std::size_t kMaxSecretFileBytes = 1 << 20;
// Largest passwd/group entry buffer we are willing to allocate.
constexpr std::size_t kMaxNssBuffer = 1 << 20;

Status FromErrno(int err, std::string_view step = "") {
  std::string message;
  if (!step.empty()) {
    message = std::string(step) + ": ";
  }
  message += std::strerror(err);
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return NotFound(std::move(message));
    case EACCES:
    case EPERM:
    case EROFS:
      return PermissionDenied(std::move(message));
    case ENOSPC:
    case EDQUOT:
    case EMFILE:
    case ENFILE:
    case ENOMEM:
      return ResourceExhausted(std::move(message));
    case EISDIR:
    case EINVAL:
      return InvalidArgument(std::move(message));
    default:
      return Internal(std::move(message));
  }
}

// An fd that is closed on scope exit unless it is stdin/stdout.
class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ > STDERR_FILENO) {
      close(fd_);
    }
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  // Closes now and reports the result (write errors may surface here).
  int Close() {
    const int fd = fd_;
    fd_ = -1;
    return fd > STDERR_FILENO ? close(fd) : 0;
  }

 private:
  int fd_;
};

StatusOr<int> OpenForReading(const std::string& path) {
  if (path == "-") {
    return STDIN_FILENO;
  }
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return FromErrno(errno);
  }
  return fd;
}

// read() that retries on EINTR.
ssize_t ReadSome(int fd, void* buf, std::size_t n) {
  for (;;) {
    const ssize_t r = read(fd, buf, n);
    if (r >= 0 || errno != EINTR) {
      return r;
    }
  }
}

Status WriteAllFd(int fd, std::span<const uint8_t> bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) {
        continue;
      }
      return FromErrno(errno);
    }
    done += static_cast<std::size_t>(n);
  }
  return Status::Ok();
}

std::optional<uint32_t> ParseId(std::string_view s) {
  if (s.empty()) {
    return std::nullopt;
  }
  uint32_t v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) {
    return std::nullopt;
  }
  if (v == UINT32_MAX) {  // (uid_t)-1 is never a valid id
    return std::nullopt;
  }
  return v;
}

std::size_t InitialNssBufferSize(int sysconf_name) {
  const long n = sysconf(sysconf_name);
  return n > 0 ? static_cast<std::size_t>(n) : 4096;
}

// Calls lookup(buf, size, &result) with a growing buffer. Returns the errno
// of the lookup (0 when it completed, found or not).
template <typename Lookup>
int WithNssBuffer(int sysconf_name, Lookup lookup) {
  std::vector<char> buf(InitialNssBufferSize(sysconf_name));
  for (;;) {
    const int rc = lookup(buf.data(), buf.size());
    if (rc != ERANGE || buf.size() >= kMaxNssBuffer) {
      return rc;
    }
    buf.resize(buf.size() * 2);
  }
}

std::optional<uint32_t> LookupUserId(const std::string& name) {
  std::optional<uint32_t> out;
  WithNssBuffer(_SC_GETPW_R_SIZE_MAX, [&](char* buf, std::size_t size) {
    struct passwd pw {};
    struct passwd* result = nullptr;
    const int rc = getpwnam_r(name.c_str(), &pw, buf, size, &result);
    if (rc == 0 && result != nullptr) {
      out = static_cast<uint32_t>(result->pw_uid);
    }
    return rc;
  });
  return out;
}

std::optional<uint32_t> LookupGroupId(const std::string& name) {
  std::optional<uint32_t> out;
  WithNssBuffer(_SC_GETGR_R_SIZE_MAX, [&](char* buf, std::size_t size) {
    struct group gr {};
    struct group* result = nullptr;
    const int rc = getgrnam_r(name.c_str(), &gr, buf, size, &result);
    if (rc == 0 && result != nullptr) {
      out = static_cast<uint32_t>(result->gr_gid);
    }
    return rc;
  });
  return out;
}

// Length of the valid UTF-8 sequence starting at s[i], 0 if invalid.
std::size_t Utf8SequenceLength(std::string_view s, std::size_t i) {
  const auto byte = [&](std::size_t k) -> unsigned {
    return static_cast<unsigned char>(s[k]);
  };
  const unsigned b0 = byte(i);
  if (b0 < 0x80) {
    return 1;
  }
  std::size_t len = 0;
  unsigned lo = 0x80;
  unsigned hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) {
      lo = 0xA0;
    } else if (b0 == 0xED) {
      hi = 0x9F;  // no surrogates
    }
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) {
      lo = 0x90;
    } else if (b0 == 0xF4) {
      hi = 0x8F;
    }
  } else {
    return 0;
  }
  if (i + len > s.size()) {
    return 0;
  }
  const unsigned b1 = byte(i + 1);
  if (b1 < lo || b1 > hi) {
    return 0;
  }
  for (std::size_t k = 2; k < len; ++k) {
    const unsigned b = byte(i + k);
    if (b < 0x80 || b > 0xBF) {
      return 0;
    }
  }
  return len;
}

}  // namespace

client::Client& Context::client() {
  if (!client_) {
    client::Options options = client::OptionsFromEnvironment();
    if (!socket_path.empty()) {
      options.socket_path = socket_path;
    }
    client_ = std::make_unique<client::Client>(std::move(options));
  }
  return *client_;
}

void SetAction(CLI::App* sub, Action* slot, Action run) {
  sub->callback([slot, run = std::move(run)] { *slot = run; });
}

int Fail(std::string_view what, const Status& status) {
  std::string line = "keyhold: ";
  line += what;
  line += ": ";
  line += status.ToString();
  // Exactly one line, whatever the message holds.
  std::replace(line.begin(), line.end(), '\n', ' ');
  std::replace(line.begin(), line.end(), '\r', ' ');
  line += '\n';
  std::fflush(stdout);
  std::fputs(line.c_str(), stderr);
  return kExitFailure;
}

std::string Quote(std::string_view s) {
  std::string out = "'";
  out += s;
  out += '\'';
  return out;
}

StatusOr<std::string> ReadFile(const std::string& path) {
  auto fd_or = OpenForReading(path);
  if (!fd_or.ok()) {
    return fd_or.status();
  }
  Fd fd(*fd_or);
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ReadSome(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      return FromErrno(errno);
    }
    if (n == 0) {
      break;
    }
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

StatusOr<std::string> DigestFile(const std::string& path, const EVP_MD* md) {
  auto fd_or = OpenForReading(path);
  if (!fd_or.ok()) {
    return fd_or.status();
  }
  Fd fd(*fd_or);
  SslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
  if (!ctx || EVP_DigestInit_ex(ctx.get(), md, nullptr) != 1) {
    return Internal("cannot initialise the digest");
  }
  char buf[65536];
  for (;;) {
    const ssize_t n = ReadSome(fd.get(), buf, sizeof(buf));
    if (n < 0) {
      return FromErrno(errno);
    }
    if (n == 0) {
      break;
    }
    if (EVP_DigestUpdate(ctx.get(), buf, static_cast<std::size_t>(n)) != 1) {
      return Internal("digest update failed");
    }
  }
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int out_len = 0;
  if (EVP_DigestFinal_ex(ctx.get(), out, &out_len) != 1) {
    return Internal("digest final failed");
  }
  return std::string(reinterpret_cast<const char*>(out), out_len);
}

StatusOr<SecretBytes> ReadSecretFile(const std::string& path) {
  auto fd_or = OpenForReading(path);
  if (!fd_or.ok()) {
    return fd_or.status();
  }
  Fd fd(*fd_or);
  std::size_t capacity = 4096;
  struct stat st {};
  if (fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0) {
    // One more byte than the size, so that EOF is seen without growing.
    capacity = std::min(static_cast<std::size_t>(st.st_size) + 1,
                        kMaxSecretFileBytes + 1);
  }
  SecretBytes buf(capacity);
  std::size_t used = 0;
  for (;;) {
    if (used == buf.size()) {
      if (buf.size() > kMaxSecretFileBytes) {
        return InvalidArgument("file is larger than 1 MiB");
      }
      SecretBytes bigger(buf.size() * 2);
      std::memcpy(bigger.data(SecretAccess::kToken),
                  buf.data(SecretAccess::kToken), used);
      buf = std::move(bigger);  // the old buffer is wiped when freed
    }
    const ssize_t n = ReadSome(fd.get(), buf.data(SecretAccess::kToken) + used,
                               buf.size() - used);
    if (n < 0) {
      return FromErrno(errno);
    }
    if (n == 0) {
      break;
    }
    used += static_cast<std::size_t>(n);
  }
  if (used > kMaxSecretFileBytes) {
    return InvalidArgument("file is larger than 1 MiB");
  }
  buf.resize(used);
  return buf;
}

Status WriteFile(const std::string& path, std::span<const uint8_t> bytes,
                 bool secret) {
  if (path == "-") {
    std::fflush(stdout);
    return WriteAllFd(STDOUT_FILENO, bytes);
  }
  // Secrets: open without O_TRUNC, tighten the mode of an existing file, and
  // only then drop its old contents and write.
  const int flags =
      O_WRONLY | O_CREAT | O_CLOEXEC | O_NOCTTY | (secret ? 0 : O_TRUNC);
  const mode_t mode = secret ? 0600 : 0666;
  const int raw = open(path.c_str(), flags, mode);
  if (raw < 0) {
    return FromErrno(errno);
  }
  Fd fd(raw);
  struct stat st {};
  if (fstat(fd.get(), &st) != 0) {
    return FromErrno(errno, "fstat");
  }
  if (secret && S_ISREG(st.st_mode)) {
    if ((st.st_mode & 077) != 0 && fchmod(fd.get(), 0600) != 0) {
      return FromErrno(errno, "chmod 0600");
    }
    if (ftruncate(fd.get(), 0) != 0) {
      return FromErrno(errno, "truncate");
    }
  }
  KH_RETURN_IF_ERROR(WriteAllFd(fd.get(), bytes));
  if (fd.Close() != 0) {
    return FromErrno(errno, "close");
  }
  return Status::Ok();
}

Status WriteFile(const std::string& path, std::string_view bytes, bool secret) {
  return WriteFile(path, AsBytes(bytes), secret);
}

StatusOr<uint32_t> ResolveUser(const std::string& text) {
  if (auto uid = LookupUserId(text)) {
    return *uid;
  }
  if (auto uid = ParseId(text)) {
    return *uid;
  }
  return NotFound("unknown user " + Quote(text));
}

StatusOr<uint32_t> ResolveGroup(const std::string& text) {
  if (auto gid = LookupGroupId(text)) {
    return *gid;
  }
  if (auto gid = ParseId(text)) {
    return *gid;
  }
  return NotFound("unknown group " + Quote(text));
}

std::optional<std::string> UserName(uint32_t uid) {
  std::optional<std::string> out;
  WithNssBuffer(_SC_GETPW_R_SIZE_MAX, [&](char* buf, std::size_t size) {
    struct passwd pw {};
    struct passwd* result = nullptr;
    const int rc = getpwuid_r(static_cast<uid_t>(uid), &pw, buf, size, &result);
    if (rc == 0 && result != nullptr && result->pw_name != nullptr) {
      out = std::string(result->pw_name);
    }
    return rc;
  });
  return out;
}

std::optional<std::string> GroupName(uint32_t gid) {
  std::optional<std::string> out;
  WithNssBuffer(_SC_GETGR_R_SIZE_MAX, [&](char* buf, std::size_t size) {
    struct group gr {};
    struct group* result = nullptr;
    const int rc = getgrgid_r(static_cast<gid_t>(gid), &gr, buf, size, &result);
    if (rc == 0 && result != nullptr && result->gr_name != nullptr) {
      out = std::string(result->gr_name);
    }
    return rc;
  });
  return out;
}

StatusOr<v1::KeyRef> ResolveKeyRef(const std::string& text) {
  auto parsed = ParseKeyRefText(text);
  if (!parsed.ok()) {
    return parsed.status();
  }
  std::optional<uint32_t> owner;
  if (parsed->owner) {
    auto uid = ResolveUser(*parsed->owner);
    if (!uid.ok()) {
      return uid.status();
    }
    owner = *uid;
  }
  return client::MakeKeyRef(parsed->name, owner);
}

std::string Fingerprint(std::string_view spki_der) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int md_len = 0;
  if (EVP_Digest(spki_der.data(), spki_der.size(), md, &md_len, EVP_sha256(),
                 nullptr) != 1) {
    return "sha256:?";
  }
  return "sha256:" + HexEncode(std::span<const uint8_t>(md, md_len));
}

std::string FingerprintFromHash(std::string_view sha256) {
  return "sha256:" + HexEncode(AsBytes(sha256));
}

std::string JsonString(std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 0xf];
        } else if (c < 0x80) {
          out += static_cast<char>(c);
        } else {
          const std::size_t len = Utf8SequenceLength(s, i);
          if (len == 0) {
            out += "\\ufffd";
          } else {
            out.append(s.substr(i, len));
            i += len;
            continue;
          }
        }
    }
    ++i;
  }
  out += '"';
  return out;
}

int Print(std::string_view text) {
  if (!WriteStdout(text)) {
    return Fail("write to stdout", FromErrno(errno));
  }
  return kExitOk;
}

int PrintTable(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) {
      widths.resize(row.size(), 0);
    }
    for (std::size_t i = 0; i < row.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line;
    for (std::size_t i = 0; i < row.size(); ++i) {
      if (i > 0) {
        line += "  ";
      }
      line += row[i];
      if (i + 1 < row.size()) {
        line.append(widths[i] - row[i].size(), ' ');
      }
    }
    while (!line.empty() && line.back() == ' ') {
      line.pop_back();
    }
    out += line;
    out += '\n';
  }
  return Print(out);
}

bool WriteStdout(std::string_view bytes) {
  if (!bytes.empty() &&
      std::fwrite(bytes.data(), 1, bytes.size(), stdout) != bytes.size()) {
    return false;
  }
  return std::fflush(stdout) == 0;
}

int PrintBio(std::string_view what, BIO* bio, const char* encode_error) {
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio, &data);
  if (len <= 0 || data == nullptr) {
    return Fail(what, Internal(encode_error));
  }
  return Print(std::string_view(data, static_cast<std::size_t>(len)));
}

}  // namespace keyhold::cli
