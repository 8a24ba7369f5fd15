#!/usr/bin/env bash
# Fetches a package from Debian's newer suites (trixie, sid) and unpacks it into a cache,
# without touching the system's apt sources or dpkg database: a private apt state under the
# cache directory. For tools the tests need in versions Debian 12 lacks (kubectl; containerd
# 1.7 and 2.x), whose Go binaries run on Debian 12.
#
#   scripts/fetch-deb.sh PACKAGE [VERSION-PREFIX]   prints the directory it was unpacked into
#
# PACKAGE=VERSION-PREFIX picks the newest version starting with the prefix (e.g. kubectl 1.32,
# containerd 2.1); without one, the newest of any suite. The cache is $RP_CACHE_DIR, else
# ~/.cache/registry-proxy; an unpacked package is reused. Needs apt-get and dpkg-deb (Debian).
set -euo pipefail
pkg=${1:?usage: fetch-deb.sh PACKAGE [VERSION-PREFIX]}
prefix=${2:-}
cache=${RP_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/registry-proxy}
st=$cache/apt
mkdir -p "$st/lists/partial" "$st/cache/archives/partial"
printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian %s main\n' \
  trixie sid >"$st/sources.list"
A=(-o "Dir::State::Lists=$st/lists" -o "Dir::Cache=$st/cache" -o "Dir::Etc::SourceList=$st/sources.list"
  -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::status=$st/status" -o APT::Sandbox::User=root)
touch "$st/status"
(
  flock 9
  # One index download a day is plenty.
  if [ -z "$(find "$st/lists" -maxdepth 1 -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
    apt-get "${A[@]}" -qq update >&2 || { echo "fetch-deb: apt-get update failed" >&2; exit 1; }
  fi
) 9>"$st/.lock"
version=$(apt-cache "${A[@]}" madison "$pkg" | awk -F'|' '{gsub(/ /,"",$2); print $2}' |
  grep -E "^([0-9]+:)?${prefix//./\\.}" | sort -V | tail -1 || true)
[ -n "$version" ] || { echo "fetch-deb: no $pkg ${prefix:+$prefix* }in trixie or sid" >&2; exit 1; }
dest=$cache/deb/${pkg}_${version//:/%}
if [ ! -f "$dest/.unpacked" ]; then
  (
    flock 9
    if [ ! -f "$dest/.unpacked" ]; then
      echo "fetch-deb: $pkg $version (into $dest)" >&2
      rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
      (cd "$st/cache" && apt-get "${A[@]}" -qq download "$pkg=$version" >&2)
      deb=$(ls "$st/cache/${pkg}_"*"_amd64.deb" 2>/dev/null | grep -F "_${version#*:}_" | head -1)
      [ -n "$deb" ] || { echo "fetch-deb: download of $pkg=$version failed" >&2; exit 1; }
      dpkg-deb -x "$deb" "$dest.tmp"
      touch "$dest.tmp/.unpacked"
      rm -rf "$dest" && mv "$dest.tmp" "$dest"
    fi
  ) 9>"$st/.lock"
fi
echo "$dest"
