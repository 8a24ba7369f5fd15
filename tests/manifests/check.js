'use strict';
// Offline checks of what deploys registry-proxy (run by tests/manifests/run.sh, a ctest entry):
//
//   node check.js manifests ROOT [--binary BIN]
//       Renders every kustomization under ROOT/daemonset with the real kustomize (`kubectl
//       kustomize`, the kubectl named by $RP_KUBECTL), validates every object against the
//       Kubernetes OpenAPI schemas (kubernetes-models, Kubernetes 1.27) and cert-manager's CRD
//       schemas, rejects unknown fields (as `kubectl apply`'s strict field validation does), and
//       checks that the pieces fit together: one image, ports, volumes, ConfigMap/Secret
//       references, Service <-> webhook configuration, selectors, the webhook's certificate
//       (its own, with RBAC narrowed to its objects, or cert-manager's), the installer contract,
//       and (with --binary) that every flag the manifests pass exists. The default install
//       (daemonset/) has nothing of cert-manager, and deploy/manifests.yaml is its rendering.
//   node check.js packaging ROOT
//       The Dockerfile (stages, COPY sources, user, entrypoint, image name) and the GitHub
//       workflows (they parse; the image workflow publishes the manifests' image on tags).
//   node check.js copy-sources ROOT
//       Prints the Dockerfile's COPY sources (run.sh configures CMake from just those).
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');
const YAML = require('yaml');

const errors = [];
let ROOT = '';
const rel = (p) => path.relative(ROOT, p) || '.';
const fail = (where, msg) => errors.push(`${where}: ${msg}`);
class RenderError extends Error {}

// ---------------------------------------------------------------------------------------------
// YAML

function readYamlDocs(file) {
  const text = fs.readFileSync(file, 'utf8');
  const out = [];
  const docs = YAML.parseAllDocuments(text, { uniqueKeys: true, prettyErrors: true });
  if (!Array.isArray(docs)) throw new RenderError(`${rel(file)}: not YAML documents`);
  docs.forEach((d, i) => {
    if (d.errors.length) throw new RenderError(`${rel(file)}: ${d.errors[0].message}`);
    const js = d.toJS({ maxAliasCount: 100 });
    if (js !== null && js !== undefined) out.push({ obj: js, src: `${rel(file)}#${i}` });
  });
  return out;
}

const isMap = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const clone = (v) => JSON.parse(JSON.stringify(v));

// ---------------------------------------------------------------------------------------------
// Rendering: the real kustomize

const CLUSTER_SCOPED = new Set([
  'Namespace',
  'MutatingWebhookConfiguration',
  'ValidatingWebhookConfiguration',
  'ClusterRole',
  'ClusterRoleBinding',
  'ClusterIssuer',
  'PriorityClass',
  'CustomResourceDefinition',
  'PersistentVolume',
]);
const WORKLOADS = new Set(['Deployment', 'DaemonSet', 'StatefulSet', 'ReplicaSet', 'Job']);

function podSpecOf(o) {
  if (WORKLOADS.has(o.kind)) return o.spec?.template?.spec;
  if (o.kind === 'Pod') return o.spec;
  if (o.kind === 'CronJob') return o.spec?.jobTemplate?.spec?.template?.spec;
  return undefined;
}
const containersOf = (spec) => [...(spec?.initContainers || []), ...(spec?.containers || [])];

function kustomizationFile(dir) {
  for (const n of ['kustomization.yaml', 'kustomization.yml', 'Kustomization']) {
    const f = path.join(dir, n);
    if (fs.existsSync(f)) return f;
  }
  return null;
}

const KUBECTL = process.env.RP_KUBECTL || 'kubectl';

// `kubectl kustomize DIR`: its output text, or a RenderError with kustomize's own words.
function kustomize(dir) {
  try {
    return execFileSync(KUBECTL, ['kustomize', dir], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      maxBuffer: 64 << 20,
    });
  } catch (e) {
    const why = (e.stderr || e.message).toString().trim();
    throw new RenderError(`${rel(dir)}: ${KUBECTL} kustomize failed: ${why}`);
  }
}

function parseRendered(text, name) {
  const out = [];
  YAML.parseAllDocuments(text, { uniqueKeys: true }).forEach((d, i) => {
    if (d.errors.length) throw new RenderError(`${name}: output #${i}: ${d.errors[0].message}`);
    const obj = d.toJS({ maxAliasCount: 100 });
    if (obj) out.push({ obj, src: `${name}#${i} (${obj.kind}/${obj.metadata?.name})` });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Schemas: kubernetes-models' compiled JSON-schema validators, plus unknown fields from the
// packages' TypeScript declarations (the OpenAPI schemas allow extra properties; the API server's
// strict field validation, kubectl's default, does not).

const NODE_MODULES = process.env.RP_NODE_MODULES || '';

function modelPath(apiVersion, kind) {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : ['', apiVersion];
  if (group.endsWith('cert-manager.io')) {
    return `@kubernetes-models/cert-manager/${group}/${version}/${kind}`;
  }
  return group
    ? `kubernetes-models/${group}/${version}/${kind}`
    : `kubernetes-models/${version}/${kind}`;
}

class Declarations {
  constructor() {
    this.files = new Map();
  }

  file(p) {
    if (this.files.has(p)) return this.files.get(p);
    const text = fs
      .readFileSync(p, 'utf8')
      .replace(/\/\*[\s\S]*?\*\//g, ' ')
      .replace(/^\s*\/\/.*$/gm, ' ');
    const imports = new Map();
    for (const m of text.matchAll(/(?:import|export)\s*\{([^}]*)\}\s*from\s*"([^"]+)"/g)) {
      for (const part of m[1]
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean)) {
        const [orig, local] = part.split(/\s+as\s+/);
        imports.set((local || orig).trim(), { name: orig.trim(), spec: m[2] });
      }
    }
    const aliases = new Map();
    for (const m of text.matchAll(/export\s*\{([^}]*)\}/g)) {
      for (const part of m[1]
        .split(',')
        .map((s) => s.trim())
        .filter(Boolean)) {
        const [local, exported] = part.split(/\s+as\s+/);
        if (exported) aliases.set(exported.trim(), local.trim());
      }
    }
    const f = { path: p, text, imports, aliases, types: new Map() };
    this.files.set(p, f);
    return f;
  }

  resolveSpec(from, spec) {
    const base = spec.startsWith('.')
      ? path.resolve(path.dirname(from), spec)
      : path.join(NODE_MODULES, spec);
    if (fs.existsSync(`${base}.d.ts`)) return `${base}.d.ts`;
    const pkg = path.join(base, 'package.json');
    if (fs.existsSync(pkg)) {
      const types = JSON.parse(fs.readFileSync(pkg, 'utf8')).types;
      if (types) return path.join(base, types);
    }
    return path.join(base, 'index.d.ts');
  }

  // The type called `name` in declaration file `p` (null when it cannot be found).
  lookup(p, name, depth = 0) {
    if (depth > 10) return null;
    const f = this.file(p);
    if (f.types.has(name)) return f.types.get(name);
    const local = f.aliases.get(name) || name;
    let type = null;
    const iface = new RegExp(
      `(?:^|\\s)interface\\s+${local}(?:\\s+extends\\s+([\\w\\s,]+?))?\\s*\\{`,
    ).exec(f.text);
    const alias = new RegExp(`(?:^|\\s)type\\s+${local}\\s*=`).exec(f.text);
    if (iface) {
      type = new TypeParser(f.text, iface.index + iface[0].length - 1, p).parseType();
      for (const base of (iface[1] || '')
        .split(',')
        .map((b) => b.trim())
        .filter(Boolean)) {
        const b = this.deref({ k: 'ref', name: base, file: p });
        if (!b || b.k !== 'obj') throw new Error(`${p}: ${local} extends ${base}, not found`);
        for (const [k, v] of b.props) if (!type.props.has(k)) type.props.set(k, v);
      }
    } else if (alias) {
      type = new TypeParser(f.text, alias.index + alias[0].length, p).parseType();
    } else if (f.imports.has(local)) {
      const imp = f.imports.get(local);
      type = this.lookup(this.resolveSpec(p, imp.spec), imp.name, depth + 1);
    } else {
      for (const m of f.text.matchAll(/export\s*\*\s*from\s*"([^"]+)"/g)) {
        type = this.lookup(this.resolveSpec(p, m[1]), name, depth + 1);
        if (type) break;
      }
    }
    f.types.set(name, type);
    return type;
  }

  deref(t) {
    let guard = 0;
    while (t && t.k === 'ref' && guard++ < 20) t = this.lookup(t.file, t.name);
    return t;
  }

  // Unknown fields of `value` under type `t`: a list of JSON paths.
  unknownFields(value, t, at, out) {
    t = this.deref(t);
    if (!t) return out;
    if (t.k === 'arr') {
      if (Array.isArray(value))
        value.forEach((v, i) => this.unknownFields(v, t.of, `${at}[${i}]`, out));
    } else if (t.k === 'union') {
      const objs = t.of
        .map((m) => this.deref(m))
        .filter((m) => m && (m.k === 'obj' || m.k === 'union'));
      if (isMap(value) && objs.length) {
        const tries = objs.map((m) => this.unknownFields(value, m, at, []));
        if (!tries.some((r) => r.length === 0)) out.push(...tries[0]);
      }
    } else if (t.k === 'obj' && isMap(value)) {
      for (const [key, v] of Object.entries(value)) {
        if (t.props.has(key)) this.unknownFields(v, t.props.get(key), `${at}.${key}`, out);
        else if (t.index) this.unknownFields(v, t.index, `${at}.${key}`, out);
        else out.push(`${at}.${key}`);
      }
    }
    return out;
  }
}

// A parser for the TypeScript type expressions the declarations use: object literals (with index
// signatures), Array<T>, T[], unions, literals, primitives and references to named types.
class TypeParser {
  constructor(text, pos, file) {
    this.text = text;
    this.pos = pos;
    this.file = file;
  }

  peek() {
    const re =
      /\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|-?\d+(?:\.\d+)?|[A-Za-z_$][\w$.]*|[{}<>[\]();:?|,=&])/y;
    re.lastIndex = this.pos;
    const m = re.exec(this.text);
    return m ? { tok: m[1], end: re.lastIndex } : { tok: '', end: this.pos };
  }

  next() {
    const t = this.peek();
    this.pos = t.end;
    return t.tok;
  }

  expect(tok) {
    const got = this.next();
    if (got !== tok)
      throw new Error(`${this.file}: expected '${tok}', got '${got}' at ${this.pos}`);
  }

  parseType() {
    if (this.peek().tok === '|') this.next();
    const of = [this.parsePostfix()];
    while (this.peek().tok === '|' || this.peek().tok === '&') {
      this.next();
      of.push(this.parsePostfix());
    }
    return of.length === 1 ? of[0] : { k: 'union', of };
  }

  parsePostfix() {
    let t = this.parsePrimary();
    while (this.peek().tok === '[') {
      this.next();
      this.expect(']');
      t = { k: 'arr', of: t };
    }
    return t;
  }

  parsePrimary() {
    const tok = this.next();
    if (tok === '{') return this.parseMembers();
    if (tok === '(') {
      const t = this.parseType();
      this.expect(')');
      return t;
    }
    if (/^["'\d-]/.test(tok)) return { k: 'prim' };
    if (/^[A-Za-z_$]/.test(tok)) {
      if (this.peek().tok === '<') {
        this.next();
        const args = [this.parseType()];
        while (this.peek().tok === ',') {
          this.next();
          args.push(this.parseType());
        }
        this.expect('>');
        return tok === 'Array' ? { k: 'arr', of: args[0] } : { k: 'prim' };
      }
      if (
        [
          'string',
          'number',
          'boolean',
          'any',
          'unknown',
          'object',
          'null',
          'undefined',
          'true',
          'false',
          'never',
        ].includes(tok)
      ) {
        return { k: 'prim' };
      }
      return { k: 'ref', name: tok, file: this.file };
    }
    throw new Error(`${this.file}: unexpected '${tok}' at ${this.pos}`);
  }

  parseMembers() {
    const props = new Map();
    let index = null;
    for (;;) {
      let tok = this.next();
      if (tok === '}') break;
      if (tok === ';' || tok === ',') continue;
      if (tok === 'readonly') tok = this.next();
      if (tok === '[') {
        this.next();
        this.expect(':');
        this.next();
        this.expect(']');
        this.expect(':');
        index = this.parseType();
        continue;
      }
      const name = tok.replace(/^["']|["']$/g, '');
      if (this.peek().tok === '?') this.next();
      this.expect(':');
      props.set(name, this.parseType());
    }
    return { k: 'obj', props, index };
  }
}

const declarations = new Declarations();

function validateSchema(it) {
  const o = it.obj;
  const where = `${it.src} ${o.kind}/${o.metadata?.name}`;
  if (!o.apiVersion || !o.kind) return fail(it.src, 'no apiVersion or kind');
  const mp = modelPath(o.apiVersion, o.kind);
  let Model;
  try {
    Model = require(mp)[o.kind];
  } catch (e) {
    return fail(where, `no schema for ${o.apiVersion} ${o.kind} (${mp}): unknown kind?`);
  }
  if (typeof Model !== 'function') return fail(where, `no model ${o.kind} in ${mp}`);
  try {
    new Model(clone(o)).validate();
  } catch (e) {
    fail(where, `schema: ${e.message}`);
  }
  const dts = path.join(NODE_MODULES, `${mp}.d.ts`);
  if (!fs.existsSync(dts)) return fail(where, `no declarations ${dts}`);
  try {
    const root = { k: 'ref', name: `I${o.kind}`, file: dts };
    if (!declarations.deref(root)) return fail(where, `no interface I${o.kind} in ${dts}`);
    for (const f of declarations.unknownFields(o, root, '', [])) {
      fail(where, `unknown field ${f.slice(1)} (kubectl apply would reject it)`);
    }
  } catch (e) {
    fail(where, `reading the declarations: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Consistency of one applyable set of objects

function cmakeVersion() {
  const m = /project\(registry-proxy\s+VERSION\s+([0-9.]+)/.exec(
    fs.readFileSync(path.join(ROOT, 'CMakeLists.txt'), 'utf8'),
  );
  if (!m) throw new RenderError('CMakeLists.txt: no project(registry-proxy VERSION x.y.z)');
  return m[1];
}

// The image every container runs: the one `images:` entry of the component every variant
// includes (daemonset/version), whose tag must be the CMake project version.
const VERSION_FILE = 'daemonset/version/kustomization.yaml';
function expectedImage() {
  const k = readYamlDocs(path.join(ROOT, VERSION_FILE))[0].obj;
  if (k.kind !== 'Component' || !k.images || k.images.length !== 1) {
    throw new RenderError(`${VERSION_FILE}: expected a Component with exactly one images: entry`);
  }
  const img = k.images[0];
  const name = img.newName || img.name;
  if (!/^ghcr\.io\/[a-z0-9-]+\/[a-z0-9-]+$/.test(name)) {
    throw new RenderError(`${VERSION_FILE}: image ${name} is not ghcr.io/ORG/NAME`);
  }
  const version = cmakeVersion();
  if (String(img.newTag) !== version) {
    fail(VERSION_FILE, `image tag ${img.newTag} is not the CMake project version ${version}`);
  }
  return { name, ref: `${name}:${version}` };
}

const objKey = (kind, ns, name) => `${kind}/${ns || ''}/${name}`;
const labelsMatch = (selector, labels) =>
  Object.entries(selector || {}).every(([k, v]) => (labels || {})[k] === v);

function argValues(args) {
  // `--flag=value` and `--flag value` alike: every value-looking token.
  const out = [];
  for (const a of args || []) {
    const eq = a.startsWith('--') ? a.indexOf('=') : -1;
    out.push(eq >= 0 ? a.slice(eq + 1) : a);
  }
  return out;
}
function flagValue(args, flag) {
  args = args || [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === flag) return args[i + 1];
    if (args[i].startsWith(`${flag}=`)) return args[i].slice(flag.length + 1);
  }
  return undefined;
}
function portOf(addr) {
  const m = /:(\d+)$/.exec(addr || '');
  return m ? Number(m[1]) : undefined;
}

// Every `registry-proxy SUBCOMMAND... --flag` a container runs: its args (the image's entrypoint is
// registry-proxy), and the lines of shell scripts and exec probes that call it.
function invocations(c) {
  const out = [];
  const fromTokens = (tokens) => {
    const sub = [];
    let i = 0;
    while (i < tokens.length && !tokens[i].startsWith('-')) sub.push(tokens[i++]);
    const flags = tokens
      .slice(i)
      .filter((t) => t.startsWith('--'))
      .map((t) => t.split('=')[0]);
    out.push({ sub, flags });
  };
  const fromScript = (script) => {
    for (const line of script.split(/\n|&&|;/)) {
      const m = /(?:^|\s)registry-proxy\s+(.*)$/.exec(line.replace(/>\S*/g, ' '));
      if (m) fromTokens(m[1].trim().split(/\s+/));
    }
  };
  const fromArgv = (argv) => {
    if (!argv || !argv.length) return;
    if (/(^|\/)(ba)?sh$/.test(argv[0])) {
      const i = argv.indexOf('-c');
      if (i >= 0 && argv[i + 1]) fromScript(argv[i + 1]);
    } else if (/(^|\/)registry-proxy$/.test(argv[0])) {
      fromTokens(argv.slice(1));
    }
  };
  if (c.command) fromArgv([...c.command, ...(c.args || [])]);
  else fromTokens(c.args || []);
  for (const probe of [c.readinessProbe, c.livenessProbe, c.startupProbe]) {
    if (probe?.exec?.command) fromArgv(probe.exec.command);
  }
  return out;
}

// `BINARY SUB... --help`, asked once per subcommand.
const helpCache = new Map();
function helpOf(binary, sub) {
  const key = [binary, ...sub].join(' ');
  if (!helpCache.has(key)) {
    try {
      helpCache.set(
        key,
        execFileSync(binary, [...sub, '--help'], {
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'pipe'],
        }),
      );
    } catch (e) {
      helpCache.set(key, { error: (e.stderr || e.message).toString().trim().split('\n')[0] });
    }
  }
  return helpCache.get(key);
}

// The rules bound to a ServiceAccount (Roles in its namespace through RoleBindings, and
// ClusterRoles through ClusterRoleBindings), each with where it came from.
function rulesOf(objs, ns, sa) {
  const out = [];
  const isSubject = (b) =>
    (b.subjects || []).some(
      (x) => x.kind === 'ServiceAccount' && x.name === sa && (x.namespace || b.metadata.namespace) === ns,
    );
  for (const b of objs.filter((o) => /^(Cluster)?RoleBinding$/.test(o.kind) && isSubject(o))) {
    if (b.kind === 'RoleBinding' && b.metadata.namespace !== ns) continue;
    const ref = b.roleRef || {};
    const role = objs.find(
      (r) =>
        r.kind === ref.kind &&
        r.metadata.name === ref.name &&
        (r.kind === 'ClusterRole' || r.metadata.namespace === b.metadata.namespace),
    );
    if (!role) {
      out.push({ missing: `${b.kind}/${b.metadata.name} refers to ${ref.kind}/${ref.name}, not in this set` });
      continue;
    }
    const scope = b.kind === 'ClusterRoleBinding' ? '' : b.metadata.namespace;
    for (const rule of role.rules || []) out.push({ rule, scope, from: `${role.kind}/${role.metadata.name}` });
  }
  return out;
}

// The webhook's certificate. With --tls-secret it keeps its own: it writes --tls-cert/--tls-key
// into a writable emptyDir, reads and updates the Secret (shipped empty: it is not allowed to
// create one), patches its MutatingWebhookConfiguration's caBundle, and may do nothing else
// (every rule names its objects). Without it, it never talks to the API server: no token.
function checkWebhookTls(o, c, cw, { objs, find, volumes, selfCaBundles }) {
  const spec = podSpecOf(o);
  const args = c.args || [];
  const ns = o.metadata.namespace;
  const sa = spec.serviceAccountName || 'default';
  const rules = rulesOf(objs, ns, sa);
  const secretName = flagValue(args, '--tls-secret');
  if (!secretName) {
    if (spec.automountServiceAccountToken !== false) {
      fail(cw, 'without --tls-secret the webhook needs no API access: automountServiceAccountToken: false');
    }
    if (rules.length) fail(cw, `without --tls-secret its ServiceAccount ${sa} must have no rules`);
    return;
  }
  for (const f of ['--tls-cert', '--tls-key']) {
    const file = flagValue(args, f) || '';
    const m = (c.volumeMounts || []).find((x) => file.startsWith(`${x.mountPath}/`));
    const v = m && volumes.get(m.name);
    if (!v?.emptyDir || m.readOnly) {
      fail(cw, `--tls-secret writes ${f} ${file}: it must be in a writable emptyDir mount`);
    }
  }
  if (spec.automountServiceAccountToken === false) {
    fail(cw, '--tls-secret talks to the API server: automountServiceAccountToken must not be false');
  }
  for (const r of rules) if (r.missing) fail(cw, r.missing);
  const allows = (group, resource, name, verb, scope) =>
    rules.some(
      ({ rule, scope: sc }) =>
        rule &&
        sc === scope &&
        (rule.apiGroups || []).includes(group) &&
        (rule.resources || []).includes(resource) &&
        (rule.resourceNames || []).includes(name) &&
        (rule.verbs || []).includes(verb),
    );
  for (const { rule, from } of rules.filter((r) => r.rule)) {
    if (!(rule.resourceNames || []).length) fail(cw, `${from}: a rule without resourceNames`);
    for (const v of rule.verbs || []) {
      if (!['get', 'update', 'patch'].includes(v)) fail(cw, `${from}: verb ${v} is more than it needs`);
    }
  }
  const secret = find('Secret', ns, secretName);
  if (!secret) fail(cw, `--tls-secret ${secretName}: no such Secret in this set (it may not create one)`);
  else if (Object.keys({ ...secret.data, ...secret.stringData }).length) {
    fail(cw, `Secret ${secretName} must ship empty: an apply would overwrite what the webhook made`);
  }
  for (const verb of ['get', 'update']) {
    if (!allows('', 'secrets', secretName, verb, ns)) {
      fail(cw, `ServiceAccount ${sa} may not ${verb} Secret ${secretName}`);
    }
  }
  const mwc = flagValue(args, '--webhook-configuration');
  const service = flagValue(args, '--service') || 'registry-proxy-webhook';
  if (!mwc) return fail(cw, '--tls-secret without --webhook-configuration: nobody sets the caBundle');
  if (!find('MutatingWebhookConfiguration', '', mwc)) {
    fail(cw, `--webhook-configuration ${mwc}: not in this set`);
  }
  for (const verb of ['get', 'patch']) {
    if (!allows('admissionregistration.k8s.io', 'mutatingwebhookconfigurations', mwc, verb, '')) {
      fail(cw, `ServiceAccount ${sa} may not ${verb} MutatingWebhookConfiguration ${mwc}`);
    }
  }
  const svc = find('Service', ns, service);
  if (!svc || !labelsMatch(svc.spec?.selector, o.spec?.template?.metadata?.labels)) {
    fail(cw, `--service ${service} is not a Service of this set that selects this webhook`);
  }
  selfCaBundles.add(`${mwc}/${ns}/${service}`);
}

function checkSet(name, items, image, binary) {
  const objs = items.map((it) => it.obj);
  const where = (o) => `${name}: ${o.kind}/${o.metadata?.name}`;
  const byKey = new Map(
    objs.map((o) => [objKey(o.kind, o.metadata?.namespace, o.metadata?.name), o]),
  );
  const find = (kind, ns, n) => byKey.get(objKey(kind, ns, n));
  const workloads = objs.filter((o) => podSpecOf(o));
  const namespaces = new Set(
    objs.filter((o) => o.kind === 'Namespace').map((o) => o.metadata.name),
  );
  const certSecrets = new Map();
  const selfCaBundles = new Set(); // `${webhook configuration}/${service}` a webhook keeps itself
  for (const o of objs.filter((x) => x.kind === 'Certificate')) {
    certSecrets.set(objKey('Secret', o.metadata.namespace, o.spec?.secretName), o);
  }

  for (const o of objs) {
    const ns = o.metadata?.namespace;
    if (!CLUSTER_SCOPED.has(o.kind)) {
      if (!ns) fail(where(o), 'no namespace');
      else if (!namespaces.has(ns) && !IN_EXISTING_NAMESPACE.has(name)) {
        fail(where(o), `namespace ${ns} is not created by this set`);
      }
    }
  }

  // The config the node daemons and the webhook share.
  const configFile = path.join(ROOT, 'config/config.yaml');
  const config = fs.readFileSync(configFile, 'utf8');
  let excluded = [];
  for (const cm of objs.filter(
    (o) => o.kind === 'ConfigMap' && o.metadata.name === 'registry-proxy-config',
  )) {
    if (cm.data?.['config.yaml'] !== config) {
      fail(where(cm), 'data config.yaml differs from config/config.yaml');
    }
    excluded = YAML.parse(cm.data?.['config.yaml'] || '')?.excludeNamespaces || [];
  }

  for (const o of workloads) {
    const spec = podSpecOf(o);
    const w = where(o);
    const tplLabels = o.kind === 'Pod' ? o.metadata?.labels : o.spec?.template?.metadata?.labels;
    if (o.kind !== 'Pod') {
      const sel = o.spec?.selector;
      if (!sel?.matchLabels || sel.matchExpressions) fail(w, 'selector: matchLabels only, please');
      else if (!labelsMatch(sel.matchLabels, tplLabels))
        fail(w, 'selector does not match the pod template labels');
    }
    const podSecure = spec.securityContext || {};
    const privileged = containersOf(spec).some((c) => c.securityContext?.privileged);
    if (privileged || spec.hostPID || (spec.volumes || []).some((v) => v.hostPath)) {
      const nsObj = find('Namespace', '', o.metadata.namespace);
      if (nsObj && nsObj.metadata.labels?.['pod-security.kubernetes.io/enforce'] !== 'privileged') {
        fail(
          w,
          `privileged pod in namespace ${o.metadata.namespace}, which does not allow it ` +
            `(pod-security.kubernetes.io/enforce: privileged)`,
        );
      }
    }
    const volumes = new Map((spec.volumes || []).map((v) => [v.name, v]));
    const used = new Set();
    for (const c of containersOf(spec)) {
      const cw = `${w} container ${c.name}`;
      if (c.image !== image.ref) fail(cw, `image ${c.image}, expected ${image.ref}`);
      if (!c.resources?.requests) fail(cw, 'no resource requests');
      const ports = c.ports || [];
      const portOk = (p) =>
        typeof p === 'number'
          ? ports.some((x) => x.containerPort === p)
          : ports.some((x) => x.name === p);
      for (const [pn, probe] of Object.entries({
        readinessProbe: c.readinessProbe,
        livenessProbe: c.livenessProbe,
        startupProbe: c.startupProbe,
      })) {
        const p = probe?.httpGet?.port ?? probe?.tcpSocket?.port ?? probe?.grpc?.port;
        if (p !== undefined && !portOk(p)) fail(cw, `${pn} port ${p} is not a container port`);
      }
      const mounts = c.volumeMounts || [];
      for (const m of mounts) {
        const v = volumes.get(m.name);
        if (!v) {
          fail(cw, `volumeMount ${m.name} has no volume`);
          continue;
        }
        used.add(m.name);
        // Files the container is told to read under this mount must be in the ConfigMap/Secret.
        let keys = null;
        let what = '';
        if (v.configMap) {
          const cm = find('ConfigMap', o.metadata.namespace, v.configMap.name);
          what = `ConfigMap ${v.configMap.name}`;
          if (cm) keys = Object.keys({ ...cm.data, ...cm.binaryData });
        } else if (v.secret) {
          const s = find('Secret', o.metadata.namespace, v.secret.secretName);
          what = `Secret ${v.secret.secretName}`;
          if (s) keys = Object.keys({ ...s.data, ...s.stringData });
          else if (certSecrets.has(objKey('Secret', o.metadata.namespace, v.secret.secretName))) {
            keys = ['tls.crt', 'tls.key', 'ca.crt']; // what cert-manager writes
          }
        }
        if (keys) {
          for (const val of [...argValues(c.args), ...argValues(c.command)]) {
            if (val.startsWith(`${m.mountPath}/`)) {
              const key = val.slice(m.mountPath.length + 1);
              if (!keys.includes(key)) fail(cw, `reads ${val}, but ${what} has no key ${key}`);
            }
          }
        }
      }
      for (const e of c.env || []) {
        const cmr = e.valueFrom?.configMapKeyRef;
        const sr = e.valueFrom?.secretKeyRef;
        if (cmr && !cmr.optional && !find('ConfigMap', o.metadata.namespace, cmr.name)) {
          fail(cw, `env ${e.name}: no ConfigMap ${cmr.name}`);
        }
        if (
          sr &&
          !sr.optional &&
          !find('Secret', o.metadata.namespace, sr.name) &&
          !certSecrets.has(objKey('Secret', o.metadata.namespace, sr.name))
        ) {
          fail(cw, `env ${e.name}: no Secret ${sr.name}`);
        }
      }
      // Flags must exist in the binary that the image carries.
      if (binary) {
        for (const inv of invocations(c)) {
          const help = helpOf(binary, inv.sub);
          if (help.error) {
            fail(cw, `registry-proxy ${inv.sub.join(' ')} --help failed: ${help.error}`);
            continue;
          }
          for (const f of inv.flags) {
            if (!new RegExp(`(^|[\\s,\\[])${f}(?![\\w-])`, 'm').test(help)) {
              fail(cw, `registry-proxy ${inv.sub.join(' ')} has no flag ${f}`);
            }
          }
        }
      }
    }
    for (const [vn, v] of volumes) {
      if (!used.has(vn)) fail(w, `volume ${vn} is mounted by no container`);
      if (
        v.configMap &&
        !v.configMap.optional &&
        !find('ConfigMap', o.metadata.namespace, v.configMap.name)
      ) {
        fail(w, `volume ${vn}: no ConfigMap ${v.configMap.name} in this set`);
      }
      if (
        v.secret &&
        !v.secret.optional &&
        !find('Secret', o.metadata.namespace, v.secret.secretName) &&
        !certSecrets.has(objKey('Secret', o.metadata.namespace, v.secret.secretName))
      ) {
        fail(w, `volume ${vn}: no Secret ${v.secret.secretName} and no Certificate that makes it`);
      }
    }

    // Role-specific requirements (README.md "Install on a cluster", DESIGN.md "Deployment").
    const inits = new Set((spec.initContainers || []).map((c) => c.name));
    const isNodeTool = (c, sub) =>
      (!c.command && (c.args || [])[0] === 'node' && (c.args || [])[1] === sub) ||
      new RegExp(`registry-proxy\\s+node\\s+${sub}`).test(
        c.command?.includes('-c') ? c.command[c.command.indexOf('-c') + 1] : '',
      );
    if (spec.hostPID) {
      // Pod-wide: only node install/uninstall need it (nsenter -t 1); anything else there must
      // not be able to signal the host's root processes.
      for (const c of containersOf(spec)) {
        if (isNodeTool(c, 'install') || isNodeTool(c, 'uninstall')) continue;
        const sc = { ...spec.securityContext, ...c.securityContext };
        if (!sc.runAsNonRoot || !sc.runAsUser) {
          fail(`${w} container ${c.name}`, 'in a hostPID pod it must run as a non-root uid');
        }
        if (!(c.securityContext?.capabilities?.drop || []).includes('ALL')) {
          fail(`${w} container ${c.name}`, 'in a hostPID pod it must drop ALL capabilities');
        }
      }
    }
    for (const c of containersOf(spec)) {
      const args = c.args || [];
      const script = c.command?.includes('-c') ? c.command[c.command.indexOf('-c') + 1] : '';
      const isInstall = !c.command && args[0] === 'node' && args[1] === 'install';
      const isUninstall = /registry-proxy\s+node\s+uninstall/.test(script);
      const isSync = !c.command && args[0] === 'node' && args[1] === 'sync-config';
      const isWebhook = !c.command && args[0] === 'webhook';
      const cw = `${w} container ${c.name}`;
      const rootVol = (spec.volumes || []).find((v) => v.hostPath?.path === '/');
      const rootMount = rootVol && (c.volumeMounts || []).find((m) => m.name === rootVol.name);
      if (!isInstall && !isUninstall && (c.securityContext?.privileged || rootMount)) {
        fail(cw, "only node install/uninstall may be privileged or mount the host's /");
      }
      if (isInstall || isUninstall || isSync) {
        if (o.kind !== 'DaemonSet') fail(cw, 'node install/uninstall must run in a DaemonSet');
        if (spec.priorityClassName !== 'system-node-critical')
          fail(cw, 'priorityClassName must be system-node-critical');
        if (!(spec.tolerations || []).some((t) => t.operator === 'Exists' && !t.key && !t.effect)) {
          fail(cw, 'must tolerate every taint (operator: Exists, no key)');
        }
        if (spec.terminationGracePeriodSeconds === undefined)
          fail(cw, 'no terminationGracePeriodSeconds');
        if (c.livenessProbe) fail(cw, 'a liveness probe would restart the pod, not help the daemon');
      }
      if (isInstall || isUninstall) {
        if (!spec.hostPID) fail(cw, 'needs hostPID (nsenter -t 1 reaches the host systemd)');
        if (!c.securityContext?.privileged) fail(cw, 'must be privileged');
        const hostRoot = isInstall
          ? flagValue(args, '--host-root')
          : (/--host-root[=\s]+(\S+)/.exec(script) || [])[1];
        if (!hostRoot || !rootMount || rootMount.mountPath !== hostRoot) {
          fail(cw, `--host-root ${hostRoot} is not where the host's / (hostPath) is mounted`);
        }
        for (const p of [c.readinessProbe?.exec?.command?.join(' ') || '']) {
          for (const m of p.matchAll(/(\/\S+)/g)) {
            if (m[1].startsWith('/host') && hostRoot && !m[1].startsWith(`${hostRoot}/`)) {
              fail(cw, `probe path ${m[1]} is not under --host-root ${hostRoot}`);
            }
          }
        }
      }
      if (isUninstall && !c.readinessProbe) fail(cw, 'no readiness probe showing the node is clean');
      const configFrom = () => {
        const from = flagValue(args, '--config-from');
        const mount = (c.volumeMounts || []).find((m) => from?.startsWith(`${m.mountPath}/`));
        const v = mount && volumes.get(mount.name);
        if (!v?.configMap || v.configMap.name !== 'registry-proxy-config' || mount.subPath) {
          fail(cw, `--config-from ${from} is not in a whole-directory mount of ConfigMap registry-proxy-config`);
        }
      };
      if (isInstall) {
        // The contract with `registry-proxy node install` (README.md): once, in an init container.
        if (!inits.has(c.name)) fail(cw, 'node install belongs in an init container (it runs once)');
        for (const f of ['--config-from', '--configure-kubelet', '--configure-crictl']) {
          if (!args.some((a) => a === f || a.startsWith(`${f}=`))) fail(cw, `node install without ${f}`);
        }
        if (args.includes('--watch')) fail(cw, 'node install --watch keeps a privileged container running');
        configFrom();
      }
      if (isSync) {
        // The long-running part: unprivileged, and only the two host directories it needs.
        if (inits.has(c.name)) fail(cw, 'node sync-config runs for the pod\'s life, not as an init container');
        if (spec.hostPID) fail(cw, 'node sync-config runs as uid 0: its pod must not have hostPID');
        if (c.securityContext?.privileged) fail(cw, 'node sync-config must not be privileged');
        const sc = c.securityContext || {};
        if (sc.allowPrivilegeEscalation !== false) fail(cw, 'allowPrivilegeEscalation must be false');
        if (!sc.readOnlyRootFilesystem) fail(cw, 'readOnlyRootFilesystem must be true');
        if (!(sc.capabilities?.drop || []).includes('ALL')) fail(cw, 'must drop ALL capabilities');
        if ((sc.capabilities?.add || []).length) fail(cw, 'must add no capability');
        configFrom();
        const hostDir = (file, dir) => {
          const m = (c.volumeMounts || []).find((x) => file?.startsWith(`${x.mountPath}/`));
          const v = m && volumes.get(m.name);
          if (v?.hostPath?.path !== dir) {
            fail(cw, `${file} is not in a mount of the host's ${dir} (hostPath)`);
          } else if (v.hostPath.type !== 'Directory') {
            fail(cw, `hostPath ${dir} must be of type Directory (else the runtime may create it before the install does)`);
          }
        };
        hostDir(flagValue(args, '--host-config'), '/etc/registry-proxy');
        const probe = c.readinessProbe?.exec?.command || [];
        const endpoint = (flagValue(probe, '--endpoint') || '').replace(/^unix:\/\//, '');
        if (!endpoint) fail(cw, 'no readiness probe asking the daemon over its socket');
        else hostDir(endpoint, '/run/registry-proxy');
        for (const m of c.volumeMounts || []) {
          const p = volumes.get(m.name)?.hostPath?.path;
          if (p && !['/etc/registry-proxy', '/run/registry-proxy'].includes(p)) {
            fail(cw, `mounts the host's ${p}: it needs /etc/registry-proxy and /run/registry-proxy only`);
          }
        }
      }
      if (isWebhook) {
        const sc = { ...spec.securityContext, ...c.securityContext };
        if (!sc.runAsNonRoot) fail(cw, 'runAsNonRoot must be true');
        if (!c.securityContext?.readOnlyRootFilesystem)
          fail(cw, 'readOnlyRootFilesystem must be true');
        if (c.securityContext?.allowPrivilegeEscalation !== false)
          fail(cw, 'allowPrivilegeEscalation must be false');
        if (!(c.securityContext?.capabilities?.drop || []).includes('ALL'))
          fail(cw, 'must drop ALL capabilities');
        if ((sc.seccompProfile || podSecure.seccompProfile)?.type !== 'RuntimeDefault') {
          fail(cw, 'seccompProfile must be RuntimeDefault');
        }
        if (o.kind !== 'Deployment' || !(o.spec.replicas >= 2))
          fail(cw, 'a Deployment of 2 or more replicas');
        const metricsPort = portOf(flagValue(args, '--metrics-address'));
        const listenPort = portOf(flagValue(args, '--listen'));
        const portNum = (p) =>
          typeof p === 'number' ? p : (c.ports || []).find((x) => x.name === p)?.containerPort;
        for (const [pn, path0] of [
          ['readinessProbe', '/readyz'],
          ['livenessProbe', '/healthz'],
        ]) {
          const g = c[pn]?.httpGet;
          if (!g || g.path !== path0) fail(cw, `${pn} must be an httpGet of ${path0}`);
          else if (portNum(g.port) !== metricsPort) {
            fail(cw, `${pn} port ${g.port} is not the --metrics-address port ${metricsPort}`);
          } else if ((g.scheme || 'HTTP') !== 'HTTP')
            fail(cw, `${pn}: the metrics port is plain HTTP`);
        }
        for (const f of ['--config', '--tls-cert', '--tls-key']) {
          const v = flagValue(args, f);
          if (!v) fail(cw, `no ${f}`);
          else if (!(c.volumeMounts || []).some((m) => v.startsWith(`${m.mountPath}/`))) {
            fail(cw, `${f} ${v} is in no volume mount`);
          }
        }
        if (!(c.ports || []).some((p) => p.containerPort === listenPort)) {
          fail(cw, `--listen port ${listenPort} is not a container port`);
        }
        checkWebhookTls(o, c, cw, { objs, find, volumes, selfCaBundles });
        if (
          !objs.some(
            (p) =>
              p.kind === 'PodDisruptionBudget' &&
              p.metadata.namespace === o.metadata.namespace &&
              labelsMatch(p.spec?.selector?.matchLabels, o.spec.template.metadata.labels),
          )
        ) {
          fail(cw, 'no PodDisruptionBudget');
        }
      }
    }
  }

  const selected = (ns, selector) =>
    workloads.filter(
      (o) =>
        o.metadata.namespace === ns &&
        selector &&
        Object.keys(selector).length &&
        labelsMatch(
          selector,
          o.kind === 'Pod' ? o.metadata.labels : o.spec.template.metadata?.labels,
        ),
    );

  for (const svc of objs.filter((o) => o.kind === 'Service')) {
    const pods = selected(svc.metadata.namespace, svc.spec?.selector);
    if (!pods.length) fail(where(svc), 'its selector selects no workload of this set');
    for (const p of svc.spec?.ports || []) {
      const target = p.targetPort ?? p.port;
      for (const o of pods) {
        const ok = containersOf(podSpecOf(o)).some((c) =>
          (c.ports || []).some((x) =>
            typeof target === 'number' ? x.containerPort === target : x.name === target,
          ),
        );
        if (!ok)
          fail(
            where(svc),
            `targetPort ${target} is not a container port of ${o.kind}/${o.metadata.name}`,
          );
      }
    }
  }

  for (const pdb of objs.filter((o) => o.kind === 'PodDisruptionBudget')) {
    const pods = selected(pdb.metadata.namespace, pdb.spec?.selector?.matchLabels);
    if (!pods.length) fail(where(pdb), 'its selector selects no workload of this set');
    for (const o of pods) {
      if (typeof pdb.spec.minAvailable === 'number' && !(o.spec.replicas > pdb.spec.minAvailable)) {
        fail(
          where(pdb),
          `minAvailable ${pdb.spec.minAvailable} with ${o.spec.replicas} replicas blocks every drain`,
        );
      }
    }
  }

  for (const wc of objs.filter((o) => /^(Mutating|Validating)WebhookConfiguration$/.test(o.kind))) {
    for (const hook of wc.webhooks || []) {
      const hw = `${where(wc)} webhook ${hook.name}`;
      if (hook.failurePolicy !== 'Ignore')
        fail(hw, 'failurePolicy must be Ignore (pods must never depend on it)');
      if (!['None', 'NoneOnDryRun'].includes(hook.sideEffects))
        fail(hw, 'sideEffects must be None');
      if (!(hook.timeoutSeconds >= 1 && hook.timeoutSeconds <= 5))
        fail(hw, 'timeoutSeconds must be small (1-5)');
      const s = hook.clientConfig?.service;
      if (!s) {
        fail(hw, 'clientConfig.service is not set');
        continue;
      }
      const svc = find('Service', s.namespace, s.name);
      if (!svc) {
        fail(hw, `clientConfig.service ${s.namespace}/${s.name} is not a Service of this set`);
      } else if (!(svc.spec.ports || []).some((p) => p.port === (s.port ?? 443))) {
        fail(hw, `Service ${s.name} has no port ${s.port ?? 443}`);
      }
      const inject = wc.metadata.annotations?.['cert-manager.io/inject-ca-from'];
      if (inject) {
        const [cns, cname] = inject.split('/');
        const cert = find('Certificate', cns, cname);
        if (!cert) fail(hw, `inject-ca-from ${inject}: no such Certificate`);
        else if (!(cert.spec.dnsNames || []).includes(`${s.name}.${s.namespace}.svc`)) {
          fail(hw, `Certificate ${inject} does not name ${s.name}.${s.namespace}.svc`);
        }
      } else if (
        !hook.clientConfig.caBundle &&
        !selfCaBundles.has(`${wc.metadata.name}/${s.namespace}/${s.name}`)
      ) {
        fail(
          hw,
          'no caBundle, no cert-manager.io/inject-ca-from and no webhook that keeps it ' +
            '(--tls-secret with --webhook-configuration): the API server cannot trust it',
        );
      }
      const notIn = (hook.namespaceSelector?.matchExpressions || []).find(
        (e) => e.key === 'kubernetes.io/metadata.name' && e.operator === 'NotIn',
      );
      const skipped = new Set(notIn?.values || []);
      for (const ns of ['kube-system', s.namespace, ...excluded]) {
        if (!skipped.has(ns))
          fail(hw, `namespaceSelector sends namespace ${ns} (config excludes it / its own)`);
      }
      for (const ns of skipped) {
        if (!excluded.includes(ns))
          fail(hw, `namespaceSelector skips ${ns}, which config.yaml's excludeNamespaces does not`);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile and workflows

function dockerInstructions() {
  const text = fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
  const out = [];
  let cur = '';
  let startLine = 0;
  text.split('\n').forEach((line, i) => {
    if (!cur && (/^\s*#/.test(line) || !line.trim())) return;
    if (cur && /^\s*#/.test(line)) return; // comments inside continuations
    if (!cur) startLine = i + 1;
    if (/\\\s*$/.test(line)) {
      cur += `${line.replace(/\\\s*$/, '')} `;
      return;
    }
    cur += line;
    const m = /^\s*(\w+)\s+([\s\S]*)$/.exec(cur);
    if (!m) throw new RenderError(`Dockerfile:${startLine}: cannot parse '${cur}'`);
    out.push({ op: m[1].toUpperCase(), rest: m[2].trim(), line: startLine });
    cur = '';
  });
  if (cur) throw new RenderError('Dockerfile: ends inside a continued line');
  return out;
}

function copySources() {
  const out = [];
  for (const ins of dockerInstructions()) {
    if (ins.op !== 'COPY' && ins.op !== 'ADD') continue;
    const words = ins.rest.startsWith('[') ? JSON.parse(ins.rest) : ins.rest.split(/\s+/);
    const opts = words.filter((w) => w.startsWith('--'));
    const paths = words.filter((w) => !w.startsWith('--'));
    if (opts.some((o) => o.startsWith('--from='))) continue;
    for (const src of paths.slice(0, -1)) out.push({ src, line: ins.line });
  }
  return out;
}

function dockerignored(p) {
  const f = path.join(ROOT, '.dockerignore');
  if (!fs.existsSync(f)) return null;
  for (let pat of fs.readFileSync(f, 'utf8').split('\n')) {
    pat = pat.trim();
    if (!pat || pat.startsWith('#') || pat.startsWith('!')) continue;
    pat = pat.replace(/^\//, '');
    const re = new RegExp(
      `^${pat
        .replace(/[.+^${}()|[\]\\]/g, '\\$&')
        .replace(/\*/g, '[^/]*')
        .replace(/\?/g, '[^/]')}(/|$)`,
    );
    if (re.test(p.replace(/^\.\//, ''))) return pat;
  }
  return null;
}

function checkPackaging(image) {
  const ins = dockerInstructions();
  const froms = ins.filter((i) => i.op === 'FROM');
  const stages = new Set();
  if (!froms.length) fail('Dockerfile', 'no FROM');
  const fromParts = froms.map((f) => /^(\S+)(?:\s+AS\s+(\S+))?$/i.exec(f.rest) || []);
  if (fromParts[0]?.[1] !== 'debian:12')
    fail('Dockerfile', `builder stage is ${fromParts[0]?.[1]}, expected debian:12`);
  if (fromParts[fromParts.length - 1]?.[1] !== 'debian:12-slim') {
    fail(
      'Dockerfile',
      `final stage is ${fromParts[fromParts.length - 1]?.[1]}, expected debian:12-slim`,
    );
  }
  let stageIndex = -1;
  let finalUser = null;
  let entrypoint = null;
  const labels = {};
  let depsInstalled = false;
  for (const i of ins) {
    if (i.op === 'FROM') {
      stageIndex++;
      finalUser = null;
      const m = /\s+AS\s+(\S+)$/i.exec(i.rest);
      if (m) stages.add(m[1]);
      continue;
    }
    if (stageIndex < 0) {
      if (i.op !== 'ARG') fail(`Dockerfile:${i.line}`, `${i.op} before FROM`);
      continue;
    }
    const last = stageIndex === froms.length - 1;
    if (i.op === 'RUN' && /rp_install_deps\s+build/.test(i.rest)) depsInstalled = true;
    if (i.op === 'COPY') {
      const from = /--from=(\S+)/.exec(i.rest);
      if (from && !stages.has(from[1]))
        fail(`Dockerfile:${i.line}`, `COPY --from=${from[1]}: no such stage before`);
    }
    if (last && i.op === 'USER') finalUser = i.rest;
    if (last && i.op === 'ENTRYPOINT') {
      try {
        entrypoint = JSON.parse(i.rest);
      } catch (e) {
        fail(`Dockerfile:${i.line}`, 'ENTRYPOINT must be the exec (JSON) form');
      }
    }
    if (last && i.op === 'LABEL') {
      for (const m of i.rest.matchAll(/([\w.-]+)="([^"]*)"/g)) labels[m[1]] = m[2];
    }
  }
  const deps = fs.readFileSync(path.join(ROOT, 'scripts/deps.sh'), 'utf8');
  const buildPkgs = (/RP_BUILD_PKGS=\(([^)]*)\)/.exec(deps) || [])[1] || '';
  if (!/(^|\s)patchelf(\s|$)/.test(buildPkgs)) {
    fail(
      'scripts/deps.sh',
      "RP_BUILD_PKGS lacks patchelf, which the image's `--target dist` needs",
    );
  }
  if (!depsInstalled)
    fail(
      'Dockerfile',
      'the builder does not install the build deps with scripts/deps.sh (rp_install_deps build)',
    );
  for (const { src, line } of copySources()) {
    if (!fs.existsSync(path.join(ROOT, src)))
      fail(`Dockerfile:${line}`, `COPY source ${src} does not exist`);
    const ig = dockerignored(src);
    if (ig) fail(`Dockerfile:${line}`, `COPY source ${src} is excluded by .dockerignore (${ig})`);
  }
  if (!entrypoint || entrypoint[0] !== '/opt/registry-proxy/bin/registry-proxy') {
    fail(
      'Dockerfile',
      `ENTRYPOINT ${JSON.stringify(entrypoint)}: expected /opt/registry-proxy/bin/registry-proxy`,
    );
  }
  const webhook = parseRendered(kustomize(path.join(ROOT, 'daemonset/webhook')), 'daemonset/webhook')
    .map((it) => it.obj)
    .find((o) => o.kind === 'Deployment');
  const uid = webhook?.spec?.template?.spec?.securityContext?.runAsUser;
  const m = /^(\d+)(?::(\d+))?$/.exec(finalUser || '');
  if (!m || m[1] === '0')
    fail('Dockerfile', `final USER ${finalUser}: must be a numeric non-root uid`);
  else if (Number(m[1]) !== uid)
    fail('Dockerfile', `USER ${m[1]} but the webhook Deployment runs as ${uid}`);
  const [, org, repo] = image.name.split('/');
  const source = `https://github.com/${org}/${repo}`;
  if (labels['org.opencontainers.image.source'] !== source) {
    fail(
      'Dockerfile',
      `org.opencontainers.image.source is ${labels['org.opencontainers.image.source']}, ` +
        `expected ${source} (the image is ${image.name})`,
    );
  }
  const dockerText = fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
  for (const ref of dockerText.matchAll(/ghcr\.io\/[\w./-]+(?::[\w.-]+)?/g)) {
    if (ref[0] !== image.ref && ref[0] !== image.name)
      fail('Dockerfile', `mentions ${ref[0]}, not ${image.ref}`);
  }

  // Workflows
  const wfDir = path.join(ROOT, '.github/workflows');
  const files = fs.existsSync(wfDir) ? fs.readdirSync(wfDir).filter((f) => /\.ya?ml$/.test(f)) : [];
  if (!files.length) fail('.github/workflows', 'no workflow');
  let runsCi = false;
  let publishes = false;
  for (const f of files) {
    const wf = `.github/workflows/${f}`;
    let doc;
    try {
      doc = readYamlDocs(path.join(wfDir, f));
    } catch (e) {
      fail(wf, e.message);
      continue;
    }
    if (doc.length !== 1 || !isMap(doc[0].obj)) {
      fail(wf, 'expected one YAML map');
      continue;
    }
    const w = doc[0].obj;
    if (!w.on) fail(wf, "no 'on' (YAML 1.2: the key must stay 'on', not a boolean)");
    if (!isMap(w.jobs) || !Object.keys(w.jobs).length) fail(wf, 'no jobs');
    for (const [jn, job] of Object.entries(w.jobs || {})) {
      if (!job['runs-on']) fail(`${wf} job ${jn}`, 'no runs-on');
      if (!Array.isArray(job.steps) || !job.steps.length) fail(`${wf} job ${jn}`, 'no steps');
      (job.steps || []).forEach((s, i) => {
        if (!s.run === !s.uses) fail(`${wf} job ${jn} step ${i}`, 'exactly one of run / uses');
        if (s.uses && !/^[\w.-]+\/[\w./-]+@[\w.-]+$/.test(s.uses))
          fail(`${wf} job ${jn} step ${i}`, `uses ${s.uses}: pin a version`);
        if (typeof s.run === 'string' && /(^|\s)(bash\s+)?\.ci\/run(\s|$)/.test(s.run))
          runsCi = true;
        if (s.uses && /^docker\/build-push-action@/.test(s.uses)) {
          publishes = true;
          if (s.with?.context !== '.')
            fail(`${wf} job ${jn}`, 'build-push-action context must be the repo root');
          const tagsFrom = String(s.with?.tags || '');
          if (!tagsFrom) fail(`${wf} job ${jn}`, 'build-push-action without tags');
          const env = { ...w.env, ...job.env };
          if (env.IMAGE !== image.name)
            fail(wf, `env IMAGE is ${env.IMAGE}, expected ${image.name}`);
          const tags = w.on?.push?.tags;
          if (!Array.isArray(tags) || !tags.length) fail(wf, 'does not run on pushed tags');
        }
      });
    }
  }
  if (!runsCi) fail('.github/workflows', 'no workflow runs .ci/run');
  if (!publishes)
    fail('.github/workflows', 'no workflow builds and pushes the image (docker/build-push-action)');
}

// ---------------------------------------------------------------------------------------------

function findKustomizations(dir, out = []) {
  if (kustomizationFile(dir)) out.push(dir);
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (e.isDirectory()) findKustomizations(path.join(dir, e.name), out);
  }
  return out;
}

// Kustomizations that are parts of others, not applied alone: the webhook needs the Namespace
// and the ConfigMap from daemonset/node; a Component is only ever included.
const PARTS = new Set(['daemonset/webhook']);
// Variants applied into the namespace an install made (the uninstaller must not delete it).
const IN_EXISTING_NAMESPACE = new Set(['daemonset/uninstall']);
const isComponent = (dir) =>
  readYamlDocs(kustomizationFile(dir))[0]?.obj?.kind === 'Component';
const DEFAULT = 'daemonset';
const SINGLE_FILE = 'deploy/manifests.yaml';

// The default install: nothing of cert-manager (a cluster without it must take it whole), and
// deploy/manifests.yaml is exactly its rendering after the file's own comment lines.
function checkDefault(text, items) {
  for (const { obj } of items) {
    if (/cert-manager\.io/.test(obj.apiVersion || '')) {
      fail(DEFAULT, `${obj.kind}/${obj.metadata?.name} is a cert-manager kind`);
    }
    for (const k of Object.keys(obj.metadata?.annotations || {})) {
      if (k.includes('cert-manager')) {
        fail(DEFAULT, `${obj.kind}/${obj.metadata?.name} has the annotation ${k}`);
      }
    }
  }
  const file = path.join(ROOT, SINGLE_FILE);
  if (!fs.existsSync(file)) return fail(SINGLE_FILE, 'missing (scripts/render-manifests.sh)');
  const body = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .filter((l, i, all) => !(l.startsWith('#') && all.slice(0, i).every((x) => x.startsWith('#'))))
    .join('\n');
  if (body !== text) {
    fail(SINGLE_FILE, `differs from \`kubectl kustomize ${DEFAULT}\` (run scripts/render-manifests.sh)`);
  }
}

// Runs one mode's checks on the tree at `root`; returns the problems found (none: it passed).
// selftest.js calls it in-process for each broken copy.
function check(mode, root, { binary = null, log = console.log } = {}) {
  errors.length = 0;
  ROOT = path.resolve(root);
  try {
    const image = expectedImage();
    if (mode === 'packaging') {
      checkPackaging(image);
      log(
        `checked Dockerfile (${copySources().length} COPY sources) and .github/workflows ` +
          `for ${image.ref}`,
      );
    } else if (mode === 'manifests') {
      const copy = path.join(ROOT, 'daemonset/node/config.yaml');
      if (
        fs.readFileSync(copy, 'utf8') !==
        fs.readFileSync(path.join(ROOT, 'config/config.yaml'), 'utf8')
      ) {
        fail(
          'daemonset/node/config.yaml',
          'differs from config/config.yaml (it must be an exact copy)',
        );
      }
      const dirs = findKustomizations(path.join(ROOT, 'daemonset')).filter((d) => !isComponent(d));
      let objects = 0;
      for (const dir of dirs) {
        const name = path.relative(ROOT, dir) || dir;
        let items;
        try {
          const text = kustomize(dir);
          items = parseRendered(text, name);
          if (name === DEFAULT) checkDefault(text, items);
        } catch (e) {
          if (!(e instanceof RenderError)) throw e;
          fail(name, e.message);
          continue;
        }
        if (!items.length) fail(name, 'renders no object');
        items.forEach(validateSchema);
        objects += items.length;
        if (!PARTS.has(name)) checkSet(name, items, image, binary);
        log(
          `rendered ${name}: ` +
            `${items.map((it) => `${it.obj.kind}/${it.obj.metadata?.name}`).join(', ')}`,
        );
      }
      log(
        `validated ${objects} objects in ${dirs.length} kustomizations rendered by ` +
          `${KUBECTL} kustomize against the Kubernetes 1.27 and cert-manager schemas; ` +
          `image ${image.ref}`,
      );
    } else {
      fail(mode, 'unknown mode');
    }
  } catch (e) {
    if (!(e instanceof RenderError)) throw e;
    fail(mode, e.message);
  }
  return [...errors];
}

function main() {
  const [mode, root, ...rest] = process.argv.slice(2);
  if (!mode || !root) {
    console.error(
      'usage: check.js manifests|packaging|copy-sources ROOT [--binary BIN]',
    );
    process.exit(2);
  }
  let binary = null;
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === '--binary') binary = rest[++i];
    else {
      console.error(`unknown argument ${rest[i]}`);
      process.exit(2);
    }
  }
  if (mode === 'copy-sources') {
    ROOT = path.resolve(root);
    for (const { src } of copySources()) console.log(src);
    return;
  }
  const problems = check(mode, root, { binary });
  if (problems.length) {
    for (const e of problems) console.error(`FAIL ${e}`);
    console.error(`${problems.length} problem(s)`);
    process.exit(1);
  }
  console.log('OK');
}

module.exports = {
  check,
  copySources: (root) => {
    ROOT = path.resolve(root);
    return copySources().map((c) => c.src);
  },
};
if (require.main === module) main();
