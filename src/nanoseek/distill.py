"""`nanoseek distill`: a small student learns a reasoning model's traces (DeepSeek-R1 section 2.4).

    nanoseek distill --teacher runs/r1/r1 --student runs/r1/student --task chain --out runs/distill
    nanoseek distill --teacher http://localhost:8000/v1 --student-preset student --prompts q.jsonl ...

1. traces: n samples per prompt from the teacher, a nanoseek model directory (the engine,
   batched) or any OpenAI-compatible endpoint (`nanoseek serve`, DeepSeek's API: the
   reasoning comes back as `reasoning_content`);
2. filter as R1's rejection sampling does (nanoseek.data.r1.verdict): right, well formed,
   readable, in one language, no duplicates; OUT/traces.jsonl and its counts;
3. SFT of the student on them (`student/` from a directory, or a fresh dense preset with the
   teacher's tokenizer); the student answers in the teacher's prompt format after it.

`--logit-kl W` adds logit distillation: the teacher's top-k log-probs of every trace token are
kept with the trace, and the SFT loss adds W x KL(teacher || student) on them
(`TrainConfig.distill_kl`); teacher and student must then share a tokenizer, and the teacher
must be a model directory (the API does not return the engine's log-probs).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from nanoseek.errors import NanoseekError
from nanoseek.tasks import Problem


@dataclass
class Budget:
    samples: int = 4  # per prompt
    max_tokens: int = 160
    temperature: float = 0.6
    top_p: float = 0.95
    steps: int = 60  # SFT steps of the student
    batch_size: int = 16
    lr: float = 1e-3
    top_k: int = 8  # teacher log-probs kept per token with --logit-kl
    seed: int = 0


def register(sub) -> None:
    p = sub.add_parser("distill", help="fine-tune a small student on a teacher's verified reasoning traces")
    p.add_argument("--teacher", required=True, help="a model directory, or an OpenAI-compatible base URL")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student", help="the student's model directory (e.g. a pretrained dense student)")
    g.add_argument("--student-preset", help="a dense preset to start from scratch (with the teacher's tokenizer)")
    s = p.add_mutually_exclusive_group(required=True)
    s.add_argument("--prompts", help='jsonl of {"prompt": ..., "answer": ...} rows')
    s.add_argument("--task", help="a nanoseek task (chain, arith, countdown, gsm8k, math): its train split")
    s.add_argument(
        "--traces",
        help="SFT rows already made (e.g. OUT/traces.jsonl of an earlier run): no sampling; with --logit-kl "
        "the teacher scores them",
    )
    p.add_argument(
        "--task-options", default="{}", metavar="JSON", help="the task's options, e.g. '{\"max_values\": 5}'"
    )
    p.add_argument("--limit", type=int, default=400, help="prompts to sample (default 400)")
    p.add_argument("--out", required=True, help="output directory: traces, the SFT run, the distilled student")
    p.add_argument("--samples", type=int, default=Budget.samples, help="samples per prompt (default 4)")
    p.add_argument("--max-tokens", type=int, default=Budget.max_tokens)
    p.add_argument("--temperature", type=float, default=Budget.temperature)
    p.add_argument("--top-p", type=float, default=Budget.top_p)
    p.add_argument("--steps", type=int, default=Budget.steps, help="SFT steps of the student (default 60)")
    p.add_argument("--batch-size", type=int, default=Budget.batch_size)
    p.add_argument("--lr", type=float, default=Budget.lr)
    p.add_argument("--logit-kl", type=float, default=0.0, metavar="W", help="add W x KL to the teacher's top-k")
    p.add_argument("--top-k", type=int, default=Budget.top_k, help="teacher log-probs kept per token (--logit-kl)")
    p.add_argument("--api-key", default=None, help="for a URL teacher (default: $OPENAI_API_KEY or 'none')")
    p.add_argument("--served-model", default=None, help="the model name a URL teacher serves (default: its first)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    from nanoseek import tasks

    for name in ("samples", "steps", "batch_size", "limit", "max_tokens", "top_k"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if args.logit_kl < 0:
        raise NanoseekError(f"--logit-kl: must be at least 0, got {args.logit_kl}")
    url = args.teacher.startswith(("http://", "https://"))
    if not url and not Path(args.teacher, "config.json").is_file():
        raise NanoseekError(f"--teacher {args.teacher}: neither a model directory (no config.json) nor a URL")
    if url and args.logit_kl:
        raise NanoseekError("--logit-kl needs the teacher's top-k log-probs: give --teacher a model directory")
    if args.task:
        try:
            options = json.loads(args.task_options)
        except json.JSONDecodeError as e:
            raise NanoseekError(f"--task-options: not JSON ({e.msg})") from None
        task = tasks.get(args.task, **options)
        problems = task.sample(args.limit, "train", args.seed, distinct=True)
    elif args.prompts:
        task = tasks.Task()
        problems = read_prompts(args.prompts)[: args.limit]
    else:
        task, problems = tasks.Task(), []
        if not Path(args.traces).is_file():
            raise NanoseekError(f"--traces {args.traces}: no such file")
    budget = Budget(
        samples=args.samples,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        top_k=args.top_k,
        seed=args.seed,
    )
    out = Path(args.out)
    teacher = UrlTeacher(args.teacher, args.api_key, args.served_model) if url else Path(args.teacher)
    student = Path(args.student) if args.student else None
    summary = distill(
        teacher,
        student,
        problems,
        task,
        out,
        budget,
        logit_kl=args.logit_kl,
        preset=args.student_preset,
        traces_file=Path(args.traces) if args.traces else None,
    )
    print(json.dumps(summary["counts"]), flush=True)
    print(f"distilled student: {summary['student']}", flush=True)
    return 0


def read_prompts(path: str) -> list[Problem]:
    """Problems from a jsonl file of {"prompt", "answer"} rows (one-line errors name the line)."""
    p = Path(path)
    if not p.is_file():
        raise NanoseekError(f"--prompts {path}: no such file")
    problems = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanoseekError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
            raise NanoseekError(f'{path}:{i}: expected {{"prompt": str, "answer": ...}}')
        problems.append(Problem(prompt=row["prompt"], answer=str(row["answer"]), difficulty=row.get("difficulty", 0)))
    if not problems:
        raise NanoseekError(f"{path}: no prompts")
    return problems


class UrlTeacher:
    """A teacher behind an OpenAI-compatible chat completions endpoint."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None):
        import os

        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.base_url = base_url
        self.model = model

    def complete(self, problems: list[Problem], budget: Budget) -> list[list[str]]:
        """n completions per problem, each as "reasoning\\n</think>\\n\\nanswer" (think opened)."""
        from concurrent.futures import ThreadPoolExecutor

        from nanoseek.data.chat import END_THINK

        model = self.model or self.client.models.list().data[0].id

        def one(problem: Problem) -> list[str]:
            r = self.client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": problem.prompt}],
                n=budget.samples,
                temperature=budget.temperature,
                top_p=budget.top_p,
                max_tokens=budget.max_tokens,
                seed=budget.seed,
            )
            texts = []
            for choice in r.choices:
                reasoning = (choice.message.model_extra or {}).get("reasoning_content") or ""
                texts.append(f"{reasoning}\n{END_THINK}\n\n{choice.message.content or ''}")
            return texts

        try:
            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(one, problems))
        except Exception as e:  # the openai client's errors: connection, status, timeouts
            raise NanoseekError(f"--teacher {self.base_url}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def traces(teacher, problems: list[Problem], task, budget: Budget, top_k: int | None = None):
    """(rows, counts): the teacher's verified samples as SFT rows, and the rejection counts."""
    from collections import Counter

    from nanoseek.data.r1 import REASONS, conversation, verdict
    from nanoseek.data.reasoning import parse_reasoning

    if isinstance(teacher, UrlTeacher):
        counts: Counter = Counter({"sampled": 0, "kept": 0, **{r: 0 for r in REASONS}})
        rows, seen = [], set()
        for problem, texts in zip(problems, teacher.complete(problems, budget)):
            for text in texts:
                counts["sampled"] += 1
                reason = verdict(text, problem, task, think_opened=True)
                if reason is None and (problem.prompt, text.strip()) in seen:
                    reason = "duplicate"
                if reason:
                    counts[reason] += 1
                    continue
                seen.add((problem.prompt, text.strip()))
                counts["kept"] += 1
                reasoning, answer = parse_reasoning(text, think_opened=True)
                rows.append(conversation(problem, reasoning, answer, kind="distill"))
        return rows, counts
    from nanoseek.data.r1 import sample_verified
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.infer import Engine

    template = Tokenizer.from_pretrained(teacher).prompt_template()
    engine = Engine.from_pretrained(
        teacher, max_batch_size=min(256, len(problems) * budget.samples), max_seq_len=256 + budget.max_tokens
    )
    return sample_verified(
        engine,
        task,
        problems,
        template,
        budget.samples,
        budget.max_tokens,
        temperature=budget.temperature,
        top_p=budget.top_p,
        seed=budget.seed,
        top_logprobs=top_k,
    )


def distill(
    teacher,
    student: Path | None,
    problems: list[Problem],
    task,
    out: Path,
    budget: Budget,
    logit_kl: float = 0.0,
    preset: str | None = None,
    traces_file: Path | None = None,
    device: str = "auto",
) -> dict:
    """Traces from the teacher (or `traces_file`, already made), then SFT of the student on them
    into OUT/student (the run in OUT/sft). Returns the counts and the student's directory."""
    from nanoseek.data.r1 import counts_path, write_dataset
    from nanoseek.data.tokenizer import Tokenizer

    out = Path(out)
    teacher_tok = None if isinstance(teacher, UrlTeacher) else Tokenizer.from_pretrained(teacher)
    if student is None:
        student = fresh_student(preset, teacher_tok, out / "student-init")
    student_tok = Tokenizer.from_pretrained(student)
    if logit_kl and teacher_tok is not None and teacher_tok.backend.get_vocab() != student_tok.backend.get_vocab():
        raise NanoseekError(
            f"--logit-kl: the student {student} and the teacher {teacher} have different tokenizers "
            "(logit distillation compares their distributions token by token)"
        )
    if traces_file is None:
        traces_file = out / "traces.jsonl"
        if not traces_file.exists():
            rows, counts = traces(teacher, problems, task, budget, top_k=budget.top_k if logit_kl else None)
            if not rows:
                raise NanoseekError(f"distill: no verified trace among {counts['sampled']} samples of the teacher")
            write_dataset(traces_file, rows, dict(counts, prompts=len(problems)))
    if logit_kl:
        traces_file = scored(teacher, traces_file, out, budget.top_k)
    counts_file = counts_path(traces_file)
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else {}
    counts.setdefault("rows", sum(1 for line in traces_file.read_text().splitlines() if line.strip()))
    # The student answers in the teacher's prompt format: its tokenizer is saved with it.
    fmt = teacher_tok.prompt_format if teacher_tok is not None else "chat"
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        student_tok.save_pretrained(tok_dir, prompt_format=fmt if fmt in ("chat", "r1-zero") else None)
    summary = sft(student, traces_file, tok_dir, out / "sft", budget, logit_kl, device)
    dst = out / "student"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(out / "sft" / "hf", dst)
    kept = f"{counts['kept']} of {counts['sampled']} traces kept" if "sampled" in counts else f"{counts['rows']} rows"
    print(f"distill: {kept}; student in {dst}", file=sys.stderr)
    return {"counts": counts, "student": str(dst), "sft": summary}


def scored(teacher, traces_file: Path, out: Path, top_k: int) -> Path:
    """`traces_file` itself when every row carries the teacher's log-probs, else OUT/traces-scored.jsonl
    with the teacher's teacher-forced top-k added to the rows that lack them."""
    from nanoseek.data.r1 import counts_path, write_dataset

    rows = [json.loads(line) for line in traces_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if all(row.get("teacher") for row in rows):
        return traces_file
    if isinstance(teacher, UrlTeacher):
        raise NanoseekError("--logit-kl needs the teacher's top-k log-probs: give --teacher a model directory")
    done = [r for r in rows if r.get("teacher")]
    todo = [r for r in rows if not r.get("teacher")]
    rows = done + teacher_logprobs(teacher, todo, top_k)
    source = counts_path(traces_file)
    counts = json.loads(source.read_text()) if source.exists() else {"rows": len(rows)}
    return write_dataset(out / "traces-scored.jsonl", rows, dict(counts, scored_by_teacher=len(todo)))


def teacher_logprobs(teacher: Path, rows: list[dict], k: int) -> list[dict]:
    """The rows with the teacher's top-k log-probs of their last assistant turn, teacher-forced:
    for traces the teacher did not sample itself (written elsewhere, or by an API), so that the
    logit-KL term has a distribution to match. The ids are the teacher tokenizer's encoding of
    the turn, as SFT renders it."""
    import torch

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.io.hf import load_pretrained

    tokenizer = Tokenizer.from_pretrained(teacher)
    model = load_pretrained(teacher).eval()
    out = []
    for row in rows:
        pieces = tokenizer.chat_segments(row["messages"], add_generation_prompt=False)
        prompt = [i for text, _ in pieces[:-1] for i in tokenizer.encode(text)]
        completion = tokenizer.encode(pieces[-1][0])
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1 : -1].float()
        top = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), dim=-1)
        pairs = [
            [[int(i), float(lp)] for i, lp in zip(ids, lps)]
            for ids, lps in zip(top.indices.tolist(), top.values.tolist())
        ]
        out.append(dict(row, teacher={"token_ids": completion, "top_logprobs": pairs}))
    return out


def fresh_student(preset: str | None, tokenizer, directory: Path) -> Path:
    """A randomly initialised dense preset with the teacher's tokenizer, saved as a directory."""
    import torch

    from nanoseek.dense import DENSE_PRESETS, DenseConfig, DenseTransformer
    from nanoseek.io.hf import save_pretrained

    if preset not in DENSE_PRESETS:
        raise NanoseekError(f"--student-preset {preset!r}: expected one of {', '.join(DENSE_PRESETS)}")
    if tokenizer is None:
        raise NanoseekError("--student-preset with a URL teacher: give --student a directory with a tokenizer")
    if not (directory / "config.json").exists():
        config = DenseConfig.preset(preset).replace(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id
        )
        torch.manual_seed(0)
        save_pretrained(DenseTransformer(config), directory)
        tokenizer.save_pretrained(directory)
    return directory


def sft(student: Path, data: Path, tokenizer: Path, out: Path, budget: Budget, logit_kl: float, device: str) -> dict:
    from nanoseek.train.config import DataConfig
    from nanoseek.train.pretrain import train
    from nanoseek.train.sft import SFTConfig

    options = {"distill_kl": logit_kl} if logit_kl else {}
    cfg = SFTConfig(
        init_from=str(student),
        data=DataConfig(files=[str(data)], tokenizer=str(tokenizer)),
        seq_len=256 + budget.max_tokens,
        batch_size=budget.batch_size,
        steps=budget.steps,
        seed=budget.seed,
        lr=budget.lr,
        min_lr=budget.lr / 10,
        warmup_steps=min(10, budget.steps // 5),
        checkpoint_every=max(1, budget.steps // 3),
        log_every=max(1, budget.steps // 20),
        tensorboard=False,
        device=device,
        **options,
    )
    return train(cfg, out, stage="sft")
