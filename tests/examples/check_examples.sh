#!/usr/bin/env bash
# Keeps examples/ true. Usage: check_examples.sh REGISTRY_PROXY_BINARY SOURCE_DIR
#
# - Every examples/*.yaml but the Pod is a config that `registry-proxy check-config` accepts.
# - The comment headers hold demonstrations, in this form (see examples/README.md):
#       # $ registry-proxy resolve IMAGE... [--namespace NS] --config examples/THIS.yaml
#       # -> REASON: CANDIDATE (SOURCE), CANDIDATE (SOURCE), ...
#   one "# ->" line per image, right after its "# $" line. Each command is run from the source
#   dir (without --config, with the shipped default config/config.yaml) and its output is
#   reduced to that line: the decision's reason and the candidates in order, each with
#   "(mirror)" or "(upstream)". A config's commands must name the config itself.
# - Every config has at least one demonstration.
# - dockerhub-nginx.yaml is a Pod whose image is the one its demonstration resolves; when a
#   kubectl is on PATH, `kubectl kustomize` (offline) must accept it.
# - examples/README.md has a line for every file, and names no file that is missing.
set -uo pipefail

bin=$1
root=$2
cd "$root" || exit 2
if [ ! -x "$bin" ]; then
  echo "FAIL: no registry-proxy binary at $bin"
  exit 1
fi
fail=0
bad() {
  echo "FAIL: $*"
  fail=1
}

# The reduced form of `resolve`'s text output: one line per image.
reduce() {
  awk '
    /^image: / { if (n++) print line; line = "" ; cands = "" }
    /^decision: / { r = $0; sub(/^decision: */, "", r); sub(/:.*/, "", r); line = r ":" }
    /^  [0-9]+\. / {
      img = $2; src = $3; sub(/^\(/, "", src); sub(/\)$/, "", src)
      line = line (line ~ /:$/ ? " " : ", ") img " (" src ")"
    }
    END { if (n) print line }'
}

# Runs the demonstrations of FILE; SELF is the --config a config's commands must name.
check_demos() {
  local file=$1 self=$2 demos=0 cmd expected actual line args i
  local -a lines
  mapfile -t lines < "$file"
  for ((i = 0; i < ${#lines[@]}; i++)); do
    line=${lines[i]}
    [[ $line == '# $ '* ]] || continue
    cmd=${line#'# $ '}
    demos=$((demos + 1))
    if [[ $cmd != 'registry-proxy resolve '* ]]; then
      bad "$file:$((i + 1)): only 'registry-proxy resolve ...' is checked: $cmd"
      continue
    fi
    read -r -a args <<< "${cmd#registry-proxy }"
    if [[ " ${args[*]} " == *' --config '* ]]; then
      if [ -n "$self" ] && [[ " ${args[*]} " != *" --config $self "* ]]; then
        bad "$file:$((i + 1)): the command should use --config $self: $cmd"
        continue
      fi
    else
      args+=(--config config/config.yaml)
    fi
    expected=""
    while [[ $((i + 1)) -lt ${#lines[@]} && ${lines[i + 1]} == '# -> '* ]]; do
      i=$((i + 1))
      expected+="${lines[i]#'# -> '}"$'\n'
    done
    if [ -z "$expected" ]; then
      bad "$file:$((i + 1)): no '# -> ' line after: $cmd"
      continue
    fi
    if ! actual=$("$bin" "${args[@]}" 2>&1); then
      bad "$file: '$cmd' failed: $actual"
      continue
    fi
    actual=$(reduce <<< "$actual")$'\n'
    if [ "$actual" != "$expected" ]; then
      bad "$file: $cmd"
      echo "  expected: ${expected%$'\n'}"
      echo "  actual:   ${actual%$'\n'}"
    fi
  done
  if [ "$demos" -eq 0 ]; then
    bad "$file: no '# \$ registry-proxy resolve ...' demonstration in its header"
  fi
  echo "$file: $demos demonstration(s) checked"
}

shopt -s nullglob
files=(examples/*.yaml)
[ ${#files[@]} -gt 1 ] || bad "no examples in $root/examples"
for f in "${files[@]}"; do
  if [ "$f" = examples/dockerhub-nginx.yaml ]; then continue; fi
  if ! out=$("$bin" check-config "$f" 2>&1); then
    bad "check-config $f:"$'\n'"$out"
    continue
  fi
  check_demos "$f" "$f"
done

# The Pod.
pod=examples/dockerhub-nginx.yaml
if [ -f "$pod" ]; then
  grep -q '^kind: Pod$' "$pod" || bad "$pod: not kind: Pod"
  grep -q '^apiVersion: v1$' "$pod" || bad "$pod: not apiVersion: v1"
  pod_image=$(sed -n 's/^ *image: *//p' "$pod")
  demo_image=$(sed -n 's/^# \$ registry-proxy resolve \([^ ]*\).*/\1/p' "$pod" | head -n1)
  [ -n "$pod_image" ] && [ "$pod_image" = "$demo_image" ] ||
    bad "$pod: the pod's image '$pod_image' is not the one its header resolves ('$demo_image')"
  check_demos "$pod" ""
  if command -v kubectl > /dev/null 2>&1; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    cp "$pod" "$tmp/pod.yaml"
    printf 'resources: [pod.yaml]\n' > "$tmp/kustomization.yaml"
    if out=$(kubectl kustomize "$tmp" 2>&1); then
      grep -q '^kind: Pod$' <<< "$out" || bad "$pod: kubectl kustomize renders no Pod: $out"
      echo "$pod: kubectl kustomize renders it"
    else
      bad "$pod: kubectl kustomize refuses it: $out"
    fi
  else
    echo "$pod: no kubectl on PATH; kubectl kustomize not run"
  fi
else
  bad "$pod is missing"
fi

# examples/README.md: one line per file.
if [ -f examples/README.md ]; then
  for f in examples/*; do
    name=${f#examples/}
    [ "$name" = README.md ] && continue
    grep -q "\`$name\`" examples/README.md || bad "examples/README.md does not list $name"
  done
  while read -r name; do
    [ -e "examples/$name" ] || bad "examples/README.md lists $name, which does not exist"
  done < <(grep -o '`[^`]*\.yaml`' examples/README.md | tr -d '`' | grep -v / | sort -u)
else
  bad "examples/README.md is missing"
fi

[ "$fail" -eq 0 ] && echo "examples: all true"
exit "$fail"
