"""Offline check of the Kubernetes manifests in cluster/k8s/ before `kubectl apply`.

    .venv/bin/python cluster/validate_manifests.py [MANIFEST.yaml ...]   (default: cluster/k8s/*.yaml)

Two layers, both must pass (exit 0; else every problem is printed, exit 1):

1. Schema: each RayJob / RayCluster against the openAPIV3Schema of the KubeRay CRDs in
   cluster/schemas/kuberay/ (vendored; or --schemas DIR), with the Kubernetes extensions made explicit:
   unknown fields are errors (as `kubectl apply --validate=strict`), `nullable`, int32/int64
   ranges, and unique keys of `x-kubernetes-list-type: map|set` lists (duplicate container or
   env names). CEL rules (`x-kubernetes-validations`) are not evaluated; none of the fields they
   guard (deletionStrategy, managedBy, gcsFaultToleranceOptions.backend) are used here.
2. Project invariants: rayVersion is the Ray pinned in pyproject.toml; every Ray container runs the
   project image whose tag names the project, Ray and Python versions (as the Dockerfile builds it);
   GPU worker groups (name containing "gpu") limit nvidia.com/gpu; a RayJob's entrypoint is a
   valid `gears-dist train|tune` command whose --config exists in configs/ and whose store and run
   directory lie on the shared volume that every pod mounts at the same path; MLFLOW_TRACKING_URI is
   set; RayJobs clean up after themselves (shutdownAfterJobFinishes, ttlSecondsAfterFinished).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jsonschema
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SCHEMAS = REPO / "cluster" / "schemas" / "kuberay"
DEFAULT_MANIFESTS = REPO / "cluster" / "k8s"

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# Kubernetes object names used by KubeRay for Services: RFC 1123 labels.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GPU = "nvidia.com/gpu"
RAY_KINDS = ("RayJob", "RayCluster")


# ----------------------------------------------------------------------------------------- schema layer


def to_json_schema(node: Any) -> Any:
    """A Kubernetes structural schema rewritten as plain JSON Schema with the k8s semantics explicit."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()}
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("format") in _INT_RANGES and out.get("type") == "integer":
        lo, hi = _INT_RANGES[out["format"]]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    closed = (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    )
    if closed:
        props = out["properties"]
        if out.get("x-kubernetes-embedded-resource"):
            for key in ("apiVersion", "kind", "metadata"):
                props.setdefault(key, {})
        out["additionalProperties"] = False
    return out


def _list_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-map-keys`: items of a map-list are identified by these keys, so no duplicates."""
    if schema.get("x-kubernetes-list-type") != "map" or not isinstance(instance, list):
        return
    seen: dict[tuple, int] = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        ident = tuple(item.get(k) for k in keys)
        if ident in seen:
            named = ", ".join(f"{k}={v!r}" for k, v in zip(keys, ident))
            yield jsonschema.ValidationError(f"duplicate entry ({named}) at items {seen[ident]} and {i}")
        seen[ident] = i


def _list_type(validator, kind, instance, schema):
    if kind == "set" and isinstance(instance, list):
        seen = set()
        for item in instance:
            key = yaml.safe_dump(item)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a set-list")
            seen.add(key)


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-map-keys": _list_keys, "x-kubernetes-list-type": _list_type},
)


def load_crd_validators(schema_dir: pathlib.Path = DEFAULT_SCHEMAS) -> dict[tuple[str, str], Any]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in schema_dir."""
    schema_dir = pathlib.Path(schema_dir)
    files = sorted(schema_dir.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(
            f"no KubeRay CRD schemas in {schema_dir}: expected ray.io_rayjobs.yaml and ray.io_rayclusters.yaml "
            "(vendored in cluster/schemas/kuberay/, or pass --schemas DIR)"
        )
    validators = {}
    for f in files:
        # The CRDs are ~2 MB of YAML: the C loader reads them in a fraction of the pure-Python time.
        for crd in yaml.load_all(f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", False):
                    continue
                schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = _K8sValidator(schema)
    return validators


def _path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<root>"


def schema_errors(doc: dict, validators: dict[tuple[str, str], Any]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        known = ", ".join(f"{a} {k}" for a, k in sorted(validators))
        return [f"apiVersion/kind {key[0]} {key[1]} has no CRD schema (known: {known})"]
    errors = [f"{_path(e)}: {e.message}" for e in validators[key].iter_errors(doc)]
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_LABEL.match(name) or len(name) > 63:
        errors.append(f"metadata.name: expected a lowercase RFC 1123 label of at most 63 characters, received {name!r}")
    for field in ("labels", "annotations"):
        values = meta.get(field) or {}
        bad = {k: v for k, v in values.items() if not isinstance(v, str)}
        if bad:
            errors.append(f"metadata.{field}: values must be strings, received {bad!r}")
    return errors


# ------------------------------------------------------------------------------------- project layer


@dataclass(frozen=True)
class ProjectFacts:
    """What the manifests must agree with, read from the repository itself."""

    repo: pathlib.Path
    project_version: str
    ray_version: str
    python_tag: str  # "py311"

    @property
    def base_image(self) -> str:
        return f"rayproject/ray:{self.ray_version}-{self.python_tag}-gpu"

    @property
    def image_tag(self) -> str:
        return f"{self.project_version}-ray{self.ray_version}-{self.python_tag}-gpu"


def project_facts(repo: pathlib.Path = REPO) -> ProjectFacts:
    meta = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    ray = [m.group(1) for d in meta["dependencies"] if (m := re.match(r"^ray(?:\[[^\]]*\])?==([\w.]+)$", d))]
    if len(ray) != 1:
        raise ValueError(f"pyproject.toml: expected exactly one pinned 'ray[...]==X' dependency, found {ray}")
    py = re.match(r"^>=\s*(\d+)\.(\d+)", meta["requires-python"])
    if not py:
        raise ValueError(f"pyproject.toml: requires-python should read '>=3.X', received {meta['requires-python']!r}")
    return ProjectFacts(repo, meta["version"], ray[0], f"py{py.group(1)}{py.group(2)}")


def _cluster_spec(doc: dict) -> dict:
    spec = doc.get("spec") or {}
    return (spec.get("rayClusterSpec") if doc.get("kind") == "RayJob" else spec) or {}


def _pod_templates(doc: dict) -> Iterator[tuple[str, dict]]:
    cluster = _cluster_spec(doc)
    head = (cluster.get("headGroupSpec") or {}).get("template")
    if head:
        yield "head", head
    for group in cluster.get("workerGroupSpecs") or []:
        if group.get("template"):
            yield f"worker group {group.get('groupName')!r}", group["template"]
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
    if doc.get("kind") == "RayJob" and submitter:
        yield "submitter", submitter


def _containers(template: dict) -> list[dict]:
    return ((template.get("spec") or {}).get("containers")) or []


def _env(container: dict) -> dict[str, str]:
    return {e.get("name"): e.get("value") for e in container.get("env") or []}


def _image_errors(doc: dict, facts: ProjectFacts) -> list[str]:
    errors = []
    for where, template in _pod_templates(doc):
        for c in _containers(template)[:1]:  # the first container runs Ray (KubeRay's convention)
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            repo = image.rsplit(":", 1)[0] if tag else image
            if not repo.endswith("/gears-dist") and repo != "gears-dist":
                errors.append(f"{where}: image {image!r} is not the project image '<registry>/gears-dist:TAG'")
            if tag != facts.image_tag:
                errors.append(
                    f"{where}: image tag {tag!r} does not match the project's {facts.image_tag!r} "
                    "(version-rayRAY-pyXY-gpu, as built from the Dockerfile)"
                )
    return errors


def _gpu_errors(doc: dict) -> list[str]:
    errors = []
    cluster = _cluster_spec(doc)
    head = (cluster.get("headGroupSpec") or {}).get("template") or {}
    for c in _containers(head)[:1]:
        if _GPU in ((c.get("resources") or {}).get("limits") or {}):
            errors.append("head: requests a GPU; the head only coordinates (num-gpus '0'), GPUs go to worker groups")
    groups = cluster.get("workerGroupSpecs") or []
    for group in groups:
        name = str(group.get("groupName", ""))
        if "gpu" not in name:
            continue
        for c in _containers(group.get("template") or {})[:1]:
            res = c.get("resources") or {}
            limit = (res.get("limits") or {}).get(_GPU)
            if limit in (None, 0, "0"):
                errors.append(f"worker group {name!r}: GPU group without resources.limits[{_GPU!r}]")
                continue
            request = (res.get("requests") or {}).get(_GPU)
            if request is not None and str(request) != str(limit):
                errors.append(f"worker group {name!r}: {_GPU} request {request!r} != limit {limit!r} "
                              "(Kubernetes requires them equal for extended resources)")
            start_gpus = (group.get("rayStartParams") or {}).get("num-gpus")
            if start_gpus is not None and str(start_gpus) != str(limit):
                errors.append(f"worker group {name!r}: rayStartParams num-gpus {start_gpus!r} != limit {limit!r}")
    if not any("gpu" in str(g.get("groupName", "")) for g in groups):
        errors.append("no GPU worker group (a workerGroupSpecs entry whose groupName contains 'gpu')")
    return errors


def _shared_mount(doc: dict) -> tuple[list[str], str | None]:
    """The mount path of the PVC that every Ray pod (head and workers) mounts at the same place."""
    errors, mounts = [], []
    for where, template in _pod_templates(doc):
        if where == "submitter":
            continue
        volumes = {v.get("name"): v for v in (template.get("spec") or {}).get("volumes") or []}
        found = set()
        for c in _containers(template)[:1]:
            for m in c.get("volumeMounts") or []:
                claim = (volumes.get(m.get("name")) or {}).get("persistentVolumeClaim", {}).get("claimName")
                if claim:
                    found.add((claim, m.get("mountPath")))
        if not found:
            errors.append(f"{where}: mounts no PersistentVolumeClaim (the store and checkpoints need shared storage)")
        mounts.append(found)
    common = set.intersection(*mounts) if mounts else set()
    if mounts and not common and not errors:
        errors.append(f"head and workers do not mount the same PersistentVolumeClaim at the same path: {mounts}")
    path = min(common)[1] if common else None
    return errors, path


def _entrypoint_errors(doc: dict, facts: ProjectFacts, mount: str | None) -> list[str]:
    from gears_dist.cli import build_parser

    entry = (doc.get("spec") or {}).get("entrypoint")
    if not isinstance(entry, str) or not entry.strip():
        return ["spec.entrypoint: missing"]
    argv = shlex.split(entry)
    if argv[0] != "gears-dist":
        return [f"spec.entrypoint: expected a 'gears-dist ...' command, received {entry!r}"]
    parser = build_parser()
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv[1:])
    except SystemExit:
        last = stderr.getvalue().strip().splitlines()[-1:] or ["?"]
        return [f"spec.entrypoint: not a valid gears-dist command: {last[0]} (entrypoint {entry!r})"]
    errors = []
    if args.command not in ("train", "tune"):
        errors.append(f"spec.entrypoint: a RayJob runs 'gears-dist train' or 'tune', received {args.command!r}")
    config = getattr(args, "config", None)
    if not config:
        errors.append("spec.entrypoint: no --config")
    else:
        # The image's working directory is a copy of the repo's configs/ (see Dockerfile).
        cfg = pathlib.PurePosixPath(config)
        if cfg.is_absolute() or cfg.parts[:1] != ("configs",) or not (facts.repo / cfg).is_file():
            errors.append(f"spec.entrypoint: --config {config!r} is not a file under configs/ in this repository")
    for label, value in (("store", getattr(args, "store", None)), ("--out", getattr(args, "out", None))):
        if value and mount and not value.startswith(mount.rstrip("/") + "/"):
            errors.append(f"spec.entrypoint: {label} {value!r} is not on the shared volume mounted at {mount!r}")
    if not getattr(args, "out", None):
        errors.append(f"spec.entrypoint: {args.command} without --out (the run directory must be on the shared volume)")
    if not errors:
        errors += _capacity_errors(doc, facts.repo / config, args.command)
    return errors


def _cpu(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _capacity_errors(doc: dict, config: pathlib.Path, command: str) -> list[str]:
    """The config's Ray Train workers (times concurrent trials, for tune) fit the GPU group."""
    from gears_dist.config import ConfigError
    from gears_dist.train.config import load_run_config

    name = f"configs/{config.name}"
    try:
        if command == "train":
            s = load_run_config(config).scaling
            workers, cpus, concurrent = s.num_workers, s.cpus_per_worker, 1
            gpus = (s.gpus_per_worker or 1.0) if s.use_gpu else 0.0
        else:
            data = yaml.safe_load(config.read_text()) or {}
            res = data.get("resources") or {}
            workers, cpus = res.get("num_workers", 1), res.get("cpus_per_worker", 1)
            gpus, concurrent = res.get("gpus_per_worker", 0), data.get("max_concurrent", 1)
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        return [f"spec.entrypoint: {name} does not load: {exc}"]
    if not gpus:
        return [f"{name} trains on CPU (no GPU per worker) but this RayJob is for GPU workers"]
    cluster = _cluster_spec(doc)
    autoscale = bool(cluster.get("enableInTreeAutoscaling"))
    errors = []
    for group in cluster.get("workerGroupSpecs") or []:
        if "gpu" not in str(group.get("groupName", "")):
            continue
        limits = ((_containers(group.get("template") or {}) or [{}])[0].get("resources") or {}).get("limits") or {}
        pods = group.get("maxReplicas" if autoscale else "replicas", 0)
        try:
            pod_gpus, pod_cpus = float(limits.get(_GPU, 0)), _cpu(limits.get("cpu", 0))
        except ValueError:
            continue  # a malformed quantity: the schema layer reports it
        if not isinstance(pods, int):
            continue  # likewise
        need = concurrent * workers * gpus
        if gpus > pod_gpus or cpus > pod_cpus:
            errors.append(f"{name}: a worker needs {gpus} GPU(s) and {cpus} CPU(s) but a {group['groupName']!r} "
                          f"pod has {pod_gpus:g} and {pod_cpus:g}")
        if need > pods * pod_gpus:
            errors.append(f"{name}: {concurrent} x {workers} workers x {gpus} GPU(s) = {need:g} GPUs, but group "
                          f"{group['groupName']!r} has at most {pods} pods x {pod_gpus:g}")
    return errors


def _mlflow_errors(doc: dict) -> list[str]:
    runtime_env = yaml.safe_load((doc.get("spec") or {}).get("runtimeEnvYAML") or "") or {}
    if "MLFLOW_TRACKING_URI" in (runtime_env.get("env_vars") or {}):
        return []
    errors = []
    for where, template in _pod_templates(doc):
        if where == "submitter":
            continue
        for c in _containers(template)[:1]:
            if not _env(c).get("MLFLOW_TRACKING_URI"):
                errors.append(f"{where}: MLFLOW_TRACKING_URI not set (container env or runtimeEnvYAML env_vars)")
    return errors


def invariant_errors(doc: dict, facts: ProjectFacts) -> list[str]:
    if doc.get("kind") not in RAY_KINDS:
        return []
    cluster = _cluster_spec(doc)
    errors = []
    if str(cluster.get("rayVersion")) != facts.ray_version:
        errors.append(f"rayVersion {cluster.get('rayVersion')!r} != Ray pinned in pyproject.toml ({facts.ray_version!r})")
    errors += _image_errors(doc, facts)
    errors += _gpu_errors(doc)
    mount_errors, mount = _shared_mount(doc)
    errors += mount_errors
    errors += _mlflow_errors(doc)
    if doc["kind"] == "RayJob":
        spec = doc.get("spec") or {}
        errors += _entrypoint_errors(doc, facts, mount)
        if spec.get("shutdownAfterJobFinishes") is not True:
            errors.append("spec.shutdownAfterJobFinishes must be true (GPU pods are released when the job ends)")
        ttl = spec.get("ttlSecondsAfterFinished")
        if not isinstance(ttl, int) or ttl <= 0:
            errors.append(f"spec.ttlSecondsAfterFinished must be a positive integer, received {ttl!r}")
    return errors


# ----------------------------------------------------------------------------------------------- both


def check_document(doc: dict, validators: dict, facts: ProjectFacts) -> list[str]:
    if not isinstance(doc, dict):
        return [f"expected a mapping (a Kubernetes object), received {type(doc).__name__}"]
    if doc.get("kind") in RAY_KINDS:
        return schema_errors(doc, validators) + invariant_errors(doc, facts)
    if doc.get("kind") == "PersistentVolumeClaim" and doc.get("apiVersion") == "v1":
        modes = (doc.get("spec") or {}).get("accessModes") or []
        if "ReadWriteMany" not in modes:
            return [f"PersistentVolumeClaim: accessModes {modes} lacks ReadWriteMany (head and workers share it)"]
        return []
    return [f"unexpected object {doc.get('apiVersion')} {doc.get('kind')}: only RayJob, RayCluster, PVC live here"]


def check_files(paths: list[pathlib.Path], schema_dir: pathlib.Path = DEFAULT_SCHEMAS) -> list[str]:
    validators = load_crd_validators(schema_dir)
    facts = project_facts()
    problems = []
    for path in paths:
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            problems += [f"{path.name}[{i}] {doc.get('kind', '?')}: {e}" for e in check_document(doc, validators, facts)]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifests", nargs="*", type=pathlib.Path)
    p.add_argument("--schemas", type=pathlib.Path, default=DEFAULT_SCHEMAS)
    args = p.parse_args(argv)
    paths = args.manifests or sorted(DEFAULT_MANIFESTS.glob("*.yaml"))
    problems = check_files(paths, args.schemas)
    for line in problems:
        print(line)
    print(f"{len(paths)} manifest file(s): {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
