# The layering check of one daemon module (run by rp_module in daemon/CMakeLists.txt, at build
# time, before the module compiles): every `#include "M/..."` of one of our modules M in this
# module's files must name the module itself or one it declares in DEPS. A quoted include of
# one of our headers without its folder is refused too. A violation fails the build and says
# where, what, and what the module may use.
#
#   cmake -DMODULE=pull -DALLOWED="base;rules" -DMODULES="base;rules;..." -DFILES="a.cc;b.h"
#         -DSTAMP=out.stamp -P check_layering.cmake
cmake_minimum_required(VERSION 3.18)
set(errors "")
foreach(file IN LISTS FILES)
  file(STRINGS "${file}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*\"")
  foreach(line IN LISTS lines)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*\"([^\"]*)\".*$" "\\1" header "${line}")
    if(header MATCHES "^([^/]+)/")
      set(top "${CMAKE_MATCH_1}")
      if(top IN_LIST MODULES AND NOT top STREQUAL MODULE AND NOT top IN_LIST ALLOWED)
        string(APPEND errors
               "${file}: module '${MODULE}' may not include \"${header}\" (it may use: ${MODULE}"
               " ${ALLOWED}; a new dependency goes into DEPS of rp_module(${MODULE}))\n")
      endif()
    elseif(NOT header STREQUAL "version.h")
      string(APPEND errors
             "${file}: \"${header}\": include our headers with their module folder\n")
    endif()
  endforeach()
endforeach()
if(errors)
  # NOTICE: unwrapped, one line per violation (FATAL_ERROR would fold them).
  message(NOTICE "${errors}")
  message(FATAL_ERROR "layering check of module '${MODULE}' failed")
endif()
file(WRITE "${STAMP}" "ok\n")
