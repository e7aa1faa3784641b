"""GRPO with verifiable rewards (DeepSeekMath section 4; DeepSeek-R1 section 2.2).

Each step: take P prompts, sample a group of G completions per prompt with the inference
engine on the *current* weights, score them, turn the scores into group-relative
advantages, and update the policy for `mu` passes with the clipped objective and the k3
KL penalty against a frozen reference model (`grpo_loss.py` holds the formulas).

    trainer = GRPOTrainer(model, tokenizer, reward_fn, prompts, GRPOConfig(...))
    trainer.train(steps)

`reward_fn(prompts, completions, **columns) -> list[float]`; `prompts` are strings or dicts
with a "prompt" key whose other keys are passed to the reward as columns (one list per key).
"""

from __future__ import annotations

import copy
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from nanoseek import cost, storage
from nanoseek.data.chat import R1_ZERO_TEMPLATE, template_format
from nanoseek.dense import DenseConfig, KVCache
from nanoseek.device import DTYPES, model_device, resolve_device, resolve_dtype
from nanoseek.errors import NanoseekError
from nanoseek.model import LatentCache
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import distributed
from nanoseek.train.config import ConfigKeyError, Section, save_config
from nanoseek.train.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss, token_entropy, token_logprobs
from nanoseek.train.rollout import RolloutConfig, make_rollout, worker_metrics


class GRPOConfig(Section):
    """GRPOTrainer's settings (a pydantic model: a bad value is a NanoseekError naming the key)."""

    group_size: int = Field(8, ge=2)  # G completions per prompt; at least 2: the group is the baseline
    prompts_per_step: int = Field(16, ge=1)  # P prompts per step
    max_new_tokens: int = Field(96, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    lr: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)  # above 0: clip_grad_norm_ to 0 would zero every update
    beta: float = Field(0.0, ge=0)  # KL weight; 0 drops the reference model entirely
    epsilon: float = Field(0.2, ge=0)
    epsilon_high: float | None = Field(None, ge=0)  # clip-higher (DAPO); None = epsilon
    mu: int = Field(1, ge=1)  # optimisation passes over each batch of rollouts
    loss_type: Literal[LOSS_TYPES] = "grpo"
    dynamic_sampling: bool | None = None  # drop all-equal groups; default (None) on for dapo
    ref_refresh_every: int = Field(0, ge=0)  # copy the policy into the reference model every N steps (0: never)
    micro_batch_size: int = Field(64, ge=1)  # completions per forward/backward
    stop: list[str] = []
    seed: int = 0
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)  # where completions are sampled (rollout.py)

    def check(self) -> None:
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigKeyError(
                "min_new_tokens", f"{self.min_new_tokens} is above max_new_tokens {self.max_new_tokens}"
            )
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.loss_type == "dapo"


RewardFn = Callable[..., list[float]]


def _load(model, tokenizer, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer) from objects or directories; a model directory loads onto `device`
    in `dtype` (None: the CPU, float32)."""
    if isinstance(model, (str, Path)):
        from nanoseek.io.hf import load_pretrained

        directory = model
        model = load_pretrained(directory, dtype=dtype or torch.float32, device=device or torch.device("cpu"))
        if tokenizer is None:
            tokenizer = directory
    if isinstance(tokenizer, (str, Path)):
        from nanoseek.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer)
    if tokenizer is None:
        raise NanoseekError("GRPOTrainer needs a tokenizer (or a model directory that holds one)")
    return model, tokenizer


def _normalise_prompts(prompts) -> list[dict]:
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            rows.append({"prompt": p})
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            rows.append(dict(p))
        else:
            raise NanoseekError(f"prompt {i}: expected a string or a dict with a 'prompt' string")
    if not rows:
        raise NanoseekError("GRPOTrainer needs at least one prompt")
    return rows


def completion_logprobs(model, prompts, prompt_lens, comp, group, with_entropy=False):
    """log pi of each completion token [N, C] (and the entropy there, without grad), where
    completion i follows prompt group[i]. Each prompt runs once: its cache (MLA's latents, or a
    dense student's keys and values) is copied to its completions, which read it as context,
    and their gradients flow back through it."""
    used, group = group.unique(return_inverse=True)
    prompts, lens = prompts[used], prompt_lens[used]
    n, width = prompts.shape
    weight = model.lm_head.weight
    dense = isinstance(model.config, DenseConfig)
    cache = (KVCache if dense else LatentCache).empty(
        model.config, n, width + comp.shape[1], dtype=weight.dtype, device=weight.device
    )
    # MLA in its naive form: the absorbed one is the engine's, for decoding without gradients
    impl = {} if dense else {"impl": "naive"}
    positions = torch.arange(width, device=prompts.device).expand(n, width)
    hidden = model.hidden_states(prompts, positions, cache, **impl)
    cache = cache.select(group)
    positions = lens[group, None] + torch.arange(comp.shape[1], device=comp.device)  # right after the prompt
    # The prompt's last position predicts the first completion token.
    hidden = torch.cat(
        [hidden[group, lens[group] - 1, None], model.hidden_states(comp, positions, cache, **impl)[:, :-1]],
        dim=1,
    )
    logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
    lp = logp.gather(-1, comp[..., None]).squeeze(-1)
    if not with_entropy:
        return lp, None
    with torch.no_grad():
        return lp, -(logp.exp() * logp).sum(-1)


class TrainingForward(torch.nn.Module):
    """The training forward, `completion_logprobs` of the policy, as one module: FSDP2's root unit
    when the learner runs on several ranks (its forward gathers the embedding, norm and head)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompts, prompt_lens, comp, group, with_entropy=False):
        return completion_logprobs(self.model, prompts, prompt_lens, comp, group, with_entropy)


class GRPOTrainer:
    def __init__(
        self,
        model,
        tokenizer,
        reward_fn: RewardFn,
        prompts,
        config: GRPOConfig | None = None,
        metrics_fn: Callable[..., dict[str, list[float]]] | None = None,
        engine=None,
        ctx: distributed.Context | None = None,
    ):
        from nanoseek.infer import Engine

        self.config = config or GRPOConfig()
        self.model, self.tokenizer = _load(model, tokenizer)
        self.reward_fn, self.metrics_fn = reward_fn, metrics_fn
        self.rows = _normalise_prompts(prompts)
        self.ctx = ctx = ctx or distributed.Context()
        c = self.config
        torch.manual_seed(c.seed)
        self.ref_model = None
        if c.beta != 0.0:  # a full copy on every rank: its forward needs no collective
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        # Several learner ranks (torchrun): FSDP2 shards the policy; rank 0 samples on a full copy
        # (`sampler`, refreshed after every update) and broadcasts the rollouts to the others.
        self.sampler = self.model
        self.forward = None  # on several ranks: the training forward as FSDP's root module
        if ctx.distributed:
            if isinstance(self.model.config, DenseConfig):
                raise NanoseekError(
                    f"a dense student trains in one process, not on {ctx.world_size} ranks (run it without torchrun)"
                )
            if engine is not None:
                raise NanoseekError("GRPOTrainer: an engine was given, but the learner runs on several ranks")
            self.sampler = copy.deepcopy(self.model).eval().requires_grad_(False) if ctx.is_main else None
            self.forward = TrainingForward(self.model)
            distributed.parallelize(self.forward, self.model, ctx, per_block=False)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, betas=(0.9, 0.95), weight_decay=c.weight_decay
        )
        prompt_len = max(len(self.tokenizer.encode(r["prompt"], bos=True)) for r in self.rows)
        workers = c.rollout.workers
        engine_kwargs = {
            # a worker's share of the step: ceil(P / workers) prompts of G completions
            "max_batch_size": min(c.group_size * -(-c.prompts_per_step // workers), 256),
            "max_seq_len": prompt_len + c.max_new_tokens + 1,
            # no prefix cache: the weights change every step, and a reused prefix would round
            # differently from a recomputed one, making a rollout depend on how it was batched
            "prefix_cache_tokens": 0,
        }
        if c.rollout.backend == "local" and self.sampler is not None:
            # The engine reads the policy's weights in place: no copy of the model per step.
            engine = engine or Engine(self.sampler, self.tokenizer, **engine_kwargs)
        elif engine is not None:
            raise NanoseekError(f"GRPOTrainer: an engine was given, but rollout.backend is {c.rollout.backend}")
        self.engine = engine
        self.rollouts = None  # rank 0 samples
        if ctx.is_main:
            self.rollouts = make_rollout(c.rollout, self.sampler, self.tokenizer, engine_kwargs, engine)
        self.published = None  # the step count whose weights the rollout workers hold
        self.pending = None  # rollout.async: (rows, wait for its Rollouts, (position, epoch) before the rows)
        self.step_count = 0
        self.position = 0  # next prompt in this epoch's order
        self.epoch = 0
        # Rollout and training tokens, their FLOPs (nanoseek.cost.grpo_step_flops) and seconds, all steps.
        self.tokens, self.flops, self.elapsed = 0, 0.0, 0.0
        self.history: list[dict] = []

    # ---- data --------------------------------------------------------------------------
    def next_prompts(self) -> list[dict]:
        batch = []
        while len(batch) < self.config.prompts_per_step:
            order = list(range(len(self.rows)))
            random.Random(f"{self.config.seed}:{self.epoch}").shuffle(order)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            batch.append(self.rows[order[self.position]])
            self.position += 1
        return batch

    # ---- one step ----------------------------------------------------------------------------
    def sampling_params(self, step: int):
        """The sampling of step `step` (0-based): every prompt's group seeded alike, so a prompt
        draws the same tokens wherever it is sampled (the local engine, a Ray worker, a batch of any size)."""
        from nanoseek.infer import SamplingParams

        c = self.config
        return SamplingParams(
            n=c.group_size,
            temperature=c.temperature,
            top_p=c.top_p,
            max_tokens=c.max_new_tokens,
            min_tokens=c.min_new_tokens,
            stop=list(c.stop),
            seed=c.seed * 1_000_003 + step,
            logprobs=0,  # the log-probs sampled with, against the training forward's (the mismatch metric)
        )

    def submit(self, rows: list[dict], step: int):
        """Start sampling `rows` for step `step` on the current weights (published to the workers
        first when they changed); returns (prompt ids, a function that waits for the Rollouts).
        On several ranks every rank calls it (the sampler's refresh gathers the shards), rank 0 samples."""
        prompt_ids = [self.tokenizer.encode(r["prompt"], bos=True) for r in rows]  # as the corpus documents
        self.model.eval()
        if self.published != self.step_count:
            if self.ctx.distributed:  # collective: the shards gathered into rank 0's full copy
                full, _ = distributed.full_state(self.model, None, self.ctx)
                if self.ctx.is_main:
                    self.sampler.load_state_dict(full)
            if self.rollouts is not None:
                self.rollouts.publish(self.sampler, self.step_count)
            self.published = self.step_count
        wait = None
        if self.rollouts is not None:
            with torch.no_grad():
                wait = self.rollouts.submit(prompt_ids, self.sampling_params(step), self.step_count)
        return prompt_ids, wait

    def collect(self, rows, wait):
        """The Rollouts and their scores, (rollouts, rewards, extra metrics): rank 0 waits for the
        rollout and scores it, and on several ranks sends all three to every rank."""
        if self.rollouts is not None:
            rollouts = wait()
            rewards, extra = self.score(rows, rollouts.completions)
            out = [rollouts, rewards, extra]
        else:
            out = [None, None, None]
        if self.ctx.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(out, src=0)
        return out

    @torch.no_grad()
    def rollout(self, rows: list[dict]):
        prompt_ids, wait = self.submit(rows, self.step_count)
        return prompt_ids, self.collect(rows, wait)[0].completions

    def score(self, rows, completions) -> tuple[torch.Tensor, dict[str, list[float]]]:
        flat_prompts = [r["prompt"] for r in rows for _ in range(self.config.group_size)]
        texts = [o.text for group in completions for o in group]
        columns = {k: [r[k] for r in rows for _ in range(self.config.group_size)] for k in rows[0] if k != "prompt"}
        rewards = self.reward_fn(flat_prompts, texts, **columns)
        if len(rewards) != len(texts):
            raise NanoseekError(f"reward_fn returned {len(rewards)} rewards for {len(texts)} completions")
        bad = next((i for i, r in enumerate(rewards) if not math.isfinite(r)), None)
        if bad is not None:  # a NaN would make its group's advantages 0 (std > 0 fails) without a word
            raise NanoseekError(
                f"grpo step {self.step_count + 1}: reward_fn returned {rewards[bad]} for completion {bad} "
                f"(prompt {bad // self.config.group_size}); rewards must be finite numbers"
            )
        extra = self.metrics_fn(flat_prompts, texts, **columns) if self.metrics_fn else {}
        return torch.tensor(rewards, dtype=torch.float32).view(len(rows), self.config.group_size), extra

    def batch_tensors(self, prompt_ids, completions, keep_groups):
        """The kept groups: prompts [P, Lp] and completions [N, C] (both padded at the end), each
        prompt's length [P], each completion's prompt row [N], and the mask of completion tokens [N, C];
        all on the model's device."""
        pad = self.tokenizer.special_ids.get("pad") or 0
        dev = model_device(self.model)

        def padded(seqs):
            width = max(max(map(len, seqs)), 1)
            return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], dtype=torch.long, device=dev)

        prompts = [prompt_ids[g] for g in keep_groups]
        outs = [list(o.token_ids) for g in keep_groups for o in completions[g]]
        comp = padded(outs)
        lengths = torch.tensor([len(o) for o in outs], device=dev)
        mask = (torch.arange(comp.shape[1], device=dev) < lengths[:, None]).float()
        sizes = torch.tensor([len(completions[g]) for g in keep_groups], device=dev)
        group = torch.arange(len(prompts), device=dev).repeat_interleave(sizes)
        return padded(prompts), torch.tensor([len(p) for p in prompts], device=dev), comp, group, mask

    def logprobs(self, model, input_ids, with_entropy=False):
        """log pi(token t+1 | tokens <= t) of whole sequences [N, T]: [N, T - 1]."""
        logits = model(input_ids[:, :-1])
        lp = token_logprobs(logits, input_ids[:, 1:])
        return (lp, token_entropy(logits)) if with_entropy else (lp, None)

    def completion_logprobs(self, model, prompts, prompt_lens, comp, group, with_entropy=False):
        return completion_logprobs(model, prompts, prompt_lens, comp, group, with_entropy)

    def update(self, prompt_ids, completions, advantages, keep, off_policy: bool = False) -> dict:
        """mu passes of the clipped objective over the kept groups' completions. `off_policy`: the
        completions were sampled by older weights (rollout.async), so the importance ratio is taken
        against the log-probs they were sampled with, not the current policy's."""
        c = self.config
        loss_sum, kl_sum, clip_sum, ent_sum, n_mb = 0.0, 0.0, 0.0, 0.0, 0
        mismatch = {"logprob_diff_mean": None, "logprob_diff_max": None}
        if keep:
            prompts, prompt_lens, comp, group, mask = self.batch_tensors(prompt_ids, completions, keep)
            sampled = self.sampled_logprobs(completions, keep, comp)
            if off_policy and sampled is None:
                raise NanoseekError("rollout.async needs the log-probs the rollout sampled with")
            adv = advantages[keep].flatten().to(comp.device)  # rewards are scored on the CPU
            self.model.train()
            n_total = len(comp)
            mbs = [slice(i, i + c.micro_batch_size) for i in range(0, n_total, c.micro_batch_size)]
            # On several ranks each takes every world-th micro-batch; a rank short of one runs the
            # first again with no weight, so that all ranks make the same FSDP collectives.
            world, rank = self.ctx.world_size, self.ctx.rank
            rounds = -(-len(mbs) // world)
            mine = [(mbs[j], True) if j < len(mbs) else (mbs[0], False) for j in range(rank, rounds * world, world)]

            def micro_batch_logprobs(model, sl, with_entropy=False):
                if model is self.model and self.forward is not None:
                    return self.forward(prompts, prompt_lens, comp[sl], group[sl], with_entropy)
                return completion_logprobs(model, prompts, prompt_lens, comp[sl], group[sl], with_entropy)

            with torch.no_grad():
                old = None
                if c.mu > 1 and not off_policy:
                    old = [micro_batch_logprobs(self.model, sl)[0] for sl, _ in mine]
                ref = (
                    None if self.ref_model is None else [micro_batch_logprobs(self.ref_model, sl)[0] for sl, _ in mine]
                )
            trained = [None] * len(mine)  # the training forward's log-probs before this step's updates
            for done in range(c.mu):
                self.optimizer.zero_grad(set_to_none=True)
                pass_loss = 0.0
                for j, (sl, real) in enumerate(mine):
                    lp, ent = micro_batch_logprobs(self.model, sl, with_entropy=True)
                    if off_policy:  # pi_theta / pi_sampler: the behaviour policy's log-probs
                        old_lp = sampled[sl, : lp.shape[1]]
                    else:
                        old_lp = old[j] if old is not None else lp.detach()
                    if done == 0:
                        trained[j] = lp.detach() if off_policy else old_lp
                    loss, stats = grpo_loss(
                        lp,
                        old_lp,
                        adv[sl],
                        mask[sl],
                        ref[j] if ref is not None else None,
                        c.loss_type,
                        c.epsilon,
                        c.epsilon_high,
                        c.beta,
                        c.max_new_tokens,
                    )
                    # micro-batches add up to the batch loss: by tokens for the token-level loss
                    share = (mask[sl].sum() / mask.sum()).item() if c.loss_type == "dapo" else len(comp[sl]) / n_total
                    # FSDP averages the ranks' gradients: each rank's part counts world times
                    (loss * (share * world if real else 0.0)).backward()
                    if not real:
                        continue
                    pass_loss += stats.loss * share
                    loss_sum += stats.loss * share
                    kl_sum += stats.kl * share
                    clip_sum += stats.clip_fraction * share
                    m = mask[sl]
                    ent_sum += ((ent.detach() * m).sum() / m.sum().clamp(min=1)).item() * share
                    n_mb += 1
                if self.ctx.distributed:
                    pass_loss = self.ctx.all_reduce(torch.tensor(pass_loss, dtype=torch.float64)).item()
                    norm = distributed.clip_grad_norm(list(self.model.parameters()), c.grad_clip, self.ctx)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip).item()
                if not (math.isfinite(pass_loss) and math.isfinite(norm)):  # before the update: weights stay finite
                    self.optimizer.zero_grad(set_to_none=True)
                    self.model.eval()
                    bad_loss = not math.isfinite(pass_loss)
                    what = f"the loss is {pass_loss}" if bad_loss else f"the gradient norm is {norm}"
                    weights = f"the weights of step {self.step_count}"
                    if done:  # the earlier passes of this step have updated them
                        weights = f"finite weights, {done} of this step's {c.mu} updates made"
                    raise NanoseekError(
                        f"grpo step {self.step_count + 1}: {what}; the run stops here with {weights} "
                        "(lower lr, or look at this step's rewards and completions)"
                    )
                self.optimizer.step()
            self.model.eval()
            if self.ctx.distributed:
                mismatch = self._ranks_mismatch(trained, sampled, mask, mine)
                sums = torch.tensor([loss_sum, kl_sum, clip_sum, ent_sum], dtype=torch.float64)
                loss_sum, kl_sum, clip_sum, ent_sum = self.ctx.all_reduce(sums).tolist()
            else:
                diff = None if sampled is None else (torch.cat(trained) - sampled).abs()[mask.bool()]
                if diff is not None and diff.numel():
                    mismatch = {"logprob_diff_mean": diff.mean().item(), "logprob_diff_max": diff.max().item()}
        passes = max(c.mu, 1) if keep else 1
        return {
            "loss": loss_sum / passes,
            "kl": kl_sum / passes,
            "clip_fraction": clip_sum / passes,
            "entropy": ent_sum / passes,
            **mismatch,
        }

    def _ranks_mismatch(self, trained, sampled, mask, mine) -> dict:
        """The mismatch metric over all ranks' micro-batches (each rank holds its own)."""
        import torch.distributed as dist

        total = torch.zeros(2, dtype=torch.float64)  # sum of |diff|, tokens
        top = torch.zeros(1, dtype=torch.float64)
        if sampled is not None:
            for lp, (sl, real) in zip(trained, mine):
                if real:
                    d = (lp - sampled[sl]).abs()[mask[sl].bool()].double()
                    total += torch.stack([d.sum(), torch.tensor(float(d.numel()), dtype=torch.float64)])
                    top = torch.maximum(top, d.max(dim=0, keepdim=True).values if d.numel() else top)
        self.ctx.all_reduce(total)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        if sampled is None or total[1] == 0:
            return {"logprob_diff_mean": None, "logprob_diff_max": None}
        return {"logprob_diff_mean": (total[0] / total[1]).item(), "logprob_diff_max": top.item()}

    def sampled_logprobs(self, completions, keep_groups, comp) -> torch.Tensor | None:
        """The log-probs the rollout sampled the kept completions' tokens with [N, C] (0 past the
        end), as the engine computed them in its own (folded, cached) decode steps. Against the
        training forward's they measure the train/inference mismatch: `logprob_diff_mean` and
        `logprob_diff_max` over the completion tokens, before the step's update."""
        rows = [getattr(o, "logprobs", None) for g in keep_groups for o in completions[g]]
        if any(r is None for r in rows):  # completions that did not come from the engine
            return None
        width = comp.shape[1]
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32, device=comp.device)

    def step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        if self.pending is not None:  # rollout.async: sampled while the last step trained
            rows, prompt_ids, wait, _ = self.pending
            self.pending = None
        else:
            rows = self.next_prompts()
            prompt_ids, wait = self.submit(rows, self.step_count)
        rollouts, rewards, extra = self.collect(rows, wait)
        completions = rollouts.completions
        if c.rollout.async_:  # the next step's rollout runs on these weights while this one trains
            resume_at = (self.position, self.epoch)
            next_rows = self.next_prompts()
            self.pending = (next_rows, *self.submit(next_rows, self.step_count + 1), resume_at)
        t_gen = time.perf_counter() - t0

        advantages = group_advantages(rewards, c.loss_type)
        equal = rewards.max(1).values == rewards.min(1).values
        keep = [g for g in range(len(rows)) if not (c.dynamic_sampling and equal[g])]
        lengths = [len(o.token_ids) for group in completions for o in group]
        # the engine's thinking length: the evaluation and the report read the same number
        thinking = [o.reasoning_tokens for group in completions for o in group]
        metrics = {
            "step": self.step_count + 1,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "all_equal_groups": equal.float().mean().item(),
            "completion_len_mean": sum(lengths) / len(lengths),
            "completion_len_max": max(lengths),
            "thinking_len_mean": sum(thinking) / len(thinking),
            "thinking_len_max": max(thinking),
        }
        for k, v in extra.items():  # the mean over the samples a metric has a value for (None: no value)
            values = [x for x in v if x is not None]
            if values:
                metrics[k] = sum(values) / len(values)

        metrics["staleness"] = self.step_count - rollouts.version  # learner steps since the sampling weights
        t1 = time.perf_counter()
        train_stats = self.update(prompt_ids, completions, advantages, keep, off_policy=c.rollout.async_)
        self.step_count += 1
        if self.ref_model is not None and c.ref_refresh_every and self.step_count % c.ref_refresh_every == 0:
            if self.ctx.distributed:  # the full weights, on every rank (no expert parallelism here)
                self.ref_model.load_state_dict(distributed.full_state(self.model, None, self.ctx)[0])
            else:
                self.ref_model.load_state_dict(self.model.state_dict())
        prompt_lens = [len(p) for p in prompt_ids]
        forwards = int(c.mu > 1) + int(self.ref_model is not None)  # old policy's and reference's log-probs
        self.tokens += sum(prompt_lens) + sum(lengths)
        self.flops += cost.grpo_step_flops(
            self.model.config, prompt_lens, [[len(o.token_ids) for o in g] for g in completions], keep, c.mu, forwards
        )
        self.elapsed += time.perf_counter() - t0
        metrics.update(train_stats, groups_used=len(keep), gen_seconds=t_gen, train_seconds=time.perf_counter() - t1)
        metrics.update(tokens=self.tokens, flops=self.flops, elapsed_s=self.elapsed)
        if c.rollout.backend != "local":
            metrics.update(worker_metrics(rollouts, time.perf_counter() - t0))
        self.history.append(metrics)
        return metrics

    def close(self) -> None:
        """Stop the rollout workers (and the Ray cluster this trainer started)."""
        self.pending = None
        if self.rollouts is not None:
            self.rollouts.close()

    def train(self, steps: int, callback: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
        """`steps` more steps; `callback(metrics)` after each (logging, checkpoints)."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.step_count + steps,
            initial=self.step_count,
            desc="grpo",
            dynamic_ncols=True,
            disable=not progress,
        )
        for _ in range(steps):
            m = self.step()
            postfix = {
                "reward": f"{m['reward_mean']:.3f}",
                "len": f"{m['completion_len_mean']:.0f}",
                "think": f"{m['thinking_len_mean']:.0f}",
            }
            if "accuracy" in m:
                postfix["acc"] = f"{m['accuracy']:.3f}"
            bar.set_postfix(postfix)
            bar.update()
            if callback:
                callback(m)
        bar.close()
        return self.history

    # ---- checkpoints (the layout of pretraining's: train/checkpoint.py) ------------------------
    def state_dict(self) -> dict:
        # rollout.async has drawn the next step's prompts already: a resumed run samples them again
        position, epoch = self.pending[3] if self.pending is not None else (self.position, self.epoch)
        return {
            "step": self.step_count,
            "position": position,
            "epoch": epoch,
            "tokens": self.tokens,
            "flops": self.flops,
            "elapsed": self.elapsed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.position, self.epoch = state["step"], state["position"], state["epoch"]
        self.pending = None
        # a checkpoint of an older nanoseek counted none of these: they count from here
        self.tokens, self.flops = state.get("tokens", 0), state.get("flops", 0.0)
        self.elapsed = state.get("elapsed", 0.0)

    def _tensors(self) -> tuple[dict, dict]:
        """Full CPU tensors of the policy, its AdamW moments and the reference model (collective on
        several ranks, complete on rank 0)."""
        model_sd, optim_sd = distributed.full_state(self.model, self.optimizer, self.ctx)
        if self.ref_model is not None:
            model_sd.update({f"ref.{k}": v.detach().clone() for k, v in self.ref_model.state_dict().items()})
        return model_sd, optim_sd

    def _configs(self) -> tuple[dict, dict]:
        """The run's config and the model's, as a checkpoint records and compares them."""
        return self.config.to_dict(), ckpt.jsonable(self.model.config.__dict__)

    def save(self, out: str | Path, keep: int = 2) -> Path:
        """Policy, reference model, AdamW moments, prompt position and RNG states, atomically. On
        several ranks every rank calls it (the shards are gathered) and rank 0 writes."""
        model_sd, optim_sd = self._tensors()
        if not self.ctx.is_main:
            self.ctx.barrier()
            return Path(out) / "checkpoints" / f"step-{self.step_count:08d}"
        config, model_config = self._configs()
        state = {
            "stage": "grpo",
            "config": config,
            "model_config": model_config,
            "trainer": self.state_dict(),
            "rng": ckpt.rng_state(),
        }
        path = ckpt.save_checkpoint(out, self.step_count, model_sd, optim_sd, state, keep=keep)
        self.ctx.barrier()
        return path

    def full_model(self):
        """The policy with full weights: the model itself in one process; on several ranks rank 0's
        sampler refreshed from the shards (collective; None on the other ranks)."""
        if not self.ctx.distributed:
            return self.model
        full, _ = distributed.full_state(self.model, None, self.ctx)
        if self.ctx.is_main:
            self.sampler.load_state_dict(full)
        return self.sampler

    def restore(self, path: str | Path) -> None:
        """Resume from a checkpoint written by `save`; checks everything before changing anything."""
        c = ckpt.read_checkpoint(path)
        if c.state.get("stage") != "grpo":
            raise NanoseekError(f"{path}: checkpoint of a {c.state.get('stage')} run, not grpo")
        shapes = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        if self.ref_model is not None:
            shapes.update({f"ref.{k}": shape for k, shape in shapes.items()})
        ckpt.check_compatible(
            c, *self._configs(), RESUMABLE_KEYS, shapes, defaults=ckpt.config_defaults(type(self.config))
        )
        saved_async = c.state.get("config", {}).get("rollout", {}).get("async", False)
        if saved_async != self.config.rollout.async_:
            raise NanoseekError(
                f"{path}: checkpoint was written with a different config: rollout.async {saved_async!r} "
                f"(checkpoint) vs {self.config.rollout.async_!r} (now)"
            )
        distributed.load_full_state(
            self.model, self.optimizer, {k: v for k, v in c.model.items() if not k.startswith("ref.")}, c.optimizer
        )
        if self.ref_model is not None:
            self.ref_model.load_state_dict({k[4:]: v for k, v in c.model.items() if k.startswith("ref.")})
        self.load_state_dict(c.state["trainer"])
        ckpt.set_rng_state(c.state["rng"])


# ---------------------------------------------------------------------------------------
# `nanoseek grpo --config FILE.yaml`: a model directory, a task, a template and rewards.
# ---------------------------------------------------------------------------------------
# Keys that may change when a run is resumed: how long it runs and how often it logs and saves.
# Where the rollouts run (rollout.workers, backend, ...) does not change them; rollout.async does (restore checks it).
RESUMABLE_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "tensorboard", "progress", "device", "rollout")


class GRPORunConfig(GRPOConfig):
    init_from: str = ""  # the starting model: a Hugging Face format directory (with its tokenizer)
    tokenizer: str | None = None  # default: init_from's
    task: str = "arith"  # nanoseek.tasks: arith, countdown, gsm8k, math
    task_options: dict = {}  # the task's constructor options
    prompts: int = Field(2000, ge=1)  # problems drawn from the task's train split
    template: str = R1_ZERO_TEMPLATE  # with a {prompt} field for the problem
    rewards: dict[str, float] = {"accuracy": 1.0, "format": 0.1}  # weights, by name (nanoseek.rewards)
    overlong_buffer: int = Field(0, ge=0)  # DAPO's soft overlong penalty starts this many tokens before the limit
    steps: int = Field(60, ge=1)
    checkpoint_every: int = Field(20, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    progress: bool = True
    device: str = "auto"  # auto (CUDA when torch sees a GPU), cpu, cuda: rollouts and updates both run there
    dtype: Literal[tuple(DTYPES)] = "float32"  # the policy's weights; float16 on a GPU only

    @field_validator("template")
    @classmethod
    def _has_prompt_field(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("needs a {prompt} field for the problem")
        return template

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, rewards: dict) -> dict:
        from nanoseek.rewards import REWARD_NAMES

        unknown = set(rewards) - set(REWARD_NAMES)
        if unknown:
            raise ValueError(f"unknown {', '.join(sorted(unknown))} (expected {', '.join(REWARD_NAMES)})")
        negative = {k: w for k, w in rewards.items() if w < 0}
        if negative:  # a reward's sign is its own (overlong is a penalty already): a weight only scales it
            name, w = next(iter(negative.items()))
            raise ValueError(f"the weight of {name} must be at least 0, got {w:g}")
        return rewards

    def check(self) -> None:
        super().check()
        resolve_dtype(self.dtype, resolve_device(self.device, "config key 'device'"), "config key 'dtype'")

        if not self.init_from:
            raise ConfigKeyError("init_from", "the model directory to start from is required")
        if not Path(self.init_from).is_dir():
            raise ConfigKeyError("init_from", f"{self.init_from} is not a directory")
        if self.rewards.get("overlong") and self.overlong_buffer < 1:
            raise ConfigKeyError("overlong_buffer", "the overlong reward needs a buffer of at least 1")


def task_prompts(task, problems, template: str) -> list[dict]:
    """Rows for GRPOTrainer: the filled template, and the problem as a column for the rewards."""
    return [{"prompt": template.format(prompt=p.prompt), "problem": p} for p in problems]


def task_rewards(
    task,
    weights: dict,
    tokenizer,
    max_tokens: int,
    overlong_buffer: int = 0,
    think_opened: bool = False,
    answer_tags: bool = True,
):
    """(reward_fn, metrics_fn) from the config's reward weights, over the `problem` column. The
    accuracy term is the task's own reward, the one the evaluation scores with; `think_opened`:
    the template ends inside <think> (the format reward then expects no <think> of the output's);
    `answer_tags`: the template asks for <answer> tags (R1-Zero's), else any answer after
    </think> is well formed (the chat format). The metrics are accuracy and format, and language
    and readability when they are weighted, the share of samples that reflect (`eval.reflects`), the
    accuracy of those that do and of those that do not, and all four by difficulty ("difficulty/3/...")
    when the step's problems differ in it."""
    from nanoseek.data.reasoning import parse_reasoning
    from nanoseek.eval import reflects
    from nanoseek.rewards import combined_reward

    def scores(completions, problem):
        return [
            combined_reward(
                c,
                p,
                weights,
                num_tokens=len(tokenizer.encode(c)) if weights.get("overlong") else None,
                max_tokens=max_tokens,
                overlong_buffer=overlong_buffer,
                think_opened=think_opened,
                answer_tags=answer_tags,
                accuracy=task.reward,
            )
            for c, p in zip(completions, problem)
        ]

    def reward_fn(prompts, completions, problem, **_):
        return [s["total"] for s in scores(completions, problem)]

    def metrics_fn(prompts, completions, problem, **_):
        s = scores(completions, problem)
        names = ["accuracy", "format"] + [name for name in ("language", "readability") if weights.get(name)]
        out = {name: [x[name] for x in s] for name in names}
        # R1-Zero's aha moment, watched, never rewarded: the share of samples that re-check themselves
        # and the accuracy of those that do and of those that do not (None: not in that subset)
        reflecting = [reflects(parse_reasoning(c, think_opened)[0]) for c in completions]
        out["reflection"] = [float(r) for r in reflecting]
        out["reflection_accuracy"] = [a if r else None for a, r in zip(out["accuracy"], reflecting)]
        out["no_reflection_accuracy"] = [None if r else a for a, r in zip(out["accuracy"], reflecting)]
        levels = sorted({p.difficulty for p in problem})
        for d in levels if len(levels) > 1 else ():  # "difficulty/3/reflection": the same, by difficulty
            mine = [p.difficulty == d for p in problem]
            for key in ("accuracy", "reflection", "reflection_accuracy", "no_reflection_accuracy"):
                out[f"difficulty/{d:g}/{key}"] = [v if m else None for v, m in zip(out[key], mine)]
        return out

    return reward_fn, metrics_fn


def run(cfg: GRPORunConfig, out: str | Path, resume: str | None = None) -> dict:
    """GRPO from cfg.init_from into OUT: checkpoints, metrics.jsonl, TensorBoard, plots and hf/.
    A run resumes from OUT's newest checkpoint (or `resume`) exactly where it stopped."""
    ctx = distributed.setup(cfg.device)  # several learner ranks under torchrun
    try:
        summary = _run(cfg, Path(out), resume, ctx)
        ctx.barrier()  # every rank done with its collectives before the process group goes
        return summary
    finally:
        distributed.teardown(ctx)


def _run(cfg: GRPORunConfig, out: Path, resume: str | None, ctx: distributed.Context) -> dict:
    from nanoseek import tasks
    from nanoseek.data.reasoning import prompt_opens_reasoning
    from nanoseek.io.hf import save_pretrained
    from nanoseek.train.metrics import Metrics, plot_grpo

    task = tasks.get(cfg.task, **cfg.task_options)  # cfg was checked when it was built
    device = ctx.device if ctx.distributed else resolve_device(cfg.device, "config key 'device'")
    dtype = resolve_dtype(cfg.dtype, device, "config key 'dtype'")
    model, tokenizer = _load(cfg.init_from, cfg.tokenizer, device, dtype)
    reward_fn, metrics_fn = task_rewards(
        task,
        cfg.rewards,
        tokenizer,
        cfg.max_new_tokens,
        cfg.overlong_buffer,
        think_opened=prompt_opens_reasoning(cfg.template),
        answer_tags="</answer>" in cfg.template,
    )
    # drawn with repeats, so that every difficulty keeps its share of the prompts (Task.sample)
    rows = task_prompts(task, task.sample(cfg.prompts, "train", cfg.seed, distinct=False), cfg.template)
    trainer = GRPOTrainer(model, tokenizer, reward_fn, rows, cfg, metrics_fn=metrics_fn, ctx=ctx)
    start = ckpt.find_resume(out, resume)
    if start is not None:  # check everything before writing anything
        try:
            trainer.restore(start)
        except BaseException:
            trainer.close()
            raise
    metrics = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(out)
        save_config(cfg, out / "config.yaml")
        verb = f"resuming {start} at step {trainer.step_count}" if start else "starting"
        ranks = f", learner on {ctx.world_size} ranks (FSDP2)" if ctx.distributed else ""
        print(
            f"grpo: {verb}; {cfg.prompts_per_step} prompts x {cfg.group_size} completions a step, "
            f"{cfg.loss_type} loss, beta {cfg.beta}, task {cfg.task}, {device.type} {cfg.dtype}{ranks}",
            file=sys.stderr,
        )
        metrics = Metrics(out, trainer.step_count, cfg.tensorboard)
    ctx.barrier()

    def after_step(m: dict) -> None:
        if metrics is not None:
            metrics.log(m)
        if trainer.step_count % cfg.checkpoint_every == 0 or trainer.step_count == cfg.steps:
            trainer.save(out, cfg.keep_checkpoints)

    with storage.disk_errors(out):  # metrics, plots, summary: checkpoints and the model say more themselves
        try:
            progress = cfg.progress and ctx.is_main
            trainer.train(max(cfg.steps - trainer.step_count, 0), callback=after_step, progress=progress)
        finally:
            if metrics is not None:
                metrics.close()
            trainer.close()
        final = trainer.full_model()
        if not ctx.is_main:
            return {}
        storage.check_finite(final.state_dict(), out / "hf")
        hf = out / "hf"
        with storage.replacing_directory(hf) as tmp:  # a failed write leaves the previous export
            save_pretrained(final, tmp)
            # The policy now answers in the template's format: the saved tokenizer names it (chat,
            # serve and generate then prompt it that way); another template keeps the tokenizer's.
            tokenizer.save_pretrained(tmp, prompt_format=template_format(cfg.template))
        plots = plot_grpo(out / "metrics.jsonl", out)
        summary = {
            "stage": "grpo",
            "steps": trainer.step_count,
            "tokens": trainer.tokens,
            "flops": trainer.flops,
            "seconds": round(trainer.elapsed, 2),
            "hf": str(hf),
            "plots": [str(p) for p in plots],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"grpo: {trainer.step_count} steps; model in {hf}", file=sys.stderr)
    return summary
