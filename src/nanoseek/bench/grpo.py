"""`nanoseek bench grpo`: one GRPO step with nanoseek and with TRL's `GRPOTrainer`, same checkpoint.

Both open the same Hugging Face checkpoint (the preset with random weights, written by
`save_pretrained`, and a tokenizer trained on the arith task) and run the same step: P arith
problems in the R1-Zero template, G sampled completions each of exactly N tokens (end of sequence
banned until then), temperature 1, the same deterministic reward, group-relative advantages, the
k3 KL penalty against a frozen reference (beta 0.04) and one AdamW update per batch, in fp32.
Every step draws from the same P prompts, so both see the same prompt ids (checked). The arith
tokenizer holds a few hundred tokens and the preset's embedding 4,096 rows; ids past the
tokenizer's decode to nothing in both tools, as with DeepSeek-V3's own padded embedding.

The steps take turns: each nanoseek step runs inside TRL's step-end callback, off TRL's clock, so
a busy machine slows both alike. The first steps of each are warmup; printed are the median
seconds per step, its split into generation (sampling, decoding, reward) and the rest
(reference log-probs, forward, backward, optimizer), and the ratio.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.bench import shapes
from nanoseek.errors import NanoseekError


@dataclass
class StepTimes:
    """Per timed step: seconds, seconds generating, completion tokens trained on, shortest and longest."""

    seconds: list[float] = field(default_factory=list)
    gen_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    shortest: int | None = None
    longest: int | None = None

    def record(self, seconds: float, gen_seconds: float | None, tokens: int, shortest: int, longest: int) -> None:
        self.seconds.append(seconds)
        if gen_seconds is not None:
            self.gen_seconds.append(gen_seconds)
        self.tokens.append(tokens)
        self.shortest = shortest if self.shortest is None else min(self.shortest, shortest)
        self.longest = longest if self.longest is None else max(self.longest, longest)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_gen(self) -> float | None:
        """Generation seconds of the median step (the mean of the middle two for an even count),
        so that generation + rest is a step that happened, not a mix of two."""
        if not self.gen_seconds:
            return None
        order = sorted(range(len(self.seconds)), key=self.seconds.__getitem__)
        n = len(order)
        return statistics.mean(self.gen_seconds[i] for i in order[(n - 1) // 2 : n // 2 + 1])


@dataclass
class GRPOBench:
    preset: str
    prompts: int
    group: int
    new_tokens: int
    prompt_tokens: float  # mean over the prompts
    threads: int
    steps: int
    warmup: int
    beta: float = 0.04
    tools: dict[str, StepTimes] = field(default_factory=dict)
    trl_version: str = ""
    same_prompt_ids: bool | None = None  # nanoseek's prompt ids equal TRL's (None: TRL not run)

    @property
    def ratio(self) -> float | None:
        if "nanoseek" in self.tools and "trl" in self.tools:
            return self.tools["trl"].median / self.tools["nanoseek"].median
        return None

    def as_dict(self) -> dict:
        out = {
            k: getattr(self, k)
            for k in (
                "preset",
                "prompts",
                "group",
                "new_tokens",
                "prompt_tokens",
                "threads",
                "steps",
                "warmup",
                "beta",
                "trl_version",
                "same_prompt_ids",
                "ratio",
            )
        }
        for name, t in self.tools.items():
            out[name] = {
                "seconds_per_step": t.median,
                "gen_seconds": t.median_gen,
                "step_seconds": t.seconds,
                "completion_tokens": t.tokens,
                "completion_len_min": t.shortest,
                "completion_len_max": t.longest,
            }
        return out


def digit_share_reward(prompts, completions, **_) -> list[float]:
    """A cheap deterministic reward that differs within a group: the share of digits in the text."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def write_checkpoint(directory: str | Path, preset: str = "small", seed: int = 0) -> Path:
    """The preset with random weights plus an arith tokenizer, as a Hugging Face directory."""
    from nanoseek.data.corpus import corpus
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.io.hf import save_pretrained
    from nanoseek.model import Transformer
    from nanoseek.tasks import get

    config = shapes.model_config(preset)
    tokenizer = train_tokenizer(
        (text for _, text in corpus(get("arith"), 300, seed=seed)), vocab_size=config.vocab_size
    )
    if tokenizer.vocab_size > config.vocab_size:
        raise NanoseekError(
            f"preset {preset!r}: vocab_size {config.vocab_size} is below the tokenizer's {tokenizer.vocab_size}"
        )
    torch.manual_seed(seed)
    save_pretrained(Transformer(config), directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def arith_prompts(n: int, seed: int = 0) -> list[str]:
    from nanoseek.data.chat import r1_zero_prompt
    from nanoseek.tasks import get

    return [r1_zero_prompt(p.prompt) for p in get("arith").sample(n, split="train", seed=seed)]


def nanoseek_trainer(directory, prompts: list[str], group: int, new_tokens: int, beta: float, lr: float, seed: int = 0):
    """nanoseek's GRPOTrainer on the checkpoint; its `step()` is what gets timed."""
    from nanoseek.train.grpo import GRPOConfig, GRPOTrainer

    config = GRPOConfig(
        group_size=group,
        prompts_per_step=len(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        temperature=1.0,
        lr=lr,
        beta=beta,
        mu=1,
        loss_type="grpo",
        micro_batch_size=group * len(prompts),
        seed=seed,
    )
    return GRPOTrainer(str(directory), None, digit_share_reward, prompts, config)


def trl_trainer(
    directory,
    prompts: list[str],
    group: int,
    new_tokens: int,
    beta: float,
    lr: float,
    max_steps: int,
    seed: int = 0,
    callbacks=(),
):
    """TRL's GRPOTrainer set up for the same step: no vLLM, CPU, fp32, one generation batch of
    prompts x group completions per optimizer step, no gradient checkpointing, no logging."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    n = group * len(prompts)
    args = GRPOConfig(
        output_dir=str(Path(directory) / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        model_init_kwargs={"dtype": torch.float32},
        gradient_checkpointing=False,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        generation_batch_size=n,
        num_generations=group,
        num_iterations=1,
        max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=beta,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        max_steps=max_steps,
        seed=seed,
        use_vllm=False,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_pin_memory=False,
    )
    return GRPOTrainer(
        model=str(directory),
        reward_funcs=digit_share_reward,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        callbacks=list(callbacks),
    )


def _timed_method(obj, name: str, clock: dict) -> bool:
    """Add the time spent in obj.name to clock["seconds"] (TRL's own timers log only with logging on);
    False where this version of TRL has no such method."""
    method = getattr(obj, name, None)
    if method is None:
        return False

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            clock["seconds"] += time.perf_counter() - t

    setattr(obj, name, timed)
    return True


def bench_grpo(
    preset: str = "small",
    prompts: int = 8,
    group: int = 8,
    new_tokens: int = 64,
    steps: int = 3,
    warmup: int = 1,
    beta: float = 0.04,
    lr: float = 1e-5,
    threads: int | None = None,
    with_trl: bool = True,
    seed: int = 0,
    log=print,
) -> GRPOBench:
    if prompts < 1 or group < 2 or new_tokens < 1 or steps < 1 or warmup < 0:
        raise NanoseekError(
            "--prompts, --new-tokens and --steps must be positive, --group at least 2, --warmup at least 0"
        )
    trl = None
    if with_trl:
        try:
            import trl
        except ImportError:
            raise NanoseekError(
                "bench grpo compares with TRL's GRPOTrainer: pip install 'nanoseek[bench]' "
                "(or run it with --only nanoseek)"
            ) from None
    if threads:
        torch.set_num_threads(threads)
    texts = arith_prompts(prompts, seed)
    bench = GRPOBench(
        preset,
        prompts,
        group,
        new_tokens,
        0.0,
        torch.get_num_threads(),
        steps,
        warmup,
        beta,
        trl_version=getattr(trl, "__version__", ""),
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, preset, seed)
        ours = nanoseek_trainer(tmp, texts, group, new_tokens, beta, lr, seed)
        times = bench.tools["nanoseek"] = StepTimes()
        seen: dict[str, list] = {"lengths": [], "prompt_ids": []}
        submit, collect = ours.submit, ours.collect

        def recording_submit(rows, step):
            prompt_ids, wait = submit(rows, step)
            seen["prompt_ids"] += [ids for ids in prompt_ids if ids not in seen["prompt_ids"]]
            return prompt_ids, wait

        def recording_collect(rows, wait):
            rollouts, rewards, extra = collect(rows, wait)
            seen["lengths"] = [len(o.token_ids) for g in rollouts.completions for o in g]
            return rollouts, rewards, extra

        ours.submit, ours.collect = recording_submit, recording_collect

        def nanoseek_step(i: int) -> None:
            t = time.perf_counter()
            m = ours.step()
            seconds = time.perf_counter() - t
            if i >= warmup:
                n = seen["lengths"]
                times.record(seconds, m["gen_seconds"], sum(n), min(n), max(n))
            log(
                f"nanoseek step {i + 1}: {seconds:.2f} s (generation {m['gen_seconds']:.2f} s)"
                + ("" if i >= warmup else ", warmup")
            )

        if trl is None:
            for i in range(warmup + steps):
                nanoseek_step(i)
        else:
            theirs = _run_trl(bench, tmp, texts, beta, lr, seed, nanoseek_step, log)
            their_ids = theirs.processing_class(text=texts)["input_ids"]  # as TRL tokenizes them
            bench.same_prompt_ids = set(map(tuple, their_ids)) == set(map(tuple, seen["prompt_ids"]))
    bench.prompt_tokens = sum(map(len, seen["prompt_ids"])) / max(len(seen["prompt_ids"]), 1)
    return bench


def _run_trl(bench: GRPOBench, directory, texts, beta, lr, seed, between, log):
    """TRL's training loop for warmup + steps steps; `between(i)` runs after its step i, off its clock."""
    from transformers import PrinterCallback, TrainerCallback

    times = bench.tools["trl"] = StepTimes()
    clock = {"seconds": 0.0, "timed": False}
    n = bench.prompts * bench.group

    class Turns(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, clock["seconds"] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            i = state.global_step - 1
            if i >= bench.warmup:
                m = _trl_lengths(theirs)
                gen = clock["seconds"] if clock["timed"] else None
                times.record(seconds, gen, round(m["mean"] * n), int(m["min"]), int(m["max"]))
            log(
                f"trl step {i + 1}: {seconds:.2f} s (generation {clock['seconds']:.2f} s)"
                + ("" if i >= bench.warmup else ", warmup")
            )
            between(i)
            self.start, clock["seconds"] = time.perf_counter(), 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trl_trainer(
            directory, texts, bench.group, bench.new_tokens, beta, lr, bench.warmup + bench.steps, seed, [Turns()]
        )
        theirs.remove_callback(PrinterCallback)  # it prints the end-of-training summary
        clock["timed"] = _timed_method(theirs, "_generate", clock)
        _timed_method(theirs, "_calculate_rewards", clock)
        theirs.train()
    return theirs


def _trl_lengths(trainer) -> dict[str, float]:
    """Min, mean and max completion length of TRL's last batch, from the numbers it keeps for its logs."""
    logged = getattr(trainer, "_metrics", {}).get("train", {})
    try:
        return {k: logged[f"completions/{k}_length"][-1] for k in ("min", "mean", "max")}
    except (KeyError, IndexError):
        import trl

        raise NanoseekError(
            f"TRL {trl.__version__} keeps no completions/*_length metrics: bench grpo reads them "
            "to check the forced length (written against TRL 1.16)"
        ) from None


def print_bench(bench: GRPOBench, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(
        title=f"GRPO step: {bench.preset}, {bench.prompts} prompts x {bench.group} completions x "
        f"{bench.new_tokens} tokens, beta {bench.beta:g}, fp32, {bench.threads} thread(s), median of "
        f"{bench.steps} after {bench.warmup} warmup"
    )
    for col in ("tool", "s / step", "generation s", "rest s", "completion tokens", "speed-up"):
        table.add_column(col, justify="right")
    base = bench.tools["trl"].median if "trl" in bench.tools else None
    for name, label in (("nanoseek", "nanoseek"), ("trl", f"TRL {bench.trl_version}")):
        t = bench.tools.get(name)
        if t is None:
            continue
        gen = t.median_gen
        table.add_row(
            label,
            f"{t.median:.2f}",
            "-" if gen is None else f"{gen:.2f}",
            "-" if gen is None else f"{t.median - gen:.2f}",
            f"{t.tokens[-1]:,}",
            "-" if base is None else f"{base / t.median:.2f}x",
        )
    table.caption = (
        f"generation: sampling, decoding and reward; rest: reference log-probs, forward, backward, "
        f"AdamW; prompts of {bench.prompt_tokens:.1f} tokens on average"
        + {None: "", True: ", the same ids for both", False: ", [red]NOT the same ids for both[/red]"}[
            bench.same_prompt_ids
        ]
    )
    console.print(table)
    if bench.ratio is not None:
        console.print(f"nanoseek / TRL: [bold]{bench.ratio:.2f}x[/bold] faster per GRPO step")


# ---- `nanoseek bench grpo` (registered by nanoseek.bench) --------------------------------
def add_arguments(p) -> None:
    p.description = (
        "One GRPO step (sample, reward, KL to a reference, update) by nanoseek and by TRL's GRPOTrainer "
        "on the same checkpoint and prompts, in one run: seconds per step and the ratio."
    )
    shapes.add_arguments(p)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per completion, forced (default 64)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per tool (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per tool first (default 1)")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (default 0.04)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate for both (default 1e-5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--only", choices=("nanoseek",), help="skip TRL (no need to install it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument(
        "--workers",
        metavar="N,N",
        help="instead: nanoseek's steps with rollouts on N Ray workers each (e.g. 1,2), the single-process "
        "run and the async option beside them (bench/rollout.py; needs Ray)",
    )
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per Ray worker (default 1)")


def main(args) -> int:
    if args.workers:
        from nanoseek.bench.rollout import bench_rollout, parse_workers, print_rollout_bench

        if args.only:
            raise NanoseekError("--workers runs nanoseek only: --only is not needed with it")
        bench = bench_rollout(
            shapes.spec(args),
            args.prompts,
            args.group,
            args.new_tokens,
            args.steps,
            args.warmup,
            args.lr,
            parse_workers(args.workers),
            args.threads,
            args.worker_threads,
            args.seed,
        )
        print_rollout_bench(bench)
        if args.json:
            Path(args.json).write_text(json.dumps(bench, indent=1) + "\n")
        return 0
    bench = bench_grpo(
        shapes.spec(args),
        args.prompts,
        args.group,
        args.new_tokens,
        args.steps,
        args.warmup,
        args.beta,
        args.lr,
        args.threads,
        not args.only,
        args.seed,
    )
    print_bench(bench)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.as_dict(), indent=1) + "\n")
    return 0
