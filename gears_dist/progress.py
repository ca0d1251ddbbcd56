"""What a person sees while long work runs: a progress bar on a terminal, now and then a plain line in a log.

``progress(total, desc, unit)`` gives a `Progress`, used by ingest's passes over the .h5ad, evaluation (one per
predictor) and training (one per epoch). What it shows depends on where the output goes:

- a terminal (sys.stderr is a TTY) or a Jupyter kernel: a tqdm bar (``tqdm.auto``: a widget in Jupyter when
  ipywidgets is installed) on stderr with the count, rate, ETA and the caller's figures (loss, cells/s). It
  appears after half a second (shorter work shows nothing) and is removed when the work ends (``leave=False``),
  so what stays on the screen is what a log shows.
- anything else (sbatch, ``ray job submit``, CI, ``| tee``): no bar; work that runs longer than ``log_every_s``
  (60 s) prints one plain line on stdout per ``log_every_s``, e.g.
  ``epoch 3: 1,200/5,000 steps (24%), 2.0 steps/s, loss 0.41, cells/s 512, about 31m40s left``;
  shorter work prints nothing.
- record mode (``record_to(path)``): rank 0 of a Ray run whose output the driver does not forward. The state
  is written to a small JSON file (at most once a second, and when the work ends); the driver follows that
  file (`Follower`) and shows it as above.

``GEARS_DIST_PROGRESS``: ``bar`` (always bars), ``log`` (always plain lines), ``off`` (neither); unset: by the
terminal.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

PROGRESS_ENV = "GEARS_DIST_PROGRESS"
PROGRESS_FILE = "progress.json"  # in a Ray run's directory while it trains (record mode)
LOG_EVERY_S = 60.0     # plain lines, without a terminal
RECORD_EVERY_S = 1.0   # record mode: file writes
POSTFIX_EVERY_S = 0.5  # bars: how often the caller's figures are asked for
BAR_DELAY_S = 0.5      # bars: work shorter than this shows none

Postfix = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None

_record: dict[str, Any] = {}  # record mode: {"path": pathlib.Path}
_ids = itertools.count()
_open: weakref.WeakSet = weakref.WeakSet()  # for close_all


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (its stdout / stderr are no TTY, yet a bar shows there)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
    except Exception:  # noqa: BLE001
        return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def display_mode(stream=None) -> str:
    """'bar', 'log' or 'off' for a bar drawn on `stream` (default sys.stderr): GEARS_DIST_PROGRESS if set,
    else 'bar' on a TTY or in Jupyter, 'log' otherwise."""
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in ("bar", "1", "on", "true"):
        return "bar"
    if env in ("log", "plain"):
        return "log"
    if env in ("off", "0", "none", "false"):
        return "off"
    stream = sys.stderr if stream is None else stream
    return "bar" if _isatty(stream) or _in_notebook() else "log"


def _tqdm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto in Jupyter without ipywidgets: falls back with a warning
        from tqdm.auto import tqdm
    return tqdm


@contextlib.contextmanager
def record_to(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Within: every `Progress` of this process writes its state to `path` instead of showing it."""
    path = pathlib.Path(path)
    before = dict(_record)
    _record.clear()
    _record["path"] = path
    try:
        yield path
    finally:
        _record.clear()
        _record.update(before)


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


class Progress:
    """One piece of work of known size (`total` units): `update` as it goes, `close` (or a with-block) at the end.

    enabled=False (e.g. every rank but 0): does nothing. mode: 'bar', 'log', 'record' or 'off' (default: record
    mode if `record_to` is active, else `display_mode()`). postfix arguments: a mapping, or a function giving
    one, called only when it will be shown (it may cost a device sync, e.g. ``float(loss)``).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 initial: int = 0, unit_scale: bool = False, mode: str | None = None,
                 log_every_s: float = LOG_EVERY_S, file=None, out=None, clock: Callable[[], float] = time.monotonic):
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.unit_scale = desc, unit, unit_scale
        self.n = self._n0 = int(initial)
        self.postfix: dict[str, str] = {}
        self._clock, self._out, self._log_every = clock, out, float(log_every_s)
        self._t0 = clock()
        self._last_postfix = -float("inf")  # the first update's figures are shown
        if not enabled:
            mode = "off"
        elif mode is None:
            mode = "record" if _record else display_mode(file)
        self.mode = mode
        self.closed = False
        self._bar = None
        self._path: pathlib.Path | None = None
        if mode == "bar":
            self._bar = _tqdm()(total=self.total, desc=desc, unit=unit, initial=self.n, leave=False,
                                file=file if file is not None else sys.stderr, unit_scale=unit_scale,
                                dynamic_ncols=True, mininterval=0.2, delay=BAR_DELAY_S)
        elif mode == "record":
            self._path = _record["path"]
            self._id = f"{os.getpid()}-{next(_ids)}"
            self._write_record(done=False)
        self._next = self._t0 + (self._log_every if mode == "log" else RECORD_EVERY_S)
        _open.add(self)

    @property
    def draws(self) -> bool:
        """True when a bar is on the screen (other output would break it)."""
        return self._bar is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take_postfix(self, postfix: Postfix) -> None:
        if postfix is None:
            return
        values = postfix() if callable(postfix) else postfix
        self.postfix = {k: _text(v) for k, v in values.items()}

    def update(self, n: int = 1, postfix: Postfix = None) -> None:
        """`n` more units done; `postfix`: the figures to show beside the count (loss, cells/s, ...)."""
        if self.mode == "off" or self.closed:
            return
        self.n += int(n)
        now = self._clock()
        if self._bar is not None:
            if postfix is not None and now - self._last_postfix >= POSTFIX_EVERY_S:
                self._last_postfix = now
                self._take_postfix(postfix)
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(int(n))
            return
        if now < self._next:
            return
        self._next = now + (self._log_every if self.mode == "log" else RECORD_EVERY_S)
        self._take_postfix(postfix)
        if self.mode == "log":
            self._print_line(now)
        else:
            self._write_record(done=False)

    def update_to(self, n: int, postfix: Postfix = None) -> None:
        """The count is now `n` (the driver following a record)."""
        self.update(int(n) - self.n, postfix)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "record":
            self._write_record(done=True)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: count, share, rate, figures and time left."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._t0, 1e-9)
        rate = (self.n - self._n0) / elapsed
        parts = [f"{self.n:,}/{self.total:,} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%)"
                 if self.total else f"{self.n:,} {self.unit}s", f"{rate:.3g} {self.unit}s/s"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"about {_duration((self.total - self.n) / rate)} left")
        return f"{self.desc}: " + ", ".join(parts)

    def _print_line(self, now: float) -> None:
        print(self.line(now), file=self._out if self._out is not None else sys.stdout, flush=True)

    def _write_record(self, done: bool) -> None:
        record = {"id": self._id, "desc": self.desc, "unit": self.unit, "unit_scale": self.unit_scale,
                  "total": self.total, "n": self.n, "postfix": self.postfix, "done": done}
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._path)  # the driver never reads half a record
        except OSError:
            pass  # progress is never worth failing a run for


def progress(total: int | None, desc: str, unit: str = "it", **kwargs) -> Progress:
    """A `Progress` for `total` units of work named `desc` (see the module docstring for what it shows)."""
    return Progress(total, desc, unit, **kwargs)


def close_all() -> None:
    """Close every open `Progress` (before an error message: a bar of a pass that raised may still be drawn)."""
    for p in list(_open):
        p.close()


def write(text: str, file=None) -> None:
    """Print a line without breaking a bar on the screen (the bar is cleared, the line printed, the bar redrawn)."""
    file = sys.stdout if file is None else file
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is not None and len(getattr(tqdm.tqdm, "_instances", ())):
        tqdm.tqdm.write(text, file=file)
        file.flush()
    else:
        print(text, file=file, flush=True)


class Follower:
    """The driver of a Ray run: shows the records rank 0 writes in record mode (a bar, or plain lines), from
    `poll` calls. Records older than the Follower (a previous run's) are left alone."""

    def __init__(self, path: str | os.PathLike, **kwargs):
        self.path = pathlib.Path(path)
        self._kwargs = kwargs
        self._seen: tuple[int, int] | None = None
        try:
            st = self.path.stat()
            self._seen = (st.st_mtime_ns, st.st_size)
        except OSError:
            pass
        self._id: str | None = None
        self.current: Progress | None = None

    def poll(self) -> None:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self._seen:
                return
            self._seen = (st.st_mtime_ns, st.st_size)
            record = json.loads(self.path.read_text())
            rid, n = str(record["id"]), int(record["n"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if rid != self._id:
            self.close()
            self._id = rid
            if record.get("done"):
                return  # began and ended between two polls
            mode = self._kwargs.get("mode") or display_mode(self._kwargs.get("file"))
            self.current = Progress(record.get("total"), str(record.get("desc", "")), str(record.get("unit", "it")),
                                    initial=n, unit_scale=bool(record.get("unit_scale")),
                                    **{**self._kwargs, "mode": mode})
        if self.current is None:
            return
        postfix = record.get("postfix") or {}
        self.current.update_to(n, postfix if postfix else None)
        if record.get("done"):
            self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
