"""A new SQLite tracking store starts from a cached, fully migrated empty database: it must be exactly what
MLflow's own migration makes (tables, schema revision, default experiment with this store's artifact root),
leave an existing store alone, and fall back to MLflow's migration when the cache cannot be written."""

from __future__ import annotations

import sqlite3

import pytest

from gears_dist.train import tracking


def _schema(path) -> tuple[list, list]:
    """Every table and index as (type, name, sorted lines of its SQL): MLflow's migrations rebuild some tables
    and list their constraints in an order that differs from one run to the next."""
    con = sqlite3.connect(path)
    try:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
                           "ORDER BY type, name").fetchall()
        revision = con.execute("SELECT version_num FROM alembic_version").fetchall()
    finally:
        con.close()
    return [(t, n, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())) for t, n, sql in rows], \
        revision


def _default_experiment(uri: str) -> tuple[str, str]:
    exp = tracking.client(uri).get_experiment("0")
    return exp.name, exp.artifact_location


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gears_dist"


def test_seeded_store_is_what_mlflow_migration_makes(tmp_path, cache, monkeypatch):
    seeded = tmp_path / "a" / "mlflow.db"
    uri = f"sqlite:///{seeded}"
    name, location = _default_experiment(uri)
    assert len(list(cache.glob("mlflow-*-schema.db"))) == 1 and not list(cache.glob("*.tmp"))
    # the same, with MLflow migrating a store of its own (the template bypassed)
    monkeypatch.setattr(tracking, "_schema_template", lambda: None)
    migrated = tmp_path / "b" / "mlflow.db"
    migrated.parent.mkdir()
    name_b, location_b = _default_experiment(f"sqlite:///{migrated}")
    assert _schema(seeded) == _schema(migrated)
    assert name == name_b == "Default"
    # each store's default experiment keeps its artifacts where MLflow would put them for that store
    assert location.replace(str(tmp_path / "a"), "") == location_b.replace(str(tmp_path / "b"), "")
    # a run logs and reads back through the seeded store
    client = tracking.client(uri)
    run = client.create_run(tracking.experiment_id(client, "t", uri))
    tracking.log_batch(client, run.info.run_id, params={"a": 1}, metrics={"m": 0.5})
    assert client.get_run(run.info.run_id).data.metrics == {"m": 0.5}


def test_existing_store_is_left_alone_and_unwritable_cache_falls_back(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert tracking._schema_template() is None
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)  # MLflow's own migration
    exp = tracking.experiment_id(client, "kept", uri)
    before = (tmp_path / "mlflow.db").read_bytes()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    assert tracking.client(uri).get_experiment(exp).name == "kept"
    assert (tmp_path / "mlflow.db").read_bytes() == before
    assert not list(tmp_path.glob(".mlflow.db.*"))
    # only a database file is seeded: not an in-memory store, not a URI with options
    monkeypatch.chdir(tmp_path)
    for u in ("sqlite:///:memory:", "sqlite://", f"sqlite:///{tmp_path / 'opts.db'}?timeout=5"):
        tracking._seed_sqlite(u)
    assert not (tmp_path / ":memory:").exists() and not (tmp_path / "opts.db").exists()
