#!/usr/bin/env python3
"""Writes the seed corpus of pull_fuzz (tests/fuzz/corpus/pull/): serialized PullImageRequests
as kubelet and crictl send them (and two ImageStatusRequests), encoded by hand in the protobuf
wire format so that no protobuf package is needed. Field numbers: CRI runtime.v1 api.proto.

  tests/fuzz/make_pull_corpus.py [OUT_DIR]   # default: tests/fuzz/corpus/pull next to this file
"""
import os
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """A length-delimited field (str, bytes or an encoded message), or a varint for an int."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def string_map(num, entries):
    return b"".join(field(num, field(1, k) + field(2, v)) for k, v in entries.items())


def image_spec(image, annotations=None, user_specified=None):
    out = field(1, image)
    if annotations:
        out += string_map(2, annotations)
    if user_specified:
        out += field(18, user_specified)
    return out


def auth(**kw):
    num = {"username": 1, "password": 2, "auth": 3, "server_address": 4, "identity_token": 5,
           "registry_token": 6}
    return b"".join(field(num[k], v) for k, v in kw.items())


def sandbox(ns, name="web-0", labels=None, extra=b""):
    meta = field(1, name) + field(2, "0f6c2a7e-5d1b-4f5e-9a51-3c1d2e4f5a6b") + field(3, ns)
    meta += field(4, 0)
    out = field(1, meta) + field(3, "/var/log/pods/%s_%s_0f6c2a7e" % (ns, name))
    if labels:
        out += string_map(6, labels)
    return out + extra


def pull(image_msg, auth_msg=None, sandbox_msg=None):
    out = field(1, image_msg)
    if auth_msg is not None:
        out += field(2, auth_msg)
    if sandbox_msg is not None:
        out += field(3, sandbox_msg)
    return out


DIGEST = "sha256:" + "4f" * 32
POD_LABELS = {"app": "web", "io.kubernetes.pod.namespace": "default",
              "pod-template-hash": "7d9c8b6f5"}

SEEDS = {
    # kubelet, a Deployment's pod in default: rewritten to the docker.io mirrors.
    "kubelet_nginx_default": pull(image_spec("nginx"), sandbox_msg=sandbox("default", labels=POD_LABELS)),
    # crictl pull without --pod-config: no sandbox (pullsWithoutNamespace applies).
    "crictl_busybox": pull(image_spec("docker.io/library/busybox:1.36")),
    # A static pod in an excluded namespace.
    "kube_system_pause": pull(image_spec("registry.k8s.io/pause:3.9"),
                              sandbox_msg=sandbox("kube-system", name="kube-proxy-x2")),
    # imagePullSecrets: credentials for the original registry, so never rewritten.
    "private_with_auth": pull(image_spec("docker.io/private/app:v1"),
                              auth(username="alice", password="s3cret", server_address="docker.io"),
                              sandbox("team-a")),
    # The fallback-less rule for docker.io/private, namespaces team-*.
    "private_team_no_fallback": pull(image_spec("docker.io/private/app:v2"), sandbox_msg=sandbox("team-x")),
    # A mirror with its own credentials (quay.io rule).
    "quay_mirror_credentials": pull(image_spec("quay.io/prometheus/node-exporter:v1.6.0"),
                                    sandbox_msg=sandbox("monitoring", name="node-exporter-abc")),
    # digestOnly rule: by digest, and by tag.
    "ghcr_by_digest": pull(image_spec("ghcr.io/org/tool@" + DIGEST), sandbox_msg=sandbox("default")),
    "ghcr_by_tag": pull(image_spec("ghcr.io/org/tool:1.0"), sandbox_msg=sandbox("default")),
    # Tag and digest, image annotations, user_specified_image (newer kubelets).
    "tag_and_digest_annotated": pull(
        image_spec("nginx:1.25@" + DIGEST, {"kubernetes.io/runtimehandler": "runc"}, "nginx:1.25"),
        sandbox_msg=sandbox("default")),
    # Fields this daemon's proto subset does not know (dns_config = 4, port_mappings = 5): kept.
    "unknown_fields": pull(image_spec("library/redis:7"), sandbox_msg=sandbox(
        "default", extra=field(4, field(1, "10.96.0.10") + field(2, "cluster.local"))
        + field(5, field(1, 6) + field(2, 8080) + field(3, 80)))),
    # A registry with a port (no rule): passed through.
    "local_registry_port": pull(image_spec("localhost:5000/app:dev"), sandbox_msg=sandbox("dev")),
    # Only a server_address in auth: still credentials.
    "auth_server_address_only": pull(image_spec("nginx:latest"), auth(server_address="https://index.docker.io/v1/"),
                                     sandbox("default")),
    # Invalid UTF-8 in the image name: protobuf C++ refuses it; forwarded as bytes.
    "invalid_utf8": pull(image_spec(b"nginx\xff\xfe:latest"), sandbox_msg=sandbox("default")),
    # ImageStatusRequests (the same bytes go to the status recovery path): image + verbose.
    "status_nginx": field(1, image_spec("nginx")),
    "status_verbose_quay": field(1, image_spec("quay.io/prometheus/node-exporter:v1.6.0")) + field(2, 1),
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus", "pull")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name + ".pb"), "wb") as f:
            f.write(data)
    print("wrote %d seeds to %s" % (len(SEEDS), out))


if __name__ == "__main__":
    main()
