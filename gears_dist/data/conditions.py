"""Perturbation condition names: parse what users have into canonical perturbation sets.

Canonical form: a condition is a sorted tuple of gene symbols; the control is the empty tuple and
is named ``ctrl``; a set is named by joining its genes with ``+`` (``A``, ``A+B``, ``A+B+C``).
Accepted inputs: GEARS style (``ctrl``, ``A+ctrl``, ``A+B``), scPerturb / perturbench style
(``control``, ``A``, ``A+B`` or ``A_B`` with ``separators=('+', '_')``), and any control value the
user names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CONTROL_NAME = "ctrl"
DEFAULT_CONTROL_VALUES = ("ctrl", "control", "non-targeting", "NT", "non_targeting", "nontargeting")
DEFAULT_SEPARATORS = ("+",)


class ConditionError(ValueError):
    """A condition name cannot be parsed; the message names it and says what form is expected."""


def parse_condition(
    name: object,
    control_values: Iterable[str] = DEFAULT_CONTROL_VALUES,
    separators: Sequence[str] = DEFAULT_SEPARATORS,
) -> tuple[str, ...]:
    """Return the sorted tuple of perturbed genes of `name`; () for a control.

    Raises ConditionError for anything that is not a set of distinct, non-empty gene names.
    """
    if not isinstance(name, str):
        raise ConditionError(f"condition {name!r}: expected a string such as 'A', 'A+B' or 'ctrl', "
                             f"received {type(name).__name__}")
    controls = set(control_values)
    text = name.strip()
    if not text:
        raise ConditionError("condition '': empty name; expected a gene set such as 'A', 'A+B' or a control value")
    if text in controls:
        return ()
    tokens = [text]
    for sep in separators:
        tokens = [part for tok in tokens for part in tok.split(sep)]
    tokens = [t.strip() for t in tokens]
    if any(not t for t in tokens):
        raise ConditionError(
            f"condition {name!r}: has an empty gene name (separators {list(separators)}); "
            f"expected e.g. 'A+B'"
        )
    genes = [t for t in tokens if t not in controls]
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise ConditionError(f"condition {name!r}: gene(s) {dup} appear more than once; a set names each gene once")
    return tuple(sorted(genes))


def condition_name(genes: Iterable[str]) -> str:
    """Canonical name of a perturbation set."""
    genes = tuple(sorted(genes))
    return "+".join(genes) if genes else CONTROL_NAME


def canonicalize(name: str, **kwargs) -> str:
    return condition_name(parse_condition(name, **kwargs))
