// The ImageStatus miss cache (pull/miss_cache.h): computed once per name and snapshot, dropped
// with the snapshot, bounded.
#include "pull/miss_cache.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <thread>

namespace registry_proxy {
namespace {

std::shared_ptr<const Config> Snapshot() { return std::make_shared<const Config>(); }

StatusMissCache::Entry Rewritten(const std::string& image) {
  StatusMissCache::Entry e;
  e.rewritten = true;
  e.copies = {"mirror.local/" + image};
  return e;
}

TEST(StatusMissCache, ComputesOncePerNameAndSnapshot) {
  StatusMissCache cache;
  const auto config = Snapshot();
  int calls = 0;
  auto compute = [&](const Config& c, const std::string& image) {
    EXPECT_EQ(&c, config.get());
    ++calls;
    return Rewritten(image);
  };
  auto a = cache.Get(config, "a", compute);
  auto a2 = cache.Get(config, "a", compute);
  auto b = cache.Get(config, "b", compute);
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(a.get(), a2.get());
  ASSERT_TRUE(a->rewritten);
  EXPECT_EQ(a->copies, std::vector<std::string>{"mirror.local/a"});
  EXPECT_EQ(b->copies, std::vector<std::string>{"mirror.local/b"});
  EXPECT_EQ(cache.size(), 2u);
  EXPECT_EQ(cache.computed(), 2u);
}

TEST(StatusMissCache, RemembersNamesNoRuleRewrites) {
  StatusMissCache cache;
  const auto config = Snapshot();
  int calls = 0;
  auto compute = [&](const Config&, const std::string&) {
    ++calls;
    return StatusMissCache::Entry{};
  };
  EXPECT_FALSE(cache.Get(config, "x", compute)->rewritten);
  EXPECT_FALSE(cache.Get(config, "x", compute)->rewritten);
  EXPECT_EQ(calls, 1);
}

TEST(StatusMissCache, ANewSnapshotDropsEverything) {
  StatusMissCache cache;
  auto first = Snapshot();
  auto second = Snapshot();
  bool rewrite = true;
  auto compute = [&](const Config&, const std::string& image) {
    return rewrite ? Rewritten(image) : StatusMissCache::Entry{};
  };
  EXPECT_TRUE(cache.Get(first, "a", compute)->rewritten);
  cache.Get(first, "b", compute);
  rewrite = false;  // the reload's rules no longer rewrite the name
  EXPECT_FALSE(cache.Get(second, "a", compute)->rewritten);
  EXPECT_EQ(cache.size(), 1u);  // "b" went with the first snapshot
  EXPECT_FALSE(cache.Get(second, "a", compute)->rewritten);
  EXPECT_EQ(cache.computed(), 3u);
}

TEST(StatusMissCache, ASnapshotAtTheSameAddressIsNotTakenForTheOld) {
  // The cache holds the snapshot it computed with, so a new one cannot be allocated at its
  // address: pointer identity is a safe key.
  StatusMissCache cache;
  auto compute = [](const Config&, const std::string& image) { return Rewritten(image); };
  std::weak_ptr<const Config> old;
  {
    auto s = Snapshot();
    old = s;
    cache.Get(s, "a", compute);
  }
  EXPECT_FALSE(old.expired());
  cache.Get(Snapshot(), "a", compute);
  EXPECT_TRUE(old.expired());  // released once a newer snapshot replaced it
  EXPECT_EQ(cache.computed(), 2u);
}

TEST(StatusMissCache, ClearedWhenFull) {
  StatusMissCache cache(3);
  const auto config = Snapshot();
  auto compute = [](const Config&, const std::string& image) { return Rewritten(image); };
  for (const char* n : {"a", "b", "c"}) cache.Get(config, n, compute);
  EXPECT_EQ(cache.size(), 3u);
  cache.Get(config, "d", compute);
  EXPECT_EQ(cache.size(), 1u);
  cache.Get(config, "a", compute);  // computed again
  EXPECT_EQ(cache.computed(), 5u);
  EXPECT_EQ(cache.size(), 2u);
}

TEST(StatusMissCache, AnExceptionStoresNothing) {
  StatusMissCache cache;
  const auto config = Snapshot();
  auto fail = [](const Config&, const std::string&) -> StatusMissCache::Entry {
    throw std::runtime_error("boom");
  };
  EXPECT_THROW(cache.Get(config, "a", fail), std::runtime_error);
  EXPECT_EQ(cache.size(), 0u);
  auto ok = [](const Config&, const std::string& image) { return Rewritten(image); };
  EXPECT_TRUE(cache.Get(config, "a", ok)->rewritten);
}

TEST(StatusMissCache, ConcurrentCallersAgree) {
  StatusMissCache cache(16);
  const auto a = Snapshot();
  const auto b = Snapshot();
  auto compute = [&](const Config& c, const std::string& image) {
    StatusMissCache::Entry e = Rewritten(image);
    e.rewritten = &c == a.get();
    return e;
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 2000; ++i) {
        const auto& s = (i + t) % 3 == 0 ? b : a;
        const std::string name = "img" + std::to_string(i % 40);
        auto e = cache.Get(s, name, compute);
        ASSERT_EQ(e->rewritten, s == a);
        ASSERT_EQ(e->copies, std::vector<std::string>{"mirror.local/" + name});
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_LE(cache.size(), 16u);
}

}  // namespace
}  // namespace registry_proxy
