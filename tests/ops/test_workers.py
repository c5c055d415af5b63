"""`serve --workers N`'s pieces on their own: roles, spool directories, merged metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.ops.workers import (
    WORKER_ENV,
    WorkerRole,
    WorkersError,
    check_workers_settings,
    merge_expositions,
    orphan_spool_dirs,
    spool_dir_of,
    worker_role,
    worker_settings,
)
from bridge.settings import load_settings


def exposition(accepted: float, oldest_age: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("luma_bridge_callbacks", "Callbacks.", ["outcome"], registry=registry)
    counter.labels(outcome="accepted").inc(accepted)
    gauge = Gauge("luma_bridge_spool_oldest_age_seconds", "Age.", registry=registry)
    gauge.set_function(lambda: oldest_age)  # computed in the worker: must stay its own
    return generate_latest(registry).decode()


def samples(text: str, name: str) -> dict[str, float]:
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def test_merged_metrics_label_each_worker_and_add_up() -> None:
    merged = merge_expositions({0: exposition(3, 0.0), 1: exposition(5, 12.5)}).decode()
    accepted = samples(merged, "luma_bridge_callbacks_total")
    assert accepted == {"0": 3.0, "1": 5.0}
    assert sum(accepted.values()) == 8
    assert samples(merged, "luma_bridge_spool_oldest_age_seconds") == {"0": 0.0, "1": 12.5}
    assert merged.count("# TYPE luma_bridge_callbacks_total counter") == 1


def test_a_worker_that_did_not_answer_is_simply_absent() -> None:
    merged = merge_expositions({1: exposition(5, 0.0)}).decode()
    assert samples(merged, "luma_bridge_callbacks_total") == {"1": 5.0}


def test_the_role_travels_in_one_variable() -> None:
    role = WorkerRole(index=1, count=3, admin_port=40123)
    assert worker_role({WORKER_ENV: role.encode()}) == role
    assert worker_role({}) is None


def test_worker_0_keeps_the_spool_dir_and_the_others_get_their_own(tmp_path: Path) -> None:
    assert spool_dir_of(tmp_path, 0) == tmp_path
    assert spool_dir_of(tmp_path, 2) == tmp_path / "worker-2"
    settings = load_settings(spool_dir=tmp_path, workers=3)
    second = worker_settings(settings, WorkerRole(1, 3, 40123))
    assert (second.spool_dir, second.admin_port, second.workers) == (
        tmp_path / "worker-1",
        40123,
        1,
    )


def test_the_spools_of_workers_that_are_gone_go_to_worker_0(tmp_path: Path) -> None:
    for name in ("worker-1", "worker-2", "worker-10", "worker-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "worker-3").write_text("not a directory")
    two = WorkerRole(0, 2, 1)
    assert orphan_spool_dirs(tmp_path, two) == [tmp_path / "worker-2", tmp_path / "worker-10"]
    assert orphan_spool_dirs(tmp_path / "worker-1", WorkerRole(1, 2, 1)) == []
    alone = orphan_spool_dirs(tmp_path, None)  # one process: every worker spool is orphaned
    assert alone == [tmp_path / "worker-1", tmp_path / "worker-2", tmp_path / "worker-10"]


@pytest.mark.parametrize("setting", ["port", "admin_port"])
def test_workers_need_fixed_ports(setting: str) -> None:
    with pytest.raises(WorkersError, match="--workers needs a fixed"):
        check_workers_settings(load_settings(workers=2, **{setting: 0}))
