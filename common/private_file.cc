#include "common/private_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <string_view>

namespace keyhold {
namespace {

Status FileError(const std::filesystem::path& path, std::string_view reason) {
  return Internal("file '" + path.string() + "': " + std::string(reason));
}

Status FileErrno(const std::filesystem::path& path, std::string_view what,
                 int err) {
  return FileError(path, std::string(what) + ": " + std::strerror(err));
}

}  // namespace

StatusOr<SecretBytes> ReadPrivateFile(const std::filesystem::path& path,
                                      std::size_t exact_size,
                                      std::size_t max_size) {
  const int fd =
      ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    return FileErrno(path, "cannot open", errno);
  }
  struct stat st {};
  Status status;
  if (::fstat(fd, &st) != 0) {
    status = FileErrno(path, "cannot stat", errno);
  } else if (!S_ISREG(st.st_mode)) {
    status = FileError(path, "not a regular file");
  } else if (st.st_uid != ::geteuid()) {
    status = FileError(path, "not owned by the daemon's uid");
  } else if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    status = FileError(path, "gives access to group or others (must be 0600)");
  }
  // One byte of slack tells a file that is too long.
  SecretBytes data(max_size + 1);
  std::size_t got = 0;
  while (status.ok() && got < data.size()) {
    const ssize_t n =
        ::read(fd, data.data(SecretAccess::kToken) + got, data.size() - got);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n < 0) {
      status = FileErrno(path, "cannot read", errno);
    }
    if (n <= 0) {
      break;
    }
    got += static_cast<std::size_t>(n);
  }
  ::close(fd);
  KH_RETURN_IF_ERROR(status);
  if ((exact_size != 0 && got != exact_size) || got > max_size) {
    return FileError(path, "has the wrong size");
  }
  data.resize(got);
  return data;
}

Status WritePrivateFileAtomically(const std::filesystem::path& path,
                                  std::span<const uint8_t> data) {
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  ::unlink(tmp.c_str());  // a leftover of a crash
  const int fd = ::open(
      tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    return FileErrno(tmp, "cannot create", errno);
  }
  Status status;
  // A restrictive umask must not leave the daemon unable to read it back.
  if (::fchmod(fd, 0600) != 0) {
    status = FileErrno(tmp, "cannot chmod", errno);
  }
  std::size_t written = 0;
  while (status.ok() && written < data.size()) {
    const ssize_t n = ::write(fd, data.data() + written, data.size() - written);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    if (n <= 0) {
      status = FileErrno(tmp, "cannot write", n < 0 ? errno : EIO);
      break;
    }
    written += static_cast<std::size_t>(n);
  }
  if (status.ok() && ::fsync(fd) != 0) {
    status = FileErrno(tmp, "cannot fsync", errno);
  }
  if (::close(fd) != 0 && status.ok()) {
    status = FileErrno(tmp, "cannot close", errno);
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = FileErrno(path, "cannot rename into place", errno);
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  return FsyncDirectoryOf(path);
}

Status FsyncDirectoryOf(const std::filesystem::path& path) {
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) {
    dir = ".";
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    return FileErrno(dir, "cannot open directory", errno);
  }
  const bool synced = ::fsync(dfd) == 0;
  const int err = errno;
  ::close(dfd);
  if (!synced) {
    return FileErrno(dir, "cannot fsync directory", err);
  }
  return Status::Ok();
}

}  // namespace keyhold
