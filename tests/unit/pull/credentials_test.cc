// The credentials file: format, strictness, secrecy of error messages, and the cache.
#include "pull/credentials.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;

constexpr char kGood[] = R"(credentials:
  corp:
    username: robot
    password: "s3cret:with:colons"
  gcr-mirror:
    auth: cm9ib3Q6czNjcmV0
  acr:
    identityToken: tok-123
  numeric:
    username: 1234
    password: 0777
)";

TEST(CredentialsParse, AllForms) {
  auto c = Credentials::Parse(kGood, "creds.yaml");
  ASSERT_TRUE(c.ok()) << c.error();
  EXPECT_EQ(c->get()->size(), 4u);
  const RegistryAuth* corp = c->get()->Find("corp");
  ASSERT_NE(corp, nullptr);
  EXPECT_EQ(corp->username, "robot");
  EXPECT_EQ(corp->password, "s3cret:with:colons");
  EXPECT_EQ(corp->auth, "");
  EXPECT_EQ(c->get()->Find("gcr-mirror")->auth, "cm9ib3Q6czNjcmV0");
  EXPECT_EQ(c->get()->Find("acr")->identity_token, "tok-123");
  // Scalars are taken as written: a password of digits keeps its leading zero.
  EXPECT_EQ(c->get()->Find("numeric")->password, "0777");
  EXPECT_EQ(c->get()->Find("nope"), nullptr);
}

TEST(CredentialsParse, EmptyMapIsFine) {
  for (const char* yaml : {"credentials: {}\n", "credentials:\n"}) {
    auto c = Credentials::Parse(yaml, "f");
    ASSERT_TRUE(c.ok()) << yaml << ": " << c.error();
    EXPECT_EQ(c->get()->size(), 0u);
  }
}

// Each case: the YAML, and a piece the error must contain (position and field).
struct BadCase {
  const char* yaml;
  const char* want;
};

class CredentialsBad : public testing::TestWithParam<BadCase> {};

TEST_P(CredentialsBad, Rejected) {
  auto c = Credentials::Parse(GetParam().yaml, "creds.yaml");
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().find(GetParam().want), std::string::npos) << c.error();
}

INSTANTIATE_TEST_SUITE_P(
    All, CredentialsBad,
    testing::Values(
        BadCase{"", "is empty"}, BadCase{"- a\n", "must be a map"},
        BadCase{"mirrors: {}\n", "creds.yaml:1:1: unknown key 'mirrors'"},
        BadCase{"credentials: [a]\n", "creds.yaml:1:14: credentials: must be a map"},
        BadCase{"credentials:\n  a:\n    username: u\n    pasword: p\n",
                "creds.yaml:4:5: credentials.a.pasword: unknown key"},
        BadCase{"credentials:\n  a:\n    username: u\n",
                "credentials.a: username without password"},
        BadCase{"credentials:\n  a:\n    password: p\n", "password without username"},
        BadCase{"credentials:\n  a:\n    username: u\n    password: p\n    auth: dTpw\n",
                "more than one"},
        BadCase{"credentials:\n  a: {}\n", "needs username and password"},
        BadCase{"credentials:\n  a:\n", "creds.yaml:2:3: credentials.a: must be a map"},
        BadCase{"credentials:\n  a:\n    auth: '%%%'\n", "credentials.a.auth: must be base64"},
        // base64 of "nocolon"
        BadCase{"credentials:\n  a:\n    auth: bm9jb2xvbg==\n", "must be base64 of"},
        // "u:p" (dTpw) unpadded, with a padding inside, in the URL alphabet: Go's StdEncoding
        // refuses each, and so do we.
        BadCase{"credentials:\n  a:\n    auth: dTpwdQ\n", "credentials.a.auth: must be base64"},
        BadCase{"credentials:\n  a:\n    auth: dT=wdQ==\n", "credentials.a.auth: must be base64"},
        BadCase{"credentials:\n  a:\n    auth: dTp-dQ==\n", "credentials.a.auth: must be base64"},
        BadCase{"credentials:\n  a:\n    username: [x]\n    password: p\n",
                "credentials.a.username: must be a non-empty string"},
        BadCase{"credentials:\n  a:\n    username: u\n    password: !!binary aGk=\n",
                "credentials.a.password: must be a non-empty string"},
        BadCase{"credentials:\n  a:\n    username: u\n    password: ''\n", "non-empty"},
        BadCase{"credentials:\n  a: {identityToken: t}\n  a: {identityToken: t}\n",
                "creds.yaml:3:3: credentials.a: duplicate name"},
        BadCase{"credentials:\n  a:\n    username: u\n    username: v\n    password: p\n",
                "duplicate key"},
        BadCase{"credentials: {}\ncredentials: {}\n", "duplicate key"},
        BadCase{"credentials: {a: [\n", "invalid YAML"}));

TEST(CredentialsParse, ErrorsNeverQuoteSecrets) {
  // Every kind of bad entry holding a recognisable secret.
  const char* yaml =
      "credentials:\n"
      "  a: {username: u, password: SECRET1, auth: SECRET2}\n"
      "  b: {auth: SECRET3}\n"
      "  c: {password: SECRET4}\n"
      "  d: {username: u, password: SECRET5, bogus: SECRET6}\n";
  auto c = Credentials::Parse(yaml, "f");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().find("SECRET"), std::string::npos) << c.error();
  // All errors are reported, one per line.
  EXPECT_GE(std::count(c.error().begin(), c.error().end(), '\n'), 3) << c.error();
}

class CredentialsFileTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        fs::temp_directory_path() / ("rp-creds-" + std::to_string(::getpid()) + "-" +
                                     testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / "credentials.yaml").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes through a new file and a rename, as a Secret volume or an editor does: a new inode.
  void Write(const std::string& text) {
    const std::string tmp = path_ + ".tmp";
    std::ofstream(tmp) << text;
    ::chmod(tmp.c_str(), 0600);
    fs::rename(tmp, path_);
  }

  fs::path dir_;
  std::string path_;
};

TEST_F(CredentialsFileTest, LoadFile) {
  Write(kGood);
  auto c = Credentials::LoadFile(path_);
  ASSERT_TRUE(c.ok()) << c.error();
  EXPECT_EQ(c->get()->size(), 4u);
}

TEST_F(CredentialsFileTest, ErrorsNameTheFile) {
  Write("credentials:\n  a:\n    bogus: x\n");
  auto c = Credentials::LoadFile(path_);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.error().find(path_ + ":3:5: credentials.a.bogus"), std::string::npos) << c.error();

  auto missing = Credentials::LoadFile((dir_ / "nope.yaml").string());
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().find("cannot open"), std::string::npos) << missing.error();

  auto dir = Credentials::LoadFile(dir_.string());
  ASSERT_FALSE(dir.ok());
  EXPECT_NE(dir.error().find("not a regular file"), std::string::npos) << dir.error();
}

TEST_F(CredentialsFileTest, WorldReadableLoadsWithAWarning) {
  Write(kGood);
  ::chmod(path_.c_str(), 0644);
  EXPECT_TRUE(Credentials::LoadFile(path_).ok());
}

TEST_F(CredentialsFileTest, CacheReloadsOnChangeAndKeepsTheLastGood) {
  CredentialsCache cache;
  auto missing = cache.Get(path_);
  EXPECT_FALSE(missing.ok());

  Write("credentials:\n  a: {username: u1, password: p1}\n");
  auto v1 = cache.Get(path_);
  ASSERT_TRUE(v1.ok()) << v1.error();
  EXPECT_EQ(v1->get()->Find("a")->username, "u1");
  // Unchanged file: the very same object (no re-read).
  auto again = cache.Get(path_);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->get(), v1->get());

  Write("credentials:\n  a: {username: u2, password: p2}\n");
  auto v2 = cache.Get(path_);
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v2->get()->Find("a")->username, "u2");

  // A bad version does not replace the good one; nor does a vanished file.
  Write("credentials:\n  a: {username: u3}\n");
  auto v3 = cache.Get(path_);
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ(v3->get()->Find("a")->username, "u2");
  fs::remove(path_);
  auto v4 = cache.Get(path_);
  ASSERT_TRUE(v4.ok());
  EXPECT_EQ(v4->get()->Find("a")->username, "u2");

  // Another path starts from scratch.
  auto other = cache.Get((dir_ / "other.yaml").string());
  EXPECT_FALSE(other.ok());
}

}  // namespace
}  // namespace registry_proxy
