#include "daemon/master_key.h"

#include <openssl/rand.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <string>

#include "common/private_file.h"
#include "daemon/backends/software/software_backend.h"
#include "daemon/backends/tpm/tpm_backend.h"
#include "daemon/log.h"

namespace keyhold::daemon {
namespace {

namespace fs = std::filesystem;

spdlog::logger& Log() {
  static const auto logger = ComponentLog("main");
  return *logger;
}

constexpr std::size_t kMasterKeySize = 32;
// A sealed master key is a few hundred bytes (two TPM2B areas).
constexpr std::size_t kMaxSealedSize = 4096;

bool Exists(const fs::path& p) {
  std::error_code ec;
  return fs::symlink_status(p, ec).type() != fs::file_type::not_found;
}

Status RemovePlainFile(const fs::path& plain) {
  if (::unlink(plain.c_str()) != 0) {
    return Internal("cannot delete '" + plain.string() +
                    "' after sealing it: " + std::strerror(errno));
  }
  // Not an error if the deletion is lost in a crash: the next start finds
  // both files holding the same key and deletes the plain one again.
  (void)FsyncDirectoryOf(plain);
  return Status::Ok();
}

Status WithFile(const Status& st, const fs::path& file) {
  return Status(st.code(), file.string() + ": " + st.message());
}

}  // namespace

StatusOr<SecretBytes> LoadMasterKey(const Config& config) {
  const fs::path plain = fs::path(config.state_dir) / "master.key";
  const fs::path sealed = fs::path(config.state_dir) / "master.key.tpm";
  if (config.master_key_sealed_by.empty()) {
    // Without the setting a missing master.key would be created afresh,
    // and every key under the sealed one would be lost to this daemon.
    if (!Exists(plain) && Exists(sealed)) {
      return Internal(
          "the master key is sealed by a TPM (" + sealed.string() +
          ") but master_key_sealed_by is not set; set it to the "
          "[[backend.tpm]] that sealed it, or put the offline copy back as " +
          plain.string());
    }
    return backend::software::LoadOrCreateMasterKeyFile(plain);
  }
  auto section = std::find_if(config.backends.begin(), config.backends.end(),
                              [&](const BackendSection& b) {
                                return b.kind == "tpm" &&
                                       b.name == config.master_key_sealed_by;
                              });
  if (section == config.backends.end()) {
    return InvalidArgument("master_key_sealed_by names no [[backend.tpm]]");
  }
  StatusOr<backend::tpm::TpmOptions> options =
      backend::tpm::ParseTpmSettings(section->settings);
  if (!options.ok()) {
    return options.status();
  }
  using backend::tpm::TpmBackend;

  if (Exists(sealed)) {
    StatusOr<SecretBytes> blob = ReadPrivateFile(sealed, 0, kMaxSealedSize);
    if (!blob.ok()) {
      return blob.status();
    }
    StatusOr<SecretBytes> key = TpmBackend::UnsealMasterKey(
        *options, blob->Expose(SecretAccess::kToken));
    if (!key.ok()) {
      return WithFile(key.status(), sealed);
    }
    if (Exists(plain)) {
      // A start that sealed the file but stopped before deleting it, or a
      // master.key restored from a backup: the same key is removed, another
      // one is a conflict an admin must settle (keys may be under either).
      StatusOr<SecretBytes> old = backend::software::ReadMasterKeyFile(plain);
      if (!old.ok()) {
        return old.status();
      }
      if (!old->Equals(*key)) {
        return Internal(
            "both '" + plain.string() + "' and '" + sealed.string() +
            "' exist and hold different master keys; move the one that "
            "does not belong to this key store away");
      }
      KH_RETURN_IF_ERROR(RemovePlainFile(plain));
      Log().warn("deleted {}: the TPM-sealed {} holds the same key",
                 plain.string(), sealed.string());
    }
    Log().info("master key unsealed by TPM backend '{}'",
               config.master_key_sealed_by);
    return key;
  }

  // First start with sealing: seal the existing key, or a new one that
  // never touches the disk in clear.
  const bool migrate = Exists(plain);
  StatusOr<SecretBytes> key = SecretBytes(kMasterKeySize);
  if (migrate) {
    key = backend::software::ReadMasterKeyFile(plain);
  } else if (RAND_priv_bytes(key->data(SecretAccess::kToken),
                             static_cast<int>(kMasterKeySize)) != 1) {
    return Internal("cannot draw a random master key");
  }
  if (!key.ok()) {
    return key.status();
  }
  StatusOr<std::vector<uint8_t>> blob =
      TpmBackend::SealMasterKey(*options, *key);
  if (!blob.ok()) {
    return blob.status();
  }
  // Proof before the plain file goes: the blob unseals to the same key.
  StatusOr<SecretBytes> check = TpmBackend::UnsealMasterKey(*options, *blob);
  if (!check.ok()) {
    return check.status();
  }
  if (!check->Equals(*key)) {
    return Internal("the TPM unsealed another master key than it sealed");
  }
  KH_RETURN_IF_ERROR(WritePrivateFileAtomically(sealed, *blob));
  if (migrate) {
    KH_RETURN_IF_ERROR(RemovePlainFile(plain));
  }
  if (migrate) {
    Log().warn(
        "master key moved into TPM backend '{}': {} now holds it, {} "
        "is deleted",
        config.master_key_sealed_by, sealed.string(), plain.string());
  } else {
    Log().info("new master key sealed by TPM backend '{}' in {}",
               config.master_key_sealed_by, sealed.string());
  }
  return key;
}

}  // namespace keyhold::daemon
