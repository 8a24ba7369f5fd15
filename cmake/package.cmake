# Host installs from a build tree (README.md "Install the .deb"):
#   ninja dist         -> <build>/dist/opt/registry-proxy/{bin,lib}: the self-contained bundle
#   cpack -G DEB       -> <build>/registry-proxy_<version>_<arch>.deb
#
# The package holds the bundle (scripts/bundle.sh: the binary plus every library but glibc,
# RUNPATH $ORIGIN/../lib) rather than depending on Debian's libgrpc/libprotobuf/libabsl/...
# runtime packages: it is the same set of files `registry-proxy node install` and the installer
# DaemonSet put on a host, so every install runs the same bits, and it installs on any
# distribution with glibc >= the build's (not only on the Debian release it was built on, whose
# gRPC/absl sonames others do not ship). The cost: OpenSSL and the rest are updated by
# rebuilding the package, not by the host's security updates.
set(RP_BUNDLE_SH ${PROJECT_SOURCE_DIR}/scripts/bundle.sh)

add_custom_target(dist
  COMMAND ${RP_BUNDLE_SH} $<TARGET_FILE:registry-proxy> ${CMAKE_BINARY_DIR}/dist
  DEPENDS registry-proxy
  COMMENT "Bundling registry-proxy into ${CMAKE_BINARY_DIR}/dist/opt/registry-proxy"
  VERBATIM)

# The package's files: component "node", excluded from a plain `cmake --install` (which keeps
# installing bin/registry-proxy under the prefix as before).
install(CODE "
  execute_process(
    COMMAND \"${RP_BUNDLE_SH}\" \"$<TARGET_FILE:registry-proxy>\" \"\$ENV{DESTDIR}\${CMAKE_INSTALL_PREFIX}\"
    RESULT_VARIABLE rp_bundle_rc)
  if(NOT rp_bundle_rc EQUAL 0)
    message(FATAL_ERROR \"scripts/bundle.sh failed (\${rp_bundle_rc})\")
  endif()"
  COMPONENT node EXCLUDE_FROM_ALL)
install(FILES ${PROJECT_SOURCE_DIR}/systemd/registry-proxy.service
              ${PROJECT_SOURCE_DIR}/systemd/registry-proxy.socket
        DESTINATION lib/systemd/system COMPONENT node EXCLUDE_FROM_ALL)
install(FILES ${PROJECT_SOURCE_DIR}/config/config.yaml
        DESTINATION etc/registry-proxy COMPONENT node EXCLUDE_FROM_ALL)

set(RP_DEB_MAINTAINER "registry-proxy maintainers <registry-proxy@ketches.cn>"
    CACHE STRING "Maintainer field of the .deb")

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME registry-proxy)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_VENDOR "ketches")
set(CPACK_PACKAGE_CONTACT "${RP_DEB_MAINTAINER}")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "CRI image service shim: pulls public container images through mirrors")
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION
    "registry-proxy sits between kubelet and containerd on the CRI ImageService and pulls
public images (docker.io, registry.k8s.io, gcr.io, ghcr.io, quay.io) through mirrors, as
its configuration (/etc/registry-proxy/config.yaml) says, falling back to upstream.

The daemon runs under systemd (registry-proxy.service) and serves
/run/registry-proxy/registry-proxy.sock. The package does not change kubelet's
configuration: set imageServiceEndpoint to unix:///run/registry-proxy/registry-proxy.sock
and restart kubelet to use it.")
set(CPACK_PACKAGING_INSTALL_PREFIX "/")
set(CPACK_COMPONENTS_ALL node)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_GROUPING ALL_COMPONENTS_IN_ONE)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# The bundle needs glibc only, at least the version it was built against.
execute_process(COMMAND ldd --version OUTPUT_VARIABLE rp_ldd_version ERROR_QUIET)
string(REGEX MATCH "[0-9]+\\.[0-9]+" rp_glibc_version "${rp_ldd_version}")
set(CPACK_DEBIAN_PACKAGE_DEPENDS "libc6 (>= ${rp_glibc_version})")
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS OFF)
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${PROJECT_SOURCE_DIR}/packaging/deb/conffiles
    ${PROJECT_SOURCE_DIR}/packaging/deb/postinst
    ${PROJECT_SOURCE_DIR}/packaging/deb/prerm
    ${PROJECT_SOURCE_DIR}/packaging/deb/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION TRUE)
include(CPack)
