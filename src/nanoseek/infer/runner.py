"""The decode step, with the model's weights folded for it (the engine's model runner).

A decode step moves a few tokens through every layer, so on a CPU its cost is the number of
operations more than their size. The runner computes what `Transformer.forward` computes
with a cache and `impl="absorb"`, in fewer, larger operations:
- W_UK folded into the query projection and W_UV into o_proj (DeepSeek-V2 section 2.1.3,
  "absorbed into W_Q and W_O") when that does not blow up the weights (a small latent rank),
  the softmax scale folded into the queries; attention is two matmuls over the cached
  [c_KV; k_pe] rows, which are keys and (their c_KV part) values at once;
- q_a_proj and kv_a_proj_with_mqa as one matmul; gate_proj and up_proj as one matmul;
- RoPE as one small matmul per layer: the RoPE rows of the weights are permuted once to the
  split-halves layout, and each step builds the rotation matrices of its positions;
- DeepSeekMoE: each expert's gate and up projections fused, the shared experts' MLP split
  into experts of the same width and weight 1; the (token, expert) pairs sorted by expert run
  as one grouped matmul up and one down (`torch._grouped_mm`, as `transformers` does).
Prefill stays with the model itself. The folded weights are recomputed when a parameter of
the model changes in place (an optimizer step between RL rollouts), see `sync`.

FP8 weights (`FP8WeightLinear`, V3 section 3.3) are not folded: folding would multiply them
out into dense copies and lose the memory they save. The runner calls those modules, which
keep E4M3 weights and dequantise them inside the matmul; W_UK, W_UV, the RoPE layout and the
softmax scale are then applied to the activations instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from nanoseek.device import model_dtype
from nanoseek.fp8 import FP8WeightLinear
from nanoseek.model import MLP, LatentCache, MoE, Transformer


def latent_cache_views(latents: torch.Tensor, kv_lora_rank: int) -> LatentCache:
    """The model's LatentCache over one tensor [layers, rows, positions, kv_lora_rank + rope]:
    c_KV and k_pe of a token sit side by side, so attention reads them as one key."""
    return LatentCache(kv=[t[..., :kv_lora_rank] for t in latents], pe=[t[..., kv_lora_rank:] for t in latents])


@dataclass
class StepContext:
    """What every layer of one decode step shares."""

    positions: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [B] cache rows
    rotation: torch.Tensor  # [B * T, rope, rope]: RoPE at each position, applied as x @ R
    span: int  # cache positions read: 0 .. span-1
    packed: bool  # rows are 0..B-1 in order: read the cache by slicing, not gathering
    mask: torch.Tensor | None  # additive [B, T * heads, span]; None when every query sees all of 0..span-1


def is_fp8(*modules) -> bool:
    return any(isinstance(m, FP8WeightLinear) for m in modules)


class ModuleProjection:
    """x -> cat(m(x) for m in modules), its columns reordered by `index` and scaled by `scale`:
    what a folded matrix computes, with the modules' own (FP8) weights."""

    def __init__(self, modules, index: torch.Tensor, scale: torch.Tensor | None):
        self.modules, self.index, self.scale = modules, index, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([m(x) for m in self.modules], dim=-1)[..., self.index]
        return y if self.scale is None else y * self.scale


class FoldedAttention:
    def __init__(self, attn, dtype):
        h, nope, rope, v, r = attn.n_heads, attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
        self.attn, self.h, self.r, self.rope, self.nope = attn, h, r, rope, nope
        device = attn.kv_a_proj_with_mqa.weight.device
        perm = (
            torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]) if attn.interleave else torch.arange(rope)
        ).to(device)
        kv_b = attn.kv_b_proj.weight.detach().double().view(h, nope + v, r)
        w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
        q_in = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        q_out = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
        self.fp8 = is_fp8(q_in, q_out, attn.kv_a_proj_with_mqa, attn.o_proj)
        if self.fp8:
            self._init_modules(attn, perm, w_uk, w_uv, dtype)
            return
        q_w = (attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj).weight.detach().double()
        q_w = q_w.view(h, nope + rope, -1)
        q_nope, q_pe = q_w[:, :nope], q_w[:, nope:][:, perm]
        # Fold W_UK into the query weights when the folded matrix is at most twice as big.
        self.q_absorbed = r + rope <= 2 * (nope + rope)
        if self.q_absorbed:
            q_nope = torch.einsum("hnr,hnd->hrd", w_uk, q_nope)
        else:
            self.w_uk = w_uk.to(dtype)
        q_w = torch.cat([q_nope, q_pe], dim=1).flatten(0, 1) * attn.scale
        kv_w = attn.kv_a_proj_with_mqa.weight.detach().double()
        kv_w = torch.cat([kv_w[:r], kv_w[r:][perm]])
        kv_bias = attn.kv_a_proj_with_mqa.bias
        if kv_bias is not None:
            kv_bias = torch.cat([kv_bias[:r], kv_bias[r:][perm]]).detach()
        if attn.q_lora_rank is None:  # V2-Lite: the query comes straight from x, in the same matmul
            self.split = [q_w.shape[0], r, rope]
            w_in, self.q_w = torch.cat([q_w, kv_w]), None
            bias = None if kv_bias is None else torch.cat([kv_bias.new_zeros(q_w.shape[0]), kv_bias])
        else:
            self.split = [attn.q_lora_rank, r, rope]
            w_in, self.q_w = torch.cat([attn.q_a_proj.weight.detach().double(), kv_w]), q_w.to(dtype)
            q_bias = attn.q_a_proj.bias
            bias = None if kv_bias is None else torch.cat([q_bias.detach(), kv_bias])
        self.project_in = partial(F.linear, weight=w_in.to(dtype), bias=None if bias is None else bias.to(dtype))
        self.project_q = None if self.q_w is None else partial(F.linear, weight=self.q_w)
        o_w = attn.o_proj.weight.detach().double()
        self.o_absorbed = r <= 2 * v  # fold W_UV into o_proj likewise
        if self.o_absorbed:
            self.o_w = torch.einsum("dhv,hvr->dhr", o_w.view(o_w.shape[0], h, v), w_uv).flatten(1).to(dtype)
        else:
            self.o_w, self.w_uv = o_w.to(dtype), w_uv.to(dtype)
        self.project_o = partial(
            F.linear, weight=self.o_w, bias=None if attn.o_proj.bias is None else attn.o_proj.bias.detach()
        )

    def _init_modules(self, attn, perm, w_uk, w_uv, dtype):
        """The same step through attn's own (FP8) projections: W_UK and W_UV stay apart, and the
        RoPE permutation and softmax scale go on their outputs."""
        h, nope, rope, r = self.h, self.nope, self.rope, self.r
        device = perm.device
        self.q_absorbed = self.o_absorbed = False
        self.w_uk, self.w_uv = w_uk.to(dtype), w_uv.to(dtype)
        head = torch.cat([torch.arange(nope, device=device), nope + perm])
        q_index = (torch.arange(h, device=device)[:, None] * (nope + rope) + head).flatten()
        q_scale = torch.full((h * (nope + rope),), attn.scale, dtype=dtype, device=device)
        kv_index = torch.cat([torch.arange(r, device=device), r + perm])
        if attn.q_lora_rank is None:  # V2-Lite: the query and the latent from x, one projection
            self.split = [h * (nope + rope), r, rope]
            index = torch.cat([q_index, q_index.numel() + kv_index])
            scale = torch.cat([q_scale, q_scale.new_ones(r + rope)])
            self.project_in = ModuleProjection([attn.q_proj, attn.kv_a_proj_with_mqa], index.to(device), scale)
            self.project_q = None
        else:
            self.split = [attn.q_lora_rank, r, rope]
            index = torch.cat([torch.arange(attn.q_lora_rank, device=device), attn.q_lora_rank + kv_index])
            self.project_in = ModuleProjection([attn.q_a_proj, attn.kv_a_proj_with_mqa], index.to(device), None)
            self.project_q = ModuleProjection([attn.q_b_proj], q_index.to(device), q_scale)
        self.project_o = attn.o_proj

    def __call__(self, x: torch.Tensor, ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        b, t, _ = x.shape
        first, c_kv, k_pe = self.project_in(x).split(self.split, dim=-1)
        if self.project_q is not None:
            first = self.project_q(
                F.rms_norm(first, (first.shape[-1],), attn.q_a_layernorm.weight, attn.q_a_layernorm.eps)
            )
        q = first.view(b, t, self.h, -1)
        q_main, q_pe = q.split([q.shape[-1] - self.rope, self.rope], dim=-1)
        if not self.q_absorbed:
            q_main = torch.einsum("bthn,hnr->bthr", q_main, self.w_uk)
        # RoPE on the queries and the shared key together: [B*T, H+1, rope] @ [B*T, rope, rope].
        pe = torch.bmm(torch.cat([q_pe, k_pe[:, :, None]], dim=2).view(b * t, self.h + 1, self.rope), ctx.rotation)
        pe = pe.view(b, t, self.h + 1, self.rope)
        c_kv = F.rms_norm(c_kv, (self.r,), attn.kv_a_layernorm.weight, attn.kv_a_layernorm.eps)
        latents[ctx.rows[:, None], ctx.positions] = torch.cat([c_kv, pe[:, :, -1]], dim=-1).to(latents.dtype)
        keys = latents[:b, : ctx.span] if ctx.packed else latents[ctx.rows, : ctx.span]
        keys = keys.to(x.dtype)
        query = torch.cat([q_main, pe[:, :, :-1]], dim=-1).view(b, t * self.h, -1)
        scores = torch.matmul(query, keys.transpose(1, 2))  # the softmax scale is in the query weights
        if ctx.mask is not None:
            scores = scores + ctx.mask
        out = torch.matmul(scores.softmax(dim=-1), keys[..., : self.r]).view(b, t, self.h, self.r)
        if not self.o_absorbed:
            out = torch.einsum("bthr,hvr->bthv", out, self.w_uv)
        return self.project_o(out.reshape(b, t, -1))


class FoldedMLP:
    def __init__(self, mlp: MLP, dtype):
        self.mlp = mlp if is_fp8(mlp.gate_proj, mlp.up_proj, mlp.down_proj) else None
        if self.mlp is not None:
            return
        self.w_gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().to(dtype)
        self.w_down = mlp.down_proj.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp(x)
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w_down)


class FoldedMoE:
    STACK_LIMIT = 1 << 26  # expert parameters up to which the engine keeps its own stacked copy

    def __init__(self, moe: MoE, dtype):
        self.moe = moe
        experts = list(moe.experts)
        self.stacked = sum(p.numel() for p in moe.parameters()) <= self.STACK_LIMIT and not is_fp8(
            *(m for e in experts for m in (e.gate_proj, e.up_proj, e.down_proj))
        )
        if not self.stacked:
            self.shared = FoldedMLP(moe.shared_experts, dtype) if moe.shared_experts is not None else None
            return
        # The shared experts' MLP, split along its hidden width, is n_shared more experts of weight 1.
        width = experts[0].gate_proj.weight.shape[0]
        parts = [(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight.T) for e in experts]
        shared = moe.shared_experts
        if shared is not None:
            parts += zip(
                shared.gate_proj.weight.split(width),
                shared.up_proj.weight.split(width),
                shared.down_proj.weight.T.split(width),
            )
        self.w_up = torch.stack([torch.cat([g, u]).T for g, u, _ in parts]).detach().to(dtype).contiguous()
        self.w_down = torch.stack([d for _, _, d in parts]).detach().to(dtype).contiguous()  # [E', I, D]
        n_shared = len(parts) - len(experts)
        device = self.w_up.device
        self.shared_ids = torch.arange(len(experts), len(parts), device=device)[None]
        self.shared_gates = torch.ones(1, n_shared, dtype=dtype, device=device)
        # torch._grouped_mm runs any dtype on the CPU; CUDA's kernel (and torch.compile's checks)
        # take bfloat16 only, so float32 and float16 on a GPU loop over the experts instead.
        self.grouped_mm = getattr(torch, "_grouped_mm", None)
        if device.type != "cpu" and dtype != torch.bfloat16:
            self.grouped_mm = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        b, t, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, _ = moe.gate(flat)
        n = indices.shape[0]
        if not self.stacked:
            counts = torch.bincount(indices.flatten(), minlength=moe.n_experts)
            out = moe.routed(flat, weights, indices, counts).view(b, t, d)
            return out if self.shared is None else out + self.shared(x)
        # Every (token, expert) pair, the shared experts included, sorted by expert: one grouped
        # matmul up and one down run each expert on its slice of tokens.
        experts = torch.cat([indices, self.shared_ids.expand(n, -1)], dim=1).flatten()
        gates = torch.cat([weights.to(x.dtype), self.shared_gates.expand(n, -1)], dim=1).flatten()
        order = experts.argsort(stable=True)
        token_of = order // (experts.shape[0] // n)
        counts = torch.bincount(experts, minlength=self.w_up.shape[0])
        xs = flat[token_of]
        # CPU's grouped matmul visits every expert (about 4 us each): with few pairs among many
        # experts (a token or two of V3's 256) one matmul per chosen expert is faster.
        if self.grouped_mm is not None and 12 * experts.shape[0] >= counts.shape[0]:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = self.grouped_mm(xs, self.w_up, offs=offsets).chunk(2, dim=-1)
            ys = self.grouped_mm(F.silu(gate) * up, self.w_down, offs=offsets)
        else:
            ys, start = torch.empty_like(xs), 0
            for e, count in enumerate(counts.tolist()):
                if count:
                    gate, up = (xs[start : start + count] @ self.w_up[e]).chunk(2, dim=-1)
                    ys[start : start + count] = (F.silu(gate) * up) @ self.w_down[e]
                    start += count
        out = torch.zeros_like(flat).index_add_(0, token_of, ys * gates[order, None])
        return out.view(b, t, d)


class FoldedBlock:
    def __init__(self, block, dtype):
        self.ln1, self.ln2 = block.input_layernorm, block.post_attention_layernorm
        self.attn = FoldedAttention(block.self_attn, dtype)
        self.mlp = FoldedMoE(block.mlp, dtype) if isinstance(block.mlp, MoE) else FoldedMLP(block.mlp, dtype)

    def __call__(self, x: torch.Tensor, ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        x = x + self.attn(F.rms_norm(x, (d,), self.ln1.weight, self.ln1.eps), ctx, latents)
        return x + self.mlp(F.rms_norm(x, (d,), self.ln2.weight, self.ln2.eps))


class DecodeRunner:
    def __init__(self, model: Transformer, max_len: int):
        self.model = model
        self.max_len = max_len
        self._params = list(model.parameters())
        self._signature = None
        self.sync()

    def _weights_signature(self):
        return tuple((p.data_ptr(), p._version) for p in self._params)

    @torch.inference_mode()
    def sync(self) -> None:
        """Refold the weights if any parameter changed in place since the last fold (the engine
        calls this when requests arrive; call it after replacing parameters outright)."""
        if any(a is not b for a, b in zip(self._params, self.model.parameters())):
            self._params = list(self.model.parameters())
        signature = self._weights_signature()
        if signature == self._signature:
            return
        model = self.model
        dtype = model_dtype(model)
        self.blocks = [FoldedBlock(layer, dtype) for layer in model.layers]
        self.mtp_blocks = [FoldedBlock(m, dtype) for m in model.mtp]
        positions = torch.arange(self.max_len, device=model.embed_tokens.weight.device)
        cos, sin = model.rope(positions[None])
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)
        self.dtype = dtype
        self._signature = signature

    def context(self, positions: torch.Tensor, rows: torch.Tensor, slots: list[int], starts: list[int]) -> StepContext:
        """positions [B, T] = starts[b] + 0..T-1, in cache rows `rows` (= `slots`)."""
        b, t = positions.shape
        span = max(starts) + t
        packed = slots == list(range(b))
        mask = None
        if t > 1 or min(starts) + 1 != span:
            heads = self.model.config.num_attention_heads
            hidden = torch.arange(span, device=positions.device) > positions[:, :, None]
            mask = torch.zeros(b, t, span, dtype=self.dtype, device=positions.device).masked_fill(hidden, float("-inf"))
            mask = mask[:, :, None].expand(b, t, heads, span).reshape(b, t * heads, span)
        # x @ R rotates the pairs (x_i, x_{i+half}) by each position's angle (split-halves RoPE).
        cos, sin = self.cos[positions], self.sin[positions]  # [B, T, half]
        half = cos.shape[-1]
        i = torch.arange(half, device=positions.device)
        rotation = torch.zeros(b, t, 2 * half, 2 * half, dtype=self.dtype, device=positions.device)
        rotation[..., i, i] = cos
        rotation[..., i + half, i + half] = cos
        rotation[..., i + half, i] = -sin
        rotation[..., i, i + half] = sin
        return StepContext(positions, rows, rotation.view(b * t, 2 * half, 2 * half), span, packed, mask)

    def hidden_states(self, input_ids: torch.Tensor, ctx: StepContext, latents: torch.Tensor) -> torch.Tensor:
        """The model's final-normed hidden states [B, T, D] for tokens at ctx.positions,
        attending over and writing to `latents` [layers, rows, positions, rank + rope]."""
        x = self.model.embed_tokens(input_ids)
        for block, lat in zip(self.blocks, latents):
            x = block(x, ctx, lat)
        norm = self.model.norm
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    def mtp_hidden_states(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, ctx: StepContext, latents: torch.Tensor
    ) -> torch.Tensor:
        """The first MTP module (V3 section 2.2) on the main model's states and the next tokens,
        through its shared head's norm: what the output head reads to draft."""
        m = self.model.mtp[0]
        d = hidden.shape[-1]
        emb = self.model.embed_tokens(next_ids)
        x = F.linear(
            torch.cat(
                [
                    F.rms_norm(emb, (d,), m.enorm.weight, m.enorm.eps),
                    F.rms_norm(hidden, (d,), m.hnorm.weight, m.hnorm.eps),
                ],
                dim=-1,
            ),
            m.eh_proj.weight,
        )
        x = self.mtp_blocks[0](x, ctx, latents[0])
        norm = m.shared_head.norm
        return F.rms_norm(x, (d,), norm.weight, norm.eps)
