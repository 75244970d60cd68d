#include "daemon/audit_log.h"

#include <fcntl.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <fstream>
#include <functional>
#include <optional>

#include "common/key_types.h"
#include "daemon/log.h"

namespace keyhold::daemon {
namespace {

constexpr std::size_t kMacKeySize = 32;
constexpr char kGenesis[] =
    "0000000000000000000000000000000000000000000000000000000000000000";
constexpr std::string_view kMacMark = ",\"mac\":\"";

std::string Errno(const std::string& what, int err) {
  return what + ": " + std::strerror(err);
}

spdlog::logger& Log() {
  static const auto logger = ComponentLog("audit");
  return *logger;
}

// Reads lines from a descriptor up to `limit` bytes (what the file held
// when Verify or Read took it; appends after that are not read).
class LineReader {
 public:
  LineReader(int fd, uint64_t limit) : file_(::fdopen(fd, "r")), left_(limit) {
    if (file_ == nullptr) {
      ::close(fd);
    }
  }
  // The FILE and getline()'s buffer are C resources this class owns.
  ~LineReader() {
    if (file_ != nullptr) {
      std::fclose(file_);  // NOLINT(cppcoreguidelines-owning-memory)
    }
    std::free(buf_);  // NOLINT(cppcoreguidelines-owning-memory)
  }
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  bool ok() const { return file_ != nullptr; }
  // The next line without its line end; *ended says whether it had one.
  bool Next(std::string* line, bool* ended) {
    if (file_ == nullptr || left_ == 0) {
      return false;
    }
    const ssize_t n = ::getline(&buf_, &cap_, file_);
    if (n <= 0) {
      return false;
    }
    std::size_t len = static_cast<std::size_t>(n);
    if (len > left_) {
      len = static_cast<std::size_t>(left_);  // grew since: stop at the limit
    }
    left_ -= len;
    *ended = len > 0 && buf_[len - 1] == '\n';
    line->assign(buf_, *ended ? len - 1 : len);
    return true;
  }

 private:
  FILE* file_;
  uint64_t left_;
  char* buf_ = nullptr;
  std::size_t cap_ = 0;
};

// Appends s as the inside of a JSON string.
void AppendJsonEscaped(std::string& out, const std::string& s) {
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(c);
    } else if (u < 0x20 || u == 0x7f) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\u00";
      out.push_back(kHex[u >> 4]);
      out.push_back(kHex[u & 0xf]);
    } else {
      out.push_back(c);
    }
  }
}

// Appends n in decimal, at least `width` digits (zero-padded).
void AppendDecimal(std::string& out, uint64_t n, int width = 1) {
  char buf[24];
  int len = 0;
  do {
    buf[len++] = static_cast<char>('0' + n % 10);
    n /= 10;
  } while (n != 0 || len < width);
  while (len > 0) {
    out.push_back(buf[--len]);
  }
}

// Appends the current UTC time, e.g. 2026-11-22T12:30:05.123Z.
void AppendUtcNow(std::string& out) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      now.time_since_epoch())
                      .count() %
                  1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_year) + 1900, 4);
  out.push_back('-');
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_mon) + 1, 2);
  out.push_back('-');
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_mday), 2);
  out.push_back('T');
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_hour), 2);
  out.push_back(':');
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_min), 2);
  out.push_back(':');
  AppendDecimal(out, static_cast<uint64_t>(tm.tm_sec), 2);
  out.push_back('.');
  AppendDecimal(out, static_cast<uint64_t>(ms), 3);
  out.push_back('Z');
}

// The MAC key: 32 random bytes made at first start, then only read; the
// file must be ours and private.
StatusOr<SecretBytes> LoadOrCreateKey(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0 && errno == ENOENT) {
    SecretBytes key(kMacKeySize);
    if (RAND_priv_bytes(key.ExposeMutable(SecretAccess::kToken).data(),
                        static_cast<int>(kMacKeySize)) != 1) {
      return Internal("cannot make the audit MAC key");
    }
    const int out =
        ::open(path.c_str(),
               O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (out < 0) {
      return Internal(Errno("cannot create " + path.string(), errno));
    }
    const auto bytes = key.Expose(SecretAccess::kToken);
    const bool ok = ::write(out, bytes.data(), bytes.size()) ==
                        static_cast<ssize_t>(bytes.size()) &&
                    ::fsync(out) == 0;
    const int err = errno;
    ::close(out);
    if (!ok) {
      ::unlink(path.c_str());
      return Internal(Errno("cannot write " + path.string(), err));
    }
    return key;
  }
  if (fd < 0) {
    return Internal(Errno("cannot open " + path.string(), errno));
  }
  struct stat st {};
  SecretBytes key(kMacKeySize);
  ssize_t got = -1;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
      st.st_uid == ::geteuid() && (st.st_mode & 077) == 0) {
    got =
        ::read(fd, key.ExposeMutable(SecretAccess::kToken).data(), kMacKeySize);
  }
  ::close(fd);
  if (got != static_cast<ssize_t>(kMacKeySize)) {
    return Internal(path.string() +
                    " must be a 32-byte regular file owned by the daemon's "
                    "uid, mode 0600");
  }
  return key;
}

// A record's "seq", if it is a number.
std::optional<uint64_t> SeqOf(const std::string& line) {
  const std::string seq = AuditField(line, "seq");
  char* end = nullptr;
  const unsigned long long n = std::strtoull(seq.c_str(), &end, 10);
  if (end == seq.c_str() || *end != '\0') {
    return std::nullopt;
  }
  return n;
}

// The "seq" of a file's first record; 1 if it has no readable one.
uint64_t FirstSeq(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) {
    return 1;
  }
  return std::max<uint64_t>(SeqOf(line).value_or(1), 1);
}

}  // namespace

std::string AuditField(const std::string& line, const std::string& name) {
  const std::string mark = "\"" + name + "\":";
  const std::size_t at = line.find(mark);
  if (at == std::string::npos) {
    return "";
  }
  std::size_t i = at + mark.size();
  if (i < line.size() && line[i] == '"') {
    std::string out;
    for (++i; i < line.size() && line[i] != '"'; ++i) {
      if (line[i] == '\\' && i + 1 < line.size()) {
        ++i;
      }
      out.push_back(line[i]);
    }
    return out;
  }
  const std::size_t end = line.find_first_of(",}", i);
  return line.substr(i, end == std::string::npos ? std::string::npos : end - i);
}

AuditLog::AuditLog(std::filesystem::path path, int fd, SecretBytes mac_key)
    : path_(std::move(path)), fd_(fd), mac_key_(std::move(mac_key)) {
  // HMAC-SHA256 keyed once: every record re-initialises this context
  // (EVP_MAC_init without a key keeps it) instead of HMAC()'s fetch and key
  // set-up per call, which cost about 30,000 instructions per record.
  EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (mac != nullptr) {
    mac_ctx_ = EVP_MAC_CTX_new(mac);
    EVP_MAC_free(mac);
  }
  char digest[] = "SHA256";
  const OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
      OSSL_PARAM_construct_end()};
  const auto key = mac_key_.Expose(SecretAccess::kToken);
  if (mac_ctx_ != nullptr &&
      EVP_MAC_init(mac_ctx_, key.data(), key.size(), params) != 1) {
    EVP_MAC_CTX_free(mac_ctx_);
    mac_ctx_ = nullptr;
  }
  ERR_clear_error();
}

AuditLog::~AuditLog() {
  {
    std::lock_guard<std::mutex> lock(uses_mu_);
    stopping_ = true;
  }
  uses_cv_.notify_all();
  if (flusher_.joinable()) {
    flusher_.join();
  }
  // A clean stop writes the last counts.
  (void)FlushUses();
  EVP_MAC_CTX_free(mac_ctx_);
  ::close(fd_);
}

StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(
    const std::filesystem::path& dir) {
  auto key = LoadOrCreateKey(dir / "audit.key");
  if (!key.ok()) {
    return key.status();
  }
  const std::filesystem::path path = dir / "audit.log";
  // A rotation cut short: its new file either never took audit.log's
  // place (then audit.log goes on and the new file goes) or had just lost
  // it (then the new file is audit.log; audit.log.1 is the old one).
  const std::filesystem::path next = dir / "audit.log.new";
  if (::access(next.c_str(), F_OK) == 0) {
    if (::access(path.c_str(), F_OK) == 0) {
      ::unlink(next.c_str());
    } else if (::rename(next.c_str(), path.c_str()) != 0) {
      return Internal(Errno("cannot rename " + next.string(), errno));
    }
  }
  const int fd =
      ::open(path.c_str(),
             O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return Internal(Errno("cannot open " + path.string(), errno));
  }
  std::unique_ptr<AuditLog> log(new AuditLog(path, fd, std::move(*key)));
  log->head_ = kGenesis;
  struct stat st {};
  if (::fstat(fd, &st) == 0) {
    log->size_ = static_cast<uint64_t>(st.st_size);
  }
  // Where the oldest file kept starts, taken as found at start (as the
  // head is).
  log->floor_ = log->OldestKeptSeq();
  // Continue after the last complete record.
  std::ifstream in(path);
  std::string line;
  std::string last;
  while (std::getline(in, line)) {
    if (!line.empty()) {
      last = line;
    }
  }
  if (!last.empty()) {
    const std::string mac = AuditField(last, "mac");
    const std::optional<uint64_t> seq = SeqOf(last);
    if (mac.size() != 64 || !seq) {
      return Internal(path.string() +
                      ": the last record is unreadable; move the file "
                      "aside (and keep it) to start a new log");
    }
    log->seq_ = *seq;
    log->head_ = mac;
  }
  return log;
}

std::string AuditLog::Mac(EVP_MAC_CTX* ctx, const std::string& prefix) const {
  unsigned char mac[EVP_MAX_MD_SIZE];
  std::size_t len = 0;
  if (ctx != nullptr && EVP_MAC_init(ctx, nullptr, 0, nullptr) == 1 &&
      EVP_MAC_update(ctx, reinterpret_cast<const unsigned char*>(prefix.data()),
                     prefix.size()) == 1 &&
      EVP_MAC_final(ctx, mac, &len, sizeof(mac)) == 1) {
    return HexEncode(std::span<const uint8_t>(mac, len));
  }
  ERR_clear_error();
  unsigned int one_shot_len = 0;
  const auto key = mac_key_.Expose(SecretAccess::kToken);
  HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
       reinterpret_cast<const unsigned char*>(prefix.data()), prefix.size(),
       mac, &one_shot_len);
  return HexEncode(std::span<const uint8_t>(mac, one_shot_len));
}

Status AuditLog::Append(const AuditEvent& e) {
  return AppendRecord(e, nullptr);
}

void AuditLog::SetRotation(uint64_t max_bytes, unsigned keep) {
  std::lock_guard<std::mutex> lock(mu_);
  rotate_bytes_ = max_bytes;
  keep_ = std::max(keep, 1U);
  rotate_retry_at_ = 0;
}

std::filesystem::path AuditLog::Rotated(unsigned n) const {
  return path_.string() + "." + std::to_string(n);
}

uint64_t AuditLog::OldestKeptSeq() const {
  const std::vector<unsigned> rotated = RotatedNumbers();
  return FirstSeq(rotated.empty() ? path_ : Rotated(rotated[0]));
}

std::vector<unsigned> AuditLog::RotatedNumbers() const {
  std::vector<unsigned> out;
  const std::string prefix = path_.filename().string() + ".";
  std::error_code ec;
  for (const auto& entry :
       std::filesystem::directory_iterator(path_.parent_path(), ec)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with(prefix) || name.size() > prefix.size() + 6) {
      continue;
    }
    const std::string digits = name.substr(prefix.size());
    if (digits.empty() || digits[0] == '0' ||
        digits.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    out.push_back(static_cast<unsigned>(std::stoul(digits)));
  }
  std::sort(out.begin(), out.end(), std::greater<>());
  return out;
}

void AuditLog::CountUse(const AuditEvent& e) {
  std::string group;
  group.reserve(32 + e.exe.size() + e.op.size() + e.key.size() +
                e.result.size());
  AppendDecimal(group, e.uid);
  group.push_back('\0');
  AppendDecimal(group, static_cast<uint32_t>(e.pid));
  for (const std::string* field : {&e.exe, &e.op, &e.key, &e.result}) {
    group.push_back('\0');
    group += *field;
  }
  std::lock_guard<std::mutex> lock(uses_mu_);
  UseGroup& g = uses_[group];
  if (g.count == 0) {
    g.event = e;
    g.event.detail.clear();
    AppendUtcNow(g.since);
  }
  ++g.count;
  if (!flusher_.joinable() && !stopping_) {
    flusher_ = std::thread([this] { FlushLoop(); });
  }
}

void AuditLog::FlushLoop() {
  std::unique_lock<std::mutex> lock(uses_mu_);
  while (!stopping_) {
    uses_cv_.wait_for(lock, use_flush_period_, [this] { return stopping_; });
    if (stopping_) {
      return;  // the destructor writes what is left
    }
    lock.unlock();
    if (Status st = FlushUses(); !st.ok()) {
      (void)st;  // kept and counted again; the next flush retries
    }
    lock.lock();
  }
}

Status AuditLog::FlushUses() {
  std::map<std::string, UseGroup> groups;
  {
    std::lock_guard<std::mutex> lock(uses_mu_);
    groups.swap(uses_);
  }
  for (auto it = groups.begin(); it != groups.end(); ++it) {
    Status st = AppendRecord(it->second.event, &it->second);
    if (!st.ok()) {
      // Not written: merge back what is left, so the uses are not lost.
      std::lock_guard<std::mutex> lock(uses_mu_);
      for (; it != groups.end(); ++it) {
        UseGroup& g = uses_[it->first];
        if (g.count == 0) {
          g.event = it->second.event;
          g.since = it->second.since;
        }
        g.count += it->second.count;
      }
      return st;
    }
  }
  return Status::Ok();
}

std::string AuditLog::FormatRecord(uint64_t seq, const AuditEvent& e,
                                   const UseGroup* uses, std::string* mac) {
  std::string line;
  line.reserve(256 + e.exe.size() + e.key.size() + e.detail.size());
  line += "{\"seq\":";
  AppendDecimal(line, seq);
  line += ",\"time\":\"";
  AppendUtcNow(line);
  line += "\",\"uid\":";
  AppendDecimal(line, e.uid);
  line += ",\"pid\":";
  if (e.pid < 0) {
    line.push_back('-');
  }
  AppendDecimal(line, static_cast<uint64_t>(e.pid < 0 ? -int64_t{e.pid}
                                                      : int64_t{e.pid}));
  line += ",\"exe\":\"";
  AppendJsonEscaped(line, e.exe);
  line += "\",\"op\":\"";
  AppendJsonEscaped(line, e.op);
  line += "\",\"key\":\"";
  AppendJsonEscaped(line, e.key);
  line += "\",\"result\":\"";
  AppendJsonEscaped(line, e.result);
  line += "\"";
  if (uses != nullptr) {
    line += ",\"count\":";
    AppendDecimal(line, uses->count);
    line += ",\"since\":\"";
    line += uses->since;
    line += "\"";
  }
  if (!e.detail.empty()) {
    line += ",\"detail\":\"";
    AppendJsonEscaped(line, e.detail);
    line += "\"";
  }
  line += ",\"prev\":\"";
  line += head_;
  line += "\"";
  *mac = Mac(mac_ctx_, line);
  line += kMacMark;
  line += *mac;
  line += "\"}\n";
  return line;
}

Status AuditLog::AppendRecord(const AuditEvent& e, const UseGroup* uses) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t seq = seq_ + 1;
  std::string mac;
  const std::string line = FormatRecord(seq, e, uses, &mac);
  const ssize_t n = ::write(fd_, line.data(), line.size());
  if (n != static_cast<ssize_t>(line.size())) {
    const int err = n < 0 ? errno : ENOSPC;
    if (n > 0) {
      // A torn record: end it so the next one starts on its own line
      // (Verify reports the torn one).
      (void)::write(fd_, "\n", 1);
    }
    return Internal(Errno("audit log " + path_.string(), err));
  }
  seq_ = seq;
  head_ = mac;
  size_ += line.size();
  if (rotate_bytes_ > 0 && size_ >= rotate_bytes_ &&
      size_ >= rotate_retry_at_) {
    if (Status st = Rotate(); !st.ok()) {
      rotate_retry_at_ =
          size_ + std::max<uint64_t>(rotate_bytes_ / 16, uint64_t{1} << 20);
      Log().error("cannot rotate the audit log ({}); records go on in {}",
                  st.message(), path_.string());
    }
  }
  return Status::Ok();  // the record is written, rotated or not
}

Status AuditLog::Rotate() {
  // The new file and its first record, chained to the last one, before
  // anything moves: a failure here changes nothing.
  const std::filesystem::path next = path_.string() + ".new";
  const int fd = ::open(
      next.c_str(),
      O_WRONLY | O_APPEND | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return Internal(Errno("cannot create " + next.string(), errno));
  }
  // On any failure below: the new file goes, audit.log stays as it is.
  const auto abandon = [&](const std::string& what, int err) {
    ::close(fd);
    ::unlink(next.c_str());
    return Internal(Errno(what, err));
  };
  AuditEvent e;
  e.uid = ::geteuid();
  e.pid = ::getpid();
  e.op = kAuditRotatedOp;
  e.result = "ok";
  e.detail =
      "the records before this one are in " + Rotated(1).filename().string();
  std::string mac;
  const std::string line = FormatRecord(seq_ + 1, e, nullptr, &mac);
  if (::write(fd, line.data(), line.size()) !=
      static_cast<ssize_t>(line.size())) {
    return abandon("cannot write " + next.string(), errno);
  }
  // Make room: files from number keep_ on go, the others move up one.
  std::vector<unsigned> numbers = RotatedNumbers();
  bool deleted = false;
  for (const unsigned n : numbers) {
    if (n >= keep_) {
      ::unlink(Rotated(n).c_str());
      deleted = true;
    } else if (::rename(Rotated(n).c_str(), Rotated(n + 1).c_str()) != 0) {
      return abandon("cannot rename " + Rotated(n).string(), errno);
    }
  }
  if (::rename(path_.c_str(), Rotated(1).c_str()) != 0) {
    return abandon("cannot rename " + path_.string(), errno);
  }
  if (::rename(next.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    (void)::rename(Rotated(1).c_str(), path_.c_str());
    return abandon("cannot rename " + next.string(), err);
  }
  ::close(fd_);
  fd_ = fd;
  size_ = line.size();
  seq_ += 1;
  head_ = mac;
  rotate_retry_at_ = 0;
  if (deleted) {
    floor_ = OldestKeptSeq();
  }
  Log().info("audit log rotated at record {}: earlier records in {}", seq_,
             Rotated(1).string());
  return Status::Ok();
}

namespace {

// A file of the log as it was when taken (its descriptor, so a rotation
// meanwhile moves nothing under the reader, and its size then).
struct TakenFile {
  std::string name;  // "" for audit.log, else "audit.log.N"
  std::unique_ptr<LineReader> lines;
};

StatusOr<TakenFile> Take(const std::filesystem::path& path, bool current) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  struct stat st {};
  if (fd < 0 || ::fstat(fd, &st) != 0) {
    const int err = errno;
    if (fd >= 0) {
      ::close(fd);
    }
    return Internal(Errno("cannot read " + path.string(), err));
  }
  TakenFile f;
  f.name = current ? "" : path.filename().string();
  f.lines = std::make_unique<LineReader>(fd, static_cast<uint64_t>(st.st_size));
  if (!f.lines->ok()) {
    return Internal(Errno("cannot read " + path.string(), errno));
  }
  return f;
}

}  // namespace

StatusOr<AuditCheck> AuditLog::Verify() {
  std::vector<TakenFile> files;  // oldest first
  uint64_t last_seq = 0;
  uint64_t floor = 1;
  std::string head;
  EVP_MAC_CTX* ctx = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const unsigned n : RotatedNumbers()) {
      auto f = Take(Rotated(n), false);
      if (!f.ok()) {
        return f.status();
      }
      files.push_back(std::move(*f));
    }
    auto f = Take(path_, true);
    if (!f.ok()) {
      return f.status();
    }
    files.push_back(std::move(*f));
    last_seq = seq_;
    head = head_;
    floor = floor_;
    if (mac_ctx_ != nullptr) {
      ctx = EVP_MAC_CTX_dup(mac_ctx_);  // null: Mac() falls back
    }
  }
  const std::unique_ptr<EVP_MAC_CTX, decltype(&EVP_MAC_CTX_free)> ctx_owner(
      ctx, EVP_MAC_CTX_free);
  AuditCheck check;
  check.files = files.size();
  std::string prev = kGenesis;
  uint64_t expect = 1;
  std::string line;
  bool ended = false;
  for (TakenFile& file : files) {
    const std::string in_file = file.name.empty() ? "" : file.name + ": ";
    while (file.lines->Next(&line, &ended)) {
      if (check.records == 0) {
        check.first = 1;
        // The oldest file kept begins after a rotation that deleted older
        // files: its first record is the rotation record this daemon
        // knows it starts with, and its "prev" is taken as read.
        if (floor > 1 && AuditField(line, "op") == kAuditRotatedOp &&
            AuditField(line, "seq") == std::to_string(floor)) {
          expect = floor;
          check.first = floor;
          prev = AuditField(line, "prev");
        }
      }
      const std::string where =
          in_file + "record " + std::to_string(expect) + ": ";
      const std::size_t mark = line.rfind(kMacMark);
      if (mark == std::string::npos) {
        check.problem = where + "not a record (torn or edited)";
        return check;
      }
      const std::string prefix = line.substr(0, mark);
      // The MAC covers the line up to its mark; after the mark nothing but
      // the MAC itself and the closing "} may follow.
      if (line.size() != mark + kMacMark.size() + 64 + 2 ||
          line.compare(line.size() - 2, 2, "\"}") != 0) {
        check.problem = where + "edited (bytes after its MAC)";
        return check;
      }
      if (!ended) {
        // The file ends in the record, not after its line end: the record
        // was cut or its line end removed, and the next one written would
        // run on in the same line.
        check.problem = where + "edited (no line end after it)";
        return check;
      }
      const std::string mac = line.substr(mark + kMacMark.size(), 64);
      if (AuditField(line, "seq") != std::to_string(expect)) {
        check.problem = where + "out of sequence (found seq " +
                        AuditField(line, "seq") +
                        "): records removed, inserted or moved";
        return check;
      }
      if (AuditField(line, "prev") != prev) {
        check.problem = where + "does not follow the record before it";
        return check;
      }
      const std::string want = Mac(ctx, prefix);
      if (mac.size() != want.size() ||
          CRYPTO_memcmp(mac.data(), want.data(), want.size()) != 0) {
        check.problem = where + "edited (its MAC does not match)";
        return check;
      }
      prev = mac;
      ++expect;
      ++check.records;
    }
  }
  if (expect - 1 != last_seq || prev != head) {
    check.problem = "the log ends at record " + std::to_string(expect - 1) +
                    " but this daemon wrote up to record " +
                    std::to_string(last_seq) + ": records removed from the end";
    return check;
  }
  check.intact = true;
  return check;
}

StatusOr<std::vector<std::string>> AuditLog::Read(
    const std::optional<std::string>& key, std::optional<uint32_t> uid,
    std::size_t limit) {
  std::vector<TakenFile> files;  // newest first
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto f = Take(path_, true);
    if (!f.ok()) {
      return f.status();
    }
    files.push_back(std::move(*f));
    std::vector<unsigned> numbers = RotatedNumbers();
    for (auto n = numbers.rbegin(); n != numbers.rend(); ++n) {
      auto older = Take(Rotated(*n), false);
      if (!older.ok()) {
        return older.status();
      }
      files.push_back(std::move(*older));
    }
  }
  std::deque<std::string> kept;
  const std::string want_uid = uid ? std::to_string(*uid) : "";
  std::string line;
  bool ended = false;
  for (TakenFile& file : files) {
    if (kept.size() >= limit) {
      break;
    }
    const std::size_t room = limit - kept.size();
    std::deque<std::string> found;  // this file's last `room` matches
    while (file.lines->Next(&line, &ended)) {
      if (key && AuditField(line, "key") != *key) {
        continue;
      }
      if (uid && AuditField(line, "uid") != want_uid) {
        continue;
      }
      found.push_back(line);
      if (found.size() > room) {
        found.pop_front();
      }
    }
    kept.insert(kept.begin(), found.begin(), found.end());
  }
  return std::vector<std::string>(kept.begin(), kept.end());
}

}  // namespace keyhold::daemon
