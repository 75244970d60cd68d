// A fuzzer's scratch directory under /tmp: made on first use, once per
// process, and removed at exit.
#ifndef KEYHOLD_FUZZ_SCRATCH_DIR_H_
#define KEYHOLD_FUZZ_SCRATCH_DIR_H_

#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <system_error>

namespace keyhold::fuzz {

// A plain array, not a path object: the atexit handler runs after static
// destructors may have.
inline char g_scratch_dir[64];

inline void RemoveScratchDir() {
  std::error_code ec;
  std::filesystem::remove_all(g_scratch_dir, ec);
}

// /tmp/kh-NAME-XXXXXX; the NAME of the first call names it. Aborts if it
// cannot be made.
inline std::filesystem::path ScratchDir(const char* name) {
  static const bool made = [name] {
    std::snprintf(g_scratch_dir, sizeof(g_scratch_dir), "/tmp/kh-%s-XXXXXX",
                  name);
    if (::mkdtemp(g_scratch_dir) == nullptr) {
      std::abort();
    }
    std::atexit(&RemoveScratchDir);
    return true;
  }();
  (void)made;
  return g_scratch_dir;
}

}  // namespace keyhold::fuzz

#endif  // KEYHOLD_FUZZ_SCRATCH_DIR_H_
