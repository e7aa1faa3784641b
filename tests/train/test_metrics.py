"""Metrics plots show what ran: which figures, panels and lines each run's records give."""

import json

import pytest

from nanoseek.train.metrics import plot_grpo, plot_metrics

pytest.importorskip("matplotlib")


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def grpo_record(step, beta_kl=0.0, clip=0.0):
    return {
        "step": step,
        "reward_mean": 0.5 + 0.1 * step,
        "reward_std": 0.3,
        "all_equal_groups": 0.25,
        "completion_len_mean": 40.0 + step,
        "completion_len_max": 60,
        "thinking_len_mean": 20.0 + step,
        "thinking_len_max": 30,
        "accuracy": 0.4 + 0.1 * step,
        "format": 0.9,
        "loss": 0.1,
        "kl": beta_kl * step,
        "clip_fraction": clip,
        "entropy": 1.5,
        "groups_used": 4,
    }


def drawn(plots):
    """{file name: [(panel title, ylim, [line labels])]}"""
    return {p.path.name: [(panel.title, panel.ylim, panel.labels) for panel in p.panels] for p in plots}


def test_grpo_without_kl_or_clipping_draws_neither(tmp_path):
    plots = plot_grpo(write(tmp_path / "metrics.jsonl", [grpo_record(s) for s in (1, 2, 3)]), tmp_path)
    assert drawn(plots) == {
        "reward.png": [
            ("Reward per GRPO step", None, ["reward"]),
            ("Shares per GRPO step", (0, 1), ["accuracy", "format rate", "groups with all-equal rewards"]),
        ],
        "length.png": [
            ("Response length per GRPO step", None, ["completion (mean)", "thinking (mean)", "thinking (max)"])
        ],
        "kl_entropy.png": [("Policy entropy", None, ["entropy"])],
    }
    assert all((tmp_path / name).stat().st_size > 0 for name in drawn(plots))
    assert [str(p) for p in plots] == [str(tmp_path / n) for n in ("reward.png", "length.png", "kl_entropy.png")]


def test_grpo_with_kl_and_clipping_draws_them_in_their_own_panels(tmp_path):
    records = [grpo_record(s, beta_kl=0.01, clip=0.02 * (s > 1)) for s in (1, 2, 3)]
    for r in records:
        del r["format"]  # a task without a format reward
    plots = drawn(plot_grpo(write(tmp_path / "metrics.jsonl", records), tmp_path))
    assert plots["kl_entropy.png"] == [
        ("Policy entropy", None, ["entropy"]),
        ("KL to the reference", None, ["KL (k3)"]),
        ("PPO clip fraction", None, ["clipped"]),
    ]
    assert plots["reward.png"][1] == ("Shares per GRPO step", (0, 1), ["accuracy", "groups with all-equal rewards"])


def test_pretraining_plots_label_the_mtp_layer_and_leave_out_what_did_not_run(tmp_path):
    records = [
        {"step": s, "loss": 5.0 - s, "loss_mtp": [5.5 - s], "lr": 1e-3, "expert_load": [1.5, None]} for s in (1, 2)
    ]
    plots = drawn(plot_metrics(write(tmp_path / "metrics.jsonl", records), tmp_path, moe_names=["layer 1", "MTP 1"]))
    assert plots == {
        "loss.png": [("Training loss", None, ["main (next token)", "MTP depth 1"])],
        "lr.png": [("Learning rate", None, ["lr"])],
        "expert_load.png": [("Expert load (max / mean tokens per expert)", None, ["layer 1"])],  # MTP did not run
    }
    for r in records:
        r["expert_load"][1] = 2.0
        del r["loss_mtp"]
    plots = drawn(plot_metrics(write(tmp_path / "metrics.jsonl", records), tmp_path, moe_names=["layer 1", "MTP 1"]))
    assert plots["expert_load.png"][0][2] == ["layer 1", "MTP 1"]
    assert plots["loss.png"][0][2] == ["main (next token)"]


def test_grpo_draws_reflection_only_when_some_sample_reflected(tmp_path):
    import math

    from nanoseek.train.metrics import _running_mean

    records = [{**grpo_record(s), "reflection": 0.0} for s in (1, 2, 3)]
    assert "reflection.png" not in drawn(plot_grpo(write(tmp_path / "metrics.jsonl", records), tmp_path))
    for r in records:
        s = r["step"]
        r.update({"reflection": 0.1 * s, "reflection_accuracy": 0.9, "no_reflection_accuracy": 0.5})
        r.update({"difficulty/2/reflection": 0.0, "difficulty/7/reflection": 0.2 * s})
    del records[0]["reflection_accuracy"]  # a step where no sample reflected has no accuracy of them
    plots = {p.path.name: p for p in plot_grpo(write(tmp_path / "metrics.jsonl", records), tmp_path)}
    share, accuracy = plots["reflection.png"].panels
    assert share.labels == ["all samples", "difficulty 2", "difficulty 7"] and share.ylim == (0, 1)
    assert share.lines[2][2] == pytest.approx([0.2, 0.3, 0.4])  # the running mean of 0.2, 0.4, 0.6
    assert accuracy.labels == ["samples that reflect", "the others"]
    assert math.isnan(accuracy.lines[0][2][0]) and accuracy.lines[0][2][1:] == [0.9, 0.9]
    assert _running_mean([1.0, math.nan, 3.0, 5.0, 7.0, 9.0, 11.0], 5) == [1.0, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0]
