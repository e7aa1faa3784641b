"""`nanoseek r1`: DeepSeek-R1's multi-stage pipeline on a laptop (DeepSeek-R1 sections 2.3-2.4).

R1-Zero (the demo) reasons by RL alone, tersely and, on a corpus written in two languages, in
both of them. R1 wraps the RL in a little supervised data and then distils the result:

1. cold start: SFT of the base model on a few hundred readable worked solutions in the chat
   format (reasoning in the prompt's language, a summary, the answer; nanoseek.data.r1);
2. reasoning RL: GRPO from the cold-start model, accuracy + format + language consistency;
3. rejection sampling: n samples per training prompt from stage 2, only the right, well formed,
   readable and one-language ones kept, deduplicated, with a share of non-reasoning chats;
4. SFT of the *base* model on that data set (as R1 did: not of the RL model);
5. final RL (the R1 model) on reasoning and non-reasoning prompts with rule rewards for both;
6. distillation: the dense `student` (Qwen2 layout), pretrained on the same corpus, fine-tuned
   on verified traces of the R1 model; the baseline is the same student trained by GRPO
   directly (R1-Zero on the student) for the same number of steps.

OUT/demo holds the base and R1-Zero models (the demo pipeline, run here on the two-language
corpus unless --from names a demo directory), then OUT/cold-start, OUT/reasoning-rl, OUT/sft,
OUT/r1, OUT/student, OUT/student-grpo and OUT/student-distilled are Hugging Face directories
with their tokenizer and prompt format; OUT/data has the data sets (with the rejection-
sampling counts) and OUT/train the training runs (checkpoints, metrics, curves). Re-running the
command skips the stages that finished (OUT/stages/NAME.json) and resumes a training stage from
its newest checkpoint. OUT/report.md and report.json compare every model on held-out problems.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanoseek import demo
from nanoseek.data.chat import R1_ZERO_TEMPLATE, prompt_template
from nanoseek.device import add_device_arguments, device_arguments
from nanoseek.errors import NanoseekError

CHAT_TEMPLATE = prompt_template("chat")  # "<｜User｜>{prompt}<｜Assistant｜><think>\n"
STAGES = (
    "demo",
    "cold-start",
    "reasoning-rl",
    "rejection-sampling",
    "sft",
    "r1",
    "student",
    "student-grpo",
    "student-distilled",
    "student-distilled-kl",
    "report",
)
LANGUAGES = ("en", "el")  # the two-language corpus: names in Latin or Greek letters (tasks/chain.py)


@dataclass(frozen=True)
class Plan:
    """How big each stage is. The generation budget is above the longest readable solution
    (7 values: about 110 tokens of reasoning, a summary and the boxed answer)."""

    switch: float = 0.3  # share of the base corpus's worked solutions that switch language midway
    cold_start: int = 400  # readable worked solutions
    cold_start_steps: int = 150
    rl_steps: int = 40  # reasoning RL
    rejection_prompts: int = 400
    rejection_samples: int = 4
    non_reasoning_share: float = 0.2  # of the SFT data set
    sft_steps: int = 300
    final_rl_steps: int = 30
    lookup_share: float = 0.25  # of the final RL's prompts: questions to answer without thinking
    student_pretrain_steps: int = 1000
    student_steps: int = 120  # the student's budget, by GRPO and by distillation alike (at 60 steps
    # of SFT the 4-layer student has not yet learnt the chat format: 9% pass@1, 17% readable)
    distill_prompts: int = 400
    top_k: int = 8  # teacher log-probs kept per trace token
    logit_kl: float = 1.0  # weight of the KL term in the logit-distillation variant
    prompts_per_step: int = 16
    group_size: int = 8
    batch_size: int = 16
    sft_lr: float = 1e-3
    rl_lr: float = 3e-4
    # The final RL starts from an SFT model near its ceiling: at 3e-4 its 30 steps cost 5.5 points
    # of held-out pass@1 (96.5% -> 91.0%, 7-value chains 89% -> 77%); at 1e-4, 96.5% -> 95.0%.
    final_rl_lr: float = 1e-4
    language_weight: float = 0.2
    readability_weight: float = 0.1
    eval_problems: int = 100
    eval_samples: int = 4
    max_new_tokens: int = 160


FULL = Plan()
QUICK = replace(
    FULL,
    cold_start=24,
    cold_start_steps=4,
    rl_steps=2,
    rejection_prompts=8,
    rejection_samples=2,
    sft_steps=4,
    final_rl_steps=2,
    student_pretrain_steps=6,
    student_steps=2,
    distill_prompts=8,
    prompts_per_step=4,
    group_size=4,
    batch_size=4,
    eval_problems=6,
    eval_samples=2,
    max_new_tokens=48,
)

ROWS = (  # (key, label, model directory under OUT)
    ("base", "base", "demo/base"),
    ("r1_zero", "R1-Zero", "demo/r1-zero"),
    ("cold_start", "cold start", "cold-start"),
    ("reasoning_rl", "reasoning RL", "reasoning-rl"),
    ("sft", "SFT of the base", "sft"),
    ("r1", "R1", "r1"),
    ("student", "student pretrained", "student"),
    ("student_grpo", "student + GRPO", "student-grpo"),
    ("student_distilled", "student distilled", "student-distilled"),
    ("student_distilled_kl", "student distilled + logit KL", "student-distilled-kl"),
)


def register(sub) -> None:
    p = sub.add_parser(
        "r1",
        help="DeepSeek-R1's pipeline: cold start, reasoning RL, rejection sampling, SFT, final RL, distillation",
    )
    p.add_argument("--out", default="runs/r1", help="output directory (default: runs/r1)")
    p.add_argument(
        "--from",
        dest="from_dir",
        metavar="DEMO_OUT",
        help="a `nanoseek demo` directory to take the base and R1-Zero models from (its corpus has one "
        "language); default: run the demo pipeline here on the two-language corpus",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="the whole pipeline cut down to minutes (for tests)")
    p.add_argument(
        "--redo",
        metavar="STAGE",
        choices=STAGES,
        help="run this stage and every later one again from the start (their checkpoints are deleted); "
        f"one of {', '.join(STAGES)}",
    )
    add_device_arguments(p, dtypes=("float32", "bfloat16"))
    p.set_defaults(func=run_r1)


def progress(index: int, name: str, text: str) -> None:
    print(f"[{index}/{len(STAGES)}] {name}: {text}", file=sys.stderr, flush=True)


class Pipeline:
    """The stages, each run once: a finished stage leaves OUT/stages/NAME.json."""

    def __init__(self, args):
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.out = Path(args.out)
        self.device, self.dtype = device_arguments(args)
        self.seed = args.seed
        self.stages: dict[str, dict] = {}

    # ---- bookkeeping ------------------------------------------------------------------------
    def marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def run_stage(self, name: str, fn) -> dict:
        index = STAGES.index(name) + 1
        marker = self.marker(name)
        if marker.exists():
            info = json.loads(marker.read_text())
            progress(index, name, f"done earlier ({info['seconds']:.0f}s), skipped")
        else:
            progress(index, name, "running")
            # The stages after this one read what it writes: they run again too, from the start
            # (their runs' checkpoints were trained on the old inputs). This one resumes its own.
            self.forget(STAGES[index - 1 : index], runs=False)
            self.forget(STAGES[index:])
            t0 = time.perf_counter()
            info = fn() or {}
            info["seconds"] = round(time.perf_counter() - t0, 1)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps(info, indent=1, default=str) + "\n")
            progress(index, name, f"{info.get('line', 'done')} in {info['seconds']:.0f}s")
        self.stages[name] = info
        return info

    def forget(self, names, runs: bool = True) -> None:
        """Drop what says these stages are done: their markers, the scores of their models and,
        with `runs`, their training runs (so they start over instead of resuming)."""
        for name in names:
            self.marker(name).unlink(missing_ok=True)
            for key in ("base", "r1_zero") if name == "demo" else (name.replace("-", "_"),):
                (self.out / "eval" / f"{key}.json").unlink(missing_ok=True)
            run = self.out / "demo" if name == "demo" else self.out / "train" / name
            if runs and run.exists():
                shutil.rmtree(run)

    def model_dir(self, name: str) -> Path:
        return self.out / name

    @property
    def demo_dir(self) -> Path:
        return self.out / "demo"

    def task_options(self, lookup: float = 0.0) -> dict:
        options = dict(self.stages["demo"]["task_options"])
        if lookup:
            options["lookup"] = lookup
        return options

    def task(self, lookup: float = 0.0):
        from nanoseek import tasks

        return tasks.get(self.stages["demo"]["task"], **self.task_options(lookup))

    # ---- the stages -------------------------------------------------------------------------
    def go(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        if getattr(self.args, "redo", None):
            self.forget(STAGES[STAGES.index(self.args.redo) :])
        self.run_stage("demo", self.stage_demo)
        self.chat_tokenizer()
        self.run_stage("cold-start", self.stage_cold_start)
        self.run_stage("reasoning-rl", self.stage_reasoning_rl)
        self.run_stage("rejection-sampling", self.stage_rejection_sampling)
        self.run_stage("sft", self.stage_sft)
        self.run_stage("r1", self.stage_final_rl)
        self.run_stage("student", self.stage_student)
        self.run_stage("student-grpo", self.stage_student_grpo)
        self.run_stage("student-distilled", self.stage_student_distilled)
        self.run_stage("student-distilled-kl", self.stage_student_distilled_kl)
        self.run_stage("report", self.stage_report)
        md = self.out / "report.md"
        print(f"\nreport: {md}\nchat with it: nanoseek chat --model {self.model_dir('r1')}", flush=True)
        return 0

    def stage_demo(self) -> dict:
        """The base and R1-Zero models: copied from --from, or the demo pipeline run here on the
        two-language corpus."""
        dst = self.demo_dir
        if self.args.from_dir:
            src = Path(self.args.from_dir)
            for part in ("base", "r1-zero", "tokenizer", "report.json"):
                if not (src / part).exists():
                    raise NanoseekError(f"--from {src}: no {part} there (expected a `nanoseek demo` output directory)")
            if src.resolve() != dst.resolve():
                for part in ("base", "r1-zero", "tokenizer", "data", "grpo", "pretrain"):
                    if (src / part).exists():
                        _replace_dir(src / part, dst / part)
                for part in ("report.json", "report.md"):
                    if (src / part).exists():
                        shutil.copy2(src / part, dst / part)
        else:
            plan = demo.QUICK if self.args.quick else demo.FULL
            plan = replace(plan, languages=LANGUAGES, switch=self.plan.switch)
            demo.run_pipeline(plan, dst, self.seed, self.device, self.dtype, quick=self.args.quick)
        report = json.loads((dst / "report.json").read_text())
        corpus = sorted((dst / "data").glob("*.jsonl")) if (dst / "data").is_dir() else []
        return {
            "task": report["task"],
            "task_options": report["task_options"],
            "corpus": [str(p) for p in corpus],
            "languages": report["task_options"].get("languages", ["en"]),
            "line": f"base and R1-Zero in {dst} (task {report['task']}, {report['task_options']})",
        }

    def chat_tokenizer(self) -> Path:
        """The base's tokenizer saved with the chat prompt format: the R1 models answer in it."""
        from nanoseek.data.tokenizer import Tokenizer

        path = self.out / "tokenizer-chat"
        if not (path / "tokenizer.json").exists():
            Tokenizer.from_pretrained(self.demo_dir / "tokenizer").save_pretrained(path, prompt_format="chat")
        return path

    def stage_cold_start(self) -> dict:
        from nanoseek.data.r1 import cold_start_conversations, write_dataset

        rows = list(cold_start_conversations(self.task(), self.plan.cold_start, seed=self.seed))
        data = write_dataset(self.out / "data" / "cold-start.jsonl", rows, {"conversations": len(rows)})
        self.sft(self.demo_dir / "base", data, "cold-start", self.plan.cold_start_steps)
        return {"conversations": len(rows), "data": str(data), "line": f"SFT of the base on {len(rows)} solutions"}

    def stage_reasoning_rl(self) -> dict:
        rewards = {"accuracy": 1.0, "format": 0.1, "language": self.plan.language_weight}
        return self.grpo(self.model_dir("cold-start"), "reasoning-rl", CHAT_TEMPLATE, rewards, self.plan.rl_steps)

    def stage_rejection_sampling(self) -> dict:
        from nanoseek.data.r1 import mix_in_non_reasoning, reasons_problem, sample_verified, write_dataset

        task = self.task()
        problems = [
            p
            for p in task.sample(self.plan.rejection_prompts, "train", self.seed + 1, distinct=True)
            if reasons_problem(p)
        ]
        engine = self.engine(self.model_dir("reasoning-rl"), len(problems) * self.plan.rejection_samples)
        rows, counts = sample_verified(
            engine, task, problems, CHAT_TEMPLATE, self.plan.rejection_samples, self.plan.max_new_tokens, seed=self.seed
        )
        rows = rows or self.quick_stand_in("rejection sampling", counts)
        lookups = self.task(lookup=1.0).sample(len(rows) + 1, "train", self.seed + 2, distinct=False)
        mixed = mix_in_non_reasoning(rows, lookups, self.plan.non_reasoning_share, seed=self.seed)
        counts = dict(counts, prompts=len(problems), non_reasoning=len(mixed) - len(rows), rows=len(mixed))
        if not rows:
            raise NanoseekError(
                f"rejection sampling: none of {counts['sampled']} samples of {self.model_dir('reasoning-rl')} "
                f"passed ({counts}); nothing to fine-tune the base on"
            )
        data = write_dataset(self.out / "data" / "rejection-sampling.jsonl", mixed, counts)
        line = (
            f"{counts['kept']} of {counts['sampled']} samples kept (wrong {counts['wrong']}, malformed "
            f"{counts['malformed']}, unreadable {counts['unreadable']}, mixed language {counts['mixed_language']}, "
            f"duplicates {counts['duplicate']}), {counts['non_reasoning']} non-reasoning chats added"
        )
        return {"counts": counts, "data": str(data), "line": line}

    def stage_sft(self) -> dict:
        data = Path(self.stages["rejection-sampling"]["data"])
        self.sft(self.demo_dir / "base", data, "sft", self.plan.sft_steps)
        return {"line": f"SFT of the base on {data.name}"}

    def stage_final_rl(self) -> dict:
        rewards = {
            "accuracy": 1.0,
            "format": 0.1,
            "language": self.plan.language_weight,
            "readability": self.plan.readability_weight,
        }
        return self.grpo(
            self.model_dir("sft"),
            "r1",
            CHAT_TEMPLATE,
            rewards,
            self.plan.final_rl_steps,
            lookup=self.plan.lookup_share,
            lr=self.plan.final_rl_lr,
        )

    def stage_student(self) -> dict:
        from nanoseek.train.config import DataConfig, TrainConfig
        from nanoseek.train.pretrain import train

        corpus = self.stages["demo"]["corpus"]
        if not corpus:
            raise NanoseekError(f"{self.demo_dir / 'data'}: no corpus to pretrain the student on")
        demo_plan = demo.QUICK if self.args.quick else demo.FULL
        steps = self.plan.student_pretrain_steps
        cfg = TrainConfig(
            model={"preset": "student"},
            data=DataConfig(files=corpus, tokenizer=str(self.demo_dir / "tokenizer")),
            seq_len=demo_plan.seq_len,
            document_mask=True,
            batch_size=demo_plan.batch_size,
            steps=steps,
            seed=self.seed,
            warmup_steps=min(20, steps // 5),
            checkpoint_every=max(1, steps // 4),
            log_every=max(1, steps // 30),
            tensorboard=False,
            device=self.device.type,
        )
        summary = train(cfg, self.out / "train" / "student")
        _replace_dir(self.out / "train" / "student" / "hf", self.model_dir("student"))
        return {"loss_first": summary.get("loss_first"), "loss_last": summary.get("loss_last"), "line": "pretrained"}

    def stage_student_grpo(self) -> dict:
        rewards = {"accuracy": 1.0, "format": 0.1}
        return self.grpo(self.model_dir("student"), "student-grpo", R1_ZERO_TEMPLATE, rewards, self.plan.student_steps)

    def stage_student_distilled(self) -> dict:
        """Verified traces of the R1 model (sampled and filtered as in stage 3, with the
        teacher's top-k log-probs kept for the logit-KL variant), then SFT of the student."""
        from nanoseek.data.r1 import reasons_problem, sample_verified, write_dataset

        task = self.task()
        drawn = task.sample(self.plan.distill_prompts, "train", self.seed + 3, distinct=True)
        problems = [p for p in drawn if reasons_problem(p)]
        engine = self.engine(self.model_dir("r1"), len(problems) * self.plan.rejection_samples)
        rows, counts = sample_verified(
            engine,
            task,
            problems,
            CHAT_TEMPLATE,
            self.plan.rejection_samples,
            self.plan.max_new_tokens,
            seed=self.seed,
            top_logprobs=self.plan.top_k,
        )
        if not rows and self.args.quick:
            from nanoseek.distill import teacher_logprobs

            rows = teacher_logprobs(self.model_dir("r1"), self.quick_stand_in("distillation", counts), self.plan.top_k)
        if not rows:
            raise NanoseekError(f"distillation: no verified trace among {counts['sampled']} samples of the R1 model")
        counts = dict(counts, prompts=len(problems))
        write_dataset(self.out / "data" / "distill.jsonl", rows, counts)
        self.distill("student-distilled", logit_kl=0.0)
        what = "stand-in solutions" if counts.get("stand_in") else "verified traces of the R1 model"
        return {"counts": counts, "line": f"SFT of the student on {len(rows)} {what}"}

    def stage_student_distilled_kl(self) -> dict:
        self.distill("student-distilled-kl", logit_kl=self.plan.logit_kl)
        return {
            "logit_kl": self.plan.logit_kl,
            "line": f"the same traces, plus {self.plan.logit_kl:g} x KL to the teacher's top-{self.plan.top_k}",
        }

    def distill(self, name: str, logit_kl: float) -> None:
        from nanoseek.distill import Budget, distill

        budget = Budget(
            samples=self.plan.rejection_samples,
            max_tokens=self.plan.max_new_tokens,
            steps=self.plan.student_steps,
            batch_size=self.plan.batch_size,
            lr=self.plan.sft_lr,
            top_k=self.plan.top_k,
            seed=self.seed,
        )
        run = self.out / "train" / name
        distill(
            self.model_dir("r1"),
            self.model_dir("student"),
            [],
            self.task(),
            run,
            budget,
            logit_kl=logit_kl,
            traces_file=self.out / "data" / "distill.jsonl",
            device=self.device.type,
        )
        _replace_dir(run / "student", self.model_dir(name))

    def stage_report(self) -> dict:
        from nanoseek.r1_report import write_r1_report

        md = write_r1_report(self)
        return {"line": f"written to {md}"}

    # ---- building blocks --------------------------------------------------------------------
    def quick_stand_in(self, stage: str, counts) -> list[dict]:
        """--quick only: its barely trained models write no verified sample, so the plumbing
        goes on with readable cold-start solutions in their place (counted as `stand_in`). A
        real run stops instead (the stage's own error)."""
        from nanoseek.data.r1 import cold_start_conversations

        if not self.args.quick:
            return []
        rows = [dict(r, kind="stand_in") for r in cold_start_conversations(self.task(), 8, seed=self.seed)]
        counts["stand_in"] = len(rows)
        print(f"{stage}: no verified sample (--quick); {len(rows)} cold-start solutions stand in", file=sys.stderr)
        return rows

    def sft(self, init: Path, data: Path, name: str, steps: int) -> dict:
        from nanoseek.train.config import DataConfig
        from nanoseek.train.pretrain import train
        from nanoseek.train.sft import SFTConfig

        cfg = SFTConfig(
            init_from=str(init),
            data=DataConfig(files=[str(data)], tokenizer=str(self.chat_tokenizer())),
            seq_len=256,
            batch_size=self.plan.batch_size,
            steps=steps,
            seed=self.seed,
            lr=self.plan.sft_lr,
            min_lr=self.plan.sft_lr / 10,
            warmup_steps=min(10, steps // 5),
            checkpoint_every=max(1, steps // 3),
            log_every=max(1, steps // 20),
            tensorboard=False,
            device=self.device.type,
        )
        summary = train(cfg, self.out / "train" / name, stage="sft")
        _replace_dir(self.out / "train" / name / "hf", self.model_dir(name))
        return summary

    def grpo(
        self,
        init: Path,
        name: str,
        template: str,
        rewards: dict,
        steps: int,
        lookup: float = 0.0,
        lr: float | None = None,
    ) -> dict:
        from nanoseek.train.grpo import GRPORunConfig
        from nanoseek.train.grpo import run as grpo_run

        cfg = GRPORunConfig(
            init_from=str(init),
            task=self.stages["demo"]["task"],
            task_options=self.task_options(lookup),
            prompts=2_000,
            template=template,
            rewards=rewards,
            steps=steps,
            prompts_per_step=self.plan.prompts_per_step,
            group_size=self.plan.group_size,
            max_new_tokens=self.plan.max_new_tokens,
            temperature=1.0,
            lr=lr or self.plan.rl_lr,
            beta=0.0,
            loss_type="dr_grpo",
            seed=self.seed,
            checkpoint_every=max(1, steps // 3),
            tensorboard=False,
            device=self.device.type,
            dtype=self.args.dtype,
        )
        grpo_run(cfg, self.out / "train" / name)
        _replace_dir(self.out / "train" / name / "hf", self.model_dir(name))
        return {"rewards": rewards, "steps": steps, "line": f"{steps} GRPO steps, rewards {rewards}"}

    def engine(self, model_dir: Path, batch: int):
        from nanoseek.infer import Engine

        return Engine.from_pretrained(
            model_dir,
            device=self.device,
            dtype=self.dtype,
            max_batch_size=min(batch, 256),
            max_seq_len=256 + self.plan.max_new_tokens,
        )


def run_r1(args) -> int:
    return Pipeline(args).go()


def _replace_dir(src: Path, dst: Path) -> Path:
    if not src.is_dir():
        raise NanoseekError(f"{src}: missing (the stage that writes it did not finish)")
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst)
    return dst


__all__ = ["FULL", "QUICK", "Plan", "Pipeline", "register"]
