"""A GRPO learner on 2 gloo ranks under torchrun (FSDP2): the single-process run's completions
and weights, with rank 0 sampling (its own engine, or Ray workers) for both ranks."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.io.hf import save_pretrained
from nanoseek.tasks import get
from nanoseek.train.grpo import GRPORunConfig
from nanoseek.train.grpo import run as grpo_run

from train_support import env_one_thread, torchrun_cmd

RUN = {
    "task": "arith",
    "task_options": {"min_ops": 1, "max_ops": 2},
    "prompts": 40,
    "prompts_per_step": 4,
    "group_size": 4,
    "max_new_tokens": 10,
    "lr": 1e-2,
    "rewards": {"overlong": 1.0},  # ends at uneven lengths: every group has something to learn
    "overlong_buffer": 8,
    "micro_batch_size": 4,  # 4 micro-batches a step: 2 on each rank
    "steps": 3,
    "checkpoint_every": 3,
    "tensorboard": False,
    "progress": False,
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tokenizer = train_tokenizer((text for _, text in corpus(get("arith"), 300, seed=0)), vocab_size=320)
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2)
    hf = save_pretrained(Transformer(config).eval(), tmp_path_factory.mktemp("grpo-ddp") / "base")
    tokenizer.save_pretrained(hf)
    return hf


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    grpo_run(GRPORunConfig(init_from=str(base), **RUN), out)
    return out


def records(out):
    drop = ("gen_seconds", "train_seconds", "elapsed_s")
    return [
        {k: v for k, v in json.loads(line).items() if k not in drop and not k.startswith("logprob_diff")}
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def torchrun(base, out, **extra):
    config = out.parent / f"{out.name}.yaml"
    config.write_text(json.dumps({"init_from": str(base), **RUN, **extra}))
    cmd = torchrun_cmd(2, "grpo", "--config", str(config), "--out", str(out))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_one_thread())


def test_two_learner_ranks_match_the_single_process_run(base, single, tmp_path):
    out = tmp_path / "fsdp"
    r = torchrun(base, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "learner on 2 ranks (FSDP2)" in r.stderr
    want, got = records(single), records(out)
    assert [m["step"] for m in got] == [1, 2, 3]
    # the same samples (their lengths and rewards), the loss to float precision
    for a, b in zip(want, got):
        assert (a["completion_len_mean"], a["reward_mean"]) == (b["completion_len_mean"], b["reward_mean"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
    a, b = load_file(single / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (out / "checkpoints" / "step-00000003").is_dir()


@pytest.mark.slow  # ~35 s: two ranks and a Ray cluster
def test_two_learner_ranks_with_ray_rollout_workers(base, single, tmp_path):
    out = tmp_path / "fsdp-ray"
    r = torchrun(base, out, rollout={"backend": "ray", "workers": 2}, steps=2, checkpoint_every=2)
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = records(single)[:2], records(out)
    assert [(m["completion_len_mean"], m["reward_mean"]) for m in got] == [
        (m["completion_len_mean"], m["reward_mean"]) for m in want
    ]
    assert all(m["rollout/worker1_tokens_per_s"] > 0 for m in got)
