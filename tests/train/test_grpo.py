"""GRPOTrainer: a step moves probability towards rewarded completions; the loop runs end to end."""

from types import SimpleNamespace

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.tasks import get
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer
from nanoseek.train.grpo_loss import group_advantages


@pytest.fixture(scope="module")
def tokenizer():
    task = get("arith")
    return train_tokenizer((text for _, text in corpus(task, 300, seed=0)), vocab_size=320)


def make_trainer(tokenizer, **kw):
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size)
    model = Transformer(config).eval()
    reward = lambda prompts, completions, **cols: [float("7" in c) for c in completions]  # noqa: E731
    prompts = [{"prompt": f"Compute {a}+{b}:", "answer": str(a + b)} for a in range(5) for b in range(5)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=8, lr=1e-2, **kw)
    return GRPOTrainer(model, tokenizer, reward, prompts, cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_update_moves_probability_towards_rewarded_completions(tokenizer, loss_type):
    trainer = make_trainer(tokenizer, loss_type=loss_type, beta=0.04 if loss_type == "grpo" else 0.0)
    prompt = [tokenizer.encode("Compute 3+4:")]
    good, bad = tokenizer.encode(" <answer>7</answer>"), tokenizer.encode(" <answer>5</answer>")
    group = [[SimpleNamespace(token_ids=good), SimpleNamespace(token_ids=bad)] * 2]
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0]])

    def seq_logp(ids):
        x = torch.tensor([prompt[0] + ids])
        with torch.no_grad():
            lp, _ = trainer.logprobs(trainer.model, x)
        return lp[0, len(prompt[0]) - 1 :].sum().item()

    before = seq_logp(good) - seq_logp(bad)
    trainer.update(prompt, group, group_advantages(rewards, loss_type), keep=[0])
    assert seq_logp(good) - seq_logp(bad) > before


def test_training_loop_logs_every_metric(tokenizer):
    trainer = make_trainer(tokenizer, beta=0.04, ref_refresh_every=1, mu=2)
    history = trainer.train(2)
    assert [m["step"] for m in history] == [1, 2]
    for key in (
        "reward_mean",
        "reward_std",
        "all_equal_groups",
        "completion_len_mean",
        "completion_len_max",
        "thinking_len_mean",
        "thinking_len_max",
        "kl",
        "clip_fraction",
        "entropy",
        "gen_seconds",
        "train_seconds",
        "loss",
    ):
        assert key in history[-1], key
    assert trainer.state_dict()["position"] == 4


def test_steps_count_their_tokens_and_flops(tokenizer):
    """Each step adds its rollouts' prompt and completion tokens and nanoseek.cost's FLOPs of them:
    generation, mu = 2 training passes, the old policy's and the reference's forwards."""
    from nanoseek import cost

    trainer = make_trainer(tokenizer, beta=0.04, mu=2)
    rollouts, rollout = [], trainer.rollout
    trainer.rollout = lambda rows: rollouts.append(rollout(rows)) or rollouts[-1]
    history = trainer.train(2, progress=False)
    flops, tokens = 0.0, 0
    for (prompt_ids, completions), m in zip(rollouts, history):
        lens = [[len(o.token_ids) for o in group] for group in completions]
        flops += cost.grpo_step_flops(trainer.model.config, [len(p) for p in prompt_ids], lens, [0, 1], 2, 2)
        tokens += sum(map(len, prompt_ids)) + sum(map(sum, lens))
        assert m["flops"] == pytest.approx(flops) and m["tokens"] == tokens
    assert history[1]["elapsed_s"] > history[0]["elapsed_s"] > 0
    assert trainer.state_dict()["flops"] == history[-1]["flops"] > 0


def test_reward_fn_columns_and_bad_config(tokenizer):
    seen = {}

    def reward(prompts, completions, answer):
        seen["answer"] = answer
        return [0.0] * len(completions)

    trainer = make_trainer(tokenizer)
    trainer.reward_fn = reward
    trainer.step()
    assert len(seen["answer"]) == 8 and all(isinstance(a, str) for a in seen["answer"])
    with pytest.raises(NanoseekError, match="config key 'loss_type': must be one of 'grpo'.* got 'ppo'"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(NanoseekError, match="group_size"):
        GRPOConfig(group_size=1)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_nonfinite_loss_or_gradient_stops_before_the_update(tokenizer, what):
    """A NaN advantage (so a NaN loss), or a NaN gradient under a finite loss: a NanoseekError
    naming the grpo step and what was not finite, and the weights are those from before, finite."""
    trainer = make_trainer(tokenizer, mu=2)
    trainer.step_count = 4  # as if four steps were done: the error names the fifth
    prompt = [tokenizer.encode("Compute 3+4:")]
    group = [[SimpleNamespace(token_ids=tokenizer.encode(" <answer>7</answer>"))] * 2]
    advantages = torch.tensor([[1.0, -1.0]])
    if what == "loss":
        advantages[0, 0] = float("nan")
    else:
        next(trainer.model.parameters()).register_hook(lambda g: g * float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NanoseekError) as e:
        trainer.update(prompt, group, advantages, keep=[0])
    said = "the loss is nan" if what == "loss" else "the gradient norm is nan"
    assert str(e.value).startswith(f"grpo step 5: {said}; the run stops here with the weights of step 4"), str(e.value)
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(t.isfinite().all() for t in after.values() if t.is_floating_point())


# The train/inference mismatch: the log-probs the rollout sampled with (the engine's folded
# decode steps) against the training forward's, for the same tokens.
@pytest.mark.parametrize("mu", [1, 2])
def test_rollout_and_training_logprobs_agree_in_float32(tokenizer, mu):
    trainer = make_trainer(tokenizer, mu=mu)
    assert trainer.engine.runner is not None  # the folded runner samples, model.py trains
    history = trainer.train(3)
    for m in history:
        assert m["logprob_diff_max"] is not None, m
        assert 0 <= m["logprob_diff_mean"] <= m["logprob_diff_max"] < 1e-4, m


def test_the_metric_sees_a_mismatch(tokenizer):
    """Log-probs off by 0.5 on every token read as a mean and max difference of 0.5."""
    trainer = make_trainer(tokenizer)
    rows = trainer.next_prompts()
    prompt_ids, completions = trainer.rollout(rows)
    shifted = [
        [SimpleNamespace(token_ids=o.token_ids, logprobs=[lp - 0.5 for lp in o.logprobs]) for o in group]
        for group in completions
    ]
    advantages = torch.randn(len(rows), trainer.config.group_size)
    stats = trainer.update(prompt_ids, shifted, advantages, keep=list(range(len(rows))))
    assert stats["logprob_diff_mean"] == pytest.approx(0.5, abs=1e-4)
    assert stats["logprob_diff_max"] == pytest.approx(0.5, abs=1e-4)


def test_no_kept_group_logs_no_mismatch(tokenizer):
    trainer = make_trainer(tokenizer)
    rows = trainer.next_prompts()
    prompt_ids, completions = trainer.rollout(rows)
    stats = trainer.update(prompt_ids, completions, torch.zeros(len(rows), 4), keep=[])
    assert stats["logprob_diff_mean"] is None and stats["logprob_diff_max"] is None


CHAT_ANSWER = "a=3,b=-1. 3-1=2\n</think>\n\na+b=2. \\boxed{2}<｜end▁of▁sentence｜>"
ZERO_ANSWER = " <think>a=3,b=-1. 3-1=2</think> <answer>2</answer>"


def test_task_rewards_read_the_templates_answer_format_and_log_language_and_readability(tokenizer):
    from nanoseek.tasks import Problem
    from nanoseek.train.grpo import task_rewards

    task = get("chain", signed=True, languages=["en", "el"])
    problem = Problem(prompt="a=3,b=-1. a+b", answer="2", task="chain", meta={"language": "en"})
    weights = {"accuracy": 1.0, "format": 0.5}
    chat_reward, chat_metrics = task_rewards(task, weights, tokenizer, 64, think_opened=True, answer_tags=False)
    assert chat_reward([""], [CHAT_ANSWER], [problem]) == [1.5]  # the chat answer is well formed
    assert chat_metrics([""], [CHAT_ANSWER], [problem]) == {
        "accuracy": [1.0],
        "format": [1.0],
        "reflection": [0.0],
        "reflection_accuracy": [None],
        "no_reflection_accuracy": [1.0],
    }
    tagged_reward, _ = task_rewards(task, weights, tokenizer, 64, think_opened=True)  # the old default
    assert tagged_reward([""], [CHAT_ANSWER], [problem]) == [1.0]
    zero_reward, _ = task_rewards(task, weights, tokenizer, 64)
    assert zero_reward([""], [ZERO_ANSWER], [problem]) == [1.5]
    greek = Problem(prompt="α=3,β=-1. α+β", answer="2", task="chain", meta={"language": "el"})
    weights = {"accuracy": 1.0, "language": 0.5, "readability": 0.25}
    reward, metrics = task_rewards(task, weights, tokenizer, 64)
    switched = " <think>α=3,b=-1. 3-1=2</think> α+β=2. <answer>2</answer>"
    assert metrics([""] * 2, [ZERO_ANSWER, switched], [problem, greek]) == {
        "accuracy": [1.0, 1.0],
        "format": [1.0, 0.0],
        "language": [1.0, 0.5],  # "α" of the Greek problem's two names
        "readability": [0.0, 1.0],  # R1-Zero's terse answer has no summary
        "reflection": [0.0, 0.0],
        "reflection_accuracy": [None, None],
        "no_reflection_accuracy": [1.0, 1.0],
    }
    rechecked = " <think>α=3,β=-1. 3-1=3 wait, 3-1=2</think> <answer>2</answer>"
    m = metrics([""] * 2, [ZERO_ANSWER, rechecked], [problem, greek])
    assert m["reflection"] == [0.0, 1.0]
    assert m["reflection_accuracy"] == [None, 1.0] and m["no_reflection_accuracy"] == [1.0, None]
    # by difficulty when the problems differ in it: each level's samples, None for the others'
    hard = Problem(prompt="a=3,b=-1,c=1. a+b+c", answer="3", task="chain", difficulty=3, meta={"language": "en"})
    wrong = " <think>a=3,b=-1:3-1=2,c=1. 2+1=4 wait, 2+1=3</think> <answer>4</answer>"
    m = metrics([""] * 3, [ZERO_ANSWER, rechecked, wrong], [problem, greek, hard])
    assert m["difficulty/0/reflection"] == [0.0, 1.0, None] and m["difficulty/3/reflection"] == [None, None, 1.0]
    assert m["difficulty/3/reflection_accuracy"] == [None, None, 0.0]
    assert m["difficulty/0/no_reflection_accuracy"] == [1.0, None, None]
    assert m["difficulty/3/accuracy"] == [None, None, 0.0]
    assert reward([""] * 2, [ZERO_ANSWER, switched], [problem, greek]) == [1.5, 1.0 + 0.25 + 0.25]


@pytest.mark.parametrize("template, tags", [("chat", False), ("r1-zero", True)])
def test_run_passes_the_templates_answer_format(tmp_path, monkeypatch, template, tags):
    from nanoseek.data.chat import GENERATION_PROMPT, R1_ZERO_TEMPLATE
    from nanoseek.train import grpo

    seen = {}

    def stop(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(grpo, "_load", lambda *a, **k: (None, None))
    monkeypatch.setattr(grpo, "task_rewards", stop)
    text = "User: {prompt}\n" + GENERATION_PROMPT if template == "chat" else R1_ZERO_TEMPLATE
    cfg = grpo.GRPORunConfig(init_from=str(tmp_path), template=text, device="cpu")
    with pytest.raises(RuntimeError, match="stop"):
        grpo.run(cfg, tmp_path / "out")
    assert seen["answer_tags"] is tags and seen["think_opened"] is (template == "chat")
