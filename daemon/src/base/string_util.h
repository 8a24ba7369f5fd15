// Small string helpers shared by the loaders.
#pragma once

#include <absl/strings/escaping.h>

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

// Standard base64 (RFC 4648, padded), abseil's.
inline std::string Base64Encode(std::string_view bytes) {
  return absl::Base64Escape(absl::string_view(bytes.data(), bytes.size()));
}

// Standard base64 with padding and nothing else (no whitespace, no URL alphabet), as Go's
// base64.StdEncoding decodes it (containerd's `auth`, Kubernetes' Secret data): false otherwise.
inline bool Base64Decode(std::string_view in, std::string* out) {
  constexpr std::string_view kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
  if (in.empty() || in.size() % 4 != 0 || in.find_first_not_of(kAlphabet) != in.npos) {
    return false;
  }
  return absl::Base64Unescape(absl::string_view(in.data(), in.size()), out);
}

}  // namespace registry_proxy
