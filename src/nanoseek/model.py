"""The DeepSeek-V3 model, one box of the paper's figure per class.

Read top to bottom: RMSNorm, YaRN RoPE, Multi-head Latent Attention (MLA), the dense
SwiGLU MLP, the DeepSeekMoE gate and experts, the decoder Block, Multi-Token Prediction
(MTP), and the Transformer that stacks them. Sections cite DeepSeek-V2 (MLA) and the
DeepSeek-V3 Technical Report (MoE gating, aux-loss-free balancing, MTP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig, yarn_mscale
from nanoseek.experts import run_experts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------
# Rotary positions, extended by YaRN (V3 section 4.3: factor 40 on a 4K original context).
# ---------------------------------------------------------------------------------------
def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE dims, and YaRN's cos/sin magnitude factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if not rs or rs.get("type") != "yarn":
        return inv_freq, 1.0
    factor, original = rs["factor"], rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def dim_for_rotations(n):  # the dimension that turns n times over the original context
        return dim * math.log(original / (n * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    # High-frequency dims keep their frequency (extrapolate); low-frequency dims are divided by factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        magnitude = yarn_mscale(factor, rs["mscale"]) / yarn_mscale(factor, rs["mscale_all_dim"])
    else:
        magnitude = yarn_mscale(factor)
    return inv_freq, magnitude


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        inv_freq, self.magnitude = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device) if self.inv_freq.device.type != "meta" else inv_freq

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch, seq, rope_dim / 2] for integer positions [batch, seq]."""
        angles = positions.float()[..., None] * self.inv_freq
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [batch, seq, heads, rope_dim]. DeepSeek's checkpoints pair adjacent dims
    (x0, x1), (x2, x3)... (`rope_interleave`); the other layout pairs x_i with x_{i+d/2}.
    The output is in split-halves layout either way: q and k share it, so q.k is unchanged."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------
# Multi-head Latent Attention (DeepSeek-V2 section 2.1).
# ---------------------------------------------------------------------------------------
@dataclass
class LatentCache:
    """The MLA inference cache: only c_KV and the shared RoPE key k_pe per token per layer.

    kv[layer]: [batch, max_len, kv_lora_rank]; pe[layer]: [batch, max_len, qk_rope_head_dim].
    Preallocated once; each forward writes the new tokens at their positions.
    """

    kv: list[torch.Tensor]
    pe: list[torch.Tensor]

    @classmethod
    def empty(
        cls,
        config: ModelConfig,
        batch: int,
        max_len: int,
        n_layers: int | None = None,
        dtype=torch.float32,
        device="cpu",
    ) -> LatentCache:
        n = config.num_hidden_layers if n_layers is None else n_layers
        return cls(
            kv=[torch.zeros(batch, max_len, config.kv_lora_rank, dtype=dtype, device=device) for _ in range(n)],
            pe=[torch.zeros(batch, max_len, config.qk_rope_head_dim, dtype=dtype, device=device) for _ in range(n)],
        )

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[1]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor, width: int) -> None:
        """Rows `dst` get the first `width` positions of rows `src` (n samples of one prompt)."""
        for kv, pe in zip(self.kv, self.pe):
            kv[dst, :width] = kv[src, :width]
            pe[dst, :width] = pe[src, :width]

    def select(self, rows: torch.Tensor) -> LatentCache:
        """A cache of rows `rows` of this one (repeats allowed), as new tensors that keep the
        gradient's path back to these: GRPO's completions each read their prompt's latents."""
        return LatentCache([kv[rows] for kv in self.kv], [pe[rows] for pe in self.pe])


class MLA(nn.Module):
    """Queries and keys/values pass through low-rank latents; only the KV latent
    c_KV = RMSNorm(W_DKV h) and a single shared RoPE key are cached (decoupled RoPE).

    Two implementations of attention over the latents, as in DeepSeek's reference code:
    `naive` expands c_KV into per-head keys and values (training, prefill); `absorb` folds
    W_UK into the query and W_UV into the output, so attention reads the latent cache as is.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.interleave = c.rope_interleave
        self.scale = c.softmax_scale
        qk_dim = self.nope_dim + self.rope_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)

    def queries(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(b, t, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.interleave)

    def latents(self, x, cos, sin):
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(
        self,
        x,
        cos,
        sin,
        positions=None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows=None,
        impl: str = "naive",
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D]. Without a cache: causal self-attention over x (positions 0..T-1), or
        attention where `mask` [B, T, T] allows (see `document_mask`).
        With a cache (kv, pe) of this layer: the new latents are written at `positions`
        [B, T] of cache rows `rows` [B], and each query attends to the cached keys at
        positions <= its own."""
        if cache is not None and mask is not None:
            # The cache's own mask (cached positions <= each query's) would replace it unseen.
            raise ValueError(
                "MLA: a mask cannot be combined with a cache (with a cache, each query attends "
                "to the cached positions <= its own; pass positions instead)"
            )
        b, t, _ = x.shape
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latents(x, cos, sin)
        if cache is not None:
            kv_cache, pe_cache = cache
            rows = torch.arange(b, device=x.device) if rows is None else rows
            kv_cache[rows[:, None], positions] = c_kv.to(kv_cache.dtype)
            pe_cache[rows[:, None], positions] = k_pe.to(pe_cache.dtype)
            s = int(positions.max()) + 1
            c_kv, k_pe = kv_cache[rows, :s].to(x.dtype), pe_cache[rows, :s].to(x.dtype)
            mask = torch.arange(s, device=x.device) <= positions[:, :, None]  # [B, T, S]
        if impl == "absorb":
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.reshape(b, t, -1))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        b, t, h, _ = q_nope.shape
        s = c_kv.shape[1]
        k_nope, v = self.kv_b_proj(c_kv).view(b, s, h, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, s, h, self.rope_dim)], dim=-1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None]
        v = v.transpose(1, 2)
        pad = q.shape[-1] - self.v_dim
        if pad > 0 and q.device.type == "cpu":
            # PyTorch's fast CPU kernel wants one head dim for q, k and v: zero columns of V give
            # zero output columns, dropped below (2x faster forward and backward for `small`).
            # On CUDA, V keeps its head dim: the memory-efficient kernel takes a V head dim that
            # differs from q's (flash wants them equal), so no copy of V is made there.
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=mask is None, scale=self.scale)
        return out[..., : self.v_dim].transpose(1, 2)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        t = q_nope.shape[1]
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk.to(q_nope.dtype))
        scores = (
            torch.einsum("bthr,bsr->bhts", q_latent, c_kv) + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)
        ) * self.scale
        if mask is None:
            mask = torch.ones(t, c_kv.shape[1], dtype=torch.bool, device=c_kv.device).tril()[None]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv.to(q_nope.dtype))


# ---------------------------------------------------------------------------------------
# Feed-forward: SwiGLU MLP (dense layers, shared experts, each routed expert).
# ---------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------
# DeepSeekMoE (V3 section 2.1.2): shared experts + fine-grained routed experts.
# ---------------------------------------------------------------------------------------
class Gate(nn.Module):
    """Token-to-expert affinities and top-k selection.

    V3 (`noaux_tc`): s = sigmoid(u . e); experts are *selected* on s + b, where b is the
    auxiliary-loss-free balancing bias (section 2.1.2), within the best `topk_group` groups
    scored by the sum of their top-2 biased affinities; the gate *values* use the unbiased s,
    normalised over the chosen experts, times `routed_scaling_factor`.
    V2 (`greedy`, `group_limited_greedy`): softmax affinities, no bias.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_experts = c.num_experts_per_tok, c.n_routed_experts
        self.n_group, self.topk_group, self.method = c.n_group, c.topk_group, c.topk_method
        self.scoring, self.norm_topk_prob, self.scaling = c.scoring_func, c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if self.method == "noaux_tc":
            # A buffer, not a parameter: it steers routing only and gets no gradient.
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> gate weights [N, k], expert indices [N, k], all affinities [N, E]."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        if self.method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.max(dim=-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            fill = float("-inf") if self.method == "noaux_tc" else 0.0
            choice = grouped.masked_fill(~keep[..., None], fill).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and (self.method == "noaux_tc" or self.top_k > 1):
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores


class MoE(nn.Module):
    """Shared experts see every token; each token also goes to its top-k routed experts.

    After a forward pass, `expert_counts` holds the tokens routed to each expert (for the
    aux-loss-free bias update) and, in training, `balance_loss` the complementary
    sequence-wise balance loss (V3 eq. 17-20) before its weight alpha. Both are None until
    the layer runs in the model's current forward pass (Transformer.hidden_states clears them).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.gate = Gate(c)
        self.experts = nn.ModuleList(MLP(c.hidden_size, c.moe_intermediate_size) for _ in range(c.n_routed_experts))
        self.shared_experts = (
            MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
        )
        self.expert_counts: torch.Tensor | None = None
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        self.expert_counts = counts.detach()
        if self.training:
            self.balance_loss = self.sequence_balance_loss(scores.view(b, t, -1), indices.view(b, t, -1))
        routed = self.routed(flat, weights, indices, counts)
        out = routed.view(b, t, d)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out

    def routed(self, x, weights, indices, counts) -> torch.Tensor:
        """Grouped by expert: sort the (token, slot) pairs by expert, run each expert on its
        contiguous slice (one grouped matmul for all of them, see `run_experts`), then scatter
        the weighted results back to their tokens."""
        order = indices.flatten().argsort(stable=True)
        token_of = order // self.top_k
        ys = run_experts(list(self.experts), x[token_of], counts)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys)

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """sum_i f_i P_i per sequence, averaged over sequences: f_i is expert i's share of the
        sequence's selections times E / k, P_i its mean normalised affinity."""
        b, t, e = scores.shape
        chosen = torch.zeros(b, t, e, device=scores.device).scatter_(2, indices, 1.0)
        f = chosen.sum(1) * e / (self.top_k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * p).sum(-1).mean()


# ---------------------------------------------------------------------------------------
# The decoder block, and Multi-Token Prediction (V3 section 2.2).
# ---------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_id) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, positions=None, cache=None, rows=None, impl="naive", mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, rows, impl, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's final norm (its output head is the main model's)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """Depth k: h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})], one transformer
    block, then the shared head predicts t_{i+k+1}. (The released checkpoint's eh_proj takes
    the embedding half first.) Embedding and output head are shared with the main model."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__(config, layer_id)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h, emb, cos, sin, positions=None, cache=None, rows=None, impl="naive", mask=None):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, cos, sin, positions, cache, rows, impl, mask)


def document_mask(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T, T] attention mask for rows packed with several documents, each starting at BOS:
    causal, and within a document only (as Llama 3 trains; V3 packs without it). Synthetic
    documents that reuse names ("a=3" in one, "a=-1" in the next) need it to look values up."""
    doc = torch.cumsum(input_ids == bos_id, dim=1)
    t = input_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
    return (doc[:, :, None] == doc[:, None, :]) & causal


# ---------------------------------------------------------------------------------------
# The Transformer.
# ---------------------------------------------------------------------------------------
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(config, n + k) for k in range(config.num_nextn_predict_layers))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        if self.embed_tokens.weight.is_meta:  # a model built on meta gets its weights loaded: nothing to draw
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        self.rope.reset_parameters()

    def hidden_states(
        self,
        input_ids,
        positions=None,
        cache: LatentCache | None = None,
        rows=None,
        impl: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed hidden states [B, T, D] that the output head reads; `mask` [B, T, T]
        replaces the causal mask when there is no cache (`document_mask` for packed rows; with a
        cache, MLA raises ValueError)."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        impl = impl or ("absorb" if cache is not None else "naive")
        for moe in self.moe_layers():  # a new forward pass: no counts or loss of an earlier one remain
            moe.expert_counts = moe.balance_loss = None
        cos, sin = self.rope(positions)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.kv[i], cache.pe[i])
            x = layer(x, cos, sin, positions if cache is not None else None, layer_cache, rows, impl, mask)
        return self.norm(x)

    def forward(
        self, input_ids, positions=None, cache: LatentCache | None = None, rows=None, impl: str | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab] of the main head."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache, rows, impl))

    def mtp_logits(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Training-time MTP: depth k's logits [B, T-k, vocab] predict token i+k+1 at position i."""
        out, h = [], hidden
        t = input_ids.shape[1]
        for k, module in enumerate(self.mtp, start=1):
            if t - k <= 0:
                break
            positions = torch.arange(t - k, device=input_ids.device).expand(input_ids.shape[0], t - k)
            cos, sin = self.rope(positions)
            h = module(
                h[:, : t - k],
                self.embed_tokens(input_ids[:, k:]),
                cos,
                sin,
                mask=None if mask is None else mask[:, : t - k, : t - k],
            )
            out.append(self.lm_head(module.shared_head.norm(h)))
        return out

    def named_moe_layers(self) -> list[tuple[str, MoE]]:
        """Every MoE layer with its name in plots ("layer 3", "MTP 1"): the main model's, then
        the MTP modules'. Theirs route like any other, so their bias, balance loss and load
        are kept the same way."""
        main = [(f"layer {i}", block.mlp) for i, block in enumerate(self.layers)]
        mtp = [(f"MTP {k}", module.mlp) for k, module in enumerate(self.mtp, start=1)]
        return [(name, mlp) for name, mlp in main + mtp if isinstance(mlp, MoE)]

    def moe_layers(self) -> list[MoE]:
        return [moe for _, moe in self.named_moe_layers()]

    def expert_counts(self) -> list[torch.Tensor]:
        """Tokens routed to each expert in the last forward pass, one tensor per MoE layer;
        zeros for a layer that did not run in it (the MTP modules run in training only, in
        mtp_logits)."""
        return [
            torch.zeros(m.n_experts, dtype=torch.long, device=m.gate.weight.device)
            if m.expert_counts is None
            else m.expert_counts
            for m in self.moe_layers()
        ]

    def balance_loss(self) -> torch.Tensor:
        """The sequence-wise balance losses of the last forward pass, summed over the MoE layers
        that ran in it in training mode."""
        losses = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    @torch.no_grad()
    def update_routing_bias(self, counts: list[torch.Tensor], gamma: float) -> None:
        """Auxiliary-loss-free balancing (V3 section 2.1.2): after each step, lower the bias of
        overloaded experts by gamma and raise that of underloaded ones. `counts`: the step's
        tokens per expert, one tensor per MoE layer as `expert_counts` gives them."""
        layers = self.moe_layers()
        if len(counts) != len(layers):
            raise ValueError(f"update_routing_bias: {len(counts)} count tensors for {len(layers)} MoE layers")
        for moe, c in zip(layers, counts):
            if not hasattr(moe.gate, "e_score_correction_bias"):
                continue
            if not c.any():  # the layer did not run this step (MTP without its loss): no load to balance
                continue
            c, bias = c.float(), moe.gate.e_score_correction_bias
            bias += gamma * torch.sign(c.mean() - c).to(bias)


# ---------------------------------------------------------------------------------------
# Sizes: parameters and cache bytes, for the presets table and cost math.
# ---------------------------------------------------------------------------------------
def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total parameters (without and with MTP) and those active per token, counted on
    blocks built on the meta device (no memory). Active counts the weights that multiply
    each token: the shared experts and k routed experts, not the embedding table (a lookup),
    as in the papers' 37B (V3) and 2.4B (V2-Lite)."""

    def size(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    n, c = config.num_hidden_layers, config
    moe = [c.is_moe_layer(i) for i in range(n)]
    with torch.device("meta"):
        # The blocks of one kind (dense, MoE) are alike: one of each is built, not all 61 of V3
        # (the 46K expert linears of a whole model take a minute to initialise, even on meta).
        block = {kind: size(Block(c, moe.index(kind))) for kind in set(moe)}
        mtp = sum(size(MTPModule(c, n + k)) for k in range(c.num_nextn_predict_layers))
    embedding = c.vocab_size * c.hidden_size
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    total = embedding + sum(block[kind] for kind in moe) + c.hidden_size + head  # + the final norm
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = sum(moe) * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    return {"total": total, "total_with_mtp": total + mtp, "active": total - inactive - embedding}


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """MLA caches kv_lora_rank + qk_rope_head_dim values per token per layer; standard
    multi-head attention with the same heads caches every head's key and value."""
    n = config.num_hidden_layers
    return {
        "mla": n * (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_value,
        "mha": n * config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim) * bytes_per_value,
    }
