"""GRPO's rollouts on Ray workers: the same completions, rewards and weights as one process;
a dead worker replaced without losing or repeating a step; one step off-policy."""

import json
import os
import signal
import subprocess
import time

import pytest
import ray  # the dev extra has it: `make test` installs it
import torch
from safetensors.torch import load_file

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import save_pretrained
from nanoseek.tasks import get
from nanoseek.train.config import load_config, save_config
from nanoseek.train.grpo import GRPOConfig, GRPORunConfig, GRPOTrainer
from nanoseek.train.grpo import run as grpo_run
from nanoseek.train.rollout import RolloutConfig, split

from train_support import env_one_thread, nanoseek_cmd, run_cli


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((text for _, text in corpus(get("arith"), 300, seed=0)), vocab_size=320)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module: the trainers join it (and leave it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def reward(prompts, completions, **cols):  # varies within a group, so every step updates the weights
    return [len(c) % 5 / 4 for c in completions]


def make_trainer(tokenizer, **rollout):
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2)
    model = Transformer(config).eval()
    prompts = [f"Compute {a}+{b}:" for a in range(5) for b in range(5)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=4, max_new_tokens=8, lr=1e-2, rollout=rollout)
    return GRPOTrainer(model, tokenizer, reward, prompts, cfg)


def run(trainer, steps=3, before_step=None):
    """`steps` steps: each one's completions (token ids, prompt order) and metrics, then the weights."""
    seen = []
    submit = trainer.rollouts.submit

    def recording_submit(prompt_ids, params, version):
        if before_step:
            before_step(trainer)
        wait = submit(prompt_ids, params, version)

        def result():
            r = wait()
            seen.append([[o.token_ids for o in group] for group in r.completions])
            return r

        return result

    trainer.rollouts.submit = recording_submit
    try:
        history = trainer.train(steps, progress=False)
    finally:
        trainer.close()
    return seen, history, {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def single(tokenizer):
    return run(make_trainer(tokenizer))


def test_two_ray_workers_match_the_single_process_run(tokenizer, cluster, single):
    completions, history, weights = run(make_trainer(tokenizer, backend="ray", workers=2))
    want_completions, want_history, want_weights = single
    assert completions == want_completions
    assert [m["reward_mean"] for m in history] == [m["reward_mean"] for m in want_history]
    assert all(torch.equal(weights[k], want_weights[k]) for k in want_weights)
    assert any(not torch.equal(weights[k], make_trainer(tokenizer).model.state_dict()[k]) for k in weights)
    # per worker: tokens/s and the busy share of the step, with both workers given half the prompts
    for m in history:
        assert m["rollout/worker0_tokens_per_s"] > 0 and m["rollout/worker1_tokens_per_s"] > 0
        assert 0 < m["rollout/worker0_busy"] <= 1 and m["staleness"] == 0 and m["rollout_restarts"] == 0


def test_a_killed_worker_is_replaced_and_its_prompts_sampled_again(tokenizer, cluster, single):
    trainer = make_trainer(tokenizer, backend="ray", workers=2)
    killed = []

    def kill_in_step_2(trainer):
        if trainer.step_count == 1 and not killed:
            pid = trainer.rollouts.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    completions, history, weights = run(trainer, before_step=kill_in_step_2)
    want_completions, want_history, want_weights = single
    assert killed and [m["step"] for m in history] == [1, 2, 3]  # no step lost or repeated
    assert [m["rollout_restarts"] for m in history] == [0, 1, 0]
    assert completions == want_completions
    assert all(torch.equal(weights[k], want_weights[k]) for k in want_weights)


def test_too_many_dead_workers_stop_the_run(tokenizer, cluster):
    trainer = make_trainer(tokenizer, backend="ray", workers=1, max_restarts=0)
    try:
        os.kill(trainer.rollouts.worker_pids()[0], signal.SIGKILL)
        with pytest.raises(NanoseekError, match=r"rollout: 1 workers died in one step \(rollout.max_restarts 0\)"):
            trainer.step()
        assert trainer.step_count == 0
    finally:
        trainer.close()


def test_async_samples_one_step_ahead(tokenizer, cluster, single):
    completions, history, weights = run(make_trainer(tokenizer, backend="ray", workers=2, **{"async": True}))
    want_completions, _, _ = single
    # step 1 samples the first weights, as the synchronous run; steps 2 and 3 one update behind
    # (step 2 draws the synchronous run's random numbers on the weights before its update)
    assert [m["staleness"] for m in history] == [0, 1, 1]
    assert completions[0] == want_completions[0] and completions[1] != want_completions[1]
    # sampled and trained under other weights: the mismatch shows the update in between
    assert history[1]["logprob_diff_mean"] > 10 * history[0]["logprob_diff_mean"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_rollout_config(tmp_path):
    assert [(s.start, s.stop) for s in split(5, 2)] == [(0, 3), (3, 5)]
    assert [(s.start, s.stop) for s in split(1, 3)] == [(0, 1)]
    cfg = load_config(None, ["init_from=.", "rollout.async=true", "rollout.backend=ray"], cls=GRPORunConfig)
    assert cfg.rollout.async_ and cfg.to_dict()["rollout"]["async"] is True
    save_config(cfg, tmp_path / "config.yaml")  # what a run writes reads back the same
    assert load_config(tmp_path / "config.yaml", cls=GRPORunConfig).rollout == cfg.rollout
    for items, message in (
        (["rollout.workers=2"], "config key 'rollout.workers': 2 workers need backend ray or vllm"),
        (["rollout.async=true"], "config key 'rollout.async': needs backend ray or vllm"),
        (["rollout.ray_address=auto"], "config key 'rollout.ray_address': is for backend ray, not local"),
        (["rollout.asink=true"], "unknown config key 'rollout.asink' (known: async, backend, max_restarts"),
    ):
        with pytest.raises(NanoseekError) as e:
            load_config(None, ["init_from=.", *items], cls=GRPORunConfig)
        assert message in str(e.value), str(e.value)
    assert RolloutConfig().backend == "local"


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A small random model in Hugging Face format with its tokenizer."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size, num_hidden_layers=2)
    hf = save_pretrained(Transformer(config).eval(), tmp_path_factory.mktemp("rollout") / "base")
    tokenizer.save_pretrained(hf)
    return hf


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
    "steps": 4,
    "checkpoint_every": 1,
    "tensorboard": False,
    "progress": False,
}


@pytest.mark.slow  # ~40 s: two learner processes, each starting a Ray cluster
def test_a_killed_learner_resumes_with_the_same_command(base, tmp_path):
    """`nanoseek grpo` on 2 Ray workers, its process group killed after step 2's checkpoint, then the
    same command again: it resumes there and ends with the weights of the single-process run."""
    grpo_run(GRPORunConfig(init_from=str(base), **RUN), tmp_path / "local")
    config = tmp_path / "grpo.yaml"
    rollout = {"backend": "ray", "workers": 2}
    config.write_text(json.dumps({"init_from": str(base), **RUN, "rollout": rollout}))  # JSON is YAML
    out = tmp_path / "ray"
    command = ["grpo", "--config", str(config), "--out", str(out)]
    learner = subprocess.Popen(
        nanoseek_cmd(*command), env=env_one_thread(), start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-00000002").exists():
        assert learner.poll() is None, learner.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint of step 2 in time"
        time.sleep(0.05)
    os.killpg(learner.pid, signal.SIGKILL)  # the learner and the Ray cluster it started
    learner.wait()
    learner.stderr.close()
    assert not (out / "hf").exists()
    r = run_cli(*command)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "grpo: resuming" in r.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    a, b = load_file(tmp_path / "local" / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_vllm_backend_says_what_it_needs(tokenizer):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_vllm_rollouts_train runs the backend")
    running = ray.is_initialized()
    with pytest.raises(NanoseekError, match=r"rollout.backend vllm needs CUDA GPUs; torch sees none"):
        make_trainer(tokenizer, backend="vllm", workers=2)
    assert ray.is_initialized() == running  # refused before any cluster was started


@pytest.mark.cuda
def test_vllm_rollouts_train(tokenizer):
    pytest.importorskip("vllm", reason="the vllm backend needs `pip install vllm`")
    trainer = make_trainer(tokenizer, backend="vllm", workers=1)
    completions, history, weights = run(trainer, steps=2)
    assert [m["step"] for m in history] == [1, 2] and [m["staleness"] for m in history] == [0, 0]
    assert all(len(group) == 4 for step in completions for group in step)
    # vLLM's log-probs of its samples against the learner's forward: the same model, other kernels
    assert history[0]["logprob_diff_mean"] < 1e-2


def test_the_ray_backend_without_ray_is_one_line(tokenizer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(NanoseekError, match=r"rollout.backend ray needs Ray: pip install 'nanoseek\[scale\]'"):
        make_trainer(tokenizer, backend="ray", workers=2)
