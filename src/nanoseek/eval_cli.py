"""`nanoseek eval`: one harness for a model directory or any OpenAI-compatible endpoint.

    nanoseek eval --model runs/demo/r1-zero --task chain -o signed=true -k 4 --out runs/eval
    nanoseek eval --base-url http://127.0.0.1:8000/v1 --task gsm8k --data test.jsonl -k 4 --out runs/eval
    nanoseek eval --compare runs/a/results.json runs/b/results.json

Both paths go through `nanoseek.eval.evaluate`, so each metric has one definition. A directory
runs on the engine, every problem queued at once and decoded in continuous batches, prompted in
the model's own format (or `--template`). An endpoint (`nanoseek serve`, vLLM, DeepSeek's API)
gets each problem as one chat message, which the server renders in its own format, and its k
samples as one request (`n`, `seed`), as the engine draws them; `ClientEngine` sends the
requests concurrently through the `openai` client, which retries connection errors, 408, 409,
429 and 5xx with exponential backoff.

A reply is scored as the engine's output is (`reply_text`). The API gives the reasoning apart
(`reasoning_content`), and `content` is the answer: nanoseek's server drops the <answer> tags
that R1-Zero writes around it, vLLM and DeepSeek's API give the text after </think>. So a reply
reads as "<think>reasoning</think> <answer>content</answer>", scored with the tags required.
The grader then finds the answer the directory's text gives it, so pass@1, pass@k, cons@k, the
lengths and the thinking figures agree (the demo's model on 100 problems, 4 samples at
temperature 0.6 or one greedy: every number equal; tests/test_eval_cli.py). Two things differ by
construction: a bare answer after </think>, with neither tags nor \\boxed{}, counts from an
endpoint (its content is the answer) and not from the text; and the format rate and
readability read only what a reply keeps, so a completion without a <think> block, or with text
after </answer>, comes back well-formed. Token counts come from `usage`, which counts a
request's k samples together: the sums (every metric) are exact, samples.jsonl splits them evenly.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nanoseek.data.chat import ANSWER, END_ANSWER, END_THINK, PROMPT_FORMATS, THINK, prompt_template
from nanoseek.device import add_device_arguments, device_arguments
from nanoseek.errors import NanoseekError

DEFAULT_PROBLEMS = 100  # a generated task's problems when --limit is not given
ROWS = [  # (key, label, kind): the table of `nanoseek eval`, results.md and --compare
    ("pass_at_1", "pass@1", "pct"),
    ("pass_at_k", "pass@k", "pct"),
    ("cons_at_k", "cons@k", "pct"),
    ("format_rate", "format", "pct"),
    ("readability", "readability", "pct"),
    ("language_consistency", "language consistency", "pct"),
    ("thinking_share", "samples that reason", "pct"),
    ("thinking_accuracy", "accuracy reasoning", "pct"),
    ("direct_accuracy", "accuracy direct", "pct"),
    ("reflection_share", "samples that re-check", "pct"),
    ("reflection_accuracy", "accuracy re-checking", "pct"),
    ("response_len", "response length", "num"),
    ("thinking_len", "thinking length", "num"),
    ("tokens", "completion tokens", "int"),
    ("seconds", "seconds", "num"),
]


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="pass@1, pass@k, cons@k and lengths of a model directory or an OpenAI-compatible endpoint",
        description="Sample k completions per problem and score them with the task's reward (R1's "
        "evaluation: pass@1 is the mean over the k samples). Prints a table; --out also writes "
        "results.json, results.md and samples.jsonl.",
    )
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", metavar="DIR", help="a model directory (HF format + tokenizer.json)")
    src.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--api-key", metavar="KEY", help="the endpoint's key (default: $OPENAI_API_KEY)")
    src.add_argument("--served-model", metavar="NAME", help="the endpoint's model (default: the first it lists)")
    t = p.add_argument_group("problems")
    t.add_argument("--task", help="chain, arith, countdown, gsm8k or math")
    t.add_argument(
        "-o",
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a task option, the value read as YAML (e.g. -o max_values=4 -o signed=true; repeatable)",
    )
    t.add_argument("--data", metavar="FILE", help="gsm8k/math: a .jsonl or .parquet file in the public layout")
    t.add_argument(
        "--split",
        choices=("train", "test", "all"),
        help="the task's split (default: test; all, the whole file, with --data)",
    )
    t.add_argument(
        "--limit", type=int, metavar="N", help=f"at most N problems (default: the file, or {DEFAULT_PROBLEMS})"
    )
    s = p.add_argument_group("sampling")
    s.add_argument("-k", type=int, default=4, help="samples per problem (default 4)")
    s.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6, as R1 reports)")
    s.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens per completion (default 256)")
    s.add_argument("--seed", type=int, default=0, help="problem order and sampling seed (default 0)")
    s.add_argument(
        "--template",
        help="the prompt: a template with a {prompt} field, or chat / r1-zero (default: the model "
        "directory's own format; for an endpoint the user message, default {prompt})",
    )
    e = p.add_argument_group("endpoint")
    e.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    e.add_argument("--retries", type=int, default=4, help="retries of a failed request, with backoff (default 4)")
    e.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch-size", type=int, default=64, help="completions decoded at once (default 64)")
    add_device_arguments(p)
    p.add_argument("--out", metavar="DIR", help="write results.json, results.md and samples.jsonl here")
    p.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"), help="print two results.json side by side, and quit"
    )
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    if args.compare:
        print(compare(*(read_results(f) for f in args.compare), names=args.compare))
        return 0
    if bool(args.model) == bool(args.base_url):
        raise NanoseekError("give one of --model DIR or --base-url URL")
    _check_flags(args)
    task, options = make_task(args)
    split = args.split or ("all" if args.data else "test")
    problems = select_problems(task, split, args.limit, args.seed)
    if args.model:
        engine, template, source = local_engine(args, problems)
        answer_tags = None  # the template says
    else:
        template = endpoint_template(args.template)
        engine = ClientEngine(
            args.base_url, args.api_key, args.served_model, args.concurrency, args.retries, args.timeout
        )
        source, answer_tags = {"base_url": engine.url, "served_model": engine.model}, True
    from nanoseek.eval import evaluate

    samples: list[dict] = []
    result = evaluate(
        engine,
        task,
        problems,
        template,
        k=args.k,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        samples_out=samples,
        answer_tags=answer_tags,
    )
    record = {
        "task": task.name,
        "task_options": options,
        "split": split,
        **source,
        "template": template,
        "sampling": {
            "k": args.k,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_tokens": args.max_tokens,
            "seed": args.seed,
        },
        "result": result.as_dict(),
    }
    written = write_results(Path(args.out), record, samples) if args.out else []
    print(table(record))
    if written:
        print("wrote " + ", ".join(str(f) for f in written))
    return 0


def _check_flags(args) -> None:
    checks = [
        ("-k", args.k, args.k >= 1, "at least 1"),
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0, "at least 0"),
        ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-tokens", args.max_tokens, args.max_tokens >= 1, "at least 1"),
        ("--limit", args.limit, args.limit is None or args.limit >= 1, "at least 1"),
        ("--concurrency", args.concurrency, args.concurrency >= 1, "at least 1"),
        ("--retries", args.retries, args.retries >= 0, "at least 0"),
        ("--max-batch-size", args.max_batch_size, args.max_batch_size >= 1, "at least 1"),
    ]
    for flag, value, ok, expected in checks:
        if not ok:
            raise NanoseekError(f"{flag} {value}: must be {expected}")


# ---------------------------------------------------------------------------------------
# The problems.
# ---------------------------------------------------------------------------------------
def parse_options(items: list[str]) -> dict:
    """`-o key=value` flags as a dict, each value read as YAML (4, true, [en, el])."""
    import yaml

    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise NanoseekError(f"-o {item}: expected key=value")
        try:
            options[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = text
    return options


def make_task(args):
    """(task, its options) from --task, -o and --data."""
    from nanoseek import tasks

    if not args.task:
        raise NanoseekError(f"--task: required (one of {', '.join(tasks.names())})")
    options = parse_options(args.task_option)
    if args.data:
        if args.task not in ("gsm8k", "math"):
            raise NanoseekError(f"--data: only gsm8k and math read files (task {args.task!r})")
        options["path"] = args.data
    return tasks.get(args.task, **options), options


def select_problems(task, split: str, limit: int | None, seed: int) -> list:
    """The problems of `split` ("all": both splits of a file), at most `limit` of them, in an
    order fixed by the seed; never one twice."""
    from nanoseek.tasks.files import FileTask

    if not isinstance(task, FileTask):
        if split == "all":
            raise NanoseekError(f"--split all: only for gsm8k and math files ({task.name} generates its problems)")
        return task.sample(limit or DEFAULT_PROBLEMS, split, seed=seed)
    if split == "all":
        pool = task.problems["train"] + task.problems["test"]
        if limit is None or limit >= len(pool):
            return pool
        return random.Random(f"{task.name}:all:{seed}").sample(pool, limit)
    whole = limit is None or limit >= len(task.problems[split])
    return task.sample(None if whole else limit, split, seed=seed)


# ---------------------------------------------------------------------------------------
# A model directory: the engine, with a progress bar.
# ---------------------------------------------------------------------------------------
@dataclass
class Completions:
    """One prompt's samples, as Engine.generate's RequestOutput holds them."""

    outputs: list


def progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="problem", disable=None, leave=False, file=sys.stderr)


class LocalEngine:
    """`Engine.generate` step by step (as it runs: every prompt queued, then decoded in
    continuous batches), to count finished problems on a progress bar."""

    def __init__(self, engine):
        self.engine = engine

    def generate(self, prompts: list[str], params) -> list[Completions]:
        ids = [self.engine.add_request(p, params) for p in prompts]
        outputs = {i: [None] * params.n for i in ids}
        left = dict.fromkeys(ids, params.n)
        try:
            with progress(len(ids), "eval") as bar:
                while any(left.values()):
                    for event in self.engine.step():
                        if event.output is not None and event.request_id in outputs:
                            outputs[event.request_id][event.index] = event.output
                            left[event.request_id] -= 1
                            if left[event.request_id] == 0:
                                bar.update()
        except BaseException:
            for i in ids:
                self.engine.abort(i)
            raise
        return [Completions(outputs[i]) for i in ids]


def directory_template(value: str | None, tokenizer) -> str:
    """The prompt for a directory: its own format (None), a format by name, or a template."""
    if value is None or value == "model":
        return tokenizer.prompt_template()
    if value in PROMPT_FORMATS:
        return prompt_template(value)
    return _check_template(value)


def endpoint_template(value: str | None) -> str:
    """The user message for an endpoint, which renders it in its own prompt format."""
    if value in PROMPT_FORMATS:
        raise NanoseekError(
            f"--template {value}: an endpoint prompts in its own format; give the user message as a template "
            "with a {prompt} field (default {prompt})"
        )
    return _check_template(value or "{prompt}")


def _check_template(template: str) -> str:
    try:
        filled = template.format(prompt="\0")
    except (KeyError, IndexError, ValueError) as e:
        raise NanoseekError(f"--template {template!r}: not a template with one {{prompt}} field ({e})") from None
    if "\0" not in filled:
        raise NanoseekError(f"--template {template!r}: has no {{prompt}} field (chat, r1-zero or a template)")
    return template


def local_engine(args, problems) -> tuple[LocalEngine, str, dict]:
    """(engine, template, source) of --model DIR; the cache holds the longest prompt and
    --max-tokens."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.infer import Engine

    model = Path(args.model)
    if not model.is_dir():
        raise NanoseekError(f"--model {model}: no such directory")
    if not (model / "tokenizer.json").is_file():
        raise NanoseekError(f"{model}: no tokenizer.json (the evaluation prompts with text)")
    tokenizer = Tokenizer.from_pretrained(model)
    template = directory_template(args.template, tokenizer)
    longest = max(len(tokenizer.encode(template.format(prompt=p.prompt), bos=True)) for p in problems)
    device, dtype = device_arguments(args)
    engine = Engine.from_pretrained(
        model,
        device=device,
        dtype=dtype,
        max_batch_size=min(args.max_batch_size, len(problems) * args.k),
        max_seq_len=longest + args.max_tokens + 2,
    )
    return LocalEngine(engine), template, {"model": str(model)}


# ---------------------------------------------------------------------------------------
# An endpoint: the OpenAI client, as an engine.
# ---------------------------------------------------------------------------------------
@dataclass
class Reply:
    """One sample of an endpoint's reply, with what `evaluate` reads from an engine's output."""

    text: str  # the reply as a completion: "<think>reasoning</think> <answer>content</answer>"
    reasoning: str
    answer: str
    num_tokens: int
    reasoning_tokens: int
    finish_reason: str | None = None


def reply_text(reasoning: str | None, content: str | None) -> tuple[str, str, str]:
    """(text, reasoning, answer) of a chat reply. `content` is the answer (nanoseek's server has
    dropped R1-Zero's <answer> tags, others give the text after </think>), so it goes back
    inside the tags; a reasoning never closed (content empty) stays open. A server that leaves
    the reasoning in the content ("...</think>answer") is split by the one reasoning parser."""
    from nanoseek.data.reasoning import split_reasoning

    content = content or ""
    if reasoning is None and END_THINK in content:
        split = split_reasoning(content, think_opened=not content.lstrip().startswith(THINK))
        reasoning, content = split.reasoning, split.answer
    reasoning, content = (reasoning or "").strip(), content.strip()
    text = THINK + reasoning + (f"{END_THINK} {ANSWER}{content}{END_ANSWER}" if content else "")
    return text, reasoning, content


def spread(total: int, n: int) -> list[int]:
    """`total` over n samples, as evenly as integers allow (the sum is exact)."""
    return [total // n + (i < total % n) for i in range(n)]


def base_url(url: str) -> str:
    """The API root the client wants: a bare host gets /v1."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise NanoseekError(f"--base-url {url}: expected http(s)://HOST[:PORT][/v1]")
    return url.rstrip("/") + ("/v1" if parts.path in ("", "/") else "")


class ClientEngine:
    """An OpenAI-compatible endpoint behind the shape of `Engine.generate`: each prompt is a user
    message; its k samples are one request (`n`, `seed`), sent `concurrency` at a time."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        concurrency: int = 8,
        retries: int = 4,
        timeout: float = 600.0,
    ):
        from openai import OpenAI

        self.url, self.concurrency, self.retries = base_url(url), concurrency, retries
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=self.url, api_key=key, max_retries=retries, timeout=timeout)
        self.model = model or self._first_model()
        self.warned = False

    def _call(self, fn, **kwargs):
        """`fn(**kwargs)` through the client's retries; what is left after them is one line."""
        import openai

        try:
            return fn(**kwargs)
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            raise NanoseekError(f"{self.url}: HTTP {e.status_code}: {body.get('message') or e.message}") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise NanoseekError(f"{self.url}: {reason} (after {self.retries} retries)") from None

    def _first_model(self) -> str:
        models = self._call(self.client.models.list).data
        if not models:
            raise NanoseekError(f"{self.url}: lists no model; give --served-model")
        return models[0].id

    def generate(self, prompts: list[str], params) -> list[Completions]:
        pool = ThreadPoolExecutor(self.concurrency)
        futures = [pool.submit(self._complete, p, params) for p in prompts]
        try:
            with progress(len(prompts), "eval") as bar:
                for f in as_completed(futures):
                    f.result()  # the first failure stops the rest
                    bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [f.result() for f in futures]

    def _complete(self, prompt: str, params) -> Completions:
        sampling = {"n": params.n, "temperature": params.temperature, "top_p": params.top_p}
        if params.max_tokens is not None:
            sampling["max_tokens"] = params.max_tokens
        if params.seed is not None:
            sampling["seed"] = params.seed
        reply = self._call(
            self.client.chat.completions.create,
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            **sampling,
        )
        choices = sorted(reply.choices, key=lambda c: c.index)
        usage = reply.usage
        details = usage.completion_tokens_details if usage is not None else None
        thinking = details.reasoning_tokens if details is not None else None
        if (usage is None or thinking is None) and not self.warned:
            self.warned = True
            print(f"warning: {self.url} reports no reasoning_tokens in usage: thinking length 0", file=sys.stderr)
        tokens = spread(usage.completion_tokens if usage is not None else 0, len(choices))
        thinking = spread(thinking or 0, len(choices))
        outputs = []
        for c, n, r in zip(choices, tokens, thinking):
            message = c.message
            reasoning = getattr(message, "reasoning_content", None)
            if reasoning is None:
                reasoning = getattr(message, "reasoning", None)  # vLLM's newer name
            text, reasoning, answer = reply_text(reasoning, message.content)
            outputs.append(Reply(text, reasoning, answer, n, r, c.finish_reason))
        return Completions(outputs)


# ---------------------------------------------------------------------------------------
# What is printed and written.
# ---------------------------------------------------------------------------------------
def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:,.0f}" if kind == "int" else f"{value:.1f}"


def _delta(a, b, kind: str) -> str:
    if a is None or b is None:
        return ""
    if kind == "pct":
        return f"{100 * (b - a):+.1f} pts"
    return f"{b - a:+,.0f}" if kind == "int" else f"{b - a:+.1f}"


def _label(label: str, k: int) -> str:
    return label.replace("@k", f"@{k}")


def _source(record: dict) -> str:
    return f"model {record['model']}" if "model" in record else f"{record['base_url']} ({record['served_model']})"


def _heading(record: dict) -> str:
    r, s = record["result"], record["sampling"]
    return (
        f"{record['task']}: {r['problems']} {record['split']} problems x {s['k']} samples, temperature "
        f"{s['temperature']:g}, top-p {s['top_p']:g}, max tokens {s['max_tokens']}, seed {s['seed']}; {_source(record)}"
    )


def _difficulties(result: dict) -> list[tuple[str, dict]]:
    return sorted(result["by_difficulty"].items(), key=lambda kv: float(kv[0]))


def table(record: dict) -> str:
    """The terminal table of one result."""
    r, k = record["result"], record["sampling"]["k"]
    lines = [_heading(record)]
    lines += [f"  {_label(label, k):<22} {_fmt(r[key], kind):>10}" for key, label, kind in ROWS]
    levels = _difficulties(r)
    if len(levels) > 1:
        lines.append(f"  {'difficulty':<10} {'problems':>8} {'pass@1':>8} {'thinking':>9}")
        for d, v in levels:
            lines.append(
                f"  {float(d):<10g} {v['problems']:>8} {_fmt(v['pass_at_1'], 'pct'):>8} "
                f"{_fmt(v['thinking_len'], 'num'):>9}"
            )
    return "\n".join(lines)


def markdown(record: dict) -> str:
    r, k = record["result"], record["sampling"]["k"]
    lines = [f"# Evaluation: {record['task']}", "", _heading(record) + ".", ""]
    if "base_url" in record:
        lines += [
            "Scored from the endpoint's replies, `<think>reasoning_content</think> <answer>content</answer>` "
            "(the format rate and readability see only what a reply keeps).",
            "",
        ]
    lines += ["| metric | value |", "|---|---:|"]
    lines += [f"| {_label(label, k)} | {_fmt(r[key], kind)} |" for key, label, kind in ROWS]
    levels = _difficulties(r)
    if len(levels) > 1:
        lines += ["", "| difficulty | problems | pass@1 | thinking length |", "|---:|---:|---:|---:|"]
        lines += [
            f"| {float(d):g} | {v['problems']} | {_fmt(v['pass_at_1'], 'pct')} | {_fmt(v['thinking_len'], 'num')} |"
            for d, v in levels
        ]
    return "\n".join(lines) + "\n"


def write_results(out: Path, record: dict, samples: list[dict]) -> list[Path]:
    """results.json, results.md and samples.jsonl in `out`."""
    from nanoseek.storage import disk_errors

    files = [out / "results.json", out / "results.md", out / "samples.jsonl"]
    with disk_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        files[0].write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        files[1].write_text(markdown(record), encoding="utf-8")
        files[2].write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return files


def read_results(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"{path}: no such file")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanoseekError(f"{path}: not JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict) or "sampling" not in record:
        raise NanoseekError(f"{path}: not a results.json of nanoseek eval (no 'result' and 'sampling')")
    return record


def compare(a: dict, b: dict, names=("A", "B")) -> str:
    """Two results side by side: metric, A, B, B-A (pass@1 and thinking by difficulty too)."""
    ra, rb = a["result"], b["result"]
    k = a["sampling"]["k"] if a["sampling"]["k"] == b["sampling"]["k"] else "k"
    lines = [f"A: {names[0]}: {_heading(a)}", f"B: {names[1]}: {_heading(b)}", ""]
    lines.append(f"  {'metric':<26} {'A':>10} {'B':>10} {'B-A':>11}")
    rows = [(_label(label, k), ra.get(key), rb.get(key), kind) for key, label, kind in ROWS]
    da, db = ra.get("by_difficulty", {}), rb.get("by_difficulty", {})
    for d in sorted(set(da) | set(db), key=float):
        x, y = da.get(d, {}), db.get(d, {})
        rows.append((f"pass@1, difficulty {float(d):g}", x.get("pass_at_1"), y.get("pass_at_1"), "pct"))
        rows.append((f"thinking, difficulty {float(d):g}", x.get("thinking_len"), y.get("thinking_len"), "num"))
    for label, x, y, kind in rows:
        lines.append(f"  {label:<26} {_fmt(x, kind):>10} {_fmt(y, kind):>10} {_delta(x, y, kind):>11}")
    return "\n".join(lines)
