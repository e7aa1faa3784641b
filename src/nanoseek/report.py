"""The report card of a run (`nanoseek demo`): OUT/report.md for people, OUT/report.json for programs.

Its thinking lengths, of the evaluation and of the RL curve alike, are the engine's
`reasoning_tokens`: the tokens between <think> and </think>.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanoseek import cost
from nanoseek.train.metrics import read_metrics

ROWS = [  # (key, label, kind)
    ("pass_at_1", "pass@1 (mean over samples)", "pct"),
    ("pass_at_k", "pass@k", "pct"),
    ("cons_at_k", "cons@k (majority vote)", "pct"),
    ("format_rate", "well-formed (<think>..</think> <answer>..</answer>)", "pct"),
    ("thinking_share", "samples that reason (non-empty <think>)", "pct"),
    ("thinking_accuracy", "accuracy of samples that reason", "pct"),
    ("direct_accuracy", "accuracy of samples that answer directly", "pct"),
    ("response_len", "response length (tokens)", "num"),
    ("thinking_len", "thinking length (tokens between <think> and </think>)", "num"),
]
SAMPLES_SHOWN = 4
WINDOW = 5  # steps averaged at each end of the RL curves
# Reflection is rare (a few samples a step), so its ends average a sixth of the run, 5 steps at least:
# a 60-step run whose reflecting share went 5.6% -> 2.2% over 10-step windows read 2.7% -> 3.0% over 5.
REFLECTION_SHARE_OF_STEPS = 1 / 6


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "loss":
        return f"{value:.3f}"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.1f}"


def _delta(a, b, kind: str) -> str:
    if a is None or b is None:
        return ""
    return f"{100 * (b - a):+.1f} pts" if kind == "pct" else f"{b - a:+.1f}"


def curve_ends(records: list[dict], key: str, window: int = WINDOW) -> tuple[float | None, float | None]:
    """Mean of `key` over the first and the last `window` steps."""
    values = [r[key] for r in records if key in r]
    if not values:
        return None, None
    w = ends_window(len(values), window)
    return sum(values[:w]) / w, sum(values[-w:]) / w


def ends_window(steps: int, window: int = WINDOW) -> int:
    """The steps `curve_ends` averages at each end of a curve of `steps` steps: `window`, at most half."""
    return min(window, max(1, steps // 2))


def write_report(
    out: Path,
    *,
    plan: dict,
    task: str,
    task_options: dict,
    template: str,
    before,
    after,
    samples: list[dict],
    pretrain: dict,
    rl_config: dict,
    seconds: dict,
    quick: bool,
    seed: int,
    base_samples: list[dict] | None = None,
) -> Path:
    out = Path(out)
    records = [r for r in read_metrics(out / "grpo" / "metrics.jsonl") if "reward_mean" in r]
    think_first, think_last = curve_ends(records, "thinking_len_mean")
    acc_first, acc_last = curve_ends(records, "accuracy")
    equal_first, equal_last = curve_ends(records, "all_equal_groups")
    gain = after.pass_at_1 - before.pass_at_1
    goals = {
        "pass_at_1_gain_points": round(100 * gain, 1),
        "pass_at_1_goal_met": gain >= 0.20,
        "thinking_len_first_steps": think_first,
        "thinking_len_last_steps": think_last,
        "thinking_grew": think_first is not None and think_last is not None and think_last > think_first,
    }
    reflection = _reflection(records, before, after, samples) if plan.get("reflect") else None
    if reflection:
        goals.update(reflection["goals"])
    search = _countdown(out, before, after, base_samples or [], samples) if task == "countdown" else None
    if search:
        goals.update(search["goals"])
    plots = {}
    for name in ("reward.png", "length.png", "kl_entropy.png", "reflection.png"):
        if (out / "grpo" / name).exists():
            plots[name] = str(Path("grpo") / name)
    if (out / "pretrain" / "loss.png").exists():
        plots["pretrain_loss.png"] = str(Path("pretrain") / "loss.png")
    costs = cost.run_costs([("pretraining", out / "pretrain"), ("GRPO (R1-Zero)", out / "grpo")])
    report = {
        "task": task,
        "task_options": task_options,
        "template": template,
        "seed": seed,
        "quick": quick,
        "base": before.as_dict(),
        "r1_zero": after.as_dict(),
        "goals": goals,
        "rl_curve": {
            "accuracy_first_steps": acc_first,
            "accuracy_last_steps": acc_last,
            "all_equal_groups_first_steps": equal_first,
            "all_equal_groups_last_steps": equal_last,
            "steps": len(records),
        },
        "pretrain": pretrain,
        "grpo": rl_config,
        "plan": plan,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cost": {"rented": cost.RENTED, "runs": costs},
        "plots": plots,
        "models": {"base": "base", "r1_zero": "r1-zero"},
        **({"reflection": reflection} if reflection else {}),
        **({"countdown": search} if search else {}),
        "samples": samples[: SAMPLES_SHOWN * 4],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")

    k = after.samples_per_problem
    lines = [
        f"# nanoseek demo{_flags(plan)}: {_title(plan)}" + (" (--quick: plumbing only, not a result)" if quick else ""),
        "",
        f"A `tiny` DeepSeek-V3 model pretrained on the synthetic `{task}` corpus ({_opts(task_options)}), "
        f"then trained with GRPO ({rl_config['loss_type']}, {rl_config['steps']} steps of "
        f"{rl_config['prompts_per_step']} prompts x {rl_config['group_size']} completions) on "
        f"{' and '.join(rl_config['rewards'])} rewards alone, with the R1-Zero template and no supervised "
        "reasoning data. Held-out problems: "
        f"{after.problems}, {k} samples each at temperature 0.6, top-p 0.95.",
        "",
        "| | base | R1-Zero | change |",
        "|---|---:|---:|---:|",
    ]
    b, a = before.as_dict(), after.as_dict()
    for key, label, kind in ROWS:
        label = label.replace("@k", f"@{k}")
        lines.append(f"| {label} | {_fmt(b[key], kind)} | {_fmt(a[key], kind)} | {_delta(b[key], a[key], kind)} |")
    lines += [
        "",
        f"- pass@1 {'rose' if gain >= 0 else 'fell'} by {abs(100 * gain):.1f} points (goal: +20): "
        f"**{'met' if goals['pass_at_1_gain_points'] >= 20 else 'not met'}**.",
        f"- Mean thinking length during RL: {_fmt(think_first, 'num')} tokens over the first {WINDOW} steps, "
        f"{_fmt(think_last, 'num')} over the last {WINDOW}: "
        f"**{'grew' if goals['thinking_grew'] else 'did not grow'}**.",
        *_diagnosis(before),
        f"- Training accuracy {_fmt(acc_first, 'pct')} -> {_fmt(acc_last, 'pct')}; groups with all-equal rewards "
        f"(nothing to learn from) {_fmt(equal_first, 'pct')} -> {_fmt(equal_last, 'pct')}.",
        f"- Pretraining: {pretrain.get('steps')} steps, loss {_fmt(pretrain.get('loss_first'), 'loss')} -> "
        f"{_fmt(pretrain.get('loss_last'), 'loss')}.",
        "- Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()) + ".",
        "",
        *_by_difficulty(before, after),
        *(_reflection_markdown(reflection, plan, before, after) if reflection else []),
        *(_countdown_markdown(search, seconds) if search else []),
        *cost.cost_markdown(costs),
        "## Curves",
        "",
    ]
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    lines += ["", "## Sample outputs of the R1-Zero model", ""]
    for s in _pick_samples(samples):
        mark = "right" if s["correct"] else "wrong"
        lines += [f"**{s['prompt']}** (answer {s['answer']}; {mark})", "", "```", s["completion"].strip(), "```", ""]
    lines += [
        "## Reproduce",
        "",
        "```",
        f"nanoseek demo{_flags(plan)} --out {out}{' --quick' if quick else ''} --seed {seed}",
        f"nanoseek chat --model {out / 'r1-zero'}",
        "```",
        "",
    ]
    md = out / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md


def _by_difficulty(before, after) -> list[str]:
    """pass@1 and thinking length per difficulty (for chain: the number of values)."""
    b, a = before.by_difficulty, after.by_difficulty
    levels = sorted(set(b) | set(a))
    if len(levels) < 2:
        return []
    lines = [
        "## By difficulty",
        "",
        "| difficulty | problems | pass@1 base | pass@1 R1-Zero | thinking base | thinking R1-Zero |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for d in levels:
        x, y = b.get(d, {}), a.get(d, {})
        lines.append(
            f"| {d:g} | {y.get('problems', x.get('problems', 0))} | {_fmt(x.get('pass_at_1'), 'pct')} | "
            f"{_fmt(y.get('pass_at_1'), 'pct')} | {_fmt(x.get('thinking_len'), 'num')} | "
            f"{_fmt(y.get('thinking_len'), 'num')} |"
        )
    return [*lines, ""]


def _diagnosis(base) -> list[str]:
    """RL can only amplify a gap between thinking and guessing: say so when there was none."""
    think, direct = base.thinking_accuracy, base.direct_accuracy
    if think is None or direct is None or think > direct + 0.05:
        return []
    return [
        f"- The base model's reasoning was no more accurate than its direct answers ({_fmt(think, 'pct')} vs "
        f"{_fmt(direct, 'pct')}): thinking did not pay, so RL had no gap to amplify. "
        "Its worked steps must be right far more often than its guesses before R1-Zero can work."
    ]


def _title(plan: dict) -> str:
    if plan.get("task") == "countdown":
        return "search from RL alone"
    return "the aha moment, R1-Zero on a laptop" if plan.get("reflect") else "R1-Zero on a laptop"


def _flags(plan: dict) -> str:
    """The demo's flags that made this run: " --task countdown", " --reflection", " -o max_value=7", ..."""
    from nanoseek.demo import FULL, FULL_COUNTDOWN

    countdown = plan.get("task") == "countdown"
    flags = " --task countdown" if countdown else ""
    if plan.get("reflect"):
        flags += " --reflection" + ("" if plan["reflect"] == 0.05 else f" {plan['reflect']:g}")
    if plan.get("reflect_plain"):
        flags += f" --reflection-drill {plan['reflect_plain']:g}"
    if plan.get("reflect") and plan.get("slip", "step") != "step":
        flags += f" --reflection-slip {plan['slip']}"
    default = dict((FULL_COUNTDOWN if countdown else FULL).task_options)
    for key, value in dict(plan.get("task_options") or ()).items():
        if default.get(key) != value:
            flags += f" -o {key}={json.dumps(value) if not isinstance(value, (int, float)) else value}"
    return flags


def _opts(options: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in options.items())


def _pick_samples(samples: list[dict]) -> list[dict]:
    """A few samples, right ones first, one per problem."""
    seen, picked = set(), []
    for s in sorted(samples, key=lambda s: not s["correct"]):
        if s["prompt"] not in seen:
            seen.add(s["prompt"])
            picked.append(s)
        if len(picked) == SAMPLES_SHOWN:
            break
    return picked


# ---- the aha moment (`nanoseek demo --reflection`) -------------------------------------------
def _reflection(records: list[dict], before, after, samples: list[dict]) -> dict:
    """What reflection did: its share and the accuracy with and without it over the RL steps
    (first and last steps), by difficulty, and an aha sample found by `eval.aha_samples`."""
    from nanoseek.eval import aha_samples

    levels = sorted(
        {k.split("/")[1] for r in records for k in r if k.startswith("difficulty/") and k.endswith("/reflection")},
        key=float,
    )
    window = max(WINDOW, round(len(records) * REFLECTION_SHARE_OF_STEPS))
    keys = ("reflection", "reflection_accuracy", "no_reflection_accuracy")
    curve = {key: curve_ends(records, key, window) for key in keys}
    by_level = {d: curve_ends(records, f"difficulty/{d}/reflection", window) for d in levels}
    first, last = curve["reflection"]
    rose = first is not None and last is not None and last > first
    rises = {d: b - a for d, (a, b) in by_level.items() if a is not None and b is not None}
    hardest = levels[-1] if levels else None
    found = aha_samples(samples)
    goals = {
        "reflection_rose": rose,
        "reflection_rose_most_on_hardest": bool(rises) and rose and max(rises, key=rises.get) == hardest,
        "accuracy_rose_with_reflection": rose and after.pass_at_1 > before.pass_at_1,
    }
    return {
        "window": ends_window(len(records), window),
        "rl_curve": {k: {"first_steps": a, "last_steps": b} for k, (a, b) in curve.items()},
        "rl_curve_by_difficulty": {d: {"first_steps": a, "last_steps": b} for d, (a, b) in by_level.items()},
        "goals": goals,
        "aha_samples": len(found),
        "aha": found[0] if found else None,
    }


def _among_thinking(result) -> float | None:
    """The share of the samples that reason that also reflect."""
    return result.reflection_share / result.thinking_share if result.thinking_share else None


def _reflection_markdown(reflection: dict, plan: dict, before, after) -> list[str]:
    curve, goals = reflection["rl_curve"], reflection["goals"]
    window = reflection.get("window", WINDOW)  # reports written before the window grew used WINDOW
    share, right, other = curve["reflection"], curve["reflection_accuracy"], curve["no_reflection_accuracy"]
    rose = "rose" if goals["reflection_rose"] else "did not rise"
    lines = [
        "## Reflection (the aha moment)",
        "",
        f"{100 * plan['reflect']:.0f}% of the corpus's worked solutions slip at one step and correct it in words "
        + (
            '(the recall of the value it uses comes out one off and is re-read: "c=5 wait, c=4:3+4=7")'
            if plan.get("slip") == "recall"
            else '("3+5=7 wait, 3+5=8")'
        )
        + "; RL rewards the answer and the format only, never the move. A sample reflects "
        "when its reasoning re-checks itself (`nanoseek.eval.reflects`: wait, recheck, re-evaluate, let me check)."
        + (
            f" The move is also drilled on its own: {100 * plan['reflect_plain']:.0f}% of the steps of the plain "
            "documents (lines of steps, no template) slip and are corrected."
            if plan.get("reflect_plain")
            else ""
        ),
        "",
        f"- Samples that reflect during RL: {_fmt(share['first_steps'], 'pct')} over the first {window} steps, "
        f"{_fmt(share['last_steps'], 'pct')} over the last {window}: **{rose}**; "
        f"{'most' if goals['reflection_rose_most_on_hardest'] else 'not most'} on the hardest problems.",
        f"- Their accuracy {_fmt(right['first_steps'], 'pct')} -> {_fmt(right['last_steps'], 'pct')}; "
        f"the other samples' {_fmt(other['first_steps'], 'pct')} -> {_fmt(other['last_steps'], 'pct')}.",
        f"- Held out: {_fmt(before.reflection_share, 'pct')} of the base model's samples reflect "
        f"({_fmt(_among_thinking(before), 'pct')} of those that reason), {_fmt(after.reflection_share, 'pct')} of "
        f"the R1-Zero model's ({_fmt(_among_thinking(after), 'pct')}); pass@1 {_fmt(before.pass_at_1, 'pct')} -> "
        f"{_fmt(after.pass_at_1, 'pct')}. Only samples that reason can reflect: as RL turns direct answers into "
        "reasoning, the share of all samples that reflect grows even when the share of reasoning ones does not.",
        "",
    ]
    by_rl = reflection["rl_curve_by_difficulty"]
    if by_rl:
        lines += [
            f"During RL, by difficulty (mean of the first and of the last {window} steps):",
            "",
            "| difficulty | reflect, first steps | reflect, last steps | change |",
            "|---:|---:|---:|---:|",
        ]
        for d, v in by_rl.items():
            a, b = v["first_steps"], v["last_steps"]
            lines.append(f"| {d} | {_fmt(a, 'pct')} | {_fmt(b, 'pct')} | {_delta(a, b, 'pct')} |")
        lines.append("")
    lines += [
        "Held out, by difficulty (base -> R1-Zero):",
        "",
        "| difficulty | reflect | accuracy when reflecting | accuracy otherwise | thinking length |",
        "|---:|---:|---:|---:|---:|",
    ]
    b, a = before.by_difficulty, after.by_difficulty
    for d in sorted(set(b) | set(a), key=float):
        x, y = b.get(d, {}), a.get(d, {})

        def pair(key, kind):
            return f"{_fmt(x.get(key), kind)} -> {_fmt(y.get(key), kind)}"

        lines.append(
            f"| {float(d):g} | {pair('reflection_share', 'pct')} | {pair('reflection_accuracy', 'pct')} | "
            f"{pair('no_reflection_accuracy', 'pct')} | {pair('thinking_len', 'num')} |"
        )
    lines += ["", "### An aha sample", ""]
    aha = reflection["aha"]
    if aha is None:
        lines.append(
            "None found: no held-out sample of the R1-Zero model writes a wrong step or value, re-checks it and "
            "reaches the right answer (`nanoseek.eval.aha_samples`)."
        )
    else:
        lines += [
            f"{reflection['aha_samples']} held-out samples of the R1-Zero model write a wrong step or value, "
            f"re-check it and reach the right answer (`nanoseek.eval.aha_samples`); the one of the hardest problem:",
            "",
            f"**{aha['prompt']}** (answer {aha['answer']})",
            "",
            "```",
            aha["completion"].strip(),
            "```",
        ]
    return [*lines, ""]


# ---- countdown (`nanoseek demo --task countdown`) ---------------------------------------------
# The first-wave demo (README, `nanoseek demo` on chains of 2-7 values, seed 0, 2 threads): the
# numbers this run is compared with.
FIRST_WAVE = {"task": "chain", "parameters": 1.37e6, "base": 0.792, "r1_zero": 1.0, "minutes": 12.3}
TINYZERO = 0.5e9  # Qwen2.5-0.5B, which TinyZero saw fail to learn countdown (1.5B learned it)
GOAL_POINTS = 20
GOAL_MINUTES = 20


def _tries(samples: list[dict]) -> dict:
    """Per difficulty: the mean number of tries of the samples that search (" no." ends each failed try)."""
    by: dict = {}
    for s in samples:
        if s.get("reasoning"):
            by.setdefault(str(s["difficulty"]), []).append(s["reasoning"].count(" no.") + 1)
    return {d: sum(v) / len(v) for d, v in by.items()}


def _countdown(out: Path, before, after, base_samples: list[dict], samples: list[dict]) -> dict:
    """pass@1 of 3 and 4 numbers before and after RL (the goal: +20 points each), the searches'
    accuracy and tries, and the model's size against the 0.5B model TinyZero saw fail."""
    from nanoseek.io.hf import load_pretrained
    from nanoseek.model import count_parameters

    n = count_parameters(load_pretrained(out / "base").config)
    b, a = before.by_difficulty, after.by_difficulty
    gains = {f"{float(d):g}": 100 * (a[d]["pass_at_1"] - b[d]["pass_at_1"]) for d in sorted(set(a) & set(b), key=float)}
    return {
        "parameters": n["total"],
        "active_parameters": n["active"],
        "times_smaller_than_0.5b": TINYZERO / n["total"],
        "gain_points_by_numbers": {d: round(g, 1) for d, g in gains.items()},
        "tries_by_numbers": {"base": _tries(base_samples), "r1_zero": _tries(samples)},
        "first_wave": FIRST_WAVE,
        "goals": {
            "countdown_gain_met": bool(gains) and all(g >= GOAL_POINTS for g in gains.values()),
        },
    }


def _countdown_markdown(search: dict, seconds: dict) -> list[str]:
    gains, tries = search["gain_points_by_numbers"], search["tries_by_numbers"]
    minutes = seconds.get("total", 0) / 60
    fw = search["first_wave"]
    lines = [
        "## Countdown: search from RL alone",
        "",
        f"- Model: {search['parameters'] / 1e6:.2f}M parameters ({search['active_parameters'] / 1e6:.2f}M active), "
        f"{search['times_smaller_than_0.5b']:,.0f} times smaller than the Qwen2.5-0.5B that TinyZero saw fail to "
        "learn countdown (1.5B learned it). Its base model was made for the task: pretrained on worked searches, "
        "tries that fail and the one that reaches the target.",
        "- Held-out pass@1 gain from RL, by count of numbers (goal: +20 points each): "
        + ", ".join(f"{d} numbers {g:+.1f}" for d, g in gains.items())
        + f": **{'met' if search['goals']['countdown_gain_met'] else 'not met'}**.",
        "- Tries per searching sample, base -> R1-Zero: "
        + ", ".join(
            f"{d} numbers {_fmt(tries['base'].get(d), 'num')} -> {_fmt(tries['r1_zero'].get(d), 'num')}" for d in gains
        )
        + ".",
        f"- Time: {minutes:.1f} min in all (goal: under {GOAL_MINUTES} on the CPU): "
        f"**{'met' if minutes < GOAL_MINUTES else 'not met'}**.",
        f"- The first-wave demo (`nanoseek demo`, {fw['task']}, the same tiny preset at "
        f"{fw['parameters'] / 1e6:.2f}M parameters): pass@1 {100 * fw['base']:.1f}% -> {100 * fw['r1_zero']:.1f}% "
        f"in {fw['minutes']} min (README).",
        "",
    ]
    return lines


def rewrite_report(out: str | Path) -> Path:
    """Write OUT/report.md and report.json again from what a demo run left in OUT (report.json,
    samples_base.jsonl, samples_r1_zero.jsonl, the stages' metrics): the report of a finished run
    with this version's report code."""
    from nanoseek.eval import EvalResult

    out = Path(out)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))

    def result(d: dict) -> EvalResult:
        levels = {(int(float(k)) if float(k).is_integer() else float(k)): v for k, v in d["by_difficulty"].items()}
        return EvalResult(**{**d, "by_difficulty": levels})

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text(encoding="utf-8").splitlines()]

    return write_report(
        out,
        plan=report["plan"],
        task=report["task"],
        task_options=report["task_options"],
        template=report["template"],
        before=result(report["base"]),
        after=result(report["r1_zero"]),
        samples=rows("r1_zero"),
        base_samples=rows("base"),
        pretrain=report["pretrain"],
        rl_config=report["grpo"],
        seconds=report["seconds"],
        quick=report["quick"],
        seed=report["seed"],
    )
