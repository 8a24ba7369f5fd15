// Tests for the image-reference module. The expectations come from the test vectors of the
// upstream grammar (distribution/reference reference_test.go and normalize_test.go), plus
// this project's additions (ids, short ids, error messages, the fuzzer's regressions).
#include "rules/reference.h"

#include <gtest/gtest.h>

#include <chrono>
#include <ostream>
#include <string>
#include <vector>

namespace registry_proxy {
namespace {

const std::string kHex64 = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c";
const std::string kSha256 = "sha256:" + kHex64;
const std::string kSha256F = "sha256:" + std::string(64, 'f');
const std::string kSha384 = "sha384:" + std::string(96, 'a');
const std::string kSha512F = "sha512:" + std::string(128, 'f');
const std::string kBusyboxDigest =
    "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa";

std::string Upper(std::string s) {
  for (char& c : s) {
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  }
  return s;
}

std::string Repeat(const std::string& s, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out += s;
  return out;
}

// Makes failure output name the input instead of dumping bytes.
std::string Printable(const std::string& s) {
  if (s.size() <= 80) return "\"" + s + "\"";
  return "\"" + s.substr(0, 60) + "...\" (" + std::to_string(s.size()) + " bytes)";
}

// ---------------------------------------------------------------------------------------------
// Valid named references: input -> domain, path, tag, digest.

struct NamedCase {
  std::string input;
  std::string domain;
  std::string path;
  std::string tag;
  std::string digest;
};
void PrintTo(const NamedCase& c, std::ostream* os) { *os << Printable(c.input); }

std::vector<NamedCase> NamedCases() {
  return {
      // Docker Hub: short and long forms.
      {"nginx", "docker.io", "library/nginx", "", ""},
      {"nginx:1.25", "docker.io", "library/nginx", "1.25", ""},
      {"nginx:latest", "docker.io", "library/nginx", "latest", ""},
      {"library/nginx", "docker.io", "library/nginx", "", ""},
      {"docker.io/nginx", "docker.io", "library/nginx", "", ""},
      {"docker.io/library/nginx", "docker.io", "library/nginx", "", ""},
      {"index.docker.io/nginx", "docker.io", "library/nginx", "", ""},
      {"index.docker.io/library/nginx:1", "docker.io", "library/nginx", "1", ""},
      {"bitnami/redis", "docker.io", "bitnami/redis", "", ""},
      {"docker.io/bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", ""},
      {"index.docker.io/bitnami/redis", "docker.io", "bitnami/redis", "", ""},
      {"redis:latest", "docker.io", "library/redis", "latest", ""},
      {"dmcgowan/myapp:latest", "docker.io", "dmcgowan/myapp", "latest", ""},
      {"docker.io/mcgowan/myapp:latest", "docker.io", "mcgowan/myapp", "latest", ""},
      {"library/foo/bar", "docker.io", "library/foo/bar", "", ""},
      {"docker.io/library/foo/bar", "docker.io", "library/foo/bar", "", ""},
      {"store/foo/bar", "docker.io", "store/foo/bar", "", ""},
      {"other/library", "docker.io", "other/library", "", ""},
      {"ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base", "", ""},
      // Path-component separators.
      {"docker/docker", "docker.io", "docker/docker", "", ""},
      {"docker-rules/docker", "docker.io", "docker-rules/docker", "", ""},
      {"docker---rules/docker", "docker.io", "docker---rules/docker", "", ""},
      {"doc/docker", "docker.io", "doc/docker", "", ""},
      {"d/docker", "docker.io", "d/docker", "", ""},
      {"jess/t", "docker.io", "jess/t", "", ""},
      {"dock__er/docker", "docker.io", "dock__er/docker", "", ""},
      {"ns/a1-b2.c3_d4__e5", "docker.io", "ns/a1-b2.c3_d4__e5", "", ""},
      {"a1-b2_c3__d4/f", "docker.io", "a1-b2_c3__d4/f", "", ""},
      {"0", "docker.io", "library/0", "", ""},
      {"test_com", "docker.io", "library/test_com", "", ""},
      {"test_com/foo", "docker.io", "test_com/foo", "", ""},
      {"docker/migrator", "docker.io", "docker/migrator", "", ""},
      // A 64-character name that is not hex, and hex names that are too short to be ids.
      {"thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "docker.io",
       "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "", ""},
      {"docker.io/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "docker.io",
       "library/1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "", ""},
      {kHex64 + ":v1", "docker.io", "library/" + kHex64, "v1", ""},
      {"cafe", "docker.io", "library/cafe", "", ""},
      {"dbcc1", "docker.io", "library/dbcc1", "", ""},
      {"0123456789a", "docker.io", "library/0123456789a", "", ""},
      // Not valid ids (wrong case or length), so names on Docker Hub with a tag.
      {"sha256", "docker.io", "library/sha256", "", ""},
      {"sha256:abc", "docker.io", "library/sha256", "abc", ""},
      {"sha256:" + Upper(kHex64), "docker.io", "library/sha256", Upper(kHex64), ""},
      // A ':' before any '/' is a tag, not a port.
      {"test.com:tag", "docker.io", "library/test.com", "tag", ""},
      {"test.com:5000", "docker.io", "library/test.com", "5000", ""},
      {"foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080", ""},
      {"foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", "8080", ""},
      {"localhost", "docker.io", "library/localhost", "", ""},
      {"localhost:5000", "docker.io", "library/localhost", "5000", ""},
      // Other registries, with and without ports.
      {"test.com/repo:tag", "test.com", "repo", "tag", ""},
      {"test:5000/repo", "test:5000", "repo", "", ""},
      {"test:5000/repo:tag", "test:5000", "repo", "tag", ""},
      {"test:5000/repo@" + kSha256F, "test:5000", "repo", "", kSha256F},
      {"test:5000/repo:tag@" + kSha256F, "test:5000", "repo", "tag", kSha256F},
      {"test.com/foo", "test.com", "foo", "", ""},
      {"test.com:8080/foo", "test.com:8080", "foo", "", ""},
      {"test-com:8080/foo", "test-com:8080", "foo", "", ""},
      {"xn--n3h.com/foo", "xn--n3h.com", "foo", "", ""},
      {"xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "", ""},
      {"sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com", "bar/baz/quux", "", ""},
      {"sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux",
       "some-long-tag", ""},
      {"b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app",
       "test.example.com", ""},
      {"xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", "xn--n3h.com", ""},
      {"xn--7o8h.com/myimage:xn--7o8h.com@" + kSha512F, "xn--7o8h.com", "myimage", "xn--7o8h.com",
       kSha512F},
      {"registry.k8s.io/pause:3.9", "registry.k8s.io", "pause", "3.9", ""},
      {"quay.io/prometheus/node-exporter:v1.7.0", "quay.io", "prometheus/node-exporter", "v1.7.0",
       ""},
      {"ghcr.io/org/team/app@" + kSha256, "ghcr.io", "org/team/app", "", kSha256},
      {"gcr.io/library/busybox", "gcr.io", "library/busybox", "", ""},
      {"example.com/privatebase", "example.com", "privatebase", "", ""},
      {"example.com:8000/private/moonbase", "example.com:8000", "private/moonbase", "", ""},
      {"my-registry:5000/ns/repo", "my-registry:5000", "ns/repo", "", ""},
      // localhost is always a domain when followed by '/'.
      {"localhost/foo", "localhost", "foo", "", ""},
      {"localhost:5000/foo/bar:v1", "localhost:5000", "foo/bar", "v1", ""},
      {"localhost:99999/foo", "localhost:99999", "foo", "", ""},  // the grammar has no range
      // IPv4.
      {"192.168.1.1", "docker.io", "library/192.168.1.1", "", ""},
      {"192.168.1.1:tag", "docker.io", "library/192.168.1.1", "tag", ""},
      {"192.168.1.1:5000", "docker.io", "library/192.168.1.1", "5000", ""},
      {"192.168.1.1/repo", "192.168.1.1", "repo", "", ""},
      {"192.168.1.1:5000/repo", "192.168.1.1:5000", "repo", "", ""},
      {"192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", ""},
      {"127.0.0.1:5000/docker/docker", "127.0.0.1:5000", "docker/docker", "", ""},
      {"127.0.0.1:8000/privatebase", "127.0.0.1:8000", "privatebase", "", ""},
      // IPv6.
      {"[2001:db8::1]/repo", "[2001:db8::1]", "repo", "", ""},
      {"[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", "tag", ""},
      {"[2001:db8::1]:5000/repo", "[2001:db8::1]:5000", "repo", "", ""},
      {"[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000", "repo", "tag", ""},
      {"[2001:db8::1]:5000/repo@" + kSha256F, "[2001:db8::1]:5000", "repo", "", kSha256F},
      {"[2001:db8::1]:5000/repo:tag@" + kSha256F, "[2001:db8::1]:5000", "repo", "tag", kSha256F},
      {"[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "", ""},
      {"[::1]:5000/repo", "[::1]:5000", "repo", "", ""},
      {"[::1]/repo", "[::1]", "repo", "", ""},
      {"[ABCD::1]/repo", "[ABCD::1]", "repo", "", ""},
      // Uppercase in the first component makes it a domain (newer distribution).
      {"Foo/bar", "Foo", "bar", "", ""},
      {"FOO.example.com/bar:TAG", "FOO.example.com", "bar", "TAG", ""},
      {"Docker.io/nginx", "Docker.io", "nginx", "", ""},  // not Docker Hub: no normalisation
      // Tags.
      {"lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", ""},
      {"a:_tag", "docker.io", "library/a", "_tag", ""},
      {"a:0", "docker.io", "library/a", "0", ""},
      {"a:v1.2-rc.3_x", "docker.io", "library/a", "v1.2-rc.3_x", ""},
      {"a:" + std::string(kTagLengthMax, 'x'), "docker.io", "library/a",
       std::string(kTagLengthMax, 'x'), ""},
      // Digests and tag+digest.
      {"nginx@" + kSha256, "docker.io", "library/nginx", "", kSha256},
      {"nginx:1.25@" + kSha256, "docker.io", "library/nginx", "1.25", kSha256},
      {"busybox:latest@" + kBusyboxDigest, "docker.io", "library/busybox", "latest",
       kBusyboxDigest},
      {"redis@" + kSha256, "docker.io", "library/redis", "", kSha256},
      {"dmcgowan/myapp@" + kSha256, "docker.io", "dmcgowan/myapp", "", kSha256},
      {"nginx@" + kSha384, "docker.io", "library/nginx", "", kSha384},
      {"nginx@" + kSha512F, "docker.io", "library/nginx", "", kSha512F},
      // Length limits: the normalised path (domain excluded) may be 255 characters.
      {"example.com/" + std::string(255, 'a'), "example.com", std::string(255, 'a'), "", ""},
      {std::string(247, 'a'), "docker.io", "library/" + std::string(247, 'a'), "", ""},
      {Repeat("a/", 127) + "a:tag-puts-this-over-max", "docker.io", Repeat("a/", 127) + "a",
       "tag-puts-this-over-max", ""},
      {std::string(300, 'a') + ".com/x", std::string(300, 'a') + ".com", "x", "", ""},
  };
}

class NamedTest : public ::testing::TestWithParam<NamedCase> {};

TEST_P(NamedTest, ParsesAndNormalises) {
  const NamedCase& c = GetParam();
  Result<ParsedReference> r = ParseImage(c.input);
  ASSERT_TRUE(r.ok()) << r.error();
  ASSERT_EQ(r->kind, ReferenceKind::kNamed);
  EXPECT_EQ(r->ref.domain, c.domain);
  EXPECT_EQ(r->ref.path, c.path);
  EXPECT_EQ(r->ref.tag, c.tag);
  EXPECT_EQ(r->ref.digest, c.digest);
  EXPECT_TRUE(r->id.empty());

  Result<Reference> n = ParseNamedReference(c.input);
  ASSERT_TRUE(n.ok()) << n.error();
  EXPECT_EQ(*n, r->ref);
}

TEST_P(NamedTest, StringRoundTrips) {
  Result<Reference> r = ParseNamedReference(GetParam().input);
  ASSERT_TRUE(r.ok()) << r.error();
  const std::string s = r->String();
  Result<Reference> again = ParseNamedReference(s);
  ASSERT_TRUE(again.ok()) << s << ": " << again.error();
  EXPECT_EQ(*again, *r) << s;
  EXPECT_EQ(again->String(), s);
}

TEST_P(NamedTest, NormalizedStringParsesToSameNameAndDigest) {
  Result<Reference> r = ParseNamedReference(GetParam().input);
  ASSERT_TRUE(r.ok()) << r.error();
  const std::string s = r->NormalizedString();
  Result<Reference> again = ParseNamedReference(s);
  ASSERT_TRUE(again.ok()) << s << ": " << again.error();
  EXPECT_EQ(again->Name(), r->Name());
  EXPECT_EQ(again->digest, r->digest);
  // Exactly one of tag and digest survives.
  EXPECT_NE(again->tag.empty(), again->digest.empty()) << s;
  EXPECT_EQ(again->NormalizedString(), s);
}

TEST_P(NamedTest, FamiliarNameParsesToSameName) {
  Result<Reference> r = ParseNamedReference(GetParam().input);
  ASSERT_TRUE(r.ok()) << r.error();
  const std::string familiar = r->FamiliarName();
  if (familiar.size() == 64 &&
      familiar.find_first_not_of("0123456789abcdef") == std::string::npos) {
    // Upstream's ambiguity: docker.io/library/<64 hex> shortens to something read as an id.
    GTEST_SKIP() << "familiar form is a 64-hex id";
  }
  Result<Reference> again = ParseNamedReference(familiar);
  ASSERT_TRUE(again.ok()) << familiar << ": " << again.error();
  EXPECT_EQ(again->Name(), r->Name());
}

TEST_P(NamedTest, PartsAreValidOnTheirOwn) {
  Result<Reference> r = ParseNamedReference(GetParam().input);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_TRUE(ValidateDomain(r->domain).ok()) << ValidateDomain(r->domain).message();
  EXPECT_TRUE(ValidatePath(r->path).ok()) << ValidatePath(r->path).message();
}

INSTANTIATE_TEST_SUITE_P(Upstream, NamedTest, ::testing::ValuesIn(NamedCases()));

// ---------------------------------------------------------------------------------------------
// Invalid references: input -> a substring the error must contain.

struct ErrorCase {
  std::string input;
  std::string error;
};
void PrintTo(const ErrorCase& c, std::ostream* os) { *os << Printable(c.input); }

std::vector<ErrorCase> ErrorCases() {
  return {
      {"", "repository name must have at least one component"},
      {":justtag", "invalid reference"},
      {"@" + kSha256F, "invalid reference"},
      {":", "invalid reference"},
      {"@", "invalid reference"},
      // Digests.
      {"repo@sha256:" + std::string(34, 'f'), "invalid digest length"},
      {"nginx@sha256:" + kHex64.substr(1), "sha256 needs 64 hex digits, got 63"},
      {"nginx@sha256:" + kHex64 + "0", "invalid digest length"},
      {"nginx@sha512:" + kHex64, "sha512 needs 128 hex digits, got 64"},
      {"validname@invaliddigest:" + std::string(64, 'f'), "unsupported digest algorithm"},
      {"nginx@md5:" + std::string(32, 'a'), "unsupported digest algorithm 'md5'"},
      {"nginx@SHA256:" + kHex64, "unsupported digest algorithm"},
      {"nginx@sha256+b64:" + kHex64, "unsupported digest algorithm"},
      {"nginx@sha256:" + Upper(kHex64), "hex digits must be lowercase"},
      {"nginx@sha256:xyz", "invalid digest"},
      {"nginx@sha256:" + std::string(63, 'a') + "g", "invalid digest"},
      {"nginx@sha256", "invalid digest"},
      {"nginx@", "invalid digest"},
      {"nginx@:" + kHex64, "invalid digest"},
      {"nginx@sha256:", "invalid digest"},
      {"nginx@sha256-:" + kHex64, "invalid digest"},
      {"nginx@1sha:" + kHex64, "invalid digest"},
      {"nginx@" + kSha256 + "@" + kSha256, "invalid digest"},
      {"nginx@" + kSha256 + ":extra", "invalid digest"},
      {"nginx@" + kSha256 + "/x", "invalid digest"},
      // Uppercase in the path.
      {"Uppercase:tag", "repository name must be lowercase"},
      {"test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"},
      {"docker/Docker", "repository name must be lowercase"},
      {"docker.io/docker/Docker", "repository name must be lowercase"},
      {"0123456789AB", "repository name must be lowercase"},
      {"sha256:" + Upper(kHex64).substr(0, 10) + "/x", "invalid domain"},
      // Path grammar.
      {"aa/asdf$$^/aa", "invalid repository name"},
      {"-docker", "invalid repository name"},
      {"-docker/docker", "invalid repository name"},
      {"docker-/docker", "invalid repository name"},
      {"-docker-/docker", "invalid repository name"},
      {"docker///docker", "empty path component"},
      {"docker.io/docker///docker", "empty path component"},
      {"docker/", "empty path component"},
      {"/docker", "empty path component"},
      {"____/____", "invalid repository name"},
      {"_docker/_docker", "invalid repository name"},
      {"dock..er/docker", "invalid domain"},
      {"dock_.er/docker", "invalid domain"},
      {"dock-.er/docker", "invalid domain"},
      {"dock___er/docker", "invalid repository name"},
      {"docker.", "invalid repository name"},
      {"nginx latest", "invalid repository name"},
      {"nginx\n", "invalid repository name"},
      {std::string("ngi\0nx", 6), "invalid repository name"},
      {"\xc3\xbcnicode", "invalid repository name"},
      {"nginx:tag:tag", "invalid repository name"},
      {"example.com/", "empty repository path"},
      // Domains.
      {"https://github.com/docker/docker", "invalid domain 'https:'"},
      {"-docker.io/docker/docker", "invalid domain"},
      // Upstream reads these as a domain-less path ("a_b.com/x"); a Reference needs a domain.
      {"foo_bar.com/baz", "invalid domain 'foo_bar.com'"},
      {"a1-b2.c3_d4__e5/f", "invalid domain"},
      {"foo:bar/baz", "must be decimal digits"},
      {"localhost:/foo", "must be decimal digits"},
      {"a..b.com/foo", "invalid domain"},
      {"a-.com/foo", "invalid domain"},
      {".a.com/foo", "invalid domain"},
      {":5000/foo", "invalid domain"},
      {"[]:5000/foo", "empty IPv6 address"},
      {"[::1/foo", "without a closing ']'"},
      {"[::1]x:5000/foo", "only ':<port>' may follow ']'"},
      {"[::1]:/foo", "must be decimal digits"},
      {"[fe80::1%eth0]:5000/repo", "invalid domain"},
      {"[fe80::1%@invalidzone]:5000/repo", "invalid"},
      {"[2001:db8::1]", "invalid repository name"},
      {"[2001:db8::1]:5000", "invalid repository name"},
      {"[2001:db8::1]:tag", "invalid repository name"},
      {"Foo_bar/baz", "invalid domain 'Foo_bar'"},
      // Tags.
      {"nginx:", "invalid tag ''"},
      {"nginx:-tag", "invalid tag '-tag'"},
      {"nginx:.tag", "invalid tag"},
      {"nginx:a b", "invalid tag 'a b' in 'nginx:a b'"},
      {"nginx:" + std::string(kTagLengthMax + 1, 'x'), "at most 128"},
      // Length: the normalised path, domain excluded, is at most 255 characters.
      {Repeat("a/", 128) + "a:tag", "repository name must not be more than 255 characters"},
      {"example.com/" + std::string(256, 'a'), "must not be more than 255 characters"},
      {std::string(248, 'a'), "path 'library/aaaa"},
      {"docker.io/" + std::string(248, 'a'), "has 256"},
      {"index.docker.io/" + std::string(248, 'a'), "has 256"},
      {"this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
       "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
       "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_"
       "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255/docker",
       "must not be more than 255 characters"},
  };
}

class ErrorTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(ErrorTest, IsRejectedWithAHelpfulMessage) {
  const ErrorCase& c = GetParam();
  Result<ParsedReference> r = ParseImage(c.input);
  ASSERT_FALSE(r.ok()) << "parsed as " << r->ref.String();
  EXPECT_NE(r.error().find(c.error), std::string::npos)
      << "error: " << r.error() << "\nwant substring: " << c.error;
  EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();

  Result<Reference> n = ParseNamedReference(c.input);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.error(), r.error());
}

INSTANTIATE_TEST_SUITE_P(Upstream, ErrorTest, ::testing::ValuesIn(ErrorCases()));

// ---------------------------------------------------------------------------------------------
// Image ids.

class IdTest : public ::testing::TestWithParam<std::string> {};

TEST_P(IdTest, IsAnIdNotAName) {
  Result<ParsedReference> r = ParseImage(GetParam());
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->kind, ReferenceKind::kId);
  EXPECT_EQ(r->id, GetParam());
  EXPECT_TRUE(r->ref.domain.empty());
  EXPECT_FALSE(ParseNamedReference(GetParam()).ok());
}

INSTANTIATE_TEST_SUITE_P(Ids, IdTest,
                         ::testing::Values(kHex64, kSha256, kSha256F, kSha384, kSha512F));

// Short ids are ids only to ParseImage; as names they are valid Docker Hub repositories.
class ShortIdTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ShortIdTest, IsAnIdToParseImageOnly) {
  Result<ParsedReference> r = ParseImage(GetParam());
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->kind, ReferenceKind::kId);
  EXPECT_EQ(r->id, GetParam());
  Result<Reference> n = ParseNamedReference(GetParam());
  ASSERT_TRUE(n.ok()) << n.error();
  EXPECT_EQ(n->Name(), "docker.io/library/" + GetParam());
}

INSTANTIATE_TEST_SUITE_P(Ids, ShortIdTest,
                         ::testing::Values(kHex64.substr(0, kShortIdMinLength),  // shortest
                                           kHex64.substr(0, 63),                 // longest
                                           "0123456789ab", "000000000000"));

TEST(IdTest, ShortHexStringsBelowTheMinimumAreNames) {
  for (size_t n = 1; n < kShortIdMinLength; ++n) {
    const std::string s = kHex64.substr(0, n);
    Result<ParsedReference> r = ParseImage(s);
    ASSERT_TRUE(r.ok()) << s << ": " << r.error();
    EXPECT_EQ(r->kind, ReferenceKind::kNamed) << s;
    EXPECT_EQ(r->ref.Name(), "docker.io/library/" + s);
  }
}

TEST(IdTest, ParseNamedReferenceRejectsFullHexWithUpstreamMessage) {
  Result<Reference> r = ParseNamedReference(kHex64);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("cannot specify 64-byte hexadecimal strings"), std::string::npos)
      << r.error();
  EXPECT_NE(r.error().find(kHex64), std::string::npos) << r.error();
}

TEST(IdTest, ParseNamedReferenceRejectsDigests) {
  Result<Reference> r = ParseNamedReference(kSha256);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("image id"), std::string::npos) << r.error();
}

TEST(IdTest, IsImageIdDigest) {
  EXPECT_TRUE(IsImageIdDigest(kSha256));
  EXPECT_TRUE(IsImageIdDigest(kSha256F));
  EXPECT_FALSE(IsImageIdDigest(kHex64));
  EXPECT_FALSE(IsImageIdDigest("sha256:" + Upper(kHex64)));
  EXPECT_FALSE(IsImageIdDigest("sha256:" + kHex64.substr(1)));
  EXPECT_FALSE(IsImageIdDigest(kSha256 + "0"));
  EXPECT_FALSE(IsImageIdDigest(kSha512F));
  EXPECT_FALSE(IsImageIdDigest("sha256:" + std::string(63, 'a') + "g"));
  EXPECT_FALSE(IsImageIdDigest(""));
}

// ---------------------------------------------------------------------------------------------
// Output forms.

struct FormCase {
  std::string input;
  std::string string;      // String()
  std::string normalized;  // NormalizedString()
  std::string familiar;    // FamiliarName()
};
void PrintTo(const FormCase& c, std::ostream* os) { *os << Printable(c.input); }

class FormTest : public ::testing::TestWithParam<FormCase> {};

TEST_P(FormTest, Renders) {
  const FormCase& c = GetParam();
  Result<Reference> r = ParseNamedReference(c.input);
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->String(), c.string);
  EXPECT_EQ(r->NormalizedString(), c.normalized);
  EXPECT_EQ(r->FamiliarName(), c.familiar);
}

INSTANTIATE_TEST_SUITE_P(
    Forms, FormTest,
    ::testing::Values(
        FormCase{"nginx", "docker.io/library/nginx", "docker.io/library/nginx:latest", "nginx"},
        FormCase{"nginx:1.25", "docker.io/library/nginx:1.25", "docker.io/library/nginx:1.25",
                 "nginx"},
        FormCase{"nginx@" + kSha256, "docker.io/library/nginx@" + kSha256,
                 "docker.io/library/nginx@" + kSha256, "nginx"},
        FormCase{"nginx:1.25@" + kSha256, "docker.io/library/nginx:1.25@" + kSha256,
                 "docker.io/library/nginx@" + kSha256, "nginx"},
        FormCase{"docker.io/library/nginx", "docker.io/library/nginx",
                 "docker.io/library/nginx:latest", "nginx"},
        FormCase{"docker.io/bitnami/redis", "docker.io/bitnami/redis",
                 "docker.io/bitnami/redis:latest", "bitnami/redis"},
        FormCase{"index.docker.io/fooo/bar:v", "docker.io/fooo/bar:v", "docker.io/fooo/bar:v",
                 "fooo/bar"},
        FormCase{"docker.io/foo", "docker.io/library/foo", "docker.io/library/foo:latest", "foo"},
        FormCase{"library/foo/bar", "docker.io/library/foo/bar", "docker.io/library/foo/bar:latest",
                 "library/foo/bar"},
        FormCase{"other/library", "docker.io/other/library", "docker.io/other/library:latest",
                 "other/library"},
        FormCase{"ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base",
                 "docker.io/library/ubuntu-12.04-base:latest", "ubuntu-12.04-base"},
        FormCase{"gcr.io/library/busybox", "gcr.io/library/busybox",
                 "gcr.io/library/busybox:latest", "gcr.io/library/busybox"},
        FormCase{"gcr.io/library/busybox:latest@" + kBusyboxDigest,
                 "gcr.io/library/busybox:latest@" + kBusyboxDigest,
                 "gcr.io/library/busybox@" + kBusyboxDigest, "gcr.io/library/busybox"},
        FormCase{"quay.io/x/y", "quay.io/x/y", "quay.io/x/y:latest", "quay.io/x/y"},
        FormCase{"127.0.0.1:8000/private/moonbase", "127.0.0.1:8000/private/moonbase",
                 "127.0.0.1:8000/private/moonbase:latest", "127.0.0.1:8000/private/moonbase"},
        FormCase{"localhost:5000/foo", "localhost:5000/foo", "localhost:5000/foo:latest",
                 "localhost:5000/foo"},
        FormCase{"[::1]:5000/foo:v1@" + kSha256, "[::1]:5000/foo:v1@" + kSha256,
                 "[::1]:5000/foo@" + kSha256, "[::1]:5000/foo"},
        FormCase{"Docker.io/nginx", "Docker.io/nginx", "Docker.io/nginx:latest",
                 "Docker.io/nginx"}));

// Every spelling of one repository normalises to the same Reference.
TEST(NormalisationTest, EquivalentSpellingsAreEqual) {
  const std::vector<std::vector<std::string>> groups = {
      {"nginx", "library/nginx", "docker.io/nginx", "docker.io/library/nginx",
       "index.docker.io/nginx", "index.docker.io/library/nginx"},
      {"nginx:1.25", "docker.io/nginx:1.25", "docker.io/library/nginx:1.25",
       "index.docker.io/library/nginx:1.25"},
      {"fooo/bar", "docker.io/fooo/bar", "index.docker.io/fooo/bar"},
      {"ubuntu-12.04-base", "library/ubuntu-12.04-base", "docker.io/library/ubuntu-12.04-base",
       "index.docker.io/library/ubuntu-12.04-base"},
      {"redis@" + kSha256, "docker.io/library/redis@" + kSha256},
  };
  for (const auto& group : groups) {
    Result<Reference> first = ParseNamedReference(group[0]);
    ASSERT_TRUE(first.ok()) << first.error();
    for (const std::string& s : group) {
      Result<Reference> r = ParseNamedReference(s);
      ASSERT_TRUE(r.ok()) << s << ": " << r.error();
      EXPECT_EQ(*r, *first) << s << " vs " << group[0];
    }
  }
}

TEST(NormalisationTest, ExactErrorMessages) {
  EXPECT_EQ(ParseImage("Nginx").error(), "repository name must be lowercase: 'Nginx'");
  EXPECT_EQ(ParseImage("nginx:a b").error(),
            "invalid tag 'a b' in 'nginx:a b': tags are letters, digits, '_', '.', '-' (at most "
            "128, not starting with '.' or '-')");
  EXPECT_EQ(ParseImage("quay.io/Foo/bar:1").error(),
            "repository name must be lowercase: 'Foo/bar' in 'quay.io/Foo/bar:1'");
  EXPECT_EQ(ParseImage("nginx@md5:" + std::string(32, 'a')).error(),
            "unsupported digest algorithm 'md5' in 'nginx@md5:" + std::string(32, 'a') +
                "': only sha256, sha384 and sha512 are supported");
  EXPECT_EQ(ParseImage("foo_bar.com/baz").error(),
            "invalid domain 'foo_bar.com' in 'foo_bar.com/baz': 'foo_bar': host name components "
            "are letters, digits and '-', starting and ending with a letter or digit");
}

// Upstream's FamiliarName only strips "docker.io/"; a Docker Hub path whose first component
// looks like a host shortens to a string that reads back as another registry. Kept as upstream.
TEST(NormalisationTest, FamiliarNameIsNotAlwaysUnambiguous) {
  Result<Reference> r = ParseNamedReference("docker.io/foo.com/bar");
  ASSERT_TRUE(r.ok()) << r.error();
  EXPECT_EQ(r->domain, "docker.io");
  EXPECT_EQ(r->path, "foo.com/bar");
  EXPECT_EQ(r->FamiliarName(), "foo.com/bar");
  EXPECT_EQ(ParseNamedReference(r->FamiliarName())->domain, "foo.com");
}

// ---------------------------------------------------------------------------------------------
// ValidateDomain / ValidatePath, as the config loader uses them for mirrors.

class ValidDomainTest : public ::testing::TestWithParam<std::string> {};
TEST_P(ValidDomainTest, Accepts) {
  EXPECT_TRUE(ValidateDomain(GetParam()).ok()) << ValidateDomain(GetParam()).message();
}
INSTANTIATE_TEST_SUITE_P(Domains, ValidDomainTest,
                         ::testing::Values("docker.io", "harbor.corp:8443", "[::1]:5000", "[::1]",
                                           "localhost", "localhost:5000", "127.0.0.1",
                                           "127.0.0.1:5000", "Foo", "REGISTRY.Example.COM",
                                           "xn--n3h.com:18080", "a", "a-b", "a--b.c",
                                           "[2001:db8::1]:443", "[ABCDEF::1]", "0.0.0.0:0"));

struct BadDomainCase {
  std::string domain;
  std::string error;
};
void PrintTo(const BadDomainCase& c, std::ostream* os) { *os << Printable(c.domain); }
class InvalidDomainTest : public ::testing::TestWithParam<BadDomainCase> {};
TEST_P(InvalidDomainTest, Rejects) {
  Status s = ValidateDomain(GetParam().domain);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find(GetParam().error), std::string::npos) << s.message();
}
INSTANTIATE_TEST_SUITE_P(
    Domains, InvalidDomainTest,
    ::testing::Values(BadDomainCase{"", "empty domain"}, BadDomainCase{"-a.com", "'-a'"},
                      BadDomainCase{"a-.com", "'a-'"}, BadDomainCase{"a..b", "invalid domain"},
                      BadDomainCase{".a", "invalid domain"}, BadDomainCase{"a.", "invalid domain"},
                      BadDomainCase{"a:b", "must be decimal digits"},
                      BadDomainCase{"a:", "must be decimal digits"},
                      BadDomainCase{"a:5000:1", "must be decimal digits"},
                      BadDomainCase{"a.com:-1", "must be decimal digits"},
                      BadDomainCase{":5000", "empty host name"}, BadDomainCase{"a_b.com", "'a_b'"},
                      BadDomainCase{"[::1", "closing ']'"}, BadDomainCase{"[]", "empty IPv6"},
                      BadDomainCase{"[::1]x", "may follow"},
                      BadDomainCase{"[::1]:", "must be decimal digits"},
                      BadDomainCase{"[fe80::1%eth0]", "no zone"}, BadDomainCase{"[g::1]", "IPv6"},
                      BadDomainCase{"a/b", "invalid domain 'a/b'"},
                      BadDomainCase{"a b", "invalid domain"},
                      BadDomainCase{"https://harbor", "invalid domain"}));

class ValidPathTest : public ::testing::TestWithParam<std::string> {};
TEST_P(ValidPathTest, Accepts) {
  EXPECT_TRUE(ValidatePath(GetParam()).ok()) << ValidatePath(GetParam()).message();
}
INSTANTIATE_TEST_SUITE_P(Paths, ValidPathTest,
                         ::testing::Values("library/nginx", "proxy/dockerhub", "a", "a/b/c", "a.b",
                                           "a_b", "a__b", "a---b", "0", "a1-b2.c3_d4__e5",
                                           std::string(255, 'a')));

struct BadPathCase {
  std::string path;
  std::string error;
};
void PrintTo(const BadPathCase& c, std::ostream* os) { *os << Printable(c.path); }
class InvalidPathTest : public ::testing::TestWithParam<BadPathCase> {};
TEST_P(InvalidPathTest, Rejects) {
  Status s = ValidatePath(GetParam().path);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find(GetParam().error), std::string::npos) << s.message();
}
INSTANTIATE_TEST_SUITE_P(
    Paths, InvalidPathTest,
    ::testing::Values(
        BadPathCase{"", "empty repository path"}, BadPathCase{"/a", "empty path component"},
        BadPathCase{"a/", "empty path component"}, BadPathCase{"a//b", "empty path component"},
        BadPathCase{"A", "must be lowercase"},
        BadPathCase{"proxy/DockerHub", "must be lowercase: 'proxy/DockerHub'"},
        BadPathCase{"a___b", "'a___b'"}, BadPathCase{"a..b", "invalid repository"},
        BadPathCase{"a._b", "invalid repository"}, BadPathCase{".a", "invalid repository"},
        BadPathCase{"a.", "invalid repository"}, BadPathCase{"-a", "invalid repository"},
        BadPathCase{"a-", "invalid repository"}, BadPathCase{"_a", "invalid repository"},
        BadPathCase{"a_", "invalid repository"}, BadPathCase{"a b", "invalid repository"},
        BadPathCase{"a:b", "invalid repository"}, BadPathCase{"a@b", "invalid repository"},
        BadPathCase{std::string(256, 'a'), "not be more than 255"}));

// ---------------------------------------------------------------------------------------------
// Hostile input: bounded time, bounded one-line messages, no crash.

TEST(RobustnessTest, HugeAndBinaryInputs) {
  const std::vector<std::string> inputs = {
      std::string(1 << 20, 'a'),
      Repeat("a/", 1 << 19),
      std::string(1 << 20, ':'),
      std::string(1 << 20, '@'),
      std::string(1 << 20, '/'),
      std::string(1 << 20, '\0'),
      std::string(1 << 20, '.') + "/x",
      "[" + std::string(1 << 20, ':') + "]x/x",
      "nginx:" + std::string(1 << 20, 'x'),
      "nginx@sha256:" + std::string(1 << 20, 'a'),
      "nginx@" + std::string(1 << 20, 'a') + ":" + kHex64,
      std::string(1 << 20, '-') + "a",
      "a" + Repeat("-", 1 << 20) + "a",
      Repeat("a_", 1 << 19),
      std::string("\xff\xfe\x00\x01\n\r\t'\\", 9),
  };
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& in : inputs) {
    Result<ParsedReference> r = ParseImage(in);
    ASSERT_FALSE(r.ok()) << Printable(in);
    EXPECT_LT(r.error().size(), 800u) << r.error();
    EXPECT_EQ(r.error().find('\n'), std::string::npos) << r.error();
    EXPECT_EQ(r.error().find('\0'), std::string::npos) << r.error();
  }
  // A guard against super-linear parsing (backtracking on 1 MiB inputs would take hours), not a
  // speed test: linear work takes well under a second, but under TSan on a loaded 2-core machine
  // it has taken 2 s, so the bound is generous.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30));
}

TEST(RobustnessTest, HugeDomainIsAcceptedByTheGrammar) {
  // The grammar puts no limit on the domain; only the path is capped.
  for (const std::string& domain :
       {std::string(1 << 16, 'a') + ".com", "[" + std::string(1 << 16, ':') + "]:5000"}) {
    Result<Reference> r = ParseNamedReference(domain + "/x");
    ASSERT_TRUE(r.ok()) << r.error();
    EXPECT_EQ(r->domain, domain);
  }
}

TEST(RobustnessTest, ErrorQuotesEscapeControlBytes) {
  Result<ParsedReference> r = ParseImage(std::string("a\nb\0c'", 6));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().find("'a\\x0ab\\x00c\\''"), std::string::npos) << r.error();
}

}  // namespace
}  // namespace registry_proxy
