"""The report card of `nanoseek r1`: OUT/report.md for people, OUT/report.json for programs.

Every model of the pipeline is scored on the same held-out problems (the task's test split,
which no stage trains on), each in the prompt format it was trained in, by nanoseek.eval: the
metrics' one definition. Each row's result is kept in OUT/eval/ROW.json, so an interrupted
report resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

ACCURACY_TOLERANCE = 0.05  # "keeps R1-Zero's accuracy": R1's pass@1 at most this far below
SAMPLES_SHOWN = 4

COLUMNS = (  # (report.json key, label, kind)
    ("pass@1", "pass@1", "pct"),
    ("cons@k", "cons@k", "pct"),
    ("language_consistency", "language consistency", "pct"),
    ("readability", "readability", "pct"),
    ("format_rate", "well formed", "pct"),
    ("thinking_length", "thinking (tokens)", "num"),
    ("seconds", "seconds", "num"),
)


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.0f}" if kind == "num" else str(value)


def evaluate_row(pipeline, key: str, model_dir: Path, problems) -> tuple[dict, list[dict]]:
    """(EvalResult as a dict, samples) of one model, from OUT/eval/KEY.json when it is there."""
    import torch

    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.eval import evaluate

    cache = pipeline.out / "eval" / f"{key}.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return saved["result"], saved["samples"]
    plan = pipeline.plan
    template = Tokenizer.from_pretrained(model_dir).prompt_template()
    engine = pipeline.engine(model_dir, len(problems) * plan.eval_samples)
    samples: list[dict] = []
    with torch.inference_mode():
        result = evaluate(
            engine,
            pipeline.task(),
            problems,
            template,
            k=plan.eval_samples,
            max_tokens=plan.max_new_tokens,
            seed=pipeline.seed,
            samples_out=samples,
        ).as_dict()
    result["template"] = template
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"result": result, "samples": samples}, ensure_ascii=False, indent=1) + "\n")
    return result, samples


def row_seconds(pipeline, key: str) -> float | None:
    """Wall seconds that made the row's model (for the base and R1-Zero: the demo's stages)."""
    if key in ("base", "r1_zero"):
        seconds = json.loads((pipeline.demo_dir / "report.json").read_text()).get("seconds", {})
        return seconds.get("pretrain" if key == "base" else "grpo")
    return pipeline.stages.get(key.replace("_", "-"), {}).get("seconds")


def stage_entry(result: dict, seconds) -> dict:
    return {
        "pass@1": result["pass_at_1"],
        "pass@k": result["pass_at_k"],
        "cons@k": result["cons_at_k"],
        "k": result["samples_per_problem"],
        "language_consistency": result.get("language_consistency"),
        "readability": result.get("readability"),
        "format_rate": result["format_rate"],
        "thinking_share": result["thinking_share"],
        "thinking_length": result["thinking_len"],
        "thinking_length_by_difficulty": {str(d): v["thinking_len"] for d, v in result["by_difficulty"].items()},
        "pass@1_by_difficulty": {str(d): v["pass_at_1"] for d, v in result["by_difficulty"].items()},
        "response_length": result["response_len"],
        "seconds": seconds,
        "template": result["template"],
    }


def answers(stages: dict, counts: dict) -> dict:
    """The two questions of the R1 paper, with the numbers that answer them."""
    zero, r1 = stages["r1_zero"], stages["r1"]
    keeps = r1["pass@1"] >= zero["pass@1"] - ACCURACY_TOLERANCE
    readable = (r1["readability"] or 0) > (zero["readability"] or 0)
    consistent = (r1["language_consistency"] or 0) >= (zero["language_consistency"] or 0)
    grpo, distilled = stages["student_grpo"], stages["student_distilled"]
    return {
        "r1_keeps_accuracy_and_is_readable": {
            "answer": bool(keeps and readable and consistent),
            "keeps_accuracy": bool(keeps),
            "tolerance_points": round(100 * ACCURACY_TOLERANCE, 1),
            "more_readable": bool(readable),
            "at_least_as_consistent": bool(consistent),
            "pass@1": [zero["pass@1"], r1["pass@1"]],
            "readability": [zero["readability"], r1["readability"]],
            "language_consistency": [zero["language_consistency"], r1["language_consistency"]],
        },
        "distillation_beats_rl_on_the_student": {
            "answer": bool(distilled["pass@1"] > grpo["pass@1"]),
            "pass@1": [grpo["pass@1"], distilled["pass@1"]],
            "pretrained": stages["student"]["pass@1"],
            "seconds": [grpo["seconds"], distilled["seconds"]],
        },
        "logit_kl_beats_plain_sft": {
            "answer": bool(stages["student_distilled_kl"]["pass@1"] > distilled["pass@1"]),
            "pass@1": [distilled["pass@1"], stages["student_distilled_kl"]["pass@1"]],
        },
    }


def run_dirs(out: Path) -> list[tuple[str, Path]]:
    """The training runs of the pipeline, in its order: the demo's two, then each stage's (a
    distillation stage's SFT run is in its sft/)."""
    from nanoseek.r1 import STAGES

    runs = [("demo: pretraining", out / "demo" / "pretrain"), ("demo: GRPO (R1-Zero)", out / "demo" / "grpo")]
    for stage in STAGES:
        run = out / "train" / stage
        runs.append((stage, run / "sft" if (run / "sft" / "summary.json").exists() else run))
    return runs


def write_r1_report(pipeline) -> Path:
    from nanoseek.cost import RENTED, run_costs
    from nanoseek.r1 import ROWS

    out, plan = pipeline.out, pipeline.plan
    problems = pipeline.task().sample(plan.eval_problems, "test", seed=pipeline.seed)
    stages, samples = {}, {}
    for key, _label, rel in ROWS:
        result, samples[key] = evaluate_row(pipeline, key, out / rel, problems)
        stages[key] = stage_entry(result, row_seconds(pipeline, key))
    counts = pipeline.stages["rejection-sampling"]["counts"]
    curves = {}
    for name, run in (
        ("r1_zero", out / "demo" / "grpo"),
        *((n, out / "train" / n) for n in ("reasoning-rl", "r1", "student-grpo")),
    ):
        pngs = [p for p in ("reward.png", "length.png") if (run / p).exists()]
        curves[name] = [str((run / p).relative_to(out)) for p in pngs]
    k = plan.eval_samples
    side_by_side = [
        {
            "prompt": samples["r1"][i * k]["prompt"],
            "answer": samples["r1"][i * k]["answer"],
            "r1_zero": samples["r1_zero"][i * k],
            "r1": samples["r1"][i * k],
        }
        for i in range(min(SAMPLES_SHOWN, len(problems)))
    ]
    demo_info = pipeline.stages["demo"]
    report = {
        "task": demo_info["task"],
        "task_options": demo_info["task_options"],
        "template": stages["r1"]["template"],
        "languages": demo_info["languages"],
        "seed": pipeline.seed,
        "quick": pipeline.args.quick,
        "held_out_problems": len(problems),
        "stages": stages,
        "rejection_sampling": counts,
        "distillation": pipeline.stages["student-distilled"].get("counts"),
        "questions": answers(stages, counts),
        "curves": curves,
        "samples": side_by_side,
        "plan": {k: v for k, v in vars(plan).items()},
        "seconds": {name: info.get("seconds") for name, info in pipeline.stages.items()},
        "cost": {"rented": RENTED, "runs": run_costs(run_dirs(out))},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
    md = out / "report.md"
    md.write_text(markdown(report, pipeline), encoding="utf-8")
    return md


def markdown(report: dict, pipeline) -> str:
    from nanoseek.r1 import ROWS

    stages, q = report["stages"], report["questions"]
    plan = pipeline.plan
    k = stages["r1"]["k"]
    quick = " (--quick: plumbing only, not a result)" if report["quick"] else ""
    languages = report["languages"]
    lines = [
        f"# nanoseek r1: DeepSeek-R1's pipeline on a laptop{quick}",
        "",
        f"Task `{report['task']}` ({', '.join(f'{a} {b}' for a, b in report['task_options'].items())}); "
        f"{report['held_out_problems']} held-out problems (the test split: no stage saw them), {k} samples "
        "each at temperature 0.6, top-p 0.95, every model in the prompt format it was trained in. "
        "Language consistency: share of the reasoning's words in the problem's language (mean over samples "
        "that reason); readability: share of samples in the readable format (closed reasoning, then a summary, "
        "then the answer).",
        "",
        "| model | " + " | ".join(label.replace("@k", f"@{k}") for _, label, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for key, label, _ in ROWS:
        s = stages[key]
        lines.append(f"| {label} | " + " | ".join(_fmt(s.get(c), kind) for c, _, kind in COLUMNS) + " |")
    a, b = q["r1_keeps_accuracy_and_is_readable"], q["distillation_beats_rl_on_the_student"]
    pct = lambda x: _fmt(x, "pct")  # noqa: E731
    lines += [
        "",
        "## The two questions",
        "",
        f"1. **Does R1 keep R1-Zero's accuracy while being readable and consistent? "
        f"{'Yes' if a['answer'] else 'No'}.** pass@1 {pct(a['pass@1'][0])} (R1-Zero) -> {pct(a['pass@1'][1])} (R1), "
        f"{'within' if a['keeps_accuracy'] else 'more than'} {a['tolerance_points']:g} points below; readability "
        f"{pct(a['readability'][0])} -> {pct(a['readability'][1])}; language consistency "
        f"{pct(a['language_consistency'][0])} -> {pct(a['language_consistency'][1])}.",
        f"2. **Does distillation beat RL on the small student? {'Yes' if b['answer'] else 'No'}.** pass@1 of the "
        f"pretrained student {pct(b['pretrained'])}; after {plan.student_steps} GRPO steps "
        f"{pct(b['pass@1'][0])} ({plan.student_steps * plan.prompts_per_step * plan.group_size} completions "
        f"sampled by the student, {_fmt(b['seconds'][0], 'num')} s); after {plan.student_steps} SFT steps on the "
        f"R1 model's verified traces {pct(b['pass@1'][1])} ({plan.student_steps * plan.batch_size} sequences, "
        f"{_fmt(b['seconds'][1], 'num')} s with the teacher's sampling).",
        f"3. Does logit distillation (KL to the teacher's top-{pipeline.plan.top_k} log-probs, weight "
        f"{pipeline.plan.logit_kl:g}) beat plain SFT on the same traces? "
        f"**{'Yes' if q['logit_kl_beats_plain_sft']['answer'] else 'No'}**: pass@1 "
        f"{pct(q['logit_kl_beats_plain_sft']['pass@1'][0])} -> {pct(q['logit_kl_beats_plain_sft']['pass@1'][1])}.",
        "",
    ]
    if len(languages) < 2:
        lines += [
            "The base corpus has one language (a `nanoseek demo` directory given with --from), so R1-Zero "
            "cannot mix languages here and the consistency column reads 100% throughout; run `nanoseek r1` "
            "without --from for the two-language corpus.",
            "",
        ]
    else:
        zero = stages["r1_zero"]["language_consistency"]
        mixes = zero is not None and zero < 0.99
        lines += [
            f"Languages {', '.join(languages)}: R1-Zero's reasoning "
            + (
                f"mixes them: {pct(zero)} of its reasoning is in the problem's language."
                if mixes
                else f"did not mix them on this corpus ({pct(zero)} in the problem's language)."
            ),
            "",
        ]
    c = report["rejection_sampling"]
    lines += [
        "## Rejection sampling",
        "",
        f"{c['prompts']} training prompts x {pipeline.plan.rejection_samples} samples of the reasoning-RL model: "
        f"{c['sampled']} sampled, **{c['kept']} kept**; rejected: wrong {c['wrong']}, malformed {c['malformed']}, "
        f"unreadable {c['unreadable']}, mixed language {c['mixed_language']}, duplicates {c['duplicate']}. "
        f"{c['non_reasoning']} non-reasoning chats added: {c['rows']} conversations in data/rejection-sampling.jsonl.",
        "",
        "## Thinking length by difficulty (tokens)",
        "",
    ]
    levels = sorted({d for s in stages.values() for d in s["thinking_length_by_difficulty"]}, key=float)
    lines += ["| model | " + " | ".join(levels) + " |", "|---|" + "---:|" * len(levels)]
    for key, label, _ in ROWS:
        by = stages[key]["thinking_length_by_difficulty"]
        lines.append(f"| {label} | " + " | ".join(_fmt(by.get(d), "num") for d in levels) + " |")
    lines += ["", "## RL curves", ""]
    for name, pngs in report["curves"].items():
        lines += [f"{name}: " + " ".join(f"![{name} {p}]({p})" for p in pngs), ""]
    lines += ["## R1-Zero and R1 side by side", ""]
    for s in report["samples"]:
        lines += [f"**{s['prompt']}** (answer {s['answer']})", ""]
        for side in ("r1_zero", "r1"):
            mark = "right" if s[side]["correct"] else "wrong"
            lines += [
                f"{'R1-Zero' if side == 'r1_zero' else 'R1'} ({mark}):",
                "",
                "```",
                s[side]["completion"].strip(),
                "```",
                "",
            ]
    from nanoseek.cost import cost_markdown

    lines += cost_markdown(report["cost"]["runs"])
    from_dir = pipeline.args.from_dir
    lines += [
        "## Reproduce",
        "",
        "```",
        f"nanoseek r1 --out {pipeline.out}"
        + (f" --from {from_dir}" if from_dir else "")
        + (" --quick" if report["quick"] else "")
        + f" --seed {report['seed']}",
        f"nanoseek chat --model {pipeline.out / 'r1'}",
        "```",
        "",
    ]
    return "\n".join(lines)
