"""The grouped expert matmul against one call per expert: outputs and every gradient."""

import pytest
import torch

from nanoseek.experts import can_group, run_experts
from nanoseek.model import MLP


def _experts(n, dim, hidden, seed=0):
    torch.manual_seed(seed)
    return [MLP(dim, hidden) for _ in range(n)]


def _loop(experts, xs, counts):
    return torch.cat([e(part) for e, part in zip(experts, xs.split(counts.tolist()))])


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 7], [0, 0, 0, 0, 0, 16], [2, 3, 4, 1, 1, 5]])
def test_grouped_experts_match_one_call_per_expert(counts):
    experts = _experts(6, 16, 12)
    assert can_group(experts, torch.zeros(1, 16))
    counts = torch.tensor(counts)
    xs = torch.randn(int(counts.sum()), 16, requires_grad=True)
    grad = torch.randn(xs.shape[0], 16)
    out = run_experts(experts, xs, counts)
    out.backward(grad)
    got = [p.grad.clone() for e in experts for p in e.parameters()] + [xs.grad.clone()]

    for e in experts:
        e.zero_grad()
    xs_ref = xs.detach().clone().requires_grad_()
    ref = _loop(experts, xs_ref, counts)
    ref.backward(grad)
    want = [p.grad for e in experts for p in e.parameters()] + [xs_ref.grad]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    unused = [i for i, n in enumerate(counts.tolist()) if n == 0]
    for i in unused:  # an expert with no tokens gets a zero gradient, not none (FSDP reduces every one)
        assert all(p.grad is not None and not p.grad.any() for p in experts[i].parameters())


def test_unaligned_widths_fall_back_to_one_call_per_expert():
    experts = _experts(3, 10, 6)  # 10 floats = 40 bytes: not a multiple of 16
    assert not can_group(experts, torch.zeros(1, 10))
    counts = torch.tensor([2, 0, 3])
    xs = torch.randn(5, 10)
    torch.testing.assert_close(run_experts(experts, xs, counts), _loop(experts, xs, counts))


def test_modules_other_than_plain_linears_are_not_stacked():
    experts = _experts(2, 16, 8)
    experts[1].up_proj = torch.nn.Linear(16, 8, bias=True)
    assert not can_group(experts, torch.zeros(1, 16))
