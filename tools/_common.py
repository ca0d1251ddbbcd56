"""Helpers shared by the benchmark scripts in tools/: memory and page-fault readings, the benchmark environment,
JSON-lines results.

The scripts run as `.venv/bin/python tools/NAME.py` from the repository root: gears_dist comes from the venv
(installed by `make install`), and a script's own folder is on sys.path, so they import this module (and each
other) by plain name.

Memory conventions (BENCHMARKS.md, "Method"):
- peak RSS of a process is its own VmHWM (/proc/self/status), read at its end by the process itself. A parent's
  `ru_maxrss` for a child is NOT used: Linux carries the forked parent's RSS into it across exec.
- minor page faults (`ru_minflt`) are reported beside times: on glibc with default settings, a heap that is
  trimmed and grown again shows up there first.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource

# The Makefile's and the launcher's allocator settings (glibc): no mmap for large blocks, no trimming.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "17179869184"}


def bench_env(**extra: str) -> dict:
    """os.environ for a benchmark child, with the allocator settings, DeepSpeed's CPU accelerator and Ray's token
    auth where the environment does not set them already, plus `extra`. (A tool cannot change its own allocator
    settings: glibc reads them at start, so set them in front of the command, as the Makefile does.)"""
    env = dict(os.environ)
    for key, value in {**ALLOCATOR_ENV, "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token"}.items():
        env.setdefault(key, value)
    env.update(extra)
    return env


def status_mb(*keys: str) -> dict[str, float]:
    """Fields of /proc/self/status in MB (e.g. VmHWM: peak RSS, VmRSS: current RSS); missing keys are absent."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0]) / 1024
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM) in MB."""
    return status_mb("VmHWM").get("VmHWM", float("nan"))


def rss_mb() -> float:
    """This process's current RSS (VmRSS) in MB."""
    return status_mb("VmRSS").get("VmRSS", float("nan"))


def minor_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def usage(who: int = resource.RUSAGE_SELF) -> dict:
    """CPU seconds (user + system, all threads), ru_maxrss in MB and minor faults of this process (or, with
    RUSAGE_CHILDREN, of its reaped children: ru_maxrss is then the largest single child)."""
    r = resource.getrusage(who)
    return {"cpu_s": r.ru_utime + r.ru_stime, "maxrss_mb": r.ru_maxrss / 1024, "minor_faults": r.ru_minflt}


def load_avg() -> float:
    """1-minute load average, rounded (the machine is often shared: recorded beside every timing)."""
    return round(os.getloadavg()[0], 2)


def append_jsonl(path: pathlib.Path | str, row: dict, echo: bool = True) -> None:
    """Append one result row to a JSON-lines file (folders created); echo it on stdout."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    if echo:
        print(json.dumps(row, default=str), flush=True)


def read_jsonl(path: pathlib.Path | str) -> list[dict]:
    """The JSON rows of a results file (other lines skipped); [] if it does not exist."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.lstrip().startswith("{")]


def last_json_line(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object (a child benchmark's result), or None."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None
