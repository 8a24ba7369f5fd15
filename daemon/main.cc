// registry-proxy: the whole program is the library; this is only its door.
#include <iostream>

#include "commands/cli.h"

int main(int argc, char** argv) { return registry_proxy::RunCli(argc, argv, std::cout, std::cerr); }
