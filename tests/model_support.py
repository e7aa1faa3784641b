"""What the model-level tests share: random models whose norms and routing bias are not at
their initial values (ones and zeros), so that a misplaced norm or a bias left out of the
routing shows up in the numbers."""

from __future__ import annotations

import torch

from nanoseek import Transformer

# A tiny V3 model with everything switched on (MLA with q_lora, MoE after one dense layer, MTP):
# what the engine and server tests run.
ENGINE_CONFIG = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
    routed_scaling_factor=2.5,
)


@torch.no_grad()
def randomize(model: Transformer, seed: int | None = None, norms: bool = True) -> Transformer:
    """Norm weights ~ N(1, 0.1) (with `norms`) and the aux-loss-free routing bias ~ N(0, 0.05),
    in place, drawn from the global RNG (seeded with `seed` first when given). Returns the
    model in eval mode."""
    if seed is not None:
        torch.manual_seed(seed)
    if norms:
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
    for moe in model.moe_layers():
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model.eval()


def random_model(config, seed: int = 0, norms: bool = True) -> Transformer:
    """A Transformer built and then randomised after torch.manual_seed(seed): the same seed
    gives the same weights."""
    torch.manual_seed(seed)
    return randomize(Transformer(config), norms=norms)


@torch.no_grad()
def balance_by_hand(moe, x: torch.Tensor) -> float:
    """V3's sequence-wise balance loss (eq. 17-20) of MoE layer `moe` for its input x [B, T, D],
    written out: sum_i f_i P_i per sequence, averaged over the sequences."""
    b, t, _ = x.shape
    e, k = moe.n_experts, moe.top_k
    _, indices, scores = moe.gate(x.reshape(b * t, -1))
    total = 0.0
    for row in range(b):
        s, idx = scores[row * t : (row + 1) * t], indices[row * t : (row + 1) * t]
        f = torch.bincount(idx.flatten(), minlength=e).float() * e / (k * t)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        total += float((f * p).sum())
    return total / b


def record_moe_inputs(model: Transformer) -> dict[str, torch.Tensor]:
    """{MoE layer name: its input in the latest forward pass}, kept up to date by hooks."""
    inputs: dict[str, torch.Tensor] = {}
    for name, moe in model.named_moe_layers():
        moe.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
    return inputs
