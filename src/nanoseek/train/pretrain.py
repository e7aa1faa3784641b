"""Pretraining with the DeepSeek-V3 recipe; SFT runs the same loop (train/sft.py).

One optimizer step:
1. the batch (this rank's rows of the global batch) in micro-batches, forward and backward;
   the loss is L_main + lambda / D * sum_k L_MTP_k + alpha * L_balance (V3 sections 2.1.2,
   2.2), with token-level means over the whole global batch;
2. gradient clipping; the loss-spike guard: a non-finite loss or gradient, or a loss far above
   its running mean, skips the step; repeated spikes roll back to the last checkpoint. Non-finite
   values that outlast a rollback, or that come with no checkpoint to go back to, stop the run
   with an error naming the step: nothing non-finite is written as a checkpoint or a model;
3. AdamW (beta 0.9 / 0.95, weight decay 0.1) at the schedule's lr;
4. auxiliary-loss-free balancing: every routing bias, the MTP modules' too, moves by gamma
   against its expert's load in this step (V3 section 2.1.2);
5. every `log_every` steps a metrics record, every `checkpoint_every` a checkpoint.

A dense student (nanoseek.dense: `model: {preset: student}`, or init_from a Qwen2/Llama
directory) runs the same loop in one process: it has no MTP module, no MoE layers to balance
and no FP8 linears, so its loss is L_main alone.

SFT with `distill_kl` > 0 adds distill_kl * L_KL, logit distillation on the teacher's traces
(top_k_kl_sum), averaged over the positions that have teacher targets as L_main is over its
tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek import cost, storage
from nanoseek.config import ModelConfig
from nanoseek.data.stream import IGNORE_INDEX
from nanoseek.dense import DenseConfig, DenseTransformer, count_dense_parameters
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer, document_mask
from nanoseek.train import checkpoint as ckpt
from nanoseek.train import distributed
from nanoseek.train.config import RESUMABLE_KEYS, TrainConfig, save_config
from nanoseek.train.metrics import Metrics, plot_metrics, read_metrics
from nanoseek.train.schedule import lr_for


class Objective(nn.Module):
    """The model and its training losses as token sums: main next-token cross-entropy, one per
    MTP depth (depth k at position i predicts token i+k+1: targets y[:, k:]), and the
    sequence-wise balance loss. The trainer calls this module, so FSDP's root is here.
    Given the teacher's (top_ids, top_logprobs) at each target (SFT with distill_kl), a fourth
    sum follows: top_k_kl_sum of the main logits."""

    def __init__(self, model: Transformer, mtp: bool = True, document_mask: bool = False):
        super().__init__()
        self.model = model
        self.mtp = mtp and len(model.mtp) > 0
        self.document_mask = document_mask

    def forward(self, x: torch.Tensor, y: torch.Tensor, top_ids=None, top_logprobs=None):
        mask = document_mask(x, self.model.config.bos_token_id) if self.document_mask else None
        hidden = self.model.hidden_states(x, mask=mask)
        logits = self.model.lm_head(hidden)
        main = cross_entropy_sum(logits, y)
        kl = [] if top_ids is None else [top_k_kl_sum(logits, top_ids, top_logprobs)]
        del logits  # not held while the MTP modules run
        mtp = []
        if self.mtp:
            for k, logits in enumerate(self.model.mtp_logits(hidden, x, mask), start=1):
                mtp.append(cross_entropy_sum(logits, y[:, k:]))
        return main, mtp, self.model.balance_loss().to(main.device), *kl


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def teacher_positions(top_logprobs: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: the positions where the teacher gave top-k pairs (a finite log-prob)."""
    return torch.isfinite(top_logprobs).any(-1)


def top_k_kl_sum(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
    """Logit distillation: the forward KL(teacher || student) restricted to the teacher's top-k
    ids, summed over the positions that have them. At such a position, with p the teacher's
    top-k log-probs renormalised over those k ids (a softmax of them) and log q the student's
    log-softmax over the whole vocabulary, read at the same ids, the term is
    sum_j p_j (log p_j - log q_j). This is the forward KL that logit distillation minimises (TRL's
    GKD at beta 0, DistillKit), taken on the teacher's top-k support as when only its top-k
    logits are kept: an engine returns no more than that. Since q is normalised over the whole
    vocabulary, raising it on the teacher's tokens lowers it elsewhere, and the term is >= 0
    (0 only where the student's q equals p on those ids). Slots with log-prob -inf (fewer than k
    pairs at a position) have p = 0 and add nothing."""
    at = teacher_positions(top_logprobs)
    log_q = F.log_softmax(logits[at].float(), dim=-1).gather(-1, top_ids[at])
    p = F.softmax(top_logprobs[at].float(), dim=-1)
    return (torch.xlogy(p, p) - p * log_q).sum()


class SpikeGuard:
    """Flags a loss that is not finite or above `factor` x its running mean (an EMA of the
    accepted losses, trusted after `warmup` of them). `rollback_after` flags in a row ask for
    a rollback. Its state goes into checkpoints, so a resumed run decides as the original."""

    def __init__(self, factor: float = 2.0, warmup: int = 10, rollback_after: int = 3, decay: float = 0.9):
        self.factor, self.warmup, self.rollback_after, self.decay = factor, warmup, rollback_after, decay
        self.mean: float | None = None
        self.seen = 0
        self.in_a_row = 0

    def check(self, loss: float) -> str:
        """'ok' (the loss is folded into the mean), 'skip', or 'rollback'."""
        spike = not math.isfinite(loss) or (
            self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean
        )
        if not spike:
            self.in_a_row = 0
            self.seen += 1
            self.mean = loss if self.mean is None else self.decay * self.mean + (1 - self.decay) * loss
            return "ok"
        self.in_a_row += 1
        if self.in_a_row >= self.rollback_after:
            self.in_a_row = 0
            return "rollback"
        return "skip"

    def state_dict(self) -> dict:
        return {"mean": self.mean, "seen": self.seen, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.seen, self.in_a_row = state["mean"], state["seen"], state["in_a_row"]


# ---------------------------------------------------------------------------------------
# Building a run: model, data, optimizer, resume.
# ---------------------------------------------------------------------------------------
def load_tokenizer(cfg: TrainConfig):
    from nanoseek.data.tokenizer import Tokenizer

    source = cfg.data.tokenizer
    if source is None and cfg.init_from and (Path(cfg.init_from) / "tokenizer.json").is_file():
        source = cfg.init_from
    if source is None:
        raise NanoseekError(
            "config key 'data.tokenizer': training needs a tokenizer directory "
            "(train one with `nanoseek tokenizer train`)"
        )
    return Tokenizer.from_pretrained(source)


def build_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig | DenseConfig:
    if cfg.init_from:  # what load_pretrained builds: without MTP if the checkpoint has none
        from nanoseek.io.hf import checkpoint_config

        if cfg.dense_student():
            return DenseConfig.from_hf(Path(cfg.init_from) / "config.json")
        return checkpoint_config(cfg.init_from)
    mc = cfg.to_model_config()
    changes = {}
    if "vocab_size" not in cfg.model:
        changes["vocab_size"] = len(tokenizer)
    elif cfg.model["vocab_size"] < len(tokenizer):
        raise NanoseekError(
            f"config key 'model.vocab_size': {cfg.model['vocab_size']} is smaller than the "
            f"tokenizer's {len(tokenizer)} tokens"
        )
    for name in ("bos", "eos", "pad"):
        if f"{name}_token_id" not in cfg.model:
            changes[f"{name}_token_id"] = getattr(tokenizer, f"{name}_id")
    return mc.replace(**changes)


def architecture(mc: ModelConfig | DenseConfig) -> type[Transformer] | type[DenseTransformer]:
    """The model class a config builds: DeepSeek's Transformer, or a dense student."""
    return DenseTransformer if isinstance(mc, DenseConfig) else Transformer


def build_model(cfg: TrainConfig, mc: ModelConfig | DenseConfig, device: torch.device) -> Transformer:
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        from nanoseek.io.hf import load_pretrained

        # a dense directory is opened by its own loader (config=None dispatches on config.json)
        model = load_pretrained(cfg.init_from, config=None if isinstance(mc, DenseConfig) else mc)
    else:
        model = architecture(mc)(mc)
    if cfg.precision == "fp8":  # V3 section 3.3: attention and expert linears in FP8, master weights FP32
        from nanoseek.fp8 import fp8_swap

        fp8_swap(model)
    return model.to(device).train()


def build_optimizer(model: nn.Module, cfg: TrainConfig, ctx: distributed.Context) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms or biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, ctx, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def adamw(params, ctx: distributed.Context | None = None, **options) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel in one process (one pass over all the tensors: about
    5x the default loop's speed on a MoE's many small expert weights on a CPU, and what the
    transformers Trainer picks by default); under torchrun the default (foreach) loop over FSDP's
    DTensors, or the per-tensor loop where expert-parallel plain tensors sit beside them.
    The fused kernel does not bump the parameters' version counters, which the engine's folded
    decode runner watches to refold: GRPO, whose engine reads the policy in place, keeps the
    default loop."""
    if ctx is None or not ctx.distributed:
        return torch.optim.AdamW(params, fused=True, **options)
    return torch.optim.AdamW(params, foreach=False if ctx.expert_parallel else None, **options)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise NanoseekError("config key 'precision': this GPU has no bf16 support; use fp32")
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------
def train(cfg: TrainConfig, out: str | Path, stage: str = "pretrain", resume: str | None = None) -> dict:
    """Run (or resume) a training run into OUT; returns a summary. Usable under torchrun."""
    ctx = distributed.setup(cfg.device)
    ctx.expert_parallel = cfg.expert_parallel and ctx.distributed
    try:
        with storage.disk_errors(out):  # metrics, plots, summary: checkpoints and the model say more themselves
            summary = Run(cfg, Path(out), stage, ctx).go(resume)
        ctx.barrier()  # every rank done with its collectives before the process group goes
        return summary
    finally:
        distributed.teardown(ctx)


class Run:
    """One training run into OUT: what pretraining and SFT share, on one rank or many."""

    def __init__(self, cfg: TrainConfig, out: Path, stage: str, ctx: distributed.Context):
        self.cfg, self.out, self.stage, self.ctx = cfg, out, stage, ctx
        if cfg.distill_kl > 0 and stage != "sft":
            raise NanoseekError(
                f"config key 'distill_kl': logit distillation is for SFT on teacher traces, not {stage} "
                "(set it to 0, or run `nanoseek sft`)"
            )
        world = ctx.world_size
        if cfg.batch_size % world:
            raise NanoseekError(f"config key 'batch_size': {cfg.batch_size} is not divisible by the {world} ranks")
        self.rows = cfg.batch_size // world  # rows per rank per step
        self.micro = cfg.micro_batch_size or self.rows
        if self.rows % self.micro:
            raise NanoseekError(
                f"config key 'micro_batch_size': {self.micro} does not divide the {self.rows} "
                f"sequences per rank per step (batch_size {cfg.batch_size} / {world} ranks)"
            )
        self.tokenizer = load_tokenizer(cfg)
        self.model_config = build_model_config(cfg, self.tokenizer)
        if isinstance(self.model_config, DenseConfig) and ctx.distributed:
            raise NanoseekError(
                f"a dense student trains in one process, not on {world} ranks (run it without torchrun)"
            )
        self.model = build_model(cfg, self.model_config, ctx.device)
        self.objective = Objective(self.model, mtp=cfg.mtp_lambda > 0, document_mask=cfg.document_mask)
        if ctx.distributed:
            self.expert_params = distributed.parallelize(self.objective, self.model, ctx)
        else:  # the same expert loop as on many ranks: every expert gets a gradient every step
            distributed.distribute_experts(self.model, 0, 1)
            self.expert_params = set()
        self.params = [p for p in self.model.parameters()]
        self.optimizer = build_optimizer(self.model, cfg, ctx)
        self.guard = SpikeGuard(cfg.spike_factor, cfg.spike_warmup, cfg.rollback_after)
        self.data = self.make_data()
        self.step = 0
        self.tokens = 0
        self.flops = 0.0  # nanoseek.cost's count: tokens x flops_per_token at each step's row length
        self.elapsed = 0.0
        self.streak = 0  # steps with non-finite values in a row
        # The checkpoint that non-finite values last rolled back to, until a newer one is written:
        # going back to it a second time would repeat the same steps for ever (the data never ends).
        self.rolled_back_to: int | None = None

    def make_data(self):
        cfg = self.cfg
        if not cfg.data.files:
            raise NanoseekError("config key 'data.files': no training files given")
        if self.stage == "sft":
            from nanoseek.train.sft import ChatBatches

            return ChatBatches(cfg, self.tokenizer, self.ctx)
        from nanoseek.data.stream import PackedStream

        # Every rank reads the whole global batch and keeps its rows (see next_batch), so the data
        # position is the same on all ranks and a checkpoint resumes on any number of them.
        return PackedStream(
            cfg.data.files,
            self.tokenizer,
            cfg.seq_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            text_field=cfg.data.text_field,
            shuffle=cfg.data.shuffle,
        )

    def next_batch(self) -> tuple:
        """This rank's rows of the next global batch: rows rank, rank + world_size, ...: (x, y),
        and with distill_kl the teacher's (top_ids, top_logprobs) (train_step's arguments)."""
        try:
            batch = next(self.data)
        except StopIteration:
            raise NanoseekError(f"config key 'data.files': the data ran out at step {self.step}") from None
        if self.stage == "sft":  # ChatBatches already picks this rank's conversations
            return batch
        x, y = batch
        return x[self.ctx.rank :: self.ctx.world_size], y[self.ctx.rank :: self.ctx.world_size]

    # ---- checkpoints -----------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model_config": ckpt.jsonable(self.model_config.__dict__),
            "stage": self.stage,
            "data": self.data.state_dict(),
            "guard": self.guard.state_dict(),
            "rng": ckpt.rng_state(),
            "tokens": self.tokens,
            "flops": self.flops,
            "elapsed": self.elapsed,
            "world_size": self.ctx.world_size,
        }

    def weights_finite(self) -> bool:
        """Whether every rank's weights and buffers are finite (the same answer on all ranks)."""
        bad = storage.nonfinite_names(self.model.state_dict())
        return not self.ctx.all_reduce(torch.tensor([float(len(bad))], device=self.ctx.device)).item()

    def save(self) -> None:
        if self.ctx.distributed:  # each rank writes its own shards: nothing is gathered
            ckpt.save_sharded_checkpoint(
                self.out,
                self.step,
                distributed.sharded_state(self.model, self.optimizer),
                self.trainer_state(),
                self.ctx,
                keep=self.cfg.keep_checkpoints,
            )
        else:
            model_sd, optim_sd = distributed.full_state(self.model, self.optimizer, self.ctx)
            ckpt.save_checkpoint(
                self.out, self.step, model_sd, optim_sd, self.trainer_state(), keep=self.cfg.keep_checkpoints
            )
        self.rolled_back_to = None  # the run got past that checkpoint: a new one to go back to

    def verify(self, path: Path) -> ckpt.Checkpoint:
        c = ckpt.read_checkpoint(path)
        shapes = {name: tuple(t.shape) for name, t in _full_shapes(self.model_config).items()}
        ckpt.check_compatible(
            c,
            self.cfg.to_dict(),
            ckpt.jsonable(self.model_config.__dict__),
            RESUMABLE_KEYS,
            shapes,
            defaults=ckpt.config_defaults(type(self.cfg)),
        )
        if c.state.get("stage") != self.stage:
            raise NanoseekError(f"{path}: checkpoint of a {c.state.get('stage')} run, not {self.stage}")
        return c

    def restore(self, c: ckpt.Checkpoint, data: bool = True) -> None:
        distributed.load_checkpoint(self.model, self.optimizer, c)
        self.guard.load_state_dict(c.state["guard"])
        ckpt.set_rng_state(c.state["rng"])
        if data:
            self.data.load_state_dict(c.state["data"])
        self.step, self.tokens, self.elapsed = c.step, c.state["tokens"], c.state["elapsed"]
        # a checkpoint of an older nanoseek has no flops: its tokens at the configured length
        self.flops = c.state.get("flops", self.tokens * self.flops_per_token(self.cfg.seq_len))

    # ---- one step ----------------------------------------------------------------------
    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of rows of `seq_len` tokens (nanoseek.cost), MTP counted when its loss runs."""
        return cost.flops_per_token(self.model_config, seq_len, mtp=self.objective.mtp)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher: tuple | None = None) -> dict:
        """Forward and backward over this rank's rows; returns the global losses and loads.
        `teacher`: (top_ids, top_logprobs) at each target, for SFT's distill_kl term."""
        cfg, ctx, dev = self.cfg, self.ctx, self.ctx.device
        x, y = x.to(dev), y.to(dev)
        depth = len(self.model.mtp) if self.objective.mtp else 0
        # Global token counts, so that every token of the global batch weighs the same.
        counted = [(y[:, k:] != IGNORE_INDEX).sum().item() for k in range(depth + 1)]
        splits = [x.split(self.micro), y.split(self.micro)]
        if teacher is not None:  # and the positions with teacher targets, for the KL's mean
            teacher = [t.to(dev) for t in teacher]
            counted.append(teacher_positions(teacher[1]).sum().item())
            splits += [t.split(self.micro) for t in teacher]
        counts = torch.tensor(counted, dtype=torch.float64, device=dev)
        counts = ctx.all_reduce(counts).clamp(min=1)
        sums = torch.zeros(len(counted) + 1, dtype=torch.float64, device=dev)  # main, MTP depths, [KL,] balance
        loads = None
        for xm, ym, *tm in zip(*splits):
            with autocast(cfg, dev):
                main, mtp, balance, *kl = self.objective(xm, ym, *tm)
            # FSDP averages gradients over ranks: scale by world_size to get the global sums' gradient.
            loss = main / counts[0]
            for k, m in enumerate(mtp, start=1):
                loss = loss + cfg.mtp_lambda / depth * m / counts[k]
            for d in kl:
                loss = loss + cfg.distill_kl * d / counts[-1]
            loss = loss + cfg.balance_alpha * balance * xm.shape[0] / self.rows / ctx.world_size
            (loss.float() * ctx.world_size).backward()
            sums += torch.stack(
                [main.detach(), *[m.detach() for m in mtp], *[d.detach() for d in kl], balance.detach() * xm.shape[0]]
            ).double()
            step_counts = (
                torch.stack([c.float() for c in self.model.expert_counts()])
                if self.model.moe_layers()
                else torch.zeros(0)
            )
            loads = step_counts if loads is None else loads + step_counts
        for p in self.expert_params:  # expert-parallel grads hold every rank's tokens: make them a mean
            if p.grad is not None:
                p.grad.div_(ctx.world_size)
        sums = ctx.all_reduce(sums)
        if loads is not None and loads.numel():
            loads = ctx.all_reduce(loads.to(dev))
        result = {
            "loss": (sums[0] / counts[0]).item(),
            "loss_mtp": [(sums[k] / counts[k]).item() for k in range(1, depth + 1)],
            "balance": (sums[-1] / cfg.batch_size).item(),
            "loads": loads,
            "tokens": int(x.numel()) * ctx.world_size,
            "seq_len": x.shape[1],
        }
        if teacher is not None:
            result["kl"] = (sums[-2] / counts[-1]).item()
        return result

    def go(self, resume: str | None) -> dict:
        cfg, ctx, out = self.cfg, self.ctx, self.out
        start = ckpt.find_resume(out, resume)
        if start is not None:  # check everything before writing anything
            self.restore(self.verify(start))
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(out)
            save_config(cfg, out / "config.yaml")
        metrics = Metrics(out, self.step, cfg.tensorboard) if ctx.is_main else None
        if ctx.is_main:
            verb = f"resuming {start} at step {self.step}" if start else "starting"
            print(
                f"{self.stage}: {verb}; {_describe(self.model_config)}; {cfg.batch_size} x {cfg.seq_len} tokens "
                f"a step on {ctx.world_size} rank(s) ({ctx.device.type}, {cfg.precision})",
                file=sys.stderr,
            )
        bar = Progress(cfg, self.step, enabled=ctx.is_main and cfg.progress)
        first_loss = None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                lr = lr_for(cfg, self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = self.next_batch()
                self.optimizer.zero_grad(set_to_none=False)
                result = self.train_step(*batch)
                # Clipped on every step, so that a non-finite gradient counts as a non-finite loss.
                grad_norm = distributed.clip_grad_norm(self.params, cfg.grad_clip, ctx)
                nonfinite = _nonfinite(result["loss"], grad_norm)
                verdict = self.guard.check(math.nan if nonfinite else result["loss"])
                if verdict == "ok":
                    self.optimizer.step()
                    if result["loads"] is not None and cfg.bias_gamma > 0:
                        self.model.update_routing_bias(list(result["loads"]), cfg.bias_gamma)
                self.step += 1
                self.tokens += result["tokens"]
                self.flops += result["tokens"] * self.flops_per_token(result["seq_len"])
                dt = time.perf_counter() - t0
                self.elapsed += dt
                if nonfinite is None:
                    self.streak = 0
                if verdict != "ok" and self.step == cfg.steps and not self.weights_finite():
                    # the run ends on a skipped step, and these weights (spoilt since the last check) would be written
                    verdict, nonfinite = "rollback", "the weights hold NaN or inf"
                if verdict != "ok":
                    self.on_spike(verdict, result["loss"], metrics, nonfinite)
                    bar.update(self.step, result["loss"], result["tokens"] / dt)
                    continue
                first_loss = result["loss"] if first_loss is None else first_loss
                if self.step % cfg.log_every == 0 or self.step in (1, cfg.steps):
                    record = {
                        "step": self.step,
                        "loss": result["loss"],
                        "loss_mtp": result["loss_mtp"],
                        "balance_loss": result["balance"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": self.tokens,
                        "flops": self.flops,
                        "tokens_per_s": result["tokens"] / dt,
                        "elapsed_s": self.elapsed,
                    }
                    if "kl" in result:
                        record["kl"] = result["kl"]
                    if result["loads"] is not None and result["loads"].numel():
                        loads = result["loads"]
                        # max / mean tokens per expert; None for a layer that did not run (MTP without its loss)
                        record["expert_load"] = [
                            m / n if n > 0 else None
                            for m, n in zip(loads.max(1).values.tolist(), loads.mean(1).tolist())
                        ]
                    if metrics:
                        metrics.log(record)
                    bar.log(record)
                bar.update(self.step, result["loss"], result["tokens"] / dt)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    if not self.weights_finite():  # finite loss and gradient, but the update overflowed
                        self.on_spike("rollback", result["loss"], metrics, "the weights hold NaN or inf")
                        continue
                    self.save()
        finally:
            bar.close()
            if metrics:
                metrics.close()
        if not ckpt.list_checkpoints(out) or ckpt.list_checkpoints(out)[-1].name != f"step-{self.step:08d}":
            self.save()
        return self.finish(first_loss)

    def on_spike(self, verdict: str, loss: float, metrics: Metrics | None, nonfinite: str | None = None) -> None:
        """Skip the step, or go back to the last checkpoint; the data reader goes on forward,
        so the batches that spiked are not seen again. `nonfinite` (what was not finite) stops
        the run where a rollback is due but cannot help: there is no checkpoint, or the values
        came back after a rollback to the newest one."""
        self.optimizer.zero_grad(set_to_none=False)
        event = {
            "step": self.step,
            "event": "spike_skipped",
            "spike_loss": loss if math.isfinite(loss) else None,
            "running_mean": self.guard.mean,
        }
        if nonfinite:
            self.streak += 1
            event["nonfinite"] = nonfinite
        if verdict == "rollback":
            found = ckpt.list_checkpoints(self.out)
            if nonfinite and (not found or self.rolled_back_to is not None):
                self.stop_nonfinite(nonfinite, metrics, event)
            if found:
                data_state = self.data.state_dict()
                c = self.verify(found[-1])
                self.restore(c, data=False)
                self.data.load_state_dict(data_state)
                event.update(event="rollback", to_step=c.step)
                if nonfinite:
                    self.rolled_back_to = c.step
            else:
                event["event"] = "spike_skipped_no_checkpoint"
        if metrics:
            metrics.log(event)
        if self.ctx.is_main:
            what = nonfinite or f"loss spike ({loss:.4g} vs running mean {self.guard.mean})"
            print(f"step {event['step']}: {what}: {event['event']}", file=sys.stderr)

    def stop_nonfinite(self, nonfinite: str, metrics: Metrics | None, event: dict) -> None:
        """End the run: non-finite values that skipping and rolling back did not cure."""
        n, back = self.streak, self.rolled_back_to
        if metrics:
            metrics.log({**event, "event": "stopped_nonfinite"})
        if back is None:
            first = min(self.cfg.checkpoint_every, self.cfg.steps)  # a short run writes its one at the end
            where = f"no checkpoint to roll back to (the first is written at step {first})"
        else:
            where = (
                f"also after rolling back to step {back}; {ckpt.checkpoints_dir(self.out) / f'step-{back:08d}'} "
                "is intact"
            )
        in_a_row = f" ({n} steps in a row)" if n > 1 else ""
        raise NanoseekError(
            f"step {event['step']}: {nonfinite}{in_a_row}; {where}; the run stops here "
            "(lower the learning rate, or look for bad data at this step)"
        )

    def finish(self, first_loss: float | None) -> dict:
        """Write the model in Hugging Face format (with the tokenizer) and the plots."""
        from nanoseek.io.hf import save_pretrained

        model_sd, _ = distributed.full_state(self.model, None, self.ctx)
        summary = {}
        if self.ctx.is_main:
            storage.check_finite(model_sd, self.out / "hf")
            model = self.model
            if self.ctx.distributed:
                with torch.device("meta"):
                    model = Transformer(self.model_config)
                model.load_state_dict(model_sd, assign=True)
                model.rope.inv_freq = torch.empty(0)
                model.rope.reset_parameters()
            hf = self.out / "hf"
            with storage.replacing_directory(hf) as tmp:  # a failed write leaves the previous export
                save_pretrained(model, tmp)
                self.tokenizer.save_pretrained(tmp)
            plots = plot_metrics(
                self.out / "metrics.jsonl", self.out, moe_names=[name for name, _ in self.model.named_moe_layers()]
            )
            records = [r for r in read_metrics(self.out / "metrics.jsonl") if "event" not in r]
            summary = {
                "stage": self.stage,
                "steps": self.step,
                "tokens": self.tokens,
                "flops": self.flops,
                "seconds": round(self.elapsed, 2),
                "loss_first": records[0]["loss"] if records else first_loss,
                "loss_last": records[-1]["loss"] if records else None,
                "hf": str(hf),
                "plots": [str(p) for p in plots],
            }
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(
                f"{self.stage}: {self.step} steps, {self.tokens:,} tokens in {self.elapsed:.1f}s; loss "
                f"{_fmt(summary['loss_first'])} -> {_fmt(summary['loss_last'])}; model in {hf}",
                file=sys.stderr,
            )
        self.ctx.barrier()
        return summary


class Progress:
    """A tqdm bar (step, loss, tokens/s, time left) on a terminal; plain log lines otherwise."""

    def __init__(self, cfg: TrainConfig, start: int, enabled: bool):
        self.cfg, self.enabled = cfg, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)

    def log(self, record: dict) -> None:
        if self.enabled and self.bar is None:
            print(
                f"step {record['step']}/{self.cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['tokens_per_s']:,.0f} tok/s",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _nonfinite(loss: float, grad_norm: float) -> str | None:
    """What of a step is not finite, in words; None when both are."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    return None


def _full_shapes(mc: ModelConfig | DenseConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return architecture(mc)(mc).state_dict()


def _describe(mc: ModelConfig | DenseConfig) -> str:
    from nanoseek.model import count_parameters

    if isinstance(mc, DenseConfig):
        return f"{count_dense_parameters(mc) / 1e6:.2f}M parameters (dense {mc.model_type})"
    n = count_parameters(mc)
    return f"{n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M active)"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"
