// The command line: subcommands, flags, help. Output goes to the given streams so tests can
// run every subcommand in-process.
#pragma once

#include <ostream>

namespace registry_proxy {

// Exit codes: 0 success, 1 the command failed (e.g. a bad config), 2 usage error.
int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err);

}  // namespace registry_proxy
