"""gears_dist: distributed, out-of-core training of GEARS on Perturb-seq screens of any size.

The notebook API (``import gears_dist as gd``): `ingest`, `open_store`, `describe`, `simulate`, `train`,
`load_run` and `Run`, defined in `gears_dist.api`. They are loaded on first use, so ``import gears_dist``
stays cheap (no torch, Ray or Zarr until a function needs them).

``gd.train`` is also the name of the training package (``gears_dist.train.loop``, ``.config``, ...): Python
binds a subpackage to its parent's attribute whenever it is imported, so a plain function of that name would
be replaced by the package as soon as anything imported ``gears_dist.train.*``. Instead the package itself is
made callable: ``gd.train(store, ...)`` calls `gears_dist.api.train`, and ``gears_dist.train.loop`` and every
other import of the package work as before.
"""

import types as _types

__version__ = "0.1.0"

_API = ("Run", "describe", "ingest", "load_run", "open_store", "simulate")

__all__ = ["__version__", "train", *_API]


def __getattr__(name: str):
    if name in _API:
        from gears_dist import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gears_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _TrainPackage(_types.ModuleType):
    """The `gears_dist.train` package, callable as `gears_dist.api.train`."""

    def __call__(self, *args, **kwargs):
        """Train GEARS on a store; returns a `gears_dist.api.Run`. See ``help(gears_dist.api.train)``."""
        from gears_dist.api import train

        return train(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(gd.train), notebook call tips
        import inspect

        from gears_dist.api import train

        return inspect.signature(train)


from gears_dist import train  # noqa: E402 - the package's __init__ is a docstring: no torch imported here

train.__class__ = _TrainPackage
