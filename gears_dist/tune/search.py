"""Hyperparameter search: Ray Tune over full distributed training runs, tracked in MLflow.

Layout (Ray 2.60's recommended pattern since ``Tuner(trainer)`` was deprecated): every Tune trial is a
small function trainable (``run_trial``) that builds the trial's training config (base + sampled values),
launches a full distributed run with the launcher's ``train_with_ray`` (a ``TorchTrainer`` with the trial's
resources) and forwards each epoch's metrics to Tune from the Train controller (``TrialReporter``, a
``TuneReportCallback``), so that ASHA can stop bad trials after any epoch. Optuna TPE (seeded) or seeded
random search proposes the values; ``ConcurrencyLimiter`` bounds the trials in flight.

Output directory ``OUT``::

    search.json          the search's identity (MLflow parent run, tracking URI, store, config) for --resume
    ray/<name>/          Tune's experiment state (Tuner.restore reads it)
    trials/<trial_id>/   each trial's training run directory (config.yaml, Ray Train checkpoints, model/)
    best/config.yaml     the best trial's training config (train it with ``gears-dist train --config``)
    best/model/          its trained model (or best/checkpoint/, the last checkpoint of an early-stopped trial)
    best/best.json       which trial, its value, parameters and MLflow run
    summary.json         every trial ranked (also printed as a table)
    mlflow.db            the default MLflow tracking store (sqlite), unless tracking.uri / $MLFLOW_TRACKING_URI

MLflow: one parent run per search; one child run per trial (params, per-epoch metrics, final metrics,
status), see ``gears_dist.tune.runs``. A failed trial is recorded as failed and the search goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import warnings
from typing import Any

import yaml

from gears_dist.config import to_dict
from gears_dist.data.store import atomic_write_text
from gears_dist.train import tracking
from gears_dist.tune import runs
from gears_dist.tune.config import (
    ParamSpec,
    TuneConfig,
    apply_params,
    decode_params,
    encode_value,
)

STATE_FILE = "search.json"
SUMMARY_FILE = "summary.json"
TIME_ATTR = "epochs_done"          # ASHA's clock: epochs completed (robust to restarted trials)
WORST = 1e30                       # what a diverged (NaN / inf) objective is reported as
INTERRUPTED = "interrupted"        # a trial the search was stopped in the middle of (resume continues it)


# ------------------------------------------------------------------------------------------------
# the trial (runs in a Tune trial actor; its TorchTrainer's controller runs TrialReporter)


def trial_run_config(base: dict, params: dict[str, Any], trial_id: str, resources: dict) -> dict:
    """Plain data of a trial's training config: base + sampled values + the search's resources; its own
    tracking is off (the search's child run records it)."""
    data = apply_params(base, params)
    scaling = dict(data.get("scaling", {}))
    gpus = float(resources["gpus_per_worker"])
    scaling.update(num_workers=int(resources["num_workers"]), cpus_per_worker=float(resources["cpus_per_worker"]),
                   use_gpu=gpus > 0, gpus_per_worker=gpus if gpus > 0 else None)
    data["scaling"] = scaling
    data["name"] = f"trial_{trial_id}"
    data["tracking"] = {**data.get("tracking", {}), "enabled": False}
    return data


def objective(value: Any, mode: str) -> float:
    """The value Tune ranks: a diverged trial (NaN / inf / missing) counts as the worst, so ASHA stops it
    (a NaN would compare as neither better nor worse and never be stopped)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return WORST if mode == "min" else -WORST


def _make_reporter_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class TrialReporter(TuneReportCallback):
        """On the Ray Train controller: each epoch's report (rank 0's metrics) goes to the trial's MLflow child
        run and to Tune (with ``epochs_done`` and a finite objective). The run's final report (``final_*``,
        no epoch) is not an epoch: the trial logs it itself."""

        def __init__(self, tracking_uri: str, run_id: str | None, metric: str, mode: str, trial_actor=None):
            super().__init__()
            self.tracking_uri, self.run_id, self.metric, self.mode = tracking_uri, run_id, metric, mode
            self.trial_actor = trial_actor
            self._tracker = None
            self._registered = False

        def __getstate__(self):
            state = dict(self.__dict__)
            state["_tracker"] = None
            return state

        def after_report(self, run_context, metrics, checkpoint):
            if not self._registered and self.trial_actor is not None:
                import ray

                # lets the trial abort this run cleanly when Tune stops it (see GearsTrial.cleanup)
                self.trial_actor.register_train_controller.remote(ray.get_runtime_context().current_actor)
                self._registered = True
            first = dict(metrics[0]) if metrics else {}
            if "epoch" not in first:
                return
            epoch = int(first["epoch"])
            if self.run_id is not None:
                if self._tracker is None:
                    self._tracker = tracking.Tracker(True, self.tracking_uri, ".", "unused", run_id=self.run_id)
                self._tracker.log_metrics({k: v for k, v in first.items() if k != "epoch"}, step=epoch)
            report = {**first, TIME_ATTR: epoch + 1, self.metric: objective(first.get(self.metric), self.mode)}
            super().after_report(run_context, [report], checkpoint)

    return TrialReporter


def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: one full distributed training run with the sampled values in `config`."""
    import ray
    from ray import tune

    from gears_dist.distributed.launcher import train_with_ray
    from gears_dist.train.config import run_config_from_dict

    _TRIAL_STATE.update(controller=None, stopping=False)
    tctx = tune.get_context()
    trial_id, trial_name = tctx.get_trial_id(), tctx.get_trial_name()
    space = {p: ParamSpec(**s) for p, s in ctx["space"].items()}
    params = decode_params(space, config)
    client = runs.safely(tracking.client, ctx["tracking_uri"], what="MLflow client")
    run_id = None
    if client is not None:
        got = runs.safely(runs.get_or_create_child, client, ctx["experiment_id"], ctx["parent_run_id"], trial_id,
                          trial_name, params, what="MLflow child run")
        run_id = got[0] if got else None
    run_dir = pathlib.Path(ctx["out"]) / "trials" / trial_id
    try:
        data = trial_run_config(ctx["base"], params, trial_id, ctx["resources"])
        cfg = run_config_from_dict(data)  # a bad combination fails here, recorded as a failed trial
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        atomic_write_text(run_dir / "params.json", json.dumps(params, indent=1, sort_keys=True))
        if client is not None and run_id is not None:
            tracker = tracking.Tracker(True, ctx["tracking_uri"], run_dir, "unused", run_id=run_id)
            tracker.log_params(tracking.flatten_params(to_dict(cfg)))
        resume = (run_dir / "ray" / cfg.name).exists()  # a restarted trial continues its Ray Train run
        reporter = _make_reporter_class()(ctx["tracking_uri"], run_id, ctx["metric"], ctx["mode"],
                                          ray.get_runtime_context().current_actor)
        summary = train_with_ray(cfg, ctx["store"], run_dir, resume=resume, callbacks=[reporter])
        _TRIAL_STATE["controller"] = None
    except Exception as exc:
        if _TRIAL_STATE["stopping"]:
            return  # Tune stopped this trial and aborted its run; the driver records it
        if client is not None and run_id is not None:
            runs.safely(runs.finish_child, client, run_id, runs.FAILED, error=f"{type(exc).__name__}: {exc}",
                        what="MLflow status")
        raise
    if client is not None and run_id is not None:
        final = {f"final_{k}": float(v) for k, v in (summary.get("final") or {}).items()
                 if isinstance(v, (int, float))}
        history = summary.get("history") or []
        final = {k: v for k, v in final.items() if math.isfinite(v)}
        runs.safely(tracking.log_batch, client, run_id, metrics=final, step=len(history), what="MLflow final metrics")
        for name in ("config.yaml", "summary.json"):
            runs.safely(runs.log_artifact, client, run_id, run_dir / name, what="MLflow artifact")
        runs.safely(runs.finish_child, client, run_id, runs.COMPLETED, extra_tags={"gears_dist.epochs": len(history)},
                    what="MLflow status")


# Per trial-actor process: the Train controller of the running trial, and whether Tune is stopping it.
_TRIAL_STATE: dict[str, Any] = {"controller": None, "stopping": False}


def _register_train_controller(controller) -> None:
    _TRIAL_STATE["controller"] = controller


def _abort_train_run(timeout_s: float = 120.0) -> None:
    """Abort the trial's Train run through its controller, which stops the workers and frees their placement
    group. Without this a stopped trial's controller dies with the trial actor and its workers' placement
    group outlives it (Ray Train's cleaner needs the State API, absent when Ray runs without a dashboard),
    holding the CPUs / GPUs the next trials need."""
    import threading

    import ray

    _TRIAL_STATE["stopping"] = True
    controller, _TRIAL_STATE["controller"] = _TRIAL_STATE["controller"], None
    if controller is None:
        return
    # The controller may be blocked in TuneReportCallback's put (a queue of one item nobody reads once Tune
    # stops the trial), which stalls its event loop and so the abort: discard reports while aborting.
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None) if session is not None else None
    done = threading.Event()

    def drain():
        while queue is not None and not done.is_set():
            try:
                queue.get(block=True, timeout=0.5)
            except Exception:  # noqa: BLE001, S110 - Empty, or the queue actor is gone
                pass

    drainer = threading.Thread(target=drain, name="gears-tune-drain", daemon=True)
    drainer.start()
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001, S110 - abort ends with the controller exiting (RayActorError), or it is gone
        pass
    finally:
        done.set()
        drainer.join(timeout=2.0)


def trial_trainable(ctx: dict, driver_cpus: float):
    """The Tune trainable: ``run_trial`` as a function trainable whose cleanup (called when Tune stops the
    trial: ASHA, end of the search, Ctrl-C) aborts the running Train run first."""
    from ray import tune
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(tune.with_parameters(run_trial, ctx=ctx), name="gears_trial")

    class GearsTrial(base):
        # module functions, not _TRIAL_STATE itself: this class is pickled by value, and with it a copy of
        # any module-level dict its methods name
        def register_train_controller(self, controller) -> None:
            _register_train_controller(controller)

        def cleanup(self):
            _abort_train_run()
            super().cleanup()

    return tune.with_resources(GearsTrial, {"CPU": driver_cpus})


# ------------------------------------------------------------------------------------------------
# the driver


def _status_callback_class():
    from ray import tune

    class TrialStatusCallback(tune.Callback):
        """On the Tune driver: closes the child runs of trials that cannot close their own — stopped by the
        scheduler (the trial actor is killed mid-run) or failed outside the trial function (actor died)."""

        def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str):
            self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id

        def _child(self, trial):
            client = tracking.client(self.tracking_uri)
            params = {k: v for k, v in (trial.config or {}).items()}
            run_id, _ = runs.get_or_create_child(client, self.experiment_id, self.parent_run_id, trial.trial_id,
                                                 str(trial), params)
            return client, run_id

        def on_trial_complete(self, iteration, trials, trial, **info):
            def close():
                found = runs.find_child(tracking.client(self.tracking_uri), self.experiment_id, self.parent_run_id,
                                        trial.trial_id)
                if found is not None and found.info.status != "RUNNING":
                    return  # the trial closed its own run (completed)
                client, run_id = self._child(trial)
                epochs = (trial.last_result or {}).get(TIME_ATTR)
                runs.finish_child(client, run_id, runs.EARLY_STOPPED, extra_tags={"gears_dist.epochs": epochs})

            runs.safely(close, what="MLflow status (stopped trial)")

        def on_trial_error(self, iteration, trials, trial, **info):
            def close():
                found = runs.find_child(tracking.client(self.tracking_uri), self.experiment_id, self.parent_run_id,
                                        trial.trial_id)
                if found is not None and found.info.status == "FAILED":
                    return
                client, run_id = self._child(trial)
                error = None
                try:
                    err = trial.get_error()
                    error = f"{type(err).__name__}: {err}" if err is not None else None
                except Exception:  # noqa: BLE001, S110 - the message is a courtesy
                    pass
                runs.finish_child(client, run_id, runs.FAILED, error=error or "trial failed (see Ray logs)")

            runs.safely(close, what="MLflow status (failed trial)")

    return TrialStatusCallback


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _searcher(tcfg: TuneConfig, points: list[dict]):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if tcfg.searcher == "random":
        return BasicVariantGenerator(points_to_evaluate=points or None, random_state=tcfg.seed,
                                     max_concurrent=tcfg.max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points or None, seed=tcfg.seed),
                              max_concurrent=tcfg.max_concurrent)


def param_space(tcfg: TuneConfig) -> dict:
    from ray import tune

    out = {}
    for path, spec in tcfg.space.items():
        if spec.type == "loguniform":
            out[path] = tune.loguniform(float(spec.low), float(spec.high))
        elif spec.type == "uniform":
            out[path] = tune.uniform(float(spec.low), float(spec.high))
        elif spec.type == "randint":
            out[path] = tune.randint(int(spec.low), int(spec.high) + 1)  # Tune's upper end is exclusive
        else:
            out[path] = tune.choice([encode_value(spec, v) for v in spec.values])
    return out


def _scheduler(tcfg: TuneConfig, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = tcfg.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_epochs ends by itself, after its final evaluation
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_epochs, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _per_trial_cpus(tcfg: TuneConfig) -> float:
    r = tcfg.resources
    return r.num_workers * r.cpus_per_worker + r.driver_cpus


def _start_ray(tcfg: TuneConfig, base: dict, address: str | None) -> int:
    """Connect to / start Ray (the launcher's rules) and return how many trials can run at once."""
    import ray

    from gears_dist.distributed.launcher import ensure_ray
    from gears_dist.train.config import run_config_from_dict

    per_trial = _per_trial_cpus(tcfg)
    capacity = run_config_from_dict({**base, "scaling": {
        **base.get("scaling", {}), "num_workers": 1, "cpus_per_worker": per_trial * tcfg.max_concurrent,
        "use_gpu": tcfg.resources.gpus_per_worker > 0}})
    ensure_ray(address, capacity)
    local = not (address or os.environ.get("RAY_ADDRESS"))
    cpus = float(ray.cluster_resources().get("CPU", 0))
    fits = int(cpus // per_trial) if per_trial > 0 else tcfg.max_concurrent
    if fits < 1:
        raise ValueError(f"resources: one trial needs {per_trial:g} CPUs (num_workers x cpus_per_worker + "
                         f"driver_cpus) but Ray has {cpus:g}; lower resources.num_workers / cpus_per_worker")
    if fits < tcfg.max_concurrent:
        if local:
            warnings.warn(f"max_concurrent {tcfg.max_concurrent}: only {fits} trial(s) of {per_trial:g} CPUs fit in "
                          f"the local Ray's {cpus:g} CPUs; running {fits} at a time", stacklevel=2)
            return fits
        warnings.warn(f"max_concurrent {tcfg.max_concurrent}: the cluster has {cpus:g} CPUs now, room for {fits} "
                      f"trial(s) of {per_trial:g}; the others wait for resources (or for the autoscaler)",
                      stacklevel=2)
    return tcfg.max_concurrent


def prepare_store(tcfg: TuneConfig, base: dict, store: str) -> None:
    """Build, before any trial starts, the splits / graphs / partitions the trials read, so that concurrent
    trials never write the store (its manifest is updated read-modify-write)."""
    from gears_dist.train.config import run_config_from_dict
    from gears_dist.train.loop import prepare_run

    combos = tcfg.store_combinations()
    if combos is None:
        warnings.warn(f"space: {tcfg.store_params()} take too many values to prepare the store for each; trials "
                      f"build the graphs / splits they need themselves", stacklevel=2)
        combos = [{}]
    res = dataclasses.asdict(tcfg.resources)
    for combo in combos:
        try:
            cfg = run_config_from_dict(trial_run_config(base, combo, "prepare", res))
            prepare_run(cfg, store, cfg.scaling.num_workers)
        except (ValueError, TypeError) as exc:
            warnings.warn(f"store preparation for {combo or 'the base config'} failed ({exc}); trials with these "
                          f"values will fail and be recorded as failed", stacklevel=2)


def _state(out: pathlib.Path) -> dict | None:
    path = out / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _start_tracking(tcfg: TuneConfig, base: dict, out: pathlib.Path, store: str, resume: bool) -> dict:
    """Create (or, on resume, reopen) the MLflow parent run; returns the search state saved in search.json."""
    state = _state(out)
    if resume:
        if state is None:
            raise ValueError(f"--resume: {str(out)!r} holds no search ({STATE_FILE} missing); drop --resume to start")
        client = tracking.client(state["tracking_uri"])
        client.update_run(state["parent_run_id"], status="RUNNING")
        return state
    if state is not None:
        raise ValueError(f"{str(out)!r} already holds search {state.get('name')!r}; pass --resume to continue it, "
                         f"or choose another --out")
    uri = tracking.resolve_tracking_uri(tcfg.tracking.uri, out)
    experiment = tcfg.tracking.experiment or base.get("tracking", {}).get("experiment") or "gears_dist"
    client = tracking.client(uri)
    exp_id = tracking.experiment_id(client, experiment, uri)
    cfg_dict = to_dict(tcfg)
    cfg_dict.pop("source_dir", None)
    params = tracking.flatten_params({k: v for k, v in cfg_dict.items() if k not in ("space", "base", "overrides")})
    params.update({f"space.{p}": json.dumps(to_dict(s), sort_keys=True) for p, s in tcfg.space.items()})
    params["base"] = str(tcfg.base) if isinstance(tcfg.base, str) else "inline"
    parent = runs.create_parent(client, exp_id, tcfg.name, params, {"store": store})
    runs.safely(client.log_text, parent, json.dumps(cfg_dict, indent=1, default=str), "tune_config.json")
    runs.safely(client.log_text, parent, yaml.safe_dump(base, sort_keys=False), "base_config.yaml")
    state = {"name": tcfg.name, "tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent,
             "store": store, "tune_config": cfg_dict, "source_dir": tcfg.source_dir}
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=1, default=str))
    return state


def run_search(tcfg: TuneConfig, store: str | os.PathLike, out: str | os.PathLike, *, address: str | None = None,
               resume: bool = False) -> dict:
    """Run (or resume) a search; returns the summary (also written to ``out/summary.json``)."""
    from ray import tune

    from gears_dist.data.store import open_store

    out = pathlib.Path(out).resolve()
    store = str(pathlib.Path(store).resolve())
    if resume:
        state = _state(out)
        if state is None:
            raise ValueError(f"--resume: {str(out)!r} holds no search ({STATE_FILE} missing); drop --resume to start")
        saved = {k: v for k, v in state["tune_config"].items()}
        now = {k: v for k, v in to_dict(tcfg).items() if k != "source_dir"}
        if json.dumps(saved, sort_keys=True, default=str) != json.dumps(now, sort_keys=True, default=str):
            warnings.warn("--resume: the search config differs from the one the search started with; the saved one "
                          f"({out / STATE_FILE}) is used", stacklevel=2)
            tcfg = _config_from_state(state)
        if state["store"] != store:
            raise ValueError(f"--resume: the search ran on store {state['store']!r}, not {store!r}")
    open_store(store)  # a clear error now rather than in every trial
    base = tcfg.base_run_dict()
    max_epochs = int(base["train"]["epochs"])
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / "ray" / tcfg.name
    if resume and not tune.Tuner.can_restore(str(exp_path)):
        raise ValueError(f"--resume: no Tune experiment to restore at {str(exp_path)!r}")
    prepare_store(tcfg, base, store)
    state = _start_tracking(tcfg, base, out, store, resume)
    concurrency = _start_ray(tcfg, base, address)

    ctx = {"base": base, "space": {p: dataclasses.asdict(s) for p, s in tcfg.space.items()}, "store": store,
           "out": str(out), "tracking_uri": state["tracking_uri"], "experiment_id": state["experiment_id"],
           "parent_run_id": state["parent_run_id"], "metric": tcfg.metric, "mode": tcfg.mode,
           "resources": dataclasses.asdict(tcfg.resources)}
    trainable = trial_trainable(ctx, tcfg.resources.driver_cpus)
    client = tracking.client(state["tracking_uri"])
    try:
        if resume:
            print(f"gears-dist tune: resuming {exp_path}", flush=True)
            tuner = tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            points = [{p: encode_value(tcfg.space[p], v) for p, v in point.items()}
                      for point in tcfg.points_to_evaluate]
            tuner = tune.Tuner(
                trainable, param_space=param_space(tcfg),
                tune_config=tune.TuneConfig(metric=tcfg.metric, mode=tcfg.mode, search_alg=_searcher(tcfg, points),
                                            scheduler=_scheduler(tcfg, max_epochs), num_samples=tcfg.num_trials,
                                            max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname,
                                            reuse_actors=False),
                run_config=tune.RunConfig(
                    name=tcfg.name, storage_path=str(out / "ray"),
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    callbacks=[_status_callback_class()(state["tracking_uri"], state["experiment_id"],
                                                        state["parent_run_id"])],
                    verbose=1))
        grid = tuner.fit()
    except BaseException as exc:
        runs.safely(client.set_tag, state["parent_run_id"], "gears_dist.search_status",
                    "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", what="MLflow tag")
        runs.safely(client.set_terminated, state["parent_run_id"],
                    status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED", what="MLflow status")
        raise
    summary = summarize(grid, tcfg, max_epochs, out, state)
    if any(r["status"] == INTERRUPTED for r in summary["trials"]) or len(summary["trials"]) < tcfg.num_trials:
        # Ctrl-C: Tune saved its state and returned; nothing is final yet
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True, default=str))
        runs.safely(client.set_tag, state["parent_run_id"], "gears_dist.search_status", "interrupted", what="MLflow")
        runs.safely(client.set_terminated, state["parent_run_id"], status="KILLED", what="MLflow status")
        print(format_table(summary) + f"\ngears-dist tune: interrupted; continue with --resume --out {out}", flush=True)
        summary["interrupted"] = True
        return summary
    finish_search(summary, tcfg, out, state, client)
    return summary


def _config_from_state(state: dict) -> TuneConfig:
    from gears_dist.tune.config import tune_config_from_dict

    return tune_config_from_dict(state["tune_config"], source_dir=state.get("source_dir"))


# ------------------------------------------------------------------------------------------------
# results


def _trial_id(result) -> str:
    name = pathlib.Path(result.path).name
    return name.removeprefix("trial_")


def summarize(grid, tcfg: TuneConfig, max_epochs: int, out: pathlib.Path, state: dict) -> dict:
    """Every trial with its status, epochs, best and last value of the metric, ranked best first."""
    space = tcfg.space
    rows = []
    analysis = getattr(grid, "_experiment_analysis", None)  # Tune's own trial states (to tell interruptions)
    tune_status = {t.trial_id: t.status for t in getattr(analysis, "trials", None) or []}
    for result in grid:
        trial_id = _trial_id(result)
        df = result.metrics_dataframe
        pairs: list[tuple[int, float]] = []  # (epoch, finite value) per reported epoch; epochs count from 0
        if df is not None and len(df) and tcfg.metric in df:
            clock = df[TIME_ATTR].tolist() if TIME_ATTR in df else list(range(1, len(df) + 1))
            pairs = [(int(e) - 1, float(v)) for e, v in zip(clock, df[tcfg.metric].tolist())
                     if math.isfinite(float(v)) and abs(float(v)) < WORST]
        epochs = int(df[TIME_ATTR].max()) if df is not None and len(df) and TIME_ATTR in df else 0
        pick = min if tcfg.mode == "min" else max
        best_epoch, best = pick(pairs, key=lambda p: p[1]) if pairs else (None, None)
        if result.error is not None:
            status = runs.FAILED
        elif tune_status.get(trial_id, "TERMINATED") not in ("TERMINATED", "ERROR"):
            status = INTERRUPTED
        elif epochs >= max_epochs and (pathlib.Path(out) / "trials" / trial_id / "summary.json").is_file():
            status = runs.COMPLETED
        else:
            status = runs.EARLY_STOPPED
        ckpt = (result.metrics or {}).get("checkpoint_path")
        error = _error_line(result.error) if result.error is not None else None
        rows.append({"trial_id": trial_id, "status": status, "epochs": epochs, "best": best, "best_epoch": best_epoch,
                     "last": pairs[-1][1] if pairs else None,
                     "params": decode_params(space, {k: v for k, v in (result.config or {}).items() if k in space}),
                     "checkpoint": ckpt, "error": error})
    sign = 1.0 if tcfg.mode == "min" else -1.0
    rows.sort(key=lambda r: (r["status"] in (runs.FAILED, INTERRUPTED), r["best"] is None,
                             sign * r["best"] if r["best"] is not None else 0.0, r["trial_id"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return {"name": tcfg.name, "metric": tcfg.metric, "mode": tcfg.mode, "max_epochs": max_epochs,
            "num_trials": len(rows), "trials": rows, "parent_run_id": state["parent_run_id"],
            "tracking_uri": state["tracking_uri"], "experiment_id": state["experiment_id"]}


def _error_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def write_best(summary: dict, tcfg: TuneConfig, out: pathlib.Path, base: dict) -> dict | None:
    """The best trial's training config (runnable with `gears-dist train`), its model or checkpoint, best.json."""
    best = next((r for r in summary["trials"] if r["best"] is not None and r["status"] != runs.FAILED), None)
    if best is None:
        return None
    trial_dir = out / "trials" / best["trial_id"]
    dest = out / "best"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    cfg = yaml.safe_load((trial_dir / "config.yaml").read_text())
    cfg["name"] = f"{tcfg.name}-best"
    cfg["tracking"] = dict(base.get("tracking", {}))  # trials were tracked by the search; a rerun by itself
    atomic_write_text(dest / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    info = {"trial_id": best["trial_id"], "metric": summary["metric"], "mode": summary["mode"], "value": best["best"],
            "epoch": best["best_epoch"], "status": best["status"], "params": best["params"],
            "config": str(dest / "config.yaml"), "trial_dir": str(trial_dir)}
    if (trial_dir / "model").is_dir():
        shutil.copytree(trial_dir / "model", dest / "model")
        info["model"] = str(dest / "model")
    elif best.get("checkpoint") and pathlib.Path(best["checkpoint"]).is_dir():
        shutil.copytree(best["checkpoint"], dest / "checkpoint")
        info["checkpoint"] = str(dest / "checkpoint")
    atomic_write_text(dest / "best.json", json.dumps(info, indent=1, sort_keys=True, default=str))
    return info


def finish_search(summary: dict, tcfg: TuneConfig, out: pathlib.Path, state: dict, client) -> None:
    parent = state["parent_run_id"]
    base = tcfg.base_run_dict()
    info = write_best(summary, tcfg, out, base)
    summary["best"] = info
    table = format_table(summary)
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True, default=str))
    if info is not None:
        found = runs.safely(runs.find_child, client, state["experiment_id"], parent, info["trial_id"], what="MLflow")
        if found is not None:
            info["mlflow_run_id"] = found.info.run_id
            runs.safely(client.set_tag, found.info.run_id, runs.BEST_TAG, "true", what="MLflow tag")
            runs.safely(client.set_tag, parent, "gears_dist.best_run_id", found.info.run_id, what="MLflow tag")
        runs.safely(client.set_tag, parent, "gears_dist.best_trial_id", info["trial_id"], what="MLflow tag")
        runs.safely(client.log_metric, parent, f"best_{summary['metric']}", float(info["value"]), what="MLflow metric")
        runs.safely(runs.log_artifact, client, parent, out / "best" / "config.yaml", "best", what="MLflow artifact")
        atomic_write_text(out / "best" / "best.json", json.dumps(info, indent=1, sort_keys=True, default=str))
        atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=1, sort_keys=True, default=str))
    counts = {s: sum(r["status"] == s for r in summary["trials"]) for s in (runs.COMPLETED, runs.EARLY_STOPPED,
                                                                              runs.FAILED)}
    for status, n in counts.items():
        runs.safely(client.log_metric, parent, f"num_{status}", float(n), what="MLflow metric")
    runs.safely(client.log_text, parent, table + "\n", "summary.txt", what="MLflow artifact")
    runs.safely(client.set_tag, parent, "gears_dist.search_status", "finished", what="MLflow tag")
    runs.safely(client.set_terminated, parent, status="FINISHED", what="MLflow status")
    print(table, flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(summary: dict) -> str:
    """The ranked summary printed at the end of a search."""
    trials = summary["trials"]
    paths = sorted({p for r in trials for p in r["params"]})
    head = ["rank", "trial", "status", "epochs", f"best {summary['metric']}", "(epoch)"] + paths
    body = [[str(r["rank"]), r["trial_id"], r["status"], str(r["epochs"]), _fmt(r["best"]) if r["best"] is not None
             else "-", _fmt(r["best_epoch"]) if r["best_epoch"] is not None else "-"]
            + [_fmt(r["params"].get(p, "-")) for p in paths] for r in trials]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [f"gears-dist tune: {summary['name']} ({summary['mode']} {summary['metric']}, {len(trials)} trials)",
             "  ".join(h.ljust(w) for h, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    best = summary.get("best")
    if best:
        lines.append(f"best: trial {best['trial_id']} ({summary['metric']} {_fmt(best['value'])}); config "
                     f"{best['config']}" + (f"; MLflow run {best['mlflow_run_id']}" if best.get("mlflow_run_id") else ""))
    else:
        lines.append("best: none (no trial reported a finite metric)")
    failed = [r for r in trials if r["status"] == runs.FAILED]
    for r in failed:
        lines.append(f"failed: trial {r['trial_id']}: {r['error']}")
    return "\n".join(lines)


__all__ = ["format_table", "objective", "run_search", "run_trial", "summarize", "trial_run_config"]
