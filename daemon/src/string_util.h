// Small string helpers shared by the loaders.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <string_view>

namespace registry_proxy {

// The parts, concatenated, in one allocation: StrCat({"mirror '", host, "': ", why}).
inline std::string StrCat(std::initializer_list<std::string_view> parts) {
  size_t n = 0;
  for (std::string_view p : parts) n += p.size();
  std::string out;
  out.reserve(n);
  for (std::string_view p : parts) out.append(p);
  return out;
}

}  // namespace registry_proxy
