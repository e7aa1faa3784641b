"""Running the routed experts of a DeepSeekMoE layer: every expert on its slice of tokens.

The (token, expert) pairs arrive sorted by expert, expert e's `counts[e]` rows after expert
e-1's. A Python loop of one small matmul per expert grows with the expert count (V3 routes to
8 of 256), so where the shapes allow it the experts run as three grouped matmuls (gate, up,
down) with `torch._grouped_mm`, forward and backward. The expert modules keep their own
weights (the Hugging Face layout, one `MLP` per expert): they are stacked for each call, and
the stack's backward hands each expert its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e].T for weights w [E, out, in] in nn.Linear's
    layout; `ends` [E] int32 are the groups' cumulative row counts."""

    @staticmethod
    def forward(ctx, x, w, ends):
        ctx.save_for_backward(x, w, ends)
        return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)

    @staticmethod
    def backward(ctx, grad):
        x, w, ends = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=ends)
        # Row-grouped x and grad: one [out, in] product per group, summed over its rows.
        grad_w = torch._grouped_mm(grad.t(), x, offs=ends)
        empty = ends.diff(prepend=ends.new_zeros(1)) == 0
        return grad_x, grad_w.masked_fill_(empty[:, None, None], 0.0), None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return GroupedLinear.apply(x, w, ends)


def can_group(experts: list[nn.Module], x: torch.Tensor) -> bool:
    """torch._grouped_mm runs any dtype on the CPU and bfloat16 on CUDA, on rows whose byte
    strides are multiples of 16; the experts must be plain bias-free nn.Linear SwiGLU MLPs
    (an FP8 module quantises inside its own forward, which stacking would skip)."""
    if not hasattr(torch, "_grouped_mm") or not experts:
        return False
    if x.device.type != "cpu" and (x.device.type != "cuda" or x.dtype != torch.bfloat16):
        return False
    linears = [m for e in experts for m in (e.gate_proj, e.up_proj, e.down_proj)]
    if any(type(m) is not nn.Linear or m.bias is not None or m.weight.dtype != x.dtype for m in linears):
        return False
    if any(hasattr(m.weight, "to_local") for m in linears):  # a sharded (DTensor) weight
        return False
    size = x.element_size()
    return all(n * size % 16 == 0 for n in (experts[0].gate_proj.in_features, experts[0].gate_proj.out_features))


def run_experts(experts: list[nn.Module], xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU MLP on rows counts[:e].sum() .. counts[:e+1].sum() of xs [N, D], for
    every e, as one grouped matmul up and one down where `can_group`, else one call per
    expert (each expert runs, on an empty slice too, so each gets a gradient)."""
    if can_group(experts, xs):
        ends = counts.cumsum(0).to(torch.int32)

        def stacked(name):
            return torch.stack([getattr(e, name).weight for e in experts])

        # Gate and up stay two matmuls, as in the experts' own forward: the input's gradient then
        # adds up the same two products, so training is bit for bit that of the per-expert loop.
        hidden = F.silu(grouped_linear(xs, stacked("gate_proj"), ends)) * grouped_linear(xs, stacked("up_proj"), ends)
        return grouped_linear(hidden, stacked("down_proj"), ends)
    return torch.cat([e(part) for e, part in zip(experts, xs.split(counts.tolist()))])
