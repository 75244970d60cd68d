// audit_log_fuzzer: the audit log (daemon/audit_log.cc). Its records carry
// text that callers choose (their executable's path, key and grantee
// names), and Verify() reads the file back after someone may have edited it.
//
// Byte 0 picks the mode (its value mod 4); the rest of the input:
//  - fields (0, 2): split at 0xff into exe, op, key, result and detail,
//    with uid and pid from the first 8 bytes. The event is appended to a
//    fresh log after one fixed record. Every field reads back as written
//    (AuditField; for fields without control characters, which are kept as
//    \u00XX), so no field can pose as another; Read() by the key finds the
//    record; Verify() says intact.
//  - edit (1): three fixed records are written, then bytes 1-2 give an
//    offset and byte 3 a length of the file to replace with the rest of
//    the input (cut if it runs past the end). Verify() must say intact
//    exactly when the file is unchanged, and Open() of the edited file must
//    not crash.
//  - edit across rotated files (3): the same with a log that rotates after
//    every record, keeping two files: audit.log.2, audit.log.1 and
//    audit.log hold a rotation record each, the first two a fixed record
//    after it. The edit applies to the three files end to end, which are
//    then cut back at their old lengths (so an edit can move bytes from
//    one file into the next).

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "daemon/audit_log.h"
#include "fuzz/scratch_dir.h"

namespace {

using keyhold::daemon::AuditEvent;
using keyhold::daemon::AuditField;
using keyhold::daemon::AuditLog;

// The log's directory.
std::filesystem::path Dir() { return keyhold::fuzz::ScratchDir("audit-fuzz"); }

std::string ReadFile(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A fresh log (the MAC key stays; only the records go).
std::unique_ptr<AuditLog> FreshLog() {
  for (const char* name :
       {"audit.log", "audit.log.1", "audit.log.2", "audit.log.new"}) {
    std::filesystem::remove(Dir() / name);
  }
  auto log = AuditLog::Open(Dir());
  if (!log.ok()) {
    std::abort();
  }
  return std::move(*log);
}

AuditEvent Fixed(uint32_t n) {
  AuditEvent e;
  e.uid = 1000 + n;
  e.pid = static_cast<int32_t>(4000 + n);
  e.exe = "/usr/bin/openssl";
  e.op = "sign";
  e.key = "1000/web";
  e.result = "ok";
  return e;
}

bool HasControl(const std::string& s) {
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return true;
    }
  }
  return false;
}

// The last line of the log (without its newline).
std::string LastLine() {
  const std::string text = ReadFile(Dir() / "audit.log");
  if (text.empty() || text.back() != '\n') {
    std::abort();
  }
  const std::size_t start = text.rfind('\n', text.size() - 2);
  return text.substr(
      start == std::string::npos ? 0 : start + 1,
      text.size() - 1 - (start == std::string::npos ? 0 : start + 1));
}

void Fields(const uint8_t* data, std::size_t size) {
  AuditEvent e;
  if (size >= 8) {
    auto u32 = [](const uint8_t* p) {
      return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 |
             uint32_t{p[3]} << 24;
    };
    e.uid = u32(data);
    e.pid = static_cast<int32_t>(u32(data + 4));
    data += 8;
    size -= 8;
  }
  std::string* fields[] = {&e.exe, &e.op, &e.key, &e.result, &e.detail};
  std::size_t f = 0;
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == 0xff && f + 1 < std::size(fields)) {
      ++f;
      continue;
    }
    fields[f]->push_back(static_cast<char>(data[i]));
  }
  auto log = FreshLog();
  if (!log->Append(Fixed(0)).ok() || !log->Append(e).ok()) {
    std::abort();
  }
  const std::string line = LastLine();
  if (AuditField(line, "uid") != std::to_string(e.uid) ||
      AuditField(line, "pid") != std::to_string(e.pid)) {
    std::abort();
  }
  const std::pair<const char*, const std::string*> text[] = {
      {"exe", &e.exe}, {"op", &e.op}, {"key", &e.key}, {"result", &e.result}};
  for (const auto& [name, value] : text) {
    if (!HasControl(*value) && AuditField(line, name) != *value) {
      std::abort();
    }
  }
  if (!e.detail.empty() && !HasControl(e.detail) &&
      AuditField(line, "detail") != e.detail) {
    std::abort();
  }
  if (!HasControl(e.key)) {
    auto found = log->Read(e.key, std::nullopt, 10);
    if (!found.ok() || found->empty() || found->back() != line) {
      std::abort();
    }
  }
  auto check = log->Verify();
  if (!check.ok() || !check->intact || check->records != 2) {
    std::abort();
  }
}

// Modes edit and edit across rotated files: see the top of the file.
void Edit(const uint8_t* data, std::size_t size, bool rotated) {
  if (size < 3) {
    return;
  }
  auto log = FreshLog();
  if (rotated) {
    log->SetRotation(1, 2);
  }
  for (uint32_t n = 0; n < 3; ++n) {
    if (!log->Append(Fixed(n)).ok()) {
      std::abort();
    }
  }
  std::vector<std::filesystem::path> files;
  if (rotated) {
    files = {Dir() / "audit.log.2", Dir() / "audit.log.1"};
  }
  files.push_back(Dir() / "audit.log");
  std::string original;
  std::vector<std::size_t> lengths;
  for (const auto& file : files) {
    const std::string text = ReadFile(file);
    if (text.empty()) {
      std::abort();  // every file holds records
    }
    lengths.push_back(text.size());
    original += text;
  }
  const std::size_t at = std::min<std::size_t>(
      std::size_t{data[0]} | std::size_t{data[1]} << 8, original.size());
  const std::size_t cut = std::min<std::size_t>(data[2], original.size() - at);
  std::string edited = original;
  edited.replace(
      at, cut, std::string(reinterpret_cast<const char*>(data + 3), size - 3));
  // Cut back at the old lengths; the last file takes the rest.
  std::size_t from = 0;
  for (std::size_t i = 0; i < files.size(); ++i) {
    std::string part;
    if (from < edited.size()) {
      part = i + 1 == files.size() ? edited.substr(from)
                                   : edited.substr(from, lengths[i]);
    }
    from += part.size();
    WriteFile(files[i], part);
  }
  auto check = log->Verify();
  if (!check.ok() || check->intact != (edited == original)) {
    std::fprintf(stderr, "intact=%d for an edited log: %s\n",
                 check.ok() ? check->intact : -1,
                 check.ok() ? check->problem.c_str() : "");
    std::abort();
  }
  if (edited == original &&
      (check->files != files.size() || check->first != (rotated ? 2u : 1u))) {
    std::abort();
  }
  log.reset();
  (void)AuditLog::Open(Dir());  // continues after the edited file, or refuses
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size == 0) {
    return 0;
  }
  switch (data[0] % 4) {
    case 1:
      Edit(data + 1, size - 1, /*rotated=*/false);
      break;
    case 3:
      Edit(data + 1, size - 1, /*rotated=*/true);
      break;
    default:
      Fields(data + 1, size - 1);
  }
  return 0;
}
