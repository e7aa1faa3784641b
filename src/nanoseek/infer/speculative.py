"""MTP speculative decoding (DeepSeek-V3 section 2.2 and 5.4.3).

The main model's step at position i gives its hidden state h_i and the next token t_{i+1};
the MTP module reads (h_i, Emb(t_{i+1})) and drafts t_{i+2}. The next step feeds
[t_{i+1}, draft] to the main model in one forward: the draft is kept when the main model's
own choice at i+1 equals it, and then the logits at i+2 give one more token for free.
Every kept token is the main model's choice, so greedy output does not change.

The MTP block attends over its own one-layer latent cache, filled for the prompt at prefill
and extended by two positions per step (the second is overwritten when its draft fails).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.errors import NanoseekError
from nanoseek.infer.runner import DecodeRunner, StepContext, latent_cache_views
from nanoseek.model import Transformer


@dataclass
class SpeculativeStats:
    drafted: int = 0  # drafts the main model checked
    accepted: int = 0  # of those, the ones equal to the main model's choice

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class MTPDrafter:
    def __init__(self, model: Transformer, max_batch: int, max_len: int, dtype: torch.dtype, device):
        if not len(model.mtp):
            raise NanoseekError(
                "speculative decoding needs an MTP module (num_nextn_predict_layers >= 1 in config.json)"
            )
        self.model, self.module = model, model.mtp[0]
        c = model.config
        self.latents = torch.zeros(
            1, max_batch, max_len, c.kv_lora_rank + c.qk_rope_head_dim, dtype=dtype, device=device
        )
        self.cache = latent_cache_views(self.latents, c.kv_lora_rank)
        self.stats = SpeculativeStats()

    def _draft(self, out: torch.Tensor, take: torch.Tensor) -> list[int]:
        last = out[torch.arange(out.shape[0], device=out.device), take]
        return self.model.lm_head(last).argmax(dim=-1).tolist()

    def prefill(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        take: torch.Tensor,
    ) -> list[int]:
        """hidden [B, T, D]: the main model's final-normed states at `positions` [B, T];
        next_ids [B, T]: the token after each position. Writes the MTP latents at those
        positions of cache rows `rows` and returns, per row, the greedy draft read at
        column `take` [B] (the token two after that position)."""
        model = self.model
        cos, sin = model.rope(positions)
        out = self.module(
            hidden,
            model.embed_tokens(next_ids),
            cos,
            sin,
            positions,
            (self.cache.kv[0], self.cache.pe[0]),
            rows,
            "absorb",
        )
        return self._draft(self.module.shared_head.norm(out), take)

    def extend(
        self,
        runner: DecodeRunner | None,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        slots: list[int],
        starts: list[int],
        take: torch.Tensor,
        ctx: StepContext | None = None,
    ) -> list[int]:
        """The same for a decoding step, on the runner's folded weights when there is one (`ctx`:
        the main model's step context, when it is that of these positions and rows)."""
        if runner is None:
            return self.prefill(hidden, next_ids, positions, rows, take)
        ctx = ctx or runner.context(positions, rows, slots, starts)
        return self._draft(runner.mtp_hidden_states(hidden, next_ids, ctx, self.latents), take)
