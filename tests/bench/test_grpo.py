"""`nanoseek bench grpo`: both tools train on exactly the forced completion length, on the same prompt ids."""

import importlib.util
import sys

import pytest

from nanoseek.bench.grpo import bench_grpo
from nanoseek.errors import NanoseekError


def test_nanoseek_side_forces_the_completion_length():
    bench = bench_grpo("tiny", prompts=2, group=2, new_tokens=64, steps=1, warmup=0, with_trl=False, log=lambda _: None)
    t = bench.tools["nanoseek"]
    assert (t.shortest, t.longest) == (64, 64)
    assert t.tokens == [2 * 2 * 64]
    assert len(t.seconds) == 1 and 0 < t.gen_seconds[0] < t.seconds[0]
    assert bench.ratio is None and bench.prompt_tokens > 10


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install 'nanoseek[bench]')"
)
def test_trl_side_trains_on_the_same_prompts_and_lengths():
    bench = bench_grpo("tiny", prompts=2, group=2, new_tokens=16, steps=1, warmup=0, log=lambda _: None)
    for name in ("nanoseek", "trl"):
        t = bench.tools[name]
        assert (t.shortest, t.longest, t.tokens) == (16, 16, [2 * 2 * 16]), name
    assert bench.same_prompt_ids
    assert bench.ratio == bench.tools["trl"].median / bench.tools["nanoseek"].median


def test_bad_arguments_and_missing_trl(monkeypatch):
    with pytest.raises(NanoseekError, match="--group"):
        bench_grpo("tiny", group=1, with_trl=False)
    monkeypatch.setitem(sys.modules, "trl", None)  # as if not installed
    with pytest.raises(NanoseekError, match=r"pip install 'nanoseek\[bench\]'"):
        bench_grpo("tiny")
