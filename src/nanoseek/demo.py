"""`nanoseek demo`: R1-Zero on a laptop, the default end-to-end job.

1. data: the synthetic chain corpus and a BPE tokenizer trained on it;
2. pretrain the `tiny` base model on it (DeepSeek-V3 recipe: MTP, aux-loss-free balancing);
3. evaluate the base model on held-out problems with the R1-Zero template;
4. R1-Zero: GRPO from the base model with accuracy and format rewards only;
5. evaluate again and write OUT/report.md and OUT/report.json.

OUT/base and OUT/r1-zero are Hugging Face format directories with their tokenizer, whose
tokenizer_config.json names the R1-Zero prompt format they were trained in, so `nanoseek chat
--model OUT/r1-zero` (and `serve`, `generate`) prompt them that way right after. `--quick` is
the same pipeline cut to about two minutes (what the tests run); its numbers show the
plumbing, not the result.

Two more runs of the same five stages (README: "The aha moment", "Countdown"):

- `--reflection [SHARE]`: a share of the corpus's worked solutions slip at a step and correct it
  ("3+5=7 wait, 3+5=8"), never rewarded; the report follows the share of samples that re-check
  themselves over the RL steps and by difficulty, and looks for an aha sample (eval.aha_samples).
  `--reflection-drill SHARE` also drills the move in the plain documents; `--reflection-slip
  recall` makes the slip a recall of a value ("c=5 wait, c=4:3+4=7") instead of a step's result.
- `--task countdown`: pretraining on worked searches (tasks/countdown.py), then GRPO on the
  verified-equation reward alone; the report gives pass@1 by count of numbers, the tries per
  search and the model's size against the 0.5B model TinyZero saw fail.

Every held-out sample goes to OUT/samples_base.jsonl and OUT/samples_r1_zero.jsonl;
`nanoseek.report.rewrite_report(OUT)` writes a finished run's report again.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nanoseek.data.chat import R1_ZERO_TEMPLATE
from nanoseek.device import add_device_arguments, device_arguments
from nanoseek.errors import NanoseekError
from nanoseek.tasks.chain import SLIPS

TASK = "chain"  # nanoseek/tasks/chain.py says why not plain arith
REFLECT = 0.05  # `--reflection`'s share of worked solutions that slip and correct themselves


@dataclass(frozen=True)
class Plan:
    """How big each stage is: small values and 2-7 of them (from the short problems a user
    types first to the longest the budget allows), 40% of the corpus worked step by step,
    and a generation budget above the longest worked solution.
    What made the lookups learnable in the time (measured while it was built): signed values (a step is
    then a recall and one addition), a tokenizer with one token per punctuation mark,
    attention within each packed document, and the preamble on a quarter of the documents."""

    task_options: tuple = (
        ("min_values", 2),
        ("max_values", 7),
        ("min_value", 1),
        ("max_value", 5),
        ("signed", True),
    )  # held-out evaluation draws from the same 2-7 values
    mix: tuple = (("worked", 0.4), ("direct", 0.4), ("plain", 0.2))
    preamble: float = 0.25
    docs: int = 40_000
    vocab_size: int = 512
    pretrain_steps: int = 1000
    seq_len: int = 256
    batch_size: int = 16
    eval_problems: int = 100
    eval_samples: int = 4  # pass@1 is the mean over these; pass@k and cons@k use all of them
    grpo_steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 128  # the longest worked completion (7 values, answer and EOS) is 109 tokens; 2-7 mean 60
    grpo_lr: float = 3e-4
    loss_type: str = "dr_grpo"
    languages: tuple = ("en",)  # chain's name alphabets (`nanoseek r1` uses two: tasks/chain.py)
    switch: float = 0.0  # share of worked solutions that switch language midway (data/corpus.py)
    reflect: float = 0.0  # share of worked solutions that slip and correct themselves (`--reflection`)
    reflect_plain: float = 0.0  # share of the plain documents' steps that slip and are corrected (a drill)
    slip: str = "step"  # what a worked solution's slip gets wrong: a step's result or a recall (`--reflection-slip`)
    rewards: tuple = (("accuracy", 1.0), ("format", 0.1))
    split_digits: bool = True  # the tokenizer's: one token per digit (False: BPE merges numbers)
    task: str = TASK

    def options(self) -> dict:
        """The task's options: the one-language demo's are what they always were."""
        options = dict(self.task_options)
        if self.task == "chain" and tuple(self.languages) != ("en",):
            options["languages"] = list(self.languages)
        return options


FULL = Plan()
# `--task countdown`: 3 and 4 numbers from 1 to 6, a target up to 30 and a search's running value up to
# 30 (tasks/countdown.py), asked tersely ("[3,5,2]>16"), with whole numbers as tokens; the corpus's
# reasoning is worked searches (tries that fail, then the one that reaches the target, at most 4 tries:
# 59 tokens on average for 3 numbers, 95 for 4, at most 171), so the generation budget is 200 tokens (256
# did no better); rows of 512 tokens hold several documents whole; the reward is the verified equation
# alone. What each choice did is in the README ("Countdown"): with numbers up to 9, targets up to 50,
# running values up to 99 and digit tokens the base model's searches were right 8% of the time, as
# often as its direct guesses, and RL took pass@1 from 8% to 2%.
COUNTDOWN = (
    ("task", "countdown"),
    (
        "task_options",
        (
            ("min_numbers", 3),
            ("max_numbers", 4),
            ("max_number", 6),
            ("max_target", 30),
            ("max_step", 30),
            ("prompt", "terse"),
        ),
    ),
    ("mix", (("search", 0.4), ("direct", 0.4), ("plain", 0.2))),  # the first wave's 40/40/20
    ("rewards", (("accuracy", 1.0),)),
    ("split_digits", False),
)
FULL_COUNTDOWN = replace(
    FULL, **dict(COUNTDOWN), docs=60_000, seq_len=512, batch_size=8, max_new_tokens=200, eval_problems=200
)
QUICK = replace(
    FULL,
    docs=1_500,
    vocab_size=320,
    pretrain_steps=30,
    seq_len=128,
    batch_size=8,
    eval_problems=8,
    eval_samples=2,
    grpo_steps=3,
    prompts_per_step=4,
    group_size=4,
    max_new_tokens=64,
)
QUICK_COUNTDOWN = replace(QUICK, **dict(COUNTDOWN))


def register(sub) -> None:
    p = sub.add_parser("demo", help="the default run: pretrain a tiny base model, then R1-Zero (GRPO), with a report")
    p.add_argument("--out", help="output directory (default: runs/demo, runs/demo-reflection, runs/demo-countdown)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a two-minute version of the same pipeline (for tests)")
    p.add_argument(
        "--task",
        choices=("chain", "countdown"),
        default="chain",
        help="chain (the default run) or countdown: reach a target with 3-4 numbers, from worked searches",
    )
    p.add_argument(
        "--languages",
        metavar="CODES",
        help="the chain problems' name alphabets, e.g. en,el (Latin and Greek; default: en)",
    )
    p.add_argument(
        "--switch",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of the corpus's worked solutions that switch language midway (with two languages)",
    )
    p.add_argument(
        "-o",
        "--task-option",
        dest="task_option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one of the task's options for the whole run, the value read as YAML "
        "(e.g. -o max_value=7; the options: nanoseek/tasks/chain.py, countdown.py)",
    )
    p.add_argument(
        "--reflection",
        type=float,
        nargs="?",
        const=REFLECT,
        default=0.0,
        metavar="SHARE",
        help=f"the aha-moment run: that share of the corpus's worked solutions slip at a step and correct it "
        f"('3+5=7 wait, 3+5=8'; default share {REFLECT}); RL rewards only the answer",
    )
    p.add_argument(
        "--reflection-drill",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="with --reflection: that share of the plain documents' steps slip and are corrected, "
        "drilling the move outside the worked solutions",
    )
    p.add_argument(
        "--reflection-slip",
        choices=SLIPS,
        default=None,
        help="with --reflection: what a slip gets wrong, the step's result (step, the default: '3+5=7 wait, 3+5=8') "
        "or the recall of the value it uses, re-read from the prompt (recall: 'c=5 wait, c=4:3+4=7')",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the R1-Zero stage's GRPO config (keys: GRPORunConfig in nanoseek/train/grpo.py), "
        "e.g. --set rollout.workers=2 rollout.backend=ray",
    )
    # float16 is left out: training in it needs loss scaling, which nanoseek does not do.
    add_device_arguments(
        p,
        dtypes=("float32", "bfloat16"),
        dtype_help="bfloat16: pretraining under bf16 autocast, GRPO and evaluation on bf16 weights",
    )
    p.set_defaults(func=run_demo)


def stage(title: str) -> None:
    print(f"\n== {title} ==", file=sys.stderr, flush=True)


def run_demo(args) -> int:
    if args.task == "countdown":
        chain_only = [f for f, v in (("--languages", args.languages), ("--switch", args.switch)) if v]
        chain_only += ["--reflection"] if args.reflection else []
        chain_only += ["--reflection-drill"] if args.reflection_drill else []
        chain_only += ["--reflection-slip"] if args.reflection_slip else []
        if chain_only:
            raise NanoseekError(f"{chain_only[0]} is an option of the chain task, not of --task countdown")
    plan = {(False, "chain"): FULL, (True, "chain"): QUICK}.get((args.quick, args.task))
    plan = plan or (QUICK_COUNTDOWN if args.quick else FULL_COUNTDOWN)
    if args.languages:
        plan = replace(plan, languages=tuple(x.strip() for x in args.languages.split(",") if x.strip()))
    if args.switch:
        plan = replace(plan, switch=args.switch)
    if args.reflection:
        if not 0 < args.reflection <= 1:
            raise NanoseekError(f"--reflection {args.reflection:g}: the share must be in (0, 1]")
        plan = replace(plan, reflect=args.reflection)
    if args.reflection_drill:
        if not args.reflection or not 0 < args.reflection_drill <= 1:
            raise NanoseekError(
                f"--reflection-drill {args.reflection_drill:g}: needs --reflection and a share in (0, 1]"
            )
        plan = replace(plan, reflect_plain=args.reflection_drill)
    if args.reflection_slip:
        if not args.reflection:
            raise NanoseekError(f"--reflection-slip {args.reflection_slip}: needs --reflection")
        plan = replace(plan, slip=args.reflection_slip)
    if args.task_option:  # checked by building the task, before any stage runs
        from nanoseek import tasks
        from nanoseek.eval_cli import parse_options

        options = {**dict(plan.task_options), **parse_options(args.task_option)}
        tasks.get(plan.task, **options)
        plan = replace(plan, task_options=tuple(options.items()))
    device, dtype = device_arguments(args)
    if device.index is not None:
        raise NanoseekError(
            f"--device {args.device}: the demo runs on 'cuda' (choose the GPU with CUDA_VISIBLE_DEVICES)"
        )
    if args.overrides:  # a bad key or value is an error now, not after pretraining
        from nanoseek.train.grpo import GRPORunConfig

        grpo_overrides(GRPORunConfig(init_from="."), args.overrides)
    out = args.out or ("runs/demo-countdown" if plan.task == "countdown" else "runs/demo")
    out = args.out or ("runs/demo-reflection" if plan.reflect else out)
    run_pipeline(plan, Path(out), args.seed, device, dtype, args.quick, overrides=args.overrides)
    return 0


def grpo_overrides(cfg, overrides):
    """`cfg` (a GRPORunConfig) with the demo's `--set key=value` items on top, checked as a whole."""
    from nanoseek.train.config import apply_override, parse

    raw = cfg.to_dict()
    sources = {apply_override(raw, item, type(cfg)): f"--set {item}" for item in overrides}
    return parse(type(cfg), raw, "nanoseek demo", sources)


def run_pipeline(
    plan: Plan, out: Path, seed: int, device: torch.device, dtype, quick: bool, overrides: tuple = ()
) -> Path:
    """The demo's five stages into `out`; returns the report's path."""
    from nanoseek import tasks
    from nanoseek.data.corpus import corpus, write_corpus
    from nanoseek.data.stream import iter_documents
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.train.config import DataConfig, TrainConfig
    from nanoseek.train.grpo import GRPORunConfig
    from nanoseek.train.grpo import run as grpo_run
    from nanoseek.train.pretrain import train

    out.mkdir(parents=True, exist_ok=True)
    task_options = plan.options()
    task = tasks.get(plan.task, **task_options)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    stage("1/5 data: synthetic corpus and tokenizer")
    t0 = time.perf_counter()
    corpus_file, tok_dir = out / "data" / f"{plan.task}.jsonl", out / "tokenizer"
    counts = write_corpus(
        corpus_file,
        corpus(
            task,
            plan.docs,
            seed=seed,
            mix=dict(plan.mix),
            preamble=plan.preamble,
            switch=plan.switch,
            reflect=plan.reflect,
            reflect_plain=plan.reflect_plain,
            slip=plan.slip,
        ),
    )
    tokenizer = train_tokenizer(
        iter_documents([corpus_file]),
        vocab_size=plan.vocab_size,
        split_punctuation=True,
        split_digits=plan.split_digits,
    )
    tokenizer.save_pretrained(tok_dir, prompt_format="r1-zero")  # pretraining and GRPO copy it on
    print(
        f"{sum(counts.values())} documents ({dict(counts)}) in {corpus_file}; tokenizer of "
        f"{tokenizer.vocab_size} tokens in {tok_dir}",
        file=sys.stderr,
    )
    seconds["data"] = time.perf_counter() - t0

    stage("2/5 pretraining the base model")
    t0 = time.perf_counter()
    cfg = TrainConfig(
        model={"preset": "tiny"},
        data=DataConfig(files=[str(corpus_file)], tokenizer=str(tok_dir)),
        seq_len=plan.seq_len,
        document_mask=True,
        batch_size=plan.batch_size,
        steps=plan.pretrain_steps,
        seed=seed,
        warmup_steps=min(20, plan.pretrain_steps // 5),
        checkpoint_every=plan.pretrain_steps,
        log_every=max(1, plan.pretrain_steps // 30),
        tensorboard=not quick,
        device=device.type,
        precision="bf16" if dtype == torch.bfloat16 else "fp32",
    )
    pretrain = train(cfg, out / "pretrain")
    base = _replace_dir(out / "pretrain" / "hf", out / "base")
    seconds["pretrain"] = time.perf_counter() - t0

    stage("3/5 evaluating the base model")
    t0 = time.perf_counter()
    problems = task.sample(plan.eval_problems, "test", seed=seed)
    before, base_samples = evaluate_dir(base, task, problems, plan, seed, device, dtype)
    print(summary_line("base", before), file=sys.stderr)
    seconds["eval_base"] = time.perf_counter() - t0

    stage("4/5 R1-Zero: GRPO from the base model, rule-based rewards only")
    t0 = time.perf_counter()
    rl_cfg = GRPORunConfig(
        init_from=str(base),
        task=plan.task,
        task_options=task_options,
        prompts=max(2_000, plan.eval_problems),
        template=R1_ZERO_TEMPLATE,
        rewards=dict(plan.rewards),
        steps=plan.grpo_steps,
        prompts_per_step=plan.prompts_per_step,
        group_size=plan.group_size,
        max_new_tokens=plan.max_new_tokens,
        temperature=1.0,
        lr=plan.grpo_lr,
        beta=0.0,
        loss_type=plan.loss_type,
        seed=seed,
        checkpoint_every=max(1, plan.grpo_steps // 3),
        tensorboard=not quick,
        device=device.type,
        dtype=_dtype_name(dtype),
    )
    rl_cfg = grpo_overrides(rl_cfg, overrides) if overrides else rl_cfg
    grpo_run(rl_cfg, out / "grpo")
    r1_zero = _replace_dir(out / "grpo" / "hf", out / "r1-zero")
    seconds["grpo"] = time.perf_counter() - t0

    stage("5/5 evaluating the R1-Zero model")
    t0 = time.perf_counter()
    after, samples = evaluate_dir(r1_zero, task, problems, plan, seed, device, dtype)
    print(summary_line("r1-zero", after), file=sys.stderr)
    seconds["eval_r1_zero"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    for name, rows in (("base", base_samples), ("r1_zero", samples)):  # every held-out sample, for a closer look
        with open(out / f"samples_{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    from nanoseek.report import write_report

    md = write_report(
        out,
        plan=asdict(plan),
        task=plan.task,
        task_options=task_options,
        template=R1_ZERO_TEMPLATE,
        before=before,
        after=after,
        samples=samples,
        base_samples=base_samples,
        pretrain=pretrain,
        rl_config=rl_cfg.to_dict(),
        seconds=seconds,
        quick=quick,
        seed=seed,
    )
    print(f"\nreport: {md}\nchat with it: nanoseek chat --model {r1_zero}", flush=True)
    return md


def _dtype_name(dtype) -> str:
    return "bfloat16" if dtype == torch.bfloat16 else "float32"


def evaluate_dir(model_dir: Path, task, problems, plan: Plan, seed: int, device=None, dtype=None):
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.eval import evaluate
    from nanoseek.infer import Engine

    template = Tokenizer.from_pretrained(model_dir).prompt_template()  # the format the model was trained in
    prompt_len = max(len(template.format(prompt=p.prompt)) for p in problems)  # chars >= tokens
    engine = Engine.from_pretrained(
        model_dir,
        device=device,
        dtype=dtype,
        max_batch_size=min(len(problems) * plan.eval_samples, 256),
        max_seq_len=prompt_len + plan.max_new_tokens + 2,
    )
    samples: list[dict] = []
    with torch.inference_mode():
        result = evaluate(
            engine,
            task,
            problems,
            template,
            k=plan.eval_samples,
            max_tokens=plan.max_new_tokens,
            seed=seed,
            samples_out=samples,
        )
    return result, samples


def summary_line(name: str, r) -> str:
    return (
        f"{name}: pass@1 {r.pass_at_1:.1%}, pass@{r.samples_per_problem} {r.pass_at_k:.1%}, "
        f"cons@{r.samples_per_problem} {r.cons_at_k:.1%}, {r.response_len:.1f} tokens, "
        f"{r.thinking_share:.0%} of samples thinking"
    )


def _replace_dir(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
