"""GRPO advantages and each loss variant against a direct computation on hand-made tensors."""

import math

import pytest
import torch

from nanoseek.train.grpo_loss import group_advantages, grpo_loss, token_logprobs

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])


def test_group_advantages_by_hand():
    a = group_advantages(REWARDS, "grpo", eps=0.0)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(a[1], torch.zeros(4))  # all-equal group: no signal
    assert torch.allclose(group_advantages(REWARDS, "dr_grpo")[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


# Two completions, three token slots; the second completion has 2 tokens.
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
OLD = torch.tensor([[-1.5, -1.5, -0.5], [-0.3, -1.0, 0.0]])
REF = torch.tensor([[-0.9, -2.0, -0.7], [-0.5, -1.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0])


def direct_token_terms(eps_low, eps_high, beta):
    terms = []
    for i in range(2):
        row = []
        for t in range(3):
            if not MASK[i, t]:
                row.append(None)
                continue
            rho = math.exp(LOGP[i, t] - OLD[i, t])
            a = ADV[i].item()
            surrogate = min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            d = (REF[i, t] - LOGP[i, t]).item()
            kl = math.exp(d) - d - 1
            row.append(-surrogate + beta * kl)
        terms.append(row)
    return terms


def test_grpo_variant_by_hand():
    terms = direct_token_terms(0.2, 0.2, 0.04)
    expected = sum(sum(x for x in row if x is not None) / sum(x is not None for x in row) for row in terms) / 2
    loss, stats = grpo_loss(LOGP, OLD, ADV, MASK, REF, "grpo", epsilon=0.2, beta=0.04)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert 0 < stats.clip_fraction < 1 and stats.kl > 0


def test_dr_grpo_variant_by_hand():
    terms = direct_token_terms(0.2, 0.2, 0.0)
    expected = sum(sum(x for x in row if x is not None) / 8 for row in terms) / 2
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, REF, "dr_grpo", epsilon=0.2, beta=0.0, max_new_tokens=8)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dapo_variant_by_hand():
    terms = direct_token_terms(0.2, 0.28, 0.0)
    flat = [x for row in terms for x in row if x is not None]
    loss, _ = grpo_loss(LOGP, OLD, ADV, MASK, None, "dapo", epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(sum(flat) / len(flat), rel=1e-6)
    # clip-higher: a ratio of 1.25 with a positive advantage is clipped at 1.2 but not at 1.28
    up = torch.log(torch.tensor([[1.25]]))
    sym, s1 = grpo_loss(up, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), loss_type="dapo", epsilon=0.2)
    hi, s2 = grpo_loss(
        up, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), loss_type="dapo", epsilon=0.2, epsilon_high=0.28
    )
    assert sym.item() == pytest.approx(-1.2) and hi.item() == pytest.approx(-1.25)
    assert s1.clip_fraction == 1.0 and s2.clip_fraction == 0.0


def test_first_step_loss_is_zero_and_gradient_follows_advantage():
    """With pi = pi_old the loss is -mean(A) = 0 for centred advantages; the gradient still
    raises the log-probability of positively rewarded tokens."""
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = grpo_loss(logp, logp.detach(), adv, torch.ones(2, 2))
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert (logp.grad[0] < 0).all() and (logp.grad[1] > 0).all()


def test_token_logprobs():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    lp = token_logprobs(logits, targets)
    assert torch.allclose(lp[1, 2], torch.log_softmax(logits[1, 2], -1)[targets[1, 2]])
