#include <gtest/gtest.h>
TEST(Placeholder, reference_test) { GTEST_SKIP() << "being written"; }
