"""cluster/k8s/: every manifest validates against the KubeRay CRD schemas (vendored in cluster/schemas/kuberay/) and
the project invariants (cluster/validate_manifests.py); deliberately broken copies are caught."""

from __future__ import annotations

import copy
import importlib.util
import pathlib
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "cluster" / "schemas" / "kuberay"
K8S = REPO / "cluster" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def _load_module():
    spec = importlib.util.spec_from_file_location("validate_manifests", REPO / "cluster" / "validate_manifests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


vm = _load_module()


@pytest.fixture(scope="module")
def validators():
    if not (SCHEMAS / "ray.io_rayjobs.yaml").is_file():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (vendored in cluster/schemas/kuberay/)")
    return vm.load_crd_validators(SCHEMAS)


@pytest.fixture(scope="module")
def facts():
    return vm.project_facts(REPO)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _rayjob_train() -> dict:
    (doc,) = _docs("rayjob-train.yaml")
    return doc


def test_the_three_paths_are_there():
    kinds = {(p.name, d["kind"]) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d}
    assert ("rayjob-train.yaml", "RayJob") in kinds
    assert ("rayjob-tune.yaml", "RayJob") in kinds
    assert ("raycluster.yaml", "RayCluster") in kinds
    assert ("pvc.yaml", "PersistentVolumeClaim") in kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid(path, validators, facts):
    problems = []
    for doc in (d for d in yaml.safe_load_all(path.read_text()) if d):
        problems += vm.check_document(doc, validators, facts)
    assert problems == []


def test_pinned_versions_are_read_from_pyproject(facts):
    text = (REPO / "pyproject.toml").read_text()
    assert f"=={facts.ray_version}\"" in text and "ray[" in text
    assert facts.python_tag == "py311" and facts.base_image == f"rayproject/ray:{facts.ray_version}-py311-gpu"


def test_rayjobs_clean_up_and_track(facts):
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        (doc,) = _docs(name)
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert doc["spec"]["ttlSecondsAfterFinished"] > 0
        assert doc["spec"]["rayClusterSpec"]["rayVersion"] == facts.ray_version


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _worker_container(doc: dict) -> dict:
    return _worker(doc)["template"]["spec"]["containers"][0]


def _head_container(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


# Each mutation of the valid training RayJob and a fragment of the message it must produce.
def _typo_field(d):
    d["spec"]["shutdownAfterJobFinish"] = d["spec"].pop("shutdownAfterJobFinishes")


def _wrong_type(d):
    _worker(d)["replicas"] = "four"


def _bad_quantity(d):
    _worker_container(d)["resources"]["limits"]["memory"] = "lots"


def _duplicate_env(d):
    _head_container(d)["env"].append({"name": "MLFLOW_TRACKING_URI", "value": "http://x"})


def _container_without_name(d):
    del _worker_container(d)["name"]


def _old_ray(d):
    d["spec"]["rayClusterSpec"]["rayVersion"] = "2.9.0"


def _no_gpu_limit(d):
    for key in ("limits", "requests"):
        _worker_container(d)["resources"][key].pop("nvidia.com/gpu")


def _gpu_request_differs(d):
    _worker_container(d)["resources"]["requests"]["nvidia.com/gpu"] = "2"


def _image_tag(d):
    _worker_container(d)["image"] = "registry.example.com/gears-dist:latest"


def _foreign_image(d):
    _head_container(d)["image"] = "rayproject/ray:2.60.0-py311-gpu"


def _missing_config(d):
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace("--config configs/", "--config configs/no_such_")


def _unknown_flag(d):
    d["spec"]["entrypoint"] += " --epochs 3"


def _not_gears_dist(d):
    d["spec"]["entrypoint"] = "python train.py"


def _store_off_volume(d):
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace("/data/stores/", "/tmp/stores/")


def _worker_without_volume(d):
    _worker_container(d)["volumeMounts"] = [m for m in _worker_container(d)["volumeMounts"] if m["name"] != "data"]


def _no_mlflow(d):
    for c in (_head_container(d), _worker_container(d)):
        c["env"] = [e for e in c["env"] if e["name"] != "MLFLOW_TRACKING_URI"]


def _no_cleanup(d):
    d["spec"]["shutdownAfterJobFinishes"] = False
    del d["spec"]["ttlSecondsAfterFinished"]


def _too_few_gpus(d):
    w = _worker(d)
    w["replicas"] = w["minReplicas"] = w["maxReplicas"] = 2


def _cpu_config(d):
    d["spec"]["entrypoint"] = d["spec"]["entrypoint"].replace("configs/replogle_k562.yaml", "configs/demo.yaml")


def _bad_name(d):
    d["metadata"]["name"] = "GEARS_train"


BROKEN = [
    (_typo_field, "'shutdownAfterJobFinish' was unexpected"),
    (_wrong_type, "'four' is not of type 'integer'"),
    (_bad_quantity, "'lots' does not match"),
    (_duplicate_env, "duplicate entry (name='MLFLOW_TRACKING_URI')"),
    (_container_without_name, "'name' is a required property"),
    (_old_ray, "rayVersion '2.9.0'"),
    (_no_gpu_limit, "GPU group without resources.limits"),
    (_gpu_request_differs, "request '2' != limit"),
    (_image_tag, "image tag 'latest'"),
    (_foreign_image, "is not the project image"),
    (_missing_config, "is not a file under configs/"),
    (_unknown_flag, "not a valid gears-dist command"),
    (_not_gears_dist, "expected a 'gears-dist ...' command"),
    (_store_off_volume, "is not on the shared volume"),
    (_worker_without_volume, "mounts no PersistentVolumeClaim"),
    (_no_mlflow, "MLFLOW_TRACKING_URI not set"),
    (_no_cleanup, "shutdownAfterJobFinishes must be true"),
    (_too_few_gpus, "GPUs, but group 'gpu' has at most 2 pods"),
    (_cpu_config, "trains on CPU"),
    (_bad_name, "metadata.name"),
]


@pytest.mark.parametrize("mutate,expected", BROKEN, ids=[m.__name__.strip("_") for m, _ in BROKEN])
def test_broken_manifest_is_rejected(mutate, expected, validators, facts):
    doc = copy.deepcopy(_rayjob_train())
    assert vm.check_document(doc, validators, facts) == []
    mutate(doc)
    problems = vm.check_document(doc, validators, facts)
    assert any(expected in p for p in problems), problems


def test_command_line_reports_problems_and_exit_code(tmp_path, validators):
    doc = _rayjob_train()
    _old_ray(doc)
    _typo_field(doc)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    script = str(REPO / "cluster" / "validate_manifests.py")
    bad = subprocess.run([sys.executable, script, "--schemas", str(SCHEMAS), str(broken)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "rayVersion '2.9.0'" in bad.stdout and "shutdownAfterJobFinish" in bad.stdout


def test_schema_conversion_keeps_kubernetes_semantics():
    schema = vm.to_json_schema({
        "type": "object",
        "properties": {
            "port": {"x-kubernetes-int-or-string": True},
            "when": {"type": "string", "nullable": True},
            "n": {"type": "integer", "format": "int32"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {}}},
        },
    })
    v = vm._K8sValidator(schema)
    assert not list(v.iter_errors({"port": 8080, "when": None, "n": 3, "free": {"anything": 1}}))
    assert not list(v.iter_errors({"port": "http"}))
    assert list(v.iter_errors({"port": 1.5}))
    assert list(v.iter_errors({"n": 2**31}))
    assert list(v.iter_errors({"other": 1}))
