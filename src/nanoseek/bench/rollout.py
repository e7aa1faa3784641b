"""`nanoseek bench grpo --workers 1,2`: GRPO steps with rollouts on 1, 2, ... Ray workers, side by side.

The same checkpoint, prompts, forced completion length and reward as `bench grpo` (bench/grpo.py),
nanoseek only (TRL has no rollout workers to set against them): first the single-process run (the
learner's own engine), then for each worker count a run whose rollouts go to that many Ray actors
of `--worker-threads` torch threads each, then the same with `rollout.async` (the workers sample
step t+1 while the learner trains on step t) at the largest count. Per run: the median seconds
per step, the median rollout seconds (submit to gathered completions) and rollout tokens/s
(completion tokens over those seconds), and each worker's busy share of the step. On a machine of
C cores, W workers of one thread each can only go faster while W plus the learner's threads <= C.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field

import torch

from nanoseek.errors import NanoseekError


@dataclass
class RolloutRun:
    name: str
    workers: int
    backend: str
    asynchronous: bool
    seconds: list[float] = field(default_factory=list)
    rollout_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # mean over workers, per step

    @property
    def step(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rollout(self) -> float:
        return statistics.median(self.rollout_seconds)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(t / max(s, 1e-9) for t, s in zip(self.tokens, self.rollout_seconds))

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "workers": self.workers,
            "backend": self.backend,
            "async": self.asynchronous,
            "seconds_per_step": self.step,
            "rollout_seconds": self.rollout,
            "rollout_tokens_per_s": self.tokens_per_s,
            "busy": statistics.mean(self.busy) if self.busy else None,
            "step_seconds": self.seconds,
        }


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise NanoseekError(f"--workers {text}: expected worker counts of 1 or more, e.g. 1,2")
    return counts


def bench_rollout(
    preset: str,
    prompts: int,
    group: int,
    new_tokens: int,
    steps: int,
    warmup: int,
    lr: float,
    workers: list[int],
    threads: int | None,
    worker_threads: int,
    seed: int = 0,
    log=print,
) -> dict:
    try:
        import ray
    except ImportError:
        raise NanoseekError("bench grpo --workers runs Ray workers: pip install 'nanoseek[scale]'") from None
    from nanoseek.bench.grpo import arith_prompts, digit_share_reward, write_checkpoint
    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads or 1)
    texts = arith_prompts(prompts, seed)
    plans = [("single process", 1, "local", False)]
    plans += [(f"{w} Ray worker{'s' * (w > 1)}", w, "ray", False) for w in workers]
    plans.append((f"{max(workers)} Ray worker{'s' * (max(workers) > 1)}, async", max(workers), "ray", True))
    runs = []
    ray.init(
        address="local",
        num_cpus=max(workers) * worker_threads,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            directory = write_checkpoint(tmp, preset, seed)
            for name, w, backend, asynchronous in plans:
                config = GRPOConfig(
                    group_size=group,
                    prompts_per_step=prompts,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    lr=lr,
                    loss_type="grpo",
                    micro_batch_size=group * prompts,
                    seed=seed,
                    rollout={"backend": backend, "workers": w, "threads": worker_threads, "async": asynchronous},
                )
                trainer = GRPOTrainer(str(directory), None, digit_share_reward, texts, config)
                run = RolloutRun(name, w, backend, asynchronous)
                log(f"{name}: {warmup} warmup + {steps} timed steps")
                try:
                    for i in range(warmup + steps):
                        t0 = time.perf_counter()
                        m = trainer.step()
                        seconds = time.perf_counter() - t0
                        if i < warmup:
                            continue
                        run.seconds.append(seconds)
                        run.rollout_seconds.append(m.get("rollout_seconds", m["gen_seconds"]))
                        run.tokens.append(round(m["completion_len_mean"] * prompts * group))
                        busy = [v for k, v in m.items() if k.startswith("rollout/") and k.endswith("_busy")]
                        if busy:
                            run.busy.append(statistics.mean(busy))
                finally:
                    trainer.close()
                runs.append(run)
    finally:
        ray.shutdown()
    base = runs[0].step
    return {
        "preset": preset,
        "prompts": prompts,
        "group": group,
        "new_tokens": new_tokens,
        "steps": steps,
        "warmup": warmup,
        "learner_threads": torch.get_num_threads(),
        "worker_threads": worker_threads,
        "runs": [{**r.as_dict(), "speedup": base / r.step} for r in runs],
    }


def print_rollout_bench(bench: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"GRPO steps, rollouts on workers: {bench['preset']}, {bench['prompts']} prompts x {bench['group']} "
        f"x {bench['new_tokens']} tokens, learner {bench['learner_threads']} thread(s), "
        f"{bench['worker_threads']} per worker"
    )
    for col in ("run", "s/step", "rollout s", "rollout tok/s", "busy", "vs single process"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in bench["runs"]:
        table.add_row(
            r["name"],
            f"{r['seconds_per_step']:.2f}",
            f"{r['rollout_seconds']:.2f}",
            f"{r['rollout_tokens_per_s']:.0f}",
            "-" if r["busy"] is None else f"{r['busy']:.0%}",
            f"{r['speedup']:.2f}x",
        )
    Console().print(table)
