#include "ops/metrics.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace registry_proxy::metrics {
namespace {

bool ValidName(std::string_view n, bool colon_ok) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    const char c = n[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool ok = alpha || (colon_ok && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Text helpers

std::string EscapeLabelValue(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    switch (c) {
      case '\\':
        out += "\\\\";
        break;
      case '"':
        out += "\\\"";
        break;
      case '\n':
        out += "\\n";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

std::string EscapeHelp(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  // The shortest digits that read back exactly; positional notation for exponents -4..20
  // (as Go's client writes le="0.0005"), scientific beyond ("1.5e-07", "1e+21").
  char buf[400];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  const std::string_view sci(buf, size_t(r.ptr - buf));
  int exp = 0;
  const size_t e = sci.find('e') + 1;
  std::from_chars(sci.data() + e + (sci[e] == '+'), sci.data() + sci.size(), exp);
  if (exp < -4 || exp > 20) return std::string(sci);
  r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::fixed);
  return std::string(buf, r.ptr);
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  if (start <= 0 || factor <= 1 || count < 1) {
    throw std::invalid_argument("ExponentialBuckets: start > 0, factor > 1, count >= 1");
  }
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Histogram

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds_->size(); ++i) buckets_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double v) {
  if (std::isnan(v)) return;
  // The first bucket whose upper bound is >= v (Prometheus buckets are "le").
  const auto it = std::lower_bound(bounds_->begin(), bounds_->end(), v);
  buckets_[static_cast<size_t>(it - bounds_->begin())].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(v, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot s;
  s.cumulative.resize(bounds_->size() + 1);
  uint64_t acc = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    acc += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = acc;
  }
  // The count is the buckets' total, so `_count` always equals the +Inf bucket even while
  // observations race with the read.
  s.count = acc;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Families

FamilyBase::FamilyBase(std::string name, std::string help, Type type,
                       std::vector<std::string> labels, size_t max_children)
    : name_(std::move(name)),
      help_(std::move(help)),
      type_(type),
      labels_(std::move(labels)),
      max_children_(std::max<size_t>(max_children, 1)) {
  if (!ValidName(name_, true)) throw std::invalid_argument("bad metric name '" + name_ + "'");
  for (size_t i = 0; i < labels_.size(); ++i) {
    const std::string& l = labels_[i];
    if (!ValidName(l, false) || l.rfind("__", 0) == 0 || (type_ == Type::kHistogram && l == "le")) {
      throw std::invalid_argument("bad label name '" + l + "' for " + name_);
    }
    if (std::find(labels_.begin(), labels_.begin() + static_cast<long>(i), l) !=
        labels_.begin() + static_cast<long>(i)) {
      throw std::invalid_argument("duplicate label name '" + l + "' for " + name_);
    }
  }
}

std::vector<std::string> FamilyBase::Key(std::initializer_list<std::string_view> values) const {
  if (values.size() != labels_.size()) {
    throw std::invalid_argument(name_ + ": " + std::to_string(labels_.size()) +
                                " label value(s) expected, got " + std::to_string(values.size()));
  }
  return std::vector<std::string>(values.begin(), values.end());
}

std::string FamilyBase::LabelText(const std::vector<std::string>& values,
                                  std::string_view extra_name, std::string_view extra_value) const {
  if (values.empty() && extra_name.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    out += labels_[i];
    out += "=\"";
    out += EscapeLabelValue(values[i]);
    out += '"';
  }
  if (!extra_name.empty()) {
    if (!values.empty()) out += ',';
    out += extra_name;
    out += "=\"";
    out += extra_value;
    out += '"';
  }
  out += '}';
  return out;
}

void FamilyBase::Header(std::string* out) const {
  static constexpr const char* kTypeNames[] = {"counter", "gauge", "histogram"};
  *out += "# HELP " + name_ + " " + EscapeHelp(help_) + "\n";
  *out += "# TYPE " + name_ + " " + kTypeNames[static_cast<int>(type_)] + "\n";
}

void FamilyBase::WarnOverflow() const {
  std::call_once(overflow_warned_, [this] {
    spdlog::warn("metric {}: more than {} label sets; further ones are counted as \"other\"", name_,
                 max_children_);
  });
}

template <typename T>
Family<T>::Family(std::string name, std::string help, Type type, std::vector<std::string> labels,
                  size_t max_children, std::vector<double> bounds)
    : FamilyBase(std::move(name), std::move(help), type, std::move(labels), max_children),
      bounds_(std::move(bounds)) {
  if (type_ == Type::kHistogram) {
    if (bounds_.empty()) throw std::invalid_argument(name_ + ": a histogram needs buckets");
    for (size_t i = 0; i < bounds_.size(); ++i) {
      if (!std::isfinite(bounds_[i]) || (i && bounds_[i] <= bounds_[i - 1])) {
        throw std::invalid_argument(name_ + ": buckets must be finite and strictly increasing");
      }
    }
  }
}

template <typename T>
T& Family<T>::Make(std::vector<std::string> key) {
  std::unique_ptr<T> child;
  if constexpr (std::is_same_v<T, Histogram>) {
    child = std::make_unique<T>(&bounds_);
  } else {
    child = std::make_unique<T>();
  }
  T& ref = *child;
  children_.emplace(std::move(key), std::move(child));
  return ref;
}

template <typename T>
T& Family<T>::With(std::initializer_list<std::string_view> values) {
  std::vector<std::string> key = Key(values);
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = children_.find(key); it != children_.end()) return *it->second;
  if (children_.size() < max_children_) return Make(std::move(key));
  WarnOverflow();
  std::vector<std::string> other(labels_.size(), "other");
  if (auto it = children_.find(other); it != children_.end()) return *it->second;
  return Make(std::move(other));
}

template <typename T>
void Family<T>::Render(std::string* out) const {
  Header(out);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [key, child] : children_) {
    if constexpr (std::is_same_v<T, Histogram>) {
      const Histogram::Snapshot s = child->Read();
      for (size_t i = 0; i < s.cumulative.size(); ++i) {
        const std::string le = i < bounds_.size() ? FormatValue(bounds_[i]) : "+Inf";
        *out += name_ + "_bucket" + LabelText(key, "le", le) + " " +
                std::to_string(s.cumulative[i]) + "\n";
      }
      const std::string labels = LabelText(key);
      *out += name_ + "_sum" + labels + " " + FormatValue(s.sum) + "\n";
      *out += name_ + "_count" + labels + " " + std::to_string(s.count) + "\n";
    } else {
      *out += name_ + LabelText(key) + " " + FormatValue(child->Value()) + "\n";
    }
  }
}

template class Family<Counter>;
template class Family<Gauge>;
template class Family<Histogram>;

// ---------------------------------------------------------------------------------------------
// Registry

template <typename F>
F& Registry::Add(std::unique_ptr<F> family) {
  F& ref = *family;
  std::lock_guard<std::mutex> lock(mu_);
  if (!families_.emplace(family->name(), std::move(family)).second) {
    throw std::invalid_argument("metric " + ref.name() + " registered twice");
  }
  return ref;
}

CounterFamily& Registry::AddCounter(const std::string& name, const std::string& help,
                                    std::vector<std::string> labels, size_t max_children) {
  auto& f = Add(
      std::make_unique<CounterFamily>(name, help, Type::kCounter, std::move(labels), max_children));
  return f;
}

GaugeFamily& Registry::AddGauge(const std::string& name, const std::string& help,
                                std::vector<std::string> labels, size_t max_children) {
  return Add(
      std::make_unique<GaugeFamily>(name, help, Type::kGauge, std::move(labels), max_children));
}

HistogramFamily& Registry::AddHistogram(const std::string& name, const std::string& help,
                                        std::vector<std::string> labels, std::vector<double> bounds,
                                        size_t max_children) {
  return Add(std::make_unique<HistogramFamily>(name, help, Type::kHistogram, std::move(labels),
                                               max_children, std::move(bounds)));
}

void Registry::AddScrapeHook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  hooks_.push_back(std::move(hook));
}

std::string Registry::Render() const {
  std::lock_guard<std::mutex> render_lock(render_mu_);
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    hooks = hooks_;
  }
  for (const auto& h : hooks) h();  // outside mu_: a hook may look children up
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [name, family] : families_) family->Render(&out);
  return out;
}

}  // namespace registry_proxy::metrics
