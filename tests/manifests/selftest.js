'use strict';
// Proves that check.js fails when the deployment files are broken: copies what it checks into a
// temp dir, checks the copy as is (must pass), then applies each mutation below to a fresh copy
// and expects check.js to fail with the given message. A mutation whose text is no longer found
// fails too (keep this table in step with the manifests).
//
//   node selftest.js ROOT TMPDIR [BINARY]
const fs = require('fs');
const path = require('path');
const { check, copySources } = require('./check.js');

const [root, tmp, binary] = process.argv.slice(2);
// What the mutations edit is copied; whatever else check.js reads (the Dockerfile's COPY sources)
// is linked.
const COPY = [
  'CMakeLists.txt',
  'Dockerfile',
  '.dockerignore',
  '.github',
  'config',
  'daemonset',
  'deploy',
  'scripts',
];
const LINK = copySources(root).filter((p) => !COPY.includes(p.split('/')[0]));

// [mode, file, text, replacement, expected message]
const MUTATIONS = [
  ['packaging', 'scripts/deps.sh', ' patchelf)', ')', 'RP_BUILD_PKGS lacks patchelf'],
  // Schemas and what kustomize itself refuses.
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'imagePullPolicy: IfNotPresent',
    'imagePullPolicyy: IfNotPresent',
    'unknown field spec.template.spec.containers[0].imagePullPolicyy',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'terminationGracePeriodSeconds: 15',
    'terminationGracePeriodSeconds: "15"',
    'terminationGracePeriodSeconds must be integer',
  ],
  [
    'manifests',
    'daemonset/cert-manager/certificates.yaml',
    'dnsNames:',
    'dnsName:',
    'unknown field spec.dnsName',
  ],
  [
    'manifests',
    'daemonset/node/kustomization.yaml',
    '      - config.yaml',
    '      - ../../config/config.yaml',
    'kubectl kustomize failed',
  ],
  // The issue that kustomize refused: an overlay inside its own base.
  [
    'manifests',
    'daemonset/kustomization.yaml',
    '  - webhook\n',
    '  - webhook\n  - cert-manager\n',
    'kubectl kustomize failed',
  ],
  // The default install takes no cert-manager, and the single file is its rendering.
  [
    'manifests',
    'daemonset/kustomization.yaml',
    '  - webhook\n',
    '  - webhook\n  - cert-manager/certificates.yaml\n',
    'Certificate/registry-proxy-webhook-ca is a cert-manager kind',
  ],
  [
    'manifests',
    'deploy/manifests.yaml',
    'replicas: 2',
    'replicas: 3',
    'differs from `kubectl kustomize daemonset`',
  ],
  [
    'manifests',
    'daemonset/version/kustomization.yaml',
    'newTag: ',
    'newTag: 9',
    'is not the CMake project version',
  ],
  // Consistency of each set.
  [
    'manifests',
    'daemonset/webhook/service.yaml',
    'targetPort: https',
    'targetPort: http',
    'targetPort http is not a container port',
  ],
  [
    'manifests',
    'daemonset/cert-manager/kustomization.yaml',
    'secretName: registry-proxy-webhook-tls',
    'secretName: registry-proxy-webhook-tlz',
    'no Secret registry-proxy-webhook-tlz and no Certificate that makes it',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'mountPath: /etc/registry-proxy/tls',
    'mountPath: /etc/registry-proxy/certs',
    '--tls-cert /etc/registry-proxy/tls/tls.crt is in no volume mount',
  ],
  [
    'manifests',
    'daemonset/cert-manager/kustomization.yaml',
    '--tls-key=/etc/registry-proxy/tls/tls.key',
    '--tls-key=/etc/registry-proxy/tls/key.pem',
    'Secret registry-proxy-webhook-tls has no key key.pem',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    '--config=/etc/registry-proxy/config/config.yaml',
    '--config=/etc/registry-proxy/config/conf.yaml',
    'ConfigMap registry-proxy-config has no key conf.yaml',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'port: metrics',
    'port: https',
    'is not the --metrics-address port',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'readOnlyRootFilesystem: true',
    'readOnlyRootFilesystem: false',
    'readOnlyRootFilesystem must be true',
  ],
  // The webhook's own certificate: what it writes, what it may touch.
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'emptyDir:\n            medium: Memory\n            sizeLimit: 1Mi',
    'secret:\n            secretName: registry-proxy-webhook-tls',
    'it must be in a writable emptyDir mount',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    'automountServiceAccountToken: true',
    'automountServiceAccountToken: false',
    'automountServiceAccountToken must not be false',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    '--webhook-configuration=registry-proxy',
    '--webhook-configuration=registry-proxi',
    '--webhook-configuration registry-proxi: not in this set',
  ],
  [
    'manifests',
    'daemonset/webhook/deployment.yaml',
    '            - --webhook-configuration=registry-proxy\n',
    '',
    'nobody sets the caBundle',
  ],
  [
    'manifests',
    'daemonset/webhook/rbac.yaml',
    'verbs: ["get", "update"]',
    'verbs: ["get"]',
    'may not update Secret registry-proxy-webhook-tls',
  ],
  [
    'manifests',
    'daemonset/webhook/rbac.yaml',
    '    resourceNames: ["registry-proxy"]\n',
    '',
    'a rule without resourceNames',
  ],
  [
    'manifests',
    'daemonset/webhook/rbac.yaml',
    'verbs: ["get", "patch"]',
    'verbs: ["get", "patch", "list"]',
    'verb list is more than it needs',
  ],
  [
    'manifests',
    'daemonset/webhook/secret.yaml',
    'type: Opaque',
    'type: Opaque\ndata:\n  tls.crt: eA==',
    'must ship empty',
  ],
  [
    'manifests',
    'daemonset/cert-manager/kustomization.yaml',
    '            automountServiceAccountToken: false\n',
    '',
    'the webhook needs no API access: automountServiceAccountToken: false',
  ],
  [
    'manifests',
    'daemonset/cert-manager/kustomization.yaml',
    'kind: MutatingWebhookConfiguration\n      name: registry-proxy\n',
    'kind: MutatingWebhookConfiguration\n      name: registry-proxi\n',
    'no caBundle, no cert-manager.io/inject-ca-from',
  ],
  [
    'manifests',
    'daemonset/cert-manager/certificates.yaml',
    '    - registry-proxy-webhook.registry-proxy.svc\n',
    '',
    'does not name registry-proxy-webhook.registry-proxy.svc',
  ],
  // The webhook configuration.
  [
    'manifests',
    'daemonset/webhook/mutatingwebhookconfiguration.yaml',
    '        name: registry-proxy-webhook',
    '        name: registry-proxy-hook',
    'clientConfig.service registry-proxy/registry-proxy-hook is not a Service of this set',
  ],
  [
    'manifests',
    'daemonset/webhook/mutatingwebhookconfiguration.yaml',
    'port: 443',
    'port: 8443',
    'Service registry-proxy-webhook has no port 8443',
  ],
  [
    'manifests',
    'daemonset/webhook/mutatingwebhookconfiguration.yaml',
    'failurePolicy: Ignore',
    'failurePolicy: Fail',
    'failurePolicy must be Ignore',
  ],
  [
    'manifests',
    'daemonset/webhook/mutatingwebhookconfiguration.yaml',
    'kube-node-lease, registry-proxy]',
    'kube-node-lease]',
    'namespaceSelector sends namespace registry-proxy',
  ],
  [
    'manifests',
    'daemonset/webhook/pdb.yaml',
    'app.kubernetes.io/name: registry-proxy-webhook',
    'app.kubernetes.io/name: registry-proxy-webhooks',
    'its selector selects no workload',
  ],
  [
    'manifests',
    'daemonset/webhook/kustomization.yaml',
    '  - pdb.yaml\n',
    '',
    'no PodDisruptionBudget',
  ],
  // The node daemon's installer and uninstaller.
  [
    'manifests',
    'daemonset/node/config.yaml',
    'enabled: true',
    'enabled: false',
    'differs from config/config.yaml',
  ],
  [
    'manifests',
    'daemonset/node/namespace.yaml',
    'enforce: privileged',
    'enforce: baseline',
    'which does not allow it',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '            - --configure-crictl\n',
    '',
    'node install without --configure-crictl',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '            - --configure-crictl\n',
    '            - --configure-crictl\n            - --watch\n',
    'node install --watch keeps a privileged container running',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '      hostPID: true\n',
    '',
    'needs hostPID',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '            runAsUser: 65532\n            runAsGroup: 65532\n            runAsNonRoot: true',
    '            runAsUser: 0\n            runAsGroup: 0\n            runAsNonRoot: false',
    'in a hostPID pod it must run as a non-root uid',
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '      automountServiceAccountToken: false\n',
    '      automountServiceAccountToken: false\n      hostPID: true\n',
    'its pod must not have hostPID',
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '            - sync-config\n',
    '            - install\n',
    'node install belongs in an init container',
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '            privileged: false',
    '            privileged: true',
    "only node install/uninstall may be privileged or mount the host's /",
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '              drop: [ALL]',
    '              drop: [NET_RAW]',
    'must drop ALL capabilities',
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '            path: /etc/registry-proxy\n            type: Directory',
    '            path: /etc/registry-proxy\n            type: DirectoryOrCreate',
    'hostPath /etc/registry-proxy must be of type Directory',
  ],
  [
    'manifests',
    'daemonset/node/config-sync.yaml',
    '            path: /run/registry-proxy',
    '            path: /run',
    'is not in a mount of the host\'s /run/registry-proxy',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '              mountPath: /host\n',
    '              mountPath: /hostroot\n',
    '--host-root /host is not where',
  ],
  [
    'manifests',
    'daemonset/node/installer.yaml',
    '      priorityClassName: system-node-critical',
    '      priorityClassName: system-cluster-critical',
    'priorityClassName must be system-node-critical',
  ],
  [
    'manifests',
    'daemonset/uninstall/uninstaller.yaml',
    '- operator: Exists',
    '- operator: Exists\n          key: dedicated',
    'must tolerate every taint',
  ],
  [
    'packaging',
    'Dockerfile',
    'COPY proto proto',
    'COPY protos protos',
    'COPY source protos does not exist',
  ],
  ['packaging', '.dockerignore', '/dist', '/dist\nsystemd', 'COPY source systemd is excluded'],
  [
    'packaging',
    'Dockerfile',
    'USER 65532:65532',
    'USER 1000:1000',
    'USER 1000 but the webhook Deployment runs as 65532',
  ],
  [
    'packaging',
    'Dockerfile',
    'FROM debian:12-slim',
    'FROM debian:12-slim AS runtime\nCOPY --from=builder /x /x',
    'COPY --from=builder: no such stage',
  ],
  [
    'packaging',
    'Dockerfile',
    'source="https://github.com/ketches/',
    'source="https://github.com/other/',
    'org.opencontainers.image.source is https://github.com/other/',
  ],
  [
    'packaging',
    '.github/workflows/image.yml',
    'IMAGE: ghcr.io/ketches/registry-proxy',
    'IMAGE: ghcr.io/other/registry-proxy',
    'env IMAGE is ghcr.io/other/registry-proxy',
  ],
  [
    'packaging',
    '.github/workflows/ci.yml',
    'run: bash .ci/run',
    'run: bash scripts/test.sh',
    'no workflow runs .ci/run',
  ],
  [
    'packaging',
    '.github/workflows/ci.yml',
    'jobs:',
    'jobs:\n  broken: [',
    '.github/workflows/ci.yml',
  ],
  [
    'packaging',
    '.github/workflows/image.yml',
    'actions/checkout@v4',
    'actions/checkout',
    'uses actions/checkout: pin a version',
  ],
];
if (binary) {
  MUTATIONS.push([
    'manifests',
    'daemonset/webhook/deployment.yaml',
    '--shutdown-delay=5',
    '--shutdown-delai=5',
    'registry-proxy webhook has no flag --shutdown-delai',
  ]);
}

function run(mode, dir) {
  const problems = check(mode, dir, {
    binary: mode === 'manifests' ? binary : null,
    log: () => {},
  });
  return { status: problems.length ? 1 : 0, out: problems.map((p) => `FAIL ${p}`).join('\n') };
}
function fresh(dir) {
  fs.rmSync(dir, { recursive: true, force: true });
  for (const p of COPY) fs.cpSync(path.join(root, p), path.join(dir, p), { recursive: true });
  for (const p of LINK) {
    fs.mkdirSync(path.dirname(path.join(dir, p)), { recursive: true });
    fs.symlinkSync(path.resolve(root, p), path.join(dir, p));
  }
}

let failed = 0;
const base = path.join(tmp, 'tree');
fresh(base);
for (const mode of ['manifests', 'packaging']) {
  const r = run(mode, base);
  if (r.status !== 0) {
    console.error(`FAIL: the unmodified copy does not pass ${mode}:\n${r.out}`);
    process.exit(1);
  }
}
for (const [mode, file, from, to, expected] of MUTATIONS) {
  const name = `${file}: '${from.split('\n')[0]}' -> '${to.split('\n')[0]}'`;
  fresh(base);
  const f = path.join(base, file);
  const text = fs.readFileSync(f, 'utf8');
  if (!text.includes(from)) {
    console.error(`FAIL ${name}: text not found (update tests/manifests/selftest.js)`);
    failed++;
    continue;
  }
  fs.writeFileSync(f, text.replace(from, to));
  const r = run(mode, base);
  if (r.status === 1 && r.out.includes(expected)) {
    console.log(
      `ok   ${name}: ${r.out
        .split('\n')
        .find((l) => l.includes(expected))
        .trim()}`,
    );
  } else {
    console.error(`FAIL ${name}: expected exit 1 with '${expected}', got ${r.status}:\n${r.out}`);
    failed++;
  }
}
console.log(`${MUTATIONS.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
