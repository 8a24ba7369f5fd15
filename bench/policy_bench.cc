// Rule-engine throughput: decisions per second on one core.
//
//   build/bench/policy_bench --benchmark_min_time=1
//
// Each decision parses the reference, applies the namespace filters, finds the rule (longest
// prefix) and builds the candidate list, exactly as the shim does per PullImage.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "rules/config.h"

namespace registry_proxy {
namespace {

const std::vector<std::string>& MixedImages() {
  static const std::vector<std::string> kImages = {
      "nginx",
      "nginx:1.25-alpine",
      "bitnami/redis:7.2",
      "docker.io/library/busybox:1.36",
      "registry.k8s.io/ingress-nginx/controller:v1.9.4",
      "quay.io/prometheus/node-exporter:v1.7.0",
      "ghcr.io/fluxcd/source-controller:v1.2.2",
      "gcr.io/distroless/static:nonroot",
      "mcr.microsoft.com/dotnet/runtime:8.0",
      "nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
  };
  return kImages;
}

void RunDecisions(benchmark::State& state, const Policy& policy,
                  const std::vector<std::string>& images) {
  PullContext ctx;
  ctx.namespace_name = "default";
  size_t i = 0;
  for (auto _ : state) {
    Decision d = policy.Decide(images[i], ctx);
    benchmark::DoNotOptimize(d);
    if (++i == images.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["decisions_per_s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

void BM_Decide_DefaultConfig(benchmark::State& state) {
  auto config = BuiltinConfig();
  RunDecisions(state, *config->policy, MixedImages());
}
BENCHMARK(BM_Decide_DefaultConfig);

// 1,000 rules: one per Docker Hub organisation, each with two mirrors and a namespace filter,
// plus the default registries. Images are spread over the organisations and the registries.
void BM_Decide_1000Rules(benchmark::State& state) {
  std::string yaml =
      "proxies:\n  quay.io: quay.mirror.example\n  ghcr.io: ghcr.mirror.example\n"
      "rules:\n";
  for (int i = 0; i < 1000; ++i) {
    yaml += "  - match: docker.io/org" + std::to_string(i) + "\n";
    yaml += "    mirrors: [m1.example/org" + std::to_string(i) + ", m2.example]\n";
    yaml += "    excludeNamespaces: [kube-*]\n";
  }
  ConfigLoad load = ParseConfig(yaml, "<bench>");
  if (!load.ok()) {
    state.SkipWithError(load.ErrorText().c_str());
    return;
  }
  std::vector<std::string> images;
  for (int i = 0; i < 1000; i += 7) {
    images.push_back("org" + std::to_string(i) + "/app" + std::to_string(i) + ":v1");
  }
  images.push_back("quay.io/prometheus/node-exporter:v1.7.0");
  images.push_back("nginx");  // no rule: walks every prefix
  RunDecisions(state, *load.config->policy, images);
}
BENCHMARK(BM_Decide_1000Rules);

void BM_ParseImage(benchmark::State& state) {
  const auto& images = MixedImages();
  size_t i = 0;
  for (auto _ : state) {
    auto r = ParseImage(images[i]);
    benchmark::DoNotOptimize(r);
    if (++i == images.size()) i = 0;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ParseImage);

}  // namespace
}  // namespace registry_proxy

BENCHMARK_MAIN();
