"""Gene vocabulary resources shipped with the package: human GO annotations and symbol aliases.

Built by tools/build_go_table.py from Bioconductor org.Hs.eg.db (see resources/go_human.json for
the release and dates), so a fresh install works offline.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json
from collections.abc import Iterable


def _resource(name: str):
    return importlib.resources.files("gears_dist.data").joinpath("resources", name)


@functools.cache
def go_annotations() -> dict[str, frozenset[int]]:
    """Gene symbol -> set of GO term numbers (GO:0005576 -> 5576), direct annotations."""
    out = {}
    with _resource("go_human.tsv.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        for line in fh:
            sym, terms = line.rstrip("\n").split("\t")
            out[sym] = frozenset(int(t) for t in terms.split())
    return out


@functools.cache
def aliases() -> dict[str, str]:
    """Old or alternative symbol -> current symbol (unambiguous aliases only)."""
    out = {}
    with _resource("alias_human.tsv.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        for line in fh:
            a, s = line.rstrip("\n").split("\t")
            out[a] = s
    return out


def go_provenance() -> dict:
    return json.loads(_resource("go_human.json").read_text())


def human_symbols() -> list[str]:
    """Current human gene symbols that have GO annotations, sorted."""
    return sorted(go_annotations())


def resolve_symbols(symbols: Iterable[str], known: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Map old symbols to current ones through the alias table.

    A symbol that is already current (in `known`, default: the annotated human symbols) is kept;
    otherwise an unambiguous alias is replaced by its current symbol; anything else is kept as is.
    Returns the resolved list and the {old: new} renames that were applied.
    """
    current = set(known) if known is not None else set(go_annotations())
    table = aliases()
    resolved, renamed = [], {}
    for s in symbols:
        if s not in current and s in table:
            renamed[s] = table[s]
            resolved.append(table[s])
        else:
            resolved.append(s)
    return resolved, renamed
