"""Write cluster/constraints.txt: the exact versions of gears_dist's runtime dependency tree as installed
and tested in this environment, for the Docker image (`pip install --constraint`).

    .venv/bin/python cluster/make_constraints.py            # rewrite cluster/constraints.txt
    .venv/bin/python cluster/make_constraints.py --check    # exit 1 if it is out of date

Walks the installed metadata from `gears_dist` (plus the extras the project asks for, e.g. ray[train,tune]),
evaluating environment markers for Linux x86_64 / this Python. Local version labels are dropped
(torch 2.13.0+cpu here -> torch==2.13.0: the image takes the CUDA wheel of the same release).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import pathlib
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

OUT = pathlib.Path(__file__).resolve().parent / "constraints.txt"
HEADER = (
    "# Exact versions of gears_dist's runtime dependencies, as tested together (see cluster/make_constraints.py).\n"
    "# Regenerate after changing dependencies: .venv/bin/python cluster/make_constraints.py\n"
)


def _closure(root: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in done:
            continue
        done.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency whose marker held but that is not installed here
        canon = canonicalize_name(dist.metadata["Name"])
        if canon != canonicalize_name(root):
            pins[canon] = dist.version.split("+", 1)[0]
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return pins


def render() -> str:
    pins = _closure("gears_dist")
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUT.read_text() if OUT.is_file() else ""
        if current != text:
            print(f"{OUT} is out of date: run .venv/bin/python cluster/make_constraints.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10)) - 2} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
