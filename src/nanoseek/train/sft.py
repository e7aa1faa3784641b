"""Supervised fine-tuning on chat conversations: the pretraining loop, with the loss on the
assistant's tokens only (its reasoning, answer and end-of-sentence), starting from a
pretrained model (`init_from`, a Hugging Face checkpoint directory).

With `distill_kl` > 0 it is also logit distillation: conversations whose record carries the
teacher's trace (token ids and top-k log-probs, see SFTDataset) add a KL term to the teacher's
distribution at each of those positions (pretrain.top_k_kl_sum)."""

from __future__ import annotations

import random

from nanoseek.errors import NanoseekError
from nanoseek.train import distributed
from nanoseek.train.config import ConfigKeyError, TrainConfig


class ChatBatches:
    """Batches of conversations for SFT, in an order fixed by (seed, epoch), that resume at
    any batch: the position is (epoch, index). Each rank takes every world_size-th
    conversation of the global batch; targets outside the assistant's tokens are ignored.
    With `distill_kl` > 0 a batch is (inputs, targets, (top_ids, top_logprobs)): the teacher's
    top-k pairs at each target (SFTDataset.collate)."""

    def __init__(self, cfg: TrainConfig, tokenizer, ctx: distributed.Context):
        from nanoseek.data.stream import SFTDataset

        self.dataset = SFTDataset(
            cfg.data.files, tokenizer, max_len=cfg.seq_len + 1, messages_field=cfg.data.messages_field
        )
        if len(self.dataset) == 0:
            raise NanoseekError(f"config key 'data.files': no conversations in {', '.join(cfg.data.files)}")
        self.distill = cfg.distill_kl > 0
        if self.distill and all(t is None for t in self.dataset.teachers):
            raise NanoseekError(
                f"config key 'distill_kl': {cfg.distill_kl:g} distils the teacher's top-k log-probs, but no "
                f"conversation in {', '.join(cfg.data.files)} has a 'teacher' field (`nanoseek distill` writes them)"
            )
        self.batch_size, self.seed, self.shuffle = cfg.batch_size, cfg.seed, cfg.data.shuffle
        self.rank, self.world_size = ctx.rank, ctx.world_size
        self.epoch, self.index = 0, 0
        self._order = self.order(0)

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self.order(self.epoch)

    def __iter__(self):
        return self

    def __next__(self):
        picked = []
        while len(picked) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self.order(self.epoch)
            picked.append(self._order[self.index])
            self.index += 1
        mine = picked[self.rank :: self.world_size]
        return self.dataset.collate([self.dataset[i] for i in mine], teacher=self.distill)


class SFTConfig(TrainConfig):
    """Pretraining's config, with `init_from` required: SFT starts from a pretrained model."""

    def check(self) -> None:
        super().check()
        if not self.init_from:
            raise ConfigKeyError(
                "init_from",
                "SFT starts from a pretrained model directory (the hf/ folder that `nanoseek pretrain` writes)",
            )
