"""gears_dist: distributed, out-of-core training of GEARS on Perturb-seq screens of any size.

The notebook API (``import gears_dist as gd``): `ingest`, `open_store`, `describe`, `simulate`, `train`,
`load_run` and `Run`, defined in `gears_dist.api`. They are loaded on first use, so ``import gears_dist``
stays cheap (no torch, Ray or Zarr until a function needs them).
"""

__version__ = "0.1.0"

_API = ("Run", "describe", "ingest", "load_run", "open_store", "simulate", "train")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from gears_dist import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gears_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
