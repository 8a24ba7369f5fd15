// `registry-proxy webhook`: the annotating admission webhook (a Deployment in the cluster).
#pragma once

#include <ostream>
#include <string>
#include <vector>

namespace registry_proxy {

int CmdWebhook(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace registry_proxy
