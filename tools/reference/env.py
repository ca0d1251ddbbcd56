"""Create the reference package's own virtual environment (cell-gears 0.1.2), separate from the project's.

    python -m tools.reference.env [PATH]        # or: python tools/reference/env.py [PATH]

torch is installed first and pinned exactly (torch==2.13.0, the CPU wheel): an unpinned torch, pulled in
by cell-gears' or torch-geometric's requirements, would fetch the multi-GB CUDA build. The rest is pinned in
requirements.txt beside this file to the versions of the project's .venv. A stamp file records what was
installed, so a second call returns at once; a changed requirements.txt reinstalls.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
TORCH_PIN = "torch==2.13.0"
DEFAULT_PATH = Path(".bench/reference-venv")


def _stamp_text() -> str:
    digest = hashlib.sha1(REQUIREMENTS.read_bytes() + TORCH_PIN.encode()).hexdigest()[:12]
    return f"{TORCH_PIN} requirements-sha1={digest}\n"


def ensure_reference_env(path: Path = DEFAULT_PATH) -> Path:
    """Return the python executable of the reference venv at `path`, creating/installing it if needed."""
    path = Path(path)
    python = path / "bin" / "python"
    stamp = path / ".reference-installed"
    want = _stamp_text()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    if not python.exists():
        subprocess.run([sys.executable if _is_plain_python() else "python3", "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH_PIN], check=True)
    # torch is already there at the pinned version: a requirement on plain 'torch' is then satisfied.
    subprocess.run(pip + [TORCH_PIN, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(want)
    return python


def _is_plain_python() -> bool:
    # A venv's interpreter would make a venv whose base is that venv; python3 -m venv from the system one.
    return sys.prefix == sys.base_prefix


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    print(ensure_reference_env(parser.parse_args(argv).path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
