// main() for the integration binaries that CTest runs as one entry each (add_test, not
// gtest_discover_tests): like gtest_main, but exits 77 (SKIP_RETURN_CODE) when every test that
// ran was skipped and none failed, so CTest reports the entry as skipped instead of passed, and
// prints why as its last line ("SKIPPED: <reason>"). Some tests skipped and the rest passed: a
// pass, with the skips listed (CTest has no partial skip).
#include <gtest/gtest.h>

#include <iostream>
#include <set>
#include <string>

namespace {

// The messages of the skips in a result ("" for a GTEST_SKIP() without a message).
void SkipMessages(const testing::TestResult& r, std::set<std::string>* out) {
  for (int i = 0; i < r.total_part_count(); ++i) {
    const testing::TestPartResult& p = r.GetTestPartResult(i);
    if (p.skipped()) out->insert(p.message());
  }
}

}  // namespace

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  const testing::UnitTest& u = *testing::UnitTest::GetInstance();
  if (rc != 0 || u.skipped_test_count() == 0) return rc;
  std::set<std::string> why;
  SkipMessages(u.ad_hoc_test_result(), &why);
  for (int s = 0; s < u.total_test_suite_count(); ++s) {
    const testing::TestSuite& suite = *u.GetTestSuite(s);
    SkipMessages(suite.ad_hoc_test_result(), &why);
    for (int t = 0; t < suite.total_test_count(); ++t) {
      SkipMessages(*suite.GetTestInfo(t)->result(), &why);
    }
  }
  std::string reasons;
  for (const std::string& w : why) {
    if (w.empty()) continue;
    reasons += (reasons.empty() ? "" : "; ") + w;
  }
  if (reasons.empty()) reasons = "(no reason given)";
  if (u.skipped_test_count() == u.test_to_run_count()) {
    std::cout << "SKIPPED: all " << u.skipped_test_count() << " tests: " << reasons << std::endl;
    return 77;
  }
  std::cout << "PARTLY SKIPPED: " << u.skipped_test_count() << " of " << u.test_to_run_count()
            << " tests: " << reasons << std::endl;
  return 0;
}
