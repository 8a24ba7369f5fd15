// Reading small files that come from outside the process (config, credentials): regular
// files only, never blocking on a FIFO, and never more than a cap.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

namespace registry_proxy {

// The whole of a file, and its st_mode (fstat on the descriptor that was read).
struct FileContents {
  std::string data;
  mode_t mode = 0;
};

// Why ReadRegularFile failed: the kind and its details, so a caller can word its own message
// or take the common one.
struct FileError {
  enum class Kind { kOpen, kStat, kDirectory, kNotRegular, kTooBig, kRead };
  Kind kind = Kind::kOpen;
  int err = 0;           // errno, for kOpen, kStat and kRead
  uint64_t size = 0;     // kTooBig: st_size, or what was read once the file grew past the cap
  size_t max_bytes = 0;  // kTooBig: the cap

  // "cannot open <what>: No such file or directory", "<what> is not a regular file", ...
  // (without the path).
  std::string Message(std::string_view what) const;
};

// Opens `path` (following symlinks) with O_NONBLOCK, so a FIFO cannot hang the caller, and
// reads it to EOF if it is a regular file of at most max_bytes. Reads to EOF rather than
// trusting st_size: the file may change while it is read.
std::variant<FileContents, FileError> ReadRegularFile(const std::string& path, size_t max_bytes);

}  // namespace registry_proxy
