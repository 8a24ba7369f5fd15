// libFuzzer target for the image-reference parser.
//
// Beyond "does not crash", it checks the properties the rest of the daemon relies on:
//  - a named result re-parses from String() to an equal Reference (the policy engine logs and
//    rewrites String() forms and must get the same decision back),
//  - NormalizedString() re-parses to the same Name() and digest (what containerd resolves),
//  - ParseNamedReference agrees with ParseImage on named input,
//  - the parts of a Reference pass ValidateDomain / ValidatePath,
//  - errors are non-empty single lines of bounded size, whatever bytes came in.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "rules/reference.h"

namespace {

using registry_proxy::ParsedReference;
using registry_proxy::ParseImage;
using registry_proxy::ParseNamedReference;
using registry_proxy::Reference;
using registry_proxy::ReferenceKind;
using registry_proxy::Result;

// Prints what broke (the crash input itself is saved by libFuzzer) and stops the run.
[[noreturn]] void Violation(const char* what, const std::string& detail) {
  std::fprintf(stderr, "reference_fuzz: %s: %s\n", what, detail.c_str());
  std::abort();
}

void CheckError(const std::string& error) {
  if (error.empty()) Violation("empty error message", "");
  if (error.find('\n') != std::string::npos) Violation("multi-line error", error);
  if (error.size() > 1024) Violation("oversized error", error.substr(0, 200));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);

  Result<ParsedReference> parsed = ParseImage(input);
  Result<Reference> named = ParseNamedReference(input);
  if (!parsed.ok()) {
    CheckError(parsed.error());
    if (named.ok())
      Violation("ParseNamedReference accepts what ParseImage rejects", named->String());
    return 0;
  }
  if (!named.ok()) CheckError(named.error());
  if (parsed->kind == ReferenceKind::kId) {
    if (parsed->id != input) Violation("id differs from input", parsed->id);
    return 0;
  }

  const Reference& ref = parsed->ref;
  if (ref.domain.empty() || ref.path.empty()) Violation("empty domain or path", ref.String());
  if (!named.ok()) Violation("ParseNamedReference rejects a named input", named.error());
  if (!(*named == ref)) Violation("ParseNamedReference disagrees", named->String());
  if (!registry_proxy::ValidateDomain(ref.domain).ok())
    Violation("invalid domain kept", ref.domain);
  if (!registry_proxy::ValidatePath(ref.path).ok()) Violation("invalid path kept", ref.path);

  const std::string s = ref.String();
  Result<ParsedReference> again = ParseImage(s);
  if (!again.ok()) Violation("String() does not parse", s + " -> " + again.error());
  if (again->kind != ReferenceKind::kNamed) Violation("String() parses as an id", s);
  if (!(again->ref == ref))
    Violation("String() round trip differs", s + " -> " + again->ref.String());

  const std::string n = ref.NormalizedString();
  Result<ParsedReference> norm = ParseImage(n);
  if (!norm.ok()) Violation("NormalizedString() does not parse", n + " -> " + norm.error());
  if (norm->kind != ReferenceKind::kNamed) Violation("NormalizedString() parses as an id", n);
  if (norm->ref.Name() != ref.Name() || norm->ref.digest != ref.digest) {
    Violation("NormalizedString() changes name or digest", n + " -> " + norm->ref.String());
  }
  return 0;
}
