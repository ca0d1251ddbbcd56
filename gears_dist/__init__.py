"""gears_dist: distributed, out-of-core training of GEARS on Perturb-seq screens of any size.

The notebook API (``import gears_dist as gd``): `ingest`, `open_store`, `describe`, `simulate`, `train`,
`tune`, `load_run`, `Run`, `Store` and `TuneResult`, defined in `gears_dist.api`. They are loaded on first use,
so ``import gears_dist`` stays cheap (no torch, Ray or Zarr until a function needs them).

``gd.train`` and ``gd.tune`` are also the names of packages (``gears_dist.train.loop``,
``gears_dist.tune.search``, ...): Python binds a subpackage to its parent's attribute whenever it is imported, so
a plain function of that name would be replaced by the package as soon as anything imported
``gears_dist.train.*`` / ``gears_dist.tune.*``. Instead each package itself is made callable:
``gd.train(store, ...)`` calls `gears_dist.api.train`, ``gd.tune(store, ...)`` calls `gears_dist.api.tune`, and
``gears_dist.train.loop`` and every other import of the packages work as before.
"""

import types as _types

__version__ = "0.1.0"

_API = ("Run", "Store", "TuneResult", "describe", "ingest", "load_run", "open_store", "simulate")

__all__ = ["__version__", "train", "tune", *_API]


def __getattr__(name: str):
    if name in _API:
        from gears_dist import api

        value = getattr(api, name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'gears_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _CallablePackage(_types.ModuleType):
    """A subpackage (`gears_dist.train`, `gears_dist.tune`) callable as the `gears_dist.api` function of its name."""

    def _api_function(self):
        from gears_dist import api

        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        """Calls `gears_dist.api.<name>`: ``gd.train(store, ...)`` returns a `gears_dist.api.Run`,
        ``gd.tune(store, ...)`` a `gears_dist.api.TuneResult`. See ``help(gears_dist.api.train)`` / ``.tune``."""
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature(gd.train), notebook call tips
        import inspect

        return inspect.signature(self._api_function())


_TrainPackage = _CallablePackage  # the earlier name

# the packages' __init__ modules are docstrings: no torch or Ray imported here
from gears_dist import train, tune  # noqa: E402

train.__class__ = _CallablePackage
tune.__class__ = _CallablePackage
