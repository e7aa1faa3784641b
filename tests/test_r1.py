"""`nanoseek r1 --quick` end to end: every stage's model exists and reloads, the rejection-
sampled data holds only verified samples, the report card has every row and key, a second run
skips every stage, and the distilled student opens in transformers with its chat template.
Also `nanoseek distill` on its own, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from nanoseek import tasks
from nanoseek.data.chat import END_THINK

STAGE_DIRS = (
    "demo/base",
    "demo/r1-zero",
    "cold-start",
    "reasoning-rl",
    "sft",
    "r1",
    "student",
    "student-grpo",
    "student-distilled",
    "student-distilled-kl",
)


def run(*args, timeout=900):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "nanoseek.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("r1") / "run"
    r = run("r1", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


def test_every_stage_runs_once_with_a_progress_line(quick):
    out, r = quick
    from nanoseek.r1 import STAGES

    for i, name in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {name}: running" in r.stderr
        assert (out / "stages" / f"{name}.json").exists()
    assert f"report: {out / 'report.md'}" in r.stdout


def test_every_model_reloads_in_its_prompt_format(quick):
    out, _ = quick
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.infer import Engine, SamplingParams

    formats = {}
    for rel in STAGE_DIRS:
        engine = Engine.from_pretrained(out / rel, max_batch_size=1, max_seq_len=96)
        template = engine.tokenizer.prompt_template()
        o = engine.generate(template.format(prompt="a=1,b=2. a+b"), SamplingParams(temperature=0, max_tokens=4))
        assert len(o[0].outputs[0].token_ids) >= 1, rel
        formats[rel] = Tokenizer.from_pretrained(out / rel).prompt_format
    assert formats["demo/base"] == formats["demo/r1-zero"] == formats["student"] == "r1-zero"
    assert all(formats[d] == "chat" for d in ("cold-start", "reasoning-rl", "sft", "r1", "student-distilled")), formats


def test_rejection_sampled_data_holds_only_verified_samples(quick):
    out, _ = quick
    from nanoseek.data.r1 import verdict
    from nanoseek.tasks import Problem

    report = json.loads((out / "report.json").read_text())
    task = tasks.get(report["task"], **report["task_options"])
    rows = [json.loads(line) for line in (out / "data" / "rejection-sampling.jsonl").read_text().splitlines()]
    counts = json.loads((out / "data" / "rejection-sampling.counts.json").read_text())
    sampled = [r for r in rows if r["kind"] == "rejection_sampled"]
    assert len(sampled) == counts["kept"] and len(rows) == counts["rows"]
    assert counts["sampled"] == counts["kept"] + sum(
        counts[k] for k in ("wrong", "malformed", "unreadable", "mixed_language", "duplicate")
    )
    assert counts["sampled"] == counts["prompts"] * 2  # QUICK: 2 samples per prompt
    for row in rows:
        user, assistant = row["messages"]
        problem = Problem(prompt=user["content"], answer=row["answer"], difficulty=row["difficulty"], task="chain")
        text = f"{assistant['reasoning_content']}\n{END_THINK}\n\n{assistant['content']}"
        if row["kind"] == "non_reasoning":
            assert assistant["reasoning_content"] == ""
        else:
            assert verdict(text, _with_meta(task, problem), task, think_opened=True) is None, text
    assert len(
        {(r["prompt"], r["messages"][1]["reasoning_content"], r["messages"][1]["content"]) for r in sampled}
    ) == len(sampled)


def _with_meta(task, problem):
    """The problem with the language its prompt is written in (what the task's problems carry)."""
    import dataclasses

    return dataclasses.replace(problem, meta={"language": task.language(problem), "reasoning": True})


def test_report_has_every_row_and_key(quick):
    out, _ = quick
    from nanoseek.r1 import ROWS

    report = json.loads((out / "report.json").read_text())
    assert {"task", "task_options", "template", "stages", "rejection_sampling", "questions"} <= set(report)
    assert report["task_options"]["languages"] == ["en", "el"]
    for key, _, _ in ROWS:
        s = report["stages"][key]
        for k in ("pass@1", "cons@k", "language_consistency", "readability", "thinking_length", "seconds"):
            assert k in s, (key, k)
        assert 0 <= s["pass@1"] <= 1 and s["template"]
        assert isinstance(s["thinking_length_by_difficulty"], dict)
    q = report["questions"]
    assert isinstance(q["r1_keeps_accuracy_and_is_readable"]["answer"], bool)
    assert isinstance(q["distillation_beats_rl_on_the_student"]["answer"], bool)
    md = (out / "report.md").read_text()
    assert "## The two questions" in md and "## Rejection sampling" in md and "R1-Zero and R1 side by side" in md
    assert "| student distilled |" in md
    # every training run's FLOPs, the demo's two and each stage's, in the cost section
    runs = {r["run"]: r for r in report["cost"]["runs"]}
    trained = ("cold-start", "reasoning-rl", "sft", "r1", "student", "student-grpo", "student-distilled")
    assert set(runs) == {"demo: pretraining", "demo: GRPO (R1-Zero)", *trained, "student-distilled-kl"}
    assert all(r["flops"] > 0 and r["seconds"] > 0 and r["rented_dollars"] > 0 for r in runs.values())
    assert "## Cost" in md and "| student-distilled-kl |" in md


def test_a_second_run_skips_every_stage(quick):
    out, _ = quick
    from nanoseek.r1 import STAGES

    before = (out / "report.json").read_text()
    r = run("r1", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("skipped") == len(STAGES)
    assert (out / "report.json").read_text() == before


def test_the_distilled_student_opens_in_transformers_with_its_chat_template(quick):
    transformers = pytest.importorskip("transformers")
    import torch

    from nanoseek.io.hf import load_pretrained

    out, _ = quick
    d = out / "student-distilled"
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    ours = load_pretrained(d)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a=1,b=2. a+b"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<｜User｜>a=1,b=2. a+b<｜Assistant｜><think>\n"), text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ours_ids(d, text)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=0, atol=1e-4)


def ours_ids(directory, text):
    from nanoseek.data.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(directory).encode(text)


def test_distill_command_samples_filters_and_trains(quick, tmp_path):
    out, _ = quick
    options = json.dumps(json.loads((out / "report.json").read_text())["task_options"])
    r = run(
        "distill",
        "--teacher", str(out / "r1"),
        "--student", str(out / "student"),
        "--task", "chain",
        "--task-options", options,
        "--limit", "4", "--samples", "2", "--steps", "2", "--batch-size", "2", "--max-tokens", "48",
        "--out", str(tmp_path / "d"),
    )  # fmt: skip
    # the quick R1 model is barely trained: it may write no verified trace, which is a one-line error
    if r.returncode != 0:
        assert "distill: no verified trace among 8 samples of the teacher" in r.stderr, r.stderr[-2000:]
        return
    assert (tmp_path / "d" / "student" / "config.json").exists()
    counts = json.loads((tmp_path / "d" / "traces.counts.json").read_text())
    assert counts["sampled"] == 8


def test_distill_on_given_traces_with_logit_kl_has_the_teacher_score_them(quick, tmp_path):
    """Traces from elsewhere (here: the readable cold-start solutions) carry no log-probs: with
    --logit-kl the teacher scores them teacher-forced, and the SFT logs its KL."""
    out, _ = quick
    from nanoseek.train.metrics import read_metrics

    r = run(
        "distill",
        "--teacher", str(out / "r1"),
        "--student", str(out / "student"),
        "--traces", str(out / "data" / "cold-start.jsonl"),
        "--steps", "3", "--batch-size", "2", "--logit-kl", "0.5", "--top-k", "4",
        "--out", str(tmp_path / "d"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "d" / "traces-scored.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(p) == 4 for row in rows for p in row["teacher"]["top_logprobs"])
    assert all(len(row["teacher"]["token_ids"]) == len(row["teacher"]["top_logprobs"]) for row in rows)
    records = [m for m in read_metrics(tmp_path / "d" / "sft" / "metrics.jsonl") if "kl" in m]
    assert records and all(m["kl"] >= 0 for m in records)
    assert (tmp_path / "d" / "student" / "config.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "nowhere", "--student-preset", "student", "--task", "chain"], "--teacher nowhere: neither"),
        (
            ["--teacher", "http://127.0.0.1:9/v1", "--student-preset", "student", "--task", "chain", "--logit-kl", "1"],
            "--logit-kl needs the teacher's top-k log-probs",
        ),
        (["--teacher", "nowhere", "--student-preset", "student", "--task", "chain", "--steps", "0"], "--steps: must"),
    ],
)
def test_distill_errors_are_one_line(args, message, tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["distill", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.slow  # ~17 s; stage checkpoints resume as tests/train/test_checkpoint.py tests them
def test_an_interrupted_stage_resumes_from_its_checkpoint(quick):
    """The logit-KL distillation stopped after its first step (its newest checkpoint and its
    marker gone): re-running the command resumes it at step 1, skips what finished before it and
    runs what comes after it (the report). Last in this file: it works on the shared run, whose
    checkpoints name its absolute paths, and leaves it whole again."""
    import shutil

    from nanoseek.train import checkpoint as ckpt

    out = quick[0]
    checkpoints = ckpt.list_checkpoints(out / "train" / "student-distilled-kl" / "sft")
    assert len(checkpoints) >= 2
    shutil.rmtree(checkpoints[-1])
    (out / "stages" / "student-distilled-kl.json").unlink()
    r = run("r1", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {checkpoints[-2]} at step 1" in r.stderr, r.stderr[-3000:]
    assert "[10/11] student-distilled-kl: running" in r.stderr and "[9/11] student-distilled: done earlier" in r.stderr
    assert "[11/11] report: running" in r.stderr
    assert (out / "stages" / "student-distilled-kl.json").exists() and (out / "report.json").exists()
    # A finished stage run again: the stages after it start over (their checkpoints were trained
    # on what it wrote before), it resumes its own finished run.
    (out / "stages" / "student-distilled.json").unlink()
    r = run("r1", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[9/11] student-distilled: running" in r.stderr and "[10/11] student-distilled-kl: running" in r.stderr
    assert "student-distilled/sft" in r.stderr and "student-distilled-kl/sft/checkpoints" not in r.stderr
    assert (out / "stages" / "student-distilled-kl.json").exists() and (out / "report.json").exists()
    # --redo: that stage starts over too (no resuming its own finished run), the earlier ones stay
    r = run("r1", "--quick", "--out", str(out), "--redo", "student-distilled-kl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[10/11] student-distilled-kl: running" in r.stderr and "[9/11] student-distilled: done earlier" in r.stderr
    assert "resuming" not in r.stderr and (out / "stages" / "student-distilled-kl.json").exists()
    r = run("r1", "--quick", "--out", str(out), "--redo", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
