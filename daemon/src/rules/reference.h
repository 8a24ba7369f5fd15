// Container image references, parsed and normalised as the docker/distribution
// reference grammar does (the grammar containerd's CRI uses on every name it sees).
//
// Pure: no I/O, no globals, no exceptions.
//
//   nginx                      -> docker.io/library/nginx:latest
//   index.docker.io/foo/bar    -> docker.io/foo/bar:latest
//   localhost:5000/x@sha256:.. -> localhost:5000/x@sha256:..
//   nginx:1.25@sha256:...      -> docker.io/library/nginx:1.25@sha256:... (digest kept)
//   sha256:<64 hex>, <64 hex>  -> an image id, never a name
#pragma once

#include <string>
#include <string_view>

#include "base/status.h"

namespace registry_proxy {

inline constexpr std::string_view kDefaultDomain = "docker.io";
inline constexpr std::string_view kLegacyDefaultDomain = "index.docker.io";
inline constexpr std::string_view kOfficialRepoPrefix = "library/";
inline constexpr std::string_view kDefaultTag = "latest";
// docker/distribution: a name (domain/path) is at most 255 characters.
inline constexpr size_t kNameTotalLengthMax = 255;
// A tag is at most 128 characters.
inline constexpr size_t kTagLengthMax = 128;
// Short image ids (hex prefixes of an id, as `crictl images` prints them) are at least this
// long; shorter all-hex strings are treated as names.
inline constexpr size_t kShortIdMinLength = 12;

// A named reference after normalisation. domain and path are never empty.
struct Reference {
  std::string domain;  // "docker.io", "registry.k8s.io", "localhost:5000", "[::1]:5000"
  std::string path;    // "library/nginx", "bitnami/redis"
  std::string tag;     // "" when the input had none (see NormalizedString)
  std::string digest;  // "" or "<algorithm>:<hex>", e.g. "sha256:..."

  // "docker.io/library/nginx"
  std::string Name() const;
  // Everything the input said, normalised: name[:tag][@digest]. Parsing this string again
  // yields an equal Reference.
  std::string String() const;
  // The form containerd records and resolves (ParseDockerRef): name@digest when there is a
  // digest (a tag next to it is dropped), else name:tag with "latest" as the default tag.
  std::string NormalizedString() const;
  // The name as `docker` prints it: "nginx", "bitnami/redis", "quay.io/x/y".
  std::string FamiliarName() const;

  bool operator==(const Reference& o) const {
    return domain == o.domain && path == o.path && tag == o.tag && digest == o.digest;
  }
};

// What a string handed to the CRI names.
enum class ReferenceKind {
  kNamed,  // a repository name, possibly with tag and/or digest
  kId,     // an image id: "sha256:<64 hex>", a bare 64-hex string, or a short hex id prefix
};

struct ParsedReference {
  ReferenceKind kind = ReferenceKind::kNamed;
  Reference ref;   // set when kind == kNamed
  std::string id;  // set when kind == kId: the input as given
};

// Parses any string the CRI may carry as an image: a reference or an id.
// Errors say what is wrong, e.g. "repository name must be lowercase: 'Nginx'".
Result<ParsedReference> ParseImage(std::string_view input);

// Parses a named reference only (ids are errors). Same normalisation as ParseImage.
Result<Reference> ParseNamedReference(std::string_view input);

// True for "sha256:<64 lowercase hex>".
bool IsImageIdDigest(std::string_view s);

// Validates a registry host as the grammar allows it: domain-name | IPv4 | [IPv6], with an
// optional :port. Returns an error describing the first problem.
Status ValidateDomain(std::string_view domain);

// Validates a repository path ("library/nginx"): lowercase components joined by '/',
// each alnum runs separated by '.', '_', '__' or '-'+.
Status ValidatePath(std::string_view path);

}  // namespace registry_proxy
