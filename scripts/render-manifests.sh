#!/usr/bin/env bash
# Writes deploy/manifests.yaml: daemonset/ rendered by kustomize, for `kubectl apply -f` of one
# file. tests/manifests keeps the two equal. Uses $RP_KUBECTL, else kubectl on PATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
kubectl=${RP_KUBECTL:-kubectl}
out=$root/deploy/manifests.yaml
{
  echo "# registry-proxy: the node daemon (an installer DaemonSet puts it under each node's systemd)"
  echo "# and the annotating webhook (it makes and renews its own certificate), in one file:"
  echo "#   kubectl apply -f deploy/manifests.yaml"
  echo "# Generated from daemonset/ by scripts/render-manifests.sh (kubectl kustomize daemonset/);"
  echo "# edit daemonset/ and run the script again. README.md \"Install on a cluster\"."
  "$kubectl" kustomize "$root/daemonset"
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out"
