// The check a certificate passes before the daemon keeps it beside a key
// (SetCertificate): the bytes come from any client, so this is a parser of
// untrusted input (fuzz/cert_check_fuzzer.cc drives it).
#ifndef KEYHOLD_DAEMON_OPS_CERT_CHECK_H_
#define KEYHOLD_DAEMON_OPS_CERT_CHECK_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "common/status.h"

namespace keyhold::daemon {

// Far above any real end-entity certificate; keeps ListKeys answers small.
inline constexpr std::size_t kMaxCertificateBytes = 16 * 1024;

// OK if `der` is one DER X.509 certificate of at most kMaxCertificateBytes
// (no trailing bytes) whose SubjectPublicKeyInfo is `public_key` (a DER
// SubjectPublicKeyInfo), byte for byte; InvalidArgument otherwise.
Status CheckCertificate(std::string_view der,
                        std::span<const uint8_t> public_key);

}  // namespace keyhold::daemon

#endif  // KEYHOLD_DAEMON_OPS_CERT_CHECK_H_
