"""GRPO's objective (DeepSeekMath section 4.1) and its well-known variants, as plain functions.

For each prompt, a group of G completions is scored; every token of completion i gets the
group-relative advantage A_i. The policy maximises the clipped surrogate
min(rho_t A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) A_i) - beta * KL_t, where
rho_t = pi_theta / pi_old per token and KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
(the unbiased "k3" estimator). No value network: the group is the baseline.

Variants (`loss_type`):
- `grpo`    A = (r - mean) / std; each completion's tokens averaged, then completions averaged.
- `dr_grpo` A = r - mean (no std); token sums divided by a constant (max_new_tokens), which
            removes the bias towards long wrong and short right answers (Dr. GRPO).
- `dapo`    A as grpo; one token-level average over the whole batch, clip-higher eps_high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def group_advantages(rewards: torch.Tensor, loss_type: str = "grpo", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]. Groups whose rewards are all equal get 0."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if loss_type == "dr_grpo":
        return centred
    std = rewards.std(dim=1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target_t | prefix) for logits [N, T, V] and targets [N, T]."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@dataclass
class LossStats:
    loss: float
    kl: float
    clip_fraction: float


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    loss_type: str = "grpo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """The loss to minimise for completions [N, T]: logp (with grad), old_logp and ref_logp
    (no grad), advantages [N], mask [N, T] of completion tokens."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type '{loss_type}' (expected one of {', '.join(LOSS_TYPES)})")
    mask = mask.float()
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, ratio.clamp(1 - epsilon, 1 + eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0.0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        length = max_new_tokens or mask.shape[1]
        loss = ((per_token * mask).sum(1) / length).mean()
    else:
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    n = mask.sum().clamp(min=1)
    stats = LossStats(
        loss=loss.item(),
        kl=((kl * mask).sum() / n).item(),
        clip_fraction=(((clipped < unclipped).float() * mask).sum() / n).item(),
    )
    return loss, stats
