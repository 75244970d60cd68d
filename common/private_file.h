// Small secret files of the daemon (the master key, its TPM-sealed form, an
// owner auth value): read only when they cannot have leaked through their
// permissions, written so that a crash leaves the old or the new file,
// never a torn one.
#ifndef KEYHOLD_COMMON_PRIVATE_FILE_H_
#define KEYHOLD_COMMON_PRIVATE_FILE_H_

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>

#include "common/secret.h"
#include "common/status.h"

namespace keyhold {

// Reads path, which must be a regular file owned by the effective uid with
// no group or other access. exact_size 0: any size up to max_size. A FIFO
// in its place does not block. Errors name the file, never its contents.
StatusOr<SecretBytes> ReadPrivateFile(const std::filesystem::path& path,
                                      std::size_t exact_size,
                                      std::size_t max_size);

// Replaces path with data, mode 0600: written to a temporary file in the
// same directory, fsynced, renamed over path, and the directory fsynced.
Status WritePrivateFileAtomically(const std::filesystem::path& path,
                                  std::span<const uint8_t> data);

// fsyncs the directory that holds path ("." for a bare name), so that a
// file created, renamed or deleted there stays so after a crash.
Status FsyncDirectoryOf(const std::filesystem::path& path);

}  // namespace keyhold

#endif  // KEYHOLD_COMMON_PRIVATE_FILE_H_
