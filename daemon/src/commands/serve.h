// `registry-proxy serve`: the node daemon.
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace registry_proxy {

int CmdServe(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace registry_proxy
