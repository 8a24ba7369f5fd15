#include <gtest/gtest.h>
TEST(Placeholder, policy_test) { GTEST_SKIP() << "being written"; }
