"""GRPO's rollouts on Ray workers: the same completions, rewards and weights as one process;
a dead worker replaced without losing or repeating a step; one step off-policy."""

import os
import signal

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.tasks import get
from nanoseek.train.config import load_config
from nanoseek.train.grpo import GRPOConfig, GRPORunConfig, GRPOTrainer
from nanoseek.train.rollout import RolloutConfig, split

ray = pytest.importorskip("ray", reason="Ray is the scale-out extra: pip install 'nanoseek[scale]'")


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


def test_rollout_config():
    assert [(s.start, s.stop) for s in split(5, 2)] == [(0, 3), (3, 5)]
    assert [(s.start, s.stop) for s in split(1, 3)] == [(0, 1)]
    cfg = load_config(None, ["init_from=.", "rollout.async=true", "rollout.backend=ray"], cls=GRPORunConfig)
    assert cfg.rollout.async_ and cfg.to_dict()["rollout"]["async"] is True
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
