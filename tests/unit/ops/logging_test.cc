#include "ops/logging.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>

#include <nlohmann/json.hpp>
#include <sstream>

namespace registry_proxy {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

std::string Escaped(std::string_view s) {
  std::string out;
  AppendJsonEscaped(s, &out);
  return out;
}

TEST(LoggingTest, JsonEscaping) {
  EXPECT_EQ(Escaped("plain"), "plain");
  EXPECT_EQ(Escaped("a\"b\\c"), "a\\\"b\\\\c");
  EXPECT_EQ(Escaped("l1\nl2\r\t\b\f"), "l1\\nl2\\r\\t\\b\\f");
  EXPECT_EQ(Escaped(std::string("\x01\x1f\x7f", 3)), "\\u0001\\u001f\\u007f");
  EXPECT_EQ(Escaped(std::string("nul\0x", 5)), "nul\\u0000x");
  EXPECT_EQ(Escaped("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x90\xb3"),
            "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x90\xb3")
      << "valid UTF-8 stays";
  EXPECT_EQ(Escaped("\xff"), "\\ufffd");
  EXPECT_EQ(Escaped("a\xc3"), "a\\ufffd") << "truncated sequence";
  EXPECT_EQ(Escaped("\xc0\xaf"), "\\ufffd\\ufffd") << "overlong";
  EXPECT_EQ(Escaped("\xed\xa0\x80"), "\\ufffd\\ufffd\\ufffd") << "surrogate";
}

class JsonLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    logger_ = std::make_shared<spdlog::logger>("json-test", sink);
    logger_->set_formatter(MakeJsonFormatter());
    logger_->set_level(spdlog::level::trace);
  }
  std::vector<json> Lines() {
    std::vector<json> v;
    std::istringstream in(out_.str());
    for (std::string line; std::getline(in, line);) {
      EXPECT_TRUE(json::accept(line)) << "not JSON: " << line;
      if (json::accept(line)) v.push_back(json::parse(line));
    }
    return v;
  }
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> logger_;
};

TEST_F(JsonLogTest, OneObjectPerLineWithFields) {
  logger_->info("pull {}: attempt 1/2 m.example/x (mirror) namespace={} rule={} auth=no 12ms: OK",
                "nginx", "default", "config.yaml:3");
  logger_->warn("second");
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 2u) << out_.str();
  const json& j = lines[0];
  EXPECT_EQ(j["level"], "info");
  EXPECT_EQ(j["msg"],
            "pull nginx: attempt 1/2 m.example/x (mirror) namespace=default rule=config.yaml:3 "
            "auth=no 12ms: OK");
  EXPECT_EQ(j["namespace"], "default");
  EXPECT_EQ(j["rule"], "config.yaml:3");
  EXPECT_EQ(j["auth"], "no");
  EXPECT_TRUE(j["thread"].is_number());
  EXPECT_THAT(j["time"].get<std::string>(),
              ::testing::MatchesRegex("[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
                                      "\\.[0-9]{3}Z"));
  EXPECT_EQ(lines[1]["level"], "warning");
}

TEST_F(JsonLogTest, HostileMessagesStayOneValidLine) {
  logger_->error("evil \"quoted\" \\ back\nnewline\x01 \xff level=fake msg=fake time=x k=\"v\"");
  auto lines = Lines();
  ASSERT_EQ(lines.size(), 1u) << out_.str();
  EXPECT_EQ(lines[0]["level"], "error") << "a message cannot override the level";
  EXPECT_THAT(lines[0]["msg"].get<std::string>(),
              HasSubstr("evil \"quoted\" \\ back\nnewline\x01"));
  EXPECT_THAT(lines[0]["msg"].get<std::string>(), HasSubstr("\xef\xbf\xbd")) << "U+FFFD";
  EXPECT_FALSE(lines[0].contains("k"));
}

TEST(LoggingTest, ParseLogFlags) {
  std::ostringstream err;
  auto args = ParseArgs({"--log-level", "debug", "--log-format", "json"},
                        {{"--log-level", ""}, {"--log-format", ""}}, err);
  ASSERT_TRUE(args);
  LogOptions o;
  EXPECT_EQ(ParseLogFlags(*args, &o), std::nullopt);
  EXPECT_EQ(o.level, spdlog::level::debug);
  EXPECT_EQ(o.format, LogFormat::kJson);

  args = ParseArgs({"--log-format", "xml"}, {{"--log-level", ""}, {"--log-format", ""}}, err);
  auto e = ParseLogFlags(*args, &o);
  ASSERT_TRUE(e);
  EXPECT_THAT(*e, HasSubstr("unknown format 'xml'"));
  args = ParseArgs({"--log-level", "loud"}, {{"--log-level", ""}, {"--log-format", ""}}, err);
  e = ParseLogFlags(*args, &o);
  ASSERT_TRUE(e);
  EXPECT_THAT(*e, HasSubstr("unknown level 'loud'"));
}

}  // namespace
}  // namespace registry_proxy
