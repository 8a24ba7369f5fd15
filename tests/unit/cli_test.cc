#include <gtest/gtest.h>
TEST(Placeholder, cli_test) { GTEST_SKIP() << "being written"; }
