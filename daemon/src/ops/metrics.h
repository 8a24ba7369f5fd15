// A small Prometheus registry: counter, gauge and histogram families with label sets, and the
// text exposition format 0.0.4.
//
// Hot path: a labelled child is looked up once (Family::With: a mutex and a map lookup) and the
// reference kept; Inc/Set/Observe on it are lock-free atomics, with no allocation. Children live
// as long as their registry, so kept references never dangle.
//
// Cardinality is bounded: a family holds at most `max_children` label sets; past that, every new
// label set maps to one overflow child whose label values are all "other" (and a warning is
// logged once per family).
//
// Exposition (Registry::Render): families sorted by name, each with its # HELP and # TYPE lines
// (also when it has no child yet), children sorted by label values; histograms as cumulative
// `_bucket{...,le="..."}` lines ending with le="+Inf", then `_sum` and `_count`. Label values
// escape `\`, `"` and newline; HELP text escapes `\` and newline. Numbers are printed in the
// shortest form that reads back exactly ("+Inf", "-Inf", "NaN" for the special values).
//
// Scrape hooks run at the start of every Render(), so values that are cheaper to read than to
// track (a channel's state, /proc/self, the config store's counters) are set right before they
// are written out.
//
// Thread safety: everything may be called from any thread at any time.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace registry_proxy::metrics {

class Counter {
 public:
  void Inc(double v = 1) { value_.fetch_add(v, std::memory_order_relaxed); }
  // For counters that mirror a monotonic source read at scrape time (a scrape hook).
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Inc(double v = 1) { value_.fetch_add(v, std::memory_order_relaxed); }
  void Dec(double v = 1) { value_.fetch_sub(v, std::memory_order_relaxed); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Histogram {
 public:
  // `bounds`: the finite upper bounds, strictly increasing (checked by the family).
  explicit Histogram(const std::vector<double>* bounds);
  void Observe(double v);

  struct Snapshot {
    std::vector<uint64_t> cumulative;  // one per bound, then +Inf
    double sum = 0;
    uint64_t count = 0;  // == cumulative.back()
  };
  Snapshot Read() const;

 private:
  const std::vector<double>* bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // bounds_->size() + 1 (the last: +Inf)
  std::atomic<double> sum_{0};
};

enum class Type { kCounter, kGauge, kHistogram };

// Buckets from `start` multiplying by `factor`, `count` of them: {0.001, 0.002, 0.004...}.
std::vector<double> ExponentialBuckets(double start, double factor, int count);

// Label value escaping and number formatting of the text format (exposed for tests).
std::string EscapeLabelValue(std::string_view v);
std::string EscapeHelp(std::string_view v);
std::string FormatValue(double v);

class FamilyBase {
 public:
  virtual ~FamilyBase() = default;
  const std::string& name() const { return name_; }
  virtual void Render(std::string* out) const = 0;

 protected:
  FamilyBase(std::string name, std::string help, Type type, std::vector<std::string> labels,
             size_t max_children);
  // The key for a label set (values joined), checked for arity.
  std::vector<std::string> Key(std::initializer_list<std::string_view> values) const;
  std::string LabelText(const std::vector<std::string>& values, std::string_view extra_name = {},
                        std::string_view extra_value = {}) const;
  void Header(std::string* out) const;
  void WarnOverflow() const;

  const std::string name_, help_;
  const Type type_;
  const std::vector<std::string> labels_;
  const size_t max_children_;
  mutable std::once_flag overflow_warned_;
};

template <typename T>
class Family final : public FamilyBase {
 public:
  Family(std::string name, std::string help, Type type, std::vector<std::string> labels,
         size_t max_children, std::vector<double> bounds = {});

  // The child for these label values (as many as the family has labels, in order). Created on
  // first use; the reference stays valid for the registry's life.
  T& With(std::initializer_list<std::string_view> values);
  // The label-less child (only for families without labels).
  T& Get() { return With({}); }

  void Render(std::string* out) const override;

 private:
  T& Make(std::vector<std::string> key);

  const std::vector<double> bounds_;  // histograms only
  mutable std::mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_;  // guarded by mu_
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

class Registry {
 public:
  static constexpr size_t kDefaultMaxChildren = 1000;

  // Names: [a-zA-Z_:][a-zA-Z0-9_:]*; label names [a-zA-Z_][a-zA-Z0-9_]*, not starting with
  // "__", and not "le" for histograms. A bad name or a duplicate family is a programming error:
  // std::invalid_argument.
  CounterFamily& AddCounter(const std::string& name, const std::string& help,
                            std::vector<std::string> labels = {},
                            size_t max_children = kDefaultMaxChildren);
  GaugeFamily& AddGauge(const std::string& name, const std::string& help,
                        std::vector<std::string> labels = {},
                        size_t max_children = kDefaultMaxChildren);
  // `bounds`: finite, strictly increasing, at least one.
  HistogramFamily& AddHistogram(const std::string& name, const std::string& help,
                                std::vector<std::string> labels, std::vector<double> bounds,
                                size_t max_children = kDefaultMaxChildren);

  // Runs before every Render(); may set gauges and counters. Must not call Render().
  void AddScrapeHook(std::function<void()> hook);

  // The text exposition format 0.0.4 (Content-Type: kContentType).
  std::string Render() const;
  static constexpr char kContentType[] = "text/plain; version=0.0.4; charset=utf-8";

 private:
  template <typename F>
  F& Add(std::unique_ptr<F> family);

  mutable std::mutex render_mu_;  // one Render() at a time: hooks then text, never interleaved
  mutable std::mutex mu_;
  std::map<std::string, std::unique_ptr<FamilyBase>> families_;  // guarded by mu_
  std::vector<std::function<void()>> hooks_;                     // guarded by mu_
};

}  // namespace registry_proxy::metrics
