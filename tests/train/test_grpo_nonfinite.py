"""GRPO stops before an update whose loss or gradient is not finite, with one line naming the
step: the weights stay finite, the last checkpoint intact, and no model is written."""

import dataclasses
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main
from nanoseek.data.corpus import corpus
from nanoseek.data.tokenizer import Tokenizer, train_tokenizer
from nanoseek.errors import NanoseekError
from nanoseek.io.hf import save_pretrained
from nanoseek.tasks import get
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import grpo
from nanoseek.train.grpo import GRPOConfig, GRPOTrainer

from train_support import make_data

NAN = float("nan")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((text for _, text in corpus(get("arith"), 300, seed=0)), vocab_size=320)


def make_trainer(tokenizer, reward=None, **kw):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=tokenizer.vocab_size)).eval()
    reward = reward or (lambda prompts, completions, **cols: [float(i % 2) for i in range(len(completions))])
    prompts = [f"Compute {a}+{b}:" for a in range(5) for b in range(5)]
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=6, lr=1e-2, **kw)
    return GRPOTrainer(model, tokenizer, reward, prompts, cfg)


def nan_loss_on(monkeypatch, calls):
    """grpo_loss returns a NaN loss on its `calls`-th calls (1 = the first micro-batch of the run)."""
    real = grpo.grpo_loss
    n = [0]

    def loss(*args, **kw):
        n[0] += 1
        value, stats = real(*args, **kw)
        if n[0] in calls:
            return value * NAN, dataclasses.replace(stats, loss=NAN)
        return value, stats

    monkeypatch.setattr(grpo, "grpo_loss", loss)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nonfinite_loss_stops_before_the_update(tokenizer, monkeypatch):
    trainer = make_trainer(tokenizer)
    before = weights(trainer.model)
    nan_loss_on(monkeypatch, {1})
    with pytest.raises(NanoseekError) as e:
        trainer.step()
    assert str(e.value) == (
        "grpo step 1: the loss is nan; the run stops here with the weights of step 0 "
        "(lower lr, or look at this step's rewards and completions)"
    )
    assert trainer.step_count == 0 and not trainer.optimizer.state  # no update was made
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not trainer.model.training


def test_nonfinite_gradient_with_a_finite_loss_stops_before_the_update(tokenizer):
    trainer = make_trainer(tokenizer)
    trainer.train(1)  # one good step first
    before = weights(trainer.model)
    trainer.model.lm_head.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.raises(NanoseekError, match=r"^grpo step 2: the gradient norm is (nan|inf); .* weights of step 1 "):
        trainer.step()
    after = weights(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_loss_in_a_later_pass_says_which_weights_are_left(tokenizer, monkeypatch):
    """mu = 2: the first pass updated the weights, the second is NaN: the message says so (they are
    not step 0's any more), and they are finite."""
    trainer = make_trainer(tokenizer, mu=2)
    nan_loss_on(monkeypatch, {2})
    with pytest.raises(NanoseekError, match=r"^grpo step 1: the loss is nan; .* finite weights, 1 of this step's 2 "):
        trainer.step()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("bad", [NAN, math.inf])
def test_a_reward_that_is_not_finite_is_named(tokenizer, bad):
    """A NaN reward would make its group's advantages 0 (its std is NaN) without a word."""
    reward = lambda prompts, completions, **cols: [bad if i == 5 else 1.0 for i in range(len(completions))]  # noqa: E731
    trainer = make_trainer(tokenizer, reward)
    with pytest.raises(NanoseekError) as e:
        trainer.step()
    assert str(e.value) == (
        f"grpo step 1: reward_fn returned {bad} for completion 5 (prompt 1); rewards must be finite numbers"
    )


def test_a_run_stops_with_one_line_and_keeps_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    _, tok_dir = make_data(tmp_path / "data")
    tok = Tokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size))
    base = save_pretrained(model, tmp_path / "base")
    tok.save_pretrained(base)
    nan_loss_on(monkeypatch, {2})  # one micro-batch a step: step 2's loss is NaN
    out = tmp_path / "run"
    sets = [f"init_from={base}", "steps=3", "checkpoint_every=1", "prompts=8", "prompts_per_step=2"]
    sets += ["group_size=2", "max_new_tokens=6", "tensorboard=false", "progress=false"]
    code = main(["grpo", "--out", str(out), "--set", *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: grpo step 2: the loss is nan; the run stops here with the weights of step 1 ")
    step1 = ckpt.checkpoints_dir(out) / "step-00000001"
    assert ckpt.list_checkpoints(out) == [step1] and not (out / "hf").exists()
    c = ckpt.read_checkpoint(step1)  # verifies every file
    assert all(torch.isfinite(v).all() for v in c.model.values() if v.is_floating_point())
