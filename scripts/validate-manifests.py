#!/usr/bin/env python3
"""Validates oboe's deployment files offline.

    python3 scripts/validate-manifests.py [DEPLOY_DIR]     (default: deploy)

For every kustomization under DEPLOY_DIR/kubernetes (base/ excepted: every
variant includes it):

1. Render it. `kubectl kustomize` is the reference when kubectl is installed;
   the small renderer below (the subset of kustomize these files use) always
   runs too and must agree with it, so a machine without kubectl still checks
   the same thing.
2. Validate every object against the Kubernetes OpenAPI schemas bundled in the
   kubernetes-validate package, strictly (unknown fields are errors), for the
   oldest Kubernetes these files support (1.29: native sidecars on by default)
   and the newest one bundled.
3. Check what no schema knows: every file the mounted route file names lies
   under one of oboe's volume mounts and is provided by that volume; ports,
   probes, grace period, user and config path agree with the route file and
   the Dockerfile; the variants' route files differ only in
   identity.credential (and cache.shared); the PodMonitor selects the pods
   and their admin port.

Prints every problem and exits 1, or exits 0.
"""

import argparse
import copy
import ipaddress
import json
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

KUBERNETES_VERSIONS = ["1.29", ".".join(kubernetes_validate.latest_version().split(".")[:2])]
# Kinds whose schema comes from a CRD, which kubernetes-validate does not
# bundle; check_pod_monitor covers what matters about them.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
OBOE_CONTAINER = "oboe"
DEFAULT_LISTEN = "127.0.0.1:7070"
DEFAULT_ADMIN_LISTEN = "0.0.0.0:9901"
DEFAULT_SHUTDOWN_GRACE = "25s"
DEFAULT_TERMINATION_GRACE = 30  # Kubernetes' own default
# Route-file keys whose values are paths of files oboe reads.
FILE_KEYS = {"file", "cert_file", "key_file", "federated_token_file", "ca_file"}


class Problems(list):
    def add(self, where, message):
        problem = f"{where}: {message}"
        if problem not in self:
            self.append(problem)


def load_yaml_documents(path):
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def object_id(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------- rendering


class RenderError(Exception):
    pass


# Strategic merge keys of the lists our patches touch (the Kubernetes API's
# patchMergeKey); any other list is replaced whole, as kustomize does.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


def strategic_merge(target, patch):
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif key in MERGE_KEYS and isinstance(value, list) and isinstance(current, list):
            merge_key = MERGE_KEYS[key]
            added = []
            for item in value:
                match = next((c for c in current if c.get(merge_key) == item.get(merge_key)), None)
                if match is None:
                    added.append(copy.deepcopy(item))
                else:
                    strategic_merge(match, item)
            # kustomize puts the patch's new items first.
            target[key] = added + current
        else:
            target[key] = copy.deepcopy(value)


def render_builtin(directory):
    """Renders the kustomize subset these files use: resources (files and
    directories), configMapGenerator from files, and strategic-merge patches
    given by path. Anything else is refused, never silently ignored. Generated
    names get no hash suffix."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "configMapGenerator", "patches"}
    if unsupported:
        raise RenderError(f"{directory}/kustomization.yaml: the built-in renderer does not support {sorted(unsupported)}")
    objects = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        objects += render_builtin(path) if path.is_dir() else load_yaml_documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        if set(generator) - {"name", "files"}:
            raise RenderError(f"{directory}/kustomization.yaml: configMapGenerator supports only name and files")
        data = {}
        for entry in generator.get("files", []):
            key, _, source = entry.rpartition("=")
            data[key or posixpath.basename(source)] = (directory / source).read_text(encoding="utf-8")
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for patch_ref in kustomization.get("patches", []):
        if set(patch_ref) != {"path"}:
            raise RenderError(f"{directory}/kustomization.yaml: patches support only `path`")
        patch = yaml.safe_load((directory / patch_ref["path"]).read_text(encoding="utf-8"))
        targets = [o for o in objects if object_id(o) == object_id(patch)]
        if len(targets) != 1:
            raise RenderError(f"{directory / patch_ref['path']}: no single {object_id(patch)} to patch")
        strategic_merge(targets[0], {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")})
    return objects


def render_kubectl(directory):
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def without_hash_suffixes(objects, generated_names):
    """kustomize appends a content hash to generated names and to every
    reference to them; strip it so the two renderings can be compared."""
    patterns = [re.compile(re.escape(name) + r"-[a-z0-9]{10}") for name in generated_names]

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, str):
            for pattern, name in zip(patterns, generated_names):
                if pattern.fullmatch(value):
                    return name
        return value

    return [strip(o) for o in objects]


def compare_renderings(where, reference, builtin, problems):
    generated = [o["metadata"]["name"] for o in builtin if o["kind"] == "ConfigMap"]
    reference = {object_id(o): o for o in without_hash_suffixes(reference, generated)}
    builtin = {object_id(o): o for o in builtin}
    for oid in sorted(set(reference) | set(builtin)):
        if json.dumps(reference.get(oid), sort_keys=True) != json.dumps(builtin.get(oid), sort_keys=True):
            problems.add(where, f"{oid}: the built-in renderer disagrees with `kubectl kustomize`; fix render_builtin")


# ---------------------------------------------------------------- schemas


def check_schemas(where, objects, problems):
    for obj in objects:
        oid = object_id(obj)
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top level)"
                problems.add(where, f"{oid}: {path}: {e.message} (Kubernetes {version})")
            except kubernetes_validate.SchemaNotFoundError:
                if (obj.get("apiVersion"), obj.get("kind")) not in CRD_KINDS:
                    problems.add(where, f"{oid}: no schema for {obj.get('apiVersion')} {obj.get('kind')} (Kubernetes {version})")
                break


# ---------------------------------------------------------------- cross-checks


def parse_duration(text):
    """Seconds in a humantime-style duration such as `25s`, `1m30s`, `500ms`."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|s|m|h)|\s", "", text):
        raise ValueError(f"unsupported duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def files_in(value, key_path=""):
    """Yields (key path, file path) for every file the route file names."""
    if isinstance(value, dict):
        for key, child in value.items():
            child_path = f"{key_path}.{key}" if key_path else key
            if key in FILE_KEYS and isinstance(child, str):
                yield child_path, child
            else:
                yield from files_in(child, child_path)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from files_in(child, f"{key_path}[{i}]")


def mount_of(container, path):
    """The volume mount that holds `path`, and the path inside it."""
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path.startswith(root + "/"):
            return mount, path[len(root) + 1 :]
    return None, None


def find(objects, kind, name):
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def provided_files(volume, objects):
    """The file names a volume provides, or None when they cannot be known
    here (a Secret created out of band, with no `items`)."""
    if "configMap" in volume or "secret" in volume:
        source = volume.get("configMap") or volume.get("secret")
        if "items" in source:
            return {item["path"] for item in source["items"]}
        obj = (
            find(objects, "ConfigMap", source["name"])
            if "configMap" in volume
            else find(objects, "Secret", source["secretName"])
        )
        if obj is None:
            return None
        return set(obj.get("data", {})) | set(obj.get("stringData", {})) | set(obj.get("binaryData", {}))
    if "projected" in volume:
        names = set()
        for source in volume["projected"].get("sources", []):
            if "serviceAccountToken" in source:
                names.add(source["serviceAccountToken"]["path"])
            else:
                return None
        return names
    return None


def port_number(container, port):
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def split_addr(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def read_dockerfile(path):
    """ENTRYPOINT, ENV, EXPOSE and USER of the final stage."""
    final = path.read_text(encoding="utf-8").split("\nFROM ")[-1]
    facts = {"env": {}, "expose": set(), "user": None, "entrypoint": None}
    for line in final.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ENV":
            facts["env"].update(w.split("=", 1) for w in words[1:] if "=" in w)
        elif words[0] == "EXPOSE":
            facts["expose"].update(int(w.split("/")[0]) for w in words[1:])
        elif words[0] == "USER":
            facts["user"] = words[1].split(":")[0]
        elif words[0] == "ENTRYPOINT":
            facts["entrypoint"] = json.loads(line.split(None, 1)[1])
    return facts


def check_deployment(where, objects, dockerfile, problems):
    """Returns the route file mounted into oboe (or None)."""
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    if len(deployments) != 1:
        problems.add(where, f"expected one Deployment, found {len(deployments)}")
        return None
    deployment = deployments[0]
    at = f"{where}: {object_id(deployment)}"
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    oboe = next((c for c in spec.get("initContainers", []) if c["name"] == OBOE_CONTAINER), None)
    if oboe is None:
        problems.add(at, f"no init container named {OBOE_CONTAINER!r} (oboe runs as a native sidecar)")
        return None
    if oboe.get("restartPolicy") != "Always":
        problems.add(at, "oboe needs `restartPolicy: Always` to be a native sidecar")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                problems.add(at, f"container {container['name']} mounts undefined volume {mount['name']!r}")
    for volume in volumes.values():
        if "configMap" in volume and find(objects, "ConfigMap", volume["configMap"]["name"]) is None:
            problems.add(at, f"volume {volume['name']!r} names ConfigMap {volume['configMap']['name']!r}, which is not rendered")
    account = spec.get("serviceAccountName")
    if account and find(objects, "ServiceAccount", account) is None:
        problems.add(at, f"serviceAccountName {account!r} is not rendered")

    # The route file: the ConfigMap key mounted where `--config` points.
    args = oboe.get("args", [])
    if "--config" not in args[:-1]:
        problems.add(at, "oboe's args do not name the route file with --config")
        return None
    config_path = args[args.index("--config") + 1]
    mount, relative = mount_of(oboe, config_path)
    volume = volumes.get(mount["name"]) if mount else None
    if volume is None or "configMap" not in volume:
        problems.add(at, f"--config {config_path} is not in a ConfigMap volume mounted into oboe")
        return None
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    if config_map is None or relative not in config_map.get("data", {}):
        problems.add(at, f"--config {config_path}: no key {relative!r} in the mounted ConfigMap")
        return None
    route_file = yaml.safe_load(config_map["data"][relative])
    if not isinstance(route_file, dict):
        problems.add(at, f"--config {config_path}: the route file is not a YAML mapping")
        return None

    for key_path, path in files_in(route_file):
        file_mount, inside = mount_of(oboe, path)
        if file_mount is None:
            mounts = ", ".join(m["mountPath"] for m in oboe.get("volumeMounts", []))
            problems.add(at, f"route file {key_path}: {path} is under none of oboe's volume mounts ({mounts})")
            continue
        provided = provided_files(volumes.get(file_mount["name"], {}), objects)
        if provided is not None and inside not in provided:
            problems.add(
                at, f"route file {key_path}: volume {file_mount['name']!r} at {file_mount['mountPath']} provides {sorted(provided)}, not {inside!r}"
            )

    # Ports and probes.
    listen_host, listen_port = split_addr(route_file.get("listen", DEFAULT_LISTEN))
    if not ipaddress.ip_address(listen_host).is_loopback:
        problems.add(at, f"route file listen {listen_host}: the proxy must listen on loopback only")
    admin_port = split_addr(route_file.get("admin", {}).get("listen", DEFAULT_ADMIN_LISTEN))[1]
    declared = {p["containerPort"] for p in oboe.get("ports", [])}
    for port in (listen_port, admin_port):
        if port not in declared:
            problems.add(at, f"oboe listens on {port} (route file) but declares container ports {sorted(declared)}")
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in probes.items():
        get = oboe.get(probe, {}).get("httpGet")
        if get is None:
            problems.add(at, f"oboe has no {probe} with httpGet")
        elif get.get("path") != path or port_number(oboe, get.get("port")) != admin_port:
            problems.add(at, f"oboe's {probe} must GET {path} on the admin port {admin_port}")
    annotations = pod.get("metadata", {}).get("annotations", {})
    if annotations.get("prometheus.io/port") != str(admin_port):
        problems.add(at, f"annotation prometheus.io/port must be the admin port {admin_port}")

    # Shutdown: the pod's grace must cover oboe's drain.
    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_TERMINATION_GRACE)
    shutdown_grace = parse_duration(route_file.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))
    if grace <= shutdown_grace:
        problems.add(at, f"terminationGracePeriodSeconds {grace} must exceed the route file's shutdown_grace ({shutdown_grace:g}s)")

    # Security: the container's settings, over the pod's.
    security = {**spec.get("securityContext", {}), **oboe.get("securityContext", {})}
    expected = {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    for key, value in expected.items():
        if security.get(key) != value:
            problems.add(at, f"oboe's securityContext.{key} must be {json.dumps(value)}")
    if "ALL" not in security.get("capabilities", {}).get("drop", []):
        problems.add(at, "oboe's securityContext.capabilities must drop ALL")

    # The image: the config path, ports and user the Dockerfile sets.
    if dockerfile is not None:
        if dockerfile["env"].get("OBOE_CONFIG") != config_path:
            problems.add(at, f"the Dockerfile's OBOE_CONFIG is not {config_path}")
        if not {listen_port, admin_port} <= dockerfile["expose"]:
            problems.add(at, f"the Dockerfile must EXPOSE {listen_port} and {admin_port}")
        if dockerfile["user"] != str(security.get("runAsUser")):
            problems.add(at, f"the Dockerfile's USER {dockerfile['user']} is not runAsUser {security.get('runAsUser')}")
        if (dockerfile["entrypoint"] or [])[-1:] != ["run"]:
            problems.add(at, "the Dockerfile's ENTRYPOINT must end in `run` (the args add only --config)")

    # Workload identity: the service account is federated with oboe's client id.
    if pod.get("metadata", {}).get("labels", {}).get("azure.workload.identity/use") == "true":
        sa = find(objects, "ServiceAccount", account or "default") or {}
        client_id = sa.get("metadata", {}).get("annotations", {}).get("azure.workload.identity/client-id")
        if client_id != route_file.get("identity", {}).get("client_id"):
            problems.add(at, "ServiceAccount annotation azure.workload.identity/client-id must equal identity.client_id")
    return route_file


def check_pod_monitor(where, monitor, renderings, problems):
    at = f"{where}: {object_id(monitor)}"
    wanted = monitor["spec"].get("selector", {}).get("matchLabels", {})
    pods = [
        o["spec"]["template"]
        for objects in renderings.values()
        for o in objects
        if o["kind"] == "Deployment"
        and wanted.items() <= o["spec"]["template"].get("metadata", {}).get("labels", {}).items()
    ]
    if not wanted or not pods:
        problems.add(at, f"selector {wanted} matches the pods of no rendered Deployment")
    for pod in pods:
        oboe = next((c for c in pod["spec"].get("initContainers", []) if c["name"] == OBOE_CONTAINER), {})
        names = {p.get("name") for p in oboe.get("ports", [])}
        for endpoint in monitor["spec"].get("podMetricsEndpoints", []):
            if endpoint.get("port") not in names:
                problems.add(at, f"endpoint port {endpoint.get('port')!r} is not a named port of oboe ({sorted(names)})")


def check_route_files_agree(route_files, problems):
    """The variants are one route file with another credential (and, in the
    shared-cache variant, a shared token cache)."""
    def without_credential(route_file):
        route_file = copy.deepcopy(route_file)
        route_file.get("identity", {}).pop("credential", None)
        cache = route_file.get("cache", {})
        cache.pop("shared", None)
        if cache == {}:
            route_file.pop("cache", None)
        return route_file

    (first_where, first), *others = route_files.items()
    for where, route_file in others:
        if without_credential(route_file) != without_credential(first):
            problems.add(where, f"the route file differs from {first_where}'s in more than identity.credential")


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("deploy_dir", nargs="?", default="deploy", type=Path)
    parser.add_argument("--no-kubectl", action="store_true", help="use only the built-in renderer")
    args = parser.parse_args()
    root = args.deploy_dir / "kubernetes"
    dockerfile_path = args.deploy_dir / "Dockerfile"
    kubectl = shutil.which("kubectl") if not args.no_kubectl else None

    problems = Problems()
    dockerfile = read_dockerfile(dockerfile_path) if dockerfile_path.is_file() else None
    if dockerfile is None:
        problems.add(dockerfile_path, "missing")
    directories = sorted(p.parent for p in root.rglob("kustomization.yaml") if p.parent.name != "base")
    if not directories:
        problems.add(root, "no kustomization.yaml found")

    renderings = {}
    for directory in directories:
        where = str(directory)
        try:
            builtin = render_builtin(directory)
            if kubectl:
                objects = render_kubectl(directory)
                compare_renderings(where, objects, builtin, problems)
            else:
                objects = builtin
        except (RenderError, OSError, yaml.YAMLError, subprocess.TimeoutExpired) as e:
            problems.add(where, f"cannot render: {e}")
            continue
        check_schemas(where, objects, problems)
        renderings[where] = objects

    route_files = {}
    for where, objects in renderings.items():
        if any(o["kind"] == "Deployment" for o in objects):
            route_file = check_deployment(where, objects, dockerfile, problems)
            if route_file is not None:
                route_files[where] = route_file
        for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
            check_pod_monitor(where, monitor, renderings, problems)
    if route_files:
        check_route_files_agree(route_files, problems)

    renderer = "kubectl kustomize (cross-checked by the built-in renderer)" if kubectl else "the built-in renderer"
    for where, objects in renderings.items():
        print(f"rendered {where}: {', '.join(object_id(o) for o in objects)}")
    print(f"renderer: {renderer}; schemas: Kubernetes {', '.join(KUBERNETES_VERSIONS)} (kubernetes-validate {kubernetes_validate.__version__}, strict)")
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"ok: {len(renderings)} kustomization(s), {sum(map(len, renderings.values()))} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
