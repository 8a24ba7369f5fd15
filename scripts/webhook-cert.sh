#!/usr/bin/env bash
# Makes the admission webhook's TLS material with openssl, without cert-manager: a CA (kept and
# reused on later runs, so the caBundle the API server trusts stays valid) and a serving
# certificate for the webhook's Service, plus a kustomize overlay that deploys
# daemonset/node (the node daemon, the Namespace and the ConfigMap) and daemonset/webhook with them.
#
#   scripts/webhook-cert.sh [--namespace NS] [--service NAME] [--days N] OUTDIR
#   kubectl apply -k OUTDIR
#
# Writes OUTDIR/ca.crt, ca.key (keep it private), tls.crt, tls.key and kustomization.yaml
# (the Secret registry-proxy-webhook-tls and the caBundle patch), and prints the caBundle
# (base64 of ca.crt) on stdout. To rotate the serving certificate, run it again with the same
# OUTDIR and apply again: the webhook reloads the new files from the Secret volume by itself.
set -euo pipefail

ns=registry-proxy
svc=registry-proxy-webhook
days=365
usage() { echo "usage: $0 [--namespace NS] [--service NAME] [--days N] OUTDIR" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace) ns=${2:?}; shift 2 ;;
    --service) svc=${2:?}; shift 2 ;;
    --days) days=${2:?}; shift 2 ;;
    -h|--help) usage ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || usage
out=$1
# DNS labels only: they end up in certificate names and YAML.
label='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
[[ $ns =~ $label ]] || { echo "bad namespace '$ns'" >&2; exit 2; }
[[ $svc =~ $label ]] || { echo "bad service name '$svc'" >&2; exit 2; }
[[ $days =~ ^[1-9][0-9]{0,4}$ ]] || { echo "bad --days '$days'" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$out/ca.key" -out "$out/ca.crt" -days 3650 \
    -subj "/CN=registry-proxy-webhook-ca" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }
  echo "made a new CA: $out/ca.crt" >&2
else
  echo "reusing the CA in $out (the caBundle does not change)" >&2
fi

cat > "$tmp/ext.cnf" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$svc,DNS:$svc.$ns,DNS:$svc.$ns.svc,DNS:$svc.$ns.svc.cluster.local
EXT
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout "$tmp/tls.key" -out "$tmp/tls.csr" -subj "/CN=$svc.$ns.svc" 2>"$tmp/log" ||
  { cat "$tmp/log" >&2; exit 1; }
openssl x509 -req -in "$tmp/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$tmp/ext.cnf" \
  -out "$tmp/tls.crt" 2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }
openssl verify -CAfile "$out/ca.crt" "$tmp/tls.crt" >/dev/null
mv "$tmp/tls.key" "$out/tls.key"
mv "$tmp/tls.crt" "$out/tls.crt"

ca_bundle=$(base64 -w0 < "$out/ca.crt")
rel() { realpath --relative-to="$(cd "$out" && pwd)" "$root/daemonset/$1"; }
cat > "$out/kustomization.yaml" <<KUST
# Made by scripts/webhook-cert.sh: daemonset/node and daemonset/webhook, with a CA and serving
# certificate made with openssl. kubectl apply -k $(basename "$out")
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $ns
resources:
  - $(rel node)
  - $(rel webhook)
secretGenerator:
  - name: registry-proxy-webhook-tls
    type: kubernetes.io/tls
    files:
      - tls.crt
      - tls.key
    options:
      disableNameSuffixHash: true  # the Deployment mounts it by name; rotation updates it
patches:
  - target:
      kind: MutatingWebhookConfiguration
      name: registry-proxy
    patch: |-
      - op: add
        path: /webhooks/0/clientConfig/caBundle
        value: $ca_bundle
      - op: replace
        path: /webhooks/0/clientConfig/service/name
        value: $svc
KUST
chmod 644 "$out/ca.crt" "$out/tls.crt" "$out/kustomization.yaml"
echo "serving certificate for $svc.$ns.svc: $out/tls.crt (valid $days days)" >&2
echo "$ca_bundle"
