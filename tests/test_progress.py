"""What a person sees while long work runs (gears_dist.progress): a bar on a terminal, plain lines now and then in a
log, nothing for short work without a terminal; rank 0's records shown by the driver of a Ray run, never as text;
ingest's passes, evaluation and training epochs use it."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
import warnings

import pytest

from gears_dist import progress as P


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch):
    monkeypatch.delenv(P.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(P, "BAR_DELAY_S", 0.0)  # tests' work is short: draw at once


def _work(bar: P.Progress, steps: int, clock: Clock | None = None, dt: float = 0.0, sleep: float = 0.0):
    with bar:
        for i in range(steps):
            if clock is not None:
                clock.t += dt
            if sleep:
                time.sleep(sleep)
            bar.update(1, lambda i=i: {"loss": 1.0 / (i + 1)})


def test_without_a_terminal_short_work_prints_nothing(capsys):
    err, out = io.StringIO(), io.StringIO()
    _work(P.progress(50, "epoch 0", "step", file=err, out=out), 50, sleep=0.001)
    assert P.display_mode(err) == "log"
    assert err.getvalue() == "" and out.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_without_a_terminal_long_work_prints_a_plain_line_a_minute():
    out, clock = io.StringIO(), Clock()
    _work(P.Progress(100, "ingest: scan X", "cell", file=io.StringIO(), out=out, clock=clock), 100, clock, dt=3.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # at 60, 120, 180, 240 and 300 s
    assert lines[0].startswith("ingest: scan X: 20/100 cells (20%), 0.333 cells/s, loss 0.05, about 4m00s left")
    assert not any("\r" in line or "|" in line for line in lines)


def test_on_a_terminal_a_bar_with_rate_eta_and_figures():
    tty, out = FakeTTY(), io.StringIO()
    _work(P.progress(10, "epoch 2", "step", file=tty, out=out), 10, sleep=0.06)
    shown = tty.getvalue()
    assert P.display_mode(tty) == "bar"
    assert "\r" in shown and "epoch 2:" in shown and "/10 [" in shown and "step/s" in shown
    assert "<" in shown  # elapsed<remaining: the ETA
    assert "loss=" in shown
    assert shown.endswith("\r")  # leave=False: the bar is removed at the end
    assert out.getvalue() == ""  # no plain lines besides the bar


def test_environment_overrides_the_terminal(monkeypatch):
    monkeypatch.setenv(P.PROGRESS_ENV, "off")
    tty = FakeTTY()
    _work(P.progress(10, "x", file=tty), 10)
    assert tty.getvalue() == ""
    monkeypatch.setenv(P.PROGRESS_ENV, "bar")
    assert P.display_mode(io.StringIO()) == "bar"
    monkeypatch.setenv(P.PROGRESS_ENV, "log")
    assert P.display_mode(FakeTTY()) == "log"


def test_disabled_progress_shows_nothing_anywhere():
    tty, out, clock = FakeTTY(), io.StringIO(), Clock()
    _work(P.progress(10, "x", enabled=False, file=tty, out=out, clock=clock), 10, clock, dt=100.0)
    assert tty.getvalue() == "" and out.getvalue() == ""


_CHILD = """
import time
from gears_dist import progress as P
P.BAR_DELAY_S = 0.0
with P.progress(20, "ingest: scan X", "cell") as bar:
    for _ in range(20):
        time.sleep(0.02)
        bar.update(1)
print("done", flush=True)
"""


def _run_child(stderr_to_pty: bool) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != P.PROGRESS_ENV}
    if not stderr_to_pty:
        proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=60,
                              check=False, stdin=subprocess.DEVNULL)
        return proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty has 0 columns
    try:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=slave,
                                stdin=subprocess.DEVNULL, env=env)
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        proc.wait(timeout=30)
    finally:
        os.close(master)
    return out, b"".join(chunks).decode(errors="replace")


def test_a_real_terminal_gets_a_bar_and_a_pipe_does_not():
    out, err = _run_child(stderr_to_pty=True)
    assert out == "done\n"
    assert "ingest: scan X:" in err and "20/20" in err and "cell/s" in err, err
    out, err = _run_child(stderr_to_pty=False)
    assert out == "done\n" and err == ""


def test_record_mode_writes_state_for_the_driver_and_shows_nothing(tmp_path, capsys):
    path = tmp_path / P.PROGRESS_FILE
    clock = Clock()
    with P.record_to(path):
        bar = P.progress(10, "epoch 1", "step", clock=clock)
        first = json.loads(path.read_text())
        for _ in range(4):
            clock.t += 0.6
            bar.update(1, {"loss": 0.5})
        mid = json.loads(path.read_text())
        bar.close()
    last = json.loads(path.read_text())
    assert first["n"] == 0 and not first["done"] and first["desc"] == "epoch 1" and first["total"] == 10
    assert mid["n"] in (2, 4) and mid["postfix"] == {"loss": "0.5"}  # at most one write a second
    assert last["n"] == 4 and last["done"]
    assert capsys.readouterr() == ("", "")
    assert P.progress(3, "after").mode != "record"


def test_follower_draws_rank0s_records_on_a_terminal(tmp_path):
    path = tmp_path / P.PROGRESS_FILE
    tty = FakeTTY()
    follower = P.Follower(path, file=tty)
    follower.poll()  # no file yet
    clock = Clock()
    with P.record_to(path):
        bar = P.progress(6, "epoch 0", "step", clock=clock)
        follower.poll()
        for _ in range(6):
            clock.t += 1.1  # rank 0 writes a record at each step
            time.sleep(0.25)  # the driver's bar draws at most 5 times a second
            bar.update(1, {"loss": 0.25})
            follower.poll()
        bar.close()
    follower.poll()
    assert follower.current is None  # closed with the record's done
    shown = tty.getvalue()
    assert re.search(r"epoch 0: .*[1-6]/6 \[.*loss=0\.25", shown), shown


def test_relay_prints_log_lines_and_never_the_progress_records(tmp_path, capsys):
    from gears_dist.distributed.launcher import _Relay

    log = tmp_path / "train.log"
    (tmp_path / P.PROGRESS_FILE).write_text('{"id": "old", "n": 1, "total": 9, "desc": "stale"}')
    tty = FakeTTY()
    clock = Clock()
    with _Relay(log, interval_s=0.05, file=tty) as relay:
        assert not relay.progress_path.exists()  # an earlier run's record is gone
        with open(log, "a") as fh, P.record_to(relay.progress_path):
            bar = P.progress(4, "epoch 0", "step", clock=clock)
            for _ in range(4):
                clock.t += 1.1
                bar.update(1, {"loss": 0.5})
                time.sleep(0.15)
            bar.close()
            fh.write("epoch 0: train_loss 0.5\n")
            fh.flush()
            time.sleep(0.3)
    printed = capsys.readouterr().out
    assert printed == "epoch 0: train_loss 0.5\n"
    assert re.search(r"epoch 0: .*[1-4]/4 \[.*loss=0\.5", tty.getvalue()), tty.getvalue()
    assert not relay.progress_path.exists()


# -- the callers ---------------------------------------------------------------------------------


def test_ingest_shows_each_pass(tmp_path, capsys):
    from gears_dist.data import ingest, synthetic

    synthetic.write_h5ad(synthetic.preset("tiny"), tmp_path / "tiny.h5ad")
    with contextlib.redirect_stderr(FakeTTY()) as tty:  # within the test: pytest re-sets sys.stderr per phase
        ingest.ingest(tmp_path / "tiny.h5ad", tmp_path / "tiny.zarr", chunk_cells=64, _max_block_rows=500)
    shown = tty.getvalue()
    for name in ("ingest: read obs", "ingest: scan X", "ingest: sort X", "ingest: write X"):
        assert f"{name}:" in shown, (name, shown[-2000:])
    assert "cell/s" in shown
    assert capsys.readouterr().out == ""


def test_ingest_without_a_terminal_prints_nothing(tmp_path, capsys):
    from gears_dist.data import ingest, synthetic

    synthetic.write_h5ad(synthetic.preset("tiny"), tmp_path / "tiny.h5ad")
    ingest.ingest(tmp_path / "tiny.h5ad", tmp_path / "tiny.zarr", chunk_cells=64, _max_block_rows=500)
    assert capsys.readouterr() == ("", "")


def test_evaluate_shows_each_predictor(tiny_doubles_store):
    from gears_dist.evaluate import pipeline

    store, split = tiny_doubles_store
    with contextlib.redirect_stderr(FakeTTY()) as tty:
        ev = pipeline.evaluate_split(store, split, baselines=("train_mean", "additive"))
    shown = tty.getvalue()
    for name in ev.per_condition:
        assert f"evaluate {name} (test):" in shown, (name, shown)
    assert "condition/s" in shown


def test_in_process_training_draws_an_epoch_bar(tiny_train_store, tmp_path, capsys):
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import run_single

    cfg = run_config_from_dict({"name": "bar", "seed": 3, "train": {"epochs": 1, "max_steps_per_epoch": 3},
                                "data": {"loader": {"batch_size": 32, "control_pool_cells": 256}},
                                "model": {"hidden_size": 8}, "tracking": {"enabled": False}})
    with contextlib.redirect_stderr(FakeTTY()) as tty, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_single(cfg, tiny_train_store["path"], tmp_path)
    shown = tty.getvalue()
    # the bar's loss is read from a detached tensor (torch warns about float() of one that requires grad)
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    assert "epoch 0:" in shown and "/3 [" in shown and "step/s" in shown, shown[-2000:]  # drawn 5x a second at most
    printed = capsys.readouterr().out
    assert "epoch 0: train_loss" in printed and "/3 [" not in printed  # the bar is not in stdout
