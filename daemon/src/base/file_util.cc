#include "base/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace registry_proxy {

std::string FileError::Message(std::string_view what) const {
  const std::string noun(what);
  switch (kind) {
    case Kind::kOpen:
      return "cannot open " + noun + ": " + std::system_category().message(err);
    case Kind::kStat:
      return "cannot stat " + noun + ": " + std::system_category().message(err);
    case Kind::kDirectory:
      return noun + " is a directory, not a regular file";
    case Kind::kNotRegular:
      return noun + " is not a regular file";
    case Kind::kTooBig: {
      std::string out = noun + " is " + std::to_string(size) + " bytes; the limit is " +
                        std::to_string(max_bytes) + " bytes";
      constexpr size_t kMiB = size_t{1} << 20;
      if (max_bytes >= kMiB && max_bytes % kMiB == 0) {
        out += " (" + std::to_string(max_bytes / kMiB) + " MiB)";
      }
      return out;
    }
    case Kind::kRead:
      return "cannot read " + noun + ": " + std::system_category().message(err);
  }
  return "cannot read " + noun;
}

std::variant<FileContents, FileError> ReadRegularFile(const std::string& path, size_t max_bytes) {
  using Kind = FileError::Kind;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return FileError{Kind::kOpen, errno};
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return FileError{Kind::kStat, errno};
  if (S_ISDIR(st.st_mode)) return FileError{Kind::kDirectory};
  if (!S_ISREG(st.st_mode)) return FileError{Kind::kNotRegular};
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    return FileError{Kind::kTooBig, 0, static_cast<uint64_t>(st.st_size), max_bytes};
  }
  FileContents out;
  out.mode = st.st_mode;
  char buf[65536];
  while (out.data.size() <= max_bytes) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return FileError{Kind::kRead, errno};
    }
    if (n == 0) break;
    out.data.append(buf, static_cast<size_t>(n));
  }
  if (out.data.size() > max_bytes) {
    return FileError{Kind::kTooBig, 0, out.data.size(), max_bytes};
  }
  return out;
}

}  // namespace registry_proxy
