// ConfigStore and ConfigWatcher against real files in a fresh temp directory per test.
//
// Nothing sleeps for a fixed time to "let things happen": tests wait for a condition (usually a
// generation change) with WaitFor(), which polls every few ms and gives up after a few seconds.
#include "rules/config_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "spdlog/spdlog.h"

namespace registry_proxy {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

constexpr char kConfigA[] = "proxies:\n  docker.io: mirror-a.example\n";
constexpr char kConfigB[] =
    "proxies:\n  docker.io: mirror-b.example\n  quay.io: mirror-q.example\n"
    "excludeNamespaces: [kube-system]\n";
// Valid YAML, unknown key on line 3, column 1.
constexpr char kBrokenKey[] = "proxies:\n  docker.io: mirror-a.example\nbogus: 1\n";
// Not YAML at all.
constexpr char kBrokenSyntax[] = "proxies: [docker.io\n  quay.io: {\n";

constexpr milliseconds kWaitTimeout{5000};

// Polls `pred` until it holds or `timeout` passes.
template <typename Pred>
bool WaitFor(Pred pred, milliseconds timeout = kWaitTimeout) {
  const auto deadline = Clock::now() + timeout;
  while (!pred()) {
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(2));
  }
  return true;
}

std::string Describe(const ReloadStats& s) {
  std::ostringstream out;
  out << "stats{applied=" << s.applied << " unchanged=" << s.unchanged << " rejected=" << s.rejected
      << " generation=" << s.generation << " last_error='" << s.last_error << "'}";
  return out.str();
}

// Writes in place: open(O_TRUNC), write, close (IN_CLOSE_WRITE), as `cat > file` does.
void WriteFile(const std::string& path, std::string_view content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  ASSERT_TRUE(out) << "cannot open " << path;
  out << content;
  out.close();
  ASSERT_TRUE(out) << "cannot write " << path;
}

// Writes a temp file next to `path` and renames it over `path`, as editors and config
// management tools do. Readers see either the old or the new bytes, never a torn file.
void WriteAtomically(const std::string& path, std::string_view content) {
  const std::string tmp = path + ".tmp";
  WriteFile(tmp, content);
  ASSERT_EQ(rename(tmp.c_str(), path.c_str()), 0) << "rename " << tmp << ": " << errno;
}

std::string FirstMirrorHost(const Config& config, std::string_view image) {
  PullContext ctx;
  ctx.namespace_name = "default";
  Decision d = config.policy->Decide(image, ctx);
  if (!d.rewritten() || d.candidates.empty() || d.candidates[0].mirror == nullptr) return "";
  return d.candidates[0].mirror->host;
}

class ConfigStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "rp-config-store-XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr) << "mkdtemp: " << errno;
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string Path(std::string_view name) const { return dir_ + "/" + std::string(name); }

  std::string dir_;
};

// ---- ConfigStore ----------------------------------------------------------------------------

TEST_F(ConfigStoreTest, PassthroughUntilAGoodLoad) {
  ConfigStore store(Path("config.yaml"));
  std::shared_ptr<const Config> initial = store.Current();
  ASSERT_NE(initial, nullptr);
  ASSERT_NE(initial->policy, nullptr);
  EXPECT_FALSE(store.HasGoodConfig());
  EXPECT_EQ(initial->source, Path("config.yaml"));
  EXPECT_EQ(initial->content_sha256, "");
  EXPECT_TRUE(initial->policy->rules().empty());
  EXPECT_EQ(FirstMirrorHost(*initial, "nginx"), "");  // nothing is rewritten
  EXPECT_EQ(initial->node.upstream, NodeSettings().upstream);
  EXPECT_EQ(store.Stats().generation, 0u);
  EXPECT_EQ(store.Stats().applied_unix_ms, 0);

  // No file: rejected, still passthrough, and the error names the file.
  EXPECT_EQ(store.Reload(), ReloadResult::kRejected);
  EXPECT_FALSE(store.HasGoodConfig());
  EXPECT_EQ(store.Current(), initial);
  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.rejected, 1u);
  EXPECT_EQ(stats.generation, 0u);
  EXPECT_NE(stats.last_error.find(Path("config.yaml")), std::string::npos) << stats.last_error;
}

TEST_F(ConfigStoreTest, AppliesChangesAndSkipsIdenticalBytes) {
  const std::string path = Path("config.yaml");
  ConfigStore store(path);
  std::vector<std::pair<ReloadResult, uint64_t>> seen;
  store.SetListener(
      [&](ReloadResult r, const ReloadStats& s) { seen.emplace_back(r, s.generation); });

  WriteFile(path, kConfigA);
  EXPECT_EQ(store.Reload(), ReloadResult::kApplied);
  EXPECT_TRUE(store.HasGoodConfig());
  std::shared_ptr<const Config> a = store.Current();
  EXPECT_EQ(store.Stats().generation, 1u);
  EXPECT_GT(store.Stats().applied_unix_ms, 0);
  EXPECT_EQ(FirstMirrorHost(*a, "nginx"), "mirror-a.example");
  EXPECT_FALSE(a->content_sha256.empty());

  // The same bytes, rewritten: nothing changes, not even the snapshot pointer.
  WriteFile(path, kConfigA);
  EXPECT_EQ(store.Reload(), ReloadResult::kUnchanged);
  EXPECT_EQ(store.Current(), a);
  EXPECT_EQ(store.Stats().generation, 1u);

  WriteFile(path, kConfigB);
  EXPECT_EQ(store.Reload(), ReloadResult::kApplied);
  std::shared_ptr<const Config> b = store.Current();
  EXPECT_NE(b, a);
  EXPECT_NE(b->content_sha256, a->content_sha256);
  EXPECT_EQ(FirstMirrorHost(*b, "nginx"), "mirror-b.example");
  // A snapshot taken before the reload is untouched by it.
  EXPECT_EQ(FirstMirrorHost(*a, "nginx"), "mirror-a.example");

  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.applied, 2u);
  EXPECT_EQ(stats.unchanged, 1u);
  EXPECT_EQ(stats.rejected, 0u);
  EXPECT_EQ(stats.generation, 2u);
  EXPECT_EQ(stats.last_error, "");

  using P = std::pair<ReloadResult, uint64_t>;
  EXPECT_EQ(seen, (std::vector<P>{{ReloadResult::kApplied, 1},
                                  {ReloadResult::kUnchanged, 1},
                                  {ReloadResult::kApplied, 2}}));
}

TEST_F(ConfigStoreTest, BadFileNeverReplacesAGoodOne) {
  const std::string path = Path("config.yaml");
  ConfigStore store(path);
  WriteFile(path, kConfigA);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  std::shared_ptr<const Config> good = store.Current();

  WriteFile(path, kBrokenKey);
  EXPECT_EQ(store.Reload(), ReloadResult::kRejected);
  EXPECT_EQ(store.Current(), good);  // the very same snapshot
  EXPECT_TRUE(store.HasGoodConfig());
  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.rejected, 1u);
  EXPECT_EQ(stats.generation, 1u);
  // file:line:column of the unknown key.
  EXPECT_NE(stats.last_error.find(path + ":3:1"), std::string::npos) << stats.last_error;
  EXPECT_NE(stats.last_error.find("bogus"), std::string::npos) << stats.last_error;

  WriteFile(path, kBrokenSyntax);
  EXPECT_EQ(store.Reload(), ReloadResult::kRejected);
  EXPECT_EQ(store.Current(), good);
  stats = store.Stats();
  EXPECT_EQ(stats.rejected, 2u);
  EXPECT_NE(stats.last_error.find(path + ":"), std::string::npos) << stats.last_error;

  WriteFile(path, kConfigB);
  EXPECT_EQ(store.Reload(), ReloadResult::kApplied);
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-b.example");
  stats = store.Stats();
  EXPECT_EQ(stats.generation, 2u);
  EXPECT_EQ(stats.last_error, "");  // cleared by the success
}

TEST_F(ConfigStoreTest, RevertingABrokenEditClearsTheError) {
  const std::string path = Path("config.yaml");
  ConfigStore store(path);
  WriteFile(path, kConfigA);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  WriteFile(path, kBrokenKey);
  ASSERT_EQ(store.Reload(), ReloadResult::kRejected);
  WriteFile(path, kConfigA);
  EXPECT_EQ(store.Reload(), ReloadResult::kUnchanged);
  EXPECT_EQ(store.Stats().last_error, "");
  EXPECT_EQ(store.Stats().generation, 1u);
}

TEST(ReloadResultNameTest, Names) {
  EXPECT_EQ(ReloadResultName(ReloadResult::kApplied), "applied");
  EXPECT_EQ(ReloadResultName(ReloadResult::kUnchanged), "unchanged");
  EXPECT_EQ(ReloadResultName(ReloadResult::kRejected), "rejected");
}

// ---- ConfigWatcher --------------------------------------------------------------------------

constexpr ConfigWatcher::Options kFast{milliseconds(50), milliseconds(50)};

// A ConfigMap volume exactly as kubelet's AtomicWriter lays it out:
//   dir/..<timestamp>/config.yaml   the payload
//   dir/..data -> ..<timestamp>      relative symlink, replaced atomically on update
//   dir/config.yaml -> ..data/config.yaml
class ConfigMapVolume {
 public:
  explicit ConfigMapVolume(std::string dir) : dir_(std::move(dir)) {}

  void Create(const std::string& ts, std::string_view content) {
    WritePayload(ts, content);
    ASSERT_EQ(symlink(ts.c_str(), (dir_ + "/..data").c_str()), 0);
    ASSERT_EQ(symlink("..data/config.yaml", (dir_ + "/config.yaml").c_str()), 0);
    current_ = ts;
  }

  // AtomicWriter's update: new payload dir, ..data_tmp symlink to it, rename over ..data,
  // remove the old payload dir.
  void Update(const std::string& ts, std::string_view content) {
    WritePayload(ts, content);
    const std::string tmp = dir_ + "/..data_tmp";
    ASSERT_EQ(symlink(ts.c_str(), tmp.c_str()), 0);
    ASSERT_EQ(rename(tmp.c_str(), (dir_ + "/..data").c_str()), 0);
    fs::remove_all(dir_ + "/" + current_);
    current_ = ts;
  }

  std::string path() const { return dir_ + "/config.yaml"; }

 private:
  void WritePayload(const std::string& ts, std::string_view content) {
    ASSERT_TRUE(fs::create_directory(dir_ + "/" + ts));
    WriteFile(dir_ + "/" + ts + "/config.yaml", content);
  }

  std::string dir_;
  std::string current_;
};

TEST_F(ConfigStoreTest, WatcherFollowsConfigMapSwap) {
  ConfigMapVolume volume(dir_);
  ASSERT_NO_FATAL_FAILURE(volume.Create("..2026_11_25_00_00_00.1", kConfigA));
  ConfigStore store(volume.path());
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  ConfigWatcher watcher(&store, kFast);
  ASSERT_TRUE(watcher.Start().ok());

  ASSERT_NO_FATAL_FAILURE(volume.Update("..2026_11_25_00_00_01.2", kConfigB));
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 2; }))
      << "timed out waiting for the ConfigMap update to apply; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-b.example");
  EXPECT_EQ(store.Stats().rejected, 0u);

  // And once more, back to A (the payload dir name changes again).
  ASSERT_NO_FATAL_FAILURE(volume.Update("..2026_11_25_00_00_02.3", kConfigA));
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 3; }))
      << "timed out waiting for the second ConfigMap update; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-a.example");
}

TEST_F(ConfigStoreTest, WatcherKeepsOldConfigOnBrokenConfigMapSwap) {
  ConfigMapVolume volume(dir_);
  ASSERT_NO_FATAL_FAILURE(volume.Create("..2026_11_25_00_00_00.1", kConfigA));
  ConfigStore store(volume.path());
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  std::shared_ptr<const Config> good = store.Current();
  ConfigWatcher watcher(&store, kFast);
  ASSERT_TRUE(watcher.Start().ok());

  ASSERT_NO_FATAL_FAILURE(volume.Update("..2026_11_25_00_00_01.2", kBrokenKey));
  ASSERT_TRUE(WaitFor([&] { return store.Stats().rejected >= 1; }))
      << "timed out waiting for the broken update to be rejected; " << Describe(store.Stats());
  EXPECT_EQ(store.Current(), good);
  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.generation, 1u);
  EXPECT_EQ(stats.applied, 1u);
  EXPECT_NE(stats.last_error.find(":3:1"), std::string::npos) << stats.last_error;

  // The fix arrives the same way.
  ASSERT_NO_FATAL_FAILURE(volume.Update("..2026_11_25_00_00_02.3", kConfigB));
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 2; }))
      << "timed out waiting for the fixed update; " << Describe(store.Stats());
  EXPECT_EQ(store.Stats().last_error, "");
}

TEST_F(ConfigStoreTest, WatcherSeesInPlaceEditsAndEditorRenames) {
  const std::string path = Path("config.yaml");
  WriteFile(path, kConfigA);
  ConfigStore store(path);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  ConfigWatcher watcher(&store, kFast);
  ASSERT_TRUE(watcher.Start().ok());

  WriteFile(path, kConfigB);  // in place
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 2; }))
      << "in-place edit not picked up; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-b.example");

  WriteAtomically(path, kConfigA);  // temp file renamed over the config
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 3; }))
      << "editor-style rename not picked up; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-a.example");
}

TEST_F(ConfigStoreTest, WatcherDebouncesABurstIntoOneReload) {
  const std::string path = Path("config.yaml");
  WriteFile(path, kConfigA);
  ConfigStore store(path);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  ConfigWatcher watcher(&store, {milliseconds(300), milliseconds(1000)});
  ASSERT_TRUE(watcher.Start().ok());

  // Several writes well within one settle period, the last one good.
  WriteFile(path, kBrokenSyntax);
  WriteFile(path, kBrokenKey);
  WriteFile(path, kConfigB);
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 2; }))
      << "burst not picked up; " << Describe(store.Stats());
  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.rejected, 0u) << "a half-finished burst was loaded";
  EXPECT_EQ(stats.applied, 2u);
}

TEST_F(ConfigStoreTest, TriggerReloadWithoutFileEvents) {
  const std::string path = Path("config.yaml");
  WriteFile(path, kConfigA);  // before the watch: no event will ever report it
  ConfigStore store(path);
  ConfigWatcher watcher(&store, kFast);
  ASSERT_TRUE(watcher.Start().ok());

  watcher.TriggerReload();  // as SIGHUP would
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 1; }))
      << "TriggerReload() did not reload; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-a.example");

  watcher.TriggerReload();
  ASSERT_TRUE(WaitFor([&] { return store.Stats().unchanged == 1; }))
      << "second TriggerReload() did not reload; " << Describe(store.Stats());
  EXPECT_EQ(store.Stats().generation, 1u);

  // Reading the file must not itself wake the watcher (that would be a reload loop): after a
  // few settle periods of quiet nothing more has happened. (A fixed wait: proving an absence.)
  std::this_thread::sleep_for(4 * kFast.settle);
  ReloadStats stats = store.Stats();
  EXPECT_EQ(stats.applied + stats.unchanged + stats.rejected, 2u) << Describe(stats);
}

TEST_F(ConfigStoreTest, TriggerReloadBeforeStartIsServedOnStart) {
  const std::string path = Path("config.yaml");
  WriteFile(path, kConfigA);
  ConfigStore store(path);
  ConfigWatcher watcher(&store, kFast);
  watcher.TriggerReload();
  EXPECT_EQ(store.Stats().generation, 0u);
  ASSERT_TRUE(watcher.Start().ok());
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 1; }))
      << "an early TriggerReload() was lost; " << Describe(store.Stats());
}

TEST_F(ConfigStoreTest, WatcherRewatchesARecreatedDirectory) {
  const std::string sub = Path("etc");
  const std::string path = sub + "/config.yaml";
  ASSERT_TRUE(fs::create_directory(sub));
  WriteFile(path, kConfigA);
  ConfigStore store(path);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  ConfigWatcher watcher(&store, kFast);
  ASSERT_TRUE(watcher.Start().ok());

  fs::remove_all(sub);
  // The file vanished: that is rejected (loudly), never a fall back to passthrough.
  ASSERT_TRUE(WaitFor([&] { return store.Stats().rejected >= 1; }))
      << "deleting the directory was not noticed; " << Describe(store.Stats());
  EXPECT_TRUE(store.HasGoodConfig());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-a.example");

  ASSERT_TRUE(fs::create_directory(sub));
  WriteFile(path, kConfigB);
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 2; }))
      << "the recreated directory was not watched again; " << Describe(store.Stats());
  EXPECT_EQ(FirstMirrorHost(*store.Current(), "nginx"), "mirror-b.example");

  // And it is really watched again (not just reloaded once when it came back).
  WriteFile(path, kConfigA);
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 3; }))
      << "edit after re-watch not picked up; " << Describe(store.Stats());
}

TEST_F(ConfigStoreTest, StartFailsForAMissingDirectory) {
  ConfigStore store(Path("nope/config.yaml"));
  ConfigWatcher watcher(&store, kFast);
  Status s = watcher.Start();
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find(Path("nope")), std::string::npos) << s.message();
}

TEST_F(ConfigStoreTest, StopIsPromptAndIdempotent) {
  const std::string path = Path("config.yaml");
  ConfigStore store(path);
  {
    ConfigWatcher never_started(&store, kFast);  // destructor without Start()
    never_started.Stop();
    never_started.TriggerReload();  // harmless without a thread
  }

  // A long settle and a pending reload: Stop() must not wait for it, and drops it.
  ConfigWatcher watcher(&store, {std::chrono::seconds(30), std::chrono::seconds(30)});
  ASSERT_TRUE(watcher.Start().ok());
  EXPECT_FALSE(watcher.Start().ok()) << "a second Start() must fail";
  WriteFile(path, kConfigA);
  watcher.TriggerReload();
  const auto t0 = Clock::now();
  watcher.Stop();
  const auto took = Clock::now() - t0;
  EXPECT_LT(took, std::chrono::seconds(1));
  EXPECT_EQ(store.Stats().generation, 0u);
  watcher.Stop();  // twice is fine

  // Start() after Stop() works.
  ConfigWatcher fast(&store, kFast);
  ASSERT_TRUE(fast.Start().ok());
  fast.Stop();
  ASSERT_TRUE(fast.Start().ok());
  WriteFile(path, kConfigB);
  ASSERT_TRUE(WaitFor([&] { return store.Stats().generation == 1; }))
      << "restarted watcher did not reload; " << Describe(store.Stats());
}  // destructors stop the running watcher

// ---- Concurrency ----------------------------------------------------------------------------

// Readers hammer Current() and decide with it while the file flips between two good configs
// and two broken ones, reloaded both by hand and by the watcher. Every snapshot must be one of
// the two good configs, whole (under TSan this also checks the publication is race-free).
TEST_F(ConfigStoreTest, ReadersAlwaysSeeACompleteSnapshot) {
  const std::string path = Path("config.yaml");
  // The expected digests, from the same bytes.
  WriteFile(Path("a.yaml"), kConfigA);
  WriteFile(Path("b.yaml"), kConfigB);
  ConfigLoad load_a = LoadConfigFile(Path("a.yaml"));
  ConfigLoad load_b = LoadConfigFile(Path("b.yaml"));
  ASSERT_TRUE(load_a.ok()) << load_a.ErrorText();
  ASSERT_TRUE(load_b.ok()) << load_b.ErrorText();
  const std::string sha_a = load_a.config->content_sha256;
  const std::string sha_b = load_b.config->content_sha256;
  ASSERT_NE(sha_a, sha_b);

  WriteFile(path, kConfigA);
  ConfigStore store(path);
  ASSERT_EQ(store.Reload(), ReloadResult::kApplied);
  ConfigWatcher watcher(&store, {milliseconds(1), milliseconds(50)});
  ASSERT_TRUE(watcher.Start().ok());

  const auto saved_level = spdlog::get_level();
  spdlog::set_level(spdlog::level::off);  // thousands of reload lines otherwise

  std::atomic<bool> done{false};
  std::atomic<uint64_t> seen_a{0}, seen_b{0}, bad{0};
  std::mutex failure_mu;
  std::string first_failure;
  auto fail = [&](const std::string& why) {
    if (bad.fetch_add(1) == 0) {
      std::lock_guard<std::mutex> lock(failure_mu);
      first_failure = why;
    }
  };

  auto check = [&](const Config& c) {
    const auto& rules = c.policy->rules();
    if (c.content_sha256 == sha_a) {
      if (rules.size() != 1) return fail("A with " + std::to_string(rules.size()) + " rules");
      if (FirstMirrorHost(c, "nginx") != "mirror-a.example") return fail("A: wrong mirror");
      if (FirstMirrorHost(c, "quay.io/x/y") != "") return fail("A rewrote quay.io");
      ++seen_a;
    } else if (c.content_sha256 == sha_b) {
      if (rules.size() != 2) return fail("B with " + std::to_string(rules.size()) + " rules");
      if (FirstMirrorHost(c, "nginx") != "mirror-b.example") return fail("B: wrong mirror");
      if (FirstMirrorHost(c, "quay.io/x/y") != "mirror-q.example") return fail("B: quay.io");
      ++seen_b;
    } else {
      fail("a snapshot that is neither A nor B: sha '" + c.content_sha256 + "'");
    }
  };

  std::vector<std::thread> threads;
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&] {
      uint64_t last_generation = 0;
      while (!done.load(std::memory_order_relaxed)) {
        std::shared_ptr<const Config> snap = store.Current();
        const std::string sha = snap->content_sha256;
        check(*snap);
        if (snap->content_sha256 != sha) fail("a held snapshot changed");
        ReloadStats stats = store.Stats();
        if (stats.generation < last_generation) fail("generation went backwards");
        last_generation = stats.generation;
      }
    });
  }
  threads.emplace_back([&] {  // reloads by hand, racing the watcher's reloads
    while (!done.load(std::memory_order_relaxed)) store.Reload();
  });

  // The writer: renames, so a reload reads whole files (torn in-place writes are the settle
  // period's business, not the store's).
  const char* const versions[] = {kConfigB, kBrokenKey, kConfigA, kBrokenSyntax};
  const auto end = Clock::now() + milliseconds(500);
  for (size_t i = 0; Clock::now() < end; ++i) {
    WriteAtomically(path, versions[i % 4]);
    std::this_thread::sleep_for(milliseconds(1));
  }
  done = true;
  for (auto& t : threads) t.join();
  watcher.Stop();
  spdlog::set_level(saved_level);

  ReloadStats stats = store.Stats();
  RecordProperty("snapshots_a", std::to_string(seen_a.load()));
  RecordProperty("snapshots_b", std::to_string(seen_b.load()));
  RecordProperty("reloads", Describe(stats));
  EXPECT_EQ(bad.load(), 0u) << first_failure;
  EXPECT_GT(seen_a.load(), 0u);
  EXPECT_GT(seen_b.load(), 0u) << "B was never in force: the test proved nothing";
  EXPECT_GT(stats.rejected, 0u);
  EXPECT_GE(stats.generation, 2u);
  EXPECT_EQ(stats.generation, stats.applied);
  EXPECT_TRUE(store.HasGoodConfig());
}

}  // namespace
}  // namespace registry_proxy
