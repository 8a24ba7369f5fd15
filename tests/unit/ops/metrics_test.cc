#include "ops/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <thread>
#include <vector>

namespace registry_proxy::metrics {
namespace {

using ::testing::HasSubstr;

TEST(MetricsTest, ExpositionTextByteForByte) {
  Registry r;
  auto& calls = r.AddCounter("rp_calls_total", "Calls served.", {"method", "code"});
  calls.With({"b", "OK"}).Inc();
  calls.With({"a", "OK"}).Inc(2);
  calls.With({"a", "UNAVAILABLE"}).Inc();
  auto& g = r.AddGauge("rp_in_flight", "Now.");
  g.Get().Set(3);
  auto& h = r.AddHistogram("rp_seconds", "Durations.", {"op"}, {0.1, 0.5, 2});
  h.With({"pull"}).Observe(0.05);
  h.With({"pull"}).Observe(0.1);  // le is inclusive
  h.With({"pull"}).Observe(1);
  h.With({"pull"}).Observe(10);
  r.AddCounter("rp_empty_total", "No child yet.", {"x"});

  EXPECT_EQ(r.Render(),
            "# HELP rp_calls_total Calls served.\n"
            "# TYPE rp_calls_total counter\n"
            "rp_calls_total{method=\"a\",code=\"OK\"} 2\n"
            "rp_calls_total{method=\"a\",code=\"UNAVAILABLE\"} 1\n"
            "rp_calls_total{method=\"b\",code=\"OK\"} 1\n"
            "# HELP rp_empty_total No child yet.\n"
            "# TYPE rp_empty_total counter\n"
            "# HELP rp_in_flight Now.\n"
            "# TYPE rp_in_flight gauge\n"
            "rp_in_flight 3\n"
            "# HELP rp_seconds Durations.\n"
            "# TYPE rp_seconds histogram\n"
            "rp_seconds_bucket{op=\"pull\",le=\"0.1\"} 2\n"
            "rp_seconds_bucket{op=\"pull\",le=\"0.5\"} 2\n"
            "rp_seconds_bucket{op=\"pull\",le=\"2\"} 3\n"
            "rp_seconds_bucket{op=\"pull\",le=\"+Inf\"} 4\n"
            "rp_seconds_sum{op=\"pull\"} 11.15\n"
            "rp_seconds_count{op=\"pull\"} 4\n");
}

TEST(MetricsTest, LabelValuesAndHelpAreEscaped) {
  Registry r;
  r.AddCounter("rp_x_total", "Help with \\ and\nnewline \"quoted\".", {"v"})
      .With({"a\\b\"c\nd"})
      .Inc();
  EXPECT_EQ(r.Render(),
            "# HELP rp_x_total Help with \\\\ and\\nnewline \"quoted\".\n"
            "# TYPE rp_x_total counter\n"
            "rp_x_total{v=\"a\\\\b\\\"c\\nd\"} 1\n");
}

TEST(MetricsTest, UnlabelledHistogramHasOnlyLe) {
  Registry r;
  r.AddHistogram("rp_h", "H.", {}, {1}).Get().Observe(0.5);
  EXPECT_EQ(r.Render(),
            "# HELP rp_h H.\n# TYPE rp_h histogram\n"
            "rp_h_bucket{le=\"1\"} 1\nrp_h_bucket{le=\"+Inf\"} 1\n"
            "rp_h_sum 0.5\nrp_h_count 1\n");
}

TEST(MetricsTest, NumbersAreShortestExact) {
  EXPECT_EQ(FormatValue(0), "0");
  EXPECT_EQ(FormatValue(42), "42");
  EXPECT_EQ(FormatValue(0.1), "0.1");
  EXPECT_EQ(FormatValue(1.5e-7), "1.5e-07");
  EXPECT_EQ(FormatValue(1234567890123), "1234567890123");
  EXPECT_EQ(FormatValue(0.0005), "0.0005");
  EXPECT_EQ(FormatValue(0.00005), "5e-05");
  EXPECT_EQ(FormatValue(1e21), "1e+21");
  EXPECT_EQ(FormatValue(-2.5), "-2.5");
  EXPECT_EQ(FormatValue(600), "600");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(FormatValue(-std::numeric_limits<double>::infinity()), "-Inf");
  EXPECT_EQ(FormatValue(std::numeric_limits<double>::quiet_NaN()), "NaN");
}

TEST(MetricsTest, ChildrenAreStableAndShared) {
  Registry r;
  auto& f = r.AddCounter("rp_c_total", "C.", {"a"});
  Counter& c1 = f.With({"x"});
  Counter& c2 = f.With({"x"});
  EXPECT_EQ(&c1, &c2);
  for (int i = 0; i < 100; ++i) f.With({"y" + std::to_string(i)});  // map grows
  EXPECT_EQ(&f.With({"x"}), &c1) << "references survive growth";
}

TEST(MetricsTest, CardinalityIsCappedIntoOther) {
  Registry r;
  auto& f = r.AddCounter("rp_c_total", "C.", {"a", "b"}, /*max_children=*/2);
  f.With({"1", "1"}).Inc();
  f.With({"2", "2"}).Inc();
  f.With({"3", "3"}).Inc();
  f.With({"4", "4"}).Inc();
  f.With({"1", "1"}).Inc();  // existing children still count on their own
  const std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("rp_c_total{a=\"1\",b=\"1\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("rp_c_total{a=\"other\",b=\"other\"} 2\n"));
  EXPECT_EQ(text.find("a=\"3\""), std::string::npos);
}

TEST(MetricsTest, BadDefinitionsAreRefused) {
  Registry r;
  EXPECT_THROW(r.AddCounter("1bad", "x"), std::invalid_argument);
  EXPECT_THROW(r.AddCounter("ok_total", "x", {"bad-label"}), std::invalid_argument);
  EXPECT_THROW(r.AddCounter("ok2_total", "x", {"__reserved"}), std::invalid_argument);
  EXPECT_THROW(r.AddCounter("ok3_total", "x", {"a", "a"}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("h1", "x", {"le"}, {1}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("h2", "x", {}, {}), std::invalid_argument);
  EXPECT_THROW(r.AddHistogram("h3", "x", {}, {2, 1}), std::invalid_argument);
  r.AddCounter("dup_total", "x");
  EXPECT_THROW(r.AddCounter("dup_total", "x"), std::invalid_argument);
  auto& f = r.AddCounter("arity_total", "x", {"a"});
  EXPECT_THROW(f.With({"1", "2"}), std::invalid_argument);
}

TEST(MetricsTest, ScrapeHooksRunBeforeRendering) {
  Registry r;
  auto& g = r.AddGauge("rp_g", "G.").Get();
  int runs = 0;
  r.AddScrapeHook([&] { g.Set(++runs); });
  EXPECT_THAT(r.Render(), HasSubstr("rp_g 1\n"));
  EXPECT_THAT(r.Render(), HasSubstr("rp_g 2\n"));
}

TEST(MetricsTest, ConcurrentIncrementsAreAllCounted) {
  Registry r;
  auto& f = r.AddCounter("rp_c_total", "C.", {"t"});
  auto& h = r.AddHistogram("rp_h", "H.", {}, {0.5}).Get();
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Counter& c = f.With({t % 2 ? "odd" : "even"});
      for (int i = 0; i < 10000; ++i) {
        c.Inc();
        h.Observe(i % 2 ? 1.0 : 0.25);
      }
    });
  }
  std::thread scraper([&] {
    for (int i = 0; i < 20; ++i) r.Render();
  });
  for (auto& t : threads) t.join();
  scraper.join();
  const std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("rp_c_total{t=\"even\"} 20000\n"));
  EXPECT_THAT(text, HasSubstr("rp_c_total{t=\"odd\"} 20000\n"));
  EXPECT_THAT(text, HasSubstr("rp_h_bucket{le=\"0.5\"} 20000\n"));
  EXPECT_THAT(text, HasSubstr("rp_h_count 40000\n"));
  EXPECT_THAT(text, HasSubstr("rp_h_sum 25000\n"));
}

TEST(MetricsTest, ExponentialBuckets) {
  EXPECT_EQ(ExponentialBuckets(1, 2, 4), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_THROW(ExponentialBuckets(0, 2, 4), std::invalid_argument);
}

}  // namespace
}  // namespace registry_proxy::metrics
