"""`nanoseek bench grpo --workers`: every run trains on the forced length; the worker counts parse."""

import pytest

from nanoseek.bench.rollout import bench_rollout, parse_workers
from nanoseek.errors import NanoseekError


def test_worker_counts():
    assert parse_workers("1,2") == [1, 2] and parse_workers("4") == [4]
    for bad in ("", "0,1", "two"):
        with pytest.raises(NanoseekError, match=f"--workers {bad}: expected worker counts of 1 or more"):
            parse_workers(bad)


@pytest.mark.slow  # ~20 s: a Ray cluster and four short runs
def test_every_run_samples_the_forced_tokens():
    bench = bench_rollout("tiny", 2, 2, 8, steps=1, warmup=1, lr=1e-5, workers=[1, 2], threads=1, worker_threads=1)
    runs = bench["runs"]
    assert [(r["workers"], r["backend"], r["async"]) for r in runs] == [
        (1, "local", False),
        (1, "ray", False),
        (2, "ray", False),
        (2, "ray", True),
    ]
    for r in runs:
        assert r["rollout_tokens_per_s"] * r["rollout_seconds"] == pytest.approx(2 * 2 * 8, rel=1e-6)
        assert r["speedup"] == pytest.approx(runs[0]["seconds_per_step"] / r["seconds_per_step"])
    assert all(0 < r["busy"] <= 1 for r in runs[1:]) and runs[0]["busy"] is None
